"""Location sets: where a patch may be placed.

A location is one variant of a :class:`~lirpa_patch.shapes.PatchShape` at one
top-left position. A :class:`Locations` set holds the boolean pixel mask of every
location, ``(L, H, W)``, so that perturbations and bound computations treat
locations as a batch dimension.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import UsageError
from .shapes import PatchShape


@dataclass(frozen=True)
class Locations:
    """A set of patch locations on an ``H x W`` image.

    Attributes:
        shape: the patch shape.
        masks: ``(L, H, W)`` bool, True where the attacker controls the pixel.
        variant: ``(L,)`` int64, which variant of ``shape`` each location uses.
        top: ``(L,)`` int64, row of the variant's top-left corner.
        left: ``(L,)`` int64, column of the variant's top-left corner.
    """

    shape: PatchShape
    masks: torch.Tensor
    variant: torch.Tensor
    top: torch.Tensor
    left: torch.Tensor

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    @cached_property
    def tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:func:`pixel_tables` of :attr:`masks`, computed once."""
        return pixel_tables(self.masks)

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.masks.shape[1]), int(self.masks.shape[2])

    def subset(self, index: torch.Tensor | slice | Sequence[int]) -> "Locations":
        """The locations selected by ``index`` (a slice, list or index tensor)."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long)
        return Locations(self.shape, self.masks[index], self.variant[index], self.top[index], self.left[index])

    def describe(self, i: int) -> dict:
        """JSON-friendly description of location ``i``: shape, variant size, top, left."""
        v = self.shape.variants[int(self.variant[i])]
        return {
            "shape": self.shape.name,
            "variant": int(self.variant[i]),
            "height": int(v.shape[0]),
            "width": int(v.shape[1]),
            "top": int(self.top[i]),
            "left": int(self.left[i]),
        }

    def to(self, device: torch.device | str) -> "Locations":
        return Locations(self.shape, self.masks.to(device), self.variant, self.top, self.left)


def pixel_tables(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixel lists and bounding boxes of location masks ``(M, H, W)``.

    Returns ``(pix, top, left, inbox)``: ``pix`` ``(M, P)`` int64 the pixels (``h * W + w``)
    of each location, ``-1`` padding; ``top``, ``left`` ``(M,)`` the corner of its bounding
    box; ``inbox`` ``(M, bh, bw)`` bool its pixels inside a box of the largest size.
    """
    m, height, width = masks.shape
    flat = masks.reshape(m, -1)
    counts = flat.sum(1)
    p = int(counts.max()) if m else 0
    which, pixel = flat.nonzero(as_tuple=True)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(which.numel(), device=masks.device) - first[which]
    pix = torch.full((m, max(p, 1)), -1, dtype=torch.long, device=masks.device)
    pix[which, rank] = pixel
    rows_any, cols_any = masks.any(2), masks.any(1)
    empty = counts == 0
    top = torch.where(empty, 0, rows_any.float().argmax(1))
    bottom = torch.where(empty, 0, height - 1 - rows_any.flip(1).float().argmax(1))
    left = torch.where(empty, 0, cols_any.float().argmax(1))
    right = torch.where(empty, 0, width - 1 - cols_any.flip(1).float().argmax(1))
    bh = int((bottom - top).max()) + 1 if m else 1
    bw = int((right - left).max()) + 1 if m else 1
    padded = F.pad(masks, (0, bw, 0, bh))
    iy = top[:, None] + torch.arange(bh, device=masks.device)[None, :]
    ix = left[:, None] + torch.arange(bw, device=masks.device)[None, :]
    inbox = padded[torch.arange(m, device=masks.device)[:, None, None], iy[:, :, None], ix[:, None, :]]
    return pix, top.long(), left.long(), inbox


def _place(variant_mask: torch.Tensor, tops: torch.Tensor, lefts: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Masks ``(L, H, W)`` for one variant placed at each (top, left)."""
    height, width = image_size
    n = tops.numel()
    masks = torch.zeros(n, height, width, dtype=torch.bool)
    dy, dx = torch.nonzero(variant_mask, as_tuple=True)  # pixels of the variant (few)
    rows = tops[:, None] + dy[None, :]
    cols = lefts[:, None] + dx[None, :]
    idx = torch.arange(n)[:, None].expand_as(rows)
    masks[idx, rows, cols] = True
    return masks


def _check_fits(shape: PatchShape, image_size: tuple[int, int]) -> None:
    height, width = image_size
    fits = [v for v in shape.variants if v.shape[0] <= height and v.shape[1] <= width]
    if not fits:
        dims = ", ".join(f"{v.shape[0]}x{v.shape[1]}" for v in shape.variants)
        raise UsageError(f"patch {shape.name} ({dims}) is larger than the {height}x{width} image", param="size")


def num_locations(shape: PatchShape, image_size: Sequence[int]) -> int:
    """How many locations :func:`all_locations` gives, without building a mask: 0 when nothing fits.

    For each variant ``h x w`` that fits on the ``H x W`` image, ``(H - h + 1) * (W - w + 1)``.
    """
    height, width = int(image_size[0]), int(image_size[1])
    total = 0
    for v in shape.variants:
        h, w = int(v.shape[0]), int(v.shape[1])
        if h <= height and w <= width:
            total += (height - h + 1) * (width - w + 1)
    return total


def all_locations(shape: PatchShape, image_size: Sequence[int]) -> Locations:
    """Every position where a variant of ``shape`` fits entirely inside the image.

    An ``n x n`` square on an ``m x m`` image gives ``(m - n + 1)**2`` locations.
    Variants that do not fit (a 1x30 line on a 28x28 image) contribute none.
    Order: variant, then row, then column.
    """
    size = (int(image_size[0]), int(image_size[1]))
    _check_fits(shape, size)
    masks, variants, tops, lefts = [], [], [], []
    for k, v in enumerate(shape.variants):
        nr, nc = size[0] - v.shape[0] + 1, size[1] - v.shape[1] + 1
        if nr <= 0 or nc <= 0:
            continue
        t = torch.arange(nr).repeat_interleave(nc)
        l = torch.arange(nc).repeat(nr)
        masks.append(_place(v, t, l, size))
        variants.append(torch.full((t.numel(),), k, dtype=torch.long))
        tops.append(t)
        lefts.append(l)
    return Locations(shape, torch.cat(masks), torch.cat(variants), torch.cat(tops), torch.cat(lefts))


def position_rows(positions: torch.Tensor | Sequence, shape: PatchShape) -> torch.Tensor:
    """Explicit positions as ``(L, 3)`` int64 rows ``(variant, top, left)``, checked except against an image.

    Args:
        positions: ``(L, 2)`` rows ``(top, left)`` (variant 0) or ``(L, 3)`` rows ``(variant, top, left)``.

    Raises:
        UsageError: (``param="locations"``) not integer rows of 2 or 3 values, an empty list,
            or a variant the shape does not have.
    """
    try:
        raw = torch.as_tensor(positions)
    except (TypeError, ValueError, RuntimeError):
        raise UsageError(f"locations must be (top, left) or (variant, top, left) rows, got {positions!r}",
                         param="locations") from None
    if raw.numel() == 0:
        raise UsageError("locations is an empty list; give at least one position", param="locations")
    if raw.dtype.is_floating_point or raw.dtype.is_complex or raw.dtype == torch.bool:
        raise UsageError(f"locations must hold integers, got dtype {raw.dtype}", param="locations")
    if raw.ndim not in (1, 2) or raw.shape[-1] not in (2, 3):
        raise UsageError("locations must be (top, left) or (variant, top, left) rows", param="locations")
    pos = raw.to(torch.long).reshape(-1, raw.shape[-1])
    if pos.shape[1] == 2:
        pos = torch.cat([torch.zeros(pos.shape[0], 1, dtype=torch.long), pos], 1)
    if bool((pos[:, 0] < 0).any()) or bool((pos[:, 0] >= len(shape.variants)).any()):
        raise UsageError(f"location variant out of range (shape has {len(shape.variants)} variants)",
                         param="locations")
    return pos


def explicit_locations(shape: PatchShape, image_size: Sequence[int], positions: torch.Tensor | Sequence) -> Locations:
    """Locations at given positions.

    Args:
        positions: ``(L, 2)`` rows of ``(top, left)`` (variant 0) or ``(L, 3)`` rows
            of ``(variant, top, left)``.

    Raises:
        UsageError: when a position puts the patch (partly) outside the image.
    """
    size = (int(image_size[0]), int(image_size[1]))
    pos = position_rows(positions, shape)
    heights = torch.tensor([v.shape[0] for v in shape.variants])[pos[:, 0]]
    widths = torch.tensor([v.shape[1] for v in shape.variants])[pos[:, 0]]
    bad = (pos[:, 1] < 0) | (pos[:, 2] < 0) | (pos[:, 1] + heights > size[0]) | (pos[:, 2] + widths > size[1])
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise UsageError(
            f"location (top={int(pos[i, 1])}, left={int(pos[i, 2])}) puts the patch outside the "
            f"{size[0]}x{size[1]} image", param="locations"
        )
    masks = torch.zeros(pos.shape[0], *size, dtype=torch.bool)
    for k, v in enumerate(shape.variants):
        sel = pos[:, 0] == k
        if bool(sel.any()):
            masks[sel] = _place(v, pos[sel, 1], pos[sel, 2], size)
    return Locations(shape, masks, pos[:, 0].clone(), pos[:, 1].clone(), pos[:, 2].clone())
