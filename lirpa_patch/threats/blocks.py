"""Location groups: blocks of adjacent patch locations, bounded by their union first.

A block of ``s x s`` adjacent positions of one shape variant is itself a patch threat
whose pixels are the union of its members' pixels; its box contains every member's
box, so a certified lower margin of the block is a lower margin of each member. The
engine bounds the coarsest blocks first; a block that certifies settles all its
members at once, one that does not is split into its (up to four) children, down to
single locations. When nothing is refined after IBP, a block whose bound is above the
smallest location margin of its image found so far settles too: none of its members
can lower the image's worst margin (:func:`lirpa_patch.engine._grouped`). Certified
decisions and the worst margins of images that are not certified are the per-location
ones, with far fewer bound computations when most blocks settle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..locations import Locations

__all__ = ["BlockLevel", "block_levels", "children"]


@dataclass
class BlockLevel:
    """The blocks of one size.

    Attributes:
        size: blocks hold up to ``size x size`` adjacent positions of one variant.
        blocks: one location per block, its mask the union of its members'.
        first: ``(G,)`` the first member location of each block (its representative).
        parent: ``(G,)`` the block of the next coarser level holding this one, or None
            at the coarsest level.
        child_of: ``(L or G_finer,)`` for the next finer level (or the locations), the
            block of this level that holds each of them.
        member_of: ``(L,)`` the block of this level that holds each location.
    """

    size: int
    blocks: Locations
    first: torch.Tensor
    parent: Optional[torch.Tensor]
    child_of: torch.Tensor
    member_of: torch.Tensor


def _group(locations: Locations, size: int) -> torch.Tensor:
    """``(L,)`` the block of each location for blocks of ``size x size`` positions."""
    span = int(max(locations.image_size)) // size + 2
    key = (locations.variant * span + locations.top // size) * span + locations.left // size
    return torch.unique(key, return_inverse=True)[1]


def _level(locations: Locations, size: int) -> tuple[Locations, torch.Tensor, torch.Tensor]:
    group = _group(locations, size)
    n = int(group.max()) + 1 if group.numel() else 0
    flat = locations.masks.reshape(len(locations), -1).to(torch.uint8)
    union = torch.zeros(n, flat.shape[1], dtype=torch.uint8).scatter_reduce_(
        0, group[:, None].expand_as(flat), flat, "amax")
    order = torch.arange(len(locations))
    first = torch.full((n,), len(locations), dtype=torch.long).scatter_reduce_(0, group, order, "amin")
    blocks = Locations(locations.shape, union.bool().reshape(n, *locations.image_size), locations.variant[first],
                       locations.top[first], locations.left[first])
    return blocks, first, group


def block_levels(locations: Locations, size: int) -> list[BlockLevel]:
    """Block levels of sizes ``size, size/2, ..., 2`` (coarse to fine); ``size`` a power of two >= 2."""
    if size < 2 or size & (size - 1):
        raise ValueError(f"block size must be a power of two >= 2, got {size}")
    sizes = []
    s = size
    while s >= 2:
        sizes.append(s)
        s //= 2
    built = [_level(locations, s) for s in sizes]
    levels = []
    for i, (s, (blocks, first, group)) in enumerate(zip(sizes, built)):
        # the finer level's units: the next blocks, or the locations themselves at the last level
        finer_first = built[i + 1][1] if i + 1 < len(built) else torch.arange(len(locations))
        child_of = group[finer_first]
        parent = None if i == 0 else built[i - 1][2][first]
        levels.append(BlockLevel(s, blocks, first, parent, child_of, group))
    return levels


def children(child_of: torch.Tensor, parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For pending ``parents`` ``(P,)``: ``(which (U,), unit (U,))``: every finer unit of each, by parent position."""
    order = torch.argsort(child_of, stable=True)
    counts = torch.bincount(child_of, minlength=int(parents.max()) + 1 if parents.numel() else 0)
    starts = torch.cumsum(counts, 0) - counts
    n = counts[parents]
    which = torch.repeat_interleave(torch.arange(parents.numel(), device=parents.device), n)
    offset = torch.arange(int(n.sum()), device=parents.device) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
    return which, order[starts[parents][which] + offset]
