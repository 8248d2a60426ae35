"""Which images train and which validate: the one split policy of ``lirpa-patch train`` and the API.

:func:`train_val_split` decides, from a data source and a few numbers:

* **Training images** come from ``data``, images ``[start, start + num)``:

  - ``"sample"`` (or ``"sample:train"``): the sample's 5,000 training digits, by default
    digits 0-3,999 (the last 1,000 are held out); never its test digits;
  - a directory that holds a training split (every real MNIST IDX or CIFAR-10
    directory also holds the test split): its **training** split, never the test
    split unless asked with ``"DIR:test"``;
  - an ``.npz`` file or a ``DIR:train``/``DIR:test`` split: as given.

* **Validation images**:

  - ``val_data`` when given (e.g. ``"DIR:test"``: the test split, only when asked),
    images ``[val_start, val_start + val_num)``;
  - else for the sample (training slice within 0-3,999): the held-out training digits
    4,000-4,999 (the first ``val_num`` of them);
  - else the last ``val_size`` training images, held out (default 10%, at most 5,000;
    ``val_size=0``: no validation).

The result says in words which split each phase uses (:attr:`TrainSplits.description`),
and holds the resolved choices (:attr:`TrainSplits.selection`, stored in checkpoints) so
that ``train_val_split(**selection)`` gives the same images again.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Optional, Union

from ..data import Dataset, available_splits, load_dataset, sample_split
from ..errors import UsageError

SAMPLE_TRAIN = 4000
"""The bundled sample's training split: digits 0-3,999 train, 4,000-4,999 are held out."""

_SAMPLE_TRAINING = "sample:train"

SELECTION_KEYS: tuple[str, ...] = ("data", "start", "num", "val_data", "val_start", "val_num", "val_size")
"""The arguments of :func:`train_val_split` that choose the images (a checkpoint keeps them)."""

Source = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True, eq=False)
class TrainSplits:
    """The training and validation images of a run, and how they were chosen.

    Attributes:
        train: the training :class:`~lirpa_patch.data.Dataset`.
        val: the validation dataset, or None (no validation).
        selection: the resolved arguments of :func:`train_val_split` (JSON-friendly);
            ``train_val_split(**selection)`` reproduces these splits.
        description: which images each phase uses, in words, e.g. ``"training: mnist:train
            images 0-53999 (54000); validation: mnist:train images 54000-59999 (6000, held
            out from the training split)"``.
    """

    train: Dataset
    val: Optional[Dataset]
    selection: dict[str, Any]
    description: str

    @property
    def num_classes(self) -> Optional[int]:
        """The number of classes the data format fixes (10 for MNIST, CIFAR-10 and the sample), else None."""
        return self.train.num_classes if self.train.num_classes is not None else (
            self.val.num_classes if self.val is not None else None)


def _subset(ds: Dataset, part: slice) -> Dataset:
    return Dataset(images=ds.images[part], labels=ds.labels[part], name=ds.name, indices=ds.indices[part],
                   num_classes=ds.num_classes, split=ds.split)


def _load(source: Source, start: int, num: Optional[int], names: dict[str, str]) -> Dataset:
    """``load_dataset``, with its parameter names (``source``, ``start``, ``num``) renamed to ours."""
    try:
        return load_dataset(source, start=start, num=num)
    except UsageError as exc:
        if exc.param not in names:
            raise
        mine = names[exc.param]
        message = re.sub(rf"(?<![\w-]){exc.param}(?!\w)", mine, str(exc), count=1)
        raise UsageError(message, param=mine) from None


def _training_source(data: Source) -> Source:
    """``data``, or ``DIR:train`` for a directory that holds a training split."""
    if "train" in available_splits(data):
        return f"{os.fspath(data)}:train"
    return data


def train_val_split(
    data: Source = "sample",
    *,
    start: int = 0,
    num: Optional[int] = None,
    val_data: Optional[Source] = None,
    val_start: int = 0,
    val_num: Optional[int] = None,
    val_size: Optional[int] = None,
) -> TrainSplits:
    """The training and validation images of a run (policy in the module docstring).

    Args:
        data: the training source (see :func:`~lirpa_patch.data.load_dataset`).
        start, num: the training slice of ``data`` (before any validation hold-out);
            ``num`` None: to the end (for ``"sample"``: to digit 3,999).
        val_data, val_start, val_num: separate validation data and its slice.
        val_size: hold out the last ``val_size`` training images for validation (0: no
            validation). Default: the held-out digits for ``"sample"``, else 10% (at most 5,000).

    Raises:
        UsageError: ``val_size`` leaves no training images, or bad slices (see ``load_dataset``).
        DataError: unreadable data.
    """
    if val_size is not None and (isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 0):
        raise UsageError(f"val_size must be an integer >= 0, got {val_size!r}", param="val_size")
    if val_data is not None and val_size is not None:
        raise UsageError("give either val_data or val_size, not both", param="val_size", related=("val_data",))
    source = _training_source(data)
    sample = sample_split(source) == "train"
    start = start or 0
    if sample and num is None and start < SAMPLE_TRAIN:
        num = SAMPLE_TRAIN - start
    train = _load(source, start, num, {"source": "data", "start": "start", "num": "num"})
    selection: dict[str, Any] = {
        "data": os.fspath(source), "start": start, "num": num,
        "val_data": None, "val_start": 0, "val_num": None, "val_size": None,
    }
    if val_data is None and val_size is None and sample and start + len(train) <= SAMPLE_TRAIN:
        val_data, val_start = _SAMPLE_TRAINING, SAMPLE_TRAIN
    if val_data is not None:
        val = _load(val_data, val_start or 0, val_num, {"source": "val_data", "start": "val_start", "num": "val_num"})
        selection.update(val_data=os.fspath(val_data), val_start=val_start or 0, val_num=val_num)
        held_out = sample_split(val_data) == "train" and (val_start or 0) >= SAMPLE_TRAIN
        why = "the held-out sample digits" if held_out else "val_data"
    else:
        if val_size is None:
            val_size = min(5000, max(1, len(train) // 10))
        if val_size >= len(train):
            raise UsageError(
                f"val_size {val_size} leaves no training images (the training slice has {len(train)})",
                param="val_size",
            )
        selection["val_size"] = val_size
        val = _subset(train, slice(len(train) - val_size, None)) if val_size else None
        train = _subset(train, slice(0, len(train) - val_size))
        why = "held out from the training images"
    description = f"training: {train.span()} ({len(train)})"
    description += f"; validation: {val.span()} ({len(val)}, {why})" if val is not None else "; no validation"
    return TrainSplits(train=train, val=val, selection=selection, description=description)


def saved_selection(saved: dict[str, Any]) -> dict[str, Any]:
    """The :func:`train_val_split` arguments a checkpoint's ``data_selection`` stands for.

    Before the sample had a test split (lirpa-patch 0.1), ``"sample"`` named its training
    digits; a selection saved then says ``"sample"`` for what is now ``"sample:train"``
    (selections saved since always hold the resolved split).
    """
    selection = {key: saved.get(key) for key in SELECTION_KEYS}
    for key in ("data", "val_data"):
        if selection[key] == "sample":
            selection[key] = _SAMPLE_TRAINING
    selection["data"] = selection["data"] or _SAMPLE_TRAINING
    return selection
