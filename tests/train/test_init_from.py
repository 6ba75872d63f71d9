"""`train-student --init-from`: a round of on-policy distillation continues the previous run on a new cache: weights,
optimizer moments and the learning-rate schedule carry over, steps are numbered on, a killed round resumes, and
settings that would break the continuation are refused by flag."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from logitcache.train import loop
from logitcache.train.checkpoint import latest_checkpoint, load_trainer_state
from logitcache.train.config import ConfigError, TrainConfig

from .conftest import write_synthetic_cache


def _cfg(cache: Path, out: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "student": "tiny-llama",
        "steps": 2,
        "eval_fraction": 0.0,
        "progress": False,
        "num_workers": 0,
        "save_every": 1,
        "batch_size": "4",
        "schedule_steps": 6,
        "warmup": 2,
        "keep_checkpoints": 10,
    }
    base.update(kw)
    return TrainConfig(cache=str(cache), output=str(out), **base)


def _metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def round_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another cache of the same tokenizer: the next round's data."""
    return write_synthetic_cache(tmp_path_factory.mktemp("round2") / "cache", seed=5)


def test_rounds_continue_one_schedule_and_the_optimizer(
    synth_cache: Path, round_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second, straight = tmp_path / "r1", tmp_path / "r2", tmp_path / "straight"
    loop.train(_cfg(synth_cache, first))
    last = loop.train(_cfg(round_cache, second, student="", init_from=str(first), schedule_steps=None))
    assert last["step"] == 4
    loop.train(_cfg(synth_cache, straight, steps=4))
    # The schedule of the rounds is the schedule of one 4-step run (the same warmup and cosine over 6 steps).
    lrs = [m["lr"] for m in _metrics(first) + _metrics(second)]
    assert [m["step"] for m in _metrics(second)] == [3, 4]
    assert lrs == pytest.approx([m["lr"] for m in _metrics(straight)], rel=1e-12)
    # Adam's moments went on: step 3's optimizer had taken 3 steps, not 1; tokens are counted on.
    state = load_trainer_state(second / "checkpoints" / "step-3")
    assert all(int(s["step"]) == 3 for s in state["optimizer"]["state"].values())
    assert state["tokens_seen"] > load_trainer_state(first / "checkpoints" / "step-2")["tokens_seen"]
    w1 = _weights(first / "checkpoints" / "step-2")
    resolved = json.loads((second / "config.json").read_text())["resolved"]
    assert resolved["init_from"]["step"] == 2 and resolved["init_from"]["run"] == str(first)
    assert resolved["schedule_steps"] == 6 and resolved["steps"] == 4
    assert json.loads((second / "config.json").read_text())["train"]["cache"] == str(round_cache)
    # The second round started from the first round's last weights (what build_student loaded), not a fresh init.
    loaded: dict[str, torch.Tensor] = {}
    build = loop.build_student

    def spy(*args: Any, **kwargs: Any) -> Any:
        student = build(*args, **kwargs)
        loaded.update({k: v.clone() for k, v in student.model.state_dict().items()})
        return student

    monkeypatch.setattr(loop, "build_student", spy)
    loop.train(_cfg(round_cache, tmp_path / "one", student="", init_from=str(first), steps=1, schedule_steps=None))
    assert loaded and all(torch.equal(loaded[k], w1[k]) for k in w1)


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


def test_a_killed_round_resumes_from_its_own_checkpoint(
    synth_cache: Path, round_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = tmp_path / "r1", tmp_path / "r2"
    loop.train(_cfg(synth_cache, first))
    calls = {"n": 0}

    def dies_at_the_second_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return batch

    round_two = _cfg(round_cache, second, student="", init_from=str(first), steps=3, schedule_steps=None)
    with pytest.raises(KeyboardInterrupt):
        loop.train(round_two, batch_hook=dies_at_the_second_batch)
    assert latest_checkpoint(second) == second / "checkpoints" / "step-3"
    last = loop.train(round_two.replace(resume=True))
    assert last["step"] == 5 and [m["step"] for m in _metrics(second)] == [3, 4, 5]
    assert (second / "final" / "config.json").exists()
    assert json.loads((second / "config.json").read_text())["resolved"]["init_from"]["step"] == 2


def test_refusals_name_the_flag(synth_cache: Path, round_cache: Path, tmp_path: Path) -> None:
    first = tmp_path / "r1"
    with pytest.raises(ConfigError, match=r"no complete checkpoint"):
        loop.train(_cfg(round_cache, tmp_path / "x", student="", init_from=str(first)))
    loop.train(_cfg(synth_cache, first))
    with pytest.raises(ConfigError, match=r"Can't provide both `--student tiny-llama` and `--init-from"):
        _cfg(round_cache, tmp_path / "y", init_from=str(first))
    with pytest.raises(ConfigError, match=r"`--lr 0.5` with `--init-from .*leave --lr out"):
        loop.train(_cfg(round_cache, tmp_path / "z", student="", init_from=str(first), lr=0.5, schedule_steps=None))
    with pytest.raises(ConfigError, match=r"ends at step 7, past the end of the cosine schedule \(the --init-from"):
        loop.train(_cfg(round_cache, tmp_path / "w", student="", init_from=str(first), steps=5, schedule_steps=None))
