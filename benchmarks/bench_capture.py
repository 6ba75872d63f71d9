"""Capture throughput of the vLLM backend vs the same engine's plain prompt processing (no log-probs).

Measured side by side on one engine and the same prompts:
  1. a >= 100M-parameter Llama with an 8k vocabulary (random weights): capture tokens/s as a ratio to plain
     prompt processing, at k = 8, 64, 128;
  2. a tiny Llama (same vocabulary, negligible forward): overhead per token at k = 128, i.e.
     (capture wall time - plain wall time) / tokens, split into vLLM's part and our numpy decode.
Capture path measured: VLLMBackend.capture, i.e. `prompt_logprobs=k+1, flat_logprobs=True, detokenize=False` with the
in-engine tail column (vllm_tail.py: the complement log-sum-exp in each worker) + VLLMBackend.decode, against vLLM's
plain prompt processing.

    python benchmarks/bench_capture.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, out_dir

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


def run_model(model: Path, windows: list[Any], ks: list[int], reps: int) -> dict[str, Any]:
    """Plain prompt processing vs each capture path at each k, all on one engine and the same prompts."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from logitcache.pipeline.backends.vllm_backend import VLLMBackend

    length = max(len(w.input_ids) for w in windows)
    # "raw" installs the passthrough patch; it only acts on requests that ask for it, so "flat" runs unchanged.
    engine = VLLMBackend(str(model), dtype="float32", top_k=max(ks), max_model_len=length + 1, logprobs_path="raw")
    assert engine.logprobs_path == "raw", "the raw path is not available on this vLLM version"
    tokens = sum(len(w.input_ids) for w in windows)
    token_prompts = [TokensPrompt(prompt_token_ids=w.input_ids.tolist()) for w in windows]
    plain_params = SamplingParams(max_tokens=1, detokenize=False)
    try:
        plain = timed(lambda: engine.llm.generate(token_prompts, plain_params, use_tqdm=False), reps)
        out: dict[str, Any] = {"tokens": tokens, "plain_seconds": plain, "plain_tokens_per_second": tokens / plain}
        for path in ("flat", "raw"):
            engine.logprobs_path = path
            engine.params = engine._params(engine.top_k)
            for k in ks:
                capture = timed(lambda k=k: engine.capture(windows, top_k=k), reps)
                # Our share of the capture: decoding vLLM's output with numpy, and the tail mass.
                outputs = engine.llm.generate(token_prompts, engine._params(k), use_tqdm=False)
                t0 = time.perf_counter()
                for w, o in zip(windows, outputs):
                    engine.decode(o, w, k)
                decode = time.perf_counter() - t0
                out[f"{path}:k{k}"] = {
                    "capture_seconds": capture,
                    "capture_tokens_per_second": tokens / capture,
                    "ratio_to_plain": plain / capture,
                    "overhead_us_per_token": 1e6 * (capture - plain) / tokens,
                    "decode_us_per_token": 1e6 * decode / tokens,
                }
        return out
    finally:
        engine.close()


def engine_floor_us_per_token(vocab: int, k: int, positions: int = 4096) -> float:
    """The work any capture path does per position on this CPU: log-softmax, top-k, target gather, rank count.

    These are the ops vLLM's sampler runs for prompt log-probs (float32, [positions, vocab] logits), timed with
    torch alone, so the part of the measured overhead that no transfer path can remove is visible.
    """
    import torch

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(positions, vocab, generator=gen)
    target = torch.randint(0, vocab, (positions, 1), generator=gen)

    def ops() -> None:
        logp = torch.log_softmax(logits, dim=-1)
        logp.topk(k, dim=-1)
        t = logp.gather(-1, target)
        (logp > t).sum(-1)

    return 1e6 * timed(ops, 3) / positions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, k=8, one rep: only checks that it runs")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    work = out_dir("capture")
    # The machine may be shared: record its load so the numbers can be read in context.
    results: dict[str, Any] = {"loadavg_start": os.getloadavg()[0]}
    tiny = build_random_llama(work / "tiny-llama", hidden=64, layers=2, intermediate=128, head_dim=32)
    if args.quick:
        results["tiny"] = run_model(tiny, prompts(4, 32, 0), [8], reps=1)
    else:
        big = build_random_llama(work / "llama-106m", hidden=768, layers=14, intermediate=2048)
        results["big_params"] = n_params(big)
        results["big"] = run_model(big, prompts(8, 128, 0), [8, 64, 128], reps=2)
        results["tiny"] = run_model(tiny, prompts(64, 256, 1), [128], reps=3)
        import torch

        # vLLM's CPU worker runs one torch thread (it says so at start-up); time the floor the same way.
        torch.set_num_threads(1)
        results["engine_floor_us_per_token_k128"] = engine_floor_us_per_token(VOCAB, 128)

    rows = []
    for name, res in results.items():
        if not isinstance(res, dict) or "tokens" not in res:
            continue
        for key, r in res.items():
            if ":k" in key:
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
                        f"{r['decode_us_per_token']:.2f}",
                    ]
                )
    header = [
        "model",
        "path",
        "k",
        "tokens",
        "plain tok/s",
        "capture tok/s",
        "capture/plain",
        "overhead us/tok",
        "our decode us/tok",
    ]
    print(markdown_table(header, rows))
    if "engine_floor_us_per_token_k128" in results:
        floor = results["engine_floor_us_per_token_k128"]
        print(f"engine-side floor (log-softmax + top-128 + rank, V={VOCAB}, 1 thread): {floor:.1f} us/token")
    if "big_params" in results:
        print(f"\nbig model: {results['big_params'] / 1e6:.1f}M parameters, vocab {VOCAB}")
    results["loadavg_end"] = os.getloadavg()[0]
    print(f"load average (1 min) at start/end: {results['loadavg_start']:.1f} / {results['loadavg_end']:.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
