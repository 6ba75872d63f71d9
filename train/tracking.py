"""Experiment tracking for train-student (`--report-to tensorboard|wandb|none`), next to metrics.jsonl.

Every record the run writes to metrics.jsonl goes to the tracker too, at its `step`: a training step's numbers as
`train/<name>` (train/loss, train/kd_loss, train/ce_loss, train/lr, ...), an evaluation's as `eval/<name>`
(eval/ce, eval/kl, ...). Rank 0 alone reports. TensorBoard writes RUN_DIR/tensorboard (a resumed run drops the events
after its checkpoint, as metrics.jsonl does); Weights & Biases runs in the mode of `WANDB_MODE` (online, offline,
disabled), with its files under RUN_DIR/wandb, and a resumed run continues the same wandb run.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from logitcache.train.config import REPORT_TO, ConfigError

__all__ = ["REPORT_TO", "Tracker", "open_tracker", "scalars"]

log = logging.getLogger(__name__)

_INSTALL = "pip install 'logitcache[tracking]'"
_TENSORBOARD_DIR = "tensorboard"
_WANDB_ID_FILE = "wandb-run-id"  # the wandb run of this run directory, so that --resume continues it


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics.jsonl record under their tracker names (`train/...` or `eval/...`); `step`
    is the x axis, not a scalar."""
    if isinstance(record.get("eval"), Mapping):
        prefix, values = "eval/", record["eval"]
    else:
        prefix, values = "train/", record
    out = {}
    for key, value in values.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key != "step" and number and math.isfinite(value):
            out[prefix + key] = float(value)
    return out


class Tracker:
    """Sends metrics records to TensorBoard or wandb (`kind`); kind "none" (and every rank but 0) does nothing."""

    def __init__(self, kind: str, run_dir: Path, config: Mapping[str, Any], resume_step: int | None = None) -> None:
        if kind not in REPORT_TO:
            raise ConfigError(f"`--report-to {kind}` is unknown; choose one of {', '.join(REPORT_TO)}")
        self.kind = kind
        self._writer: Any = None
        self._wandb_run: Any = None
        if kind == "tensorboard":
            self._writer = _tensorboard_writer(run_dir / _TENSORBOARD_DIR, resume_step)
        elif kind == "wandb":
            self._wandb_run = _wandb_run(run_dir, config, resume_step is not None)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Reports a metrics.jsonl record (its numbers, see `scalars`) at `step`."""
        values = scalars(metrics)
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(name, value, global_step=step)
        elif self._wandb_run is not None:
            self._wandb_run.log(values, step=step)

    def close(self) -> None:
        """Flushes and closes the writer or finishes the wandb run (a no-op after the first call)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def open_tracker(
    kind: str, run_dir: Path, config: Mapping[str, Any], enabled: bool, resume_step: int | None = None
) -> Tracker:
    """The run's tracker: `kind` on rank 0 (`enabled`), "none" elsewhere. resume_step: the checkpoint's step when
    resuming (later TensorBoard events are dropped; the wandb run is continued)."""
    return Tracker(kind if enabled else "none", run_dir, config, resume_step)


def _tensorboard_writer(log_dir: Path, resume_step: int | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch raises this when the tensorboard package is missing
        raise ConfigError(f"`--report-to tensorboard` needs the tensorboard package ({e}); {_INSTALL}") from None
    purge = resume_step + 1 if resume_step is not None else None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge)


def _wandb_run(run_dir: Path, config: Mapping[str, Any], resume: bool) -> Any:
    try:
        import wandb
    except ImportError:
        raise ConfigError(f"`--report-to wandb` needs the wandb package: pip install wandb (or {_INSTALL})") from None
    run_dir.mkdir(parents=True, exist_ok=True)
    id_file = run_dir / _WANDB_ID_FILE
    run_id = id_file.read_text().strip() if resume and id_file.is_file() else secrets.token_hex(4)
    run = wandb.init(
        project=os.environ.get("WANDB_PROJECT", "logitcache"),
        name=run_dir.name,
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        config=dict(config),
        mode=os.environ.get("WANDB_MODE"),  # type: ignore[arg-type]
    )
    id_file.write_text(run_id + "\n")
    log.info("reporting to wandb run %s (%s)", run_id, os.environ.get("WANDB_MODE", "online"))
    return run
