"""Patch shapes follow the pixel-count rules of the ``lirpa_patch.shapes`` docstring."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lirpa_patch.errors import UsageError
from lirpa_patch.shapes import SHAPE_NAMES, TRANSFER_SHAPES, make_shape, parse_size

NS = range(1, 7)


def dims(shape) -> list[tuple[int, int]]:
    return [tuple(v.shape) for v in shape.variants]


def diamond_pixels(r: int) -> int:
    return 2 * r * r + 2 * r + 1


# ----------------------------------------------------------------------------- every shape


@pytest.mark.parametrize("name", SHAPE_NAMES)
@pytest.mark.parametrize("n", NS)
def test_variants_are_tight_bool_masks_with_equal_pixel_counts(name, n):
    shape = make_shape(name, n)
    assert shape.name == name
    assert shape.requested_pixels == n * n
    for v in shape.variants:
        assert v.dtype == torch.bool and v.ndim == 2
        assert bool(v.any(0).all()) and bool(v.any(1).all())  # no empty border row/column
        assert int(v.sum()) == shape.pixel_count
    assert shape.exact == (shape.pixel_count == n * n)


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


@pytest.mark.parametrize("n", NS)
def test_rectangle_of_square_request_is_ceil_half_by_rounded_rest(n):
    p = n * n
    a = math.ceil(n / 2)
    b = math.floor(p / a + 0.5)  # halves round up
    shape = make_shape("rectangle", n)
    assert dims(shape) == ([(a, b), (b, a)] if a != b else [(a, b)])
    assert all(bool(v.all()) for v in shape.variants)
    assert abs(shape.pixel_count - p) <= a / 2
    if n % 2 == 0:
        assert shape.exact


@pytest.mark.parametrize("size, expected, pixels", [(5, (3, 8), 24), (3, (2, 5), 10), (2, (1, 4), 4)])
def test_rectangle_documented_examples(size, expected, pixels):
    shape = make_shape("rectangle", size)
    assert dims(shape)[0] == expected and shape.pixel_count == pixels


def test_rectangle_of_non_square_request_is_h_by_w_and_w_by_h():
    assert dims(make_shape("rectangle", "2x3")) == [(2, 3), (3, 2)]
    assert dims(make_shape("rectangle:2x5")) == [(2, 5), (5, 2)]
    assert dims(make_shape("rectangle:3x3")) == [(3, 3)]


@pytest.mark.parametrize("n", NS)
def test_diamond_is_the_l1_ball_closest_in_pixels_ties_to_larger(n):
    p = n * n
    shape = make_shape("diamond", n)
    (mask,) = shape.variants
    size = mask.shape[0]
    assert mask.shape == (size, size) and size % 2 == 1
    r = size // 2
    coords = torch.arange(-r, r + 1)
    assert torch.equal(mask, coords.abs()[:, None] + coords.abs()[None, :] <= r)
    assert shape.pixel_count == diamond_pixels(r)
    for other in range(0, r + 3):
        diff, best = abs(diamond_pixels(other) - p), abs(diamond_pixels(r) - p)
        assert diff > best or (diff == best and other <= r)


@pytest.mark.parametrize("size, pixels", [(2, 5), (5, 25)])
def test_diamond_documented_examples(size, pixels):
    assert make_shape("diamond", size).pixel_count == pixels


# ----------------------------------------------------------------------------- 2x2 and 5x5, every name

EXPECTED = {
    2: {
        "square": ([(2, 2)], 4),
        "rectangle": ([(1, 4), (4, 1)], 4),
        "line": ([(1, 4), (4, 1)], 4),
        "hline": ([(1, 4)], 4),
        "vline": ([(4, 1)], 4),
        "diamond": ([(3, 3)], 5),
        "parallelogram": ([(2, 3), (2, 3)], 4),
    },
    5: {
        "square": ([(5, 5)], 25),
        "rectangle": ([(3, 8), (8, 3)], 24),
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
    assert f"({pixels} px)" in shape.describe() and shape.describe().startswith(name)


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
