"""CacheReader: validates a cache's manifest and decodes its row groups to numpy."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from logitcache.storage.codec import LogprobCodec, parse_codec
from logitcache.storage.pages import ColumnChunk, read_list_values
from logitcache.storage.records import CachedSequence, RowGroup, TargetRowGroup
from logitcache.storage.schema import (
    CAPTURE_NAME,
    COLUMNS,
    MANIFEST_NAME,
    V1_COLUMNS,
    CacheFormatError,
    NotFinalizedError,
    arrow_schema,
    shard_version_problem,
    v1_arrow_schema,
    validate_manifest,
)
from logitcache.storage.store import filesystem
from logitcache.storage.targets import SparseTargets, TargetSpec

__all__ = ["CacheReader", "decode_table", "decode_targets"]

# Version 2 columns of M values per position that read_targets reads from their pages (storage/pages.py).
_PAGED_COLUMNS = ("entry_ids", "entry_logprobs", "sample_counts")


def _flat(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int64 [B+1] starting at 0, values) of a list column."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.values.slice(offsets[0], offsets[-1] - offsets[0]).to_numpy(zero_copy_only=False)
    return offsets - offsets[0], values


def _misaligned(where: str, what: str) -> CacheFormatError:
    return CacheFormatError(
        f"{where}: {what}; the shard is damaged or was written by another tool (run `logitcache verify`)"
    )


def _require(present: Iterable[str], columns: Iterable[str], where: str, version: int) -> None:
    names = set(present)
    missing = [c for c in columns if c not in names]
    if missing:
        raise CacheFormatError(f"{where}: missing column(s) {missing}; not a logitcache version {version} shard")


def _sequences(table: pa.Table, next_token_column: str, where: str) -> RowGroup:
    """The per-token and per-position columns every version shares, with their offsets checked; no entries yet."""
    tok_off, input_ids = _flat(table.column("input_ids"))
    mask_off, loss_mask = _flat(table.column("loss_mask"))
    pos_off = tok_off - np.arange(len(tok_off))
    nxt_off, next_token = _flat(table.column(next_token_column))
    tail_off, tail = _flat(table.column("tail_mass"))
    if not (
        np.array_equal(mask_off, tok_off) and np.array_equal(nxt_off, pos_off) and np.array_equal(tail_off, pos_off)
    ):
        raise _misaligned(where, "per-position columns do not line up with input_ids (L-1 positions per sequence)")
    none = np.zeros((0, 0), dtype=np.int32)
    return RowGroup(
        sequence_id=table.column("sequence_id").to_numpy().astype(np.int64),
        token_offsets=tok_off,
        position_offsets=pos_off,
        input_ids=input_ids.astype(np.int32, copy=False),
        loss_mask=loss_mask.astype(bool, copy=False),
        entry_ids=none,
        entry_logprobs=none.astype(np.float32),
        next_token_logprobs=next_token.astype(np.float32, copy=False),
        tail_mass=tail.astype(np.float32, copy=False),
    )


class _Entries(NamedTuple):
    """A table's per-token and per-position columns (`seq`, no entries yet) and its entries, padded to [P, M] but
    still encoded: what both `decode_table` (log-probs) and `decode_targets` (the sparse target view) start from."""

    seq: RowGroup
    entry_ids: np.ndarray  # int32 [P, M], -1 = padding
    codes: np.ndarray  # [P, M] of the codec's dtype, 0 where padded
    padded: np.ndarray | None  # bool [P, M], True where padded; None: no padding anywhere (the topk fast path)
    sample_counts: np.ndarray | None  # uint16 [P, M] (sampled caches), else None
    num_samples: int


def _entries_v1(table: pa.Table, top_k: int, where: str) -> _Entries:
    """A version 1 table: K entries per position, flattened row-major, under the old column names."""
    _require(table.column_names, V1_COLUMNS, where, 1)
    seq = _sequences(table, "target_logprobs", where)
    pos_off = seq.position_offsets
    ids_off, ids = _flat(table.column("topk_ids"))
    lp_off, codes = _flat(table.column("topk_logprobs"))
    if not (np.array_equal(ids_off, pos_off * top_k) and np.array_equal(lp_off, pos_off * top_k)):
        raise _misaligned(where, f"topk columns do not hold k={top_k} entries per position")
    num_pos = int(pos_off[-1])
    entry_ids = ids.astype(np.int32, copy=False).reshape(num_pos, top_k)
    return _Entries(seq, entry_ids, codes.reshape(num_pos, top_k), entry_ids < 0, None, 0)


def _scatter(
    values: np.ndarray, real: np.ndarray | None, shape: tuple[int, int], fill: float, dtype: Any
) -> np.ndarray:
    """Ragged entries [E] -> padded [P, M] (`fill` where not `real`; `real` None: every position full, a reshape)."""
    if real is None:
        return values.astype(dtype, copy=False).reshape(shape)
    out = np.full(shape, fill, dtype=dtype)
    out[real] = values
    return out


# Reads a list column's (offsets, values) given the offsets entry_counts implies: the loader's page reader.
EntryReader = Callable[[str, np.ndarray], tuple[np.ndarray, np.ndarray]]


def _entries_v2(
    table: pa.Table,
    codec: LogprobCodec,
    max_entries: int,
    where: str,
    targets: TargetSpec | None,
    entry_columns: Mapping[str, EntryReader] | None = None,
) -> _Entries:
    """A version 2 table: entry_counts[t] entries at position t, scattered into padded [P, M] arrays. The entry
    columns in `entry_columns` are not in `table`: they are read by their function (given the expected offsets)."""
    readers = entry_columns or {}
    present = [*table.column_names, *readers]
    sampled = "sample_counts" in present if targets is None else targets.mode == "sampled"
    _require(present, [c for c in COLUMNS if sampled or c != "sample_counts"], where, 2)
    seq = _sequences(table, "next_token_logprobs", where)
    pos_off = seq.position_offsets
    cnt_off, counts = _flat(table.column("entry_counts"))
    if not np.array_equal(cnt_off, pos_off):
        raise _misaligned(where, "entry_counts does not hold L-1 counts per sequence")
    counts = counts.astype(np.int64)
    if counts.size and counts.max() > max_entries:
        raise _misaligned(where, f"an entry count of {counts.max()} exceeds capture.top_k={max_entries}")
    pos_entries = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=pos_entries[1:])
    entry_off = pos_entries[pos_off]
    names = ["entry_ids", "entry_logprobs"] + (["sample_counts"] if sampled else [])
    flat = {name: readers[name](name, entry_off) if name in readers else _flat(table.column(name)) for name in names}
    for name, (off, _) in flat.items():
        if not np.array_equal(off, entry_off):
            raise _misaligned(where, f"{name} does not hold entry_counts entries per sequence")
    shape = (len(counts), max_entries)
    full = int(pos_entries[-1]) == shape[0] * shape[1]  # topk: no padding anywhere, the fast path
    real = None if full else np.arange(max_entries)[None, :] < counts[:, None]
    return _Entries(
        seq,
        entry_ids=_scatter(flat["entry_ids"][1], real, shape, -1, np.int32),
        codes=_scatter(flat["entry_logprobs"][1], real, shape, 0, codec.numpy_dtype),
        padded=None if real is None else ~real,
        sample_counts=_scatter(flat["sample_counts"][1], real, shape, 0, np.uint16) if sampled else None,
        num_samples=targets.num_samples if targets is not None else 0,
    )


def _entries(
    table: pa.Table,
    codec: LogprobCodec,
    top_k: int,
    where: str,
    targets: TargetSpec | None,
    entry_columns: Mapping[str, EntryReader] | None = None,
) -> _Entries:
    if "entry_counts" in table.column_names:
        return _entries_v2(table, codec, top_k, where, targets, entry_columns)
    if "topk_ids" in table.column_names:
        return _entries_v1(table, top_k, where)
    raise CacheFormatError(
        f"{where}: neither entry_counts (version 2) nor topk_ids (version 1) is a column; not a logitcache shard"
    )


def decode_table(
    table: pa.Table, codec: LogprobCodec, top_k: int, where: str, targets: TargetSpec | None = None
) -> RowGroup:
    """A shard table (or row group) of version 1 or 2 -> RowGroup with padded entries [P, top_k].

    `top_k` is M (capture.top_k); `targets` (the cache's TargetSpec) sets `num_samples` and whether `sample_counts`
    must be there (None: decoded when present, num_samples 0). Raises CacheFormatError naming `where` when the
    columns are missing or do not line up.
    """
    e = _entries(table, codec, top_k, where, targets)
    entry_lps = codec.decode(e.codes)
    if e.padded is not None:
        entry_lps[e.padded] = -np.inf
    return dataclasses.replace(
        e.seq,
        entry_ids=e.entry_ids,
        entry_logprobs=entry_lps,
        sample_counts=e.sample_counts,
        num_samples=e.num_samples,
    )


def decode_targets(
    table: pa.Table,
    codec: LogprobCodec,
    top_k: int,
    where: str,
    targets: TargetSpec | None = None,
    entry_columns: Mapping[str, EntryReader] | None = None,
) -> TargetRowGroup:
    """A shard table (or row group) -> its sparse target view, equal to `decode_table(...).sparse_targets()` to the
    bit, without the log-probs in between (`LogprobCodec.decode_probs`); arguments and errors as `decode_table`.
    `entry_columns`: version 2 entry columns left out of `table`, each read by its function (CacheReader's pages)."""
    e = _entries(table, codec, top_k, where, targets, entry_columns)
    probs = codec.decode_probs(e.codes)
    ids, tail = e.entry_ids, e.seq.tail_mass
    if ids.size and ids.min() < 0:  # padding (or a negative stored id): weight 0, as in sparse_targets
        probs[ids < 0] = 0.0
    if e.sample_counts is not None and e.num_samples > 0:
        # sparse_targets' weighting of drawn ids, on the probabilities: residual * count / N
        drawn = (ids >= 0) & (e.sample_counts > 0)
        weights = tail[:, None] * (e.sample_counts.astype(np.float32) / np.float32(e.num_samples))
        probs = np.where(drawn, weights, probs)
        tail = np.where(drawn.any(axis=1), np.float32(0.0), tail)
    return TargetRowGroup.from_view(e.seq, SparseTargets(ids, probs, tail), e.num_samples)


class CacheReader:
    """Read access to a finished cache (a local directory or a pyarrow-filesystem URL).

    Opening validates manifest.json (format version, codec, required fields); shards are opened lazily, with
    Parquet page checksums verified, and any read failure names the shard file and what to do about it.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self._fs, self._root = filesystem(path)
        manifest_path = f"{self._root}/{MANIFEST_NAME}"
        info = self._fs.get_file_info(manifest_path)
        if info.type != pafs.FileType.File:
            if self._fs.get_file_info(f"{self._root}/{CAPTURE_NAME}").type == pafs.FileType.File:
                raise NotFinalizedError(
                    f"{self.path}: the capture has not been finalized (no {MANIFEST_NAME}); finish every replica of "
                    f"cache-teacher, or run `logitcache finalize {self.path}`"
                )
            raise CacheFormatError(f"{self.path} is not a logitcache cache: {MANIFEST_NAME} not found")
        with self._fs.open_input_stream(manifest_path) as f:
            try:
                self.manifest: dict[str, Any] = json.loads(f.read())
            except json.JSONDecodeError as e:
                raise CacheFormatError(f"{manifest_path}: not valid JSON ({e})") from None
        validate_manifest(self.manifest, manifest_path)
        capture = self.manifest["capture"]
        self.format_version: int = int(self.manifest["format_version"])
        self.top_k: int = int(capture["top_k"])  # M: the most entries per position
        self.targets: TargetSpec = (
            TargetSpec.from_header(capture) if self.format_version >= 2 else TargetSpec(mode="topk", top_k=self.top_k)
        )
        self.codec: LogprobCodec = parse_codec(capture["codec"])
        self.schema = (
            arrow_schema(capture["codec"], sampled=self.targets.mode == "sampled")
            if self.format_version >= 2
            else v1_arrow_schema(capture["codec"])
        )
        self.vocab_size: int = int(self.manifest["tokenizer"]["vocab_size"])
        self.padded_vocab_size: int = int(self.manifest["tokenizer"]["padded_vocab_size"])
        self.shards: list[dict[str, Any]] = list(self.manifest["shards"])
        self._files: dict[int, pq.ParquetFile] = {}
        self._page_files: dict[int, pa.NativeFile] = {}

    @property
    def content_id(self) -> str:
        """sha256 over the shards' names and sha256 sums, in manifest order: the same for a moved or copied cache,
        different for any other content (a recapture, another dataset or teacher). Runs record it to resume safely."""
        h = hashlib.sha256()
        for s in self.shards:
            h.update(f"{s['path']}\0{s['sha256']}\n".encode())
        return h.hexdigest()

    def shard_path(self, shard_index: int) -> str:
        return f"{self._root}/{self.shards[shard_index]['path']}"

    def open_shard_stream(self, shard_index: int) -> pa.NativeFile:
        """The shard file's raw bytes as a stream (for checksums); raises OSError when it cannot be opened."""
        return self._fs.open_input_stream(self.shard_path(shard_index))

    def _damaged(self, shard_index: int, what: str, err: Exception) -> CacheFormatError:
        return CacheFormatError(
            f"{self.shard_path(shard_index)}: {what}: {err}. The shard is damaged or missing: run "
            f"`logitcache verify {self.path}`, then delete the bad shard (and its .json) and rerun cache-teacher "
            "with the same arguments to recapture it"
        )

    def parquet_file(self, shard_index: int) -> pq.ParquetFile:
        """The shard's ParquetFile (opened once, with page checksum verification, its format version checked)."""
        if shard_index not in self._files:
            try:
                source = self._fs.open_input_file(self.shard_path(shard_index))
                pf = pq.ParquetFile(source, page_checksum_verification=True)
            except (OSError, pa.ArrowException) as e:
                raise self._damaged(shard_index, "cannot open", e) from None
            problem = shard_version_problem(pf.metadata.metadata, self.format_version, self.shard_path(shard_index))
            if problem:
                raise CacheFormatError(problem)
            self._files[shard_index] = pf
        return self._files[shard_index]

    def row_groups(self) -> list[tuple[int, int, int]]:
        """(shard_index, row_group_index, num_sequences) for every row group, in storage order."""
        out: list[tuple[int, int, int]] = []
        for i in range(len(self.shards)):
            meta = self.parquet_file(i).metadata
            out.extend((i, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups))
        return out

    def _read_table(
        self, shard_index: int, row_group_index: int, use_threads: bool = True, columns: list[str] | None = None
    ) -> tuple[pa.Table, str]:
        """One row group's table (or those columns; page checksums verified) and how to name it in errors."""
        try:
            pf = self.parquet_file(shard_index)
            table = pf.read_row_group(row_group_index, columns=columns, use_threads=use_threads)
        except (OSError, pa.ArrowException) as e:
            raise self._damaged(shard_index, f"cannot read row group {row_group_index}", e) from None
        return table, f"{self.shard_path(shard_index)} row group {row_group_index}"

    def read_row_group(self, shard_index: int, row_group_index: int) -> RowGroup:
        """One row group decoded to numpy."""
        table, where = self._read_table(shard_index, row_group_index)
        return decode_table(table, self.codec, self.top_k, where, self.targets)

    def read_targets(self, shard_index: int, row_group_index: int) -> TargetRowGroup:
        """One row group decoded straight to the sparse target view (what training reads; no log-probs). Read on
        the calling thread: a loader worker should not add threads next to the training step's.

        The version 2 entry columns (M values per position: most of the bytes) are read from their pages by
        storage/pages.py, which skips pyarrow's per-value list assembly (2x faster at k=64); a column in a form it
        does not read, or failing a check, is read by pyarrow as any other."""
        pf = self.parquet_file(shard_index)
        names = pf.schema_arrow.names
        paged = [n for n in _PAGED_COLUMNS if n in names] if "entry_counts" in names else []
        table, where = self._read_table(
            shard_index, row_group_index, use_threads=False, columns=[n for n in names if n not in paged]
        )
        readers = dict.fromkeys(paged, self._page_reader(shard_index, row_group_index))
        return decode_targets(table, self.codec, self.top_k, where, self.targets, readers)

    def _page_reader(self, shard_index: int, row_group_index: int) -> EntryReader:
        """Reads a list column of a row group from its pages, or with pyarrow when they can't be (storage/pages.py)."""

        def read(name: str, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            pf = self.parquet_file(shard_index)
            index = pf.schema_arrow.get_field_index(name)
            column = pf.metadata.row_group(row_group_index).column(index)
            chunk = ColumnChunk.of(column, pf.schema_arrow.field(index).type.value_type)
            if chunk is not None:
                if shard_index not in self._page_files:
                    self._page_files[shard_index] = self._fs.open_input_file(self.shard_path(shard_index))
                values = read_list_values(self._page_files[shard_index], chunk, offsets)
                if values is not None:
                    return offsets, values
            table, _ = self._read_table(shard_index, row_group_index, use_threads=False, columns=[name])
            return _flat(table.column(name))

        return read

    def iter_row_groups(self, shards: Iterable[int] | None = None) -> Iterator[RowGroup]:
        """Every row group of the given shards (default: all), in order."""
        for i in range(len(self.shards)) if shards is None else shards:
            for g in range(self.parquet_file(i).metadata.num_row_groups):
                yield self.read_row_group(i, g)

    def iter_sequences(self, shards: Iterable[int] | None = None) -> Iterator[CachedSequence]:
        """Every sequence of the given shards (default: all), in storage order."""
        for group in self.iter_row_groups(shards):
            for j in range(len(group)):
                yield group.sequence(j)
