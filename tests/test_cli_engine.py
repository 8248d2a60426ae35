"""The engine's options on the command line: ``--groups``, ``--max-memory``, ``--threads``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from lirpa_patch_cli.main import app

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "onnx_models" / "mnist_mlp_2x2.onnx"


def invoke(*args: object) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def report(tmp_path: Path, *args: object) -> dict:
    out = tmp_path / "r.json"
    result = invoke("certify", MODEL, "--data", "sample:train", "--start", 4000, "--num", 6, "-o", out, *args)
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())["summary"]


def test_groups_off_bounds_every_location_and_says_so(tmp_path):
    assert report(tmp_path, "--groups", "off")["location_groups"] is None


def test_groups_of_two_are_reported_with_the_bound_computations_saved(tmp_path):
    groups = report(tmp_path, "--groups", "2")["location_groups"]
    assert groups["block"] == 2 and groups["rows_bounded"] < groups["rows_per_location"]


def test_decisions_do_not_depend_on_groups(tmp_path):
    off = report(tmp_path, "--groups", "off")
    on = report(tmp_path, "--groups", "4")
    assert (on["num_certified"], on["num_correct"]) == (off["num_certified"], off["num_correct"])


def test_max_memory_sets_the_rows_per_call(tmp_path):
    small = report(tmp_path, "--max-memory", "8M", "--groups", "off")["chunk"]
    large = report(tmp_path, "--max-memory", "1G", "--groups", "off")["chunk"]
    assert 1 <= small < large


def test_threads_are_accepted(tmp_path):
    assert report(tmp_path, "--threads", "1")["num_images"] == 6


@pytest.mark.parametrize("args, fragment", [
    (["--groups", "3"], "--groups"),
    (["--groups", "lots"], "--groups"),
    (["--max-memory", "lots"], "--max-memory"),
    (["--max-memory", "0"], "--max-memory"),
    (["--threads", "0"], "--threads"),
])
def test_bad_engine_options_are_one_line_usage_errors(args, fragment):
    result = invoke("certify", MODEL, "--data", "sample", "--num", 2, *args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], result.stderr
