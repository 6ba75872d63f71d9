"""Format version 2: every target mode round trips, v1 caches still read, and what verify and the reader refuse."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from logitcache.storage import (
    FORMAT_VERSION,
    CachedSequence,
    CacheFormatError,
    CacheReader,
    ShardWriter,
    TargetSpec,
    parse_codec,
    verify_cache,
    write_cache,
)
from logitcache.storage.verify import head_mass_tolerance

from .conftest import MODE_SPECS as SPECS
from .conftest import make_adaptive_sequence, make_mode_sequence, make_sampled_sequence, make_sequence, mode_header

DATA = Path(__file__).parent.parent / "data"
FORMAT_MD = Path(__file__).parent.parent.parent / "storage" / "FORMAT.md"
VOCAB = 200


def _write(path: Path, spec: TargetSpec, n: int = 24, codec: str = "lpq16:fine=1/512x4,coarse=1/32") -> list[Any]:
    rng = np.random.default_rng(5)
    seqs = [make_mode_sequence(rng, i << 16, int(rng.integers(2, 30)), VOCAB, spec) for i in range(n)]
    write_cache(path, mode_header(VOCAB, spec, codec), seqs, row_group_bytes=6_000, shard_size_bytes=20_000)
    return seqs


# ------------------------------------------------------------------------------------------------ version 1


def test_v1_cache_reads_back_as_the_v1_reader_decoded_it() -> None:
    r = CacheReader(DATA / "v1_cache")
    expected = np.load(DATA / "v1_cache_expected.npz")
    assert r.format_version == 1 and r.targets == TargetSpec(mode="topk", top_k=4)
    (group,) = list(r.iter_row_groups())
    renamed = {"topk_ids": "entry_ids", "topk_logprobs": "entry_logprobs", "target_logprobs": "next_token_logprobs"}
    for old_name in expected.files:
        np.testing.assert_array_equal(getattr(group, renamed.get(old_name, old_name)), expected[old_name], old_name)
    assert group.sample_counts is None and group.num_samples == 0
    view = group.sparse_targets()
    np.testing.assert_array_equal(view.tail_mass, expected["tail_mass"])


def test_verify_reads_the_v1_cache() -> None:
    """verify checks a v1 cache with the same invariants (the v1 verify accepted this fixture too)."""
    report = verify_cache(str(DATA / "v1_cache"))
    assert report.num_sequences == 6 and report.num_positions == 37 and not report.cache_problems
    assert list(report.shard_problems.values()) == [[]]


# ------------------------------------------------------------------------------------------------ version 2


@pytest.mark.parametrize("name", SPECS)
def test_round_trip_every_mode(tmp_path: Path, name: str) -> None:
    spec = SPECS[name]
    seqs = _write(tmp_path / "c", spec)
    r = CacheReader(tmp_path / "c")
    assert r.format_version == FORMAT_VERSION == 2 and r.targets == spec and r.top_k == spec.max_entries
    got = list(r.iter_sequences())
    assert [g.sequence_id for g in got] == [s.sequence_id for s in seqs]
    bound = np.array([parse_codec(r.manifest["capture"]["codec"]).max_abs_error(j) for j in range(r.top_k)])
    for g, s in zip(got, seqs):
        np.testing.assert_array_equal(g.entry_ids, s.entry_ids)
        real = s.entry_ids >= 0
        assert np.all(np.isneginf(g.entry_logprobs[~real]))
        err = np.abs(g.entry_logprobs[real] - s.entry_logprobs[real])
        assert np.all(err <= np.broadcast_to(bound, real.shape)[real] + 1e-5)
        np.testing.assert_array_equal(g.tail_mass, s.tail_mass)
        np.testing.assert_array_equal(g.next_token_logprobs, s.next_token_logprobs)
        if spec.mode == "sampled":
            np.testing.assert_array_equal(g.sample_counts, s.sample_counts)
            assert g.num_samples == spec.samples
        else:
            assert g.sample_counts is None
    shard = pq.read_table(tmp_path / "c" / r.shards[0]["path"])
    assert ("sample_counts" in shard.column_names) == (spec.mode == "sampled")
    counts = shard["entry_counts"].combine_chunks().values.to_numpy()
    assert counts.sum() == len(shard["entry_ids"].combine_chunks().values)  # ragged: no padding on disk
    if spec.mode != "topk":
        assert len(np.unique(counts)) > 1, "the synthetic data must exercise variable entry counts"
    report = verify_cache(str(tmp_path / "c"))
    assert report.ok, report.shard_problems


@pytest.mark.parametrize("name", SPECS)
def test_sparse_view_sums_to_one(tmp_path: Path, name: str) -> None:
    spec = SPECS[name]
    _write(tmp_path / "c", spec)
    r = CacheReader(tmp_path / "c")
    for group in r.iter_row_groups():
        view = group.sparse_targets()
        total = view.target_probs.astype(np.float64).sum(axis=1) + view.tail_mass
        probs = np.where(group.entry_ids >= 0, np.exp(group.entry_logprobs.astype(np.float64)), 0.0)
        assert np.all(np.abs(total - 1) <= head_mass_tolerance(r.codec, probs))
        assert np.all(view.target_ids == group.entry_ids) and np.all(view.target_probs[group.entry_ids < 0] == 0)
        if spec.mode == "sampled":
            assert np.all(view.tail_mass == 0)
            drawn = group.sample_counts > 0
            np.testing.assert_allclose(
                view.target_probs[drawn],
                np.broadcast_to(group.tail_mass[:, None], drawn.shape)[drawn]
                * group.sample_counts[drawn]
                / spec.samples,
                rtol=1e-6,
            )
        else:
            np.testing.assert_array_equal(view.tail_mass, group.tail_mass)


def test_writer_refuses_what_v2_cannot_store(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    spec = SPECS["adaptive"]
    w = ShardWriter(tmp_path, top_k=spec.max_entries, vocab_size=VOCAB, targets=spec)
    holey = make_adaptive_sequence(rng, 42, 10, VOCAB, 16, 0.9)
    holey.entry_ids[0] = np.roll(holey.entry_ids[0], 1)  # padding first
    holey.entry_logprobs[0] = np.roll(holey.entry_logprobs[0], 1)
    with pytest.raises(
        ValueError, match=r"sequence 42: .*padding \(id -1\) is not trailing at 1 position\(s\), first 0"
    ):
        w.write(holey)
    counted = make_adaptive_sequence(rng, 43, 10, VOCAB, 16, 0.9)
    counted.sample_counts = np.zeros(counted.entry_ids.shape, np.uint16)
    with pytest.raises(ValueError, match="sequence 43: sample_counts given, but the target mode is 'adaptive'"):
        w.write(counted)
    sampled = SPECS["sampled"]
    ws = ShardWriter(tmp_path, top_k=sampled.max_entries, vocab_size=VOCAB, targets=sampled, prefix="r001")
    uncounted = make_sampled_sequence(rng, 44, 10, VOCAB, 2, 12)
    uncounted.sample_counts = None
    with pytest.raises(ValueError, match=r"sequence 44: sample_counts missing"):
        ws.write(uncounted)
    short = make_sampled_sequence(rng, 45, 10, VOCAB, 2, 12)
    assert short.sample_counts is not None
    short.sample_counts[3, 2] += 1
    with pytest.raises(
        ValueError, match=r"sequence 45: sample counts do not sum to samples=12 at 1 position\(s\), first 3"
    ):
        ws.write(short)
    with pytest.raises(ValueError, match="top_k=8 but the target mode"):
        ShardWriter(tmp_path, top_k=8, targets=sampled)


def test_headers_without_targets_are_topk(tmp_path: Path) -> None:
    """Callers that predate capture.targets keep working: their caches are topk, written as version 2."""
    from .conftest import write_cache as write_plain

    rng = np.random.default_rng(0)
    manifest = write_plain(tmp_path / "c", [make_sequence(rng, 0, 6, 50, 4)], 50, 4)
    assert manifest["format_version"] == 2 and manifest["capture"]["targets"] == {"mode": "topk", "top_k": 4}
    meta = pq.ParquetFile(next((tmp_path / "c" / "shards").glob("*.parquet"))).metadata.metadata
    assert meta[b"logitcache.format_version"] == b"2"


# ------------------------------------------------------------------------------------------------ refusals


def test_header_targets_must_be_valid_and_match_top_k(tmp_path: Path) -> None:
    from logitcache.storage import open_capture

    bad = mode_header(VOCAB, SPECS["sampled"])
    bad["capture"]["top_k"] = 8
    with pytest.raises(CacheFormatError, match="capture.top_k is 8, but capture.targets allows 14 entries"):
        open_capture(tmp_path / "a", bad)
    unseeded = mode_header(VOCAB, SPECS["sampled"])
    del unseeded["capture"]["targets"]["seed"]
    with pytest.raises(CacheFormatError, match="capture.targets lacks seed"):
        open_capture(tmp_path / "b", unseeded)
    unknown = mode_header(VOCAB, SPECS["topk"])
    unknown["capture"]["targets"]["mode"] = "beam"
    with pytest.raises(CacheFormatError, match="--targets must be one of topk, adaptive, sampled"):
        open_capture(tmp_path / "c", unknown)


def _rewrite_shard(shard: Path, column: str, change: Any, metadata: dict[bytes, bytes] | None = None) -> None:
    """Rewrites one shard with pyarrow: `change(values)` edits the flat values of list column `column` in place."""
    table = pq.read_table(shard)
    arr = table[column].combine_chunks()
    values = arr.values.to_numpy(zero_copy_only=False).copy()
    change(values)
    new = pa.ListArray.from_arrays(arr.offsets, pa.array(values, arr.type.value_type))
    table = table.set_column(table.schema.get_field_index(column), table.schema.field(column), new)
    if metadata is not None:
        table = table.replace_schema_metadata({**table.schema.metadata, **metadata})
    pq.write_table(table, shard)


def test_shard_of_version_3_is_refused(tmp_path: Path) -> None:
    _write(tmp_path / "c", SPECS["topk"])
    r = CacheReader(tmp_path / "c")
    shard = tmp_path / "c" / r.shards[0]["path"]
    _rewrite_shard(shard, "tail_mass", lambda v: None, {b"logitcache.format_version": b"3"})
    with pytest.raises(CacheFormatError, match=rf"{shard.name}: the shard says logitcache.format_version '3'.*upgrade"):
        list(CacheReader(tmp_path / "c").iter_row_groups())
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    (tmp_path / "c" / "manifest.json").write_text(json.dumps({**m, "format_version": 3}))
    with pytest.raises(
        CacheFormatError,
        match=r"manifest.json: format_version 3 is not supported \(this logitcache reads versions 1, 2\)",
    ):
        CacheReader(tmp_path / "c")


def _first_group_problems(path: Path) -> list[str]:
    return [p for ps in verify_cache(str(path)).shard_problems.values() for p in ps]


def _corrupt(v: np.ndarray, i: int, j: int) -> None:
    v[i], v[j] = v[j], v[i]


@pytest.mark.parametrize(
    ("spec_name", "column", "change", "expected"),
    [
        (
            "adaptive",
            "entry_counts",
            lambda v: v.__setitem__(0, v[0] + 1),
            "entry_ids does not hold entry_counts entries per sequence",
        ),
        ("adaptive", "entry_counts", lambda v: v.__setitem__(0, 17), "an entry count of 17 exceeds capture.top_k=16"),
        ("topk", "entry_logprobs", lambda v: _corrupt(v, 0, 1), "entry log-probs are not sorted in descending order"),
        ("topk", "entry_ids", lambda v: v.__setitem__(3, VOCAB), f"entry_ids outside [-1, {VOCAB})"),
        ("topk", "entry_ids", lambda v: v.__setitem__(1, v[0]), "an entry id repeats within a position"),
        (
            "sampled",
            "sample_counts",
            lambda v: v.__setitem__(np.flatnonzero(v)[1], 0),
            "exact entry (count 0) comes after",
        ),
        ("sampled", "sample_counts", lambda v: v.__setitem__(np.argmax(v), v.max() + 1), "do not sum to samples=12"),
        ("adaptive", "tail_mass", lambda v: v.__setitem__(0, v[0] + 0.2), "head mass + tail mass != 1"),
    ],
)
def test_verify_reports_a_damaged_v2_shard(
    tmp_path: Path, spec_name: str, column: str, change: Any, expected: str
) -> None:
    """A shard rewritten with pyarrow (valid Parquet, wrong content) is reported, problem named."""
    _write(tmp_path / "c", SPECS[spec_name], codec="f32")
    assert verify_cache(str(tmp_path / "c")).ok
    r = CacheReader(tmp_path / "c")
    _rewrite_shard(tmp_path / "c" / r.shards[0]["path"], column, change)
    problems = _first_group_problems(tmp_path / "c")
    assert any(expected in p for p in problems), problems


# ------------------------------------------------------------------------------------------------ by hand


def _doc_block(language: str, after: str) -> str:
    text = FORMAT_MD.read_text()
    return re.findall(rf"```{language}\n(.*?)```", text[text.index(after) :], re.S)[0]


@pytest.mark.parametrize("name", ["adaptive", "sampled"])
def test_format_md_decode_by_hand_matches_the_reader(tmp_path: Path, name: str) -> None:
    spec = SPECS[name]
    _write(tmp_path / "c", spec)
    code = _doc_block("python", "## Decoding a shard by hand").replace('"CACHE/', f'"{tmp_path / "c"}/')
    ns: dict[str, Any] = {}
    exec(compile(code, "FORMAT.md", "exec"), ns)
    seq: CachedSequence = next(CacheReader(tmp_path / "c").iter_sequences())
    np.testing.assert_array_equal(ns["ids"], seq.input_ids)
    np.testing.assert_array_equal(ns["entry_ids"], seq.entry_ids)
    np.testing.assert_allclose(ns["logp"], seq.entry_logprobs, rtol=1e-6)
    np.testing.assert_allclose(ns["probs"], seq.sparse_targets().target_probs, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ns["view_tail"], seq.sparse_targets().tail_mass, atol=1e-7)


def test_format_md_duckdb_queries_run(tmp_path: Path) -> None:
    import duckdb

    _write(tmp_path / "c", SPECS["adaptive"])
    sql = _doc_block("sql", "With DuckDB").replace("CACHE/", f"{tmp_path / 'c'}/")
    code = "\n".join(ln for ln in sql.splitlines() if not ln.startswith("--"))
    statements = [part.strip() for part in code.split(";") if part.strip()]
    con = duckdb.connect()
    (mean_entries,) = con.execute(statements[0]).fetchone()
    rows = {sid: ids for sid, ids, _ in con.execute(statements[1]).fetchall()}
    r = CacheReader(tmp_path / "c")
    groups = list(r.iter_row_groups())
    assert mean_entries == pytest.approx(np.mean(np.concatenate([(g.entry_ids >= 0).sum(1) for g in groups])))
    for g in groups:
        for i in range(len(g)):
            s = g.sequence(i)
            assert rows[s.sequence_id] == [int(x) for x in s.entry_ids[0] if x >= 0]


def test_inspect_shows_the_target_mode(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from logitcache.storage.cli import main

    _write(tmp_path / "c", SPECS["sampled"])
    out = CliRunner().invoke(main, ["inspect", str(tmp_path / "c")])
    assert out.exit_code == 0, out.output
    assert re.search(r"targets +sampled +exact_top=2 samples=12 seed=7 +\d+\.\d\d entries/position", out.output)
    assert "draws=" in out.output and "weight=" in out.output
    doc = json.loads(CliRunner().invoke(main, ["inspect", "--json", str(tmp_path / "c")]).output)
    assert doc["targets"] == SPECS["sampled"].to_header() and 2 < doc["mean_entries_per_position_first_row_group"] <= 14
