"""A trainer's checkpoint: what it holds, writing it, reading it and restoring a trainer from it.

A checkpoint is the dict of :func:`trainer_state` (weights, optimizers, schedulers, the
random generator, the metrics so far, the config and the caller's ``meta``), saved with
``torch.save``; :func:`load_checkpoint` reads one back and :func:`restore` puts it into
a trainer built with the same model and config. The functions take the
:class:`~lirpa_patch.train.trainer.Trainer` whose state they read or write (its
``state_dict``, ``save``, ``load_state_dict`` and ``resume`` methods call them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import outputs
from .._messages import first_line
from ..errors import UsageError
from ..outputs import PathLike
from .config import config_dict
from .metrics import EpochMetrics

CHECKPOINT_VERSION = 1

RESUME_KEYS = ("patch", "shape", "strategy", "patches", "seed")
"""The config fields a checkpoint must share with the trainer that resumes it."""


def trainer_state(trainer: Any) -> dict:
    """Everything needed to continue ``trainer`` exactly: weights, optimizers, schedulers, RNG, history."""
    aux = trainer.strategy.auxiliary
    return {
        "version": CHECKPOINT_VERSION,
        "epoch": trainer.epoch,
        "config": config_dict(trainer.config),
        "meta": trainer.meta,
        "num_classes": trainer.num_classes,
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "aux": aux.state_dict() if aux is not None else None,
        "aux_optimizer": trainer.aux_optimizer.state_dict() if trainer.aux_optimizer is not None else None,
        "aux_scheduler": trainer.aux_scheduler.state_dict() if trainer.aux_scheduler is not None else None,
        "generator": trainer.generator.get_state(),
        "history": [m.to_dict() for m in trainer.history],
    }


def save_checkpoint(state: dict, path: PathLike) -> Path:
    """Write ``state`` (a :func:`trainer_state`) to ``path`` as :mod:`lirpa_patch.outputs` writes every output.

    A regular file is replaced atomically (a temporary file, then a rename: an
    interrupted save keeps the previous checkpoint); a symlink is written through;
    ``/dev/null`` or a FIFO is written into.
    """
    with outputs.open_output(path, what="the checkpoint") as f:
        torch.save(state, f)
    return Path(path)


def restore(trainer: Any, state: dict) -> None:
    """Put ``state`` (a :func:`trainer_state`) into ``trainer``, built with the same model and config.

    Raises:
        UsageError (``param="state"``): another checkpoint version, a config that differs
            in one of :data:`RESUME_KEYS`, or weights that do not fit the model.
    """
    if state.get("version") != CHECKPOINT_VERSION:
        raise UsageError(f"unsupported checkpoint version {state.get('version')!r}", param="state")
    saved = state["config"]
    for key in RESUME_KEYS:
        if str(saved.get(key)) != str(getattr(trainer.config, key)):
            raise UsageError(
                f"the checkpoint was trained with {key}={saved.get(key)!r}, not {getattr(trainer.config, key)!r}",
                param="state",
            )
    try:
        trainer.model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise UsageError(f"the checkpoint does not fit this model: {first_line(exc)}",
                         param="state") from None
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    aux = trainer.strategy.auxiliary
    if aux is not None and state.get("aux") is not None:
        aux.load_state_dict(state["aux"])
        trainer.aux_optimizer.load_state_dict(state["aux_optimizer"])
        trainer.aux_scheduler.load_state_dict(state["aux_scheduler"])
    trainer.generator.set_state(state["generator"])
    trainer.epoch = int(state["epoch"])
    trainer.history = [EpochMetrics(**m) for m in state.get("history", [])]


def load_checkpoint(path: PathLike) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (:meth:`~lirpa_patch.train.trainer.Trainer.save`).

    Raises:
        UsageError: the file is missing or is not a lirpa-patch training checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist", param="path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch's message is a page long (with ANSI colours): one line instead
        raise UsageError(f"{path} is not a lirpa-patch training checkpoint (torch.load cannot read it)",
                         param="path") from None
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise UsageError(f"{path} is not a lirpa-patch training checkpoint", param="path")
    return state
