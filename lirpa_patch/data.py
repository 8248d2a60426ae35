"""Image datasets: the bundled MNIST sample, ``.npz`` files, MNIST IDX and CIFAR-10.

:func:`load_dataset` returns a :class:`Dataset` whose ``images`` are always
``(N, C, H, W)`` float32 in ``[0, 1]`` and whose ``labels`` are ``(N,)`` int64.

Sources (the ``source`` argument):

``"sample"``, ``"sample:test"``, ``"sample:train"``
    MNIST digits bundled with the package (``lirpa_patch/_data``), in two splits like
    an MNIST directory: ``"sample:test"`` holds the first 2,000 official *test* digits
    (no shipped model trained on them) and ``"sample:train"`` 5,000 *training* digits
    (by convention 0-3,999 train and 4,000-4,999 are held out for validation).
    ``"sample"`` alone is the test split, as for a directory; training picks the
    training split itself (:func:`lirpa_patch.train.train_val_split`). Only these
    *strings* name the sample; pass ``Path("sample")`` or ``"./sample"`` for a file.

a ``.npz`` file with arrays ``x`` and ``y``
    ``x`` is ``(N, H, W)`` (one channel), ``(N, C, H, W)`` or ``(N, H, W, C)``.
    Layout rule for 4-D ``x``: channels-last when the last dimension is 1 or 3
    *and* the second is not 1 or 3; channels-first otherwise (so an ambiguous
    ``(N, 3, H, 3)`` is read as NCHW). ``x`` is uint8 (0-255, divided by 255)
    or float (already in ``[0, 1]``). ``y`` holds non-negative integers.

a directory of MNIST IDX files
    ``t10k-images-idx3-ubyte`` / ``t10k-labels-idx1-ubyte`` (test) and
    ``train-images-idx3-ubyte`` / ``train-labels-idx1-ubyte`` (train), each
    optionally gzipped (``.gz``) and also in the dotted spelling
    ``t10k-images.idx3-ubyte``. Also looked for in ``raw/`` and ``MNIST/raw/``
    (torchvision's layout).

a directory of CIFAR-10 python batches
    ``test_batch`` (test) and ``data_batch_1`` .. ``data_batch_5`` (train,
    concatenated in that order), directly or in ``cifar-10-batches-py/``. The
    batches are unpickled with an unpickler that only admits numpy arrays, so a
    hostile file cannot run code.

A directory gives its test split when it has one, otherwise its train split;
append ``:train`` or ``:test`` (``"data/mnist:train"``) to choose. (Training picks the
training split itself: :func:`lirpa_patch.train.train_val_split`.) MNIST, CIFAR-10 and
the sample have 10 classes: their labels must be 0-9 (``Dataset.num_classes``).

``start``/``num`` select images ``[start, start + num)`` of the source (``num``
None: to the end; a slice running past the end stops at the end). Pixel values
are checked on the selected images only; shapes and labels on the whole source.

Every failure raises :class:`~lirpa_patch.errors.DataError` (bad files or
values) or :class:`~lirpa_patch.errors.UsageError` (bad ``start``/``num``/split)
with a one-line message.
"""

from __future__ import annotations

import gzip
import os
import pickle
import zipfile
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO, Optional, Union

import numpy as np
import torch

from ._messages import first_line
from .errors import DataError, UsageError

_SAMPLE = "sample"
_SAMPLE_FILES = {"test": "mnist_test_sample.npz", "train": "mnist_sample.npz"}
_SPLITS = ("test", "train")
_MNIST_PREFIX = {"test": "t10k", "train": "train"}
_MNIST_SUBDIRS = (".", "raw", os.path.join("MNIST", "raw"))
_CIFAR_SUBDIRS = (".", "cifar-10-batches-py")
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_SHAPE = (3, 32, 32)

# IDX element type codes (third byte of the magic number), stored big-endian.
_IDX_TYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


@dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled image set.

    Attributes:
        images: ``(N, C, H, W)`` float32 in ``[0, 1]``.
        labels: ``(N,)`` int64, non-negative.
        name: where it came from, e.g. ``"sample"``, ``"mnist_5k.npz"``,
            ``"cifar10:test_batch"``.
        indices: ``(N,)`` int64, each image's index in the source
            (``start=4000`` gives 4000, 4001, ...).
        num_classes: the number of classes of the source when the format fixes it
            (10 for the sample, MNIST and CIFAR-10, whose labels are checked to be
            0-9), None for an ``.npz`` file.
        split: ``"test"`` or ``"train"``: the split of the sample, an MNIST IDX or a
            CIFAR-10 directory the images come from; None for an ``.npz`` file (a file
            records no split).
    """

    images: torch.Tensor
    labels: torch.Tensor
    name: str
    indices: torch.Tensor
    num_classes: Optional[int] = None
    split: Optional[str] = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        first = int(self.indices[0]) if len(self) else 0
        return (
            f"Dataset(name={self.name!r}, n={len(self)}, "
            f"image_shape={tuple(self.images.shape[1:])}, "
            f"indices={first}..{first + len(self) - 1})"
        )

    def span(self) -> str:
        """Where the images come from, e.g. ``"sample:test images 0-99"`` or ``"data.npz image 4"``."""
        first, last = int(self.indices[0]), int(self.indices[-1])
        return f"{self.name} images {first}-{last}" if len(self) > 1 else f"{self.name} image {first}"


def load_dataset(
    source: Union[str, os.PathLike],
    *,
    start: int = 0,
    num: Optional[int] = None,
) -> Dataset:
    """Load images ``[start, start + num)`` of ``source`` (see the module docstring).

    Returns a :class:`Dataset` with ``images`` ``(n, C, H, W)`` float32 in
    ``[0, 1]``, ``labels`` ``(n,)`` int64 and ``indices`` ``(n,)`` int64 =
    ``start, start + 1, ...``.

    Raises:
        DataError: the source is missing, unreadable, or holds invalid values.
        UsageError: ``start``/``num`` out of range, or an unknown split.
    """
    _check_int("start", start)
    if num is not None:
        _check_int("num", num)
        if num <= 0:
            raise UsageError(f"num must be positive, got {num}", param="num")
    if start < 0:
        raise UsageError(f"start must be >= 0, got {start}", param="start")

    classes: Optional[int] = None
    split = sample_split(source)
    if split is not None:
        x, y = _load_sample(split)
        name, classes = f"{_SAMPLE}:{split}", 10
    else:
        x, y, name, split = _load_path(source)
        if split is not None:  # an MNIST or CIFAR-10 directory
            classes = 10
    x = _to_nchw(x, name)
    _check_labels(y, len(x), name, classes)

    n = len(x)
    if start >= n:
        hint = (" (the 5,000 training digits are sample:train)" if name == f"{_SAMPLE}:test" else "")
        raise UsageError(f"start {start} is beyond the end of {name} ({n} images){hint}", param="start")
    stop = n if num is None else min(n, start + num)
    images = _to_unit_float(x[start:stop], name)
    return Dataset(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(y[start:stop].astype(np.int64)),
        name=name,
        indices=torch.arange(start, stop, dtype=torch.int64),
        num_classes=classes,
        split=split,
    )


def sample_split(source: Union[str, os.PathLike]) -> Optional[str]:
    """``"test"`` or ``"train"`` when ``source`` names the bundled sample (``"sample"`` is
    its test split), else None. Never raises."""
    if not isinstance(source, str):
        return None
    if source == _SAMPLE:
        return "test"
    head, _, tail = source.partition(":")
    return tail if head == _SAMPLE and tail in _SAMPLE_FILES else None


def available_splits(source: Union[str, os.PathLike]) -> tuple[str, ...]:
    """The splits (``"train"``, ``"test"``) the sample or an MNIST IDX or CIFAR-10 directory holds.

    Empty for a file, a path with a ``:train``/``:test`` suffix (the split is already
    chosen) or anything that does not exist. Never raises.
    """
    if isinstance(source, str) and source == _SAMPLE:
        return ("train", "test")
    if sample_split(source) is not None:
        return ()
    try:
        path = Path(os.fsdecode(source)).expanduser()
    except TypeError:
        return ()
    if not path.is_dir():
        return ()
    found = tuple(s for s in ("train", "test") if _find_mnist(path, s) != (None, None))
    if found:
        return found
    for sub in _CIFAR_SUBDIRS:
        root = path / sub
        cifar = tuple(
            s for s, names in (("train", _CIFAR_TRAIN[:1]), ("test", ("test_batch",)))
            if any((root / b).is_file() for b in names)
        )
        if cifar:
            return cifar
    return ()


def source_files(source: Union[str, os.PathLike]) -> list[Path]:
    """The files ``source`` may be read from, for :func:`lirpa_patch.outputs.check_outputs`.

    The bundled sample's file, an ``.npz`` file, or every MNIST IDX / CIFAR-10 file of
    a directory (both splits, whichever ``:train``/``:test`` suffix is given). Never
    raises: a source that does not exist reads no files (:func:`load_dataset` reports it).
    """
    split = sample_split(source)
    if split is not None:
        try:
            ref = resources.files(__package__) / "_data" / _SAMPLE_FILES[split]
            return [Path(os.fspath(ref))] if ref.is_file() else []
        except (TypeError, OSError):  # pragma: no cover - a zipped install
            return []
    try:
        text = os.fsdecode(source)
    except TypeError:
        return []
    path = Path(text).expanduser()
    if not path.exists() and ":" in text:
        head, tail = text.rsplit(":", 1)
        if head and tail in _SPLITS:
            path = Path(head).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    files = [f for s in _SPLITS for f in _find_mnist(path, s) if f is not None]
    for sub in _CIFAR_SUBDIRS:
        files += [path / sub / b for b in ("test_batch",) + _CIFAR_TRAIN if (path / sub / b).is_file()]
    return files


# --- sources -----------------------------------------------------------------


def _load_sample(split: str) -> tuple[np.ndarray, np.ndarray]:
    """A split of the bundled sample: ``x`` (N, 28, 28) uint8, ``y`` (N,) int64 (test: 2,000; train: 5,000)."""
    ref = resources.files(__package__) / "_data" / _SAMPLE_FILES[split]
    try:
        with ref.open("rb") as f:
            return _read_npz(f, f"the bundled sample's {split} split")
    except FileNotFoundError:
        raise DataError(
            f"the bundled MNIST sample (lirpa_patch/_data/{_SAMPLE_FILES[split]}) is missing; "
            "reinstall lirpa-patch"
        ) from None


def _load_path(source: Union[str, os.PathLike]) -> tuple[np.ndarray, np.ndarray, str, Optional[str]]:
    """Dispatch a path (optionally ``dir:train``/``dir:test``) to its reader: ``x``, ``y``, the
    name and the split read (None for a file)."""
    try:
        text = os.fsdecode(source)
    except TypeError:
        raise UsageError(f"source must be 'sample' or a path, got {source!r}", param="source") from None
    path = Path(text).expanduser()
    split: Optional[str] = None
    if not path.exists() and ":" in text:
        head, tail = text.rsplit(":", 1)
        if head and Path(head).expanduser().exists():
            if tail not in _SPLITS:
                raise UsageError(f"unknown split {tail!r} in source {text!r}: use :train or :test", param="source")
            path, split = Path(head).expanduser(), tail
    if not path.exists():
        raise DataError(f"dataset not found: {text} (use 'sample', an .npz file or a directory)")

    if path.is_dir():
        return _load_dir(path, split)
    if split is not None:
        raise UsageError(
            f"a :{split} split applies to MNIST/CIFAR-10 directories, but source {path} is a file", param="source"
        )
    try:
        with open(path, "rb") as f:
            x, y = _read_npz(f, str(path))
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    return x, y, path.name, None


def _read_npz(f: BinaryIO, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Arrays ``x`` and ``y`` of an ``.npz`` archive (no pickled objects allowed)."""
    try:
        archive = np.load(f, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{what} is not a readable .npz archive ({first_line(exc)})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{what} is a single .npy array; expected an .npz with arrays x and y")
    with archive:
        missing = [k for k in ("x", "y") if k not in archive.files]
        if missing:
            found = ", ".join(archive.files) or "nothing"
            raise DataError(
                f"{what} has no array {' or '.join(repr(k) for k in missing)} "
                f"(found: {found}); expected images 'x' and labels 'y'"
            )
        try:
            return archive["x"], archive["y"]
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise DataError(f"{what} has a corrupt array ({first_line(exc)})") from None


def _load_dir(path: Path, split: Optional[str]) -> tuple[np.ndarray, np.ndarray, str, str]:
    """An MNIST IDX or CIFAR-10 directory (``x``, ``y``, name, split read); ``split`` None prefers test
    over train."""
    mnist = {s: _find_mnist(path, s) for s in _SPLITS}
    available = [s for s in _SPLITS if mnist[s] != (None, None)]
    if available:
        chosen = split or available[0]
        images, labels = mnist[chosen]
        if images is None and labels is None:
            raise DataError(f"{path} has no MNIST {chosen} split (found: {', '.join(available)})")
        if images is None or labels is None:
            kind = "images-idx3" if images is None else "labels-idx1"
            raise DataError(
                f"{path} has half of the MNIST {chosen} split: "
                f"{_MNIST_PREFIX[chosen]}-{kind}-ubyte is missing"
            )
        x, y = _read_idx(images), _read_idx(labels)
        if x.ndim != 3:
            raise DataError(f"{images} should hold (N, H, W) images, got shape {x.shape}")
        if y.ndim != 1:
            raise DataError(f"{labels} should hold (N,) labels, got shape {y.shape}")
        return x, y, f"mnist:{chosen}", chosen
    for sub in _CIFAR_SUBDIRS:
        root = path / sub
        if any((root / b).is_file() for b in ("test_batch",) + _CIFAR_TRAIN):
            return _load_cifar(root, split)
    raise DataError(
        f"{path} holds neither MNIST IDX files (t10k-images-idx3-ubyte, ...) "
        "nor CIFAR-10 batches (test_batch, data_batch_1, ...)"
    )


def _find_mnist(root: Path, split: str) -> tuple[Optional[Path], Optional[Path]]:
    """``(images, labels)`` files of one MNIST split under ``root``; None where absent."""
    prefix = _MNIST_PREFIX[split]

    def find(kind: str, idx: str) -> Optional[Path]:
        for sub in _MNIST_SUBDIRS:
            for sep in ("-", "."):
                for ext in ("", ".gz"):
                    candidate = root / sub / f"{prefix}-{kind}{sep}{idx}-ubyte{ext}"
                    if candidate.is_file():
                        return candidate
        return None

    return find("images", "idx3"), find("labels", "idx1")


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped): big-endian magic, dims, then data."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {path}: {first_line(exc)}") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise DataError(
            f"{path} is not an IDX file (bad magic number 0x{raw[:4].hex() or '0'})"
        )
    dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated: its header is incomplete")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path} is corrupt: dimensions {dims} need {expected} data bytes, "
            f"found {len(raw) - header}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))  # native byte order, writable copy


def _load_cifar(root: Path, split: Optional[str]) -> tuple[np.ndarray, np.ndarray, str, str]:
    """CIFAR-10 batches in ``root``: ``x`` (N, 3, 32, 32) uint8, ``y`` (N,), the name and the split read."""
    has_test = (root / "test_batch").is_file()
    chosen = split or ("test" if has_test else "train")
    if chosen == "test":
        if not has_test:
            raise DataError(f"{root} has no CIFAR-10 test_batch")
        x, y = _read_cifar_batch(root / "test_batch")
        return x, y, "cifar10:test_batch", "test"
    missing = [b for b in _CIFAR_TRAIN if not (root / b).is_file()]
    if missing:
        raise DataError(f"{root} lacks CIFAR-10 training batch(es) {', '.join(missing)}")
    parts = [_read_cifar_batch(root / b) for b in _CIFAR_TRAIN]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    return x, y, "cifar10:data_batch_1-5", "train"


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists and numpy arrays; refuses every other global."""

    _ALLOWED = {"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"}

    def find_class(self, module: str, name: str) -> Any:
        if (module.split(".")[0] == "numpy" and name in self._ALLOWED) or (
            module == "_codecs" and name == "encode"
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch: ``data`` (N, 3072) uint8 -> (N, 3, 32, 32); ``labels`` (N,)."""
    try:
        with open(path, "rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # unpickling can raise almost anything on a bad file
        raise DataError(f"cannot unpickle CIFAR-10 batch {path} ({first_line(exc)})") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path} is not a CIFAR-10 batch (expected a pickled dict)")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DataError(f"{path} is not a CIFAR-10 batch (needs keys 'data' and 'labels')")
    data = np.asarray(batch["data"])
    size = int(np.prod(_CIFAR_SHAPE))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != size:
        raise DataError(
            f"{path}: 'data' should be (N, {size}) uint8, got {data.shape} {data.dtype}"
        )
    try:
        labels = np.asarray(batch["labels"])
    except (ValueError, TypeError):
        raise DataError(f"{path}: 'labels' is not a flat list of integers") from None
    return data.reshape((-1,) + _CIFAR_SHAPE), labels


# --- checks and conversion ---------------------------------------------------


def _to_nchw(x: Any, name: str) -> np.ndarray:
    """``x`` (N, H, W), (N, C, H, W) or (N, H, W, C) -> (N, C, H, W), dtype unchanged."""
    x = np.asarray(x)
    if x.dtype != np.uint8 and x.dtype.kind != "f":
        raise DataError(
            f"{name}: images must be uint8 (0-255) or float (0-1), got dtype {x.dtype}"
        )
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            x = x.transpose(0, 3, 1, 2)
    else:
        raise DataError(
            f"{name}: images must be (N, H, W), (N, C, H, W) or (N, H, W, C), "
            f"got shape {x.shape}"
        )
    if x.shape[0] == 0:
        raise DataError(f"{name} is empty: it holds no images")
    if x.size == 0:
        raise DataError(f"{name}: images have zero size, shape {x.shape}")
    return x


def _check_labels(y: Any, n: int, name: str, classes: Optional[int] = None) -> None:
    """``y`` must be (n,) non-negative integers, below ``classes`` when the format fixes it."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"{name}: labels must be a 1-D array (N,), got shape {y.shape}")
    if y.dtype.kind not in "iu":
        raise DataError(f"{name}: labels must be integers, got dtype {y.dtype}")
    if len(y) != n:
        raise DataError(f"{name}: {n} images but {len(y)} labels")
    if y.dtype.kind == "i" and (y < 0).any():
        raise DataError(f"{name}: labels must be >= 0, found {int(y.min())}")
    if classes is not None and len(y) and int(y.max()) >= classes:
        first = int(np.argmax(y >= classes))
        raise DataError(
            f"{name}: labels must be 0-{classes - 1} ({classes} classes), found label {int(y[first])} "
            f"at image {first}"
        )


def _to_unit_float(x: np.ndarray, name: str) -> np.ndarray:
    """(n, C, H, W) uint8 or float -> contiguous float32 in [0, 1]."""
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x, dtype=np.float32) / np.float32(255.0)
    if not np.isfinite(x).all():
        raise DataError(f"{name}: images contain NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise DataError(
            f"{name}: float images must lie in [0, 1], found values in [{lo:g}, {hi:g}] "
            "(store 0-255 data as uint8)"
        )
    return np.array(x, dtype=np.float32, order="C", copy=True)


def _check_int(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise UsageError(f"{what} must be an integer, got {value!r}", param=what)


