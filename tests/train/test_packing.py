"""Sequence packing: packed batches hold the same sequences and positions as padded ones, give the student the same
hidden states and loss, never drop or duplicate a sequence, and resume exactly."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from logitcache.storage import CachedSequence, CacheReader
from logitcache.train.config import KDSettings
from logitcache.train.data import CacheStream, collate, held_out_mask
from logitcache.train.packing import RowPacker, first_fit, packed_position_ids, packing_problem
from logitcache.train.student import DistillModel
from tests.models import TINY_SIZES

PER_POSITION = ("next_token_ids", "target_ids", "target_probs", "tail_mass", "next_token_logprobs")


def _sequences(cache: Path) -> list[CachedSequence]:
    return list(CacheReader(cache).iter_sequences())


def _position_keys(batch: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
    """(sequence id, t) of every loss position of a padded or packed batch, in the batch's order."""
    mask = batch["attention_mask"]
    width = mask.shape[1]
    pos = batch["positions"]
    segment = mask.reshape(-1)[pos]
    before = torch.cat([torch.zeros(1, dtype=torch.int64), mask.max(dim=1).values.cumsum(0)[:-1]])  # sequences
    index = before[pos // width] + segment - 1
    t = packed_position_ids(mask).reshape(-1)[pos]
    return list(zip(batch["sequence_id"][index].tolist(), t.tolist()))


def _per_position(
    batch: dict[str, torch.Tensor], values: torch.Tensor | None = None
) -> dict[tuple[int, int], torch.Tensor]:
    """(sequence id, t) -> that loss position's next token, teacher targets and input token (or its row of
    `values`), as float64 (exact for these ids and float32 values)."""
    inputs = batch["input_ids"].reshape(-1)[batch["positions"]]
    cols = [batch[name] for name in PER_POSITION] + [inputs] if values is None else [values]
    keys = _position_keys(batch)
    return {k: torch.cat([c[i].reshape(-1).double() for c in cols]) for i, k in enumerate(keys)}


def _tiny_llama(vocab: int) -> DistillModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, head_dim=32, **TINY_SIZES))
    return DistillModel(model, vocab, KDSettings(alpha=0.5))


def test_first_fit_places_every_sequence_once_within_the_width() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        lengths = rng.integers(1, 40, int(rng.integers(1, 30))).tolist()
        rows = first_fit(lengths)
        assert sorted(j for row in rows for j in row) == list(range(len(lengths)))
        assert all(row == sorted(row) for row in rows)  # arrival order within a row
        assert all(sum(lengths[j] for j in row) <= max(lengths) for row in rows)
        assert len(rows) <= len(lengths)
    packer = RowPacker()
    for n in (10, 4, 7, 6):
        packer.add(n)
    assert packer.rows == [[0], [1, 3], [2]] and packer.cost(3) == 30 and packer.cost(11) == 44


def test_packed_collate_holds_the_same_positions_and_targets(synth_cache: Path) -> None:
    seqs = _sequences(synth_cache)[:12]
    vocab = CacheReader(synth_cache).vocab_size
    padded, packed = collate(seqs, vocab), collate(seqs, vocab, pack=True)
    assert packed["input_ids"].shape[1] == padded["input_ids"].shape[1]
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    assert int(packed["attention_mask"].max()) > 1
    assert sorted(packed["sequence_id"].tolist()) == sorted(padded["sequence_id"].tolist())
    for key in ("num_tokens", "num_positions"):
        assert int(packed[key]) == int(padded[key])
    assert int((packed["attention_mask"] > 0).sum()) == int(packed["num_tokens"])
    # the same (sequence, t) positions, with the same next token, teacher targets and input token at each
    want, got = _per_position(padded), _per_position(packed)
    assert want.keys() == got.keys() and len(want) == int(padded["num_positions"])
    for k in want:
        assert torch.equal(want[k], got[k]), k
    for b in (padded, packed):
        assert torch.equal(b["input_ids"].reshape(-1)[b["positions"] + 1], b["next_token_ids"])
    # rows of one sequence each are the padded batch itself
    same = [s for s in seqs if s.num_tokens == max(x.num_tokens for x in seqs)][:2]
    one_each = collate(same, vocab, pack=True)
    for key, value in collate(same, vocab).items():
        assert torch.equal(one_each[key], value), key


@pytest.mark.parametrize("cache", ["synth_cache", "sampled_cache"])
def test_packed_and_padded_batches_give_the_same_hidden_states_and_loss(
    cache: str, request: pytest.FixtureRequest
) -> None:
    path: Path = request.getfixturevalue(cache)
    reader = CacheReader(path)
    dm = _tiny_llama(reader.vocab_size)
    target_mode = reader.targets.mode
    dm.settings = KDSettings(alpha=0.5, target_mode=target_mode)
    seqs = _sequences(path)[:10]
    padded, packed = collate(seqs, reader.vocab_size), collate(seqs, reader.vocab_size, pack=True)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    hidden = {
        name: _per_position(b, dm.hidden_at(b["input_ids"], b["attention_mask"], b["positions"]).detach())
        for name, b in (("padded", padded), ("packed", packed))
    }
    assert hidden["padded"].keys() == hidden["packed"].keys()
    for k, h in hidden["padded"].items():
        torch.testing.assert_close(hidden["packed"][k], h, rtol=1e-5, atol=1e-5)
    losses = {}
    for name, b in (("padded", padded), ("packed", packed)):
        dm.zero_grad()
        parts = dm(b, float(b["num_positions"]))
        parts.total.backward()
        grads = torch.cat([p.grad.reshape(-1) for p in dm.parameters() if p.grad is not None])
        losses[name] = (parts.total.detach(), grads)
    torch.testing.assert_close(losses["packed"][0], losses["padded"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["packed"][1], losses["padded"][1], rtol=1e-4, atol=1e-6)


def _epoch_batches(cache: Path, **stream: object) -> list[dict[str, torch.Tensor]]:
    """The batches of the first epoch of a single-reader training stream."""
    out = []
    for b in CacheStream(str(cache), seed=5, eval_fraction=0.2, **stream):  # type: ignore[arg-type]
        if int(b["epoch"]) > 0:
            return out
        out.append(b)
    raise AssertionError("unreachable: the training stream is endless")


def test_stream_packs_every_training_sequence_once_per_epoch(synth_cache: Path) -> None:
    reader = CacheReader(synth_cache)
    ids = np.concatenate([g.sequence_id for g in reader.iter_row_groups()])
    train_ids = sorted(ids[~held_out_mask(ids, 0.2)].tolist())
    budget = 96
    for unit, count in (("tokens", budget), ("sequences", 5)):
        by_pack = {}
        for pack in (False, True):
            batches = _epoch_batches(synth_cache, batch_count=count, batch_unit=unit, pack=pack)
            seen = [i for b in batches for i in b["sequence_id"].tolist()]
            # the batch in progress at the epoch's end continues into the next one: compare what was yielded
            assert len(seen) == len(set(seen)) and set(seen) <= set(train_ids)
            assert len(train_ids) - len(seen) < (budget if unit == "tokens" else count)
            by_pack[pack] = batches
            if pack and unit == "tokens":
                for b in batches:
                    assert b["input_ids"].numel() <= budget or len(b["sequence_id"]) == 1
        padded, packed = by_pack[False], by_pack[True]
        if unit == "sequences":  # a count takes the same sequences either way; only the layout changes
            assert [sorted(b["sequence_id"].tolist()) for b in packed] == [
                sorted(b["sequence_id"].tolist()) for b in padded
            ]
        else:  # a budget fits more sequences once padding is squeezed out
            assert len(packed) < len(padded)
        share = {
            p: 1 - sum(int(b["num_tokens"]) for b in bs) / sum(b["input_ids"].numel() for b in bs)
            for p, bs in by_pack.items()
        }
        assert share[True] < share[False], share


def test_resume_with_packing_continues_with_the_same_batches(synth_cache: Path) -> None:
    def loader(pack: bool = True) -> StatefulDataLoader:
        stream = CacheStream(str(synth_cache), seed=3, batch_count=80, batch_unit="tokens", shuffle_parts=2, pack=pack)
        return StatefulDataLoader(stream, batch_size=None, num_workers=2)

    full = [(b["sequence_id"].tolist(), b["attention_mask"].tolist()) for b in itertools.islice(loader(), 40)]
    assert any(max(map(max, mask)) > 1 for _, mask in full)  # really packed
    for cut in (5, 23):
        first = loader()
        it = iter(first)
        for _ in range(cut):
            next(it)
        state = first.state_dict()
        resumed = loader()
        resumed.load_state_dict(state)
        rest = [(b["sequence_id"].tolist(), b["attention_mask"].tolist()) for b in itertools.islice(resumed, 40 - cut)]
        assert rest == full[cut:], cut
    saved = CacheStream(str(synth_cache), seed=3, batch_count=80, batch_unit="tokens", pack=True).state_dict()
    with pytest.raises(ValueError, match="saved with --pack and a token budget"):
        CacheStream(str(synth_cache), seed=3, batch_count=80, batch_unit="tokens").load_state_dict(saved)
    CacheStream(str(synth_cache), seed=3, batch_count=8).load_state_dict(saved)  # a count: the same batches


def test_packing_is_used_only_where_the_model_keeps_sequences_apart() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = {"hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 97}
    for arch, exact in (("llama", True), ("qwen2", True), ("bloom", False)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, n_layer=2, num_hidden_layers=2, **sizes))
        model.train()
        problem = packing_problem(model)
        assert (problem is None) == exact, (arch, problem)
        assert model.training  # the probe restores the mode
    assert "does not keep packed sequences apart" in str(problem)
