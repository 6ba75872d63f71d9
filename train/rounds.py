"""Continuing a run (`train-student --init-from`, an on-policy round): where it starts, its learning rate and the end
of the schedule it shares with the previous rounds. The weights, AdamW moments and scheduler position come from the
previous run's latest checkpoint; the data stream starts afresh on the new cache."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from logitcache.train.checkpoint import CONFIG_NAME, latest_checkpoint, load_trainer_state
from logitcache.train.config import ConfigError, TrainConfig
from logitcache.train.student import Student

__all__ = ["InitPoint", "init_point", "learning_rate", "schedule_total"]


@dataclass(frozen=True)
class InitPoint:
    """Where a `--init-from` run starts: the previous run's checkpoint and its step, tokens and schedule."""

    run: str
    checkpoint: Path
    step: int
    tokens_seen: int
    schedule_steps: int | None  # the previous run's schedule (None: it recorded none)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "checkpoint": str(self.checkpoint)}


def init_point(cfg: TrainConfig, run_dir: Path) -> tuple[InitPoint | None, dict[str, Any] | None]:
    """(the start of a --init-from run, the previous checkpoint's trainer state); (None, None) without --init-from.
    A resumed --init-from run reads its start from its own config.json (the state then comes from its checkpoint)."""
    if not cfg.init_from:
        return None, None
    saved = run_dir / CONFIG_NAME
    if saved.exists():
        doc = json.loads(saved.read_text())["resolved"]["init_from"]
        return InitPoint(**{**doc, "checkpoint": Path(doc["checkpoint"])}), None
    prev = Path(cfg.init_from)
    ckpt = latest_checkpoint(prev)
    if ckpt is None:
        raise ConfigError(
            f"`--init-from {prev}`: no complete checkpoint (checkpoints/step-N) there; finish or --resume that run first"
        )
    state = load_trainer_state(ckpt)
    prev_resolved = (
        json.loads((prev / CONFIG_NAME).read_text()).get("resolved", {}) if (prev / CONFIG_NAME).exists() else {}
    )
    init = InitPoint(
        str(prev), ckpt, int(state["step"]), int(state["tokens_seen"]), prev_resolved.get("schedule_steps")
    )
    return init, state


def learning_rate(
    cfg: TrainConfig, state: dict[str, Any] | None, init_state: dict[str, Any] | None, student: Student
) -> float:
    """The peak learning rate: a resumed run's (checked by _check_resume), a continued (--init-from) run's, else
    --lr, else a default per kind."""
    if state is not None:
        return float(state["lr"])
    if init_state is not None:
        if cfg.lr is not None and cfg.lr != init_state["lr"]:
            raise ConfigError(
                f"`--lr {cfg.lr}` with `--init-from {cfg.init_from}`: the schedule continues from that run's "
                f"learning rate {init_state['lr']}; leave --lr out"
            )
        return float(init_state["lr"])
    if cfg.lr is not None:
        return cfg.lr
    return 5e-5 if student.kind == "pretrained" else 1e-3


def schedule_total(cfg: TrainConfig, init: InitPoint | None, total: int) -> int:
    """The step where the schedule ends: --schedule-steps, a --init-from run's, or this run's last step. A decaying
    schedule may not run past it (cosine would rise again, linear sit at 0)."""
    inherited = init.schedule_steps if init and not cfg.schedule_steps else None
    out = cfg.schedule_steps or inherited or total
    if cfg.schedule != "constant" and total > out:
        source = "the --init-from run's" if inherited else "`--schedule-steps`"
        raise ConfigError(
            f"this run ends at step {total}, past the end of the {cfg.schedule} schedule ({source}: step {out}); "
            "give `--schedule-steps` the last step of the last round"
        )
    return out
