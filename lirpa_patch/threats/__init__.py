"""What the attacker may change: one threat family per module.

* :mod:`.patch` — :class:`PatchPerturbation`: a patch of a given shape anywhere;
* :mod:`.sparse` — :class:`SparsePerturbation`: any ``k`` pixels;
* :mod:`.box` — what both share; :mod:`.topk` — the sparse threat's exact top-k math.
"""

from .box import BoxPerturbation
from .patch import PatchPerturbation
from .sparse import SparseFallbackWarning, SparsePerturbation

__all__ = ["BoxPerturbation", "PatchPerturbation", "SparseFallbackWarning", "SparsePerturbation"]
