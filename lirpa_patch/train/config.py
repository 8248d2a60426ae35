"""What defines a training run: :class:`TrainConfig`, its checks, and its form in a checkpoint.

A checkpoint stores the config as a plain dict (:func:`config_dict`);
:func:`config_from_dict` reads it back (unknown keys ignored, so an older or newer
checkpoint still loads).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, Optional

from ..choices import INITS
from ..errors import UsageError
from ..shapes import parse_size
from ..threats.base import Threat
from ..threats.patch import PatchThreat
from ..threats.registry import threat_from_description
from ..threats.sparse import SparseThreat
from .presets import PRESETS


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in the checkpoint).

    Attributes:
        threat: what to train against: any :class:`~lirpa_patch.threats.base.Threat`
            (e.g. ``PatchThreat("5x5")``, ``SparseThreat(4)``). None (the default): the patch
            of ``patch`` and ``shape``, or the sparse threat of ``sparse`` (the older fields,
            kept). :meth:`threat_model` gives the threat either way. A threat whose rows are
            places on the image (patch locations) trains with ``strategy``; any other bounds
            every row of every image (:class:`~lirpa_patch.train.strategies.EveryRow`).
        patch: patch size ``"HxW"`` (or ``n``).
        shape: patch shape name (see :mod:`lirpa_patch.shapes`).
        strategy: ``all``, ``random``, ``guided``, ``pool`` or ``guided-per-label`` (:mod:`.strategies`).
        patches: ``k``: locations per image (random, guided) or per other class (guided-per-label).
        temperature: guided sampling temperature ``T``.
        pool: bound-pooling windows after successive ReLUs (``pool`` strategy); empty: 2x2
            blocks after the last ReLU before the first linear layer.
        unet_width: base width of the guided U-net.
        epochs: total epochs.
        warmup_start: epochs of natural training (strength 0) before the ramp.
        warmup: epochs over which the patch interval grows from ``[x, x]`` to full.
        lr: Adam learning rate (classifier and U-net).
        lr_step, lr_decay: after the warm-up, ``lr *= lr_decay`` every ``lr_step`` epochs.
        batch_size: images per optimizer step.
        natural_weight: ``w`` of the mixed loss ``(1 - w) robust + w natural``.
        crop: random crop after zero padding by this many pixels, i.e. random shifts of up
            to ``crop`` pixels, per image (0: off; the CIFAR preset uses 4).
        flip: random horizontal flip, per image (the CIFAR preset flips).
        init: ``"keep"`` trains the model as given; ``"ibp"`` first re-initialises its linear and
            convolution layers for interval bounds (Shi et al. 2021; :mod:`lirpa_patch.train.init`),
            seeded by ``seed``.
        chunk_size: most (image, location) rows per ``compute_bounds`` call, and
            most rows with gradients per micro-batch. None (the default): sized from the
            model's widest layer, about :data:`~lirpa_patch.train.trainer.CHUNK_BYTES` per bound tensor, between
            :data:`~lirpa_patch.train.trainer.CHUNK_ROWS` rows
            (:attr:`~lirpa_patch.train.trainer.Trainer.chunk_size`).
        eval_every: certify the validation subset every this many epochs (0: never).
        eval_images: size of that subset (first images of the validation set).
        seed: seeds shuffling, augmentation, sampling and the U-net's initialisation.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        sparse: ``k`` of the sparse threat (any ``k`` pixels change); 0 trains against
            patches. When set, the strategy is
            :class:`~lirpa_patch.train.sparse_strategy.SparsePixels` and evaluation
            uses :func:`~lirpa_patch.engine.certify_sparse`.
    """

    patch: str = "2x2"
    shape: str = "square"
    strategy: str = "random"
    patches: int = 10
    temperature: float = 1.0
    pool: tuple[int, ...] = ()
    unet_width: int = 16
    epochs: int = 100
    warmup_start: int = 1
    warmup: int = 61
    lr: float = 5e-4
    lr_step: int = 10
    lr_decay: float = 0.5
    batch_size: int = 256
    natural_weight: float = 0.0
    crop: int = 0
    flip: bool = False
    init: str = "keep"
    chunk_size: Optional[int] = None
    eval_every: int = 1
    eval_images: int = 200
    seed: int = 0
    device: str = "cpu"
    sparse: int = 0
    threat: Optional[Threat] = None

    def __post_init__(self) -> None:
        if self.threat is None:
            return
        if not isinstance(self.threat, Threat):
            raise UsageError(f"threat must be a lirpa_patch Threat (e.g. PatchThreat(2), SparseThreat(4)), "
                             f"got {self.threat!r}", param="threat")
        if self.sparse:
            raise UsageError("give either threat= or sparse=, not both", param="sparse")

    def threat_model(self) -> Threat:
        """The threat this run trains against: ``threat``, or the one the older fields describe."""
        if self.threat is not None:
            return self.threat
        if self.sparse:
            return SparseThreat(self.sparse)
        return PatchThreat(self.patch, self.shape)

    @classmethod
    def for_dataset(cls, dataset: Literal["mnist", "cifar"], **overrides: Any) -> "TrainConfig":
        """The paper's defaults for ``"mnist"`` or ``"cifar"`` (App. A.1, :mod:`.presets`), with ``overrides``."""
        if dataset not in PRESETS:
            raise UsageError(f"unknown preset {dataset!r}; choose {' or '.join(PRESETS)}", param="dataset")
        return cls(**{**PRESETS[dataset], **overrides})

    def validate(self) -> None:
        """Raise :class:`UsageError` (naming the field as ``param``) for out-of-range values."""
        for name in ("epochs", "warmup_start", "warmup", "lr_step", "batch_size", "crop", "chunk_size", "patches",
                     "unet_width", "eval_every", "eval_images", "seed", "sparse"):
            value = getattr(self, name)
            if name == "chunk_size" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise UsageError(f"{name} must be an integer, got {value!r}", param=name)
        for name in ("lr", "lr_decay", "natural_weight", "temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise UsageError(f"{name} must be a finite number, got {value!r}", param=name)
        if self.init not in INITS:
            raise UsageError(f"init must be one of {', '.join(INITS)}, got {self.init!r}", param="init")
        h, w = parse_size(self.patch)
        self.patch = f"{h}x{w}"
        try:
            self.pool = tuple(int(p) for p in self.pool)
        except (TypeError, ValueError):
            raise UsageError(f"pool must be a list of window sizes, got {self.pool!r}", param="pool") from None
        checks = [
            ("epochs", self.epochs >= 1, "at least 1"),
            ("warmup", self.warmup >= 0, ">= 0"),
            ("warmup_start", self.warmup_start >= 0, ">= 0"),
            ("lr", self.lr > 0, "positive"),
            ("lr_step", self.lr_step >= 0, ">= 0"),
            ("lr_decay", 0 < self.lr_decay <= 1, "in (0, 1]"),
            ("batch_size", self.batch_size >= 1, "at least 1"),
            ("natural_weight", 0.0 <= self.natural_weight <= 1.0, "in [0, 1]"),
            ("chunk_size", self.chunk_size is None or self.chunk_size >= 1, "at least 1 (or None: automatic)"),
            ("patches", self.patches >= 1, "at least 1"),
            ("temperature", self.temperature > 0, "positive"),
            ("unet_width", self.unet_width >= 1, "at least 1"),
            ("eval_every", self.eval_every >= 0, ">= 0"),
            ("eval_images", self.eval_images >= 0, ">= 0"),
            ("crop", self.crop >= 0, ">= 0"),
            ("sparse", self.sparse >= 0, ">= 0 (0: patches)"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise UsageError(f"{name} must be {rule}, got {getattr(self, name)}", param=name)


def config_dict(config: TrainConfig) -> dict:
    """``config`` as the JSON-friendly dict a checkpoint stores (``pool`` a list, ``threat`` its
    description, :meth:`~lirpa_patch.threats.base.Threat.describe`)."""
    d = {f.name: getattr(config, f.name) for f in fields(config)}
    d["pool"] = list(config.pool)
    d["threat"] = None if config.threat is None else config.threat.describe()
    return d


def config_from_dict(values: dict, **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` from a checkpoint's ``config`` (unknown keys ignored), with ``overrides``."""
    names = {f.name for f in fields(TrainConfig)}
    kept = {k: v for k, v in values.items() if k in names}
    if "pool" in kept:
        kept["pool"] = tuple(kept["pool"])
    if kept.get("threat") is not None and not isinstance(kept["threat"], Threat):
        kept["threat"] = threat_from_description(kept["threat"])
    return replace(TrainConfig(**kept), **overrides)
