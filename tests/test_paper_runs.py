"""The paper-reproduction runs (``benchmarks/paper``): commands the CLI accepts, results with every field."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

PAPER = Path(__file__).resolve().parents[1] / "benchmarks" / "paper"
sys.path.insert(0, str(PAPER))

import manifest  # noqa: E402

FIELDS = {"table", "arch", "threat", "paper_clean", "paper_certified", "clean", "certified", "num_test",
          "train_seconds", "device", "command"}


@pytest.mark.parametrize("run", manifest.RUNS, ids=lambda r: r.id)
def test_every_run_is_a_train_command_the_cli_accepts(run):
    from cli.train import train

    context = train.make_context("train", ["--data", "sample", *run.train, "--out", "m.onnx"])
    assert context.params["out"] == "m.onnx"


def test_run_ids_are_unique_and_sparse_rows_have_no_strategy():
    assert len({r.id for r in manifest.RUNS}) == len(manifest.RUNS)
    assert all((r.strategy is None) == r.threat.startswith("k=") for r in manifest.RUNS)


def test_results_hold_a_row_with_every_field_for_every_run():
    rows = json.loads((PAPER / "results.json").read_text())
    assert [r["id"] for r in rows if "shape" not in r] == [r.id for r in manifest.RUNS]
    assert all(r["table"] == "5" and r["shape"] in manifest.TRANSFER_SHAPES for r in rows if "shape" in r)
    for row in rows:
        assert FIELDS <= set(row), row["id"]
        if row["status"] == "done" and "shape" in row:  # Table 5: certified against one shape, no attack
            assert row["num_test"] == 10000 and 0 <= row["certified"] <= row["clean"] <= 1
        elif row["status"] == "done":
            assert row["num_test"] == 10000 and 0 <= row["certified"] <= row["empirical"] <= row["clean"] <= 1


@pytest.mark.parametrize("run", manifest.RUNS, ids=lambda r: r.id)
def test_a_resumed_run_keeps_its_thread_count(run):
    import run as runner  # benchmarks/paper/run.py

    cmd = runner.resume_command(run, "MNIST")
    assert cmd[cmd.index("--threads") + 1] == run.train[run.train.index("--threads") + 1] == "1"
    assert cmd[cmd.index("--resume") + 1].endswith(f"{run.id}/ckpt.pt")


@pytest.mark.parametrize("run", manifest.RUNS[:3], ids=lambda r: r.id)
def test_a_resume_command_is_one_the_cli_accepts(run):
    import run as runner
    from cli.train import train

    context = train.make_context("train", runner.resume_command(run, "MNIST")[2:])
    assert context.params["threads"] == 1 and context.params["resume"].endswith("ckpt.pt")
