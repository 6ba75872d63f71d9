"""`logitcache export`: a cache as pre-tokenized distillation rows for axolotl's KD plugin (JSON lines).

One row per sequence of L tokens, in the form axolotl's KD collator and loss consume (axolotl reads a dataset with
input_ids, attention_mask and labels as already tokenized and keeps the other columns):

  input_ids         int [L]
  attention_mask    int [L], all 1
  labels            int [L], input_ids[t] where the cache's loss_mask is True, else -100 (unshifted: the loss shifts)
  target_token_ids  int [L][W]: row j = the ids of the teacher's distribution over input_ids[j + 1], i.e. the
                    cache's position j (FORMAT.md: position t predicts input_ids[t + 1]), most probable first
  target_logprobs   float [L][W]: their teacher log-probs, renormalised over the row's ids (and rescaled to
                    `temperature`), as axolotl's own producers hand them to the loss
  target_mask       int [L][W]: 1 where the slot is real and labels[j + 1] != -100, else 0

Row L-1 (it would predict a token after the sequence) and the slots past a position's entries are padding: id 0,
log-prob -1e9, mask 0, as axolotl pads. W is the most entries any position of the sequence keeps (<= --top-k).

Where this comes from (axolotl-ai-cloud/axolotl, src/axolotl/integrations/kd/, read in release 0.21.0 and on main):
trainer.py `AxolotlKDTrainer.compute_loss` passes the last hidden states [B, L, D] and the target rows [B, L, K]
unshifted to kernels/liger.py `LigerFusedLinearKLTopKLogprobFunction.forward`, which shifts only the CE labels
(`pad(labels, (0, 1), -100)[:, 1:]`): hidden state j, which predicts input_ids[j + 1], meets target row j. main's
README.md "Target alignment" and collator.py `DataCollatorForKD` (`kd_prepared_targets_alignment: current`, the
default) state the same contract. Its chat_template.py loaders take logprobs plus `messages` they re-tokenize, which
cannot promise the cached ids, hence pre-tokenized rows.

What is lost: axolotl's loss sees the exported ids only, renormalised; the teacher's mass outside them (`tail_mass`
for topk/adaptive, what --top-k cuts, and for `sampled` caches the residual not hit by a draw) is dropped. Each
entry of a `sampled` cache is exported with its exact teacher log-prob, not its draw-count weight: axolotl's loss
renormalises whatever it is given, so the unbiased weighting cannot be carried over.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import click
import numpy as np

from logitcache.storage.options import config_options, option
from logitcache.storage.reader import CacheReader
from logitcache.storage.records import CachedSequence
from logitcache.storage.schema import CacheFormatError

__all__ = [
    "AXOLOTL_LOGPROB_PAD",
    "TAIL_MASS_WARNING",
    "EXPORT_FORMATS",
    "ExportConfig",
    "ExportReport",
    "axolotl_row",
    "export_axolotl",
    "export_cmd",
]

log = logging.getLogger(__name__)

# axolotl's DataCollatorForKD pads target_logprobs with -1e9 (never -inf: JSON has no infinity, and the loss must not
# see NaN); padded slots have mask 0, so the value never reaches the loss.
AXOLOTL_LOGPROB_PAD = -1e9
# Mean teacher mass outside the exported ids (over trained positions) above which export warns.
TAIL_MASS_WARNING = 0.10
# How a cache of each target mode stores more entries per position (cache-teacher's flags).
_MORE_ENTRIES = {"topk": "--top-k", "adaptive": "--top-p, --top-k", "sampled": "--exact-top, --samples"}
_DECIMALS = 6  # log-probs are written to 1e-6 nat: far below the codec's 1/1024 nat
EXPORT_FORMATS = ("axolotl",)


@dataclass(frozen=True)
class ExportConfig:
    """`logitcache export` (each field is the flag of the same name)."""

    cache: str = option(help="The cache directory (or pyarrow filesystem URL) to export.")
    output: str = option(help="The JSON-lines file to write (written aside, then renamed into place).")
    format: str = option("axolotl", "axolotl: pre-tokenized rows for axolotl's KD plugin (README 'Export to axolotl').")
    top_k: int | None = option(None, "Keep at most K ids per position, the most probable first (default: all stored).")
    temperature: float = option(1.0, "axolotl's kd_temperature: the teacher is rescaled to p^(1/T) over the ids.")

    def __post_init__(self) -> None:
        problems = [f"--{name} is required" for name in ("cache", "output") if not getattr(self, name)]
        if self.format not in EXPORT_FORMATS:
            problems.append(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {self.format!r}")
        if self.top_k is not None and self.top_k < 1:
            problems.append(f"--top-k must be >= 1, got {self.top_k}")
        if not self.temperature > 0:
            problems.append(f"--temperature must be > 0 (axolotl's kd_temperature), got {self.temperature}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote, and how much of the teacher's distribution it carries."""

    output: str
    target_mode: str  # the cache's capture.targets mode
    num_sequences: int
    num_trained_positions: int  # positions whose next token is a training target (target_mask row 1)
    mean_tail_mass: float  # mean over trained positions of the teacher's T=1 mass outside the exported ids

    @property
    def tail_warning(self) -> str | None:
        """A warning naming the lost mass when it exceeds TAIL_MASS_WARNING, else None."""
        if not self.mean_tail_mass > TAIL_MASS_WARNING:
            return None
        return (
            f"the exported ids cover {1 - self.mean_tail_mass:.1%} of the teacher's probability on average: "
            f"{self.mean_tail_mass:.1%} (mean over {self.num_trained_positions:,} trained positions) is outside them "
            f"and axolotl's loss renormalises it away. To keep more of it, export without --top-k (or a larger one), "
            f"or recapture with more entries per position ({_MORE_ENTRIES[self.target_mode]})"
        )


class _Entries(NamedTuple):
    """A sequence's kept entries, [P, W] each (W = the most kept at any position, at least 1)."""

    ids: np.ndarray  # int64, -1 where padded
    logprobs: np.ndarray  # float64 teacher log-probs at T=1, -inf where padded
    real: np.ndarray  # bool, True for a kept entry


def _kept_entries(seq: CachedSequence, top_k: int | None) -> _Entries:
    """The first min(n_t, top_k) entries of each position: stored sorted by log-prob, so the most probable."""
    ids = seq.entry_ids[:, :top_k] if top_k is not None else seq.entry_ids
    real = ids >= 0
    width = max(1, int(real.sum(axis=1).max(initial=0)))
    logprobs = np.where(real, seq.entry_logprobs[:, : ids.shape[1]].astype(np.float64), -np.inf)
    return _Entries(ids[:, :width].astype(np.int64), logprobs[:, :width], real[:, :width])


def _renormalised(entries: _Entries, temperature: float) -> np.ndarray:
    """log p^(1/T) / Z over each position's kept ids (axolotl's rescale_topk_logprobs); the pad where not real."""
    scaled = np.where(entries.real, entries.logprobs / temperature, -np.inf)
    has_entries = entries.real.any(axis=1, keepdims=True)
    peak = np.where(has_entries, scaled.max(axis=1, keepdims=True, initial=-np.inf), 0.0)
    with np.errstate(divide="ignore"):  # a position without entries: log(0), replaced by the pad below
        lse = peak + np.log(np.exp(scaled - peak).sum(axis=1, keepdims=True))
    return np.where(entries.real, scaled - lse, AXOLOTL_LOGPROB_PAD)


def axolotl_row(seq: CachedSequence, config: ExportConfig) -> tuple[dict[str, Any], np.ndarray]:
    """One sequence as axolotl's KD row (module doc), and the teacher's T=1 mass outside the exported ids at each
    trained position (float64 [positions whose next token is trained])."""
    entries = _kept_entries(seq, config.top_k)
    trained = np.asarray(seq.loss_mask[1:], dtype=bool)  # position t is trained iff its label t+1 is
    logprobs = np.round(_renormalised(entries, config.temperature), _DECIMALS)

    def rows(per_position: np.ndarray, pad: float) -> list[Any]:
        """[P, W] -> [L, W]: row L-1 would predict a token after the sequence, so it is padding."""
        return np.vstack([per_position, np.full((1, per_position.shape[1]), pad)]).tolist()

    row = {
        "input_ids": seq.input_ids.tolist(),
        "attention_mask": [1] * seq.num_tokens,
        "labels": np.where(seq.loss_mask, seq.input_ids, -100).tolist(),
        "target_token_ids": rows(np.where(entries.real, entries.ids, 0), 0),
        "target_logprobs": rows(logprobs, AXOLOTL_LOGPROB_PAD),
        "target_mask": rows((entries.real & trained[:, None]).astype(np.int64), 0),
    }
    kept_mass = np.where(entries.real, np.exp(entries.logprobs), 0.0).sum(axis=1)
    return row, np.clip(1.0 - kept_mass[trained], 0.0, 1.0)


def export_axolotl(config: ExportConfig) -> ExportReport:
    """Write every sequence of `config.cache` as one JSON line of axolotl's KD format to `config.output`; logs a
    warning when the mean mass outside the exported ids exceeds TAIL_MASS_WARNING. Raises CacheFormatError (naming
    the cache and the fix) for a cache that cannot be read. The file appears whole or not at all."""
    reader = CacheReader(config.cache)
    out = Path(config.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    num_sequences, lost_sum, lost_count = 0, 0.0, 0
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for seq in reader.iter_sequences():
                row, lost = axolotl_row(seq, config)
                f.write(json.dumps(row, separators=(",", ":")) + "\n")
                num_sequences += 1
                lost_sum += float(lost.sum())
                lost_count += int(lost.size)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    report = ExportReport(
        output=str(out),
        target_mode=reader.targets.mode,
        num_sequences=num_sequences,
        num_trained_positions=lost_count,
        mean_tail_mass=lost_sum / lost_count if lost_count else 0.0,
    )
    if report.tail_warning:
        log.warning("%s: %s", config.cache, report.tail_warning)
    return report


@click.command("export")
@config_options(ExportConfig, choices={"format": EXPORT_FORMATS})
def export_cmd(**flags: Any) -> None:
    """Export a cache for another trainer: one JSON line per cached sequence, token ids (never strings).

    Example: logitcache export --cache demo_out/cache --format axolotl --output demo_out/axolotl.jsonl
    """
    try:
        given = {k: v for k, v in flags.items() if v is not None}
        config = ExportConfig(**{"cache": "", "output": "", **given})
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    try:
        report = export_axolotl(config)
    except CacheFormatError as e:
        raise click.ClickException(f"cannot export {config.cache}: {e}") from None
    except OSError as e:
        raise click.ClickException(f"cannot write {config.output}: {e}; check the path and free space") from None
    # a large lost mass was logged as a warning by export_axolotl: shown once, through the handler `logitcache`
    # configures (or Python's last-resort stderr handler when this command runs on its own)
    click.echo(
        f"exported {report.num_sequences:,} sequences of {config.cache} ({report.target_mode} cache) to "
        f"{report.output} for axolotl; teacher mass outside the exported ids: {report.mean_tail_mass:.2%} mean over "
        f"{report.num_trained_positions:,} trained positions"
    )
