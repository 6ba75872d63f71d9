"""The `logitcache` command group, plus the cache commands that need no ML stack: inspect, verify, finalize.

Subcommands are discovered through the `logitcache.commands` entry-point group (see pyproject.toml), so this
module never imports the capture or training stages, and `logitcache --help` stays fast: each stage's CLI
module imports torch/vllm only inside the command that runs.
"""

from __future__ import annotations

import json
import logging
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

if TYPE_CHECKING:  # the CLI imports the reader inside commands, so `logitcache --help` stays fast
    from logitcache.storage.reader import CacheReader
    from logitcache.storage.records import CachedSequence, RowGroup

__all__ = ["main"]

_GROUP = "logitcache.commands"


class _EntryPointGroup(click.Group):
    """A click group whose commands are entry points, loaded when listed or called."""

    def _eps(self) -> dict[str, Any]:
        return {ep.name: ep for ep in entry_points(group=_GROUP)}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(self._eps())

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        ep = self._eps().get(cmd_name)
        if ep is None:
            return None
        try:
            cmd: click.Command = ep.load()
        except ImportError as e:
            # A storage-only install (no `ml` extra) still lists the stage commands and says what is missing.
            msg = f"`logitcache {cmd_name}` is unavailable: {e}. Install the stack with `pip install 'logitcache[ml]'`."

            def unavailable() -> None:
                raise click.ClickException(msg)

            return click.Command(cmd_name, callback=unavailable, help=f"(unavailable: {e})")
        return cmd


@click.group(cls=_EntryPointGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """logitcache: cache a teacher's sparse distributions once, distill students from the cache many times."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _load_tokenizer(cache_dir: str, name: str | None) -> Any:
    """A `tokenizers.Tokenizer` from the cache's own copy or the recorded local dir, or None (ids only)."""
    from logitcache.storage.layout import CacheLayout

    for folder in (CacheLayout(Path(cache_dir)).tokenizer_dir, Path(name) if name else None):
        if folder is not None and (folder / "tokenizer.json").exists():
            try:
                from tokenizers import Tokenizer

                return Tokenizer.from_file(str(folder / "tokenizer.json"))
            except Exception:  # the summary is still useful without token strings
                return None
    return None


def _summary(r: CacheReader, group: RowGroup | None) -> dict[str, Any]:
    """The manifest summary `inspect --json` prints, with the first row group's head mass and entries per position."""
    m = r.manifest
    totals = m["totals"]
    head_mass = entries = float("nan")
    if group is not None and group.tail_mass.size > 0:
        head_mass = float(np.mean(1.0 - group.tail_mass))
        entries = float(np.mean((group.entry_ids >= 0).sum(axis=1)))
    return {
        "format_version": r.format_version,
        "teacher": m["teacher"],
        "tokenizer": {k: m["tokenizer"].get(k) for k in ("name", "fingerprint", "vocab_size", "padded_vocab_size")},
        "capture": {k: v for k, v in m["capture"].items()},
        "targets": r.targets.to_header(),
        "dataset": m["dataset"],
        "totals": totals,
        "bytes_per_token": totals["num_bytes"] / max(totals["num_tokens"], 1),
        "num_shards": len(r.shards),
        "mean_head_mass_first_row_group": head_mass,
        "mean_entries_per_position_first_row_group": entries,
    }


def _echo_header(cache_dir: str, m: dict[str, Any], summary: dict[str, Any]) -> None:
    """The summary's lines: cache, teacher, tokenizer, capture and target mode, dataset, sizes, head mass."""
    totals = m["totals"]
    t = m["teacher"]
    click.echo(f"cache        {cache_dir}  (format v{m['format_version']}, logitcache {m.get('logitcache_version')})")
    click.echo(
        f"teacher      {t['name']}  dtype={t['dtype']} backend={t['backend']} engine={t.get('engine_version')} "
        f"tp={t.get('tensor_parallel_size', 1)} pp={t.get('pipeline_parallel_size', 1)}"
    )
    tok = m["tokenizer"]
    click.echo(
        f"tokenizer    {tok.get('name')}  vocab={tok['vocab_size']} padded={tok['padded_vocab_size']} "
        f"{tok['fingerprint'][:23]}"
    )
    cap = m["capture"]
    click.echo(f"capture      k={cap['top_k']} codec={cap['codec']} max_seq_len={cap['max_seq_len']}")
    targets = summary["targets"]
    params = " ".join(f"{k}={v}" for k, v in targets.items() if k != "mode")
    click.echo(
        f"targets      {targets['mode']}  {params}  "
        f"{summary['mean_entries_per_position_first_row_group']:.2f} entries/position (first row group)"
    )
    click.echo(f"dataset      {m['dataset'].get('source')} split={m['dataset'].get('split')}")
    click.echo(
        f"sequences    {totals['num_sequences']:,}  tokens {totals['num_tokens']:,}  rows {totals.get('num_rows', 0):,}"
        f"  skipped rows {totals.get('skipped_rows') or 'none'}  windows {totals.get('skipped_windows') or 'none'}"
    )
    click.echo(
        f"size         {_fmt_bytes(totals['num_bytes'])} in {summary['num_shards']} shard(s), "
        f"{summary['bytes_per_token']:.1f} B/token"
    )
    exact = "exact entries' mass" if targets["mode"] == "sampled" else "head mass"
    click.echo(f"{exact:12s} {summary['mean_head_mass_first_row_group']:.4f} mean over the first row group (1 - tail)")


def _echo_position(seq: CachedSequence, t_pos: int, tokenizer: Any) -> None:
    """One decoded position: the context token, the next token, the entries (with their draws) and the tail."""

    def show(i: int) -> str:
        return repr(tokenizer.id_to_token(int(i))) if tokenizer is not None else str(int(i))

    click.echo(
        f"sample       sequence {seq.sequence_id}, position {t_pos}: after {show(seq.input_ids[t_pos])} "
        f"the next token is {show(seq.input_ids[t_pos + 1])} (teacher log-prob {seq.next_token_logprobs[t_pos]:.3f})"
    )
    weights = seq.sparse_targets().target_probs[t_pos]
    for rank in range(min(8, seq.entry_ids.shape[1])):
        tid = seq.entry_ids[t_pos, rank]
        if tid < 0:
            break
        lp = seq.entry_logprobs[t_pos, rank]
        drawn = "" if seq.sample_counts is None else f"  draws={int(seq.sample_counts[t_pos, rank])}"
        click.echo(
            f"   #{rank:<3d} {show(tid):>16}  logp={lp:8.3f}  p={np.exp(lp):.4f}  weight={weights[rank]:.4f}{drawn}"
        )
    if seq.num_samples:
        click.echo(f"   residual    p={seq.tail_mass[t_pos]:.4f} outside the exact entries, shared by the draws")
    else:
        click.echo(f"   tail        p={seq.tail_mass[t_pos]:.4f}")


@click.command("inspect")
@click.argument("cache_dir")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest summary as JSON.")
@click.option("--position", default=None, type=int, help="Which position of the first sequence to decode.")
def inspect_cmd(cache_dir: str, as_json: bool, position: int | None) -> None:
    """Summarise a cache: teacher, tokenizer, target mode, codec, sizes, head mass, and a decoded sample position."""
    from logitcache.storage.reader import CacheReader
    from logitcache.storage.schema import CacheFormatError

    try:
        r = CacheReader(cache_dir)
    except CacheFormatError as e:
        raise click.ClickException(str(e)) from None
    group = next(r.iter_row_groups(), None)
    summary = _summary(r, group)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    _echo_header(cache_dir, r.manifest, summary)
    if group is None or len(group) == 0:
        return
    seq = group.sequence(0)
    n_pos = seq.entry_ids.shape[0]
    t_pos = min(position if position is not None else n_pos // 2, n_pos - 1)
    _echo_position(seq, t_pos, _load_tokenizer(cache_dir, r.manifest["tokenizer"].get("name")))


@click.command("verify")
@click.argument("cache_dir")
def verify_cmd(cache_dir: str) -> None:
    """Check every shard (sha256, counts, schema, entry counts, id ranges, sorted log-probs <= 0, head + tail = 1,
    and the target mode's rules)."""
    from logitcache.storage.verify import verify_cache

    report = verify_cache(cache_dir)
    for problem in report.cache_problems:
        click.echo(f"BAD  {problem}", err=True)
    for path, problems in report.shard_problems.items():
        if problems:
            click.echo(f"BAD  {path}: " + "; ".join(problems), err=True)
        else:
            click.echo(f"ok   {path}")
    if not report.ok:
        bad = sum(1 for p in report.shard_problems.values() if p)
        click.echo(f"verify failed: {bad} bad shard(s), {len(report.cache_problems)} cache-level problem(s)", err=True)
        sys.exit(1)
    click.echo(f"verified {len(report.shard_problems)} shard(s), {report.num_sequences:,} sequences: all good")


@click.command("finalize")
@click.argument("cache_dir")
def finalize_cmd(cache_dir: str) -> None:
    """Merge the replicas' shards into manifest.json once every replica has finished."""
    from logitcache.storage.cache import finalize_cache
    from logitcache.storage.schema import CacheFormatError

    try:
        manifest = finalize_cache(cache_dir)
    except CacheFormatError as e:
        raise click.ClickException(str(e)) from None
    t = manifest["totals"]
    click.echo(f"finalized {cache_dir}: {t['num_sequences']:,} sequences, {len(manifest['shards'])} shard(s)")
