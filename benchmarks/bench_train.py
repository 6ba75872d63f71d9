"""Stage 2 costs, side by side in one script: a KD-from-cache step vs a CE-only step of the same student, and the
cache loader's throughput.

What is measured (CPU unless a GPU is present):
- step time: median wall time of an optimizer step (forward, backward, AdamW) after warm-up steps, same batches.
- peak memory: each variant runs in a fresh subprocess; on CPU the figure is the growth of the process's peak RSS
  (ru_maxrss) over its RSS just before the first step, i.e. what the step adds on top of the model and optimizer
  being resident (activations, logits, gradients, optimizer state once allocated). On CUDA it is
  torch.cuda.max_memory_allocated() minus the allocation before the first step.
- variants (VARIANTS): "ce_hf" = the usual HF step, model(input_ids, labels=...) (full [B, L, V] logits, CE in
  float32); "ce_fused" = CE only (alpha=0) through this package's fused loss; "kd_fused" = this package's default
  step (alpha=0.5 forward KL on the bucketed support + CE, train/fused.py); "kd_reference" = the same loss through the
  reference implementation (autograd, logits chunked by --kd-chunk-size positions and recomputed in backward).
- malloc: every variant runs with glibc's default malloc and "tuned" (train/cpu_malloc.py: no mmap, no trimming, what
  train-student does on CPU); system time and minor page faults per step are reported next to the step time.
- vocabularies: --vocabs (default 32,768 and 128,256), one synthetic k=64 cache each.
- loader: CacheStream over a synthetic k=64 cache (ShardWriter, default codec) and its k=128 twin, one process, no
  workers, batches collated to tensors; tokens per second of wall time and per CPU-second (process time, i.e. per
  core). Padding share (padded tokens / all tokens of one epoch's batches) with and without --pack, at 8 sequences
  and at 4096 tokens per batch, on the caches with real lengths that exist here: `make demo`'s demo_out/cache and
  bench_targets.py's cache (the synthetic caches' sequences all have one length: no padding).

Usage: python benchmarks/bench_train.py [--quick] [--json FILE] [--vocabs 32768,128256] [--mallocs default,tuned]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BENCH_OUT, ROOT, markdown_table, out_dir

# Caches with real sequence lengths (documents cut into windows) for the padding share, when they have been built.
PADDING_CACHES = {"demo": ROOT / "demo_out" / "cache", "bench_targets": BENCH_OUT / "targets" / "cache-trained"}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def write_cache(path: Path, *, vocab: int, k: int, num_sequences: int, seq_len: int, seed: int = 0) -> Path:
    """A synthetic finished cache: random sorted top-k log-probs over distinct ids, exact tail mass."""
    import numpy as np

    from logitcache.storage import CachedSequence, CacheLayout
    from logitcache.storage import write_cache as write_finished_cache

    if CacheLayout(path).manifest.exists():
        return path
    rng = np.random.default_rng(seed)
    header = {
        "teacher": {"name": "synthetic", "dtype": "float32", "backend": "numpy"},
        "tokenizer": {"name": None, "fingerprint": "sha256:synthetic", "vocab_size": vocab, "padded_vocab_size": vocab},
        "capture": {"top_k": k, "codec": "lpq16:fine=1/512x4,coarse=1/32", "max_seq_len": seq_len},
        "dataset": {"source": "synthetic"},
        "num_replicas": 1,
    }

    def sequence(i: int) -> CachedSequence:
        n = seq_len
        p = n - 1
        raw = np.sort(rng.exponential(1.0, (p, k + 1)) * np.linspace(0.5, 6, k + 1), axis=1)
        lp = -np.cumsum(raw, axis=1)
        probs = np.exp(lp)
        probs /= probs.sum(axis=1, keepdims=True) * 1.05  # 1/1.05 of the mass lives outside the head
        lp = np.log(probs[:, :k])
        ids = (rng.integers(0, vocab, (p, 1)) + np.arange(k) * 7919) % vocab
        tokens = rng.integers(0, vocab, n)
        return CachedSequence(
            sequence_id=i,
            input_ids=tokens.astype(np.int32),
            loss_mask=np.ones(n, dtype=bool),
            entry_ids=ids.astype(np.int32),
            entry_logprobs=lp.astype(np.float32),
            next_token_logprobs=np.full(p, -5.0, dtype=np.float32),
            tail_mass=(1 - np.exp(lp).sum(axis=1)).astype(np.float32),
        )

    write_finished_cache(path, header, (sequence(i) for i in range(num_sequences)))
    return path


# name -> (alpha, fused): the four steps compared side by side. alpha=0.5 mixes KD with CE, as users train.
VARIANTS = {
    "ce_hf": (None, None),  # model(input_ids, labels=...): HF's own CE step, the baseline
    "ce_fused": (0.0, True),  # CE only, through the fused loss (alpha=0)
    "kd_fused": (0.5, True),  # KD + CE from the cache, fused (the default)
    "kd_reference": (0.5, False),  # the same loss through the reference implementation (autograd + checkpointing)
}


def run_variant(
    variant: str, cache: str, preset: str, batch: int, steps: int, chunk: int, malloc: str
) -> dict[str, Any]:
    """One variant in this (fresh) process: median step seconds, peak memory growth, system time and page faults."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from logitcache.storage import CacheReader
    from logitcache.train.config import KDSettings
    from logitcache.train.cpu_malloc import tune_cpu_malloc
    from logitcache.train.data import CacheStream
    from logitcache.train.student import PRESETS, DistillModel

    tuned = malloc == "tuned" and tune_cpu_malloc()
    reader = CacheReader(cache)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=reader.vocab_size, **PRESETS[preset])
    model = AutoModelForCausalLM.from_config(cfg).to(device)
    alpha, fused = VARIANTS[variant]
    if alpha is not None:
        dm = DistillModel(model, reader.vocab_size, KDSettings(alpha=alpha, chunk_size=chunk, fused_loss=fused))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    stream = iter(CacheStream(cache, seed=0, batch_count=batch))
    batches = [{k: v.to(device) for k, v in next(stream).items()} for _ in range(steps)]
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def step(b: dict[str, torch.Tensor]) -> None:
        with amp:
            if alpha is None:
                labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
                loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels).loss
            else:
                loss = dm(b, float(b["num_positions"])).total
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_bytes()
    times, usage = [], []
    for b in batches:
        usage.append(resource.getrusage(resource.RUSAGE_SELF))
        t = time.perf_counter()
        step(b)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    usage.append(resource.getrusage(resource.RUSAGE_SELF))
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    first = 2 if len(times) > 3 else 0  # warm-up steps left out of every figure
    warm = times[first:]
    u0, u1 = usage[first], usage[-1]
    return {
        "variant": variant,
        "malloc": "tuned" if tuned else "default",
        "median_step_s": statistics.median(warm),
        "sys_s_per_step": (u1.ru_stime - u0.ru_stime) / len(warm),
        "minor_faults_per_step": (u1.ru_minflt - u0.ru_minflt) / len(warm),
        "peak_mem_bytes": int(peak),
        "tokens_per_step": int(batches[0]["num_tokens"]),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }


def _stream_throughput(cache: str, batch: int, seconds: float) -> dict[str, Any]:
    """CacheStream over `cache` in this process (no workers, batches collated to tensors): tokens per wall second
    and per CPU-second (process time: one core's worth of work), after the first batch (reader and first part)."""
    from logitcache.train.data import CacheStream

    it = iter(CacheStream(cache, seed=0, batch_count=batch))
    next(it)  # open the reader and the first part outside the timing
    tokens = 0
    w0, c0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - w0 < seconds:
        tokens += int(next(it)["num_tokens"])
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return {"tokens": tokens, "tokens_per_s": tokens / wall, "tokens_per_cpu_s": tokens / cpu, "cpu_util": cpu / wall}


def loader_throughput(cache: str, batch: int, seconds: float) -> dict[str, Any]:
    """The loader on the k=64 cache `cache`, and (key "k128") on a k=128 twin written next to it with the same
    vocabulary, lengths and number of sequences: the cost per token grows with the entries per position."""
    from logitcache.storage import CacheReader

    reader = CacheReader(cache)
    twin = write_cache(
        Path(cache).with_name(Path(cache).name.replace("k64", "k128")),
        vocab=reader.vocab_size,
        k=128,
        num_sequences=int(reader.manifest["totals"]["num_sequences"]),
        seq_len=int(reader.manifest["capture"]["max_seq_len"]),
    )
    caches = {"loader_k64": Path(cache), **{k: v for k, v in PADDING_CACHES.items() if (v / "manifest.json").exists()}}
    return {
        **_stream_throughput(cache, batch, seconds),
        "k128": _stream_throughput(str(twin), batch, seconds),
        "padding": [padding_share(str(path), name, *size) for name, path in caches.items() for size in BATCHES],
    }


BATCHES = ((8, "sequences"), (4096, "tokens"))  # the padding share's batch sizes: train-student's default, a budget


def padding_share(cache: str, name: str, count: int, unit: str) -> dict[str, Any]:
    """Padded tokens / all tokens of the batches of one training epoch (seed 0, 5% held out), padded and packed."""
    from logitcache.train.data import CacheStream

    row: dict[str, Any] = {"cache": name, "batch": f"{count} {unit}"}
    for pack in (False, True):
        real = total = batches = 0
        for b in CacheStream(cache, seed=0, batch_count=count, batch_unit=unit, eval_fraction=0.05, pack=pack):
            if int(b["epoch"]) > 0:
                break
            real, total, batches = real + int(b["num_tokens"]), total + b["input_ids"].numel(), batches + 1
        row["packed" if pack else "padded"] = {"padding_share": 1 - real / total, "batches": batches, "tokens": total}
    return row


def print_loader(loader: dict[str, Any]) -> None:
    for k, row in (("64", loader), ("128", loader["k128"])):
        print(
            f"loader k={k}: {row['tokens_per_s']:.0f} tokens/s wall, {row['tokens_per_cpu_s']:.0f} tokens per "
            f"CPU-second (one process, {row['cpu_util']:.2f} cores busy)"
        )
    rows = [
        [
            r["cache"],
            r["batch"],
            *(f"{r[m]['padding_share']:.1%} ({r[m]['batches']} batches)" for m in ("padded", "packed")),
            f"{r['packed']['tokens'] / r['padded']['tokens']:.2f}",
        ]
        for r in loader["padding"]
    ]
    head = ["cache", "batch size", "padding share, padded", "packed (--pack)", "batch tokens, packed / padded"]
    print(markdown_table(head, rows))


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="Tiny sizes: only checks that the script runs.")
    ap.add_argument("--json", default=None, help="Also write the results to this file.")
    ap.add_argument("--loader-only", action="store_true", help="Skip the step benchmark: the loader figures only.")
    ap.add_argument("--vocabs", default="32768,128256", help="Vocabulary sizes of the step benchmark's caches.")
    ap.add_argument("--mallocs", default="default,tuned", help="glibc malloc settings: default, tuned (cpu_malloc.py).")
    ap.add_argument("--_variant", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_args", default=None, help=argparse.SUPPRESS)
    return ap.parse_args()


def write_caches(quick: bool, vocab: int, seq_len: int) -> tuple[Path, Path]:
    """The step benchmark's cache and the loader's k=64 cache (reused when already written)."""
    work = out_dir("train-quick" if quick else "train")
    step_cache = write_cache(
        work / f"step-v{vocab}", vocab=vocab, k=64, num_sequences=16 if quick else 64, seq_len=seq_len
    )
    load_cache = write_cache(
        work / "loader-k64", vocab=32768 if not quick else 512, k=64, num_sequences=64 if quick else 2000, seq_len=256
    )
    return step_cache, load_cache


def run_variants(spec: dict[str, Any], mallocs: list[str], vocab: int) -> list[dict[str, Any]]:
    """Each step variant in a fresh subprocess (so that its peak memory and its allocator settings are its own)."""
    results = []
    for malloc in mallocs:
        for variant in VARIANTS:
            out = subprocess.run(
                [sys.executable, __file__, "--_variant", variant, "--_args", json.dumps({**spec, "malloc": malloc})],
                check=True,
                capture_output=True,
                text=True,
            )
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps({"vocab": vocab, **results[-1]}), file=sys.stderr, flush=True)
    return results


def step_rows(vocab: int, results: list[dict[str, Any]]) -> list[list[str]]:
    """Table rows: each variant against HF's CE step under the same allocator settings, and under the defaults."""
    ce = {r["malloc"]: r for r in results if r["variant"] == "ce_hf"}
    base = ce.get("default") or next(iter(ce.values()))
    rows = []
    for r in results:
        same = ce[r["malloc"]]
        rows.append(
            [
                f"{vocab:,}",
                r["malloc"],
                r["variant"],
                f"{r['median_step_s'] * 1000:.0f}",
                f"{r['sys_s_per_step']:.2f}",
                f"{r['minor_faults_per_step'] / 1000:.0f}k",
                f"{r['peak_mem_bytes'] / 2**20:.0f}",
                f"{r['median_step_s'] / same['median_step_s']:.2f}",
                f"{r['median_step_s'] / base['median_step_s']:.2f}",
                f"{r['peak_mem_bytes'] / max(same['peak_mem_bytes'], 1):.2f}",
            ]
        )
    return rows


def print_report(report: dict[str, Any]) -> None:
    head = ["V", "malloc", "step", "median ms", "sys s/step", "faults/step", "peak MiB (growth)"]
    head += ["time / ce_hf (same malloc)", "time / ce_hf (default malloc)", "memory / ce_hf"]
    rows = [row for v, results in report["steps"].items() for row in step_rows(int(v), results)]
    if rows:
        print(markdown_table(head, rows))
    loader = report["loader_k64"]
    print_loader(loader)


def main() -> None:
    args = parse_args()
    if args._variant:  # child process: one variant
        print(json.dumps(run_variant(args._variant, **json.loads(args._args))))
        return

    quick = args.quick
    vocabs = [512] if quick else [int(v) for v in args.vocabs.split(",")]
    seq_len = 32 if quick else 256
    report: dict[str, Any] = {"student": "tiny-llama" if quick else "small-llama", "seq_len": seq_len, "steps": {}}
    for vocab in vocabs:
        step_cache, load_cache = write_caches(quick, vocab, seq_len)
        spec = {
            "cache": str(step_cache),
            "preset": report["student"],
            "batch": 2 if quick else 8,
            "steps": 3 if quick else 8,
            "chunk": 512,
        }
        report["batch_sequences"], report["kd_chunk_positions"] = spec["batch"], spec["chunk"]
        if not args.loader_only:
            report["steps"][str(vocab)] = run_variants(spec, args.mallocs.split(","), vocab)
    report["loader_k64"] = loader_throughput(str(load_cache), batch=8, seconds=1.0 if quick else 10.0)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
