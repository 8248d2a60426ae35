"""The exact top-k bound of the sparse (k-pixel) threat on one linear map: pure tensor code.

:func:`sparse_gains` computes, for every output of a linear map whose inputs are
affine copies of input elements, the largest total gain and loss that changing at
most ``k`` pixels can cause (paper eq. 19 made exact: every pixel moves each of its
channels to the end of its *own* valid range that helps). It needs neither
auto_LiRPA nor a graph; the plugin operators call it at the first layer that mixes
pixels. The top-k has a hand-written backward (:class:`_TopKGains`) that only visits
the selected entries, so training costs about as much as the forward pass.
"""

from __future__ import annotations

import torch

__all__ = ["BLOCK_ELEMENTS", "sparse_gains"]

BLOCK_ELEMENTS = 1 << 22
"""Elements per intermediate tensor in the top-k computation (~16 MB in float32)."""


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


_PRUNE = True
"""Whether :class:`_TopKGains` looks for each top-k among candidates first (tests switch it off)."""


def _candidates(kk: int) -> int:
    """Elements per output examined before the exactness check of :func:`_pruned_topk`.

    With too few, the check fails often and those rows are recomputed over every element: on the
    paper's MLP after some epochs of k = 4 training, 32 candidates failed for about half of the
    (image, hidden unit) rows (a step 1.6x slower than with 64, which fail for almost none); on a
    freshly initialised one 64 cost about a fifth more than 32."""
    return max(64, 16 * kk)


def _pruned_topk(c: torch.Tensor, m_pos: torch.Tensor, m_neg: torch.Tensor, kk: int):
    """The top-``kk`` gains and losses of :class:`_TopKGains` for a shared ``c`` ``(O, J)``, exactly, mostly
    from a few candidates per output.

    No element can gain or lose more than ``|c[o, j]| * reach[j]``, where ``reach[j]`` is the
    largest move of element ``j`` over every image and column (float rounding keeps this:
    ``|fl(c m)| <= fl(|c| reach)`` for ``|m| <= reach``). Each output examines the ``M``
    elements of largest bound; when the ``kk``-th best of them is at least the ``(M + 1)``-th
    bound, no other element can displace it and the top-``kk`` sum is exact. The rows where
    that check fails are recomputed over every element.

    Args:
        c: ``(O, J)``; m_pos, m_neg: ``(N, L, J)``, ``>= 0`` and ``<= 0``.

    Returns:
        ``(up, up_idx, down, down_idx)``: ``(N, O, L)`` sums and ``(N, O, L, kk)`` element indices.
    """
    outs, width = c.shape
    m = _candidates(kk)
    reach = torch.maximum(m_pos.amax(dim=(0, 1)), m_neg.neg().amax(dim=(0, 1)))  # (J,)
    top = (c.abs() * reach).topk(m + 1, dim=1)  # (O, M + 1)
    cand, beyond = top.indices[:, :m], top.values[:, m]  # (O, M), (O,)
    cc = c.gather(1, cand)
    c_pos, c_neg = cc.clamp(min=0)[None, :, None, :], cc.clamp(max=0)[None, :, None, :]  # (1, O, 1, M)
    mp = m_pos[:, :, cand].permute(0, 2, 1, 3)  # (N, O, L, M)
    mn = m_neg[:, :, cand].permute(0, 2, 1, 3)
    out = []
    for g, first, second in ((torch.addcmul(c_pos * mp, c_neg, mn), m_pos, m_neg),
                             (torch.addcmul(c_pos * mn, c_neg, mp).neg_(), m_neg, m_pos)):
        best = g.topk(kk, dim=3)
        idx = cand[None, :, None, :].expand(g.shape).gather(3, best.indices)
        total = best.values.sum(dim=3)
        redo = best.values[..., -1] < beyond[None, :, None]  # (N, O, L): an unexamined element may be better
        if bool(redo.any()):
            n_r, o_r, l_r = redo.nonzero(as_tuple=True)
            cf = c[o_r]  # (F, J)
            full = torch.addcmul(cf.clamp(min=0) * first[n_r, l_r], cf.clamp(max=0), second[n_r, l_r])
            if first is m_neg:
                full = full.neg_()
            again = full.topk(kk, dim=1)
            total[n_r, o_r, l_r] = again.values.sum(dim=1)
            idx[n_r, o_r, l_r] = again.indices
        out += [total, idx]
    return out[0], out[1], out[2], out[3]


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
                    if not grouped and cb.shape[0] == 1 and _PRUNE and 2 * _candidates(kk) < width:
                        # most of the work: the candidates each output's top-k must come from
                        parts = _pruned_topk(cb[0, o0:o1], m_pos[n0:n1], m_neg[n0:n1], kk)
                        up[n0:n1, o0:o1], up_idx[n0:n1, o0:o1], dn[n0:n1, o0:o1], dn_idx[n0:n1, o0:o1] = parts
                        continue
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
