"""`make demo`: the whole pipeline on the embedded default, through the real CLI, on CPU in minutes.

1. `logitcache demo-teacher`: a tokenizer and a small Llama teacher trained locally on stdlib source;
2. `logitcache cache-teacher` over the demo corpus (vLLM backend) in the shipped target mode (`--targets`, see
   BENCHMARKS.md "Target modes"), and over held-out files the teacher never saw (HF backend: a second, small top-k
   cache that is only evaluated, plus the same files in the demo's mode, to compare their bytes per token);
3. `logitcache train-student` three times from the same cache: a KD student (train-student's default alpha), a
   CE-only student (alpha=0) with the same steps, and a CE-only student given the KD student's wall-clock time
   (a KD step costs more than a CE step, so plain training gets more steps for the same time);
4. `logitcache eval` of the three on the held-out cache, printed as a table with a plain verdict.

    python benchmarks/demo.py [--work demo_out] [--backend vllm|hf] [--targets sampled] [--steps 130]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent / "logitcache"
# The training cache's target mode and settings: the best quality per byte in BENCHMARKS.md "Target modes".
DEMO_TARGETS = ("sampled", "--samples", "24", "--exact-top", "0")


def run(*args: str, capture: bool = False) -> str:
    cmd = [str(BIN), *args]
    print("\n$ logitcache " + " ".join(args), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, text=True, capture_output=capture)
    if proc.returncode != 0:
        if capture:
            sys.stderr.write(proc.stdout + proc.stderr)
        sys.exit(f"demo step failed (exit {proc.returncode}): logitcache {' '.join(args)}")
    print(f"  ({time.perf_counter() - t0:.0f}s)", flush=True)
    return proc.stdout if capture else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="demo_out", help="where everything is written")
    ap.add_argument("--backend", default="vllm", choices=["vllm", "hf"], help="teacher engine for the capture")
    ap.add_argument("--targets", default=DEMO_TARGETS[0], help="target mode of the training cache")
    ap.add_argument("--targets-args", default=" ".join(DEMO_TARGETS[1:]), help="its settings (cache-teacher flags)")
    ap.add_argument("--top-k", default="64", help="K of the held-out top-k cache (and of --targets topk)")
    ap.add_argument("--steps", default="130", help="optimizer steps of the KD student and the same-steps CE student")
    args = ap.parse_args()
    work = Path(args.work)
    t0 = time.perf_counter()
    run("demo-teacher", "--output", str(work))
    # The training cache through the chosen engine. A tiny teacher runs vLLM eagerly: its compile warm-up (~40 s on
    # 2 cores) buys nothing here. The small held-out cache (only evaluated) through the HF backend, the reference
    # engine, which computes the same exact tail and saves a second engine start (~60 s).
    eager = ["--engine-arg", "enforce_eager=true"] if args.backend == "vllm" else []
    mode = ["--targets", args.targets, *args.targets_args.split()]
    if args.targets == "topk":
        mode += ["--top-k", args.top_k]
    topk = ["--targets", "topk", "--top-k", args.top_k]
    for data, cache, backend, extra in (
        ("train.jsonl", "cache", args.backend, eager + mode),
        ("heldout.jsonl", "cache-heldout", "hf", topk),
        ("heldout.jsonl", "cache-heldout-mode", "hf", mode),
    ):
        if cache == "cache-heldout-mode" and args.targets == "topk":
            continue
        run(
            "cache-teacher",
            "--teacher", str(work / "teacher"),
            "--dataset", str(work / "data" / data),
            "--output", str(work / cache),
            "--backend", backend,
            "--max-seq-len", "256",
            *extra,
        )  # fmt: skip
    run("inspect", str(work / "cache"))
    sizes = bytes_per_token(work, args.targets)
    from logitcache.train.config import TrainConfig

    alpha = next(f.default for f in dataclasses.fields(TrainConfig) if f.name == "alpha")
    kd = Student(f"KD from the cache (alpha={alpha})", "student-kd", alpha, int(args.steps))
    ce = Student("CE only, same steps", "student-ce", 0.0, int(args.steps))
    for student in (kd, ce):
        train(work, student)
    # Same wall-clock time: plain CE gets the steps that fit in the KD student's training time.
    ce_time = Student("CE only, same time", "student-ce-time", 0.0, round(kd.steps * kd.seconds / ce.seconds))
    train(work, ce_time)
    students = (kd, ce, ce_time)
    for student in students:
        text = run(
            "eval", "--cache", str(work / "cache-heldout"), "--student", str(work / student.out),
            "--eval-fraction", "1", "--json", capture=True,
        )  # fmt: skip
        student.result = json.loads(text)
    report(students)
    print(
        f"\nCache size on the held-out files (same tokens): --targets {' '.join(mode[1:])}: {sizes[0]:.1f} B/token; "
        f"top-k k={args.top_k} with its tail: {sizes[1]:.1f} B/token ({sizes[0] / sizes[1]:.2f}x)."
    )
    print(f"\nDone in {time.perf_counter() - t0:.0f}s. Files:")
    print(f"  teacher + data   {work}/teacher, {work}/data/")
    print(f"  caches           {work}/cache, {work}/cache-heldout  (logitcache inspect / verify DIR)")
    for student in students:
        print(f"  student run      {work}/{student.out}: final/, metrics.jsonl, curves.png, checkpoints/")


def bytes_per_token(work: Path, targets: str) -> tuple[float, float]:
    """B/token of the held-out cache in the demo's mode and of the top-k one (the same held-out tokens)."""
    from logitcache.storage import CacheReader

    def bpt(cache: str) -> float:
        totals = CacheReader(work / cache).manifest["totals"]
        return float(totals["num_bytes"]) / max(int(totals["num_tokens"]), 1)

    topk = bpt("cache-heldout")
    return (topk if targets == "topk" else bpt("cache-heldout-mode")), topk


@dataclasses.dataclass
class Student:
    name: str
    out: str
    alpha: float
    steps: int
    seconds: float = 0.0  # training time: the sum of the logged step times (no start-up, no evaluation)
    result: dict[str, Any] = dataclasses.field(default_factory=dict)


def train(work: Path, s: Student) -> None:
    shutil.rmtree(work / s.out, ignore_errors=True)  # a rerun of the demo trains afresh
    run(
        "train-student", "--cache", str(work / "cache"), "--student", "tiny-llama", "--output", str(work / s.out),
        "--alpha", str(s.alpha), "--steps", str(s.steps), "--lr", "3e-3", "--seed", "0", "--eval-fraction", "0",
    )  # fmt: skip
    rows = [json.loads(ln) for ln in (work / s.out / "metrics.jsonl").read_text().splitlines()]
    s.seconds = sum(r["step_seconds"] for r in rows if "step_seconds" in r)


def report(students: tuple[Student, Student, Student]) -> None:
    kd, ce, ce_time = students
    print(f"\nHeld-out files the teacher never saw ({kd.result['positions']:,} positions):\n")
    print(f"| {'student':34s} | steps | train s | held-out CE (nats) | KL(teacher||student) | top-1 agreement |")
    print(f"|{'-' * 36}|-------|---------|{'-' * 20}|{'-' * 22}|{'-' * 17}|")
    for s in students:
        r = s.result
        print(
            f"| {s.name:34s} | {s.steps:5d} | {s.seconds:7.1f} | {r['ce']:18.4f} | {r['kl']:20.4f} "
            f"| {r['top1_agreement']:15.3f} |"
        )
    teacher_ce = kd.result["teacher_ce"]
    print(f"| {'(the teacher itself)':34s} | {'':5s} | {'':7s} | {teacher_ce:18.4f} | {0.0:20.4f} | {1.0:15.3f} |")
    ratio = (kd.seconds / kd.steps) / (ce.seconds / ce.steps)
    print(f"\nA KD step cost {ratio:.2f}x a CE step here. Lower held-out CE is better:")
    for label, other in (("same steps", ce), ("same wall-clock time", ce_time)):
        d = kd.result["ce"] - other.result["ce"]
        verdict = "distillation helped" if d < 0 else "distillation did NOT help"
        print(f"  {label:22s} KD {kd.result['ce']:.4f} vs CE {other.result['ce']:.4f} nats: {d:+.4f}, {verdict}")
    gain_steps = ce.result["ce"] - kd.result["ce"]
    gain_time = ce.result["ce"] - ce_time.result["ce"]
    if kd.result["ce"] >= ce_time.result["ce"]:
        print(
            f"\nPlainly: at equal wall-clock time, plain training wins on this demo. Distillation gained "
            f"{gain_steps:+.3f} nats at equal steps, but a KD step costs {ratio:.2f}x a CE step, and the CE student's "
            f"extra {ce_time.steps - ce.steps} steps gained {gain_time:+.3f}. Why: on a student this small the loss's "
            "full-vocabulary passes dominate the step (a fused loss is the cure), and a teacher this weak has little "
            "to teach beyond the data itself. A single seed: BENCHMARKS.md has the paired-seed figures."
        )
    else:
        print(
            f"\nDistillation wins here at equal steps ({gain_steps:+.3f} nats) and at equal wall-clock time "
            f"({ce_time.result['ce'] - kd.result['ce']:+.3f}). A single seed: BENCHMARKS.md has the paired-seed figures."
        )


if __name__ == "__main__":
    main()
