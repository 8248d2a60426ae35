"""What a training run reports: :class:`EpochMetrics` (one row per epoch, and the final
evaluation), :class:`TrainEvent` (what the ``callback`` of
:meth:`~lirpa_patch.train.trainer.Trainer.fit` receives) and :class:`MetricsLog` (the
rows in a ``.jsonl`` or ``.csv`` file).
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Literal, Optional

from ..errors import UsageError
from ..outputs import PathLike


@dataclass
class EpochMetrics:
    """One row of the metrics log (``kind="epoch"``), or the final evaluation (``kind="final"``).

    Train-side values are averages over the epoch's images; ``train_certified``
    is the fraction whose worst margin at the strategy's locations (and the
    batch's strength) is >= 0. Validation values come from :func:`certify` with
    IBP over every location (None when not evaluated this epoch).
    ``epoch_seconds`` is the epoch's wall time, ``epoch_cpu_seconds`` the CPU time of this
    process (all its threads) over it: on a busy machine the second is the cost.
    """

    kind: str = "epoch"
    epoch: int = 0
    lr: Optional[float] = None
    strength: Optional[float] = None
    loss: Optional[float] = None
    robust_loss: Optional[float] = None
    natural_loss: Optional[float] = None
    unet_mse: Optional[float] = None
    train_accuracy: Optional[float] = None
    train_certified: Optional[float] = None
    val_images: int = 0
    val_clean_accuracy: Optional[float] = None
    val_certified_accuracy: Optional[float] = None
    rows: int = 0
    epoch_seconds: Optional[float] = None
    epoch_cpu_seconds: Optional[float] = None
    eval_seconds: Optional[float] = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainEvent:
    """What the trainer reports to the ``callback``.

    ``kind``: ``"batch"`` after every optimizer step (``batch`` of ``num_batches``,
    ``strength``, running ``loss``), ``"epoch"`` after every epoch (``metrics``).
    """

    kind: Literal["batch", "epoch"]
    epoch: int
    epochs: int
    batch: int = 0
    num_batches: int = 0
    strength: float = 0.0
    loss: float = 0.0
    metrics: Optional[EpochMetrics] = None


Callback = Callable[[TrainEvent], None]


_COLUMNS = [f.name for f in fields(EpochMetrics)]


class MetricsLog:
    """Append :class:`EpochMetrics` rows to a ``.jsonl`` (one JSON object a line) or ``.csv`` file.

    The format follows the suffix (``.csv``: CSV with a header; anything else: JSONL).
    An existing file is appended to (a resumed run continues its log); a symlink is
    followed, and a FIFO or ``/dev/null`` is written into. The file stays open (one
    flushed line per row) until :meth:`close`; use it as a context manager.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self.csv = self.path.suffix.lower() == ".csv"
        try:
            if not self.path.parent.exists():
                self.path.parent.mkdir(parents=True, exist_ok=True)
            regular = not self.path.exists() or self.path.is_file()
            needs_header = self.csv and (not regular or not self.path.exists() or self.path.stat().st_size == 0)
            self._file = open(self.path, "a", newline="", encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot write metrics file {self.path}: {exc.strerror or exc}", param="path") from None
        if needs_header:
            self._write(lambda f: csv.writer(f).writerow(_COLUMNS))

    def _write(self, emit: Callable[[Any], None]) -> None:
        try:
            emit(self._file)
            self._file.flush()
        except OSError as exc:
            raise UsageError(f"cannot write metrics file {self.path}: {exc.strerror or exc}", param="path") from None

    def append(self, metrics: EpochMetrics) -> None:
        record = metrics.to_dict()
        if self.csv:
            self._write(lambda f: csv.writer(f).writerow(["" if record[c] is None else record[c] for c in _COLUMNS]))
        else:
            self._write(lambda f: f.write(json.dumps(record) + "\n"))

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
