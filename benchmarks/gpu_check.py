"""The CUDA checks of issue 8 (#11) in one short script for a lent GPU machine (no vLLM there: HF-backend capture).

    python benchmarks/gpu_check.py --work /tmp/gpu_check     # prints one JSON line per check, exits 1 on a failure

1. a quick demo teacher (`demo-teacher --quick`) and an HF-backend cache of its corpus, on the GPU;
2. `train-student` with bf16 autocast (`--dtype bfloat16`), `--compile` off and on: finite losses, step times;
3. a run (`--steps 6 --save-every 3`) cut back to its step-3 checkpoint and resumed with `--resume`:
   the losses of steps 4-6 equal those of an uninterrupted run (CPU and CUDA RNG states restored), within bf16
   tolerance.
Record the printed lines in BENCHMARKS.md (GPU section) with the machine they ran on.
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


def _run(*args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([str(BIN), *args], check=True)
    return time.perf_counter() - t0


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _train(cache: Path, out: Path, *extra: str) -> float:
    return _run(
        "train-student", "--cache", str(cache), "--student", "tiny-llama", "--output", str(out),
        "--dtype", "bfloat16", "--batch-size", "8", "--seed", "0", "--num-workers", "0", *extra,
    )  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/gpu_check")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"check": "cuda", "ok": False, "why": "no CUDA device"}))
        return 1
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    _run("demo-teacher", "--output", str(work), "--quick")
    cache = work / "cache"
    _run(
        "cache-teacher", "--teacher", str(work / "teacher"), "--dataset", str(work / "data" / "train.jsonl"),
        "--output", str(cache), "--backend", "hf", "--top-k", "32", "--max-seq-len", "128",
    )  # fmt: skip
    ok = True
    for compile_flag in ((), ("--compile",)):
        out = work / f"bf16{'-compile' if compile_flag else ''}"
        seconds = _train(cache, out, "--steps", "20", "--save-every", "0", *compile_flag)
        losses = _losses(out)
        good = len(losses) == 20 and all(v == v and abs(v) < 1e4 for v in losses.values())
        ok &= good
        print(json.dumps({"check": f"bf16 train{' compile' if compile_flag else ''}", "ok": good,
                          "seconds": round(seconds, 1), "first_loss": losses.get(1), "last_loss": losses.get(20)}))  # fmt: skip
    full = work / "resume"
    _train(cache, full, "--steps", "6", "--save-every", "3")
    a = _losses(full)
    # As if killed after the step-3 checkpoint: drop what came later, then resume with the same options.
    shutil.rmtree(full / "checkpoints" / "step-6")
    shutil.rmtree(full / "final")
    _train(cache, full, "--steps", "6", "--save-every", "3", "--resume")
    b = _losses(full)
    diff = max(abs(a[s] - b[s]) for s in (4, 5, 6))
    good = diff < 2e-2
    ok &= good
    print(json.dumps({"check": "resume (bf16, CUDA RNG restored)", "ok": good, "max_loss_diff_steps_4_6": diff}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
