"""Certified training against patches (paper §4.2, App. A.1-A.3).

* :class:`Trainer` / :class:`TrainConfig`: the training loop around any ``nn.Module``
  (:mod:`.trainer`).
* strategies ``all``, ``random``, ``guided``, ``pool`` (:mod:`.strategies`); the guided
  U-net (:mod:`.unet`); warm-up and learning-rate schedules (:mod:`.schedules`).
* :func:`export_onnx`: ONNX export with the normalization folded in, checked with
  onnxruntime (:mod:`.export`).
"""

from __future__ import annotations

from .export import export_onnx, exportable_module
from .schedules import StepDecay, WarmupSchedule
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
from .trainer import (
    EpochMetrics,
    MetricsLog,
    TrainConfig,
    Trainer,
    TrainEvent,
    config_from_dict,
    load_checkpoint,
    margin_logits,
)
from .unet import MarginUNet

__all__ = [
    "STRATEGY_NAMES",
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
    "Trainer",
    "WarmupSchedule",
    "config_from_dict",
    "export_onnx",
    "exportable_module",
    "load_checkpoint",
    "make_strategy",
    "margin_logits",
]
