"""train/hf.py: a cache as an HF dataset, the collator against train-student's batches, KDTrainer's loss against
train-student's on the same batch, and a tiny student trained through transformers.Trainer and trl.SFTTrainer."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from logitcache.storage import CacheReader
from logitcache.train.config import KDSettings
from logitcache.train.data import CacheStream, collate
from logitcache.train.hf import (
    CacheDataset,
    CacheSequenceStream,
    KDCollator,
    KDTrainer,
    KDTrainerMixin,
    flat_targets,
    to_hf_dataset,
)
from logitcache.train.student import DistillModel, build_student

PER_POSITION = ("positions", "next_token_ids", "target_ids", "target_probs", "tail_mass", "next_token_logprobs")


def _student(cache: Path) -> Any:
    return build_student("tiny-llama", CacheReader(str(cache)), seed=0).model


def _args(out: Path, **kw: Any) -> Any:
    from transformers import TrainingArguments

    base: dict[str, Any] = {
        "output_dir": str(out),
        "use_cpu": True,
        "report_to": "none",
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "max_steps": 6,
        "learning_rate": 3e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
    }
    return TrainingArguments(**{**base, **kw})


@pytest.mark.parametrize("top_k_used", [None, 3])
def test_the_collator_gives_train_students_targets_at_the_loss_positions(
    synth_cache: Path, top_k_used: int | None
) -> None:
    ds = CacheDataset(str(synth_cache))
    reader = CacheReader(str(synth_cache))
    seqs = list(reader.iter_sequences())
    assert len(ds) == len(seqs) == 64
    items = [ds[i] for i in (5, 0, 17, 40)]
    batch = ds.collator(top_k_used=top_k_used)(items)
    ref = collate([seqs[i] for i in (5, 0, 17, 40)], reader.vocab_size, top_k_used)
    b, t = ref["input_ids"].shape
    assert batch["input_ids"].shape == batch["labels"].shape == (b, t)
    m = ref["target_ids"].shape[1]
    assert batch["target_ids"].shape == (b, t, m) and batch["tail_mass"].shape == (b, t)
    assert torch.equal(batch["attention_mask"], ref["attention_mask"])
    flat = flat_targets(batch)
    for key in PER_POSITION:
        assert torch.equal(flat[key], ref[key]), key
    # labels: the real token where it trains (the cache's loss mask), -100 elsewhere and at token 0 and padding
    for row, i in enumerate((5, 0, 17, 40)):
        mask = seqs[i].loss_mask.copy()
        mask[0] = False
        want = np.where(mask, seqs[i].input_ids, -100)
        assert batch["labels"][row, : len(want)].tolist() == want.tolist()
        assert (batch["labels"][row, len(want) :] == -100).all()


def test_splits_are_train_students_held_out_split(synth_cache: Path) -> None:
    train = CacheDataset(str(synth_cache), split="train", eval_fraction=0.25)
    held = CacheDataset(str(synth_cache), split="eval", eval_fraction=0.25)
    assert len(train) + len(held) == 64 and len(held) > 0
    train_ids = {train[i]["sequence_id"] for i in range(len(train))}
    held_ids = [held[i]["sequence_id"] for i in range(len(held))]
    assert not train_ids & set(held_ids)
    stream = CacheStream(str(synth_cache), seed=0, batch_count=4, eval_fraction=0.25, split="eval")
    assert held_ids == [int(s) for b in stream for s in b["sequence_id"]]
    streamed = CacheSequenceStream(str(synth_cache), split="eval", eval_fraction=0.25)
    assert [it["sequence_id"] for it in streamed] == held_ids


@pytest.mark.parametrize(
    "settings",
    [
        KDSettings(),
        KDSettings(fused_loss=False),
        KDSettings(loss="jsd", beta=0.3, temperature=2.0, alpha=0.6, chunk_size=7),
        KDSettings(loss="reverse_kl", alpha=0.5, fused_loss=False),
    ],
    ids=["fused", "reference", "jsd-T2-alpha", "reverse-reference"],
)
def test_kdtrainer_loss_equals_train_students_on_the_same_batch(
    synth_cache: Path, tmp_path: Path, settings: KDSettings
) -> None:
    ds = CacheDataset(str(synth_cache))
    model = _student(synth_cache)
    trainer = KDTrainer(model=model, args=_args(tmp_path), train_dataset=ds, kd=settings)
    indices = (3, 9, 11, 30)
    batch = ds.collator()([ds[i] for i in indices])
    seqs = list(CacheReader(str(synth_cache)).iter_sequences())
    ref_batch = collate([seqs[i] for i in indices], ds.vocab_size)  # train-student's batch (unpacked)

    model.train()
    got = trainer.compute_loss(model, batch)
    got.backward()
    got_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    dm = DistillModel(model, ds.vocab_size, settings)
    want = dm(ref_batch).total  # train-student's loss of the same sequences
    want.backward()
    assert math.isfinite(float(got.detach()))
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6, abs=1e-6)
    for g, p in zip(got_grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)


def test_kdtrainer_loss_equals_train_students_on_a_sampled_cache(sampled_cache: Path, tmp_path: Path) -> None:
    ds = CacheDataset(str(sampled_cache))
    model = _student(sampled_cache)
    trainer = KDTrainer(model=model, args=_args(tmp_path), train_dataset=ds, kd=KDSettings(alpha=0.8))
    assert trainer.kd_settings.target_mode == "sampled"  # taken from the cache
    seqs = list(CacheReader(str(sampled_cache)).iter_sequences())
    batch = ds.collator()([ds[i] for i in range(6)])
    want = DistillModel(model, ds.vocab_size, trainer.kd_settings)(collate(seqs[:6], ds.vocab_size)).total
    got = trainer.compute_loss(model, batch)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6, abs=1e-6)


def test_gradient_accumulation_normalises_over_the_whole_step(synth_cache: Path, tmp_path: Path) -> None:
    # Trainer passes num_items_in_batch (loss positions of both micro-batches); train-student divides each
    # micro-batch's sum by the step's positions. The accumulated gradients must be equal.
    ds = CacheDataset(str(synth_cache))
    model = _student(synth_cache)
    trainer = KDTrainer(model=model, args=_args(tmp_path), train_dataset=ds)
    groups = [(0, 1, 2), (7, 8)]  # micro-batches of different sizes, so a mean of means would differ
    micro = [ds.collator()([ds[i] for i in g]) for g in groups]
    seqs = list(CacheReader(str(synth_cache)).iter_sequences())
    num_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
    for b in micro:
        trainer.training_step(trainer.model, b, torch.tensor(num_items))
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    dm = DistillModel(model, ds.vocab_size, trainer.kd_settings)
    for g in groups:
        dm(collate([seqs[i] for i in g], ds.vocab_size), float(num_items)).total.backward()
    for a, p in zip(got, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-7)


def _losses(trainer: Any) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h and "kd_loss" in h]


def test_a_student_trains_through_transformers_trainer(synth_cache: Path, tmp_path: Path) -> None:
    train = CacheDataset(str(synth_cache), split="train", eval_fraction=0.2)
    held = CacheDataset(str(synth_cache), split="eval", eval_fraction=0.2)
    model = _student(synth_cache)
    before = [p.detach().clone() for p in model.parameters()]
    args = _args(tmp_path, max_steps=8, eval_strategy="no")
    trainer = KDTrainer(model=model, args=args, train_dataset=train, eval_dataset=held)
    assert args.remove_unused_columns is False
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])


def test_the_stream_trains_through_transformers_trainer_with_alpha(synth_cache: Path, tmp_path: Path) -> None:
    stream = CacheSequenceStream(str(synth_cache), seed=1, eval_fraction=0.2)
    model = _student(synth_cache)
    kd = KDSettings(alpha=0.5, temperature=2.0)
    trainer = KDTrainer(model=model, args=_args(tmp_path, max_steps=4), train_dataset=stream, kd=kd)
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)


def test_a_student_trains_through_trl_sft_trainer_with_the_mixin(synth_cache: Path, tmp_path: Path) -> None:
    from trl import SFTConfig, SFTTrainer

    class KDSFTTrainer(KDTrainerMixin, SFTTrainer):
        pass

    source = CacheDataset(str(synth_cache))
    dataset = to_hf_dataset(source, cache_dir=str(tmp_path / "hf-datasets"))
    assert len(dataset) == 64
    model = _student(synth_cache)
    before = [p.detach().clone() for p in model.parameters()]
    config = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        dataset_kwargs={"skip_prepare_dataset": True},
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=8,
        learning_rate=3e-3,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = KDSFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        data_collator=source.collator(),
        processing_class=source.load_tokenizer(),
    )
    # TRL's defaults stay on: bf16 mixed precision and gradient checkpointing
    assert trainer.args.bf16 and trainer.args.gradient_checkpointing
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_sft_trainer_without_skip_prepare_is_refused(synth_cache: Path, tmp_path: Path) -> None:
    from trl import SFTConfig, SFTTrainer

    class KDSFTTrainer(KDTrainerMixin, SFTTrainer):
        pass

    source = CacheDataset(str(synth_cache))
    with pytest.raises(ValueError, match="skip_prepare_dataset"):
        KDSFTTrainer(
            model=_student(synth_cache),
            args=SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none"),
            train_dataset=source,
            data_collator=source.collator(),
        )


def test_a_sampled_cache_refuses_losses_it_cannot_train(sampled_cache: Path, tmp_path: Path) -> None:
    ds = CacheDataset(str(sampled_cache))
    assert ds.collator().target_mode == "sampled"
    with pytest.raises(ValueError, match="sampled targets"):
        KDTrainer(model=_student(sampled_cache), args=_args(tmp_path), train_dataset=ds, kd=KDSettings(loss="tvd"))


def test_a_collator_is_required(synth_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="KDCollator"):
        KDTrainer(model=_student(synth_cache), args=_args(tmp_path), train_dataset=[{"input_ids": [1, 2]}])
    assert isinstance(CacheDataset(str(synth_cache)).collator(), KDCollator)
