"""The contract between batchings (lirpa_patch.tolerance): fast, on a shipped model.

The same images certified in one call, in blocks (as the processes of a job certify
them), in reverse order, one at a time and in small chunks of rows give the same
certificates up to BLAS rounding: decisions equal, worst margins within
``MARGIN_ATOL + MARGIN_RTOL * |margin|``. These compositions change the shapes of the
matrix products, so a BLAS that picks its kernel by shape (MKL on AVX-512 CPUs) rounds
them differently; a result that depends on batch composition beyond rounding fails
here. Run it under other BLAS dispatch too (``MKL_ENABLE_INSTRUCTIONS=SSE4_2``/``AVX2``,
``MKL_CBWR=COMPATIBLE``, ``ATEN_CPU_CAPABILITY=default``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lirpa_patch import distributed, engine
from lirpa_patch.data import load_dataset
from lirpa_patch.engine import certify
from lirpa_patch.models import image_model, load_model
from lirpa_patch.tolerance import MARGIN_ATOL, MARGIN_RTOL, margin_tolerance, margins_agree
from tests.certificates import assert_same_certificates, logit_scales

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "onnx_models" / "mnist_mlp_2x2.onnx"
N = 12


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("sample:train", start=4000, num=N)
    net = image_model(load_model(str(MODEL)), image_shape=tuple(data.images.shape[1:]))
    return data, net, logit_scales(net, data.images, data.indices.tolist())


def _certify_in(net, data, blocks, method, **kwargs):
    """Certify ``data`` block by block (lists of positions), records back in the data's order."""
    records = {}
    for block in blocks:
        pos = torch.tensor(block, dtype=torch.long)
        result = certify(net, data.images[pos], data.labels[pos], indices=data.indices[pos].tolist(), size=2,
                         groups=None, method=method, **kwargs)
        records.update({r.index: r for r in result.images})
    return [records[int(i)] for i in data.indices]


def _compositions(n: int) -> dict[str, tuple[list, dict]]:
    every = list(range(n))
    thirds = [list(range(n)[distributed.shard(n, r, 3)]) for r in range(3)]
    return {
        "blocks of a 3-process job": (thirds, {}),
        "reversed order": ([every[::-1]], {}),
        "one image at a time": ([[i] for i in every], {}),
        "chunks of 50 rows": ([every], {"chunk_size": 50}),
    }


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_an_image_is_certified_alike_whatever_else_is_in_its_call(digits, method):
    data, net, scales = digits
    whole = _certify_in(net, data, [list(range(N))], method)
    assert sum(r.certified for r in whole) > 0 and sum(not r.certified for r in whole if r.correct) > 0
    for name, (blocks, kwargs) in _compositions(N).items():
        assert_same_certificates(_certify_in(net, data, blocks, method, **kwargs), whole, f"{method}, {name}", scales)


def test_the_check_fails_when_a_margin_depends_on_the_batch_beyond_rounding(digits, monkeypatch):
    """Teeth: a margin moved by 1e-3 (far beyond rounding, far below any real effect) when its image
    is not certified together with all the others is caught."""
    data, net, scales = digits
    whole = _certify_in(net, data, [list(range(N))], "ibp")
    original = engine._image_results
    target = int(data.indices[5])

    def shifted(indices, *args, **kwargs):
        out = original(indices, *args, **kwargs)
        if len(indices) < N:
            out = [replace(r, worst_margin=r.worst_margin + 1e-3) if r.index == target else r for r in out]
        return out

    monkeypatch.setattr(engine, "_image_results", shifted)
    blocks, _ = _compositions(N)["blocks of a 3-process job"]
    with pytest.raises(AssertionError, match=f"image {target}: worst_margin"):
        assert_same_certificates(_certify_in(net, data, blocks, "ibp"), whole, "shifted", scales)


def _record(margin, certified=None, **changes) -> dict:
    out = {"index": 7, "label": 1, "prediction": 1, "correct": True,
           "certified": margin >= 0 if certified is None else certified, "worst_margin": margin,
           "worst_location": {"top": 0, "left": 0}, "worst_class": 3}
    return {**out, **changes}


def test_the_contract_in_numbers():
    assert margin_tolerance(0.0) == MARGIN_ATOL and margin_tolerance(-2.0, 1.0) == MARGIN_ATOL + 2 * MARGIN_RTOL
    assert margin_tolerance(0.5, scale=27.0) == MARGIN_ATOL + 27 * MARGIN_RTOL  # the logits' size sets the rounding
    assert margins_agree(None, None) and not margins_agree(None, 0.0)
    # the observed difference (AVX-512 MKL, one call vs three blocks) is well inside
    assert margins_agree(0.12057682, 0.12057730)
    assert_same_certificates([_record(0.12057682)], [_record(0.12057730)])
    assert_same_certificates([_record(40.0)], [_record(40.0 + 3e-4)])
    # a decision may differ only where the margin is rounding away from zero
    assert_same_certificates([_record(4e-7)], [_record(-3e-7)])
    assert_same_certificates([_record(1e-4)], [_record(-1e-4)], scales={7: 27.0})
    with pytest.raises(AssertionError, match="worst_margin"):
        assert_same_certificates([_record(1e-4)], [_record(-1e-4)])
    for one, two, message in [
        ([_record(0.1205)], [_record(0.1215)], "worst_margin"),
        ([_record(1.0)], [_record(1.0, certified=False)], "certified"),
        ([_record(0.5)], [_record(0.5, prediction=2)], "prediction"),
        ([_record(0.5)], [_record(0.5, worst_class=4)], "worst_class"),
        ([_record(0.5)], [_record(0.5, index=8)], "same images"),
    ]:
        with pytest.raises(AssertionError, match=message):
            assert_same_certificates(one, two)


def test_reports_keep_every_other_field_exact():
    def report(margins, **summary):
        images = [_record(m, index=i) for i, m in enumerate(margins)]
        certified = sum(r["certified"] for r in images)
        base = {"num_images": len(images), "num_certified": certified, "certified_accuracy": certified / len(images),
                "method": "ibp"}
        return {"summary": {**base, **summary}, "images": images}

    assert_same_certificates(report([0.3, 5e-7]), report([0.3 + 1e-7, -5e-7]))  # one decision within rounding
    with pytest.raises(AssertionError, match="method"):
        assert_same_certificates(report([0.3]), report([0.3], method="crown"))
    wrong = report([0.3, 0.2])
    wrong["summary"]["num_certified"] = 1
    with pytest.raises(AssertionError, match="num_certified"):
        assert_same_certificates(report([0.3, 0.2]), wrong)
