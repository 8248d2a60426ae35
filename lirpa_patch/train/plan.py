"""The policy of a training run: which images, which configuration and which architecture,
for a new run (:func:`plan_from_options`) or one continued from a checkpoint
(:func:`plan_from_checkpoint`).

A plan is decided in two steps, because the data decides part of it:

1. before any image is read, a :class:`TrainPlan`: the data selection (the arguments of
   :func:`~lirpa_patch.train.splits.train_val_split`) and the choices that wait for the
   data;
2. on the split data, :meth:`TrainPlan.resolve` gives a :class:`TrainSetup`: the
   :class:`~lirpa_patch.train.config.TrainConfig` (the preset follows the number of
   channels), the architecture (its classes follow the labels) and the ``meta`` a
   checkpoint keeps, from which :meth:`TrainSetup.trainer` builds the model and its
   :class:`~lirpa_patch.train.trainer.Trainer`.

A new run given ``epochs`` but neither ``warmup`` nor ``warmup_start`` scales the preset's
warm-up to the same fraction of its epochs (:func:`scaled_warmup`), so that a short run still
reaches full patch strength; :attr:`TrainSetup.warmup_scaled_from` says so.

A continued run takes everything from its checkpoint (data selection, configuration,
architecture, normalization) except what does not change its results: the number of
epochs, the chunk size and the device.

Example::

    from lirpa_patch.train import plan_from_options, train_val_split

    plan = plan_from_options({"data": "sample"}, architecture="cnn2", patch="2x2", epochs=30)
    setup = plan.resolve(train_val_split(**plan.selection))
    trainer = setup.trainer()
    trainer.fit()
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import torch

from ..errors import UsageError
from ..models.adapter import ImageModel
from ..models.architectures import DEFAULT_WIDTHS, build_architecture
from ..shapes import check_pixels
from .config import TrainConfig, config_from_dict
from .presets import PRESETS, preset_for, preset_normalization
from .splits import SELECTION_KEYS, TrainSplits, saved_selection
from .trainer import Trainer

RESUME_OVERRIDES: tuple[str, ...] = ("epochs", "chunk_size", "device")
"""The :class:`TrainConfig` fields a continued run may change: none of them changes its results
beyond training longer."""


class Warmup(NamedTuple):
    """A warm-up schedule: ``warmup_start`` natural epochs, then a ``warmup``-epoch ramp, in a run
    of ``epochs`` epochs."""

    warmup_start: int
    warmup: int
    epochs: int


def scaled_warmup(preset: Warmup, epochs: int) -> Warmup:
    """The warm-up of ``preset`` scaled to a run of ``epochs`` epochs (the same fraction of the run).

    Each part is rounded half up; a part the preset has keeps at least one epoch, and the
    natural epochs, then the ramp, shrink until the run ends with at least one epoch at full
    strength (a one-epoch run: full strength at once). A run at least as long as the
    preset's keeps its warm-up. The same ``(preset, epochs)`` always gives the same schedule.

    Example: the mnist preset's 1 + 61 of 100 epochs is 1 + 6 of 10, 0 + 1 of 2.
    """
    if epochs >= preset.epochs:
        return Warmup(preset.warmup_start, preset.warmup, epochs)
    start, ramp = (max(1 if part > 0 else 0, math.floor(part * epochs / preset.epochs + 0.5))
                   for part in (preset.warmup_start, preset.warmup))
    excess = max(0, start + ramp - (epochs - 1))
    start, excess = start - min(start, excess), excess - min(start, excess)
    return Warmup(start, ramp - excess, epochs)


@dataclass(frozen=True)
class TrainPlan:
    """A training run as decided before its data is read.

    Attributes:
        selection: the data selection, the keyword arguments of
            :func:`~lirpa_patch.train.splits.train_val_split` (every key of
            :data:`~lirpa_patch.train.splits.SELECTION_KEYS`; ``start`` and ``val_start``
            are integers).
        config: a new run: the :class:`TrainConfig` fields chosen (the preset's or the
            default values fill the rest); a continued run: those of
            :data:`RESUME_OVERRIDES` that replace the checkpoint's.
        checkpoint: the state to continue (:func:`~lirpa_patch.train.checkpoints.load_checkpoint`),
            or None for a new run.
        architecture: the name of the architecture of a new run (see
            :data:`~lirpa_patch.models.architectures.ARCHITECTURES`).
        width: its hidden units (mlp) or channel multiplier (CNNs); None: the
            architecture's default.
        preset: ``"auto"``, ``"mnist"`` or ``"cifar"`` (:mod:`.presets`).
        mean, std: the normalization in front of the network (both or neither); None:
            the preset's.
    """

    selection: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    checkpoint: Optional[dict] = None
    architecture: str = "mlp"
    width: Optional[int] = None
    preset: str = "auto"
    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None

    @property
    def resuming(self) -> bool:
        """Whether the run continues a checkpoint."""
        return self.checkpoint is not None

    def resolve(self, splits: TrainSplits) -> "TrainSetup":
        """The configuration and architecture of the run on ``splits`` (from :func:`train_val_split`).

        Raises:
            UsageError: a configuration value out of range (``param`` names the
                :class:`TrainConfig` field), an unknown preset (``param="preset"``) or a
                normalization that does not fit the images (``param="mean"``/``"std"``).
        """
        scaled_from: Optional[Warmup] = None
        if self.checkpoint is not None:  # its schedule as it was (never scaled again)
            config = config_from_dict(self.checkpoint["config"], **self.config)
            architecture = dict(self.checkpoint["meta"]["architecture"])
        else:
            channels = int(splits.train.images.shape[1])
            preset = preset_for(channels, self.preset)
            options, scaled_from = self._warmup(preset)
            config = TrainConfig.for_dataset(preset, **options)
            mean, std = preset_normalization(preset, channels, self.mean, self.std)
            architecture = {
                "name": self.architecture, "width": self.width, "in_channels": channels,
                "image_size": [int(v) for v in splits.train.images.shape[2:]],
                "num_classes": _num_classes(splits),
                "mean": list(mean) if mean else None, "std": list(std) if std else None,
            }
        config.validate()
        return TrainSetup(config, architecture, {"architecture": architecture, "data_selection": splits.selection},
                          splits, self.checkpoint, scaled_from)

    def _warmup(self, preset: str) -> tuple[dict[str, Any], Optional[Warmup]]:
        """The config options with the preset's warm-up scaled to ``epochs`` when only ``epochs`` is
        chosen (:func:`scaled_warmup`), and the preset's warm-up when it was scaled (else None)."""
        chosen = self.config
        if "epochs" not in chosen or "warmup" in chosen or "warmup_start" in chosen:
            return dict(chosen), None
        values = PRESETS[preset]
        original = Warmup(values["warmup_start"], values["warmup"], values["epochs"])
        scaled = scaled_warmup(original, chosen["epochs"])
        if (scaled.warmup_start, scaled.warmup) == (original.warmup_start, original.warmup):
            return dict(chosen), None
        return {**chosen, "warmup_start": scaled.warmup_start, "warmup": scaled.warmup}, original


@dataclass(frozen=True)
class TrainSetup:
    """A training run resolved on its data (:meth:`TrainPlan.resolve`).

    Attributes:
        config: the run's :class:`TrainConfig` (validated).
        architecture: the architecture as a checkpoint keeps it: ``name``, ``width`` (None:
            the default), ``in_channels``, ``image_size`` ``[H, W]``, ``num_classes`` ``K``,
            and the normalization ``mean``/``std`` (lists, or None).
        meta: what the checkpoint keeps beside the training state: the ``architecture``
            and the resolved ``data_selection``.
        splits: the training and validation images.
        checkpoint: the state to continue from, or None.
        warmup_scaled_from: the preset's warm-up when this run's was scaled to its
            ``epochs`` (:func:`scaled_warmup`), else None (given, the preset's, or a
            checkpoint's).
    """

    config: TrainConfig
    architecture: dict[str, Any]
    meta: dict[str, Any]
    splits: TrainSplits
    checkpoint: Optional[dict] = None
    warmup_scaled_from: Optional[Warmup] = None

    @property
    def width(self) -> int:
        """The architecture's width, its default filled in."""
        return self.architecture["width"] or DEFAULT_WIDTHS[self.architecture["name"]]

    def model(self) -> ImageModel:
        """A new model of :attr:`architecture`, initialised from ``config.seed``: it maps images
        ``(N, C, H, W)`` in ``[0, 1]`` to logits ``(N, K)``, the normalization in front."""
        arch = self.architecture
        torch.manual_seed(self.config.seed)
        net = build_architecture(arch["name"], arch["in_channels"], arch["image_size"], arch["num_classes"],
                                 width=arch["width"])
        return ImageModel(net, image_shape=(arch["in_channels"], *arch["image_size"]), mean=arch["mean"],
                          std=arch["std"])

    def trainer(self) -> Trainer:
        """The :class:`Trainer` of a new :meth:`model` on :attr:`splits`, restored from
        :attr:`checkpoint` when the run continues one.

        Raises:
            UsageError (``param="state"``): a checkpoint that does not fit the model or config.
        """
        splits = self.splits
        val = (splits.val.images, splits.val.labels) if splits.val is not None else (None, None)
        trainer = Trainer(self.model(), self.config, splits.train.images, splits.train.labels, *val,
                          num_classes=self.architecture["num_classes"], meta=self.meta)
        if self.checkpoint is not None:
            trainer.load_state_dict(self.checkpoint)
        return trainer


def plan_from_options(
    selection: Mapping[str, Any],
    *,
    architecture: str = "mlp",
    width: Optional[int] = None,
    preset: str = "auto",
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    **config: Any,
) -> TrainPlan:
    """The plan of a new run.

    Args:
        selection: the data selection (keys of :data:`~lirpa_patch.train.splits.SELECTION_KEYS`;
            missing or None: :func:`train_val_split`'s defaults).
        architecture, width, preset, mean, std: see :class:`TrainPlan`.
        config: :class:`TrainConfig` fields; a field given as None takes the preset's value
            (``epochs``, ``lr``, ...) or the default. ``epochs`` given without ``warmup`` and
            ``warmup_start`` scales the preset's warm-up to it (:func:`scaled_warmup`).

    Raises:
        UsageError: an unknown :class:`TrainConfig` field (``param`` names it), or a patch
            size no image can hold (``param="size"``).
    """
    names = {f.name for f in fields(TrainConfig)}
    for key in config:
        if key not in names:
            raise UsageError(f"TrainConfig has no field {key!r}", param=key)
    chosen = {key: value for key, value in config.items() if value is not None}
    if not chosen.get("sparse") and "patch" in chosen:
        check_pixels(chosen["patch"])  # a patch no image can hold fails before the data is read
    return TrainPlan(_selection({key: selection.get(key) for key in SELECTION_KEYS}), chosen,
                     architecture=architecture.lower(), width=width, preset=preset, mean=mean, std=std)


def plan_from_checkpoint(
    checkpoint: dict,
    *,
    epochs: Optional[int] = None,
    chunk_size: Optional[int] = None,
    device: str = "cpu",
) -> TrainPlan:
    """The plan of a run that continues ``checkpoint`` (from
    :func:`~lirpa_patch.train.checkpoints.load_checkpoint`): its data selection, configuration
    and architecture, with the :data:`RESUME_OVERRIDES` given here (None: the checkpoint's)."""
    overrides: dict[str, Any] = {"device": device}
    if epochs is not None:
        overrides["epochs"] = epochs
    if chunk_size is not None:
        overrides["chunk_size"] = chunk_size  # memory, not results
    saved = dict(checkpoint.get("meta", {}).get("data_selection", {}))
    return TrainPlan(_selection(saved_selection(saved)), overrides, checkpoint=checkpoint)


def _selection(selection: dict[str, Any]) -> dict[str, Any]:
    selection["start"] = selection["start"] or 0
    selection["val_start"] = selection["val_start"] or 0
    return selection


def _num_classes(splits: TrainSplits) -> int:
    """``K``: the number the data format fixes, else one more than the largest label (at least 2)."""
    if splits.num_classes is not None:
        return splits.num_classes
    labels = splits.train.labels if splits.val is None else torch.cat([splits.train.labels, splits.val.labels])
    return max(2, int(labels.max()) + 1)
