"""logitcache.storage: the cache format (Parquet shards + manifest), its writer, reader and checks.

Imports pyarrow, numpy and zstandard only: never torch or vllm (a test checks it).
"""

from logitcache.storage.cache import (
    CaptureState,
    complete_shards,
    done_sequence_ids,
    finalize_cache,
    open_capture,
    write_replica_summary,
)
from logitcache.storage.codec import DEFAULT_CODEC, LogprobCodec, parse_codec
from logitcache.storage.fingerprint import sha256_file, tokenizer_fingerprint
from logitcache.storage.lm_head import LMHeadTransform
from logitcache.storage.reader import CacheReader
from logitcache.storage.records import WINDOW_BITS, CachedSequence, DecodedBatch, document_id
from logitcache.storage.schema import FORMAT_VERSION, CacheFormatError
from logitcache.storage.verify import VerifyReport, verify_cache
from logitcache.storage.writer import ShardWriter

__all__ = [
    "DEFAULT_CODEC",
    "FORMAT_VERSION",
    "WINDOW_BITS",
    "CacheFormatError",
    "CacheReader",
    "CachedSequence",
    "CaptureState",
    "DecodedBatch",
    "LMHeadTransform",
    "LogprobCodec",
    "ShardWriter",
    "VerifyReport",
    "complete_shards",
    "document_id",
    "done_sequence_ids",
    "finalize_cache",
    "open_capture",
    "parse_codec",
    "sha256_file",
    "tokenizer_fingerprint",
    "verify_cache",
    "write_replica_summary",
]
