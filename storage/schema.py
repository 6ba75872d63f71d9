"""The cache format's names: columns, Arrow schema, manifest fields and their validation (see FORMAT.md)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict, cast

import pyarrow as pa

from logitcache.storage.codec import parse_codec
from logitcache.storage.targets import TargetSpec

__all__ = [
    "FORMAT_VERSION",
    "READ_VERSIONS",
    "V1_COLUMNS",
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
    "v1_arrow_schema",
    "validate_header",
    "shard_version_problem",
    "validate_manifest",
    "CacheFormatError",
    "IdentityMismatchError",
    "PendingReplicasError",
    "NotFinalizedError",
]

FORMAT_VERSION = 2  # what every new cache is written in
READ_VERSIONS = (1, 2)  # what a reader reads (FORMAT.md "Reading version 1")
MANIFEST_NAME = "manifest.json"
CAPTURE_NAME = "capture.json"  # the cache's identity, written first; see FORMAT.md
SHARDS_DIR = "shards"
REPLICAS_DIR = "replicas"
TOKENIZER_DIR = "tokenizer"  # a copy of the teacher's tokenizer, so the cache is self-contained
LOGS_DIR = "logs"

# Parquet columns of format version 2, in file order; `sample_counts` only in `sampled` caches.
COLUMNS = (
    "sequence_id",
    "input_ids",
    "loss_mask",
    "entry_counts",
    "entry_ids",
    "entry_logprobs",
    "sample_counts",
    "next_token_logprobs",
    "tail_mass",
)
# Format version 1 (read only): fixed K entries per position, under the old names.
V1_COLUMNS = (
    "sequence_id",
    "input_ids",
    "loss_mask",
    "topk_ids",
    "topk_logprobs",
    "target_logprobs",
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


def _metadata(version: int, codec_name: str) -> dict[bytes, bytes]:
    return {b"logitcache.format_version": str(version).encode(), b"logitcache.codec": codec_name.encode()}


def arrow_schema(codec_name: str, sampled: bool = False) -> pa.Schema:
    """Arrow schema of a version 2 shard: ragged per-position entries; `sample_counts` only when `sampled`."""
    codec = parse_codec(codec_name)
    types = {
        "sequence_id": pa.int64(),
        "input_ids": pa.list_(pa.int32()),
        "loss_mask": pa.list_(pa.bool_()),
        "entry_counts": pa.list_(pa.uint16()),
        "entry_ids": pa.list_(pa.int32()),
        "entry_logprobs": pa.list_(codec.arrow_type),
        "sample_counts": pa.list_(pa.uint16()),
        "next_token_logprobs": pa.list_(pa.float32()),
        "tail_mass": pa.list_(pa.float32()),
    }
    names = [c for c in COLUMNS if sampled or c != "sample_counts"]
    return pa.schema(
        [pa.field(n, types[n], nullable=False) for n in names], metadata=_metadata(FORMAT_VERSION, codec_name)
    )


def v1_arrow_schema(codec_name: str) -> pa.Schema:
    """Arrow schema of a version 1 shard (read only): per-position lists flattened row-major [(L-1)*K]."""
    codec = parse_codec(codec_name)
    return pa.schema(
        [
            pa.field("sequence_id", pa.int64(), nullable=False),
            pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("loss_mask", pa.list_(pa.bool_()), nullable=False),
            pa.field("topk_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("topk_logprobs", pa.list_(codec.arrow_type), nullable=False),
            pa.field("target_logprobs", pa.list_(pa.float32()), nullable=False),
            pa.field("tail_mass", pa.list_(pa.float32()), nullable=False),
        ],
        metadata=_metadata(1, codec_name),
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


def _version_problem(version: Any, where: str) -> CacheFormatError | None:
    if version in READ_VERSIONS and isinstance(version, int):
        return None
    return CacheFormatError(
        f"{where}: format_version {version!r} is not supported (this logitcache reads versions "
        f"{', '.join(map(str, READ_VERSIONS))}); upgrade logitcache if a newer version wrote the cache, "
        "or re-run cache-teacher to rebuild it"
    )


def _targets_problem(capture: Mapping[str, Any]) -> str | None:
    """What is wrong with a version 2 header's `capture.targets` (None when it is valid and matches top_k)."""
    targets = capture.get("targets")
    if not isinstance(targets, Mapping):
        return "capture.targets is missing (version 2 records the target mode and its parameters there)"
    try:
        spec = TargetSpec(**dict(targets))
    except (TypeError, ValueError) as e:
        return f"capture.targets {dict(targets)!r} is not valid: {e}"
    lack = [k for k in spec.to_header() if k not in targets]
    if lack:
        return f"capture.targets lacks {', '.join(lack)} (every parameter of mode {spec.mode!r} is recorded)"
    if capture["top_k"] != spec.max_entries:
        return (
            f"capture.top_k is {capture['top_k']!r}, but capture.targets allows {spec.max_entries} entries per position"
        )
    return None


def validate_header(doc: Mapping[str, Any], where: str) -> None:
    """Checks the version, the codec, the target mode and the required fields; raises CacheFormatError naming `where`."""
    version = doc.get("format_version")
    err = _version_problem(version, where)
    if err is not None:
        raise err
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
    if doc["format_version"] >= 2:
        problem = _targets_problem(doc["capture"])
        if problem:
            raise CacheFormatError(f"{where}: {problem}")


def shard_version_problem(metadata: Mapping[bytes, bytes] | None, expected: int, where: str) -> str | None:
    """What is wrong with a shard's key-value metadata version (None when it is `expected`)."""
    raw = (metadata or {}).get(b"logitcache.format_version")
    got = raw.decode(errors="replace") if raw is not None else None
    if got == str(expected):
        return None
    return (
        f"{where}: the shard says logitcache.format_version {got!r} but the manifest says {expected} "
        f"(this logitcache reads versions {', '.join(map(str, READ_VERSIONS))}); the shard does not belong to this "
        "cache, or a newer logitcache wrote it: upgrade logitcache, or delete the shard and rerun cache-teacher"
    )


def validate_manifest(doc: Mapping[str, Any], where: str) -> None:
    """validate_header plus the totals and per-shard entries of a finished cache."""
    validate_header(doc, where)
    missing = [f for f in ("shards", "totals") if f not in doc]
    if missing:
        raise CacheFormatError(f"{where}: missing field(s) {', '.join(missing)}; was the capture finalized?")
    for i, shard in enumerate(doc["shards"]):
        shard_entry(shard, f"{where}: shards[{i}]")
