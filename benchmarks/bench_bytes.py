"""Bytes per token of every target mode on >= 1M tokens of real teacher outputs, against the naive dump.

One teacher forward per batch of windows feeds every mode side by side: the full-vocabulary log-softmax goes through
`pipeline.targets` (what both capture backends call) into the project's own `ShardWriter` (one cache per mode), and
the same log-probs' top-64 into a naive Parquet file: int32 ids + float16 log-probs + float32 tail, zstd, pyarrow's
default options otherwise (dictionary on), one row group per ~16 MiB of raw arrays. Nothing is held for the whole
run but the writers, so a V=32,768 teacher streams 1M tokens in bounded memory.

Teachers: the benchmark teacher (V=4,096; benchmarks/_common.py) and a teacher with a real 32,768-token BPE tokenizer
(the demo recipe at V=32,768, trained 240 s), each as trained ("flat") and with logits scaled so that the mean entropy
on the first windows is 1.5 nats ("sharp", the entropy of real LLM teachers; the scale is found by bisection).
Text: the Python stdlib's files (recursively, sorted), tokenized, cut into 512-token windows.

Usage:
    python benchmarks/bench_bytes.py                       # the V=4,096 benchmark teacher, both regimes, 1M tokens
    python benchmarks/bench_bytes.py --teachers v4k,v32k --tokens 200000   # also a V=32,768 teacher (trains 240 s)
    python benchmarks/bench_bytes.py --quick               # seconds: the quick teacher, 5k tokens (a smoke check)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import sysconfig
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BENCH_OUT, ensure_teacher, markdown_table, out_dir

from logitcache.storage import CachedSequence, TargetSpec

MODES: dict[str, TargetSpec] = {
    "topk k=64": TargetSpec(mode="topk", top_k=64),
    "adaptive p=0.9 (cap 64)": TargetSpec(mode="adaptive", top_k=64, top_p=0.9),
    "adaptive p=0.99 (cap 64)": TargetSpec(mode="adaptive", top_k=64, top_p=0.99),
    "sampled r=0 N=12": TargetSpec(mode="sampled", exact_top=0, samples=12),
    "sampled r=4 N=12": TargetSpec(mode="sampled", exact_top=4, samples=12),
    "sampled r=0 N=24 (default)": TargetSpec(mode="sampled", exact_top=0, samples=24),
}
WINDOW = 512
TARGET_ENTROPY = 1.5


def teacher_dir(name: str, quick: bool) -> Path:
    """The benchmark teacher (v4k) or the V=32,768 demo-recipe teacher (v32k), built once and reused."""
    if quick:
        return ensure_teacher(True) / "teacher"
    if name == "v4k":
        return ensure_teacher(False) / "teacher"
    from logitcache.pipeline.demo_teacher import DemoSpec, build_demo

    spec = replace(DemoSpec(), vocab_size=32768, max_train_seconds=240.0, steps=2000)
    return build_demo(BENCH_OUT / "teacher-v32k", spec) / "teacher"


def corpus_windows(tokenizer_dir: Path, num_tokens: int) -> Iterator[np.ndarray]:
    """512-token windows of the stdlib's text (files sorted, recursively) until `num_tokens` tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    seen = 0
    for f in files:
        ids = tok(f.read_text(errors="replace"), add_special_tokens=False)["input_ids"]
        for s in range(0, max(len(ids) - 1, 0), WINDOW):
            w = np.asarray(ids[s : s + WINDOW], dtype=np.int64)
            if len(w) < 2:
                continue
            yield w
            seen += len(w)
            if seen >= num_tokens:
                return


def logit_scale(model: Any, windows: Sequence[np.ndarray]) -> float:
    """The factor on the logits whose mean entropy over `windows` is TARGET_ENTROPY (bisection on log scale)."""
    import torch
    from bench_targets import find_beta  # the same bisection the quality benchmark sharpens its teacher with

    with torch.inference_mode():
        z = torch.cat([model(torch.from_numpy(w)[None]).logits[0, :-1].float() for w in windows])
    return find_beta(z, TARGET_ENTROPY)


class NaiveWriter:
    """The baseline: int32 top-64 ids + float16 log-probs + float32 tail, zstd, pyarrow defaults otherwise."""

    def __init__(self, path: Path, top_k: int = 64) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.top_k = top_k
        self.schema = pa.schema(
            [
                ("sequence_id", pa.int64()),
                ("input_ids", pa.list_(pa.int32())),
                ("loss_mask", pa.list_(pa.bool_())),
                ("topk_ids", pa.list_(pa.int32())),
                ("topk_logprobs", pa.list_(pa.float16())),
                ("tail_mass", pa.list_(pa.float32())),
            ]
        )
        self.writer = pq.ParquetWriter(path, self.schema, compression="zstd")
        self.path, self.rows, self.raw = path, [], 0

    def add(self, sequence_id: int, window: np.ndarray, logprobs: Any) -> None:
        lps, ids = logprobs.topk(self.top_k, dim=-1)
        lps, ids = lps.numpy(), ids.numpy().astype(np.int32)
        tail = (1.0 - np.exp(lps.astype(np.float64)).sum(-1)).clip(0).astype(np.float32)
        self.rows.append(
            (sequence_id, window.astype(np.int32), ids.reshape(-1), lps.astype(np.float16).reshape(-1), tail)
        )
        self.raw += ids.nbytes + lps.nbytes
        if self.raw >= 16 << 20:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa

        if not self.rows:
            return
        cols = list(zip(*self.rows))
        self.writer.write_table(
            pa.table(
                {
                    "sequence_id": pa.array(cols[0], pa.int64()),
                    "input_ids": pa.array(cols[1], pa.list_(pa.int32())),
                    "loss_mask": pa.array([np.ones(len(w), bool) for w in cols[1]], pa.list_(pa.bool_())),
                    "topk_ids": pa.array(cols[2], pa.list_(pa.int32())),
                    "topk_logprobs": pa.array(cols[3], pa.list_(pa.float16())),
                    "tail_mass": pa.array(cols[4], pa.list_(pa.float32())),
                },
                schema=self.schema,
            )
        )
        self.rows, self.raw = [], 0

    def close(self) -> int:
        self.flush()
        self.writer.close()
        return self.path.stat().st_size


def header(spec: TargetSpec, vocab: int, teacher: str) -> dict[str, Any]:
    return {
        "teacher": {"name": teacher, "dtype": "float32", "backend": "hf"},
        "tokenizer": {"name": None, "fingerprint": "sha256:bench", "vocab_size": vocab, "padded_vocab_size": vocab},
        "capture": {
            "top_k": spec.max_entries,
            "codec": "lpq16:fine=1/512x4,coarse=1/32",
            "max_seq_len": WINDOW,
            "targets": spec.to_header(),
        },
        "dataset": {"source": "python stdlib"},
        "num_replicas": 1,
    }


def sequence(spec: TargetSpec, sid: int, window: np.ndarray, logprobs: Any) -> CachedSequence:
    """What a capture in this mode stores for one window (pipeline.targets, as the HF backend calls it)."""
    import torch

    from logitcache.pipeline.targets import compact_entries, targets_from_logprobs

    positions = torch.arange(len(window) - 1)
    ids, lps, tail = targets_from_logprobs(logprobs, spec, sid, positions)
    e_ids, e_lps, counts = compact_entries(ids.numpy(), lps.numpy(), spec)
    nxt = logprobs.gather(1, torch.from_numpy(window[1:, None])).squeeze(1).numpy()
    return CachedSequence(
        sid,
        window.astype(np.int32),
        np.ones(len(window), bool),
        e_ids,
        e_lps,
        nxt,
        tail.numpy().astype(np.float32),
        counts,
        spec.num_samples,
    )


def measure(name: str, model: Any, tokenizer_dir: Path, beta: float, num_tokens: int, work: Path) -> dict[str, Any]:
    """Streams the teacher's outputs on `num_tokens` tokens into every mode's cache and the naive file."""
    import torch

    from logitcache.storage import ShardWriter, finalize_cache, open_capture, write_replica_summary

    vocab = int(model.config.vocab_size)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    naive = NaiveWriter(work / "naive.parquet")
    stats = {"tokens": 0, "positions": 0, "entropy": 0.0, "top1": 0.0, "entries": dict.fromkeys(MODES, 0)}
    t0 = time.perf_counter()
    with ExitStack() as stack, torch.inference_mode():
        writers = {}
        for i, (mode, spec) in enumerate(MODES.items()):
            open_capture(work / f"m{i}", header(spec, vocab, name))
            writers[mode] = stack.enter_context(
                ShardWriter(work / f"m{i}", top_k=spec.max_entries, vocab_size=vocab, targets=spec)
            )
        for sid, w in enumerate(corpus_windows(tokenizer_dir, num_tokens)):
            lp = torch.log_softmax(model(torch.from_numpy(w)[None]).logits[0, :-1].float() * beta, dim=-1)
            stats["tokens"] += len(w)
            stats["positions"] += len(w) - 1
            stats["entropy"] += float(-(lp.exp() * lp).sum())
            stats["top1"] += float(lp.max(-1).values.exp().sum())
            naive.add(sid, w, lp)
            for mode, spec in MODES.items():
                seq = sequence(spec, sid, w, lp)
                stats["entries"][mode] += int((seq.entry_ids >= 0).sum())
                writers[mode].write(seq)
    naive_bytes = naive.close()
    out: dict[str, Any] = {"teacher": name, "logit_scale": beta, "vocab": vocab, "tokens": stats["tokens"]}
    out["mean_entropy"] = stats["entropy"] / stats["positions"]
    out["mean_top1_prob"] = stats["top1"] / stats["positions"]
    out["naive_bytes_per_token"] = naive_bytes / stats["tokens"]
    out["modes"] = {}
    for i, mode in enumerate(MODES):
        write_replica_summary(work / f"m{i}", replica=0, num_replicas=1, summary={"rows": 0, "skipped": {}})
        totals = finalize_cache(work / f"m{i}")["totals"]
        bpt = totals["num_bytes"] / totals["num_tokens"]
        out["modes"][mode] = {
            "bytes_per_token": bpt,
            "vs_naive": bpt / out["naive_bytes_per_token"],
            "entries_per_position": stats["entries"][mode] / stats["positions"],
        }
    out["seconds"] = time.perf_counter() - t0
    return out


def report(runs: list[dict[str, Any]]) -> str:
    head = ["teacher", "regime", "tokens", "entropy / top-1 p", "naive k=64 B/tok", *list(MODES)]
    rows = []
    for r in runs:
        cells = [
            f"{m['bytes_per_token']:.1f} ({m['vs_naive']:.2f}x, {m['entries_per_position']:.1f} e/p)"
            for m in r["modes"].values()
        ]
        rows.append(
            [
                r["teacher"],
                r["regime"],
                f"{r['tokens']:,}",
                f"{r['mean_entropy']:.2f} / {r['mean_top1_prob']:.2f}",
                f"{r['naive_bytes_per_token']:.1f}",
                *cells,
            ]
        )
    return markdown_table(head, rows)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teachers", default="v4k", help="comma-separated: v4k, v32k")
    ap.add_argument("--regimes", default="flat,sharp", help="comma-separated: flat, sharp")
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    tokens = 5_000 if args.quick else args.tokens
    work, runs = out_dir("bytes"), []
    for name in ["quick"] if args.quick else args.teachers.split(","):
        tdir = teacher_dir(name, args.quick)
        model = AutoModelForCausalLM.from_pretrained(tdir, dtype=torch.float32).eval()
        for regime in args.regimes.split(","):
            beta = 1.0 if regime == "flat" else logit_scale(model, list(corpus_windows(tdir, 20 * WINDOW)))
            run = measure(name, model, tdir, beta, tokens, work / f"{name}-{regime}")
            run["regime"] = regime
            runs.append(run)
            print(json.dumps(run), flush=True)
            (work / "bytes.json").write_text(
                json.dumps(runs, indent=1)
            )  # after every regime: a long run keeps its rows
    table = report(runs)
    print(table)
    (work / "bytes.json").write_text(json.dumps(runs, indent=1))
    (work / "bytes.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
