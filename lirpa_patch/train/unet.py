"""A small U-net that predicts, for every patch location, the certified margin of every class.

Guided sampling (paper §4.2, eq. 15-16) needs, for an image ``(C, H, W)``, a map
of predicted lower margins ``(K, H - n + 1, W - n + 1)``. The network predicts an
image-sized map ``(V * K, H, W)`` (``V`` shape variants, ``K`` classes); the value
at ``(variant v, class k, top, left)`` is the predicted lower bound of
``z_true - z_k`` for the patch of variant ``v`` with its top-left corner at
``(top, left)``. :meth:`MarginUNet.location_scores` reads it out at the locations
of a :class:`~lirpa_patch.locations.Locations` set, giving ``(N, L, K)``; for
squares that is exactly the ``(m - n + 1) x (m - n + 1) x K`` map of eq. 15.

Layers (``b`` = ``base_width``): two 3x3 conv+ReLU at full resolution (``b``),
max-pool 2, two at 1/2 (``2b``), max-pool 2, two at 1/4 (``4b``); decoder:
bilinear upsampling to the skip's size, concatenation, one 3x3 conv+ReLU per
level (``2b``, then ``b``), and a 1x1 conv to ``V * K`` outputs. Odd sizes
(28 -> 14 -> 7) are handled by pooling with ``ceil_mode`` and upsampling to the
skip's exact size. (The paper uses a ResNet-18-style U-net; this one is smaller,
since it only has to rank locations.)
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..locations import Locations


def _block(cin: int, cout: int, convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers)


class MarginUNet(nn.Module):
    """Predicts per-location lower margins ``(N, V * K, H, W)`` from images ``(N, C, H, W)``.

    Args:
        in_channels: ``C``.
        num_classes: ``K``.
        variants: ``V``, the number of shape variants (1 for squares).
        base_width: ``b``, channels of the first level.
    """

    def __init__(self, in_channels: int, num_classes: int, *, variants: int = 1, base_width: int = 16) -> None:
        super().__init__()
        b = int(base_width)
        self.num_classes = int(num_classes)
        self.variants = int(variants)
        self.enc0 = _block(in_channels, b, 2)
        self.enc1 = _block(b, 2 * b, 2)
        self.enc2 = _block(2 * b, 4 * b, 2)
        self.dec1 = _block(6 * b, 2 * b, 1)
        self.dec0 = _block(3 * b, b, 1)
        self.head = nn.Conv2d(b, self.variants * self.num_classes, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(N, C, H, W)`` -> predicted margins ``(N, V * K, H, W)``."""
        e0 = self.enc0(images)
        e1 = self.enc1(F.max_pool2d(e0, 2, ceil_mode=True))
        e2 = self.enc2(F.max_pool2d(e1, 2, ceil_mode=True))
        d1 = self.dec1(torch.cat([F.interpolate(e2, size=e1.shape[-2:], mode="bilinear", align_corners=False), e1], 1))
        d0 = self.dec0(torch.cat([F.interpolate(d1, size=e0.shape[-2:], mode="bilinear", align_corners=False), e0], 1))
        return self.head(d0)

    def location_scores(self, images: torch.Tensor, locations: Locations) -> torch.Tensor:
        """Predicted lower margins at every location: ``(N, L, K)``.

        Entry ``[i, l, k]`` predicts the lower bound of ``z_{y_i} - z_k`` for image
        ``i`` under a patch at location ``l`` (its variant, top and left).
        """
        out = self(images)  # (N, V*K, H, W)
        n, _, height, width = out.shape
        out = out.view(n, self.variants, self.num_classes, height, width).permute(0, 1, 3, 4, 2)  # (N, V, H, W, K)
        device = out.device
        v = locations.variant.to(device)
        t = locations.top.to(device)
        left = locations.left.to(device)
        return out[:, v, t, left]  # (N, L, K)
