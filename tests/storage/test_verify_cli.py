"""`logitcache verify` / `inspect` / `finalize` through the real CLI, and what they catch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from click.testing import CliRunner

from logitcache.storage import CachedSequence, verify_cache
from logitcache.storage.cli import main


def test_verify_good_cache(small_cache: tuple[Path, list[CachedSequence]]) -> None:
    path, seqs = small_cache
    report = verify_cache(str(path))
    assert report.ok and report.num_sequences == len(seqs)
    result = CliRunner().invoke(main, ["verify", str(path)])
    assert result.exit_code == 0 and "all good" in result.output


def test_verify_names_the_bad_shard(small_cache: tuple[Path, list[CachedSequence]]) -> None:
    path, _ = small_cache
    manifest = json.loads((path / "manifest.json").read_text())
    shard = path / manifest["shards"][1]["path"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["verify", str(path)])
    assert result.exit_code == 1
    bad_lines = [line for line in result.output.splitlines() if line.startswith("BAD")]
    assert len(bad_lines) == 1 and shard.name in bad_lines[0] and "sha256" in bad_lines[0]


def test_verify_catches_mass_that_does_not_add_up(tmp_path: Path) -> None:
    """A cache whose tail mass was dropped (head renormalised) is not a proper distribution: verify says so."""
    from .conftest import make_sequence, write_cache

    rng = np.random.default_rng(0)
    seqs = [make_sequence(rng, i, 12, 300, 8) for i in range(5)]
    for s in seqs:
        s.tail_mass = np.zeros_like(s.tail_mass)  # wrong: the true tail is substantial with k=8 of 300
    write_cache(tmp_path / "c", seqs, 300, 8)
    report = verify_cache(str(tmp_path / "c"))
    assert not report.ok
    (problems,) = [p for p in report.shard_problems.values() if p]
    assert any("head mass + tail mass != 1" in p for p in problems)


def test_verify_catches_ids_out_of_vocab(tmp_path: Path) -> None:
    from .conftest import make_sequence, write_cache

    rng = np.random.default_rng(0)
    write_cache(tmp_path / "c", [make_sequence(rng, 0, 12, 300, 8)], 300, 8)
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    m["tokenizer"]["padded_vocab_size"] = 100  # as if the cache were read against a smaller vocabulary
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(m))
    report = verify_cache(str(tmp_path / "c"))
    assert any("outside" in p for ps in report.shard_problems.values() for p in ps)


def test_inspect_summary(small_cache: tuple[Path, list[CachedSequence]]) -> None:
    path, seqs = small_cache
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "k=8" in result.output and f"sequences    {len(seqs):,}" in result.output and "B/token" in result.output
    assert "#0" in result.output and "tail" in result.output
    js = CliRunner().invoke(main, ["inspect", "--json", str(path)])
    doc = json.loads(js.output)
    assert doc["totals"]["num_sequences"] == len(seqs)
    assert 0 < doc["mean_head_mass_first_row_group"] <= 1


def test_cli_errors_are_messages_not_tracebacks(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code != 0 and "is not a logitcache cache" in result.output
    result = CliRunner().invoke(main, ["finalize", str(tmp_path)])
    assert result.exit_code != 0 and "nothing to finalize" in result.output


def test_storage_and_cli_help_import_no_ml_stack() -> None:
    """`import logitcache.storage`, `logitcache --help` and `inspect --help` must not load torch/vllm/transformers."""
    code = (
        "import sys\n"
        "import logitcache.storage\n"
        "from logitcache.storage.cli import main\n"
        "for args in (['--help'], ['inspect', '--help'], ['verify', '--help']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = sorted(m for m in ('torch', 'vllm', 'transformers', 'datasets') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out, out


def test_duckdb_reads_shard_columns(small_cache: tuple[Path, list[CachedSequence]]) -> None:
    import duckdb

    path, seqs = small_cache
    glob = str(path / "shards" / "*.parquet")
    n, tokens = duckdb.connect().execute(f"SELECT count(*), sum(len(input_ids)) FROM read_parquet('{glob}')").fetchone()
    assert n == len(seqs) and tokens == sum(s.num_tokens for s in seqs)
    first = (
        duckdb.connect()
        .execute(f"SELECT entry_ids[1], tail_mass[1] FROM read_parquet('{glob}') WHERE sequence_id = 0")
        .fetchone()
    )
    assert first[0] == seqs[0].entry_ids[0, 0] and abs(first[1] - seqs[0].tail_mass[0]) < 1e-7
    assert (
        pq.ParquetFile(sorted((path / "shards").glob("*.parquet"))[0]).metadata.row_group(0).column(0).compression
        == "ZSTD"
    )
