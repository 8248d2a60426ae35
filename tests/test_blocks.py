"""Location groups (``lirpa_patch.threats.blocks`` and ``certify(groups=...)``).

A block's mask is the union of its members' masks, every location is in exactly one
block per level, blocks nest; certifying through blocks gives the same decisions as
bounding every location, exact worst margins for images that are not certified, and
for certified ones a bound that is never above the per-location minimum.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lirpa_patch.engine import bound_model, certify, lower_margins
from lirpa_patch.locations import all_locations
from lirpa_patch.shapes import make_shape
from lirpa_patch.threats.blocks import block_levels

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("shape", ["square", "line", "parallelogram"])
def test_blocks_are_unions_of_nested_partitions(shape):
    locations = all_locations(make_shape(shape, 2), (9, 9))
    levels = block_levels(locations, 4)
    assert [level.size for level in levels] == [4, 2]
    finest = levels[-1]
    members = finest.child_of  # block of every location
    assert members.shape == (len(locations),)
    for g in range(len(finest.blocks)):
        inside = locations.masks[members == g]
        assert inside.shape[0] >= 1
        assert torch.equal(finest.blocks.masks[g], inside.any(0))  # the union of its members
        # one variant, positions within a 2x2 block of the position grid
        assert len(set(locations.variant[members == g].tolist())) == 1
        assert int(locations.top[members == g].max() - locations.top[members == g].min()) < 2
    # coarse blocks hold whole fine blocks
    coarse = levels[0]
    assert torch.equal(coarse.child_of[finest.child_of], levels[0].child_of[finest.child_of])
    for g in range(len(finest.blocks)):
        assert int(finest.parent[g]) == int(coarse.child_of[g])


def test_block_bounds_are_below_every_member_bound():
    images, labels = _digits(6)
    model, bounded = _shipped()
    locations = all_locations(make_shape("square", 2), (28, 28))
    level = block_levels(locations, 2)[0]
    with torch.no_grad():
        per_loc = lower_margins(bounded, images, labels, locations=locations, num_classes=10)  # (N, L, 9)
        per_block = lower_margins(bounded, images, labels, locations=level.blocks, num_classes=10)  # (N, G, 9)
    members_min = torch.full_like(per_block, float("inf")).scatter_reduce(
        1, level.child_of.view(1, -1, 1).expand_as(per_loc), per_loc, "amin")
    assert bool((per_block <= members_min + 1e-5).all())


def _digits(n: int):
    from lirpa_patch.data import load_dataset

    data = load_dataset("sample:train", start=4000, num=n)
    return data.images, data.labels


def _shipped():
    from lirpa_patch.models import image_model, load_model

    model = image_model(load_model(ROOT / "onnx_models" / "mnist_mlp_2x2.onnx"), image_shape=(1, 28, 28)).eval()
    return model, bound_model(model, (1, 28, 28))


@pytest.mark.parametrize("groups", [2, 4, "auto"])
def test_groups_give_the_per_location_decisions(groups):
    images, labels = _digits(40 if groups == "auto" else 24)  # "auto" measures on 2 x 8 images first
    model, bounded = _shipped()
    plain = certify(model, images, labels, bounded=bounded, groups=None, chunk_size=729 * 4)
    grouped = certify(model, images, labels, bounded=bounded, groups=groups, chunk_size=729 * 4)
    assert grouped.num_certified == plain.num_certified > 0
    info = grouped.extra["location_groups"]
    assert info["rows_bounded"] < info["rows_per_location"]  # fewer bound computations on this model
    for a, b in zip(plain.images, grouped.images):
        assert a.certified == b.certified
        if not a.correct:
            continue
        if a.certified:
            assert 0.0 <= b.worst_margin <= a.worst_margin + 1e-5
        else:
            assert b.worst_margin == pytest.approx(a.worst_margin, rel=1e-5, abs=1e-5)
            assert b.worst_location == a.worst_location and b.worst_class == a.worst_class


def test_auto_groups_pay_off_on_a_few_images_of_the_shipped_model():
    images, labels = _digits(8)
    model, bounded = _shipped()
    info = certify(model, images, labels, bounded=bounded, groups="auto").extra["location_groups"]
    assert info["images"] == 8 and info["rows_bounded"] < info["rows_per_location"]


def test_auto_groups_turn_off_once_they_bound_too_many_rows(monkeypatch):
    images, labels = _digits(6)
    model, bounded = _shipped()
    monkeypatch.setattr("lirpa_patch.engine.AUTO_ROW_SHARE", 0.0)  # no block pays off
    blocks = 196  # 2x2 blocks of the 729 locations of a 2x2 patch on 28x28
    plain = certify(model, images, labels, bounded=bounded, groups=None)
    auto = certify(model, images, labels, bounded=bounded, groups="auto", chunk_size=2 * blocks)
    assert auto.extra["location_groups"]["images"] == 2  # the first chunk only
    assert [r.certified for r in auto.images] == [r.certified for r in plain.images]


def test_groups_prune_blocks_that_cannot_lower_a_worst_margin():
    """Images that are not certified: a block whose bound is above the smallest location margin found
    so far is not split, and the worst margin is still exactly the per-location minimum."""
    images, labels = _digits(6)
    model, bounded = _shipped()
    plain = certify(model, images, labels, size=5, bounded=bounded, groups=None)
    grouped = certify(model, images, labels, size=5, bounded=bounded, groups=2)
    failing = [(a, b) for a, b in zip(plain.images, grouped.images) if a.correct and not a.certified]
    assert len(failing) >= 3
    for a, b in failing:
        assert not b.certified
        assert b.worst_margin == pytest.approx(a.worst_margin, rel=1e-5, abs=1e-5)
        assert b.worst_location == a.worst_location and b.worst_class == a.worst_class
    info = grouped.extra["location_groups"]
    assert info["rows_bounded"] < 0.7 * info["rows_per_location"]


def test_groups_off_bounds_every_location():
    images, labels = _digits(4)
    model, bounded = _shipped()
    result = certify(model, images, labels, bounded=bounded, groups=None)
    assert "location_groups" not in result.extra


@pytest.mark.parametrize("bad", [3, 1, -2, "many", True])
def test_groups_must_be_auto_none_or_a_power_of_two(bad):
    images, labels = _digits(1)
    model, bounded = _shipped()
    with pytest.raises(ValueError, match="groups"):
        certify(model, images, labels, bounded=bounded, groups=bad)


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_exact_margin_marks_the_worst_margins_that_are_the_per_location_minimum(method):
    images, labels = _digits(24)
    model, bounded = _shipped()
    plain = certify(model, images, labels, bounded=bounded, groups=None, method=method, chunk_size=729 * 4)
    grouped = certify(model, images, labels, bounded=bounded, groups=2, method=method, chunk_size=729 * 4)
    assert all(r.exact_margin is (True if r.correct else None) for r in plain.images)
    assert any(r.exact_margin is False for r in grouped.images)  # group bounds occur on this model
    for a, b in zip(plain.images, grouped.images):
        if not a.correct:
            assert b.exact_margin is None
        elif b.exact_margin:
            assert b.worst_margin == pytest.approx(a.worst_margin, rel=1e-5, abs=1e-5)
        else:  # a location group's bound: below the per-location minimum, and only where it certifies
            assert b.certified and 0.0 < b.worst_margin < a.worst_margin


def test_sparse_margins_are_exact():
    images, labels = _digits(3)
    model, bounded = _shipped()
    result = certify(model, images, labels, bounded=bounded, k=1)
    assert all(r.exact_margin is (True if r.correct else None) for r in result.images)
