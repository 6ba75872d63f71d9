"""The training stream: split, disjoint rank/worker shares, determinism, exact resume, batch alignment."""

from __future__ import annotations

import itertools
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from logitcache.storage import (
    WINDOW_BITS,
    CacheReader,
    ShardWriter,
    document_id,
    finalize_cache,
    open_capture,
    write_replica_summary,
)
from logitcache.train.data import CacheStream, assigned_parts, collate, held_out_mask, plan_parts, splitmix64

from .conftest import SAMPLED_SPEC, bigram_teacher, make_tokenizer_dir, sample_sequence

SEQS_PER_ROW_GROUP = 8  # as at the default 16 MiB row groups with L=4096, k=64


def write_document_cache(root: Path) -> Path:
    """root/cache: 120 documents of 1-8 windows each (ids `(document << 16) | window`), written in document order as
    a capture writes them, 16 tokens per window, row groups of 8 windows."""
    path, vocab, k, length = root / "cache", 32, 4, 16
    header = {
        "teacher": {"name": "bigram", "dtype": "float64", "backend": "numpy"},
        "tokenizer": {
            "name": "t",
            "fingerprint": make_tokenizer_dir(root / "tok", vocab),
            "vocab_size": vocab,
            "padded_vocab_size": vocab,
        },
        "capture": {"top_k": k, "codec": "f32", "max_seq_len": length},
        "dataset": {"source": "synthetic-documents"},
        "num_replicas": 1,
    }
    open_capture(path, header)
    bytes_per_window = 4 * (length + (length - 1) * (2 * k + 2))
    writer = ShardWriter(path, top_k=k, codec="f32", row_group_bytes=SEQS_PER_ROW_GROUP * bytes_per_window)
    rng, teacher = np.random.default_rng(0), bigram_teacher(vocab)
    for doc in range(120):
        for window in range(int(rng.integers(1, 9))):
            writer.write(sample_sequence(rng, teacher, (doc << WINDOW_BITS) | window, length, k))
    writer.close()
    write_replica_summary(path, replica=0, num_replicas=1, summary={"rows": 120, "skipped": {}})
    finalize_cache(path)
    return path


@pytest.fixture(scope="module")
def document_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_document_cache(tmp_path_factory.mktemp("documents"))


def same_document_pair_share(cache: Path, batches: int = 60, seed: int = 0, **stream: int) -> float:
    """Share of the sequence pairs within a training batch (8 sequences) that are windows of one document."""
    it = iter(CacheStream(str(cache), seed=seed, batch_count=8, **stream))
    same = pairs = 0
    for _ in range(batches):
        docs = document_id(next(it)["sequence_id"].numpy())
        same += int((docs[:, None] == docs[None, :]).sum() - len(docs)) // 2
        pairs += len(docs) * (len(docs) - 1) // 2
    return same / pairs


def test_splitmix64_known_value_and_split_fraction() -> None:
    assert int(splitmix64(np.array([0]))[0]) == 0xE220A8397B1DCDAF  # first output of splitmix64 seeded with 0
    ids = np.arange(100_000, dtype=np.int64) << 16
    held = held_out_mask(ids, 0.1)
    assert 0.09 < held.mean() < 0.11
    assert np.array_equal(held, held_out_mask(ids, 0.1))
    assert not held_out_mask(ids, 0.0).any()


def test_windows_of_one_document_land_on_the_same_side_of_the_split() -> None:
    docs = np.arange(20_000, dtype=np.int64)
    ids = (docs[:, None] << WINDOW_BITS) | np.arange(6, dtype=np.int64)  # [D, 6]: six windows per document
    assert np.array_equal(document_id(ids.reshape(-1)), np.repeat(docs, 6))
    held = held_out_mask(ids.reshape(-1), 0.1).reshape(ids.shape)
    assert (held == held[:, :1]).all()  # a document's windows are all held out or all trained on
    assert 0.09 < held[:, 0].mean() < 0.11  # about eval_fraction of the documents


def test_assigned_parts_are_disjoint_cover_and_seeded() -> None:
    for world, workers in ((1, 1), (2, 1), (2, 3), (3, 2)):
        shares = [assigned_parts(17, 5, 0, r, world, w, workers) for r in range(world) for w in range(workers)]
        flat = np.concatenate(shares)
        assert sorted(flat.tolist()) == list(range(17))
    a = assigned_parts(17, 5, 0, 0, 1, 0, 1)
    assert np.array_equal(a, assigned_parts(17, 5, 0, 0, 1, 0, 1))
    assert not np.array_equal(a, assigned_parts(17, 5, 1, 0, 1, 0, 1))
    assert not np.array_equal(a, assigned_parts(17, 6, 0, 0, 1, 0, 1))


def test_plan_parts_splits_small_caches_for_every_reader() -> None:
    parts = plan_parts([(0, 0, 10), (0, 1, 0)], 4)
    assert parts == [(0, 0, p, 4) for p in range(4)]
    assert plan_parts([(0, 0, 10), (1, 0, 10)], 2) == [(0, 0, 0, 1), (1, 0, 0, 1)]


def _epoch0_ids(cache: Path, rank: int, world: int, workers: int, seed: int = 0) -> list[int]:
    stream = CacheStream(str(cache), seed=seed, batch_count=1, eval_fraction=0.2, rank=rank, world_size=world)
    out = []
    for batch in itertools.islice(StatefulDataLoader(stream, batch_size=None, num_workers=workers), 200):
        if int(batch["epoch"]) == 0:
            out.extend(batch["sequence_id"].tolist())
    return out


def test_ranks_and_workers_read_disjoint_shares_of_the_training_split(synth_cache: Path) -> None:
    reader = CacheReader(synth_cache)
    all_ids = np.concatenate([g.sequence_id for g in reader.iter_row_groups()])
    train_ids = set(all_ids[~held_out_mask(all_ids, 0.2)].tolist())
    shares = [_epoch0_ids(synth_cache, r, 2, 2) for r in range(2)]
    assert set(shares[0]).isdisjoint(shares[1])
    assert len(shares[0]) == len(set(shares[0]))
    assert set(shares[0]) | set(shares[1]) == train_ids  # every training sequence once per epoch, no held-out one
    assert shares[0] == _epoch0_ids(synth_cache, 0, 2, 2)  # deterministic
    assert shares[0] != _epoch0_ids(synth_cache, 0, 2, 2, seed=1)


def test_resume_from_state_dict_continues_with_the_same_batches(synth_cache: Path) -> None:
    def loader() -> StatefulDataLoader:
        stream = CacheStream(str(synth_cache), seed=3, batch_count=40, batch_unit="tokens", eval_fraction=0.1)
        return StatefulDataLoader(stream, batch_size=None, num_workers=2)

    full = [b["sequence_id"].tolist() for b in itertools.islice(loader(), 30)]
    first = loader()
    it = iter(first)
    for _ in range(11):
        next(it)
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    rest = [b["sequence_id"].tolist() for b in itertools.islice(resumed, 19)]
    assert rest == full[11:]
    assert max(len(b) for b in full) > 1  # token-budget batching really grouped sequences


def test_collate_aligns_teacher_arrays_with_student_positions(synth_cache: Path) -> None:
    reader = CacheReader(synth_cache)
    group = reader.read_row_group(0, 0)
    seqs = [group.sequence(i) for i in range(3)]
    b = collate(seqs, reader.vocab_size)
    width = b["input_ids"].shape[1]
    expected_pos = []
    for i, s in enumerate(seqs):
        t = np.flatnonzero(s.loss_mask[1:])
        expected_pos.extend((i * width + t).tolist())
        assert b["input_ids"][i, : s.num_tokens].tolist() == s.input_ids.tolist()
        assert int(b["attention_mask"][i].sum()) == s.num_tokens
    assert b["positions"].tolist() == expected_pos
    # the target at a position is the next token, and the teacher's log-prob of it is the cached one
    assert torch.equal(b["next_token_ids"], b["input_ids"].reshape(-1)[b["positions"] + 1])
    first = seqs[0]
    t0 = int(np.flatnonzero(first.loss_mask[1:])[0])
    assert b["target_ids"][0].tolist() == first.entry_ids[t0].tolist()
    # a topk cache's target weights are the teacher's probabilities of the stored ids
    torch.testing.assert_close(b["target_probs"][0], torch.from_numpy(np.exp(first.entry_logprobs[t0])))
    assert float(b["tail_mass"][0]) == float(first.tail_mass[t0])
    assert float(b["next_token_logprobs"][0]) == float(first.next_token_logprobs[t0])


def test_top_k_used_and_out_of_vocab_ids_fold_into_the_tail(synth_cache: Path) -> None:
    reader = CacheReader(synth_cache)
    seq = reader.read_row_group(0, 0).sequence(0)
    full = collate([seq], reader.vocab_size)
    cut = collate([seq], reader.vocab_size, top_k_used=3)
    assert cut["target_ids"].shape[1] == cut["target_probs"].shape[1] == 3
    dropped = full["target_probs"][:, 3:].sum(-1)
    torch.testing.assert_close(cut["tail_mass"], (full["tail_mass"] + dropped).clamp(max=1.0))
    # ids at or above the tokenizer's vocabulary (padded logit rows) are not tokens: folded into the tail
    small_vocab = int(full["target_ids"][0, 1]) if int(full["target_ids"][0, 1]) > 0 else 1
    folded = collate([seq], small_vocab)
    outside = full["target_ids"] >= small_vocab
    assert int(folded["target_ids"].max()) < small_vocab
    assert float(folded["target_probs"][outside].abs().sum()) == 0.0
    want = (full["tail_mass"] + torch.where(outside, full["target_probs"], 0.0).sum(-1)).clamp(max=1.0)
    torch.testing.assert_close(folded["tail_mass"], want)


def test_sampled_cache_collates_its_weights_with_no_tail(sampled_cache: Path) -> None:
    reader = CacheReader(sampled_cache)
    assert reader.targets == SAMPLED_SPEC
    seq = reader.read_row_group(0, 0).sequence(0)
    b = collate([seq], reader.vocab_size)
    t = np.flatnonzero(seq.loss_mask[1:])
    assert seq.sample_counts is not None
    counts, residual = seq.sample_counts[t], seq.tail_mass[t].astype(np.float64)[:, None]
    exact = (seq.entry_ids[t] >= 0) & (counts == 0)
    want = np.where(
        counts > 0, residual * counts / SAMPLED_SPEC.samples, np.where(exact, np.exp(seq.entry_logprobs[t]), 0)
    )
    assert b["target_ids"].tolist() == seq.entry_ids[t].tolist()
    torch.testing.assert_close(b["target_probs"], torch.from_numpy(want.astype(np.float32)))
    assert float(b["tail_mass"].abs().max()) == 0.0  # the draws stand for the residual: no tail bucket
    torch.testing.assert_close(b["target_probs"].sum(-1), torch.ones(len(t)), atol=1e-5, rtol=0)


def test_sampled_cache_refuses_top_k_used_and_out_of_vocab_folding(sampled_cache: Path) -> None:
    reader = CacheReader(sampled_cache)
    seq = reader.read_row_group(0, 0).sequence(0)
    with pytest.raises(ValueError, match="top_k_used=3 can't be used on sampled targets: folding entries into the"):
        collate([seq], reader.vocab_size, top_k_used=3)
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary .* can't be folded into a tail"):
        collate([seq], int(seq.entry_ids.max()))


def test_eval_split_gives_every_rank_the_same_number_of_batches(synth_cache: Path) -> None:
    def batches(rank: int, world: int, max_sequences: int = 0) -> list[dict[str, torch.Tensor]]:
        stream = CacheStream(
            str(synth_cache),
            seed=0,
            batch_count=5,
            eval_fraction=1.0,
            split="eval",
            rank=rank,
            world_size=world,
            max_sequences=max_sequences,
        )
        return list(stream)

    for max_sequences in (0, 21):
        single = [b["sequence_id"].tolist() for b in batches(0, 1, max_sequences)]
        assert sum(map(len, single)) == (max_sequences or 64)
        assert len(single) % 2 == 1 and len(single) % 3 != 0  # some rank is short of a batch below
        for world in (2, 3):
            shares = [batches(r, world, max_sequences) for r in range(world)]
            assert [len(s) for s in shares] == [-(-len(single) // world)] * world
            real = [[b["sequence_id"].tolist() for b in s if int(b["num_positions"]) > 0] for s in shares]
            assert sum(map(len, real)) == len(single)
            assert [real[i % world][i // world] for i in range(len(single))] == single  # dealt round-robin
            for filler in (b for s in shares for b in s if int(b["num_positions"]) == 0):
                assert filler["positions"].shape == (0,) and filler["target_ids"].shape == (0, 8)  # k=8
                assert filler["input_ids"].shape == filler["attention_mask"].shape == (1, 1)


def test_shuffle_buffer_mixes_the_windows_of_a_document_across_batches(document_cache: Path) -> None:
    reader = CacheReader(document_cache)
    rows = [n for *_, n in reader.row_groups()]
    assert set(rows[:-1]) == {SEQS_PER_ROW_GROUP}
    one_part = same_document_pair_share(document_cache, shuffle_parts=1)  # a batch from one row group at a time
    default = same_document_pair_share(document_cache)
    assert default < one_part / 4, (one_part, default)


def test_resume_mid_epoch_with_the_shuffle_buffer_continues_with_the_same_batches(document_cache: Path) -> None:
    def loader() -> StatefulDataLoader:
        stream = CacheStream(str(document_cache), seed=1, batch_count=24, shuffle_parts=3)
        return StatefulDataLoader(stream, batch_size=None, num_workers=2)

    full = [(b["sequence_id"].tolist(), int(b["epoch"])) for b in itertools.islice(loader(), 60)]
    assert full[-1][1] >= 2  # the cut points below fall inside blocks, at block ends and in later epochs
    for cut in (3, 17, 40):
        first = loader()
        it = iter(first)
        for _ in range(cut):
            next(it)
        state = first.state_dict()
        assert len(pickle.dumps(state)) < 4_000  # cursors, not rows
        resumed = loader()
        resumed.load_state_dict(state)
        rest = [(b["sequence_id"].tolist(), int(b["epoch"])) for b in itertools.islice(resumed, 60 - cut)]
        assert rest == full[cut:], cut
    saved = CacheStream(str(document_cache), seed=1, batch_count=24, shuffle_parts=3).state_dict()
    with pytest.raises(ValueError, match="saved with shuffle_parts=3"):
        CacheStream(str(document_cache), seed=1, batch_count=24, shuffle_parts=4).load_state_dict(saved)
