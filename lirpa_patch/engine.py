"""The certification engine (paper eq. 11), one for every threat.

A *threat* (any :class:`~lirpa_patch.threats.base.Threat`: :class:`~lirpa_patch.threats.patch.PatchThreat`,
:class:`~lirpa_patch.threats.sparse.SparseThreat`, or one of your own) says which rows an image has (one
per patch location; one for the sparse threat) and builds the auto_LiRPA
perturbation for some of them. The engine does the rest, the same way for all:

* it bounds rows in memory-sized chunks with auto_LiRPA's ``compute_bounds`` and
  the plugin operators (:mod:`lirpa_patch.ops`), which use the structure of the
  threat (a patch row differs from its clean image in a few pixels);
* it bounds the input of the model's last linear layer (:mod:`lirpa_patch.head`)
  and merges the specification ``C`` (``z_true - z_other``) into that layer once per
  image, for every form of it (Gemm, MatMul, MatMul + Add, ...);
* it keeps per image the smallest lower margin over rows and other classes: the
  image is certified when it is ``> 0`` (:func:`~lirpa_patch.spec.certifies`). Images the model already misclassifies
  are skipped (not certified, margin not computed).

The engine orchestrates; the parts live beside it: the auto_LiRPA module of a model
(:mod:`lirpa_patch.building`), the certified margins of rows, differentiable, which the
trainer uses too (:mod:`lirpa_patch.margins`), and what certification returns
(:mod:`lirpa_patch.results`). Their public names are importable from here as before.

What :func:`certify`'s options do:

*Methods.* ``method`` names a cascade (:mod:`lirpa_patch.cascade`): IBP bounds every row;
``"crown"`` then bounds with CROWN only the rows IBP leaves below zero, ``"alpha-crown"``
then bounds with alpha-CROWN only the rows CROWN leaves below zero. An image is certified
exactly when every row is certified by some method of the chain: the same images as running
the strongest method (combined with the cheaper ones) on every row. ``chunk_size`` rows go
to each ``compute_bounds`` call of every method; by default :func:`rows_per_call` sizes them
by ``max_memory`` per method. ``intermediate`` says how CROWN and alpha-CROWN bound the
pre-activations: ``"crown"``, ``"ibp"`` (CROWN-IBP: far cheaper on convolutional networks,
looser), or ``"auto"`` (measured per model on the first rows that reach CROWN); the result's
``extra["cascade"]`` says which was used. In a cascade an image is done (for ``progress``)
when its answer is final, and rows count every bound computed. ``exhaustive`` keeps
bounding the rows of an image after one of its rows failed the strongest method (every row
gets the strongest method's margin, e.g. for heatmaps); otherwise such an image is settled
(not certified) and its other rows keep their cheaper bound.

*Location groups.* For a threat with groups (:meth:`~lirpa_patch.threats.base.Threat.block_levels`:
patch locations, :mod:`lirpa_patch.threats.blocks`), ``groups`` blocks of ``groups x groups``
adjacent locations (a power of two) are bounded by their union first and split only where
they do not certify; with IBP alone a block is not split either when its bound is above the
smallest location margin of its image found so far (it cannot lower the image's worst
margin). ``"auto"`` (default) uses blocks of 2 (from two images on) until they have bounded
more than :data:`AUTO_ROW_SHARE` of the rows that bounding every location would; ``None`` or
0 bounds every location, as does ``keep_location_margins``. Certified decisions are the same
either way, and so is the worst margin of an image that is not certified.

*Reusing a bounded module.* ``bounded``, a ``BoundedModule`` of ``model`` from
:func:`bound_model`, saves building one per call. **Build it again after any change of the
model** other than its parameters' values (those it shares): a replaced parameter or
submodule, a changed buffer or tensor attribute, new code or hooks. Those are detected for a
module from :func:`bound_model` (UsageError), as is any change of the logits on ``images``;
Python state the model's ``forward`` reads from elsewhere is not. Without ``bounded`` every
call builds its own auto_LiRPA module of ``model`` as it is now (nothing is kept between calls).

*Worst margins.* ``worst_margin`` of an image is the minimum, over its rows and other
classes, of the tightest bound computed for each row: always a valid lower bound of its
worst margin. A row decided by a cheaper method (IBP, a location group, or CROWN before
alpha-CROWN) keeps that method's bound, so for a certified image it is the smallest bound
that was needed (> 0), which may be below what the strongest method would give; for an
image that is not certified it is the strongest method's minimum when ``exhaustive`` (or
when the chain is IBP alone). ``keep_location_margins`` bounds every row on its own and
returns each row's tightest bound in ``CertifyResult.location_margins`` ``(N, L)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from auto_LiRPA import BoundedModule

from .building import _check_bounded, _quiet, _unsupported_ops, bound_model  # noqa: F401  (engine.X as before)
from .cascade import CHAINS, CascadeStats, Pending, refine
from .crown import check_intermediate
from .domain import PixelDomain
from .errors import ModelError, UsageError
from .head import head_of
from .inputs import check_inputs, predict  # noqa: F401  (engine.X as before)
from .locations import Locations
from .margins import (  # noqa: F401  (engine.X as before)
    MAX_ROWS_PER_CALL,
    METHODS,
    Method,
    _ibp_margins,
    check_method,
    location_margins,
    lower_margins,
    pair_margins,
    row_margins,
    sparse_lower_margins,
    threat_margins,
)
from .ops.graph import all_nodes, reaches_input
from .results import CertifyResult, ImageResult, _image_results  # noqa: F401  (engine.X as before)
from .shapes import PatchShape, SizeLike
from .spec import certifies, margin_spec
from .threats.base import Threat
from .threats.blocks import children as _children
from .threats.patch import PatchThreat
from .threats.sparse import SparseThreat, check_k

DEFAULT_MAX_MEMORY = 1 << 30
"""Default budget for the working tensors of one bound computation (1 GiB)."""


CROWN_WORKING_SET = 384 << 20
"""Working-tensor budget of one CROWN call (bytes, below ``max_memory``): larger calls are slower per row on CPUs."""

SEED_BLOCKS = 4
"""Location groups at the end of a chain: the locations of each image's this many lowest blocks are bounded first."""

AUTO_ROW_SHARE = 0.75
"""``groups="auto"`` keeps location groups while they bound at most this share of the rows bounding every
location would (counted over the images bounded so far; block rows cost about as much as location rows)."""

ProgressFn = Callable[[int, int], None]
"""``progress(images_done, rows_done)``, called after every chunk.

When the callback also has a method ``start(images, rows)``, it is called once, before
any bound is computed, with the totals: the images that will be bounded (those the
model classifies correctly) and their rows. A progress bar needs no forward pass of
its own to size itself."""


def start_progress(progress: Optional[ProgressFn], images: int, rows: int) -> None:
    """Give ``progress`` the totals, when it has a ``start`` method (see :data:`ProgressFn`)."""
    start = getattr(progress, "start", None)
    if callable(start):
        start(images, rows)


def rows_per_call(bounded: BoundedModule, max_memory: int, method: str) -> int:
    """Rows per ``compute_bounds`` call that keep its working tensors near ``max_memory`` bytes.

    Estimated from the activation sizes: IBP holds a lower and an upper bound of every
    activation per row, plus as much again in temporaries; CROWN also a linear bound
    per row and hidden neuron (so it is sized by the largest activation squared).
    """
    sizes = []
    for node in all_nodes(bounded):
        shape = getattr(node, "output_shape", None)
        if shape is None or not reaches_input(node):
            continue
        try:
            sizes.append(int(np.prod([int(d) for d in shape[1:]])))
        except (TypeError, ValueError):
            continue
    per_row = 4 * 4 * max(1, sum(sizes))
    if method != "ibp":  # CROWN: linear bounds (rows, neurons, inputs) of the largest layers, twice
        largest = sorted(sizes or [1])[-2:]
        per_row += 4 * 2 * largest[-1] * largest[0]
    return int(max(1, min(MAX_ROWS_PER_CALL, max_memory // per_row)))


class _Worst:
    """Per image the smallest lower margin seen so far, where (a row of the threat), for which class,
    and whether it is a location group's bound (``grouped``)."""

    def __init__(self, n: int, device) -> None:
        self.value = torch.full((n,), float("inf"), device=device)
        self.row = torch.zeros(n, dtype=torch.long)
        self.cls = torch.zeros(n, dtype=torch.long)
        self.grouped = torch.zeros(n, dtype=torch.bool)

    def update(self, img: torch.Tensor, row: torch.Tensor, lb: torch.Tensor,
               grouped: Optional[torch.Tensor] = None) -> None:
        """Rows ``(R,)`` of images ``img`` ``(R,)`` with lower margins ``lb`` ``(R, K - 1)``; ``grouped``
        ``(R,)`` marks bounds of location groups (a row stands for a block of locations)."""
        if lb.numel() == 0:
            return
        if not torch.isfinite(lb).all():
            raise ModelError("auto_LiRPA returned NaN/infinite bounds; the model cannot be certified")
        value, cls = lb.min(dim=1)
        best = self.value.scatter_reduce(0, img, value, "amin")
        improved = best < self.value
        hit = improved[img] & (value == best[img])
        rows = torch.arange(img.numel(), device=img.device)
        pos = torch.full_like(self.value, img.numel(), dtype=torch.long).scatter_reduce(0, img[hit], rows[hit], "amin")
        sel = torch.nonzero(improved).flatten()
        self.value[sel] = best[sel]
        self.row[sel.cpu()] = row[pos[sel]].cpu()
        self.cls[sel.cpu()] = cls[pos[sel]].cpu()
        self.grouped[sel.cpu()] = grouped[pos[sel]].cpu() if grouped is not None else False


def _grouped(bounded, threat: Threat, levels, images, labels, worst, batch: torch.Tensor, *,
             num_classes: int, method: str, domain, chunk_size: int, exact_min: bool) -> int:
    """Bound images ``batch`` through location groups into ``worst``; returns the number of rows bounded.

    Coarse blocks first: a block whose lower margin certifies settles all its locations
    (its bound is a lower bound of theirs); the others are split, down to single locations.

    With ``exact_min`` (the chain ends with this method: nothing is refined later), a
    block also settles when its bound is above the smallest location margin of its
    image bounded so far: none of its locations can lower the image's worst margin, so
    the minimum is the per-location one. The locations of the :data:`SEED_BLOCKS`
    lowest blocks of each image are bounded first, to know such a margin early.
    ``worst`` (:class:`~lirpa_patch.cascade.Pending`) counts the locations of those
    blocks as not certified.
    """
    b = batch.numel()
    dev = images.device
    imgs, labs = images[batch], labels[batch]
    top = levels[0]
    n_blocks = len(top.blocks)
    step = max(1, chunk_size // b)  # blocks per call: at most chunk_size rows
    lb = torch.cat([lower_margins(bounded, imgs, labs, locations=top.blocks, method=method, domain=domain,
                                  index=torch.arange(j, min(j + step, n_blocks), device=dev),
                                  num_classes=num_classes)
                    for j in range(0, n_blocks, step)], 1).reshape(-1, num_classes - 1)
    img = torch.arange(b, device=dev).repeat_interleave(n_blocks)
    unit = torch.arange(n_blocks, device=dev).repeat(b)
    bounded_rows = unit.numel()
    best = torch.full((b,), float("inf"), device=dev)  # smallest location margin bounded so far, per image
    if exact_min:
        low = lb.min(dim=1).values.view(b, n_blocks)
        seeds = low.topk(min(SEED_BLOCKS, n_blocks), dim=1, largest=False).indices  # (b, S)
        seeded = torch.zeros(b, n_blocks, dtype=torch.bool, device=dev)
        seeded.scatter_(1, seeds, True)
        seeded &= ~certifies(low)  # a certified block needs no seed
        member = top.member_of.to(dev)  # (L,)
        s_img, s_loc = torch.nonzero(seeded[:, member], as_tuple=True)  # every location of a seed block
        if s_loc.numel():
            s_lb = pair_margins(bounded, threat, imgs, labs, s_img, s_loc, num_classes=num_classes,
                                method=method, domain=domain, chunk_size=chunk_size)
            bounded_rows += s_loc.numel()
            worst.update(batch[s_img], s_loc, s_lb)
            best.scatter_reduce_(0, s_img, s_lb.min(dim=1).values, "amin")
        done = seeded.reshape(-1)  # image-major like (img, unit)
        img, unit, lb = img[~done], unit[~done], lb[~done]
    for depth, level in enumerate(levels):
        if depth:
            lb = location_margins(bounded, level.blocks, imgs, labs, img, unit, num_classes=num_classes,
                                  method=method, domain=domain, chunk_size=chunk_size)
            bounded_rows += unit.numel()
        low = lb.min(dim=1).values
        certified = certifies(low)
        sizes = torch.bincount(level.member_of, minlength=len(level.blocks)).to(dev)
        worst.update(batch[img[certified]], level.first[unit[certified]], lb[certified],
                     grouped=sizes[unit[certified]] > 1)  # a block's bound stands for its locations
        settled = certified
        if exact_min:
            above = ~certified & (low > best[img])  # cannot lower the image's worst margin
            if bool(above.any()):
                worst.leave(int(sizes[unit[above]].sum()))
            settled = certified | above
        pending_img, pending = img[~settled], unit[~settled]
        if pending.numel() == 0:
            return bounded_rows
        which, unit = _children(level.child_of, pending)
        img = pending_img[which]
    # the finest blocks' pending members: single locations, bounded exactly
    lb = pair_margins(bounded, threat, imgs, labs, img, unit, num_classes=num_classes, method=method,
                      domain=domain, chunk_size=chunk_size)
    worst.update(batch[img], unit, lb)
    return bounded_rows + unit.numel()


def certify(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    threat: Optional[Threat] = None,
    *,
    size: SizeLike | str = 2,
    shape: str | PatchShape | torch.Tensor = "square",
    locations: Optional[Locations] = None,
    k: Optional[int] = None,
    method: Method | str = "ibp",
    chunk_size: Optional[int] = None,
    max_memory: int = DEFAULT_MAX_MEMORY,
    device: str | torch.device = "cpu",
    indices: Optional[Sequence[int]] = None,
    domain: Optional[PixelDomain] = None,
    bounded: Optional[BoundedModule] = None,
    progress: Optional[ProgressFn] = None,
    groups: Optional[int | str] = "auto",
    keep_location_margins: bool = False,
    exhaustive: Optional[bool] = None,
    intermediate: str = "auto",
) -> CertifyResult:
    """Certify images against a threat: every patch location (paper eq. 11), any ``k`` pixels, or any
    :class:`~lirpa_patch.threats.base.Threat` (the module docstring says what each option does).

    Args:
        model: maps images ``(N, C, H, W)`` in ``[0, 1]`` to logits ``(N, K)``
            (wrap ONNX or layout-specific models in :class:`~lirpa_patch.models.ImageModel`).
        images: ``(N, C, H, W)`` float in the pixel domain (default ``[0, 1]``); labels: ``(N,)`` int64.
        threat: e.g. :class:`~lirpa_patch.threats.patch.PatchThreat` or
            :class:`~lirpa_patch.threats.sparse.SparseThreat`; by default the patch of ``size``,
            ``shape`` and ``locations`` (every valid position), or the sparse threat of ``k``.
        method: ``"ibp"`` (default), ``"crown"`` or ``"alpha-crown"``: a cascade (*Methods*).
        chunk_size: rows per ``compute_bounds`` call; default sized by ``max_memory`` bytes per call.
        indices: dataset index of each image, for the report (default ``0..N-1``).
        domain: pixel domain of ``images`` (default ``[0, 1]``, no normalization).
        bounded: a ``BoundedModule`` of ``model`` from :func:`bound_model` (*Reusing a bounded module*).
        progress: ``(images_done, rows_done)`` callback (:data:`ProgressFn`).
        groups: location groups for the IBP pass (*Location groups*): ``"auto"``, a power of two, or None.
        keep_location_margins: also return every row's worst margin, ``location_margins`` ``(N, L)``.
        exhaustive: in a cascade, bound every row of an image that failed (default: with
            ``keep_location_margins``).
        intermediate: ``"crown"``, ``"ibp"`` or ``"auto"``: how CROWN bounds the pre-activations
            (:mod:`lirpa_patch.cascade`).

    Returns:
        A :class:`CertifyResult`: one :class:`ImageResult` per image (*Worst margins*),
        ``threat_model``, and in ``extra`` the cascade's statistics and what the threat diagnosed.
    """
    key, mode = check_method(method), check_intermediate(intermediate)
    exhaustive = bool(keep_location_margins) if exhaustive is None else exhaustive
    threat = _threat_of(threat, size, shape, locations, k)
    check_inputs(images, labels, chunk_size)
    if max_memory < 1:
        raise UsageError(f"max_memory must be positive, got {max_memory}", param="max_memory")
    start, device, was_training = time.perf_counter(), torch.device(device), model.training
    model = model.to(device).eval()
    stats = CascadeStats(list(CHAINS[key]), exhaustive=bool(exhaustive))
    try:
        job = _Job.of(model, images, labels, threat, device, indices, bounded)
        ibp_chunk = chunk_size if chunk_size is not None else rows_per_call(job.bounded, max_memory, "ibp")
        kept = torch.full((job.n_img, job.n_rows), float("nan")) if keep_location_margins else None
        tracker = Pending(job.worst, keep=key != "ibp", kept=kept)
        start_progress(progress, len(job.todo), len(job.todo) * job.n_rows)
        ibp_start = time.perf_counter()
        with torch.no_grad():
            groups_used = _ibp_pass(job.bounded, threat, job.images, job.labels, tracker, job.todo,
                                    num_classes=job.num_classes, domain=domain, chunk_size=ibp_chunk,
                                    progress=progress, cascade=key != "ibp",
                                    groups=None if keep_location_margins else groups)
            ibp = stats.stages["ibp"]
            ibp.rows, ibp.chunk, ibp.seconds = len(job.todo) * job.n_rows, int(ibp_chunk), time.perf_counter() - ibp_start
            ibp.settled = ibp.rows - tracker.unsettled
            if key != "ibp":
                crown_chunk = chunk_size if chunk_size is not None else rows_per_call(
                    job.bounded, min(max_memory, CROWN_WORKING_SET), "crown")
                _refine_pass(job.bounded, threat, job.images, job.labels, tracker, job.worst, kept, ibp.rows,
                             stats=stats, num_classes=job.num_classes, domain=domain, intermediate=mode,
                             chunk=int(crown_chunk), todo=len(job.todo), progress=progress)
    finally:
        model.train(was_training)
    return job.result(key, stats, groups_used, kept, keep_location_margins, int(ibp_chunk),
                      time.perf_counter() - start)


@dataclass
class _Job:
    """What :func:`certify` prepares before bounding: the inputs on the device, the model's predictions,
    the bounded module, the images to bound and their running minima; and the result it becomes."""

    images: torch.Tensor
    labels: torch.Tensor
    threat: Threat
    idx: list[int]
    n_img: int
    n_rows: int
    num_classes: int
    preds: torch.Tensor
    correct: torch.Tensor
    bounded: BoundedModule
    todo: list[int]
    worst: "_Worst"

    @classmethod
    def of(cls, model, images, labels, threat: Threat, device, indices, bounded) -> "_Job":
        images = images.to(device=device, dtype=torch.float32)
        labels = labels.to(device=device, dtype=torch.long)
        threat.prepare(images.shape[-2:])
        n_img = images.shape[0]
        idx = list(range(n_img)) if indices is None else [int(i) for i in indices]
        if len(idx) != n_img:
            raise UsageError(f"indices has {len(idx)} entries for {n_img} images", param="indices")
        logits = predict(model, images)
        margin_spec(labels, logits.shape[1])  # validates the label range with a clear message
        if bounded is None:
            bounded = bound_model(model, images.shape[1:], device)
        else:
            _check_bounded(model, bounded, images, logits)
        preds = logits.argmax(1)
        return cls(images=images, labels=labels, threat=threat, idx=idx, n_img=n_img, n_rows=threat.rows_per_image,
                   num_classes=logits.shape[1], preds=preds, correct=preds == labels, bounded=bounded,
                   todo=torch.nonzero(preds == labels).flatten().tolist(), worst=_Worst(n_img, device))

    def result(self, key: str, stats: CascadeStats, groups_used: tuple[int, int, int], kept, keep_location_margins,
               chunk: int, seconds: float) -> CertifyResult:
        threat, worst = self.threat, self.worst
        results = _image_results(self.idx, self.labels, self.preds, self.correct, worst.value, worst.cls,
                                 self.num_classes, lambda k_: threat.locate(int(worst.row[k_])), grouped=worst.grouped)
        extra: dict = {"cascade": stats.to_dict(), **threat.diagnose(self.bounded)}
        if groups_used[0]:
            extra["location_groups"] = dict(zip(("block", "images", "rows_bounded"), groups_used),
                                             rows_per_location=len(self.todo) * self.n_rows)
        location_set = threat.location_set
        return CertifyResult(
            images=results, shape=threat.shape, num_locations=len(location_set) if location_set is not None else 0,
            method=key, seconds=seconds, chunk_size=chunk, extra=extra, head=head_of(self.bounded).describe(),
            location_margins=kept, locations=location_set if keep_location_margins else None, threat_model=threat,
        )


def _threat_of(threat: Optional[Threat], size, shape, locations: Optional[Locations], k: Optional[int]) -> Threat:
    """The threat :func:`certify` was given, or the one its older keywords describe."""
    if threat is None:
        if k is not None:
            return SparseThreat(check_k(k))
        return PatchThreat(None if isinstance(shape, PatchShape) else size, shape, locations)
    if k is not None:
        raise UsageError("give either threat= or k=, not both", param="k")
    if not isinstance(threat, Threat):
        raise UsageError(f"threat must be a lirpa_patch Threat (e.g. PatchThreat(2), SparseThreat(4)), got {threat!r}",
                         param="threat")
    return threat


def _refine_pass(bounded, threat: Threat, images, labels, tracker: Pending, worst: "_Worst",
                 kept: Optional[torch.Tensor], done_rows: int, *, stats: CascadeStats, num_classes: int, domain,
                 intermediate: str, chunk: int, todo: int, progress: Optional[ProgressFn]) -> None:
    """The stronger methods of the cascade on the rows IBP left pending in ``tracker``, into ``worst``
    (and ``kept``, the per-row margins, when kept)."""
    p_img, p_row, p_lb = tracker.rows(num_classes, images.device)
    if progress is not None:
        progress(todo - int(torch.unique(p_img).numel()), done_rows)

    def report(rows: int, left: int) -> None:
        if progress is not None:
            progress(todo - left, done_rows + rows)

    final = refine(bounded, threat, images, labels, p_img, p_row, p_lb, stats=stats, num_classes=num_classes,
                   domain=domain, intermediate=intermediate, chunk=chunk, progress=report)
    worst.update(p_img, p_row, final)
    if kept is not None and p_img.numel():
        kept[p_img.cpu(), p_row.cpu()] = final.min(dim=1).values.cpu()
    if progress is not None:
        progress(todo, done_rows + sum(stats.stages[m].rows for m in stats.methods[1:]))


def _ibp_pass(bounded, threat, images, labels, tracker, todo: list[int], *, num_classes: int, domain, chunk_size: int,
              groups, progress: Optional[ProgressFn], cascade: bool) -> tuple[int, int, int]:
    """IBP on every row of images ``todo``, into ``tracker`` (:class:`~lirpa_patch.cascade.Pending`).

    Returns ``(block size used, images through location groups, rows bounded)``. In a
    cascade (``cascade``) progress counts no image as done (a later method decides), and
    location groups settle only blocks that certify; otherwise also blocks that cannot
    lower their image's worst margin (:func:`_grouped`). ``groups="auto"`` uses groups
    (first on at most half the images, none for a single image) until they have bounded more than
    :data:`AUTO_ROW_SHARE` of the rows of the images they handled, then bounds every
    location of the remaining images.
    """
    device = images.device
    n_rows = threat.rows_per_image
    block, levels = _block_levels(groups, threat, "ibp", len(todo))
    row_chunk = min(n_rows, chunk_size)
    img_chunk = max(1, chunk_size // row_chunk)
    done_images, done_rows, bounded_rows, grouped_images, grouped_rows = 0, 0, 0, 0, 0
    i = 0
    while i < len(todo):
        take = img_chunk
        if levels is not None:  # a call bounds one block per image: more images per call
            take = max(1, chunk_size // len(levels[0].blocks))
            if groups == "auto" and not grouped_images:
                take = min(take, len(todo) // 2)  # decide on at most half the images
        batch = torch.tensor(todo[i: i + take], device=device)
        i += take
        if levels is not None:
            rows = _grouped(bounded, threat, levels, images, labels, tracker, batch, num_classes=num_classes,
                            method="ibp", domain=domain, chunk_size=chunk_size, exact_min=not cascade)
            bounded_rows += rows
            grouped_rows += rows
            grouped_images += batch.numel()
            if groups == "auto" and grouped_rows > AUTO_ROW_SHARE * grouped_images * n_rows:
                levels = None  # "auto": blocks do not pay off on this model and threat
        else:
            for j in range(0, n_rows, row_chunk):
                lb = threat_margins(bounded, threat, images[batch], labels[batch], slice(j, j + row_chunk),
                                    num_classes=num_classes, method="ibp", domain=domain)  # (b, r, K-1)
                r = lb.shape[1]
                tracker.update(batch.repeat_interleave(r), torch.arange(j, j + r).repeat(batch.numel()),
                               lb.reshape(-1, num_classes - 1))
                done_rows += batch.numel() * r
                bounded_rows += batch.numel() * r
                if progress is not None:
                    progress(0 if cascade else done_images, done_rows)
        done_images += batch.numel()
        done_rows = done_images * n_rows
        if progress is not None:
            progress(0 if cascade else done_images, done_rows)
    return block if grouped_images else 0, grouped_images, bounded_rows


def _block_levels(groups, threat: Threat, method: str, n_images: int) -> tuple[int, Optional[list]]:
    """The location-group block size to use and its levels (``(0, None)``: none, also for a threat
    without groups); ``n_images`` the images to bound."""
    if groups in (None, False, 0):
        return 0, None
    if groups == "auto":
        if method != "ibp" or threat.rows_per_image < 16 or n_images < 2:
            return 0, None  # "auto" decides on half the images: with one image, every location
        block = 2
    elif isinstance(groups, bool) or not isinstance(groups, int) or groups < 2 or groups & (groups - 1):
        raise UsageError(f"groups must be 'auto', None or a power of two >= 2, got {groups!r}", param="groups")
    else:
        block = groups
    levels = threat.block_levels(block)
    return (block, levels) if levels is not None else (0, None)


SPARSE_CHUNK = 256
"""Default images per ``compute_bounds`` call of :func:`certify_sparse` (kept for compatibility)."""


def certify_sparse(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *, k: int,
                   chunk_size: int = SPARSE_CHUNK, **kwargs) -> CertifyResult:
    """``certify(model, images, labels, SparseThreat(k), ...)`` (the older spelling)."""
    return certify(model, images, labels, SparseThreat(check_k(k)), chunk_size=chunk_size, **kwargs)
