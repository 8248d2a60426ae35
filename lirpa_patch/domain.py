"""The value domain of a pixel: the one place that decides what a patch pixel may be.

Patch pixels range over ``[low, high]`` (default ``[0, 1]``) in *image space*.
When the tensor handed to auto_LiRPA is already normalized, ``(x - mean) / std``
maps that range per channel to ``[(low - mean) / std, (high - mean) / std]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .errors import UsageError


Normalization = tuple[Optional[tuple[float, ...]], Optional[tuple[float, ...]]]


def _values(values: object, name: str) -> tuple[float, ...]:
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = (values,)
    try:
        out = tuple(float(v) for v in values)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be a number or a list of numbers, got {values!r}", param=name) from None
    if not out:
        raise UsageError(f"{name} is empty", param=name)
    if not all(math.isfinite(v) for v in out):
        raise UsageError(f"{name} must be finite, got {out}", param=name)
    return out


def check_normalization(
    mean: Optional[Sequence[float] | float],
    std: Optional[Sequence[float] | float],
    channels: Optional[int] = None,
) -> Normalization:
    """Validate a per-channel normalization ``(x - mean) / std``; the one rule for every API.

    Both ``mean`` and ``std`` or neither (a ``std`` of 1 only subtracts the mean, a
    ``mean`` of 0 only divides); each one number or a list of 1 or ``channels``
    finite numbers; every ``std`` > 0.

    Returns:
        ``(mean, std)`` as tuples of floats (``channels`` of them when ``channels`` is
        given), or ``(None, None)``.

    Raises:
        UsageError: naming the parameter (``param="mean"`` or ``"std"``).
    """
    if mean is None and std is None:
        return None, None
    if std is None:
        raise UsageError("mean is given without std; give both (a std of 1 only subtracts the mean)",
                         param="mean", related=("std",))
    if mean is None:
        raise UsageError("std is given without mean; give both (a mean of 0 only divides by the std)",
                         param="std", related=("mean",))
    result = []
    for name, values in (("mean", mean), ("std", std)):
        floats = _values(values, name)
        if channels is not None:
            if len(floats) not in (1, channels):
                allowed = "1 value" if channels == 1 else f"1 or {channels} values"
                plural = "channel" if channels == 1 else "channels"
                raise UsageError(
                    f"{name} has {len(floats)} values but the images have {channels} {plural}; give {allowed}",
                    param=name,
                )
            if len(floats) == 1:
                floats = floats * channels
        result.append(floats)
    if any(v <= 0 for v in result[1]):
        raise UsageError(f"std must be > 0 for every channel, got {result[1]}", param="std")
    return result[0], result[1]


def check_value_range(value_range: object) -> tuple[float, float]:
    """``(low, high)`` floats from a ``value_range`` argument (UsageError naming it otherwise;
    :class:`PixelDomain` checks that they are finite and ordered)."""
    try:
        low, high = (float(v) for v in value_range)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise UsageError(f"value_range must be two numbers (low, high), got {value_range!r}",
                         param="value_range") from None
    return low, high


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
        mean, std = check_normalization(self.mean, self.std)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        try:
            low, high = float(self.low), float(self.high)
        except (TypeError, ValueError):
            raise UsageError(f"value_range must be two numbers, got ({self.low!r}, {self.high!r})",
                             param="value_range") from None
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise UsageError(f"value_range must have finite low < high, got [{self.low}, {self.high}]",
                             param="value_range")

    def _per_channel(self, values: Optional[tuple[float, ...]], channels: int, default: float, what: str,
                     like: torch.Tensor) -> torch.Tensor:
        if values is None:
            values = (default,)
        if len(values) not in (1, channels):
            raise UsageError(f"{what} has {len(values)} values but the image has {channels} channels", param=what)
        t = torch.tensor(values, dtype=like.dtype, device=like.device)
        return t.expand(channels)

    def bounds(self, channels: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel ``(lo, hi)``, each ``(C,)``, in the space of the bounded tensor."""
        mean = self._per_channel(self.mean, channels, 0.0, "mean", like)
        std = self._per_channel(self.std, channels, 1.0, "std", like)
        return (self.low - mean) / std, (self.high - mean) / std
