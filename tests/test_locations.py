"""Location sets (``lirpa_patch.locations``): where a patch may go, as (L, H, W) masks."""

from __future__ import annotations

import pytest
import torch

from lirpa_patch.errors import UsageError
from lirpa_patch.locations import Locations, all_locations, explicit_locations
from lirpa_patch.shapes import SHAPE_NAMES, make_shape


def placed_variant(locations: Locations, i: int) -> torch.Tensor:
    """The crop of mask ``i`` at its (top, left), the size of its variant."""
    v = locations.shape.variants[int(locations.variant[i])]
    t, l = int(locations.top[i]), int(locations.left[i])
    return locations.masks[i, t : t + v.shape[0], l : l + v.shape[1]]


def check_locations(locations: Locations, image_size: tuple[int, int]) -> None:
    """Every mask is its variant placed at (top, left), inside the image, nothing else set."""
    height, width = image_size
    assert locations.masks.shape == (len(locations), height, width)
    assert locations.masks.dtype == torch.bool
    for i in range(len(locations)):
        v = locations.shape.variants[int(locations.variant[i])]
        t, l = int(locations.top[i]), int(locations.left[i])
        assert 0 <= t and t + v.shape[0] <= height and 0 <= l and l + v.shape[1] <= width
        assert torch.equal(placed_variant(locations, i), v)
        assert int(locations.masks[i].sum()) == locations.shape.pixel_count


@pytest.mark.parametrize("n, m", [(1, 5), (2, 5), (2, 28), (3, 10), (5, 5), (4, 7)])
def test_n_by_n_square_on_m_by_m_image_has_m_minus_n_plus_1_squared_locations(n, m):
    locations = all_locations(make_shape("square", n), (m, m))
    assert len(locations) == (m - n + 1) ** 2
    assert locations.image_size == (m, m)


@pytest.mark.parametrize("name", SHAPE_NAMES)
@pytest.mark.parametrize("n", [2, 3])
def test_every_location_is_its_variant_placed_inside_the_image(name, n):
    size = (9, 11)
    locations = all_locations(make_shape(name, n), size)
    check_locations(locations, size)
    expected = sum((size[0] - v.shape[0] + 1) * (size[1] - v.shape[1] + 1) for v in locations.shape.variants)
    assert len(locations) == expected


@pytest.mark.parametrize("name", SHAPE_NAMES)
def test_all_locations_are_distinct(name):
    locations = all_locations(make_shape(name, 2), (8, 8))
    flat = locations.masks.reshape(len(locations), -1)
    assert torch.unique(flat, dim=0).shape[0] == len(locations)


def test_order_is_variant_then_row_then_column():
    locations = all_locations(make_shape("line", 2), (5, 6))
    keys = list(zip(locations.variant.tolist(), locations.top.tolist(), locations.left.tolist()))
    assert keys == sorted(keys)
    assert keys[0] == (0, 0, 0) and keys[-1] == (1, 5 - 4, 6 - 1)


def test_variants_that_do_not_fit_contribute_no_locations():
    shape = make_shape("line", 5)  # 1x25 and 25x1
    locations = all_locations(shape, (4, 30))
    assert set(locations.variant.tolist()) == {0}
    assert len(locations) == 4 * (30 - 25 + 1)
    check_locations(locations, (4, 30))


@pytest.mark.parametrize("name, n, size", [("square", 6, (5, 5)), ("square", 3, (2, 8)), ("line", 6, (28, 28)),
                                           ("diamond", 5, (6, 6))])
def test_patch_larger_than_image_is_usage_error(name, n, size):
    with pytest.raises(UsageError, match="larger than"):
        all_locations(make_shape(name, n), size)


# ----------------------------------------------------------------------------- explicit positions


def test_explicit_top_left_positions_use_variant_zero():
    shape = make_shape("square", 2)
    locations = explicit_locations(shape, (6, 6), [(0, 0), (4, 4), (1, 3)])
    assert len(locations) == 3
    assert locations.variant.tolist() == [0, 0, 0]
    assert locations.top.tolist() == [0, 4, 1] and locations.left.tolist() == [0, 4, 3]
    check_locations(locations, (6, 6))


def test_explicit_positions_with_variants_match_all_locations():
    shape = make_shape("parallelogram", 2)
    everywhere = all_locations(shape, (5, 5))
    picks = [0, 3, len(everywhere) - 1, len(everywhere) // 2 + 1]
    rows = [(int(everywhere.variant[i]), int(everywhere.top[i]), int(everywhere.left[i])) for i in picks]
    chosen = explicit_locations(shape, (5, 5), torch.tensor(rows))
    assert torch.equal(chosen.masks, everywhere.masks[picks])
    assert chosen.variant.tolist() == [r[0] for r in rows]


@pytest.mark.parametrize("position", [(-1, 0), (0, -1), (5, 0), (0, 5), (4, 0), (0, 4), (0, 0, 4), (0, 4, 0)])
def test_position_putting_the_patch_outside_the_image_is_usage_error(position):
    with pytest.raises(UsageError):
        explicit_locations(make_shape("square", 2), (5, 5), [position])


def test_variant_index_out_of_range_is_usage_error():
    with pytest.raises(UsageError, match="variant"):
        explicit_locations(make_shape("line", 2), (6, 6), [(2, 0, 0)])


@pytest.mark.parametrize("positions", [torch.zeros(0, 2, dtype=torch.long), [(1, 2, 3, 4)]])
def test_empty_or_malformed_position_list_is_usage_error(positions):
    with pytest.raises(UsageError):
        explicit_locations(make_shape("square", 2), (6, 6), positions)


# ----------------------------------------------------------------------------- the Locations API


def test_subset_and_describe():
    locations = all_locations(make_shape("line", 2), (5, 5))
    sub = locations.subset([0, len(locations) - 1])
    assert len(sub) == 2
    assert torch.equal(sub.masks, locations.masks[[0, len(locations) - 1]])
    assert sub.describe(1) == {"shape": "line", "variant": 1, "height": 4, "width": 1, "top": 1, "left": 4}
    assert len(locations.subset(slice(0, 3))) == 3
