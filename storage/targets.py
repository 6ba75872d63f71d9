"""What a cache stores per position (the target mode) and the sparse target view every mode reads as (numpy only).

Modes (FORMAT.md, "Target modes"):
  topk      the teacher's top-K ids and log-probs, and the exact mass outside them (format v1's content).
  adaptive  per position the smallest k whose head mass reaches `top_p`, at most `top_k`; the exact tail as topk.
  sampled   the exact top-`exact_top` (r) entries, plus `samples` (N) draws with replacement from the teacher's T=1
            distribution over the rest of the vocabulary (the remainder renormalised), stored as unique ids with
            counts. Draws are seeded per (seed, sequence_id, position): a rerun or resumed run draws the same tokens.

Every entry (exact or sampled) stores the teacher's exact T=1 log-prob. `tail_mass` is the mass outside the EXACT
entries (for `sampled`: the residual mass the draws stand for).

The sparse target view (`sparse_targets`) is the same for every mode: `target_ids` int32 [P, M] (-1 padding),
`target_probs` float32 [P, M] (0 padding) and `tail_mass` float32 [P], the mass `target_probs` leaves uncovered.
Exact entries weigh exp(logprob); a sampled id weighs residual * count / N, so for every id the expectation over
the capture's randomness of its weight is the teacher's probability, the weights plus the view's tail sum to 1, and
the view's tail is 0 for `sampled` (the draws cover the residual).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np

__all__ = ["TARGET_MODES", "TargetSpec", "SparseTargets", "sparse_targets"]

TARGET_MODES = ("topk", "adaptive", "sampled")


@dataclass(frozen=True)
class TargetSpec:
    """The target mode and its parameters; the cache header's `capture.targets` (part of the cache's identity)."""

    mode: str = "topk"
    top_k: int = 64  # topk: K; adaptive: the cap on k
    top_p: float = 0.99  # adaptive: the head mass each position reaches (when the cap allows)
    exact_top: int = 0  # sampled: r, exact top entries before the draws
    samples: int = 24  # sampled: N draws per position (the benchmark's choice, BENCHMARKS.md "Target modes")
    seed: int = 0  # sampled: with sequence_id and position, seeds each position's draws

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))

    def problems(self) -> list[str]:
        """Each invalid setting, named by its CLI flag (empty when all are valid)."""
        out = []
        if self.mode not in TARGET_MODES:
            out.append(f"--targets must be one of {', '.join(TARGET_MODES)}, got {self.mode!r}")
        if self.mode in ("topk", "adaptive") and self.top_k < 1:
            out.append(f"--top-k must be >= 1, got {self.top_k}")
        if self.mode == "adaptive" and not 0.0 < self.top_p <= 1.0:
            out.append(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.mode == "sampled":
            if self.exact_top < 0:
                out.append(f"--exact-top must be >= 0, got {self.exact_top}")
            if not 1 <= self.samples <= 65535:
                out.append(f"--samples must be in [1, 65535] (counts are stored as uint16), got {self.samples}")
        return out

    @property
    def max_entries(self) -> int:
        """M: the most entries a position can store (the width of the sparse target view); `capture.top_k`."""
        return self.exact_top + self.samples if self.mode == "sampled" else self.top_k

    @property
    def num_samples(self) -> int:
        """N for `sampled`, else 0."""
        return self.samples if self.mode == "sampled" else 0

    def to_header(self) -> dict[str, Any]:
        """The parameters that matter for this mode only (the identity must not differ on unused ones)."""
        keep = {
            "topk": ("mode", "top_k"),
            "adaptive": ("mode", "top_k", "top_p"),
            "sampled": ("mode", "exact_top", "samples", "seed"),
        }[self.mode]
        d = asdict(self)
        return {k: d[k] for k in keep}

    @classmethod
    def from_header(cls, capture: Mapping[str, Any]) -> TargetSpec:
        """From a header's `capture` section; v1 caches (no `targets`) are `topk` with K = capture.top_k."""
        targets = capture.get("targets")
        if targets is None:
            return cls(mode="topk", top_k=int(capture["top_k"]))
        return cls(**dict(targets))


class SparseTargets(NamedTuple):
    """The teacher's distribution at P positions as sparse weights plus an uncovered mass (see the module doc)."""

    target_ids: np.ndarray  # int32 [P, M], -1 = padding
    target_probs: np.ndarray  # float32 [P, M], 0 where padded
    tail_mass: np.ndarray  # float32 [P], mass not covered by target_probs (0 for sampled)


def sparse_targets(
    entry_ids: np.ndarray,
    entry_logprobs: np.ndarray,
    tail_mass: np.ndarray,
    sample_counts: np.ndarray | None = None,
    num_samples: int = 0,
) -> SparseTargets:
    """The sparse target view of stored entries: ids [P, M], log-probs [P, M], tail [P], counts [P, M] or None.

    `sample_counts` (0 for exact entries) and `num_samples` (N) are given for `sampled` caches only.
    """
    valid = entry_ids >= 0
    # float32 exp: exact to float32's resolution (the stored log-probs are no finer), and the loader's hot path
    probs = np.where(valid, np.exp(entry_logprobs.astype(np.float32, copy=False)), np.float32(0.0))
    tail = tail_mass.astype(np.float32, copy=False)
    if sample_counts is not None and num_samples > 0:
        sampled = valid & (sample_counts > 0)
        weights = tail[:, None] * (sample_counts.astype(np.float32) / np.float32(num_samples))
        probs = np.where(sampled, weights, probs)
        # where no draw was made (the exact entries cover the vocabulary), the residual is 0 and stays uncovered
        tail = np.where(sampled.any(axis=1), np.float32(0.0), tail)
    return SparseTargets(entry_ids.astype(np.int32, copy=False), probs.astype(np.float32, copy=False), tail)
