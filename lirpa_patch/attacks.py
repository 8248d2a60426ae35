"""Empirical attacks: concrete patches (or k changed pixels) that change a model's prediction.

A certificate proves that no patch changes the prediction; an attack exhibits patches
that do. On any set of images, certified accuracy <= empirical (attacked) accuracy <=
clean accuracy, and an image that is both certified and broken is a soundness bug
(:mod:`lirpa_patch.evaluation` checks that).

Patch attack (:func:`attack_patch`), after the paper (Chiang et al., ICLR 2020, §3: IFGSM
on the patch pixels, with random restarts). Every (image, location) pair is a row; rows
go through the model in chunks of at most ``chunk_size`` (the memory knob), so locations
are a batch dimension. Two stages:

1. *sweep*, at every location, three patch contents: the FGSM corner (each patch
   pixel at the end of its valid range that the gradient of the clean image's margin
   points to: one gradient per image), all pixels at their low end, all at their high
   end (one forward pass per row each);
2. *refine*: ``restarts`` runs of ``steps`` sign-gradient steps on the margin
   ``z_label - max_other z`` over the patch pixels, projected to their range, at the
   ``candidates`` locations per image with the smallest sweep margin (every location
   when ``candidates`` is None) plus any ``location_index`` given (e.g. the locations
   with the worst certified margin). Restart 0 starts from the row's best sweep
   content, restart 1 from the clean image (the paper's IFGSM), later ones from random
   corners and uniform noise (PGD with random restarts).

An image drops out as soon as one of its rows changes the prediction.

Sparse attack (:func:`attack_sparse`): the attacker changes any ``k`` pixels (all
channels of a pixel count as one) to any value in their own valid range. Greedy: ``k``
times, rank the unused pixels by the first-order gain of moving each channel to the
better end of its range, evaluate the ``candidates`` best for real, keep the best one;
then ``steps`` rounds that re-pick the ``k`` pixels with the largest gain from the
gradient at the current point; then ``restarts - 1`` more rounds from random corners.

Pixel ranges come from a :class:`~lirpa_patch.domain.PixelDomain` (default ``[0, 1]``):
with ``mean``/``std`` the model takes normalized input and every channel has its own
range. Everything random comes from one seeded generator: a run repeats exactly.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .domain import PixelDomain
from .errors import UsageError
from .inputs import check_inputs, predict
from .locations import Locations, all_locations
from .shapes import PatchShape, SizeLike, make_shape
from .spec import margin_spec

Loss = Literal["margin", "ce"]
AttackProgress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: rows (patch) or images (sparse) done in a stage."""

DEFAULT_ATTACK_CHUNK = 2048
"""Rows (image, location pairs or candidate images) per forward/backward pass."""


@dataclass
class ImageAttack:
    """The attack on one image.

    Attributes:
        index, label, prediction, correct: as in :class:`~lirpa_patch.engine.ImageResult`.
        success: the attack changed the prediction (never for a misclassified image: it
            is not attacked).
        margin: the smallest real margin ``z_label - max_other z`` found (the attacked
            image's; negative when successful); None when not attacked.
        adversarial_class: the prediction on the attacked image (the label when unsuccessful).
        location: where: a patch location (as :meth:`Locations.describe`), or for the
            sparse threat ``{"pixels": [[row, col], ...]}``; None when not attacked.
    """

    index: int
    label: int
    prediction: int
    correct: bool
    success: bool = False
    margin: Optional[float] = None
    adversarial_class: Optional[int] = None
    location: Optional[dict] = None

    @property
    def robust(self) -> bool:
        """Correct and not broken: counts towards empirical accuracy."""
        return self.correct and not self.success

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AttackResult:
    """Outcome of :func:`attack_patch` or :func:`attack_sparse`.

    Attributes:
        images: one :class:`ImageAttack` per image, in input order.
        adversarial: ``(N, C, H, W)`` on the CPU: per image the attacked image with the
            smallest margin found (the clean image where none was attacked).
        threat: ``"patch"`` or ``"sparse"``.
        shape: the patch shape (patch threat), else None.
        k: the number of pixels (sparse threat), else None.
        num_locations: locations per image in the sweep (patch threat), else None.
        seconds: wall time.
        settings: the attack's parameters (steps, restarts, ...), for reports.
    """

    images: list[ImageAttack]
    adversarial: torch.Tensor
    threat: str
    shape: Optional[PatchShape] = None
    k: Optional[int] = None
    num_locations: Optional[int] = None
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)
    threat_model: Optional[Any] = None
    """The :class:`~lirpa_patch.threats.base.Threat` attacked (None from :func:`attack_patch` /
    :func:`attack_sparse` called directly)."""

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def chunk_size(self) -> int:
        """Rows per forward/backward pass (as :attr:`CertifyResult.chunk_size`, for reports)."""
        return int(self.settings.get("chunk", DEFAULT_ATTACK_CHUNK))

    @property
    def num_successes(self) -> int:
        return sum(r.success for r in self.images)

    @property
    def clean_accuracy(self) -> float:
        return sum(r.correct for r in self.images) / max(1, len(self.images))

    @property
    def empirical_accuracy(self) -> float:
        """Fraction of images classified correctly and not broken (empirical adversarial accuracy)."""
        return sum(r.robust for r in self.images) / max(1, len(self.images))


# --------------------------------------------------------------------------- shared pieces


def _box(domain: Optional[PixelDomain], channels: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(lo, hi)`` as ``(1, C, 1, 1)`` in the model's input space."""
    lo, hi = (domain or PixelDomain()).bounds(channels, like)
    lo, hi = torch.minimum(lo, hi), torch.maximum(lo, hi)
    return lo.view(1, channels, 1, 1), hi.view(1, channels, 1, 1)


def _margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``z_label - max_{j != label} z_j``, ``(R,)``."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.scatter(1, labels[:, None], float("-inf")).amax(1)
    return true - other


def _objective(logits: torch.Tensor, labels: torch.Tensor, loss: str) -> torch.Tensor:
    """What the attack minimises, ``(R,)``."""
    if loss == "ce":
        return -F.cross_entropy(logits, labels, reduction="none")
    return _margin(logits, labels)


def _clamp(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return torch.maximum(torch.minimum(x, hi), lo)


def _grad_at(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, loss: str, batch: int) -> torch.Tensor:
    """Gradient of the objective at ``x`` ``(N, C, H, W)``, in chunks of ``batch``."""
    out = []
    for i in range(0, x.shape[0], batch):
        z = x[i : i + batch].detach().requires_grad_(True)
        (g,) = torch.autograd.grad(_objective(model(z), labels[i : i + batch], loss).sum(), z)
        out.append(g)
    return torch.cat(out) if out else torch.zeros_like(x)


class _Best:
    """Per image: the best attacked point found so far (a success first, then the smallest margin)."""

    def __init__(self, images: torch.Tensor) -> None:
        n = images.shape[0]
        self.success = torch.zeros(n, dtype=torch.bool)
        self.margin = torch.full((n,), float("inf"))
        self.pred = torch.full((n,), -1, dtype=torch.long)
        self.where = torch.full((n,), -1, dtype=torch.long)  # location index (patch)
        self.adversarial = images.detach().cpu().clone()

    def offer(self, image: torch.Tensor, margin: torch.Tensor, pred: torch.Tensor, labels: torch.Tensor,
              adversarial: Callable[[torch.Tensor], torch.Tensor], where: Optional[torch.Tensor] = None) -> None:
        """Offer rows: their image ids ``(R,)``, margins, predictions and labels; ``adversarial(rows)`` builds
        the attacked images of selected rows (only called for the winners)."""
        if image.numel() == 0:
            return
        device = image.device
        image, margin, pred, labels = image.cpu(), margin.detach().cpu(), pred.cpu(), labels.cpu()
        success = pred != labels
        # rows sorted by image, success first, then margin: the first row of each image wins
        order = torch.sort(margin, stable=True).indices
        order = order[torch.sort((~success[order]).to(torch.int8), stable=True).indices]
        order = order[torch.sort(image[order], stable=True).indices]
        first = torch.ones(order.numel(), dtype=torch.bool)
        first[1:] = image[order][1:] != image[order][:-1]
        rows = order[first]
        img = image[rows]
        better = (success[rows] & ~self.success[img]) | (
            (success[rows] == self.success[img]) & (margin[rows] < self.margin[img])
        )
        rows, img = rows[better], img[better]
        if rows.numel() == 0:
            return
        self.success[img] = success[rows]
        self.margin[img] = margin[rows]
        self.pred[img] = pred[rows]
        if where is not None:
            self.where[img] = where.cpu()[rows]
        self.adversarial[img] = adversarial(rows.to(device)).detach().cpu()


def _records(indices: Sequence[int], labels: torch.Tensor, preds: torch.Tensor, best: _Best,
             location: Callable[[int], Optional[dict]]) -> list[ImageAttack]:
    out = []
    for k in range(len(indices)):
        correct = bool(preds[k] == labels[k])
        attacked = correct and bool(torch.isfinite(best.margin[k]))
        out.append(
            ImageAttack(
                index=int(indices[k]),
                label=int(labels[k]),
                prediction=int(preds[k]),
                correct=correct,
                success=attacked and bool(best.success[k]),
                margin=float(best.margin[k]) if attacked else None,
                adversarial_class=int(best.pred[k]) if attacked else None,
                location=location(k) if attacked else None,
            )
        )
    return out


def _on_device(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device):
    """``(model, images, labels)`` on ``device``: the model in eval mode, the images detached float32,
    the labels int64 (restore the model's mode with ``model.train(was_training)``)."""
    return (model.to(device).eval(), images.detach().to(device=device, dtype=torch.float32),
            labels.to(device=device, dtype=torch.long))


def _predictions(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """The model's predictions ``(N,)`` on ``images`` (labels checked against the number of classes)."""
    logits = predict(model, images, max(1, min(256, chunk_size)))
    margin_spec(labels, logits.shape[1])  # label range check
    return logits.argmax(1)


def _check_attack_options(steps: int, restarts: int, step_size: float, loss: str, chunk_size: int) -> None:
    if steps < 0:
        raise UsageError(f"steps must be >= 0, got {steps}", param="steps")
    if restarts < 1:
        raise UsageError(f"restarts must be >= 1, got {restarts}", param="restarts")
    if not step_size > 0:
        raise UsageError(f"step_size must be positive, got {step_size}", param="step_size")
    if loss not in ("margin", "ce"):
        raise UsageError(f"loss must be 'margin' or 'ce', got {loss!r}", param="loss")
    if chunk_size < 1:
        raise UsageError(f"chunk_size must be at least 1, got {chunk_size}", param="chunk_size")


# --------------------------------------------------------------------------- patch attack


def _descend(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    m: torch.Tensor,
    content: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    *,
    steps: int,
    step_size: float,
    loss: str,
    group: torch.Tensor,
    done: torch.Tensor,
    per_row: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sign-gradient descent on the masked pixels of rows; each row's best point.

    Args:
        x, y, m: clean rows ``(R, C, H, W)``, labels ``(R,)``, masks ``(R, 1, H, W)``.
        content: starting patch contents ``(R, C, H, W)`` (only masked pixels matter).
        group: image id of each row ``(R,)``; ``done`` ``(N,)`` images already broken
            (updated in place): their rows stop.
        lo, hi: the valid range, per channel ``(1, C, 1, 1)``, or with ``per_row`` per row
            and element ``(R, C, H, W)``.

    Returns:
        ``(margin, pred, content)``: per row the smallest margin seen ``(R,)``, the
        prediction there and the content that gave it (``inf``/label/start if the row never ran).
    """
    rows = x.shape[0]
    best_margin = torch.full((rows,), float("inf"), device=x.device)
    best_pred = y.clone()
    best_content = content.clone()
    active = torch.nonzero(~done[group]).flatten()
    step = step_size * (hi - lo)
    for t in range(steps + 1):
        if active.numel() == 0:
            break
        c = content[active].requires_grad_(t < steps)
        with torch.set_grad_enabled(t < steps):
            logits = model(torch.where(m[active], c, x[active]))
            margin = _margin(logits, y[active])
        pred = logits.detach().argmax(1)
        better = margin.detach() < best_margin[active]
        sel = active[better]
        best_margin[sel] = margin.detach()[better]
        best_pred[sel] = pred[better]
        best_content[sel] = c.detach()[better]
        broke = pred != y[active]
        done[group[active[broke]]] = True
        if t < steps:
            (grad,) = torch.autograd.grad(_objective(logits, y[active], loss).sum(), c)
            scale = 1.0 - 0.9 * t / max(1, steps - 1)  # linearly shrinking steps, to a tenth
            with torch.no_grad():
                box = (lo[active], hi[active], step[active]) if per_row else (lo, hi, step)
                content[active] = _clamp(c.detach() - scale * box[2] * grad.sign(), box[0], box[1])
        active = active[~done[group[active]]]
    return best_margin, best_pred, best_content


def _location_rows(n_images: int, location_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (image id, location id), image-major, from per-image location lists ``(N, M)``."""
    img = torch.arange(n_images)[:, None].expand_as(location_index).reshape(-1)
    return img, location_index.reshape(-1)


def attack_patch(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    size: SizeLike | str = 2,
    shape: str | PatchShape | torch.Tensor = "square",
    locations: Optional[Locations] = None,
    location_index: Optional[torch.Tensor] = None,
    candidates: Optional[int] = 16,
    sweep: bool = True,
    steps: int = 20,
    restarts: int = 3,
    step_size: float = 0.25,
    loss: Loss = "margin",
    domain: Optional[PixelDomain] = None,
    chunk_size: int = DEFAULT_ATTACK_CHUNK,
    device: str | torch.device = "cpu",
    indices: Optional[Sequence[int]] = None,
    seed: int = 0,
    progress: Optional[AttackProgress] = None,
) -> AttackResult:
    """Attack images with a patch at every location (see the module docstring).

    Args:
        model: maps images ``(N, C, H, W)`` to logits ``(N, K)``.
        images: ``(N, C, H, W)`` in the model's input space; labels ``(N,)``.
        size, shape: the patch (see :func:`~lirpa_patch.shapes.make_shape`), or
            ``locations``: an explicit location set (default every valid position).
        location_index: ``(N, M)`` indices into the locations that every image's
            refine stage attacks in addition to its ``candidates`` (e.g. the locations
            with the worst certified margin); ``-1`` entries are ignored.
        candidates: locations per image refined after the sweep (those with the
            smallest sweep margin); None refines every location (slowest, strongest);
            0 refines only ``location_index``.
        sweep: run the sweep stage (needed to pick ``candidates``); without it only
            ``location_index`` (``candidates=0``) or every location (None) is attacked.
        steps: sign-gradient steps per restart (0: the sweep and starting points only).
        restarts: starting points per location: the best sweep content, the clean
            image (IFGSM), then random corners and uniform noise.
        step_size: first step as a fraction of each channel's range (then shrinking
            linearly to a tenth of it).
        loss: ``"margin"`` (``z_label - max_other z``, default) or ``"ce"`` (the
            paper's cross-entropy).
        domain: pixel domain of ``images`` (default ``[0, 1]``).
        chunk_size: rows per forward/backward pass (the memory knob).
        device: where to run; indices: dataset index per image (for records);
            seed: seeds every random choice; progress: ``(stage, done, total)``.

    Returns:
        An :class:`AttackResult` (``threat="patch"``).
    """
    _check_attack_options(steps, restarts, step_size, loss, chunk_size)
    if candidates is not None and candidates < 0:
        raise UsageError(f"candidates must be >= 0, got {candidates}", param="candidates")
    if not sweep and candidates:
        raise UsageError("candidates are picked by the sweep: use candidates=0 or None with sweep=False",
                         param="candidates")
    check_inputs(images, labels, chunk_size)
    start, device, was_training = time.perf_counter(), torch.device(device), model.training
    model, images, labels = _on_device(model, images, labels, device)
    patch_shape = shape if isinstance(shape, PatchShape) else make_shape(shape, size)
    if locations is None:
        locations = all_locations(patch_shape, images.shape[-2:])
    elif tuple(locations.image_size) != tuple(images.shape[-2:]):
        raise UsageError(f"locations are for {locations.image_size} images, got {tuple(images.shape[-2:])}",
                         param="locations")
    n, n_loc = images.shape[0], len(locations)
    if location_index is not None:
        location_index = torch.as_tensor(location_index, dtype=torch.long).cpu()
        if location_index.ndim != 2 or location_index.shape[0] != n:
            raise UsageError(f"location_index must be (N, M) with N = {n}, got {tuple(location_index.shape)}",
                             param="location_index")
        if location_index.numel() and (int(location_index.min()) < -1 or int(location_index.max()) >= n_loc):
            raise UsageError(f"location_index must hold location numbers in [0, {n_loc}) or -1 (none)",
                             param="location_index")
    idx = list(range(n)) if indices is None else [int(i) for i in indices]
    masks = locations.masks.to(device).unsqueeze(1)  # (L, 1, H, W)
    generator = torch.Generator().manual_seed(seed)
    lo, hi = _box(domain, images.shape[1], images)

    preds = _predictions(model, images, labels, chunk_size)
    todo = torch.nonzero(preds == labels).flatten().cpu()
    best = _Best(images)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    done[(preds != labels)] = True

    def patched(img: torch.Tensor, loc: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
        return torch.where(masks[loc], content, images[img])

    # 1. sweep: at every location, the FGSM corner and the all-low / all-high patches
    with torch.enable_grad():
        grad = torch.zeros_like(images)
        if todo.numel():
            grad[todo] = _grad_at(model, images[todo], labels[todo], loss, chunk_size)
    starts = [
        torch.where(grad > 0, lo.expand_as(images), torch.where(grad < 0, hi.expand_as(images), images)),
        lo.expand_as(images),
        hi.expand_as(images),
    ]
    swept = torch.full((n, n_loc), float("inf"))  # smallest sweep margin per (image, location)
    sweep_start = torch.zeros((n, n_loc), dtype=torch.long)  # which of `starts` gave the sweep margin
    img_all, loc_all = _location_rows(todo.numel(), torch.arange(n_loc).expand(todo.numel(), n_loc))
    img_all = todo[img_all] if sweep else todo[:0]
    loc_all = loc_all[: img_all.numel()]
    total = img_all.numel() * len(starts)
    with torch.no_grad():
        for a, start_content in enumerate(starts):
            for s in range(0, img_all.numel(), chunk_size):
                img, loc = img_all[s : s + chunk_size], loc_all[s : s + chunk_size]
                live = (~done[img.to(device)]).cpu()
                img, loc = img[live].to(device), loc[live].to(device)
                if img.numel():
                    out = model(patched(img, loc, start_content[img]))
                    margin = _margin(out, labels[img]).cpu()
                    lower = margin < swept[img.cpu(), loc.cpu()]
                    swept[img.cpu()[lower], loc.cpu()[lower]] = margin[lower]
                    sweep_start[img.cpu()[lower], loc.cpu()[lower]] = a
                    pred = out.argmax(1)
                    best.offer(img, margin, pred, labels[img],
                               lambda r, img=img, loc=loc, c=start_content: patched(img[r], loc[r], c[img[r]]), where=loc)
                    done[img[pred != labels[img]]] = True
                if progress is not None:
                    progress("sweep", a * img_all.numel() + min(s + chunk_size, img_all.numel()), total)

    # 2. refine: IFGSM / PGD with restarts at the chosen locations of images not yet broken
    chosen = []
    if candidates is None:
        chosen.append(torch.arange(n_loc).expand(n, n_loc))
    elif candidates > 0:
        chosen.append(swept.topk(min(candidates, n_loc), dim=1, largest=False).indices)
    if location_index is not None and location_index.shape[1]:
        chosen.append(location_index)
    refine = torch.cat(chosen, dim=1) if chosen else torch.zeros(n, 0, dtype=torch.long)
    refine = torch.sort(refine, dim=1).values  # drop repeats: sorted, then repeats become -1
    repeat = torch.zeros_like(refine, dtype=torch.bool)
    repeat[:, 1:] = refine[:, 1:] == refine[:, :-1]
    for r in range(restarts):
        live = (~done).cpu()
        img_all, loc_all = _location_rows(n, refine)
        keep = live[img_all] & ~repeat.reshape(-1) & (loc_all >= 0)
        img_all, loc_all = img_all[keep], loc_all[keep]
        if img_all.numel() == 0:
            break
        for s in range(0, img_all.numel(), chunk_size):
            img, loc = img_all[s : s + chunk_size].to(device), loc_all[s : s + chunk_size].to(device)
            x, y, m = images[img], labels[img], masks[loc]
            if r == 0:  # the best sweep start of each row
                which = sweep_start[img.cpu(), loc.cpu()].to(device)
                content = torch.stack(starts)[which, img]
            elif r == 1:  # the clean image: IFGSM
                content = x.clone()
            elif r % 2 == 0:
                u = torch.rand(x.shape, generator=generator).to(device)
                content = torch.where(u < 0.5, lo.expand_as(x), hi.expand_as(x))
            else:
                content = lo + torch.rand(x.shape, generator=generator).to(device) * (hi - lo)
            with torch.enable_grad():
                margin, pred, content = _descend(model, x, y, m, content, lo, hi, steps=steps, step_size=step_size,
                                                 loss=loss, group=img, done=done)
            ran = torch.isfinite(margin)
            best.offer(img[ran], margin[ran], pred[ran], y[ran],
                       lambda q, x=x[ran], m=m[ran], c=content[ran]: torch.where(m[q], c[q], x[q]), where=loc[ran])
            if progress is not None:
                progress(f"restart {r + 1}/{restarts}", min(s + chunk_size, img_all.numel()), img_all.numel())

    model.train(was_training)
    results = _records(idx, labels.cpu(), preds.cpu(), best,
                       lambda k: locations.describe(int(best.where[k])) if best.where[k] >= 0 else None)
    return AttackResult(
        images=results,
        adversarial=best.adversarial,
        threat="patch",
        shape=patch_shape,
        num_locations=n_loc,
        seconds=time.perf_counter() - start,
        settings={"steps": steps, "restarts": restarts, "step_size": step_size, "loss": loss,
                  "candidates": candidates, "sweep": sweep, "extra_locations": 0 if location_index is None else int(location_index.shape[1]),
                  "chunk": chunk_size, "seed": seed},
    )


# --------------------------------------------------------------------------- any threat


def attack(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, threat: Any, **options: Any) -> AttackResult:
    """Attack ``images`` against ``threat`` (any :class:`~lirpa_patch.threats.base.Threat`) with its own attack.

    ``options`` are that attack's keyword arguments: :func:`attack_patch`'s for a
    :class:`~lirpa_patch.threats.patch.PatchThreat`, :func:`attack_sparse`'s for a
    :class:`~lirpa_patch.threats.sparse.SparseThreat`, :func:`attack_rows`'s by default.
    The result's ``threat_model`` is ``threat``.
    """
    if not callable(getattr(threat, "attack", None)) or not hasattr(type(threat), "rows_per_image"):
        raise UsageError(f"threat must be a lirpa_patch Threat (e.g. PatchThreat(2), SparseThreat(4)), got {threat!r}",
                         param="threat")
    result = threat.attack(model, images, labels, **options)
    result.threat_model = threat
    return result


def attack_rows(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    threat: Any,
    *,
    steps: int = 20,
    restarts: int = 3,
    step_size: float = 0.25,
    loss: Loss = "margin",
    domain: Optional[PixelDomain] = None,
    chunk_size: int = DEFAULT_ATTACK_CHUNK,
    device: str | torch.device = "cpu",
    indices: Optional[Sequence[int]] = None,
    seed: int = 0,
    progress: Optional[AttackProgress] = None,
    location_index: Optional[torch.Tensor] = None,
) -> AttackResult:
    """Attack every row of ``threat`` whose feasible set is a box: the default :meth:`Threat.attack`.

    For every row of every correctly classified image, sign-gradient descent inside the
    row's box (its perturbation's ``bounds``), from the clean image (IFGSM) first, then
    from random corners and uniform noise (``restarts`` starts in all); an image's rows
    stop once one of them breaks it. Options as :func:`attack_patch`; ``location_index``
    (rows to attack in depth) is accepted and changes nothing: every row is attacked in depth.
    """
    _check_attack_options(steps, restarts, step_size, loss, chunk_size)
    check_inputs(images, labels, chunk_size)
    start, device, was_training = time.perf_counter(), torch.device(device), model.training
    model, images, labels = _on_device(model, images, labels, device)
    threat.prepare(images.shape[-2:])
    n, n_rows = images.shape[0], threat.rows_per_image
    idx = list(range(n)) if indices is None else [int(i) for i in indices]
    generator = torch.Generator().manual_seed(seed)
    preds = _predictions(model, images, labels, chunk_size)
    best = _Best(images)
    done = preds != labels
    todo = torch.nonzero(~done).flatten()
    img_all, row_all = todo.repeat_interleave(n_rows), torch.arange(n_rows, device=device).repeat(todo.numel())
    for r in range(restarts):
        live = ~done[img_all]
        img_r, row_r = img_all[live], row_all[live]
        for s in range(0, img_r.numel(), chunk_size):
            img, row = img_r[s: s + chunk_size], row_r[s: s + chunk_size]
            x, ptb = threat.rows_at(images, img, row, domain=domain)
            lo, hi = ptb.bounds(x)
            x, lo, hi = x.detach().clone(), lo.detach(), hi.detach()
            u = torch.rand(x.shape, generator=generator).to(device)
            content = x.clone() if r == 0 else (torch.where(u < 0.5, lo, hi) if r % 2 else lo + u * (hi - lo))
            ones = torch.ones(x.shape[0], 1, 1, 1, dtype=torch.bool, device=device)
            with torch.enable_grad():
                margin, pred, content = _descend(model, x, labels[img], ones, content, lo, hi, steps=steps,
                                                 step_size=step_size, loss=loss, group=img, done=done, per_row=True)
            ran = torch.isfinite(margin)
            best.offer(img[ran], margin[ran], pred[ran], labels[img][ran], lambda q, c=content[ran]: c[q],
                       where=row[ran])
            if progress is not None:
                progress(f"restart {r + 1}/{restarts}", min(s + chunk_size, img_r.numel()), img_r.numel())
    model.train(was_training)
    results = _records(idx, labels.cpu(), preds.cpu(), best,
                       lambda k: threat.locate(int(best.where[k])) if best.where[k] >= 0 else None)
    return AttackResult(
        images=results, adversarial=best.adversarial, threat=threat.name, shape=threat.shape,
        num_locations=n_rows, seconds=time.perf_counter() - start, threat_model=threat,
        settings={"steps": steps, "restarts": restarts, "step_size": step_size, "loss": loss, "chunk": chunk_size,
                  "seed": seed},
    )


# --------------------------------------------------------------------------- sparse attack


def _pixel_moves(x: torch.Tensor, grad: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """First-order change of the objective when each pixel's channels go to their better end.

    Returns ``(gain, end)``: ``(N, H*W)`` the (non-positive) predicted change per pixel and
    ``(N, C, H, W)`` the end each channel goes to (unchanged where moving does not help).
    """
    down_lo, down_hi = grad * (lo - x), grad * (hi - x)
    take_lo = down_lo < down_hi
    change = torch.where(take_lo, down_lo, down_hi).clamp(max=0)
    end = torch.where(take_lo, lo.expand_as(x), hi.expand_as(x))
    end = torch.where(change < 0, end, x)
    return change.sum(1).flatten(1), end


def _set_pixels(base: torch.Tensor, values: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """``base`` ``(N, C, H, W)`` with the pixels ``(N, P)`` (flat indices) taken from ``values``."""
    n, c = base.shape[:2]
    mask = torch.zeros(n, base.shape[2] * base.shape[3], dtype=torch.bool, device=base.device)
    mask.scatter_(1, pixels, True)
    return torch.where(mask.view(n, 1, *base.shape[2:]), values, base)


def attack_sparse(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    k: int,
    candidates: int = 16,
    steps: int = 20,
    restarts: int = 3,
    loss: Loss = "margin",
    domain: Optional[PixelDomain] = None,
    chunk_size: int = DEFAULT_ATTACK_CHUNK,
    device: str | torch.device = "cpu",
    indices: Optional[Sequence[int]] = None,
    seed: int = 0,
    progress: Optional[AttackProgress] = None,
) -> AttackResult:
    """Attack images by changing any ``k`` pixels (see the module docstring).

    Args:
        model, images, labels, domain, device, indices, seed, progress, loss: as
            :func:`attack_patch`.
        k: pixels the attacker may change (all channels of a pixel count as one).
        candidates: pixels evaluated for real at every greedy step.
        steps: re-selection rounds after the greedy pass (and per restart).
        restarts: 1 greedy pass, then ``restarts - 1`` runs from random k-pixel corners.
        chunk_size: rows per forward pass; a greedy step evaluates ``candidates`` rows
            per image.

    Returns:
        An :class:`AttackResult` (``threat="sparse"``), the changed pixels in each
        record's ``location``.
    """
    _check_attack_options(steps, restarts, 1.0, loss, chunk_size)
    check_inputs(images, labels, chunk_size)
    pixels = images.shape[2] * images.shape[3]
    if not 1 <= k <= pixels:
        raise UsageError(f"k must be in [1, {pixels}] for {images.shape[2]}x{images.shape[3]} images, got {k}",
                         param="k")
    if candidates < 1:
        raise UsageError(f"candidates must be at least 1, got {candidates}", param="candidates")
    start, device, was_training = time.perf_counter(), torch.device(device), model.training
    model, images, labels = _on_device(model, images, labels, device)
    n = images.shape[0]
    idx = list(range(n)) if indices is None else [int(i) for i in indices]
    generator = torch.Generator().manual_seed(seed)
    lo, hi = _box(domain, images.shape[1], images)

    preds = _predictions(model, images, labels, chunk_size)
    todo = torch.nonzero(preds == labels).flatten()
    best = _Best(images)
    cand = min(candidates, pixels)
    batch = max(1, chunk_size // cand)

    def evaluate(img: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = model(z)
        margin = _margin(out, labels[img])
        best.offer(img, margin, out.argmax(1), labels[img], lambda r: z[r])
        return margin

    def reselect(img: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The k pixels with the largest first-order gain from the clean image, at the gradient of ``z``."""
        x = images[img]
        with torch.enable_grad():
            grad = _grad_at(model, z, labels[img], loss, batch * cand)
        gain, end = _pixel_moves(x, grad, lo, hi)
        top = gain.topk(k, dim=1, largest=False).indices
        return _set_pixels(x, end, top)

    for s in range(0, todo.numel(), batch):
        img = todo[s : s + batch]
        x, y = images[img], labels[img]
        b = img.numel()
        # greedy: one pixel at a time, the best of the `cand` most promising by real evaluation
        z = x.clone()
        used = torch.zeros(b, pixels, dtype=torch.bool, device=device)
        for _ in range(k):
            with torch.enable_grad():
                grad = _grad_at(model, z, y, loss, batch * cand)
            gain, end = _pixel_moves(z, grad, lo, hi)
            gain = gain.masked_fill(used, float("inf"))
            top = gain.topk(cand, dim=1, largest=False).indices  # (b, cand)
            rows_img = torch.arange(b, device=device).repeat_interleave(cand)
            trial = _set_pixels(z[rows_img], end[rows_img], top.reshape(-1, 1))
            margin = evaluate(img[rows_img], trial).view(b, cand)
            pick = margin.argmin(1)
            z = trial.view(b, cand, *z.shape[1:])[torch.arange(b, device=device), pick]
            used.scatter_(1, top.gather(1, pick[:, None]), True)
        # re-selection rounds, then restarts from random corners
        for r in range(restarts):
            if r > 0:
                pick = torch.rand(b, pixels, generator=generator).topk(k, dim=1).indices.to(device)
                u = torch.rand(x.shape, generator=generator).to(device)
                z = _set_pixels(x, torch.where(u < 0.5, lo.expand_as(x), hi.expand_as(x)), pick)
                evaluate(img, z)
            for _ in range(steps):
                z = reselect(img, z)
                evaluate(img, z)
        if progress is not None:
            progress("sparse", min(s + batch, todo.numel()), todo.numel())

    model.train(was_training)
    changed = (best.adversarial != images.cpu()).any(1)  # (N, H, W)

    def where(i: int) -> dict:
        return {"pixels": torch.nonzero(changed[i]).tolist()}

    results = _records(idx, labels.cpu(), preds.cpu(), best, where)
    return AttackResult(
        images=results,
        adversarial=best.adversarial,
        threat="sparse",
        k=k,
        seconds=time.perf_counter() - start,
        settings={"steps": steps, "restarts": restarts, "candidates": candidates, "loss": loss,
                  "chunk": chunk_size, "seed": seed},
    )
