"""Patch shapes follow the pixel-count rules of the ``lirpa_patch.shapes`` docstring."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lirpa_patch.errors import UsageError
from lirpa_patch.shapes import SHAPE_NAMES, TRANSFER_SHAPES, diamond_mask, make_shape, parse_size, rectangle_sizes

NS = range(1, 7)


def dims(shape) -> list[tuple[int, int]]:
    return [tuple(v.shape) for v in shape.variants]


# ----------------------------------------------------------------------------- every shape


@pytest.mark.parametrize("name", SHAPE_NAMES)
@pytest.mark.parametrize("n", NS)
def test_variants_are_tight_bool_masks(name, n):
    shape = make_shape(name, n)
    assert shape.name == name
    assert shape.requested_pixels == n * n
    for v in shape.variants:
        assert v.dtype == torch.bool and v.ndim == 2
        assert bool(v.any(0).all()) and bool(v.any(1).all())  # no empty border row/column
    assert shape.pixel_counts == tuple(int(v.sum()) for v in shape.variants)
    assert shape.pixel_count == min(shape.pixel_counts)


@pytest.mark.parametrize("name", [n for n in SHAPE_NAMES if n != "rectangle"])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 6, "2x3", "1x5", "3x7"])
def test_every_shape_but_the_rectangle_has_exactly_the_square_pixel_count(name, size):
    """Paper, App. A.2: "with the exception of rectangles, all the shapes have the exact same pixel count"."""
    h, w = parse_size(size)
    shape = make_shape(name, size)
    assert shape.exact and set(shape.pixel_counts) == {h * w}


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 6, "2x3", "1x5", "3x7"])
def test_every_rectangle_has_at_least_the_square_pixel_count(size):
    h, w = parse_size(size)
    shape = make_shape("rectangle", size)
    assert all(count >= h * w for count in shape.pixel_counts)
    assert all(bool(v.all()) for v in shape.variants)


def test_transfer_shapes_are_named_shapes_in_paper_order():
    assert TRANSFER_SHAPES == ("square", "rectangle", "line", "diamond", "parallelogram")
    assert set(TRANSFER_SHAPES) <= set(SHAPE_NAMES)


# ----------------------------------------------------------------------------- per-shape rules


@pytest.mark.parametrize("n", NS)
def test_square_is_the_full_n_by_n_block(n):
    shape = make_shape("square", n)
    assert dims(shape) == [(n, n)]
    assert bool(shape.variants[0].all()) and shape.exact


def test_square_of_non_square_size_is_the_h_by_w_block():
    assert dims(make_shape("square", "2x3")) == [(2, 3)]


@pytest.mark.parametrize("n", NS)
def test_line_is_horizontal_and_vertical_with_n_squared_pixels(n):
    p = n * n
    line = make_shape("line", n)
    assert dims(line) == ([(1, p), (p, 1)] if p > 1 else [(1, 1)])
    assert all(bool(v.all()) for v in line.variants) and line.exact
    assert dims(make_shape("hline", n)) == [(1, p)]
    assert dims(make_shape("vline", n)) == [(p, 1)]


@pytest.mark.parametrize("n", NS)
def test_parallelogram_rows_shift_one_pixel_each(n):
    shape = make_shape("parallelogram", n)
    assert shape.exact
    assert dims(shape) == ([(n, 2 * n - 1)] * 2 if n > 1 else [(1, 1)])
    right = shape.variants[0]
    for row in range(n):
        cols = torch.nonzero(right[row]).flatten().tolist()
        assert cols == list(range(row, row + n))  # W consecutive pixels, shifted by the row index
    if n > 1:
        assert torch.equal(shape.variants[1], right.flip(1))  # the left-leaning variant


def rows(mask: torch.Tensor) -> list[int]:
    return mask.sum(1).tolist()


@pytest.mark.parametrize("pixels", range(1, 50))
def test_rectangles_are_the_narrowest_for_each_height_from_two(pixels):
    sizes = rectangle_sizes(pixels)
    expected = [(h, -(-pixels // h)) for h in range(2, math.isqrt(pixels) + 1) if -(-pixels // h) > h]
    if expected:
        assert sizes == expected
    else:  # only the square (and the line) have the budget: the next size up
        h = max(1, math.isqrt(pixels))
        assert sizes == [(h, max(h + 1, -(-pixels // h)))]
    assert all(h * w >= pixels and h < w for h, w in sizes)


def test_rectangle_variants_come_in_both_orientations():
    assert dims(make_shape("rectangle", 5)) == [(2, 13), (13, 2), (3, 9), (9, 3), (4, 7), (7, 4)]
    assert dims(make_shape("rectangle", "2x3")) == [(2, 3), (3, 2)]


def test_explicit_rectangle_is_h_by_w_and_w_by_h():
    assert dims(make_shape("rectangle:2x5")) == [(2, 5), (5, 2)]
    assert dims(make_shape("rectangle:3x3")) == [(3, 3)]


def test_paper_diamond_of_4_pixels_has_rows_1_2_1():
    mask = make_shape("diamond", 2).variants[0]
    assert rows(mask) == [1, 2, 1]
    assert torch.equal(mask, torch.tensor([[0, 1], [1, 1], [0, 1]], dtype=torch.bool))


def test_paper_diamond_of_25_pixels_is_the_l1_ball_with_rows_1_3_5_7_5_3_1():
    mask = make_shape("diamond", 5).variants[0]
    assert rows(mask) == [1, 3, 5, 7, 5, 3, 1]
    coords = torch.arange(-3, 4)
    assert torch.equal(mask, coords.abs()[:, None] + coords.abs()[None, :] <= 3)


@pytest.mark.parametrize("r", range(0, 6))
def test_diamond_is_the_l1_ball_at_centred_square_numbers(r):
    coords = torch.arange(-r, r + 1)
    assert torch.equal(diamond_mask(2 * r * r + 2 * r + 1), coords.abs()[:, None] + coords.abs()[None, :] <= r)


def test_diamond_of_9_pixels_has_rows_1_2_3_2_1():
    assert rows(diamond_mask(9)) == [1, 2, 3, 2, 1]


def _connected(mask: torch.Tensor) -> bool:
    pixels = {tuple(p) for p in torch.nonzero(mask).tolist()}
    seen, todo = set(), [next(iter(pixels))]
    while todo:
        y, x = todo.pop()
        if (y, x) in seen:
            continue
        seen.add((y, x))
        todo += [q for q in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)) if q in pixels]
    return seen == pixels


@pytest.mark.parametrize("pixels", range(1, 62))
def test_diamond_has_exactly_p_pixels_is_connected_and_contains_the_smaller_one(pixels):
    mask = diamond_mask(pixels)
    assert int(mask.sum()) == pixels and _connected(mask)
    if pixels > 1:  # nested: the diamond one pixel smaller fits inside it
        small = diamond_mask(pixels - 1)
        fits = [
            bool((mask[dy : dy + small.shape[0], dx : dx + small.shape[1]] | ~small).all())
            for dy in range(mask.shape[0] - small.shape[0] + 1)
            for dx in range(mask.shape[1] - small.shape[1] + 1)
        ]
        assert any(fits)


# ----------------------------------------------------------------------------- 2x2 and 5x5, every name

EXPECTED = {
    2: {
        "square": ([(2, 2)], 4),
        "rectangle": ([(2, 3), (3, 2)], 6),
        "line": ([(1, 4), (4, 1)], 4),
        "hline": ([(1, 4)], 4),
        "vline": ([(4, 1)], 4),
        "diamond": ([(3, 2)], 4),
        "parallelogram": ([(2, 3), (2, 3)], 4),
    },
    5: {
        "square": ([(5, 5)], 25),
        "rectangle": ([(2, 13), (13, 2), (3, 9), (9, 3), (4, 7), (7, 4)], 26),
        "line": ([(1, 25), (25, 1)], 25),
        "hline": ([(1, 25)], 25),
        "vline": ([(25, 1)], 25),
        "diamond": ([(7, 7)], 25),
        "parallelogram": ([(5, 9), (5, 9)], 25),
    },
}


@pytest.mark.parametrize("n", sorted(EXPECTED))
@pytest.mark.parametrize("name", SHAPE_NAMES)
def test_every_named_shape_for_2x2_and_5x5(name, n):
    variants, pixels = EXPECTED[n][name]
    shape = make_shape(name, f"{n}x{n}")
    assert dims(shape) == variants
    assert shape.pixel_count == pixels
    assert f"({shape.pixel_text()} px)" in shape.describe() and shape.describe().startswith(name)


# ----------------------------------------------------------------------------- custom masks


def test_custom_mask_is_cropped_to_its_pixels():
    mask = np.zeros((6, 7), dtype=bool)
    mask[2, 3] = mask[3, 2] = mask[3, 3] = mask[4, 4] = True
    shape = make_shape(mask)
    assert shape.name == "custom"
    assert dims(shape) == [(3, 3)]
    assert torch.equal(shape.variants[0], torch.from_numpy(mask[2:5, 2:5]))
    assert shape.pixel_count == shape.requested_pixels == 4 and shape.exact


def test_custom_mask_accepts_tensors_and_ignores_size():
    mask = torch.tensor([[0, 1], [1, 1]])
    shape = make_shape(mask, size=5)
    assert torch.equal(shape.variants[0], mask.bool()) and shape.pixel_count == 3


@pytest.mark.parametrize("mask", [np.zeros((3, 3)), np.ones(4), np.ones((2, 2, 2))])
def test_empty_or_non_2d_custom_mask_is_usage_error(mask):
    with pytest.raises(UsageError):
        make_shape(mask)


# ----------------------------------------------------------------------------- sizes and names


@pytest.mark.parametrize("size, expected", [(3, (3, 3)), ((2, 4), (2, 4)), ("2x3", (2, 3)), ("4", (4, 4)),
                                            ("2×5", (2, 5)), ("3X2", (3, 2))])
def test_parse_size_forms(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", [0, -2, (0, 3), "0x2", "2x", "axb", "2x3x4", ""])
def test_bad_size_is_usage_error(size):
    with pytest.raises(UsageError):
        make_shape("square", size)


@pytest.mark.parametrize("name", ["circle", "squares", "", "rectangle:", "rectangle:axb", "rectangle:0x2"])
def test_unknown_shape_name_is_usage_error(name):
    with pytest.raises(UsageError):
        make_shape(name, 2)


def test_shape_names_are_case_and_space_insensitive():
    assert dims(make_shape(" Diamond ", 2)) == dims(make_shape("diamond", 2))
