"""Bad input gets one clear line and the right exit code (issue 8, items 7, 10 and the rough edges).

Library errors name Python parameters; these tests check that the user of the command line
reads the flags they typed instead.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from torch import nn

from lirpa_patch_cli.main import app, flag_message

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "onnx_models" / "mnist_mlp_2x2.onnx"
HUGE = "100000000000x2"


def invoke(*args: object) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result: Result, exit_code: int, *fragments: str) -> str:
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output and "\x1b" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------- Click's own errors


@pytest.mark.parametrize("args, fragment", [
    (["certify"], "Missing argument 'MODEL'"),
    (["certify", MODEL, "--bogus"], "--bogus"),
    (["certify", MODEL, "--num", "many"], "'many' is not a valid integer"),
    (["train", "--out", "m.onnx", "--method", "x"], "No such option"),
    (["frobnicate"], "No such command"),
])
def test_clicks_usage_errors_are_one_line(args, fragment):
    one_line_error(invoke(*args), 2, fragment)


# --------------------------------------------------------------------------- sizes checked before allocating


def test_a_huge_patch_is_a_usage_error_before_anything_is_allocated(tmp_path):
    missing_data = tmp_path / "not-read.npz"  # refused before the data is even looked at
    one_line_error(invoke("certify", MODEL, "--data", missing_data, "--patch", HUGE), 2,
                   "--patch", "200000000000 pixels; at most 16777216")
    one_line_error(invoke("shapes", "--patch", HUGE), 2, "--patch", "larger than the 28x28 image")
    one_line_error(invoke("certify", MODEL, "--num", "1", "--patch", "29x29"), 2,
                   "--patch", "patch 29x29 (841 pixels) is larger than the 28x28 image")


def test_a_huge_patch_or_sparse_budget_is_refused_by_train(tmp_path):
    out = tmp_path / "m.onnx"
    one_line_error(invoke("train", "--data", tmp_path / "not-read.npz", "--patch", HUGE, "--out", out), 2,
                   "--patch", "at most 16777216")
    one_line_error(invoke("train", "--num", "64", "--patch", "20x40", "--out", out), 2,
                   "--patch", "larger than the 28x28 image")
    one_line_error(invoke("train", "--num", "64", "--sparse", "100000000000", "--out", out), 2,
                   "--sparse 100000000000 exceeds the 784 pixels")
    assert list(tmp_path.iterdir()) == []


def test_a_sparse_budget_larger_than_the_image_is_refused_by_certify():
    one_line_error(invoke("certify", MODEL, "--num", "1", "--sparse", "100000000000"), 2, "--sparse", "784 pixels")


# --------------------------------------------------------------------------- normalization options


def test_a_mean_for_three_channels_on_a_one_channel_model_asks_for_one_value():
    line = one_line_error(invoke("certify", MODEL, "--num", "1", "--mean", "0.1,0.2,0.3", "--std", "0.3"), 2,
                          "--mean has 3 values", "1 channel; give 1 value")
    assert "1 or 1" not in line


@pytest.mark.parametrize("given, missing", [("--mean", "--std"), ("--std", "--mean")])
def test_mean_and_std_go_together(given, missing, tmp_path):
    one_line_error(invoke("certify", MODEL, "--num", "1", given, "0.5"), 2, f"{given} is given without {missing}")
    one_line_error(invoke("train", "--num", "64", given, "0.5", "--out", tmp_path / "m.onnx"), 2,
                   f"{given} is given without {missing}")


def test_layout_errors_name_both_flags():
    one_line_error(invoke("certify", MODEL, "--num", "1", "--layout", "nhwc"), 2, "--layout", "--input-shape")


# --------------------------------------------------------------------------- --resume


@pytest.mark.parametrize("kind", ["onnx", "pickled module", "text"])
def test_resume_from_a_file_that_is_no_checkpoint_is_one_short_line(kind, tmp_path):
    path = tmp_path / "not.ckpt.pt"
    if kind == "onnx":
        path.write_bytes(MODEL.read_bytes())
    elif kind == "pickled module":
        torch.save(nn.Linear(2, 2), path)
    else:
        path.write_text("hello")
    line = one_line_error(invoke("train", "--resume", path, "--out", tmp_path / "m.onnx"), 2,
                          "--resume", "is not a lirpa-patch training checkpoint")
    assert len(line) < 200 + len(str(path))


def test_resume_from_a_missing_file_fails_at_once(tmp_path):
    one_line_error(invoke("train", "--resume", tmp_path / "nope.pt", "--out", tmp_path / "m.onnx"), 1, "does not exist")


# --------------------------------------------------------------------------- one label rule


@pytest.fixture
def mnist_with_label_10(tmp_path) -> Path:
    """An MNIST IDX folder (both splits) whose fourth image has label 10."""
    root = tmp_path / "mnist"
    root.mkdir()
    x = np.zeros((8, 28, 28), dtype=np.uint8)
    y = np.array([0, 1, 2, 10, 4, 5, 6, 7], dtype=np.uint8)
    for prefix in ("train", "t10k"):
        (root / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">BBBBIII", 0, 0, 8, 3, 8, 28, 28) + x.tobytes())
        (root / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 8) + y.tobytes())
    return root


def test_train_and_certify_reject_the_same_label_with_the_same_message(mnist_with_label_10, tmp_path):
    train = one_line_error(invoke("train", "--data", mnist_with_label_10, "--out", tmp_path / "m.onnx"), 1)
    certify = one_line_error(invoke("certify", MODEL, "--data", mnist_with_label_10), 1)
    for line, split in ((train, "train"), (certify, "test")):
        assert line == f"Error: mnist:{split}: labels must be 0-9 (10 classes), found label 10 at image 3"
    assert not (tmp_path / "m.onnx").exists()


def test_certify_labels_beyond_the_model_outputs(tmp_path):
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((3, 28, 28), dtype=np.uint8), y=np.array([1, 12, 11]))
    one_line_error(invoke("certify", MODEL, "--data", data), 1,
                   "d.npz: 2 label(s) out of range for a model with 10 outputs (labels must be 0-9; image 1 has label 12)")


# --------------------------------------------------------------------------- flag_message


class _Command:
    def __init__(self, **flags: str) -> None:
        self.param_flags = flags
        self.params: list = []


def test_flag_message_rewrites_the_parameter_and_the_related_ones():
    command = _Command(layout="--layout", input_shape="--input-shape")
    message = "layout nhwc needs model input shape (28, 28, 1), but the model takes (784,); check input_shape"
    assert flag_message(message, "layout", command, ("input_shape",)) == (
        "--layout nhwc needs model input shape (28, 28, 1), but the model takes (784,); check --input-shape")
    assert flag_message("must be positive", "layout", command) == "--layout: must be positive"
    assert flag_message("unknown thing", "other", command) == "unknown thing"


def test_flag_message_leaves_paths_alone():
    command = _Command(out="--out", checkpoint="--checkpoint")
    message = "checkpoint /runs/out.onnx is the same file as out; two outputs would overwrite each other"
    assert flag_message(message, "checkpoint", command, ("out",)) == (
        "--checkpoint /runs/out.onnx is the same file as --out; two outputs would overwrite each other")
    assert flag_message("layout. Check layout.", "layout", _Command(layout="--layout")) == "--layout. Check layout."
