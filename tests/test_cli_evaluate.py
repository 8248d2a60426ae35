"""``lirpa-patch attack``, ``evaluate`` and ``certify``'s sweeps, heatmaps and HTML, end to end
(click's CliRunner, in process), on the shipped MNIST 2x2 model and a few held-out digits."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from lirpa_patch_cli.main import app

ROOT = Path(__file__).resolve().parent.parent
MODEL = str(ROOT / "onnx_models" / "mnist_mlp_2x2.onnx")
DIGITS = ["--data", "sample:train", "--start", "4000", "--num", "6"]
FAST = ["--steps", "5", "--restarts", "2", "--candidates", "4"]
PNG = b"\x89PNG\r\n\x1a\n"


def invoke(*args: object) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_ok(result: Result) -> None:
    assert result.exit_code == 0, result.output + repr(result.exception)


def one_line_error(result: Result, exit_code: int, *fragments: str) -> str:
    assert result.exit_code == exit_code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def read(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# --------------------------------------------------------------------------- attack


def test_attack_reports_empirical_accuracy_with_the_certify_conventions(tmp_path):
    out = tmp_path / "attack.json"
    result = invoke("attack", MODEL, *DIGITS, *FAST, "-o", out)
    assert_ok(result)
    doc = read(out)
    summary, (run,) = doc["summary"], doc["runs"].values()
    assert summary["kind"] == "attack" and summary["model"] == MODEL and summary["start"] == 4000
    assert run["summary"]["empirical_accuracy"] <= run["summary"]["clean_accuracy"]
    assert len(run["images"]) == 6 and {"success", "margin", "adversarial_class", "location"} <= set(run["images"][0])
    assert "Empirical acc." in result.stdout


def test_attack_saves_every_adversarial_image_and_a_picture_per_break(tmp_path):
    folder = tmp_path / "adv"
    result = invoke("attack", MODEL, "--data", "sample:train", "--start", "4000", "--num", "12", *FAST,
                    "--save-adversarial", folder, "-o", tmp_path / "a.json")
    assert_ok(result)
    saved = np.load(folder / "adversarial_2x2_square.npz")
    assert saved["x"].shape == (12, 1, 28, 28) and list(saved["index"]) == list(range(4000, 4012))
    broken = [int(i) for i, s in zip(saved["index"], saved["success"]) if s]
    assert broken  # digit 4003 breaks
    assert sorted(p.name for p in folder.glob("*.png")) == sorted(f"{i}_2x2_square.png" for i in broken)
    assert all((folder / f"{i}_2x2_square.png").read_bytes().startswith(PNG) for i in broken)
    assert all(c >= 0 for c, s in zip(saved["adversarial_class"], saved["success"]) if s)


def test_attack_uses_the_worst_locations_of_a_certify_report(tmp_path):
    report = tmp_path / "c.json"
    assert_ok(invoke("certify", MODEL, *DIGITS, "-o", report, "-q"))
    out = tmp_path / "a.json"
    assert_ok(invoke("attack", MODEL, *DIGITS, *FAST, "--locations-from", report, "-o", out))
    (run,) = read(out)["runs"].values()
    assert run["summary"]["attack"]["extra_locations"] == 1


def test_attack_sweeps_sparse_budgets(tmp_path):
    out = tmp_path / "a.json"
    assert_ok(invoke("attack", MODEL, *DIGITS, "--sparse", "1,4", "--steps", "3", "-o", out))
    doc = read(out)
    assert list(doc["runs"]) == ["k=1", "k=4"]
    assert doc["runs"]["k=4"]["summary"]["empirical_accuracy"] <= doc["runs"]["k=1"]["summary"]["empirical_accuracy"]


@pytest.mark.parametrize("args, code, fragments", [
    (["--candidates", "many"], 2, ["--candidates"]),
    (["--sparse", "2", "--step-size", "0.1"], 2, ["--step-size", "--sparse"]),
    (["--sparse", "2", "--worst", "3"], 2, ["--worst"]),
    (["--locations-from", "missing.json"], 1, ["missing.json"]),
    (["--sparse", "0"], 2, ["--sparse"]),
    (["--patch", "2x2,axb"], 2, ["--patch"]),
])
def test_attack_bad_options_are_one_line_errors(args, code, fragments):
    one_line_error(invoke("attack", MODEL, *DIGITS, *args), code, *fragments)


def test_attack_refuses_to_save_into_a_file(tmp_path):
    existing = tmp_path / "file.txt"
    existing.write_text("keep me")
    one_line_error(invoke("attack", MODEL, *DIGITS, "--save-adversarial", existing), 1, "not a folder")
    assert existing.read_text() == "keep me"


# --------------------------------------------------------------------------- evaluate


def test_evaluate_prints_clean_empirical_certified_in_that_order_of_size(tmp_path):
    out = tmp_path / "e.json"
    result = invoke("evaluate", MODEL, *DIGITS, *FAST, "-o", out)
    assert_ok(result)
    (row,) = read(out)["summary"]["rows"]
    assert row["clean_accuracy"] >= row["empirical_accuracy"] >= row["certified_accuracy"]
    assert row["num_violations"] == 0 and read(out)["violations"] == []
    assert "Empirical" in result.stdout and "Certified" in result.stdout


def test_evaluate_exits_3_and_names_the_images_when_a_certificate_is_too_optimistic(tmp_path, monkeypatch):
    from lirpa_patch import engine

    honest = engine.threat_margins
    monkeypatch.setattr(engine, "threat_margins", lambda *a, **kw: honest(*a, **kw) + 10.0)
    out = tmp_path / "e.json"
    result = invoke("evaluate", MODEL, "--data", "sample:train", "--start", "4000", "--num", "12", *FAST, "-o", out)
    assert result.exit_code == 3, result.output
    assert "SOUNDNESS VIOLATION" in result.stderr and "image 4003" in result.stderr
    assert read(out)["summary"]["num_violations"] >= 1  # the report is still written


def test_evaluate_sweep_writes_accuracy_curves_and_an_html_page(tmp_path):
    plots, html = tmp_path / "plots", tmp_path / "e.html"
    result = invoke("evaluate", MODEL, *DIGITS, *FAST, "--patch", "1x1,2x2", "--plots", plots, "--html", html,
                    "-o", tmp_path / "e.json")
    assert_ok(result)
    assert (plots / "accuracy_square.png").read_bytes().startswith(PNG)
    text = html.read_text()
    assert "Clean, empirical and certified accuracy" in text and text.count("data:image/png;base64,") >= 2
    assert [r["value"] for r in read(tmp_path / "e.json")["summary"]["rows"]] == ["1x1", "2x2"]


# --------------------------------------------------------------------------- certify: sweeps, pictures


def test_certify_patch_sweep_reports_every_size(tmp_path):
    out = tmp_path / "c.json"
    result = invoke("certify", MODEL, *DIGITS, "--patch", "1x1,2x2,3x3", "-o", out)
    assert_ok(result)
    doc = read(out)
    assert doc["summary"]["sweep"] == ["1x1", "2x2", "3x3"] == list(doc["runs"])
    accuracies = [r["certified_accuracy"] for r in doc["summary"]["rows"]]
    assert accuracies == sorted(accuracies, reverse=True)  # a larger patch never certifies more
    assert doc["runs"]["2x2"]["summary"]["patch"] == "2x2" and len(doc["runs"]["2x2"]["images"]) == 6
    assert all(v in result.stdout for v in ("1x1", "2x2", "3x3"))


def test_certify_sparse_sweep_with_every_shape_is_refused_but_budgets_sweep(tmp_path):
    out = tmp_path / "c.json"
    assert_ok(invoke("certify", MODEL, *DIGITS, "--sparse", "1,2", "-o", out))
    assert read(out)["summary"]["sweep"] == ["1", "2"]
    one_line_error(invoke("certify", MODEL, *DIGITS, "--sparse", "1,2", "--shape", "all"), 2, "--sparse", "--shape")


def test_certify_sweep_of_every_shape_has_a_row_per_size_and_shape(tmp_path):
    out = tmp_path / "c.json"
    assert_ok(invoke("certify", MODEL, *DIGITS, "--patch", "1x1,2x2", "--shape", "all", "-o", out))
    rows = read(out)["summary"]["rows"]
    assert len(rows) == 10 and {r["shape"] for r in rows} == {"square", "rectangle", "line", "diamond", "parallelogram"}


def test_certify_heatmaps_one_png_per_image(tmp_path):
    folder = tmp_path / "maps"
    assert_ok(invoke("certify", MODEL, *DIGITS, "--heatmaps", folder))
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"{i}_2x2_square.png" for i in range(4000, 4006)]
    assert all((folder / n).read_bytes().startswith(PNG) for n in names)


def test_certify_html_is_self_contained(tmp_path):
    html = tmp_path / "c.html"
    assert_ok(invoke("certify", MODEL, *DIGITS, "--html", html))
    text = html.read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert images and all(base64.b64decode(i).startswith(PNG) for i in images)
    assert 'src="http' not in text and "Certified accuracy" in text


def test_certify_heatmaps_do_not_apply_to_sparse(tmp_path):
    one_line_error(invoke("certify", MODEL, *DIGITS, "--sparse", "2", "--heatmaps", tmp_path / "m"), 2, "--heatmaps")


def test_certify_html_that_is_the_model_is_refused(tmp_path):
    one_line_error(invoke("certify", MODEL, *DIGITS, "--html", MODEL), 2, "--html")


@pytest.mark.parametrize("command", ["attack", "evaluate"])
def test_a_missing_model_is_one_line_and_exit_1(command, tmp_path):
    one_line_error(invoke(command, tmp_path / "missing.onnx"), 1, "missing.onnx")
