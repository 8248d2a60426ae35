"""The bound-method cascade of :func:`lirpa_patch.engine.certify`: tighter methods only where a cheaper one failed.

``method="crown"`` bounds every (image, location) row with IBP (the plugin's fast
path), then bounds with CROWN only the rows IBP leaves below zero;
``method="alpha-crown"`` then bounds with alpha-CROWN only the rows CROWN leaves
below zero (:data:`CHAINS`). A row's margin is the elementwise maximum of the bounds
computed for it (each is a sound lower bound), so a row is certified by the cascade
exactly when it is certified by computing every method of the chain on it: the
certified set equals what the strongest method alone gives, row by row. Rows are
bounded independently of the rows batched with them (:mod:`lirpa_patch.crown`).

What ``worst_margin`` means then: the minimum over rows and other classes of the
tightest bound computed for each row. It is always a valid lower bound of the
image's worst margin. A row a cheaper method certified keeps that method's bound
(> 0, a lower bound of what a stronger method would give), so a certified image's
``worst_margin`` is the smallest bound that was needed, not the strongest method's
minimum. An image that is not certified gets the strongest method's minimum when
``exhaustive`` (every row bounded by every method it needs); otherwise (the default)
the cascade stops bounding an image at its first row the strongest method cannot
certify, and its remaining rows keep the cheaper bound they had.

Rows go to the expensive methods in rounds: every image's row with the lowest IBP
margin first, then every image's second lowest, ... so an image that is not
certified is usually settled by one row.

``intermediate="auto"`` (the default) decides per model how CROWN bounds the
pre-activations, measured on the first chunk of rows that reaches CROWN: it is
bounded with full CROWN, and IBP intermediate bounds (CROWN-IBP) are used instead only
when full CROWN is too costly, i.e. would take more than :data:`AUTO_SECONDS_PER_IMAGE`
CPU seconds for every row of one image, and CROWN-IBP, measured on the same rows, still
gets :data:`AUTO_SHARE` of full CROWN's improvement over IBP (on some networks IBP
intermediate bounds are useless). Those rows keep the result of the mode chosen;
:class:`CascadeStats` records the measurement. ``"crown"`` or ``"ibp"`` pin the mode.
(The budget is generous on purpose: CROWN-IBP can certify far fewer images, and a
choice near the threshold would flip with the machine's load.)
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from .crown import crown_margins
from .errors import ModelError
from .spec import certifies, margin_spec

__all__ = ["AUTO_SECONDS_PER_IMAGE", "AUTO_SHARE", "CHAINS", "CascadeStats", "Pending", "StageStats", "refine"]

CHAINS: dict[str, tuple[str, ...]] = {
    "ibp": ("ibp",),
    "crown": ("ibp", "crown"),
    "alpha-crown": ("ibp", "crown", "alpha-crown"),
}
"""The methods each ``method`` runs, cheapest first."""

AUTO_SECONDS_PER_IMAGE = 120.0
"""``intermediate="auto"``: full CROWN is too costly when every row of one image would take longer (CPU seconds)..."""

AUTO_SHARE = 0.75
"""...and then CROWN-IBP is used if it reaches this share of CROWN's mean improvement over IBP on the measured rows."""

ALPHA_ROWS_FACTOR = 4
"""alpha-CROWN keeps an autograd graph and slopes per row: its chunks are this many times smaller than CROWN's."""


@dataclass
class StageStats:
    """One method of the cascade: the rows it bounded, how many it certified, its wall time in seconds.

    ``settled`` counts rows certified; with IBP alone, the rows of location groups skipped
    because they cannot lower their image's worst margin count as not certified (their
    own bounds were never computed)."""

    method: str
    rows: int = 0
    settled: int = 0
    seconds: float = 0.0
    chunk: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CascadeStats:
    """What the cascade did (``CertifyResult.extra["cascade"]``, the report's ``summary.cascade``).

    Attributes:
        methods: the chain, cheapest first.
        exhaustive: whether rows of images already known not to be certified were bounded.
        intermediate: how CROWN bounded the pre-activations (``"crown"`` or ``"ibp"``);
            None when no row reached CROWN.
        intermediate_choice: ``"given"`` or ``"auto"`` (measured, see ``probe``).
        probe: the measurement of ``"auto"``: rows, milliseconds per row both ways, and
            ``share`` (CROWN-IBP's improvement over IBP as a share of CROWN's).
        stages: per method, :class:`StageStats`.
        rows_uncertified: rows still below zero after the strongest method.
        rows_skipped: rows below zero under a cheaper method that the stronger ones were
            spared (their image had already failed; 0 when ``exhaustive``).
    """

    methods: list[str]
    exhaustive: bool = False
    intermediate: Optional[str] = None
    intermediate_choice: str = "given"
    probe: Optional[dict] = None
    stages: dict[str, StageStats] = field(default_factory=dict)
    rows_uncertified: int = 0
    rows_skipped: int = 0

    def __post_init__(self) -> None:
        for m in self.methods:
            self.stages.setdefault(m, StageStats(m))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["stages"] = {m: s.to_dict() for m, s in self.stages.items()}
        return out


class Pending:
    """Collects the rows a cheaper method leaves below zero; passes the others to ``worst``.

    It stands in for the engine's per-image tracker (same ``update(img, row, lb)``): rows
    whose lower margins ``lb`` ``(R, K - 1)`` all certify (``> 0``) are settled and go to ``worst``;
    the others are counted (``unsettled``) and, with ``keep``, kept for the next method
    (without ``keep`` they go to ``worst`` too: the chain ends here). ``kept`` ``(N, rows)``,
    when given, receives every row's smallest margin (rows, not location groups).
    """

    def __init__(self, worst, *, keep: bool = True, kept: Optional[torch.Tensor] = None) -> None:
        self.worst = worst
        self.keep = keep
        self.kept = kept
        self._img: list[torch.Tensor] = []
        self._row: list[torch.Tensor] = []
        self._lb: list[torch.Tensor] = []
        self.unsettled = 0

    def update(self, img: torch.Tensor, row: torch.Tensor, lb: torch.Tensor,
               grouped: Optional[torch.Tensor] = None) -> None:
        """``grouped`` ``(R,)``, when given, marks rows that bound a location group (they go to
        ``worst`` with it; only certifying rows may be grouped)."""
        if lb.numel() == 0:
            return
        if not torch.isfinite(lb).all():
            raise ModelError("auto_LiRPA returned NaN/infinite bounds; the model cannot be certified")
        row = row.to(img.device)
        low = lb.min(dim=1).values
        if self.kept is not None:
            self.kept[img.cpu(), row.cpu()] = low.cpu()
        bad = ~certifies(low)
        self.unsettled += int(bad.sum())
        if not self.keep:
            self.worst.update(img, row, lb, grouped=grouped)
            return
        self.worst.update(img[~bad], row[~bad], lb[~bad], grouped=None if grouped is None else grouped[~bad])
        self._img.append(img[bad])
        self._row.append(row[bad])
        self._lb.append(lb[bad])

    def leave(self, count: int) -> None:
        """Count ``count`` rows as not certified without bounds of their own (location groups
        whose bound shows they cannot lower their image's worst margin, at the end of a chain)."""
        self.unsettled += int(count)

    def rows(self, num_classes: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(img (P,), row (P,), lb (P, K - 1))`` of the pending rows."""
        if not self._img:
            empty = torch.zeros(0, dtype=torch.long, device=device)
            return empty, empty, torch.zeros(0, num_classes - 1, device=device)
        return torch.cat(self._img), torch.cat(self._row), torch.cat(self._lb)


def _order(img: torch.Tensor, lb: torch.Tensor, n_img: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The order rows go to the expensive methods, and each row's rank in its image.

    First every image's lowest-margin row (the one most likely to fail: an image that is
    not certified is usually settled by it), then image by image, lowest margin first.
    Rows of one image batch well (their unstable neurons mostly coincide).
    """
    low = lb.min(dim=1).values
    by_margin = torch.argsort(low, stable=True)
    by_image = by_margin[torch.argsort(img[by_margin], stable=True)]
    counts = torch.bincount(img, minlength=n_img)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(img)
    rank[by_image] = torch.arange(img.numel(), device=img.device) - starts[img[by_image]]
    first = by_image[rank[by_image] == 0]
    rest = by_image[rank[by_image] > 0]
    return torch.cat([first, rest]), rank


def refine(
    bounded,
    threat,
    images: torch.Tensor,
    labels: torch.Tensor,
    img: torch.Tensor,
    row: torch.Tensor,
    lb: torch.Tensor,
    *,
    stats: CascadeStats,
    num_classes: int,
    domain=None,
    intermediate: str = "auto",
    chunk: int,
    progress: Optional[Callable[[int, int], None]] = None,
) -> torch.Tensor:
    """Bound the pending rows with the rest of ``stats.methods``; their final lower margins ``(P, K - 1)``.

    Args:
        img, row, lb: the pending rows (image index into ``images``, row of the threat) and
            their IBP lower margins ``(P, K - 1)``, all with a class below zero.
        stats: filled in (rows, settled rows and seconds per method; the probe).
        intermediate: ``"auto"``, ``"crown"`` or ``"ibp"`` (see the module docstring).
        chunk: rows per CROWN call (alpha-CROWN takes :data:`ALPHA_ROWS_FACTOR` times fewer).
        progress: called with ``(rows_bounded, images_with_rows_left)`` after every chunk.

    Rows not refined (``stats.exhaustive`` False and their image already failed) keep ``lb``.
    """
    methods = stats.methods[1:]
    final = lb.clone()
    if not methods or img.numel() == 0:
        return final
    spec = margin_spec(labels, num_classes, dtype=images.dtype)
    n_img = images.shape[0]
    order, rank = _order(img, lb, n_img)
    failed = torch.zeros(n_img, dtype=torch.bool, device=img.device)
    refined = torch.zeros(img.numel(), dtype=torch.bool, device=img.device)
    alpha_chunk = max(1, chunk // ALPHA_ROWS_FACTOR)
    for m in methods:
        stats.stages[m].chunk = chunk if m == "crown" else alpha_chunk
    if intermediate != "auto":
        stats.intermediate, stats.intermediate_choice = intermediate, "given"
    else:
        stats.intermediate_choice = "auto"
    mode = None if intermediate == "auto" else intermediate

    def bound(method: str, sel: torch.Tensor, mode_: str) -> torch.Tensor:
        x, ptb = threat.rows_at(images, img[sel], row[sel], domain=domain)
        out = crown_margins(bounded, x, ptb, spec, img[sel], method=method, intermediate=mode_)
        if not torch.isfinite(out).all():
            raise ModelError("auto_LiRPA returned NaN/infinite bounds; the model cannot be certified")
        return out

    bounded_rows = 0

    def run(take: torch.Tensor) -> None:
        nonlocal mode, bounded_rows
        cur = final[take]
        for m in methods:
            need = torch.nonzero(~certifies(cur.min(dim=1).values)).flatten()
            if need.numel() == 0:
                break
            step = chunk if m == "crown" else alpha_chunk
            stage = stats.stages[m]
            for s in range(0, need.numel(), step):
                part = need[s: s + step]
                tick = time.perf_counter()
                if m == "crown" and mode is None:
                    new, mode = _probe(bound, take[part], cur[part], stats, threat.rows_per_image)
                else:
                    new = bound(m, take[part], mode or "crown")
                stage.seconds += time.perf_counter() - tick
                cur[part] = torch.maximum(cur[part], new.to(cur.dtype))
                stage.rows += part.numel()
                stage.settled += int(certifies(cur[part].min(dim=1).values).sum())
                bounded_rows += part.numel()
        final[take] = cur
        refined[take] = True
        failed[img[take[~certifies(cur.min(dim=1).values)]]] = True

    # the first round: every image's lowest row, batched across images
    first = order[rank[order] == 0]
    for s in range(0, first.numel(), chunk):
        run(first[s: s + chunk])
    # then image by image (the order keeps each image's rows together), lowest margin first
    rest = order[rank[order] > 0]
    rest_images = torch.unique(img[rest])
    left = int(rest_images.numel() if stats.exhaustive else (~failed[rest_images]).sum())
    if progress is not None:
        progress(bounded_rows, left)
    bounds = torch.nonzero(torch.diff(img[rest], prepend=img[rest][:1] - 1)).flatten().tolist() + [rest.numel()]
    for a, b in zip(bounds[:-1], bounds[1:]):
        image = int(img[rest[a]])
        if failed[image] and not stats.exhaustive:
            continue  # settled by its first row
        for s in range(a, b, chunk):
            run(rest[s: min(s + chunk, b)])
            if failed[image] and not stats.exhaustive:
                break
        left -= 1
        if progress is not None:
            progress(bounded_rows, left)
    stats.rows_uncertified = int((~certifies(final[refined].min(dim=1).values)).sum())
    stats.rows_skipped = int((~refined).sum())
    return final


def _probe(bound, sel: torch.Tensor, cur: torch.Tensor, stats: CascadeStats,
           rows_per_image: int) -> tuple[torch.Tensor, str]:
    """``intermediate="auto"``: bound rows ``sel`` with full CROWN; when that is too costly, with
    CROWN-IBP too, and choose. Returns the chosen bounds and mode."""
    tick = time.thread_time()
    crown = bound("crown", sel, "crown")
    per_row = (time.thread_time() - tick) / max(1, sel.numel())
    per_image = per_row * rows_per_image
    stats.probe = {"rows": int(sel.numel()), "crown_ms_per_row": round(1000 * per_row, 3),
                   "crown_seconds_per_image": round(per_image, 3), "crown_ibp_ms_per_row": None, "share": None}
    mode, out = "crown", crown
    if per_image > AUTO_SECONDS_PER_IMAGE:
        tick = time.thread_time()
        ibp = bound("crown", sel, "ibp")
        stats.probe["crown_ibp_ms_per_row"] = round(1000 * (time.thread_time() - tick) / max(1, sel.numel()), 3)
        base = cur.min(dim=1).values
        gain_c = float((torch.maximum(cur, crown).min(dim=1).values - base).mean())
        gain_i = float((torch.maximum(cur, ibp).min(dim=1).values - base).mean())
        share = gain_i / gain_c if gain_c > 0 else 1.0
        stats.probe["share"] = round(share, 3)
        if share >= AUTO_SHARE:
            mode, out = "ibp", ibp
    stats.intermediate = mode
    return out, mode
