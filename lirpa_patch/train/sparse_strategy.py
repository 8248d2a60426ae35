"""Training against the sparse (k-pixel) threat: a strategy for the patch trainer.

Plugs :func:`lirpa_patch.engine.sparse_lower_margins` (the exact top-k first-layer
bound, IBP after it) into :class:`~lirpa_patch.train.trainer.Trainer`, so sparse
training shares the trainer's loss (cross-entropy on the negated worst lower
margins), warm-up, schedules, checkpoints and exports.
"""

from __future__ import annotations

from ..errors import UsageError
from ..margins import sparse_lower_margins
from .strategies import Margins, Strategy


class SparsePixels(Strategy):
    """Worst lower margins ``(N, K - 1)`` against any ``k`` changed pixels.

    ``strength`` (warm-up) scales how far a changed pixel may move towards the ends
    of its valid range.
    """

    name = "sparse"

    def __init__(self, k: int) -> None:
        if k < 1:
            raise UsageError(f"sparse must be at least 1, got {k}", param="sparse")
        self.k = int(k)

    def grad_rows_per_image(self) -> int:
        return 1

    def worst_margins(self, images, labels, *, strength, generator):
        worst = sparse_lower_margins(
            self.ctx.bounded, images, labels, k=self.k, num_classes=self.ctx.num_classes,
            method="ibp", domain=self.ctx.domain, strength=strength,
        )
        return Margins(worst=worst, rows=images.shape[0])

    def describe(self) -> str:
        return f"sparse({self.k})"
