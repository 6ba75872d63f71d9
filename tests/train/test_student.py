"""The student against the cache's tokenizer: a mismatch is refused, padded vocabularies are aligned."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from logitcache.storage import CacheReader
from logitcache.train.config import TrainConfig
from logitcache.train.loop import train
from logitcache.train.student import StudentError, build_student
from tests.models import TINY_SIZES, tiny_granite

from .conftest import make_tokenizer_dir, write_synthetic_cache


def _pretrained(path: Path, vocab: int, tokenizer_prefix: str | None) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, head_dim=32, **TINY_SIZES)
    LlamaForCausalLM(cfg).save_pretrained(path)
    if tokenizer_prefix is not None:
        make_tokenizer_dir(path, 96, prefix=tokenizer_prefix)
    return path


@pytest.fixture(scope="module")
def padded_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """V=96 tokens, teacher logits padded to 128."""
    return write_synthetic_cache(tmp_path_factory.mktemp("padded") / "cache", num_sequences=24, padded_vocab=128)


def test_student_with_another_tokenizer_is_refused(padded_cache: Path, tmp_path: Path) -> None:
    student = _pretrained(tmp_path / "other", 96, tokenizer_prefix="x")  # same size, different tokens
    with pytest.raises(StudentError, match="different tokenizer"):
        build_student(str(student), CacheReader(padded_cache))


def test_padded_vocab_sizes_of_the_same_tokenizer_are_aligned(padded_cache: Path, tmp_path: Path) -> None:
    reader = CacheReader(padded_cache)
    student = _pretrained(tmp_path / "same", 112, tokenizer_prefix="w")  # same tokenizer, padded to 112 not 128
    built = build_student(str(student), reader)
    assert built.vocab_size == 96
    out = tmp_path / "run"
    last = train(
        TrainConfig(
            cache=str(padded_cache),
            student=str(student),
            output=str(out),
            steps=3,
            eval_fraction=0.2,
            progress=False,
            num_workers=0,
            save_every=0,
        )
    )
    assert torch.isfinite(torch.tensor(last["loss"]))
    preset = build_student("tiny-llama", reader)  # from scratch: the cache's padded size
    assert preset.model.get_output_embeddings().weight.shape[0] == 128


def test_student_with_fewer_logits_than_tokens_is_refused(padded_cache: Path, tmp_path: Path) -> None:
    student = _pretrained(tmp_path / "small", 64, tokenizer_prefix=None)
    with pytest.raises(StudentError, match="fewer than the cache's 96 tokens"):
        build_student(str(student), CacheReader(padded_cache))


def test_student_head_applies_granite_logits_scaling(padded_cache: Path) -> None:
    # Granite divides its logits by `logits_scaling`: the distillation head must produce the logits the saved
    # student's own forward (and so its inference) produces, or it is trained on differently scaled logits.
    from logitcache.train.student import DistillModel

    model = tiny_granite(vocab_size=128, logits_scaling=4.0).eval()
    dm = DistillModel(model, 96)
    ids = torch.randint(0, 96, (2, 9))
    mask = torch.ones_like(ids)
    positions = torch.arange(18)
    with torch.no_grad():
        ours = dm.head(dm.hidden_at(ids, mask, positions))
        ref = model(input_ids=ids, attention_mask=mask).logits.reshape(18, -1)[:, :96]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
