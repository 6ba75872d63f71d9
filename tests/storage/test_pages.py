"""storage/pages.py reads the entry columns of ShardWriter's shards from their pages exactly as pyarrow does, and
gives way to pyarrow (None) for any other form of column chunk and for any chunk that fails a check."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from logitcache.storage import CacheFormatError, CacheReader, TargetSpec, write_cache
from logitcache.storage.pages import ColumnChunk, read_list_values
from logitcache.storage.records import TargetRowGroup
from logitcache.storage.writer import PARQUET_OPTIONS

from .conftest import make_mode_sequence, mode_header

ENTRY_COLUMNS = ("entry_ids", "entry_logprobs", "sample_counts")
SPECS = {
    "topk": TargetSpec(mode="topk", top_k=8),
    "adaptive": TargetSpec(mode="adaptive", top_k=16, top_p=0.9),
    "sampled": TargetSpec(mode="sampled", exact_top=2, samples=12, seed=7),
}


def _cache(path: Path, spec: TargetSpec, codec: str = "lpq16:fine=1/512x4,coarse=1/32", **writer: Any) -> Path:
    rng = np.random.default_rng(11)
    seqs = [make_mode_sequence(rng, i << 16, int(rng.integers(2, 60)), 300, spec) for i in range(40)]
    write_cache(path, mode_header(300, spec, codec), seqs, row_group_bytes=20_000, **writer)
    return path


def _chunks(reader: CacheReader) -> list[tuple[str, ColumnChunk | None, np.ndarray, np.ndarray, pa.NativeFile]]:
    """(column, chunk, offsets, pyarrow's values, file) of every entry column chunk of the cache."""
    out = []
    for shard, index, _ in reader.row_groups():
        pf = reader.parquet_file(shard)
        table = pf.read_row_group(index)
        file = pa.OSFile(reader.shard_path(shard))
        for name in ENTRY_COLUMNS:
            if name not in table.column_names:
                continue
            field = pf.schema_arrow.get_field_index(name)
            meta = pf.metadata.row_group(index).column(field)
            arr = table.column(name).combine_chunks()
            chunk = ColumnChunk.of(meta, arr.type.value_type)
            out.append((name, chunk, arr.offsets.to_numpy().astype(np.int64), arr.values.to_numpy(), file))
    return out


@pytest.mark.parametrize("codec", ["lpq16:fine=1/512x4,coarse=1/32", "f32"])
@pytest.mark.parametrize("mode", SPECS)
def test_pages_read_what_pyarrow_reads(tmp_path: Path, mode: str, codec: str) -> None:
    chunks = _chunks(CacheReader(_cache(tmp_path / "c", SPECS[mode], codec)))
    assert chunks
    fast = 0
    for name, chunk, offsets, want, file in chunks:
        assert chunk is not None, name
        got = read_list_values(file, chunk, offsets)
        if (np.diff(offsets) > 0).all():  # rows with entries: the page reader's form
            assert got is not None, name
            assert got.dtype == want.dtype, name
            np.testing.assert_array_equal(got, want, name)
            fast += 1
        else:
            assert got is None  # an empty list is a null slot: pyarrow reads it
    assert fast


def test_other_forms_are_left_to_pyarrow(tmp_path: Path) -> None:
    # half-float codes are FIXED_LEN_BYTE_ARRAY: no chunk description, pyarrow reads them
    for name, chunk, *_ in _chunks(CacheReader(_cache(tmp_path / "f16", SPECS["topk"], "f16"))):
        assert (chunk is None) == (name == "entry_logprobs"), name
    # data pages v1, and plain uncompressed values: the first left to pyarrow, the second read
    v1 = {**PARQUET_OPTIONS, "data_page_version": "1.0"}
    for name, chunk, offsets, _, file in _chunks(
        CacheReader(_cache(tmp_path / "v1", SPECS["topk"], parquet_options=v1))
    ):
        assert chunk is not None and read_list_values(file, chunk, offsets) is None, name
    plain = {**PARQUET_OPTIONS, "compression": "none", "use_byte_stream_split": False}
    plain.pop("compression_level")
    for name, chunk, offsets, want, file in _chunks(
        CacheReader(_cache(tmp_path / "pl", SPECS["topk"], parquet_options=plain))
    ):
        assert chunk is not None and chunk.codec is None, name
        np.testing.assert_array_equal(read_list_values(file, chunk, offsets), want, name)
    # other list lengths than the offsets say
    name, chunk, offsets, _, file = _chunks(CacheReader(_cache(tmp_path / "t", SPECS["topk"])))[0]
    assert chunk is not None
    shifted = offsets.copy()
    shifted[1] += 1
    assert read_list_values(file, chunk, shifted) is None


@pytest.mark.parametrize("mode", SPECS)
def test_read_targets_with_other_page_forms_equals_the_reference(tmp_path: Path, mode: str) -> None:
    for i, options in enumerate(
        [{**PARQUET_OPTIONS, "data_page_version": "1.0"}, {**PARQUET_OPTIONS, "use_byte_stream_split": False}]
    ):
        reader = CacheReader(_cache(tmp_path / str(i), SPECS[mode], parquet_options=options))
        for shard, index, _ in reader.row_groups():
            want = TargetRowGroup.from_row_group(reader.read_row_group(shard, index))
            got = reader.read_targets(shard, index)
            for field in ("input_ids", "target_ids", "target_probs", "tail_mass", "next_token_logprobs"):
                np.testing.assert_array_equal(getattr(got, field), getattr(want, field), field)


def test_a_flipped_bit_in_an_entry_page_is_an_error(tmp_path: Path) -> None:
    src = _cache(tmp_path / "c", SPECS["topk"])
    name, chunk, offsets, *_ = _chunks(CacheReader(src))[0]
    assert name == "entry_ids" and chunk is not None
    damaged = tmp_path / "damaged"
    shutil.copytree(src, damaged)
    reader = CacheReader(damaged)
    path = Path(reader.shard_path(0))
    raw = bytearray(path.read_bytes())
    raw[chunk.offset + chunk.size - 10] ^= 0x10  # inside the last page's values
    path.write_bytes(bytes(raw))
    assert read_list_values(pa.OSFile(str(path)), chunk, offsets) is None  # the checksum fails: pyarrow decides
    with pytest.raises(CacheFormatError, match="logitcache verify"):
        CacheReader(damaged).read_targets(0, 0)
