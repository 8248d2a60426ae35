"""Training schedules: the patch-interval warm-up and the learning rate (paper App. A.1).

Warm-up: for the first ``warmup_start`` epochs the patch interval is ``[x, x]``
(strength 0, which is plain natural training); it then grows linearly, *per
batch*, to the full pixel range over ``warmup`` epochs, and stays full.

Learning rate: constant until the warm-up is over (``warmup_start + warmup``
epochs), then multiplied by ``decay`` (default 0.5) every ``step`` epochs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WarmupSchedule:
    """Patch strength in ``[0, 1]`` as a function of (epoch, batch).

    Attributes:
        warmup_start: epochs at strength 0 before the ramp.
        warmup: length of the linear ramp, in epochs (0: full strength at once).
    """

    warmup_start: int = 0
    warmup: int = 0

    def strength(self, epoch: int, batch: int = 0, num_batches: int = 1) -> float:
        """Strength for batch ``batch`` of ``num_batches`` in epoch ``epoch`` (0-based)."""
        if self.warmup <= 0:
            return 0.0 if epoch < self.warmup_start else 1.0
        progress = epoch - self.warmup_start + batch / max(1, num_batches)
        return float(min(1.0, max(0.0, progress / self.warmup)))

    @property
    def end_epoch(self) -> int:
        """First epoch that runs entirely at full strength."""
        return self.warmup_start + max(0, self.warmup)


@dataclass(frozen=True)
class StepDecay:
    """The learning-rate factor of epoch ``e`` (a picklable ``LambdaLR`` lambda).

    ``decay ** floor(max(0, e - hold) / step)``: 1 for the first ``hold + step``
    epochs, then multiplied by ``decay`` every ``step`` epochs (``step <= 0``: constant).
    """

    hold: int
    step: int = 10
    decay: float = 0.5

    def __call__(self, epoch: int) -> float:
        """Factor for epoch ``epoch``: ``decay ** floor(max(0, epoch - hold) / step)``."""
        if self.step <= 0:
            return 1.0
        return float(self.decay ** (max(0, epoch - self.hold) // self.step))
