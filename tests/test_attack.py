"""Empirical attacks (``lirpa_patch.attacks``): as strong as the test suite's own attacks,
every success real and inside the threat model, options checked."""

from __future__ import annotations

import pytest
import torch

from lirpa_patch.attacks import attack_patch, attack_sparse
from lirpa_patch.domain import PixelDomain
from lirpa_patch.errors import UsageError
from lirpa_patch.locations import all_locations
from lirpa_patch.shapes import make_shape
from tests.attacks import attack_patch as reference_patch_attack
from tests.attacks import margins
from tests.sparse_attacks import pgd_sparse
from tests.toy_models import Normalized, toy_images, toy_model

SIZE = 10


@pytest.fixture(scope="module")
def toys():
    images, labels = toy_images(32, seed=11)
    models = {arch: toy_model(arch, size=SIZE) for arch in ("mlp", "cnn")}
    return images, labels, models


def _broken(model, images, labels, found_margins: torch.Tensor) -> int:
    with torch.no_grad():
        correct = model(images).argmax(1) == labels
    worst = found_margins.reshape(found_margins.shape[0], -1).amin(1)
    return int(((worst < 0) & correct).sum())


# ----------------------------------------------------------------------------- strength


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_patch_attack_breaks_at_least_as_many_images_as_the_test_suite_attack(arch, toys):
    images, labels, models = toys
    model = models[arch]
    locations = all_locations(make_shape("square", 2), (SIZE, SIZE))
    reference = _broken(model, images, labels, reference_patch_attack(model, images, labels, locations.masks))
    ours = attack_patch(model, images, labels, size=2)
    assert reference > 0  # the comparison means something
    assert ours.num_successes >= reference


@pytest.mark.parametrize("k", [2, 3])
def test_sparse_attack_breaks_at_least_as_many_images_as_the_test_suite_attack(k, toys):
    images, labels, models = toys
    model = models["cnn"]
    found = pgd_sparse(lambda z: margins(model, z, labels), images, k, generator=torch.Generator().manual_seed(0))
    reference = _broken(model, images, labels, found)
    ours = attack_sparse(model, images, labels, k=k)
    assert reference > 0
    assert ours.num_successes >= reference


@pytest.mark.slow
def test_patch_attack_matches_the_test_suite_attack_on_mnist_net_256x2(shared_dir):
    """50 held-out digits, 2x2 patch, every location: the suite's attack breaks 12 of them."""
    from lirpa_patch.data import load_dataset
    from lirpa_patch.models import image_model, load_model

    data = load_dataset(str(shared_dir / "data" / "mnist_5k.npz"), start=4000, num=50)
    model = image_model(load_model(str(shared_dir / "models" / "mnist-net_256x2.onnx")), image_shape=(1, 28, 28))
    locations = all_locations(make_shape("square", 2), (28, 28))
    reference = _broken(model, data.images, data.labels,
                        reference_patch_attack(model, data.images, data.labels, locations.masks))
    ours = attack_patch(model, data.images, data.labels, size=2)
    assert ours.num_successes >= reference >= 10


# ----------------------------------------------------------------------------- results are real


@pytest.mark.parametrize("shape", ["square", "diamond", "rectangle"])
def test_every_patch_success_is_real_and_inside_its_reported_location(shape, toys):
    images, labels, models = toys
    model = models["cnn"]
    result = attack_patch(model, images, labels, size=2, shape=shape)
    locations = all_locations(make_shape(shape, 2), (SIZE, SIZE))
    assert result.num_successes > 0
    with torch.no_grad():
        preds = model(result.adversarial).argmax(1)
    for i, record in enumerate(result.images):
        if not record.success:
            continue
        assert int(preds[i]) == record.adversarial_class != record.label
        loc = record.location
        changed = (result.adversarial[i] != images[i]).any(0)
        top, left, v = loc["top"], loc["left"], loc["variant"]
        variant = locations.shape.variants[v]
        allowed = torch.zeros(SIZE, SIZE, dtype=torch.bool)
        allowed[top : top + variant.shape[0], left : left + variant.shape[1]] = variant
        assert not bool((changed & ~allowed).any())
        assert float(result.adversarial[i].min()) >= 0 and float(result.adversarial[i].max()) <= 1


def test_patch_attack_reports_the_real_margin_of_its_adversarial_image(toys):
    images, labels, models = toys
    model = models["mlp"]
    result = attack_patch(model, images, labels, size=2)
    with torch.no_grad():
        real = margins(model, result.adversarial, labels).min(1).values
    for i, record in enumerate(result.images):
        assert record.margin == pytest.approx(float(real[i]), abs=1e-5)
        assert record.success == (record.margin < 0)


def test_sparse_success_changes_at_most_k_pixels_and_lists_them(toys):
    images, labels, models = toys
    model = models["cnn"]
    result = attack_sparse(model, images, labels, k=3)
    assert result.num_successes > 0
    with torch.no_grad():
        preds = model(result.adversarial).argmax(1)
    for i, record in enumerate(result.images):
        changed = (result.adversarial[i] != images[i]).any(0)
        assert int(changed.sum()) <= 3
        assert sorted(map(tuple, record.location["pixels"])) == sorted(map(tuple, torch.nonzero(changed).tolist()))
        if record.success:
            assert int(preds[i]) == record.adversarial_class != record.label


@pytest.mark.parametrize("threat", ["patch", "sparse"])
def test_attacks_keep_every_channel_in_its_own_normalized_range(threat):
    mean, std = (0.2, 0.4, 0.6), (0.3, 0.2, 0.25)
    images, labels = toy_images(12, channels=3, seed=5)
    net = toy_model("cnn", channels=3)
    model = Normalized(net, mean, std)  # only used to make a model of normalized input below
    domain = PixelDomain(mean=mean, std=std)
    normalized = (images - model.mean) / model.std
    if threat == "patch":
        result = attack_patch(net, normalized, labels, size=3, domain=domain)
    else:
        result = attack_sparse(net, normalized, labels, k=3, domain=domain)
    lo, hi = domain.bounds(3, images)
    adv = result.adversarial
    assert bool((adv >= lo.view(1, 3, 1, 1) - 1e-6).all()) and bool((adv <= hi.view(1, 3, 1, 1) + 1e-6).all())
    assert result.num_successes > 0


def test_misclassified_images_are_not_attacked(toys):
    images, labels, models = toys
    wrong = (labels + 1) % 4
    result = attack_patch(models["mlp"], images[:4], wrong[:4], size=2)
    for record in result.images:
        assert not record.correct and not record.success and record.margin is None and record.location is None
    assert result.empirical_accuracy == 0.0 and torch.equal(result.adversarial, images[:4])


def test_empirical_accuracy_counts_correct_and_unbroken_images(toys):
    images, labels, models = toys
    result = attack_patch(models["cnn"], images, labels, size=2)
    robust = sum(r.correct and not r.success for r in result.images)
    assert result.empirical_accuracy == pytest.approx(robust / len(images))
    assert result.empirical_accuracy <= result.clean_accuracy


def test_without_sweep_and_candidates_only_the_given_locations_are_attacked(toys):
    images, labels, models = toys
    locations = all_locations(make_shape("square", 3), (SIZE, SIZE))
    chosen = torch.tensor([[0, 27, 40]] * len(images))
    allowed = {(int(locations.top[i]), int(locations.left[i])) for i in (0, 27, 40)}
    result = attack_patch(models["mlp"], images, labels, locations=locations, location_index=chosen,
                          candidates=0, sweep=False)
    assert result.num_successes > 0
    for record in result.images:
        if record.correct:
            assert (record.location["top"], record.location["left"]) in allowed


def test_candidates_without_the_sweep_are_a_usage_error(toys):
    images, labels, models = toys
    with pytest.raises(UsageError) as info:
        attack_patch(models["mlp"], images, labels, size=2, sweep=False, candidates=4)
    assert info.value.param == "candidates"


def test_same_seed_same_result(toys):
    images, labels, models = toys
    a = attack_patch(models["cnn"], images, labels, size=2, seed=3)
    b = attack_patch(models["cnn"], images, labels, size=2, seed=3)
    assert [r.to_dict() for r in a.images] == [r.to_dict() for r in b.images]
    assert torch.equal(a.adversarial, b.adversarial)


@pytest.mark.parametrize("chunk", [7, 100000])
def test_chunk_size_is_only_a_memory_knob_for_the_sweep(chunk, toys):
    images, labels, models = toys
    small = attack_patch(models["cnn"], images, labels, size=2, restarts=1, steps=0, chunk_size=chunk)
    full = attack_patch(models["cnn"], images, labels, size=2, restarts=1, steps=0)
    assert [r.success for r in small.images] == [r.success for r in full.images]
    unbroken = [i for i, r in enumerate(full.images) if not r.success]  # broken images stop early, anywhere
    assert [small.images[i].margin for i in unbroken] == pytest.approx([full.images[i].margin for i in unbroken],
                                                                       abs=1e-4)


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("kwargs, param", [
    ({"steps": -1}, "steps"), ({"restarts": 0}, "restarts"), ({"step_size": 0}, "step_size"),
    ({"loss": "hinge"}, "loss"), ({"chunk_size": 0}, "chunk_size"), ({"candidates": -1}, "candidates"),
    ({"location_index": torch.zeros(3, 1, dtype=torch.long)}, "location_index"),
    ({"location_index": torch.full((32, 1), 999)}, "location_index"),
])
def test_bad_patch_attack_options_are_usage_errors_naming_the_parameter(kwargs, param, toys):
    images, labels, models = toys
    with pytest.raises(UsageError) as info:
        attack_patch(models["mlp"], images, labels, size=2, **kwargs)
    assert info.value.param == param


@pytest.mark.parametrize("kwargs, param", [({"k": 0}, "k"), ({"k": 101}, "k"), ({"k": 2, "candidates": 0}, "candidates")])
def test_bad_sparse_attack_options_are_usage_errors_naming_the_parameter(kwargs, param, toys):
    images, labels, models = toys
    with pytest.raises(UsageError) as info:
        attack_sparse(models["mlp"], images, labels, **kwargs)
    assert info.value.param == param
