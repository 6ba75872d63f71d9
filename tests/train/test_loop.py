"""The training loop's guards: resume only on the same cache, the final weights saved before the final evaluation,
sampled caches (forward KL only, refusals before training), v1 caches still train."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from logitcache.storage import CacheReader
from logitcache.train import loop
from logitcache.train.config import ConfigError, KDSettings, TrainConfig
from logitcache.train.data import CacheStream
from logitcache.train.student import PRESETS, DistillModel

from .conftest import SAMPLED_SPEC, write_synthetic_cache

V1_CACHE = Path(__file__).parents[1] / "data" / "v1_cache"  # written by the v1 writer (commit 8112061)


def _cfg(cache: Path, out: Path, **kw: object) -> TrainConfig:
    base: dict[str, object] = {
        "student": "tiny-llama",
        "steps": 2,
        "eval_fraction": 0.2,
        "progress": False,
        "num_workers": 0,
        "save_every": 1,
        "batch_size": "4",
    }
    return TrainConfig(cache=str(cache), output=str(out), **{**base, **kw})


def test_resume_accepts_a_moved_copy_and_refuses_another_cache(synth_cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    loop.train(_cfg(synth_cache, run))
    assert json.loads((run / "config.json").read_text())["resolved"]["cache_id"]
    moved = tmp_path / "moved" / "cache"
    shutil.copytree(synth_cache, moved)
    last = loop.train(_cfg(moved, run, steps=3, resume=True))  # the same shards at another path: fine
    assert last["step"] == 3
    other = write_synthetic_cache(tmp_path / "other" / "cache", seed=5)  # same tokenizer and settings, other data
    with pytest.raises(ConfigError, match=r"is a different cache \(content id"):
        loop.train(_cfg(other, run, steps=4, resume=True))


def test_final_weights_are_saved_before_the_final_evaluation(
    synth_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A final evaluation that fails (or, under torchrun, hangs) must not cost the trained student.
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(loop, "evaluate", broken)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="evaluation failed"):
        loop.train(_cfg(synth_cache, run, save_every=0))
    assert (run / "final" / "model.safetensors").is_file()
    assert (run / "checkpoints" / "step-2" / "trainer_state.pt").is_file()


def test_checkpoint_keeps_each_ranks_rng_state(synth_cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    loop.train(_cfg(synth_cache, run, save_every=0))
    state = torch.load(run / "checkpoints" / "step-2" / "trainer_state.pt", weights_only=True)
    assert isinstance(state["rng"], list) and len(state["rng"]) == 1  # one entry per rank
    assert set(state["rng"][0]) == ({"torch", "cuda"} if torch.cuda.is_available() else {"torch"})


def test_a_sampled_cache_trains_end_to_end_with_forward_kl(sampled_cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    last = loop.train(_cfg(sampled_cache, run, steps=30, save_every=0, alpha=0.9, lr=3e-3))
    assert last["step"] == 30
    doc = json.loads((run / "config.json").read_text())
    assert doc["resolved"]["cache_targets"] == SAMPLED_SPEC.to_header()
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    kd = [r["kd_loss"] for r in rows if "kd_loss" in r]
    assert all(math.isfinite(x) for x in kd)
    assert sum(kd[-5:]) / 5 < 0.8 * sum(kd[:5]) / 5, kd  # soft CE on the sampled weights goes down
    final = [r["eval"] for r in rows if "eval" in r][-1]
    assert math.isfinite(final["kl"]) and final["positions"] > 0


@pytest.mark.parametrize(
    ("options", "flag"),
    [
        ({"loss": "reverse_kl"}, "`--loss reverse_kl`"),
        ({"loss": "jsd", "beta": 0.5}, "`--loss jsd`"),
        ({"temperature": 2.0}, "`--temperature 2.0`"),
        ({"top_k_used": 4}, "`--top-k-used 4`"),
    ],
)
def test_a_sampled_cache_refuses_other_options_before_training_starts(
    sampled_cache: Path, tmp_path: Path, options: dict[str, object], flag: str
) -> None:
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="holds sampled targets \\(targets mode 'sampled'\\)") as e:
        loop.train(_cfg(sampled_cache, run, **options))
    assert flag in str(e.value) and str(sampled_cache) in str(e.value)
    assert not run.exists()  # refused before anything was built or written


def test_a_v1_cache_still_trains() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    reader = CacheReader(V1_CACHE)
    assert reader.targets.mode == "topk"
    batch = next(iter(CacheStream(str(V1_CACHE), seed=0, batch_count=8)))
    # the teacher side is the v1 reader's arrays (decoded by the v1 code, kept in the npz) as weights
    old = np.load(V1_CACHE.parent / "v1_cache_expected.npz")
    ids, probs = [], []
    for sid in batch["sequence_id"].tolist():
        i = int(np.flatnonzero(old["sequence_id"] == sid)[0])
        p0, p1 = old["position_offsets"][i : i + 2]
        t = p0 + np.flatnonzero(old["loss_mask"][old["token_offsets"][i] + 1 : old["token_offsets"][i + 1]])
        assert p1 - p0 == old["token_offsets"][i + 1] - old["token_offsets"][i] - 1
        ids.append(old["topk_ids"][t])
        probs.append(np.exp(old["topk_logprobs"][t]))
    assert batch["target_ids"].tolist() == np.concatenate(ids).tolist()
    torch.testing.assert_close(batch["target_probs"], torch.from_numpy(np.concatenate(probs)))
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=reader.vocab_size, **PRESETS["tiny-llama"])
    dm = DistillModel(AutoModelForCausalLM.from_config(cfg), reader.vocab_size, KDSettings(alpha=0.5))
    opt = torch.optim.AdamW(dm.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        parts = dm(batch)
        parts.total.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(parts.total.detach()))
    assert losses[-1] < 0.7 * losses[0], losses
