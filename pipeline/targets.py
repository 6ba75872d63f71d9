"""Sparse teacher targets from full-vocabulary log-probs: top-k, adaptive k and seeded sampled draws (torch + numpy).

`targets_from_logprobs` runs where the full distribution is (the HF backend, vLLM's workers on the teacher's device):
device-agnostic torch ops, no per-position Python loop, a few [n, V] temporaries. `compact_entries` (numpy) turns its
fixed-width columns into what a `CachedSequence` stores. The modes are defined in storage/targets.py.

Draws are counter-based, so a rerun, a resumed run, another batch composition or the other backend draws the same ids:
the j-th draw at (seed, sequence_id, position t) takes u in [0, 1) from a splitmix64 hash of (seed, sequence_id, t, j)
(the top 53 bits as float64), then inverts the CDF (float64 cumulative sum over the vocabulary of the residual
distribution, the exact top-r zeroed): the drawn id is the first whose CDF exceeds u * CDF[-1].
"""

from __future__ import annotations

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


def _complement_lse(logprobs: Any, ids: Any, keep: Any, inplace: bool) -> Any:
    """logsumexp of each row's log-probs outside the kept ids ([n]); the exact tail as log-mass.

    `keep` [n, W] selects which of `ids` are excluded (padding -1 columns must not be kept). With `inplace` the
    excluded entries of `logprobs` are set to -inf in place (no [n, V] copy).
    """
    import torch

    # -inf where kept, else the value already there (a no-op write). Padding columns write to the row's first id
    # with that column's value, so duplicate indices never write different values (scatter's order is undefined).
    pad = ids < 0
    safe = torch.where(pad, ids[:, :1], ids)
    keep = torch.where(pad, keep[:, :1], keep)
    src = torch.where(keep, float("-inf"), logprobs.gather(1, safe))
    masked = logprobs.scatter_(1, safe, src) if inplace else logprobs.scatter(1, safe, src)
    return masked.logsumexp(dim=-1), masked


def _adaptive_keep(top_lps: Any, top_p: float) -> Any:
    """bool [n, K]: the smallest head per row whose mass reaches top_p (all K where the cap stops it first)."""
    import torch

    mass = top_lps.double().exp().cumsum(dim=-1)
    # column c is kept when the mass before it is still short of top_p
    before = torch.cat([mass.new_zeros((mass.shape[0], 1)), mass[:, :-1]], dim=1)
    return (before < top_p) & torch.isfinite(top_lps)


def _draws(masked: Any, residual_lse: Any, u: Any) -> tuple[Any, Any]:
    """Inverse-CDF draws from the rows of `masked` (log-probs, -inf where excluded), renormalised.

    masked: float32 [n, V]; residual_lse: float32 [n] (its logsumexp); u: float64 [n, N].
    Returns ids int64 [n, N] and their log-probs float32 [n, N]; -1 / -inf for rows with no mass.
    """
    import torch

    has_mass = torch.isfinite(residual_lse)
    shift = torch.where(has_mass, residual_lse, torch.zeros_like(residual_lse)).double()
    cdf = masked.double().sub_(shift[:, None]).exp_().cumsum_(dim=-1)  # one float64 [n, V], built in place
    total = cdf[:, -1:].contiguous()
    ids = torch.searchsorted(cdf, u * total, right=True)
    # u * total can round up to total itself: the last id with mass is the first whose CDF reaches the total
    last = torch.searchsorted(cdf, total, right=False)
    ids = torch.minimum(ids, last)
    del cdf
    lps = masked.gather(1, ids.clamp(max=masked.shape[1] - 1))
    ids = torch.where(has_mass[:, None], ids, torch.full_like(ids, -1))
    lps = torch.where(has_mass[:, None], lps, torch.full_like(lps, float("-inf")))
    return ids, lps


def targets_from_logprobs(
    logprobs: Any, spec: TargetSpec, sequence_id: Any, positions: Any, *, inplace: bool = False
) -> tuple[Any, Any, Any]:
    """The stored entries of n positions from their full-vocabulary log-softmax at T=1.

    logprobs: float32 [n, V] (modified in place when `inplace`); sequence_id: int, or int64 [n] when the rows
    come from several sequences; positions: int64 [n], each row's index t inside its window (0..L-2).
    Returns ids int64 [n, W], lps float32 [n, W], tail float32 [n] with W = spec.max_entries:
      topk/adaptive: sorted entries, padding (adaptive beyond k) -1 / -inf; tail = exact mass outside the entries.
      sampled: r exact columns, then the N draws in draw order (repeats kept; -1 / -inf when the residual is 0);
               tail = the residual mass outside the exact top-r.
    """
    import torch

    logprobs = logprobs.float()
    n = logprobs.shape[0]
    if spec.mode in ("topk", "adaptive"):
        ids, lps = _topk_padded(logprobs, spec.top_k)
        keep = ids >= 0
        if spec.mode == "adaptive":
            keep = _adaptive_keep(lps, spec.top_p)
        lse, _ = _complement_lse(logprobs, ids, keep, inplace)
        ids = torch.where(keep, ids, torch.full_like(ids, -1))
        lps = torch.where(keep, lps, torch.full_like(lps, float("-inf")))
        return ids, lps, lse.exp()
    if spec.mode != "sampled":
        raise ValueError(f"unknown target mode {spec.mode!r}")
    r = spec.exact_top
    if r > 0:
        top_ids, top_lps = _topk_padded(logprobs, r)
        lse, masked = _complement_lse(logprobs, top_ids, top_ids >= 0, inplace)
    else:
        top_ids = logprobs.new_zeros((n, 0), dtype=torch.int64)
        top_lps = logprobs.new_zeros((n, 0))
        lse, masked = logprobs.logsumexp(dim=-1), logprobs
    u = draw_uniforms(spec.seed, sequence_id, positions.to(logprobs.device), spec.samples)
    draw_ids, draw_lps = _draws(masked, lse, u)
    return torch.cat([top_ids, draw_ids], dim=1), torch.cat([top_lps, draw_lps], dim=1), lse.exp()


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
    draw_ids, draw_lps = ids[:, r:], lps[:, r:]
    order = np.argsort(draw_ids, axis=1, kind="stable")
    sid = np.take_along_axis(draw_ids, order, axis=1)
    slp = np.take_along_axis(draw_lps, order, axis=1)
    first = np.ones_like(sid, dtype=bool)
    first[:, 1:] = sid[:, 1:] != sid[:, :-1]
    first &= sid >= 0
    # count of each run: distance from its first occurrence to the next run's (or the row's end)
    col = np.broadcast_to(np.arange(n_draws), sid.shape)
    run_start = np.where(first, col, n_draws)
    next_start = np.minimum.accumulate(run_start[:, ::-1], axis=1)[:, ::-1]
    next_after = np.concatenate([next_start[:, 1:], np.full((n, 1), n_draws)], axis=1)
    counts = np.where(first, next_after - col, 0)
    # padding draws (-1) sort first and are never `first`, so they add nothing; order uniques by (-lp, id)
    key_lp = np.where(first, -slp.astype(np.float64), np.inf)
    key_id = np.where(first, sid, np.iinfo(np.int64).max)
    perm = np.lexsort((key_id, key_lp), axis=-1)
    u_ids = np.take_along_axis(np.where(first, sid, -1), perm, axis=1)
    u_lps = np.take_along_axis(np.where(first, slp, -np.inf), perm, axis=1)
    u_counts = np.take_along_axis(counts, perm, axis=1)
    entry_ids = np.concatenate([ids[:, :r], u_ids], axis=1).astype(np.int32)
    entry_lps = np.concatenate([lps[:, :r], u_lps], axis=1).astype(np.float32)
    sample_counts = np.concatenate([np.zeros((n, r), np.int64), u_counts], axis=1).astype(np.uint16)
    return entry_ids, entry_lps, sample_counts
