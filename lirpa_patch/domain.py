"""The value domain of a pixel: the one place that decides what a patch pixel may be.

Patch pixels range over ``[low, high]`` (default ``[0, 1]``) in *image space*.
When the tensor handed to auto_LiRPA is already normalized, ``(x - mean) / std``
maps that range per channel to ``[(low - mean) / std, (high - mean) / std]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .errors import UsageError


def _as_tuple(values: Optional[Sequence[float] | float], what: str) -> Optional[tuple[float, ...]]:
    if values is None:
        return None
    if isinstance(values, (int, float)):
        return (float(values),)
    out = tuple(float(v) for v in values)
    if not out:
        raise UsageError(f"{what} is empty")
    return out


@dataclass(frozen=True)
class PixelDomain:
    """Valid pixel values, in image space, and the normalization applied after.

    Attributes:
        low, high: the image-space range of every pixel (``low < high``).
        mean, std: per-channel normalization ``(x - mean) / std`` applied to the
            tensor that is bounded, or None when that tensor is in image space.
    """

    low: float = 0.0
    high: float = 1.0
    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", _as_tuple(self.mean, "mean"))
        object.__setattr__(self, "std", _as_tuple(self.std, "std"))
        if not self.low < self.high:
            raise UsageError(f"pixel range must have low < high, got [{self.low}, {self.high}]")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise UsageError(f"std must be positive, got {self.std}")

    def _per_channel(self, values: Optional[tuple[float, ...]], channels: int, default: float, what: str,
                     like: torch.Tensor) -> torch.Tensor:
        if values is None:
            values = (default,)
        if len(values) not in (1, channels):
            raise UsageError(f"{what} has {len(values)} values but the image has {channels} channels")
        t = torch.tensor(values, dtype=like.dtype, device=like.device)
        return t.expand(channels)

    def bounds(self, channels: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel ``(lo, hi)``, each ``(C,)``, in the space of the bounded tensor."""
        mean = self._per_channel(self.mean, channels, 0.0, "mean", like)
        std = self._per_channel(self.std, channels, 1.0, "std", like)
        return (self.low - mean) / std, (self.high - mean) / std
