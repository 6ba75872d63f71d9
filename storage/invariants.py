"""The value invariants of a shard's rows, checked by the writer before it stores a sequence and by verify after."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from logitcache.storage.targets import TargetSpec

__all__ = ["VALUE_TOLERANCE", "ShardValues", "value_problems", "mass_problems"]

# One slack for every bound below (log-probs <= 0, descending order, tail mass in [0, 1]). Float32 log-softmax of
# logits in the tens rounds by up to ~1e-5, so a tighter bound would make the writer refuse honest engine output in
# the middle of a capture; 1e-4 nats is still 20x below the finest lpq16 step (1/512). Tails are clipped to [0, 1]
# by the backends, and the loss floors them anyway.
VALUE_TOLERANCE = 1e-4


class ShardValues(Protocol):
    """What both a `CachedSequence` and a `RowGroup` hold: ids [T] / [P, M], log-probs [P, M] / [P], tail [P]."""

    @property
    def input_ids(self) -> np.ndarray: ...
    @property
    def entry_ids(self) -> np.ndarray: ...
    @property
    def entry_logprobs(self) -> np.ndarray: ...
    @property
    def next_token_logprobs(self) -> np.ndarray: ...
    @property
    def tail_mass(self) -> np.ndarray: ...
    @property
    def sample_counts(self) -> np.ndarray | None: ...


def _outside(name: str, ids: np.ndarray, low: int, vocab_size: int | None) -> list[str]:
    high = np.iinfo(np.int64).max if vocab_size is None else vocab_size
    if ids.size and (ids.min() < low or ids.max() >= high):
        return [f"{name} outside [{low}, {vocab_size if vocab_size is not None else 'inf'})"]
    return []


def _where(bad: np.ndarray | np.bool_) -> str:
    """'at N position(s), first t' for a bool [P] mask."""
    mask = np.asarray(bad)
    return f"at {int(mask.sum())} position(s), first {int(np.argmax(mask))}"


def _entry_problems(ids: np.ndarray, lps: np.ndarray) -> list[str]:
    """Layout of the padded entries [P, M]: trailing padding, unique ids, log-probs <= 0 and sorted descending."""
    tol = VALUE_TOLERANCE
    problems = []
    valid = ids >= 0
    counts = valid.sum(axis=1)
    not_trailing = (valid != (np.arange(ids.shape[1])[None, :] < counts[:, None])).any(axis=1)
    if np.any(not_trailing):
        problems.append(f"padding (id -1) is not trailing {_where(not_trailing)}")
    ordered = np.sort(ids, axis=1)
    dup = ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any(axis=1)
    if np.any(dup):
        problems.append(f"an entry id repeats within a position {_where(dup)}")
    lp = np.where(valid, lps, -np.inf)
    if np.any(lp > tol):
        problems.append("entry log-prob > 0")
    with np.errstate(invalid="ignore"):  # -inf - -inf in the padding is nan, which compares False: fine
        unsorted = (np.diff(lp, axis=1) > tol).any(axis=1)
    if np.any(unsorted):
        problems.append(f"entry log-probs are not sorted in descending order {_where(unsorted)}")
    return problems


def _mode_problems(values: ShardValues, targets: TargetSpec) -> list[str]:
    """What the target mode asks of the entries: >= 1 entry (topk, adaptive); the sample counts (sampled)."""
    valid = values.entry_ids >= 0
    counts = values.sample_counts
    if targets.mode != "sampled":
        out = [] if counts is None else [f"sample_counts given, but the target mode is {targets.mode!r}"]
        empty = ~valid.any(axis=1)
        if np.any(empty):
            out.append(f"no entry stored {_where(empty)} (mode {targets.mode!r} stores at least one)")
        return out
    if counts is None:
        return ["sample_counts missing (the target mode is 'sampled')"]
    out = []
    sc = counts.astype(np.int64)
    if np.any(sc[~valid] != 0):
        out.append("a padding entry has a sample count")
    exact = valid & (sc == 0)
    n_exact = exact.sum(axis=1)
    late = (exact != (np.arange(sc.shape[1])[None, :] < n_exact[:, None])).any(axis=1)
    if np.any(late):
        out.append(f"an exact entry (count 0) comes after a sampled one {_where(late)}")
    if np.any(n_exact > targets.exact_top):
        out.append(
            f"more than exact_top={targets.exact_top} exact entries (count 0) {_where(n_exact > targets.exact_top)}"
        )
    total = sc.sum(axis=1)
    n = targets.num_samples
    bad_sum = np.where(values.tail_mass > 0, total != n, (total != 0) & (total != n))
    if np.any(bad_sum):
        out.append(f"sample counts do not sum to samples={n} {_where(bad_sum)}")
    return out


def value_problems(values: ShardValues, vocab_size: int | None, targets: TargetSpec | None = None) -> list[str]:
    """Each broken invariant, named (empty when all hold); `vocab_size` None skips the upper id bound.

    entry_ids may be -1 (trailing padding; its log-prob is ignored). `targets` None skips the mode's checks.
    """
    tol = VALUE_TOLERANCE
    problems = _outside("input_ids", values.input_ids, 0, vocab_size)
    problems += _outside("entry_ids", values.entry_ids, -1, vocab_size)
    problems += _entry_problems(values.entry_ids, values.entry_logprobs)
    target = values.next_token_logprobs
    if np.any(target > tol) or np.any(np.isnan(target)):
        problems.append("next-token log-probs > 0 or NaN")
    tail = values.tail_mass
    if np.any(~np.isfinite(tail)) or np.any(tail < -tol) or np.any(tail > 1 + tol):
        problems.append("tail mass outside [0, 1]")
    if targets is not None:
        problems += _mode_problems(values, targets)
    return problems


def mass_problems(values: ShardValues, targets: TargetSpec, tolerance: np.ndarray) -> list[str]:
    """The probability checks on decoded values, each within `tolerance` [P] (the codec's error at each position).

    Every mode: exact entries' mass + tail = 1. adaptive: a position with fewer than top_k entries reaches top_p,
    and needs its last entry to. sampled: no sampled entry is likelier than the residual it was drawn from.
    """
    valid = values.entry_ids >= 0
    sampled = valid & (values.sample_counts > 0) if values.sample_counts is not None else np.zeros_like(valid)
    probs = np.where(valid, np.exp(values.entry_logprobs.astype(np.float64)), 0.0)
    head = np.where(sampled, 0.0, probs).sum(axis=1)
    tail = values.tail_mass.astype(np.float64)
    gap = np.abs(head + tail - 1.0)
    bad = gap > tolerance
    out = []
    if np.any(bad):
        out.append(
            f"head mass + tail mass != 1 {_where(bad)} (worst off by {gap.max():.3g}, beyond the codec's stated error)"
        )
    if targets.mode == "adaptive":
        n = valid.sum(axis=1)
        short = (n < targets.top_k) & (head < targets.top_p - tolerance)
        if np.any(short):
            out.append(
                f"fewer than top_k={targets.top_k} entries but head mass below top_p={targets.top_p} {_where(short)}"
            )
        last = np.take_along_axis(probs, np.maximum(n - 1, 0)[:, None], axis=1)[:, 0]
        extra = (n > 1) & (head - last >= targets.top_p + tolerance)
        if np.any(extra):
            out.append(f"more entries than needed to reach top_p={targets.top_p} {_where(extra)}")
    if targets.mode == "sampled":
        likely = (sampled & (probs > tail[:, None] + tolerance[:, None])).any(axis=1)
        if np.any(likely):
            out.append(f"a sampled entry is likelier than the residual mass it was drawn from {_where(likely)}")
    return out
