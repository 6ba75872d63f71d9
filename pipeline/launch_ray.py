"""`cache-teacher --launcher ray`: every data-parallel replica of a capture as a Ray task, restarted when it dies,
the manifest written once, by the launcher, when all have finished.

A replica is the ordinary capture of `--replica I --num-replicas N` (run_capture), run in a child process of its
Ray task, in a session of its own. A child process rather than run_capture inside the Ray worker because:
- a death is a real one and is seen as such (a signal or exit code), and the task then ends the child's whole
  process group (vLLM's engine core and workers too), so a restarted replica never meets its predecessor's engine;
- the engine starts in a fresh process with the environment chosen for it (the Ray-assigned CUDA_VISIBLE_DEVICES,
  on CPU machines a thread binding to the replica's own cores), and vLLM does not see the Ray worker around it;
- its output goes to one log per replica (`CACHE_DIR/logs/replica-r001.log`), named when the replica fails.
Restarts are counted here (`--max-replica-restarts`), not by Ray's retries, so the error can name the replica.
Ray is imported only when the launcher runs: `--launcher local` never needs it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from logitcache.pipeline.backends.vllm_cpu import BIND_ENV, cpu_threads_binding
from logitcache.pipeline.capture import BatchProgress, CaptureResult
from logitcache.pipeline.config import CaptureConfig
from logitcache.storage import CacheLayout, replica_prefix

logger = logging.getLogger(__name__)

__all__ = ["LaunchError", "RayUnavailableError", "ReplicaFailedError", "launch_ray", "replica_main"]

RAY_INSTALL_HINT = "pip install 'logitcache[ray]'"
EXIT_REFUSED = 3  # the replica refused its settings or data (a ValueError and kin): a restart cannot help
RESULT_MARKER = "logitcache-replica-result "  # the child's last stdout line: this + JSON of its CaptureResult
ATTEMPT_ENV = "LOGITCACHE_REPLICA_ATTEMPT"  # 0 for a replica's first run, 1 for its first restart, ...
_PARENT_ENV = "LOGITCACHE_REPLICA_PARENT"  # the pid of the Ray worker that started the replica's process
# Test hook (tests/pipeline/test_launch_ray.py), forwarded by the launcher: "R:S:A" makes replica R SIGKILL itself
# once it has stored S shards more than it started with (S = 0: at start), on its first A attempts; "R:S:A:worker"
# SIGKILLs its Ray worker instead (the replica's process then dies with it). Several specs: comma-separated.
KILL_HOOK_ENV = "LOGITCACHE_TEST_KILL_REPLICA"
_LOG_TAIL_LINES = 20
_POLL_SECONDS = 0.2
_CHILD_CODE = "from logitcache.pipeline.launch_ray import replica_main; replica_main()"


class LaunchError(RuntimeError):
    """The launcher could not run the capture (Ray missing, a replica failing); the message says what to do."""


class RayUnavailableError(LaunchError):
    """`--launcher ray` without Ray installed."""


class ReplicaFailedError(LaunchError):
    """A replica failed more often than `--max-replica-restarts` allows, or refused its settings."""

    def __init__(self, message: str, replica: int, log: str) -> None:
        super().__init__(message)
        self.replica, self.log = replica, log


@dataclass(frozen=True)
class ReplicaJob:
    """One attempt of one replica, as the driver sends it to a Ray task."""

    replica: int
    attempt: int  # 0 = first run; restarts count up
    config: dict[str, Any]  # the replica's CaptureConfig (launcher "local", its --replica)
    log: str  # the replica's log file, on the node that runs it
    cpu_cores: int | None  # CPU machines: the cores it binds its threads to (a block of the node's); None on GPUs
    engine_workers: int  # vLLM workers (TP x PP) sharing those cores
    env: dict[str, str]  # set for the replica's process (on top of the Ray worker's environment)


@dataclass(frozen=True)
class ReplicaOutcome:
    """How one attempt ended: `exit_code` 0 with the capture's `status`, non-zero (negative: the signal that
    killed it), or None when its Ray worker or node died (`message` says which)."""

    replica: int
    attempt: int
    host: str
    exit_code: int | None
    status: str | None
    message: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.status is not None


@dataclass(frozen=True)
class _Placement:
    """What each replica asks Ray for, and the engine settings that follow from sharing a node."""

    num_cpus: float
    num_gpus: float
    cpu_cores: int | None  # None on GPU clusters
    gpu_memory_utilization: float | None  # vLLM's memory share per engine (None: the backend's default)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayUnavailableError(
            f"`--launcher ray` needs Ray, which is not installed here: {RAY_INSTALL_HINT} (on every node), or run "
            "the replicas yourself with `--replica I --num-replicas N` (README: Multi-node capture)"
        ) from None
    return ray


def launch_ray(cfg: CaptureConfig) -> CaptureResult:
    """Runs replicas 0..num_replicas-1 of `cfg` on the Ray cluster (joined with `ray.init()`: RAY_ADDRESS, the
    cluster last started on this machine, else a new local one; an already initialised Ray is used as it is),
    restarting those that die, then writes the manifest once. Raises ReplicaFailedError naming the replica and
    its log when one fails past `cfg.max_replica_restarts` (the stored shards stay: rerun to resume)."""
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init()
    try:
        placement = _plan(cfg, ray.nodes())
        jobs = [_first_job(cfg, i, placement) for i in range(cfg.num_replicas)]
        outcomes, restarts = _run_replicas(ray, cfg, jobs, placement)
    finally:
        if started:
            ray.shutdown()
    return _finish(cfg, outcomes, restarts)


def _plan(cfg: CaptureConfig, nodes: list[dict[str, Any]]) -> _Placement:
    """One TP x PP group of GPUs per replica where the cluster has GPUs; else a block of CPU cores per replica,
    as many as the cluster shares out (at least one per vLLM worker), and a share of each node's RAM for vLLM."""
    workers = cfg.tensor_parallel_size * cfg.pipeline_parallel_size
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive", True)]
    if any(r.get("GPU", 0) > 0 for r in alive):
        return _Placement(1, workers, cpu_cores=None, gpu_memory_utilization=cfg.gpu_memory_utilization)
    node_cpus = [int(r.get("CPU", 0)) for r in alive] or [1]
    cores = max(workers, min(max(node_cpus), sum(node_cpus) // cfg.num_replicas))
    per_node = max(1, min(cfg.num_replicas, max(node_cpus) // cores))
    if sum(c // cores for c in node_cpus) < cfg.num_replicas:
        logger.warning(
            "the cluster's CPUs (%s per node) run %d replicas of %d cores at once; the others wait for them",
            node_cpus,
            sum(c // cores for c in node_cpus),
            cores,
        )
    memory = cfg.gpu_memory_utilization
    if memory is None and cfg.backend == "vllm":
        from logitcache.pipeline.backends.vllm_backend import CPU_MEMORY_UTILIZATION

        memory = round(CPU_MEMORY_UTILIZATION / per_node, 3)  # the engines sharing a node share its RAM
    return _Placement(num_cpus=cores, num_gpus=0, cpu_cores=cores, gpu_memory_utilization=memory)


def replica_log_path(cfg: CaptureConfig, replica: int) -> str:
    """Where replica `replica` writes its output: the cache's logs/ for a local cache, else the node's temp dir."""
    if "://" in cfg.output:
        name = cfg.output.rstrip("/").rsplit("/", 1)[-1]
        return str(Path(tempfile.gettempdir()) / "logitcache-ray" / name / f"replica-{replica_prefix(replica)}.log")
    return str(CacheLayout(Path(cfg.output)).replica_log(replica))


def _first_job(cfg: CaptureConfig, replica: int, placement: _Placement) -> ReplicaJob:
    config = dataclasses.replace(
        cfg,
        replica=replica,
        launcher="local",
        progress=False,
        gpu_memory_utilization=placement.gpu_memory_utilization,
    )
    hook = os.environ.get(KILL_HOOK_ENV)
    return ReplicaJob(
        replica=replica,
        attempt=0,
        config=config.to_dict(),
        log=replica_log_path(cfg, replica),
        cpu_cores=placement.cpu_cores,
        engine_workers=cfg.tensor_parallel_size * cfg.pipeline_parallel_size if cfg.backend == "vllm" else 1,
        env={KILL_HOOK_ENV: hook} if hook else {},
    )


def _run_replicas(
    ray: Any, cfg: CaptureConfig, jobs: list[ReplicaJob], placement: _Placement
) -> tuple[dict[int, ReplicaOutcome], dict[int, int]]:
    """Runs every job as a Ray task until each replica has succeeded; a failed attempt is restarted (resuming
    from its stored shards) until it has failed more than `--max-replica-restarts` times."""
    # max_retries=0: a dead worker is an outcome counted here, so the error can name the replica and its log.
    task = ray.remote(max_retries=0)(run_replica).options(num_cpus=placement.num_cpus, num_gpus=placement.num_gpus)
    pending = {task.remote(job): job for job in jobs}
    outcomes: dict[int, ReplicaOutcome] = {}
    restarts = dict.fromkeys(range(cfg.num_replicas), 0)
    try:
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ref)
            outcome = _outcome(ray, ref, job)
            if outcome.ok:
                logger.info(
                    "replica %d: %s (attempt %d, on %s)", job.replica, outcome.status, job.attempt, outcome.host
                )
                outcomes[job.replica] = outcome
                continue
            if outcome.exit_code == EXIT_REFUSED or job.attempt >= cfg.max_replica_restarts:
                raise _failure(cfg, job, outcome)
            logger.warning(
                "replica %d failed (%s); restart %d of at most %d, resuming from its stored shards",
                job.replica,
                outcome.message.splitlines()[0] if outcome.message else "no output",
                job.attempt + 1,
                cfg.max_replica_restarts,
            )
            restarts[job.replica] += 1
            retry = dataclasses.replace(job, attempt=job.attempt + 1)
            pending[task.remote(retry)] = retry
    except BaseException:
        _cancel(ray, list(pending))
        raise
    return outcomes, restarts


def _outcome(ray: Any, ref: Any, job: ReplicaJob) -> ReplicaOutcome:
    try:
        outcome: ReplicaOutcome = ray.get(ref)
    except ray.exceptions.RayError as e:  # the worker (or its node) died: the child went with it
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return ReplicaOutcome(
            job.replica, job.attempt, "?", None, None, f"its Ray worker died: {type(e).__name__} {first}"
        )
    return outcome


def _failure(cfg: CaptureConfig, job: ReplicaJob, outcome: ReplicaOutcome) -> ReplicaFailedError:
    how = (
        "refused its settings or data"
        if outcome.exit_code == EXIT_REFUSED
        else f"failed {job.attempt + 1} time(s) (--max-replica-restarts {cfg.max_replica_restarts})"
    )
    where = f"{outcome.host}:{job.log}" if outcome.host not in ("?", socket.gethostname()) else job.log
    return ReplicaFailedError(
        f"replica {job.replica} of {cfg.num_replicas} {how}; its log: {where}\n{outcome.message}\n"
        f"Its stored shards are kept: rerun the same command to resume (or run the replica alone with "
        f"`--replica {job.replica} --num-replicas {cfg.num_replicas}`, then `logitcache finalize {cfg.output}`).",
        job.replica,
        job.log,
    )


def _cancel(ray: Any, refs: list[Any]) -> None:
    """Interrupts the running replicas (each task then ends its child's process group) and waits for them."""
    for ref in refs:
        ray.cancel(ref)
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=60)


def _finish(cfg: CaptureConfig, outcomes: dict[int, ReplicaOutcome], restarts: dict[int, int]) -> CaptureResult:
    """Writes the manifest once, unless every replica found the cache already finished."""
    from logitcache.storage import finalize_cache

    root = Path(cfg.output)
    summary = {"restarts": restarts, "hosts": {i: o.host for i, o in sorted(outcomes.items())}}
    if all(o.status == "already_finished" for o in outcomes.values()):
        manifest = None if "://" in cfg.output else json.loads(CacheLayout(root).manifest.read_text())
        return CaptureResult("already_finished", root, summary, manifest)
    return CaptureResult("finished", root, summary, finalize_cache(cfg.output))


# --- inside the Ray task, on the node that runs the replica ---


def run_replica(job: ReplicaJob) -> ReplicaOutcome:
    """One attempt of one replica: its capture in a child process (a session of its own) writing to its log;
    when the child ends, however it ends, the rest of its process group (engine processes) is killed."""
    env = {**os.environ, **job.env, ATTEMPT_ENV: str(job.attempt), _PARENT_ENV: str(os.getpid())}
    log_path = Path(job.log)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack, log_path.open("ab") as log:
        if job.cpu_cores:
            cores = stack.enter_context(_claimed_cores(job.cpu_cores))
            env.update(_cpu_env(cores, job.engine_workers, set_binding=BIND_ENV not in os.environ))
        start = log.tell()
        log.write(
            f"=== replica {job.replica}, attempt {job.attempt}, {time.strftime('%Y-%m-%dT%H:%M:%S')} ===\n".encode()
        )
        log.flush()
        exit_code = _run_child(job, env, log)
    status, message = _read_result(log_path, start, exit_code)
    return ReplicaOutcome(job.replica, job.attempt, socket.gethostname(), exit_code, status, message)


def _run_child(job: ReplicaJob, env: dict[str, str], log: IO[bytes]) -> int:
    import subprocess

    command = [sys.executable, "-c", _CHILD_CODE, json.dumps(job.config)]
    child = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
    )
    try:
        # Poll without reaping (WNOWAIT): the child's pid stays its group's id until the group is killed below. A
        # cancelled task is interrupted here (KeyboardInterrupt) and still kills the group.
        while os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is None:
            time.sleep(_POLL_SECONDS)
    finally:
        with suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)  # the engine's processes, which outlive a killed frontend
        child.wait()
    return child.returncode


def _read_result(log_path: Path, start: int, exit_code: int) -> tuple[str | None, str]:
    """The child's status (from its result line) and what else to say: how it ended, and when it did not succeed,
    the last lines of this attempt's output."""
    with log_path.open("rb") as f:
        f.seek(start)
        lines = f.read().decode("utf-8", errors="replace").splitlines()
    results = [line for line in lines if line.startswith(RESULT_MARKER)]
    if exit_code == 0 and results:
        return json.loads(results[-1][len(RESULT_MARKER) :])["status"], ""
    how = f"killed by {_signal_name(-exit_code)}" if exit_code < 0 else f"exit code {exit_code}"
    return None, "\n".join([how, *lines[-_LOG_TAIL_LINES:]])


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


@contextmanager
def _claimed_cores(count: int) -> Iterator[list[int]]:
    """A block of `count` of this node's cores no other replica on it holds (per-core lock files, released when
    the holder exits or dies); all of them, unbound, when no block is free."""
    cpus = sorted(os.sched_getaffinity(0))
    lock_dir = Path(tempfile.gettempdir()) / "logitcache-cpu-locks"
    lock_dir.mkdir(exist_ok=True)
    for first in range(0, len(cpus) - count + 1, count):
        block = cpus[first : first + count]
        held = []
        for core in block:
            f = (lock_dir / f"core-{core}.lock").open("w")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                break
            held.append(f)
        if len(held) == len(block):
            try:
                yield block
            finally:
                for f in held:
                    f.close()
            return
        for f in held:
            f.close()
    logger.warning("no free block of %d cores among %s: this replica's threads are not bound", count, cpus)
    yield []


def _cpu_env(cores: list[int], engine_workers: int, set_binding: bool) -> dict[str, str]:
    """Threads for a replica on `cores`: torch's count, and vLLM's per-worker binding (unless the user set one)."""
    if not cores:
        return {}
    env = {"OMP_NUM_THREADS": str(max(1, len(cores) // engine_workers))}
    if set_binding and len(cores) >= engine_workers:
        env[BIND_ENV] = cpu_threads_binding(cores, engine_workers)
    return env


# --- the replica's own process ---


def replica_main() -> None:
    """Entry point of a replica's process: `python -c ... CONFIG_JSON`; prints RESULT_MARKER + JSON at the end,
    exits EXIT_REFUSED when the capture refuses its settings or data."""
    from logitcache.pipeline.capture import run_capture
    from logitcache.pipeline.data import BadRowError
    from logitcache.storage import CacheFormatError

    _die_with_parent()
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = CaptureConfig(**json.loads(sys.argv[1]))
    logger.info(
        "replica %d of %d, attempt %s: pid %d", cfg.replica, cfg.num_replicas, os.environ.get(ATTEMPT_ENV), os.getpid()
    )
    on_batch = _kill_hook(cfg)
    try:
        result = run_capture(cfg, on_batch=on_batch, finalize=False)
    except (ValueError, FileNotFoundError, CacheFormatError, BadRowError) as e:
        print(f"replica {cfg.replica} refused: {e}", flush=True)
        sys.exit(EXIT_REFUSED)
    print(RESULT_MARKER + json.dumps({"status": result.status, "summary": result.summary}), flush=True)


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the Ray worker that started it dies (Ray ends workers with SIGKILL, which
    no `finally` survives); the worker runs tasks on its main thread, the thread the signal is tied to."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.environ.get(_PARENT_ENV, str(os.getppid())) != str(os.getppid()):  # it died before prctl
        os._exit(1)


def _kill_hook(cfg: CaptureConfig) -> Callable[[BatchProgress], None] | None:
    """KILL_HOOK_ENV's test hook for this replica and attempt: SIGKILL after S new shards, or None."""
    attempt = int(os.environ.get(ATTEMPT_ENV, "0"))
    specs = [spec.split(":") for spec in os.environ.get(KILL_HOOK_ENV, "").split(",") if spec]
    mine = [s for s in specs if int(s[0]) == cfg.replica and attempt < int(s[2])]
    if not mine:
        return None
    shards, victim = int(mine[0][1]), os.getppid() if mine[0][3:] == ["worker"] else os.getpid()
    pattern = f"{replica_prefix(cfg.replica)}-*.parquet"
    shards_dir = CacheLayout(Path(cfg.output)).shards_dir
    before = len(list(shards_dir.glob(pattern))) if shards_dir.is_dir() else 0

    def maybe_die(_: BatchProgress | None = None) -> None:
        if len(list(shards_dir.glob(pattern))) >= before + shards:
            os.kill(victim, signal.SIGKILL)
            time.sleep(60)  # a killed worker takes this process with it (_die_with_parent)

    if shards == 0:
        maybe_die()
    return maybe_die
