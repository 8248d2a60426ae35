"""Interval arithmetic on :class:`~lirpa_patch.ops.state.WindowState`: rows that differ from a clean map in a window.

Every function here is plain tensor code (no auto_LiRPA) and computes exactly what
IBP computes on the full rows, only restricted to where the rows differ from their
clean image: outside the window a row *is* the clean map, so its bounds are the
clean activations, computed once per image. Convolutions are linear, so

    conv(clean + d) = conv(clean) + conv(d)

and the centre/radius of ``d`` only live in the window: the output window is the
set of outputs whose receptive field meets it. Windows have one size for all rows
(batched), may reach past the map (those parts hold zeros) and grow with every
convolution; a caller switches to dense rows (:func:`materialize`) when a window
covers the map.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .state import WindowState

__all__ = [
    "conv_window",
    "grouped_matmul",
    "gather_window",
    "linear_window",
    "materialize",
    "place",
    "relu_window",
    "scale_window",
    "union_add",
]


def _ceil_div(a: torch.Tensor, b: int) -> torch.Tensor:
    return -torch.div(-a, b, rounding_mode="floor")


def place(delta: torch.Tensor, off_y: torch.Tensor, off_x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Rows ``delta`` ``(R, C, h, w)`` placed at ``(off_y[r], off_x[r])`` in zeros ``(R, C, *size)``.

    Parts of a window that fall outside ``size`` are dropped. Offsets usually take a
    few values (one per stride phase): rows sharing an offset are padded together.
    """
    rows, channels, h, w = delta.shape
    height, width = int(size[0]), int(size[1])
    key = off_y * (width + w + 1) + off_x
    uniq, group = torch.unique(key, return_inverse=True)
    if uniq.numel() == 1:
        y, x = int(off_y[0]), int(off_x[0])
        return F.pad(delta, (x, width - w - x, y, height - h - y))
    if uniq.numel() <= 32:
        out = delta.new_empty(rows, channels, height, width)
        order = torch.argsort(group, stable=True)
        counts = torch.bincount(group, minlength=uniq.numel()).tolist()
        start = 0
        for count in counts:
            sel = order[start:start + count]
            first = int(sel[0])
            y, x = int(off_y[first]), int(off_x[first])
            out[sel] = F.pad(delta[sel], (x, width - w - x, y, height - h - y))
            start += count
        return out
    padded = F.pad(delta, (1, 1, 1, 1))  # a zero border the clamped indices fall into
    iy = (torch.arange(height, device=delta.device)[None, :] - off_y[:, None] + 1).clamp_(0, h + 1)  # (R, H)
    ix = (torch.arange(width, device=delta.device)[None, :] - off_x[:, None] + 1).clamp_(0, w + 1)  # (R, W)
    r = torch.arange(rows, device=delta.device)
    out = padded[r[:, None, None], :, iy[:, :, None], ix[:, None, :]]  # (R, H, W, C)
    return out.permute(0, 3, 1, 2)


def gather_window(maps: torch.Tensor, row_img: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor,
                  size: Sequence[int]) -> torch.Tensor:
    """The window ``(R, C, h, w)`` of each row's image map ``maps[row_img]`` ``(B, C, H, W)``; 0 off the map."""
    _, channels, height, width = maps.shape
    h, w = int(size[0]), int(size[1])
    padded = F.pad(maps, (1, 1, 1, 1))
    iy = (oy[:, None] + torch.arange(h, device=maps.device)[None, :] + 1).clamp_(0, height + 1)  # (R, h)
    ix = (ox[:, None] + torch.arange(w, device=maps.device)[None, :] + 1).clamp_(0, width + 1)  # (R, w)
    out = padded[row_img[:, None, None], :, iy[:, :, None], ix[:, None, :]]  # (R, h, w, C)
    return out.permute(0, 3, 1, 2)


def _in_map(origin: torch.Tensor, length: int, limit: int) -> torch.Tensor:
    """``(R, length)`` bool: which positions ``origin + t`` lie in ``[0, limit)``."""
    pos = origin[:, None] + torch.arange(length, device=origin.device)[None, :]
    return (pos >= 0) & (pos < limit)


def materialize(ws: WindowState) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``(lower, upper)`` of the rows, shaped like the tensor ``ws`` stands for."""
    c, height, width = ws.clean.shape[1:]
    h, w = ws.dlo.shape[-2:]
    # Scatter the window into each row's clean map (window parts off the map hold zeros).
    iy = ws.oy[:, None] + torch.arange(h, device=ws.oy.device)[None, :]
    ix = ws.ox[:, None] + torch.arange(w, device=ws.ox.device)[None, :]
    iy, ix = iy.clamp(0, height - 1), ix.clamp(0, width - 1)
    r = torch.arange(ws.rows, device=ws.oy.device)[:, None, None]
    index = (r, iy[:, :, None], ix[:, None, :])
    lo = ws.clean[ws.row_img].permute(0, 2, 3, 1).contiguous()  # (R, H, W, C)
    hi = lo.clone()
    lo = lo.index_put(index, ws.dlo.permute(0, 2, 3, 1), accumulate=True).permute(0, 3, 1, 2).contiguous()
    hi = hi.index_put(index, ws.dhi.permute(0, 2, 3, 1), accumulate=True).permute(0, 3, 1, 2).contiguous()
    if ws.flat:
        lo, hi = lo.reshape(ws.rows, -1), hi.reshape(ws.rows, -1)
    return lo, hi


def relu_window(ws: WindowState) -> WindowState:
    """ReLU: the window's bounds go through ReLU, and so do the clean maps."""
    cw = gather_window(ws.clean, ws.row_img, ws.oy, ws.ox, ws.dlo.shape[-2:])
    base = torch.relu(cw)
    dlo = torch.relu(cw + ws.dlo) - base
    dhi = torch.relu(cw + ws.dhi) - base
    return WindowState(torch.relu(ws.clean), dlo, dhi, ws.oy, ws.ox, ws.row_img, ws.flat)


def scale_window(ws: WindowState, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor]) -> WindowState:
    """``y = x * scale + shift`` with per-channel (or scalar) constants ``(C, 1, 1)`` or ``()``."""
    clean = ws.clean
    dlo, dhi = ws.dlo, ws.dhi
    if scale is not None:
        clean = clean * scale
        a, b = dlo * scale, dhi * scale
        dlo, dhi = torch.minimum(a, b), torch.maximum(a, b)
    if shift is not None:
        clean = clean + shift
    return WindowState(clean, dlo, dhi, ws.oy, ws.ox, ws.row_img, ws.flat)


def _axis(origin: torch.Tensor, length: int, k: int, s: int, p: int, d: int):
    """One spatial axis of a strided convolution of a window.

    Returns ``(q0, n_out, region_start, region_len)``: the first output the window
    reaches (per row), the output window length (one for all rows), and the input
    region ``[region_start, region_start + region_len)`` those outputs read.
    """
    span = (k - 1) * d
    q0 = _ceil_div(origin + p - span, s)
    n_out = (length - 1 + span) // s + 1
    start = q0 * s - p
    return q0, n_out, start, (n_out - 1) * s + span + 1


def conv_window(ws: WindowState, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Sequence[int],
                padding: Sequence[int], dilation: Sequence[int], groups: int) -> WindowState:
    """2-D convolution: clean maps convolved once per image, the window by centre and radius.

    Exactly IBP's centre/radius rule, restricted to the outputs whose receptive field
    meets the window (all others equal the clean convolution).
    """
    (sy, sx), (py, px), (dy, dx) = (tuple(int(v) for v in t) for t in (stride, padding, dilation))
    ky, kx = int(weight.shape[-2]), int(weight.shape[-1])
    h, w = ws.dlo.shape[-2:]
    clean = F.conv2d(ws.clean, weight, bias, (sy, sx), (py, px), (dy, dx), groups)
    out_h, out_w = clean.shape[-2:]
    qy, n_y, start_y, len_y = _axis(ws.oy, h, ky, sy, py, dy)
    qx, n_x, start_x, len_x = _axis(ws.ox, w, kx, sx, px, dx)
    centre = (ws.dlo + ws.dhi) * 0.5
    radius = (ws.dhi - ws.dlo) * 0.5
    c_reg = place(centre, ws.oy - start_y, ws.ox - start_x, (len_y, len_x))
    r_reg = place(radius, ws.oy - start_y, ws.ox - start_x, (len_y, len_x))
    c_out = F.conv2d(c_reg, weight, None, (sy, sx), 0, (dy, dx), groups)
    r_out = F.conv2d(r_reg, weight.abs(), None, (sy, sx), 0, (dy, dx), groups)
    keep = (_in_map(qy, n_y, out_h)[:, None, :, None] & _in_map(qx, n_x, out_w)[:, None, None, :]).to(c_out.dtype)
    dlo = (c_out - r_out) * keep
    dhi = (c_out + r_out) * keep
    return WindowState(clean, dlo, dhi, qy, qx, ws.row_img, False)


def union_add(a: WindowState, b: WindowState) -> WindowState:
    """The sum of two window states over the same rows (a residual connection)."""
    if a.clean.shape != b.clean.shape:
        raise ValueError("window states of different map shapes")
    oy = torch.minimum(a.oy, b.oy)
    ox = torch.minimum(a.ox, b.ox)
    ha, wa = a.dlo.shape[-2:]
    hb, wb = b.dlo.shape[-2:]
    h = int(torch.maximum(a.oy + ha, b.oy + hb).sub(oy).max())
    w = int(torch.maximum(a.ox + wa, b.ox + wb).sub(ox).max())
    dlo = place(a.dlo, a.oy - oy, a.ox - ox, (h, w)) + place(b.dlo, b.oy - oy, b.ox - ox, (h, w))
    dhi = place(a.dhi, a.oy - oy, a.ox - ox, (h, w)) + place(b.dhi, b.oy - oy, b.ox - ox, (h, w))
    return WindowState(a.clean + b.clean, dlo, dhi, oy, ox, a.row_img, a.flat and b.flat)


def grouped_matmul(group: torch.Tensor, *pairs: tuple[torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
    """``out[r] = rows[r] @ blocks[group[r]]`` for each ``(rows (R, K), blocks (G, K, O))`` pair -> ``(R, O)`` each.

    Rows of a group are stacked side by side (padded to the largest group) for one
    batched product, so every block is read once, not once per row; the pairs share
    the grouping work.
    """
    n_groups = pairs[0][1].shape[0]
    n_rows = group.shape[0]
    order = torch.argsort(group, stable=True)
    counts = torch.bincount(group, minlength=n_groups)
    width = int(counts.max()) if counts.numel() else 0
    first = torch.cumsum(counts, 0) - counts
    sorted_group = group[order]
    slot = torch.arange(n_rows, device=group.device) - first[sorted_group]
    back = torch.empty_like(order)
    back[order] = torch.arange(n_rows, device=group.device)
    where = (group, slot[back])
    out = []
    for rows, blocks in pairs:
        padded = rows.new_zeros(n_groups, width, rows.shape[1])
        padded[sorted_group, slot] = rows[order]
        out.append(torch.bmm(padded, blocks)[where])
    return out


def linear_window(ws: WindowState, coef: torch.Tensor, bias: Optional[torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear map of the flattened rows: ``(lower, upper)`` ``(R, O)``.

    Args:
        coef: ``(O, C*H*W)`` shared, or ``(B, O, C*H*W)`` one per image (a specification
            merged into the layer), applied to the channel-major flattened map.
        bias: ``(O,)``, ``(B, O)`` or None.

    The clean maps go through the full map once per image; each row adds the window's
    centre and radius through the coefficients of its window only. Rows are grouped
    by (image when ``coef`` is per image, window corner), so a group shares one
    gathered coefficient block.
    """
    channels, height, width = ws.clean.shape[1:]
    h, w = ws.dlo.shape[-2:]
    per_image = coef.dim() == 3
    n_out = coef.shape[-2]
    clean_flat = ws.clean.reshape(ws.clean.shape[0], -1)
    if per_image:
        y = torch.einsum("boj,bj->bo", coef, clean_flat)
    else:
        y = clean_flat.matmul(coef.t())
    if bias is not None:
        y = y + bias
    # Group rows by (image if needed, window corner).
    key_img = ws.row_img if per_image else torch.zeros_like(ws.row_img)
    keys = torch.stack([key_img, ws.oy, ws.ox], dim=1)
    uniq, group = torch.unique(keys, dim=0, return_inverse=True)
    n_groups = uniq.shape[0]
    # Coefficient block of every group: (G, O, C, h, w), zero where the window leaves the map.
    maps = coef.reshape(*coef.shape[:-1], channels, height, width)
    if not per_image:
        maps = maps.unsqueeze(0)
    pad_y, pad_x = h + 1, w + 1
    padded = F.pad(maps, (pad_x, pad_x, pad_y, pad_y))  # (B|1, O, C, H + 2py, W + 2px)
    iy = (uniq[:, 1:2] + torch.arange(h, device=coef.device)[None, :] + pad_y)
    ix = (uniq[:, 2:3] + torch.arange(w, device=coef.device)[None, :] + pad_x)
    iy = iy.clamp_(0, height + 2 * pad_y - 1)
    ix = ix.clamp_(0, width + 2 * pad_x - 1)
    gi = uniq[:, 0]
    block = padded[gi[:, None, None], :, :, iy[:, :, None], ix[:, None, :]]  # (G, h, w, O, C)
    block = block.permute(0, 3, 4, 1, 2).reshape(n_groups, n_out, channels * h * w)  # (G, O, K)
    centre = ((ws.dlo + ws.dhi) * 0.5).reshape(ws.rows, -1)
    radius = ((ws.dhi - ws.dlo) * 0.5).reshape(ws.rows, -1)
    c_rows, r_rows = grouped_matmul(group, (centre, block.transpose(1, 2)), (radius, block.abs().transpose(1, 2)))
    base = y[ws.row_img]
    return base + c_rows - r_rows, base + c_rows + r_rows
