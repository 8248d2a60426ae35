"""The JSON report builders, the atomic writer and the result tables (no model needed)."""

from __future__ import annotations

import io
import json
import math
import os
import stat

import pytest
from rich.console import Console

from lirpa_patch import report
from lirpa_patch_cli import render
from lirpa_patch.engine import CertifyResult, ImageResult
from lirpa_patch.errors import LirpaPatchError
from lirpa_patch.shapes import make_shape

SUMMARY_KEYS = {
    "report_version", "threat", "patch", "shape", "shape_variants", "pixel_count", "pixel_counts",
    "requested_pixel_count",
    "num_locations", "method", "num_images", "num_correct", "num_certified", "clean_accuracy",
    "certified_accuracy", "seconds", "images_per_second", "model", "model_input", "onnxruntime_max_abs_diff",
    "data", "dataset", "image_shape", "start", "num", "chunk", "device", "world_size", "seed", "versions", "head",
    "location_groups", "cascade",
}
IMAGE_KEYS = {"index", "label", "prediction", "correct", "certified", "worst_margin", "worst_location", "worst_class",
              "exact_margin"}
LOCATION_KEYS = {"shape", "variant", "height", "width", "top", "left"}


def _location(shape: str = "line", variant: int = 0, h: int = 1, w: int = 4, top: int = 3, left: int = 5) -> dict:
    return {"shape": shape, "variant": variant, "height": h, "width": w, "top": top, "left": left}


def _result(shape: str = "line", seconds: float = 2.0, margins=(0.5, None, -0.25)) -> CertifyResult:
    images = []
    for k, margin in enumerate(margins):
        if margin is None:  # misclassified: not bounded
            images.append(ImageResult(index=100 + k, label=1, prediction=7, correct=False, certified=False))
        else:
            images.append(
                ImageResult(
                    index=100 + k, label=3, prediction=3, correct=True, certified=margin >= 0,
                    worst_margin=margin, worst_location=_location(shape), worst_class=5,
                )
            )
    return CertifyResult(images=images, shape=make_shape(shape, "2x2"), num_locations=1400, method="ibp",
                         seconds=seconds, chunk_size=4096)


def _run() -> report.RunInfo:
    return report.RunInfo(
        model="net.onnx", data="digits.npz", dataset="digits.npz", image_shape=(1, 28, 28), start=100, num=3,
        patch="2x2", method="ibp", chunk=4096, device="cpu", seed=0,
        model_input={"input_shape": [1, 28, 28], "layout": "nchw", "mean": None, "std": None, "num_classes": 10},
        onnxruntime_max_abs_diff=1e-7, versions={"lirpa_patch": "0.1.0", "auto_LiRPA": "0.3", "torch": "2"},
    )


def test_report_has_every_documented_field():
    doc = report.build_report(_result(), _run())
    assert set(doc) == {"summary", "images"}
    assert set(doc["summary"]) == SUMMARY_KEYS
    assert all(set(image) == IMAGE_KEYS for image in doc["images"])
    assert set(doc["images"][0]["worst_location"]) == LOCATION_KEYS


def test_every_summary_field_is_documented_in_the_module_docstring():
    doc = report.build_report(_result(), _run())
    transfer = report.build_transfer_report({"line": _result()}, _run())
    keys = set(doc["summary"]) | set(transfer["summary"]) | set(transfer["shapes"]["line"]["summary"])
    keys |= IMAGE_KEYS | set(doc["summary"]["model_input"])
    missing = [k for k in sorted(keys) if f'"{k}"' not in report.__doc__]
    assert not missing


def test_shape_fields_describe_the_patch():
    summary = report.build_report(_result("line"), _run())["summary"]
    assert (summary["threat"], summary["patch"], summary["shape"]) == ("patch", "2x2", "line")
    assert summary["shape_variants"] == ["1x4", "4x1"]
    assert (summary["pixel_count"], summary["requested_pixel_count"], summary["num_locations"]) == (4, 4, 1400)


def test_rectangle_reports_every_variant_pixel_count_and_the_request():
    summary = report.build_report(_result("rectangle"), _run())["summary"]
    assert (summary["pixel_count"], summary["pixel_counts"], summary["requested_pixel_count"]) == (6, [6, 6], 4)


def test_misclassified_image_has_null_margin_location_and_class():
    image = report.build_report(_result(), _run())["images"][1]
    assert not image["correct"] and not image["certified"]
    assert image["worst_margin"] is None and image["worst_location"] is None and image["worst_class"] is None


def test_certified_iff_margin_nonnegative():
    for image in report.build_report(_result(margins=(0.5, 0.0, -1e-6, None)), _run())["images"]:
        assert image["certified"] == (image["worst_margin"] is not None and image["worst_margin"] >= 0)


def test_summary_numbers_agree_with_images():
    doc = report.build_report(_result(margins=(0.5, None, -0.25, 2.0)), _run())
    s, images = doc["summary"], doc["images"]
    assert s["num_images"] == len(images) == 4
    assert s["num_correct"] == sum(i["correct"] for i in images) == 3
    assert s["num_certified"] == sum(i["certified"] for i in images) == 2
    assert s["clean_accuracy"] == pytest.approx(0.75) and s["certified_accuracy"] == pytest.approx(0.5)
    assert s["images_per_second"] == pytest.approx(4 / 2.0)


def test_non_finite_numbers_become_null_and_json_is_strict():
    doc = report.build_report(_result(seconds=0.0, margins=(float("nan"),)), _run())
    assert doc["summary"]["images_per_second"] is None  # infinite rate
    assert doc["images"][0]["worst_margin"] is None
    json.loads(report.to_json(doc))  # no NaN/Infinity tokens


def test_run_fields_are_copied():
    s = report.build_report(_result(), _run())["summary"]
    assert (s["model"], s["data"], s["start"], s["num"], s["chunk"], s["device"], s["seed"]) == (
        "net.onnx", "digits.npz", 100, 3, 4096, "cpu", 0)
    assert s["versions"]["auto_LiRPA"] == "0.3" and s["onnxruntime_max_abs_diff"] == pytest.approx(1e-7)


def test_mask_file_is_recorded_only_when_given():
    assert "mask_file" not in report.build_report(_result(), _run())["summary"]
    run = report.RunInfo(**{**_run().__dict__, "mask_file": "mask.npy"})
    assert report.build_report(_result(), run)["summary"]["mask_file"] == "mask.npy"


def test_transfer_report_has_common_summary_and_one_section_per_shape():
    results = {name: _result(name, seconds=1.5) for name in ("square", "line", "diamond")}
    doc = report.build_transfer_report(results, _run())
    assert set(doc) == {"summary", "shapes"}
    assert list(doc["shapes"]) == ["square", "line", "diamond"] == doc["summary"]["shapes"]
    assert doc["summary"]["shape"] == "all" and doc["summary"]["seconds"] == pytest.approx(4.5)
    for name, section in doc["shapes"].items():
        assert section["summary"]["shape"] == name and len(section["images"]) == 3
    assert doc["shapes"]["diamond"]["summary"]["pixel_count"] == 4


def test_collect_versions_names_onnxruntime_only_when_asked():
    assert set(report.collect_versions(onnxruntime=False)) == {"lirpa_patch", "auto_LiRPA", "torch"}
    assert "onnxruntime" in report.collect_versions(onnxruntime=True)


def test_write_report_round_trips_and_leaves_no_temporary_file(tmp_path):
    doc = report.build_report(_result(), _run())
    path = report.write_report(tmp_path / "r.json", doc)
    assert json.loads(path.read_text()) == doc
    assert os.listdir(tmp_path) == ["r.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_failed_write_keeps_the_previous_report(tmp_path, monkeypatch):
    target = tmp_path / "r.json"
    target.write_text('{"old": true}')

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report.os, "replace", fail)
    with pytest.raises(LirpaPatchError, match="No space left"):
        report.write_report(target, {"new": True})
    assert target.read_text() == '{"old": true}'
    assert os.listdir(tmp_path) == ["r.json"]


def test_check_writable_rejects_missing_folder_and_directory(tmp_path):
    with pytest.raises(LirpaPatchError, match="does not exist"):
        report.check_writable(tmp_path / "missing" / "r.json")
    with pytest.raises(LirpaPatchError, match="is a directory"):
        report.check_writable(tmp_path)


def _text(renderable) -> str:
    buffer = io.StringIO()
    Console(file=buffer, width=120, color_system=None).print(renderable)
    return buffer.getvalue()


def test_summary_table_shows_patch_locations_and_accuracies():
    text = _text(render.summary_table(report.build_report(_result("rectangle"), _run())["summary"]))
    assert "rectangle 2x3, 3x2 (6 px; 4 requested)" in text and "1,400 per image" in text
    assert "66.7% (2/3)" in text and "33.3% (1/3)" in text  # clean, certified
    assert "1.50" in text  # images/s


def test_transfer_table_has_one_row_per_shape():
    results = {name: _result(name) for name in ("square", "rectangle", "line", "diamond", "parallelogram")}
    lines = _text(render.transfer_table(report.build_transfer_report(results, _run()))).splitlines()
    for name in results:
        assert sum(line.split()[:1] == [name] for line in lines) == 1
    assert any("6*" in line for line in lines)  # rectangle: 2x3 and 3x2 for a budget of 4


def test_mask_art_and_side_by_side():
    variants = make_shape("line", "1x3").variants
    art = render.side_by_side([render.mask_art(v) for v in variants], gap=2)
    assert art.splitlines() == ["###  #", "     #", "     #"]


def test_progress_callback_counts_images():
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=120)
    with render.CertifyProgress(console, enabled=True) as progress:
        update = progress.task("Certifying", 4)
        update(2, 1458)
        update(4, 2916)
    assert "4/4" in buffer.getvalue() and "loc/s" in buffer.getvalue()


def test_disabled_progress_prints_nothing():
    buffer = io.StringIO()
    with render.CertifyProgress(Console(file=buffer, force_terminal=True), enabled=False) as progress:
        progress.task("Certifying", 2)(2, 10)
    assert buffer.getvalue() == ""


def test_percent_and_seconds_formatting():
    assert render.percent(0.915) == "91.5%" and render.percent(None) == "-"
    assert render.seconds(3.21) == "3.2 s" and render.seconds(125) == "2 min 05 s"
    assert math.isclose(float(render.rate(2.0)), 2.0)


def _cascade() -> dict:
    from lirpa_patch.cascade import CascadeStats

    stats = CascadeStats(["ibp", "crown", "alpha-crown"], intermediate="crown", intermediate_choice="auto",
                         probe={"rows": 8, "crown_ms_per_row": 1.0, "crown_ibp_ms_per_row": 0.5, "share": 0.9,
                                "crown_seconds_per_image": 0.7})
    stats.stages["crown"].rows, stats.stages["crown"].settled, stats.stages["crown"].seconds = 10, 7, 0.25
    return stats.to_dict()


def test_cascade_statistics_reach_the_summary_and_every_field_is_documented():
    result = _result()
    result.extra["cascade"] = _cascade()
    summary = report.build_report(result, _run())["summary"]
    c = summary["cascade"]
    assert c["methods"] == ["ibp", "crown", "alpha-crown"]
    assert c["stages"]["crown"] == {"method": "crown", "rows": 10, "settled": 7, "seconds": 0.25, "chunk": 0}
    keys = set(c) | set(c["stages"]["crown"]) | set(c["probe"])
    missing = [k for k in sorted(keys) if f'"{k}"' not in report.__doc__]
    assert not missing
    json.loads(report.to_json({"summary": summary}))  # strict JSON


def test_summary_table_shows_what_each_method_certified():
    result = _result()
    result.extra["cascade"] = _cascade()
    text = _text(render.summary_table(report.build_report(result, _run())["summary"]))
    assert "Rows certified" in text and "CROWN 7/10" in text and "full CROWN, auto" in text
