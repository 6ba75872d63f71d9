"""Writer -> reader round trips, and the clear errors a damaged or foreign cache must give."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from logitcache.storage import (
    CachedSequence,
    CacheFormatError,
    CacheReader,
    ShardWriter,
    complete_shards,
    done_sequence_ids,
    finalize_cache,
    open_capture,
    parse_codec,
)

from .conftest import header, make_sequence, write_cache


def test_round_trip_every_field(small_cache: tuple[Path, list[CachedSequence]]) -> None:
    path, seqs = small_cache
    r = CacheReader(path)
    assert len(r.shards) == len({s["path"] for s in r.shards}) > 1, "small shard size must give several shards"
    got = list(r.iter_sequences())
    assert [g.sequence_id for g in got] == [s.sequence_id for s in seqs]
    codec = parse_codec(r.manifest["capture"]["codec"])
    bound = np.array([codec.max_abs_error(i) for i in range(8)])
    for g, s in zip(got, seqs):
        np.testing.assert_array_equal(g.input_ids, s.input_ids)
        np.testing.assert_array_equal(g.loss_mask, s.loss_mask)
        np.testing.assert_array_equal(g.entry_ids, s.entry_ids)
        assert np.all(np.abs(g.entry_logprobs - s.entry_logprobs) <= bound + 1e-5)
        np.testing.assert_array_equal(g.next_token_logprobs, s.next_token_logprobs)
        np.testing.assert_array_equal(g.tail_mass, s.tail_mass)
        assert g.entry_ids.dtype == np.int32 and g.entry_logprobs.dtype == np.float32


def test_row_groups_cover_every_sequence_once(small_cache: tuple[Path, list[CachedSequence]]) -> None:
    path, seqs = small_cache
    r = CacheReader(path)
    row_groups = r.row_groups()
    assert sum(n for _, _, n in row_groups) == len(seqs)
    ids = np.concatenate([r.read_row_group(s, g).sequence_id for s, g, _ in row_groups])
    assert sorted(ids.tolist()) == sorted(s.sequence_id for s in seqs)
    m = r.manifest
    assert m["totals"]["num_sequences"] == len(seqs)
    assert m["totals"]["num_tokens"] == sum(s.num_tokens for s in seqs)


def test_padding_ids_decode_to_neg_inf(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    s = make_sequence(rng, 0, 6, 5, 5)  # vocab 5 < k 8: fewer real entries than k, padded with id -1
    s.entry_ids = np.pad(s.entry_ids, ((0, 0), (0, 3)), constant_values=-1)
    s.entry_logprobs = np.pad(s.entry_logprobs, ((0, 0), (0, 3)), constant_values=-np.inf)
    s.tail_mass[:] = 0.0
    write_cache(tmp_path / "c", [s], 5, 8)
    got = next(CacheReader(tmp_path / "c").iter_sequences())
    assert np.all(np.isneginf(got.entry_logprobs[:, 5:])) and np.all(np.isfinite(got.entry_logprobs[:, :5]))


def test_writer_rejects_wrong_values(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w = ShardWriter(tmp_path, top_k=8, vocab_size=300)
    bad = make_sequence(rng, 42, 10, 300, 8)
    bad.entry_logprobs = bad.entry_logprobs[:, ::-1].copy()
    with pytest.raises(ValueError, match="sequence 42: .*not sorted"):
        w.write(bad)
    big = make_sequence(rng, 43, 10, 300, 8)
    big.entry_ids[0, 0] = 300
    with pytest.raises(ValueError, match=r"sequence 43: entry_ids outside \[-1, 300\)"):
        w.write(big)
    short = make_sequence(rng, 44, 10, 300, 4)
    with pytest.raises(ValueError, match=r"sequence 44: entry_ids has shape \(9, 4\), expected \(9, 8\)"):
        w.write(short)


def test_unfinished_shard_is_invisible_and_cleaned(tmp_path: Path) -> None:
    """A killed writer leaves only a .tmp file: no shard that looks valid, and resume deletes it."""
    rng = np.random.default_rng(0)
    open_capture(tmp_path, header(300, 8))
    w = ShardWriter(tmp_path, top_k=8, vocab_size=300, row_group_bytes=2_000, shard_size_bytes=10**9)
    for i in range(20):
        w.write(make_sequence(rng, i, 20, 300, 8))
    tmp_files = list((tmp_path / "shards").glob("*.tmp"))
    assert tmp_files and not list((tmp_path / "shards").glob("*.parquet"))
    assert complete_shards(tmp_path, prefix="r000") == []
    assert not list((tmp_path / "shards").glob("*.tmp"))


def test_missing_sidecar_is_recomputed(small_cache: tuple[Path, list[CachedSequence]]) -> None:
    path, _ = small_cache
    before = complete_shards(path)
    sidecar = path / (before[0]["path"] + ".json")
    sidecar.unlink()
    after = complete_shards(path)
    assert after == before and sidecar.exists()
    assert done_sequence_ids(path, after).size == sum(s["num_sequences"] for s in before)


def test_new_writer_continues_shard_numbering(small_cache: tuple[Path, list[CachedSequence]]) -> None:
    path, _ = small_cache
    n = len(complete_shards(path))
    w = ShardWriter(path, top_k=8, vocab_size=300)
    w.write(make_sequence(np.random.default_rng(9), 10_000, 5, 300, 8))
    (info,) = w.close()
    assert info["path"] == f"shards/r000-{n:06d}.parquet"


def _first_shard(path: Path) -> Path:
    return path / CacheReader(path).shards[0]["path"]


def test_truncated_shard_error_names_file(small_cache: tuple[Path, list[CachedSequence]]) -> None:
    path, _ = small_cache
    shard = _first_shard(path)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CacheFormatError, match=rf"{shard.name}.*damaged.*logitcache verify"):
        list(CacheReader(path).iter_sequences())


def test_bit_flip_is_detected_at_read(small_cache: tuple[Path, list[CachedSequence]]) -> None:
    """Page CRCs turn a flipped bit inside the data into an error naming the shard, not a wrong soft label."""
    path, _ = small_cache
    shard = _first_shard(path)
    data = bytearray(shard.read_bytes())
    rg = pq.ParquetFile(shard).metadata.row_group(0)
    (meta,) = [rg.column(i) for i in range(rg.num_columns) if rg.column(i).path_in_schema.startswith("entry_ids.")]
    pos = meta.data_page_offset + meta.total_compressed_size // 2
    data[pos] ^= 0x10
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheFormatError, match=shard.name):
        list(CacheReader(path).iter_sequences())


def test_missing_shard_error_names_file(small_cache: tuple[Path, list[CachedSequence]]) -> None:
    path, _ = small_cache
    shard = _first_shard(path)
    shard.unlink()
    with pytest.raises(CacheFormatError, match=rf"{shard.name}.*cannot open"):
        CacheReader(path).row_groups()


def test_unknown_version_and_codec_refused(small_cache: tuple[Path, list[CachedSequence]]) -> None:
    path, _ = small_cache
    mpath = path / "manifest.json"
    m = json.loads(mpath.read_text())
    mpath.write_text(json.dumps({**m, "format_version": 99}))
    with pytest.raises(CacheFormatError, match="format_version 99 is not supported.*upgrade logitcache"):
        CacheReader(path)
    m["capture"]["codec"] = "topk-u4:magic"
    mpath.write_text(json.dumps(m))
    with pytest.raises(CacheFormatError, match="unknown log-prob codec 'topk-u4:magic'"):
        CacheReader(path)


def test_not_a_cache_and_not_finalized(tmp_path: Path) -> None:
    with pytest.raises(CacheFormatError, match="is not a logitcache cache"):
        CacheReader(tmp_path)
    open_capture(tmp_path / "c", header(300, 8))
    with pytest.raises(CacheFormatError, match="not been finalized.*logitcache finalize"):
        CacheReader(tmp_path / "c")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hi")
    with pytest.raises(CacheFormatError, match="exists and is not a logitcache cache"):
        open_capture(tmp_path / "other", header(300, 8))


def test_reopen_with_other_settings_refused(small_cache: tuple[Path, list[CachedSequence]]) -> None:
    path, _ = small_cache
    state = open_capture(path, header(300, 8))
    assert state.finished
    with pytest.raises(
        CacheFormatError,
        match=r"different settings \(capture.targets.top_k: cache has 8, this run has 16; capture.top_k: cache has 8",
    ):
        open_capture(path, header(300, 16))


def test_finalize_requires_every_replica_and_unique_ids(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    open_capture(tmp_path, {**header(300, 8), "num_replicas": 2})
    for prefix in ("r000", "r001"):
        w = ShardWriter(tmp_path, top_k=8, prefix=prefix)
        w.write(make_sequence(rng, 5, 4, 300, 8))  # the same id from both replicas: a bug upstream
        w.close()
    from logitcache.storage import write_replica_summary

    write_replica_summary(tmp_path, replica=0, num_replicas=2, summary={"rows": 1})
    with pytest.raises(CacheFormatError, match=r"replica\(s\) \[1\] of 2 have not finished"):
        finalize_cache(tmp_path)
    write_replica_summary(tmp_path, replica=1, num_replicas=2, summary={"rows": 1})
    with pytest.raises(CacheFormatError, match="sequence ids stored twice"):
        finalize_cache(tmp_path)


def test_shards_use_the_documented_encodings(small_cache: tuple[Path, list[CachedSequence]]) -> None:
    """FORMAT.md's physical encoding is really applied (pyarrow ignores option names it does not match)."""
    path, _ = small_cache
    meta = pq.ParquetFile(next((path / "shards").glob("*.parquet"))).metadata
    rg = meta.row_group(0)
    encodings = {rg.column(i).path_in_schema.split(".")[0]: set(rg.column(i).encodings) for i in range(rg.num_columns)}
    for col in ("entry_logprobs", "next_token_logprobs", "tail_mass"):
        assert "BYTE_STREAM_SPLIT" in encodings[col], (col, encodings[col])
    assert all("RLE_DICTIONARY" not in e and "PLAIN_DICTIONARY" not in e for e in encodings.values()), encodings
    assert all(rg.column(i).compression == "ZSTD" for i in range(rg.num_columns))


def test_finalize_totals_skipped_rows_and_windows_over_replicas(tmp_path: Path) -> None:
    from logitcache.storage import write_replica_summary

    rng = np.random.default_rng(0)
    open_capture(tmp_path, {**header(300, 8), "num_replicas": 2})
    for i, prefix in enumerate(("r000", "r001")):
        w = ShardWriter(tmp_path, top_k=8, prefix=prefix)
        w.write(make_sequence(rng, (i + 1) << 16, 4, 300, 8))
        w.close()
        summary = {
            "rows": 3,
            "skipped": {"empty": 1, "no_loss_positions": i},
            "skipped_windows": {"no_loss_positions": 2 + i, "empty": 1},
        }
        write_replica_summary(tmp_path, replica=i, num_replicas=2, summary=summary)
    totals = finalize_cache(tmp_path)["totals"]
    assert totals["skipped_rows"] == {"empty": 2, "no_loss_positions": 1}
    assert totals["skipped_windows"] == {"empty": 2, "no_loss_positions": 5}
