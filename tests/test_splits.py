"""lirpa_patch.train.train_val_split: training uses the training split; validation is held out
from it, or the test split only when asked; the description says which (issue 8, item 8).

Real MNIST IDX and CIFAR-10 batch folders with both splits are written in tmp; the test
split's labels differ from the training split's, so a mix-up cannot go unnoticed.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lirpa_patch.data import available_splits
from lirpa_patch.errors import UsageError
from lirpa_patch.train import SAMPLE_TRAIN, saved_selection, train_val_split

TEST_LABEL = 3  # every test-split image has this label; training images have labels 0-2


def _idx(array: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _images(n: int, size: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    shape = (n, size, size) if channels == 1 else (n, channels, size, size)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture
def mnist_dir(tmp_path) -> Path:
    """MNIST IDX files: 40 training images (labels 0-2), 10 test images (label 3), 8x8."""
    root = tmp_path / "mnist"
    root.mkdir()
    splits = {"train": (_images(40, 8), np.arange(40, dtype=np.uint8) % 3),
              "t10k": (_images(10, 8, seed=1), np.full(10, TEST_LABEL, dtype=np.uint8))}
    for prefix, (x, y) in splits.items():
        (root / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(x))
        (root / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(y))
    return root


@pytest.fixture
def cifar_dir(tmp_path) -> Path:
    """CIFAR-10 python batches: data_batch_1-5 with 4 images each (labels 0-2), test_batch with 3 (label 3)."""
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for i in range(1, 6):
        x = _images(4, 32, channels=3, seed=i).reshape(4, -1)
        batch = {b"data": x, b"labels": [(4 * (i - 1) + j) % 3 for j in range(4)]}
        (root / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
    test = {b"data": _images(3, 32, channels=3, seed=9).reshape(3, -1), b"labels": [TEST_LABEL] * 3}
    (root / "test_batch").write_bytes(pickle.dumps(test, protocol=2))
    return root.parent


def test_directories_with_both_splits_report_them(mnist_dir, cifar_dir):
    assert available_splits(mnist_dir) == ("train", "test")
    assert available_splits(cifar_dir) == ("train", "test")
    assert available_splits("sample") == ("train", "test")
    assert available_splits("sample:test") == () and available_splits(mnist_dir / "missing") == ()


def test_a_mnist_directory_trains_on_its_training_split_and_holds_out_validation(mnist_dir):
    splits = train_val_split(mnist_dir)
    assert splits.train.name == splits.val.name == "mnist:train"
    assert TEST_LABEL not in splits.train.labels and TEST_LABEL not in splits.val.labels
    assert splits.train.indices.tolist() == list(range(36)) and splits.val.indices.tolist() == list(range(36, 40))
    assert splits.description == (
        "training: mnist:train images 0-35 (36); "
        "validation: mnist:train images 36-39 (4, held out from the training images)"
    )
    assert splits.num_classes == 10


def test_a_cifar_directory_trains_on_its_training_batches(cifar_dir):
    splits = train_val_split(cifar_dir, val_size=5)
    assert splits.train.name == "cifar10:data_batch_1-5" and len(splits.train) == 15 and len(splits.val) == 5
    assert TEST_LABEL not in torch.cat([splits.train.labels, splits.val.labels])
    assert "validation: cifar10:data_batch_1-5 images 15-19 (5, held out" in splits.description


def test_the_test_split_validates_only_when_asked(mnist_dir):
    splits = train_val_split(mnist_dir, val_data=f"{mnist_dir}:test", val_num=4)
    assert len(splits.train) == 40 and splits.val.name == "mnist:test"
    assert splits.val.labels.tolist() == [TEST_LABEL] * 4
    assert splits.description.endswith("validation: mnist:test images 0-3 (4, val_data)")


def test_training_on_the_test_split_is_possible_when_asked(mnist_dir):
    splits = train_val_split(f"{mnist_dir}:test", val_size=0)
    assert splits.train.labels.tolist() == [TEST_LABEL] * 10 and splits.val is None
    assert splits.description == "training: mnist:test images 0-9 (10); no validation"


def test_the_sample_trains_on_digits_0_to_3999_and_validates_on_the_held_out_digits():
    splits = train_val_split("sample", val_num=100)
    assert splits.train.name == splits.val.name == "sample:train"
    assert splits.train.indices[[0, -1]].tolist() == [0, SAMPLE_TRAIN - 1]
    assert splits.val.indices[[0, -1]].tolist() == [SAMPLE_TRAIN, SAMPLE_TRAIN + 99]
    assert "the held-out sample digits" in splits.description


def test_training_on_the_sample_never_reads_its_test_digits():
    assert train_val_split("sample:train", val_num=10).description == train_val_split("sample", val_num=10).description
    splits = train_val_split("sample", start=4500, val_size=100)  # past the usual training digits: still training
    assert splits.train.name == "sample:train" and len(splits.train) + len(splits.val) == 500


def test_a_checkpoint_that_saved_sample_resumes_on_the_training_digits():
    old = {"data": "sample", "start": 0, "num": 4000, "val_data": "sample", "val_start": 4000, "val_num": 200,
           "val_size": None}
    selection = saved_selection(old)
    assert selection["data"] == selection["val_data"] == "sample:train"
    splits = train_val_split(**selection)
    assert splits.val.indices[[0, -1]].tolist() == [4000, 4199] and splits.val.name == "sample:train"


def test_an_npz_holds_out_its_last_tenth(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=_images(50, 6), y=np.arange(50) % 4)
    splits = train_val_split(path)
    assert (len(splits.train), len(splits.val)) == (45, 5) and splits.num_classes is None


@pytest.mark.parametrize("source", ["mnist", "cifar", "sample", "npz"])
def test_the_selection_reproduces_the_same_split(source, mnist_dir, cifar_dir, tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=_images(30, 6), y=np.arange(30) % 4)
    data = {"mnist": mnist_dir, "cifar": cifar_dir, "sample": "sample", "npz": path}[source]
    first = train_val_split(data, start=1, num=25 if source != "cifar" else None, val_num=7)
    again = train_val_split(**first.selection)
    assert again.description == first.description
    assert torch.equal(again.train.images, first.train.images) and torch.equal(again.val.labels, first.val.labels)


def test_bad_split_arguments_name_their_parameter(mnist_dir):
    with pytest.raises(UsageError, match="val_size 40 leaves no training images") as error:
        train_val_split(mnist_dir, val_size=40)
    assert error.value.param == "val_size"
    with pytest.raises(UsageError) as error:
        train_val_split(mnist_dir, val_data="sample", val_size=3)
    assert error.value.param == "val_size"
    with pytest.raises(UsageError, match="val_start 9000 is beyond") as error:
        train_val_split(mnist_dir, val_data="sample", val_start=9000)
    assert error.value.param == "val_start"
    with pytest.raises(UsageError, match="^start must be >= 0, got -1") as error:
        train_val_split(mnist_dir, start=-1)
    assert error.value.param == "start"


def test_cli_train_says_which_split_each_phase_uses(mnist_dir, tmp_path):
    from lirpa_patch_cli.main import app

    args = ["train", "--data", str(mnist_dir), "--arch", "mlp", "--width", "8", "--patch", "2x2", "--patches", "1",
            "--epochs", "1", "--warmup-start", "0", "--warmup", "1", "--batch-size", "16", "--eval-every", "0",
            "--threads", "1", "--quiet", "--out", str(tmp_path / "m.onnx")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "training: mnist:train images 0-35 (36); validation: mnist:train images 36-39 (4, held out" in result.stderr
    assert "final: clean accuracy" in result.stdout and "on 4 validation images" in result.stdout
    result = CliRunner().invoke(app, [*args, "--val-data", f"{mnist_dir}:test"])
    assert result.exit_code == 0, result.output
    assert "validation: mnist:test images 0-9 (10, val_data)" in result.stderr
