"""Capture throughput of the vLLM backend per target mode vs the same engine's plain prompt processing.

Measured side by side on one engine and the same prompts:
  1. a >= 100M-parameter Llama with an 8k vocabulary (random weights): capture tokens/s as a ratio to plain
     prompt processing;
  2. a tiny Llama (same vocabulary, negligible forward): overhead per token, i.e.
     (capture wall time - plain wall time) / tokens, and the part of it that is our decode in the frontend.
Paths (rows), all at k = 128 (M = 16 / 48 for the sampled rows):
  flat          the portable fallback: vLLM's own top-k prompt log-probs (`prompt_logprobs=k, flat_logprobs=True,
                detokenize=False`), vLLM's Python lists decoded with numpy, tail = 1 - sum(head).
  engine-<mode> in-engine targets (vllm_targets.py: pipeline.targets.targets_from_logprobs in the worker, entries +
                exact tail column), through the raw frontend passthrough (vllm_raw.py), or `/flat` through vLLM's
                lists; decode = numpy reshape + compact_entries.

    python benchmarks/bench_capture.py [--quick] [--models big,tiny] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, out_dir

from logitcache.storage import TargetSpec

VOCAB = 8192


def build_random_llama(path: Path, *, hidden: int, layers: int, intermediate: int, head_dim: int = 64) -> Path:
    """A Llama with random weights (float32 safetensors) plus the demo tokenizer; reused when present."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (path / "config.json").exists():
        return path
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // head_dim,
        num_key_value_heads=hidden // head_dim,
        head_dim=head_dim,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).float().save_pretrained(path)
    # vLLM wants a tokenizer dir even for token-id prompts; a word-level one with the full id range suffices.
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(path)
    return path


def n_params(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "np") as st:
            total += sum(int(np.prod(st.get_slice(k).get_shape())) for k in st.keys())  # noqa: SIM118
    return total


def prompts(num: int, length: int, seed: int) -> list[Any]:
    from logitcache.pipeline.data import TokenWindow

    rng = np.random.default_rng(seed)
    return [
        TokenWindow(i, i, rng.integers(0, VOCAB, length).astype(np.int32), np.ones(length, bool)) for i in range(num)
    ]


def timed(fn: Any, reps: int) -> float:
    """Median wall seconds of `reps` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass(frozen=True)
class Row:
    """One capture path: how the engine is asked (in-engine or vLLM's own top-k), the transport, the targets."""

    name: str
    in_engine: bool
    transport: str  # "flat" or "raw"
    targets: TargetSpec


def rows_for(k: int, quick: bool) -> list[Row]:
    """The measured paths at top-k width k: the flat baseline and each in-engine mode."""
    topk = TargetSpec(mode="topk", top_k=k)
    rows = [
        Row("flat", False, "flat", topk),
        Row("engine-topk", True, "raw", topk),
        Row("engine-adaptive p=0.99", True, "raw", TargetSpec(mode="adaptive", top_k=k, top_p=0.99)),
        Row("engine-sampled r=4 N=12", True, "raw", TargetSpec(mode="sampled", exact_top=4, samples=min(12, k - 4))),
    ]
    if not quick:
        rows += [
            Row("engine-topk/flat", True, "flat", topk),
            Row("engine-sampled r=0 N=48", True, "raw", TargetSpec(mode="sampled", exact_top=0, samples=48)),
        ]
    return rows


@contextmanager
def configured(engine: Any, row: Row) -> Iterator[None]:
    """Point the engine at one row's path (in-engine or not, transport) for the duration of the block."""
    from logitcache.pipeline.backends.vllm_tail import ENGINE_TAIL, HEAD_SUM_TAIL

    saved = engine.tail_method, engine.logprobs_path
    engine.tail_method = ENGINE_TAIL if row.in_engine else HEAD_SUM_TAIL
    engine.logprobs_path = row.transport
    try:
        yield
    finally:
        engine.tail_method, engine.logprobs_path = saved


def start_engine(model: Path, windows: list[Any], k: int) -> Any:
    """One engine for every row: in-engine targets up to k entries, the raw passthrough installed."""
    from logitcache.pipeline.backends.vllm_backend import VLLMBackend
    from logitcache.pipeline.backends.vllm_tail import ENGINE_TAIL

    length = max(len(w.input_ids) for w in windows)
    # "raw" installs the passthrough patch; it only acts on requests that ask for it, so "flat" runs unchanged.
    engine = VLLMBackend(
        str(model), dtype="float32", targets=TargetSpec(top_k=k), max_model_len=length + 1, logprobs_path="raw"
    )
    assert engine.logprobs_path == "raw", "the raw path is not available on this vLLM version"
    assert engine.tail_method == ENGINE_TAIL, "the in-engine targets are not available on this vLLM version"
    return engine


def time_plain(engine: Any, windows: list[Any], reps: int) -> float:
    """Median seconds of the engine's plain prompt processing (no log-probs) of the windows."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    token_prompts = [TokensPrompt(prompt_token_ids=w.input_ids.tolist()) for w in windows]
    plain_params = SamplingParams(max_tokens=1, detokenize=False)
    return timed(lambda: engine.llm.generate(token_prompts, plain_params, use_tqdm=False), reps)


def time_row(engine: Any, windows: list[Any], row: Row, plain: float, reps: int) -> dict[str, float]:
    """One path: capture wall time, its ratio to plain, overhead per token, and our frontend decode's share."""
    from vllm.inputs import TokensPrompt

    tokens = sum(len(w.input_ids) for w in windows)
    with configured(engine, row):
        capture = timed(lambda: engine.capture(windows, targets=row.targets), reps)
        prompts = [TokensPrompt(prompt_token_ids=w.input_ids.tolist()) for w in windows]
        params = [engine._params(row.targets, w.sequence_id) for w in windows]
        outputs = engine.llm.generate(prompts, params, use_tqdm=False)
        t0 = time.perf_counter()
        for w, o in zip(windows, outputs):
            engine.decode(o, w, row.targets)
        decode = time.perf_counter() - t0
    return {
        "capture_seconds": capture,
        "capture_tokens_per_second": tokens / capture,
        "ratio_to_plain": plain / capture,
        "overhead_us_per_token": 1e6 * (capture - plain) / tokens,
        "decode_us_per_token": 1e6 * decode / tokens,
    }


def run_model(model: Path, windows: list[Any], k: int, reps: int, quick: bool) -> dict[str, Any]:
    """Plain prompt processing vs each path, all on one engine and the same prompts."""
    engine = start_engine(model, windows, k)
    try:
        plain = time_plain(engine, windows, reps)
        tokens = sum(len(w.input_ids) for w in windows)
        out: dict[str, Any] = {"tokens": tokens, "plain_seconds": plain, "plain_tokens_per_second": tokens / plain}
        for row in rows_for(k, quick):
            out[f"{row.name}:k{k}"] = time_row(engine, windows, row, plain, reps)
        return out
    finally:
        engine.close()


def engine_floors_us_per_token(vocab: int, k: int, positions: int = 4096) -> dict[str, float]:
    """The engine-side work per position of each path on this CPU, timed with torch alone (float32 [positions, V]).

    "flat": what vLLM's sampler runs for its own prompt log-probs (log-softmax, top-k, target gather, rank count);
    each in-engine row: log-softmax, target gather and `targets_from_logprobs` (vllm_targets._gather_targets' work).
    The part of the measured overhead that no transfer path can remove.
    """
    import torch

    from logitcache.pipeline.targets import targets_from_logprobs

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(positions, vocab, generator=gen)
    target = torch.randint(0, vocab, (positions, 1), generator=gen)
    rows = torch.arange(positions)

    def vllm_ops() -> None:
        logp = torch.log_softmax(logits, dim=-1)
        logp.topk(k, dim=-1)
        t = logp.gather(-1, target)
        (logp > t).sum(-1)

    def engine_ops(spec: Any) -> None:
        logp = torch.log_softmax(logits, dim=-1)
        logp.gather(-1, target)
        targets_from_logprobs(logp, spec, 0, rows, inplace=True)

    floors = {"flat": 1e6 * timed(vllm_ops, 3) / positions}
    for row in rows_for(k, quick=False):
        if row.in_engine and row.transport == "raw":
            floors[row.name] = 1e6 * timed(lambda spec=row.targets: engine_ops(spec), 3) / positions
    return floors


def measure(quick: bool, models: list[str]) -> dict[str, Any]:
    """Every model's rows, the engine-side floors, and the machine's load before and after."""
    work = out_dir("capture")
    # The machine may be shared: record its load so the numbers can be read in context.
    results: dict[str, Any] = {"loadavg_start": os.getloadavg()[0]}
    tiny = build_random_llama(work / "tiny-llama", hidden=64, layers=2, intermediate=128, head_dim=32)
    if quick:
        results["tiny"] = run_model(tiny, prompts(4, 32, 0), 8, reps=1, quick=True)
    else:
        if "big" in models:
            big = build_random_llama(work / "llama-106m", hidden=768, layers=14, intermediate=2048)
            results["big_params"] = n_params(big)
            results["big"] = run_model(big, prompts(8, 128, 0), 128, reps=2, quick=False)
        if "tiny" in models:
            results["tiny"] = run_model(tiny, prompts(64, 256, 1), 128, reps=3, quick=False)
        import torch

        # vLLM's CPU worker runs one torch thread (it says so at start-up); time the floor the same way.
        torch.set_num_threads(1)
        results["engine_floors_us_per_token"] = engine_floors_us_per_token(VOCAB, 128)
    results["loadavg_end"] = os.getloadavg()[0]
    return results


def table_rows(results: dict[str, Any]) -> list[list[Any]]:
    """One table row per (model, path), with each in-engine path's overhead as a share of the flat path's."""
    rows = []
    for name, res in results.items():
        if not isinstance(res, dict) or "tokens" not in res:
            continue
        flat = next(r["overhead_us_per_token"] for key, r in res.items() if key.startswith("flat:"))
        for key, r in res.items():
            if ":k" not in key:
                continue
            path, k = key.split(":k")
            rows.append(
                [
                    name,
                    path,
                    k,
                    res["tokens"],
                    f"{res['plain_tokens_per_second']:,.0f}",
                    f"{r['capture_tokens_per_second']:,.0f}",
                    f"{r['ratio_to_plain']:.3f}",
                    f"{r['overhead_us_per_token']:.1f}",
                    f"{r['overhead_us_per_token'] / flat:.2f}",
                    f"{r['decode_us_per_token']:.2f}",
                ]
            )
    return rows


def report(results: dict[str, Any]) -> None:
    header = [
        "model",
        "path",
        "k",
        "tokens",
        "plain tok/s",
        "capture tok/s",
        "capture/plain",
        "overhead us/tok",
        "overhead / flat's",
        "our decode us/tok",
    ]
    print(markdown_table(header, table_rows(results)))
    for path, floor in results.get("engine_floors_us_per_token", {}).items():
        print(f"engine-side floor of {path} (torch alone, V={VOCAB}, 1 thread): {floor:.1f} us/token")
    if "big_params" in results:
        print(f"\nbig model: {results['big_params'] / 1e6:.1f}M parameters, vocab {VOCAB}")
    print(f"load average (1 min) at start/end: {results['loadavg_start']:.1f} / {results['loadavg_end']:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, k=8, one rep: only checks that it runs")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--models", default="big,tiny", help="comma-separated, of big,tiny (tiny alone: ~5 minutes on 2 cores)"
    )
    args = parser.parse_args()
    results = measure(args.quick, args.models.split(","))
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
