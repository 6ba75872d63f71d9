"""Capture orchestration on the HF backend: kill -9 + resume, no-op rerun, refused settings, replicas, errors."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from logitcache.pipeline.capture import run_capture
from logitcache.pipeline.config import CaptureConfig
from logitcache.storage import CacheReader

LOGITCACHE = str(Path(sys.executable).parent / "logitcache")
# Small shards so a killed run leaves some complete ones; batch 1 keeps every sequence's numbers independent of
# its batch mates (padding changes BLAS blocking), so a resumed cache can be compared bit for bit.
SETTINGS = {"backend": "hf", "top_k": 16, "max_seq_len": 32, "batch_size": 1, "shard_size_bytes": 16_000, "limit": 16}


def capture_command(teacher: Path, dataset: Path, out: Path, settings: dict[str, Any]) -> list[str]:
    """The `logitcache cache-teacher` command line with these settings (field names)."""
    flags = [a for k, v in settings.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    cmd = [LOGITCACHE, "cache-teacher", "--teacher", str(teacher), "--dataset", str(dataset), "--output", str(out)]
    return [*cmd, "--no-progress", *flags]


def _cli(teacher: Path, dataset: Path, out: Path, **extra: Any) -> list[str]:
    return capture_command(teacher, dataset, out, {**SETTINGS, **extra})


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _sequences(cache: Path) -> dict[int, Any]:
    out = {}
    for s in CacheReader(cache).iter_sequences():
        assert s.sequence_id not in out, f"sequence {s.sequence_id} stored twice"
        out[s.sequence_id] = s
    return out


def assert_same_content(a: Path, b: Path) -> None:
    """Both caches hold the same sequences with the same decoded arrays (sample counts included)."""
    sa, sb = _sequences(a), _sequences(b)
    assert sorted(sa) == sorted(sb)
    for sid, x in sa.items():
        y = sb[sid]
        for name in ("input_ids", "loss_mask", "entry_ids", "entry_logprobs", "next_token_logprobs", "tail_mass"):
            assert np.array_equal(getattr(x, name), getattr(y, name)), (sid, name)
        assert (x.sample_counts is None) == (y.sample_counts is None), sid
        assert x.sample_counts is None or np.array_equal(x.sample_counts, y.sample_counts), sid
        assert x.num_samples == y.num_samples, sid


def kill_then_resume(cmd: list[str], out: Path, kills_wanted: int = 2) -> subprocess.CompletedProcess[str]:
    """Runs the capture `cmd` (writing `out`), SIGKILLs it mid-run `kills_wanted` times, then lets a last run finish."""
    rng = random.Random(os.getpid())
    kills = 0
    while kills < kills_wanted:
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        # Wait for real progress (a shard beyond those already there), then kill at a random moment after it.
        before = len(list((out / "shards").glob("*.parquet"))) if out.exists() else 0
        while proc.poll() is None and time.monotonic() < deadline:
            if out.exists() and len(list((out / "shards").glob("*.parquet"))) > before:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is not None or (out / "manifest.json").exists():
            # Finished before the kill landed: start over so that a kill really interrupts a capture.
            proc.kill()
            proc.wait()
            shutil.rmtree(out)
            kills = 0
            assert time.monotonic() < deadline, "could not kill the capture mid-run"
            continue
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        assert not (out / "manifest.json").exists()
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not list((out / "shards").glob("*.tmp"))
    return done


def capture_reference(tiny_demo_dir: Path, out: Path) -> Path:
    """An uninterrupted single-process capture with SETTINGS into `out` (what the kill/resume tests compare with)."""
    cfg = CaptureConfig(
        teacher=str(tiny_demo_dir / "teacher"),
        dataset=str(tiny_demo_dir / "data" / "train.jsonl"),
        output=str(out),
        progress=False,
        **SETTINGS,  # type: ignore[arg-type]
    )
    assert run_capture(cfg).status == "finished"
    return out


@pytest.fixture(scope="module")
def reference(tiny_demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return capture_reference(tiny_demo_dir, tmp_path_factory.mktemp("ref") / "cache")


def test_kill9_then_resume_equals_uninterrupted(tiny_demo_dir: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    kill_then_resume(_cli(tiny_demo_dir / "teacher", tiny_demo_dir / "data" / "train.jsonl", out), out)
    assert_same_content(out, reference)
    manifest = json.loads((out / "manifest.json").read_text())
    ref_manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["totals"]["num_sequences"] == ref_manifest["totals"]["num_sequences"]
    assert manifest["replicas"][0]["resumed_sequences"] > 0  # the last run really resumed
    # The throughput log has one record per engine batch, appended across the runs.
    records = [json.loads(line) for line in (out / "logs" / "capture-r000.jsonl").read_text().splitlines()]
    assert records and all(r["tokens_per_second"] is None or r["tokens_per_second"] > 0 for r in records)


def test_rerun_finished_is_noop_and_other_settings_refused(
    tiny_demo_dir: Path, reference: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(reference, cache)
    before = (cache / "manifest.json").stat().st_mtime_ns
    result = CliRunner().invoke(
        _cli_main(), _cli(tiny_demo_dir / "teacher", tiny_demo_dir / "data" / "train.jsonl", cache)[1:]
    )
    assert result.exit_code == 0, result.output
    assert "already a finished cache" in result.output
    assert (cache / "manifest.json").stat().st_mtime_ns == before
    result = CliRunner().invoke(
        _cli_main(), _cli(tiny_demo_dir / "teacher", tiny_demo_dir / "data" / "train.jsonl", cache, top_k=8)[1:]
    )
    assert result.exit_code != 0
    assert "different settings" in result.output and "capture.top_k" in result.output


def _cli_main() -> Any:
    from logitcache.storage.cli import main

    return main


def test_two_replicas_then_finalize(tiny_demo_dir: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    procs = [
        subprocess.Popen(
            _cli(tiny_demo_dir / "teacher", tiny_demo_dir / "data" / "train.jsonl", out, replica=i, num_replicas=2),
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    shards = sorted(p.name for p in (out / "shards").glob("*.parquet"))
    assert any(s.startswith("r000-") for s in shards) and any(s.startswith("r001-") for s in shards)
    assert_same_content(out, reference)  # same sequences as one process, each exactly once
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["replica"] for r in manifest["replicas"]] == [0, 1]
    assert sum(r["rows"] for r in manifest["replicas"]) == SETTINGS["limit"]
    # `logitcache finalize` rebuilds the same manifest.
    (out / "manifest.json").unlink()
    result = CliRunner().invoke(_cli_main(), ["finalize", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["totals"] == manifest["totals"]


def test_one_replica_waits_for_the_other(tiny_demo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    base = {
        "teacher": str(tiny_demo_dir / "teacher"),
        "dataset": str(tiny_demo_dir / "data" / "train.jsonl"),
        "output": str(out),
        "progress": False,
        **SETTINGS,
        "limit": 4,
        "num_replicas": 2,
    }
    first = run_capture(CaptureConfig(**base, replica=1))  # type: ignore[arg-type]
    assert first.status == "replica_done" and not (out / "manifest.json").exists()
    assert run_capture(CaptureConfig(**base, replica=1)).status == "replica_done"  # type: ignore[arg-type]
    assert run_capture(CaptureConfig(**base, replica=0)).status == "finished"  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"teacher": "/nonexistent/teacher"}, FileNotFoundError, r"--teacher /nonexistent/teacher: no such directory"),
        ({"top_k": 100_000}, ValueError, r"`--top-k` 100000 is larger than the teacher's vocabulary \(512\)"),
        (
            {"backend": "vllm", "engine_args": {"max_logprobs": 4}},
            ValueError,
            r"larger than the engine's max_logprobs \(4",
        ),
        ({"max_seq_len": 512, "backend": "vllm"}, ValueError, r"`--max-seq-len` 512 is at or over the teacher's limit"),
        ({"max_seq_len": 600}, ValueError, r"use --max-seq-len 512 or less"),
        ({"dataset": "/nonexistent.jsonl"}, FileNotFoundError, r"--dataset /nonexistent.jsonl: no such file"),
    ],
)
def test_clear_errors(tiny_demo_dir: Path, tmp_path: Path, change: dict[str, Any], error: type, match: str) -> None:
    settings = {
        "teacher": str(tiny_demo_dir / "teacher"),
        "dataset": str(tiny_demo_dir / "data" / "train.jsonl"),
        "output": str(tmp_path / "cache"),
        "backend": "hf",
        "top_k": 16,
        "progress": False,
        **change,
    }
    with pytest.raises(error, match=match):
        run_capture(CaptureConfig(**settings))  # type: ignore[arg-type]
    assert not (tmp_path / "cache").exists()  # nothing is created before the settings are known to work


def test_output_dir_that_is_not_a_cache(tiny_demo_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    result = CliRunner().invoke(
        _cli_main(), _cli(tiny_demo_dir / "teacher", tiny_demo_dir / "data" / "train.jsonl", tmp_path)[1:]
    )
    assert result.exit_code != 0 and "is not a logitcache cache" in result.output
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_chat_cache_masks_assistant_tokens(tiny_chat_cache_dir: Path) -> None:
    reader = CacheReader(tiny_chat_cache_dir)
    assert reader.manifest["dataset"]["messages_field"] == "messages"
    assert reader.manifest["capture"]["chat_template_sha256"]
    masks = np.concatenate([s.loss_mask for s in reader.iter_sequences()])
    assert 0 < masks.mean() < 1
