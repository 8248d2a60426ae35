"""Soundness: no concrete patch beats a certified bound.

For every shape, both bound methods and three architectures (MLP, CNN, residual
net), at EVERY location, the real margins ``z_true - z_other`` found by random,
corner and PGD patch contents (``tests/attacks.py``) must be >= the certified
lower margins of :func:`lirpa_patch.engine.lower_margins`, and
:func:`lirpa_patch.engine.certify`'s worst margin must be <= every attacked
margin of the image. Slack: float rounding only (``rounding_tolerance``:
``1e-5 + 1e-5 * max |logit|``; in float64 a flat ``1e-5``).

The last tests make sure the checker has teeth: bounds that are a little too
optimistic (a constant added, a shrunken box, the wrong pixels) are caught.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from auto_LiRPA import BoundedModule

from lirpa_patch.engine import bound_model, certify, lower_margins
from lirpa_patch.domain import PixelDomain
from lirpa_patch.locations import all_locations
from lirpa_patch import PatchPerturbation
from lirpa_patch.shapes import TRANSFER_SHAPES, make_shape
from tests.attacks import assert_sound, assert_worst_margins_sound, attack_patch, rounding_tolerance, soundness_violations
from tests.toy_models import ARCHITECTURES, NUM_CLASSES, Normalized, toy_images, toy_model, train_briefly

SIZE = 10  # toy images are (C, 10, 10)
METHODS = ("ibp", "crown")
ARCHS = tuple(ARCHITECTURES)  # mlp, cnn, resnet
PATCH_SIZES = (2, 3)
MEAN3, STD3 = (0.2, 0.4, 0.6), (0.3, 0.2, 0.25)




def _lower(bounded, images, labels, masks, method, **kw) -> torch.Tensor:
    with torch.no_grad():
        return lower_margins(bounded, images, labels, masks, num_classes=NUM_CLASSES, method=method, **kw)


@pytest.fixture(scope="module")
def toys():
    """Three images, the three trained toy models with their BoundedModules, and a cached attack."""
    images, labels = toy_images(3, seed=7)
    models = {}
    for arch in ARCHS:
        model = toy_model(arch, size=SIZE)
        models[arch] = (model, bound_model(model, (1, SIZE, SIZE)))

    @lru_cache(maxsize=None)
    def attacked(arch: str, shape: str, size: int) -> torch.Tensor:
        locations = all_locations(make_shape(shape, size), (SIZE, SIZE))
        seed = 100 * ARCHS.index(arch) + 10 * TRANSFER_SHAPES.index(shape) + size
        return attack_patch(models[arch][0], images, labels, locations.masks, seed=seed)

    return images, labels, models, attacked


# ----------------------------------------------------------------------------- the matrix


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", TRANSFER_SHAPES)
@pytest.mark.parametrize("size", PATCH_SIZES)
@pytest.mark.parametrize("arch", ARCHS)
def test_bound_holds_under_attack_at_every_location(arch, size, shape, method, toys):
    images, labels, models, attacked = toys
    model, bounded = models[arch]
    locations = all_locations(make_shape(shape, size), (SIZE, SIZE))
    lower = _lower(bounded, images, labels, locations.masks, method)
    found = attacked(arch, shape, size)
    assert found.shape == lower.shape == (3, len(locations), NUM_CLASSES - 1)
    assert_sound(found, lower, rounding_tolerance(model, images), what=f"{method} {arch} {shape} {size}x{size}")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", TRANSFER_SHAPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_certified_worst_margin_is_below_every_attacked_margin(arch, shape, method, toys):
    images, labels, models, attacked = toys
    model, bounded = models[arch]
    result = certify(model, images, labels, size=2, shape=shape, method=method, bounded=bounded)
    found = attacked(arch, shape, 2)
    checked = assert_worst_margins_sound(result, found, rounding_tolerance(model, images).flatten())
    assert checked > 0  # the toy models classify the test images correctly


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ("cnn", "resnet"))
def test_bound_holds_within_1e5_in_float64(arch, method):
    """In float64 rounding is ~1e-13, so the flat 1e-5 slack of the spec applies as is."""
    images, labels = toy_images(3, seed=7)
    model = toy_model(arch, size=SIZE).double()
    images = images.double()
    bounded = BoundedModule(model, torch.zeros(1, 1, SIZE, SIZE, dtype=torch.float64))
    for shape in ("square", "line"):
        masks = all_locations(make_shape(shape, 2), (SIZE, SIZE)).masks
        lower = _lower(bounded, images, labels, masks, method)
        found = attack_patch(model, images, labels, masks, restarts=1, pgd_steps=8, seed=3)
        assert_sound(found, lower, 1e-5, what=f"float64 {method} {arch} {shape}")


@pytest.mark.parametrize("method", METHODS)
def test_bound_holds_for_per_image_location_masks(method, toys):
    """(N, L, H, W) masks (e.g. sampled locations, a different set per image) are bounded soundly."""
    images, labels, models, _ = toys
    model, bounded = models["cnn"]
    everywhere = all_locations(make_shape("diamond", 2), (SIZE, SIZE)).masks
    g = torch.Generator().manual_seed(4)
    picks = torch.stack([torch.randperm(len(everywhere), generator=g)[:12] for _ in range(images.shape[0])])
    masks = everywhere[picks]  # (N, 12, H, W)
    lower = _lower(bounded, images, labels, masks, method)
    found = attack_patch(model, images, labels, masks, seed=8)
    tol = rounding_tolerance(model, images)
    assert_sound(found, lower, tol, what=f"{method} per-image masks")
    shared = _lower(bounded, images, labels, everywhere, method)  # the same locations, bounded shared
    expected = torch.stack([shared[k, picks[k]] for k in range(images.shape[0])])
    torch.testing.assert_close(lower, expected, atol=float(tol.max()), rtol=0)


# ----------------------------------------------------------------------------- normalization, colour


@pytest.fixture(scope="module")
def colour():
    """3-channel toy images, and the three toy architectures trained on (x - mean) / std."""
    images, labels = toy_images(3, channels=3, seed=7)
    train_x, train_y = toy_images(512, channels=3, seed=1000)
    nets = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        net = ARCHITECTURES[arch](channels=3, size=SIZE)
        nets[arch] = train_briefly(net, train_x, train_y, preprocess=Normalized(torch.nn.Identity(), MEAN3, STD3))
    return images, labels, nets


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_bound_holds_for_model_normalizing_inside(arch, method, colour):
    images, labels, nets = colour
    model = Normalized(nets[arch], MEAN3, STD3).eval()
    bounded = bound_model(model, (3, SIZE, SIZE))
    for shape in ("square", "diamond"):
        masks = all_locations(make_shape(shape, 2), (SIZE, SIZE)).masks
        lower = _lower(bounded, images, labels, masks, method)
        found = attack_patch(model, images, labels, masks, seed=5)
        assert_sound(found, lower, rounding_tolerance(model, images), what=f"{method} {arch} {shape} normalized")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ("mlp", "resnet"))
def test_bound_holds_for_normalized_input_with_domain(arch, method, colour):
    """The net takes (x - mean) / std; the domain maps the patch's [0, 1] to that space."""
    images, labels, nets = colour
    net = nets[arch]
    domain = PixelDomain(mean=MEAN3, std=STD3)
    normalized = (images - torch.tensor(MEAN3).view(1, 3, 1, 1)) / torch.tensor(STD3).view(1, 3, 1, 1)
    bounded = bound_model(net, (3, SIZE, SIZE))
    masks = all_locations(make_shape("square", 2), (SIZE, SIZE)).masks
    lower = _lower(bounded, normalized, labels, masks, method, domain=domain)
    found = attack_patch(net, normalized, labels, masks, domain=domain, seed=6)
    tol = rounding_tolerance(net, normalized)
    assert_sound(found, lower, tol, what=f"{method} {arch} domain-normalized")
    result = certify(net, normalized, labels, size=2, method=method, domain=domain, bounded=bounded)
    for k, record in enumerate(result.images):
        if record.worst_margin is not None:
            assert record.worst_margin <= float(found[k].min()) + float(tol[k])


# ----------------------------------------------------------------------------- a real model


@pytest.fixture(scope="module")
def mnist_net(shared_dir: Path):
    """mnist-net_256x2 (VNN-COMP 2021) on images (N, 1, 28, 28), and 3 held-out digits it classifies."""
    from lirpa_patch.models import image_model, load_model

    loaded = load_model(shared_dir / "models" / "mnist-net_256x2.onnx")
    model = image_model(loaded, image_shape=(1, 28, 28)).eval()
    with np.load(shared_dir / "data" / "mnist_5k.npz") as data:
        images = torch.from_numpy(data["x"][4000:4003]).float().div(255).unsqueeze(1)
        labels = torch.from_numpy(data["y"][4000:4003]).long()
    with torch.no_grad():
        assert bool((model(images).argmax(1) == labels).all())
    return model, bound_model(model, (1, 28, 28)), images, labels


@pytest.fixture(scope="module")
def mnist_attacked(mnist_net):
    model, _, images, labels = mnist_net
    masks = all_locations(make_shape("square", 2), (28, 28)).masks
    return attack_patch(model, images, labels, masks, restarts=1, pgd_steps=6, seed=11)


@pytest.mark.parametrize("method", METHODS)
def test_bound_holds_on_mnist_net_256x2_at_every_2x2_location(method, mnist_net, mnist_attacked):
    model, bounded, images, labels = mnist_net
    masks = all_locations(make_shape("square", 2), (28, 28)).masks
    with torch.no_grad():
        lower = lower_margins(bounded, images, labels, masks, num_classes=10, method=method)
    assert lower.shape == mnist_attacked.shape == (3, 729, 9)
    tol = rounding_tolerance(model, images)
    assert_sound(mnist_attacked, lower, tol, what=f"{method} mnist-net_256x2")
    result = certify(model, images, labels, size=2, method=method, bounded=bounded)
    for k, record in enumerate(result.images):
        assert record.worst_margin <= float(mnist_attacked[k].min()) + float(tol[k])


# ----------------------------------------------------------------------------- the checker has teeth


def test_checker_reports_a_bound_raised_by_a_constant(toys):
    images, labels, models, attacked = toys
    model, bounded = models["cnn"]
    masks = all_locations(make_shape("square", 2), (SIZE, SIZE)).masks
    lower = _lower(bounded, images, labels, masks, "crown")
    found = attacked("cnn", "square", 2)
    broken = lower + 1.0 + (found - lower).clamp(min=0).amax()  # above every real margin
    assert soundness_violations(found, broken).all()
    with pytest.raises(AssertionError, match="UNSOUND"):
        assert_sound(found, broken, rounding_tolerance(model, images))


@pytest.mark.parametrize("method", METHODS)
def test_attack_catches_a_bound_over_a_shrunken_box(method, toys):
    """A perturbation that lets the patch move only 10% of the way is unsound, and the attack shows it."""
    images, labels, models, attacked = toys
    model, bounded = models["cnn"]
    masks = all_locations(make_shape("square", 2), (SIZE, SIZE)).masks
    too_tight = _lower(bounded, images, labels, masks, method, strength=0.1)
    found = attacked("cnn", "square", 2)
    assert soundness_violations(found, too_tight, rounding_tolerance(model, images)).any()


def test_attack_catches_a_bound_over_the_wrong_pixels(toys):
    """Bounding horizontal-line masks transposed (vertical lines) is a plausible bug: it is caught."""
    images, labels, models, attacked = toys
    model, bounded = models["mlp"]
    shape = make_shape("hline", 3)
    masks = all_locations(shape, (SIZE, SIZE)).masks
    wrong = _lower(bounded, images, labels, masks.transpose(1, 2), "crown")
    found = attack_patch(model, images, labels, masks, seed=2)
    assert soundness_violations(found, wrong, rounding_tolerance(model, images)).any()


def test_certify_check_catches_a_broken_perturbation(monkeypatch, toys):
    """If the perturbation dropped the patch (box = the clean image: no pixel may move), certify's
    worst margin would exceed an attacked margin; the check used above detects it."""
    images, labels, models, attacked = toys
    model, bounded = models["resnet"]

    def clean_only(self, x):
        return torch.zeros_like(x), torch.zeros_like(x)

    monkeypatch.setattr(PatchPerturbation, "moves", clean_only)
    result = certify(model, images, labels, size=2, method="ibp", bounded=bounded)
    found = attacked("resnet", "square", 2)
    tol = rounding_tolerance(model, images).flatten()
    caught = [
        r.worst_margin > float(found[k].min()) + float(tol[k])
        for k, r in enumerate(result.images)
        if r.worst_margin is not None
    ]
    assert any(caught)
