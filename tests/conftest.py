"""Session fixtures shared by every test folder: a tiny locally built teacher and a finished cache made with it.

Both are real (no mocks): the teacher is `logitcache demo-teacher`'s builder at its quick size (2 layers, 64 dims,
head_dim 32, a 512-token byte-level BPE trained on stdlib source; seconds), the cache is an HF-backend capture of
its demo data. Tests must treat them as read-only (copy them with `shutil.copytree` to modify).
"""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_TOP_K = 16
TINY_MAX_SEQ_LEN = 64


@pytest.fixture(scope="session")
def tiny_demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a quick demo build: teacher/ plus data/{train,chat,heldout,chat_heldout}.jsonl."""
    from logitcache.pipeline.demo_teacher import DemoSpec, build_demo

    return build_demo(tmp_path_factory.mktemp("tiny_demo"), DemoSpec.quick())


@pytest.fixture(scope="session")
def tiny_teacher_dir(tiny_demo_dir: Path) -> Path:
    """HF model dir of a tiny Llama teacher (float32 safetensors, fast tokenizer with a chat template)."""
    return tiny_demo_dir / "teacher"


def _capture(teacher: Path, dataset: Path, out: Path, **kwargs: object) -> Path:
    from logitcache.pipeline.capture import run_capture
    from logitcache.pipeline.config import CaptureConfig

    cfg = CaptureConfig(
        teacher=str(teacher),
        dataset=str(dataset),
        output=str(out),
        backend="hf",
        top_k=TINY_TOP_K,
        max_seq_len=TINY_MAX_SEQ_LEN,
        progress=False,
        **kwargs,  # type: ignore[arg-type]
    )
    import torch

    # One thread: these fixtures run while other tests (and processes) share a couple of cores.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_capture(cfg)
    finally:
        torch.set_num_threads(old)
    assert result.status == "finished", result
    return out


@pytest.fixture(scope="session")
def tiny_cache_dir(tiny_demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished cache of 8 plain-text demo rows, k=16, <= 64-token windows, a few shards of several row groups."""
    out = tmp_path_factory.mktemp("tiny_cache") / "cache"
    return _capture(
        tiny_demo_dir / "teacher", tiny_demo_dir / "data" / "train.jsonl", out, limit=8, shard_size_bytes=48_000
    )


@pytest.fixture(scope="session")
def tiny_chat_cache_dir(tiny_demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished cache of 6 demo chat rows (loss mask True on assistant tokens only), k=16, <= 64-token windows."""
    out = tmp_path_factory.mktemp("tiny_chat_cache") / "cache"
    return _capture(
        tiny_demo_dir / "teacher", tiny_demo_dir / "data" / "chat.jsonl", out, limit=6, messages_field="messages"
    )
