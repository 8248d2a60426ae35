"""The patch threat: :class:`PatchPerturbation` (an auto_LiRPA perturbation) and its first-layer rules.

For one location the feasible set is a box: pixels inside the patch range over
the valid pixel domain, every other pixel is fixed. Locations are a batch
dimension: the tensor handed to ``BoundedTensor`` holds one row per
(image, location) pair, image-major, so row ``r`` is image ``r // L`` with
location ``r % L``. :meth:`PatchPerturbation.expand` builds that tensor.

Because the perturbation is a box (a ``PerturbationLpNorm`` with ``norm=inf`` and
explicit ``x_L``/``x_U``), every auto_LiRPA bound method that handles boxes works:
IBP, CROWN/backward, CROWN-IBP, and any graph auto_LiRPA parses.

With the plugin operators (:func:`lirpa_patch.bounded_module`)
IBP exploits that a row differs from its clean image in a few pixels:

* the first linear layer computes the clean image's pre-activation once per image
  and adds, per row, only the patch pixels' columns (centre shift and radius);
* the first convolution convolves the clean image once per image and, per row,
  only the window of outputs the patch reaches; later convolutions, ReLUs and
  residual additions carry that window while it is smaller than the map
  (:mod:`lirpa_patch.ops.window`).

The bounds equal plain IBP on the rows (up to float rounding). The engine
(:func:`lirpa_patch.certify`) also avoids building the ``(rows, C, H, W)`` box
itself (``virtual`` mode).

Example::

    ptb = PatchPerturbation(size=2, shape="square")           # all 729 locations on 28x28
    rows = ptb.expand(images)                                 # (N * 729, 1, 28, 28)
    lb, ub = model.compute_bounds(x=(BoundedTensor(rows, ptb),), method="IBP")
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..domain import PixelDomain
from ..errors import UsageError
from ..locations import Locations, all_locations, explicit_locations, pixel_tables, position_rows
from ..ops.state import ElementState, WindowState
from ..ops.window import conv_window, gather_window
from ..shapes import PatchShape, SizeLike, make_shape, parse_size
from .base import Threat
from .box import BoxPerturbation, Layout

__all__ = ["PatchPerturbation", "PatchRows", "PatchThreat"]

_COLUMN_CACHE_BYTES = 512 << 20
"""Largest first-layer column cache per operator (the columns every location reads, twice)."""
_DIRECT_ROWS = True
"""No gradients (off the CPU): grid rows image by image, straight into the image-major rows."""
_SPARSE_ROWS = True
"""CPU, no gradients: rows through the first linear layer as one sparse-dense product per bound (grid or not)."""


@dataclass
class PatchRows:
    """What changes in each row of one bound computation.

    Attributes:
        images: ``(B, ...)`` the distinct clean images, in the bounded tensor's layout.
        row_img: ``(R,)`` image of each row.
        row_loc: ``(R,)`` location (index into the tables below) of each row.
        pix: ``(M, P)`` int64 pixels (``h * W + w``) of each location, ``-1`` padding.
        top, left: ``(M,)`` int64 corner of each location's bounding box.
        inbox: ``(M, bh, bw)`` bool, the location's pixels inside its bounding box.
        size: ``(H, W)`` of the images.
        grid: every image has the same ``M`` locations, in order (``row_loc = r % M``,
            ``row_img = r // M``).
        source: ``(pix (L, P), index (M,))`` when the locations come from a larger set: its
            pixel table and which of its locations each table row is (lets the first layer
            keep work per location set between calls).
    """

    images: torch.Tensor
    row_img: torch.Tensor
    row_loc: torch.Tensor
    pix: torch.Tensor
    top: torch.Tensor
    left: torch.Tensor
    inbox: torch.Tensor
    size: tuple[int, int]
    grid: bool = False
    source: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    @property
    def rows(self) -> int:
        return int(self.row_img.shape[0])


def _elements_of_pixel(el_pix: torch.Tensor, pixels: int) -> torch.Tensor:
    """``(pixels + 1, G)`` int64: the element positions whose source is each pixel (``-1`` padding).

    Row ``pixels`` is all ``-1`` (the slot of padded pixel lists).
    """
    valid = el_pix >= 0
    pos = torch.nonzero(valid).flatten()
    pix = el_pix[pos]
    order = torch.argsort(pix, stable=True)
    pos, pix = pos[order], pix[order]
    counts = torch.bincount(pix, minlength=pixels)
    g = int(counts.max()) if pix.numel() else 1
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(pix.numel(), device=el_pix.device) - first[pix]
    table = torch.full((pixels + 1, max(g, 1)), -1, dtype=torch.long, device=el_pix.device)
    table[pix, rank] = pos
    return table


class PatchPerturbation(BoxPerturbation):
    """Patch attack on a batch of (image, location) rows.

    Args:
        size: patch size ``n``, ``(h, w)`` or ``"HxW"``; sets the pixel count of ``shape``.
        shape: a shape name (see :mod:`lirpa_patch.shapes`), a :class:`PatchShape`,
            or a 2-D boolean mask.
        locations: where the patch may go. ``None``/``"all"``: every valid position
            (resolved from the image size of the first tensor bounded); a
            :class:`Locations`; or positions ``(L, 2)`` ``(top, left)`` / ``(L, 3)``
            ``(variant, top, left)``.
        masks: instead of ``locations``, boolean pixel masks: ``(L, H, W)`` shared by
            all images, or ``(N, L, H, W)`` one set per image (e.g. sampled locations).
        domain: the pixel domain; default ``[0, 1]`` in image space. ``mean``/``std``
            (and ``value_range``) are shortcuts that build one.
        layout: how the bounded tensor stores an image: ``"nchw"`` ``(C, H, W)``,
            ``"nhwc"`` ``(H, W, C)`` or ``"flat"`` (any shape with ``C*H*W``
            elements, C-major like a flattened NCHW image; needs ``image_shape``).
        image_shape: ``(C, H, W)``; needed for ``layout="flat"``, optional otherwise.
        strength: in ``[0, 1]``; the patch interval is ``[x + s(lo - x), x + s(hi - x)]``
            (warm-up during training). 1 is the full threat model.
    """

    def __init__(
        self,
        size: SizeLike | str = 2,
        shape: str | PatchShape | torch.Tensor | np.ndarray = "square",
        locations: Optional[str | Locations | torch.Tensor | Sequence] = None,
        *,
        masks: Optional[torch.Tensor] = None,
        index: Optional[torch.Tensor] = None,
        domain: Optional[PixelDomain] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        value_range: tuple[float, float] = (0.0, 1.0),
        layout: Layout = "nchw",
        image_shape: Optional[Sequence[int]] = None,
        strength: float = 1.0,
    ) -> None:
        super().__init__(domain=domain, mean=mean, std=std, value_range=value_range, layout=layout,
                         image_shape=image_shape, strength=strength)
        image_size = self.image_shape[1:] if self.image_shape is not None else None
        self.patch_shape = shape if isinstance(shape, PatchShape) else make_shape(shape, size, image_size=image_size)
        self._positions = None
        self._locations: Optional[Locations] = None
        self._masks: Optional[torch.Tensor] = None
        if masks is not None:
            if locations is not None:
                raise UsageError("give either locations= or masks=, not both", param="masks")
            masks = torch.as_tensor(masks).to(torch.bool)
            if masks.ndim not in (3, 4):
                raise UsageError(f"masks must be (L, H, W) or (N, L, H, W), got {tuple(masks.shape)}", param="masks")
            if masks.shape[-3] == 0:
                raise UsageError("masks must hold at least one location", param="masks")
            self._masks = masks
        elif isinstance(locations, Locations):
            self._locations = locations
            self.patch_shape = locations.shape
        elif locations is not None and not (isinstance(locations, str) and locations == "all"):
            if isinstance(locations, str):
                raise UsageError(f"locations must be 'all', a Locations set or positions, got {locations!r}",
                                 param="locations")
            self._positions = position_rows(locations, self.patch_shape)  # UsageError now, not when bounding
        self._index: Optional[torch.Tensor] = None
        if index is not None:
            if not isinstance(locations, Locations):
                raise UsageError("index= selects from a Locations set: pass locations=Locations", param="index")
            index = torch.as_tensor(index, dtype=torch.long)
            if index.ndim not in (1, 2) or index.shape[-1] == 0:
                raise UsageError(f"index must be (L,) or (N, L) with L >= 1, got {tuple(index.shape)}", param="index")
            if int(index.min()) < 0 or int(index.max()) >= len(locations):
                raise UsageError(f"index out of range for {len(locations)} locations", param="index")
            self._index = index
        self._rows: Optional[PatchRows] = None
        self._table_cache: dict = {}
        self._images_hint: Optional[torch.Tensor] = None
        self._row_images: Optional[torch.Tensor] = None  # any (image, location) rows (rows_at)
        self._stand_in = False  # the bounded tensor only has the rows' shape (rows_for, rows_at)

    # ------------------------------------------------------------------ locations
    def _image_size_from(self, x: Optional[torch.Tensor]) -> tuple[int, int]:
        if self.image_shape is not None:
            return self.image_shape[1], self.image_shape[2]
        if x is None:
            raise UsageError("the image size is unknown: pass image_shape= or bound a tensor first",
                             param="image_shape")
        if self.layout == "nchw":
            return int(x.shape[-2]), int(x.shape[-1])
        return int(x.shape[-3]), int(x.shape[-2])

    def locations(self, x: Optional[torch.Tensor] = None) -> Optional[Locations]:
        """The resolved :class:`Locations` (None when built from raw ``masks``)."""
        if self._masks is not None:
            return None
        if self._locations is None:
            size = self._image_size_from(x)
            if self._positions is not None:
                self._locations = explicit_locations(self.patch_shape, size, self._positions)
            else:
                self._locations = all_locations(self.patch_shape, size)
        return self._locations

    def masks(self, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Location masks: ``(L, H, W)`` shared, or ``(N, L, H, W)`` per image."""
        if self._masks is not None:
            return self._masks
        if self._index is not None:
            return self._locations.masks[self._index]
        return self.locations(x).masks

    def _shape_of_rows(self, x: Optional[torch.Tensor] = None) -> tuple[int, ...]:
        """``(L,)`` shared locations or ``(N, L)`` per image, without building masks."""
        if self._index is not None:
            return tuple(self._index.shape)
        return tuple(self.masks(x).shape[:-2])

    @property
    def num_locations(self) -> int:
        """``L``, the number of locations per image."""
        return int(self._shape_of_rows()[-1])

    def expand(self, images: torch.Tensor) -> torch.Tensor:
        """Repeat each image once per location: ``(N, ...)`` -> ``(N * L, ...)``, image-major."""
        return images.repeat_interleave(int(self._shape_of_rows(images)[-1]), dim=0)

    def rows_for(self, images: torch.Tensor, *, stand_in: bool = False) -> torch.Tensor:
        """The bounded tensor of ``images`` ``(N, ...)``: each image once per location, image-major
        (a broadcast view for one image), with ``images`` kept as the rows' clean images, which
        the first layer reads instead of finding the distinct images among the rows.

        With ``stand_in`` the tensor is a broadcast view of the first image with the rows' shape
        (no copy): everything this perturbation computes reads the rows' images from ``images``
        (the box of :meth:`bounds` too). For IBP through the plugin operators, which read no
        other values of the bounded tensor."""
        n_loc = int(self._shape_of_rows(images)[-1])
        self._images_hint = images
        self._stand_in = bool(stand_in) and images.shape[0] > 1
        if images.shape[0] == 1 or self._stand_in:
            return images[:1].expand(images.shape[0] * n_loc, *images.shape[1:])
        return images.repeat_interleave(n_loc, dim=0)

    def rows_at(self, images: torch.Tensor, row_img: torch.Tensor, *, stand_in: bool = False) -> torch.Tensor:
        """The bounded tensor of rows ``images[row_img[r]]`` ``(R, ...)``, row ``r`` at the ``r``-th
        location of ``index`` (any (image, location) pairs), with ``images`` and ``row_img`` kept
        for the first layer; ``stand_in`` as in :meth:`rows_for`."""
        self._images_hint, self._row_images = images, row_img
        self._stand_in = bool(stand_in) and images.shape[0] > 1
        if self._stand_in:
            return images[:1].expand(row_img.shape[0], *images.shape[1:])
        return images[row_img]

    # ------------------------------------------------------------------ the box
    def _to_nchw(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "nchw":
            return x
        if self.layout == "nhwc":
            return x.permute(0, 3, 1, 2)
        return x.reshape(x.shape[0], *self.image_shape)

    def _from_nchw(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if self.layout == "nchw":
            return x
        if self.layout == "nhwc":
            return x.permute(0, 2, 3, 1)
        return x.reshape(like.shape)

    def _row_masks(self, rows: int, x: torch.Tensor) -> torch.Tensor:
        masks = self.masks(x).to(x.device)
        if masks.ndim == 4:
            masks = masks.reshape(-1, *masks.shape[-2:])
            if masks.shape[0] != rows:
                raise UsageError(
                    f"per-image masks give {masks.shape[0]} rows but the bounded tensor has {rows}", param="masks"
                )
            return masks
        n_loc = masks.shape[0]
        if rows % n_loc:
            raise UsageError(
                f"the bounded tensor has {rows} rows, not a multiple of the {n_loc} locations; "
                "build it with PatchPerturbation.expand(images)", param="masks"
            )
        return masks.repeat(rows // n_loc, 1, 1)

    def bounds(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The box ``(x_L, x_U)`` for rows ``x`` (same shape and layout as ``x``)."""
        if self._stand_in and self._rows is not None and self._rows.rows == x.shape[0]:
            x = self._rows.images[self._rows.row_img].reshape(x.shape)  # the real rows
        img = self._to_nchw(x)
        if img.ndim != 4:
            raise UsageError(f"expected image rows (R, C, H, W) in layout {self.layout}, got {tuple(x.shape)}",
                             param="layout")
        rows, channels, height, width = img.shape
        masks = self._row_masks(rows, x)
        if tuple(masks.shape[-2:]) != (height, width):
            raise UsageError(
                f"location masks are {masks.shape[-2]}x{masks.shape[-1]} but images are {height}x{width}",
                param="masks",
            )
        m_lo, m_hi = self.moves(x)
        m = self._from_nchw(masks[:, None, :, :].expand(rows, channels, height, width), x)
        return x + torch.where(m, m_lo, torch.zeros_like(m_lo)), x + torch.where(m, m_hi, torch.zeros_like(m_hi))

    # ------------------------------------------------------------------ rows
    def _tables(self, masks: torch.Tensor):
        key = (id(masks), tuple(masks.shape), masks.device)
        cached = self._table_cache.get(key)
        if cached is None or cached[0] is not masks:
            flat = masks.reshape(-1, *masks.shape[-2:])
            cached = (masks, pixel_tables(flat))
            self._table_cache[key] = cached
        return cached[1]

    def _prepare_rows(self, x: torch.Tensor) -> None:
        rows = int(x.shape[0])
        source = None
        if self._index is not None:  # rows pick from a location set: its tables, no masks
            index = self._index.to(x.device)
            tables = [t.to(x.device) for t in self._locations.tables]
            pix, top, left, inbox = (t[index.reshape(-1)] for t in tables)
            layout = tuple(index.shape)
            source = (tables[0], index.reshape(-1))
        else:
            masks = self.masks(x).to(x.device)
            pix, top, left, inbox = self._tables(masks)
            layout = tuple(masks.shape[:-2])
        if self._row_images is not None:  # one row per (image, location) pair, in any order
            row_img = self._row_images.to(x.device)
            if self._images_hint is None or row_img.shape[0] != rows or len(layout) != 1 or layout[0] != rows:
                raise UsageError("row images need one index entry per row and the images", param="index")
            self._rows = PatchRows(self._images_hint, row_img, torch.arange(rows, device=x.device), pix, top, left,
                                   inbox, self._image_size_from(x), False, source)
            return
        if len(layout) == 2:
            n_img, n_loc = layout
            if n_img * n_loc != rows:
                raise UsageError(
                    f"per-image masks give {n_img * n_loc} rows but the bounded tensor has {rows}", param="masks"
                )
            row_loc = torch.arange(rows, device=x.device)
        else:
            n_loc = layout[0]
            if rows % n_loc:
                raise UsageError(
                    f"the bounded tensor has {rows} rows, not a multiple of the {n_loc} locations; "
                    "build it with PatchPerturbation.expand(images)", param="masks"
                )
            n_img = rows // n_loc
            row_loc = torch.arange(rows, device=x.device) % n_loc
        images = self._images_hint
        if images is None or images.shape[0] != n_img or images.shape[1:] != x.shape[1:]:
            images = self._distinct_images(x, n_img, n_loc)
        if images.shape[0] == n_img:
            row_img = torch.arange(rows, device=x.device) // n_loc
        else:  # rows of one image differ: every row is its own image
            row_img = torch.arange(rows, device=x.device)
        size = self._image_size_from(x)
        grid = len(layout) == 1 and images.shape[0] == n_img
        self._rows = PatchRows(images, row_img, row_loc, pix, top, left, inbox, size, grid, source)

    @staticmethod
    def _distinct_images(x: torch.Tensor, n_img: int, n_loc: int) -> torch.Tensor:
        """The images of image-major rows ``x``, or ``x`` itself when the rows of an image differ."""
        firsts = x[::n_loc]
        if n_loc == 1 or x.stride(0) == 0:
            return firsts
        grouped = x.reshape(n_img, n_loc, -1)
        if torch.equal(grouped, firsts.reshape(n_img, 1, -1).expand_as(grouped)):
            return firsts
        return x

    def _root(self, x: torch.Tensor):
        rows = self._rows
        return self.root_state(rows.images), bool(self.virtual)

    @property
    def num_rows(self) -> int:
        return self._rows.rows

    @property
    def row_img(self) -> torch.Tensor:
        return self._rows.row_img

    @property
    def pixel_of(self) -> torch.Tensor:
        return self.geometry(self._rows.images)[1]

    def _element_pixels(self, src: torch.Tensor) -> torch.Tensor:
        """Pixel of each element given its source ids (any shape; ``-1`` stays ``-1``)."""
        pix_of = self.pixel_of
        return torch.where(src >= 0, pix_of[src.clamp(min=0)], src.new_full((), -1))

    def _row_pixel_masks(self) -> torch.Tensor:
        """``(R, H*W + 1)`` bool: the patch pixels of each row (last column: padding slot)."""
        rows = self._rows
        height, width = rows.size
        pix = rows.pix[rows.row_loc]
        out = torch.zeros(rows.rows, height * width + 1, dtype=torch.bool, device=pix.device)
        out.scatter_(1, torch.where(pix >= 0, pix, height * width), True)
        out[:, -1] = False
        return out

    def materialize(self, st: ElementState) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._rows
        el_pix = self._element_pixels(st.src[0])  # (*S)
        hw = rows.size[0] * rows.size[1]
        inside = self._row_pixel_masks()[:, torch.where(el_pix >= 0, el_pix, hw)]  # (R, *S)
        x = st.x[rows.row_img]
        lo, hi = torch.minimum(st.m_lo, st.m_hi), torch.maximum(st.m_lo, st.m_hi)
        if lo.shape[0] > 1:
            lo, hi = lo[rows.row_img], hi[rows.row_img]
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        return x + torch.where(inside, lo, zero), x + torch.where(inside, hi, zero)

    # ------------------------------------------------------------------ first-layer rules
    def mix_linear(self, st: ElementState, coef: torch.Tensor, bias: Optional[torch.Tensor],
                   cache: Optional[dict] = None):
        rows = self._rows
        x = st.x
        if x.dim() < 2:
            return None
        n_b, width = x.shape[0], x.shape[-1]
        lead = tuple(x.shape[1:-1])
        n_lead = int(np.prod(lead)) if lead else 1
        hw = rows.size[0] * rows.size[1]
        el_pix = self._element_pixels(st.src.reshape(-1))
        table = self._table_cache.get(("elements", id(st.src)))
        if table is None or table[0] is not st.src:
            table = (st.src, _elements_of_pixel(el_pix, hw))
            self._table_cache[("elements", id(st.src))] = table
        table = table[1]
        per_image = coef.dim() == 3
        coef_t = coef.transpose(-1, -2)  # (J, O) or (B, J, O)
        m_lo = st.m_lo.reshape(st.m_lo.shape[0], -1)
        m_hi = st.m_hi.reshape(st.m_hi.shape[0], -1)
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        needs_grad = torch.is_grad_enabled() and (coef_t.requires_grad or m_lo.requires_grad or m_hi.requires_grad)
        sparse = _SPARSE_ROWS and n_lead == 1 and not per_image and not needs_grad and x.device.type == "cpu"
        if rows.grid and not per_image and n_lead == 1 and not sparse:
            return _with_lead(self._mix_linear_grid(x, m_lo, m_hi, table, coef_t, bias, cache), lead)
        # Each row adds the centre shift and radius of its patch elements through their columns:
        # an embedding bag (weighted sum of rows of W^T), with no (rows, E, O) gather.
        pix = rows.pix[rows.row_loc]  # (R, P)
        elems = table[torch.where(pix >= 0, pix, hw)].reshape(rows.rows, -1)  # (R, E)
        valid = elems >= 0
        e = elems.clamp(min=0)
        bi = rows.row_img if m_lo.shape[0] > 1 else torch.zeros_like(rows.row_img)
        lo_e, hi_e = m_lo[bi[:, None], e], m_hi[bi[:, None], e]
        centre = torch.where(valid, (lo_e + hi_e) * 0.5, zero)  # (R, E)

        def row_radius() -> torch.Tensor:  # (R, E), unless the location set's radius rows stand in for it
            return torch.where(valid, (hi_e - lo_e).abs() * 0.5, zero)

        col = e % width
        if per_image:  # one table of columns per image, stacked
            table_c = coef_t.reshape(-1, coef_t.shape[-1])  # (B*J, O)
            col = col + rows.row_img[:, None] * width
        else:
            table_c = coef_t
        if sparse:  # grid rows too: one sparse x dense product per bound
            radius_rows = self._radius_rows(table, m_lo, m_hi, coef_t, width, cache)
            return _with_lead(_rows_by_sparse_product(torch.where(valid, col, -1), centre,
                                                      row_radius() if radius_rows is None else None, rows.row_img,
                                                      coef_t, x.reshape(n_b, width), bias, cache, radius_rows), lead)
        radius = row_radius()
        if n_lead == 1:
            d_c = F.embedding_bag(col, table_c, per_sample_weights=centre, mode="sum")  # (R, O)
            d_r = F.embedding_bag(col, table_c.abs(), per_sample_weights=radius, mode="sum")
            y = x.reshape(n_b, width)
            clean = torch.einsum("bj,bjo->bo", y, coef_t) if per_image else y.matmul(coef_t)
        else:
            gathered = table_c[col]  # (R, E, O)
            lead_idx = (e // width).unsqueeze(-1).expand_as(gathered)
            n_out = gathered.shape[-1]
            d_c = gathered.new_zeros(rows.rows, n_lead, n_out).scatter_add_(1, lead_idx, centre.unsqueeze(-1) * gathered)
            d_r = gathered.new_zeros(rows.rows, n_lead, n_out).scatter_add_(
                1, lead_idx, radius.unsqueeze(-1) * gathered.abs())
            y = x.reshape(n_b, n_lead, width)
            clean = torch.bmm(y, coef_t) if per_image else y.matmul(coef_t)
        if bias is not None:
            clean = clean + (bias.unsqueeze(1) if (per_image and n_lead > 1 and bias.dim() == 2) else bias)
        centre_rows = clean[rows.row_img] + d_c
        lower, upper = centre_rows - d_r, centre_rows + d_r
        shape = (rows.rows, *lead, lower.shape[-1])
        return lower.reshape(shape), upper.reshape(shape)

    def _radius_rows(self, table: torch.Tensor, m_lo: torch.Tensor, m_hi: torch.Tensor, coef_t: torch.Tensor,
                     width: int, cache: Optional[dict]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """``(rad (L, O), row_rad (R,))``: the radius term of every location of the rows' location set,
        ``rad[l] = sum over the elements e of l of r_e |W[:, e]|``, and each row's location in it.

        ``r_e`` is the element's largest half-range over the images (the ranges differ only by
        float rounding of ``x`` in ``[lo - x, hi - x]``, so a row's box can only grow: sound),
        which makes the term the same for every image at a location: computed once per
        location set, weight and ranges, not per row. None without a location set.
        """
        rows = self._rows
        if rows.source is None or cache is None:
            return None
        src_pix, src_index = rows.source
        hw = rows.size[0] * rows.size[1]
        half = ((m_hi - m_lo).abs() * 0.5).amax(0)  # (E_all,): every element's largest half-range
        key = (coef_t.data_ptr(), tuple(coef_t.shape), coef_t._version)
        kept = cache.setdefault("radius_rows", {})  # per location set (e.g. blocks and their locations)
        hit = kept.get(id(src_pix))
        if hit is None or hit[0] is not src_pix or hit[1] != key or not torch.equal(hit[2], half):
            elems = table[torch.where(src_pix >= 0, src_pix, hw)].reshape(src_pix.shape[0], -1)  # (L, E)
            valid = elems >= 0
            e = elems.clamp(min=0)
            weights = torch.where(valid, half[e], torch.zeros((), dtype=half.dtype, device=half.device))
            rad = F.embedding_bag(e % width, coef_t.abs(), per_sample_weights=weights, mode="sum")  # (L, O)
            hit = (src_pix, key, half, rad)
            if len(kept) >= 4:
                kept.clear()
            kept[id(src_pix)] = hit
        return hit[3], src_index[rows.row_loc]

    def _column_blocks(self, table: torch.Tensor, loc: torch.Tensor, coef_t: torch.Tensor, width: int,
                       cache: Optional[dict]):
        """``(elems, blocks, |blocks|)`` of table locations ``loc`` ``(U,)``: element ids ``(U, E)`` (``-1``
        padding) and the columns of ``coef_t`` ``(J, O)`` they read, ``(U, E, O)``.

        Without gradients, the columns of the whole location set are gathered once and
        kept in ``cache`` (the calling operator's) while the weight stays the same.
        """
        rows = self._rows
        hw = rows.size[0] * rows.size[1]
        reuse = cache is not None and rows.source is not None and not (torch.is_grad_enabled() and coef_t.requires_grad)
        if reuse:
            all_pix, global_index = rows.source
            key = (coef_t.data_ptr(), tuple(coef_t.shape), tuple(coef_t.stride()), coef_t._version, id(all_pix),
                   tuple(table.shape))
            store = cache.setdefault("columns", {})
            hit = store.get(id(all_pix))
            if hit is None or hit[0] != key or not torch.equal(hit[1], table):
                elems = table[torch.where(all_pix >= 0, all_pix, hw)].reshape(all_pix.shape[0], -1)
                blocks = coef_t[elems.clamp(min=0) % width]
                if blocks.numel() * blocks.element_size() * 2 > _COLUMN_CACHE_BYTES:
                    reuse = False
                else:
                    hit = (key, table, elems, blocks, blocks.abs(), all_pix)
                    if len(store) >= 4:
                        store.clear()
                    store[id(all_pix)] = hit
            if reuse:
                if torch.equal(global_index, torch.arange(all_pix.shape[0], device=global_index.device)):
                    return hit[2], hit[3], hit[4]
                g = global_index[loc]
                return hit[2][g], hit[3][g], hit[4][g]
        pix = rows.pix[loc]
        elems = table[torch.where(pix >= 0, pix, hw)].reshape(loc.numel(), -1)
        blocks = coef_t[elems.clamp(min=0) % width]
        return elems, blocks, blocks.abs()

    def _mix_linear_grid(self, x, m_lo, m_hi, table, coef_t, bias, cache: Optional[dict]):
        """:meth:`mix_linear` when every image has the same locations, in order (the engine's rows).

        The columns of each location are gathered once, ``(M, E, O)``, and every image's
        rows go through them in one batched product per location. Without gradients the
        gathered columns are kept in ``cache`` (the calling operator's) while the weight
        and the locations stay the same.
        """
        rows = self._rows
        n_loc = rows.pix.shape[0]
        n_img = rows.rows // n_loc
        loc = torch.arange(n_loc, device=x.device)
        elems, weights, weights_abs = self._column_blocks(table, loc, coef_t, x.shape[-1], cache)  # (M, E), (M, E, O)
        valid = elems >= 0
        e = elems.clamp(min=0)
        lo_e, hi_e = m_lo[:, e], m_hi[:, e]  # (B|1, M, E)
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        centre = torch.where(valid, (lo_e + hi_e) * 0.5, zero).expand(n_img, n_loc, -1).transpose(0, 1)
        radius = torch.where(valid, (hi_e - lo_e).abs() * 0.5, zero).expand(n_img, n_loc, -1).transpose(0, 1)
        clean = x.reshape(x.shape[0], -1).matmul(coef_t)  # (B, O)
        if bias is not None:
            clean = clean + bias
        if clean.shape[0] != n_img:
            clean = clean[rows.row_img[::n_loc]]
        # Per location m: rows = clean + centre @ W_m -/+ radius @ |W_m|, fused into the products.
        if _DIRECT_ROWS and (not torch.is_grad_enabled() or not (coef_t.requires_grad or centre.requires_grad)):
            # Image by image, straight into the image-major rows (no transposed copies).
            n_out = coef_t.shape[-1]
            lower = x.new_empty(rows.rows, n_out)
            upper = x.new_empty(rows.rows, n_out)
            for b in range(n_img):
                lo_b = lower[b * n_loc:(b + 1) * n_loc].view(n_loc, 1, n_out)
                up_b = upper[b * n_loc:(b + 1) * n_loc].view(n_loc, 1, n_out)
                c_b, r_b, base = centre[:, b:b + 1], radius[:, b:b + 1], clean[b].view(1, 1, n_out)
                torch.baddbmm(base, c_b, weights, out=lo_b)
                lo_b.baddbmm_(r_b, weights_abs, alpha=-1.0)
                torch.baddbmm(base, c_b, weights, out=up_b)
                up_b.baddbmm_(r_b, weights_abs)
            return lower, upper
        mid = torch.baddbmm(clean.unsqueeze(0), centre, weights)  # (M, B, O)
        lower = torch.baddbmm(mid, radius, weights_abs, alpha=-1.0)
        upper = torch.baddbmm(mid, radius, weights_abs)
        return lower.transpose(0, 1).reshape(rows.rows, -1), upper.transpose(0, 1).reshape(rows.rows, -1)

    def linear_backward(self, st: ElementState, last_lA, last_uA, weight: torch.Tensor,
                        bias: Optional[torch.Tensor]):
        """CROWN's bias terms ``(lbias, ubias)`` ``(S, R)`` at the first linear layer ``y = x W^T + b`` whose
        input state is ``st``, exact for the patch box (each row moves only its patch pixels'
        columns); None when the rule does not apply (the stock bound is used).

        ``last_lA``/``last_uA``: ``(S, R, O)`` or None; ``weight`` ``(O, J)``; ``bias`` ``(O,)``.
        """
        if getattr(self, "_rows", None) is None:
            return None
        rows = self._rows
        some = last_lA if last_lA is not None else last_uA
        if st.x.dim() != 2 or st.x.shape[-1] != weight.shape[1] or some.shape[1] != rows.rows:
            return None
        hw = rows.size[0] * rows.size[1]
        el_pix = self._element_pixels(st.src.reshape(-1))  # (J,)
        table = _elements_of_pixel(el_pix, hw)
        pix = rows.pix[rows.row_loc]  # (R, P)
        elems = table[torch.where(pix >= 0, pix, hw)].reshape(rows.rows, -1)  # (R, E)
        valid = elems >= 0
        e = elems.clamp(min=0)
        lo, hi = torch.minimum(st.m_lo, st.m_hi), torch.maximum(st.m_lo, st.m_hi)
        lo, hi = lo.reshape(lo.shape[0], -1), hi.reshape(hi.shape[0], -1)
        bi = rows.row_img if lo.shape[0] > 1 else torch.zeros_like(rows.row_img)
        zero = torch.zeros((), dtype=lo.dtype, device=lo.device)
        lo_e = torch.where(valid, lo[bi[:, None], e], zero)  # (R, E), <= 0
        hi_e = torch.where(valid, hi[bi[:, None], e], zero)  # (R, E), >= 0
        clean = st.x.matmul(weight.t())  # (B, O)
        if bias is not None:
            clean = clean + bias
        clean = clean[rows.row_img]  # (R, O)
        columns = weight.t()[e]  # (R, E, O)

        def side(A: Optional[torch.Tensor], sign: int) -> torch.Tensor | float:
            if A is None:
                return 0.0
            a = torch.einsum("sro,reo->sre", A, columns)
            low, high = (lo_e, hi_e) if sign < 0 else (hi_e, lo_e)
            move = a.clamp(min=0) * low + a.clamp(max=0) * high
            return torch.einsum("sro,ro->sr", A, clean) + move.sum(dim=-1)

        return side(last_lA, -1), side(last_uA, +1)

    def mix_conv(self, node, st: ElementState, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        rows = self._rows
        x = st.x
        height, width = rows.size
        if x.dim() != 4 or tuple(x.shape[-2:]) != (height, width) or getattr(node, "conv_dim", 2) != 2:
            return None
        el_pix = self._element_pixels(st.src[0])  # (C, H, W)
        expected = torch.arange(height * width, device=x.device).view(1, height, width).expand_as(el_pix)
        if not torch.equal(el_pix, expected):
            return None  # the conv input is not laid out like the image: no window
        inbox = rows.inbox[rows.row_loc].unsqueeze(1).to(x.dtype)  # (R, 1, bh, bw)
        top, left = rows.top[rows.row_loc], rows.left[rows.row_loc]
        lo, hi = torch.minimum(st.m_lo, st.m_hi), torch.maximum(st.m_lo, st.m_hi)
        idx = rows.row_img if lo.shape[0] > 1 else torch.zeros_like(rows.row_img)
        size = inbox.shape[-2:]
        dlo = gather_window(lo, idx, top, left, size) * inbox
        dhi = gather_window(hi, idx, top, left, size) * inbox
        ws = WindowState(x, dlo, dhi, top, left, rows.row_img)
        return conv_window(ws, weight, bias, node.stride, node.padding, node.dilation, node.groups)

    def __repr__(self) -> str:
        where = "masks" if self._masks is not None else (
            "all" if self._positions is None and self._locations is None else "explicit")
        return (
            f"PatchPerturbation(shape={self.patch_shape.describe()}, locations={where}, "
            f"strength={self.strength}, layout={self.layout})"
        )


def _with_lead(bounds: tuple[torch.Tensor, torch.Tensor], lead: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows' bounds ``(R, O)`` of a data operand ``(B, *lead, J)`` with ``prod(lead) == 1`` as ``(R, *lead, O)``."""
    return tuple(b.reshape(b.shape[0], *lead, b.shape[-1]) for b in bounds)  # type: ignore[return-value]


def _rows_by_sparse_product(elems: torch.Tensor, centre: torch.Tensor, radius: Optional[torch.Tensor],
                            row_img: torch.Tensor,
                            coef_t: torch.Tensor, images: torch.Tensor, bias: Optional[torch.Tensor],
                            cache: Optional[dict],
                            radius_rows: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper bounds ``(R, O)`` of rows through the first linear layer.

    Row ``r`` is ``clean[row_img[r]] + centre[r] @ W[elems[r]] -/+ radius[r] @ |W[elems[r]]|``:
    one sparse row over the stacked table ``[W; |W|; clean]`` ``(2J + B, O)`` with ``2E + 1``
    entries (the patch's columns twice and the image's clean row), so each bound is one
    CSR x dense product written straight into the rows: no gathered columns, no
    intermediate ``(R, O)`` tensors. With ``radius_rows`` ``(rad (L, O), row_rad (R,))`` the
    radius term of row ``r`` is the precomputed ``rad[row_rad[r]]`` instead (the same for
    every image at a location): one product gives the centre rows, ``E + 1`` entries over
    ``[W; clean]``, and the bounds are the centre minus and plus the radius rows.

    Args:
        elems: ``(R, E)`` element (column) ids of each row, ``-1`` padding.
        centre, radius: ``(R, E)`` each element's centre shift and radius (0 at padding,
            which becomes a zero entry of column 0); ``radius`` is None with ``radius_rows``.
        row_img: ``(R,)`` the row's image (row of ``images``).
        coef_t: ``(J, O)`` the layer's transposed weight; images: ``(B, J)`` the clean inputs; bias: ``(O,)``.
        cache: the calling operator's cache (keeps ``|W|`` while the weight stays the same).
    """
    n_rows = elems.shape[0]
    width = coef_t.shape[0]
    order = elems.argsort(-1)  # CSR rows with non-decreasing columns
    cols = elems.gather(-1, order).clamp(min=0)
    centre = centre.gather(-1, order)
    n_img = images.shape[0]
    key = (coef_t.data_ptr(), tuple(coef_t.shape), tuple(coef_t.stride()), coef_t._version, coef_t.dtype)
    middle = 0 if radius_rows is not None else width  # |W| only when the rows carry their own radii
    kept = cache.setdefault("sparse_tables", {}) if cache is not None else {}
    hit = kept.get(middle)
    if hit is None or hit[0] != key or hit[1].shape[0] < width + middle + n_img:
        # [W; |W|] (or [W]) once per weight, with room for the clean rows of a call's images
        buffer = coef_t.new_empty(width + middle + max(n_img, 64), coef_t.shape[1])
        buffer[:width] = coef_t
        if middle:
            torch.abs(coef_t, out=buffer[width: 2 * width])
        hit = (key, buffer)
        if len(kept) >= 4:
            kept.clear()
        kept[middle] = hit
    start = width + middle
    table = hit[1][: start + n_img]  # (J + middle + B, O)
    # The clean rows by the contiguous copy of W, at least two at a time: BLAS then gives each image's row
    # the same bits whatever the other images of the call (a transposed W, or a single row, does not).
    if n_img == 1:
        table[start:] = images.expand(2, -1).matmul(table[:width])[:1]
    else:
        torch.mm(images, table[:width], out=table[start:])
    if bias is not None:
        table[start:] += bias
    ones = centre.new_ones(n_rows, 1)
    if radius_rows is not None:
        # One product for the centre rows; the radius rows are the same for both bounds.
        mid = _csr_product(torch.cat([cols, (start + row_img).unsqueeze(-1)], -1), torch.cat([centre, ones], -1),
                           table)  # (R, O)
        rad, row_rad = radius_rows
        n_loc = rad.shape[0]
        if n_rows % n_loc == 0 and torch.equal(row_rad.view(-1, n_loc),
                                              torch.arange(n_loc, device=row_rad.device).expand(n_rows // n_loc, -1)):
            lower = torch.sub(mid.view(-1, n_loc, mid.shape[-1]), rad).view(n_rows, -1)  # every location, in order
            return lower, mid.view(-1, n_loc, mid.shape[-1]).add_(rad).view(n_rows, -1)
        spread = rad[row_rad]
        return torch.sub(mid, spread), mid.add_(spread)
    cols = torch.cat([cols, cols + width, (start + row_img).unsqueeze(-1)], -1)
    radius = radius.gather(-1, order)
    lower, upper = (_csr_product(cols, torch.cat((centre, radius * sign, ones), -1), table) for sign in (-1.0, 1.0))
    return lower, upper


def _csr_product(cols: torch.Tensor, values: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``(R, O)``: row ``r`` is ``sum_e values[r, e] * table[cols[r, e]]`` (one CSR x dense product);
    ``cols``, ``values`` ``(R, E)``, each row's columns non-decreasing."""
    n_rows, per_row = cols.shape
    crow = torch.arange(0, n_rows * per_row + 1, per_row, device=cols.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch calls its sparse CSR support beta
        rows = torch.sparse_csr_tensor(crow, cols.reshape(-1), values.reshape(-1), size=(n_rows, table.shape[0]))
        return torch.sparse.mm(rows, table)


_EVERY_LOCATION: "OrderedDict[tuple, Locations]" = OrderedDict()
_EVERY_LOCATION_KEPT = 8


def _every_location(shape: PatchShape, size: tuple[int, int]) -> Locations:
    """:func:`all_locations` of ``shape`` on ``size`` images, with its pixel tables and location groups kept
    for the next threat of the same shape and image size (the last :data:`_EVERY_LOCATION_KEPT`)."""
    key = (shape.name, size, tuple((tuple(v.shape), v.cpu().numpy().tobytes()) for v in shape.variants))
    found = _EVERY_LOCATION.get(key)
    if found is None:
        found = _EVERY_LOCATION[key] = all_locations(shape, size)
        while len(_EVERY_LOCATION) > _EVERY_LOCATION_KEPT:
            _EVERY_LOCATION.popitem(last=False)
    else:
        _EVERY_LOCATION.move_to_end(key)
    return found


class PatchThreat(Threat):
    """The patch threat: one row per location of a patch of one shape (paper eq. 11).

    Args:
        size, shape: the patch (see :func:`~lirpa_patch.shapes.make_shape`; ``size`` defaults
            to 2); ``shape`` may also be a :class:`PatchShape` (``size`` then only names it) or
            a 2-D mask.
        locations: an explicit :class:`Locations` set (default: every valid position,
            resolved on the image size).
    """

    name = "patch"

    def __init__(self, size: Optional[SizeLike | str] = None,
                 shape: str | PatchShape | torch.Tensor | np.ndarray = "square",
                 locations: Optional[Locations] = None) -> None:
        if not isinstance(shape, PatchShape):
            size = 2 if size is None else size
            shape = make_shape(shape, size)
        self.shape: PatchShape = shape
        self.size: Optional[tuple[int, int]] = None if size is None else parse_size(size)
        """The patch size asked for, ``(h, w)`` (None: a built shape given without it)."""
        self.locations: Optional[Locations] = locations

    def prepare(self, image_size: Sequence[int]) -> None:
        """Resolve the locations on ``(H, W)`` images (UsageError if the patch does not fit)."""
        size = (int(image_size[0]), int(image_size[1]))
        if self.locations is None:
            self.locations = _every_location(self.shape, size)
        elif tuple(self.locations.image_size) != size:
            raise UsageError(f"locations are for {self.locations.image_size} images, got {size}", param="locations")
        self.locations.tables  # noqa: B018 - computed once, before any bound

    @property
    def rows_per_image(self) -> int:
        return len(self.locations)

    @property
    def label(self) -> str:
        return f"{self.value} {self.shape.name}"

    @property
    def value(self) -> str:
        if self.size is None or self.shape.name == "custom":
            return f"{self.shape.pixel_count} px"
        return self._size_text

    @property
    def _size_text(self) -> Optional[str]:
        """``size`` as ``"HxW"`` (None when not given)."""
        return None if self.size is None else f"{self.size[0]}x{self.size[1]}"

    @property
    def location_set(self) -> Optional[Locations]:
        return self.locations

    def perturbation(self, images: torch.Tensor, rows: slice, *, domain: Optional[PixelDomain], strength: float,
                     stand_in: bool = False):
        """``(x_rows, ptb)`` bounding locations ``rows`` of every image in ``images`` ``(b, C, H, W)``
        (``stand_in``: see :meth:`PatchPerturbation.rows_for`)."""
        index = torch.arange(len(self.locations))[rows]
        ptb = PatchPerturbation(locations=self.locations, index=index, domain=domain, strength=strength)
        return ptb.rows_for(images, stand_in=stand_in), ptb

    def rows_at(self, images: torch.Tensor, img: torch.Tensor, row: torch.Tensor, *,
                domain: Optional[PixelDomain], strength: float = 1.0, stand_in: bool = False):
        """``(x, ptb)``: image ``images[img[r]]`` with the patch at location ``row[r]``
        (see :meth:`PatchPerturbation.rows_at`)."""
        ptb = PatchPerturbation(locations=self.locations, index=row, domain=domain, strength=strength)
        return ptb.rows_at(images, img, stand_in=stand_in), ptb

    def block_levels(self, size: int):
        """Location-group levels of blocks of ``size``, ``size/2``, ... 2 (cached)."""
        from .blocks import block_levels

        cache = self.locations.__dict__.setdefault("_lp_levels", {})  # shared with every threat on these locations
        if size not in cache:
            cache[size] = block_levels(self.locations, size)
        return cache[size]

    def locate(self, row: int) -> Optional[dict]:
        return self.locations.describe(int(row))

    def describe(self) -> dict:
        out = {"threat": "patch", "shape": self.shape.name}
        if self.size is not None:
            out["size"] = self._size_text
        if self.locations is not None:
            out["num_locations"] = len(self.locations)
        return out

    @classmethod
    def from_description(cls, description: dict) -> "PatchThreat":
        if description.get("size") is None:
            raise UsageError(f"a {description.get('shape')} patch without a size cannot be rebuilt from its description",
                             param="threat")
        return cls(description["size"], description["shape"])

    def report_fields(self, extra: Optional[dict] = None) -> dict:
        shape = self.shape
        return {
            "patch": self._size_text,
            "shape": shape.name,
            "shape_variants": shape.variant_sizes,
            "pixel_count": shape.pixel_count,
            "pixel_counts": list(shape.pixel_counts),
            "requested_pixel_count": int(shape.requested_pixels),
            "num_locations": None if self.locations is None else len(self.locations),
        }

    def attack(self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, **options):
        """:func:`~lirpa_patch.attacks.attack_patch` at this threat's locations (``options`` are its own)."""
        from ..attacks import attack_patch

        return attack_patch(model, images, labels, shape=self.shape, locations=self.locations, **options)
