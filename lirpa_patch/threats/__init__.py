"""What the attacker may change: one threat family per module.

* :mod:`.base` — :class:`Threat`: the protocol every threat implements (rows, their
  perturbations, location groups, reports, attacks);
* :mod:`.patch` — :class:`PatchThreat` and :class:`PatchPerturbation`: a patch of a given shape anywhere;
* :mod:`.sparse` — :class:`SparseThreat` and :class:`SparsePerturbation`: any ``k`` pixels;
* :mod:`.box` — what both share; :mod:`.topk` — the sparse threat's exact top-k math.
"""

from .base import Threat
from .box import BoxPerturbation
from .patch import PatchPerturbation, PatchThreat
from .sparse import SparseFallbackWarning, SparsePerturbation, SparseThreat

__all__ = ["BoxPerturbation", "PatchPerturbation", "PatchThreat", "SparseFallbackWarning", "SparsePerturbation",
           "SparseThreat", "Threat"]
