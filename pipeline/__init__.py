"""logitcache.pipeline: stage 1, the teacher runs once over a dataset and fills a cache (`logitcache cache-teacher`).

torch, transformers, vLLM and datasets are imported inside the functions that use them, so importing this package
(and `logitcache --help`) stays light.
"""

from typing import Any

# Lazy re-exports (PEP 562): `logitcache --help` imports pipeline.cli, which must not pull in pyarrow and friends.
_EXPORTS = {
    "BatchProgress": "capture",
    "CaptureResult": "capture",
    "run_capture": "capture",
    "CaptureConfig": "config",
    "BadRowError": "data",
    "DataSummary": "data",
    "TokenWindow": "data",
    "WindowSettings": "data",
    "iter_windows": "data",
    "load_rows": "data",
    "render_chat": "data",
    "DemoSpec": "demo_teacher",
    "build_demo": "demo_teacher",
    "ReplicaFailedError": "launch_ray",
    "launch_ray": "launch_ray",
    "compact_entries": "targets",
    "targets_from_logprobs": "targets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'logitcache.pipeline' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"logitcache.pipeline.{_EXPORTS[name]}"), name)
