"""Held-out evaluation under several processes (gloo): every rank runs the same number of forwards, so DDP's and
FSDP's per-forward collectives line up and no rank waits forever, and the figures match a single process."""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch

from logitcache.storage import CacheReader
from logitcache.train.config import EvalSettings
from logitcache.train.data import CacheStream
from logitcache.train.evaluate import evaluate
from logitcache.train.student import DistillModel, build_student

# Chosen so that the tiny cache's held-out split makes an odd number of batches that 3 does not divide either
# (the test checks it): with 2 or 3 ranks, some rank has fewer real batches than another.
EVAL_KWARGS: dict[str, Any] = {"eval_fraction": 0.5, "batch_count": 2}
TIMEOUT_S = 120


def _model(cache: str) -> DistillModel:
    student = build_student("tiny-llama", CacheReader(cache), seed=0)
    return DistillModel(student.model, student.vocab_size)


def _rank_main(rank: int, world: int, cache: str, store: str, out: str) -> None:
    """One torchrun-like rank: DDP over gloo, a forward counter, evaluate(); writes its figures to out/rank{r}.json."""
    result: dict[str, Any] = {}
    try:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP

        from logitcache.train.distributed import DistEnv

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        dm = _model(cache)
        forwards = [0]
        dm.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
        env = DistEnv(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
        result["metrics"] = evaluate(DDP(dm), cache, EvalSettings(**EVAL_KWARGS), env=env)
        result["forwards"] = forwards[0]
        dist.destroy_process_group()
    except BaseException:
        result["error"] = traceback.format_exc()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def _run_ranks(cache: str, world: int, tmp: Path) -> list[dict[str, Any]]:
    ctx = torch.multiprocessing.get_context("spawn")
    out = tmp / f"world{world}"
    out.mkdir()
    os.environ["OMP_NUM_THREADS"] = "1"
    procs = [
        ctx.Process(target=_rank_main, args=(r, world, cache, str(tmp / f"store{world}"), str(out)))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    results = [
        json.loads((out / f"rank{r}.json").read_text()) if (out / f"rank{r}.json").exists() else {}
        for r in range(world)
    ]
    assert not hung, (
        f"ranks {hung} of {world} still running after {TIMEOUT_S} s (a collective waits forever): {results}"
    )
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r} of {world} failed:\n{res['error']}"
    return results


def test_every_rank_runs_the_same_forwards_and_returns_the_single_process_figures(
    tiny_cache_dir: Path, tmp_path: Path
) -> None:
    cache = str(tiny_cache_dir)
    stream = CacheStream(cache, seed=0, split="eval", **EVAL_KWARGS)
    num_batches = sum(1 for _ in stream)
    assert num_batches % 2 == 1 and num_batches % 3 != 0, f"{num_batches} held-out batches: change EVAL_KWARGS"
    single = evaluate(_model(cache), cache, EvalSettings(**EVAL_KWARGS))
    for world in (2, 3):
        results = _run_ranks(cache, world, tmp_path)
        forwards = [res["forwards"] for res in results]
        assert forwards == [-(-num_batches // world)] * world, (world, forwards)
        for res in results:
            assert res["metrics"]["positions"] == single["positions"]
            assert res["metrics"] == pytest.approx(single, rel=1e-9), (world, res["metrics"], single)
