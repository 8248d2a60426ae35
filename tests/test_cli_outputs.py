"""Nothing is lost: ``certify -o`` and every output of ``train`` never overwrite an input of the run,
write into FIFOs and devices, and write through symlinks (issue 8, items 1-3).

An output that is an input is a usage error (exit 2) and leaves every file as it was.
"""

from __future__ import annotations

import gzip
import json
import os
import stat
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from special_files import DEV_NULL, assert_fifo, fifo_reader
from toy_models import toy_images

from lirpa_patch.data import load_dataset
from lirpa_patch_cli.main import app

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "onnx_models" / "mnist_mlp_2x2.onnx"


def invoke(*args: object) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result: Result, exit_code: int, *fragments: str) -> str:
    assert result.exit_code == exit_code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def snapshot(*paths: Path) -> dict:
    return {p: (p.read_bytes(), os.lstat(p).st_mode) for p in paths}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A copy of the 2x2 MNIST model, two digits as .npz, the same digits as an MNIST IDX folder, a mask."""
    root = tmp_path_factory.mktemp("inputs")
    model = root / "model.onnx"
    model.write_bytes(MODEL.read_bytes())
    digits = load_dataset("sample:train", start=4000, num=2)
    x = (digits.images[:, 0] * 255).round().numpy().astype(np.uint8)
    y = digits.labels.numpy()
    npz = root / "digits.npz"
    np.savez(npz, x=x, y=y)
    idx = root / "mnist"
    idx.mkdir()
    for prefix in ("train", "t10k"):
        (idx / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(struct.pack(">BBBBIII", 0, 0, 8, 3, 2, 28, 28) + x.tobytes()))
        (idx / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 2) + y.astype(np.uint8).tobytes())
    mask = root / "mask.npy"
    np.save(mask, np.ones((2, 2), dtype=bool))
    return root


# --------------------------------------------------------------------------- certify -o


@pytest.mark.parametrize("case", ["model", "data file", "data directory member", "mask file",
                                  "symlink to the model", "hard link to the model"])
def test_certify_output_that_is_an_input_is_a_usage_error_and_touches_nothing(inputs, tmp_path, case):
    model, npz, idx, mask = inputs / "model.onnx", inputs / "digits.npz", inputs / "mnist", inputs / "mask.npy"
    data, shape = npz, "square"
    if case == "model":
        output, named = model, "MODEL"
    elif case == "data file":
        output, named = npz, "--data"
    elif case == "data directory member":
        data, output, named = idx, idx / "t10k-labels-idx1-ubyte", "--data"
    elif case == "mask file":
        shape, output, named = mask, mask, "--shape"
    elif case == "symlink to the model":
        output, named = tmp_path / "report.json", "MODEL"
        output.symlink_to(model)
    else:
        output, named = tmp_path / "report.json", "MODEL"
        os.link(model, output)
    before = snapshot(model, npz, mask, *sorted(idx.iterdir()))
    result = invoke("certify", model, "--data", data, "--shape", shape, "--patch", "2x2", "-o", output)
    one_line_error(result, 2, "--output", "same file as", named)
    assert snapshot(model, npz, mask, *sorted(idx.iterdir())) == before


def test_certify_writes_its_report_into_a_fifo(inputs, tmp_path):
    fifo = tmp_path / "report.fifo"
    with fifo_reader(fifo) as got:
        result = invoke("certify", inputs / "model.onnx", "--data", inputs / "digits.npz", "-o", fifo, "--quiet")
    assert result.exit_code == 0, result.output
    assert json.loads(got["data"])["summary"]["num_images"] == 2
    assert_fifo(fifo)


def test_certify_output_dev_null_stays_a_character_device(inputs):
    result = invoke("certify", inputs / "model.onnx", "--data", inputs / "digits.npz", "-o", DEV_NULL, "--quiet")
    assert result.exit_code == 0, result.output
    assert stat.S_ISCHR(os.stat(DEV_NULL).st_mode)


def test_certify_writes_through_a_symlink_and_keeps_it(inputs, tmp_path):
    target = tmp_path / "reports" / "latest.json"
    target.parent.mkdir()
    target.write_text("{}")
    link = tmp_path / "report.json"
    link.symlink_to(target)
    result = invoke("certify", inputs / "model.onnx", "--data", inputs / "digits.npz", "-o", link, "--quiet")
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert json.loads(target.read_text())["summary"]["num_images"] == 2
    assert os.listdir(target.parent) == ["latest.json"]


# --------------------------------------------------------------------------- train outputs


@pytest.fixture(scope="module")
def toy_npz(tmp_path_factory) -> Path:
    x, y = toy_images(48, size=8, seed=5)
    path = tmp_path_factory.mktemp("toy") / "toy.npz"
    np.savez(path, x=(x[:, 0].numpy() * 255).astype(np.uint8), y=y.numpy())
    return path


def train(data: Path, *args: object) -> Result:
    common = ["--data", data, "--arch", "mlp", "--width", "8", "--patch", "2x2", "--patches", "1",
              "--warmup-start", "0", "--warmup", "1", "--batch-size", "16", "--eval-every", "0",
              "--no-final-eval", "--val-size", "8", "--threads", "1", "--quiet"]
    return invoke("train", *common, *args)


def test_train_checkpoint_equal_to_out_is_refused(toy_npz, tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous model")
    result = train(toy_npz, "--epochs", "1", "--out", out, "--checkpoint", out)
    one_line_error(result, 2, "--checkpoint", "--out")
    assert out.read_bytes() == b"previous model" and os.listdir(tmp_path) == ["m.onnx"]


def test_train_metrics_equal_to_out_is_refused(toy_npz, tmp_path):
    out = tmp_path / "m.onnx"
    one_line_error(train(toy_npz, "--epochs", "1", "--out", out, "--metrics", out), 2, "--metrics", "--out")
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--metrics", "--checkpoint", "--out"])
def test_train_output_that_is_the_data_file_is_refused(toy_npz, tmp_path, flag):
    path = toy_npz
    if flag == "--out":  # --out must end in .onnx: a link to the data
        path = tmp_path / "data.onnx"
        path.symlink_to(toy_npz)
    before = toy_npz.read_bytes()
    out = ["--out", tmp_path / "m.onnx"] if flag != "--out" else []
    one_line_error(train(toy_npz, "--epochs", "1", *out, flag, path), 2, flag, "--data")
    assert toy_npz.read_bytes() == before


def test_train_resume_writes_the_checkpoint_it_continues_but_no_other_output(toy_npz, tmp_path):
    out, ckpt = tmp_path / "m.onnx", tmp_path / "run.ckpt.pt"
    assert train(toy_npz, "--epochs", "1", "--out", out, "--checkpoint", ckpt).exit_code == 0
    first = ckpt.read_bytes()
    result = invoke("train", "--resume", ckpt, "--epochs", "2", "--out", out, "--metrics", ckpt, "--quiet")
    one_line_error(result, 2, "--metrics", "--resume")
    assert ckpt.read_bytes() == first
    result = invoke("train", "--resume", ckpt, "--epochs", "2", "--out", out, "--checkpoint", ckpt, "--quiet")
    assert result.exit_code == 0, result.output
    import torch

    assert torch.load(ckpt, weights_only=True)["epoch"] == 2


def test_train_writes_into_dev_null_a_fifo_and_through_a_symlink(toy_npz, tmp_path):
    target = tmp_path / "models" / "m.onnx"
    target.parent.mkdir()
    link = tmp_path / "m.onnx"
    link.symlink_to(target)
    fifo = tmp_path / "metrics.fifo"
    with fifo_reader(fifo) as got:
        result = train(toy_npz, "--epochs", "2", "--out", link, "--checkpoint", DEV_NULL, "--metrics", fifo)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in got["data"].decode().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert_fifo(fifo)
    assert stat.S_ISCHR(os.stat(DEV_NULL).st_mode)
    assert link.is_symlink() and target.stat().st_size > 1000
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "metrics.fifo", "models"]


def test_a_report_named_like_a_heatmap_inside_the_heatmaps_folder_is_refused(tmp_path):
    maps = tmp_path / "maps"
    maps.mkdir()
    report = maps / "4000_2x2_square.png"
    result = invoke("certify", MODEL, "--patch", "2x2", "--data", "sample:train", "--start", 4000, "--num", 1,
                    "-o", report, "--heatmaps", maps, "--quiet")
    one_line_error(result, 2, "--output", "--heatmaps")
    assert list(maps.iterdir()) == []


def test_an_html_report_named_like_a_heatmap_inside_the_heatmaps_folder_is_refused(tmp_path):
    maps = tmp_path / "maps"
    maps.mkdir()
    result = invoke("certify", MODEL, "--patch", "2x2", "--data", "sample:train", "--start", 4000, "--num", 1,
                    "-o", tmp_path / "r.json", "--heatmaps", maps, "--html", maps / "4000_2x2_square.png", "--quiet")
    one_line_error(result, 2, "--html", "--heatmaps")
    assert list(maps.iterdir()) == [] and not (tmp_path / "r.json").exists()


def test_a_report_beside_the_heatmaps_in_their_folder_is_written(tmp_path):
    maps = tmp_path / "maps"
    maps.mkdir()
    result = invoke("certify", MODEL, "--patch", "2x2", "--data", "sample:train", "--start", 4000, "--num", 1,
                    "-o", maps / "report.json", "--heatmaps", maps, "--quiet")
    assert result.exit_code == 0, result.output
    assert json.loads((maps / "report.json").read_text())["summary"]["num_images"] == 1
    assert (maps / "4000_2x2_square.png").exists()
