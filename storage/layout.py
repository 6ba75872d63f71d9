"""Where each file of a cache directory lives (FORMAT.md "Directory layout"): ask here, never join names by hand."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from logitcache.storage.schema import CAPTURE_NAME, LOGS_DIR, MANIFEST_NAME, REPLICAS_DIR, SHARDS_DIR, TOKENIZER_DIR

__all__ = ["CacheLayout", "replica_prefix"]


def replica_prefix(replica: int) -> str:
    """The shard-name prefix of replica `replica` (`r000`, `r001`, ...)."""
    return f"r{replica:03d}"


@dataclass(frozen=True)
class CacheLayout:
    """The paths of one local cache directory `root`."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def capture(self) -> Path:
        """capture.json: the cache's identity, written first."""
        return self.root / CAPTURE_NAME

    @property
    def manifest(self) -> Path:
        """manifest.json: written last; its presence means the cache is finished."""
        return self.root / MANIFEST_NAME

    @property
    def shards_dir(self) -> Path:
        return self.root / SHARDS_DIR

    @property
    def replicas_dir(self) -> Path:
        return self.root / REPLICAS_DIR

    @property
    def tokenizer_dir(self) -> Path:
        """The cache's own copy of the teacher's tokenizer (save_pretrained), so the cache is self-contained."""
        return self.root / TOKENIZER_DIR

    @property
    def logs_dir(self) -> Path:
        return self.root / LOGS_DIR

    def replica_summary(self, replica: int, num_replicas: int) -> Path:
        """The file whose presence says replica `replica` of `num_replicas` finished."""
        return self.replicas_dir / f"{replica_prefix(replica)}-of-{num_replicas:03d}.json"

    def capture_log(self, replica: int) -> Path:
        """The JSONL throughput log of one replica's capture."""
        return self.logs_dir / f"capture-{replica_prefix(replica)}.jsonl"
