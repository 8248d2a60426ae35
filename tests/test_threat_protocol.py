"""The Threat protocol: a third threat is one new class, and every entry point takes it.

``RegionPatch`` (``tests/toy_threats.py``) is that class: a square patch that may only go
where it lies inside a region of the image. It implements :class:`lirpa_patch.Threat` with
the package's :class:`PatchPerturbation` and nothing else changes: ``certify``,
``attack``, ``evaluate`` and the report builders take it as they take the threats
the package ships, and its certificates hold against attacks at every location.
"""

from __future__ import annotations

import json
import pytest
import torch

from lirpa_patch import PatchThreat, SparseThreat, UsageError, attack, certify, evaluate
from lirpa_patch.evaluation import attack_report, evaluation_report
from lirpa_patch.report import RunInfo, build_report, to_json
from tests.attacks import assert_worst_margins_sound, attack_patch as reference_patch_attack, rounding_tolerance
from tests.toy_models import toy_images, toy_model
from tests.toy_threats import RegionPatch

SIZE = 10


def _left_half() -> torch.Tensor:
    region = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    region[:, : SIZE // 2] = True
    return region


@pytest.fixture(scope="module")
def toy():
    images, labels = toy_images(12, seed=5)
    return toy_model("mlp", size=SIZE), images, labels


def _run() -> RunInfo:
    return RunInfo(model="net.pt", data="toy", dataset="toy", image_shape=(1, SIZE, SIZE), start=0, num=12,
                   patch=None, method="ibp", chunk=None, device="cpu", seed=0)


def test_certify_takes_a_new_threat_and_bounds_only_its_rows(toy):
    model, images, labels = toy
    threat = RegionPatch(2, _left_half())
    result = certify(model, images, labels, threat)
    assert result.threat_model is threat and result.threat == "region-patch"
    assert result.num_locations == 4 * 9  # left columns 0-3 (a 2x2 patch inside columns 0-4), 9 rows
    for record in result.images:
        if record.worst_location is not None:
            assert record.worst_location["left"] + 2 <= SIZE // 2


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_certificates_of_a_new_threat_hold_against_attacks_at_every_location(toy, method):
    model, images, labels = toy
    threat = RegionPatch(2, _left_half())
    result = certify(model, images, labels, threat, method=method, groups=None)
    found = reference_patch_attack(model, images, labels, threat.locations.masks, seed=3)
    assert assert_worst_margins_sound(result, found, rounding_tolerance(model, images)) > 0


def test_a_new_threat_certifies_what_the_same_locations_certify_as_a_patch_threat(toy):
    model, images, labels = toy
    threat = RegionPatch(2, _left_half())
    ours = certify(model, images, labels, threat, groups=None)
    same = certify(model, images, labels, PatchThreat(2, locations=threat.locations), groups=None)
    assert [r.certified for r in ours.images] == [r.certified for r in same.images]
    for a, b in zip(ours.images, same.images):
        assert (a.worst_margin is None) == (b.worst_margin is None)
        if a.worst_margin is not None:
            assert a.worst_margin == pytest.approx(b.worst_margin, abs=1e-5)


def test_a_region_certifies_at_least_the_images_the_whole_image_certifies(toy):
    model, images, labels = toy
    region = certify(model, images, labels, RegionPatch(2, _left_half()))
    whole = certify(model, images, labels, PatchThreat(2))
    assert all(r.certified for r, w in zip(region.images, whole.images) if w.certified)


def test_attack_takes_a_new_threat_and_changes_only_pixels_of_its_rows(toy):
    model, images, labels = toy
    threat = RegionPatch(3, _left_half())
    result = attack(model, images, labels, threat, steps=5, restarts=2)
    assert result.threat == "region-patch" and result.threat_model is threat
    changed = (result.adversarial != images).flatten(1)
    outside = ~_left_half().flatten()
    assert not changed[:, outside].any()
    with torch.no_grad():
        preds = model(result.adversarial).argmax(1)
    for k, record in enumerate(result.images):
        assert record.success == (record.correct and bool(preds[k] != labels[k]))
        if record.success:
            assert record.location["left"] + 3 <= SIZE // 2


def test_attack_refuses_what_is_not_a_threat(toy):
    model, images, labels = toy
    with pytest.raises(UsageError, match="threat"):
        attack(model, images, labels, "2x2")


def test_certify_refuses_what_is_not_a_threat(toy):
    model, images, labels = toy
    with pytest.raises(UsageError, match="threat"):
        certify(model, images, labels, "2x2")


def test_evaluate_takes_a_new_threat_and_finds_no_contradiction(toy):
    model, images, labels = toy
    evaluation = evaluate(model, images, labels, RegionPatch(3, _left_half()),
                          attack_options={"steps": 5, "restarts": 2})
    assert evaluation.violations == []
    assert evaluation.threat == "region-patch" and evaluation.name == "3x3 in region"
    assert evaluation.certified_accuracy <= evaluation.empirical_accuracy <= evaluation.clean_accuracy


def test_reports_of_a_new_threat_name_it_and_carry_its_description(toy):
    model, images, labels = toy
    threat = RegionPatch(2, _left_half())
    doc = build_report(certify(model, images, labels, threat), _run())
    assert doc["summary"]["threat"] == "region-patch"
    assert doc["summary"]["size"] == 2 and doc["summary"]["region_pixels"] == SIZE * SIZE // 2
    json.loads(to_json(doc))  # strict JSON
    attacked = attack_report({"region": attack(model, images, labels, threat, steps=2, restarts=1)}, _run())
    assert attacked["summary"]["threat"] == "region-patch"
    assert attacked["runs"]["region"]["summary"]["region_pixels"] == SIZE * SIZE // 2
    json.loads(to_json(attacked))
    evaluated = evaluation_report([evaluate(model, images, labels, threat,
                                            attack_options={"steps": 2, "restarts": 1})], _run())
    assert evaluated["summary"]["rows"][0]["threat"] == "region-patch"
    json.loads(to_json(evaluated))


@pytest.mark.parametrize("threat", [PatchThreat(2), SparseThreat(3)], ids=["patch", "sparse"])
def test_the_shipped_threats_go_through_the_same_entry_points(toy, threat):
    model, images, labels = toy
    evaluation = evaluate(model, images, labels, threat, attack_options={"steps": 3, "restarts": 1})
    assert evaluation.violations == []
    assert evaluation.certified.threat_model is threat and evaluation.attacked.threat_model is threat
    assert build_report(evaluation.certified, _run())["summary"]["threat"] == threat.name
