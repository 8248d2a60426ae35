"""The certification engine (``lirpa_patch.engine``): per-image records, chunking, the worst
margin over locations, the specification merged into the last layer, input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from auto_LiRPA import BoundedTensor
from lirpa_patch.engine import bound_model, certify, lower_margins
from lirpa_patch.errors import DataError, ModelError, UsageError
from lirpa_patch.locations import all_locations
from lirpa_patch import PatchPerturbation
from lirpa_patch.shapes import make_shape
from lirpa_patch.spec import margin_spec, other_classes
from tests.reference_ibp import interval_forward
from tests.toy_models import NUM_CLASSES, toy_images, toy_model

SIZE = 10




@pytest.fixture(scope="module")
def setup():
    """A trained toy CNN and MLP, their BoundedModules, and 4 images of which image 1 is mislabelled."""
    images, labels = toy_images(4, seed=7)
    models = {arch: toy_model(arch, size=SIZE) for arch in ("cnn", "mlp")}
    with torch.no_grad():
        for model in models.values():
            assert bool((model(images).argmax(1) == labels).all())
    labels = labels.clone()
    labels[1] = (labels[1] + 1) % NUM_CLASSES  # now misclassified by every model
    bounded = {arch: bound_model(m, (1, SIZE, SIZE)) for arch, m in models.items()}
    return images, labels, models, bounded


def _margins(bounded, images, labels, masks, method="ibp"):
    with torch.no_grad():
        return lower_margins(bounded, images, labels, masks, num_classes=NUM_CLASSES, method=method)


# ----------------------------------------------------------------------------- per-image records


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_records_skip_misclassified_images_and_certify_iff_worst_margin_nonnegative(method, setup):
    images, labels, models, bounded = setup
    result = certify(models["cnn"], images, labels, size=2, method=method, bounded=bounded["cnn"],
                     indices=[10, 11, 12, 13])
    assert result.num_images == 4 and result.method == method and result.num_locations == (SIZE - 1) ** 2
    with torch.no_grad():
        preds = models["cnn"](images).argmax(1)
    for k, record in enumerate(result.images):
        assert record.index == 10 + k and record.label == int(labels[k]) and record.prediction == int(preds[k])
        assert record.correct == (k != 1)
        if not record.correct:
            assert record.worst_margin is None and record.worst_location is None and record.worst_class is None
            assert not record.certified
        else:
            assert isinstance(record.worst_margin, float)
            assert record.certified == (record.worst_margin >= 0)
            assert record.worst_class != record.label and 0 <= record.worst_class < NUM_CLASSES
            assert set(record.worst_location) == {"shape", "variant", "height", "width", "top", "left"}
    assert result.clean_accuracy == 0.75
    assert result.certified_accuracy == sum(r.certified for r in result.images) / 4


def test_certified_flag_follows_the_sign_of_the_worst_margin_on_both_sides_of_zero(setup):
    """With a 2x2 patch and IBP the toy MLP certifies some images and not others."""
    images, labels, models, bounded = setup
    result = certify(models["mlp"], images, labels, size=2, method="ibp", bounded=bounded["mlp"])
    correct = [r for r in result.images if r.correct]
    assert [r.certified for r in correct] == [r.worst_margin >= 0 for r in correct]
    assert {r.certified for r in correct} == {True, False}


def test_worst_margin_is_the_minimum_over_a_brute_force_loop_of_locations(setup):
    images, labels, models, bounded = setup
    shape = make_shape("parallelogram", 2)
    locations = all_locations(shape, (SIZE, SIZE))
    result = certify(models["cnn"], images, labels, shape=shape, method="ibp", bounded=bounded["cnn"])
    others = other_classes(labels, NUM_CLASSES)
    for k, record in enumerate(result.images):
        if not record.correct:
            continue
        per_location = torch.stack([
            _margins(bounded["cnn"], images[k : k + 1], labels[k : k + 1], locations.masks[i : i + 1])[0, 0]
            for i in range(len(locations))
        ])  # (L, K-1), one compute_bounds call per location
        value = per_location.min()
        loc, cls = divmod(int(per_location.argmin()), NUM_CLASSES - 1)
        assert record.worst_margin == pytest.approx(float(value), rel=1e-5, abs=1e-5)
        assert record.worst_location == locations.describe(loc)
        assert record.worst_class == int(others[k, cls])


@pytest.mark.parametrize("chunk", [5, 4096])
def test_location_margins_are_each_locations_worst_margin_and_nan_when_misclassified(chunk, setup):
    images, labels, models, bounded = setup
    shape = make_shape("line", 2)
    locations = all_locations(shape, (SIZE, SIZE))
    result = certify(models["mlp"], images, labels, shape=shape, bounded=bounded["mlp"], chunk_size=chunk,
                     keep_location_margins=True)
    kept = result.location_margins
    assert kept.shape == (4, len(locations)) and result.locations is not None
    want = _margins(bounded["mlp"], images, labels, locations.masks).min(dim=2).values  # (N, L)
    for k, record in enumerate(result.images):
        if not record.correct:
            assert bool(kept[k].isnan().all())
            continue
        assert torch.allclose(kept[k], want[k], atol=1e-5)
        assert float(kept[k].min()) == pytest.approx(record.worst_margin, abs=1e-6)
        assert locations.describe(int(kept[k].argmin())) == record.worst_location


def test_location_margins_are_not_kept_unless_asked(setup):
    images, labels, models, bounded = setup
    result = certify(models["mlp"], images, labels, size=2, bounded=bounded["mlp"])
    assert result.location_margins is None and result.locations is None


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_chunk_size_does_not_change_results(method, setup):
    """(A cascade that stops early bounds fewer rows of a failed image with smaller chunks, which
    can lower its margin but not its answer; exhaustive, every margin is the same.)"""
    images, labels, models, bounded = setup
    runs = {}
    for chunk in ([1, 7, 4096] if method == "ibp" else [7, 4096]):
        result = certify(models["cnn"], images, labels, size=2, shape="line", method=method,
                         bounded=bounded["cnn"], chunk_size=chunk, exhaustive=True, intermediate="crown")
        runs[chunk] = [(r.worst_margin, r.worst_location, r.worst_class, r.certified) for r in result.images]
    reference = runs.pop(4096)
    for chunk, records in runs.items():
        for got, want in zip(records, reference):
            if want[0] is None:
                assert got == want
                continue
            # CROWN's float32 rounding depends on the batch (rel. 1e-4); IBP's hardly
            tol = 1e-4 if method == "crown" else 1e-5
            assert got[0] == pytest.approx(want[0], rel=tol, abs=tol), f"chunk {chunk}"
            assert got[1:] == want[1:], f"chunk {chunk}"


def test_explicit_location_subset_can_only_raise_the_worst_margin(setup):
    images, labels, models, bounded = setup
    shape = make_shape("square", 2)
    everywhere = all_locations(shape, (SIZE, SIZE))
    some = everywhere.subset(torch.arange(0, len(everywhere), 5))
    full = certify(models["cnn"], images, labels, shape=shape, bounded=bounded["cnn"])
    part = certify(models["cnn"], images, labels, shape=shape, locations=some, bounded=bounded["cnn"])
    assert part.num_locations == len(some)
    for a, b in zip(part.images, full.images):
        if b.correct:
            assert a.worst_margin >= b.worst_margin - 1e-6


def test_progress_reports_every_chunk_and_finishes_with_all_rows(setup):
    images, labels, models, bounded = setup
    calls = []
    certify(models["mlp"], images, labels, size=2, bounded=bounded["mlp"], chunk_size=40,
            progress=lambda i, l: calls.append((i, l)))
    n_loc = (SIZE - 1) ** 2
    assert calls[-1] == (3, 3 * n_loc)  # the three correctly classified images
    assert calls == sorted(calls) and len(calls) > 3


# ----------------------------------------------------------------------------- the specification


def test_margin_spec_rows_are_true_minus_other_in_increasing_order():
    labels = torch.tensor([0, 2, 3])
    spec = margin_spec(labels, 4)
    assert spec.shape == (3, 3, 4)
    others = other_classes(labels, 4)
    assert others.tolist() == [[1, 2, 3], [0, 1, 3], [0, 1, 2]]
    for i in range(3):
        for j in range(3):
            expected = torch.zeros(4)
            expected[labels[i]], expected[others[i, j]] = 1, -1
            assert torch.equal(spec[i, j], expected)


@pytest.mark.parametrize("arch", ["cnn", "mlp"])
def test_ibp_margins_equal_reference_interval_propagation_with_c_merged(arch, setup):
    images, labels, models, bounded = setup
    masks = all_locations(make_shape("diamond", 2), (SIZE, SIZE)).masks
    ptb = PatchPerturbation(masks=masks)
    rows = ptb.expand(images)
    x_l, x_u = ptb.bounds(rows)
    spec = margin_spec(labels, NUM_CLASSES).repeat_interleave(len(masks), dim=0)
    ref_lb, _ = interval_forward(models[arch], x_l, x_u, C=spec)
    got = _margins(bounded[arch], images, labels, masks)
    scale = float(ref_lb.abs().max())  # float32 rounding grows with the size of the margins
    torch.testing.assert_close(got.reshape(ref_lb.shape), ref_lb, atol=1e-5 * (1 + scale), rtol=0)


@pytest.mark.parametrize("arch", ["cnn", "mlp"])
def test_c_merged_into_last_layer_is_at_least_as_tight_as_subtracting_logit_bounds(arch, setup):
    images, labels, models, bounded = setup
    masks = all_locations(make_shape("square", 2), (SIZE, SIZE)).masks
    merged = _margins(bounded[arch], images, labels, masks)  # (N, L, K-1)
    ptb = PatchPerturbation(masks=masks)
    with torch.no_grad():
        lb, ub = bounded[arch].compute_bounds(x=(BoundedTensor(ptb.expand(images), ptb),), method="IBP")
    lb = lb.reshape(4, len(masks), NUM_CLASSES)
    ub = ub.reshape(4, len(masks), NUM_CLASSES)
    others = other_classes(labels, NUM_CLASSES)
    true_lb = lb.gather(2, labels.view(4, 1, 1).expand(4, len(masks), 1))
    other_ub = ub.gather(2, others.view(4, 1, -1).expand(4, len(masks), -1))
    naive = true_lb - other_ub
    assert bool((merged >= naive - 1e-5).all())
    assert bool((merged > naive + 1e-3).any())  # and strictly tighter somewhere


def test_crown_margins_are_at_least_ibp_margins_on_an_mlp(setup):
    """On this (seeded) MLP CROWN is tighter than IBP at every (image, location, class)."""
    images, labels, models, bounded = setup
    masks = all_locations(make_shape("square", 2), (SIZE, SIZE)).masks
    ibp = _margins(bounded["mlp"], images, labels, masks, "ibp")
    crown = _margins(bounded["mlp"], images, labels, masks, "crown")
    assert bool((crown >= ibp - 1e-5).all())
    assert float((crown - ibp).mean()) > 0


def test_lower_margins_are_differentiable_in_the_parameters(setup):
    images, labels, models, bounded = setup
    masks = all_locations(make_shape("square", 2), (SIZE, SIZE)).masks[:5]
    lb = lower_margins(bounded["mlp"], images, labels, masks, num_classes=NUM_CLASSES, method="crown")
    lb.sum().backward()
    grads = [p.grad for p in bounded["mlp"].parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    bounded["mlp"].zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [-1, NUM_CLASSES, 99])
def test_label_out_of_range_is_data_error(bad, setup):
    images, labels, models, bounded = setup
    labels = labels.clone()
    labels[2] = bad
    with pytest.raises(DataError, match="labels"):
        certify(models["mlp"], images, labels, bounded=bounded["mlp"])
    with pytest.raises(DataError):
        margin_spec(labels, NUM_CLASSES)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_images_are_usage_error(value, setup):
    images, labels, models, bounded = setup
    images = images.clone()
    images[0, 0, 3, 3] = value
    with pytest.raises(UsageError, match="NaN"):
        certify(models["mlp"], images, labels, bounded=bounded["mlp"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "beta-crown"}, "method"),
        ({"method": "crown", "intermediate": "forward"}, "intermediate"),
        ({"chunk_size": 0}, "chunk"),
        ({"shape": "circle"}, "shape"),
        ({"size": 11}, "larger"),
    ],
)
def test_bad_options_are_usage_errors(kwargs, match, setup):
    images, labels, models, bounded = setup
    with pytest.raises(UsageError, match=match):
        certify(models["mlp"], images, labels, bounded=bounded["mlp"], **kwargs)


def test_bad_image_or_label_shapes_are_usage_errors(setup):
    images, labels, models, bounded = setup
    with pytest.raises(UsageError):
        certify(models["mlp"], images[0], labels, bounded=bounded["mlp"])
    with pytest.raises(UsageError):
        certify(models["mlp"], images, labels[:3], bounded=bounded["mlp"])
    with pytest.raises(UsageError):
        certify(models["mlp"], images, labels, locations=all_locations(make_shape("square", 2), (8, 8)))
    with pytest.raises(UsageError):
        lower_margins(bounded["mlp"], images, labels, torch.ones(1, SIZE, SIZE, dtype=torch.bool),
                      num_classes=NUM_CLASSES, method="zonotope")


def test_model_returning_non_logits_is_model_error(setup):
    images, labels, _, _ = setup
    with pytest.raises(ModelError):
        certify(torch.nn.Flatten(0), images, labels)
    with pytest.raises(ModelError):
        certify(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(SIZE * SIZE, 4), torch.nn.LogSoftmax(1),
                                    torch.nn.Threshold(1.0, float("nan"))), images, labels)


def test_result_to_dict_is_json_friendly(setup):
    import json

    images, labels, models, bounded = setup
    result = certify(models["mlp"], images, labels, bounded=bounded["mlp"])
    text = json.dumps([r.to_dict() for r in result.images])
    assert np.isfinite(result.images_per_second) and "worst_margin" in text


def test_an_op_auto_lirpa_cannot_bound_is_model_error_naming_it():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3), torch.nn.SELU())
    with pytest.raises(ModelError, match=r"no bounds for the op\(s\) Selu;") as error:
        bound_model(net, (1, 4, 4))
    assert "\n" not in str(error.value)
