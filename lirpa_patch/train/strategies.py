"""Location strategies for certified patch training (paper §4.2 and App. A.3).

A strategy turns a batch ``(N, C, H, W)`` into the *worst certified lower
margins* ``(N, K - 1)``: for every image and every other class ``j``, the
minimum over the locations it considers of the IBP lower bound of
``z_true - z_j``. The trainer's loss is the cross-entropy of
``-(worst margins)`` (eq. 12). Any object with :meth:`Strategy.worst_margins`
fits, so other threat models (e.g. a sparse-pixel bound) slot in the same way.

Every bound goes through auto_LiRPA's ``compute_bounds`` with the specification
merged into the last layer (:func:`lirpa_patch.engine.lower_margins`).

Strategies:

``all`` (eq. 11-12)
    Every location. Memory stays bounded: a gradient-free pass bounds every
    location in chunks of at most ``chunk_size`` rows and records, per (image,
    class), where the minimum is; a second pass re-bounds those ``K - 1``
    locations per image with gradients. The value and (sub)gradient are those of
    the minimum over all locations, since the gradient of a minimum is the
    gradient of its minimiser.
``random`` (eq. 13-14)
    ``k`` locations per image, uniformly, without replacement.
``guided`` (eq. 15-18)
    A U-net predicts the lower margin of every location for every class; ``k``
    locations per image, spread over the other classes, are drawn without
    replacement from ``softmax(-prediction / T)`` of each class's map (the
    paper's Guided(k): Guided(10) bounds 10 locations per image, like
    Random(10)). The U-net is trained with the MSE between its predictions and
    the actual bounds at the sampled locations only (eq. 17).
    ``guided-per-label`` draws ``k`` locations for every other class instead
    (``k (K - 1)`` per image).
``pool`` (App. A.3, bound pooling)
    Every location, but after chosen ReLU layers the intervals of adjacent
    locations (``p x p`` blocks of the location grid) are merged (elementwise
    min of lower bounds, max of upper bounds) so later layers bound fewer rows.
    Each network segment is bounded by ``compute_bounds`` (IBP), the last one
    with the specification. Sound: a merged box contains every box it merges.
    Two passes like ``all``: every location without gradients, then only each
    image's worst cells (a block of ``p x p`` locations each) with gradients.

Whenever a strategy bounds more than ``2 (K - 1)`` locations per image (``all``,
large ``random``/``guided``), it uses the two-pass scheme of ``all``; below that
it back-propagates through every bound directly. (Both passes must see the same
function: models whose training-mode forward is random or stateful, such as
dropout or BatchNorm, should not be trained with the two-pass scheme.)
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import ClassVar, Optional, Sequence

import torch
from auto_LiRPA import BoundedModule, BoundedTensor
from auto_LiRPA.perturbations import PerturbationLpNorm
from torch import nn
from torch.nn import functional as F

from .. import choices
from .._messages import quiet
from ..building import bound_model
from ..margins import lower_margins, threat_margins
from ..head import head_of, merge_head
from ..domain import PixelDomain
from ..errors import UsageError
from ..locations import Locations
from ..threats.base import Threat
from ..threats.patch import PatchPerturbation
from ..spec import margin_spec, other_classes
from .unet import MarginUNet

STRATEGY_NAMES: tuple[str, ...] = choices.STRATEGIES
"""Names accepted by :func:`make_strategy`."""


@dataclass
class BoundContext:
    """What a strategy bounds: built once by the trainer.

    Attributes:
        model: maps images ``(N, C, H, W)`` in the pixel domain to logits ``(N, K)``.
        bounded: auto_LiRPA ``BoundedModule`` of ``model`` (shares its parameters).
        locations: every patch location; ``masks`` ``(L, H, W)`` on ``device``.
        num_classes: ``K``.
        image_shape: ``(C, H, W)``.
        device: where the bounds are computed.
        chunk_size: most (image, location) rows per ``compute_bounds`` call.
        domain: pixel domain of the images (None: ``[0, 1]``).
    """

    model: nn.Module
    bounded: BoundedModule
    locations: Locations
    num_classes: int
    image_shape: tuple[int, int, int]
    device: torch.device
    chunk_size: int = 4096
    domain: Optional[PixelDomain] = None


@dataclass
class Margins:
    """What :meth:`Strategy.worst_margins` returns for a batch of ``N`` images.

    Attributes:
        worst: ``(N, K - 1)`` worst lower margins (differentiable), other classes
            in increasing order (:func:`~lirpa_patch.spec.other_classes`).
        aux_loss: a scalar the trainer adds to the loss (the U-net's MSE), or None.
        rows: number of (image, location) rows bounded.
        stats: scalar diagnostics to average over the epoch (e.g. ``unet_mse``).
    """

    worst: torch.Tensor
    aux_loss: Optional[torch.Tensor] = None
    rows: int = 0
    stats: dict[str, float] = field(default_factory=dict)


class Strategy(abc.ABC):
    """Produces the worst certified lower margins ``(N, K - 1)`` of a batch.

    The trainer calls :meth:`setup` once, then :meth:`worst_margins` per
    (micro-)batch. A strategy with a trainable helper (the U-net) exposes it as
    :attr:`auxiliary`; the trainer optimises it with its own Adam, on the same
    learning-rate schedule, and checkpoints it.
    """

    name: ClassVar[str] = "strategy"

    def setup(self, ctx: BoundContext) -> None:
        """Bind to a model. Called once, before any :meth:`worst_margins`."""
        self.ctx = ctx

    @abc.abstractmethod
    def worst_margins(
        self, images: torch.Tensor, labels: torch.Tensor, *, strength: float, generator: torch.Generator
    ) -> Margins:
        """Worst lower margins of ``images`` ``(N, C, H, W)`` with ``labels`` ``(N,)``.

        ``strength`` in ``[0, 1]`` scales the patch interval (warm-up); every random
        draw comes from ``generator`` (a CPU generator), so runs repeat exactly.
        """

    def grad_rows_per_image(self) -> int:
        """Rows per image that hold an autograd graph (the trainer sizes micro-batches by it)."""
        return self.ctx.num_classes - 1

    @property
    def auxiliary(self) -> Optional[nn.Module]:
        """A module trained alongside the classifier, or None."""
        return None

    def describe(self) -> str:
        return self.name


# --------------------------------------------------------------------------- shared bounding


def _reselect_threshold(num_classes: int) -> int:
    return 2 * (num_classes - 1)


def _bound_rows(
    ctx: BoundContext, images: torch.Tensor, labels: torch.Tensor, loc_idx: torch.Tensor, strength: float
) -> torch.Tensor:
    """Lower margins ``(n, r, K - 1)`` of images ``(n, ...)`` at locations ``loc_idx`` ``(n, r)`` or ``(r,)``."""
    return lower_margins(
        ctx.bounded, images, labels, locations=ctx.locations, index=loc_idx, num_classes=ctx.num_classes,
        method="ibp", domain=ctx.domain, strength=strength,
    )


def _bound_all_chunked(
    ctx: BoundContext, images: torch.Tensor, labels: torch.Tensor, loc_idx: Optional[torch.Tensor], strength: float,
    *, keep: bool,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Gradient-free bounds at many locations, in chunks of at most ``ctx.chunk_size`` rows.

    Args:
        loc_idx: ``(N, R)`` location indices per image, or None for every location.
        keep: also return every bound ``(N, R, K - 1)`` (else None).

    Returns:
        ``(value, where, bounds)``: per (image, class) the minimum ``(N, K - 1)``,
        the location index attaining it ``(N, K - 1)``, and the bounds if kept.
    """
    n = images.shape[0]
    k1 = ctx.num_classes - 1
    n_rows = len(ctx.locations) if loc_idx is None else loc_idx.shape[1]
    loc_chunk = max(1, min(n_rows, ctx.chunk_size))
    img_chunk = max(1, ctx.chunk_size // loc_chunk)
    value = torch.full((n, k1), float("inf"), device=images.device)
    where = torch.zeros((n, k1), dtype=torch.long, device=images.device)
    kept = torch.empty((n, n_rows, k1), device=images.device) if keep else None
    with torch.no_grad():
        for i in range(0, n, img_chunk):
            rows = slice(i, min(n, i + img_chunk))
            for j in range(0, n_rows, loc_chunk):
                cols = slice(j, min(n_rows, j + loc_chunk))
                if loc_idx is None:  # the same locations for every image: one shared index
                    shared = torch.arange(cols.start, cols.stop, device=images.device)
                    idx = shared.expand(rows.stop - rows.start, -1)
                else:
                    idx = shared = loc_idx[rows, cols]
                lb = _bound_rows(ctx, images[rows], labels[rows], shared, strength)  # (b, l, K-1)
                if kept is not None:
                    kept[rows, cols] = lb
                v, arg = lb.min(dim=1)  # (b, K-1)
                better = v < value[rows]
                value[rows] = torch.where(better, v, value[rows])
                where[rows] = torch.where(better, idx.gather(1, arg), where[rows])
    return value, where, kept


def _worst_at(
    ctx: BoundContext, images: torch.Tensor, labels: torch.Tensor, loc_idx: Optional[torch.Tensor], strength: float,
    *, keep: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor], int]:
    """Worst lower margins ``(N, K - 1)`` over locations ``loc_idx`` ``(N, R)`` (None: all).

    Returns ``(worst, bounds, rows)``: ``bounds`` ``(N, R, K - 1)`` detached when
    ``keep`` (else None), ``rows`` the number of rows bounded.
    """
    n = images.shape[0]
    k1 = ctx.num_classes - 1
    n_rows = len(ctx.locations) if loc_idx is None else loc_idx.shape[1]
    if n_rows <= _reselect_threshold(ctx.num_classes) and torch.is_grad_enabled():
        if loc_idx is None:
            loc_idx = torch.arange(n_rows, device=images.device).expand(n, -1)
        lb = _bound_rows(ctx, images, labels, loc_idx, strength)  # (N, R, K-1)
        return lb.min(dim=1).values, (lb.detach() if keep else None), n * n_rows
    value, where, kept = _bound_all_chunked(ctx, images, labels, loc_idx, strength, keep=keep)
    if not torch.is_grad_enabled():
        return value, kept, n * n_rows
    lb = _bound_rows(ctx, images, labels, where, strength)  # (N, K-1 locations, K-1 classes)
    worst = lb.diagonal(dim1=1, dim2=2)  # class j at its own worst location
    return worst, kept, n * (n_rows + k1)


def _topk_without_replacement(logits: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Sample ``k`` indices without replacement from ``softmax(logits)`` along the last dim (Gumbel top-k)."""
    u = torch.rand(logits.shape, generator=generator).clamp_(1e-12, 1.0 - 1e-7).to(logits.device)
    gumbel = -torch.log(-torch.log(u))
    return (logits + gumbel).topk(k, dim=-1).indices


# --------------------------------------------------------------------------- strategies


class AllLocations(Strategy):
    """Every location (eq. 11-12), bounded in chunks; see the module docstring."""

    name = "all"

    def worst_margins(self, images, labels, *, strength, generator):
        worst, _, rows = _worst_at(self.ctx, images, labels, None, strength)
        return Margins(worst=worst, rows=rows)


class EveryRow(Strategy):
    """Every row of ``threat`` (any :class:`~lirpa_patch.threats.base.Threat`) bounded, the worst kept:
    the strategy of a threat whose rows are not places on the image (the sparse threat's one
    row per image, a threat of your own)."""

    name = "every-row"

    def __init__(self, threat: Threat) -> None:
        self.threat = threat

    def setup(self, ctx: BoundContext) -> None:
        super().setup(ctx)
        self.threat.prepare(ctx.image_shape[1:])

    def grad_rows_per_image(self) -> int:
        return self.threat.rows_per_image

    def worst_margins(self, images, labels, *, strength, generator):
        lb = threat_margins(self.ctx.bounded, self.threat, images, labels, slice(None),
                            num_classes=self.ctx.num_classes, method="ibp", domain=self.ctx.domain,
                            strength=strength)  # (N, r, K - 1)
        return Margins(worst=lb.min(dim=1).values, rows=images.shape[0] * lb.shape[1])

    def describe(self) -> str:
        return f"every row of {self.threat.label}"


class RandomLocations(Strategy):
    """``k`` uniformly random locations per image, without replacement (eq. 13-14).

    Args:
        k: locations per image (capped at the number of locations).
    """

    name = "random"

    def __init__(self, k: int = 10) -> None:
        if k < 1:
            raise UsageError(f"patches must be at least 1, got {k}", param="patches")
        self.k = int(k)

    def _k(self) -> int:
        return min(self.k, len(self.ctx.locations))

    def grad_rows_per_image(self) -> int:
        k1 = self.ctx.num_classes - 1
        return self._k() if self._k() <= _reselect_threshold(self.ctx.num_classes) else k1

    def worst_margins(self, images, labels, *, strength, generator):
        n, n_loc = images.shape[0], len(self.ctx.locations)
        idx = torch.rand(n, n_loc, generator=generator).topk(self._k(), dim=1).indices.to(images.device)
        worst, _, rows = _worst_at(self.ctx, images, labels, idx, strength)
        return Margins(worst=worst, rows=rows)

    def describe(self) -> str:
        return f"random({self.k})"


class GuidedLocations(Strategy):
    """U-net guided sampling (eq. 15-18): ``k`` locations per image, spread over the labels.

    The paper's Guided(k) samples ``k / K`` locations per label from ``softmax(-prediction / T)``
    of the U-net's map for that label (its Guided(10) on 10 classes bounds 10 locations per
    image, comparable to Random(10)). The true class's margin is 0 by definition, so here the
    ``k`` locations go to the ``K - 1`` other classes: ``k // (K - 1)`` each, and the
    ``k % (K - 1)`` left over to the classes whose predicted worst margin is smallest.

    Args:
        k: locations per image (the paper's Guided(k)).
        temperature: ``T`` of ``softmax(-prediction / T)``; larger is closer to uniform.
        base_width: channels of the U-net's first level.
        per_label: the other reading of Guided(k), ``k`` locations for *every* other class
            (``k (K - 1)`` per image; lirpa-patch 0.1's ``guided``), strategy name
            ``guided-per-label``.
    """

    name = "guided"

    def __init__(self, k: int = 10, *, temperature: float = 1.0, base_width: int = 16, per_label: bool = False) -> None:
        if k < 1:
            raise UsageError(f"patches must be at least 1, got {k}", param="patches")
        if not temperature > 0:
            raise UsageError(f"temperature must be positive, got {temperature}", param="temperature")
        self.k = int(k)
        self.temperature = float(temperature)
        self.base_width = int(base_width)
        self.per_label = bool(per_label)
        self.unet: Optional[MarginUNet] = None
        if per_label:
            self.name = "guided-per-label"

    def setup(self, ctx: BoundContext) -> None:
        super().setup(ctx)
        self.unet = MarginUNet(
            ctx.image_shape[0], ctx.num_classes, variants=len(ctx.locations.shape.variants), base_width=self.base_width
        ).to(ctx.device)

    @property
    def auxiliary(self) -> Optional[nn.Module]:
        return self.unet

    def rows_per_image(self) -> int:
        """Locations bounded per image."""
        k1, n_loc = self.ctx.num_classes - 1, len(self.ctx.locations)
        if self.per_label:
            return min(self.k, n_loc) * k1
        return min(self.k, n_loc * k1)

    def grad_rows_per_image(self) -> int:
        rows = self.rows_per_image()
        return rows if rows <= _reselect_threshold(self.ctx.num_classes) else self.ctx.num_classes - 1

    def _sample(self, pred: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Location indices ``(N, rows_per_image)`` from predicted margins ``pred`` ``(N, L, K - 1)``."""
        n, n_loc, k1 = pred.shape
        logits = (-pred.detach() / self.temperature).transpose(1, 2)  # (N, K-1, L)
        if self.per_label:
            return _topk_without_replacement(logits, min(self.k, n_loc), generator).reshape(n, -1)
        total = self.rows_per_image()
        base, extra = divmod(total, k1)
        most = min(n_loc, base + (1 if extra else 0))
        drawn = _topk_without_replacement(logits, most, generator)  # (N, K-1, most)
        # classes ranked by predicted worst margin: the first `extra` get one more location
        rank = torch.argsort(torch.argsort(pred.detach().amin(dim=1), dim=1), dim=1)  # (N, K-1)
        count = base + (rank < extra).long()  # (N, K-1), sums to `total` per image
        keep = torch.arange(most, device=pred.device).view(1, 1, most) < count.unsqueeze(2)
        return drawn[keep].view(n, total)  # row-major: per image, class by class

    def worst_margins(self, images, labels, *, strength, generator):
        assert self.unet is not None, "setup() first"
        n, k1 = images.shape[0], self.ctx.num_classes - 1
        scores = self.unet.location_scores(images, self.ctx.locations)  # (N, L, K)
        others = other_classes(labels, self.ctx.num_classes)  # (N, K-1)
        pred = scores.gather(2, others[:, None, :].expand(n, scores.shape[1], k1))  # (N, L, K-1)
        idx = self._sample(pred, generator)  # (N, R)
        worst, actual, rows = _worst_at(self.ctx, images, labels, idx, strength, keep=True)
        sampled = pred.gather(1, idx[:, :, None].expand(n, idx.shape[1], k1))  # (N, R, K-1)
        mse = F.mse_loss(sampled, actual)
        return Margins(worst=worst, aux_loss=mse, rows=rows, stats={"unet_mse": float(mse.detach())})

    def describe(self) -> str:
        return f"{self.name}({self.k}, T={self.temperature:g})"


class _Preprocess(nn.Module):
    """The ``preprocess`` of an ImageModel-like wrapper as a module (identity without one)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.preprocess(x)


def _sequential_parts(model: nn.Module) -> tuple[Optional[nn.Module], nn.Sequential]:
    if isinstance(model, nn.Sequential):
        return None, model
    net = getattr(model, "net", None)
    if isinstance(net, nn.Sequential) and hasattr(model, "preprocess"):
        return _Preprocess(model), net
    raise UsageError(
        "strategy pool needs an nn.Sequential model (or an ImageModel wrapping one), "
        f"got {type(model).__name__}", param="strategy"
    )


class PooledLocations(Strategy):
    """Bound pooling (App. A.3): all locations, adjacent intervals merged after chosen ReLUs.

    Args:
        pool: ``pool[i]`` is the window ``p`` (a ``p x p`` block of adjacent
            locations) merged after the ``(i + 1)``-th ReLU of the network; 1 means
            no merging there. The paper's ``[2, 1, 2]`` merges 2x2 blocks after the
            first and again after the third ReLU. Empty (the default): 2x2 blocks after
            the last ReLU before the first linear layer, i.e. after the convolutions
            (after the first ReLU of an MLP). The engine bounds convolutions on the
            window a patch reaches, so merging pays off where the dense layers begin.
    """

    name = "pool"

    def __init__(self, pool: Sequence[int] = ()) -> None:
        pool = tuple(int(p) for p in pool)
        if any(p < 1 for p in pool):
            raise UsageError(f"pool needs positive window sizes, got {pool}", param="pool")
        self.pool = pool

    def setup(self, ctx: BoundContext) -> None:
        super().setup(ctx)
        if len(ctx.locations.shape.variants) != 1:
            raise UsageError("strategy pool needs a single-variant shape (its locations form a grid)",
                             param="strategy", related=("shape",))
        prefix, net = _sequential_parts(ctx.model)
        relus = [i for i, m in enumerate(net) if isinstance(m, nn.ReLU)]
        if not relus:
            raise UsageError("strategy pool needs a network with a ReLU layer", param="strategy")
        if not self.pool:
            linear = next((i for i, m in enumerate(net) if isinstance(m, nn.Linear)), len(net))
            before = [r for r in relus if r < linear]
            self.pool = (1,) * (len(before) - 1) + (2,) if before else (2,)
        if len(relus) < len(self.pool):
            raise UsageError(f"pool has {len(self.pool)} entries but the network has only {len(relus)} ReLU layers",
                             param="pool")
        cuts = [relus[i] + 1 for i, p in enumerate(self.pool) if p > 1]
        bounds = [0, *cuts, len(net)]
        segments = [nn.Sequential(*net[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        if prefix is not None:
            segments[0] = nn.Sequential(prefix, *segments[0])
        self.windows = [p for p in self.pool if p > 1]
        v = ctx.locations.shape.variants[0]
        height, width = ctx.locations.image_size
        self.grid = (height - v.shape[0] + 1, width - v.shape[1] + 1)
        self.segments = segments
        x = torch.zeros(1, *ctx.image_shape, device=ctx.device)
        self.bounded_segments: list[BoundedModule] = []
        for seg in segments:
            self.bounded_segments.append(bound_model(seg, x.shape[1:], ctx.device))
            with torch.no_grad():
                x = seg(x)
        # the engine's patch fast path for the first segment: the box of every row stays
        # virtual (never built) when every consumer of the input is a plugin operator; rows
        # pick their locations from the location set (its pixel tables are computed once)
        head_of(self.bounded_segments[0])
        self._virtual = bool(getattr(self.bounded_segments[0], "_lp_virtual_ready", False))
        self._all = torch.arange(len(ctx.locations), device=ctx.device)

    @property
    def span(self) -> int:
        """Side, in locations, of the block of the location grid that one final cell covers."""
        out = 1
        for w in self.windows:
            out *= w
        return out

    def grad_rows_per_image(self) -> int:
        return (self.ctx.num_classes - 1) * self.span * self.span

    def _pooled(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, grid: tuple[int, int],
                strength: float) -> torch.Tensor:
        """Pooled lower margins ``(n, G, K - 1)`` of images ``(n, ...)`` over a grid of locations.

        ``index`` holds the ``gh x gw`` grid's location numbers in row-major order, ``(gh*gw,)``
        shared by the images or ``(n, gh*gw)`` per image. A ``p x p`` block of grid cells is
        merged after each pooling ReLU (``ceil_mode``: partial blocks at the border merge
        fewer), so ``G`` is the number of final cells.
        """
        ctx = self.ctx
        n = images.shape[0]
        gh, gw = grid
        ptb = PatchPerturbation(locations=ctx.locations, index=index, domain=ctx.domain, strength=strength)
        ptb.virtual = self._virtual
        x = BoundedTensor(ptb.rows_for(images), ptb)
        try:
            with quiet():
                for seg, window in zip(self.bounded_segments[:-1], self.windows):
                    lb, ub = seg.compute_bounds(x=(x,), method="IBP")
                    ptb._lp_states = {}  # per-call descriptions hold autograd graphs: drop them
                    feat = lb.shape[1:]
                    lb, ub, (gh, gw) = self._merge(lb, ub, n, gh, gw, window)
                    lb, ub = lb.reshape(-1, *feat), ub.reshape(-1, *feat)
                    x = BoundedTensor((lb + ub) / 2, PerturbationLpNorm(norm=float("inf"), x_L=lb, x_U=ub))
                # the specification merged into the last linear layer once per image, as the engine does
                last = self.bounded_segments[-1]
                head = head_of(last)
                lower, upper = last.compute_bounds(x=(x,), method="IBP", final_node_name=head.node)
                spec = margin_spec(labels, ctx.num_classes, dtype=images.dtype)  # (n, K-1, K)
                row_img = torch.arange(n, device=images.device).repeat_interleave(gh * gw)
                lb = merge_head(head, spec, lower, upper, None, None, row_img)
        finally:
            ptb._lp_states = {}
        return lb.reshape(n, gh * gw, ctx.num_classes - 1)

    def worst_margins(self, images, labels, *, strength, generator):
        """Two passes, as ``all``: find each (image, class)'s worst final cell without gradients
        (every location, in chunks of whole images), then re-bound only those cells (each a
        ``span x span`` block of locations, shared between classes) with gradients. Value and
        (sub)gradient are those of the minimum over all pooled cells."""
        ctx = self.ctx
        n, n_loc = images.shape[0], len(ctx.locations)
        gh, gw = self.grid
        per_call = max(1, ctx.chunk_size // n_loc)
        values, cells = [], []
        with torch.no_grad():
            for i in range(0, n, per_call):
                b = min(n, i + per_call) - i
                lb = self._pooled(images[i : i + b], labels[i : i + b], self._all, self.grid, strength)
                v, c = lb.min(dim=1)  # (b, K-1)
                values.append(v)
                cells.append(c)
        value, cell = torch.cat(values), torch.cat(cells)  # (N, K-1)
        rows = n * n_loc
        if not torch.is_grad_enabled():
            return Margins(worst=value, rows=rows)
        # re-bound each distinct (image, worst cell) with gradients
        final_w = -(-gw // self.span)
        key = torch.arange(n, device=images.device)[:, None] * (n_loc + 1) + cell
        unique, inverse = torch.unique(key, return_inverse=True)
        img, c = unique // (n_loc + 1), unique % (n_loc + 1)
        cy, cx = c // final_w, c % final_w
        offsets = torch.arange(self.span, device=images.device)
        ys = (cy[:, None] * self.span + offsets).clamp(max=gh - 1)  # (U, span); repeats at the border
        xs = (cx[:, None] * self.span + offsets).clamp(max=gw - 1)
        blocks = (ys[:, :, None] * gw + xs[:, None, :]).reshape(unique.numel(), -1)  # (U, span*span) locations
        lb = self._pooled(images[img], labels[img], blocks, (self.span, self.span), strength)[:, 0]  # (U, K-1)
        worst = lb[inverse, torch.arange(ctx.num_classes - 1, device=images.device).expand(n, -1)]
        return Margins(worst=worst, rows=rows + unique.numel() * self.span * self.span)

    @staticmethod
    def _merge(lb: torch.Tensor, ub: torch.Tensor, n: int, gh: int, gw: int, window: int):
        """Merge ``window x window`` blocks of the location grid: ``(n*gh*gw, *F)`` -> ``(n, gh', gw', F)``."""
        flat = lb.reshape(n, gh, gw, -1).permute(0, 3, 1, 2)  # (n, F, gh, gw)
        lo = -F.max_pool2d(-flat, window, ceil_mode=True)
        hi = F.max_pool2d(ub.reshape(n, gh, gw, -1).permute(0, 3, 1, 2), window, ceil_mode=True)
        new = (lo.shape[2], lo.shape[3])
        return lo.permute(0, 2, 3, 1), hi.permute(0, 2, 3, 1), new

    def describe(self) -> str:
        return f"pool({','.join(map(str, self.pool)) or 'auto'})"


def make_strategy(
    name: str,
    *,
    patches: int = 10,
    temperature: float = 1.0,
    pool: Sequence[int] = (),
    unet_width: int = 16,
) -> Strategy:
    """Build a strategy by name: ``all``, ``random``, ``guided`` or ``pool`` (see the module docstring)."""
    key = str(name).strip().lower()
    if key == "all":
        return AllLocations()
    if key == "random":
        return RandomLocations(patches)
    if key in ("guided", "guided-per-label"):
        return GuidedLocations(patches, temperature=temperature, base_width=unet_width,
                               per_label=key == "guided-per-label")
    if key == "pool":
        return PooledLocations(pool)
    raise UsageError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGY_NAMES)}", param="strategy")


def strategy_for(threat: Threat, config) -> Strategy:
    """The strategy a :class:`~lirpa_patch.train.Trainer` with ``config`` trains against ``threat`` with
    (prepared for the image size): ``config.strategy`` over its locations when its rows are
    places on the image (:attr:`~lirpa_patch.threats.base.Threat.location_set`), else :class:`EveryRow`."""
    if threat.location_set is None:
        return EveryRow(threat)
    return make_strategy(config.strategy, patches=config.patches, temperature=config.temperature, pool=config.pool,
                         unet_width=config.unet_width)
