"""`make demo`: the whole pipeline on the embedded default, through the real CLI, on CPU in minutes.

1. `logitcache demo-teacher`: a tokenizer and a small Llama teacher trained locally on stdlib source;
2. `logitcache cache-teacher` (vLLM backend) over the demo corpus, and over held-out files the teacher never saw;
3. `logitcache train-student` twice from the same cache, same steps/seed: KD (alpha=1) and CE only (alpha=0);
4. `logitcache eval` of both students on the held-out cache, printed as a table.

    python benchmarks/demo.py [--work demo_out] [--backend vllm|hf] [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent / "logitcache"


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
    ap.add_argument("--top-k", default="64")
    ap.add_argument("--steps", default="200", help="student optimizer steps (both students)")
    args = ap.parse_args()
    work = Path(args.work)
    t0 = time.perf_counter()
    run("demo-teacher", "--output", str(work))
    for data, cache in (("train.jsonl", "cache"), ("heldout.jsonl", "cache-heldout")):
        run(
            "cache-teacher",
            "--teacher", str(work / "teacher"),
            "--dataset", str(work / "data" / data),
            "--output", str(work / cache),
            "--backend", args.backend,
            "--top-k", args.top_k,
            "--max-seq-len", "256",
        )  # fmt: skip
    run("inspect", str(work / "cache"))
    students = {"KD from the cache (alpha=1)": ("student-kd", "1.0"), "CE only (alpha=0)": ("student-ce", "0.0")}
    for out, alpha in students.values():
        shutil.rmtree(work / out, ignore_errors=True)  # a rerun of the demo trains afresh
        run(
            "train-student",
            "--cache", str(work / "cache"),
            "--student", "tiny-llama",
            "--output", str(work / out),
            "--alpha", alpha,
            "--steps", args.steps,
            "--lr", "3e-3",
            "--seed", "0",
        )  # fmt: skip
    results = {}
    for name, (out, _) in students.items():
        text = run(
            "eval", "--cache", str(work / "cache-heldout"), "--student", str(work / out), "--eval-fraction", "1",
            "--json", capture=True,
        )  # fmt: skip
        results[name] = json.loads(text)
    print(f"\nHeld-out files the teacher never saw ({next(iter(results.values()))['positions']:,} positions):\n")
    print(f"| {'student':30s} | held-out CE (nats) | KL(teacher||student) | top-1 agreement |")
    print(f"|{'-' * 32}|{'-' * 20}|{'-' * 22}|{'-' * 17}|")
    for name, r in results.items():
        print(f"| {name:30s} | {r['ce']:18.4f} | {r['kl']:20.4f} | {r['top1_agreement']:15.3f} |")
    teacher_ce = next(iter(results.values()))["teacher_ce"]
    print(f"| {'(the teacher itself)':30s} | {teacher_ce:18.4f} | {0.0:20.4f} | {1.0:15.3f} |")
    print(f"\nDone in {time.perf_counter() - t0:.0f}s. Files:")
    print(f"  teacher + data   {work}/teacher, {work}/data/")
    print(f"  caches           {work}/cache, {work}/cache-heldout  (logitcache inspect / verify DIR)")
    for out, _ in students.values():
        print(f"  student run      {work}/{out}: final/, metrics.jsonl, curves.png, checkpoints/")


if __name__ == "__main__":
    main()
