"""``PatchPerturbation``: the patch threat model as an auto_LiRPA perturbation.

For one location the feasible set is a box: pixels inside the patch range over
the valid pixel domain, every other pixel is fixed. Locations are a batch
dimension: the tensor handed to ``BoundedTensor`` holds one row per
(image, location) pair, image-major, so row ``r`` is image ``r // L`` with
location ``r % L``. :meth:`PatchPerturbation.expand` builds that tensor.

Because the perturbation is a box (a ``PerturbationLpNorm`` with ``norm=inf`` and
explicit ``x_L``/``x_U``), every auto_LiRPA bound method that handles boxes works:
IBP, CROWN/backward, CROWN-IBP, and any graph auto_LiRPA parses.

Example::

    ptb = PatchPerturbation(size=2, shape="square")           # all 729 locations on 28x28
    rows = ptb.expand(images)                                 # (N * 729, 1, 28, 28)
    lb, ub = model.compute_bounds(x=(BoundedTensor(rows, ptb),), method="IBP")
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import numpy as np
import torch
from auto_LiRPA.perturbations import PerturbationLpNorm

from .domain import PixelDomain, _value_range, check_strength
from .errors import UsageError
from .locations import Locations, all_locations, explicit_locations, position_rows
from .shapes import PatchShape, SizeLike, make_shape

Layout = Literal["nchw", "nhwc", "flat"]


class PatchPerturbation(PerturbationLpNorm):
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
        domain: Optional[PixelDomain] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        value_range: tuple[float, float] = (0.0, 1.0),
        layout: Layout = "nchw",
        image_shape: Optional[Sequence[int]] = None,
        strength: float = 1.0,
    ) -> None:
        super().__init__(eps=0.0, norm=np.inf)
        if layout not in ("nchw", "nhwc", "flat"):
            raise UsageError(f"layout must be nchw, nhwc or flat, got {layout!r}", param="layout")
        if layout == "flat" and image_shape is None:
            raise UsageError("layout='flat' needs image_shape=(C, H, W)", param="image_shape")
        strength = check_strength(strength)
        if domain is None:
            domain = PixelDomain(*_value_range(value_range), mean, std)
        elif mean is not None or std is not None:
            raise UsageError("give either domain= or mean=/std=, not both", param="domain")
        self.domain = domain
        self.layout: Layout = layout
        self.image_shape = tuple(int(v) for v in image_shape) if image_shape is not None else None
        self.strength = float(strength)
        image_size = self.image_shape[1:] if self.image_shape is not None and len(self.image_shape) == 3 else None
        self.patch_shape = shape if isinstance(shape, PatchShape) else make_shape(shape, size, image_size=image_size)
        self._positions = None
        self._locations: Optional[Locations] = None
        self._masks: Optional[torch.Tensor] = None
        if masks is not None:
            if locations is not None:
                raise UsageError("give either locations= or masks=, not both", param="masks")
            masks = torch.as_tensor(masks).to(torch.bool)
            if masks.ndim not in (3, 4) or masks.shape[-3] == 0:
                raise UsageError(f"masks must be (L, H, W) or (N, L, H, W) with L >= 1, got {tuple(masks.shape)}",
                                 param="masks")
            self._masks = masks
        elif isinstance(locations, Locations):
            self._locations = locations
        elif locations is not None and not (isinstance(locations, str) and locations == "all"):
            if isinstance(locations, str):
                raise UsageError(f"locations must be 'all', a Locations set or positions, got {locations!r}",
                                 param="locations")
            self._positions = position_rows(locations, self.patch_shape)

    # ------------------------------------------------------------------ locations
    def _image_size_from(self, x: Optional[torch.Tensor]) -> tuple[int, int]:
        if self.image_shape is not None:
            return self.image_shape[1], self.image_shape[2]
        if x is None:
            raise UsageError("the image size is unknown: pass image_shape= or bound a tensor first")
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
        return self.locations(x).masks

    @property
    def num_locations(self) -> int:
        """``L``, the number of locations per image."""
        return int(self.masks().shape[-3])

    def expand(self, images: torch.Tensor) -> torch.Tensor:
        """Repeat each image once per location: ``(N, ...)`` -> ``(N * L, ...)``, image-major."""
        return images.repeat_interleave(int(self.masks(images).shape[-3]), dim=0)

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
                    f"per-image masks give {masks.shape[0]} rows but the bounded tensor has {rows}"
                )
            return masks
        n_loc = masks.shape[0]
        if rows % n_loc:
            raise UsageError(
                f"the bounded tensor has {rows} rows, not a multiple of the {n_loc} locations; "
                "build it with PatchPerturbation.expand(images)"
            )
        return masks.repeat(rows // n_loc, 1, 1)

    def bounds(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The box ``(x_L, x_U)`` for rows ``x`` (same shape and layout as ``x``)."""
        img = self._to_nchw(x)
        if img.ndim != 4:
            raise UsageError(f"expected image rows (R, C, H, W) in layout {self.layout}, got {tuple(x.shape)}")
        rows, channels, height, width = img.shape
        masks = self._row_masks(rows, x)
        if tuple(masks.shape[-2:]) != (height, width):
            raise UsageError(
                f"location masks are {masks.shape[-2]}x{masks.shape[-1]} but images are {height}x{width}"
            )
        lo, hi = self.domain.bounds(channels, img)
        lo, hi = lo.view(1, channels, 1, 1), hi.view(1, channels, 1, 1)
        s = self.strength
        low = img + s * (lo - img)
        high = img + s * (hi - img)
        low, high = torch.minimum(low, high), torch.maximum(low, high)
        m = masks[:, None, :, :]
        x_l = torch.where(m, torch.minimum(low, img), img)
        x_u = torch.where(m, torch.maximum(high, img), img)
        return self._from_nchw(x_l, x), self._from_nchw(x_u, x)

    def init(self, x, aux=None, forward=False):
        x_l, x_u = self.bounds(x)
        # Re-initialise the parent as an explicit box: sets x_L/x_U (auto_LiRPA 0.3)
        # and the derived centre/radius that newer auto_LiRPA caches.
        saved = dict(self.__dict__)
        PerturbationLpNorm.__init__(self, norm=np.inf, x_L=x_l, x_U=x_u)
        for key in ("domain", "layout", "image_shape", "strength", "patch_shape", "_positions",
                    "_locations", "_masks"):
            setattr(self, key, saved[key])
        return super().init(x, aux, forward)

    def __repr__(self) -> str:
        where = "masks" if self._masks is not None else ("all" if self._positions is None and self._locations is None else "explicit")
        return (
            f"PatchPerturbation(shape={self.patch_shape.describe()}, locations={where}, "
            f"strength={self.strength}, layout={self.layout})"
        )
