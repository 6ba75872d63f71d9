"""Teacher engines behind one interface: token windows in, `CachedSequence`s (entries, next token, tail) out."""

from __future__ import annotations

from typing import Protocol

from logitcache.pipeline.data import TokenWindow
from logitcache.storage import CachedSequence
from logitcache.storage.targets import TargetSpec

__all__ = ["TeacherBackend"]


class TeacherBackend(Protocol):
    """What capture.py needs from an engine; `hf.HFBackend` and `vllm_backend.VLLMBackend` implement it."""

    name: str  # the --backend value
    targets: TargetSpec  # what each position stores
    top_k: int  # M = targets.max_entries: the width of every stored position

    def capture(self, windows: list[TokenWindow]) -> list[CachedSequence]:
        """Teacher distributions for each window, in the same order (T=1, full-vocabulary normalisation)."""
        ...

    def close(self) -> None:
        """Release the engine (processes, memory)."""
        ...
