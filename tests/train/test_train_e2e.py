"""End to end on a cache captured by the real `cache-teacher` (HF backend) from a tiny Llama teacher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from logitcache.storage import CacheReader
from logitcache.train.config import EvalSettings, TrainConfig
from logitcache.train.evaluate import evaluate
from logitcache.train.loop import train
from logitcache.train.student import DistillModel, build_student

BIN = Path(sys.executable).parent
EVAL_FRACTION = 0.25  # the tiny cache has few sequences: hold out enough to measure


def _losses(run: Path) -> list[tuple[int, float, float, float]]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["kd_loss"], r["ce_loss"]) for r in rows if "loss" in r]


def _cli(*args: str) -> list[str]:
    return [str(BIN / "logitcache"), "train-student", *args]


def test_kd_lowers_kl_and_ends_closer_to_the_teacher_than_ce_only(tiny_cache_dir: Path, tmp_path: Path) -> None:
    reader = CacheReader(tiny_cache_dir)
    fresh = build_student("tiny-llama", reader, seed=0)
    before = evaluate(DistillModel(fresh.model, fresh.vocab_size), str(tiny_cache_dir), EvalSettings(EVAL_FRACTION))
    common = {
        "cache": str(tiny_cache_dir),
        "student": "tiny-llama",
        "steps": 60,
        "lr": 3e-3,
        "eval_fraction": EVAL_FRACTION,
        "progress": False,
        "save_every": 0,
        "num_workers": 0,
        "batch_size": "4",
    }
    train(TrainConfig(output=str(tmp_path / "kd"), alpha=1.0, **common))
    train(TrainConfig(output=str(tmp_path / "ce"), alpha=0.0, **common))

    def final_eval(run: Path) -> dict:
        rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["eval"] for r in rows if "eval" in r][-1]

    kd, ce = final_eval(tmp_path / "kd"), final_eval(tmp_path / "ce")
    assert kd["kl"] < 0.7 * before["kl"], (before, kd)
    assert kd["kl"] < ce["kl"], (kd, ce)
    assert (tmp_path / "kd" / "curves.png").stat().st_size > 1000
    assert (tmp_path / "kd" / "final" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "kd" / "config.json").read_text())["train"]["alpha"] == 1.0


def test_killed_run_resumes_with_the_uninterrupted_loss_sequence(tiny_cache_dir: Path, tmp_path: Path) -> None:
    args = [
        "--cache",
        str(tiny_cache_dir),
        "--student",
        "tiny-llama",
        "--steps",
        "100",
        "--save-every",
        "20",
        "--eval-fraction",
        str(EVAL_FRACTION),
        "--batch-size",
        "96tok",
        "--grad-accum",
        "2",
        "--no-progress",
    ]
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(_cli(*args, "--output", str(full)), check=True, capture_output=True)

    proc = subprocess.Popen(_cli(*args, "--output", str(cut)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = cut / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 25:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cut / "final").exists(), "the run finished before it could be killed; raise --steps"
    killed_at = max(s for s, *_ in _losses(cut))

    res = subprocess.run(_cli(*args, "--output", str(cut), "--resume"), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming" in res.stderr
    assert _losses(cut) == _losses(full)  # bit-identical, steps 1..100, across the kill at step ~killed_at
    assert killed_at < 100
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step-100", "step-80"]  # keep the last 2

    # resuming with options that change the training is refused, naming them
    res = subprocess.run(_cli(*args, "--output", str(cut), "--resume", "--loss", "tvd"), capture_output=True, text=True)
    assert res.returncode != 0 and "--loss 'forward_kl' -> 'tvd'" in res.stderr

    out = subprocess.run(
        [str(BIN / "logitcache"), "eval", "--cache", str(tiny_cache_dir), "--student", str(full), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    figures = json.loads(out.stdout)
    assert figures["eval_fraction"] == EVAL_FRACTION and figures["positions"] > 0
    assert figures["kl"] >= 0 and 0 <= figures["top1_agreement"] <= 1
    assert figures["perplexity"] == pytest.approx(2.718281828 ** figures["ce"], rel=1e-6)


def test_two_process_gloo_run(tiny_cache_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "--no-python",
        *_cli(
            "--cache",
            str(tiny_cache_dir),
            "--student",
            "tiny-llama",
            "--output",
            str(run),
            "--steps",
            "6",
            "--eval-fraction",
            str(EVAL_FRACTION),
            "--batch-size",
            "2",
            "--no-progress",
            "--num-workers",
            "0",
        ),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("done: step 6") == 1  # rank 0 alone prints
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["resolved"]["world_size"] == 2
    rows = _losses(run)
    assert [s for s, *_ in rows] == list(range(1, 7))
    state = __import__("torch").load(run / "checkpoints" / "step-6" / "trainer_state.pt", weights_only=True)
    assert len(state["data"]) == 2  # one stream position per rank
