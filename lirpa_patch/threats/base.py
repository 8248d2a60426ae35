"""The :class:`Threat` protocol: what the attacker may change, as the engine, attack, trainer and report see it.

A threat splits each image's feasible set into *rows*: row ``j`` of an image is a set
the attacker may pick (a patch location; the one set of any ``k`` pixels), bounded by
one auto_LiRPA perturbation. Everything outside :mod:`lirpa_patch.threats` asks a
threat these questions and never checks its class:

* how many rows an image has (:attr:`Threat.rows_per_image`, after :meth:`Threat.prepare`
  on the image size);
* the bounded rows and their perturbation, for a slice of every image's rows
  (:meth:`Threat.perturbation`) or for any (image, row) pairs (:meth:`Threat.rows_at`);
* location groups (:meth:`Threat.block_levels`; None: the threat has none);
* where a row is (:meth:`Threat.locate`), the per-row locations a heatmap draws
  (:attr:`Threat.location_set`) and how to describe itself in a report
  (:meth:`Threat.describe`, :meth:`Threat.report_fields`);
* what a bounded module lacks for it (:meth:`Threat.check_bounded`, :meth:`Threat.diagnose`);
* how to attack it (:meth:`Threat.attack`).

The trainer needs nothing more: it bounds every row (:class:`~lirpa_patch.train.strategies.EveryRow`),
or, for a threat whose rows are places on the image (:attr:`Threat.location_set`), the
locations its strategy picks.

A new threat is one subclass: :class:`~lirpa_patch.threats.patch.PatchThreat` and
:class:`~lirpa_patch.threats.sparse.SparseThreat` are the two this package ships.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch

from ..domain import PixelDomain

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from auto_LiRPA import BoundedModule

    from ..locations import Locations
    from ..shapes import PatchShape
    from .box import BoxPerturbation

__all__ = ["Threat"]


class Threat(ABC):
    """What the attacker may change in an image, split into rows (see the module docstring).

    Subclasses set :attr:`name` and implement :attr:`rows_per_image`, :attr:`label`,
    :meth:`perturbation` and :meth:`describe`; every other method has a default that
    suits a threat whose rows are boxes (each row's feasible set is exactly the box of
    its perturbation's ``bounds``).
    """

    name: str = "threat"
    """Short name, recorded in reports as ``"threat"`` (``"patch"``, ``"sparse"``, ...)."""

    # ------------------------------------------------------------------ rows
    def prepare(self, image_size: Sequence[int]) -> None:
        """Resolve what depends on the image size ``(H, W)`` (UsageError naming the parameter
        that does not fit). Called before any other question about rows."""

    @property
    @abstractmethod
    def rows_per_image(self) -> int:
        """Rows of every image (after :meth:`prepare`)."""

    @property
    @abstractmethod
    def label(self) -> str:
        """How a person names this threat in a table: ``"2x2"``, ``"k=4"``."""

    @property
    def value(self) -> str:
        """The value a sweep over threats of this kind varies (``"2x2"``, ``"4"``); default :attr:`label`."""
        return self.label

    @abstractmethod
    def perturbation(self, images: torch.Tensor, rows: slice, *, domain: Optional[PixelDomain], strength: float,
                     stand_in: bool = False) -> tuple[torch.Tensor, "BoxPerturbation"]:
        """``(x, ptb)``: the bounded tensor of rows ``rows`` of every image of ``images`` ``(N, C, H, W)``,
        image-major ``(N * r, ...)``, and the perturbation bounding them.

        ``stand_in``: ``x`` may be a broadcast view standing in for the rows (IBP through the
        plugin operators reads the images from the perturbation), to save the copy.
        ``strength`` in ``[0, 1]`` scales the feasible set (training warm-up)."""

    def rows_at(self, images: torch.Tensor, img: torch.Tensor, row: torch.Tensor, *,
                domain: Optional[PixelDomain], strength: float = 1.0,
                stand_in: bool = False) -> tuple[torch.Tensor, "BoxPerturbation"]:
        """``(x, ptb)`` for any (image, row) pairs: row ``r`` is row ``row[r]`` of ``images[img[r]]``
        (``img``, ``row`` ``(R,)`` long). The default serves a threat with one row per image."""
        if self.rows_per_image != 1:
            raise NotImplementedError(f"{type(self).__name__} has {self.rows_per_image} rows per image: "
                                      "it must implement rows_at")
        return self.perturbation(images[img], slice(None), domain=domain, strength=strength, stand_in=stand_in)

    def block_levels(self, size: int) -> Optional[list]:
        """Location-group levels for blocks of ``size`` (:mod:`lirpa_patch.threats.blocks`), or
        None: the threat has no groups and every row is bounded on its own (the default)."""
        return None

    def locate(self, row: int) -> Optional[dict]:
        """Where row ``row`` is, JSON-ready (a patch location), or None (the default)."""
        return None

    @property
    def location_set(self) -> Optional["Locations"]:
        """The :class:`~lirpa_patch.locations.Locations` of the rows, one per row, when rows are
        places on the image (heatmaps draw them); None otherwise (the default)."""
        return None

    shape: Optional["PatchShape"] = None
    """The patch shape, for a threat that has one; None otherwise."""

    # ------------------------------------------------------------------ describing
    @abstractmethod
    def describe(self) -> dict:
        """A JSON-ready description, ``{"threat": name, ...}``."""

    @classmethod
    def from_description(cls, description: dict) -> "Threat":
        """The threat :meth:`describe` described (to resume training against it); threats that
        cannot be rebuilt from their description raise :class:`~lirpa_patch.errors.UsageError`."""
        from ..errors import UsageError

        raise UsageError(f"a {cls.__name__} cannot be rebuilt from its description", param="threat")

    def report_fields(self, extra: Optional[dict] = None) -> dict[str, Any]:
        """The fields a certification report's summary shows for this threat, after ``"threat"``;
        ``extra`` is the result's ``extra`` (default: :meth:`describe` without its ``"threat"`` key)."""
        return {k: v for k, v in self.describe().items() if k != "threat"}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label})"

    # ------------------------------------------------------------------ bounded modules
    def check_bounded(self, bounded: "BoundedModule", method: str) -> None:
        """Warn or raise when ``bounded`` cannot bound this threat well with ``method`` (default: nothing)."""

    def diagnose(self, bounded: "BoundedModule") -> dict:
        """What a certification result's ``extra`` should say about ``bounded`` for this threat
        (e.g. layers bounded by a looser rule); default nothing."""
        return {}

    # ------------------------------------------------------------------ attacking
    def attack(self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, **options: Any):
        """Attack ``images``: an :class:`~lirpa_patch.attacks.AttackResult`.

        The default runs :func:`~lirpa_patch.attacks.attack_rows`: sign-gradient descent with
        restarts inside every row's box (its perturbation's ``bounds``), sound as an attack
        for any threat whose rows are boxes; ``options`` are that function's."""
        from ..attacks import attack_rows

        return attack_rows(model, images, labels, self, **options)
