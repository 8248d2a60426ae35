"""Patch shapes as boolean masks.

A :class:`PatchShape` is one or more *variants* (e.g. a horizontal and a vertical
line), each a tight boolean mask ``(h, w)``. The attacker may use any variant at
any position where it fits inside the image.

Pixel-count rule (paper, Appendix A.2): for a patch size ``HxW`` and shape ``S`` every shape
gets the same number of pixels ``P = H * W`` as the H x W rectangle, where that
is possible:

==============  =================================================================
square          the H x W block itself (a true square when H == W). Exact.
line            1 x P (horizontal) and P x 1 (vertical); ``hline``/``vline`` keep
                one orientation. Exact.
parallelogram   H rows of W pixels, each row shifted one pixel further (right- and
                left-leaning variants). Exact.
rectangle       for H != W: H x W and W x H. For an n x n request: a x b and b x a
                with a = ceil(n / 2), b = round(P / a) (halves round up). Exact
                when a divides P (n even), otherwise within a/2 pixels, e.g.
                5x5 -> 3x8 (24 pixels), 3x3 -> 2x5 (10 pixels). For n = 2 this is
                1 x 4, the only non-square rectangle with four pixels.
diamond         the L1 ball |dy| + |dx| <= r, which has 2r^2 + 2r + 1 pixels
                (1, 5, 13, 25, 41, ...). r minimises the difference to P, ties go
                to the larger diamond: 2x2 -> 5 pixels, 5x5 -> 25 (exact).
==============  =================================================================

The count actually used is ``PatchShape.pixel_count``; reports show it.
A custom boolean mask (any 2-D array) is used as given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch

from .errors import UsageError

SHAPE_NAMES: tuple[str, ...] = (
    "square",
    "rectangle",
    "line",
    "hline",
    "vline",
    "diamond",
    "parallelogram",
)
"""Named shapes accepted by :func:`make_shape`."""

TRANSFER_SHAPES: tuple[str, ...] = ("square", "rectangle", "line", "diamond", "parallelogram")
"""The shapes of the paper's Table 5, in its order (the shape ``all`` of the command line)."""

SizeLike = Union[int, Sequence[int]]


@dataclass(frozen=True)
class PatchShape:
    """A patch shape: tight boolean masks, one per variant.

    Attributes:
        name: ``"square"``, ``"diamond"``, ... or ``"custom"``.
        variants: tuple of bool tensors ``(h_v, w_v)``, each with the same pixel count.
        requested_pixels: the pixel count asked for (``H * W`` of the patch size).
    """

    name: str
    variants: tuple[torch.Tensor, ...]
    requested_pixels: int

    @property
    def pixel_count(self) -> int:
        """Number of pixels the attacker controls (the count actually used)."""
        return int(self.variants[0].sum())

    @property
    def exact(self) -> bool:
        """Whether :attr:`pixel_count` equals the requested count."""
        return self.pixel_count == self.requested_pixels

    def describe(self) -> str:
        """Human-readable summary, e.g. ``"line 1x4, 4x1 (4 px)"``."""
        dims = ", ".join(f"{v.shape[0]}x{v.shape[1]}" for v in self.variants)
        return f"{self.name} {dims} ({self.pixel_count} px)"


MAX_PATCH_PIXELS = 1 << 24
"""The largest pixel count :func:`make_shape` builds (a 4096 x 4096 patch): a guard against
allocating gigabytes for a typo such as ``100000000000x2``."""


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def parse_size(size: SizeLike | str) -> tuple[int, int]:
    """Parse ``2``, ``(2, 3)`` or ``"2x3"`` into ``(height, width)``.

    Raises:
        UsageError: (``param="size"``) anything else, or a size that is not positive.
    """
    if isinstance(size, str):
        parts = size.strip().lower().replace("×", "x").split("x")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise UsageError(f"size {size!r} is not of the form HxW (e.g. 2x2)", param="size") from None
        if len(values) == 1:
            values = values * 2
        if len(values) != 2:
            raise UsageError(f"size {size!r} is not of the form HxW (e.g. 2x2)", param="size")
        h, w = values
    elif _is_int(size):
        h = w = int(size)  # type: ignore[arg-type]
    elif isinstance(size, (tuple, list, torch.Size)) and len(size) == 2 and all(_is_int(v) for v in size):
        h, w = (int(v) for v in size)
    else:
        raise UsageError(
            f"size must be an integer n, a pair (h, w) of integers or a string 'HxW', got {size!r}", param="size"
        )
    if h < 1 or w < 1:
        raise UsageError(f"size must be positive, got {h}x{w}", param="size")
    return h, w


def check_pixels(size: SizeLike | str, image_size: Sequence[int] | None = None) -> tuple[int, int]:
    """Parse ``size`` and check, before any mask is built, that its pixel count is sane.

    Raises:
        UsageError: (``param="size"``) the patch has more pixels than the ``(H, W)``
            image (so no shape with its pixel count can fit), or more than
            :data:`MAX_PATCH_PIXELS`.
    """
    h, w = parse_size(size)
    pixels = h * w
    if image_size is not None:
        height, width = int(image_size[0]), int(image_size[1])
        if pixels > height * width:
            raise UsageError(
                f"patch {h}x{w} ({pixels} pixels) is larger than the {height}x{width} image", param="size"
            )
    if pixels > MAX_PATCH_PIXELS:
        raise UsageError(f"patch {h}x{w} has {pixels} pixels; at most {MAX_PATCH_PIXELS} are supported", param="size")
    return h, w


def _block(h: int, w: int) -> torch.Tensor:
    return torch.ones(h, w, dtype=torch.bool)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _rectangle(h: int, w: int) -> list[torch.Tensor]:
    if h != w:
        return [_block(h, w), _block(w, h)]
    pixels = h * w
    a = math.ceil(h / 2)
    b = max(1, _round_half_up(pixels / a))
    if a == b:
        return [_block(a, b)]
    return [_block(a, b), _block(b, a)]


def _diamond(pixels: int) -> list[torch.Tensor]:
    best_r, best_diff = 0, None
    r = 0
    while True:
        count = 2 * r * r + 2 * r + 1
        diff = abs(count - pixels)
        if best_diff is None or diff <= best_diff:
            best_r, best_diff = r, diff
        if count > pixels:
            break
        r += 1
    r = best_r
    coords = torch.arange(-r, r + 1)
    mask = coords.abs()[:, None] + coords.abs()[None, :] <= r
    return [mask]


def _parallelogram(h: int, w: int) -> list[torch.Tensor]:
    rows = torch.arange(h)[:, None]
    cols = torch.arange(w + h - 1)[None, :]
    right = (cols >= rows) & (cols < rows + w)
    if h == 1:
        return [right]
    left = right.flip(1)
    return [right, left]


def _custom(mask: torch.Tensor | np.ndarray) -> PatchShape:
    m = torch.as_tensor(np.asarray(mask)).to(torch.bool)
    if m.ndim != 2:
        raise UsageError(f"a custom patch mask must be 2-D (h, w), got shape {tuple(m.shape)}", param="shape")
    if not bool(m.any()):
        raise UsageError("a custom patch mask must select at least one pixel", param="shape")
    rows = torch.nonzero(m.any(1)).flatten()
    cols = torch.nonzero(m.any(0)).flatten()
    m = m[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].clone()
    return PatchShape("custom", (m,), int(m.sum()))


def make_shape(
    shape: str | torch.Tensor | np.ndarray = "square",
    size: SizeLike | str = 2,
    *,
    image_size: Sequence[int] | None = None,
) -> PatchShape:
    """Build a patch shape.

    Args:
        shape: a name from :data:`SHAPE_NAMES`, ``"rectangle:HxW"`` for an explicit
            rectangle, or a 2-D boolean mask (then ``size`` is ignored).
        size: the patch size, ``n``, ``(h, w)`` or ``"HxW"``; sets the pixel count.
        image_size: ``(H, W)`` of the images, when known: a patch with more pixels than
            the image is refused before any mask is built (see :func:`check_pixels`).

    Returns:
        The :class:`PatchShape`; see the module docstring for the pixel-count rules.

    Raises:
        UsageError: an unknown shape (``param="shape"``), a malformed or oversized
            ``size`` (``param="size"``).
    """
    if not isinstance(shape, str):
        if isinstance(shape, PatchShape):
            return shape
        return _custom(shape)
    name = shape.strip().lower()
    if name.startswith("rectangle:"):
        try:
            h, w = check_pixels(name.split(":", 1)[1], image_size)
        except UsageError as exc:
            raise UsageError(f"shape {shape!r}: {exc}", param="shape") from None
        return PatchShape("rectangle", tuple(_rectangle(h, w)) if h != w else (_block(h, w),), h * w)
    if name not in SHAPE_NAMES:
        raise UsageError(
            f"unknown shape {shape!r}; choose one of {', '.join(SHAPE_NAMES)}, rectangle:HxW, or a mask",
            param="shape",
        )
    h, w = check_pixels(size, image_size)
    pixels = h * w
    if name == "square":
        variants = [_block(h, w)]
    elif name == "rectangle":
        variants = _rectangle(h, w)
    elif name == "line":
        variants = [_block(1, pixels), _block(pixels, 1)] if pixels > 1 else [_block(1, 1)]
    elif name == "hline":
        variants = [_block(1, pixels)]
    elif name == "vline":
        variants = [_block(pixels, 1)]
    elif name == "diamond":
        variants = _diamond(pixels)
    else:  # parallelogram
        variants = _parallelogram(h, w)
    return PatchShape(name, tuple(variants), pixels)
