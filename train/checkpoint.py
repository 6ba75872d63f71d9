"""Run-directory checkpoints: HF weights + tokenizer, plus the optimizer, scheduler, data-stream and RNG state.

Layout: RUN_DIR/checkpoints/step-N/{config.json, model.safetensors, tokenizer files, trainer_state.pt}, written to
a temporary directory and renamed into place (a killed run never leaves a half checkpoint that looks complete);
RUN_DIR/final/ holds the last weights and tokenizer only (load it with from_pretrained).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CHECKPOINTS_DIR",
    "FINAL_DIR",
    "TRAINER_STATE",
    "save_checkpoint",
    "save_final",
    "latest_checkpoint",
    "load_trainer_state",
]

CONFIG_NAME = "config.json"  # RUN_DIR/config.json: the options and what they resolved to (train/loop.py)
CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
TRAINER_STATE = "trainer_state.pt"
_STEP_RE = re.compile(r"^step-(\d+)$")


def _save_hf(model: Any, tokenizer: Any, path: Path, weights: dict[str, Any] | None = None) -> None:
    # `weights`: a full state dict gathered from FSDP shards; None lets save_pretrained read the model itself.
    model.save_pretrained(path, safe_serialization=True, state_dict=weights)
    tokenizer.save_pretrained(path)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: Any,
    tokenizer: Any,
    state: dict[str, Any],
    keep: int,
    weights: dict[str, Any] | None = None,
) -> Path:
    """Writes checkpoints/step-{step} atomically and deletes all but the newest `keep`; returns its path."""
    root = run_dir / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _save_hf(model, tokenizer, tmp, weights)
    torch.save(state, tmp / TRAINER_STATE)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    steps = sorted(_steps(root))
    for old in steps[:-keep]:
        shutil.rmtree(root / f"step-{old}", ignore_errors=True)
    return final


def save_final(run_dir: Path, model: Any, tokenizer: Any, weights: dict[str, Any] | None = None) -> Path:
    """The trained student as a plain HF model directory: RUN_DIR/final."""
    final = run_dir / FINAL_DIR
    tmp = run_dir / f".{FINAL_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    _save_hf(model, tokenizer, tmp, weights)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def _steps(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    return [int(m.group(1)) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and (p / TRAINER_STATE).is_file()]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoints/step-N of a run, or None."""
    steps = _steps(run_dir / CHECKPOINTS_DIR)
    return run_dir / CHECKPOINTS_DIR / f"step-{max(steps)}" if steps else None


def load_trainer_state(path: Path) -> dict[str, Any]:
    """trainer_state.pt of a checkpoint (tensors and plain containers only: loaded with weights_only=True)."""
    return torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)
