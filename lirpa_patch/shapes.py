"""Patch shapes as boolean masks.

A :class:`PatchShape` is one or more *variants* (e.g. a horizontal and a vertical
line), each a tight boolean mask ``(h, w)``. The attacker may use any variant at
any position where it fits inside the image.

Pixel-count rule (paper, Appendix A.2 and Table 5: "with the exception of
rectangles, all the shapes have the exact same pixel count" as the square): for
a patch size ``HxW`` and shape ``S`` every shape has exactly ``P = H * W`` pixels, and the
rectangles have at least ``P``:

==============  =================================================================
square          the H x W block itself (a true square when H == W). Exact.
line            1 x P (horizontal) and P x 1 (vertical); ``hline``/``vline`` keep
                one orientation. Exact.
parallelogram   H rows of W pixels, each row shifted one pixel further (right- and
                left-leaning variants). Exact.
diamond         the P pixels nearest to the centre in the L1 norm, ring by ring
                (see :func:`diamond_mask`). When ``P = 2r^2 + 2r + 1`` (1, 5, 13, 25,
                41, ...) it is the L1 ball ``|dy| + |dx| <= r`` (25 px: rows
                1,3,5,7,5,3,1); in between, the next ring is filled from its top and
                bottom tips inwards, left flank before right (4 px: rows 1,2,1;
                9 px: rows 1,2,3,2,1). Exact, 4-connected, and each diamond contains
                the smaller ones.
rectangle       several h x w choices, each with at least P pixels: for every
                height ``h = 2 .. floor(sqrt(P))`` the narrowest ``w = ceil(P / h)``,
                skipping the square itself, in both orientations (25 px: 2x13, 3x9,
                4x7 and their transposes; 6 px: 2x3, 3x2). When no height qualifies
                (P = 4: only the square and the line have four pixels) the next size
                up, ``h x (h + 1)`` with ``h = floor(sqrt(P))`` (4 px: 2x3, 3x2).
                The attacker may use any of them, so an image is certified against
                ``rectangle`` only if it is certified against every one: the worst
                rectangle decides. ``rectangle:HxW`` asks for one explicitly.
==============  =================================================================

The counts actually used are ``PatchShape.pixel_counts`` (one per variant) and
``PatchShape.pixel_count`` (the smallest); reports show them.
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
        variants: tuple of bool tensors ``(h_v, w_v)``; every variant of a named shape
            has the requested pixel count, except rectangles (at least that many).
        requested_pixels: the pixel count asked for (``H * W`` of the patch size).
    """

    name: str
    variants: tuple[torch.Tensor, ...]
    requested_pixels: int

    @property
    def pixel_counts(self) -> tuple[int, ...]:
        """Pixels the attacker controls with each variant."""
        return tuple(int(v.sum()) for v in self.variants)

    @property
    def pixel_count(self) -> int:
        """Pixels the attacker controls: the smallest count over the variants (all equal except rectangles)."""
        return min(self.pixel_counts)

    @property
    def exact(self) -> bool:
        """Whether every variant has exactly the requested pixel count."""
        return all(c == self.requested_pixels for c in self.pixel_counts)

    @property
    def variant_sizes(self) -> list[str]:
        """``"hxw"`` of each variant, e.g. ``["1x4", "4x1"]``."""
        return [f"{int(v.shape[0])}x{int(v.shape[1])}" for v in self.variants]

    def pixel_text(self) -> str:
        """``"4"`` or, for variants of different sizes, ``"26-28"``."""
        low, high = min(self.pixel_counts), max(self.pixel_counts)
        return str(low) if low == high else f"{low}-{high}"

    def describe(self) -> str:
        """Human-readable summary, e.g. ``"line 1x4, 4x1 (4 px)"``."""
        return f"{self.name} {', '.join(self.variant_sizes)} ({self.pixel_text()} px)"


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


def rectangle_sizes(pixels: int) -> list[tuple[int, int]]:
    """The ``(h, w)`` rectangles (``h < w``) of the ``rectangle`` shape for a budget of ``pixels``.

    For every height ``h = 2 .. floor(sqrt(P))``: ``w = ceil(P / h)``, unless that is
    the square itself; when no height qualifies, ``h x (h + 1)`` with
    ``h = floor(sqrt(P))``. Each has at least ``P`` pixels.
    """
    if pixels < 1:
        raise UsageError(f"a patch needs at least one pixel, got {pixels}", param="size")
    sizes = []
    for h in range(2, math.isqrt(pixels) + 1):
        w = -(-pixels // h)
        if w > h:
            sizes.append((h, w))
    if not sizes:
        h = max(1, math.isqrt(pixels))
        sizes.append((h, max(h + 1, -(-pixels // h))))
    return sizes


def _rectangle(pixels: int) -> list[torch.Tensor]:
    variants = []
    for h, w in rectangle_sizes(pixels):
        variants += [_block(h, w), _block(w, h)]
    return variants


def diamond_mask(pixels: int) -> torch.Tensor:
    """The ``diamond`` of exactly ``pixels`` pixels, as a tight bool mask.

    Pixels ``(dy, dx)`` around a centre are taken in this order until there are
    ``pixels`` of them: by L1 ring ``|dy| + |dx|``; within a ring, larger ``|dy|``
    first (the top and bottom tips, then the flanks from the tips inwards, the
    side tips last); then left (``dx < 0``) before right; then top before bottom.
    Equivalently: the pixels nearest to a centre nudged slightly left, in an L1
    norm that weighs rows slightly less than columns. Complete rings give the L1
    ball with ``2r^2 + 2r + 1`` pixels.
    """
    if pixels < 1:
        raise UsageError(f"a patch needs at least one pixel, got {pixels}", param="size")
    r = 0
    while 2 * r * r + 2 * r + 1 < pixels:
        r += 1
    coords = torch.arange(-r, r + 1)
    dy, dx = torch.meshgrid(coords, coords, indexing="ij")
    dy, dx = dy.flatten(), dx.flatten()
    ring = dy.abs() + dx.abs()
    side = torch.sign(dx)
    n = 2 * r + 1
    # lexicographic key (ring, -|dy|, side, dy) as one integer; every part lies in [-n, n]
    base = 2 * n + 1
    key = ((ring * base - dy.abs() + n) * base + side + n) * base + dy + n
    order = torch.argsort(key)[:pixels]
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[dy[order] + r, dx[order] + r] = True
    rows = torch.nonzero(mask.any(1)).flatten()
    cols = torch.nonzero(mask.any(0)).flatten()
    return mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].clone()


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
        variants = (_block(h, w), _block(w, h)) if h != w else (_block(h, w),)
        return PatchShape("rectangle", variants, h * w)
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
        variants = _rectangle(pixels)
    elif name == "line":
        variants = [_block(1, pixels), _block(pixels, 1)] if pixels > 1 else [_block(1, 1)]
    elif name == "hline":
        variants = [_block(1, pixels)]
    elif name == "vline":
        variants = [_block(pixels, 1)]
    elif name == "diamond":
        variants = [diamond_mask(pixels)]
    else:  # parallelogram
        variants = _parallelogram(h, w)
    return PatchShape(name, tuple(variants), pixels)
