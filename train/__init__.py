"""logitcache.train: distill a student from a teacher-logit cache (Stage 2).

Importing the package loads only the config (no torch); the torch-based modules load on first use of their names.
"""

from __future__ import annotations

import importlib
from typing import Any

from logitcache.train.config import ConfigError, EvalSettings, KDSettings, TrainConfig

__all__ = [
    "ConfigError",
    "KDSettings",
    "EvalSettings",
    "TrainConfig",
    "train",
    "evaluate",
    "CacheStream",
    "collate",
    "TeacherTargets",
    "distillation_loss",
    "chunked_distillation_loss",
    "fused_distillation_loss",
    "kd_loss_per_position",
    "build_student",
    "DistillModel",
    "plot_metrics",
]

_LAZY = {
    "train": "logitcache.train.loop",
    "evaluate": "logitcache.train.evaluate",
    "CacheStream": "logitcache.train.data",
    "collate": "logitcache.train.data",
    "TeacherTargets": "logitcache.train.losses",
    "distillation_loss": "logitcache.train.losses",
    "chunked_distillation_loss": "logitcache.train.losses",
    "fused_distillation_loss": "logitcache.train.fused",
    "kd_loss_per_position": "logitcache.train.losses",
    "build_student": "logitcache.train.student",
    "DistillModel": "logitcache.train.student",
    "plot_metrics": "logitcache.train.plot",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'logitcache.train' has no attribute {name!r}")
