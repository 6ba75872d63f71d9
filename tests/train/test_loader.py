"""The loader's batches (row groups decoded to the sparse target view, sequences sliced into the batch) equal
`collate` of the same sequences read one by one through the reference path (`CachedSequence.sparse_targets()`)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from logitcache.storage import CacheReader
from logitcache.train.data import CacheStream, collate


@pytest.mark.parametrize("cache", ["synth_cache", "sampled_cache"])
@pytest.mark.parametrize(
    "stream",
    [
        {"batch_count": 5},
        {"batch_count": 60, "batch_unit": "tokens", "eval_fraction": 0.2, "shuffle_parts": 2},
        {"batch_count": 4, "eval_fraction": 0.3, "split": "eval"},
    ],
)
def test_stream_batches_equal_collate_of_the_same_sequences(
    cache: str, stream: dict[str, object], request: pytest.FixtureRequest
) -> None:
    path: Path = request.getfixturevalue(cache)
    reader = CacheReader(path)
    by_id = {s.sequence_id: s for s in reader.iter_sequences()}
    batches = list(itertools.islice(CacheStream(str(path), seed=4, **stream), 25))  # type: ignore[arg-type]
    assert batches
    for b in batches:
        seqs = [by_id[int(i)] for i in b["sequence_id"]]
        want = collate(seqs, reader.vocab_size, epoch=int(b["epoch"]))
        assert b.keys() == want.keys()
        for key, value in want.items():
            assert b[key].dtype == value.dtype, key
            assert torch.equal(b[key], value), key
