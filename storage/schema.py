"""The cache format's names: columns, Arrow schema, manifest fields and their validation (see FORMAT.md)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict, cast

import pyarrow as pa

from logitcache.storage.codec import parse_codec

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "SHARDS_DIR",
    "CAPTURE_NAME",
    "REPLICAS_DIR",
    "TOKENIZER_DIR",
    "LOGS_DIR",
    "COLUMNS",
    "ShardEntry",
    "shard_entry",
    "arrow_schema",
    "validate_header",
    "validate_manifest",
    "CacheFormatError",
    "IdentityMismatchError",
    "PendingReplicasError",
    "NotFinalizedError",
]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
CAPTURE_NAME = "capture.json"  # the cache's identity, written first; see FORMAT.md
SHARDS_DIR = "shards"
REPLICAS_DIR = "replicas"
TOKENIZER_DIR = "tokenizer"  # a copy of the teacher's tokenizer, so the cache is self-contained
LOGS_DIR = "logs"

# Parquet columns, in file order.
COLUMNS = (
    "sequence_id",
    "input_ids",
    "loss_mask",
    "entry_ids",
    "entry_logprobs",
    "next_token_logprobs",
    "tail_mass",
)


class CacheFormatError(ValueError):
    """A cache (or one of its files) does not follow the format; the message names the file and the fix."""


class IdentityMismatchError(CacheFormatError):
    """The directory holds a cache made with other settings; `differences` names each differing field."""

    def __init__(self, message: str, differences: list[str]) -> None:
        super().__init__(message)
        self.differences = differences


class PendingReplicasError(CacheFormatError):
    """The cache cannot be finalized yet: the replicas in `missing` have not finished."""

    def __init__(self, message: str, missing: list[int]) -> None:
        super().__init__(message)
        self.missing = missing


class NotFinalizedError(CacheFormatError):
    """A capture in progress (capture.json, no manifest.json) was opened for reading."""


class _ShardEntryRequired(TypedDict):
    path: str  # relative to the cache directory: shards/{prefix}-{NNNNNN}.parquet
    num_sequences: int
    num_tokens: int
    num_bytes: int
    sha256: str
    sequence_id_min: int
    sequence_id_max: int


class ShardEntry(_ShardEntryRequired, total=False):
    """One shard's entry in the manifest (and its sidecar `{shard}.json`); FORMAT.md "Manifest" names each field."""

    num_row_groups: int


_SHARD_ENTRY_REQUIRED = [f for f in _ShardEntryRequired.__annotations__ if f in ShardEntry.__required_keys__]


def shard_entry(doc: Mapping[str, Any], where: str) -> ShardEntry:
    """`doc` as a ShardEntry, checked to hold every required field; raises CacheFormatError naming `where`."""
    lack = [f for f in _SHARD_ENTRY_REQUIRED if f not in doc]
    if lack:
        raise CacheFormatError(f"{where} lacks {', '.join(lack)}")
    return cast(ShardEntry, dict(doc))


def arrow_schema(codec_name: str) -> pa.Schema:
    """Arrow schema of a shard for a codec; per-position lists are flattened row-major [(L-1)*k]."""
    codec = parse_codec(codec_name)
    return pa.schema(
        [
            pa.field("sequence_id", pa.int64(), nullable=False),
            pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("loss_mask", pa.list_(pa.bool_()), nullable=False),
            pa.field("entry_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("entry_logprobs", pa.list_(codec.arrow_type), nullable=False),
            pa.field("next_token_logprobs", pa.list_(pa.float32()), nullable=False),
            pa.field("tail_mass", pa.list_(pa.float32()), nullable=False),
        ],
        metadata={b"logitcache.format_version": str(FORMAT_VERSION).encode(), b"logitcache.codec": codec_name.encode()},
    )


# Required header fields (capture.json and the manifest share them), by section.
_HEADER_FIELDS: dict[str, tuple[str, ...]] = {
    "teacher": ("name", "dtype", "backend"),
    "tokenizer": ("fingerprint", "vocab_size", "padded_vocab_size"),
    "capture": ("top_k", "codec", "max_seq_len"),
    "dataset": ("source",),
}


def _missing(doc: Mapping[str, Any], fields: Mapping[str, tuple[str, ...]]) -> list[str]:
    out = []
    for section, names in fields.items():
        sub = doc.get(section)
        if not isinstance(sub, Mapping):
            out.append(section)
            continue
        out.extend(f"{section}.{n}" for n in names if n not in sub)
    return out


def validate_header(doc: Mapping[str, Any], where: str) -> None:
    """Checks the version, the codec and the required header fields; raises CacheFormatError naming `where`."""
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        raise CacheFormatError(
            f"{where}: format_version {version!r} is not supported (this logitcache reads version {FORMAT_VERSION}); "
            "upgrade logitcache, or re-run cache-teacher to rebuild the cache"
        )
    missing = _missing(doc, _HEADER_FIELDS)
    if missing:
        raise CacheFormatError(f"{where}: missing field(s) {', '.join(missing)}; the file is not a logitcache header")
    try:
        parse_codec(doc["capture"]["codec"])
    except ValueError as e:
        raise CacheFormatError(f"{where}: {e}") from None
    k = doc["capture"]["top_k"]
    if not isinstance(k, int) or k < 1:
        raise CacheFormatError(f"{where}: capture.top_k must be a positive integer, got {k!r}")


def validate_manifest(doc: Mapping[str, Any], where: str) -> None:
    """validate_header plus the totals and per-shard entries of a finished cache."""
    validate_header(doc, where)
    missing = [f for f in ("shards", "totals") if f not in doc]
    if missing:
        raise CacheFormatError(f"{where}: missing field(s) {', '.join(missing)}; was the capture finalized?")
    for i, shard in enumerate(doc["shards"]):
        shard_entry(shard, f"{where}: shards[{i}]")
