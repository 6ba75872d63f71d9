"""Rows -> windows: splitting/truncation, ids, the chat assistant mask, skip reasons, --strict, replica slices."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from logitcache.pipeline.data import (
    BadRowError,
    DataSummary,
    iter_windows,
    load_rows,
    render_chat,
    window_bounds,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_teacher_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_teacher_dir)


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_window_bounds_predict_every_token_once() -> None:
    for n in range(2, 40):
        bounds = window_bounds(n, 8, "split")
        assert all(2 <= e - s <= 8 for s, e in bounds)
        targets = np.concatenate([np.arange(s + 1, e) for s, e in bounds])
        assert np.array_equal(targets, np.arange(1, n))  # each token from the 2nd on is a target exactly once
    assert window_bounds(20, 8, "truncate") == [(0, 8)]
    assert window_bounds(5, 8, "split") == [(0, 5)]


def test_windows_ids_and_content(tokenizer: Any, tmp_path: Path) -> None:
    text = "def f(x):\n    return x + 1\n" * 10
    ds = load_rows(str(_jsonl(tmp_path / "d.jsonl", [{"text": "x = 1\ny = 2\n"}, {"text": text}])))
    full = np.asarray(tokenizer(text)["input_ids"])
    summary = DataSummary()
    windows = list(iter_windows(ds.rows, tokenizer, max_seq_len=16, summary=summary))
    row1 = [w for w in windows if w.row_index == 1]
    assert [w.sequence_id for w in row1] == [(1 << 16) | i for i in range(len(row1))]
    assert np.array_equal(np.concatenate([row1[0].input_ids] + [w.input_ids[1:] for w in row1[1:]]), full)
    assert all(w.loss_mask.all() and w.input_ids.dtype == np.int32 for w in windows)
    assert summary.split_rows == 1 and summary.rows == 2 and summary.sequences == len(windows)
    truncated = list(iter_windows(ds.rows, tokenizer, max_seq_len=16, overflow="truncate"))
    assert len(truncated) == 2 and np.array_equal(truncated[1].input_ids, full[:16])


def test_chat_mask_covers_assistant_tokens_only(tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Show `f`."},
        {"role": "assistant", "content": "def f():\n    pass"},
        {"role": "user", "content": "And g?"},
        {"role": "assistant", "content": "def g(): é"},
    ]
    ids, mask = render_chat(tokenizer, messages)
    assert ids.shape == mask.shape and mask.dtype == bool
    # Decoding the masked tokens gives exactly the assistant replies and their end markers, in order.
    runs, cur = [], []
    for i, m in zip(ids.tolist(), mask.tolist()):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    decoded = [tokenizer.decode(r) for r in runs]
    assert decoded == ["def f():\n    pass<|end|>", "def g(): é<|end|>"]
    # A template without {% generation %} markers goes through the turn-by-turn offsets path: same mask.
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = tokenizer.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    ids2, mask2 = render_chat(plain, messages)
    assert np.array_equal(ids, ids2) and np.array_equal(mask, mask2)


def test_skip_reasons_counted_and_strict_names_row(tokenizer: Any, tmp_path: Path) -> None:
    rows = [{"text": "ok = 1\n"}, {"text": ""}, {"other": "x"}, {"text": 5}, {"text": "   \n"}, {"text": "a"}]
    ds = load_rows(str(_jsonl(tmp_path / "d.jsonl", rows)))
    summary = DataSummary()
    windows = list(iter_windows(ds.rows, tokenizer, max_seq_len=64, summary=summary))
    assert [w.row_index for w in windows] == [0]
    assert dict(summary.skipped) == {"empty": 2, "missing_field": 1, "not_string": 1, "too_short": 1}
    assert summary.rows == len(rows)  # nothing vanishes: every row is a window or a counted skip
    with pytest.raises(BadRowError, match=r"dataset row 1: empty \(field 'text'\)"):
        list(iter_windows(ds.rows, tokenizer, max_seq_len=64, strict=True))
    with pytest.raises(ValueError, match=r"no column 'body' \(--text-field\)"):
        list(iter_windows(ds.rows, tokenizer, max_seq_len=64, text_field="body"))


def test_undecodable_bytes_and_bad_messages(tokenizer: Any, tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": pa.array([b"x = 1\n", b"\xff\xfe bad", b"y = 2\n"], pa.binary())}), path)
    summary = DataSummary()
    windows = list(iter_windows(load_rows(str(path)).rows, tokenizer, max_seq_len=64, summary=summary))
    assert [w.row_index for w in windows] == [0, 2] and dict(summary.skipped) == {"undecodable": 1}

    chats = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": []},
        {"messages": [{"role": "user", "content": "no reply"}]},
        {"messages": [{"role": "user"}]},
    ]
    ds = load_rows(str(_jsonl(tmp_path / "c.jsonl", chats)))
    summary = DataSummary()
    windows = list(iter_windows(ds.rows, tokenizer, messages_field="messages", max_seq_len=64, summary=summary))
    assert [w.row_index for w in windows] == [0]
    assert dict(summary.skipped) == {"empty": 1, "no_assistant_turn": 1, "not_messages": 1}


def test_replicas_take_disjoint_slices(tokenizer: Any, tmp_path: Path) -> None:
    ds = load_rows(str(_jsonl(tmp_path / "d.jsonl", [{"text": f"x = {i}\n"} for i in range(10)])), limit=7)
    seen = [
        sorted(w.row_index for w in iter_windows(ds.rows, tokenizer, max_seq_len=64, replica=r, num_replicas=3))
        for r in range(3)
    ]
    assert seen == [[0, 3, 6], [1, 4], [2, 5]]


def test_missing_dataset_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_rows(str(tmp_path / "nope.jsonl"))
