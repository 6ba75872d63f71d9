"""ShardWriter: sequences -> Parquet shards (zstd), written atomically with a metadata sidecar each."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from logitcache.storage.codec import DEFAULT_CODEC, LogprobCodec, parse_codec
from logitcache.storage.fingerprint import sha256_file
from logitcache.storage.invariants import value_problems
from logitcache.storage.layout import replica_prefix
from logitcache.storage.records import CachedSequence
from logitcache.storage.schema import SHARDS_DIR, ShardEntry, arrow_schema
from logitcache.storage.store import CacheStore, atomic_write_json
from logitcache.storage.targets import TargetSpec

__all__ = ["ShardWriter", "encode_table", "PARQUET_OPTIONS", "atomic_write_json", "shard_name_re"]

log = logging.getLogger(__name__)

# Physical encoding, chosen by measurement (BENCHMARKS.md "Codec"): zstd, byte-stream split for the float and
# small-int code columns, no dictionaries (the id streams are too diverse for them), page CRCs so a flipped bit
# is an error at read time rather than a silently wrong soft label.
PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 3,
    "use_dictionary": False,
    # list columns are matched by their leaf path: the bare column name is silently ignored by pyarrow
    "use_byte_stream_split": [
        "entry_logprobs.list.element",
        "next_token_logprobs.list.element",
        "tail_mass.list.element",
    ],
    "write_page_checksum": True,
    "data_page_version": "2.0",
}

shard_name_re = re.compile(r"^(?P<prefix>[A-Za-z0-9_]+)-(?P<index>\d{6})\.parquet$")


def _list_array(offsets: np.ndarray, values: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, value_type))


def encode_table(seqs: Sequence[CachedSequence], codec: LogprobCodec, top_k: int, schema: pa.Schema) -> pa.Table:
    """Sequences (padded entries [L-1, M], M = top_k) -> one Arrow table in the version 2 shard schema.

    The padding (trailing, id -1) is dropped: entry_counts says how many entries each position keeps. The codec runs
    on the padded [P, M] log-probs, as the reader decodes them. `sample_counts` is written when the schema has it.
    Flat numpy concatenation and boolean masks: no per-token Python.
    """
    lengths = np.array([s.num_tokens for s in seqs], dtype=np.int64)
    tok_off = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=tok_off[1:])
    pos_off = tok_off - np.arange(len(seqs) + 1)
    ids = np.concatenate([s.entry_ids for s in seqs]).astype(np.int32, copy=False).reshape(-1, top_k)
    real = ids >= 0
    counts = real.sum(axis=1, dtype=np.int64)
    pos_entries = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=pos_entries[1:])
    entry_off = pos_entries[pos_off]  # entries before each row
    codes = codec.encode(np.concatenate([s.entry_logprobs for s in seqs]).astype(np.float32, copy=False))
    cols = {
        "sequence_id": pa.array(np.array([s.sequence_id for s in seqs], dtype=np.int64), pa.int64()),
        "input_ids": _list_array(
            tok_off, np.concatenate([s.input_ids for s in seqs]).astype(np.int32, copy=False), pa.int32()
        ),
        "loss_mask": _list_array(
            tok_off, np.concatenate([s.loss_mask for s in seqs]).astype(bool, copy=False), pa.bool_()
        ),
        "entry_counts": _list_array(pos_off, counts.astype(np.uint16), pa.uint16()),
        "entry_ids": _list_array(entry_off, ids[real], pa.int32()),
        "entry_logprobs": _list_array(entry_off, codes[real], codec.arrow_type),
        "next_token_logprobs": _list_array(
            pos_off, np.concatenate([s.next_token_logprobs for s in seqs]).astype(np.float32), pa.float32()
        ),
        "tail_mass": _list_array(pos_off, np.concatenate([s.tail_mass for s in seqs]).astype(np.float32), pa.float32()),
    }
    if "sample_counts" in schema.names:
        sc = np.concatenate([_sample_counts(s) for s in seqs]).astype(np.uint16, copy=False).reshape(-1, top_k)
        cols["sample_counts"] = _list_array(entry_off, sc[real], pa.uint16())
    return pa.Table.from_arrays([cols[name] for name in schema.names], schema=schema)


def _sample_counts(seq: CachedSequence) -> np.ndarray:
    if seq.sample_counts is None:
        raise ValueError(f"sequence {seq.sequence_id}: sample_counts missing (the target mode is 'sampled')")
    return seq.sample_counts


class ShardWriter:
    """Buffers sequences and writes shards `shards/{prefix}-{NNNNNN}.parquet` with bounded memory.

    A shard is written under a temporary name, fsynced, hashed and renamed into place, then described by a sidecar
    `{shard}.json`; a process killed at any moment leaves either a complete shard or a `.tmp` file that
    `complete_shards` deletes. For a cache on object storage the `.tmp` file is local (`CacheStore.staging_dir`) and
    "renamed into place" is one upload of the complete file. Sequences still buffered when a process dies were never
    promised: the capture recomputes them.

    As a context manager it closes on success; on an exception it aborts: the open shard's `.tmp` file is deleted
    and buffered sequences are dropped (shards completed earlier stay: they are whole).
    """

    def __init__(
        self,
        cache_dir: str | Path,
        *,
        top_k: int,
        codec: str = DEFAULT_CODEC,
        prefix: str = replica_prefix(0),
        vocab_size: int | None = None,
        shard_size_bytes: int = 256 << 20,
        row_group_bytes: int = 16 << 20,
        parquet_options: dict[str, Any] | None = None,
        targets: TargetSpec | None = None,
    ) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_]+", prefix):
            raise ValueError(f"shard prefix {prefix!r} must be letters, digits or '_'")
        self.targets = TargetSpec(mode="topk", top_k=top_k) if targets is None else targets
        if top_k != self.targets.max_entries:
            raise ValueError(
                f"top_k={top_k} but the target mode {self.targets.to_header()} stores up to "
                f"{self.targets.max_entries} entries per position; pass top_k=targets.max_entries"
            )
        self.store = CacheStore(cache_dir)
        self.store.makedirs(self.store.layout.shards_dir)
        self.dir = self.store.staging_dir()  # where the open shard is written (the shards folder, for a local cache)
        self.top_k = top_k
        self.codec = parse_codec(codec)
        self.schema = arrow_schema(codec, sampled=self.targets.mode == "sampled")
        self.prefix = prefix
        self.vocab_size = vocab_size
        self.shard_size_bytes = shard_size_bytes
        self.row_group_bytes = row_group_bytes
        self.options = dict(PARQUET_OPTIONS if parquet_options is None else parquet_options)
        names = self.store.names(self.store.layout.shards_dir)
        existing = [m for n in names if (m := shard_name_re.match(n)) and m["prefix"] == prefix]
        self._next_index = max((int(m["index"]) for m in existing), default=-1) + 1
        self._buffer: list[CachedSequence] = []
        self._buffer_bytes = 0
        self._writer: pq.ParquetWriter | None = None
        self._tmp: Path | None = None
        self._stats: dict[str, Any] = {}

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, seq: CachedSequence) -> list[ShardEntry]:
        """Adds one sequence (padded entries [L-1, M]); returns the entries of shards this call completed (usually none).

        Raises ValueError naming the sequence when a value would make a wrong cache (not just an odd one): among
        others, padding (id -1) that is not trailing, and sample_counts given unless the mode is `sampled`.
        """
        seq.validate(self.top_k)
        problems = value_problems(seq, self.vocab_size, self.targets)
        if problems:
            raise ValueError(f"sequence {seq.sequence_id}: " + "; ".join(problems))
        self._buffer.append(seq)
        arrays = (seq.input_ids, seq.entry_ids, seq.entry_logprobs, seq.next_token_logprobs, seq.tail_mass)
        self._buffer_bytes += sum(a.nbytes for a in arrays)
        if seq.sample_counts is not None:
            self._buffer_bytes += seq.sample_counts.nbytes
        if self._buffer_bytes < self.row_group_bytes:
            return []
        self._flush_row_group()
        assert self._tmp is not None
        if self._tmp.stat().st_size >= self.shard_size_bytes:
            return [self._finish_shard()]
        return []

    def close(self) -> list[ShardEntry]:
        """Writes what is buffered and completes the open shard."""
        if self._buffer:
            self._flush_row_group()
        return [self._finish_shard()] if self._writer is not None else []

    def abort(self) -> None:
        """Drops what is buffered and deletes the open shard's `.tmp` file: no half shard is left behind."""
        self._buffer, self._buffer_bytes = [], 0
        if self._writer is not None:
            # the shard is discarded: an error closing it would only hide the exception that aborted the write
            with contextlib.suppress(OSError, pa.ArrowException):
                self._writer.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        self._writer, self._tmp = None, None

    def _flush_row_group(self) -> None:
        if self._writer is None:
            name = f"{self.prefix}-{self._next_index:06d}.parquet"
            self._tmp = self.dir / f"{name}.tmp"
            self._writer = pq.ParquetWriter(self._tmp, self.schema, **self.options)
            self._stats = {"path": f"{SHARDS_DIR}/{name}", "num_sequences": 0, "num_tokens": 0, "num_row_groups": 0}
            self._ids: list[int] = []
        table = encode_table(self._buffer, self.codec, self.top_k, self.schema)
        self._writer.write_table(table, row_group_size=len(self._buffer))
        self._stats["num_sequences"] += len(self._buffer)
        self._stats["num_tokens"] += sum(s.num_tokens for s in self._buffer)
        self._stats["num_row_groups"] += 1
        self._ids.extend(s.sequence_id for s in self._buffer)
        self._buffer, self._buffer_bytes = [], 0

    def _finish_shard(self) -> ShardEntry:
        assert self._writer is not None and self._tmp is not None
        self._writer.close()
        final = self.store.layout.shards_dir / self._tmp.name.removesuffix(".tmp")
        info = ShardEntry(
            path=self._stats["path"],
            num_sequences=self._stats["num_sequences"],
            num_tokens=self._stats["num_tokens"],
            num_row_groups=self._stats["num_row_groups"],
            num_bytes=self._tmp.stat().st_size,
            sha256=sha256_file(self._tmp),
            sequence_id_min=int(min(self._ids)),
            sequence_id_max=int(max(self._ids)),
        )
        self.store.publish(self._tmp, final)  # whole or not at all: a rename, or one upload (storage/store.py)
        self.store.write_json(final.with_name(final.name + ".json"), info)
        log.debug("wrote %s: %d sequences, %d bytes", self.store.name(final), info["num_sequences"], info["num_bytes"])
        self._writer, self._tmp, self._next_index = None, None, self._next_index + 1
        return info
