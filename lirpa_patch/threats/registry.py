"""Threats by name, to rebuild one from its description (a training checkpoint stores the threat it trained against).

:func:`threat_from_description` turns :meth:`~lirpa_patch.threats.base.Threat.describe`'s
dict back into a threat; :func:`register_threat` adds a threat of your own (its class needs
a ``from_description`` classmethod).
"""

from __future__ import annotations

from typing import Mapping

from ..errors import UsageError
from .base import Threat
from .patch import PatchThreat
from .sparse import SparseThreat

__all__ = ["THREATS", "register_threat", "threat_from_description"]

THREATS: dict[str, type[Threat]] = {PatchThreat.name: PatchThreat, SparseThreat.name: SparseThreat}
"""Threat classes by :attr:`~lirpa_patch.threats.base.Threat.name`."""


def register_threat(cls: type[Threat]) -> type[Threat]:
    """Make ``cls`` rebuildable from its description (usable as a class decorator)."""
    THREATS[cls.name] = cls
    return cls


def threat_from_description(description: Mapping) -> Threat:
    """The threat :meth:`Threat.describe` described (UsageError naming ``threat`` when unknown)."""
    name = description.get("threat") if isinstance(description, Mapping) else None
    cls = THREATS.get(name)
    if cls is None:
        raise UsageError(f"unknown threat {name!r} (known: {', '.join(THREATS)}; lirpa_patch.threats.registry."
                         "register_threat adds one)", param="threat")
    return cls.from_description(description)
