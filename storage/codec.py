"""Log-prob codecs: how the top-k log-probs of a position are stored on disk.

A codec is named by a string with its parameters, recorded in the manifest (``capture.codec``):

- ``lpq16:fine=1/512x4,coarse=1/32`` (default): log-probs quantized on a grid, stored as uint16 deltas.
  The first ``x4`` ranks (where most of the probability mass and of the KD gradient lives) use the
  fine 1/512-nat grid, the rest the coarse 1/32-nat grid. Deltas between ranks are non-negative because
  the head is sorted, and are small, so zstd (and Parquet's byte-stream split) squeeze them to a few
  bits. Quantizing log-probs (not probabilities) keeps *relative* precision for small p: dark knowledge.
- ``f16``: IEEE half floats (the naive baseline; ~1e-3 relative error, 2 bytes before compression).
- ``f32``: exact float32.

Everything here is plain numpy on whole arrays: no per-token Python loops.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

import numpy as np
import pyarrow as pa

__all__ = ["LogprobCodec", "parse_codec", "DEFAULT_CODEC", "MAX_NATS"]

DEFAULT_CODEC = "lpq16:fine=1/512x4,coarse=1/32"
# Quantized log-probs are clipped to [-MAX_NATS, 0]: p < e^-120 carries no training signal.
MAX_NATS = 120.0
_LPQ_RE = re.compile(r"^lpq16:fine=1/(\d+)x(\d+),coarse=1/(\d+)$")
# float32 exp(-x) is 0 for x > ~103.97 nats (below the smallest subnormal); the probability tables stop past it.
_ZERO_PROB_NATS = 110.0


def _probability_table(inv_step: int) -> np.ndarray:
    """float32 exp(-q / inv_step) for every grid value q up to `_ZERO_PROB_NATS` (the last entry is 0), computed as
    `decode` and `sparse_targets` compute it (float64 quotient rounded to float32, then float32 exp), so a lookup is
    bit-identical to decoding then exponentiating."""
    table = np.exp((np.arange(int(_ZERO_PROB_NATS * inv_step) + 1) / -inv_step).astype(np.float32))
    assert table[-1] == 0.0
    return table


@cache
def _lpq_probability_table(fine_inv_step: int, coarse_inv_step: int) -> tuple[np.ndarray, int]:
    """The fine grid's table followed by the coarse grid's, and the fine table's length (the coarse offset)."""
    fine = _probability_table(fine_inv_step)
    return np.concatenate([fine, _probability_table(coarse_inv_step)]), len(fine)


@dataclass(frozen=True)
class LogprobCodec:
    """Encodes float32 log-probs [N, k] (sorted descending per row) to an Arrow-storable array and back."""

    name: str
    kind: str  # "lpq16" | "f16" | "f32"
    fine_inv_step: int = 0
    fine_ranks: int = 0
    coarse_inv_step: int = 0

    @property
    def arrow_type(self) -> pa.DataType:
        return {"lpq16": pa.uint16(), "f16": pa.float16(), "f32": pa.float32()}[self.kind]

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype({"lpq16": np.uint16, "f16": np.float16, "f32": np.float32}[self.kind])

    def max_abs_error(self, rank: int) -> float:
        """Largest |decoded - original| log-prob error (nats) at a 0-based rank, for |logprob| <= MAX_NATS."""
        if self.kind == "f32":
            return 0.0
        if self.kind == "f16":
            # half floats: 11-bit mantissa, so relative error 2^-11 of |logprob| <= MAX_NATS
            return MAX_NATS * 2.0**-11
        if rank < self.fine_ranks:
            return 0.5 / self.fine_inv_step
        # coarse rounding error (half a step), or the clamp to the last fine rank (see encode): < 1 coarse step
        return 1.0 / self.coarse_inv_step

    def encode(self, logprobs: np.ndarray) -> np.ndarray:
        """float32 [N, k] log-probs, sorted descending per row -> codes [N, k] of ``numpy_dtype``.

        -inf and values below -MAX_NATS are clipped to -MAX_NATS (ids mark padding, not the codes).
        """
        lp = np.asarray(logprobs, dtype=np.float32)
        if lp.ndim != 2:
            raise ValueError(f"log-probs must be 2-D [positions, k], got shape {lp.shape}")
        x = np.clip(-lp, 0.0, MAX_NATS)  # nats of "surprise", >= 0, ascending along ranks
        x = np.nan_to_num(x, nan=MAX_NATS)
        if self.kind == "f32":
            return (-x).astype(np.float32)
        if self.kind == "f16":
            return (-x).astype(np.float16)
        n, k = x.shape
        r = min(self.fine_ranks, k)
        codes = np.empty((n, k), dtype=np.uint16)
        if n == 0:
            return codes
        # fine ranks: absolute value on the fine grid, then deltas. maximum.accumulate keeps the
        # decoded head sorted even if the input had float ties out of order.
        fine = np.rint(x[:, :r].astype(np.float64) * self.fine_inv_step).astype(np.int64)
        fine = np.maximum.accumulate(fine, axis=1)
        codes[:, 0] = fine[:, 0]
        codes[:, 1:r] = np.diff(fine, axis=1)
        if k > r:
            ratio = self.fine_inv_step // self.coarse_inv_step
            # coarse values never decode above the last fine value: clamp to it (ceil on the coarse grid)
            base = -(-fine[:, r - 1] // ratio)
            coarse = np.rint(x[:, r:].astype(np.float64) * self.coarse_inv_step).astype(np.int64)
            coarse = np.maximum(coarse, base[:, None])
            coarse = np.maximum.accumulate(coarse, axis=1)
            codes[:, r] = coarse[:, 0] - base
            codes[:, r + 1 :] = np.diff(coarse, axis=1)
        return codes

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """codes [N, k] -> float32 log-probs [N, k] (sorted descending per row)."""
        c = np.asarray(codes)
        if self.kind in ("f32", "f16"):
            return c.astype(np.float32)
        n, k = c.shape
        r = min(self.fine_ranks, k)
        out = np.empty((n, k), dtype=np.float32)
        fine = np.cumsum(c[:, :r], axis=1, dtype=np.int64)
        out[:, :r] = fine / -self.fine_inv_step
        if k > r:
            ratio = self.fine_inv_step // self.coarse_inv_step
            base = -(-fine[:, r - 1] // ratio)
            coarse = base[:, None] + np.cumsum(c[:, r:], axis=1, dtype=np.int64)
            out[:, r:] = coarse / -self.coarse_inv_step
        return out

    def decode_probs(self, codes: np.ndarray) -> np.ndarray:
        """codes [N, k] -> float32 probabilities [N, k], bit-identical to `np.exp(self.decode(codes))` (float32 exp).

        The trainer reads probabilities, not log-probs. For lpq16 every decoded value is a grid point, so the
        probability is a table lookup: one cumsum of the codes along the ranks (uint32, which holds k * 65535), a
        per-position shift of the coarse ranks onto the coarse table (stored after the fine one), and one `take`;
        about 4x faster than decoding then exponentiating. Values past the tables' end (beyond 110 nats, whose float32
        exp is 0) clip to their last entry, 0.
        """
        c = np.asarray(codes)
        if self.kind != "lpq16":
            return np.exp(self.decode(c))
        k = c.shape[1]
        r = min(self.fine_ranks, k)
        table, coarse_at = _lpq_probability_table(self.fine_inv_step, self.coarse_inv_step)
        idx = np.cumsum(c, axis=1, dtype=np.uint32)  # fine ranks: Q_j; coarse ranks: Q_{r-1} + sum of coarse deltas
        if k > r:
            last = idx[:, r - 1].astype(np.int64)
            base = -(-last // (self.fine_inv_step // self.coarse_inv_step))
            # C_j = base + (idx_j - Q_{r-1}), offset past the fine table; uint32 wraps, the true value is >= 0
            shift = (base - last + coarse_at) % (1 << 32)
            idx[:, r:] += shift.astype(np.uint32)[:, None]
        # a fine value past its table must not land in the coarse one: clip it to the fine table's last entry (0)
        np.minimum(idx[:, :r], coarse_at - 1, out=idx[:, :r])
        return np.take(table, idx, mode="clip")


def parse_codec(name: str) -> LogprobCodec:
    """Codec from its manifest name; raises ValueError naming the supported codecs for anything else."""
    if name in ("f16", "f32"):
        return LogprobCodec(name=name, kind=name)
    m = _LPQ_RE.match(name)
    if m:
        fine_inv, fine_ranks, coarse_inv = (int(g) for g in m.groups())
        problems = []
        if fine_ranks < 1:
            problems.append("fine rank count must be >= 1")
        if coarse_inv < 1 or fine_inv < coarse_inv or fine_inv % coarse_inv:
            problems.append("the fine step must be an integer fraction of the coarse step")
        if fine_inv * MAX_NATS >= 2**16:
            problems.append(f"fine grid 1/{fine_inv} cannot hold {MAX_NATS} nats in uint16")
        if problems:
            raise ValueError(f"invalid codec {name!r}: " + "; ".join(problems))
        return LogprobCodec(name, "lpq16", fine_inv, fine_ranks, coarse_inv)
    raise ValueError(
        f"unknown log-prob codec {name!r}: this logitcache reads 'f32', 'f16' and "
        "'lpq16:fine=1/<F>x<R>,coarse=1/<C>' (e.g. 'lpq16:fine=1/512x4,coarse=1/32'); "
        "upgrade logitcache if the cache was written by a newer version"
    )
