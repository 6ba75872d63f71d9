"""`logitcache cache-teacher`, `generate` and `demo-teacher` (click; torch/vllm are imported only when they run)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from logitcache.pipeline.config import CHOICES, GENERATE_CHOICES, CaptureConfig, GenerateConfig
from logitcache.storage.options import config_options

__all__ = ["cache_teacher", "demo_teacher", "generate"]


def _parse_engine_args(pairs: tuple[str, ...]) -> dict[str, Any] | None:
    """`KEY=VALUE` pairs -> dict; VALUE is JSON when it parses (numbers, true/false, lists), else a string."""
    if not pairs:
        return None
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--engine-arg")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


# The options both engine commands write by hand (the rest come from their config's fields).
_config_file_option = click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="YAML/JSON file of these settings (field or flag names); flags override it.",
)
_engine_arg_option = click.option(
    "--engine-arg", "engine_arg", multiple=True, metavar="KEY=VALUE", help="Extra vLLM LLM(...) argument (repeatable)."
)


class _ProgressBar:
    """A tqdm bar opened at the first report (nothing prints while the engine starts), or nothing when disabled."""

    def __init__(self, enabled: bool, unit: str, desc: str) -> None:
        self.enabled, self.unit, self.desc = enabled, unit, desc
        self._bar: Any = None

    def update(self, done: int, total: int, **postfix: Any) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=done, unit=self.unit, desc=self.desc, dynamic_ncols=True)
        self._bar.update(done - self._bar.n)
        self._bar.set_postfix(**postfix)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@click.command("cache-teacher")
@_config_file_option
@_engine_arg_option
@config_options(CaptureConfig, choices=CHOICES, exclude=("engine_args",))
def cache_teacher(config_file: str | None, engine_arg: tuple[str, ...], **flags: Any) -> None:
    """Run the teacher over a dataset and store its distributions (top-k, adaptive or sampled) in a cache directory."""
    from logitcache.storage import CacheFormatError

    try:
        cfg = CaptureConfig.from_sources(config_file, engine_args=_parse_engine_args(engine_arg), **flags)
    except (ValueError, FileNotFoundError) as e:
        raise click.UsageError(str(e)) from None

    from logitcache.pipeline.capture import BatchProgress, run_capture
    from logitcache.pipeline.data import BadRowError
    from logitcache.pipeline.launch_ray import LaunchError, launch_ray

    bar = _ProgressBar(cfg.progress, unit="row", desc=f"replica {cfg.replica}")

    def on_batch(p: BatchProgress) -> None:
        bar.update(p.rows_done, p.rows_total, seqs=p.sequences, tok_s=f"{p.tokens_per_second:,.0f}")

    try:
        if cfg.generate:
            from logitcache.pipeline.gen_capture import run_generate_capture

            result = run_generate_capture(cfg, on_batch=on_batch)
        elif cfg.launcher == "ray":  # every replica, on the Ray cluster; the manifest is written once at the end
            result = launch_ray(cfg)
        else:
            result = run_capture(cfg, on_batch=on_batch)
    except (ValueError, FileNotFoundError, CacheFormatError, BadRowError, LaunchError) as e:
        raise click.ClickException(str(e)) from None
    finally:
        bar.close()
    if result.status == "already_finished":
        click.echo(f"{result.cache_dir} is already a finished cache: nothing to do.", err=True)
    elif result.status == "replica_done":
        click.echo(
            f"replica {cfg.replica} of {cfg.num_replicas} done ({result.summary.get('sequences', 0)} sequences); "
            f"the last replica to finish (or `logitcache finalize {result.cache_dir}`) writes the manifest.",
            err=True,
        )
    else:
        assert result.manifest is not None
        totals = result.manifest["totals"]
        click.echo(
            f"cache finished: {result.cache_dir} ({totals['num_sequences']} sequences, {totals['num_tokens']} tokens, "
            f"skipped rows {totals.get('skipped_rows') or 'none'})",
            err=True,
        )


@click.command("generate")
@_config_file_option
@_engine_arg_option
@click.option(
    "--stop",
    "stop",
    multiple=True,
    help="A string that ends a response (repeatable); not included in it; finish_reason `stop`.",
)
@config_options(GenerateConfig, choices=GENERATE_CHOICES, exclude=("engine_args", "stop"))
def generate(config_file: str | None, engine_arg: tuple[str, ...], stop: tuple[str, ...], **flags: Any) -> None:
    """Have a model (teacher or student checkpoint) answer a prompt set through vLLM: OUTPUT/data.jsonl, chat rows
    that `cache-teacher --messages-field messages` scores as they are."""
    try:
        cfg = GenerateConfig.from_sources(
            config_file, engine_args=_parse_engine_args(engine_arg), stop=stop or None, **flags
        )
    except (ValueError, FileNotFoundError) as e:
        raise click.UsageError(str(e)) from None

    from logitcache.pipeline.generate import GenerateProgress, run_generate

    bar = _ProgressBar(cfg.progress, unit="prompt", desc="generate")

    def on_batch(p: GenerateProgress) -> None:
        bar.update(p.rows_done, p.rows_total, responses=p.samples)

    try:
        result = run_generate(cfg, on_batch=on_batch)
    except (ValueError, FileNotFoundError) as e:  # UnsupportedRoleError is a ValueError
        raise click.ClickException(str(e)) from None
    finally:
        bar.close()
    counts = result.generation.get("counts", {})
    verb = "already finished" if result.status == "already_finished" else "finished"
    click.echo(
        f"generation {verb}: {result.output} ({counts.get('samples')} responses, finish reasons "
        f"{counts.get('finish_reasons')}, skipped prompts {counts.get('skipped_prompts') or 'none'})",
        err=True,
    )


@click.command("demo-teacher")
@click.option("--output", default="demo_out", show_default=True, help="Directory for teacher/ and data/.")
@click.option("--steps", type=int, default=None, help="Training steps [default: 400, also bounded by --max-seconds].")
@click.option("--max-seconds", type=float, default=None, help="Training time budget in seconds [default: 100].")
@click.option("--quick", is_flag=True, help="The seconds-scale 2-layer, 64-dim teacher the tests use.")
@click.option("--force", is_flag=True, help="Rebuild even when OUTPUT holds a demo built with the same settings.")
def demo_teacher(output: str, steps: int | None, max_seconds: float | None, quick: bool, force: bool) -> None:
    """Build a small teacher (BPE tokenizer + Llama trained on stdlib source) and demo datasets, offline."""
    import dataclasses
    import logging

    from logitcache.pipeline.demo_teacher import DemoSpec, build_demo

    logging.getLogger("logitcache.pipeline.demo_teacher").setLevel(logging.INFO)
    spec = DemoSpec.quick() if quick else DemoSpec()
    overrides: dict[str, Any] = {
        k: v for k, v in {"steps": steps, "max_train_seconds": max_seconds}.items() if v is not None
    }
    spec = dataclasses.replace(spec, **overrides)
    out = build_demo(Path(output), spec, force=force)
    click.echo(f"demo teacher: {out / 'teacher'}; data: {out / 'data'}", err=True)
