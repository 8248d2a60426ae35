"""What certification returns: one :class:`ImageResult` per image, gathered in a :class:`CertifyResult`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Optional

import torch

from .locations import Locations
from .shapes import PatchShape
from .spec import certifies, other_classes

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from .threats.base import Threat


@dataclass
class ImageResult:
    """Certification of one image.

    ``worst_margin`` is the minimum over locations and other classes of the
    certified lower margin (None when the image was not certified because the
    model misclassifies it); ``worst_location`` is where it occurs and
    ``worst_class`` the other class it concerns.

    ``exact_margin`` says whether ``worst_margin`` is the minimum over locations of each
    location's own bound (the tightest bound the method chain computed for that location
    alone): True; False when a location group's bound (one bound for a block of locations,
    ``groups``) is the minimum, so the per-location minimum may be higher (only a certified
    image, whose blocks all certify); None when misclassified. ``groups=None`` gives exact
    margins for every image. In a cascade a location a cheaper method certified keeps that
    method's bound, exact or not (see :func:`certify`).
    """

    index: int
    label: int
    prediction: int
    correct: bool
    certified: bool
    worst_margin: Optional[float] = None
    worst_location: Optional[dict] = None
    worst_class: Optional[int] = None
    exact_margin: Optional[bool] = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CertifyResult:
    """Outcome of :func:`certify` on a batch of images.

    ``shape`` is the patch shape (None for the sparse threat), ``num_locations`` the
    rows per image of a patch threat (0 for sparse), ``extra`` threat details
    (``{"threat": "sparse", "k": k}``), ``head`` how the specification was merged
    (:meth:`lirpa_patch.head.Head.describe`).
    """

    images: list[ImageResult]
    shape: Optional[PatchShape]
    num_locations: int
    method: str
    seconds: float
    chunk_size: int
    extra: dict = field(default_factory=dict)
    head: dict = field(default_factory=dict)
    location_margins: Optional[torch.Tensor] = None
    """``(N, L)`` float, on request (``keep_location_margins``): per image and row (patch:
    location) the smallest certified lower margin over the other classes; NaN for
    misclassified images."""
    locations: Optional[Locations] = None
    """The patch locations certified (with ``location_margins``)."""
    threat_model: Optional["Threat"] = None
    """The :class:`~lirpa_patch.threats.base.Threat` certified."""

    @property
    def threat(self) -> str:
        """The threat's name (``"patch"``, ``"sparse"``, ...)."""
        if self.threat_model is not None:
            return self.threat_model.name
        return str(self.extra.get("threat", "patch"))

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def num_correct(self) -> int:
        return sum(r.correct for r in self.images)

    @property
    def num_certified(self) -> int:
        return sum(r.certified for r in self.images)

    @property
    def clean_accuracy(self) -> float:
        return self.num_correct / max(1, len(self.images))

    @property
    def certified_accuracy(self) -> float:
        return self.num_certified / max(1, len(self.images))

    @property
    def images_per_second(self) -> float:
        return len(self.images) / self.seconds if self.seconds > 0 else float("inf")


def _image_results(indices, labels, preds, correct, worst, worst_class, num_classes, location,
                   grouped=None) -> list[ImageResult]:
    """Per-image records from the running minima (``grouped`` ``(N,)``: the minimum is a location group's bound)."""
    others = other_classes(labels.cpu(), num_classes)
    results = []
    for k in range(len(indices)):
        ok = bool(correct[k])
        margin = float(worst[k]) if ok else None
        results.append(ImageResult(
            index=int(indices[k]), label=int(labels[k]), prediction=int(preds[k]), correct=ok,
            certified=ok and margin is not None and certifies(margin), worst_margin=margin,
            worst_location=location(k) if ok else None,
            worst_class=int(others[k, worst_class[k]]) if ok else None,
            exact_margin=(grouped is None or not bool(grouped[k])) if ok else None,
        ))
    return results
