"""The values of a shard's big list columns read straight from their Parquet pages (the loader's fast path).

pyarrow rebuilds a list column from its repetition and definition levels one value at a time: about 7-12 ns a value
on the benchmark machine, three quarters of the time to read a k=64 row group, most of it for `entry_ids` and
`entry_logprobs` (M values per position). Their values need no rebuilding: `entry_counts` (read by pyarrow, a few
hundred bytes) already says which entries belong to which position. So this module reads a column chunk's pages
itself, for the form `ShardWriter` writes (PARQUET_OPTIONS): data pages v2 without dictionary, zstd or no
compression, PLAIN or BYTE_STREAM_SPLIT values of a 4- or 8-byte physical type, no nulls and no empty lists. Per
page: the header (Thrift compact protocol), the CRC32 of the page, the repetition levels (run-length/bit-packed:
where each row's list starts, checked against the row offsets the caller expects) and the values, decompressed and
decoded by numpy. A chunk in any other form, or one that fails a check (a checksum mismatch, lists of other lengths
than expected), gives None: the caller reads that column with pyarrow, which raises the same errors as ever.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

__all__ = ["ColumnChunk", "read_list_values"]

_DATA_PAGE_V2 = 3
_PLAIN, _BYTE_STREAM_SPLIT = 0, 9
_DTYPES: dict[str, np.dtype[Any]] = {
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FLOAT": np.dtype("<f4"),
    "DOUBLE": np.dtype("<f8"),
}
_CODECS: dict[str, str | None] = {"ZSTD": "zstd", "UNCOMPRESSED": None}


class _Unsupported(Exception):
    """The chunk is in a form this reader does not handle, or fails a check: read it with pyarrow."""


@dataclass(frozen=True)
class ColumnChunk:
    """Where a list column's leaf chunk lies in a shard file and how it is stored (from the file's metadata)."""

    offset: int  # first byte of its first page
    size: int  # bytes of all its pages, headers included
    dtype: np.dtype[Any]  # the physical type's numpy dtype
    codec: str | None  # pyarrow codec name, None: uncompressed
    value_dtype: np.dtype[Any]  # what pyarrow reads the values as: the physical type, or uint16 stored as INT32

    @classmethod
    def of(cls, column_meta: Any, value_type: pa.DataType) -> ColumnChunk | None:
        """From a pyarrow ColumnChunkMetaData and the Arrow type of the list's values; None when the chunk is in a
        form `read_list_values` can't read."""
        dtype, codec = _DTYPES.get(column_meta.physical_type), _CODECS.get(column_meta.compression, "")
        if dtype is None or codec == "" or column_meta.dictionary_page_offset is not None:
            return None
        value = np.dtype(value_type.to_pandas_dtype()) if pa.types.is_primitive(value_type) else None
        if value is None or (value != dtype and not (dtype == np.int32 and value == np.uint16)):
            return None
        return cls(int(column_meta.data_page_offset), int(column_meta.total_compressed_size), dtype, codec, value)


class _Compact:
    """A reader of the Thrift compact protocol, enough for Parquet page headers (fields by id; the rest skipped)."""

    def __init__(self, data: memoryview, pos: int) -> None:
        self.data, self.pos = data, pos

    def byte(self) -> int:
        b = self.data[self.pos]
        self.pos += 1
        return int(b)

    def varint(self) -> int:
        out = shift = 0
        while True:
            b = self.byte()
            out |= (b & 0x7F) << shift
            if b < 0x80:
                return out
            shift += 7

    def zigzag(self) -> int:
        v = self.varint()
        return (v >> 1) ^ -(v & 1)

    def value(self, kind: int) -> Any:
        """A value of compact type `kind`: ints and bools decoded, a struct as {field id: value}, the rest skipped."""
        if kind in (1, 2):  # bool inside a struct: the value is the type
            return kind == 1
        if kind == 3:
            return self.byte()
        if kind in (4, 5, 6):
            return self.zigzag()
        if kind == 7:
            self.pos += 8
        elif kind == 8:
            size = self.varint()  # (not `self.pos += self.varint()`: that adds to the position before the length)
            self.pos += size
        elif kind in (9, 10):
            head = self.byte()
            size = head >> 4 if head >> 4 != 15 else self.varint()
            for _ in range(size):
                self.value(head & 0x0F if head & 0x0F not in (1, 2) else 3)  # list bools are one byte each
        elif kind == 11:
            size = self.varint()
            types = self.byte() if size else 0
            for _ in range(size):
                self.value(types >> 4)
                self.value(types & 0x0F)
        elif kind == 12:
            return self.struct()
        else:
            raise _Unsupported(f"Thrift type {kind}")
        return None

    def struct(self) -> dict[int, Any]:
        out: dict[int, Any] = {}
        field = 0
        while True:
            head = self.byte()
            if head == 0:
                return out
            field = field + (head >> 4) if head >> 4 else self.zigzag()
            out[field] = self.value(head & 0x0F)


def _row_starts(levels: bytes, count: int) -> np.ndarray:
    """int64 indices of the repetition levels equal to 0 (a row's first value) among the first `count` levels of a
    run-length/bit-packed hybrid stream of bit width 1 (max repetition level 1: a list column). A list row is a
    0 and then 1s, which the encoder writes as long runs of 1 and short bit-packed groups: the runs are walked in
    Python (a few dozen per page), only long bit-packed groups go through numpy."""
    starts: list[int] = []
    pieces: list[np.ndarray] = []
    pos = at = 0
    while at < count:
        header = shift = 0
        while True:
            b = levels[pos]
            pos += 1
            header |= (b & 0x7F) << shift
            if b < 0x80:
                break
            shift += 7
        if header & 1:  # bit-packed: header >> 1 groups of 8 one-bit values, least significant bit first
            nbytes = header >> 1
            n = min(8 * nbytes, count - at)
            if nbytes <= 4:
                bits = int.from_bytes(levels[pos : pos + nbytes], "little")
                starts.extend(at + i for i in range(n) if not (bits >> i) & 1)
            else:
                packed = np.frombuffer(levels, np.uint8, nbytes, pos)
                pieces.append(np.flatnonzero(np.unpackbits(packed, count=n, bitorder="little") == 0) + at)
            pos += nbytes
        else:  # run-length: header >> 1 repeats of a one-byte value
            n = min(header >> 1, count - at)
            if levels[pos] == 0:
                pieces.append(np.arange(at, at + n))
            pos += 1
        at += n
    out = np.concatenate([np.array(starts, dtype=np.int64), *pieces])
    return np.sort(out) if pieces and starts else out


def _unsplit(planes: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    """BYTE_STREAM_SPLIT's byte planes [width, n] (byte j of every value in plane j) -> n values of `dtype`, by
    shifts and ors on whole planes (a strided transpose of the bytes is ~10x slower). A 4-byte physical value read
    as uint16 (the codes) must have zero high planes."""
    width = planes.shape[0]
    if dtype.itemsize == 2:
        if width != 4 or planes[2:].any():
            raise _Unsupported("uint16 values out of range")
        return (planes[0] | (planes[1].astype(np.uint16) << 8)).view(dtype)
    if width != 4:
        raise _Unsupported(f"byte-stream-split values of {width} bytes")
    out = planes[0].astype(np.uint32)
    for j in range(1, 4):
        out |= planes[j].astype(np.uint32) << (8 * j)
    return out.view(dtype)


def _read(data: memoryview, chunk: ColumnChunk, offsets: np.ndarray) -> np.ndarray:
    values = np.empty(int(offsets[-1]), dtype=chunk.value_dtype)
    starts: list[np.ndarray] = []
    pos = filled = 0
    codec = pa.Codec(chunk.codec) if chunk.codec else None
    width = chunk.dtype.itemsize
    while pos < len(data):
        reader = _Compact(data, pos)
        header = reader.struct()
        pos = reader.pos
        size = header.get(3, -1)
        v2 = header.get(8)
        if header.get(1) != _DATA_PAGE_V2 or not isinstance(v2, dict) or size < 0 or pos + size > len(data):
            raise _Unsupported("not a data page v2")
        body = data[pos : pos + size]
        pos += size
        if 4 in header and zlib.crc32(body) != header[4] & 0xFFFFFFFF:
            raise _Unsupported("page checksum mismatch")
        n, nulls, encoding = v2.get(1, -1), v2.get(2, -1), v2.get(4, -1)
        def_len, rep_len = v2.get(5, -1), v2.get(6, -1)
        if nulls != 0 or n < 0 or def_len < 0 or rep_len < 0 or filled + n > len(values):
            raise _Unsupported("nulls, empty lists or more values than expected")
        starts.append(_row_starts(bytes(body[:rep_len]), n) + filled)
        raw: Any = body[rep_len + def_len :]
        if codec is not None and v2.get(7, True):
            raw = codec.decompress(raw, decompressed_size=header.get(2, 0) - rep_len - def_len)
        flat = np.frombuffer(raw, dtype=np.uint8, count=n * width)
        if encoding == _PLAIN:
            plain = flat.view(chunk.dtype)
            if chunk.value_dtype != chunk.dtype and (plain.min(initial=0) < 0 or plain.max(initial=0) > 0xFFFF):
                raise _Unsupported("uint16 values out of range")
            values[filled : filled + n] = plain
        elif encoding == _BYTE_STREAM_SPLIT:  # byte j of every value, then byte j+1, ...
            values[filled : filled + n] = _unsplit(flat.reshape(width, n), chunk.value_dtype)
        else:
            raise _Unsupported(f"encoding {encoding}")
        filled += n
    row_starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
    if filled != len(values) or not np.array_equal(row_starts, offsets[:-1]):
        raise _Unsupported("the list lengths do not match the expected offsets")
    return values


def read_list_values(file: pa.NativeFile, chunk: ColumnChunk, offsets: np.ndarray) -> np.ndarray | None:
    """The leaf values of a list column chunk whose rows hold `offsets[i+1] - offsets[i]` values each (int64 [B+1],
    from 0, every row non-empty); None when the chunk is not in the form this module reads or fails a check."""
    if len(offsets) < 2 or not (np.diff(offsets) > 0).all():
        return None  # an empty list is stored as a null slot: pyarrow's case
    try:
        data = memoryview(file.read_at(chunk.size, chunk.offset))
        if len(data) != chunk.size:
            return None
        return _read(data, chunk, offsets)
    except (_Unsupported, IndexError, ValueError, OSError, pa.ArrowException):
        return None
