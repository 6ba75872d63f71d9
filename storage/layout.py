"""Where each file of a cache directory lives (FORMAT.md "Directory layout"): ask here, never join names by hand."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from logitcache.storage.schema import CAPTURE_NAME, LOGS_DIR, MANIFEST_NAME, REPLICAS_DIR, SHARDS_DIR, TOKENIZER_DIR

__all__ = ["CacheLayout", "replica_prefix"]


def replica_prefix(replica: int) -> str:
    """The shard-name prefix of replica `replica` (`r000`, `r001`, ...)."""
    return f"r{replica:03d}"


class _Under:
    """A path of the layout: `root / name` (a read-only attribute of CacheLayout)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, layout: CacheLayout, owner: type | None = None) -> Path:
        return layout.root / self.name


@dataclass(frozen=True)
class CacheLayout:
    """The paths of one local cache directory `root`."""

    root: Path

    capture = _Under(CAPTURE_NAME)  # capture.json: the cache's identity, written first
    manifest = _Under(MANIFEST_NAME)  # manifest.json: written last; its presence means the cache is finished
    shards_dir = _Under(SHARDS_DIR)
    replicas_dir = _Under(REPLICAS_DIR)  # one summary per finished replica
    tokenizer_dir = _Under(TOKENIZER_DIR)  # the teacher's tokenizer (save_pretrained): the cache is self-contained
    logs_dir = _Under(LOGS_DIR)  # the capture's JSONL throughput logs

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def replica_summary(self, replica: int, num_replicas: int) -> Path:
        """The file whose presence says replica `replica` of `num_replicas` finished."""
        return self.replicas_dir / f"{replica_prefix(replica)}-of-{num_replicas:03d}.json"

    def capture_log(self, replica: int) -> Path:
        """The JSONL throughput log of one replica's capture."""
        return self.logs_dir / f"capture-{replica_prefix(replica)}.jsonl"

    def replica_log(self, replica: int) -> Path:
        """The output (stdout + stderr, every attempt) of one replica's process under a launcher (`--launcher ray`)."""
        return self.logs_dir / f"replica-{replica_prefix(replica)}.log"
