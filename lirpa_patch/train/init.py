"""How a run initialises the model's weights before training (``TrainConfig.init``).

* ``"keep"``: train the model as it is given (its own initialisation, or pretrained weights).
* ``"ibp"``: the IBP initialisation of Shi et al. 2021 ("Fast certified robust training with
  short warmup", NeurIPS): every linear and convolution weight drawn from
  ``N(0, 2*pi / n**2)``, ``n`` its fan-in, biases 0. Then the expected interval radius of a
  layer's output is twice its input's (``n * E|w| = 2``), and a ReLU that passes about half
  the units brings it back: interval bounds neither explode nor vanish with depth at the
  start, which is what lets a short warm-up work.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn


def ibp_init(model: nn.Module, generator: Optional[torch.Generator] = None) -> nn.Module:
    """Re-initialise ``model``'s ``nn.Linear`` and ``nn.Conv2d`` layers in place (module docstring);
    returns ``model``. Other parameters are left as they are."""
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                fan_in = layer.weight[0].numel()
                std = math.sqrt(2 * math.pi) / fan_in
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * std)
                if layer.bias is not None:
                    layer.bias.zero_()
    return model


def _keep(model: nn.Module, generator: Optional[torch.Generator] = None) -> nn.Module:
    return model


INITIALISERS: dict[str, Callable[..., nn.Module]] = {"keep": _keep, "ibp": ibp_init}
"""``TrainConfig.init`` name (:data:`lirpa_patch.choices.INITS`) -> function(model, generator),
applied when the trainer is built (a resumed run then loads its checkpoint's weights)."""
