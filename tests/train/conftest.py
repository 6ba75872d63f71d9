"""Synthetic caches for train tests: a random bigram "teacher" with exact softmax distributions, a word-level
tokenizer for it, written through the real ShardWriter + finalize_cache (storage.write_cache)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from logitcache.storage import CachedSequence, tokenizer_fingerprint, write_cache
from logitcache.storage.targets import TargetSpec


def make_tokenizer_dir(path: Path, vocab: int, prefix: str = "w") -> str:
    """A word-level HF tokenizer with `vocab` tokens saved in `path`; returns its fingerprint."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, **{f"{prefix}{i}": i for i in range(1, vocab)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<unk>")
    fast.save_pretrained(path)
    return tokenizer_fingerprint(fast.backend_tokenizer.to_str())


def bigram_teacher(vocab: int, seed: int = 0, sharpness: float = 3.0) -> np.ndarray:
    """float64 [V, V] log-probs of the next token given the current one."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((vocab, vocab)) * sharpness
    return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))


def sample_sequence(
    rng: np.random.Generator,
    teacher: np.ndarray,
    sequence_id: int,
    length: int,
    k: int,
    mask_prompt: int = 0,
    targets: TargetSpec | None = None,
) -> CachedSequence:
    """A sequence sampled from the bigram teacher, with its exact top-k (or, for a sampled `targets`, its
    `sample_entries`), next-token log-probs and tail mass."""
    vocab = teacher.shape[0]
    ids = np.empty(length, dtype=np.int64)
    ids[0] = rng.integers(1, vocab)
    for t in range(1, length):
        ids[t] = rng.choice(vocab, p=np.exp(teacher[ids[t - 1]]))
    lp = teacher[ids[:-1]]  # [L-1, V]
    order = np.argsort(-lp, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(lp, order, axis=1)
    loss_mask = np.ones(length, dtype=bool)
    loss_mask[: mask_prompt + 1] = False
    seq = CachedSequence(
        sequence_id=sequence_id,
        input_ids=ids.astype(np.int32),
        loss_mask=loss_mask,
        entry_ids=order.astype(np.int32),
        entry_logprobs=top.astype(np.float32),
        next_token_logprobs=lp[np.arange(length - 1), ids[1:]].astype(np.float32),
        tail_mass=np.clip(1.0 - np.exp(top).sum(axis=1), 0.0, 1.0).astype(np.float32),
    )
    if targets is not None and targets.mode == "sampled":
        seq.entry_ids, seq.entry_logprobs, seq.sample_counts, seq.tail_mass = sample_entries(
            rng, lp, targets.exact_top, targets.samples
        )
        seq.num_samples = targets.samples
    return seq


def sample_entries(
    rng: np.random.Generator, logprobs: np.ndarray, exact_top: int, samples: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sampled targets of P teacher distributions (float64 log-probs [P, V]) by plain numpy, as FORMAT.md defines
    them: the exact top-r, then N draws with replacement from the rest renormalised, kept as unique ids with counts.

    Returns entry_ids int32 [P, M] (M = r + N; sorted by log-prob, descending; -1 padding), entry_logprobs float32
    [P, M] (-inf padding), sample_counts uint16 [P, M] (0 for exact entries and padding), tail_mass float32 [P] (the
    residual mass the draws stand for).
    """
    num, vocab = logprobs.shape
    exact = np.argsort(-logprobs, axis=1, kind="stable")[:, :exact_top]
    rest = np.exp(logprobs)
    np.put_along_axis(rest, exact, 0.0, axis=1)
    residual = rest.sum(axis=1)
    cdf = np.cumsum(rest, axis=1)
    u = rng.random((num, samples)) * cdf[:, -1:]
    draws = (cdf[:, None, :] <= u[:, :, None]).sum(axis=-1)  # inverse CDF: zero-probability ids are never drawn
    counts = np.zeros((num, vocab), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(num), samples), draws.reshape(-1)), 1)
    counts[residual <= 0] = 0
    keep = counts > 0
    np.put_along_axis(keep, exact, True, axis=1)
    width = exact_top + samples
    order = np.argsort(-np.where(keep, logprobs, -np.inf), axis=1, kind="stable")[:, :width]
    valid = np.take_along_axis(keep, order, axis=1)
    return (
        np.where(valid, order, -1).astype(np.int32),
        np.where(valid, np.take_along_axis(logprobs, order, axis=1), -np.inf).astype(np.float32),
        np.where(valid, np.take_along_axis(counts, order, axis=1), 0).astype(np.uint16),
        residual.astype(np.float32),
    )


def write_synthetic_cache(
    path: Path,
    *,
    num_sequences: int = 64,
    vocab: int = 96,
    padded_vocab: int | None = None,
    k: int = 8,
    seed: int = 0,
    min_len: int = 6,
    max_len: int = 24,
    codec: str = "f32",
    tokenizer_dir: Path | None = None,
    targets: TargetSpec | None = None,
    **writer: Any,
) -> Path:
    """A finished cache of bigram-teacher sequences (and its tokenizer, in path/../tokenizer by default); top-k
    targets, or those of `targets` (a sampled spec: numpy `sample_entries`, M = r + N entries)."""
    tok_dir = tokenizer_dir or path.parent / f"{path.name}-tokenizer"
    fingerprint = make_tokenizer_dir(tok_dir, vocab)
    teacher = bigram_teacher(vocab, seed)
    rng = np.random.default_rng(seed + 1)
    header = {
        "teacher": {"name": "bigram", "dtype": "float64", "backend": "numpy"},
        "tokenizer": {
            "name": str(tok_dir),
            "fingerprint": fingerprint,
            "vocab_size": vocab,
            "padded_vocab_size": padded_vocab or vocab,
        },
        "capture": {"top_k": k, "codec": codec, "max_seq_len": max_len},
        "dataset": {"source": "synthetic-bigram"},
        "num_replicas": 1,
    }
    if targets is not None:
        k = targets.max_entries
        header["capture"] = {**header["capture"], "top_k": k, "targets": targets.to_header()}
    writer.setdefault("row_group_bytes", 4_000)
    seqs = (
        sample_sequence(
            rng, teacher, (i * 3 + 1) << 16, int(rng.integers(min_len, max_len + 1)), k, i % 3, targets=targets
        )
        for i in range(num_sequences)
    )
    write_cache(path, header, seqs, **writer)
    return path


@pytest.fixture(scope="session")
def synth_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 bigram sequences, V=96, k=8, several row groups."""
    return write_synthetic_cache(tmp_path_factory.mktemp("synth") / "cache")


SAMPLED_SPEC = TargetSpec(mode="sampled", exact_top=2, samples=6, seed=3)


@pytest.fixture(scope="session")
def sampled_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """synth_cache's teacher and sequences with sampled targets: exact top-2 plus 6 draws (M = 8), V=96."""
    return write_synthetic_cache(tmp_path_factory.mktemp("sampled") / "cache", targets=SAMPLED_SPEC)


@pytest.fixture(scope="session", autouse=True)
def _one_thread_per_process() -> None:
    """Tiny models: one intra-op thread per process (also for the CLI subprocesses). On a shared 2-core CI box,
    OpenMP's spinning threads otherwise make each small op ~100x slower under contention."""
    import os

    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
