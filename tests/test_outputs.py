"""lirpa_patch.outputs: an output never overwrites an input, and special files stay special.

Real FIFOs (read in a thread), real symlinks and hard links, and /dev/null itself.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from special_files import DEV_NULL, assert_fifo, fifo_reader

from lirpa_patch.errors import LirpaPatchError, UsageError
from lirpa_patch.outputs import check_outputs, open_output, same_file, write_output


def test_dev_null_is_a_character_device_on_this_machine():
    assert stat.S_ISCHR(os.stat(DEV_NULL).st_mode)


# --------------------------------------------------------------------------- an output is never an input


@pytest.mark.parametrize("link", ["same path", "symlink", "hard link", "relative path"])
def test_an_output_that_is_an_input_is_a_usage_error_naming_the_parameter(tmp_path, monkeypatch, link):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"weights")
    output = {
        "same path": lambda: model,
        "symlink": lambda: (tmp_path / "link.json").symlink_to(model) or tmp_path / "link.json",
        "hard link": lambda: os.link(model, tmp_path / "hard.json") or tmp_path / "hard.json",
        "relative path": lambda: (monkeypatch.chdir(tmp_path), Path("./model.onnx"))[1],
    }[link]()
    with pytest.raises(UsageError, match="same file as model") as error:
        check_outputs({"output": output}, {"model": model, "data": [tmp_path / "d.npz"]})
    assert error.value.param == "output" and error.value.related == ("model",)
    assert model.read_bytes() == b"weights"


def test_every_file_of_an_input_list_is_protected(tmp_path):
    files = [tmp_path / "train-images-idx3-ubyte", tmp_path / "t10k-labels-idx1-ubyte"]
    for f in files:
        f.write_bytes(b"x")
    with pytest.raises(UsageError, match="same file as data"):
        check_outputs({"metrics": files[1]}, {"data": files})


def test_two_outputs_that_are_the_same_file_are_refused(tmp_path):
    with pytest.raises(UsageError, match="two outputs") as error:
        check_outputs({"out": tmp_path / "m.onnx", "checkpoint": tmp_path / "m.onnx"}, {})
    assert error.value.param == "checkpoint"


def test_an_allowed_pair_may_be_the_same_file(tmp_path):
    ckpt = tmp_path / "run.ckpt.pt"
    ckpt.write_bytes(b"state")
    check_outputs({"checkpoint": ckpt}, {"resume": ckpt}, allow=[("checkpoint", "resume")])
    with pytest.raises(UsageError, match="same file as resume"):
        check_outputs({"metrics": ckpt}, {"resume": ckpt}, allow=[("checkpoint", "resume")])


def test_distinct_files_and_missing_outputs_pass(tmp_path):
    (tmp_path / "in.npz").write_bytes(b"x")
    check_outputs({"output": tmp_path / "new.json", "other": None}, {"data": tmp_path / "in.npz", "mask": None})


def test_dev_null_may_take_several_outputs():
    check_outputs({"checkpoint": DEV_NULL, "metrics": DEV_NULL}, {})


def test_same_file_follows_symlinks_and_hard_links(tmp_path):
    a = tmp_path / "a"
    a.write_text("x")
    (tmp_path / "s").symlink_to(a)
    os.link(a, tmp_path / "h")
    assert same_file(a, tmp_path / "s") and same_file(a, tmp_path / "h")
    assert not same_file(a, tmp_path / "missing")


# --------------------------------------------------------------------------- writing like Unix tools


def test_a_fifo_is_written_into_and_stays_a_fifo(tmp_path):
    fifo = tmp_path / "report.fifo"
    with fifo_reader(fifo) as got:
        write_output(fifo, '{"ok": true}\n')
    assert got.get("data") == b'{"ok": true}\n'
    assert_fifo(fifo)
    assert sorted(os.listdir(tmp_path)) == ["report.fifo"]


def test_dev_null_is_written_into_and_stays_a_character_device():
    write_output(DEV_NULL, b"discarded")
    assert stat.S_ISCHR(os.stat(DEV_NULL).st_mode)


def test_a_symlink_is_written_through_and_stays_a_link(tmp_path):
    target = tmp_path / "real" / "report.json"
    target.parent.mkdir()
    target.write_text("old")
    os.chmod(target, 0o640)
    link = tmp_path / "report.json"
    link.symlink_to(target)
    write_output(link, "new")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert os.listdir(target.parent) == ["report.json"]


def test_a_dangling_symlink_creates_its_target(tmp_path):
    link = tmp_path / "out.json"
    link.symlink_to(tmp_path / "target.json")
    write_output(link, "hello")
    assert link.is_symlink() and (tmp_path / "target.json").read_text() == "hello"


def test_a_regular_file_is_replaced_keeping_its_mode(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")
    os.chmod(path, 0o604)
    write_output(path, "new")
    assert path.read_text() == "new" and stat.S_IMODE(path.stat().st_mode) == 0o604
    assert os.listdir(tmp_path) == ["r.json"]


def test_an_interrupted_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="interrupted"):
        with open_output(path) as f:
            f.write(b"half")
            raise RuntimeError("interrupted")
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["ckpt.pt"]


def test_a_directory_or_a_missing_folder_cannot_be_written(tmp_path):
    with pytest.raises(LirpaPatchError, match="is a directory"):
        write_output(tmp_path, "x")
    with pytest.raises(LirpaPatchError, match="does not exist"):
        write_output(tmp_path / "missing" / "r.json", "x")
