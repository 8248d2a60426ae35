"""Dataset presets for training (paper, App. A.1): schedules and the input normalization.

``"mnist"``: Adam lr 5e-4, 100 epochs, 1 natural epoch then a 61-epoch warm-up, no
augmentation, no normalization. ``"cifar"``: lr 1e-3, 200 epochs, 10 natural epochs
then a 121-epoch warm-up, random crop (4 pixels) and horizontal flip, and CIFAR-10's
per-channel normalization in front of the network (folded into the exported ONNX
model, which therefore takes ``[0, 1]`` images). Batch size 256 in both.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from ..domain import Normalization, check_normalization
from ..errors import UsageError

PRESETS: dict[str, dict[str, Any]] = {
    "mnist": dict(lr=5e-4, epochs=100, warmup_start=1, warmup=61, crop=0, flip=False),
    "cifar": dict(lr=1e-3, epochs=200, warmup_start=10, warmup=121, crop=4, flip=True),
}
"""The :class:`~lirpa_patch.train.TrainConfig` values each preset sets."""

PRESET_NAMES: tuple[str, ...] = ("auto", *PRESETS)
"""The names :func:`preset_for` accepts: ``"auto"`` (chosen by the images' channels) and every preset."""

CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2471, 0.2435, 0.2616)


def preset_for(channels: int, preset: str = "auto") -> str:
    """The preset to use: ``preset`` itself, or for ``"auto"`` ``"cifar"`` on 3-channel images, else ``"mnist"``.

    Raises:
        UsageError: an unknown preset name (``param="preset"``).
    """
    if preset == "auto":
        return "cifar" if channels == 3 else "mnist"
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; choose {', '.join(PRESET_NAMES)}", param="preset")
    return preset


def preset_normalization(
    preset: str,
    channels: int,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> Normalization:
    """The normalization of a model trained with ``preset``: ``(mean, std)`` or ``(None, None)``.

    The given ``mean``/``std`` when there are any (both or neither, see
    :func:`~lirpa_patch.domain.check_normalization`); otherwise CIFAR-10's for the
    ``"cifar"`` preset on 3-channel images, and none else.
    """
    if mean is None and std is None:
        if preset_for(channels, preset) == "cifar" and channels == 3:
            return CIFAR10_MEAN, CIFAR10_STD
        return None, None
    return check_normalization(mean, std, channels)
