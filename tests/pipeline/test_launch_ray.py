"""`cache-teacher --launcher ray` on a local Ray cluster of 2 CPUs: 2 replicas, one SIGKILLed mid-run and
restarted, the cache equal to a single-process capture; a replica that keeps dying fails the command naming its log;
the placement and CPU binding rules; `--launcher local` never imports Ray."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from logitcache.pipeline.config import CaptureConfig
from logitcache.pipeline.launch_ray import (
    KILL_HOOK_ENV,
    RESULT_MARKER,
    RayUnavailableError,
    _claimed_cores,
    _cpu_env,
    _plan,
    launch_ray,
)
from logitcache.storage import CacheReader

from .test_capture import SETTINGS, assert_same_content, capture_command, capture_reference

RAY_SETTINGS = {**SETTINGS, "launcher": "ray", "num_replicas": 2}


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    """A local Ray cluster of 2 CPUs, small object store, no dashboard; shut down after the module."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 << 20, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted single-process capture with SETTINGS (test_capture.py's reference)."""
    return capture_reference(tiny_demo_dir, tmp_path_factory.mktemp("ref") / "cache")


def _invoke(tiny_demo_dir: Path, out: Path, *extra: str, **settings: Any) -> Any:
    from logitcache.storage.cli import main

    args = capture_command(tiny_demo_dir / "teacher", tiny_demo_dir / "data" / "train.jsonl", out, settings)[1:]
    return CliRunner().invoke(main, [*args, *extra])


def _attempts(log: Path) -> list[list[str]]:
    """The lines of each attempt in a replica log (split at the launcher's `=== replica I, attempt A` headers)."""
    out: list[list[str]] = []
    for line in log.read_text().splitlines():
        if line.startswith("=== replica "):
            out.append([])
        elif out:
            out[-1].append(line)
    return out


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie waiting for its parent to reap it does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _statuses(attempt: list[str]) -> list[str]:
    return [json.loads(line[len(RESULT_MARKER) :])["status"] for line in attempt if line.startswith(RESULT_MARKER)]


def test_killed_replica_is_restarted_and_resumes(
    ray_cluster: Any,
    tiny_demo_dir: Path,
    reference: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    out = tmp_path / "cache"
    # After its first shard, on its first attempt only: replica 1 SIGKILLs itself, replica 0 its Ray worker.
    monkeypatch.setenv(KILL_HOOK_ENV, "1:1:1,0:1:1:worker")
    with caplog.at_level(logging.INFO, logger="logitcache.pipeline.launch_ray"):
        result = _invoke(tiny_demo_dir, out, **RAY_SETTINGS)
    assert result.exit_code == 0, result.output
    assert "cache finished" in result.output
    assert "replica 1 failed (killed by SIGKILL); restart 1 of at most 3" in caplog.text
    assert "replica 0 failed (its Ray worker died" in caplog.text

    # Same sequence ids and identical targets as one process: nothing duplicated, nothing missing.
    assert_same_content(out, reference)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["replica"] for r in manifest["replicas"]] == [0, 1]
    assert sum(r["rows"] for r in manifest["replicas"]) == SETTINGS["limit"]
    # both restarts resumed from the killed runs' shards
    assert all(r["resumed_sequences"] > 0 for r in manifest["replicas"])

    # Each replica: a first attempt with no result (killed), then one that resumed and stopped at "replica_done",
    # as every replica does here: the launcher alone wrote the manifest, once.
    for replica in (0, 1):
        first, second = _attempts(out / "logs" / f"replica-r00{replica}.log")
        assert _statuses(first) == [] and _statuses(second) == ["replica_done"]
        assert any(f"resuming replica {replica}" in line for line in second)
        (pid,) = [int(m) for line in first for m in re.findall(r"attempt 0: pid (\d+)", line)]
        assert not _alive(pid)  # the killed worker's replica process died with it
    assert CacheReader(out).manifest["totals"] == manifest["totals"]

    # A rerun of the finished cache does nothing and writes nothing.
    before = (out / "manifest.json").stat().st_mtime_ns
    again = _invoke(tiny_demo_dir, out, **RAY_SETTINGS)
    assert again.exit_code == 0 and "already a finished cache" in again.output, again.output
    assert (out / "manifest.json").stat().st_mtime_ns == before


def test_replica_that_keeps_dying_fails_naming_its_log(
    ray_cluster: Any, tiny_demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "cache"
    monkeypatch.setenv(KILL_HOOK_ENV, "1:0:99")  # replica 1 dies as soon as it starts, every time
    result = _invoke(tiny_demo_dir, out, **{**RAY_SETTINGS, "limit": 4, "max_replica_restarts": 1})
    assert result.exit_code != 0
    assert "replica 1 of 2 failed 2 time(s) (--max-replica-restarts 1)" in result.output, result.output
    assert str(out / "logs" / "replica-r001.log") in result.output
    assert "killed by SIGKILL" in result.output
    assert not (out / "manifest.json").exists()
    assert len(_attempts(out / "logs" / "replica-r001.log")) == 2


def test_plan_gpus_per_tp_group_or_a_share_of_the_cores(tmp_path: Path) -> None:
    def cfg(**kw: Any) -> CaptureConfig:
        return CaptureConfig(teacher="t", dataset="d", output=str(tmp_path), launcher="ray", **kw)

    gpu_nodes = [{"Alive": True, "Resources": {"CPU": 64, "GPU": 8}}] * 2
    p = _plan(cfg(num_replicas=4, tensor_parallel_size=4), gpu_nodes)
    assert (p.num_gpus, p.num_cpus, p.cpu_cores, p.gpu_memory_utilization) == (4, 1, None, None)
    cpu_node = [{"Alive": True, "Resources": {"CPU": 16}}]
    p = _plan(cfg(num_replicas=2), cpu_node)  # vLLM on one 16-core machine: 8 cores and half the RAM share each
    assert (p.num_gpus, p.cpu_cores, p.gpu_memory_utilization) == (0, 8, 0.15)
    p = _plan(cfg(num_replicas=2, backend="hf"), [{"Alive": True, "Resources": {"CPU": 2}}])
    assert (p.cpu_cores, p.gpu_memory_utilization) == (1, None)
    p = _plan(cfg(num_replicas=4, tensor_parallel_size=2), [{"Alive": True, "Resources": {"CPU": 2}}])
    assert p.cpu_cores == 2  # a core per vLLM worker at least; the replicas then take turns


def test_cpu_blocks_are_claimed_once_per_node() -> None:
    import os

    cpus = sorted(os.sched_getaffinity(0))
    with _claimed_cores(1) as a, _claimed_cores(1) as b:
        assert len(a) == 1 and a != b
        if len(cpus) >= 2:
            assert len(b) == 1
    with _claimed_cores(1) as again:
        assert again == a  # released on exit
    assert _cpu_env([2, 3], 2, set_binding=True) == {"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "2|3"}
    assert _cpu_env([2, 3], 1, set_binding=False) == {"OMP_NUM_THREADS": "2"}


def test_launcher_settings_are_checked(tmp_path: Path) -> None:
    base: dict[str, Any] = {"teacher": "t", "dataset": "d", "output": str(tmp_path)}
    with pytest.raises(ValueError) as e:
        CaptureConfig(**base, launcher="ray", replica=1, num_replicas=2, max_replica_restarts=-1)
    assert "`--replica` is chosen for each replica by `--launcher ray`" in str(e.value)
    assert "`--max-replica-restarts` must be >= 0" in str(e.value)
    with pytest.raises(ValueError, match="`--launcher` must be one of local, ray"):
        CaptureConfig(**base, launcher="slurm")


def test_without_ray_the_error_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    cfg = CaptureConfig(teacher="t", dataset="d", output=str(tmp_path), launcher="ray", num_replicas=2)
    with pytest.raises(RayUnavailableError, match=r"pip install 'logitcache\[ray\]'"):
        launch_ray(cfg)


def test_local_launcher_does_not_import_ray() -> None:
    code = (
        "import sys; from logitcache.storage.cli import main; import logitcache.pipeline.cli, "
        "logitcache.pipeline.launch_ray; assert 'ray' not in sys.modules, 'ray imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_vllm_replicas_share_the_machine(
    ray_cluster: Any, tiny_demo_dir: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two vLLM CPU engines at once, each bound to a core of its own; replica 1 is killed after its first shard
    (its engine's processes go with it) and resumes."""
    pytest.importorskip("vllm")
    out = tmp_path / "cache"
    monkeypatch.setenv(KILL_HOOK_ENV, "1:1:1")
    settings = {**RAY_SETTINGS, "backend": "vllm", "dtype": "float32", "batch_size": 4}
    # eager and a small KV cache: two engines compiling at once on 2 cores took 90 s to start, eager ones ~20 s
    small_engine = ("--engine-arg", "enforce_eager=true", "--engine-arg", f"kv_cache_memory_bytes={64 << 20}")
    result = _invoke(tiny_demo_dir, out, *small_engine, **settings)
    assert result.exit_code == 0, result.output
    ours = {s.sequence_id: s for s in CacheReader(out).iter_sequences()}
    ref = {s.sequence_id: s for s in CacheReader(reference).iter_sequences()}
    assert sorted(ours) == sorted(ref)  # every window once (the targets are vLLM's, not bit-equal to hf's)
    for sid, seq in ours.items():
        assert seq.input_ids.tolist() == ref[sid].input_ids.tolist()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["replicas"][1]["resumed_sequences"] > 0
    bindings = set()
    for replica in (0, 1):
        log = (out / "logs" / f"replica-r00{replica}.log").read_text()
        assert log.count("=== replica ") == 1 + replica
        bindings |= set(re.findall(r"VLLM_CPU_OMP_THREADS_BIND='([^']*)'", log))
    assert bindings == {"0", "1"}  # each engine on its own core
    # The killed attempt's engine core and worker died with it (the launcher kills the replica's process group).
    killed = "\n".join(_attempts(out / "logs" / "replica-r001.log")[0])
    engine_pids = {int(pid) for pid in re.findall(r"\((?:EngineCore|Worker)[^)]* pid=(\d+)\)", killed)}
    assert engine_pids
    for pid in engine_pids:
        assert not _alive(pid), f"engine process {pid} outlived its replica"
