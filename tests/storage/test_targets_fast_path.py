"""The loader's fast path decodes row groups straight to the sparse target view: bit-identical to decoding log-probs
and then taking the view, for every codec, target mode and format version."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from logitcache.storage import CacheReader, TargetSpec, write_cache
from logitcache.storage.codec import parse_codec
from logitcache.storage.records import TargetRowGroup

from .conftest import make_mode_sequence, mode_header

DATA = Path(__file__).parent.parent / "data"
CODECS = ["lpq16:fine=1/512x4,coarse=1/32", "lpq16:fine=1/96x2,coarse=1/3", "lpq16:fine=1/64x1,coarse=1/64", "f16"]
SPECS = [
    TargetSpec(mode="topk", top_k=8),
    TargetSpec(mode="topk", top_k=3),  # fewer ranks than the default codec's fine ranks
    TargetSpec(mode="adaptive", top_k=16, top_p=0.9),
    TargetSpec(mode="sampled", exact_top=2, samples=12, seed=7),
    TargetSpec(mode="sampled", exact_top=0, samples=6, seed=1),
]


@pytest.mark.parametrize("name", [*CODECS, "f32"])
@settings(max_examples=60, deadline=None)
@given(codes=arrays(np.uint16, st.tuples(st.integers(0, 9), st.integers(1, 40)), elements=st.integers(0, 65535)))
def test_decode_probs_is_exp_of_decode_for_any_codes(name: str, codes: np.ndarray) -> None:
    """Any codes, well-formed or not (sums past the tables' end, 120+ nats): the lookup equals float32 exp."""
    codec = parse_codec(name)
    if codec.kind != "lpq16":
        # log-probs <= 0 in the codec's dtype (half floats from the raw bits, finite)
        halves = -np.abs(np.nan_to_num(codes.view(np.float16), posinf=0.0, neginf=0.0))
        codes = halves.astype(codec.numpy_dtype)
    want = np.exp(codec.decode(codes))
    got = codec.decode_probs(codes)
    assert got.dtype == np.float32 and got.shape == codes.shape
    np.testing.assert_array_equal(got, want)


def test_decode_probs_on_every_grid_value() -> None:
    """Every value the default codec can decode to (fine ranks 0..120 nats, coarse ranks past it) looks up exactly."""
    codec = parse_codec("lpq16:fine=1/512x4,coarse=1/32")
    fine = np.arange(0, 64_000, dtype=np.int64)
    codes = np.zeros((len(fine), 6), dtype=np.uint16)
    codes[:, 0] = np.minimum(fine, 65535)
    codes[:, 4] = fine % 97  # coarse ranks: a base derived from the last fine value plus deltas
    codes[:, 5] = fine % 3001
    np.testing.assert_array_equal(codec.decode_probs(codes), np.exp(codec.decode(codes)))


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.mode}{s.max_entries}")
def test_read_targets_equals_the_view_of_the_decoded_row_group(tmp_path: Path, spec: TargetSpec, codec: str) -> None:
    rng = np.random.default_rng(3)
    seqs = [make_mode_sequence(rng, i << 16, int(rng.integers(2, 30)), 200, spec) for i in range(30)]
    write_cache(tmp_path / "c", mode_header(200, spec, codec), seqs, row_group_bytes=6_000, shard_size_bytes=20_000)
    _assert_fast_path_matches(CacheReader(tmp_path / "c"))


def test_read_targets_reads_version_1() -> None:
    _assert_fast_path_matches(CacheReader(DATA / "v1_cache"))


def _assert_fast_path_matches(reader: CacheReader) -> None:
    groups = reader.row_groups()
    assert groups
    for shard, index, _ in groups:
        want = TargetRowGroup.from_row_group(reader.read_row_group(shard, index))
        got = reader.read_targets(shard, index)
        assert got.num_samples == want.num_samples and len(got) == len(want)
        for field in ("sequence_id", "token_offsets", "position_offsets", "input_ids", "loss_mask"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field), field)
        for field in ("next_token_logprobs", "target_ids", "target_probs", "tail_mass"):
            a, b = getattr(got, field), getattr(want, field)
            assert a.dtype == b.dtype, field
            np.testing.assert_array_equal(a, b, field)
