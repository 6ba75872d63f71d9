"""The value invariants of a shard's rows, checked by the writer before it stores a sequence and by verify after."""

from __future__ import annotations

from typing import Protocol

import numpy as np

__all__ = ["VALUE_TOLERANCE", "ShardValues", "value_problems"]

# One slack for every bound below (log-probs <= 0, descending order, tail mass in [0, 1]). Float32 log-softmax of
# logits in the tens rounds by up to ~1e-5, so a tighter bound would make the writer refuse honest engine output in
# the middle of a capture; 1e-4 nats is still 20x below the finest lpq16 step (1/512). Tails are clipped to [0, 1]
# by the backends, and the loss floors them anyway.
VALUE_TOLERANCE = 1e-4


class ShardValues(Protocol):
    """What both a `CachedSequence` and a `RowGroup` hold: ids [T] / [P, k], log-probs [P, k] / [P], tail [P]."""

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


def _outside(name: str, ids: np.ndarray, low: int, vocab_size: int | None) -> list[str]:
    high = np.iinfo(np.int64).max if vocab_size is None else vocab_size
    if ids.size and (ids.min() < low or ids.max() >= high):
        return [f"{name} outside [{low}, {vocab_size if vocab_size is not None else 'inf'})"]
    return []


def value_problems(values: ShardValues, vocab_size: int | None) -> list[str]:
    """Each broken invariant, named (empty when all hold); `vocab_size` None skips the upper id bound.

    entry_ids may be -1 (top-k padding, its log-prob -inf or anything: it is ignored).
    """
    tol = VALUE_TOLERANCE
    problems = _outside("input_ids", values.input_ids, 0, vocab_size)
    problems += _outside("entry_ids", values.entry_ids, -1, vocab_size)
    valid = values.entry_ids >= 0
    lps = np.where(valid, values.entry_logprobs, -np.inf)
    if np.any(lps > tol):
        problems.append("top-k log-prob > 0")
    with np.errstate(invalid="ignore"):  # -inf - -inf in the padding is nan, which compares False: fine
        if np.any(np.diff(lps, axis=1) > tol):
            problems.append("top-k log-probs are not sorted in descending order")
    target = values.next_token_logprobs
    if np.any(target > tol) or np.any(np.isnan(target)):
        problems.append("target log-probs > 0 or NaN")
    tail = values.tail_mass
    if np.any(~np.isfinite(tail)) or np.any(tail < -tol) or np.any(tail > 1 + tol):
        problems.append("tail mass outside [0, 1]")
    return problems
