"""Synthetic caches for storage tests: exact softmax distributions from random logits (no ML stack needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from logitcache.storage import DEFAULT_CODEC, CachedSequence, TargetSpec
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


def _log_softmax(rng: np.random.Generator, positions: int, vocab: int) -> np.ndarray:
    """float64 [positions, vocab]: exact log-probs of random logits, some positions peaked, some flat."""
    scale = rng.choice([0.5, 2.0, 6.0], size=(positions, 1))
    logits = rng.standard_normal((positions, vocab)) * scale
    return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))


def _sequence(rng: np.random.Generator, sequence_id: int, lp: np.ndarray, **entries: Any) -> CachedSequence:
    """A CachedSequence over the exact log-probs `lp` [L-1, V] with the given entries (ids, log-probs, tail, ...)."""
    length = lp.shape[0] + 1
    ids = rng.integers(0, lp.shape[1], length)
    return CachedSequence(
        sequence_id=sequence_id,
        input_ids=ids.astype(np.int32),
        loss_mask=rng.random(length) < 0.8,
        next_token_logprobs=lp[np.arange(length - 1), ids[1:]].astype(np.float32),
        **entries,
    )


def make_adaptive_sequence(
    rng: np.random.Generator, sequence_id: int, length: int, vocab: int, k: int, top_p: float
) -> CachedSequence:
    """Adaptive entries: per position the smallest k whose head mass reaches top_p (at most `k`), padded to k."""
    lp = _log_softmax(rng, length - 1, vocab)
    order = np.argsort(-lp, axis=1)
    top = np.take_along_axis(lp, order, axis=1)
    mass = np.cumsum(np.exp(top), axis=1)
    kept = np.minimum(np.argmax(mass >= top_p, axis=1) + 1, k)  # smallest k reaching top_p, capped
    real = np.arange(k)[None, :] < kept[:, None]
    tail = 1.0 - np.where(real, np.exp(top[:, :k]), 0.0).sum(axis=1)
    return _sequence(
        rng,
        sequence_id,
        lp,
        entry_ids=np.where(real, order[:, :k], -1).astype(np.int32),
        entry_logprobs=np.where(real, top[:, :k], -np.inf).astype(np.float32),
        tail_mass=np.clip(tail, 0, 1).astype(np.float32),
    )


def make_sampled_sequence(
    rng: np.random.Generator, sequence_id: int, length: int, vocab: int, exact_top: int, samples: int
) -> CachedSequence:
    """Sampled entries: the exact top-r, then the unique ids of N draws from the renormalised rest, with counts;
    the tail is the residual (mass outside the top-r). Padded to r + N."""
    lp = _log_softmax(rng, length - 1, vocab)
    width = exact_top + samples
    ids = np.full((length - 1, width), -1, np.int32)
    lps = np.full((length - 1, width), -np.inf, np.float32)
    counts = np.zeros((length - 1, width), np.uint16)
    tail = np.zeros(length - 1)
    for t in range(length - 1):  # test data only: clarity over speed
        order = np.argsort(-lp[t])
        exact, rest = order[:exact_top], order[exact_top:]
        p_rest = np.exp(lp[t, rest])
        tail[t] = p_rest.sum()
        drawn, n = np.unique(rng.choice(rest, size=samples, p=p_rest / p_rest.sum()), return_counts=True)
        by_lp = np.argsort(-lp[t, drawn], kind="stable")
        row = np.concatenate([exact, drawn[by_lp]])
        ids[t, : len(row)] = row
        lps[t, : len(row)] = lp[t, row]
        counts[t, exact_top : len(row)] = n[by_lp]
    return _sequence(
        rng,
        sequence_id,
        lp,
        entry_ids=ids,
        entry_logprobs=lps,
        tail_mass=tail.astype(np.float32),
        sample_counts=counts,
        num_samples=samples,
    )


def make_mode_sequence(
    rng: np.random.Generator, sequence_id: int, length: int, vocab: int, spec: TargetSpec
) -> CachedSequence:
    """A synthetic sequence of the target mode `spec` (topk, adaptive or sampled)."""
    if spec.mode == "adaptive":
        return make_adaptive_sequence(rng, sequence_id, length, vocab, spec.top_k, spec.top_p)
    if spec.mode == "sampled":
        return make_sampled_sequence(rng, sequence_id, length, vocab, spec.exact_top, spec.samples)
    return make_sequence(rng, sequence_id, length, vocab, spec.top_k)


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


# One spec per target mode (sampled with and without an exact top): the modes the format tests write and read.
MODE_SPECS = {
    "topk": TargetSpec(mode="topk", top_k=8),
    "adaptive": TargetSpec(mode="adaptive", top_k=16, top_p=0.9),
    "sampled": TargetSpec(mode="sampled", exact_top=2, samples=12, seed=7),
    "sampled_r0": TargetSpec(mode="sampled", exact_top=0, samples=6, seed=1),
}


def mode_header(vocab: int, spec: TargetSpec, codec: str = DEFAULT_CODEC) -> dict[str, Any]:
    """A header for a cache of target mode `spec` (capture.top_k = M, capture.targets = the spec)."""
    return header(vocab, spec.max_entries, codec, targets=spec.to_header())
