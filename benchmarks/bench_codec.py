"""Codec benchmark: bytes/token, encode/decode tokens/s per core and log-prob error of physical encodings.

Everything is measured side by side in one process, on the same synthetic teacher outputs (benchmarks/_synthetic.py:
Zipf-like unigram prior + context-dependent sparse boosts), against a naive baseline measured in the same run:
int32 ids + float16 log-probs + zstd with pyarrow's default Parquet options. Absolute speeds are noisy on a
shared machine; the ratios against that baseline are what to compare.

- encode: the whole write path: `encode_table` (numpy concatenation + log-prob codec) + `pq.ParquetWriter` into an
  in-memory buffer, one row group per ~16 MiB of raw arrays (as `ShardWriter` does).
- decode: what `CacheReader.read_row_group` does: `ParquetFile(..., page_checksum_verification=True).read_row_group`
  + `decode_table` to numpy, for every row group (plus the inverse id transform for the id-layout variants).
- bytes/token: Parquet file size / number of input tokens (per-column sizes from the footer's column chunks).
- error: |decoded - original| log-prob (nats) over all head entries: max, mean, and mean weighted by p.
- speeds: median of `--repeats` runs (repeats interleaved across variants), pyarrow pinned to 1 CPU thread and
  1 I/O thread, so tokens/s are per core.

Id ideas measured as bytes (and speed where the path exists): ids as Parquet uint16 (V <= 65536), as 2- or
3-byte FIXED_LEN_BYTE_ARRAY, with or without BYTE_STREAM_SPLIT, and a frequency-ranked id remap (ids replaced by
their rank in a global frequency table built from a separate calibration sample); plus, outside Parquet, zstd
with a dictionary trained on id streams (zstandard package) against zstd without one, per page-sized chunk, and the
order-0 entropy of the id stream as a reference point.

Usage:
    python benchmarks/bench_codec.py            # k=64, V in {32768, 128256} (< 5 min on 2 cores)
    python benchmarks/bench_codec.py --full     # k in {8, 64, 128}
    python benchmarks/bench_codec.py --quick    # tiny sizes: checks every path runs (CI, < 30 s)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import zstandard  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _synthetic  # noqa: E402

from logitcache.storage import CachedSequence  # noqa: E402
from logitcache.storage.codec import DEFAULT_CODEC, LogprobCodec, parse_codec  # noqa: E402
from logitcache.storage.reader import decode_table  # noqa: E402
from logitcache.storage.schema import arrow_schema  # noqa: E402
from logitcache.storage.writer import PARQUET_OPTIONS, encode_table  # noqa: E402

ROW_GROUP_BYTES = 16 << 20  # ShardWriter's default
BASELINE_OPTIONS: dict[str, Any] = {"compression": "zstd"}  # everything else: pyarrow's defaults
BSS_COLS = "use_byte_stream_split"
LIST_COLS = ("input_ids", "loss_mask", "entry_ids", "entry_logprobs", "next_token_logprobs", "tail_mass")


def leaf(col: str) -> str:
    """Parquet leaf path of a column: per-column options on list columns only match "<name>.list.element"."""
    return f"{col}.list.element" if col in LIST_COLS else col


@dataclass(frozen=True)
class Variant:
    name: str
    group: str  # reference | physical | ids | codec
    codec: str = DEFAULT_CODEC
    # "default" = storage's PARQUET_OPTIONS (per-column lists given as leaf paths), "baseline" = BASELINE_OPTIONS
    base: str = "default"
    overrides: tuple[tuple[str, Any], ...] = ()
    ids: str = "int32"  # int32 | uint16 | flba2 | flba3 (physical type of the entry_ids values)
    ids_bss: bool | None = None  # add/remove entry_ids from the byte-stream-split list; None: as in the options
    remap: bool = False  # frequency-ranked id remap
    max_vocab: int | None = None  # skipped when V is larger

    def options(self) -> dict[str, Any]:
        base = {"default": PARQUET_OPTIONS, "baseline": BASELINE_OPTIONS}
        opts = dict(base[self.base])
        opts.update(dict(self.overrides))
        if self.ids_bss is not None:
            cols = list(opts.get(BSS_COLS) or [])
            cols = [c for c in cols if c != leaf("entry_ids")] + ([leaf("entry_ids")] if self.ids_bss else [])
            opts[BSS_COLS] = cols or False
        return opts


def variants(vocab_size: int, top_k: int) -> list[Variant]:
    d = DEFAULT_CODEC
    out = [
        Variant("baseline: int32 + f16, zstd, pyarrow defaults", "reference", codec="f16", base="baseline"),
        Variant("default: PARQUET_OPTIONS + " + d, "reference"),
        # physical options around the (leaf-path) default
        Variant("default, zstd level 1", "physical", overrides=(("compression_level", 1),)),
        Variant("default, zstd level 9", "physical", overrides=(("compression_level", 9),)),
        Variant("default, dictionary on (all columns)", "physical", overrides=(("use_dictionary", True),)),
        Variant("default, dictionary on entry_ids", "physical", overrides=(("use_dictionary", [leaf("entry_ids")]),)),
        Variant("default, data page v1", "physical", overrides=(("data_page_version", "1.0"),)),
        Variant("default, 8 MiB data pages", "physical", overrides=(("data_page_size", 8 << 20),)),
        # id layouts
        Variant("ids int32 + BSS", "ids", ids_bss=True),
        Variant("ids uint16 (Parquet INT32/UINT_16)", "ids", ids="uint16", max_vocab=65536),
        Variant("ids uint16 + BSS", "ids", ids="uint16", ids_bss=True, max_vocab=65536),
        Variant("ids 2-byte FLBA", "ids", ids="flba2", max_vocab=65535),
        Variant("ids 2-byte FLBA + BSS", "ids", ids="flba2", ids_bss=True, max_vocab=65535),
        Variant("ids 3-byte FLBA", "ids", ids="flba3"),
        Variant("ids 3-byte FLBA + BSS", "ids", ids="flba3", ids_bss=True),
        Variant("ids freq-remap int32", "ids", remap=True),
        Variant("ids freq-remap int32 + BSS", "ids", remap=True, ids_bss=True),
        Variant("ids freq-remap 2-byte FLBA + BSS", "ids", ids="flba2", remap=True, ids_bss=True, max_vocab=65535),
        Variant("ids freq-remap 3-byte FLBA + BSS", "ids", ids="flba3", remap=True, ids_bss=True),
    ]
    # log-prob codecs (default physical options); fine=1/Cx1,coarse=1/C is the all-coarse grid ("fine ranks 0")
    for coarse in (16, 32, 64):
        for fine_ranks in (0, 4, 8):
            name = (
                f"lpq16:fine=1/{coarse}x1,coarse=1/{coarse}"
                if fine_ranks == 0
                else f"lpq16:fine=1/512x{fine_ranks},coarse=1/{coarse}"
            )
            if name != d:
                out.append(Variant(f"codec {name}", "codec", codec=name))
    out += [Variant("codec f16", "codec", codec="f16"), Variant("codec f32", "codec", codec="f32")]
    return [v for v in out if v.max_vocab is None or vocab_size <= v.max_vocab]


# ---------------------------------------------------------------------------------------------- id transforms


def _list_with(col: pa.ChunkedArray | pa.Array, fn: Callable[[pa.Array], pa.Array]) -> pa.ListArray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return pa.ListArray.from_arrays(arr.offsets, fn(arr.values))


def _ids_to_physical(values: np.ndarray, kind: str) -> pa.Array:
    if kind == "int32":
        return pa.array(values, pa.int32())
    if kind == "uint16":
        return pa.array(values.astype(np.uint16), pa.uint16())  # -1 padding would wrap to 65535 (< V never)
    width = {"flba2": 2, "flba3": 3}[kind]
    raw = np.ascontiguousarray(values.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :width])  # -1 -> all 0xFF
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(values), [None, pa.py_buffer(raw)])


def _ids_from_physical(arr: pa.Array, kind: str) -> np.ndarray:
    if kind in ("int32", "uint16"):
        return arr.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    width = {"flba2": 2, "flba3": 3}[kind]
    buf = np.frombuffer(arr.buffers()[1], dtype=np.uint8, count=(arr.offset + len(arr)) * width)
    raw = buf[arr.offset * width :].reshape(-1, width)
    out = np.zeros((len(arr), 4), dtype=np.uint8)
    out[:, :width] = raw
    ids = out.view("<i4").reshape(-1)
    ids[ids == (1 << (8 * width)) - 1] = -1
    return ids


@dataclass
class IdRemap:
    """Frequency-ranked id remap: rank_of_id[id] (0 = most frequent in the calibration sample); -1 stays -1."""

    rank_of_id: np.ndarray  # int32 [V + 1], last slot maps -1 -> -1
    id_of_rank: np.ndarray  # int32 [V + 1]

    @classmethod
    def from_sample(cls, seqs: Sequence[CachedSequence], vocab_size: int) -> IdRemap:
        counts = np.zeros(vocab_size, dtype=np.int64)
        for s in seqs:
            ids = s.entry_ids.reshape(-1)
            np.add.at(counts, ids[ids >= 0], 1)
        order = np.argsort(-counts, kind="stable").astype(np.int32)  # unseen ids keep id order after the seen
        rank = np.empty(vocab_size, dtype=np.int32)
        rank[order] = np.arange(vocab_size, dtype=np.int32)
        return cls(np.append(rank, np.int32(-1)), np.append(order, np.int32(-1)))


# ---------------------------------------------------------------------------------------------- encode / decode


@dataclass
class Prepared:
    variant: Variant
    codec: LogprobCodec
    schema: pa.Schema  # encode_table's schema (the storage schema for the codec)
    out_schema: pa.Schema  # what is written (entry_ids type may differ)
    options: dict[str, Any]
    custom_ids: bool

    @classmethod
    def of(cls, v: Variant) -> Prepared:
        schema = arrow_schema(v.codec)
        custom = v.ids != "int32" or v.remap
        out_schema = schema
        if custom:
            typ = {"int32": pa.int32(), "uint16": pa.uint16(), "flba2": pa.binary(2), "flba3": pa.binary(3)}[v.ids]
            i = schema.get_field_index("entry_ids")
            out_schema = schema.set(i, pa.field("entry_ids", pa.list_(typ), nullable=False))
        return cls(v, parse_codec(v.codec), schema, out_schema, v.options(), custom)


def encode(p: Prepared, groups: Sequence[Sequence[CachedSequence]], top_k: int, remap: IdRemap | None) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, p.out_schema, **p.options) as w:
        for g in groups:
            t = encode_table(g, p.codec, top_k, p.schema)
            if p.custom_ids:
                i = t.schema.get_field_index("entry_ids")

                def phys(values: pa.Array) -> pa.Array:
                    ids = values.to_numpy()
                    if p.variant.remap:
                        assert remap is not None
                        ids = remap.rank_of_id[ids]
                    return _ids_to_physical(ids, p.variant.ids)

                t = t.set_column(i, p.out_schema.field(i), _list_with(t.column(i), phys))
            w.write_table(t, row_group_size=len(g))
    return sink.getvalue()


def decode(p: Prepared, buf: pa.Buffer, top_k: int, remap: IdRemap | None) -> list[Any]:
    pf = pq.ParquetFile(pa.BufferReader(buf), page_checksum_verification=True)
    out = []

    def to_int32(values: pa.Array) -> pa.Array:
        return pa.array(_ids_from_physical(values, p.variant.ids), pa.int32())

    for g in range(pf.num_row_groups):
        t = pf.read_row_group(g, use_threads=False)
        if p.custom_ids and p.variant.ids.startswith("flba"):
            i = t.schema.get_field_index("entry_ids")
            t = t.set_column(i, "entry_ids", _list_with(t.column(i), to_int32))
        b = decode_table(t, p.codec, top_k, "bench")
        if p.variant.remap:
            assert remap is not None
            b.entry_ids = remap.id_of_rank[b.entry_ids]
        out.append(b)
    return out


def column_info(buf: pa.Buffer) -> tuple[dict[str, int], dict[str, str]]:
    """Compressed bytes per column, and the data encoding the writer actually used (from the footer)."""
    md = pq.ParquetFile(pa.BufferReader(buf)).metadata
    sizes: dict[str, int] = {}
    encs: dict[str, set[str]] = {}
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        for c in range(rg.num_columns):
            col = rg.column(c)
            name = col.path_in_schema.split(".")[0]
            sizes[name] = sizes.get(name, 0) + col.total_compressed_size
            encs.setdefault(name, set()).update(col.encodings)
    short = {}
    for name, e in encs.items():
        short[name] = "dict" if "RLE_DICTIONARY" in e else "BSS" if "BYTE_STREAM_SPLIT" in e else "plain"
    return sizes, short


def row_groups(seqs: Sequence[CachedSequence], row_group_bytes: int) -> list[list[CachedSequence]]:
    """Same buffering rule as ShardWriter: flush once the raw arrays reach row_group_bytes."""
    groups: list[list[CachedSequence]] = [[]]
    size = 0
    for s in seqs:
        groups[-1].append(s)
        size += sum(a.nbytes for a in (s.input_ids, s.entry_ids, s.entry_logprobs, s.next_token_logprobs, s.tail_mass))
        if size >= row_group_bytes:
            groups.append([])
            size = 0
    return [g for g in groups if g]


# ---------------------------------------------------------------------------------------------- measurement


@dataclass
class Result:
    variant: Variant
    num_tokens: int
    file_bytes: int
    cols: dict[str, int]
    encodings: dict[str, str]
    enc_s: list[float] = field(default_factory=list)
    dec_s: list[float] = field(default_factory=list)
    enc_cpu: list[float] = field(default_factory=list)  # process CPU seconds: robust to other load on the box
    dec_cpu: list[float] = field(default_factory=list)
    err_max: float = 0.0
    err_mean: float = 0.0
    err_pw: float = 0.0

    @property
    def bpt(self) -> float:
        return self.file_bytes / self.num_tokens

    def col_bpt(self, name: str) -> float:
        return self.cols.get(name, 0) / self.num_tokens

    @property
    def enc_tps(self) -> float:
        return self.num_tokens / statistics.median(self.enc_s)

    @property
    def dec_tps(self) -> float:
        return self.num_tokens / statistics.median(self.dec_s)

    @property
    def enc_cpu_tps(self) -> float:
        return self.num_tokens / statistics.median(self.enc_cpu)

    @property
    def dec_cpu_tps(self) -> float:
        return self.num_tokens / statistics.median(self.dec_cpu)


def measure_config(
    vocab_size: int, top_k: int, num_sequences: int, min_len: int, max_len: int, repeats: int, seed: int
) -> dict[str, Any]:
    t0 = time.perf_counter()
    ents: list[np.ndarray] = []
    seqs = _synthetic.generate(
        num_sequences, vocab_size=vocab_size, top_k=top_k, min_len=min_len, max_len=max_len, seed=seed, entropies=ents
    )
    calib = _synthetic.generate(
        max(2, num_sequences // 2), vocab_size=vocab_size, top_k=top_k, min_len=min_len, max_len=max_len, seed=seed + 1
    )
    gen_s = time.perf_counter() - t0
    stats = _synthetic.distribution_stats(seqs, ents)
    remap = IdRemap.from_sample(calib, vocab_size)
    groups = row_groups(seqs, ROW_GROUP_BYTES)
    num_tokens = sum(s.num_tokens for s in seqs)
    ref_lp = np.concatenate([s.entry_logprobs for s in seqs])
    ref_ids = np.concatenate([s.entry_ids for s in seqs])
    ref_p = np.exp(ref_lp.astype(np.float64))

    preps = [Prepared.of(v) for v in variants(vocab_size, top_k)]
    results: list[Result] = []
    for p in preps:  # first pass: sizes, correctness, error (not timed)
        buf = encode(p, groups, top_k, remap)
        batches = decode(p, buf, top_k, remap)
        ids = np.concatenate([b.entry_ids for b in batches])
        if not np.array_equal(ids, ref_ids):
            raise AssertionError(f"{p.variant.name}: ids do not round-trip")
        err = np.abs(np.concatenate([b.entry_logprobs for b in batches]).astype(np.float64) - ref_lp)
        results.append(
            Result(
                p.variant,
                num_tokens,
                buf.size,
                *column_info(buf),
                err_max=float(err.max()),
                err_mean=float(err.mean()),
                err_pw=float((ref_p * err).sum() / ref_p.sum()),
            )
        )
    for _ in range(repeats):  # timed passes, interleaved so that background load hits every variant alike
        for p, r in zip(preps, results):
            t, c = time.perf_counter(), time.process_time()
            buf = encode(p, groups, top_k, remap)
            r.enc_s.append(time.perf_counter() - t)
            r.enc_cpu.append(time.process_time() - c)
            t, c = time.perf_counter(), time.process_time()
            decode(p, buf, top_k, remap)
            r.dec_s.append(time.perf_counter() - t)
            r.dec_cpu.append(time.process_time() - c)
    return {
        "vocab_size": vocab_size,
        "top_k": top_k,
        "num_sequences": num_sequences,
        "num_tokens": num_tokens,
        "num_row_groups": len(groups),
        "generate_s": gen_s,
        "stats": stats,
        "results": results,
        "id_streams": id_stream_experiment(seqs, calib, remap, num_tokens, seed),
    }


def _bss(a: np.ndarray) -> bytes:
    """Parquet BYTE_STREAM_SPLIT of a fixed-width array: byte plane 0, then plane 1, ..."""
    return np.ascontiguousarray(a.view(np.uint8).reshape(-1, a.dtype.itemsize).T).tobytes()


def _varint(a: np.ndarray) -> bytes:
    """LEB128 bytes of non-negative ints < 2^21 (1 byte below 128, 2 below 16384, else 3)."""
    a = a.astype(np.uint32)
    n = np.where(a < 128, 1, np.where(a < 16384, 2, 3))
    out = np.empty((len(a), 3), dtype=np.uint8)
    out[:, 0] = (a & 127) | np.where(n > 1, 128, 0)
    out[:, 1] = ((a >> 7) & 127) | np.where(n > 2, 128, 0)
    out[:, 2] = a >> 14
    return out[np.arange(3)[None, :] < n[:, None]].tobytes()


def id_stream_experiment(
    seqs: Sequence[CachedSequence], calib: Sequence[CachedSequence], remap: IdRemap, num_tokens: int, seed: int
) -> list[dict[str, Any]]:
    """The entry_ids stream alone: zstd (level 3) per chunk, with vs without a dictionary trained on the calibration
    sample's id streams (zstandard), for several layouts; plus the order-0 entropy as a reference."""
    ids = np.concatenate([s.entry_ids.reshape(-1) for s in seqs]).astype("<i4")
    cal = np.concatenate([s.entry_ids.reshape(-1) for s in calib]).astype("<i4")
    vocab = len(remap.rank_of_id) - 1
    # counterfactual: a tokenizer whose id order is unrelated to frequency (random permutation of the ids)
    perm = np.random.default_rng(seed + 7).permutation(vocab).astype("<i4")
    layouts: dict[str, Callable[[np.ndarray], bytes]] = {
        "int32": lambda a: a.tobytes(),
        "int32 BSS": _bss,
        "freq-remap int32 BSS": lambda a: _bss(remap.rank_of_id[a].astype("<i4")),
        "freq-remap varint (LEB128)": lambda a: _varint(remap.rank_of_id[a]),
        "ids in random tokenizer order, int32": lambda a: perm[a].tobytes(),
        "ids in random tokenizer order, int32 BSS": lambda a: _bss(perm[a]),
    }
    out = []
    _, counts = np.unique(ids, return_counts=True)
    pr = counts / counts.sum()
    h_bits = float(-(pr * np.log2(pr)).sum())
    out.append(
        {
            "layout": "order-0 entropy of the ids (ideal whole-symbol coder; reference, not a codec)",
            "chunk_ids": 0,
            "plain_bpt": h_bits * len(ids) / 8 / num_tokens,
            "dict_bpt": None,
        }
    )
    plain = zstandard.ZstdCompressor(level=3)
    for chunk_ids in (1 << 18, 1 << 14):  # 1 MiB of int32 (Parquet's default page size) and 64 KiB
        for name, fn in layouts.items():
            train = [fn(cal[i : i + chunk_ids]) for i in range(0, len(cal), chunk_ids)]
            samples: list[bytes | bytearray | memoryview] = [
                c[j : j + 16384] for c in train for j in range(0, len(c), 16384)
            ]  # 16 KiB training pieces
            try:
                withd: zstandard.ZstdCompressor | None = zstandard.ZstdCompressor(
                    level=3, dict_data=zstandard.train_dictionary(112640, samples, level=3)
                )
            except zstandard.ZstdError:  # too little calibration data (--quick)
                withd = None
            chunks = [fn(ids[i : i + chunk_ids]) for i in range(0, len(ids), chunk_ids)]
            n_plain = sum(len(plain.compress(c)) for c in chunks)
            n_dict = sum(len(withd.compress(c)) for c in chunks) if withd is not None else None
            out.append(
                {
                    "layout": name,
                    "chunk_ids": chunk_ids,
                    "plain_bpt": n_plain / num_tokens,
                    "dict_bpt": None if n_dict is None else n_dict / num_tokens,
                }
            )
    return out


# ---------------------------------------------------------------------------------------------- report


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {model}; Python {platform.python_version()}, pyarrow {pa.__version__}, numpy {np.__version__}, zstandard {zstandard.__version__}"


def markdown(run: dict[str, Any]) -> str:
    res: list[Result] = run["results"]
    base = res[0]
    st = run["stats"]
    lines = [
        f"### V = {run['vocab_size']}, k = {run['top_k']}",
        "",
        f"{run['num_sequences']} sequences, {run['num_tokens']} tokens, {run['num_row_groups']} row group(s). "
        f"Synthetic teacher: entropy mean {st['entropy_mean']:.2f} nats (p10 {st['entropy_p10']:.2f}, p90 "
        f"{st['entropy_p90']:.2f}), top-1 p mean {st['top1_mean']:.2f} (p10 {st['top1_p10']:.2f}, p90 "
        f"{st['top1_p90']:.2f}), tail mass mean {st['tail_mean']:.3f}, neighbouring top-k overlap "
        f"{st['neighbour_overlap']:.2f}.",
        'Speeds: tok/s = tokens / median wall seconds (perf_counter); "vs base" = ratio to the baseline in this '
        'run (higher is faster); "(CPU)" = the same ratio from process CPU time, less sensitive to other load. '
        "Sizes and errors are exact; speed ratios within about +-15% of each other are noise on a shared machine.",
        "",
        "| variant | ids / lp encoding | B/token | ids | log-probs | rest | size vs base | enc tok/s | enc vs base "
        "| enc vs base (CPU) | dec tok/s | dec vs base | dec vs base (CPU) | max err | mean err | p-wtd err |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res:
        ids, lps = r.col_bpt("entry_ids"), r.col_bpt("entry_logprobs")
        lines.append(
            f"| {r.variant.name} | {r.encodings.get('entry_ids')} / {r.encodings.get('entry_logprobs')} | {r.bpt:.1f} | {ids:.1f} | {lps:.1f} | {r.bpt - ids - lps:.1f} "
            f"| {r.file_bytes / base.file_bytes:.3f} | {r.enc_tps / 1e3:.0f}k | {r.enc_tps / base.enc_tps:.2f} "
            f"| {r.enc_cpu_tps / base.enc_cpu_tps:.2f} | {r.dec_tps / 1e3:.0f}k | {r.dec_tps / base.dec_tps:.2f} "
            f"| {r.dec_cpu_tps / base.dec_cpu_tps:.2f} | {r.err_max:.2e} | {r.err_mean:.2e} "
            f"| {r.err_pw:.2e} |"
        )
    lines += [
        "",
        "Id stream alone, zstd level 3 per chunk, without / with a 110 KiB dictionary trained (zstandard) on a "
        "separate calibration sample's id streams (B/token, ids only):",
        "",
        "| layout | chunk | zstd | zstd + dict |",
        "|---|---:|---:|---:|",
    ]
    for e in run["id_streams"]:
        chunk = f"{e['chunk_ids'] * 4 // 1024} KiB of int32" if e["chunk_ids"] else "-"
        dct = "-" if e["dict_bpt"] is None else f"{e['dict_bpt']:.1f}"
        lines.append(f"| {e['layout']} | {chunk} | {e['plain_bpt']:.1f} | {dct} |")
    return "\n".join(lines) + "\n"


def to_json(run: dict[str, Any]) -> dict[str, Any]:
    j = {k: v for k, v in run.items() if k != "results"}
    j["results"] = [
        {
            "variant": r.variant.name,
            "group": r.variant.group,
            "codec": r.variant.codec,
            "options": {k: v for k, v in r.variant.options().items()},
            "encodings": r.encodings,
            "bytes_per_token": r.bpt,
            "column_bytes_per_token": {c: n / r.num_tokens for c, n in r.cols.items()},
            "encode_tokens_per_s": r.enc_tps,
            "decode_tokens_per_s": r.dec_tps,
            "encode_s": r.enc_s,
            "decode_s": r.dec_s,
            "encode_cpu_s": r.enc_cpu,
            "decode_cpu_s": r.dec_cpu,
            "err_max": r.err_max,
            "err_mean": r.err_mean,
            "err_p_weighted": r.err_pw,
        }
        for r in run["results"]
    ]
    return j


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat: checks every path runs (CI)")
    mode.add_argument("--full", action="store_true", help="also k=8 and k=128")
    ap.add_argument("--vocab", type=int, nargs="+", help="vocabulary sizes (default 32768 128256)")
    ap.add_argument("--top-k", type=int, nargs="+", help="k values (default 64; --full: 8 64 128)")
    ap.add_argument("--tokens", type=int, help="approximate tokens per configuration (default 60000)")
    ap.add_argument("--repeats", type=int, help="timed repeats, median reported (default 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    args = ap.parse_args(argv)

    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    vocabs = args.vocab or [32768, 128256]
    ks = args.top_k or ([8, 64, 128] if args.full else [64])
    if args.quick:
        tokens, repeats, min_len, max_len = args.tokens or 1200, args.repeats or 1, 64, 256
    else:
        tokens, repeats, min_len, max_len = args.tokens or 60_000, args.repeats or 3, 512, 2048
    num_seqs = max(2, round(tokens / ((min_len + max_len) / 2)))

    cmd = "python benchmarks/bench_codec.py" + (
        "" if argv is None and len(sys.argv) < 2 else " " + " ".join(sys.argv[1:] if argv is None else argv)
    )
    print(
        f"# Codec benchmark\n\n`{cmd}` on {machine()}; pyarrow pinned to 1 CPU + 1 I/O thread; "
        f"median of {repeats} repeat(s).\n",
        flush=True,
    )
    t_all = time.perf_counter()
    runs = []
    for k in ks:
        for v in vocabs:
            run = measure_config(v, k, num_seqs, min_len, max_len, repeats, args.seed)
            runs.append(run)
            print(markdown(run), flush=True)
    print(f"total {time.perf_counter() - t_all:.0f} s", flush=True)
    if args.json:
        args.json.write_text(
            json.dumps({"command": cmd, "machine": machine(), "runs": [to_json(r) for r in runs]}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
