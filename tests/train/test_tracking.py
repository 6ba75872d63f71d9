"""`--report-to`: a real tiny train-student run reported to TensorBoard (event files read back) and to wandb in
offline mode (its run file read back), each matching metrics.jsonl."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from logitcache.train import loop
from logitcache.train.config import ConfigError, TrainConfig
from logitcache.train.tracking import scalars


def _cfg(cache: Path, out: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "student": "tiny-llama",
        "steps": 4,
        "eval_fraction": 0.2,
        "eval_every": 2,
        "eval_max_sequences": 8,
        "progress": False,
        "num_workers": 0,
        "save_every": 2,
        "batch_size": "4",
    }
    return TrainConfig(cache=str(cache), output=str(out), **{**base, **kw})


def _expected(run: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl as {tracker name: {step: value}}."""
    out: dict[str, dict[int, float]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for name, value in scalars(record).items():
            out.setdefault(name, {})[record["step"]] = value
    return out


def _tensorboard(run: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _assert_same(got: dict[str, dict[int, float]], want: dict[str, dict[int, float]]) -> None:
    assert set(got) == set(want)
    for name, series in want.items():
        assert set(got[name]) == set(series), name
        for step, value in series.items():
            assert got[name][step] == pytest.approx(value, rel=1e-6, abs=1e-7), (name, step)


def test_tensorboard_gets_every_metric_of_metrics_jsonl(synth_cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    loop.train(_cfg(synth_cache, run, steps=2, report_to="tensorboard"))
    loop.train(_cfg(synth_cache, run, steps=4, report_to="tensorboard", resume=True))  # appends to the same logs
    want = _expected(run)
    assert sorted(want["train/loss"]) == [1, 2, 3, 4] and sorted(want["eval/kl"]) == [2, 4]
    _assert_same(_tensorboard(run), want)


def test_report_to_none_writes_no_tracker_files_and_unknown_values_are_refused(
    synth_cache: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    loop.train(_cfg(synth_cache, run, steps=1, eval_every=0))
    assert not (run / "tensorboard").exists() and not (run / "wandb").exists()
    with pytest.raises(ConfigError, match=r"`--report-to mlflow` is unknown; choose one of none, tensorboard, wandb"):
        _cfg(synth_cache, run, report_to="mlflow")


def _wandb_history(run_file: Path) -> list[dict[str, Any]]:
    """The history rows of a wandb run file (.wandb: the LevelDB log format, 32 KiB blocks of records with a 7-byte
    header, after a 7-byte file header; wandb 0.31 has no Python reader for it any more)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos = run_file.read_bytes(), 32768, 7
    rows, pending = [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items})
    return rows


def test_wandb_offline_run_holds_the_logged_history(
    synth_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    for var, sub in (("WANDB_DIR", "wandb"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    loop.train(_cfg(synth_cache, run, report_to="wandb"))
    run_files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, list((run / "wandb").iterdir())
    got: dict[str, dict[int, float]] = {}
    for row in _wandb_history(run_files[0]):
        for name, value in row.items():
            if not name.startswith("_"):
                got.setdefault(name, {})[row["_step"]] = value
    _assert_same(got, _expected(run))
    run_id = (run / "wandb-run-id").read_text().strip()
    assert run_files[0].name == f"run-{run_id}.wandb"


def test_a_missing_tracker_package_is_named_with_its_install_command(
    synth_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util
    import sys

    from logitcache.train.tracking import Tracker

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"`--report-to wandb` needs the wandb package: pip install wandb"):
        _cfg(synth_cache, tmp_path / "run", report_to="wandb")
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails: the tracker says what to install
    with pytest.raises(ConfigError, match=r"pip install wandb \(or pip install 'logitcache\[tracking\]'\)"):
        Tracker("wandb", tmp_path / "run", {})
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match=r"needs the tensorboard package .*pip install 'logitcache\[tracking\]'"):
        Tracker("tensorboard", tmp_path / "run", {})
