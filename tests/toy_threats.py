"""A third threat for the tests, written as a user would: one subclass of :class:`lirpa_patch.Threat`."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from lirpa_patch import PatchPerturbation, Threat
from lirpa_patch.locations import Locations, all_locations
from lirpa_patch.shapes import make_shape


class RegionPatch(Threat):
    """A ``size x size`` patch anywhere inside ``region`` ``(H, W)`` bool: one row per such location."""

    name = "region-patch"

    def __init__(self, size: int, region: torch.Tensor) -> None:
        self.size, self.region = size, region.bool()
        self.locations: Optional[Locations] = None

    def prepare(self, image_size: Sequence[int]) -> None:
        every = all_locations(make_shape("square", self.size), image_size)
        inside = ~(every.masks & ~self.region).flatten(1).any(1)
        self.locations = every.subset(torch.nonzero(inside).flatten())

    @property
    def rows_per_image(self) -> int:
        return len(self.locations)

    @property
    def label(self) -> str:
        return f"{self.size}x{self.size} in region"

    @property
    def location_set(self) -> Optional[Locations]:
        return self.locations

    def perturbation(self, images, rows, *, domain, strength, stand_in=False):
        index = torch.arange(len(self.locations))[rows]
        ptb = PatchPerturbation(locations=self.locations, index=index, domain=domain, strength=strength)
        return ptb.rows_for(images, stand_in=stand_in), ptb

    def rows_at(self, images, img, row, *, domain, strength=1.0, stand_in=False):
        ptb = PatchPerturbation(locations=self.locations, index=row, domain=domain, strength=strength)
        return ptb.rows_at(images, img, stand_in=stand_in), ptb

    def locate(self, row: int) -> Optional[dict]:
        return self.locations.describe(int(row))

    def describe(self) -> dict:
        return {"threat": self.name, "size": self.size, "region_pixels": int(self.region.sum())}
