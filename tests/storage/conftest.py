"""Synthetic caches for storage tests: exact softmax distributions from random logits (no ML stack needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from logitcache.storage import DEFAULT_CODEC, CachedSequence
from logitcache.storage import write_cache as _write_cache


def make_sequence(rng: np.random.Generator, sequence_id: int, length: int, vocab: int, k: int) -> CachedSequence:
    """A sequence whose top-k, target log-probs and tail mass come from an exact full-vocabulary softmax."""
    logits = rng.standard_normal((length - 1, vocab)) * 3.0
    lp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    order = np.argsort(-lp, axis=1)[:, :k]
    top = np.take_along_axis(lp, order, axis=1)
    ids = rng.integers(0, vocab, length)
    tail = np.exp(lp).sum(axis=1) - np.exp(top).sum(axis=1)
    return CachedSequence(
        sequence_id=sequence_id,
        input_ids=ids.astype(np.int32),
        loss_mask=rng.random(length) < 0.8,
        entry_ids=order.astype(np.int32),
        entry_logprobs=top.astype(np.float32),
        next_token_logprobs=lp[np.arange(length - 1), ids[1:]].astype(np.float32),
        tail_mass=np.clip(tail, 0, 1).astype(np.float32),
    )


def header(vocab: int, k: int, codec: str = DEFAULT_CODEC, **capture: Any) -> dict[str, Any]:
    return {
        "teacher": {"name": "synthetic", "dtype": "float32", "backend": "numpy"},
        "tokenizer": {"name": None, "fingerprint": "sha256:test", "vocab_size": vocab, "padded_vocab_size": vocab},
        "capture": {"top_k": k, "codec": codec, "max_seq_len": 64, **capture},
        "dataset": {"source": "synthetic"},
        "num_replicas": 1,
    }


def write_cache(
    path: Path, seqs: list[CachedSequence], vocab: int, k: int, codec: str = DEFAULT_CODEC, **writer: Any
) -> dict[str, Any]:
    return _write_cache(path, header(vocab, k, codec), seqs, **writer)


@pytest.fixture
def small_cache(tmp_path: Path) -> tuple[Path, list[CachedSequence]]:
    """A 3-shard cache of 60 sequences (V=300, k=8), several row groups per shard."""
    rng = np.random.default_rng(1)
    seqs = [make_sequence(rng, i * 7, int(rng.integers(2, 40)), 300, 8) for i in range(60)]
    path = tmp_path / "cache"
    write_cache(path, seqs, 300, 8, row_group_bytes=4_000, shard_size_bytes=12_000)
    return path, seqs
