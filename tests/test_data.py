"""Specification of lirpa_patch.data.load_dataset: sources, layouts, slicing, errors."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lirpa_patch.data import Dataset, load_dataset
from lirpa_patch.errors import DataError, UsageError

# --- helpers -----------------------------------------------------------------


def _mnist(shared_dir: Path, n: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """The first n shared MNIST digits: x (n, 28, 28) uint8, y (n,) int64."""
    with np.load(shared_dir / "data" / "mnist_5k.npz") as f:
        return f["x"][:n], f["y"][:n]


def _cifar(shared_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The shared CIFAR-10 images: x (86, 3, 32, 32) uint8, y (86,) int64."""
    with np.load(shared_dir / "data" / "cifar10_86.npz") as f:
        return f["x"], f["y"]


def _idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file for a uint8 array: magic 0x0000 08 ndim, big-endian dims, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    return header + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def _write_idx(directory: Path, prefix: str, x: np.ndarray, y: np.ndarray,
               gz: bool = False, sep: str = "-") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for kind, idx, array in (("images", "idx3", x), ("labels", "idx1", y)):
        data = _idx_bytes(array)
        name = f"{prefix}-{kind}{sep}{idx}-ubyte"
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)


def _write_cifar_batch(path: Path, x: np.ndarray, y: np.ndarray,
                       bytes_keys: bool = True, protocol: int = 2) -> None:
    """A CIFAR-10 python batch: data (N, 3072) uint8 row-major CHW, labels a list."""
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = {"data": x.reshape(len(x), -1), "labels": [int(v) for v in y]}
    if bytes_keys:
        batch = {k.encode(): v for k, v in batch.items()}
    path.write_bytes(pickle.dumps(batch, protocol=protocol))


def _write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _assert_images(ds: Dataset, x_nchw_uint8: np.ndarray, y: np.ndarray) -> None:
    assert ds.images.dtype == torch.float32 and ds.labels.dtype == torch.int64
    torch.testing.assert_close(ds.images, torch.from_numpy(x_nchw_uint8.astype(np.float32) / 255))
    assert torch.equal(ds.labels, torch.from_numpy(y.astype(np.int64)))


def _ok_npz(tmp_path: Path, n: int = 4) -> Path:
    rng = np.random.default_rng(0)
    return _write_npz(tmp_path / "ok.npz", x=rng.integers(0, 256, (n, 5, 5), dtype=np.uint8),
                      y=np.arange(n))


# --- the bundled sample ------------------------------------------------------


def test_sample_train_is_5000_mnist_digits_in_unit_range_500_per_class():
    ds = load_dataset("sample:train")
    assert ds.name == "sample:train" and len(ds) == 5000
    assert ds.images.shape == (5000, 1, 28, 28) and ds.images.dtype == torch.float32
    assert 0.0 <= float(ds.images.min()) and float(ds.images.max()) <= 1.0
    assert ds.images.is_contiguous()
    assert torch.equal(torch.bincount(ds.labels), torch.full((10,), 500))
    assert torch.equal(ds.indices, torch.arange(5000))


def test_sample_test_is_the_first_2000_official_test_digits(shared_dir):
    ds = load_dataset("sample:test")
    assert ds.name == "sample:test" and len(ds) == 2000 and ds.num_classes == 10
    official = load_dataset(f"{shared_dir / 'data' / 'mnist'}:test", num=2000)
    assert torch.equal(ds.images, official.images) and torch.equal(ds.labels, official.labels)


def test_sample_alone_is_its_test_split_as_for_a_directory():
    ds = load_dataset("sample", num=5)
    assert ds.name == "sample:test"
    assert torch.equal(ds.images, load_dataset("sample:test", num=5).images)


def test_sample_train_held_out_slice_is_digits_4000_to_4999(shared_dir):
    ds = load_dataset("sample:train", start=4000, num=1000)
    assert len(ds) == 1000
    assert torch.equal(ds.indices, torch.arange(4000, 5000))
    with np.load(shared_dir / "data" / "mnist_5k.npz") as f:
        _assert_images(ds, f["x"][4000:, None], f["y"][4000:])


def test_sample_is_read_from_the_package_not_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert len(load_dataset("sample", num=3)) == 3


def test_a_path_object_named_sample_is_a_path_not_the_bundled_sample(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="not found: sample"):
        load_dataset(Path("sample"))


# --- slicing -----------------------------------------------------------------


def test_start_num_select_a_contiguous_slice_with_source_indices():
    full = load_dataset("sample", num=20)
    part = load_dataset("sample", start=10, num=5)
    assert torch.equal(part.indices, torch.arange(10, 15))
    assert torch.equal(part.images, full.images[10:15])
    assert torch.equal(part.labels, full.labels[10:15])


def test_a_slice_running_past_the_end_stops_at_the_end():
    ds = load_dataset("sample:train", start=4990, num=100)
    assert torch.equal(ds.indices, torch.arange(4990, 5000))


@pytest.mark.parametrize(
    "start, num, message",
    [
        (2000, None, r"start 2000 is beyond the end of sample:test \(2000 images\) \(the 5,000 training digits "
                     r"are sample:train\)"),
        (-1, None, "start must be >= 0"),
        (0, 0, "num must be positive"),
        (0, -3, "num must be positive"),
        (1.5, None, "start must be an integer"),
        (0, True, "num must be an integer"),
    ],
)
def test_out_of_range_start_or_num_is_a_usage_error(start, num, message):
    with pytest.raises(UsageError, match=message):
        load_dataset("sample", start=start, num=num)


# --- .npz --------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["NHW", "NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", ["uint8", "float32", "float64"])
def test_npz_round_trips_in_every_layout_and_dtype(tmp_path, layout, dtype):
    rng = np.random.default_rng(1)
    channels = 1 if layout == "NHW" else 3
    nchw = rng.integers(0, 256, (6, channels, 5, 7), dtype=np.uint8)
    x = {"NHW": nchw[:, 0], "NCHW": nchw, "NHWC": nchw.transpose(0, 2, 3, 1)}[layout]
    if dtype != "uint8":
        x = (x / 255).astype(dtype)
    y = rng.integers(0, 10, 6)
    ds = load_dataset(_write_npz(tmp_path / "d.npz", x=x, y=y))
    assert ds.name == "d.npz"
    assert ds.images.shape == (6, channels, 5, 7)
    _assert_images(ds, nchw, y)


def test_npz_channels_last_only_when_last_dim_is_1_or_3_and_second_is_not(tmp_path):
    ambiguous = np.zeros((2, 3, 8, 3), np.uint8)  # NCHW wins a tie
    grey_last = np.zeros((2, 8, 6, 1), np.uint8)
    four_channels = np.zeros((2, 4, 8, 6), np.uint8)
    y = np.zeros(2, np.int64)

    def shape(name: str, x: np.ndarray) -> tuple[int, ...]:
        return tuple(load_dataset(_write_npz(tmp_path / name, x=x, y=y)).images.shape)

    assert shape("a.npz", ambiguous) == (2, 3, 8, 3)
    assert shape("b.npz", grey_last) == (2, 1, 8, 6)
    assert shape("c.npz", four_channels) == (2, 4, 8, 6)


def test_npz_accepts_unsigned_labels_and_ignores_extra_arrays(shared_dir):
    ds = load_dataset(shared_dir / "data" / "cifar10_86.npz")  # also holds 'test_index'
    x, y = _cifar(shared_dir)
    _assert_images(ds, x, y)


_U8 = np.zeros((2, 4, 4), np.uint8)
_Y2 = np.zeros(2, int)
_BAD_NPZ = {
    "no x": ({"images": np.zeros((2, 4, 4), np.uint8), "y": np.zeros(2, int)},
             r"no array 'x' \(found: images, y\)"),
    "no y": ({"x": np.zeros((2, 4, 4), np.uint8)}, "no array 'y'"),
    "lengths": ({"x": np.zeros((3, 4, 4), np.uint8), "y": _Y2}, "3 images but 2 labels"),
    "ndim 2": ({"x": np.zeros((3, 16), np.uint8), "y": np.zeros(3, int)},
               r"images must be \(N, H, W\).*got shape \(3, 16\)"),
    "ndim 5": ({"x": np.zeros((1, 1, 1, 4, 4), np.uint8), "y": np.zeros(1, int)}, "got shape"),
    "nan": ({"x": np.full((2, 4, 4), np.nan, np.float32), "y": _Y2}, "NaN or infinite"),
    "inf": ({"x": np.full((2, 4, 4), np.inf), "y": _Y2}, "NaN or infinite"),
    "float 0-255": ({"x": np.full((2, 4, 4), 200.0, np.float32), "y": _Y2},
                    r"must lie in \[0, 1\], found values in \[200, 200\]"),
    "negative float": ({"x": np.full((2, 4, 4), -0.5), "y": _Y2}, r"must lie in \[0, 1\]"),
    "int16 pixels": ({"x": np.zeros((2, 4, 4), np.int16), "y": _Y2},
                     "must be uint8 .* or float .*got dtype int16"),
    "float labels": ({"x": _U8, "y": np.array([0.0, 1.5])},
                     "labels must be integers, got dtype float64"),
    "string labels": ({"x": _U8, "y": np.array(["a", "b"])}, "labels must be integers"),
    "negative labels": ({"x": _U8, "y": np.array([0, -1])}, "labels must be >= 0, found -1"),
    "2-D labels": ({"x": _U8, "y": np.zeros((2, 10), int)}, r"labels must be a 1-D array"),
    "empty": ({"x": np.zeros((0, 4, 4), np.uint8), "y": np.zeros(0, int)}, "is empty"),
}


@pytest.mark.parametrize("arrays, message", list(_BAD_NPZ.values()), ids=list(_BAD_NPZ))
def test_bad_npz_content_is_a_data_error(tmp_path, arrays, message):
    path = _write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message) as info:
        load_dataset(path)
    assert "\n" not in str(info.value)


def test_pixel_values_are_checked_only_on_the_selected_slice(tmp_path):
    x = np.zeros((4, 4, 4), np.float32)
    x[0] = np.nan
    path = _write_npz(tmp_path / "d.npz", x=x, y=np.zeros(4, int))
    assert len(load_dataset(path, start=1)) == 3
    with pytest.raises(DataError, match="NaN"):
        load_dataset(path, num=1)


def test_a_file_that_is_not_an_npz_is_a_data_error(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(DataError, match="notes.txt is not a readable .npz archive"):
        load_dataset(path)


def test_a_single_npy_array_is_a_data_error(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError, match="single .npy array"):
        load_dataset(tmp_path / "x.npy")


def test_an_npz_with_pickled_objects_is_refused(tmp_path):
    path = _write_npz(tmp_path / "obj.npz", x=np.array([None, 1], dtype=object), y=np.zeros(2, int))
    with pytest.raises(DataError, match="corrupt array"):
        load_dataset(path)


def test_a_missing_path_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"dataset not found: .*nowhere\.npz"):
        load_dataset(tmp_path / "nowhere.npz")


def test_a_source_that_is_not_a_path_is_a_usage_error():
    with pytest.raises(UsageError, match="must be 'sample' or a path"):
        load_dataset(42)  # type: ignore[arg-type]


# --- MNIST IDX ---------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzipped"])
def test_idx_directory_round_trips(shared_dir, tmp_path, gz):
    x, y = _mnist(shared_dir)
    _write_idx(tmp_path, "t10k", x, y, gz=gz)
    ds = load_dataset(tmp_path)
    assert ds.name == "mnist:test" and ds.images.shape == (100, 1, 28, 28)
    _assert_images(ds, x[:, None], y)


def test_idx_accepts_the_dotted_file_names_and_torchvision_raw_folder(shared_dir, tmp_path):
    x, y = _mnist(shared_dir, 10)
    _write_idx(tmp_path / "MNIST" / "raw", "t10k", x, y, sep=".")
    _assert_images(load_dataset(tmp_path), x[:, None], y)


def test_idx_prefers_test_and_dir_colon_train_selects_train(shared_dir, tmp_path):
    x, y = _mnist(shared_dir, 30)
    _write_idx(tmp_path, "train", x[:20], y[:20])
    _write_idx(tmp_path, "t10k", x[20:], y[20:], gz=True)
    _assert_images(load_dataset(tmp_path), x[20:, None], y[20:])
    train = load_dataset(f"{tmp_path}:train", start=5, num=3)
    assert train.name == "mnist:train"
    assert torch.equal(train.indices, torch.arange(5, 8))
    _assert_images(train, x[5:8, None], y[5:8])
    _assert_images(load_dataset(f"{tmp_path}:test"), x[20:, None], y[20:])


def test_idx_with_only_a_train_split_loads_it_but_test_is_an_error(shared_dir, tmp_path):
    x, y = _mnist(shared_dir, 5)
    _write_idx(tmp_path, "train", x, y)
    assert load_dataset(tmp_path).name == "mnist:train"
    with pytest.raises(DataError, match=r"no MNIST test split \(found: train\)"):
        load_dataset(f"{tmp_path}:test")


def test_idx_bad_magic_is_a_data_error(shared_dir, tmp_path):
    x, y = _mnist(shared_dir, 5)
    _write_idx(tmp_path, "t10k", x, y)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x12\x34\x56\x78" + bytes(100))
    with pytest.raises(DataError, match="not an IDX file .bad magic number 0x12345678"):
        load_dataset(tmp_path)


def test_idx_size_mismatch_is_a_data_error(shared_dir, tmp_path):
    x, y = _mnist(shared_dir, 5)
    _write_idx(tmp_path, "t10k", x, y)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])
    message = r"corrupt: dimensions \(5, 28, 28\) need 3920 data bytes, found 3913"
    with pytest.raises(DataError, match=message):
        load_dataset(tmp_path)


def test_idx_truncated_gzip_is_a_data_error(shared_dir, tmp_path):
    x, y = _mnist(shared_dir, 5)
    _write_idx(tmp_path, "t10k", x, y, gz=True)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:15])
    with pytest.raises(DataError, match="cannot read .*t10k-labels-idx1-ubyte.gz"):
        load_dataset(tmp_path)


def test_idx_image_and_label_counts_must_match(shared_dir, tmp_path):
    x, y = _mnist(shared_dir, 5)
    _write_idx(tmp_path, "t10k", x, y[:4])
    with pytest.raises(DataError, match="mnist:test: 5 images but 4 labels"):
        load_dataset(tmp_path)


def test_idx_images_without_labels_is_a_data_error(shared_dir, tmp_path):
    x, y = _mnist(shared_dir, 5)
    _write_idx(tmp_path, "t10k", x, y)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte is missing"):
        load_dataset(tmp_path)


def test_a_directory_with_neither_idx_nor_cifar_files_is_a_data_error(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(DataError, match="neither MNIST IDX files .* nor CIFAR-10 batches"):
        load_dataset(tmp_path)


def test_an_unknown_split_suffix_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="unknown split 'val'.*use :train or :test"):
        load_dataset(f"{tmp_path}:val")


def test_a_split_suffix_on_a_file_is_a_usage_error(tmp_path):
    path = _ok_npz(tmp_path)
    with pytest.raises(UsageError, match="applies to MNIST/CIFAR-10 directories"):
        load_dataset(f"{path}:train")


# --- CIFAR-10 ----------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_test_batch_round_trips(shared_dir, tmp_path, protocol):
    x, y = _cifar(shared_dir)
    _write_cifar_batch(tmp_path / "test_batch", x, y, protocol=protocol)
    ds = load_dataset(tmp_path)
    assert ds.name == "cifar10:test_batch" and ds.images.shape == (86, 3, 32, 32)
    _assert_images(ds, x, y)


def test_cifar_train_concatenates_data_batches_1_to_5_in_order(shared_dir, tmp_path):
    x, y = _cifar(shared_dir)
    root = tmp_path / "cifar-10-batches-py"
    _write_cifar_batch(root / "test_batch", x[:3], y[:3])
    chunks = np.array_split(np.arange(86), 5)
    for i, chunk in enumerate(chunks, start=1):
        _write_cifar_batch(root / f"data_batch_{i}", x[chunk], y[chunk], bytes_keys=i % 2 == 0)
    assert load_dataset(tmp_path).name == "cifar10:test_batch"
    train = load_dataset(f"{tmp_path}:train")
    assert train.name == "cifar10:data_batch_1-5"
    _assert_images(train, x, y)


def test_cifar_train_with_a_missing_batch_is_a_data_error(shared_dir, tmp_path):
    x, y = _cifar(shared_dir)
    for i in (1, 2, 4, 5):
        _write_cifar_batch(tmp_path / f"data_batch_{i}", x[:2], y[:2])
    with pytest.raises(DataError, match="lacks CIFAR-10 training batch.*data_batch_3"):
        load_dataset(tmp_path)


def test_cifar_unpicklable_batch_is_a_data_error(tmp_path):
    (tmp_path / "test_batch").write_bytes(b"this is not a pickle")
    with pytest.raises(DataError, match="cannot unpickle CIFAR-10 batch .*test_batch"):
        load_dataset(tmp_path)


class _Exploit:
    def __reduce__(self):
        return (print, ("pwned",))


def test_cifar_batch_that_would_run_code_is_refused(tmp_path, capsys):
    (tmp_path / "test_batch").write_bytes(pickle.dumps({"data": _Exploit(), "labels": [0]}))
    with pytest.raises(DataError, match="refusing to load builtins.print"):
        load_dataset(tmp_path)
    assert "pwned" not in capsys.readouterr().out


def test_cifar_batch_with_wrong_data_shape_is_a_data_error(tmp_path):
    _write_cifar_batch(tmp_path / "test_batch", np.zeros((4, 100), np.uint8), np.zeros(4, int))
    with pytest.raises(DataError, match=r"'data' should be \(N, 3072\) uint8, got \(4, 100\)"):
        load_dataset(tmp_path)


def test_cifar_batch_without_labels_is_a_data_error(tmp_path):
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8)}))
    with pytest.raises(DataError, match="needs keys 'data' and 'labels'"):
        load_dataset(tmp_path)


# --- the split a dataset records ---------------------------------------------


@pytest.mark.parametrize("source, split", [("sample", "test"), ("sample:test", "test"), ("sample:train", "train")])
def test_the_sample_records_its_split(source, split):
    assert load_dataset(source, num=2).split == split


def test_a_directory_records_the_split_it_read(tmp_path):
    x, y = np.zeros((3, 28, 28), np.uint8), np.arange(3)
    _write_idx(tmp_path, "train", x, y)
    _write_idx(tmp_path, "t10k", x, y)
    assert (load_dataset(tmp_path).split, load_dataset(f"{tmp_path}:train").split) == ("test", "train")


def test_a_cifar_directory_records_the_split_it_read(tmp_path):
    x, y = np.zeros((2, 3, 32, 32), np.uint8), np.arange(2)
    _write_cifar_batch(tmp_path / "test_batch", x, y)
    assert load_dataset(tmp_path).split == "test"


def test_an_npz_file_records_no_split(tmp_path):
    assert load_dataset(_ok_npz(tmp_path)).split is None


def test_span_names_the_source_and_the_image_indices():
    assert load_dataset("sample", start=4, num=3).span() == "sample:test images 4-6"
    assert load_dataset("sample:train", start=4, num=1).span() == "sample:train image 4"
