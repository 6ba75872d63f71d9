"""`logitcache export --format axolotl`: the rows axolotl's KD plugin reads, aligned the way its loss aligns them.

axolotl's contract (axolotl-ai-cloud/axolotl, src/axolotl/integrations/kd/README.md "Target alignment", its
chat_template.py `transform_logprobs` and kernels/liger.py): target row j is the teacher distribution over
input_ids[j + 1], masked by labels[j + 1]; the fused loss pairs hidden state j with target row j and with the CE label
`pad(labels, (0, 1), -100)[1:][j]`.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from logitcache.storage import CachedSequence, CacheReader, TargetSpec, write_cache
from logitcache.storage.export import AXOLOTL_LOGPROB_PAD, ExportConfig, export_axolotl, export_cmd

from .conftest import MODE_SPECS as SPECS
from .conftest import header, make_mode_sequence, make_sequence, mode_header

DATA = Path(__file__).parent.parent / "data"
VOCAB = 200
KEYS = ["input_ids", "attention_mask", "labels", "target_token_ids", "target_logprobs", "target_mask"]


def _strict_json(line: str) -> dict[str, Any]:
    """json.loads that refuses NaN/Infinity (not JSON: pyarrow's and datasets' JSON readers reject them)."""

    def refuse(name: str) -> None:
        raise ValueError(f"{name} in the export")

    row: dict[str, Any] = json.loads(line, parse_constant=refuse)
    return row


def _export(cache: Path, out: Path, **config: Any) -> tuple[list[dict[str, Any]], Any]:
    report = export_axolotl(ExportConfig(cache=str(cache), output=str(out), **config))
    return [_strict_json(line) for line in out.read_text().splitlines()], report


def _log_softmax(x: np.ndarray) -> np.ndarray:
    return x - np.logaddexp.reduce(x)


# ------------------------------------------------------------------------------------------------ the offset


def _known_sequence(sequence_id: int, ids: list[int], loss_mask: list[bool]) -> CachedSequence:
    """Position t's top entry is the token it predicts, input_ids[t+1], at log-prob -0.1; two decoys after it
    (900 + / 800 + the token, as axolotl's own alignment test), and the exact tail."""
    lps = np.log([0.6, 0.25, 0.1])
    entry_ids = np.array([[tok, (tok + 90) % VOCAB, (tok + 80) % VOCAB] for tok in ids[1:]], dtype=np.int32)
    return CachedSequence(
        sequence_id=sequence_id,
        input_ids=np.array(ids, dtype=np.int32),
        loss_mask=np.array(loss_mask),
        entry_ids=entry_ids,
        entry_logprobs=np.tile(lps, (len(ids) - 1, 1)).astype(np.float32),
        next_token_logprobs=np.full(len(ids) - 1, lps[0], dtype=np.float32),
        tail_mass=np.full(len(ids) - 1, 0.05, dtype=np.float32),
    )


def test_row_j_is_the_distribution_over_token_j_plus_1_where_axolotls_loss_reads_it(tmp_path: Path) -> None:
    """The off-by-one users hit: the cache's position t (predicts input_ids[t+1]) must be axolotl's row t, masked by
    labels[t+1], so that the loss pairs it with the hidden state that predicts input_ids[t+1]."""
    ids, mask = [10, 11, 12, 13, 14], [False, False, True, True, True]
    write_cache(tmp_path / "c", header(VOCAB, 3, "f32"), [_known_sequence(0, ids, mask)])
    (row,), report = _export(tmp_path / "c", tmp_path / "out.jsonl")
    assert sorted(row) == sorted(KEYS)
    assert row["input_ids"] == ids and row["attention_mask"] == [1] * 5 and row["labels"] == [-100, -100, 12, 13, 14]
    assert all(len(row[k]) == len(ids) for k in ("target_token_ids", "target_logprobs", "target_mask"))
    # axolotl's kernel (kernels/liger.py): ce label of position j = pad(labels, (0, 1), -100)[1:][j]
    shifted = [*row["labels"][1:], -100]
    for j in range(len(ids) - 1):
        assert row["target_token_ids"][j][0] == ids[j + 1]
        assert row["target_mask"][j] == [int(shifted[j] != -100)] * 3
        if shifted[j] != -100:  # the row the loss uses at j describes the very token the CE label at j names
            assert row["target_token_ids"][j][0] == shifted[j]
    assert row["target_token_ids"][0] == [11, 101, 91]  # position 0 predicts 11; decoys 11+90, 11+80
    assert row["target_mask"][-1] == [0, 0, 0] and row["target_logprobs"][-1] == [AXOLOTL_LOGPROB_PAD] * 3
    # renormalised over the three ids, as axolotl's producers hand them to the loss; 5% of the mass is dropped
    np.testing.assert_allclose(row["target_logprobs"][0], _log_softmax(np.log([0.6, 0.25, 0.1])), atol=1e-6)
    assert report.num_trained_positions == 3 and report.mean_tail_mass == pytest.approx(0.05, abs=1e-6)
    assert report.tail_warning is None


# ------------------------------------------------------------------------------------------------ every mode


def _write_mode(path: Path, spec: TargetSpec, n: int = 16) -> None:
    rng = np.random.default_rng(3)
    seqs = [make_mode_sequence(rng, i << 16, int(rng.integers(2, 24)), VOCAB, spec) for i in range(n)]
    write_cache(path, mode_header(VOCAB, spec), seqs, row_group_bytes=4_000, shard_size_bytes=12_000)


def _check_row(row: dict[str, Any], seq: CachedSequence, top_k: int | None, temperature: float) -> np.ndarray:
    """Row == the reader's sequence in axolotl's form; returns the mass outside the exported ids per trained position."""
    n = seq.num_tokens
    assert row["input_ids"] == seq.input_ids.tolist()
    assert row["labels"] == [int(t) if m else -100 for t, m in zip(seq.input_ids, seq.loss_mask)]
    real = seq.entry_ids >= 0
    if top_k is not None:
        real[:, top_k:] = False
    width = max(1, int(real.sum(axis=1).max()))
    lost = []
    for t in range(n - 1):
        kept = seq.entry_ids[t][real[t]]
        lps = seq.entry_logprobs[t][real[t]].astype(np.float64)
        assert len(row["target_token_ids"][t]) == width
        assert row["target_token_ids"][t] == [*kept.tolist(), *[0] * (width - len(kept))]
        valid = int(bool(seq.loss_mask[t + 1]))
        assert row["target_mask"][t] == [valid] * len(kept) + [0] * (width - len(kept))
        got = np.array(row["target_logprobs"][t])
        np.testing.assert_allclose(got[: len(kept)], _log_softmax(lps / temperature), atol=2e-6)
        assert (got[len(kept) :] == AXOLOTL_LOGPROB_PAD).all()
        if valid:
            lost.append(max(0.0, 1.0 - float(np.exp(lps).sum())))
    assert row["target_mask"][n - 1] == [0] * width
    return np.array(lost)


@pytest.mark.parametrize("name", SPECS)
def test_every_mode_exports_the_readers_entries(tmp_path: Path, name: str) -> None:
    spec = SPECS[name]
    _write_mode(tmp_path / "c", spec)
    rows, report = _export(tmp_path / "c", tmp_path / "out.jsonl")
    seqs = list(CacheReader(tmp_path / "c").iter_sequences())
    assert len(rows) == len(seqs) == report.num_sequences and report.target_mode == spec.mode
    lost = np.concatenate([_check_row(row, seq, None, 1.0) for row, seq in zip(rows, seqs)])
    assert report.num_trained_positions == lost.size
    assert report.mean_tail_mass == pytest.approx(lost.mean(), abs=1e-6)
    if spec.mode != "sampled":  # the entries are the exact head: what is lost is the cache's own tail_mass
        tails = np.concatenate([s.tail_mass[s.loss_mask[1:]] for s in seqs])
        assert report.mean_tail_mass == pytest.approx(float(tails.mean()), abs=2e-3)


def test_sampled_export_keeps_exact_logprobs_not_draw_weights(tmp_path: Path) -> None:
    """A sampled entry is exported with the teacher's log-prob; the draw counts (its unbiased weight) are dropped."""
    spec = SPECS["sampled"]
    _write_mode(tmp_path / "c", spec, n=4)
    rows, _ = _export(tmp_path / "c", tmp_path / "out.jsonl")
    seq = next(CacheReader(tmp_path / "c").iter_sequences())
    assert seq.sample_counts is not None
    t = int(np.argmax(np.any(seq.sample_counts > 0, axis=1)))  # a position with draws
    kept = seq.entry_ids[t] >= 0
    expected = _log_softmax(seq.entry_logprobs[t][kept].astype(np.float64))
    np.testing.assert_allclose(rows[0]["target_logprobs"][t][: kept.sum()], expected, atol=2e-6)
    weights = seq.sparse_targets().target_probs[t][kept]
    assert not np.allclose(np.exp(expected), weights / weights.sum(), atol=1e-3)


def test_top_k_and_temperature(tmp_path: Path) -> None:
    _write_mode(tmp_path / "c", SPECS["topk"])
    rows, cut = _export(tmp_path / "c", tmp_path / "k2.jsonl", top_k=2, temperature=2.0)
    _, full = _export(tmp_path / "c", tmp_path / "all.jsonl")
    for row, seq in zip(rows, CacheReader(tmp_path / "c").iter_sequences()):
        _check_row(row, seq, 2, 2.0)
    assert cut.mean_tail_mass > full.mean_tail_mass


# ------------------------------------------------------------------------------------------------ tail warning


def test_large_tail_warns_with_the_figure(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The summary line always reports the lost mass; above 10% it is logged as a warning naming the fix."""
    rng = np.random.default_rng(0)
    write_cache(tmp_path / "c", header(300, 2), [make_sequence(rng, i, 12, 300, 2) for i in range(4)])
    out = tmp_path / "out.jsonl"
    with caplog.at_level(logging.WARNING, logger="logitcache.storage.export"):
        result = CliRunner().invoke(export_cmd, ["--cache", str(tmp_path / "c"), "--output", str(out)])
    assert result.exit_code == 0, result.output
    lost = export_axolotl(ExportConfig(cache=str(tmp_path / "c"), output=str(out))).mean_tail_mass
    assert lost > 0.5 and f"teacher mass outside the exported ids: {lost:.2%}" in result.output
    (record,) = {r.getMessage() for r in caplog.records if r.levelno == logging.WARNING}
    assert f"{lost:.1%}" in record and str(tmp_path / "c") in record and "--top-k" in record


def test_small_tail_does_not_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(0)
    write_cache(tmp_path / "c", header(20, 20), [make_sequence(rng, i, 12, 20, 20) for i in range(4)])
    with caplog.at_level(logging.WARNING, logger="logitcache.storage.export"):
        _, report = _export(tmp_path / "c", tmp_path / "out.jsonl")
    assert report.mean_tail_mass < 1e-3 and report.tail_warning is None and not caplog.records


# ------------------------------------------------------------------------------------------------ the CLI


def test_cli_writes_one_json_line_per_sequence(tmp_path: Path) -> None:
    _write_mode(tmp_path / "c", SPECS["adaptive"])
    out = tmp_path / "sub" / "teacher.jsonl"
    args = ["--cache", str(tmp_path / "c"), "--format", "axolotl", "--output", str(out), "--top-k", "4"]
    result = CliRunner().invoke(export_cmd, args)
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert len(lines) == 16 and f"exported 16 sequences of {tmp_path / 'c'}" in result.output
    for line in lines:
        row = _strict_json(line)
        assert sorted(row) == sorted(KEYS) and max(len(r) for r in row["target_token_ids"]) <= 4
        assert all(isinstance(i, int) for r in row["target_token_ids"] for i in r)
    assert not list(out.parent.glob("*.tmp"))


def test_export_is_a_logitcache_command() -> None:
    """`logitcache export` is this command (pyproject's entry point: tests read it from the file, since a stale
    egg-info in the working tree can hide a new entry point from importlib.metadata)."""
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    commands = pyproject["project"]["entry-points"]["logitcache.commands"]
    assert commands["export"] == f"{export_cmd.callback.__module__}:export_cmd"


def test_v1_cache_exports(tmp_path: Path) -> None:
    rows, report = _export(DATA / "v1_cache", tmp_path / "out.jsonl")
    for row, seq in zip(rows, CacheReader(DATA / "v1_cache").iter_sequences()):
        _check_row(row, seq, None, 1.0)
    assert report.num_sequences == 6


def test_bad_input_names_the_cache_and_the_fix(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(export_cmd, ["--cache", str(tmp_path / "nope"), "--output", str(out)])
    assert result.exit_code != 0 and f"cannot export {tmp_path / 'nope'}" in result.output
    assert "not a logitcache cache" in result.output
    _write_mode(tmp_path / "c", SPECS["topk"], n=2)
    (tmp_path / "c" / "manifest.json").unlink()  # as a capture that has not finished
    result = CliRunner().invoke(export_cmd, ["--cache", str(tmp_path / "c"), "--output", str(out)])
    assert result.exit_code != 0 and "logitcache finalize" in result.output and not out.exists()
    result = CliRunner().invoke(export_cmd, ["--cache", str(tmp_path / "c"), "--top-k", "0", "--temperature", "0"])
    assert result.exit_code == 2
    for problem in ("--output is required", "--top-k must be >= 1", "--temperature must be > 0"):
        assert problem in result.output


def test_export_loads_as_axolotl_loads_a_tokenized_json_dataset(tmp_path: Path) -> None:
    """axolotl reads `ds_type: json` through datasets and takes it as tokenized when input_ids, attention_mask and
    labels are features (utils/data/wrappers.py `_is_dataset_already_tokenized`); the target columns ride along."""
    datasets = pytest.importorskip("datasets")
    _write_mode(tmp_path / "c", SPECS["sampled"], n=6)
    rows, _ = _export(tmp_path / "c", tmp_path / "out.jsonl")
    ds = datasets.load_dataset(
        "json", data_files=str(tmp_path / "out.jsonl"), split="train", cache_dir=str(tmp_path / "hf")
    )
    assert {"input_ids", "attention_mask", "labels"} <= set(ds.features) and len(ds) == len(rows)
    for got, row in zip(ds, rows):
        assert got["target_token_ids"] == row["target_token_ids"] and got["labels"] == row["labels"]
        np.testing.assert_allclose(np.array(got["target_logprobs"]), np.array(row["target_logprobs"]))


def test_export_module_imports_no_ml_stack() -> None:
    code = (
        "import sys, logitcache.storage.export\n"
        "print('HEAVY', sorted(m for m in ('torch', 'vllm', 'transformers', 'datasets') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out, out
