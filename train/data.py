"""Streaming the cache into training batches: deterministic, rank/worker-disjoint, resumable, held-out aware.

Order of a training stream (everything is a pure function of seed, epoch, rank and worker, so a resumed run sees
exactly the batches an uninterrupted one would):
1. Parts are the cache's row groups, or equal slices of each row group when there are fewer row groups than readers
   (so every rank and worker has data even in a tiny cache).
2. Each epoch permutes the parts with a generator seeded by (seed, epoch) and deals them round-robin to ranks, then
   each rank's share round-robin to its dataloader workers: disjoint, and every part is read once per epoch.
3. Each reader's parts are taken `shuffle_parts` at a time (a block), and the training rows (sequence ids not held
   out) of a whole block are shuffled together with a generator seeded by (seed, epoch, rank, worker, block): a
   row group holds neighbouring windows of a few documents (about 8 sequences at L=4096, k=64), so shuffling within
   one would fill a batch with windows of one document. Block shuffling as in mosaicml/streaming's `py1b`.
4. Rows are grouped greedily into batches of N sequences or of at most N padded tokens (with `pack`, several
   sequences share a batch row: train/packing.py). The stream position (epoch, block cursor, row cursor) after each
   yielded batch is the dataset's state_dict, which torchdata's StatefulDataLoader snapshots per worker and restores
   on resume: a block is re-read and re-shuffled, never stored.

A part is decoded once, straight to the sparse target view (`CacheReader.read_targets`: no log-probs, no
per-sequence objects), and a batch is filled by copying each of its sequences' slices into the batch arrays.

The held-out split is a hash of the document id (splitmix64 of `storage.document_id`), independent of the seed, so
every run on a cache holds out the same sequences, evaluations are comparable across students, and no window of a
held-out document is trained on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from logitcache.storage import CachedSequence, CacheReader, document_id
from logitcache.storage.records import TargetRowGroup
from logitcache.train.packing import RowPacker, first_fit

__all__ = [
    "splitmix64",
    "held_out_mask",
    "plan_parts",
    "assigned_parts",
    "Decoded",
    "collate",
    "collate_rows",
    "masked_batch",
    "CacheStream",
    "steps_for_epochs",
]

_U64 = np.uint64


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a well-mixed uint64 hash of each int64 in x (shape kept)."""
    z = np.asarray(x).astype(np.int64).view(np.uint64) + _U64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def held_out_mask(sequence_ids: np.ndarray, eval_fraction: float) -> np.ndarray:
    """bool [B]: which sequence ids belong to the held-out split (about `eval_fraction` of all documents).

    The hash is of the document id, so the windows of one long document are all held out or all trained on.
    """
    u = (splitmix64(document_id(sequence_ids)) >> _U64(11)).astype(np.float64) / float(1 << 53)
    return u < eval_fraction


def plan_parts(row_groups: list[tuple[int, int, int]], min_parts: int) -> list[tuple[int, int, int, int]]:
    """(shard, row_group, part, num_parts) for every part; each row group is split into num_parts sequence ranges
    when the cache has fewer row groups than `min_parts` (ranks x workers), so that no reader is left idle."""
    nonempty = [g for g in row_groups if g[2] > 0]
    if not nonempty:
        return []
    splits = max(1, math.ceil(min_parts / len(nonempty)))
    out: list[tuple[int, int, int, int]] = []
    for shard, group, rows in nonempty:
        n = min(splits, rows)
        out.extend((shard, group, p, n) for p in range(n))
    return out


def assigned_parts(
    num_parts: int, seed: int, epoch: int, rank: int, world_size: int, worker: int, num_workers: int
) -> np.ndarray:
    """int64 indices into the plan that (rank, worker) reads in this epoch, in reading order."""
    perm = np.random.default_rng([seed, epoch]).permutation(num_parts)
    return perm[rank::world_size][worker::num_workers]


def _part_rows(n_rows: int, part: int, num_parts: int) -> tuple[int, int]:
    return n_rows * part // num_parts, n_rows * (part + 1) // num_parts


class Decoded:
    """A decoded part ready to batch: a `TargetRowGroup` and, per sequence, the positions that train.

    Position t of sequence i (group position `position_offsets[i] + t`) trains when `loss_mask[t+1]` of the sequence;
    `loss_rows` lists those group positions, sequence after sequence (`loss_offsets` [B+1] into it), and `dense[i]`
    says whether every position of sequence i trains (then its rows are one slice, copied without an index).
    Batches are built from (Decoded, row) references: slicing, no per-sequence decoding or objects.
    """

    def __init__(self, group: TargetRowGroup) -> None:
        self.group = group
        self.lengths = np.diff(group.token_offsets)
        num_pos = np.diff(group.position_offsets)
        # position p of sequence i predicts token p + i + 1 of the group (each sequence has one token more)
        seq_of_pos = np.repeat(np.arange(len(group), dtype=np.int64), num_pos)
        trains = group.loss_mask[np.arange(len(seq_of_pos), dtype=np.int64) + seq_of_pos + 1]
        self.loss_rows = np.flatnonzero(trains)
        self.loss_offsets = np.searchsorted(self.loss_rows, group.position_offsets)
        self.dense = np.diff(self.loss_offsets) == num_pos
        ids = group.target_ids
        self.max_id = int(ids.max()) if ids.size else -1


def _as_decoded(seqs: list[CachedSequence]) -> Decoded:
    """Sequences (each with its own sparse target view) as one Decoded part, rows in the given order."""
    views = [s.sparse_targets() for s in seqs]
    lengths = np.array([s.num_tokens for s in seqs], dtype=np.int64)
    token_offsets = np.concatenate([[0], np.cumsum(lengths)])
    return Decoded(
        TargetRowGroup(
            sequence_id=np.array([s.sequence_id for s in seqs], dtype=np.int64),
            token_offsets=token_offsets,
            position_offsets=token_offsets - np.arange(len(seqs) + 1),
            input_ids=np.concatenate([s.input_ids for s in seqs]),
            loss_mask=np.concatenate([s.loss_mask for s in seqs]),
            next_token_logprobs=np.concatenate([s.next_token_logprobs for s in seqs]),
            target_ids=np.concatenate([v.target_ids for v in views]),
            target_probs=np.concatenate([v.target_probs for v in views]),
            tail_mass=np.concatenate([v.tail_mass for v in views]),
            num_samples=max(s.num_samples for s in seqs),
        )
    )


def collate(
    seqs: list[CachedSequence],
    vocab_size: int,
    top_k_used: int | None = None,
    epoch: int = 0,
    pack: bool = False,
) -> dict[str, torch.Tensor]:
    """Pads sequences into a batch and gathers the teacher's sparse target view at the loss positions only.

    Position t of sequence b (predicting input_ids[b, t+1]) trains when loss_mask[b, t+1]; those N positions are, in
    row-major order:
      `positions` int64 [N]: flat indices into [B, L] (the student's logits at b, t);
      `next_token_ids` int64 [N]: the real next tokens (the CE term's labels);
      `next_token_logprobs` float32 [N]: the teacher's log-prob of the real next token;
      `target_ids` int64 [N, M] (-1 = padding), `target_probs` float32 [N, M] (0 = padding), `tail_mass` float32 [N]:
        the sparse target view (`CachedSequence.sparse_targets()`: the weights of the teacher's distribution and the
        mass they leave uncovered, 0 for sampled caches); `TeacherTargets.from_batch` reads these three.
    Also `input_ids` int64 [B, L] (0-padded), `attention_mask` int64 [B, L], `num_tokens` (real tokens),
    `num_positions` and `epoch` (of the last row) int64 scalars, and `sequence_id` int64 [B].

    pack=True lays the sequences out `first_fit` (train/packing.py) in rows as wide as the longest: [R, L] with
    R <= B rows, the sequences (and `sequence_id`, `positions` and every per-position array) in row-major order, and
    `attention_mask` numbering the sequences of each row 1, 2, ... (0 = padding). Rows of one sequence each give the
    unpacked batch.

    topk/adaptive caches: entries beyond `top_k_used`, and ids outside the tokenizer's vocabulary (padded logit
    rows), are folded into the tail. Sampled caches refuse both (ValueError): a sampled id's weight stands for a share
    of the residual mass, and their loss has no tail bucket to fold it into.
    """
    part = _as_decoded(seqs)
    layout = first_fit([s.num_tokens for s in seqs]) if pack else None
    return collate_rows([(part, i) for i in range(len(seqs))], vocab_size, top_k_used, epoch, layout)


def collate_rows(
    rows: list[tuple[Decoded, int]],
    vocab_size: int,
    top_k_used: int | None = None,
    epoch: int = 0,
    layout: list[list[int]] | None = None,
) -> dict[str, torch.Tensor]:
    """`collate` of the sequences `rows` (decoded part, row in it): the loader's path, which copies each sequence's
    slices of its part straight into the batch arrays. `layout`: packed rows, each a list of indices into `rows`
    (`RowPacker.rows`); None: one row per sequence, in order."""
    if layout is None:
        layout = [[j] for j in range(len(rows))]
    rows = [rows[j] for row in layout for j in row]  # row-major: the order of every per-sequence output
    lengths = np.array([d.lengths[i] for d, i in rows], dtype=np.int64)
    counts = [int(d.loss_offsets[i + 1] - d.loss_offsets[i]) for d, i in rows]
    width, n = int(lengths.max()), sum(counts)
    m = rows[0][0].group.target_ids.shape[1]
    input_ids = np.zeros((len(layout), width), dtype=np.int64)
    attention = np.zeros((len(layout), width), dtype=np.int64)
    positions = np.empty(n, dtype=np.int64)
    target_ids = np.empty((n, m), dtype=np.int64)
    target_probs = np.empty((n, m), dtype=np.float32)
    tail32 = np.empty(n, dtype=np.float32)
    next_lp = np.empty(n, dtype=np.float32)
    o = j = 0
    for r, row in enumerate(layout):
        start = r * width  # flat index of the sequence's first token
        for segment in range(1, len(row) + 1):
            (d, i), q, length = rows[j], counts[j], int(lengths[j])
            g = d.group
            t0, p0 = g.token_offsets[i], g.position_offsets[i]
            input_ids.flat[start : start + length] = g.input_ids[t0 : t0 + length]
            attention.flat[start : start + length] = segment
            at: slice | np.ndarray
            if d.dense[i]:
                at = slice(p0, p0 + q)
                positions[o : o + q] = np.arange(start, start + q)
            else:
                at = d.loss_rows[d.loss_offsets[i] : d.loss_offsets[i + 1]]
                positions[o : o + q] = at + (start - p0)
            target_ids[o : o + q] = g.target_ids[at]
            target_probs[o : o + q] = g.target_probs[at]
            tail32[o : o + q] = g.tail_mass[at]
            next_lp[o : o + q] = g.next_token_logprobs[at]
            o, j, start = o + q, j + 1, start + length
    target_ids, target_probs, tail_mass = _fold_into_tail(
        rows, target_ids, target_probs, tail32, vocab_size, top_k_used
    )
    flat_ids = input_ids.reshape(-1)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention),
        "positions": torch.from_numpy(positions),
        "next_token_ids": torch.from_numpy(flat_ids[positions + 1]),
        "target_ids": torch.from_numpy(np.ascontiguousarray(target_ids)),
        "target_probs": torch.from_numpy(np.ascontiguousarray(target_probs)),
        "tail_mass": torch.from_numpy(np.clip(tail_mass, 0.0, 1.0).astype(np.float32, copy=False)),
        "next_token_logprobs": torch.from_numpy(next_lp),
        "num_tokens": torch.tensor(int(lengths.sum())),
        "num_positions": torch.tensor(n),
        "epoch": torch.tensor(epoch),
        "sequence_id": torch.tensor([int(d.group.sequence_id[i]) for d, i in rows], dtype=torch.int64),
    }


def _fold_into_tail(
    rows: list[tuple[Decoded, int]],
    target_ids: np.ndarray,
    target_probs: np.ndarray,
    tail32: np.ndarray,
    vocab_size: int,
    top_k_used: int | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(target_ids, target_probs, tail_mass) with the entries beyond `top_k_used` and the ids outside the
    tokenizer's vocabulary folded into the tail; sampled targets refuse both (ValueError, see `collate`)."""
    sampled = any(d.group.num_samples > 0 for d, _ in rows)
    # float64 accumulation only when entries fold into the tail; else clipping the float32 tail gives the same values
    tail_mass: np.ndarray = tail32
    if top_k_used is not None and top_k_used < target_ids.shape[1]:
        if sampled:
            raise ValueError(
                f"top_k_used={top_k_used} can't be used on sampled targets: folding entries into the tail is wrong "
                "there (a sampled id's weight stands for a share of the residual mass, and their loss has no tail "
                "bucket)"
            )
        tail_mass = tail32.astype(np.float64) + target_probs[:, top_k_used:].sum(axis=1, dtype=np.float64)
        target_ids, target_probs = target_ids[:, :top_k_used], target_probs[:, :top_k_used]
    if max(d.max_id for d, _ in rows) >= vocab_size:
        outside = target_ids >= vocab_size
        if outside.any():
            if sampled:
                raise ValueError(
                    f"sequences {[int(d.group.sequence_id[i]) for d, i in rows]}: sampled target id "
                    f"{int(target_ids[outside].max())} is outside the tokenizer's vocabulary ({vocab_size} tokens); it "
                    "can't be folded into a tail (its weight stands for a share of the residual mass, and the sampled "
                    "loss has no tail bucket)"
                )
            tail_mass = tail_mass.astype(np.float64) + np.where(outside, target_probs, 0.0).sum(axis=1)
            target_ids = np.where(outside, -1, target_ids)
            target_probs = np.where(outside, 0.0, target_probs).astype(np.float32)
    return target_ids, target_probs, tail_mass


def masked_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A `collate` batch with no loss positions: the first token of its first sequence as input (so the forward, and
    the collectives that DDP/FSDP run in it, still happen) and 0 rows in every per-position tensor."""
    out = {k: v[:0] for k, v in batch.items() if v.dim() > 0}
    out["input_ids"] = batch["input_ids"][:1, :1].clone()
    out["attention_mask"] = batch["attention_mask"][:1, :1].clone()
    out.update(num_tokens=torch.tensor(0), num_positions=torch.tensor(0), epoch=batch["epoch"])
    return out


class CacheStream(IterableDataset):
    """Batches from a cache: the training stream (endless, shuffled, resumable) or the held-out split (one pass).

    Yields `collate` dicts. Each (rank, worker) reads a disjoint set of parts (see the module docstring), and
    shuffles the training rows of `shuffle_parts` parts at a time: it holds that many decoded row groups
    in memory (16 MiB of raw arrays each at the writer's default), and a batch mixes sequences from as many. With
    `split="eval"` the held-out sequences are read in storage order, batches dealt round-robin to ranks, and the
    pass stops after `max_sequences` held-out sequences (0: all); every rank yields the same number of batches, the
    ranks short of one padding with a `masked_batch` (0 loss positions).

    `pack=True` packs each batch's sequences into rows (train/packing.py, `collate(pack=True)`). With a sequence
    count, a batch holds the same sequences either way; with a token budget, sequences are added while the packed
    rows x width stay within it, so a packed batch takes more sequences and the stream position records `pack`.
    """

    def __init__(
        self,
        cache: str,
        *,
        seed: int,
        batch_count: int,
        batch_unit: str = "sequences",
        eval_fraction: float = 0.0,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
        top_k_used: int | None = None,
        max_sequences: int = 0,
        shuffle_parts: int = 8,
        pack: bool = False,
    ) -> None:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if batch_unit not in ("sequences", "tokens"):
            raise ValueError(f"batch_unit must be 'sequences' or 'tokens', got {batch_unit!r}")
        if shuffle_parts < 1:
            raise ValueError(f"shuffle_parts must be at least 1 (parts shuffled together), got {shuffle_parts}")
        self.cache, self.seed, self.split = cache, seed, split
        self.batch_count, self.batch_unit = batch_count, batch_unit
        self.eval_fraction, self.rank, self.world_size = eval_fraction, rank, world_size
        self.top_k_used, self.max_sequences = top_k_used, max_sequences
        self.shuffle_parts, self.pack = shuffle_parts, pack
        self._state = self._position(0, 0, 0)

    def _position(self, epoch: int, block: int, row: int) -> dict[str, int]:
        """The stream position (the state_dict): the next row to batch, and the settings it is only valid under."""
        return {"epoch": epoch, "block": block, "row": row, "shuffle_parts": self.shuffle_parts, "pack": int(self.pack)}

    # torchdata's StatefulDataLoader calls these inside each worker process.
    def state_dict(self) -> dict[str, int]:
        return dict(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "block" not in state:
            raise ValueError(
                f"data position {dict(state)} was saved by an older logitcache (row groups shuffled one at a time); "
                "it cannot be resumed exactly: start a new run"
            )
        if int(state["shuffle_parts"]) != self.shuffle_parts:
            raise ValueError(
                f"data position was saved with shuffle_parts={state['shuffle_parts']}, this stream has "
                f"shuffle_parts={self.shuffle_parts}: resume with the same value"
            )
        # packing changes which sequences a token budget takes (a sequence count takes the same ones either way)
        if self.batch_unit == "tokens" and int(state.get("pack", 0)) != int(self.pack):
            saved = "--pack" if int(state.get("pack", 0)) else "--no-pack"
            raise ValueError(
                f"data position was saved with {saved} and a token budget, this stream has pack={self.pack}: the "
                f"batches would differ; resume with {saved}"
            )
        self._state = self._position(int(state["epoch"]), int(state["block"]), int(state["row"]))

    def _rows(self, reader: CacheReader, part: tuple[int, int, int, int]) -> tuple[Decoded, np.ndarray]:
        """A part's decoded row group and the int64 indices of the part's rows in this split, in storage order."""
        shard, group_index, p, n = part
        group = Decoded(reader.read_targets(shard, group_index))
        lo, hi = _part_rows(len(group.group), p, n)
        held = held_out_mask(group.group.sequence_id[lo:hi], self.eval_fraction)
        return group, lo + np.flatnonzero(held if self.split == "eval" else ~held)

    def _block(
        self, reader: CacheReader, parts: list[tuple[int, int, int, int]], block: np.ndarray, rng: np.random.Generator
    ) -> tuple[list[Decoded], np.ndarray]:
        """The decoded parts of a block and its training rows shuffled together: int64 [n, 2] (part in block, row)."""
        decoded, rows = [], [np.zeros((0, 2), dtype=np.int64)]
        for j, index in enumerate(block):
            group, keep = self._rows(reader, parts[int(index)])
            decoded.append(group)
            rows.append(np.stack([np.full_like(keep, j), keep], axis=1))
        shuffled = np.concatenate(rows)
        return decoded, shuffled[rng.permutation(len(shuffled))]

    def _full(self, pending: RowPacker, length: int) -> bool:
        """Whether adding a sequence of `length` tokens to the pending ones would overflow the batch (a batch always
        takes at least one sequence). A token budget counts padded tokens: (sequences + 1) x the longest, or once
        packed, the packed rows x the longest."""
        if not len(pending):
            return False
        if self.batch_unit == "sequences":
            return len(pending) >= self.batch_count
        if self.pack:
            return pending.cost(length) > self.batch_count
        return (len(pending) + 1) * max(pending.width, length) > self.batch_count

    def _collate(self, pending: list[tuple[Decoded, int]], packer: RowPacker, vocab: int, epoch: int = 0) -> Any:
        return collate_rows(pending, vocab, self.top_k_used, epoch, packer.rows if self.pack else None)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = CacheReader(self.cache)
        if self.split == "eval":
            yield from self._iter_eval(reader)
            return
        parts = plan_parts(reader.row_groups(), self.world_size * num_workers)
        if not parts:
            raise ValueError(f"{self.cache}: the cache holds no sequences to train on")
        vocab = reader.vocab_size
        pending: list[tuple[Decoded, int]] = []
        packer = RowPacker(self.pack)
        empty_epochs = last_epoch = 0
        size = self.shuffle_parts
        while True:
            epoch, start_block, start_row = self._state["epoch"], self._state["block"], self._state["row"]
            order = assigned_parts(len(parts), self.seed, epoch, self.rank, self.world_size, worker, num_workers)
            seen = 0
            for blk in range(start_block, -(-len(order) // size)):
                rng = np.random.default_rng([self.seed, epoch, self.rank, worker, blk])
                decoded, rows = self._block(reader, parts, order[blk * size : (blk + 1) * size], rng)
                seen += len(rows)
                for r in range(start_row if blk == start_block else 0, len(rows)):
                    part, row = decoded[rows[r, 0]], int(rows[r, 1])
                    length = int(part.lengths[row])
                    if self._full(packer, length):
                        self._state = self._position(epoch, blk, r)
                        batch = self._collate(pending, packer, vocab, last_epoch)
                        pending, packer = [], RowPacker(self.pack)
                        yield batch
                    pending.append((part, row))
                    packer.add(length)
                    last_epoch = epoch
            # Next epoch; the batch in progress continues across the boundary (the stream is endless).
            self._state = self._position(epoch + 1, 0, 0)
            empty_epochs = empty_epochs + 1 if seen == 0 else 0
            if empty_epochs > 1 and not pending:
                raise ValueError(
                    f"{self.cache}: rank {self.rank} worker {worker} has no training sequences (all held out, or too "
                    "few row groups); lower --eval-fraction or --num-workers"
                )

    def _eval_batches(self, reader: CacheReader) -> Iterator[tuple[list[tuple[Decoded, int]], RowPacker]]:
        """Every rank's held-out batches, in storage order (the same on all ranks), up to `max_sequences`."""
        pending: list[tuple[Decoded, int]] = []
        packer = RowPacker(self.pack)
        taken = 0
        for shard, group_index, rows in reader.row_groups():
            if rows == 0:
                continue
            group, keep = self._rows(reader, (shard, group_index, 0, 1))
            for i in keep:
                if self.max_sequences and taken >= self.max_sequences:
                    break
                length = int(group.lengths[i])
                if self._full(packer, length):
                    yield pending, packer
                    pending, packer = [], RowPacker(self.pack)
                pending.append((group, int(i)))
                packer.add(length)
                taken += 1
            if self.max_sequences and taken >= self.max_sequences:
                break
        if pending:
            yield pending, packer

    def _iter_eval(self, reader: CacheReader) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's share of the held-out batches (round-robin), then masked batches up to the share of rank 0.

        Every rank yields ceil(batches / world_size) batches: under DDP (buffer broadcast) and FSDP (parameter
        all-gather) each forward is a collective, so a rank with one forward fewer would leave the others waiting.
        """
        vocab = reader.vocab_size
        mine = total = 0
        filler: dict[str, torch.Tensor] | None = None
        for index, (seqs, packer) in enumerate(self._eval_batches(reader)):
            total += 1
            if index % self.world_size == self.rank:
                mine += 1
                yield self._collate(seqs, packer, vocab)
            elif filler is None:
                filler = masked_batch(collate_rows(seqs[:1], vocab, self.top_k_used))
        for _ in range(-(-total // self.world_size) - mine):
            assert filler is not None  # a rank short of batches skipped at least one
            yield filler


def steps_for_epochs(
    manifest: dict[str, Any],
    epochs: float,
    eval_fraction: float,
    batch_count: int,
    batch_unit: str,
    grad_accum: int,
    world_size: int,
) -> int:
    """Optimizer steps for `epochs` passes over the training split, from the manifest's totals (approximate for a
    token budget: padding is not counted)."""
    totals = manifest["totals"]
    size = totals["num_sequences"] if batch_unit == "sequences" else totals["num_tokens"]
    per_step = batch_count * grad_accum * world_size
    return max(1, math.ceil(epochs * size * (1.0 - eval_fraction) / per_step))
