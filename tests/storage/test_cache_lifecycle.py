"""The storage API that callers use instead of file names and error text: layout, error types, write_cache,
ShardWriter as a context manager, and the one value checker shared by the writer and verify."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from logitcache.storage import (
    VALUE_TOLERANCE,
    CachedSequence,
    CacheFormatError,
    CacheLayout,
    CacheReader,
    IdentityMismatchError,
    NotFinalizedError,
    PendingReplicasError,
    ShardWriter,
    complete_shards,
    finalize_cache,
    open_capture,
    verify_cache,
    write_cache,
    write_replica_summary,
)
from logitcache.storage.invariants import value_problems

from .conftest import header, make_sequence


def _seqs(n: int, seed: int = 0) -> list[CachedSequence]:
    rng = np.random.default_rng(seed)
    return [make_sequence(rng, i, 12, 300, 8) for i in range(n)]


def test_write_cache_makes_a_finished_verified_cache(tmp_path: Path) -> None:
    seqs = _seqs(10)
    manifest = write_cache(tmp_path / "c", header(300, 8), iter(seqs), row_group_bytes=2_000)
    assert manifest["totals"]["num_sequences"] == 10 and manifest["totals"]["num_rows"] == 10
    layout = CacheLayout(tmp_path / "c")
    assert layout.manifest.exists() and layout.replica_summary(0, 1).exists()
    assert [s.sequence_id for s in CacheReader(layout.root).iter_sequences()] == list(range(10))
    assert verify_cache(str(layout.root)).ok


def test_write_cache_checks_ids_against_the_padded_vocab(tmp_path: Path) -> None:
    (bad,) = _seqs(1)
    bad.entry_ids[0, 0] = 300
    with pytest.raises(ValueError, match=r"entry_ids outside \[-1, 300\)"):
        write_cache(tmp_path / "c", header(300, 8), [bad])
    with pytest.raises(ValueError, match="num_replicas=2"):
        write_cache(tmp_path / "d", {**header(300, 8), "num_replicas": 2}, [])


def test_layout_names_every_file_the_capture_writes(tmp_path: Path) -> None:
    write_cache(tmp_path / "c", header(300, 8), _seqs(2))
    layout = CacheLayout(tmp_path / "c")
    assert layout.capture.is_file() and layout.shards_dir.is_dir() and layout.replicas_dir.is_dir()
    assert layout.replica_summary(1, 2).name == "r001-of-002.json"
    assert layout.capture_log(3) == layout.logs_dir / "capture-r003.jsonl"
    assert layout.tokenizer_dir.parent == layout.root


def test_identity_mismatch_is_its_own_error(tmp_path: Path) -> None:
    open_capture(tmp_path, header(300, 8))
    with pytest.raises(IdentityMismatchError) as info:
        open_capture(tmp_path, header(300, 16))
    assert info.value.differences == ["capture.targets.top_k", "capture.top_k"]  # K is both M and the mode's top_k
    assert isinstance(info.value, CacheFormatError)


def test_pending_replicas_is_its_own_error(tmp_path: Path) -> None:
    open_capture(tmp_path, {**header(300, 8), "num_replicas": 3})
    write_replica_summary(tmp_path, replica=1, num_replicas=3, summary={"rows": 0})
    with pytest.raises(PendingReplicasError) as info:
        finalize_cache(tmp_path)
    assert info.value.missing == [0, 2]
    with pytest.raises(NotFinalizedError):
        CacheReader(tmp_path)


def test_other_finalize_failures_are_not_pending_replicas(tmp_path: Path) -> None:
    with pytest.raises(CacheFormatError) as info:
        finalize_cache(tmp_path / "nothing")
    assert not isinstance(info.value, PendingReplicasError)


def test_writer_context_closes_on_success(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, top_k=8, vocab_size=300) as w:
        for s in _seqs(3):
            w.write(s)
    (entry,) = complete_shards(tmp_path)
    assert entry["num_sequences"] == 3 and not list((tmp_path / "shards").glob("*.tmp"))


def test_writer_context_leaves_no_half_shard_on_error(tmp_path: Path) -> None:
    def capture_then_fail() -> None:
        with ShardWriter(tmp_path, top_k=8, vocab_size=300, row_group_bytes=2_000, shard_size_bytes=20_000) as w:
            for s in _seqs(40):
                w.write(s)
            assert list((tmp_path / "shards").glob("*.tmp")), "a shard must be open when the error comes"
            raise RuntimeError("engine died")

    with pytest.raises(RuntimeError, match="engine died"):
        capture_then_fail()
    shards = (tmp_path / "shards").iterdir()
    assert not [p for p in shards if p.name.endswith(".tmp")]
    # shards completed before the error are whole and stay
    for entry in complete_shards(tmp_path):
        assert (tmp_path / entry["path"]).stat().st_size == entry["num_bytes"]


def test_one_value_checker_for_writer_and_verify() -> None:
    """Within VALUE_TOLERANCE the writer accepts; beyond it, the same message comes from both writer and verify."""
    (s,) = _seqs(1)
    assert value_problems(s, 300) == []
    s.entry_logprobs[:, 0] = VALUE_TOLERANCE / 2  # float rounding of a log-prob near 0: accepted
    s.entry_logprobs[:, 1:] = np.minimum(s.entry_logprobs[:, 1:], 0.0)
    assert value_problems(s, 300) == []
    s.entry_logprobs[0, 0] = 2 * VALUE_TOLERANCE
    assert value_problems(s, 300) == ["entry log-prob > 0"]
    s.tail_mass[0] = -2 * VALUE_TOLERANCE
    assert value_problems(s, 300)[-1] == "tail mass outside [0, 1]"
    s.input_ids[0] = -1
    assert value_problems(s, None)[0] == "input_ids outside [0, inf)"
