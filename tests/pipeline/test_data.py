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
    WindowSettings,
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
    windows = list(iter_windows(ds.rows, tokenizer, WindowSettings(max_seq_len=16), summary))
    row1 = [w for w in windows if w.row_index == 1]
    assert [w.sequence_id for w in row1] == [(1 << 16) | i for i in range(len(row1))]
    assert np.array_equal(np.concatenate([row1[0].input_ids] + [w.input_ids[1:] for w in row1[1:]]), full)
    assert all(w.loss_mask.all() and w.input_ids.dtype == np.int32 for w in windows)
    assert summary.split_rows == 1 and summary.rows == 2 and summary.sequences == len(windows)
    truncated = list(iter_windows(ds.rows, tokenizer, WindowSettings(max_seq_len=16, overflow="truncate")))
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
    windows = list(iter_windows(ds.rows, tokenizer, WindowSettings(max_seq_len=64), summary))
    assert [w.row_index for w in windows] == [0]
    assert dict(summary.skipped) == {"empty": 2, "missing_field": 1, "not_string": 1, "too_short": 1}
    assert summary.rows == len(rows)  # nothing vanishes: every row is a window or a counted skip
    with pytest.raises(BadRowError, match=r"^dataset row 1: empty \(field 'text'\)"):
        list(iter_windows(ds.rows, tokenizer, WindowSettings(max_seq_len=64, strict=True)))
    with pytest.raises(ValueError, match=r"no column 'body' \(--text-field\)"):
        list(iter_windows(ds.rows, tokenizer, WindowSettings(max_seq_len=64, text_field="body")))


def test_undecodable_bytes_and_bad_messages(tokenizer: Any, tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": pa.array([b"x = 1\n", b"\xff\xfe bad", b"y = 2\n"], pa.binary())}), path)
    summary = DataSummary()
    windows = list(iter_windows(load_rows(str(path)).rows, tokenizer, WindowSettings(max_seq_len=64), summary))
    assert [w.row_index for w in windows] == [0, 2] and dict(summary.skipped) == {"undecodable": 1}

    chats = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": []},
        {"messages": [{"role": "user", "content": "no reply"}]},
        {"messages": [{"role": "user"}]},
    ]
    ds = load_rows(str(_jsonl(tmp_path / "c.jsonl", chats)))
    summary = DataSummary()
    windows = list(iter_windows(ds.rows, tokenizer, WindowSettings(messages_field="messages", max_seq_len=64), summary))
    assert [w.row_index for w in windows] == [0]
    assert dict(summary.skipped) == {"empty": 1, "no_assistant_turn": 1, "not_messages": 1}


def test_replicas_take_disjoint_slices(tokenizer: Any, tmp_path: Path) -> None:
    ds = load_rows(str(_jsonl(tmp_path / "d.jsonl", [{"text": f"x = {i}\n"} for i in range(10)])), limit=7)
    seen = [
        sorted(
            w.row_index
            for w in iter_windows(ds.rows, tokenizer, WindowSettings(max_seq_len=64, replica=r, num_replicas=3))
        )
        for r in range(3)
    ]
    assert seen == [[0, 3, 6], [1, 4], [2, 5]]


def test_missing_dataset_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_rows(str(tmp_path / "nope.jsonl"))


def _has_loss_position(mask: np.ndarray) -> bool:
    """Position t trains when loss_mask[t+1], so only positions 1..L-1 of the mask count."""
    return bool(mask[1:].any())


def test_windows_without_loss_positions_are_skipped_and_counted(tokenizer: Any, tmp_path: Path) -> None:
    long_prompt = {"role": "user", "content": "Explain this code:\n" + "def f(x):\n    return x + 1\n" * 8}
    chats = [
        {"messages": [long_prompt, {"role": "assistant", "content": "It adds one."}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    ]
    ds = load_rows(str(_jsonl(tmp_path / "c.jsonl", chats)))
    ids, mask = render_chat(tokenizer, chats[0]["messages"])
    bounds = window_bounds(len(ids), 16, "split")
    empty = [w for w, (s, e) in enumerate(bounds) if not _has_loss_position(mask[s:e])]
    assert 0 < len(empty) < len(bounds)  # the long prompt's first windows hold no assistant token

    summary = DataSummary()
    kwargs: dict[str, Any] = {"messages_field": "messages", "max_seq_len": 16}
    windows = list(iter_windows(ds.rows, tokenizer, WindowSettings(**kwargs), summary))
    assert all(_has_loss_position(w.loss_mask) for w in windows)
    # Kept windows keep their index within the row: sequence ids stay deterministic, the gaps are the dropped ones.
    kept = [w for w in range(len(bounds)) if w not in empty]
    assert [w.sequence_id for w in windows if w.row_index == 0] == kept
    assert {w.row_index for w in windows} == {0, 1}
    assert summary.skipped_windows == {"no_loss_positions": len(empty)} and not summary.skipped
    assert summary.sequences == len(windows) and summary.tokens == sum(len(w.input_ids) for w in windows)
    assert summary.to_dict()["skipped_windows"] == {"no_loss_positions": len(empty)}
    # A long prompt is normal: --strict keeps the row's windows that train and does not fail.
    strict = list(iter_windows(ds.rows, tokenizer, WindowSettings(strict=True, **kwargs)))
    assert [w.sequence_id for w in strict] == [w.sequence_id for w in windows]

    # Truncated to its prompt, row 0 has no window that trains: the row is skipped (and its window counted).
    summary = DataSummary()
    windows = list(iter_windows(ds.rows, tokenizer, WindowSettings(overflow="truncate", **kwargs), summary))
    assert [w.row_index for w in windows] == [1]
    assert summary.skipped == {"no_loss_positions": 1} and summary.skipped_windows == {"no_loss_positions": 1}
    assert summary.rows == 2 and summary.truncated_rows == 0  # a skipped row is counted once, under its reason
    with pytest.raises(BadRowError, match=r"^dataset row 0: no_loss_positions \(field 'messages'\).*--max-seq-len"):
        list(iter_windows(ds.rows, tokenizer, WindowSettings(overflow="truncate", strict=True, **kwargs)))


def test_window_whose_only_target_is_its_first_token_is_skipped(tokenizer: Any, tmp_path: Path) -> None:
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "thanks, that is all for today"},
    ]
    ds = load_rows(str(_jsonl(tmp_path / "c.jsonl", [{"messages": messages}])))
    ids, mask = render_chat(tokenizer, messages)
    last = int(np.flatnonzero(mask)[-1])
    # Window 1 starts on the reply's last token (the one-token overlap), so its only True is at position 0: that
    # token is window 0's target, and window 1 has nothing to train.
    summary = DataSummary()
    windows = list(
        iter_windows(ds.rows, tokenizer, WindowSettings(messages_field="messages", max_seq_len=last + 1), summary)
    )
    bounds = window_bounds(len(ids), last + 1, "split")
    assert bounds[1][0] == last and mask[last] and not mask[last + 1 :].any()
    assert [w.sequence_id for w in windows] == [0]
    assert summary.skipped_windows == {"no_loss_positions": len(bounds) - 1} and not summary.skipped


# Like reasoning models' templates: earlier assistant turns lose their <think> block, the last one keeps it.
_REWRITING_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{%- if message['role'] == 'assistant' and not loop.last and '</think>' in message['content'] -%}"
    "{{ message['content'].split('</think>')[-1] }}<|end|>"
    "{%- else -%}"
    "{{ message['content'] }}<|end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
)


def test_template_that_rewrites_earlier_turns_skips_only_that_row(tokenizer: Any, tmp_path: Path) -> None:
    rewriting = copy.deepcopy(tokenizer)
    rewriting.chat_template = _REWRITING_TEMPLATE
    chats = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {
            "messages": [
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "<think>add</think>4"},
                {"role": "user", "content": "3+3?"},
                {"role": "assistant", "content": "6"},
            ]
        },
        # One reasoning reply, the last turn: rendered the same alone and in full, so this row is fine.
        {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "<think>x</think>2"}]},
    ]
    ds = load_rows(str(_jsonl(tmp_path / "c.jsonl", chats)))
    with pytest.raises(BadRowError, match="rewrites earlier turns"):
        render_chat(rewriting, chats[1]["messages"])
    summary = DataSummary()
    windows = list(iter_windows(ds.rows, rewriting, WindowSettings(messages_field="messages", max_seq_len=64), summary))
    assert [w.row_index for w in windows] == [0, 2]
    assert summary.skipped == {"chat_template_rewrites_turns": 1} and summary.rows == 3
    with pytest.raises(
        BadRowError,
        match=r"^dataset row 1: chat_template_rewrites_turns \(field 'messages'\); the chat template rewrites",
    ):
        list(iter_windows(ds.rows, rewriting, WindowSettings(messages_field="messages", max_seq_len=64, strict=True)))
