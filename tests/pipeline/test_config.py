"""CaptureConfig: every error at once with flag names; --config files; flags override the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from logitcache.pipeline.config import CaptureConfig
from logitcache.storage.options import ConfigFileError

BASE = {"teacher": "t", "dataset": "d.jsonl", "output": "out"}


def test_all_errors_reported_at_once_with_flag_names() -> None:
    with pytest.raises(ValueError) as e:
        CaptureConfig(
            **BASE,
            top_k=0,
            max_seq_len=1,
            replica=2,
            num_replicas=2,
            overflow="wrap",
            backend="hf",
            tensor_parallel_size=2,
        )
    msg = str(e.value)
    for part in (
        "--top-k must be >= 1",
        "`--max-seq-len` must be >= 2",
        "`--replica` must be in [0, --num-replicas=2)",
        "`--overflow` must be one of",
        "`--tensor-parallel-size`",
    ):
        assert part in msg, msg


def test_target_settings() -> None:
    cfg = CaptureConfig(**BASE, targets="sampled", exact_top=2, samples=24, seed=5)
    assert cfg.target_spec.to_header() == {"mode": "sampled", "exact_top": 2, "samples": 24, "seed": 5}
    assert cfg.target_spec.max_entries == 26
    assert CaptureConfig(**BASE, targets="adaptive", top_k=32, top_p=0.9).target_spec.max_entries == 32
    # a setting the mode does not use is refused (the cache header would not record it), each one named
    with pytest.raises(ValueError) as e:
        CaptureConfig(**BASE, targets="sampled", top_k=8, top_p=0.5, samples=0)
    msg = str(e.value)
    assert "`--top-k` is not used by `--targets sampled` (got 8)" in msg and "--exact-top + --samples" in msg
    assert "`--top-p` is not used by `--targets sampled`" in msg and "--samples must be in [1, 65535]" in msg
    with pytest.raises(ValueError, match="`--seed` is not used by `--targets topk`"):
        CaptureConfig(**BASE, targets="topk", seed=3)
    with pytest.raises(ValueError, match=r"`--targets` must be one of topk, adaptive, sampled \(got 'all'\)"):
        CaptureConfig(**BASE, targets="all")
    with pytest.raises(ValueError, match=r"--top-p must be in \(0, 1\], got 1.5"):
        CaptureConfig(**BASE, targets="adaptive", top_p=1.5)


def test_the_mode_a_setting_implies() -> None:
    """No --targets: sampled (the benchmark's choice), unless a setting of another mode says which one is meant."""
    bare = {k: v for k, v in BASE.items() if k not in ("targets", "top_k", "top_p")}
    assert CaptureConfig(**bare).targets == "sampled"
    assert CaptureConfig(**bare).target_spec.to_header() == {
        "mode": "sampled",
        "exact_top": 0,
        "samples": 24,
        "seed": 0,
    }
    assert CaptureConfig(**bare, top_k=16).targets == "topk"
    assert CaptureConfig(**bare, top_p=0.9).targets == "adaptive"
    assert CaptureConfig(**bare, targets="topk").target_spec.max_entries == 64


def test_missing_required_flags_are_named() -> None:
    with pytest.raises(ValueError, match=r"`--teacher` is required[\s\S]*`--output` is required"):
        CaptureConfig.from_sources(None, dataset="d.jsonl")


def test_config_file_then_flags(tmp_path: Path) -> None:
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("teacher: t\ndataset: d.jsonl\noutput: out\ntop-k: 8\nbackend: hf\nengine_args: {}\n")
    cfg = CaptureConfig.from_sources(yaml_file, top_k=None, limit=5)
    assert (cfg.top_k, cfg.limit, cfg.backend) == (8, 5, "hf")
    assert CaptureConfig.from_sources(yaml_file, top_k=4).top_k == 4  # a flag beats the file
    json_file = tmp_path / "c.json"
    json_file.write_text(json.dumps({**BASE, "max_seq_len": 128}))
    assert CaptureConfig.from_sources(json_file).max_seq_len == 128
    assert json.loads(json.dumps(cfg.to_dict()))["top_k"] == 8  # saved into the cache header as JSON


def test_unknown_setting_in_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "c.yaml"
    bad.write_text("teacher: t\ntopk: 8\n")
    with pytest.raises(ValueError, match=r"unknown capture setting\(s\) \['topk'\]"):
        CaptureConfig.from_sources(bad)
    with pytest.raises(ConfigFileError, match="no such file"):
        CaptureConfig.from_sources(tmp_path / "missing.yaml")
