"""logitcache.storage: the cache format (Parquet shards + manifest), its writer, reader and checks.

Imports pyarrow, numpy and zstandard only: never torch or vllm (a test checks it).
"""

from logitcache.storage.cache import (
    CaptureState,
    complete_shards,
    done_sequence_ids,
    finalize_cache,
    open_capture,
    write_cache,
    write_replica_summary,
)
from logitcache.storage.codec import DEFAULT_CODEC, LogprobCodec, parse_codec
from logitcache.storage.fingerprint import sha256_file, tokenizer_fingerprint
from logitcache.storage.invariants import VALUE_TOLERANCE
from logitcache.storage.layout import CacheLayout, replica_prefix
from logitcache.storage.lm_head import LMHeadTransform
from logitcache.storage.reader import CacheReader
from logitcache.storage.records import WINDOW_BITS, CachedSequence, RowGroup, document_id
from logitcache.storage.schema import (
    FORMAT_VERSION,
    READ_VERSIONS,
    CacheFormatError,
    IdentityMismatchError,
    NotFinalizedError,
    PendingReplicasError,
    ShardEntry,
)
from logitcache.storage.store import CacheStore, StorageLocationError
from logitcache.storage.targets import TARGET_MODES, SparseTargets, TargetSpec, sparse_targets
from logitcache.storage.verify import VerifyReport, verify_cache
from logitcache.storage.writer import ShardWriter

__all__ = [
    "DEFAULT_CODEC",
    "FORMAT_VERSION",
    "WINDOW_BITS",
    "CacheFormatError",
    "CacheLayout",
    "CacheReader",
    "CacheStore",
    "CachedSequence",
    "CaptureState",
    "IdentityMismatchError",
    "LMHeadTransform",
    "LogprobCodec",
    "NotFinalizedError",
    "PendingReplicasError",
    "READ_VERSIONS",
    "RowGroup",
    "ShardEntry",
    "ShardWriter",
    "StorageLocationError",
    "SparseTargets",
    "TARGET_MODES",
    "TargetSpec",
    "VALUE_TOLERANCE",
    "VerifyReport",
    "complete_shards",
    "document_id",
    "done_sequence_ids",
    "finalize_cache",
    "open_capture",
    "parse_codec",
    "replica_prefix",
    "sha256_file",
    "sparse_targets",
    "tokenizer_fingerprint",
    "verify_cache",
    "write_cache",
    "write_replica_summary",
]
