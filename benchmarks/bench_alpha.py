"""Which alpha (KD weight) should `train-student` default to? A paired-seed sweep on the demo's cache.

For each alpha in --alphas and each seed, trains the demo's student (tiny-llama, same steps, lr, batches) from
WORK/cache and evaluates it on WORK/cache-heldout (files the teacher never saw, --eval-fraction 1). Seeds pair the
runs: a seed fixes the student's initialisation and the batch order, so alpha is the only difference within a pair.
Reports, per alpha, held-out CE and KL(teacher || student) as mean +- 95% t-interval, the paired CE difference to
alpha=0 with its interval, and the median step time (the cost of the KD term).

    python benchmarks/bench_alpha.py --work demo_out [--alphas 0 0.25 0.5 0.75 1] [--seeds 0 1 2] [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, out_dir

# Two-sided 95% Student-t quantiles by degrees of freedom (scipy is not a dependency).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval); half-width 0 for a single value."""
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, 0.0
    return m, _T95.get(len(xs) - 1, 1.96) * statistics.stdev(xs) / len(xs) ** 0.5


def run_one(work: Path, out: Path, alpha: float, seed: int, steps: int, **extra: Any) -> dict[str, Any]:
    """Trains one student and evaluates it on the held-out cache; returns the eval metrics and step times."""
    import torch

    from logitcache.train.config import EvalSettings, TrainConfig
    from logitcache.train.evaluate import evaluate
    from logitcache.train.loop import train
    from logitcache.train.student import DistillModel

    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(
        cache=str(work / "cache"),
        student="tiny-llama",
        output=str(out),
        alpha=alpha,
        steps=steps,
        lr=3e-3,
        seed=seed,
        progress=False,
        save_every=0,
        eval_fraction=0.0,
        **extra,
    )
    train(cfg)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32)
    vocab = json.loads((out / "config.json").read_text())["resolved"]["vocab_size"]
    result = evaluate(DistillModel(model, vocab), str(work / "cache-heldout"), EvalSettings(eval_fraction=1.0))
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_seconds"] for r in rows if "step_seconds" in r][5:]  # skip the warm-up steps
    return {**result, "alpha": alpha, "seed": seed, "step_seconds": statistics.median(times)}


def summarise(results: list[dict[str, Any]]) -> str:
    base = {r["seed"]: r["ce"] for r in results if r["alpha"] == 0.0}
    rows = []
    for alpha in sorted({r["alpha"] for r in results}):
        rs = [r for r in results if r["alpha"] == alpha]
        ce, ce_ci = mean_ci([r["ce"] for r in rs])
        kl, kl_ci = mean_ci([r["kl"] for r in rs])
        diffs = [r["ce"] - base[r["seed"]] for r in rs if r["seed"] in base]
        d, d_ci = mean_ci(diffs) if diffs else (float("nan"), 0.0)
        step = statistics.median(r["step_seconds"] for r in rs)
        rows.append(
            [alpha, f"{ce:.4f} +- {ce_ci:.4f}", f"{d:+.4f} +- {d_ci:.4f}", f"{kl:.4f} +- {kl_ci:.4f}", f"{step:.3f}"]
        )
    header = ["alpha", "held-out CE", "paired CE - CE(alpha=0)", "KL(teacher||student)", "median step (s)"]
    return markdown_table(header, rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="demo_out", help="a `make demo` work dir (teacher, cache, cache-heldout)")
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    work, out = Path(args.work), out_dir("alpha")
    results = []
    for seed in args.seeds:
        for alpha in args.alphas:
            r = run_one(work, out / f"a{alpha}-s{seed}", alpha, seed, args.steps)
            print(json.dumps(r), flush=True)
            results.append(r)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    table = summarise(results)
    (out / "table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
