"""The quality table: does the cache carry the teacher's dark knowledge?

A teacher trained locally (benchmarks/_common.py: the demo recipe with a longer budget, built once and reused)
is captured ONCE at k=128 with the HF backend (`pipeline.capture.run_capture`) over its training chunks and,
separately, over held-out stdlib files it never saw. Then the same student (same init, data order, steps, seed)
is trained by the real training loop (`train.loop.train`) in each row's way:

- CE only (alpha=0);
- KD from the cache at k = 8, 32, 128 (`--top-k-used`: the dropped entries join the exact tail bucket);
- the same without the tail (renormalised head: what other projects store);
- live-teacher KD on the full distribution (the teacher resident, its full softmax replacing the cache's head for
  every batch: the upper bound the cache approximates);
- temperature 2 and 4 (k=128, tail).

Each student is evaluated on held-out stdlib files the teacher never saw, against the resident teacher's FULL
distribution: cross-entropy on the real tokens, KL(teacher || student) over the whole vocabulary, top-1 agreement;
also KL on the k=128 cached support (what `logitcache eval` reports without a teacher); and the share of the
live-teacher KL gain over CE-only that the row recovers: (KL_ce - KL_row) / (KL_ce - KL_live), full-vocabulary KL.
Three seeds; the table shows mean ± standard deviation.

    python benchmarks/bench_quality.py [--quick] [--seeds 0 1 2] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ensure_teacher, markdown_table, out_dir

CAPTURE_K = 128
ROWS: list[tuple[str, dict[str, Any]]] = [
    ("CE only (alpha=0)", {"alpha": 0.0}),
    ("cache k=8 + tail", {"top_k_used": 8}),
    ("cache k=32 + tail", {"top_k_used": 32}),
    ("cache k=128 + tail", {}),
    ("cache k=8, no tail", {"top_k_used": 8, "no_tail": True}),
    ("cache k=32, no tail", {"top_k_used": 32, "no_tail": True}),
    ("cache k=128, no tail", {"no_tail": True}),
    ("cache k=128 + tail, T=2", {"temperature": 2.0}),
    ("cache k=128 + tail, T=4", {"temperature": 4.0}),
    ("live teacher, full distribution", {"live": True}),
]


def capture(teacher: Path, dataset: Path, out: Path, max_seq_len: int) -> Path:
    from logitcache.pipeline.capture import run_capture
    from logitcache.pipeline.config import CaptureConfig

    cfg = CaptureConfig(
        teacher=str(teacher),
        dataset=str(dataset),
        output=str(out),
        backend="hf",
        top_k=CAPTURE_K,
        max_seq_len=max_seq_len,
        progress=False,
    )
    from logitcache.storage import IdentityMismatchError

    try:
        result = run_capture(cfg)  # a finished cache of the same teacher is reused: the rerun is a no-op
    except IdentityMismatchError:
        import shutil

        print(f"{out} was captured from another teacher build: recapturing", flush=True)
        shutil.rmtree(out)  # the benchmark's own output: safe to replace
        result = run_capture(cfg)
    assert result.status in ("finished", "already_finished"), result
    return out


class LiveTeacher:
    """Replaces a batch's cached head with the resident teacher's full distribution (K = V, no tail)."""

    def __init__(self, teacher: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
        self.seconds = 0.0

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        t0 = time.perf_counter()
        with torch.inference_mode():
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            lp = torch.log_softmax(logits.reshape(-1, logits.shape[-1])[batch["positions"]].float(), dim=-1)
        n, v = lp.shape
        self.seconds += time.perf_counter() - t0
        return {
            **batch,
            "target_ids": torch.arange(v, dtype=torch.int64).expand(n, v).clone(),
            "target_probs": lp.exp(),
            "tail_mass": torch.zeros(n, dtype=torch.float32),
        }


class HeldOut:
    """The held-out cache's sequences with the resident teacher's FULL log-probs, for exact KL(teacher || student)."""

    def __init__(self, heldout: Path, teacher: Path, max_sequences: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from logitcache.storage import CacheReader

        model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
        self.items = []
        with torch.inference_mode():
            for seq in CacheReader(heldout).iter_sequences():
                if len(self.items) >= max_sequences:
                    break
                ids = torch.from_numpy(seq.input_ids.astype("int64"))[None]
                lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
                keep = torch.from_numpy(seq.loss_mask[1:].copy())
                self.items.append((ids, lp[keep], keep))

    def evaluate(self, student: Any, vocab_size: int) -> dict[str, float]:
        """Held-out CE on the real tokens, full-vocabulary KL(teacher || student), top-1 agreement."""
        import torch

        ce = kl = agree = n = 0.0
        student.eval()
        with torch.inference_mode():
            for ids, t_lp, keep in self.items:
                s_lp = torch.log_softmax(student(input_ids=ids).logits[0, :-1, :vocab_size].float(), dim=-1)[keep]
                t_lp = t_lp[:, :vocab_size]
                targets = ids[0, 1:][keep]
                ce += float(-s_lp.gather(1, targets[:, None]).sum())
                kl += float((t_lp.exp() * (t_lp - s_lp)).sum())
                agree += float((s_lp.argmax(-1) == t_lp.argmax(-1)).sum())
                n += int(keep.sum())
        return {"ce": ce / n, "full_kl": kl / n, "top1_agreement": agree / n, "full_positions": int(n)}


def run_row(
    name: str,
    opts: dict[str, Any],
    cache: Path,
    heldout: Path,
    teacher: Path,
    seed: int,
    steps: int,
    work: Path,
    full: HeldOut,
) -> dict[str, Any]:
    import torch

    from logitcache.storage import CacheReader
    from logitcache.train.config import EvalSettings, TrainConfig
    from logitcache.train.evaluate import evaluate
    from logitcache.train.loop import train
    from logitcache.train.student import DistillModel, build_student

    opts = dict(opts)
    live = opts.pop("live", False)
    run_dir = work / f"{name.replace(' ', '_').replace(',', '').replace('(', '').replace(')', '')}-s{seed}"
    cfg = TrainConfig(
        cache=str(cache),
        student="tiny-llama",
        output=str(run_dir),
        steps=steps,
        batch_size="8",
        lr=3e-3,
        warmup=0.05,
        seed=seed,
        eval_fraction=0.0,
        save_every=0,
        progress=False,
        alpha=opts.pop("alpha", 1.0),
        **opts,
    )
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    hook = LiveTeacher(teacher) if live else None
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    last = train(cfg, batch_hook=hook)
    seconds = time.perf_counter() - t0
    reader = CacheReader(heldout)
    student = build_student(str(run_dir / "final"), reader, None, seed)
    dm = DistillModel(student.model, student.vocab_size)
    metrics = evaluate(dm, str(heldout), EvalSettings(eval_fraction=1.0))
    bucketed = {"bucketed_kl": metrics["kl"], "teacher_ce": metrics["teacher_ce"]}
    return {
        "row": name,
        "seed": seed,
        "train_seconds": seconds,
        "mean_step_seconds": seconds / steps,
        "teacher_seconds": hook.seconds if hook else 0.0,
        "final_train_loss": last.get("loss"),
        **bucketed,
        **full.evaluate(student.model, student.vocab_size),
    }


def summarise(results: list[dict[str, Any]]) -> str:
    def stat(vals: list[float], fmt: str) -> str:
        if len(vals) == 1:
            return format(vals[0], fmt)
        return f"{format(statistics.mean(vals), fmt)} ± {format(statistics.stdev(vals), fmt)}"

    by_row: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_row.setdefault(r["row"], []).append(r)
    ce_kl = {r["seed"]: r["full_kl"] for r in by_row.get(ROWS[0][0], [])}
    live_kl = {r["seed"]: r["full_kl"] for r in by_row.get(ROWS[-1][0], [])}
    rows = []
    for name, _ in ROWS:
        rs = by_row.get(name, [])
        if not rs:
            continue
        shares = [
            (ce_kl[r["seed"]] - r["full_kl"]) / (ce_kl[r["seed"]] - live_kl[r["seed"]])
            for r in rs
            if r["seed"] in ce_kl and r["seed"] in live_kl and ce_kl[r["seed"]] != live_kl[r["seed"]]
        ]
        rows.append(
            [
                name,
                stat([r["ce"] for r in rs], ".4f"),
                stat([r["full_kl"] for r in rs], ".4f"),
                stat([r["bucketed_kl"] for r in rs], ".4f"),
                stat([r["top1_agreement"] for r in rs], ".3f"),
                stat(shares, ".2f") if shares else "-",
                stat([r["mean_step_seconds"] * 1000 for r in rs], ".0f"),
            ]
        )
    return markdown_table(
        [
            "row",
            "held-out CE (nats)",
            "KL(teacher‖student), full vocab",
            "KL on the k=128 cached support",
            "top-1 agreement",
            "share of live-KD KL gain",
            "ms/step",
        ],
        rows,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny teacher, 3 steps, 1 seed: only checks it runs")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--rows", nargs="*", default=None, help="only these row names (default: all)")
    args = ap.parse_args()
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    steps = args.steps or (3 if args.quick else 300)
    build = ensure_teacher(args.quick)
    out = out_dir("quality-quick" if args.quick else "quality")
    max_len = 64 if args.quick else 128
    t0 = time.perf_counter()
    cache = capture(build / "teacher", build / "data" / "train.jsonl", out / "cache", max_len)
    heldout = capture(build / "teacher", build / "data" / "heldout.jsonl", out / "cache-heldout", max_len)
    print(f"captures ready in {time.perf_counter() - t0:.0f}s: {cache}, {heldout}")
    full = HeldOut(heldout, build / "teacher", 8 if args.quick else 150)
    results = []
    for seed in seeds:
        for name, opts in ROWS:
            if args.rows and name not in args.rows:
                continue
            r = run_row(name, opts, cache, heldout, build / "teacher", seed, steps, out / "runs", full)
            results.append(r)
            print(
                f"seed {seed} {name:34s} CE {r['ce']:.4f}  KL {r['full_kl']:.4f}  top1 {r['top1_agreement']:.3f}  "
                f"({r['train_seconds']:.0f}s)",
                flush=True,
            )
            (out / "quality.json").write_text(
                json.dumps({"steps": steps, "seeds": seeds, "results": results}, indent=2)
            )
    table = summarise(results)
    (out / "quality.md").write_text(table + "\n")
    print(table)
    plot(results, out / "quality.png")


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, _ in ROWS if any(r["row"] == n for r in results)]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, n in enumerate(names):
        kls = [r["full_kl"] for r in results if r["row"] == n]
        ax.scatter([i] * len(kls), kls, color="C0")
        ax.plot([i - 0.25, i + 0.25], [sum(kls) / len(kls)] * 2, color="C1")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("held-out KL(teacher || student), full vocabulary, nats")
    ax.set_title("distillation quality per row (dots: seeds, bar: mean)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
