"""Shared helpers of the benchmark scripts: the benchmark teacher, output folders, markdown tables."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH_OUT = Path(os.environ.get("LOGITCACHE_BENCH_OUT", ROOT / "bench_out"))


def out_dir(name: str) -> Path:
    path = BENCH_OUT / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def bench_spec(quick: bool) -> Any:
    """The benchmark teacher: the demo recipe with a longer training budget (quick: the test-sized one)."""
    from dataclasses import replace

    from logitcache.pipeline.demo_teacher import DemoSpec

    if quick:
        return DemoSpec.quick()
    # The strongest teacher this recipe gets in ~20 minutes on 2 cores; built once and reused (demo.json marker).
    # The architecture is pinned (the demo's default shrank to 128 wide): BENCHMARKS.md's tables were measured on it.
    return replace(
        DemoSpec(),
        hidden_size=256,
        intermediate_size=688,
        head_dim=64,
        steps=5000,
        max_train_seconds=1200.0,
        train_rows=600,
        heldout_rows=120,
    )


def ensure_teacher(quick: bool) -> Path:
    """Builds (or reuses) the benchmark teacher and its datasets; returns the build dir."""
    from logitcache.pipeline.demo_teacher import build_demo

    return build_demo(BENCH_OUT / ("teacher-quick" if quick else "teacher"), bench_spec(quick))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def jsonl_windows(jsonl: Path, tokenizer_dir: Path, max_seq_len: int) -> Iterator[list[Any]]:
    """Per row of a {"text": ...} JSONL file, in file order: its non-overlapping windows of <= max_seq_len token ids
    (numpy int64, >= 2 tokens each; a row too short for one gives an empty list)."""
    import json

    import numpy as np
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    for line in jsonl.read_text().splitlines():
        ids = tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
        starts = range(0, max(len(ids) - 1, 0), max_seq_len)
        yield [
            np.asarray(ids[s : s + max_seq_len], dtype=np.int64) for s in starts if len(ids[s : s + max_seq_len]) >= 2
        ]
