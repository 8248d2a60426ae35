"""``lirpa-patch train --epochs N``: the preset's warm-up scaled to the run, and the header saying so
(issue 21)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner, Result

from lirpa_patch_cli.main import app

TINY = ["--data", "sample", "--num", "40", "--val-size", "8", "--arch", "mlp", "--width", "4", "--patches", "1",
        "--batch-size", "20", "--eval-every", "0", "--no-final-eval", "--threads", "1", "--quiet"]


def train(tmp_path: Path, *args: object) -> Result:
    result = CliRunner().invoke(app, ["train", *TINY, "--out", str(tmp_path / "m.onnx"), *map(str, args)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def test_the_header_says_the_warmup_was_scaled_to_the_epochs(tmp_path):
    result = train(tmp_path, "--epochs", 2)
    assert "2 epochs, warm-up 0+1 (scaled from 1+61 of 100 to --epochs 2)" in result.stderr


def test_an_explicit_warmup_is_kept_and_not_called_scaled(tmp_path):
    result = train(tmp_path, "--epochs", 2, "--warmup", 2)
    assert "2 epochs, warm-up 1+2, lr" in result.stderr and "scaled" not in result.stderr


def test_a_resumed_run_keeps_its_checkpoints_schedule(tmp_path):
    train(tmp_path, "--epochs", 1)  # warm-up 0+0 (scaled)
    result = CliRunner().invoke(app, ["train", "--resume", str(tmp_path / "m.ckpt.pt"), "--epochs", "3", "--quiet",
                                      "--no-final-eval", "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "3 epochs, warm-up 0+0, lr" in result.stderr and "scaled" not in result.stderr
