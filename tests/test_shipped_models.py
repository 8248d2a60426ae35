"""The shipped models (``onnx_models/``): each file is the one ``models.json`` describes, the READMEs
show ``models.json``, and ``benchmarks/paper/ship.py`` chooses on validation figures only."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "paper"))

import ship  # noqa: E402

ENTRIES = json.loads((ROOT / "onnx_models" / "models.json").read_text())


def _row(run_id, threat="2x2", val_certified=0.9, certified=0.9, status="done", strategy="random(10)"):
    return {"id": run_id, "threat": threat, "status": status, "strategy": strategy,
            "val_certified": val_certified, "certified": certified}


def test_every_shipped_file_has_one_entry_and_each_entry_one_slot():
    files = sorted(p.name for p in (ROOT / "onnx_models").glob("*.onnx"))
    assert sorted(e["file"] for e in ENTRIES) == files == sorted(s.file for s in ship.SLOTS)


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e["file"])
def test_each_shipped_file_is_the_one_its_entry_describes(entry):
    data = (ROOT / "onnx_models" / entry["file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == entry["sha256"]


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e["file"])
def test_each_entry_says_how_it_was_made_and_what_it_certifies(entry):
    made_by = entry["command"] if entry["run"] else entry["details"]
    assert "lirpa-patch train" in made_by and f"onnx_models/{entry['file']}" in made_by
    assert entry["test"]["num_test"] == 10000
    assert 0 <= entry["test"]["certified"] <= entry["test"]["empirical"] <= entry["test"]["clean"] <= 1
    assert entry["validation"]["images"] == 5000 and 0 <= entry["validation"]["certified"] <= 1


def test_the_models_readme_is_written_from_models_json():
    assert (ROOT / "onnx_models" / "README.md").read_text() == ship.models_readme(ENTRIES)


def test_the_readme_table_of_shipped_models_is_written_from_models_json():
    start, end = ship.README_MARKERS
    text = (ROOT / "README.md").read_text()
    assert text.split(start, 1)[1].split(end, 1)[0] == ship.readme_table(ENTRIES)


def test_the_run_with_the_best_validation_certified_accuracy_is_chosen_whatever_its_test_figures():
    rows = [_row("a", val_certified=0.91, certified=0.95), _row("b", val_certified=0.93, certified=0.80)]
    assert ship.choose("2x2", rows, None)["id"] == "b"


def test_the_shipped_model_stays_unless_a_run_beats_it_on_validation():
    rows = [_row("a", val_certified=0.91)]
    assert ship.choose("2x2", rows, 0.91) is None
    assert ship.choose("2x2", rows, 0.90)["id"] == "a"


def test_only_finished_defended_runs_of_the_same_threat_compete():
    rows = [_row("training", val_certified=0.99, status="training"), _row("none", val_certified=0.99, strategy="none"),
            _row("other", threat="5x5", val_certified=0.99), _row("no-val", val_certified=None),
            _row("sparse", threat="k=4", val_certified=0.99, strategy=None)]
    assert ship.choose("2x2", rows, None) is None
    assert ship.choose("k=4", rows, None)["id"] == "sparse"


def test_the_goal_is_met_only_with_two_more_certified_points_and_at_most_one_clean_point_lost():
    paper = ship.paper_row("2x2")
    cert, clean = (paper.paper_certified + 2) / 100, (paper.paper_clean - 1) / 100
    assert ship.goal("2x2", {"certified": cert + 0.001, "clean": clean + 0.001}).startswith("met")
    assert ship.goal("2x2", {"certified": cert - 0.012, "clean": clean + 0.001}) == "not met: certified -1.2"
    assert ship.goal("2x2", {"certified": cert + 0.001, "clean": clean - 0.005}) == "not met: clean -0.5"
