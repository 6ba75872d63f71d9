"""verify_cache: every check a cache must pass before a training run trusts it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from logitcache.storage.codec import LogprobCodec
from logitcache.storage.invariants import mass_problems, value_problems
from logitcache.storage.reader import CacheReader
from logitcache.storage.records import RowGroup
from logitcache.storage.schema import CacheFormatError

__all__ = ["VerifyReport", "verify_cache", "head_mass_tolerance"]

# Float32 log-softmax and exp() add a little on top of the codec's quantization error.
_FLOAT_SLACK = 1e-3


@dataclass
class VerifyReport:
    """Problems found per shard path (empty lists when the shard is good), plus cache-wide ones."""

    shard_problems: dict[str, list[str]] = field(default_factory=dict)
    cache_problems: list[str] = field(default_factory=list)
    num_sequences: int = 0
    num_positions: int = 0

    @property
    def ok(self) -> bool:
        return not self.cache_problems and not any(self.shard_problems.values())


def head_mass_tolerance(codec: LogprobCodec, probs: np.ndarray) -> np.ndarray:
    """Bound on |sum(head p) + tail - 1| per position from the codec's per-rank log-prob error. probs: [P, k]."""
    k = probs.shape[1]
    err = np.array([codec.max_abs_error(r) for r in range(k)], dtype=np.float64)
    return (probs * np.expm1(err)[None, :]).sum(axis=1) + _FLOAT_SLACK


def _check_row_group(group: RowGroup, reader: CacheReader) -> list[str]:
    """The writer's value invariants (with the target mode's), plus the probability checks on decoded data
    (exact mass + tail = 1, adaptive reaches top_p, ...) within the codec's error."""
    problems = value_problems(group, reader.padded_vocab_size, reader.targets)
    probs = np.where(group.entry_ids >= 0, np.exp(group.entry_logprobs.astype(np.float64)), 0.0)
    return problems + mass_problems(group, reader.targets, head_mass_tolerance(reader.codec, probs))


def verify_cache(path: str) -> VerifyReport:
    """Checks sha256, row/token counts, schema, entry counts, id ranges and uniqueness, log-prob order and sign,
    head + tail = 1, and what the target mode asks (adaptive: top_p reached; sampled: counts sum to N)."""
    report = VerifyReport()
    try:
        reader = CacheReader(path)
    except CacheFormatError as e:
        report.cache_problems.append(str(e))
        return report
    seen: list[np.ndarray] = []
    for i, shard in enumerate(reader.shards):
        problems: list[str] = []
        shard_path = reader.shard_path(i)
        report.shard_problems[shard_path] = problems
        try:
            with reader.open_shard_stream(i) as f:
                h = hashlib.sha256()
                size = 0
                while chunk := f.read(1 << 22):
                    h.update(chunk)
                    size += len(chunk)
        except OSError as e:
            problems.append(f"cannot read: {e}")
            continue
        if size != shard["num_bytes"]:
            problems.append(f"size {size} bytes, manifest says {shard['num_bytes']} (truncated or replaced?)")
        if h.hexdigest() != shard["sha256"]:
            problems.append("sha256 does not match the manifest (the file changed after capture)")
        counts: dict[str, Any] = {"seq": 0, "tok": 0}
        ids_here = []
        try:
            if reader.parquet_file(i).schema_arrow.remove_metadata() != reader.schema.remove_metadata():
                problems.append(f"schema differs from format version {reader.format_version}'s for the codec and mode")
            for group in reader.iter_row_groups([i]):
                counts["seq"] += len(group)
                counts["tok"] += int(group.token_offsets[-1])
                report.num_positions += int(group.position_offsets[-1])
                ids_here.append(group.sequence_id)
                problems.extend(p for p in _check_row_group(group, reader) if p not in problems)
        except CacheFormatError as e:
            problems.append(str(e).split(": ", 1)[-1])
            continue
        if counts["seq"] != shard["num_sequences"] or counts["tok"] != shard["num_tokens"]:
            problems.append(
                f"{counts['seq']} sequences / {counts['tok']} tokens, manifest says "
                f"{shard['num_sequences']} / {shard['num_tokens']}"
            )
        ids = np.concatenate(ids_here) if ids_here else np.zeros(0, np.int64)
        if ids.size and (ids.min() != shard["sequence_id_min"] or ids.max() != shard["sequence_id_max"]):
            problems.append("sequence_id range differs from the manifest")
        seen.append(ids)
        report.num_sequences += int(ids.size)
    all_ids = np.concatenate(seen) if seen else np.zeros(0, np.int64)
    if np.unique(all_ids).size != all_ids.size:
        report.cache_problems.append("some sequence_id appears more than once across shards")
    return report
