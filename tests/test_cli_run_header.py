"""The run header of ``certify``, ``attack`` and ``evaluate``: which images are certified, and which
split they come from, said plainly when they are training images (issue 21)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from lirpa_patch.data import load_dataset
from lirpa_patch_cli.main import app

MODEL = Path(__file__).resolve().parent.parent / "onnx_models" / "mnist_mlp_2x2.onnx"


def invoke(*args: object) -> Result:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def certify(*args: object) -> Result:
    return invoke("certify", MODEL, "--no-check", *args)


def test_the_default_data_is_said_to_be_held_out_mnist_test_digits():
    result = certify("--num", 2)
    assert "data: sample:test images 0-1 (2; MNIST test digits, held out)" in result.stderr


def test_training_digits_are_said_to_be_not_held_out():
    result = certify("--data", "sample:train", "--start", 10, "--num", 2)
    assert "data: sample:train images 10-11 (2; training images: not held out)" in result.stderr


def _mnist_dir(root: Path, prefix: str) -> Path:
    digits = load_dataset("sample", num=2)
    x = (digits.images[:, 0].numpy() * 255).round().astype(np.uint8)
    root.mkdir(exist_ok=True)
    (root / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">BBBBIII", 0, 0, 8, 3, 2, 28, 28) + x.tobytes())
    (root / f"{prefix}-labels-idx1-ubyte").write_bytes(
        struct.pack(">BBBBI", 0, 0, 8, 1, 2) + digits.labels.numpy().astype(np.uint8).tobytes())
    return root


def test_an_mnist_directory_names_its_test_split(tmp_path):
    result = certify("--data", _mnist_dir(tmp_path / "mnist", "t10k"))
    assert "data: mnist:test images 0-1 (2; test split, held out)" in result.stderr


def test_a_directory_training_split_is_said_to_be_not_held_out(tmp_path):
    result = certify("--data", f"{_mnist_dir(tmp_path / 'mnist', 'train')}:train")
    assert "data: mnist:train images 0-1 (2; training images: not held out)" in result.stderr


def test_an_npz_file_names_its_images_without_a_split(tmp_path):
    digits = load_dataset("sample", num=3)
    np.savez(tmp_path / "d.npz", x=digits.images.numpy(), y=digits.labels.numpy())
    result = certify("--data", tmp_path / "d.npz")
    assert "data: d.npz images 0-2 (3)\n" in result.stderr


@pytest.mark.parametrize("command", ["attack", "evaluate"])
def test_attack_and_evaluate_print_the_same_header(command):
    result = invoke(command, MODEL, "--no-check", "--data", "sample:train", "--num", 1, "--steps", 1)
    assert "data: sample:train image 0 (1; training images: not held out)" in result.stderr


def test_quiet_prints_no_header():
    assert "data:" not in certify("--num", 1, "--quiet").stderr


def test_an_option_error_found_before_the_work_starts_comes_without_the_header():
    result = CliRunner().invoke(app, ["certify", str(MODEL), "--no-check", "--num", "1", "--groups", "3"])
    assert result.exit_code == 2 and "data:" not in result.stderr
