"""In-memory forms of cached data: one sequence, and a decoded row group (numpy, no per-token objects)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from logitcache.storage.targets import SparseTargets, sparse_targets

__all__ = ["WINDOW_BITS", "CachedSequence", "RowGroup", "TargetRowGroup", "document_id"]

# sequence_id = (dataset_row << WINDOW_BITS) | window_index: the low bits number the windows of one document.
WINDOW_BITS = 16


def document_id(sequence_ids: np.ndarray) -> np.ndarray:
    """int64 [B]: the dataset row (document) that each sequence id's window was cut from (`sequence_id >> 16`)."""
    return np.asarray(sequence_ids, dtype=np.int64) >> WINDOW_BITS


@dataclass
class CachedSequence:
    """One cached sequence. Position t (0..L-2) is the teacher distribution that predicts input_ids[t+1].

    input_ids: int32 [L]; loss_mask: bool [L] (True where the token is a training target);
    entry_ids: int32 [L-1, M] sorted by teacher log-prob, descending, -1 = padding (trailing);
    entry_logprobs: float32 [L-1, M] log-softmax over the full vocabulary at T=1, -inf where padded;
    next_token_logprobs: float32 [L-1] teacher log-prob of input_ids[t+1];
    tail_mass: float32 [L-1] probability mass outside the exact entries, computed before quantization;
    sample_counts: uint16 [L-1, M] draws per entry (0: exact entry or padding), `sampled` caches only.
    M = `TargetSpec.max_entries` (FORMAT.md, "Target modes").
    """

    sequence_id: int
    input_ids: np.ndarray
    loss_mask: np.ndarray
    entry_ids: np.ndarray
    entry_logprobs: np.ndarray
    next_token_logprobs: np.ndarray
    tail_mass: np.ndarray
    sample_counts: np.ndarray | None = None  # uint16 [L-1, M]: draws of each entry (0: exact); sampled caches only
    num_samples: int = 0  # N draws per position (sampled caches), else 0

    def sparse_targets(self) -> SparseTargets:
        """The sparse target view (storage/targets.py): target ids/probs [L-1, M] and the uncovered mass [L-1]."""
        return sparse_targets(self.entry_ids, self.entry_logprobs, self.tail_mass, self.sample_counts, self.num_samples)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def validate(self, top_k: int) -> None:
        """Raises ValueError naming the sequence and the array whose shape is wrong; top_k: M, entries per position."""
        n = self.num_tokens
        problems = []
        if n < 2:
            problems.append(f"needs at least 2 tokens, got {n}")
        expect = {
            "loss_mask": (n,),
            "entry_ids": (n - 1, top_k),
            "entry_logprobs": (n - 1, top_k),
            "next_token_logprobs": (n - 1,),
            "tail_mass": (n - 1,),
        }
        if self.sample_counts is not None:
            expect["sample_counts"] = (n - 1, top_k)
        for name, shape in expect.items():
            got = getattr(self, name).shape
            if got != shape:
                problems.append(f"{name} has shape {got}, expected {shape}")
        if problems:
            raise ValueError(f"sequence {self.sequence_id}: " + "; ".join(problems))


@dataclass
class RowGroup:
    """A decoded row group: B sequences, T tokens, P = T - B positions, flat arrays with offsets."""

    sequence_id: np.ndarray  # int64 [B]
    token_offsets: np.ndarray  # int64 [B+1] into input_ids / loss_mask
    position_offsets: np.ndarray  # int64 [B+1] into the per-position arrays
    input_ids: np.ndarray  # int32 [T]
    loss_mask: np.ndarray  # bool [T]
    entry_ids: np.ndarray  # int32 [P, M], -1 = padding (trailing)
    entry_logprobs: np.ndarray  # float32 [P, M], -inf where padded
    next_token_logprobs: np.ndarray  # float32 [P]
    tail_mass: np.ndarray  # float32 [P]
    sample_counts: np.ndarray | None = None  # uint16 [P, M] (sampled caches), else None
    num_samples: int = 0

    def sparse_targets(self) -> SparseTargets:
        """The sparse target view of every position of the group (storage/targets.py)."""
        return sparse_targets(self.entry_ids, self.entry_logprobs, self.tail_mass, self.sample_counts, self.num_samples)

    def __len__(self) -> int:
        return int(self.sequence_id.shape[0])

    def sequence(self, i: int) -> CachedSequence:
        """Views (no copies) of sequence i."""
        t0, t1 = self.token_offsets[i], self.token_offsets[i + 1]
        p0, p1 = self.position_offsets[i], self.position_offsets[i + 1]
        return CachedSequence(
            sequence_id=int(self.sequence_id[i]),
            input_ids=self.input_ids[t0:t1],
            loss_mask=self.loss_mask[t0:t1],
            entry_ids=self.entry_ids[p0:p1],
            entry_logprobs=self.entry_logprobs[p0:p1],
            next_token_logprobs=self.next_token_logprobs[p0:p1],
            tail_mass=self.tail_mass[p0:p1],
            sample_counts=None if self.sample_counts is None else self.sample_counts[p0:p1],
            num_samples=self.num_samples,
        )


@dataclass
class TargetRowGroup:
    """A row group decoded straight to the sparse target view, what training reads (`CacheReader.read_targets`).

    The same flat arrays and offsets as `RowGroup`, with `target_ids`, `target_probs` and `tail_mass` equal to
    `RowGroup.sparse_targets()` of the same row group, but decoded without log-probs (the codec's
    `decode_probs`): a trainer slices sequences out of it with no per-sequence decoding.
    """

    sequence_id: np.ndarray  # int64 [B]
    token_offsets: np.ndarray  # int64 [B+1] into input_ids / loss_mask
    position_offsets: np.ndarray  # int64 [B+1] into the per-position arrays
    input_ids: np.ndarray  # int32 [T]
    loss_mask: np.ndarray  # bool [T]
    next_token_logprobs: np.ndarray  # float32 [P]
    target_ids: np.ndarray  # int32 [P, M], -1 = padding
    target_probs: np.ndarray  # float32 [P, M], 0 where padded
    tail_mass: np.ndarray  # float32 [P], the mass target_probs leaves uncovered (0 for sampled positions with draws)
    num_samples: int = 0  # N draws per position (sampled caches), else 0

    @classmethod
    def from_view(cls, group: RowGroup, view: SparseTargets, num_samples: int) -> TargetRowGroup:
        """The tokens and offsets of `group` (its entries unused) with the target view `view` of its positions."""
        return cls(
            sequence_id=group.sequence_id,
            token_offsets=group.token_offsets,
            position_offsets=group.position_offsets,
            input_ids=group.input_ids,
            loss_mask=group.loss_mask,
            next_token_logprobs=group.next_token_logprobs,
            target_ids=view.target_ids,
            target_probs=view.target_probs,
            tail_mass=view.tail_mass,
            num_samples=num_samples,
        )

    @classmethod
    def from_row_group(cls, group: RowGroup) -> TargetRowGroup:
        """The target view of a decoded RowGroup (any codec, any version): the reference the fast path matches."""
        return cls.from_view(group, group.sparse_targets(), group.num_samples)

    def __len__(self) -> int:
        return int(self.sequence_id.shape[0])
