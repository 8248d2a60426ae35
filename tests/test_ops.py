"""The plugin operators (``lirpa_patch.ops``): windows and incremental layers equal plain IBP, and hold under attack.

* window arithmetic (:mod:`lirpa_patch.ops.window`) equals dense interval arithmetic
  on random rows, for strided, padded, dilated and grouped convolutions, ReLU,
  residual additions and linear maps (shared and per-image coefficients);
* the engine's margins (incremental first layer, windows, the specification merged
  once per image) equal plain auto_LiRPA IBP (a stock ``BoundedModule``, one explicit
  box per row, the specification per row) within 1e-5 relative, for every toy
  architecture, with normalization inside the model and outside it (a pixel domain),
  in NCHW, NHWC and flat layouts;
* the engine never builds the ``(rows, C, H, W)`` input box on these models;
* attacks at every location never beat the bounds of the NHWC and flat paths.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from auto_LiRPA import BoundedModule, BoundedTensor
from auto_LiRPA.perturbations import PerturbationLpNorm
from torch import nn

from lirpa_patch import PatchPerturbation, PixelDomain
from lirpa_patch.engine import bound_model, certify, lower_margins
from lirpa_patch.locations import all_locations
from lirpa_patch.models import ImageModel
from lirpa_patch.ops import stock_ops
from lirpa_patch.ops import window as W
from lirpa_patch.ops.state import WindowState
from lirpa_patch.shapes import make_shape
from lirpa_patch.spec import margin_spec
from tests.attacks import assert_sound, attack_patch, rounding_tolerance
from tests.toy_models import ARCHITECTURES, NUM_CLASSES, Normalized, toy_images, train_briefly

SIZE = 10
MEAN3, STD3 = (0.2, 0.4, 0.6), (0.3, 0.2, 0.25)


# ----------------------------------------------------------------------------- window arithmetic


def _random_window(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows, channels, height, width = 7, 3, 9, 8
    clean = torch.randn(2, channels, height, width, generator=g, dtype=torch.float64)
    row_img = torch.randint(0, 2, (rows,), generator=g)
    h, w = 3, 2
    oy = torch.randint(-2, height, (rows,), generator=g)
    ox = torch.randint(-2, width, (rows,), generator=g)
    inside = W._in_map(oy, h, height)[:, None, :, None] & W._in_map(ox, w, width)[:, None, None, :]
    dlo = -torch.rand(rows, channels, h, w, generator=g, dtype=torch.float64) * inside
    dhi = torch.rand(rows, channels, h, w, generator=g, dtype=torch.float64) * inside
    return WindowState(clean, dlo, dhi, oy, ox, row_img)


def _dense_conv(lo, hi, weight, bias, stride, padding, dilation, groups):
    c, r = (lo + hi) / 2, (hi - lo) / 2
    c = F.conv2d(c, weight, bias, stride, padding, dilation, groups)
    r = F.conv2d(r, weight.abs(), None, stride, padding, dilation, groups)
    return c - r, c + r


@pytest.mark.parametrize("kernel,stride,padding,dilation,groups", [
    (3, 1, 1, 1, 1), (4, 2, 1, 1, 1), (3, 2, 1, 1, 3), (1, 2, 0, 1, 1), (3, 1, 2, 2, 1), (5, 3, 2, 1, 1),
])
def test_window_convolution_equals_dense_interval_convolution(kernel, stride, padding, dilation, groups):
    ws = _random_window()
    weight = torch.randn(6, 3 // groups, kernel, kernel, dtype=torch.float64)
    bias = torch.randn(6, dtype=torch.float64)
    lo, hi = W.materialize(ws)
    out = W.conv_window(ws, weight, bias, (stride, stride), (padding, padding), (dilation, dilation), groups)
    want = _dense_conv(lo, hi, weight, bias, stride, padding, dilation, groups)
    got = W.materialize(out)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-12)


def test_window_relu_and_residual_add_equal_dense_interval_arithmetic():
    ws = _random_window(1)
    lo, hi = W.materialize(ws)
    got = W.materialize(W.relu_window(ws))
    torch.testing.assert_close(got[0], lo.relu(), rtol=0, atol=1e-12)
    torch.testing.assert_close(got[1], hi.relu(), rtol=0, atol=1e-12)
    other = W.conv_window(ws, torch.randn(3, 3, 3, 3, dtype=torch.float64), None, (1, 1), (1, 1), (1, 1), 1)
    o_lo, o_hi = W.materialize(other)
    total = W.materialize(W.union_add(ws, other))
    torch.testing.assert_close(total[0], lo + o_lo, rtol=0, atol=1e-12)
    torch.testing.assert_close(total[1], hi + o_hi, rtol=0, atol=1e-12)


@pytest.mark.parametrize("per_image", [False, True])
def test_window_linear_map_equals_dense_interval_arithmetic(per_image):
    ws = W.relu_window(_random_window(2))
    flat = WindowState(ws.clean, ws.dlo, ws.dhi, ws.oy, ws.ox, ws.row_img, True)
    lo, hi = (t.reshape(ws.rows, -1) for t in W.materialize(ws))
    g = torch.Generator().manual_seed(3)
    coef = torch.randn(*((2,) if per_image else ()), 5, lo.shape[1], generator=g, dtype=torch.float64)
    bias = torch.randn(*((2,) if per_image else ()), 5, generator=g, dtype=torch.float64)
    got = W.linear_window(flat, coef, bias)
    c = coef[ws.row_img] if per_image else coef.expand(ws.rows, -1, -1)
    b = bias[ws.row_img] if per_image else bias
    centre = torch.einsum("roj,rj->ro", c, (lo + hi) / 2) + b
    radius = torch.einsum("roj,rj->ro", c.abs(), (hi - lo) / 2)
    torch.testing.assert_close(got[0], centre - radius, rtol=0, atol=1e-12)
    torch.testing.assert_close(got[1], centre + radius, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- the engine against plain IBP


def _colour_net(arch: str) -> nn.Module:
    train_x, train_y = toy_images(256, channels=3, seed=1000)
    torch.manual_seed(0)
    net = ARCHITECTURES[arch](channels=3, size=SIZE)
    return train_briefly(net, train_x, train_y, steps=30, preprocess=Normalized(nn.Identity(), MEAN3, STD3))


class _Flat(nn.Module):
    """Takes flattened images (N, C*H*W) and reshapes them for ``net``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x.reshape(-1, 3, SIZE, SIZE))


class _Nhwc(nn.Module):
    """Takes channels-last images (N, H, W, C) and permutes them for ``net``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x.permute(0, 3, 1, 2))


def _variants(arch: str):
    """``(name, model taking [0, 1] NCHW images or normalized ones, domain)`` for one architecture."""
    net = _colour_net(arch)
    yield "inside-nchw", ImageModel(net, image_shape=(3, SIZE, SIZE), mean=MEAN3, std=STD3).eval(), None
    yield "inside-nhwc", ImageModel(_Nhwc(net), image_shape=(3, SIZE, SIZE), layout="nhwc", mean=MEAN3,
                                    std=STD3).eval(), None
    yield "inside-flat", ImageModel(_Flat(net), image_shape=(3, SIZE, SIZE), layout="flat", mean=MEAN3,
                                    std=STD3).eval(), None
    yield "outside-domain", net.eval(), PixelDomain(mean=MEAN3, std=STD3)


def _plain_ibp(model, images, labels, masks, domain):
    """Plain auto_LiRPA IBP: a stock BoundedModule, one explicit box per row, the specification per row."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = BoundedModule(model, torch.zeros(1, *images.shape[1:]), custom_ops=stock_ops())
    ptb = PatchPerturbation(masks=masks, domain=domain)
    rows = ptb.expand(images)
    x_l, x_u = ptb.bounds(rows)
    spec = margin_spec(labels, NUM_CLASSES).repeat_interleave(masks.shape[0], dim=0)
    with torch.no_grad():
        lb, _ = stock.compute_bounds(x=(BoundedTensor(rows, PerturbationLpNorm(norm=float("inf"), x_L=x_l, x_U=x_u)),),
                                     C=spec, method="IBP", bound_upper=False)
    return lb.reshape(images.shape[0], masks.shape[0], -1)


@pytest.mark.parametrize("arch", tuple(ARCHITECTURES))
def test_engine_margins_equal_plain_ibp_in_every_layout(arch):
    images, labels = toy_images(3, channels=3, seed=7)
    normalized = (images - torch.tensor(MEAN3).view(1, 3, 1, 1)) / torch.tensor(STD3).view(1, 3, 1, 1)
    for name, model, domain in _variants(arch):
        x = normalized if domain is not None else images
        bounded = bound_model(model, (3, SIZE, SIZE))
        for shape in ("square", "parallelogram"):
            masks = all_locations(make_shape(shape, 2), (SIZE, SIZE)).masks
            with torch.no_grad():
                ours = lower_margins(bounded, x, labels, masks, num_classes=NUM_CLASSES, domain=domain)
            plain = _plain_ibp(model, x, labels, masks, domain)
            scale = 1.0 + plain.abs().max()
            assert float((ours - plain).abs().max()) <= 1e-5 * scale, (arch, name, shape)


@pytest.mark.parametrize("sparse_product", [True, False])
def test_first_linear_layer_rows_equal_plain_ibp_by_either_product(sparse_product, monkeypatch):
    """The first linear layer bounds rows by one sparse x dense product per bound (CPU, no gradients) or
    by batched column products (GPU, gradients): both equal plain IBP, for a grid of rows (every image,
    the same locations) and for rows of any (image, location), with shapes of unequal pixel counts."""
    monkeypatch.setattr("lirpa_patch.threats.patch._SPARSE_ROWS", sparse_product)
    images, labels = toy_images(3, channels=3, seed=7)
    _, model, _ = next(_variants("mlp"))  # normalization inside, NCHW
    bounded = bound_model(model, (3, SIZE, SIZE))
    for shape in ("square", "diamond"):
        locations = all_locations(make_shape(shape, 3), (SIZE, SIZE))
        plain = _plain_ibp(model, images, labels, locations.masks, None)
        scale = 1.0 + plain.abs().max()
        per_image = torch.stack([torch.randperm(len(locations), generator=torch.Generator().manual_seed(i))[:5]
                                 for i in range(3)])  # (3, 5): rows of any (image, location)
        with torch.no_grad():
            grid = lower_margins(bounded, images, labels, locations=locations, num_classes=NUM_CLASSES)
            rows = lower_margins(bounded, images, labels, locations=locations, index=per_image,
                                 num_classes=NUM_CLASSES)
        assert float((grid - plain).abs().max()) <= 1e-5 * scale, shape
        expected = torch.stack([plain[i, per_image[i]] for i in range(3)])
        assert float((rows - expected).abs().max()) <= 1e-5 * scale, shape


@pytest.mark.parametrize("arch", tuple(ARCHITECTURES))
def test_engine_never_builds_the_row_box(arch, monkeypatch):
    """Virtual rows: the (rows, C, H, W) box is not materialized when the first mixing layer is affine."""
    images, labels = toy_images(2, channels=3, seed=7)
    built, windows = [], []

    def spy(self, x):
        built.append(tuple(x.shape))
        return original(self, x)

    def conv_spy(*args, **kwargs):
        windows.append(1)
        return original_conv(*args, **kwargs)

    original, original_conv = PatchPerturbation.bounds, W.conv_window
    monkeypatch.setattr(PatchPerturbation, "bounds", spy)
    monkeypatch.setattr("lirpa_patch.ops.conv.conv_window", conv_spy)
    monkeypatch.setattr("lirpa_patch.threats.patch.conv_window", conv_spy)
    for name, model, domain in _variants(arch):
        windows.clear()
        result = certify(model, images, labels, size=2, domain=domain)
        assert result.num_images == 2 and built == [], name
        assert bool(windows) == (arch != "mlp"), name  # convolutions carry windows


@pytest.mark.parametrize("counts", [[70, 70, 70], [90, 0, 65, 130]])
def test_dense_linear_layer_image_by_image_equals_interval_arithmetic(counts):
    """After the first layer, a dense linear layer bounds each image's rows through its live columns only
    (columns zero in every row of the image add nothing): the bounds are those of plain interval
    arithmetic, whether few columns are live (the live path) or most (all columns)."""
    from lirpa_patch.ops.linear import _bounds_by_image

    g = torch.Generator().manual_seed(3)
    rows, j, o = sum(counts), 40, 7
    lo = torch.randn(rows, j, generator=g, dtype=torch.float64)
    hi = lo + torch.rand(rows, j, generator=g, dtype=torch.float64)
    row_img = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    dead = torch.rand(len(counts), j, generator=g) < torch.tensor([0.9, 0.2, 0.95, 0.1])[: len(counts), None]
    lo, hi = lo.masked_fill(dead[row_img], 0.0), hi.masked_fill(dead[row_img], 0.0)
    weight = torch.randn(j, o, generator=g, dtype=torch.float64)
    bias = torch.randn(o, generator=g, dtype=torch.float64)
    lower, upper = _bounds_by_image(lo, hi, weight, bias, counts)
    c, r = (lo + hi) / 2, (hi - lo) / 2
    ref_lower, ref_upper = c @ weight - r @ weight.abs() + bias, c @ weight + r @ weight.abs() + bias
    torch.testing.assert_close(lower, ref_lower, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(upper, ref_upper, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- attacks on every layout


@pytest.mark.parametrize("arch", tuple(ARCHITECTURES))
def test_bounds_of_every_layout_hold_under_attack(arch):
    images, labels = toy_images(2, channels=3, seed=8)
    masks = all_locations(make_shape("square", 2), (SIZE, SIZE)).masks
    normalized = (images - torch.tensor(MEAN3).view(1, 3, 1, 1)) / torch.tensor(STD3).view(1, 3, 1, 1)
    for name, model, domain in _variants(arch):
        x = normalized if domain is not None else images
        bounded = bound_model(model, (3, SIZE, SIZE))
        with torch.no_grad():
            lower = lower_margins(bounded, x, labels, masks, num_classes=NUM_CLASSES, domain=domain)
        found = attack_patch(model, x, labels, masks, domain=domain, restarts=1, pgd_steps=6, seed=11)
        assert_sound(found, lower, rounding_tolerance(model, x), what=f"{arch} {name}")


# ----------------------------------------------------------------------------- rows without masks


@pytest.mark.parametrize("arch", tuple(ARCHITECTURES))
def test_location_index_rows_equal_mask_rows(arch):
    """``locations=`` + ``index=`` (shared or per image) and any (image, location) rows bound like masks."""
    from lirpa_patch.engine import location_margins

    images, labels = toy_images(3, channels=3, seed=9)
    model = ImageModel(_colour_net(arch), image_shape=(3, SIZE, SIZE), mean=MEAN3, std=STD3).eval()
    bounded = bound_model(model, (3, SIZE, SIZE))
    locations = all_locations(make_shape("diamond", 2), (SIZE, SIZE))
    g = torch.Generator().manual_seed(0)
    per_image = torch.stack([torch.randperm(len(locations), generator=g)[:7] for _ in range(3)])  # (3, 7)
    with torch.no_grad():
        by_masks = lower_margins(bounded, images, labels, locations.masks[per_image], num_classes=NUM_CLASSES)
        by_index = lower_margins(bounded, images, labels, locations=locations, index=per_image,
                                 num_classes=NUM_CLASSES)
        shared = lower_margins(bounded, images, labels, locations=locations, num_classes=NUM_CLASSES)
        row_img = torch.tensor([2, 0, 1, 0, 2])
        row_loc = torch.tensor([5, 3, 0, 9, 5])
        rows = location_margins(bounded, locations, images, labels, row_img, row_loc, num_classes=NUM_CLASSES)
    scale = 1e-5 * (1 + float(shared.abs().max()))  # float rounding: sums in another order
    assert float((by_index - by_masks).abs().max()) <= scale
    assert float((rows - shared[row_img, row_loc]).abs().max()) <= scale
