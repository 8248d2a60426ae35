"""The architectures of the paper's Appendix A.1, by name, for 1- or 3-channel images.

Every network maps its *normalized* input ``(N, C, H, W)`` to logits ``(N, K)``
and is a plain ``nn.Sequential`` of ``Flatten``, ``Linear``, ``Conv2d`` and
``ReLU`` (what auto_LiRPA, ONNX export and bound pooling all handle). The
trainer puts the normalization in front with
:class:`~lirpa_patch.models.adapter.ImageModel`.

Exact layers (``w`` is ``width``; ``c`` input channels; ``K`` classes;
``(h, w)`` below the spatial size after the convolutions, computed from the
image size; convolutions are ``Conv2d(in, out, kernel, stride, padding)``):

``mlp`` (default ``width`` 255, the paper's MLP with one hidden layer)::

    Flatten, Linear(c*H*W, w), ReLU, Linear(w, K)

``cnn2`` (default ``width`` 1; the paper's small 2-layer CNN)::

    Conv2d(c, 4w, 4, 2, 1), ReLU, Conv2d(4w, 8w, 4, 2, 1), ReLU,
    Flatten, Linear(8w*h*w, 256), ReLU, Linear(256, K)

``cnn4`` (default ``width`` 1; the paper's 4-layer CNN)::

    Conv2d(c, 4w, 3, 1, 1), ReLU, Conv2d(4w, 4w, 4, 2, 1), ReLU,
    Conv2d(4w, 8w, 3, 1, 1), ReLU, Conv2d(8w, 8w, 4, 2, 1), ReLU,
    Flatten, Linear(8w*h*w, 256), ReLU, Linear(256, 256), ReLU, Linear(256, K)

``cnn4conv11`` and ``cnn4conv13`` (default ``width`` 1; the paper's Table 7 CNNs for the
sparse threat): ``cnn4`` with a large first convolution, ``Conv2d(c, 4w, 11, 1, 5)`` or
``Conv2d(c, 4w, 13, 1, 6)``, so the first layer sees wide neighbourhoods (the rest as
``cnn4``)::

    Conv2d(c, 4w, 11, 1, 5), ReLU, Conv2d(4w, 4w, 4, 2, 1), ReLU,
    Conv2d(4w, 8w, 3, 1, 1), ReLU, Conv2d(8w, 8w, 4, 2, 1), ReLU,
    Flatten, Linear(8w*h*w, 256), ReLU, Linear(256, 256), ReLU, Linear(256, K)

``cnn5wide`` (default ``width`` 16; the paper's large CIFAR model, 5 conv layers)::

    Conv2d(c, 4w, 3, 1, 1), ReLU, Conv2d(4w, 4w, 3, 1, 1), ReLU,
    Conv2d(4w, 8w, 3, 2, 1), ReLU, Conv2d(8w, 8w, 3, 1, 1), ReLU,
    Conv2d(8w, 8w, 3, 1, 1), ReLU, Flatten, Linear(8w*h*w, 512), ReLU, Linear(512, K)

These follow the models of the authors' public configuration (``mlp_255``,
``cnn_2layer_width_1``, ``cnn_4layer_linear_256_width_1``,
``cnn_4layer_conv11`` / ``cnn_4layer_conv13`` and ``cnn_5layer_linear_512_width_16``). ``width`` is the one knob: the hidden
units of ``mlp``, the channel multiplier of the CNNs.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from ..errors import UsageError

ARCHITECTURES: dict[str, str] = {
    "mlp": "one hidden layer of `width` units (default 255)",
    "cnn2": "2 conv layers (4w, 8w channels, stride 2), linear 256 (default w = 1)",
    "cnn4": "4 conv layers (4w, 4w, 8w, 8w channels), linear 256, 256 (default w = 1)",
    "cnn4conv11": "cnn4 with an 11x11 first convolution (Table 7, sparse threat; default w = 1)",
    "cnn4conv13": "cnn4 with a 13x13 first convolution (Table 7, sparse threat; default w = 1)",
    "cnn5wide": "5 conv layers (4w, 4w, 8w, 8w, 8w channels), linear 512 (default w = 16)",
}
"""Architecture names accepted by :func:`build_architecture`, with a one-line summary."""

ARCHITECTURE_NAMES: tuple[str, ...] = tuple(ARCHITECTURES)
"""The names of :data:`ARCHITECTURES`, in order."""

DEFAULT_WIDTHS: dict[str, int] = {"mlp": 255, "cnn2": 1, "cnn4": 1, "cnn4conv11": 1, "cnn4conv13": 1, "cnn5wide": 16}

_FIRST_KERNEL: dict[str, int] = {"cnn4": 3, "cnn4conv11": 11, "cnn4conv13": 13}
"""Kernel of the first convolution of the cnn4 family (padding keeps the size: kernel // 2)."""
"""``width`` used when :func:`build_architecture` gets none."""


def _conv_stack(c: int, w: int, name: str) -> list[nn.Module]:
    if name == "cnn2":
        return [nn.Conv2d(c, 4 * w, 4, 2, 1), nn.ReLU(), nn.Conv2d(4 * w, 8 * w, 4, 2, 1), nn.ReLU()]
    if name in _FIRST_KERNEL:
        kernel = _FIRST_KERNEL[name]
        return [
            nn.Conv2d(c, 4 * w, kernel, 1, kernel // 2), nn.ReLU(),
            nn.Conv2d(4 * w, 4 * w, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(4 * w, 8 * w, 3, 1, 1), nn.ReLU(),
            nn.Conv2d(8 * w, 8 * w, 4, 2, 1), nn.ReLU(),
        ]
    return [  # cnn5wide
        nn.Conv2d(c, 4 * w, 3, 1, 1), nn.ReLU(),
        nn.Conv2d(4 * w, 4 * w, 3, 1, 1), nn.ReLU(),
        nn.Conv2d(4 * w, 8 * w, 3, 2, 1), nn.ReLU(),
        nn.Conv2d(8 * w, 8 * w, 3, 1, 1), nn.ReLU(),
        nn.Conv2d(8 * w, 8 * w, 3, 1, 1), nn.ReLU(),
    ]


_HEADS: dict[str, Callable[[int, int], list[nn.Module]]] = {
    "cnn2": lambda f, k: [nn.Linear(f, 256), nn.ReLU(), nn.Linear(256, k)],
    "cnn4": lambda f, k: [nn.Linear(f, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, k)],
    "cnn4conv11": lambda f, k: _HEADS["cnn4"](f, k),
    "cnn4conv13": lambda f, k: _HEADS["cnn4"](f, k),
    "cnn5wide": lambda f, k: [nn.Linear(f, 512), nn.ReLU(), nn.Linear(512, k)],
}


def _image_size(image_size: Union[int, Sequence[int]]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    size = tuple(int(v) for v in image_size)
    if len(size) != 2:
        raise UsageError(f"image size must be S or (H, W), got {tuple(image_size)}")
    return size  # type: ignore[return-value]


def build_architecture(
    name: str,
    in_channels: int,
    image_size: Union[int, Sequence[int]],
    num_classes: int = 10,
    *,
    width: Optional[int] = None,
) -> nn.Sequential:
    """Build a freshly initialised network of the paper's Appendix A.1 (see the module docstring).

    Args:
        name: one of :data:`ARCHITECTURES` (``mlp``, ``cnn2``, ``cnn4``, ``cnn4conv11``,
            ``cnn4conv13``, ``cnn5wide``).
        in_channels: ``C``, 1 (MNIST) or 3 (CIFAR-10); any positive number works.
        image_size: ``S`` or ``(H, W)``.
        num_classes: ``K``.
        width: hidden units of ``mlp`` / channel multiplier of the CNNs
            (default :data:`DEFAULT_WIDTHS`).

    Returns:
        An ``nn.Sequential`` mapping ``(N, C, H, W)`` to logits ``(N, K)``.

    Raises:
        UsageError: unknown name, non-positive sizes, or an image too small for the CNN.
    """
    key = str(name).strip().lower()
    if key not in ARCHITECTURES:
        raise UsageError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    height, wide = _image_size(image_size)
    w = DEFAULT_WIDTHS[key] if width is None else int(width)
    if in_channels < 1 or height < 1 or wide < 1 or num_classes < 2 or w < 1:
        raise UsageError(
            f"architecture {key} needs positive channels, image size and width and at least 2 classes, "
            f"got channels={in_channels}, image={height}x{wide}, width={w}, classes={num_classes}"
        )
    if key == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * height * wide, w), nn.ReLU(), nn.Linear(w, num_classes))
    convs = _conv_stack(in_channels, w, key)
    with torch.no_grad():
        try:
            features = nn.Sequential(*convs)(torch.zeros(1, in_channels, height, wide)).numel()
        except RuntimeError:
            raise UsageError(f"images of {height}x{wide} pixels are too small for {key}") from None
    return nn.Sequential(*convs, nn.Flatten(), *_HEADS[key](features, num_classes))
