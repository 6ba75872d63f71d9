"""CUDA paths (bf16 autocast, pinned memory): skipped on CPU machines and in CI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from logitcache.train.config import TrainConfig
from logitcache.train.loop import train

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16 autocast, pinned-memory path)")
def test_bf16_autocast_run_on_gpu(synth_cache: Path, tmp_path: Path) -> None:
    last = train(
        TrainConfig(
            cache=str(synth_cache),
            student="tiny-llama",
            output=str(tmp_path / "run"),
            steps=5,
            eval_fraction=0.2,
            progress=False,
            save_every=0,
        )
    )
    assert torch.isfinite(torch.tensor(last["loss"]))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["dtype"] == "auto"
