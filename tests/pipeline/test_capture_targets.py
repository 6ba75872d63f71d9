"""Captures in every target mode on the HF backend: `verify` accepts them, they read back as the backend produced
them, and a sampled capture killed with SIGKILL then resumed equals an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from logitcache.pipeline.backends.hf import HFBackend
from logitcache.pipeline.capture import run_capture
from logitcache.pipeline.config import CaptureConfig
from logitcache.pipeline.data import TokenWindow
from logitcache.storage import CachedSequence, CacheReader
from logitcache.storage.verify import verify_cache

from .test_capture import assert_same_content, capture_command, kill_then_resume

BASE = {"backend": "hf", "max_seq_len": 32, "batch_size": 1, "progress": False}
MODES = {
    "topk": {"targets": "topk", "top_k": 8},
    "adaptive": {"targets": "adaptive", "top_k": 16, "top_p": 0.025},  # the tiny teacher is nearly uniform
    "sampled": {"targets": "sampled", "exact_top": 2, "samples": 12, "seed": 7},
    "sampled_r0": {"targets": "sampled", "samples": 5, "seed": 1},
}


class _Recording:
    """An HF backend that keeps what it produced, to compare with what the cache reads back."""

    def __init__(self, backend: HFBackend) -> None:
        self.inner, self.name, self.targets, self.top_k = backend, backend.name, backend.targets, backend.top_k
        self.produced: dict[int, CachedSequence] = {}

    def capture(self, windows: list[TokenWindow]) -> list[CachedSequence]:
        out = self.inner.capture(windows)
        self.produced.update({s.sequence_id: s for s in out})
        return out

    def close(self) -> None:
        self.inner.close()


def _config(demo: Path, out: Path, **settings: Any) -> CaptureConfig:
    teacher, dataset = demo / "teacher", demo / "data" / "train.jsonl"
    return CaptureConfig(teacher=str(teacher), dataset=str(dataset), output=str(out), **settings)


@pytest.mark.parametrize("mode", list(MODES))
def test_each_mode_captures_a_cache_that_verifies_and_reads_back(
    tiny_demo_dir: Path, tmp_path: Path, mode: str
) -> None:
    cfg = _config(tiny_demo_dir, tmp_path / "cache", **BASE, **MODES[mode], limit=6, overflow="truncate")
    spec = cfg.target_spec
    backend = _Recording(HFBackend(cfg.teacher, dtype="float32", targets=spec))
    assert run_capture(cfg, backend=backend).status == "finished"  # type: ignore[arg-type]
    report = verify_cache(cfg.output)
    assert report.ok, (report.cache_problems, report.shard_problems)
    reader = CacheReader(cfg.output)
    assert reader.manifest["capture"]["targets"] == spec.to_header()
    assert reader.manifest["capture"]["top_k"] == spec.max_entries
    stored = {s.sequence_id: s for s in reader.iter_sequences()}
    assert sorted(stored) == sorted(backend.produced)
    for sid, want in backend.produced.items():
        got = stored[sid]
        for name in ("input_ids", "loss_mask", "entry_ids", "next_token_logprobs", "tail_mass"):
            assert np.array_equal(getattr(got, name), getattr(want, name)), (sid, name)
        assert got.num_samples == spec.num_samples
        if spec.mode == "sampled":
            assert got.sample_counts is not None and np.array_equal(got.sample_counts, want.sample_counts)
        else:
            assert got.sample_counts is None
        # entry log-probs through the codec: within its per-rank error, padding stays -inf
        pad = want.entry_ids < 0
        assert np.isneginf(got.entry_logprobs[pad]).all()
        err = np.array([reader.codec.max_abs_error(r) for r in range(spec.max_entries)])
        diff = np.abs(np.where(pad, 0.0, got.entry_logprobs) - np.where(pad, 0.0, want.entry_logprobs))
        assert (diff <= err[None, :] + 1e-6).all(), (sid, float(diff.max()))
        view = got.sparse_targets()
        np.testing.assert_allclose(view.target_probs.astype(np.float64).sum(1) + view.tail_mass, 1.0, atol=2e-2)
    entries = np.concatenate([(s.entry_ids >= 0).sum(1) for s in stored.values()])
    if spec.mode == "adaptive":
        assert entries.min() < entries.max() <= spec.top_k, np.bincount(entries)  # ragged: positions differ
    if spec.mode == "sampled":
        assert (entries > spec.exact_top).all() and entries.max() <= spec.max_entries


def test_sampled_capture_killed_then_resumed_equals_uninterrupted(tiny_demo_dir: Path, tmp_path: Path) -> None:
    # Small shards so a killed run leaves some complete ones; batch 1 keeps every sequence's log-probs bit-identical
    # across runs, the seeded draws do the rest.
    settings = {**BASE, **MODES["sampled"], "shard_size_bytes": 16_000, "limit": 16}
    reference = tmp_path / "reference"
    assert run_capture(_config(tiny_demo_dir, reference, **settings)).status == "finished"
    out = tmp_path / "cache"
    flags = {k: v for k, v in settings.items() if k != "progress"}
    cmd = capture_command(tiny_demo_dir / "teacher", tiny_demo_dir / "data" / "train.jsonl", out, flags)
    kill_then_resume(cmd, out)
    assert_same_content(out, reference)
    assert verify_cache(str(out)).ok
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["replicas"][0]["resumed_sequences"] > 0  # the last run really resumed
    assert manifest["capture"]["targets"] == json.loads((reference / "manifest.json").read_text())["capture"]["targets"]
