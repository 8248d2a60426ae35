"""Training against the sparse (k-pixel) threat: a strategy for the patch trainer.

Plugs the sparse threat's margins (:func:`lirpa_patch.margins.threat_margins`: the exact top-k first-layer
bound, IBP after it) into :class:`~lirpa_patch.train.trainer.Trainer`, so sparse
training shares the trainer's loss (cross-entropy on the negated worst lower
margins), warm-up, schedules, checkpoints and exports.
"""

from __future__ import annotations

from ..errors import UsageError
from ..threats.sparse import SparseThreat
from .strategies import EveryRow


class SparsePixels(EveryRow):
    """Worst lower margins ``(N, K - 1)`` against any ``k`` changed pixels: :class:`EveryRow` of
    ``SparseThreat(k)`` (one row per image).

    ``strength`` (warm-up) scales how far a changed pixel may move towards the ends
    of its valid range.
    """

    name = "sparse"

    def __init__(self, k: int) -> None:
        if k < 1:
            raise UsageError(f"sparse must be at least 1, got {k}", param="sparse")
        self.k = int(k)
        super().__init__(SparseThreat(self.k))

    def describe(self) -> str:
        return f"sparse({self.k})"
