"""Interval bound propagation in plain PyTorch: the reference the IBP tests compare against.

Supports ``nn.Sequential`` stacks of ``Conv2d``, ``Linear``, ``ReLU`` and
``Flatten`` (and modules exposing such a stack as ``.net``, like the toy MLP/CNN).
Affine layers map the box centre exactly and the radius through ``|W|``; ReLU is
monotone, so it maps the ends.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F


def _layers(model: nn.Module) -> list[nn.Module]:
    if isinstance(model, nn.Sequential):
        out: list[nn.Module] = []
        for m in model:
            out.extend(_layers(m))
        return out
    if hasattr(model, "net") and isinstance(model.net, nn.Sequential):
        return _layers(model.net)
    return [model]


def _affine(layer: nn.Module, centre: torch.Tensor, radius: torch.Tensor, C: Optional[torch.Tensor] = None):
    if isinstance(layer, nn.Conv2d):
        kw = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
        return F.conv2d(centre, layer.weight, layer.bias, **kw), F.conv2d(radius, layer.weight.abs(), None, **kw)
    assert isinstance(layer, nn.Linear)
    if C is None:
        return F.linear(centre, layer.weight, layer.bias), F.linear(radius, layer.weight.abs())
    w = C @ layer.weight  # (N, S, in): the specification merged into the last layer
    b = C @ layer.bias
    c = (w @ centre.unsqueeze(-1)).squeeze(-1) + b
    r = (w.abs() @ radius.unsqueeze(-1)).squeeze(-1)
    return c, r


def interval_forward(
    model: nn.Module, lower: torch.Tensor, upper: torch.Tensor, C: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """IBP bounds of ``model`` over the box ``[lower, upper]``.

    With ``C`` ``(N, S, K)`` the result bounds ``C @ logits``, ``C`` merged into the
    final Linear layer (as auto_LiRPA does), which is tighter than bounding logits.
    """
    layers = _layers(model)
    lo, hi = lower, upper
    with torch.no_grad():
        for i, layer in enumerate(layers):
            last = i == len(layers) - 1
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                centre, radius = (hi + lo) / 2, (hi - lo) / 2
                centre, radius = _affine(layer, centre, radius, C if last else None)
                lo, hi = centre - radius, centre + radius
            elif isinstance(layer, nn.ReLU):
                lo, hi = lo.clamp(min=0), hi.clamp(min=0)
            elif isinstance(layer, nn.Flatten):
                lo, hi = layer(lo), layer(hi)
            else:
                raise TypeError(f"reference IBP does not support {type(layer).__name__}")
            if last and C is not None and not isinstance(layer, nn.Linear):
                raise TypeError("C can only be merged into a final Linear layer")
    return lo, hi
