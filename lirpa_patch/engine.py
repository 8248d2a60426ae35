"""The certification engine (paper eq. 11).

For every image and every patch location, auto_LiRPA bounds the margins
``z_true - z_other`` with the specification merged into the last linear layer
(``C`` in ``compute_bounds``). An image is certified when the smallest lower
margin over all locations and all other classes is ``>= 0``.

(image, location) rows go through ``compute_bounds`` in chunks of at most
``chunk_size`` rows; that is the one memory knob. Images the model already
misclassifies are skipped (not certified, margin not computed).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Literal, Optional, Sequence

import torch
from auto_LiRPA import BoundedModule, BoundedTensor

from .domain import PixelDomain
from .errors import ModelError, UsageError
from .locations import Locations, all_locations
from .perturbations import PatchPerturbation
from .shapes import PatchShape, SizeLike, make_shape
from .spec import margin_spec, other_classes

Method = Literal["ibp", "crown"]
_METHODS = {"ibp": "IBP", "crown": "CROWN"}

DEFAULT_CHUNK: dict[str, int] = {"ibp": 4096, "crown": 256}
"""Default rows per ``compute_bounds`` call. CROWN keeps a linear bound per row and
hidden neuron, so it needs far smaller chunks than IBP (and runs faster with them)."""


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def bound_model(
    model: torch.nn.Module,
    image_shape: Sequence[int],
    device: str | torch.device = "cpu",
    *,
    conv_mode: str = "matrix",
) -> BoundedModule:
    """Wrap a model that maps images ``(N, C, H, W)`` to logits in an auto_LiRPA ``BoundedModule``.

    The module carries the plugin bound operators (:func:`lirpa_patch.custom_ops`)
    that make :class:`~lirpa_patch.sparse.SparsePerturbation` exact; they behave
    like auto_LiRPA's own operators for every other perturbation.

    ``conv_mode`` is auto_LiRPA's representation of convolutions under CROWN. The
    default ``"matrix"`` works through every graph we build (auto_LiRPA 0.3's
    ``"patches"`` mode fails on a per-channel normalization before a conv); IBP
    does not depend on it.

    Raises:
        ModelError: when auto_LiRPA cannot parse the model (e.g. an unsupported op).
    """
    from .bound_ops import custom_ops

    dummy = torch.zeros(1, *[int(v) for v in image_shape], device=device)
    try:
        with _quiet():
            return BoundedModule(model, dummy, bound_opts={"conv_mode": conv_mode}, device=str(device),
                                 custom_ops=custom_ops())
    except Exception as exc:  # auto_LiRPA raises assorted errors for unsupported graphs
        raise ModelError(f"auto_LiRPA cannot bound this model: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc


def lower_margins(
    bounded: BoundedModule,
    images: torch.Tensor,
    labels: torch.Tensor,
    masks: torch.Tensor,
    *,
    num_classes: int,
    method: Method | str = "ibp",
    domain: Optional[PixelDomain] = None,
    strength: float = 1.0,
) -> torch.Tensor:
    """Certified lower bounds of the margins for every (image, location) pair.

    Differentiable with respect to the model's parameters (the trainer uses it).

    Args:
        bounded: the ``BoundedModule`` of a model mapping images to logits.
        images: ``(N, C, H, W)`` in the model's input space (image space for
            :class:`~lirpa_patch.models.ImageModel`).
        labels: ``(N,)`` true labels.
        masks: ``(L, H, W)`` shared by all images or ``(N, L, H, W)`` per image.
        num_classes: ``K``.
        method: ``"ibp"`` or ``"crown"``. CROWN's margins are combined with IBP's by an
            elementwise maximum: both are sound lower bounds, and neither is always tighter.
        strength: patch interval scale in ``[0, 1]`` (warm-up).

    Returns:
        ``(N, L, K - 1)``: lower bound of ``z_true - z_other`` over the patch box,
        others in increasing class order (see :func:`~lirpa_patch.spec.other_classes`).
    """
    key = str(method).lower()
    if key not in _METHODS:
        raise UsageError(f"method must be one of {', '.join(_METHODS)}, got {method!r}", param="method")
    n = images.shape[0]
    n_loc = masks.shape[-3]
    ptb = PatchPerturbation(masks=masks, domain=domain, strength=strength)
    rows = images.repeat_interleave(n_loc, dim=0)
    spec = margin_spec(labels, num_classes, dtype=images.dtype).repeat_interleave(n_loc, dim=0)
    with _quiet():
        lb, _ = bounded.compute_bounds(x=(BoundedTensor(rows, ptb),), C=spec, method="IBP", bound_upper=False)
        if key == "crown":
            crown, _ = bounded.compute_bounds(
                x=(BoundedTensor(rows, ptb),), C=spec, method="CROWN", bound_upper=False
            )
            lb = torch.maximum(lb, crown)
    return lb.reshape(n, n_loc, num_classes - 1)


@dataclass
class ImageResult:
    """Certification of one image.

    ``worst_margin`` is the minimum over locations and other classes of the
    certified lower margin (None when the image was not certified because the
    model misclassifies it); ``worst_location`` is where it occurs and
    ``worst_class`` the other class it concerns.
    """

    index: int
    label: int
    prediction: int
    correct: bool
    certified: bool
    worst_margin: Optional[float] = None
    worst_location: Optional[dict] = None
    worst_class: Optional[int] = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CertifyResult:
    """Outcome of :func:`certify` on a batch of images."""

    images: list[ImageResult]
    shape: PatchShape
    num_locations: int
    method: str
    seconds: float
    chunk_size: int
    extra: dict = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def clean_accuracy(self) -> float:
        return sum(r.correct for r in self.images) / max(1, len(self.images))

    @property
    def certified_accuracy(self) -> float:
        return sum(r.certified for r in self.images) / max(1, len(self.images))

    @property
    def images_per_second(self) -> float:
        return len(self.images) / self.seconds if self.seconds > 0 else float("inf")


ProgressFn = Callable[[int, int], None]
"""``progress(images_done, locations_done)``, called after every chunk.

When the callback also has a method ``start(images, locations)``, it is called once,
before any bound is computed, with the totals: the images that will be bounded (those
the model classifies correctly) and their (image, location) rows. A progress bar needs
no forward pass of its own to size itself."""


def start_progress(progress: Optional[ProgressFn], images: int, locations: int) -> None:
    """Give ``progress`` the totals, when it has a ``start`` method (see :data:`ProgressFn`)."""
    start = getattr(progress, "start", None)
    if callable(start):
        start(images, locations)


def _check_inputs(images: torch.Tensor, labels: torch.Tensor, chunk_size: int) -> None:
    """One-line :class:`UsageError` for malformed engine inputs (shared by every threat model)."""
    if chunk_size < 1:
        raise UsageError(f"chunk_size must be at least 1, got {chunk_size}", param="chunk_size")
    if images.ndim != 4:
        raise UsageError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}", param="images")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise UsageError(f"labels must be (N,) with N = {images.shape[0]}, got shape {tuple(labels.shape)}",
                         param="labels")
    if not torch.isfinite(images).all():
        raise UsageError("images contain NaN or infinite values", param="images")


def _image_results(
    indices: Sequence[int],
    labels: torch.Tensor,
    preds: torch.Tensor,
    correct: torch.Tensor,
    worst: torch.Tensor,
    worst_class: torch.Tensor,
    num_classes: int,
    location: Callable[[int], Optional[dict]],
) -> list[ImageResult]:
    """Per-image records from the running minima.

    Args:
        indices: dataset index of each of the ``N`` images.
        labels, preds, correct: ``(N,)``.
        worst: ``(N,)`` smallest certified lower margin (ignored where not correct).
        worst_class: ``(N,)`` position of that margin among the other classes.
        location: image number -> JSON description of its worst location (or None).
    """
    others = other_classes(labels.cpu(), num_classes)
    results = []
    for k in range(len(indices)):
        ok = bool(correct[k])
        margin = float(worst[k]) if ok else None
        results.append(
            ImageResult(
                index=int(indices[k]),
                label=int(labels[k]),
                prediction=int(preds[k]),
                correct=ok,
                certified=ok and margin is not None and margin >= 0.0,
                worst_margin=margin,
                worst_location=location(k) if ok else None,
                worst_class=int(others[k, worst_class[k]]) if ok else None,
            )
        )
    return results


def _predict(model: torch.nn.Module, images: torch.Tensor, batch: int) -> torch.Tensor:
    outs = []
    with torch.no_grad():
        for i in range(0, images.shape[0], batch):
            outs.append(model(images[i : i + batch]))
    logits = torch.cat(outs)
    if logits.ndim != 2:
        raise ModelError(f"the model must output logits (N, K), got shape {tuple(logits.shape)}")
    if not torch.isfinite(logits).all():
        raise ModelError("the model produced NaN or infinite logits on the input images")
    return logits


def certify(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    size: SizeLike | str = 2,
    shape: str | PatchShape | torch.Tensor = "square",
    locations: Optional[Locations] = None,
    method: Method | str = "ibp",
    chunk_size: Optional[int] = None,
    device: str | torch.device = "cpu",
    indices: Optional[Sequence[int]] = None,
    domain: Optional[PixelDomain] = None,
    bounded: Optional[BoundedModule] = None,
    progress: Optional[ProgressFn] = None,
) -> CertifyResult:
    """Certify images against every patch location (paper eq. 11).

    Args:
        model: maps images ``(N, C, H, W)`` in ``[0, 1]`` to logits ``(N, K)``
            (wrap ONNX or layout-specific models in :class:`~lirpa_patch.models.ImageModel`).
        images: ``(N, C, H, W)`` float in the pixel domain (default ``[0, 1]``).
        labels: ``(N,)`` int64.
        size, shape: the patch (see :func:`~lirpa_patch.shapes.make_shape`).
        locations: explicit location set; default every valid position.
        method: ``"ibp"`` (default) or ``"crown"``.
        chunk_size: maximum (image, location) rows per ``compute_bounds`` call; the
            memory knob (default :data:`DEFAULT_CHUNK` for the method).
        indices: dataset index of each image, for the report (default ``0..N-1``).
        domain: pixel domain of ``images`` (default ``[0, 1]``, no normalization).
        bounded: a prebuilt ``BoundedModule`` of ``model`` (reused across calls).
        progress: callback ``(images_done, locations_done)``; its ``start(images, locations)``,
            when it has one, first receives the totals (see :data:`ProgressFn`).

    Returns:
        A :class:`CertifyResult` with one :class:`ImageResult` per image.
    """
    key = str(method).lower()
    if key not in _METHODS:
        raise UsageError(f"method must be one of {', '.join(_METHODS)}, got {method!r}", param="method")
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK[key]
    _check_inputs(images, labels, chunk_size)
    start = time.perf_counter()
    device = torch.device(device)
    was_training = model.training
    model = model.to(device).eval()
    images = images.to(device=device, dtype=torch.float32)
    labels = labels.to(device=device, dtype=torch.long)
    patch_shape = shape if isinstance(shape, PatchShape) else make_shape(shape, size)
    if locations is None:
        locations = all_locations(patch_shape, images.shape[-2:])
    elif tuple(locations.image_size) != tuple(images.shape[-2:]):
        raise UsageError(f"locations are for {locations.image_size} images, got {tuple(images.shape[-2:])}",
                         param="locations")
    masks = locations.masks.to(device)
    n_img, n_loc = images.shape[0], len(locations)
    idx = list(range(n_img)) if indices is None else [int(i) for i in indices]

    logits = _predict(model, images, max(1, min(256, chunk_size)))
    num_classes = logits.shape[1]
    margin_spec(labels, num_classes)  # validates label range with a clear message
    preds = logits.argmax(1)
    correct = preds == labels

    if bounded is None:
        bounded = bound_model(model, images.shape[1:], device)

    worst = torch.full((n_img,), float("inf"), device=device)
    worst_loc = torch.zeros(n_img, dtype=torch.long)
    worst_cls = torch.zeros(n_img, dtype=torch.long)
    todo = torch.nonzero(correct).flatten().tolist()
    start_progress(progress, len(todo), len(todo) * n_loc)
    loc_chunk = min(n_loc, chunk_size)
    img_chunk = max(1, chunk_size // loc_chunk)
    done_images, done_locations = 0, 0
    with torch.no_grad():
        for i in range(0, len(todo), img_chunk):
            batch = torch.tensor(todo[i : i + img_chunk], device=device)
            for j in range(0, n_loc, loc_chunk):
                lb = lower_margins(
                    bounded, images[batch], labels[batch], masks[j : j + loc_chunk],
                    num_classes=num_classes, method=key, domain=domain,
                )  # (b, l, K-1)
                if not torch.isfinite(lb).all():
                    raise ModelError("auto_LiRPA returned NaN/infinite bounds; the model cannot be certified")
                per_loc, cls = lb.min(dim=2)  # (b, l)
                value, loc = per_loc.min(dim=1)  # (b,)
                better = value < worst[batch]
                worst[batch] = torch.where(better, value, worst[batch])
                sel = batch[better].cpu()
                worst_loc[sel] = (loc[better] + j).cpu()
                worst_cls[sel] = cls[better, loc[better]].cpu()
                done_locations += batch.numel() * lb.shape[1]
                if progress is not None:
                    progress(done_images, done_locations)
            done_images += batch.numel()
            if progress is not None:
                progress(done_images, done_locations)

    model.train(was_training)
    results = _image_results(
        idx, labels, preds, correct, worst, worst_cls, num_classes,
        lambda k: locations.describe(int(worst_loc[k])),
    )
    return CertifyResult(
        images=results,
        shape=patch_shape,
        num_locations=n_loc,
        method=key,
        seconds=time.perf_counter() - start,
        chunk_size=chunk_size,
    )
