"""Session fixtures shared by every test folder: a tiny locally built teacher and a finished cache made with it.

Both are real (no mocks): the teacher is `logitcache demo-teacher`'s builder at its quick size (2 layers, 64 dims,
head_dim 32, a 512-token byte-level BPE trained on stdlib source; seconds), the cache is an HF-backend capture of
its demo data. Tests must treat them as read-only (copy them with `shutil.copytree` to modify).
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.s3server import S3Server

TINY_TOP_K = 16
TINY_MAX_SEQ_LEN = 64
_bucket_numbers = itertools.count()


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


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real S3-protocol server (moto's server mode, a subprocess) for the session; skips when it cannot start."""
    from tests.s3server import start_s3_server

    server = start_s3_server()
    if isinstance(server, str):
        pytest.skip(f"no S3-protocol server for the object-storage tests: {server}")
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """A new empty bucket on `s3_server`, named for the test; the AWS variables point at the server (and are
    inherited by subprocesses), and TMPDIR is the test's own, so staged shards stay inside it."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_REGION", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # gettempdir() caches its answer per process
    bucket = f"t-{os.getpid()}-{next(_bucket_numbers)}"
    s3_server.client().create_bucket(Bucket=bucket)
    return bucket
