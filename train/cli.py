"""`logitcache train-student` and `logitcache eval` (click). Imports only click, the stdlib and the config here;
torch and transformers load when a command runs, so `logitcache --help` stays fast."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from logitcache.storage.options import ConfigFileError, config_options, load_config_file
from logitcache.train.config import (
    DTYPES,
    LOSSES,
    REPORT_TO,
    SCHEDULES,
    ConfigError,
    EvalSettings,
    KDSettings,
    TrainConfig,
)

__all__ = ["train_student", "eval_cmd"]

_CHOICES = {"loss": LOSSES, "schedule": SCHEDULES, "dtype": DTYPES, "report_to": REPORT_TO}


def _resolve(config_file: str | None, flags: dict[str, Any]) -> TrainConfig:
    """File values, overridden by the flags given on the command line."""
    try:
        values: dict[str, Any] = load_config_file(config_file, section="train") if config_file else {}
    except ConfigFileError as e:
        raise ConfigError(str(e)) from None
    values.update({k: v for k, v in flags.items() if v is not None})
    for required in ("cache", "student", "output"):
        values.setdefault(required, "")
    return TrainConfig.from_dict(values, where=f"--config {config_file}" if config_file else "options")


@click.command("train-student")
@click.option("--config", "config_file", default=None, help="YAML/JSON file of options (flag names); flags override.")
@config_options(TrainConfig, choices=_CHOICES)
def train_student(config_file: str | None, **flags: Any) -> None:
    """Distill a student from a teacher-logit cache: the teacher is not needed.

    Example: logitcache train-student --cache demo_out/cache --student tiny-llama --output demo_out/student
    """
    try:
        cfg = _resolve(config_file, flags)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    from logitcache.storage import CacheFormatError
    from logitcache.train.loop import train
    from logitcache.train.student import StudentError

    _quiet_hf()

    try:
        last = train(cfg)
    except (ConfigError, StudentError, CacheFormatError) as e:
        raise click.ClickException(str(e)) from None
    if last:
        click.echo(
            f"done: step {last['step']}  loss {last['loss']:.4f} (KD {last['kd_loss']:.4f}, CE {last['ce_loss']:.4f})"
            f"  -> {Path(cfg.output) / 'final'}"
        )


def _quiet_hf() -> None:
    """transformers' per-file load/save bars would interleave with the training bar."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _student_dir(student: str) -> tuple[str, dict[str, Any]]:
    """A model directory to load and the run's options (if `student` is a run directory)."""
    p = Path(student)
    run_cfg = p / "config.json"
    if run_cfg.is_file() and "train" in (doc := json.loads(run_cfg.read_text())):
        if (p / "final").is_dir():
            return str(p / "final"), doc["train"]
        from logitcache.train.checkpoint import latest_checkpoint

        ckpt = latest_checkpoint(p)
        if ckpt is None:
            raise click.ClickException(f"{student}: a run directory with neither final/ nor a checkpoint yet")
        return str(ckpt), doc["train"]
    return student, {}


@click.command("eval")
@click.option("--cache", required=True, help="Cache directory written by `logitcache cache-teacher`.")
@click.option("--student", required=True, help="A train-student run directory (uses final/) or an HF model directory.")
@click.option("--tokenizer", default=None, help="Tokenizer directory; default: the manifest's tokenizer.name.")
@click.option(
    "--eval-fraction",
    type=float,
    default=None,
    help="Held-out share of sequence ids; default: the run's own, else 0.05. Use 1 for a cache never trained on "
    "(e.g. captured from held-out files).",
)
@click.option(
    "--max-sequences", type=int, default=0, show_default=True, help="Evaluate at most N held-out sequences (0: all)."
)
@click.option(
    "--batch-size", default="8", show_default=True, help="Sequences (8) or padded tokens (4096tok) per batch."
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def eval_cmd(
    cache: str,
    student: str,
    tokenizer: str | None,
    eval_fraction: float | None,
    max_sequences: int,
    batch_size: str,
    as_json: bool,
) -> None:
    """Held-out CE/perplexity, KL(teacher || student) and top-1 agreement of a student on a cache."""
    from logitcache.train.config import parse_batch_size

    try:
        count, unit = parse_batch_size(batch_size)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    model_dir, run = _student_dir(student)
    fraction = eval_fraction if eval_fraction is not None else float(run.get("eval_fraction", 0.05))
    if not 0 < fraction <= 1:
        raise click.UsageError(f"`--eval-fraction` must be in (0, 1], got {fraction}")

    from logitcache.storage import CacheFormatError, CacheReader
    from logitcache.train.evaluate import EVAL_FIELDS, evaluate
    from logitcache.train.student import DistillModel, StudentError, build_student

    _quiet_hf()

    try:
        reader = CacheReader(cache)
        built = build_student(model_dir, reader, tokenizer or run.get("tokenizer"))
        dm = DistillModel(built.model, built.vocab_size, KDSettings(chunk_size=int(run.get("kd_chunk_size", 512))))
        result = evaluate(
            dm, cache, EvalSettings(fraction, batch_count=count, batch_unit=unit, max_sequences=max_sequences)
        )
    except (StudentError, CacheFormatError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    result = {"student": model_dir, "cache": cache, "eval_fraction": fraction, **result}
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"student {model_dir} on {cache} (held-out fraction {fraction})")
    for key, meaning in EVAL_FIELDS.items():
        value = result[key]
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        click.echo(f"  {key:<15} {shown:>10}   {meaning}")
