"""A cache directory's lifecycle: open for capture (or resume), list finished shards, finalize the manifest."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from logitcache.storage.fingerprint import sha256_file
from logitcache.storage.records import CachedSequence
from logitcache.storage.schema import (
    CAPTURE_NAME,
    FORMAT_VERSION,
    LOGS_DIR,
    REPLICAS_DIR,
    SHARDS_DIR,
    CacheFormatError,
    IdentityMismatchError,
    PendingReplicasError,
    ShardEntry,
    shard_entry,
    validate_header,
)
from logitcache.storage.store import CacheStore
from logitcache.storage.targets import TargetSpec
from logitcache.storage.writer import ShardWriter, shard_name_re

__all__ = [
    "CaptureState",
    "open_capture",
    "complete_shards",
    "done_sequence_ids",
    "write_replica_summary",
    "finalize_cache",
    "write_cache",
    "with_targets",
    "IDENTITY_SECTIONS",
    "logitcache_version",
]

log = logging.getLogger(__name__)

# What makes two captures "the same cache": a rerun must agree on all of these, except the keys below.
IDENTITY_SECTIONS = ("teacher", "tokenizer", "capture", "dataset", "num_replicas")
# engine_version: a patch release may rerun a capture; tokenizer.name: a moved tokenizer directory is the same
# tokenizer (its fingerprint says so).
_IDENTITY_IGNORED = {"teacher.engine_version", "tokenizer.name"}


def logitcache_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("logitcache")
    except PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class CaptureState:
    """What `open_capture` found: the header in force and whether the cache is already finalized."""

    path: Path
    header: dict[str, Any]
    finished: bool


def _flatten(doc: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(doc, Mapping):
        out: dict[str, Any] = {}
        for k, v in doc.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): doc}


def _identity(header: Mapping[str, Any]) -> dict[str, Any]:
    flat = _flatten({k: header.get(k) for k in IDENTITY_SECTIONS})
    return {k: v for k, v in flat.items() if k not in _IDENTITY_IGNORED}


def _read_json(store: CacheStore, path: Path) -> dict[str, Any]:
    try:
        return json.loads(store.read_text(path))
    except json.JSONDecodeError as e:
        raise CacheFormatError(f"{store.name(path)}: not valid JSON ({e}); the file is damaged") from None


def with_targets(header: Mapping[str, Any]) -> dict[str, Any]:
    """`header` with `capture.targets` filled in as `{"mode": "topk", "top_k": capture.top_k}` where it lacks one."""
    capture = header.get("capture")
    if not isinstance(capture, Mapping) or "targets" in capture or "top_k" not in capture:
        return dict(header)
    return {**header, "capture": {**capture, "targets": {"mode": "topk", "top_k": capture["top_k"]}}}


def open_capture(cache_dir: str | Path, header: Mapping[str, Any]) -> CaptureState:
    """Creates a cache directory for `header`, or checks that an existing one was made with the same identity.

    A header without `capture.targets` is a `topk` capture with K = capture.top_k (`with_targets`). Raises
    CacheFormatError when the directory holds something else, or a cache made with other settings (naming each
    differing field), so a rerun can never mix two teachers' outputs in one cache.
    """
    store = CacheStore(cache_dir)
    if not store.is_local:
        store.check_bucket()  # first: a wrong endpoint or bucket is named as such, not as a failed read
    layout, root = store.layout, store.root
    header = {"format_version": FORMAT_VERSION, "logitcache_version": logitcache_version(), **with_targets(header)}
    validate_header(header, "capture header")
    capture_path = layout.capture
    if store.exists(capture_path):
        existing = _read_json(store, capture_path)
        old, new = _identity(existing), _identity(header)
        diffs = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if diffs:
            detail = "; ".join(f"{k}: cache has {old.get(k)!r}, this run has {new.get(k)!r}" for k in diffs[:8])
            raise IdentityMismatchError(
                f"{store.name()} already holds a cache made with different settings ({detail}). "
                "Use another --output directory, or delete this one to recapture.",
                diffs,
            )
        return CaptureState(root, existing, store.exists(layout.manifest))
    if store.is_file(root):
        raise CacheFormatError(f"{store.name()} is a file, not a cache directory; choose a new --output directory")
    # Entries another replica may have made while creating this same cache a moment ago (capture.json comes
    # first, but its temporary file, and subfolders of an older logitcache, can be seen before the rename), and the
    # logs a launcher opens for its replicas before they start.
    in_creation = {SHARDS_DIR, REPLICAS_DIR, LOGS_DIR}
    foreign = [n for n in store.names(root) if n not in in_creation and not n.startswith(f".{CAPTURE_NAME}")]
    if foreign:
        raise CacheFormatError(
            f"{store.name()} exists and is not a logitcache cache (no {CAPTURE_NAME}; it holds "
            f"{', '.join(foreign[:3])}); "
            "choose an empty or new --output directory"
        )
    store.makedirs(root)
    header = {**header, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    store.write_json(capture_path, header)  # first: from now on the directory is recognisably a cache
    store.makedirs(layout.shards_dir)
    store.makedirs(layout.replicas_dir)
    return CaptureState(root, header, False)


def describe_shard(store: CacheStore, path: Path) -> ShardEntry:
    """Sidecar metadata recomputed from a complete shard file (when a process died before writing it)."""
    with store.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        table = pf.read(columns=["sequence_id", "input_ids"])
        num_row_groups = pf.metadata.num_row_groups
    ids = table.column("sequence_id").to_numpy()
    lengths = table.column("input_ids").combine_chunks().value_lengths().to_numpy()
    return ShardEntry(
        path=f"{SHARDS_DIR}/{path.name}",
        num_sequences=len(ids),
        num_tokens=int(lengths.sum()),
        num_row_groups=num_row_groups,
        num_bytes=store.size(path),
        sha256=sha256_file(path) if store.is_local else store.sha256(path),
        sequence_id_min=int(ids.min()),
        sequence_id_max=int(ids.max()),
    )


def complete_shards(cache_dir: str | Path, prefix: str | None = None) -> list[ShardEntry]:
    """Entries (sidecars) of the finished shards (all, or one replica's `prefix`), sorted by path.

    Deletes that prefix's half-written `*.tmp` files (a killed writer's leftovers: in the shards folder, or in the
    local staging folder of a cache on object storage) and rewrites missing sidecars.
    """
    store = CacheStore(cache_dir)
    shard_dir = store.layout.shards_dir
    if store.is_local and not shard_dir.is_dir():
        return []
    _remove_unfinished(store.staging_dir(), prefix)
    names = store.names(shard_dir)
    out: list[ShardEntry] = []
    for name in names:
        m = shard_name_re.match(name)
        if not m or (prefix is not None and m["prefix"] != prefix):
            continue
        sidecar = shard_dir / f"{name}.json"
        if sidecar.name in names:
            out.append(shard_entry(_read_json(store, sidecar), store.name(sidecar)))
        elif (info := _describe_published(store, shard_dir / name)) is not None:
            store.write_json(sidecar, info)
            out.append(info)
    return out


def _remove_unfinished(staging: Path, prefix: str | None) -> None:
    """Deletes the `*.tmp` shards of `prefix` (all prefixes: None) in `staging`: a killed writer's leftovers."""
    for p in sorted(staging.iterdir()):
        m = shard_name_re.match(p.name.removesuffix(".tmp")) if p.name.endswith(".tmp") else None
        if m and (prefix is None or m["prefix"] == prefix):
            log.info("removing unfinished shard %s", p)
            p.unlink()


def _describe_published(store: CacheStore, path: Path) -> ShardEntry | None:
    """The entry of a shard whose sidecar is missing; None (and the object deleted) for a remote object that is
    not a whole shard: one left by an upload that failed part-way and whose clean-up failed too (store.py)."""
    if store.is_local:
        return describe_shard(store, path)  # renamed into place only when complete
    try:
        return describe_shard(store, path)
    except (OSError, pa.ArrowException) as e:
        log.warning("%s is not a whole shard (%s); deleting it, its sequences are recomputed", store.name(path), e)
        store.delete(path)
        return None


def done_sequence_ids(cache_dir: str | Path, shards: Sequence[ShardEntry]) -> np.ndarray:
    """int64 ids of every sequence stored in `shards` (reads only the sequence_id column)."""
    store = CacheStore(cache_dir)
    fs = None if store.is_local else store.fs
    parts = [
        pq.read_table(str(store.root / s["path"]), columns=["sequence_id"], filesystem=fs).column(0).to_numpy()
        for s in shards
    ]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def write_replica_summary(
    cache_dir: str | Path, *, replica: int, num_replicas: int, summary: Mapping[str, Any]
) -> None:
    """Records that replica `replica` of `num_replicas` finished (rows seen, skipped rows by reason, ...)."""
    store = CacheStore(cache_dir)
    layout = store.layout
    store.makedirs(layout.replicas_dir)
    store.write_json(
        layout.replica_summary(replica, num_replicas), {"replica": replica, "num_replicas": num_replicas, **summary}
    )


def finalize_cache(cache_dir: str | Path) -> dict[str, Any]:
    """Merges every replica's shards into manifest.json (written last, atomically) and returns it.

    Raises PendingReplicasError when a replica has not finished, CacheFormatError when a sequence id appears twice.
    """
    store = CacheStore(cache_dir)
    layout = store.layout
    if not store.exists(layout.capture):
        raise CacheFormatError(f"{store.name()} is not a logitcache cache (no {CAPTURE_NAME}): nothing to finalize")
    header = _read_json(store, layout.capture)
    n = int(header.get("num_replicas", 1))
    missing = [i for i in range(n) if not store.exists(layout.replica_summary(i, n))]
    if missing:
        raise PendingReplicasError(
            f"{store.name()}: replica(s) {missing} of {n} have not finished; rerun cache-teacher with "
            f"--replica I --num-replicas {n} for each, then finalize",
            missing,
        )
    summaries = [_read_json(store, layout.replica_summary(i, n)) for i in range(n)]
    shards = complete_shards(cache_dir)
    ids = done_sequence_ids(cache_dir, shards)
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) != len(ids):
        dup = uniq[counts > 1][:5].tolist()
        raise CacheFormatError(f"{store.name()}: sequence ids stored twice (e.g. {dup}); the cache is inconsistent")
    skipped: Counter[str] = Counter()
    skipped_windows: Counter[str] = Counter()
    for s in summaries:
        skipped.update(s.get("skipped", {}))
        skipped_windows.update(s.get("skipped_windows", {}))
    manifest = {
        **header,
        "logitcache_version": logitcache_version(),
        "finalized_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "totals": {
            "num_sequences": len(ids),
            "num_tokens": int(sum(s["num_tokens"] for s in shards)),
            "num_positions": int(sum(s["num_tokens"] - s["num_sequences"] for s in shards)),
            "num_bytes": int(sum(s["num_bytes"] for s in shards)),
            "num_rows": int(sum(s.get("rows", 0) for s in summaries)),
            "skipped_rows": dict(sorted(skipped.items())),
            "skipped_windows": dict(sorted(skipped_windows.items())),
        },
        "replicas": summaries,
        "shards": shards,
    }
    store.write_json(layout.manifest, manifest)  # last: its presence says every shard above is whole
    return manifest


def write_cache(
    cache_dir: str | Path, header: Mapping[str, Any], sequences: Iterable[CachedSequence], **writer_kwargs: Any
) -> dict[str, Any]:
    """A finished one-replica cache of `sequences` (open, write, replica summary, finalize); returns the manifest.

    `writer_kwargs` go to ShardWriter (top_k, codec and the target mode come from `header`, a header without
    `capture.targets` being topk; vocab_size defaults to the padded one).
    For synthetic caches in tests and benchmarks; a real capture is `logitcache.pipeline.run_capture`.
    """
    if header.get("num_replicas", 1) != 1:
        raise ValueError(f"write_cache writes one replica, but the header says num_replicas={header['num_replicas']}")
    capture = open_capture(cache_dir, header).header["capture"]
    writer_kwargs.setdefault("vocab_size", header["tokenizer"]["padded_vocab_size"])
    targets = TargetSpec.from_header(capture)
    rows = 0
    with ShardWriter(
        cache_dir, top_k=capture["top_k"], codec=capture["codec"], targets=targets, **writer_kwargs
    ) as writer:
        for seq in sequences:
            writer.write(seq)
            rows += 1
    write_replica_summary(cache_dir, replica=0, num_replicas=1, summary={"rows": rows, "skipped": {}})
    return finalize_cache(cache_dir)
