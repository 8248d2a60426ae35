"""Plugin bound operators that carry the sparse (k-pixel) threat model through auto_LiRPA's graph.

:class:`~lirpa_patch.sparse.SparsePerturbation` is, to stock auto_LiRPA, a box
(every pixel anywhere in its valid range), so every operator bounds it soundly.
The operators here make the first layer that mixes pixels (Gemm/Linear, MatMul,
Conv) *exact* over the sparse set instead.

How the description travels (IBP)
---------------------------------
Every intermediate tensor between the model input and the first mixing layer is,
element by element, an affine function of a single input element (its *source*).
For such a tensor we keep a :class:`SparseState`:

* ``x``: the clean value of every element;
* ``m_lo``, ``m_hi``: how much the element changes when its source moves to the
  low / high end of its own valid range (signs follow the affine chain);
* ``src``: the source of every element, as ``n * D + e`` (image ``n``, element
  ``e`` of the flattened input), so batch mixing is detectable.

The state is registered on the root perturbation, keyed by the *identity* of the
interval's lower-bound tensor; it is found again only when the very same tensors
arrive at a plugin operator. Any stock operator in between builds new tensors, so
its output carries no state and the next plugin operator falls back to its parent
class (the sound box bound). States never outlive one ``compute_bounds`` call:
:meth:`SparsePerturbation.init` clears them.

* Elementwise ``Sub``/``Add``/``Mul``/``Div``/``Neg`` with a constant operand scale
  ``m_lo``/``m_hi`` and broadcast ``src``.
* Shape ops ``Reshape``/``Flatten``/``Transpose``/``Unsqueeze``/``Squeeze`` apply
  their own ``forward`` to every state tensor.
* Mixing ops compute, for every output and every pixel, the largest gain (and
  loss) that moving the pixel's channels to the ends of their own range can cause,
  sum the ``k`` largest per output (``torch.topk``; convolutions work on
  ``F.unfold`` columns, in memory-bounded blocks) and return a plain box, so later
  layers use ordinary IBP. The top-k has a hand-written backward that only visits
  the selected entries (training cost stays close to the forward pass).

A first mixing layer that receives the sparse input *without* a description (a
ReLU, a pooling, ... in front of it) uses its stock box bound and warns once
(:class:`SparseFallbackWarning`; reason in :func:`plugin_report`). Not when CROWN
merely asks IBP for reference bounds: CROWN's own bounds come from
``SparsePerturbation.concretize``, the same top-k rule on its linear coefficients.

Registration
------------
:func:`register` (called when :mod:`lirpa_patch.sparse` is imported) puts factory
functions into auto_LiRPA's ``bound_op_map`` for the ONNX ops above;
:func:`custom_ops` returns the same mapping for ``BoundedModule(custom_ops=...)``.
A factory returns a plugin class only for a node on a path from the model input
to the first mixing layers (and, for binary ops, only when the other operand is
constant); every other node gets the stock class. Plugin classes subclass the
stock ones and defer to them whenever the input carries no sparse state, so
bounds for every other perturbation are unchanged. A BoundedModule built *before*
registration has stock operators only: under IBP the sparse perturbation is then
bounded as a (sound, looser) box there, and :class:`SparseFallbackWarning` says so.

Compatibility: written against the public operator classes of auto_LiRPA 0.3 and
0.7.x. In 0.7.x stock ``BoundDiv`` is a stub that a graph pass rewrites into
``Mul``/``Reciprocal``; our ``Div`` (used only for constant divisors) therefore
implements IBP, backward and forward bounds itself there.
"""

from __future__ import annotations

import sys
import warnings
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from auto_LiRPA import bound_ops as _ops
from auto_LiRPA.bound_op_map import bound_op_map
from auto_LiRPA.operators.base import Interval

__all__ = [
    "SparseFallbackWarning",
    "SparseState",
    "custom_ops",
    "stock_ops",
    "register",
    "unregister",
    "is_registered",
    "plugin_report",
]

# Elements per intermediate tensor in the top-k computation (~16 MB in float32).
BLOCK_ELEMENTS = 1 << 22


class SparseFallbackWarning(UserWarning):
    """The sparse rule could not be applied at a first mixing layer; a box bound is used there."""


class SparseState:
    """Per-element description of a tensor that is an affine function of single input elements."""

    __slots__ = ("x", "m_lo", "m_hi", "src", "lower", "upper")

    def __init__(self, x, m_lo, m_hi, src, lower, upper):
        self.x, self.m_lo, self.m_hi, self.src = x, m_lo, m_hi, src
        self.lower, self.upper = lower, upper


# ---------------------------------------------------------------------------- state plumbing
def state_of(v):
    """``(state, root_perturbation)`` carried by interval ``v``, or ``(None, None)``."""
    if not isinstance(v, Interval):
        return None, None
    ptb = getattr(v, "ptb", None)
    states = getattr(ptb, "_sparse_states", None)
    if not states:
        return None, None
    st = states.get(id(v[0]))
    if st is None or st.lower is not v[0] or st.upper is not v[1]:
        return None, None
    return st, ptb


def emit(ptb, lower, upper, x, m_lo, m_hi, src) -> Interval:
    """Wrap a box in an Interval whose sparse state is registered on ``ptb``."""
    if lower is upper:  # never share: the state is keyed by the lower tensor
        upper = upper.clone()
    ptb._sparse_states[id(lower)] = SparseState(x, m_lo, m_hi, src, lower, upper)
    return Interval(lower, upper, ptb=ptb)


def _local_sources(st: SparseState, ptb) -> Optional[torch.Tensor]:
    """Sample-independent source ids (shape of one sample), or None if the graph mixed samples."""
    src = st.src
    n, numel = src.shape[0], int(ptb._sparse_numel)
    if n != ptb._sparse_batch:
        return None
    base = src[:1]
    if int(base.min()) < 0 or int(base.max()) >= numel:
        return None
    offsets = (torch.arange(n, device=src.device) * numel).view(n, *([1] * (src.dim() - 1)))
    if not torch.equal(src, base + offsets):
        return None
    return base[0]


# ---------------------------------------------------------------------------- graph structure
def _mixing_types() -> tuple:
    names = ("BoundLinear", "BoundConv", "BoundConvTranspose")
    return tuple(getattr(_ops, n) for n in names if hasattr(_ops, n))


def _is_data_input(node) -> bool:
    return isinstance(node, _ops.BoundInput) and not isinstance(node, (_ops.BoundParams, _ops.BoundBuffers))


def _reaches_input(node) -> bool:
    """Whether ``node`` depends on a model input (is not a constant)."""
    memo = node.__dict__.get("_lp_reaches_input")
    if memo is None:
        if isinstance(node, _ops.BoundShape) or getattr(node, "never_perturbed", False):
            memo = False  # a tensor's shape does not depend on its values
        else:
            memo = _is_data_input(node) or any(_reaches_input(i) for i in getattr(node, "inputs", []) or [])
        node.__dict__["_lp_reaches_input"] = memo
    return memo


def _before_mixing(node) -> bool:
    """Whether some path from a model input to ``node`` crosses no pixel-mixing layer."""
    memo = node.__dict__.get("_lp_before_mixing")
    if memo is None:
        if _is_data_input(node):
            memo = True
        elif isinstance(node, _mixing_types()) or not _reaches_input(node):
            memo = False  # mixes pixels, or a constant (e.g. shape arithmetic)
        else:
            memo = any(_before_mixing(i) for i in getattr(node, "inputs", []) or [])
        node.__dict__["_lp_before_mixing"] = memo
    return memo


def _path_ops(node) -> list[str]:
    """Names of the non-plugin operators between the model input and ``node`` (for messages)."""
    out: list[str] = []
    seen: set[int] = set()
    stack = [i for i in node.inputs if _before_mixing(i)]
    while stack:
        n = stack.pop()
        if id(n) in seen or _is_data_input(n):
            continue
        seen.add(id(n))
        if not isinstance(n, _Plugin):
            out.append(type(n).__name__)
        stack.extend(i for i in n.inputs if _before_mixing(i))
    return sorted(set(out))


# ---------------------------------------------------------------------------- plugin base
class _Plugin:
    """Marker base of every plugin operator."""

    def _sparse_fallback(self, reason: str) -> None:
        """Record (and warn once per node) that the sparse rule was not applied here.

        Not when CROWN merely asks IBP for reference bounds of an intermediate layer
        (its own bounds come from :meth:`SparsePerturbation.concretize`, over the sparse set).
        """
        if _inside_crown_intermediate():
            return
        self.__dict__["sparse_fallback_reason"] = reason
        if not self.__dict__.get("_lp_warned"):
            self.__dict__["_lp_warned"] = True
            warnings.warn(
                f"SparsePerturbation: cannot apply the k-pixel rule at {type(self).__name__[6:]} node "
                f"{getattr(self, 'name', '?')} ({reason}); using a sound but looser box bound there",
                SparseFallbackWarning,
                stacklevel=3,
            )

    def _check_sparse_root(self, v, indices) -> None:
        """At a first mixing layer whose input carries no description: warn if the input is sparse."""
        if not any(i < len(v) and self.is_input_perturbed(i) for i in indices):
            return
        if any(getattr(getattr(r, "perturbation", None), "_sparse_states", None) is not None
               for r in _data_roots(self)):
            ops = _path_ops(self)
            self._sparse_fallback(f"the input passes through {', '.join(ops)}" if ops else "unsupported input")


def _inside_crown_intermediate(depth: int = 40) -> bool:
    """Whether auto_LiRPA's CROWN is computing intermediate bounds up the call stack."""
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_code.co_name == "compute_intermediate_bounds":
            return True
        frame = frame.f_back
    return False


def _data_roots(node) -> list:
    roots, seen, stack = [], set(), list(node.inputs)
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if _is_data_input(n):
            roots.append(n)
        elif not isinstance(n, _mixing_types()):
            stack.extend(n.inputs)
    return roots


# ---------------------------------------------------------------------------- elementwise ops
def _as_tensor(c, like: torch.Tensor) -> torch.Tensor:
    if torch.is_tensor(c):
        return c.to(dtype=like.dtype) if c.dtype != like.dtype and c.is_floating_point() else c
    return torch.as_tensor(c, dtype=like.dtype, device=like.device)


class _Elementwise(_Plugin):
    _kind = ""

    def _box(self, *v):
        return super().interval_propagate(*v)

    def interval_propagate(self, *v):
        out = self._sparse_elementwise(v)
        return out if out is not None else self._box(*v)

    def _sparse_elementwise(self, v):
        if self._kind == "neg":
            st, ptb = state_of(v[0])
            if st is None:
                return None
            scale, x_new = -1.0, self.forward(st.x)
        else:
            if len(v) != 2:
                return None
            (s0, p0), (s1, p1) = state_of(v[0]), state_of(v[1])
            if (s0 is None) == (s1 is None):
                return None
            i = 0 if s0 is not None else 1
            j = 1 - i
            if self.inputs[j].perturbed:
                return None
            st, ptb = (s0, p0) if i == 0 else (s1, p1)
            const = _as_tensor(v[j][0], st.x)
            if self._kind == "sub":
                scale = 1.0 if i == 0 else -1.0
            elif self._kind == "add":
                scale = 1.0
            elif self._kind == "mul":
                scale = const
            elif self._kind == "div" and i == 0:
                scale = 1.0 / const
            else:
                return None
            if torch.is_tensor(scale):
                if not torch.isfinite(scale).all() or scale.dim() > st.x.dim():
                    return None
            x_new = self.forward(st.x, const) if i == 0 else self.forward(const, st.x)
        if x_new.dim() != st.x.dim() or x_new.shape[0] != st.x.shape[0]:
            return None
        shape = x_new.shape
        m_lo = (st.m_lo * scale).expand(shape)
        m_hi = (st.m_hi * scale).expand(shape)
        src = st.src.expand(shape)
        lower = x_new + torch.minimum(m_lo, m_hi)
        upper = x_new + torch.maximum(m_lo, m_hi)
        return emit(ptb, lower, upper, x_new, m_lo, m_hi, src)


class SparseSub(_Elementwise, _ops.BoundSub):
    _kind = "sub"


class SparseAdd(_Elementwise, _ops.BoundAdd):
    _kind = "add"


class SparseMul(_Elementwise, _ops.BoundMul):
    _kind = "mul"


class SparseNeg(_Elementwise, _ops.BoundNeg):
    _kind = "neg"


_DIV_COMPLETE = "interval_propagate" in _ops.BoundDiv.__dict__


class SparseDiv(_Elementwise, _ops.BoundDiv):
    """Division by a constant. Where stock ``BoundDiv`` is a stub (auto_LiRPA 0.7.x), bounds it itself."""

    _kind = "div"

    def _box(self, *v):
        if _DIV_COMPLETE:
            return super()._box(*v)
        x, y = v
        c = y[0]
        a, b = x[0] / c, x[1] / c
        return torch.minimum(a, b), torch.maximum(a, b)

    if not _DIV_COMPLETE:

        def update_requires_input_bounds(self):  # noqa: D102 - auto_LiRPA hook
            self.requires_input_bounds = []

        def bound_backward(self, last_lA, last_uA, x, y, **kwargs):  # noqa: D102
            factor = 1.0 / y.forward_value

            def one(A):
                if A is None:
                    return None
                return self.broadcast_backward(_ops.BoundMul._multiply_by_const(A, factor), x)

            return [(one(last_lA), one(last_uA)), (None, None)], 0.0, 0.0

        def bound_forward(self, dim_in, x, y):  # noqa: D102
            from auto_LiRPA.linear_bound import LinearBound

            c = 1.0 / y.lb
            pos, neg = c.clamp(min=0), c.clamp(max=0)
            lb = pos * x.lb + neg * x.ub
            ub = pos * x.ub + neg * x.lb
            wpos, wneg = pos, neg
            if self.inputs[1].batch_dim != -1:
                wpos, wneg = pos.unsqueeze(1), neg.unsqueeze(1)
            lw = wpos * x.lw + wneg * x.uw
            uw = wpos * x.uw + wneg * x.lw
            return LinearBound(lw, lb, uw, ub)


# ---------------------------------------------------------------------------- shape ops
class _Shape(_Plugin):
    def interval_propagate(self, *v):
        res = super().interval_propagate(*v)
        st, ptb = state_of(v[0]) if v else (None, None)
        if st is None or any(self.inputs[i].perturbed for i in range(1, len(v))):
            return res
        extra = [vi[0] for vi in v[1:]]
        try:
            x, m_lo, m_hi, src = (self.forward(t, *extra) for t in (st.x, st.m_lo, st.m_hi, st.src))
        except Exception:  # noqa: BLE001 - an op we cannot replay: keep the box
            return res
        lower, upper = res[0], res[1]
        if not (x.shape == m_lo.shape == m_hi.shape == src.shape == lower.shape == upper.shape):
            return res
        return emit(ptb, lower, upper, x, m_lo, m_hi, src)


class SparseReshape(_Shape, _ops.BoundReshape):
    pass


class SparseFlatten(_Shape, _ops.BoundFlatten):
    pass


class SparseTranspose(_Shape, _ops.BoundTranspose):
    pass


class SparseUnsqueeze(_Shape, _ops.BoundUnsqueeze):
    pass


class SparseSqueeze(_Shape, _ops.BoundSqueeze):
    pass


# ---------------------------------------------------------------------------- the top-k core
def _distinct_negatives(ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Replace negative ids (padding, no source) by distinct negative ids."""
    if not (ids < 0).any():
        return ids
    pos = torch.arange(ids.numel(), device=ids.device).view(ids.shape)
    return torch.where(ids < 0, -(pos + 1 + offset), ids)


def _local_groups(ids: torch.Tensor):
    """Per row of ``ids`` (L, J), the rank of each id among the row's distinct ids.

    Returns ``(local, G)``: ``local`` (L, J) in ``[0, G)``, or None when every row's
    ids are all distinct (no grouping needed); ``G`` the largest number of groups.
    """
    s, order = ids.sort(dim=1)
    new = torch.ones_like(s, dtype=torch.bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    counts = new.sum(dim=1)
    groups = int(counts.max()) if counts.numel() else 0
    if groups == ids.shape[1]:
        return None, groups
    rank = new.long().cumsum(dim=1) - 1
    local = torch.empty_like(ids).scatter_(1, order, rank)
    return local, groups


def sparse_gains(coef: torch.Tensor, m_lo: torch.Tensor, m_hi: torch.Tensor,
                 src: torch.Tensor, pix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest total gain and loss of ``k`` pixels for every output of a linear map.

    Output ``o`` of column ``l`` is ``sum_j coef[n, o, j] * z[n, l, j]``, where element
    ``(l, j)`` is an affine copy of input element ``src[l, j]`` (pixel ``pix[l, j]``)
    whose value changes by ``m_lo[n, l, j]`` / ``m_hi[n, l, j]`` when that input element
    moves to the low / high end of its range.

    Args:
        coef: ``(1 or N, O, J)``.
        m_lo, m_hi: ``(N, L, J)``.
        src, pix: ``(L, J)`` int64; negative = no source (padding, zero moves).
        k: pixel budget.

    Returns:
        ``(up, down)``, each ``(N, O, L)`` and ``>= 0``: the exact maximum increase and
        decrease of every output over all changes of at most ``k`` pixels.
    """
    n, cols, width = m_lo.shape
    outs = coef.shape[1]
    src = _distinct_negatives(src)
    pix = _distinct_negatives(pix)
    src_local, n_src = _local_groups(src)
    if src_local is not None:
        # Several elements of one column copy the same input element: their moves are
        # tied, so aggregate per source first.
        fill = -(torch.arange(cols * n_src, device=pix.device).view(cols, n_src) + 1 + pix.numel())
        pix = fill.scatter(1, src_local, pix)
    pix_local, n_pix = _local_groups(pix)
    width_max = max(width, n_src)
    per = cols * width_max
    if n * outs * per <= BLOCK_ELEMENTS:
        o_blk, n_blk = outs, n
    else:
        o_blk = max(1, min(outs, BLOCK_ELEMENTS // max(1, n * per)))
        n_blk = n if o_blk > 1 else max(1, min(n, BLOCK_ELEMENTS // per))
    kk = min(int(k), n_pix)
    if src_local is None:
        # Every element moves on its own: with M+ >= 0 >= M- its two moves, the best
        # gain of coefficient c is c+ M+ + c- M- and the worst loss -(c+ M- + c- M+).
        m_pos = torch.maximum(m_lo, m_hi).clamp(min=0)
        m_neg = torch.minimum(m_lo, m_hi).clamp(max=0)
        if not (m_pos.requires_grad or m_neg.requires_grad):
            empty = torch.empty(0, dtype=torch.long, device=coef.device)
            return _TopKGains.apply(coef, m_pos, m_neg, empty if pix_local is None else pix_local, n_pix, kk,
                                    n_blk, o_blk)
    # General path (sources copied within a column, or moves that need gradients).
    ups, downs = [], []
    for n0 in range(0, n, n_blk):
        n1 = min(n, n0 + n_blk)
        cb = coef if coef.shape[0] == 1 else coef[n0:n1]
        row_up, row_dn = [], []
        for o0 in range(0, outs, o_blk):
            c = cb[:, o0 : o0 + o_blk, None, :]  # (b|1, o, 1, J)
            if src_local is None:
                c_pos, c_neg = c.clamp(min=0), c.clamp(max=0)
                mp, mn = m_pos[n0:n1, None], m_neg[n0:n1, None]  # (b, 1, L, J)
                up = torch.addcmul(c_pos * mp, c_neg, mn)
                dn = torch.addcmul(c_pos * mn, c_neg, mp).neg()
            else:
                g_lo, g_hi = c * m_lo[n0:n1, None], c * m_hi[n0:n1, None]  # (b, o, L, J)
                shape = g_lo.shape
                idx = src_local.expand(shape)
                zeros = g_lo.new_zeros(*shape[:3], n_src)
                g_lo = zeros.scatter_add(3, idx, g_lo)
                g_hi = zeros.scatter_add(3, idx, g_hi)
                up = torch.maximum(g_lo, g_hi).clamp(min=0)
                dn = torch.minimum(g_lo, g_hi).clamp(max=0).neg()
            if pix_local is not None:
                idx = pix_local.expand(up.shape)
                zeros = up.new_zeros(*up.shape[:3], n_pix)
                up = zeros.scatter_add(3, idx, up)
                dn = zeros.scatter_add(3, idx, dn)
            if kk <= 0:
                row_up.append(up.new_zeros(up.shape[:3]))
                row_dn.append(dn.new_zeros(dn.shape[:3]))
            else:
                row_up.append(up.topk(kk, dim=3).values.sum(dim=3))
                row_dn.append(dn.topk(kk, dim=3).values.sum(dim=3))
        ups.append(torch.cat(row_up, dim=1))
        downs.append(torch.cat(row_dn, dim=1))
    return torch.cat(ups, dim=0), torch.cat(downs, dim=0)


class _TopKGains(torch.autograd.Function):
    """Top-k pixel gains/losses of independent elements, with a backward that only visits the top k.

    Inputs: ``coef`` (1 or N, O, J); ``m_pos``/``m_neg`` (N, L, J), no gradient;
    ``pix_local`` (L, J) group ids in ``[0, G)`` or empty (every element its own pixel).
    Outputs ``(up, down)``, each (N, O, L). Gradients flow to ``coef`` only.
    """

    @staticmethod
    def forward(ctx, coef, m_pos, m_neg, pix_local, n_pix, kk, n_blk, o_blk):
        n, cols, width = m_pos.shape
        outs = coef.shape[1]
        grouped = pix_local.numel() > 0
        up = m_pos.new_zeros(n, outs, cols)
        dn = m_pos.new_zeros(n, outs, cols)
        up_idx = torch.zeros(n, outs, cols, max(kk, 0), dtype=torch.long, device=m_pos.device)
        dn_idx = torch.zeros_like(up_idx)
        if kk > 0:
            for n0 in range(0, n, n_blk):
                n1 = min(n, n0 + n_blk)
                cb = coef if coef.shape[0] == 1 else coef[n0:n1]
                mp, mn = m_pos[n0:n1, None], m_neg[n0:n1, None]
                for o0 in range(0, outs, o_blk):
                    o1 = min(outs, o0 + o_blk)
                    c = cb[:, o0:o1, None, :]
                    c_pos, c_neg = c.clamp(min=0), c.clamp(max=0)
                    g_up = torch.addcmul(c_pos * mp, c_neg, mn)
                    g_dn = torch.addcmul(c_pos * mn, c_neg, mp).neg_()
                    if grouped:
                        idx = pix_local.expand(g_up.shape)
                        g_up = g_up.new_zeros(*g_up.shape[:3], n_pix).scatter_add_(3, idx, g_up)
                        g_dn = g_dn.new_zeros(*g_dn.shape[:3], n_pix).scatter_add_(3, idx, g_dn)
                    tu, td = g_up.topk(kk, dim=3), g_dn.topk(kk, dim=3)
                    up[n0:n1, o0:o1] = tu.values.sum(dim=3)
                    dn[n0:n1, o0:o1] = td.values.sum(dim=3)
                    up_idx[n0:n1, o0:o1] = tu.indices
                    dn_idx[n0:n1, o0:o1] = td.indices
        ctx.save_for_backward(coef, m_pos, m_neg, pix_local, up_idx, dn_idx)
        ctx.n_pix, ctx.kk, ctx.n_blk, ctx.o_blk = n_pix, kk, n_blk, o_blk
        return up, dn

    @staticmethod
    def backward(ctx, g_up, g_dn):
        coef, m_pos, m_neg, pix_local, up_idx, dn_idx = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or ctx.kk <= 0:
            return (None,) * 8
        n, cols, width = m_pos.shape
        outs = coef.shape[1]
        batched = coef.shape[0] != 1
        grad = torch.zeros_like(coef)
        g_up = g_up if g_up is not None else torch.zeros(n, outs, cols, dtype=coef.dtype, device=coef.device)
        g_dn = g_dn if g_dn is not None else torch.zeros(n, outs, cols, dtype=coef.dtype, device=coef.device)
        if pix_local.numel() == 0:
            # d up / d c[o, j] = M+[j] if c >= 0 else M-, for the k selected elements j.
            for idx, g, first, second in ((up_idx, g_up, m_pos, m_neg), (dn_idx, g_dn, m_neg, m_pos)):
                shape = (n, outs, cols, width)
                sel_a = first.unsqueeze(1).expand(shape).gather(3, idx)
                sel_b = second.unsqueeze(1).expand(shape).gather(3, idx)
                c_sel = coef.unsqueeze(2).expand(coef.shape[0], outs, cols, width)
                c_sel = (c_sel if batched else c_sel.expand(shape)).gather(3, idx)
                contrib = g.unsqueeze(3) * torch.where(c_sel >= 0, sel_a, sel_b)
                if idx is dn_idx:
                    contrib = contrib.neg()
                if batched:
                    grad.scatter_add_(2, idx.reshape(n, outs, -1), contrib.reshape(n, outs, -1))
                else:
                    grad[0].scatter_add_(1, idx.transpose(0, 1).reshape(outs, -1),
                                         contrib.transpose(0, 1).reshape(outs, -1))
            return grad, None, None, None, None, None, None, None
        # Grouped elements: every element of a selected pixel gets the gradient.
        for n0 in range(0, n, ctx.n_blk):
            n1 = min(n, n0 + ctx.n_blk)
            mp, mn = m_pos[n0:n1, None], m_neg[n0:n1, None]  # (b, 1, L, J)
            for o0 in range(0, outs, ctx.o_blk):
                o1 = min(outs, o0 + ctx.o_blk)
                b, o = n1 - n0, o1 - o0
                expand = pix_local.expand(b, o, cols, width)
                acc_pos = acc_neg = 0.0
                for idx, g, sign in ((up_idx, g_up, 1.0), (dn_idx, g_dn, -1.0)):
                    chosen = torch.zeros(b, o, cols, ctx.n_pix, dtype=coef.dtype, device=coef.device)
                    chosen.scatter_(3, idx[n0:n1, o0:o1], 1.0)
                    weight = chosen.gather(3, expand) * g[n0:n1, o0:o1].unsqueeze(3)  # (b, o, L, J)
                    # up: c >= 0 -> M+, else M-;  down (negated): c >= 0 -> M-, else M+
                    first, second = (mp, mn) if sign > 0 else (mn, mp)
                    acc_pos = acc_pos + sign * weight * first
                    acc_neg = acc_neg + sign * weight * second
                if batched:
                    c = coef[n0:n1, o0:o1]
                    grad[n0:n1, o0:o1] += torch.where(c >= 0, acc_pos.sum(dim=2), acc_neg.sum(dim=2))
                else:
                    c = coef[0, o0:o1]
                    grad[0, o0:o1] += torch.where(c >= 0, acc_pos.sum(dim=(0, 2)), acc_neg.sum(dim=(0, 2)))
        return grad, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------- mixing ops
class _Mixing(_Plugin):
    _data_inputs = (0,)

    def _sparse_inputs(self, v):
        """The (state, ptb) of the data input, after consistency checks, or None."""
        for i in self._data_inputs:
            if i < len(v):
                st, ptb = state_of(v[i])
                if st is not None:
                    return i, st, ptb
        return None

    def _pixels(self, st, ptb):
        src = _local_sources(st, ptb)
        if src is None:
            return None, None
        return src, ptb._sparse_pixel_of[src]


class SparseLinear(_Mixing, _ops.BoundLinear):
    """``Gemm``: exact worst case over the sparse set when it is the first mixing layer."""

    def interval_propagate(self, *v, C=None, w=None):
        found = self._sparse_inputs(v) if w is None else None
        if found is not None:
            out = self._sparse(v, C, *found[1:])
            if out is not None:
                return out
        else:
            self._check_sparse_root(v, self._data_inputs)
        return super().interval_propagate(*v, C=C, w=w)

    def _sparse(self, v, C, st, ptb):
        if len(v) < 2 or any(self.is_input_perturbed(i) for i in range(1, len(v))):
            self._sparse_fallback("perturbed weights")
            return None
        attr = self.attr or {}
        x = st.x
        if attr.get("transA", 0) or x.dim() != 2:
            self._sparse_fallback("unsupported Gemm layout")
            return None
        if C is not None and not torch.is_tensor(C):
            return None
        src, pix = self._pixels(st, ptb)
        if src is None:
            self._sparse_fallback("the graph mixes images of the batch")
            return None
        w = v[1][0]
        weight = w if attr.get("transB", 0) else w.t()  # (O, J)
        alpha = float(attr.get("alpha", 1.0))
        if alpha != 1.0:
            weight = weight * alpha
        y = x.matmul(weight.t())
        if len(v) > 2:
            bias = v[2][0]
            beta = float(attr.get("beta", 1.0))
            y = y + (bias * beta if beta != 1.0 else bias)
        coef = weight.unsqueeze(0)
        if C is not None:
            coef = C.matmul(weight)
            y = C.matmul(y.unsqueeze(-1)).squeeze(-1)
        up, dn = sparse_gains(coef, st.m_lo.unsqueeze(1), st.m_hi.unsqueeze(1), src.view(1, -1), pix.view(1, -1), ptb.k)
        return y - dn.squeeze(-1), y + up.squeeze(-1)


class SparseMatMul(_Mixing, _ops.BoundMatMul):
    """``MatMul`` with one constant 2-D operand."""

    _data_inputs = (0, 1)

    def interval_propagate(self, *v, C=None):
        found = self._sparse_inputs(v)
        if found is not None:
            out = self._sparse(v, C, *found)
            if out is not None:
                return out
        else:
            self._check_sparse_root(v, self._data_inputs)
        if C is None:
            return super().interval_propagate(*v)
        return super().interval_propagate(*v, C=C)

    def _sparse(self, v, C, i, st, ptb):
        j = 1 - i
        const = v[j][0]
        if self.inputs[j].perturbed or not torch.is_tensor(const) or const.dim() != 2:
            self._sparse_fallback("MatMul without a constant 2-D operand")
            return None
        src, pix = self._pixels(st, ptb)
        if src is None:
            self._sparse_fallback("the graph mixes images of the batch")
            return None
        x = st.x
        if i == 0:  # x (N, *lead, J) @ W (J, O)
            if x.dim() < 2:
                return None
            n, width = x.shape[0], x.shape[-1]
            y = x.matmul(const)
            cols = int(src.numel() // width)
            m_lo, m_hi = st.m_lo.reshape(n, cols, width), st.m_hi.reshape(n, cols, width)
            src2, pix2 = src.reshape(cols, width), pix.reshape(cols, width)
            weight = const.t()
        else:  # W (O, J) @ x (N, J, L)
            if x.dim() != 3:
                return None
            y = const.matmul(x)
            m_lo, m_hi = st.m_lo.transpose(1, 2), st.m_hi.transpose(1, 2)
            src2, pix2 = src.t(), pix.t()
            weight = const
        coef = weight.unsqueeze(0)
        if C is not None:
            if not torch.is_tensor(C) or y.dim() != 2:
                return None
            coef = C.matmul(weight)
            y = C.matmul(y.unsqueeze(-1)).squeeze(-1)
        up, dn = sparse_gains(coef, m_lo, m_hi, src2, pix2, ptb.k)  # (N, O, L)
        if i == 0:
            up = up.transpose(1, 2).reshape(y.shape)
            dn = dn.transpose(1, 2).reshape(y.shape)
        else:
            up, dn = up.reshape(y.shape), dn.reshape(y.shape)
        return y - dn, y + up


class SparseConv(_Mixing, _ops.BoundConv):
    """2-D ``Conv``: per output position, the top-k pixels of its receptive field."""

    def interval_propagate(self, *v, C=None):
        found = self._sparse_inputs(v) if C is None else None
        if found is not None:
            out = self._sparse(v, *found[1:])
            if out is not None:
                return out
        elif C is None:
            self._check_sparse_root(v, self._data_inputs)
        return super().interval_propagate(*v, C=C)

    def _sparse(self, v, st, ptb):
        if any(self.is_input_perturbed(i) for i in range(1, len(v))):
            self._sparse_fallback("perturbed weights")
            return None
        x = st.x
        weight = v[1][0]
        if x.dim() != 4 or weight.dim() != 4 or getattr(self, "conv_dim", 2) != 2:
            self._sparse_fallback("not a 2-D convolution")
            return None
        src, pix = self._pixels(st, ptb)
        if src is None:
            self._sparse_fallback("the graph mixes images of the batch")
            return None
        bias = v[2][0] if len(v) > 2 else None
        stride, padding, dilation, groups = (tuple(self.stride), tuple(self.padding), tuple(self.dilation),
                                             int(self.groups))
        y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        kernel = tuple(weight.shape[-2:])

        def unfold(t):
            return F.unfold(t, kernel, dilation=dilation, padding=padding, stride=stride)

        m_lo = unfold(st.m_lo.contiguous()).transpose(1, 2)  # (N, L, J)
        m_hi = unfold(st.m_hi.contiguous()).transpose(1, 2)
        ids = unfold((src + 1).to(torch.float64).unsqueeze(0))[0].t().round().long() - 1  # (L, J)
        pix_of = ptb._sparse_pixel_of
        pix_cols = torch.where(ids >= 0, pix_of[ids.clamp(min=0)], ids)
        out_ch = weight.shape[0]
        per_in = weight.shape[1] * kernel[0] * kernel[1]
        per_out = out_ch // groups
        ups, dns = [], []
        for g in range(groups):
            js = slice(g * per_in, (g + 1) * per_in)
            coef = weight[g * per_out : (g + 1) * per_out].reshape(1, per_out, per_in)
            up, dn = sparse_gains(coef, m_lo[..., js], m_hi[..., js], ids[:, js], pix_cols[:, js], ptb.k)
            ups.append(up)
            dns.append(dn)
        up = torch.cat(ups, dim=1).reshape(y.shape)
        dn = torch.cat(dns, dim=1).reshape(y.shape)
        return y - dn, y + up


# ---------------------------------------------------------------------------- factories
def _constant(node) -> bool:
    return not _reaches_input(node)


def _make(stock_name: str, plugin: type, rule: Callable[[list], bool]) -> Callable:
    stock = getattr(_ops, stock_name)

    def factory(attr=None, inputs=None, output_index=0, options=None, *rest):
        inputs = list(inputs or [])
        try:
            use = rule(inputs)
        except Exception:  # noqa: BLE001 - unknown graph shapes: stay stock
            use = False
        cls = plugin if use else stock
        return cls(attr, inputs, output_index, options, *rest)

    factory.__name__ = f"lirpa_patch_{plugin.__name__}"
    factory.__qualname__ = factory.__name__
    factory._lirpa_patch_plugin = plugin  # type: ignore[attr-defined]
    factory._lirpa_patch_stock = stock  # type: ignore[attr-defined]
    return factory


def _binary_rule(inputs) -> bool:
    return (len(inputs) == 2 and any(_before_mixing(i) for i in inputs)
            and sum(_reaches_input(i) for i in inputs) == 1)


def _div_rule(inputs) -> bool:
    return len(inputs) == 2 and _before_mixing(inputs[0]) and _constant(inputs[1])


def _unary_rule(inputs) -> bool:
    return len(inputs) >= 1 and _before_mixing(inputs[0]) and all(_constant(i) for i in inputs[1:])


def _matmul_rule(inputs) -> bool:
    return (len(inputs) == 2 and any(_before_mixing(i) for i in inputs)
            and sum(_reaches_input(i) for i in inputs) == 1)


_TABLE = {
    "onnx::Sub": ("BoundSub", SparseSub, _binary_rule),
    "onnx::Add": ("BoundAdd", SparseAdd, _binary_rule),
    "onnx::Mul": ("BoundMul", SparseMul, _binary_rule),
    "onnx::Div": ("BoundDiv", SparseDiv, _div_rule),
    "onnx::Neg": ("BoundNeg", SparseNeg, _unary_rule),
    "onnx::Reshape": ("BoundReshape", SparseReshape, _unary_rule),
    "onnx::Flatten": ("BoundFlatten", SparseFlatten, _unary_rule),
    "onnx::Transpose": ("BoundTranspose", SparseTranspose, _unary_rule),
    "onnx::Unsqueeze": ("BoundUnsqueeze", SparseUnsqueeze, _unary_rule),
    "onnx::Squeeze": ("BoundSqueeze", SparseSqueeze, _unary_rule),
    "onnx::Gemm": ("BoundLinear", SparseLinear, _unary_rule),
    "onnx::MatMul": ("BoundMatMul", SparseMatMul, _matmul_rule),
    "onnx::Conv": ("BoundConv", SparseConv, _unary_rule),
}

_FACTORIES: Dict[str, Callable] = {op: _make(*spec) for op, spec in _TABLE.items()}


def custom_ops() -> Dict[str, Callable]:
    """``{onnx op name: factory}`` for ``BoundedModule(..., custom_ops=custom_ops())``."""
    return dict(_FACTORIES)


def stock_ops() -> Dict[str, type]:
    """The stock auto_LiRPA classes for the same op names (to build a module without the plugin)."""
    return {op: getattr(_ops, spec[0]) for op, spec in _TABLE.items()}


def _is_ours(entry) -> bool:
    return getattr(entry, "_lirpa_patch_plugin", None) is not None


def register() -> list[str]:
    """Register the plugin factories in auto_LiRPA's global op map (idempotent).

    An op already mapped to something other than auto_LiRPA's own class (another
    plugin) is left alone. Returns the op names now served by this plugin.
    """
    done = []
    for op, factory in _FACTORIES.items():
        current = bound_op_map.get(op)
        stock = factory._lirpa_patch_stock  # type: ignore[attr-defined]
        if current is None or current is stock or _is_ours(current):
            bound_op_map[op] = factory
            done.append(op)
    return done


def unregister() -> None:
    """Undo :func:`register` (restores the default mapping)."""
    for op in _FACTORIES:
        if _is_ours(bound_op_map.get(op)):
            if op == "onnx::Gemm":
                bound_op_map[op] = _ops.BoundLinear
            else:
                bound_op_map.pop(op)


def is_registered() -> bool:
    """Whether every plugin factory is in auto_LiRPA's global op map."""
    return all(_is_ours(bound_op_map.get(op)) for op in _FACTORIES)


def plugin_report(bounded) -> dict:
    """What the plugin does in a ``BoundedModule``.

    Returns a dict with ``first_mixing`` (names of the layers that mix pixels first),
    ``stock_first_mixing`` (those of them built without the plugin: bounded as a box),
    and ``fallback`` (``{node name: reason}`` for plugin layers that had to use the
    box in the last bound computation).
    """
    nodes = list(bounded.nodes()) if hasattr(bounded, "nodes") else list(bounded._modules.values())
    mixing = _mixing_types()
    first = [n for n in nodes if isinstance(n, mixing) and any(_before_mixing(i) for i in n.inputs)]
    return {
        "first_mixing": [n.name for n in first],
        "stock_first_mixing": [n.name for n in first if not isinstance(n, _Plugin)],
        "fallback": {n.name: n.__dict__["sparse_fallback_reason"] for n in nodes
                     if isinstance(n, _Plugin) and "sparse_fallback_reason" in n.__dict__},
    }
