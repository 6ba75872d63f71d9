"""Codec round trips stay within the stated per-rank error, keep the head sorted, and refuse unknown names."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from logitcache.storage.codec import DEFAULT_CODEC, MAX_NATS, parse_codec

CODECS = [DEFAULT_CODEC, "lpq16:fine=1/256x8,coarse=1/16", "lpq16:fine=1/64x1,coarse=1/64", "f16", "f32"]


@st.composite
def sorted_logprobs(draw: st.DrawFn) -> np.ndarray:
    n = draw(st.integers(1, 12))
    k = draw(st.integers(1, 40))
    surprise = draw(arrays(np.float64, (n, k), elements=st.floats(0, 130, allow_nan=False, allow_subnormal=False)))
    return -np.sort(surprise, axis=1).astype(np.float32)


@pytest.mark.parametrize("name", CODECS)
@settings(max_examples=150, deadline=None)
@given(lp=sorted_logprobs())
def test_round_trip_within_stated_error(name: str, lp: np.ndarray) -> None:
    codec = parse_codec(name)
    decoded = codec.decode(codec.encode(lp))
    assert decoded.dtype == np.float32 and decoded.shape == lp.shape
    expected = np.maximum(lp, -MAX_NATS)  # values below -MAX_NATS are clipped by design
    bound = np.array([codec.max_abs_error(r) for r in range(lp.shape[1])], dtype=np.float32)
    # float32 storage of the original adds at most a few ulps of MAX_NATS
    assert np.all(np.abs(decoded - expected) <= bound[None, :] + 2e-5 * MAX_NATS)
    assert np.all(np.diff(decoded, axis=1) <= 0), "decoded head must stay sorted"


def test_fine_ranks_are_finer_than_coarse() -> None:
    codec = parse_codec(DEFAULT_CODEC)
    rng = np.random.default_rng(0)
    lp = -np.sort(rng.exponential(3.0, size=(2000, 64)), axis=1).astype(np.float32)
    err = np.abs(codec.decode(codec.encode(lp)) - lp)
    assert err[:, :4].max() <= 1 / 1024 + 1e-6
    assert err[:, 4:].max() <= 1 / 32 + 1e-6
    assert err[:, :4].mean() < err[:, 4:].mean() / 8


def test_codes_are_small_deltas() -> None:
    """The point of the delta layout: most codes past rank 0 fit in one byte, so zstd squeezes them."""
    codec = parse_codec(DEFAULT_CODEC)
    rng = np.random.default_rng(0)
    lp = -np.sort(rng.exponential(2.0, size=(500, 64)), axis=1).astype(np.float32)
    codes = codec.encode(lp)
    assert (codes[:, 1:] < 256).mean() > 0.95


def test_neg_inf_is_clipped_not_nan() -> None:
    codec = parse_codec(DEFAULT_CODEC)
    lp = np.array([[-0.1, -2.0, -np.inf, -np.inf]], dtype=np.float32)
    out = codec.decode(codec.encode(lp))
    assert np.all(np.isfinite(out)) and out[0, 2] == pytest.approx(-MAX_NATS, abs=1 / 32)


@pytest.mark.parametrize("bad", ["topk-u9", "lpq16:fine=1/500x4,coarse=1/32", "lpq16:fine=1/1024x4,coarse=1/32", ""])
def test_unknown_or_invalid_codec_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="codec"):
        parse_codec(bad)
