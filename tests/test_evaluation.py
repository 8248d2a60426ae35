"""Clean >= empirical >= certified, and the cross-check that catches a certificate an attack
contradicts (``lirpa_patch.evaluation``)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lirpa_patch import engine, report
from lirpa_patch.engine import certify
from lirpa_patch.errors import UsageError
from lirpa_patch.evaluation import (
    attack_report,
    consistency_violations,
    evaluate_patch,
    evaluate_sparse,
    evaluation_report,
)
from tests.toy_models import toy_images, toy_model

SIZE = 10


@pytest.fixture(scope="module")
def toys():
    images, labels = toy_images(24, seed=11)
    return images, labels, toy_model("mlp", size=SIZE)


def _run() -> report.RunInfo:
    return report.RunInfo(model="net.onnx", data="sample", dataset="sample", image_shape=(1, SIZE, SIZE), start=0,
                          num=24, patch="2x2", method="ibp", chunk=4096, device="cpu", seed=0)


@pytest.mark.parametrize("shape", ["square", "diamond"])
def test_clean_at_least_empirical_at_least_certified_and_no_violation(shape, toys):
    images, labels, model = toys
    result = evaluate_patch(model, images, labels, size=2, shape=shape)
    assert result.clean_accuracy >= result.empirical_accuracy >= result.certified_accuracy
    assert result.violations == []
    for c, a in zip(result.certified.images, result.attacked.images):
        assert not (c.certified and a.success)
        if c.correct:
            assert a.margin >= c.worst_margin - 1e-4  # every real margin is above the bound


def test_sparse_evaluation_is_consistent(toys):
    images, labels, model = toys
    result = evaluate_sparse(model, images, labels, k=2)
    assert result.name == "k=2" and result.violations == []
    assert result.clean_accuracy >= result.empirical_accuracy >= result.certified_accuracy


def test_the_check_fires_on_a_certificate_raised_by_a_constant(monkeypatch, toys):
    """A deliberately broken engine: every certified lower margin 10 too high."""
    images, labels, model = toys
    honest = engine.threat_margins
    monkeypatch.setattr(engine, "threat_margins", lambda *a, **kw: honest(*a, **kw) + 10.0)
    result = evaluate_patch(model, images, labels, size=2)
    broken = {c.index for c, a in zip(result.certified.images, result.attacked.images) if c.certified and a.success}
    assert broken  # the attack breaks images the raised bound calls certified
    assert broken <= {v.index for v in result.violations}
    text = result.violations[0].describe()
    assert f"image {result.violations[0].index}" in text and "certified" in text and "patch at top=" in text


def test_the_check_fires_on_a_margin_below_the_bound_even_without_a_break(toys):
    images, labels, model = toys
    result = evaluate_patch(model, images, labels, size=2)
    k = next(i for i, (c, a) in enumerate(zip(result.certified.images, result.attacked.images))
             if c.certified and not a.success)
    record = result.certified.images[k]
    raised = dataclasses.replace(record, worst_margin=result.attacked.images[k].margin + 1.0)
    images_ = list(result.certified.images)
    images_[k] = raised
    broken = dataclasses.replace(result.certified, images=images_)
    (violation,) = consistency_violations(broken, result.attacked)
    assert violation.index == record.index and violation.attacked_margin < violation.certified_margin


def test_the_check_tolerates_float_rounding(toys):
    images, labels, model = toys
    result = evaluate_patch(model, images, labels, size=2)
    shifted = [dataclasses.replace(c, worst_margin=a.margin + 1e-6) if c.correct else c
               for c, a in zip(result.certified.images, result.attacked.images)]
    assert consistency_violations(dataclasses.replace(result.certified, images=shifted), result.attacked) == []


def test_results_about_different_images_are_a_usage_error(toys):
    images, labels, model = toys
    result = evaluate_patch(model, images[:4], labels[:4], size=2)
    other = certify(model, images[:4], labels[:4], size=2, indices=[9, 10, 11, 12])
    with pytest.raises(UsageError):
        consistency_violations(other, result.attacked)


def test_evaluation_report_has_one_row_per_threat_and_joined_image_records(toys):
    images, labels, model = toys
    evaluations = [evaluate_patch(model, images, labels, size=2), evaluate_sparse(model, images, labels, k=1)]
    doc = evaluation_report(evaluations, _run())
    json.loads(report.to_json(doc))
    rows = doc["summary"]["rows"]
    assert [r["name"] for r in rows] == ["2x2 square", "k=1"] == list(doc["evaluations"])
    for row, e in zip(rows, evaluations):
        assert row["clean_accuracy"] == pytest.approx(e.clean_accuracy)
        assert row["empirical_accuracy"] == pytest.approx(e.empirical_accuracy)
        assert row["certified_accuracy"] == pytest.approx(e.certified_accuracy)
    image = doc["evaluations"]["2x2 square"]["images"][0]
    assert {"certified", "worst_margin", "attacked", "attack_margin", "adversarial_class"} <= set(image)
    assert doc["summary"]["num_violations"] == 0 and doc["violations"] == []


def test_attack_report_counts_successes_per_run(toys):
    images, labels, model = toys
    result = evaluate_patch(model, images, labels, size=2).attacked
    doc = attack_report({"2x2 square": result}, _run())
    json.loads(report.to_json(doc))
    summary = doc["runs"]["2x2 square"]["summary"]
    assert summary["num_successes"] == result.num_successes
    assert summary["empirical_accuracy"] == pytest.approx(result.empirical_accuracy)
    assert len(doc["runs"]["2x2 square"]["images"]) == len(images)
    assert doc["summary"]["model"] == "net.onnx" and doc["summary"]["kind"] == "attack"
