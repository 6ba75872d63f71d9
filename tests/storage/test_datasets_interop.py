"""HF `datasets` reads a cache's shards as they are: `load_dataset("parquet", data_files="CACHE/shards/*.parquet")`,
streaming or not, gives one row per sequence with the columns of FORMAT.md, equal to what CacheReader decodes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from logitcache.storage import CachedSequence, CacheLayout, CacheReader, TargetSpec, parse_codec, write_cache

from .conftest import make_mode_sequence, mode_header

datasets = pytest.importorskip("datasets")

VOCAB = 200
CACHES = {
    "topk-lpq16": (TargetSpec(mode="topk", top_k=8), "lpq16:fine=1/512x4,coarse=1/32"),
    "adaptive-f16": (TargetSpec(mode="adaptive", top_k=16, top_p=0.9), "f16"),
    "sampled-lpq16": (TargetSpec(mode="sampled", exact_top=2, samples=12, seed=7), "lpq16:fine=1/512x4,coarse=1/32"),
}


def _write(path: Path, spec: TargetSpec, codec: str) -> None:
    """20 sequences over several shards and row groups."""
    rng = np.random.default_rng(11)
    seqs = [make_mode_sequence(rng, i << 16, int(rng.integers(2, 30)), VOCAB, spec) for i in range(20)]
    write_cache(path, mode_header(VOCAB, spec, codec), seqs, row_group_bytes=2_000, shard_size_bytes=5_000)


def _load(cache: Path, streaming: bool, tmp_path: Path) -> Any:
    """The README's call (the shards' glob from CacheLayout, not joined by hand)."""
    data_files = str(CacheLayout(cache).shards_dir / "*.parquet")
    if streaming:
        return datasets.load_dataset("parquet", data_files=data_files, split="train", streaming=True)
    return datasets.load_dataset("parquet", data_files=data_files, split="train", cache_dir=str(tmp_path / "hf"))


def _check_row(row: dict[str, Any], seq: CachedSequence, reader: CacheReader) -> None:
    """A datasets row holds the sequence's stored columns: ragged entries, codec codes (decoded as FORMAT.md says)."""
    real = seq.entry_ids >= 0
    assert row["input_ids"] == seq.input_ids.tolist() and row["loss_mask"] == seq.loss_mask.tolist()
    assert row["entry_counts"] == real.sum(axis=1).tolist()
    assert row["entry_ids"] == seq.entry_ids[real].tolist()
    np.testing.assert_array_equal(np.array(row["tail_mass"], np.float32), seq.tail_mass)
    np.testing.assert_array_equal(np.array(row["next_token_logprobs"], np.float32), seq.next_token_logprobs)
    codes = np.zeros(real.shape, dtype=reader.codec.numpy_dtype)
    codes[real] = row["entry_logprobs"]
    decoded = parse_codec(reader.manifest["capture"]["codec"]).decode(codes)
    np.testing.assert_array_equal(decoded[real], seq.entry_logprobs[real])
    if seq.sample_counts is not None:
        assert row["sample_counts"] == seq.sample_counts[real].tolist()
    else:
        assert "sample_counts" not in row


@pytest.mark.parametrize("streaming", [False, True], ids=["map-style", "streaming"])
@pytest.mark.parametrize("name", CACHES)
def test_load_dataset_reads_a_cache(tmp_path: Path, name: str, streaming: bool) -> None:
    spec, codec = CACHES[name]
    _write(tmp_path / "c", spec, codec)
    reader = CacheReader(tmp_path / "c")
    assert len(reader.shards) > 1
    ds = _load(tmp_path / "c", streaming, tmp_path)
    assert list(ds.features) == reader.schema.names
    expected = {seq.sequence_id: seq for seq in reader.iter_sequences()}
    rows = list(ds)
    assert len(rows) == reader.manifest["totals"]["num_sequences"] == len(expected)
    assert [r["sequence_id"] for r in rows] == list(expected)  # shard names sort in storage order
    for row in rows:
        _check_row(row, expected[row["sequence_id"]], reader)
