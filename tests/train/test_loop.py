"""The training loop's guards: resume only on the same cache, the final weights saved before the final evaluation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from logitcache.train import loop
from logitcache.train.config import ConfigError, TrainConfig

from .conftest import write_synthetic_cache


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
