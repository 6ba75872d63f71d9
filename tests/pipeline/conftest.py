"""Pipeline tests run torch single-threaded: on a shared 2-core machine, spinning OpenMP threads cost 10x."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest


@contextmanager
def vllm_backend(teacher_dir: Path, max_seq_len: int, **kwargs: Any) -> Iterator[Any]:
    """A float32 VLLMBackend on `teacher_dir` for windows of up to `max_seq_len` tokens, closed afterwards."""
    from logitcache.pipeline.backends.vllm_backend import VLLMBackend

    backend = VLLMBackend(str(teacher_dir), dtype="float32", max_model_len=max_seq_len + 1, **kwargs)
    try:
        yield backend
    finally:
        backend.close()


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread() -> Iterator[None]:
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
