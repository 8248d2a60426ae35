"""``PatchPerturbation``: the patch threat model as an auto_LiRPA box over (image, location) rows."""

from __future__ import annotations

import pytest
import torch

from auto_LiRPA import BoundedModule, BoundedTensor
from lirpa_patch.engine import bound_model, lower_margins
from lirpa_patch.domain import PixelDomain
from lirpa_patch.errors import UsageError
from lirpa_patch.locations import all_locations
from lirpa_patch import PatchPerturbation
from lirpa_patch.shapes import make_shape
from tests.toy_models import NUM_CLASSES, Normalized, ToyCNN, ToyMLP, toy_images

MEAN, STD = (0.2, 0.5, 0.7), (0.3, 0.25, 0.2)




def images(n=2, channels=3, size=6, seed=0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def row_masks(ptb: PatchPerturbation, rows: int, x: torch.Tensor) -> torch.Tensor:
    """The mask of each row, (R, 1, H, W), from the documented row order (image r // L, location r % L)."""
    masks = ptb.masks(x)
    n_loc = masks.shape[-3]
    if masks.ndim == 3:
        return torch.stack([masks[r % n_loc] for r in range(rows)])[:, None]
    return torch.stack([masks[r // n_loc, r % n_loc] for r in range(rows)])[:, None]


# ----------------------------------------------------------------------------- box semantics


@pytest.mark.parametrize("shape", ["square", "line", "diamond"])
def test_box_fixes_pixels_outside_the_mask_and_spans_the_domain_inside(shape):
    x = images()
    ptb = PatchPerturbation(size=2, shape=shape)
    rows = ptb.expand(x)
    x_l, x_u = ptb.bounds(rows)
    m = row_masks(ptb, rows.shape[0], rows).expand_as(rows)
    assert torch.equal(x_l[~m], rows[~m]) and torch.equal(x_u[~m], rows[~m])
    assert bool((x_l[m] == 0).all()) and bool((x_u[m] == 1).all())


def test_box_spans_the_normalized_domain_per_channel():
    x = images()
    ptb = PatchPerturbation(size=2, mean=MEAN, std=STD)
    normalized = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    rows = ptb.expand(normalized)
    x_l, x_u = ptb.bounds(rows)
    m = row_masks(ptb, rows.shape[0], rows)[:, 0]
    for c in range(3):
        lo, hi = (0 - MEAN[c]) / STD[c], (1 - MEAN[c]) / STD[c]
        torch.testing.assert_close(x_l[:, c][m], torch.full_like(x_l[:, c][m], lo))
        torch.testing.assert_close(x_u[:, c][m], torch.full_like(x_u[:, c][m], hi))
        assert torch.equal(x_l[:, c][~m], rows[:, c][~m]) and torch.equal(x_u[:, c][~m], rows[:, c][~m])


def test_value_range_sets_the_domain_ends():
    x = images() * 255
    ptb = PatchPerturbation(size=2, value_range=(0.0, 255.0))
    rows = ptb.expand(x)
    x_l, x_u = ptb.bounds(rows)
    m = row_masks(ptb, rows.shape[0], rows).expand_as(rows)
    assert bool((x_l[m] == 0).all()) and bool((x_u[m] == 255).all())


def test_box_always_contains_the_clean_image_even_outside_the_domain():
    x = images() * 1.4 - 0.2  # some pixels below 0 or above 1
    ptb = PatchPerturbation(size=2)
    rows = ptb.expand(x)
    x_l, x_u = ptb.bounds(rows)
    assert bool((x_l <= rows).all()) and bool((rows <= x_u).all())


@pytest.mark.parametrize("strength", [0.0, 0.25, 0.5, 1.0])
def test_strength_interpolates_between_the_image_and_the_domain(strength):
    x = images()
    ptb = PatchPerturbation(size=2, strength=strength)
    rows = ptb.expand(x)
    x_l, x_u = ptb.bounds(rows)
    m = row_masks(ptb, rows.shape[0], rows).expand_as(rows)
    torch.testing.assert_close(x_l[m], rows[m] + strength * (0 - rows[m]))
    torch.testing.assert_close(x_u[m], rows[m] + strength * (1 - rows[m]))
    assert torch.equal(x_l[~m], rows[~m]) and torch.equal(x_u[~m], rows[~m])


# ----------------------------------------------------------------------------- layouts


def test_nhwc_layout_gives_the_nchw_box_permuted():
    x = images()
    nchw = PatchPerturbation(size=2, shape="line", mean=MEAN, std=STD)
    nhwc = PatchPerturbation(size=2, shape="line", mean=MEAN, std=STD, layout="nhwc")
    rows = nchw.expand(x)
    rows_nhwc = nhwc.expand(x.permute(0, 2, 3, 1))
    assert torch.equal(rows_nhwc, rows.permute(0, 2, 3, 1))
    for a, b in zip(nchw.bounds(rows), nhwc.bounds(rows_nhwc)):
        assert torch.equal(b, a.permute(0, 2, 3, 1))


@pytest.mark.parametrize("flat_shape", [(3 * 6 * 6,), (3 * 6 * 6, 1)])
def test_flat_layout_gives_the_nchw_box_reshaped(flat_shape):
    x = images()
    nchw = PatchPerturbation(size=2, shape="diamond")
    flat = PatchPerturbation(size=2, shape="diamond", layout="flat", image_shape=(3, 6, 6))
    rows = nchw.expand(x)
    rows_flat = flat.expand(x.reshape(2, *flat_shape))
    assert torch.equal(rows_flat, rows.reshape(rows.shape[0], *flat_shape))
    for a, b in zip(nchw.bounds(rows), flat.bounds(rows_flat)):
        assert b.shape == rows_flat.shape
        assert torch.equal(b, a.reshape(b.shape))


def test_flat_layout_bounds_a_flat_model_like_the_nchw_model():
    torch.manual_seed(0)
    mlp = ToyMLP(channels=1, size=6).eval()
    flat_net = mlp.net[1:]  # the same network without its Flatten: takes (N, 36)
    x = images(channels=1)
    nchw = PatchPerturbation(size=2)
    flat = PatchPerturbation(size=2, layout="flat", image_shape=(1, 6, 6))
    with torch.no_grad():
        lb, ub = BoundedModule(mlp, x[:1]).compute_bounds(x=(BoundedTensor(nchw.expand(x), nchw),), method="CROWN")
        flat_x = flat.expand(x.reshape(2, 36))
        lb_f, ub_f = BoundedModule(flat_net, flat_x[:1]).compute_bounds(x=(BoundedTensor(flat_x, flat),), method="CROWN")
    torch.testing.assert_close(lb_f, lb, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(ub_f, ub, atol=1e-5, rtol=1e-6)


# ----------------------------------------------------------------------------- rows and masks


def test_expand_is_image_major():
    x = images(n=3)
    ptb = PatchPerturbation(size=2)
    rows = ptb.expand(x)
    n_loc = ptb.num_locations
    assert n_loc == 25 and rows.shape == (3 * n_loc, 3, 6, 6)
    for r in (0, 1, n_loc - 1, n_loc, 2 * n_loc + 7, 3 * n_loc - 1):
        assert torch.equal(rows[r], x[r // n_loc])


def test_per_image_masks_apply_to_their_own_image_rows():
    x = images(n=2)
    g = torch.Generator().manual_seed(3)
    masks = torch.rand(2, 4, 6, 6, generator=g) < 0.2  # different masks for each image
    ptb = PatchPerturbation(masks=masks)
    rows = ptb.expand(x)
    assert rows.shape[0] == 8 and ptb.num_locations == 4
    x_l, x_u = ptb.bounds(rows)
    for r in range(8):
        m = masks[r // 4, r % 4].expand(3, 6, 6)
        assert bool((x_l[r][m] == 0).all()) and bool((x_u[r][m] == 1).all())
        assert torch.equal(x_l[r][~m], rows[r][~m]) and torch.equal(x_u[r][~m], rows[r][~m])


def test_explicit_locations_are_used():
    x = images(n=1)
    ptb = PatchPerturbation(size=2, locations=[(0, 0), (4, 4)])
    x_l, _ = ptb.bounds(ptb.expand(x))
    assert ptb.num_locations == 2
    assert bool((x_l[0, :, :2, :2] == 0).all()) and bool((x_l[1, :, 4:, 4:] == 0).all())
    assert int((x_l != ptb.expand(x)).sum()) <= 2 * 3 * 4


def test_location_count_before_the_image_size_is_known_is_usage_error():
    ptb = PatchPerturbation(size=2)
    with pytest.raises(UsageError, match="image size"):
        ptb.num_locations
    assert PatchPerturbation(size=2, image_shape=(1, 6, 6)).num_locations == 25


def test_row_count_not_a_multiple_of_the_locations_is_usage_error():
    x = images(n=1)
    ptb = PatchPerturbation(size=2)
    rows = ptb.expand(x)
    with pytest.raises(UsageError, match="rows"):
        ptb.bounds(rows[:-1])


def test_per_image_masks_with_the_wrong_row_count_is_usage_error():
    ptb = PatchPerturbation(masks=torch.zeros(2, 3, 6, 6, dtype=torch.bool))
    with pytest.raises(UsageError, match="rows"):
        ptb.bounds(images(n=5))


def test_masks_of_another_image_size_is_usage_error():
    ptb = PatchPerturbation(masks=torch.ones(1, 5, 5, dtype=torch.bool))
    with pytest.raises(UsageError):
        ptb.bounds(images(n=1))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"layout": "nwhc"},
        {"layout": "flat"},
        {"strength": 1.5},
        {"strength": -0.1},
        {"domain": PixelDomain(), "mean": (0.5,)},
        {"locations": [(0, 0)], "masks": torch.ones(1, 4, 4, dtype=torch.bool)},
        {"masks": torch.ones(4, 4, dtype=torch.bool)},
        {"locations": "everywhere"},
        {"std": (0.0,)},
        {"value_range": (1.0, 0.0)},
    ],
)
def test_bad_arguments_are_usage_errors(kwargs):
    with pytest.raises(UsageError):
        PatchPerturbation(size=2, **kwargs)


def test_mean_with_the_wrong_channel_count_is_usage_error():
    ptb = PatchPerturbation(size=2, mean=(0.1, 0.2), std=(0.3, 0.3))
    with pytest.raises(UsageError, match="channels"):
        ptb.bounds(ptb.expand(images(n=1, channels=3)))


# ----------------------------------------------------------------------------- through auto_LiRPA


@pytest.mark.parametrize("method", ["IBP", "CROWN"])
def test_auto_lirpa_bounds_rows_with_it(method):
    torch.manual_seed(0)
    net = ToyCNN(channels=3, size=6).eval()
    x = images()
    ptb = PatchPerturbation(size=2, shape="square")
    rows = ptb.expand(x)
    bounded = BoundedModule(net, x[:1])
    with torch.no_grad():
        lb, ub = bounded.compute_bounds(x=(BoundedTensor(rows, ptb),), method=method)
        clean = net(rows)
    assert lb.shape == ub.shape == (rows.shape[0], NUM_CLASSES)
    assert bool((lb <= clean + 1e-5).all()) and bool((clean <= ub + 1e-5).all())
    assert bool((ub - lb > 1e-3).all())  # every location perturbs the logits
    # a second call with another batch size re-initialises the box
    with torch.no_grad():
        lb1, _ = bounded.compute_bounds(x=(BoundedTensor(ptb.expand(x[:1]), ptb),), method=method)
    torch.testing.assert_close(lb1, lb[: ptb.num_locations], atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_normalized_domain_bounds_equal_image_space_model_normalizing_inside(method):
    """Bounding net on normalized input with PatchPerturbation(mean, std) == bounding
    Normalized(net) (which does (x - mean) / std first) on image-space input."""
    x, y = toy_images(2, channels=3, size=6, seed=4)
    torch.manual_seed(1)
    net = ToyCNN(channels=3, size=6).eval()
    wrapped = Normalized(net, MEAN, STD).eval()
    normalized = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    masks = all_locations(make_shape("square", 2), (6, 6)).masks
    with torch.no_grad():
        image_space = lower_margins(bound_model(wrapped, (3, 6, 6)), x, y, masks, num_classes=NUM_CLASSES,
                                    method=method)
        in_domain = lower_margins(bound_model(net, (3, 6, 6)), normalized, y, masks, num_classes=NUM_CLASSES,
                                  method=method, domain=PixelDomain(mean=MEAN, std=STD))
    torch.testing.assert_close(in_domain, image_space, atol=1e-5, rtol=1e-5)


def test_repr_names_the_shape():
    assert "square 2x2 (4 px)" in repr(PatchPerturbation(size=2))
