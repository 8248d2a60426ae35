"""Linear plugin operators: ``Gemm`` (``BoundLinear``) and ``MatMul`` with one constant operand.

* At the first layer that mixes pixels (an element-state input) the threat's rule
  gives the bounds: exact top-k for the sparse threat, the incremental patch rule
  (clean pre-activation once per image, the patch columns per row) for patches.
* After convolutions (a flattened window-state input) only the window's columns
  are visited per row (:func:`~lirpa_patch.ops.window.linear_window`).
* A specification ``C`` that IBP merges into the last layer is merged here too,
  for every form: ``Gemm``, ``MatMul`` with or without a bias.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from auto_LiRPA import bound_ops as _ops
from auto_LiRPA.operators.base import Interval

from .backward import dense_coefficients, first_linear_backward
from .base import Plugin, Unsupported
from .graph import input_roots
from .state import ElementState, WindowState
from .window import linear_window

__all__ = ["PluginLinear", "PluginMatMul", "merged_interval"]


def merged_interval(v0, coef: torch.Tensor, bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """IBP of ``x @ coef^T + bias`` for an input box ``v0`` ``(N, J)``; ``coef`` ``(O, J)`` or ``(N, O, J)``."""
    lo, hi = v0[0], v0[1]
    mid, rad = (lo + hi) * 0.5, (hi - lo) * 0.5
    if coef.dim() == 3:
        centre = torch.einsum("noj,nj->no", coef, mid)
        dev = torch.einsum("noj,nj->no", coef.abs(), rad)
    else:
        centre = mid.matmul(coef.t())
        dev = rad.matmul(coef.abs().t())
    if bias is not None:
        centre = centre + bias
    return centre - dev, centre + dev


def _attr(node, name: str, key: str, default):
    value = getattr(node, name, None)
    if value is None:
        value = (node.attr or {}).get(key, default)
    return value


class _Linear(Plugin):
    """Shared rule: a data operand with a state times a constant weight."""

    _lp_first_mixing = False

    def _weights(self, v) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(W (O, J), bias (O,) or None)`` of ``y = x @ W^T + bias`` (data operand first)."""
        raise NotImplementedError

    def _with_spec(self, w: torch.Tensor, bias, C, images: int, ptb):
        """Merge a specification ``C`` into the weights: ``(coef, bias)`` shared or per image."""
        if C is None:
            return w, bias
        if not torch.is_tensor(C) or C.dim() != 3:
            raise Unsupported("a specification that is not a matrix")
        rows = C.shape[0]
        if rows == 1:
            C = C[0]
        elif rows != images:
            if rows != ptb.num_rows:
                raise Unsupported("a specification for another batch")
            row_img = ptb.row_img
            firsts = torch.zeros(images, dtype=torch.long, device=C.device).scatter_(
                0, row_img.flip(0), torch.arange(rows - 1, -1, -1, device=C.device))
            per_image = C[firsts]
            if not torch.equal(per_image[row_img], C):
                raise Unsupported("a specification that differs between rows of an image")
            C = per_image
        coef = C.matmul(w)
        merged_bias = C.matmul(bias) if bias is not None else None
        return coef, merged_bias

    def _lp_propagate(self, v, found, C=None, w=None, **kwargs):
        if w is not None:
            raise Unsupported("an explicit weight")
        data = self._data_index(found)
        st, ptb = found[data]
        if any(self.is_input_perturbed(i) for i in range(len(v)) if i != data):
            raise Unsupported("perturbed weights")
        weight, bias = self._weights(v, data)
        if isinstance(st, WindowState):
            if not st.flat or data != 0:
                raise Unsupported("a linear layer on an unflattened window")
            coef, b = self._with_spec(weight, bias, C, st.clean.shape[0], ptb)
            return linear_window(st, coef, b)
        transposed = data == 1
        if transposed:  # W (O, J) @ x (B, J, L): work on x^T
            if st.x.dim() != 3:
                raise Unsupported("MatMul with a data operand of rank other than 3")
            st = ElementState(st.x.transpose(-1, -2), st.m_lo.transpose(-1, -2), st.m_hi.transpose(-1, -2),
                              st.src.transpose(-1, -2))
            if C is not None:
                raise Unsupported("a specification after W @ x")
        coef, b = self._with_spec(weight, bias, C, st.x.shape[0], ptb)
        out = ptb.mix_linear(st, coef, b, cache=self._weight_cache(coef))
        if out is not None and out[0].shape[0] != ptb.num_rows:
            raise Unsupported("the threat's first-layer rule gave another number of rows")
        if out is None:
            raise Unsupported("the threat's first-layer rule does not apply")
        if transposed:
            out = (out[0].transpose(-1, -2), out[1].transpose(-1, -2))
        return out

    def _weight_cache(self, coef: torch.Tensor) -> Optional[dict]:
        """The threat's tables for this layer (``|W|``, gathered columns, radius rows), valid
        for one content of the weight: emptied whenever ``coef`` differs in any element from
        the weight they were built for (an edit through ``W.data`` changes neither the
        tensor's version nor its storage). None for a per-image (specification-merged) weight, and
        for a weight being trained (under gradients the threat reads no table: nothing to keep).
        """
        if coef.dim() != 2 or (torch.is_grad_enabled() and coef.requires_grad):
            return None
        kept = self.__dict__.get("_lp_cache_weight")
        if (kept is None or kept.shape != coef.shape or kept.dtype != coef.dtype or kept.device != coef.device
                or not torch.equal(kept, coef.detach())):
            self.__dict__["_lp_cache_weight"] = coef.detach().clone()
            self.__dict__["_lp_cache"] = {}
        return self.__dict__["_lp_cache"]

    def _data_index(self, found) -> int:
        for i, (st, _) in enumerate(found):
            if st is not None:
                return i
        raise Unsupported("no state")

    def _lp_no_state(self, v, **kwargs) -> None:
        if getattr(self, "_lp_first_mixing", False):
            _check_sparse_root(self, v)


def _constant(node) -> torch.Tensor:
    """The value of a constant operand during a backward pass."""
    value = getattr(node, "lower", None)
    if torch.is_tensor(value):
        return value
    from ..head import constant_value

    return constant_value(node)


def _check_sparse_root(node, v) -> None:
    """At a first mixing layer whose input carries no description: warn if its perturbation asks to."""
    from .graph import data_roots, path_ops

    if not any(i < len(v) and node.is_input_perturbed(i) for i in node._lp_data_inputs):
        return
    warned = [r.perturbation for r in data_roots(node)
              if getattr(getattr(r, "perturbation", None), "fallback_warning", None) is not None]
    if warned:
        ops = path_ops(node, lambda n: getattr(n, "_lp_carries_elements", False))
        reason = f"the input passes through {', '.join(ops)}" if ops else "unsupported input"
        node._lp_fallback(reason, [(None, warned[0])])


LIVE_SHARE = 0.5
"""A dense linear layer multiplies an image's rows through only the input columns nonzero in some row of the
image when at most this share of the columns are (else through all of them)."""

MIN_ROWS_PER_IMAGE = 64
"""...when the images have at least this many rows on average (patch locations: hundreds)."""


def _rows_per_image(rows: int, ptb) -> Optional[list[int]]:
    """How many of the ``rows`` each image has, when they are sorted by image and many per image; else None."""
    try:
        row_img = ptb.row_img
    except (AttributeError, NotImplementedError):
        return None
    if row_img.shape[0] != rows or rows == 0:
        return None
    n_img = int(row_img[-1]) + 1
    if rows < MIN_ROWS_PER_IMAGE * n_img or not bool((row_img[1:] >= row_img[:-1]).all()):
        return None
    return torch.bincount(row_img, minlength=n_img).tolist()


def _bounds_by_image(lo: torch.Tensor, hi: torch.Tensor, weight_t: torch.Tensor, bias: Optional[torch.Tensor],
                     counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """IBP of ``x @ weight_t + bias`` for ``x`` in ``[lo, hi]`` ``(R, J)``, image by image: ``(lower, upper)`` ``(R, O)``.

    ``lower = lo @ W+ + hi @ W- + bias`` and ``upper = hi @ W+ + lo @ W- + bias``, where
    each image's rows go through its live columns only: after a ReLU most neurons are
    zero in every row of an image (a patch moves few pre-activations across zero), and
    a column that is zero in every row (``max hi <= 0 <= min lo``) adds exact zeros.
    ``counts``: rows of each image, the rows sorted by image. Without gradients (a column
    zero in every row still passes gradient to whatever made it zero).
    """
    n_img, j = len(counts), lo.shape[1]
    pos, neg = weight_t.clamp(min=0), weight_t.clamp(max=0)
    if bias is None:
        bias = weight_t.new_zeros(weight_t.shape[1])
    def per_image(t: torch.Tensor, reduce) -> torch.Tensor:  # (B, J)
        if len(set(counts)) == 1:
            return reduce(t.reshape(n_img, counts[0], j), 1)
        return torch.stack([reduce(part, 0) if part.shape[0] else part.new_zeros(j)
                            for part in t.split(counts)])

    live = per_image(hi, torch.amax) > 0  # (B, J)
    if float(lo.detach().min()) < 0:  # not after a ReLU
        live |= per_image(lo, torch.amin) < 0
    live_cols = torch.nonzero(live)[:, 1].split(live.sum(1).tolist())
    rows, width = lo.shape[0], weight_t.shape[1]
    lower, upper = lo.new_empty(rows, width), lo.new_empty(rows, width)
    start = 0
    for count, cols in zip(counts, live_cols):
        end = start + count
        if count == 0:
            continue
        lo_i, hi_i = lo[start:end], hi[start:end]
        p, n = pos, neg
        if cols.numel() <= LIVE_SHARE * j:
            lo_i, hi_i = lo_i.index_select(1, cols), hi_i.index_select(1, cols)
            p, n = pos.index_select(0, cols), neg.index_select(0, cols)
        torch.addmm(bias, lo_i, p, out=lower[start:end]).addmm_(hi_i, n)
        torch.addmm(bias, hi_i, p, out=upper[start:end]).addmm_(lo_i, n)
        start = end
    return lower, upper


class PluginLinear(_Linear, _ops.BoundLinear):
    """``Gemm``. Under CROWN, the first layer of patch rows concretizes itself (:mod:`lirpa_patch.ops.backward`).

    After the first mixing layer (dense bounds of this project's threats), the bounds
    are the stock ones, computed with less work: without gradients and with many rows
    per image, each image's rows go through its live columns only (:func:`_bounds_by_image`);
    otherwise the halving of centre and radius is folded into the weights (exact: a
    power of two) and the bias into the centre's product.
    """

    _lp_data_inputs = (0,)

    def _lp_dense(self, v, C=None, w=None, **kwargs):
        from ..threats.box import BoxPerturbation

        if C is not None or w is not None or kwargs or Interval.get_perturbation(v[0])[0] != np.inf:
            return None
        ptb = next((r.perturbation for r in input_roots(self)
                    if isinstance(getattr(r, "perturbation", None), BoxPerturbation)), None)
        if ptb is None:
            return None  # another perturbation: the stock operator, unchanged
        if len(v) not in (2, 3) or any(self.is_input_perturbed(i) for i in range(1, len(v))):
            return None
        lo, hi = v[0][0], v[0][1]
        if lo.dim() != 2 or not torch.is_tensor(v[1][0]):
            return None
        try:
            weight, bias = self._weights(v, 0)
        except Unsupported:
            return None
        if lo.shape[-1] != weight.shape[1]:
            return None
        counts = _rows_per_image(lo.shape[0], ptb)
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (lo, hi, weight, bias))
        if counts is not None and not needs_grad:
            # (with gradients, a column zero in every row still passes gradient to what made it zero)
            return _bounds_by_image(lo, hi, weight.t(), bias, counts)
        half = weight.t() * 0.5  # (J, O)
        centre = (lo + hi).matmul(half) if bias is None else torch.addmm(bias, lo + hi, half)
        radius = (hi - lo).matmul(half.abs())
        return centre - radius, centre + radius


    def bound_backward(self, last_lA, last_uA, *x, **kwargs):
        if self._lp_first_mixing and not getattr(self, "swap_x_and_weight", False) and len(x) in (2, 3) \
                and not any(self.is_input_perturbed(i) for i in range(1, len(x))):
            try:
                consts = [_constant(xi) for xi in x[1:]]
                weight, bias = self._weights([(None, None)] + [(c, c) for c in consts], 0)
            except Unsupported:
                weight = None
            if weight is not None:
                out = first_linear_backward(self, last_lA, last_uA, weight, bias)
                if out is not None:
                    return out
        return type(self).bound_backward(self, last_lA, last_uA, *x, **kwargs)  # the node's own (stock) class

    def _weights(self, v, data):
        if data != 0:
            raise Unsupported("Gemm with a constant first operand")
        if _attr(self, "transA", "transA", 0):
            raise Unsupported("Gemm with transA")
        weight = v[1][0]
        if weight.dim() != 2:
            raise Unsupported("Gemm with a weight of rank other than 2")
        w = weight if _attr(self, "transB", "transB", 0) else weight.t()
        alpha = float(_attr(self, "alpha_linear", "alpha", 1.0))
        if alpha != 1.0:
            w = w * alpha
        bias = None
        if len(v) > 2:
            bias = v[2][0]
            beta = float(_attr(self, "beta_linear", "beta", 1.0))
            if beta != 1.0:
                bias = bias * beta
        return w, bias


class PluginMatMul(_Linear, _ops.BoundMatMul):
    """``MatMul`` with one constant 2-D operand (either side)."""

    _lp_data_inputs = (0, 1)

    def _weights(self, v, data):
        const = v[1 - data][0]
        if not torch.is_tensor(const) or const.dim() != 2:
            raise Unsupported("MatMul without a constant 2-D operand")
        return (const.t() if data == 0 else const), None

    def bound_backward(self, last_lA, last_uA, *x, **kwargs):
        """CROWN through ``W @ x`` with a constant ``W`` ``(O, J)`` and the data on the right ``(B, J, L)``.

        Stock auto_LiRPA 0.3 treats a perturbed right operand as a perturbed weight and
        relaxes a product of two variables, which fails on these shapes. The layer is
        linear in ``x``: ``sum A[o, l] (W x)[o, l] = sum (W^T A)[j, l] x[j, l]``, so the
        coefficients of ``x`` are ``W^T A`` and there is no bias term.
        """
        if len(x) == 2 and self.is_input_perturbed(1) and not self.is_input_perturbed(0):
            w = _constant(x[0])
            coefs = [dense_coefficients(a) for a in (last_lA, last_uA)]
            if torch.is_tensor(w) and w.dim() >= 2 and all(d == 1 for d in w.shape[:-2]) \
                    and all(c is not None or a is None for a, c in zip((last_lA, last_uA), coefs)):
                w_t = w.reshape(w.shape[-2:]).t()  # (J, O)
                back = [None if c is None else w_t.matmul(c) for c in coefs]  # (S, B, ..., J, L)
                return [(None, None), (back[0], back[1])], 0.0, 0.0
        return type(self).bound_backward(self, last_lA, last_uA, *x, **kwargs)  # the node's own (stock) class

    def _lp_stock(self, *v, C=None, **kwargs):
        if C is None:
            return Plugin._lp_stock(self, *v, **kwargs)
        # Stock MatMul (auto_LiRPA 0.3) does not take the specification IBP merges into a
        # last layer: merge it here for a constant right operand, as Gemm does.
        if self.is_input_perturbed(1) or v[0][0].dim() != 2 or not torch.is_tensor(v[1][0]) or v[1][0].dim() != 2:
            lo, hi = Plugin._lp_stock(self, *v, **kwargs)
            return merged_interval((lo, hi), C, None)
        return merged_interval(v[0], C.matmul(v[1][0].t()), None)
