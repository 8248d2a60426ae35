"""Progress on stderr and tables on stdout when they are no terminal (a log, a pipe): a plain
progress line now and then (``_progress.LINE_INTERVAL`` seconds apart; 0 here: every update),
the ETA of training, and tables never cut at 80 columns (issue 21)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from lirpa_patch.train import TrainEvent
from lirpa_patch_cli import _progress
from lirpa_patch_cli.main import app
from lirpa_patch_cli.train import _Display

MODEL = Path(__file__).resolve().parent.parent / "onnx_models" / "mnist_mlp_2x2.onnx"
TRAIN = ["train", "--data", "sample", "--num", "48", "--val-size", "8", "--arch", "mlp", "--width", "4",
         "--patches", "1", "--batch-size", "20", "--eval-every", "0", "--no-final-eval", "--threads", "1",
         "--epochs", "1"]


def invoke(*args: object) -> Result:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture
def every_update(monkeypatch):
    """A progress line for every update, not every 30 seconds."""
    monkeypatch.setattr(_progress, "LINE_INTERVAL", 0.0)


def test_a_progress_line_counts_the_work_and_estimates_the_time_left():
    line = _progress.counts("certify 2x2 square", 340, 1000, "images", 72.0)
    assert line == "certify 2x2 square: 340/1,000 images, 34%, 1m12s elapsed, ETA 2m20s"


def test_a_finished_progress_line_has_no_eta():
    assert _progress.counts("certify 2x2 square", 5, 5, "images", 3600.0) == (
        "certify 2x2 square: 5/5 images, 100%, 1h00m elapsed")


def test_certify_prints_progress_lines_when_stderr_is_no_terminal(every_update):
    result = invoke("certify", MODEL, "--no-check", "--num", 3)
    assert "certify 2x2 square: 3/3 images, 100%" in result.stderr


def test_attack_prints_progress_lines_for_each_stage(every_update):
    result = invoke("attack", MODEL, "--no-check", "--num", 2, "--steps", 1, "--restarts", 1)
    assert "attack 2x2 square: sweep: " in result.stderr and "attack 2x2 square: restart" in result.stderr


def test_evaluate_prints_progress_lines_for_certify_and_attack(every_update):
    result = invoke("evaluate", MODEL, "--no-check", "--num", 2, "--steps", 1, "--restarts", 1)
    assert "evaluate 2x2 square: certify: 2/2 images" in result.stderr
    assert "evaluate 2x2 square: attack: sweep: " in result.stderr


def test_train_prints_progress_lines_with_the_epoch_and_run_eta(every_update, tmp_path):
    result = invoke(*TRAIN, "--out", tmp_path / "m.onnx")
    assert "train epoch 1/1: 1/2 batches, 50%" in result.stderr and "run ETA" in result.stderr


def test_a_short_run_prints_no_progress_line_before_the_interval():
    result = invoke("certify", MODEL, "--no-check", "--num", 1)
    assert "images," not in result.stderr


def test_quiet_silences_the_progress_lines(every_update):
    assert invoke("certify", MODEL, "--no-check", "--num", 2, "--quiet").stderr == ""


def test_the_live_training_line_shows_the_batches_and_the_eta_of_the_epoch_and_the_run():
    display = _Display(True, 4, "random(1)")
    with display:
        display.event(TrainEvent("batch", 1, 4, batch=1, num_batches=10, strength=0.0, loss=2.3))
        display.event(TrainEvent("batch", 1, 4, batch=10, num_batches=10, strength=0.1, loss=2.2))
        text = display._text.plain
    assert "batch 10/10" in text and "epoch ETA 0s" in text and "run ETA " in text


def test_a_piped_table_keeps_its_full_column_names(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    result = invoke("evaluate", MODEL, "--no-check", "--num", 1, "--steps", 1, "--patch", "1x1,2x2", "--quiet")
    assert "Violations" in result.stdout and "Empirical acc." in result.stdout and "…" not in result.stdout
