"""Certified training against patches (paper §4.2, App. A.1-A.3).

* :class:`Trainer`: the training loop around any ``nn.Module`` (:mod:`.trainer`);
  :class:`TrainConfig`, what defines a run (:mod:`.config`); :class:`EpochMetrics` and
  :class:`MetricsLog`, what it reports (:mod:`.metrics`); :func:`load_checkpoint`
  (:mod:`.checkpoints`).
* strategies ``all``, ``random``, ``guided``, ``pool`` (:mod:`.strategies`); the guided
  U-net (:mod:`.unet`); warm-up and learning-rate schedules (:mod:`.schedules`).
* :func:`export_onnx`: ONNX export with the normalization folded in, checked with
  onnxruntime (:mod:`.export`).
* :func:`plan_from_options` / :func:`plan_from_checkpoint`: the policy of a run (its data
  selection, configuration and architecture; :mod:`.plan`).
* :func:`train_val_split`: which images train and which validate (:mod:`.splits`);
  the App. A.1 presets and CIFAR-10 normalization (:mod:`.presets`).
"""

from __future__ import annotations

from .export import export_onnx, exportable_module
from .presets import CIFAR10_MEAN, CIFAR10_STD, PRESETS, preset_for, preset_normalization
from .schedules import StepDecay, WarmupSchedule
from .splits import SAMPLE_TRAIN, TrainSplits, saved_selection, train_val_split
from .strategies import (
    STRATEGY_NAMES,
    AllLocations,
    BoundContext,
    GuidedLocations,
    Margins,
    PooledLocations,
    RandomLocations,
    Strategy,
    make_strategy,
)
from .checkpoints import load_checkpoint
from .config import TrainConfig, config_from_dict
from .metrics import EpochMetrics, MetricsLog, TrainEvent
from .plan import TrainPlan, TrainSetup, plan_from_checkpoint, plan_from_options
from .trainer import Trainer, margin_logits
from .unet import MarginUNet

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "PRESETS",
    "SAMPLE_TRAIN",
    "STRATEGY_NAMES",
    "TrainSplits",
    "AllLocations",
    "BoundContext",
    "EpochMetrics",
    "GuidedLocations",
    "Margins",
    "MarginUNet",
    "MetricsLog",
    "PooledLocations",
    "RandomLocations",
    "StepDecay",
    "Strategy",
    "TrainConfig",
    "TrainEvent",
    "TrainPlan",
    "TrainSetup",
    "Trainer",
    "WarmupSchedule",
    "config_from_dict",
    "export_onnx",
    "exportable_module",
    "load_checkpoint",
    "make_strategy",
    "margin_logits",
    "plan_from_checkpoint",
    "plan_from_options",
    "preset_for",
    "preset_normalization",
    "saved_selection",
    "train_val_split",
]
