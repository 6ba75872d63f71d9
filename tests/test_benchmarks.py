"""`make bench --quick`: every benchmark script runs end to end at toy size (their numbers are not checked here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("bench", ["codec", "train", "fidelity", "quality", "capture", "targets", "bytes"])
def test_benchmark_runs_quick(bench: str, tmp_path: Path) -> None:
    env = {**os.environ, "LOGITCACHE_BENCH_OUT": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--only", bench],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"=== {bench}: exit 0" in proc.stdout
