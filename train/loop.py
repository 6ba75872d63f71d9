"""The training recipe: stream the cache, distill the student, log, evaluate, checkpoint, resume exactly."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from logitcache.storage import CacheReader
from logitcache.train.checkpoint import (
    CONFIG_NAME,
    latest_checkpoint,
    load_trainer_state,
    save_checkpoint,
    save_final,
)
from logitcache.train.config import ConfigError, KDSettings, TrainConfig
from logitcache.train.cpu_malloc import tune_cpu_malloc
from logitcache.train.data import CacheStream, steps_for_epochs
from logitcache.train.distributed import DistEnv, all_reduce_sum, gather_to_rank0, init_distributed, shutdown
from logitcache.train.evaluate import evaluate
from logitcache.train.packing import packing_problem
from logitcache.train.rounds import InitPoint, init_point, learning_rate, schedule_total
from logitcache.train.student import DistillModel, Student, build_student
from logitcache.train.tracking import Tracker, open_tracker

__all__ = ["train", "RESUMABLE_CHANGES", "CONFIG_NAME", "METRICS_NAME"]

log = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
# Options that may change between a run and its --resume without changing the batches or the math.
RESUMABLE_CHANGES = frozenset(
    {
        "steps",
        "epochs",
        "eval_every",
        "eval_max_sequences",
        "save_every",
        "keep_checkpoints",
        "log_every",
        "resume",
        "progress",
        "output",
        "cache",
        "tokenizer",
        "student",
        "compile",
        "pack",  # the same sequences per batch with a count; with a token budget the stream refuses a change
        "fused_loss",  # the same loss and gradients (equal to rounding), computed in one pass or by the reference
        "report_to",
    }
)


def _autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bfloat16 autocast on CUDA (when auto or asked), float32 (no autocast) on CPU unless asked."""
    if cfg.dtype == "float32":
        return None
    if cfg.dtype == "bfloat16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None


def _optimizer(model: nn.Module, cfg: TrainConfig, lr: float, device: torch.device) -> torch.optim.Optimizer:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            # biases and norm gains (1-D) are not decayed: shrinking them only hurts
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def _scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total: int) -> Any:
    from transformers import get_scheduler

    warmup = int(cfg.warmup) if cfg.warmup >= 1 else round(cfg.warmup * total)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.schedule]
    return get_scheduler(name, opt, num_warmup_steps=min(warmup, total), num_training_steps=total)


def _check_resume(run_dir: Path, cfg: TrainConfig, reader: CacheReader) -> Path | None:
    """The checkpoint to resume from (None: a fresh run); refuses to overwrite a run or to change its math."""
    saved = run_dir / CONFIG_NAME
    if not cfg.resume:
        if saved.exists():
            raise ConfigError(
                f"`--output {run_dir}` already holds a run ({saved}); pass `--resume` to continue it, or choose "
                "another --output"
            )
        return None
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        if saved.exists():
            raise ConfigError(f"`--resume`: {run_dir} has no complete checkpoint yet; delete it and start again")
        return None  # nothing to resume: a fresh run
    doc = json.loads(saved.read_text())
    old, new = doc["train"], cfg.to_dict()
    changed = sorted(k for k in new if k not in RESUMABLE_CHANGES and k in old and old[k] != new[k] and k != "lr")
    if cfg.lr is not None and old.get("lr") != cfg.lr:
        changed.append("lr")
    if changed:
        diffs = ", ".join(f"--{k.replace('_', '-')} {old[k]!r} -> {new[k]!r}" for k in changed)
        raise ConfigError(
            f"`--resume` would change {diffs}: the resumed run would not continue the same training. Resume with "
            f"the original options (see {saved}), or start a new run in another --output"
        )
    _check_same_cache(doc, reader, saved)
    return ckpt


def _check_same_cache(doc: dict[str, Any], reader: CacheReader, saved: Path) -> None:
    """`--cache` may move (a copy of the same shards) between a run and its resume, never change content."""
    old_id = doc.get("resolved", {}).get("cache_id")
    old_path = doc["train"]["cache"]
    if old_id is None:  # a run from before cache ids were recorded: only the same path can be trusted
        if old_path != reader.path:
            raise ConfigError(
                f"`--resume --cache {reader.path}`: the run was trained on {old_path} and records no cache id to "
                "check a moved copy against; resume with the original --cache path"
            )
        return
    if old_id != reader.content_id:
        raise ConfigError(
            f"`--resume --cache {reader.path}` is a different cache (content id {reader.content_id[:16]}, "
            f"teacher {reader.manifest['teacher'].get('name')!r}) from the one this run was trained on ({old_path}, "
            f"content id {old_id[:16]}; see {saved}). Resume with that cache (a moved copy is fine), or start a new "
            "run in another --output"
        )


class _Metrics:
    """metrics.jsonl writer (rank 0): one JSON object per line; on resume, lines after the checkpoint are dropped.
    Each record also goes to the `--report-to` tracker (train/tracking.py)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None, tracker: Tracker | None = None) -> None:
        self.path, self.enabled, self.tracker = path, enabled, tracker
        if enabled and resume_step is not None and path.exists():
            keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resume_step]
            path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.tracker is not None:
                self.tracker.log(int(record["step"]), record)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _wrap(dm: DistillModel, cfg: TrainConfig, env: DistEnv) -> nn.Module:
    """DDP for several processes; FSDP2 (`fully_shard` per decoder layer, then the whole) with --fsdp on CUDA."""
    if cfg.fsdp:
        if env.device.type != "cuda":
            raise ConfigError("`--fsdp` needs CUDA GPUs; on CPU drop it (DDP over gloo is used with torchrun)")
        from torch.distributed.fsdp import fully_shard

        for layer in dm.model.get_decoder().layers:
            fully_shard(layer)
        fully_shard(dm)
        return dm
    if env.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(dm, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    return dm


BatchHook = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def train(cfg: TrainConfig, batch_hook: BatchHook | None = None) -> dict[str, Any]:
    """Runs (or resumes) a student run as configured; returns the final metrics (rank 0; {} elsewhere).

    batch_hook: called on every training batch (on the device) before the loss; it may replace the teacher
    arrays, e.g. the benchmarks' live-teacher row puts the resident teacher's full distribution there.
    """
    env = init_distributed()
    if env.device.type == "cpu":
        tune_cpu_malloc()  # the loss's [chunk, V] buffers would be mmapped and faulted in every step (cpu_malloc.py)
    try:
        return _train(cfg, env, batch_hook)
    finally:
        shutdown()


@dataclass
class _Run:
    """Everything the steps of a run share once it is set up (or restored)."""

    cfg: TrainConfig
    env: DistEnv
    run_dir: Path
    student: Student
    dm: DistillModel
    model: nn.Module  # dm, wrapped for DDP/FSDP
    opt: torch.optim.Optimizer
    sched: Any
    loader: Any  # torchdata StatefulDataLoader
    batches: Iterator[dict[str, torch.Tensor]]
    metrics: _Metrics
    amp: torch.dtype | None
    total: int
    start: int
    tokens_seen: int
    batch_hook: BatchHook | None
    bar: Any = None


def _train(cfg: TrainConfig, env: DistEnv, batch_hook: BatchHook | None = None) -> dict[str, Any]:
    run = _set_up(cfg, env, batch_hook)
    cfg = run.cfg
    last: dict[str, Any] = {}
    for step in range(run.start + 1, run.total + 1):
        last = _train_step(run, step)
        _log(run, last)
        if (cfg.save_every and step % cfg.save_every == 0) or step == run.total:
            _save_checkpoint(run, step)
        if step == run.total:
            # The final weights first: an evaluation that fails (or hangs) must not cost the trained student.
            _save_final(run)
        if ((cfg.eval_every and step % cfg.eval_every == 0) or step == run.total) and cfg.eval_fraction > 0:
            _evaluate(run, step)
    if run.bar is not None:
        run.bar.close()
    run.metrics.close()
    return last if env.is_main else {}


def _set_up(cfg: TrainConfig, env: DistEnv, batch_hook: BatchHook | None) -> _Run:
    """Checks the options against the cache and the run directory, builds the student, optimizer and stream, and
    restores them from the latest checkpoint on --resume."""
    run_dir = Path(cfg.output)
    reader = CacheReader(cfg.cache)
    target_mode = reader.targets.mode
    problems = cfg.cache_problems(target_mode, reader.top_k, reader.path)
    if problems:
        raise ConfigError("invalid training options for this cache:\n  - " + "\n  - ".join(problems))
    ckpt, state = _resume_point(run_dir, cfg, reader, env)
    init, init_state = init_point(cfg, run_dir)
    weights = ckpt or (init.checkpoint if init else None)
    student = build_student(str(weights) if weights else cfg.student, reader, cfg.tokenizer, cfg.seed)
    if cfg.pack and (why := packing_problem(student.model)):
        log.warning("not packing sequences (as --no-pack): %s", why)
        cfg = cfg.replace(pack=False)
    cfg = cfg.replace(lr=learning_rate(cfg, state, init_state, student))
    steps = cfg.steps or steps_for_epochs(
        reader.manifest,
        cfg.epochs or 1.0,
        cfg.eval_fraction,
        cfg.batch_count,
        cfg.batch_unit,
        cfg.grad_accum,
        env.world_size,
    )
    total = (init.step if init else 0) + steps  # the last step: steps are numbered on from a --init-from run's
    schedule_end = schedule_total(cfg, init, total)
    if env.is_main:
        _write_config(run_dir, cfg, env, reader, student, total, schedule_end, init)
    dm = _distill_model(student, cfg.kd_settings(target_mode), cfg, env)
    model = _wrap(dm, cfg, env)
    opt = _optimizer(dm, cfg, float(cfg.lr or 0.0), env.device)
    sched = _scheduler(opt, cfg, schedule_end)
    loader = _loader(cfg, env)
    start, tokens_seen = (init.step, init.tokens_seen) if init else (0, 0)
    if state is not None:
        start, tokens_seen = _restore(state, cfg, env, dm, opt, sched, loader)
        if env.is_main:
            log.warning("resuming %s from %s (step %d of %d)", run_dir, ckpt, start, total)
    elif init_state is not None:
        _restore_optimizer(init_state, cfg, dm, opt, sched)
        if env.is_main:
            log.warning("continuing %s from %s (step %d, to step %d)", run_dir, weights, start, total)
    run = _Run(
        cfg=cfg,
        env=env,
        run_dir=run_dir,
        student=student,
        dm=dm,
        model=model,
        opt=opt,
        sched=sched,
        loader=loader,
        batches=iter(loader),
        metrics=_Metrics(
            run_dir / METRICS_NAME,
            env.is_main,
            start if state is not None else None,
            open_tracker(cfg.report_to, run_dir, cfg.to_dict(), env.is_main, start if state is not None else None),
        ),
        amp=_autocast_dtype(cfg, env.device),
        total=total,
        start=start,
        tokens_seen=tokens_seen,
        batch_hook=batch_hook,
    )
    if env.is_main and cfg.progress:
        from tqdm.auto import tqdm

        run.bar = tqdm(total=total, initial=start, desc="train-student", unit="step", dynamic_ncols=True)
    return run


def _resume_point(
    run_dir: Path, cfg: TrainConfig, reader: CacheReader, env: DistEnv
) -> tuple[Path | None, dict[str, Any] | None]:
    """(checkpoint, its trainer state) to resume from, or (None, None) for a fresh run."""
    ckpt = _check_resume(run_dir, cfg, reader)
    state = load_trainer_state(ckpt) if ckpt is not None else None
    if state is not None and state["world_size"] != env.world_size:
        raise ConfigError(
            f"`--resume`: the checkpoint {ckpt} was written by {state['world_size']} processes, this run has "
            f"{env.world_size}; resume with the same torchrun --nproc-per-node (the data stream is per rank)"
        )
    return ckpt, state


def _write_config(
    run_dir: Path,
    cfg: TrainConfig,
    env: DistEnv,
    reader: CacheReader,
    student: Student,
    total: int,
    schedule_total: int,
    init: InitPoint | None,
) -> None:
    """RUN_DIR/config.json: the options as given, and what they resolved to (steps, vocabularies, the cache's id)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = {
        "steps": total,
        "schedule_steps": schedule_total,
        "init_from": init.to_dict() if init else None,
        "world_size": env.world_size,
        "student_kind": student.kind,
        "vocab_size": student.vocab_size,
        "cache_top_k": reader.top_k,
        "cache_targets": reader.targets.to_header(),
        "cache_id": reader.content_id,
        "student_logits": int(student.model.get_output_embeddings().weight.shape[0]),
    }
    (run_dir / CONFIG_NAME).write_text(json.dumps({"train": cfg.to_dict(), "resolved": resolved}, indent=2) + "\n")


def _distill_model(student: Student, settings: KDSettings, cfg: TrainConfig, env: DistEnv) -> DistillModel:
    """The student with its loss, on the device, with activation checkpointing and torch.compile as asked."""
    dm = DistillModel(student.model, student.vocab_size, settings).to(env.device)
    if cfg.grad_checkpointing:
        student.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile:
        student.model.get_decoder().compile()
    return dm


def _loader(cfg: TrainConfig, env: DistEnv) -> Any:
    """The training stream of this rank in a StatefulDataLoader (its state is the stream position)."""
    import warnings

    from torchdata.stateful_dataloader import StatefulDataLoader

    # torchdata 0.11 calls a deprecated torch API on every loader start; nothing for a user to act on
    warnings.filterwarnings("ignore", message=".*set_vital.*")
    stream = CacheStream(
        cfg.cache,
        seed=cfg.seed,
        batch_count=cfg.batch_count,
        batch_unit=cfg.batch_unit,
        eval_fraction=cfg.eval_fraction,
        split="train",
        rank=env.rank,
        world_size=env.world_size,
        top_k_used=cfg.top_k_used,
        shuffle_parts=cfg.shuffle_parts,
        pack=cfg.pack,
    )
    return StatefulDataLoader(
        stream,
        batch_size=None,
        num_workers=cfg.num_workers,
        pin_memory=env.device.type == "cuda",
        persistent_workers=False,
        snapshot_every_n_steps=1,
    )


def _restore(
    state: dict[str, Any],
    cfg: TrainConfig,
    env: DistEnv,
    dm: DistillModel,
    opt: torch.optim.Optimizer,
    sched: Any,
    loader: Any,
) -> tuple[int, int]:
    """Loads the optimizer, scheduler, stream position and RNG states; returns (step, tokens seen)."""
    _restore_optimizer(state, cfg, dm, opt, sched)
    loader.load_state_dict(state["data"][env.rank])
    rng = state["rng"]  # one entry per rank (a single dict in checkpoints from before CUDA states were kept)
    _set_rng_state(rng[env.rank] if isinstance(rng, list) else rng, env)
    return int(state["step"]), int(state["tokens_seen"])


def _restore_optimizer(
    state: dict[str, Any], cfg: TrainConfig, dm: DistillModel, opt: torch.optim.Optimizer, sched: Any
) -> None:
    """The optimizer's moments and the scheduler's position (its step) from a checkpoint's trainer state."""
    if cfg.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(dm, opt, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])


def _rng_state(env: DistEnv) -> dict[str, Any]:
    """This process's torch RNG states: the CPU generator and, on CUDA, this rank's device generator."""
    out: dict[str, Any] = {"torch": torch.get_rng_state()}
    if env.device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(env.device)
    return out


def _set_rng_state(rng: dict[str, Any], env: DistEnv) -> None:
    torch.set_rng_state(rng["torch"])
    if env.device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], env.device)


def _train_step(run: _Run, step: int) -> dict[str, Any]:
    """One optimizer step over `grad_accum` micro-batches; returns its metrics record."""
    cfg, env = run.cfg, run.env
    t_step = time.perf_counter()
    micro = [next(run.batches) for _ in range(cfg.grad_accum)]
    counts = torch.tensor(
        [float(sum(int(b["num_positions"]) for b in micro)), float(sum(int(b["num_tokens"]) for b in micro))],
        dtype=torch.float64,
    )
    counts = all_reduce_sum(counts.to(env.device)).cpu()
    n_pos, n_tok = int(counts[0]), int(counts[1])
    # DDP averages gradients over ranks: divide each rank's sum by (global positions / world) so that the
    # averaged gradient is that of the mean over every loss position of the step, on all ranks together.
    norm = max(n_pos, 1) / env.world_size
    sums = torch.zeros(2, dtype=torch.float64)
    run.model.train()
    for i, b in enumerate(micro):
        b = _to_device(b, env.device)
        if run.batch_hook is not None:
            b = run.batch_hook(b)
        sync = (i == len(micro) - 1) or env.world_size == 1 or cfg.fsdp
        ctx = contextlib.nullcontext() if sync else run.model.no_sync()  # type: ignore[operator]
        with ctx, torch.autocast(env.device.type, dtype=run.amp or torch.float32, enabled=run.amp is not None):
            parts = run.model(b, norm)
            parts.total.backward()
        sums += torch.stack([parts.kd_sum.double().cpu(), parts.ce_sum.double().cpu()])
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.dm.parameters(), max_norm))
    lr = float(run.sched.get_last_lr()[0])
    run.opt.step()
    run.sched.step()
    run.opt.zero_grad(set_to_none=True)
    sums = all_reduce_sum(sums.to(env.device)).cpu()
    run.tokens_seen += n_tok
    now = time.perf_counter()
    kd, ce = float(sums[0]) / max(n_pos, 1), float(sums[1]) / max(n_pos, 1)
    return {
        "step": step,
        "loss": cfg.alpha * cfg.temperature**2 * kd + (1 - cfg.alpha) * ce,
        "kd_loss": kd,
        "ce_loss": ce,
        "lr": lr,
        "grad_norm": grad_norm,
        "positions": n_pos,
        "tokens": n_tok,
        "tokens_seen": run.tokens_seen,
        "tokens_per_second": n_tok / max(now - t_step, 1e-9),
        "step_seconds": now - t_step,
    }


def _log(run: _Run, record: dict[str, Any]) -> None:
    """metrics.jsonl every `log_every` steps (and the last), and the progress bar."""
    if record["step"] % run.cfg.log_every == 0 or record["step"] == run.total:
        run.metrics.write(record)
        if run.bar is not None:
            run.bar.set_postfix(
                loss=f"{record['loss']:.4f}",
                kd=f"{record['kd_loss']:.4f}",
                ce=f"{record['ce_loss']:.4f}",
                tok_s=f"{record['tokens_per_second']:.0f}",
                refresh=False,
            )
    if run.bar is not None:
        run.bar.update(1)


def _evaluate(run: _Run, step: int) -> None:
    result = evaluate(run.model, run.cfg.cache, run.cfg.eval_settings(), autocast=run.amp, env=run.env)
    run.metrics.write({"step": step, "eval": result})
    if run.env.is_main:
        _plot(run.run_dir)


def _save_checkpoint(run: _Run, step: int) -> None:
    """checkpoints/step-N: weights, tokenizer and everything `_restore` needs (every rank takes part)."""
    data_states = gather_to_rank0(run.loader.state_dict())
    rng_states = gather_to_rank0(_rng_state(run.env))
    weights, opt_state = _full_states(run.dm, run.opt, run.cfg)
    if run.env.is_main:
        trainer_state = {
            "step": step,
            "tokens_seen": run.tokens_seen,
            "world_size": run.env.world_size,
            "lr": run.cfg.lr,
            "optimizer": opt_state,
            "scheduler": run.sched.state_dict(),
            "data": data_states,
            "rng": rng_states,
        }
        save_checkpoint(
            run.run_dir, step, run.dm.model, run.student.tokenizer, trainer_state, run.cfg.keep_checkpoints, weights
        )


def _save_final(run: _Run) -> None:
    weights, _ = _full_states(run.dm, None, run.cfg)
    if run.env.is_main:
        save_final(run.run_dir, run.dm.model, run.student.tokenizer, weights)
        _plot(run.run_dir)


def _full_states(
    dm: nn.Module, opt: torch.optim.Optimizer | None, cfg: TrainConfig
) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any] | None]:
    """(student weights, optimizer state) as full, unsharded state dicts for saving.

    Without FSDP: (None, opt.state_dict()); save_pretrained reads the weights itself. With FSDP every rank takes
    part in the all-gather and the result (offloaded to CPU) is used on rank 0.
    """
    if not cfg.fsdp:
        return None, opt.state_dict() if opt is not None else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(dm, options=options)
    weights: dict[str, Any] = {k.removeprefix("model."): v for k, v in full.items()}
    opt_state: Any = get_optimizer_state_dict(dm, opt, options=options) if opt is not None else None
    return weights, opt_state


def _plot(run_dir: Path) -> None:
    try:
        from logitcache.train.plot import plot_metrics

        plot_metrics(run_dir)
    except Exception as e:  # a plot must never fail a run
        log.warning("could not plot %s: %s", run_dir / METRICS_NAME, e)
