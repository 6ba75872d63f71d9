"""Sparse teacher targets from full-vocabulary log-probs: top-k, adaptive k and seeded sampled draws (torch + numpy).

`targets_from_logprobs` runs where the full distribution is (the HF backend, vLLM's workers on the teacher's device):
device-agnostic torch ops, no per-position Python loop, a few [n, V] temporaries. `compact_entries` (numpy) turns its
fixed-width columns into what a `CachedSequence` stores. The modes are defined in storage/targets.py.

Draws are counter-based, so a rerun, a resumed run, another batch composition or the other backend draws the same ids:
the j-th draw at (seed, sequence_id, position t) takes u in [0, 1) from a splitmix64 hash of (seed, sequence_id, t, j)
(the top 53 bits as float64), then inverts the CDF of the residual distribution (the exact top-r zeroed): the drawn
id is the first whose CDF exceeds u * CDF[-1]. The CDF is float64, in two levels (float32 sums of blocks of ~sqrt(V/N)
ids accumulated in float64, then a float64 cumulative sum inside the drawn block): the same search as one cumulative
sum over the vocabulary, to ~1e-7 of a block's mass, without its float64 [n, V] array (2x faster on CPU, measured).

The tails are exp(shift) * sum(exp(log-probs - shift)) outside the entries, shift = the largest log-prob outside them
(a complement log-sum-exp: `1 - sum(head)` loses all relative precision once the tail falls below ~1e-7).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from logitcache.storage.targets import TargetSpec

__all__ = ["targets_from_logprobs", "compact_entries", "draw_uniforms", "hash_uniform_reference"]

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB


def _signed(x: int) -> int:
    """A 64-bit pattern as the int64 torch stores it."""
    return x - (1 << 64) if x >= 1 << 63 else x


def _mix_int(x: int) -> int:
    """splitmix64 on Python ints (the reference the torch version must equal bit for bit)."""
    z = (x + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _MUL1) & _MASK64
    z = ((z ^ (z >> 27)) * _MUL2) & _MASK64
    return z ^ (z >> 31)


def hash_uniform_reference(seed: int, sequence_id: int, position: int, draw: int) -> float:
    """The draw's uniform in [0, 1), in plain Python (the definition; `draw_uniforms` is its vectorised form)."""
    z = _mix_int(_mix_int(_mix_int(_mix_int(seed & _MASK64) ^ (sequence_id & _MASK64)) ^ (position & _MASK64)) ^ draw)
    return (z >> 11) * 2.0**-53


def _shr(x: Any, s: int) -> Any:
    """Logical right shift of int64 tensors (torch's >> is arithmetic: mask the sign bits it copies)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(x: Any) -> Any:
    """splitmix64 on int64 tensors (multiplication wraps modulo 2^64 on CPU and CUDA)."""
    z = x + _signed(_GOLDEN)
    z = (z ^ _shr(z, 30)) * _signed(_MUL1)
    z = (z ^ _shr(z, 27)) * _signed(_MUL2)
    return z ^ _shr(z, 31)


def draw_uniforms(seed: int, sequence_ids: Any, positions: Any, num_draws: int) -> Any:
    """float64 [n, num_draws] uniforms in [0, 1) for positions (int64 [n]) of sequences (int or int64 [n])."""
    import torch

    positions = positions.to(torch.int64)
    sid = torch.as_tensor(sequence_ids, dtype=torch.int64, device=positions.device)
    base = _signed(_mix_int(seed & _MASK64))
    per_position = _mix(_mix(sid ^ base) ^ positions)  # [n]
    j = torch.arange(num_draws, dtype=torch.int64, device=positions.device)
    z = _mix(per_position[:, None] ^ j[None, :])  # [n, N]
    return _shr(z, 11).to(torch.float64) * 2.0**-53


def _topk_padded(logprobs: Any, k: int) -> tuple[Any, Any]:
    """Sorted top-k (ids int64, lps) of [n, V], padded with -1 / -inf where k exceeds V."""
    import torch

    n, vocab = logprobs.shape
    lps, ids = logprobs.topk(min(k, vocab), dim=-1, sorted=True)
    if k > vocab:
        pad = k - vocab
        ids = torch.cat([ids, ids.new_full((n, pad), -1)], dim=1)
        lps = torch.cat([lps, lps.new_full((n, pad), float("-inf"))], dim=1)
    return ids, lps


def _exclude(logprobs: Any, ids: Any, keep: Any, inplace: bool) -> Any:
    """`logprobs` [n, V] with the kept `ids` [n, W] set to -inf (padding -1 columns must not be kept).

    With `inplace` the entries are set in `logprobs` itself (no [n, V] copy).
    """
    import torch

    # -inf where kept, else the value already there (a no-op write). Padding columns write to the row's first id
    # with that column's value, so duplicate indices never write different values (scatter's order is undefined).
    pad = ids < 0
    safe = torch.where(pad, ids[:, :1], ids)
    keep = torch.where(pad, keep[:, :1], keep)
    src = torch.where(keep, float("-inf"), logprobs.gather(1, safe))
    return logprobs.scatter_(1, safe, src) if inplace else logprobs.scatter(1, safe, src)


def _adaptive_keep(top_lps: Any, top_p: float) -> Any:
    """bool [n, K]: the smallest head per row whose mass reaches top_p (all K where the cap stops it first)."""
    import torch

    mass = top_lps.double().exp().cumsum(dim=-1)
    # column c is kept when the mass before it is still short of top_p
    before = torch.cat([mass.new_zeros((mass.shape[0], 1)), mass[:, :-1]], dim=1)
    return (before < top_p) & torch.isfinite(top_lps)


def _block_size(vocab: int, n_draws: int) -> int:
    """Ids per CDF block: the power of two near sqrt(V / N), which balances the blocks' CDF (V / size per row)
    against the drawn blocks' (N * size per row)."""
    return 1 << max(0, round(math.log2(max(vocab / max(n_draws, 1), 1.0)) / 2))


def _inverse_cdf(masked: Any, shift: Any, u: Any) -> tuple[Any, Any]:
    """Inverse-CDF draws from exp(masked - shift) renormalised, and that mass: ids int64 [n, N], total float64 [n].

    masked: float32 [n, V] log-probs, -inf where excluded; shift: float32 [n] (the row's largest, so no underflow);
    u: float64 [n, N]. The CDF is float64 in two levels (block sums, then inside the drawn block): the search of
    one cumulative sum over the vocabulary without its float64 [n, V] array (2-3x faster on CPU, measured). Rows
    without mass draw arbitrary ids (the caller masks them).
    """
    import torch

    n, vocab = masked.shape
    n_draws = u.shape[1]
    size = _block_size(vocab, n_draws)
    n_blocks = -(-vocab // size)
    if vocab % size:
        probs = masked.new_zeros((n, n_blocks * size))  # float32, zero past the vocabulary
        torch.sub(masked, shift[:, None], out=probs[:, :vocab]).exp_()
    else:
        probs = torch.sub(masked, shift[:, None]).exp_()
    by_block = probs.view(n, n_blocks, size)
    # block sums in float32 (a float64 reduction is 15x slower on CPU), accumulated in float64: ~1e-7 relative
    block_cdf = by_block.sum(dim=-1).double().cumsum_(dim=-1)  # [n, n_blocks]
    total = block_cdf[:, -1:].contiguous()
    x = u * total  # [n, N]
    # the first block whose CDF exceeds x; x rounding up to the total falls in the last block with mass
    block = torch.minimum(
        torch.searchsorted(block_cdf, x, right=True), torch.searchsorted(block_cdf, total, right=False)
    )
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), 0.0)  # [n, N]
    local = by_block.gather(1, block[:, :, None].expand(n, n_draws, size))  # [n, N, size]
    local_cdf = local.double().cumsum_(dim=-1).add_(before[:, :, None])
    # the first id whose CDF exceeds x (it has mass); past the block's end (float rounding): its last id with mass
    offset = torch.minimum(
        torch.searchsorted(local_cdf, x[:, :, None], right=True),
        torch.searchsorted(local_cdf, local_cdf[:, :, -1:].contiguous(), right=False),
    )[:, :, 0]
    return block * size + offset, total[:, 0]


def _sampled(logprobs: Any, spec: TargetSpec, sequence_id: Any, positions: Any, inplace: bool) -> tuple[Any, ...]:
    """`sampled` targets (see targets_from_logprobs): r exact columns, then N draws from the residual."""
    import torch

    r = spec.exact_top
    # the exact top-r, and the residual's largest log-prob (-inf when r covers the vocabulary) to shift by
    ids, lps = _topk_padded(logprobs, r + 1)
    top_ids, top_lps, shift = ids[:, :r], lps[:, :r], lps[:, r]
    masked = _exclude(logprobs, top_ids, top_ids >= 0, inplace) if r > 0 else logprobs
    has_mass = torch.isfinite(shift)
    shift = torch.where(has_mass, shift, 0.0)
    u = draw_uniforms(spec.seed, sequence_id, positions.to(logprobs.device), spec.samples)
    draw_ids, total = _inverse_cdf(masked, shift, u)
    tail = (shift.double().exp() * total).float()  # the residual mass: 0 where there is none
    draw_lps = torch.where(has_mass[:, None], masked.gather(1, draw_ids.clamp(max=masked.shape[1] - 1)), float("-inf"))
    draw_ids = torch.where(has_mass[:, None], draw_ids, -1)
    return torch.cat([top_ids, draw_ids], dim=1), torch.cat([top_lps, draw_lps], dim=1), tail


def targets_from_logprobs(
    logprobs: Any, spec: TargetSpec, sequence_id: Any, positions: Any, *, inplace: bool = False
) -> tuple[Any, Any, Any]:
    """The stored entries of n positions from their full-vocabulary log-softmax at T=1.

    logprobs: float32 [n, V] (overwritten when `inplace`: no [n, V] copy); sequence_id: int, or int64 [n] when the rows
    come from several sequences; positions: int64 [n], each row's index t inside its window (0..L-2).
    Returns ids int64 [n, W], lps float32 [n, W], tail float32 [n] with W = spec.max_entries:
      topk/adaptive: sorted entries, padding (adaptive beyond k) -1 / -inf; tail = exact mass outside the entries.
      sampled: r exact columns, then the N draws in draw order (repeats kept; -1 / -inf when the residual is 0);
               tail = the residual mass outside the exact top-r.
    """
    import torch

    logprobs = logprobs.float()
    if spec.mode == "sampled":
        return _sampled(logprobs, spec, sequence_id, positions, inplace)
    if spec.mode not in ("topk", "adaptive"):
        raise ValueError(f"unknown target mode {spec.mode!r}")
    # one column more than stored: the largest log-prob outside the entries, to shift the tail's exponentials by
    ids, lps = _topk_padded(logprobs, spec.top_k + 1)
    ids, lps, next_lp = ids[:, :-1], lps[:, :-1], lps[:, -1]
    keep = _adaptive_keep(lps, spec.top_p) if spec.mode == "adaptive" else ids >= 0
    if spec.mode == "adaptive":  # the largest outside is the first column not kept (kept columns are a prefix)
        k = keep.sum(dim=1, keepdim=True)
        next_lp = torch.where(k[:, 0] < lps.shape[1], lps.gather(1, k.clamp(max=lps.shape[1] - 1))[:, 0], next_lp)
    tail = _exp_sum(_exclude(logprobs, ids, keep, inplace), next_lp)
    ids = torch.where(keep, ids, -1)
    lps = torch.where(keep, lps, float("-inf"))
    return ids, lps, tail


def _exp_sum(masked: Any, shift: Any) -> Any:
    """sum(exp(masked)) per row, float32 [n], as exp(shift) * sum(exp(masked - shift)) with shift >= each row's max
    (no underflow however small the mass; 0 where all is -inf). Overwrites `masked`: the caller's copy or buffer.

    The tail as a masked log-sum-exp over the complement, not 1 - sum(head): that subtraction loses all relative
    precision once the tail falls below ~1e-7. torch.logsumexp costs 2-3x more on CPU (its temporaries).
    """
    import torch

    shift = torch.where(torch.isfinite(shift), shift, 0.0)
    return (shift.double().exp() * masked.sub_(shift[:, None]).exp_().sum(dim=-1).double()).float()


def compact_entries(
    ids: np.ndarray, lps: np.ndarray, spec: TargetSpec
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """What a CachedSequence stores from `targets_from_logprobs`' columns (numpy [n, W]).

    Returns entry_ids int32 [n, M], entry_logprobs float32 [n, M] and, for sampled, sample_counts uint16 [n, M]
    (0 for exact entries and padding): the draws become unique ids with counts, sorted by log-prob descending
    (ties by id) after the exact top-r; padding (-1, -inf, 0) last. Identity (with the dtypes) for topk/adaptive.
    """
    ids = np.asarray(ids)
    lps = np.asarray(lps)
    if spec.mode != "sampled":
        return ids.astype(np.int32), lps.astype(np.float32), None
    r, n_draws = spec.exact_top, spec.samples
    n = ids.shape[0]
    draw_ids, draw_lps = ids[:, r:], lps[:, r:].astype(np.float32)
    # one sort by (log-prob descending, id): equal draws become runs, and the runs come in the stored order
    key = _descending_key(draw_ids, draw_lps)
    order = np.argsort(key, axis=1)
    key = np.take_along_axis(key, order, axis=1)
    first = key != _PADDING_KEY
    first[:, 1:] &= key[:, 1:] != key[:, :-1]
    # each run's first draw (row-major order), its count (up to the next run's start or the row's end), and the
    # column it moves to: the front of its row, after the exact entries
    rows, cols = np.nonzero(first)
    flat = rows * n_draws + cols
    ends = np.minimum(np.append(flat[1:], n * n_draws), (rows + 1) * n_draws)
    dest = r + (np.cumsum(first, axis=1) - 1)[rows, cols]
    entry_ids = np.full((n, r + n_draws), -1, np.int32)
    entry_lps = np.full((n, r + n_draws), -np.inf, np.float32)
    sample_counts = np.zeros((n, r + n_draws), np.uint16)
    entry_ids[:, :r], entry_lps[:, :r] = ids[:, :r], lps[:, :r]
    entry_ids[rows, dest] = (key[rows, cols] & np.uint64(0xFFFFFFFF)).astype(np.int32)
    entry_lps[rows, dest] = np.take_along_axis(draw_lps, order, axis=1)[rows, cols]
    sample_counts[rows, dest] = ends - flat
    return entry_ids, entry_lps, sample_counts


_PADDING_KEY = np.uint64(np.iinfo(np.uint64).max)


def _descending_key(ids: np.ndarray, lps: np.ndarray) -> np.ndarray:
    """uint64 [n, N] keys ascending in (log-prob descending, id ascending); padding (id -1) is _PADDING_KEY."""
    bits = lps.view(np.uint32)
    # float32 -> uint32 preserving order (flip every bit of negatives, the sign bit of the rest), then reversed
    ascending = np.where(bits >> 31 == 1, ~bits, bits | np.uint32(0x80000000))
    key = (~ascending).astype(np.uint64) << np.uint64(32) | ids.astype(np.int64).astype(np.uint64) & np.uint64(
        0xFFFFFFFF
    )
    return np.where(ids >= 0, key, _PADDING_KEY)
