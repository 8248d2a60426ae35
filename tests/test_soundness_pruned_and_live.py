"""Soundness and exactness of two shortcuts: pruned location groups and live-column dense layers.

Location groups that prune (``lirpa_patch.engine._grouped`` with ``exact_min``):

* on the toy MLP, CNN and residual net, for square and non-square patches and blocks
  of 2 and 4, ``certify(groups=...)`` gives the same decisions as bounding every
  location, and for every image that is not certified exactly the per-location worst
  margin, at a location where the per-location margin is that minimum;
* random, corner and PGD patches at every location never beat a grouped worst margin;
* brute force on 4x4 and 6x6 images: on a network whose IBP bound is exact (each hidden
  unit reads one pixel) the grouped worst margin *is* the smallest margin over every
  corner patch at every location; on a deeper network no corner or interior patch
  beats it.

Dense linear layers bounded image by image (``lirpa_patch.ops.linear._bounds_by_image``):

* the margins of ``lower_margins`` equal interval arithmetic done by hand in float64
  (centre and radius through each layer, the specification merged into the last), on
  the toy MLP and on two sparse MLPs that really take the live-column product (one
  after a ReLU, one after a linear layer, whose negative columns are live too), for
  rows of every location and rows of any images (unequal counts, an image without
  rows, rows not sorted by image);
* they are the margins of the plain product (the path turned off) and attacks never beat
  them; under gradients the plain product is taken (a column zero in every row still
  passes gradient to whatever made it zero).
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import pytest
import torch
from torch import nn

import lirpa_patch.ops.linear as linear_ops
from lirpa_patch.cascade import Pending
from lirpa_patch.engine import SEED_BLOCKS, bound_model, certify, location_margins, lower_margins
from lirpa_patch.locations import all_locations
from lirpa_patch.shapes import make_shape
from lirpa_patch.spec import margin_spec
from tests.attacks import assert_sound, assert_worst_margins_sound, attack_patch, margins, rounding_tolerance
from tests.reference_ibp import interval_forward
from tests.toy_models import ARCHITECTURES, NUM_CLASSES, toy_images, toy_model

SIZE = 10  # toy images are (1, 10, 10)
SHAPES = (("square", 2), ("parallelogram", 2), ("diamond", 3))  # (shape, size); 81, 144 and 48 locations
N_IMAGES = 12


@lru_cache(maxsize=None)
def _trained(arch: str):
    model = toy_model(arch, size=SIZE)
    return model, bound_model(model, (1, SIZE, SIZE))


@lru_cache(maxsize=None)
def _images():
    return toy_images(N_IMAGES, seed=7)


@lru_cache(maxsize=None)
def _per_location(arch: str, shape: str, size: int):
    """``certify`` bounding every location, with every location's margin kept."""
    model, bounded = _trained(arch)
    images, labels = _images()
    return certify(model, images, labels, size=size, shape=shape, bounded=bounded, groups=None,
                   keep_location_margins=True)


@pytest.fixture
def prunes(monkeypatch) -> list[int]:
    """Records the locations each pruned set of blocks leaves without bounds of their own."""
    left: list[int] = []
    original = Pending.leave

    def spy(self, count):
        left.append(int(count))
        return original(self, count)

    monkeypatch.setattr(Pending, "leave", spy)
    return left


def _location_index(result) -> dict:
    return {tuple(sorted(result.locations.describe(i).items())): i for i in range(len(result.locations))}


# ----------------------------------------------------------------------------- location groups: toy models


@pytest.mark.parametrize("seed_blocks", [SEED_BLOCKS, 1])
@pytest.mark.parametrize("groups", [2, 4])
@pytest.mark.parametrize("shape,size", SHAPES)
@pytest.mark.parametrize("arch", tuple(ARCHITECTURES))
def test_grouped_worst_margins_equal_the_per_location_minimum(arch, shape, size, groups, seed_blocks, monkeypatch):
    """With the default seed blocks and with one (most blocks then decided against a poorer margin)."""
    monkeypatch.setattr("lirpa_patch.engine.SEED_BLOCKS", seed_blocks)
    model, bounded = _trained(arch)
    images, labels = _images()
    plain = _per_location(arch, shape, size)
    grouped = certify(model, images, labels, size=size, shape=shape, bounded=bounded, groups=groups)
    assert grouped.extra["location_groups"]["block"] == groups
    where = _location_index(plain)
    failing = 0
    for k, (a, b) in enumerate(zip(plain.images, grouped.images)):
        assert (a.correct, a.certified) == (b.correct, b.certified), k
        if not a.correct:
            continue
        if a.certified:  # a block bound may stand for its locations: never above them, never below 0
            assert 0.0 <= b.worst_margin <= a.worst_margin + 1e-5, k
            continue
        failing += 1
        assert b.worst_margin == pytest.approx(a.worst_margin, rel=1e-5, abs=1e-5), k
        row = plain.location_margins[k]
        at = where[tuple(sorted(b.worst_location.items()))]
        assert float(row[at]) == pytest.approx(float(row.min()), rel=1e-5, abs=1e-5), k  # a worst location
        if int((row <= row.min() + 1e-5 * (1 + row.min().abs())).sum()) == 1:  # the minimum is unique
            assert (b.worst_location, b.worst_class) == (a.worst_location, a.worst_class), k
    assert failing >= 3  # pruning applies to images that are not certified


@pytest.mark.parametrize("groups", [2, 4])
@pytest.mark.parametrize("arch", tuple(ARCHITECTURES))
def test_location_groups_prune_blocks_of_the_toy_models(arch, groups, prunes):
    """The other tests of toy models exercise the pruning: a square 2x2 patch prunes on every model."""
    model, bounded = _trained(arch)
    images, labels = _images()
    grouped = certify(model, images, labels, size=2, bounded=bounded, groups=groups)
    assert sum(prunes) > 0
    info = grouped.extra["location_groups"]
    assert info["images"] == sum(r.correct for r in grouped.images)


@pytest.mark.parametrize("shape,size", SHAPES)
@pytest.mark.parametrize("arch", tuple(ARCHITECTURES))
def test_grouped_worst_margins_hold_under_attack(arch, shape, size):
    model, bounded = _trained(arch)
    images, labels = _images()
    masks = all_locations(make_shape(shape, size), (SIZE, SIZE)).masks
    found = attack_patch(model, images, labels, masks, seed=7 * tuple(ARCHITECTURES).index(arch) + size)
    tol = rounding_tolerance(model, images).flatten()
    for groups in (2, 4):
        grouped = certify(model, images, labels, size=size, shape=shape, bounded=bounded, groups=groups)
        assert assert_worst_margins_sound(grouped, found, tol) == grouped.num_correct


# ----------------------------------------------------------------------------- location groups: brute force


def _random_images(n: int, side: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, side, side, generator=g)


def _pixelwise_net(side: int, seed: int) -> nn.Module:
    """Each hidden unit reads one pixel: IBP is exact and the worst case over a box is at a corner."""
    g = torch.Generator().manual_seed(seed)
    d = side * side
    net = nn.Sequential(nn.Flatten(), nn.Linear(d, d), nn.ReLU(), nn.Linear(d, NUM_CLASSES))
    with torch.no_grad():
        net[1].weight.copy_(torch.diag((torch.rand(d, generator=g) * 4 - 2)))
        net[1].bias.copy_(torch.rand(d, generator=g) - 0.5)
        net[3].weight.copy_(torch.randn(NUM_CLASSES, d, generator=g))
        net[3].bias.copy_(torch.randn(NUM_CLASSES, generator=g))
    return net.eval()


def _deep_net(side: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    d = side * side
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(),
                         nn.Linear(12, NUM_CLASSES)).eval()


def _patched(images: torch.Tensor, masks: torch.Tensor, contents: torch.Tensor) -> torch.Tensor:
    """Every (image, location, content): ``(N, L, T, 1, H, W)``; ``contents`` ``(T, P)`` the values of a
    location's ``P`` pixels in row-major order."""
    n, (n_loc, h, w), t = images.shape[0], masks.shape, contents.shape[0]
    out = images.reshape(n, 1, 1, h * w).repeat(1, n_loc, t, 1)
    for loc in range(n_loc):
        pixels = torch.nonzero(masks[loc].flatten()).flatten()
        out[:, loc, :, pixels] = contents.to(out.dtype)
    return out.reshape(n, n_loc, t, 1, h, w)


def _smallest_margins(model: nn.Module, images: torch.Tensor, masks: torch.Tensor,
                      contents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (the model's predictions) and per image the smallest margin over every location and content."""
    with torch.no_grad():
        labels = model(images).argmax(1)
        x = _patched(images, masks, contents)
        n, n_loc, t = x.shape[:3]
        found = margins(model, x.reshape(-1, *x.shape[3:]), labels.repeat_interleave(n_loc * t))
    return labels, found.reshape(n, -1).min(dim=1).values


CORNERS = torch.tensor(list(itertools.product((0.0, 1.0), repeat=4)))  # the 16 corners of a 2x2 patch's box
BRUTE_CASES = [(4, 2), (6, 2), (6, 4)]  # (image side, block size)


@pytest.mark.parametrize("side,groups", BRUTE_CASES)
def test_grouped_worst_margin_is_the_smallest_corner_margin_of_an_exact_net(side, groups, prunes, monkeypatch):
    """On a net whose IBP bound is exact, the worst margin of an image that is not certified is the smallest
    margin of any corner patch at any location, and an image is certified exactly when no corner patch
    succeeds. One seed block per image, so that most blocks are decided by pruning."""
    monkeypatch.setattr("lirpa_patch.engine.SEED_BLOCKS", 1)
    masks = all_locations(make_shape("square", 2), (side, side)).masks
    images = _random_images(48, side, seed=side)
    checked = 0
    for seed in range(3):
        model = _pixelwise_net(side, seed)
        labels, smallest = _smallest_margins(model, images, masks, CORNERS)
        tol = rounding_tolerance(model, images).flatten()
        result = certify(model, images, labels, size=2, groups=groups)
        for k, record in enumerate(result.images):
            assert record.certified == bool(smallest[k] >= 0), k
            if record.certified:
                assert 0.0 <= record.worst_margin <= float(smallest[k] + tol[k]), k
            else:
                checked += 1
                assert abs(record.worst_margin - float(smallest[k])) <= float(tol[k]), k
    assert checked >= 20 and sum(prunes) > 0


@pytest.mark.parametrize("side,groups", BRUTE_CASES)
def test_no_corner_or_interior_patch_beats_the_grouped_worst_margin(side, groups, prunes, monkeypatch):
    """A deeper net: IBP is loose, so this is a necessary condition only (a ReLU net's worst margin over a
    box is not always at a corner): every corner and 48 random interior patches at every location."""
    monkeypatch.setattr("lirpa_patch.engine.SEED_BLOCKS", 1)
    masks = all_locations(make_shape("square", 2), (side, side)).masks
    images = _random_images(32, side, seed=10 + side)
    interior = torch.rand(48, 4, generator=torch.Generator().manual_seed(side))
    contents = torch.cat([CORNERS, interior])
    for seed in range(3):
        model = _deep_net(side, seed)
        labels, smallest = _smallest_margins(model, images, masks, contents)
        tol = rounding_tolerance(model, images).flatten()
        result = certify(model, images, labels, size=2, groups=groups)
        for k, record in enumerate(result.images):
            assert record.worst_margin <= float(smallest[k] + tol[k]), k
            if record.certified:
                assert float(smallest[k]) >= -float(tol[k]), k
    assert sum(prunes) > 0


# ----------------------------------------------------------------------------- dense layers image by image


DENSE_MODELS = ("toy-mlp", "sparse-after-relu", "sparse-after-linear")
DENSE_SHAPES = (("square", 2), ("parallelogram", 2))  # at least MIN_ROWS_PER_IMAGE (64) locations


def _sparse_after_relu(images: torch.Tensor) -> nn.Module:
    """Flatten -> Linear(100, 48) -> ReLU -> Linear(48, 32) -> ReLU -> Linear(32, 4); first-layer biases set
    so that 4 units are live everywhere and each other unit only on the image where its pre-activation
    gets highest under some 2x2 patch: each image has a few live columns, different ones."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(),
                        nn.Linear(32, NUM_CLASSES))
    masks = all_locations(make_shape("square", 2), (SIZE, SIZE)).masks.flatten(1).to(images.dtype)  # (L, 100)
    with torch.no_grad():
        w, x = net[1].weight, images.flatten(1)
        rise = torch.maximum(w[None] * (1 - x[:, None]), -w[None] * x[:, None])  # (N, 48, 100) per patched pixel
        highest = (x @ w.t())[:, None] + torch.einsum("lp,njp->nlj", masks, rise)  # (N, L, 48), no bias
        top = highest.amax(1).topk(2, dim=0).values  # (2, 48): the two images where each unit gets highest
        net[1].bias.copy_(-(top[0] + top[1]) / 2)
        net[1].bias[:4] = 5.0
    return net.eval()


def _sparse_after_linear() -> nn.Module:
    """Flatten -> Linear(100, 48) -> Linear(48, 32) -> ReLU -> Linear(32, 4): the middle layer's input is not
    after a ReLU. 8 units read the image, 8 are constant negative (live: lower bound < 0), 4 constant
    positive, 28 exactly zero (the only dead columns)."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, 48), nn.Linear(48, 32), nn.ReLU(),
                        nn.Linear(32, NUM_CLASSES))
    with torch.no_grad():
        net[1].weight[8:] = 0.0
        net[1].bias[8:16] = -0.5
        net[1].bias[16:20] = 0.5
        net[1].bias[20:] = 0.0
    return net.eval()


@lru_cache(maxsize=None)
def _dense_model(name: str):
    images, _ = _images()
    if name == "toy-mlp":
        return _trained("mlp")
    model = _sparse_after_relu(images) if name == "sparse-after-relu" else _sparse_after_linear()
    return model, bound_model(model, (1, SIZE, SIZE))


@pytest.fixture
def dense_calls(monkeypatch) -> list[dict]:
    """Records every image-by-image product: rows of each image, input columns, live columns of each image."""
    calls: list[dict] = []
    original = linear_ops._bounds_by_image

    def spy(lo, hi, weight_t, bias, counts):
        live = []
        for lo_i, hi_i in zip(lo.split(counts), hi.split(counts)):
            alive = (hi_i > 0).any(0) | (lo_i < 0).any(0) if lo_i.shape[0] else torch.zeros(lo.shape[1], dtype=bool)
            live.append(frozenset(torch.nonzero(alive).flatten().tolist()))
        calls.append({"counts": list(counts), "columns": lo.shape[1], "live": live})
        return original(lo, hi, weight_t, bias, counts)

    monkeypatch.setattr(linear_ops, "_bounds_by_image", spy)
    return calls


def _assert_live_columns_used(calls: list[dict], images: int, *, distinct: bool) -> None:
    """One product, every image through a few live columns (the live path); with ``distinct``, not every
    image through the same ones."""
    assert len(calls) == 1
    live = [s for s, c in zip(calls[0]["live"], calls[0]["counts"]) if c]
    assert len(live) == images
    assert all(0 < len(s) <= linear_ops.LIVE_SHARE * calls[0]["columns"] for s in live)
    assert len(set(live)) > 1 or not distinct


def _reference(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor,
               row_img: torch.Tensor) -> torch.Tensor:
    """Interval arithmetic in float64, one row per (``images[row_img[r]]``, ``masks[r]``): ``(R, K - 1)``."""
    x = images.double()[row_img]
    m = masks[:, None].to(torch.bool)
    lo, hi = torch.where(m, 0.0, x), torch.where(m, 1.0, x)
    spec = margin_spec(labels, NUM_CLASSES, dtype=torch.float64)[row_img]
    lower, _ = interval_forward(_float64(model), lo, hi, spec)
    return lower


@lru_cache(maxsize=None)
def _float64(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).double().eval()


def _grid_reference(model, images, labels, masks) -> torch.Tensor:
    n, n_loc = images.shape[0], masks.shape[0]
    row_img = torch.arange(n).repeat_interleave(n_loc)
    return _reference(model, images, labels, masks.repeat(n, 1, 1), row_img).reshape(n, n_loc, -1)


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return float((got.double() - want).abs().max()) <= 1e-5 * (1.0 + float(want.abs().max()))


@pytest.mark.parametrize("shape,size", DENSE_SHAPES)
@pytest.mark.parametrize("name", DENSE_MODELS)
def test_dense_layer_margins_equal_float64_interval_arithmetic(name, shape, size, dense_calls):
    model, bounded = _dense_model(name)
    images, labels = _images()
    masks = all_locations(make_shape(shape, size), (SIZE, SIZE)).masks
    with torch.no_grad():
        ours = lower_margins(bounded, images, labels, masks, num_classes=NUM_CLASSES)
    assert _close(ours, _grid_reference(model, images, labels, masks))
    if name == "toy-mlp":  # image by image, most columns live: every column
        assert len(dense_calls) == 1 and dense_calls[0]["counts"] == [masks.shape[0]] * N_IMAGES
    else:
        _assert_live_columns_used(dense_calls, N_IMAGES, distinct=name == "sparse-after-relu")


@pytest.mark.parametrize("name", DENSE_MODELS)
def test_dense_layer_margins_are_those_of_the_plain_product(name, dense_calls, monkeypatch):
    model, bounded = _dense_model(name)
    images, labels = _images()
    masks = all_locations(make_shape("square", 2), (SIZE, SIZE)).masks
    with torch.no_grad():
        on = lower_margins(bounded, images, labels, masks, num_classes=NUM_CLASSES)
        assert len(dense_calls) == 1
        monkeypatch.setattr(linear_ops, "MIN_ROWS_PER_IMAGE", 10 ** 9)  # the path off
        off = lower_margins(bounded, images, labels, masks, num_classes=NUM_CLASSES)
    assert len(dense_calls) == 1
    assert _close(on, off.double())


@pytest.mark.parametrize("sorted_rows", [True, False])
@pytest.mark.parametrize("name", DENSE_MODELS[1:])
def test_dense_layer_rows_of_any_images_equal_float64_interval_arithmetic(name, sorted_rows, dense_calls):
    """Rows of unequal counts per image, one image without rows: sorted by image they take the live path
    (per-image products); unsorted, the plain product; both equal interval arithmetic."""
    model, bounded = _dense_model(name)
    images, labels = _images()
    locations = all_locations(make_shape("parallelogram", 2), (SIZE, SIZE))
    counts = [110, 0, 81, 70]  # 261 rows of 4 images: at least 64 per image on average
    g = torch.Generator().manual_seed(5)
    row_img = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    row_loc = torch.randint(0, len(locations), (row_img.shape[0],), generator=g)
    if not sorted_rows:
        order = torch.randperm(row_img.shape[0], generator=g)
        row_img, row_loc = row_img[order], row_loc[order]
    with torch.no_grad():
        ours = location_margins(bounded, locations, images, labels, row_img, row_loc, num_classes=NUM_CLASSES)
    assert _close(ours, _reference(model, images, labels, locations.masks[row_loc], row_img))
    if sorted_rows:
        assert [c["counts"] for c in dense_calls] == [counts]
        _assert_live_columns_used(dense_calls, 3, distinct=name == "sparse-after-relu")
    else:
        assert dense_calls == []


@pytest.mark.parametrize("name", DENSE_MODELS)
def test_dense_layer_bounds_hold_under_attack(name):
    model, bounded = _dense_model(name)
    images, labels = _images()
    masks = all_locations(make_shape("square", 2), (SIZE, SIZE)).masks
    with torch.no_grad():
        lower = lower_margins(bounded, images, labels, masks, num_classes=NUM_CLASSES)
    found = attack_patch(model, images, labels, masks, seed=DENSE_MODELS.index(name))
    assert_sound(found, lower, rounding_tolerance(model, images), what=name)


def _margin_gradients(bounded, images, labels, masks) -> list[torch.Tensor]:
    params = [p for p in bounded.parameters() if p.requires_grad]
    weights = torch.rand(images.shape[0], masks.shape[0], NUM_CLASSES - 1,
                         generator=torch.Generator().manual_seed(0))
    with torch.enable_grad():
        lower = lower_margins(bounded, images, labels, masks, num_classes=NUM_CLASSES)
        return list(torch.autograd.grad((lower * weights).sum(), params))


@pytest.mark.parametrize("name", DENSE_MODELS)
def test_dense_layer_gradients_are_those_of_the_plain_product(name, dense_calls, monkeypatch):
    """Under gradients the dense layer takes the plain product: skipping a column that is zero in every row
    would cut the gradient to whatever made it zero (no ReLU before the layer: zero weights and bias)."""
    model, bounded = _dense_model(name)
    images, labels = _images()
    masks = all_locations(make_shape("square", 2), (SIZE, SIZE)).masks
    on = _margin_gradients(bounded, images, labels, masks)
    assert dense_calls == []
    monkeypatch.setattr(linear_ops, "MIN_ROWS_PER_IMAGE", 10 ** 9)  # the path off
    off = _margin_gradients(bounded, images, labels, masks)
    assert len(on) == len(off) == 6
    for a, b in zip(on, off):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * (1.0 + float(b.abs().max())))
