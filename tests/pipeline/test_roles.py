"""Role-based loss masks (`--train-roles`): multi-turn tool-use traces, every trained turn kept, tool outputs never
trained, and templates that cannot render a role stopped with the row named."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from logitcache.pipeline.config import CaptureConfig
from logitcache.pipeline.data import (
    DataSummary,
    UnsupportedRoleError,
    WindowSettings,
    iter_windows,
    load_rows,
    parse_train_roles,
    render_chat,
)

TRACE = [
    {"role": "system", "content": "You may call tools."},
    {"role": "user", "content": "What is in /tmp?"},
    {"role": "assistant", "content": "call ls('/tmp')", "tool_calls": [{"name": "ls", "arguments": '"/tmp"'}]},
    {"role": "tool", "content": "a.txt\nsecret.db", "name": "ls", "tool_call_id": "1"},
    {"role": "assistant", "content": "Two files: a.txt and secret.db."},
    {"role": "user", "content": "Open a.txt"},
    {"role": "assistant", "content": "call cat('/tmp/a.txt')"},
    {"role": "tool", "content": "hello world", "name": "cat"},
    {"role": "assistant", "content": "It says hello world."},
]
ASSISTANT_TURNS = [m["content"] + "<|end|>" for m in TRACE if m["role"] == "assistant"]

# Like Llama-2/Mistral templates: any role but system/user/assistant is an error.
_RAISING_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('Conversation roles must be system/user/assistant') }}"
    "{%- endif -%}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
)
# A template with user/assistant/system branches only: a tool turn vanishes without an error.
_DROPPING_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] in ['system', 'user', 'assistant'] -%}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
)


@pytest.fixture(scope="module")
def tokenizer(tiny_teacher_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_teacher_dir)


@pytest.fixture(scope="module")
def plain_tokenizer(tokenizer: Any) -> Any:
    """The demo template without {% generation %} markers: every mask comes from turn-by-turn offsets."""
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = tokenizer.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    return plain


def _with_template(tokenizer: Any, template: str) -> Any:
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


def _masked_runs(tokenizer: Any, ids: np.ndarray, mask: np.ndarray) -> list[str]:
    """The decoded text of each run of masked tokens, in order."""
    runs: list[list[int]] = []
    prev = False
    for i, m in zip(ids.tolist(), mask.tolist()):
        if m and not prev:
            runs.append([])
        if m:
            runs[-1].append(i)
        prev = m
    return [tokenizer.decode(r) for r in runs]


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("which", ["generation_markers", "offsets"])
def test_tool_trace_masks_every_assistant_turn_and_no_tool_output(
    which: str, tokenizer: Any, plain_tokenizer: Any
) -> None:
    tok = tokenizer if which == "generation_markers" else plain_tokenizer
    ids, mask = render_chat(tok, TRACE)
    assert _masked_runs(tok, ids, mask) == ASSISTANT_TURNS
    # No token of a tool output (nor of any role header) is a target.
    text = tok.decode(ids[mask])
    assert (
        "a.txt\nsecret.db" not in text and "hello world<|end|>" not in text and "<|" not in text.replace("<|end|>", "")
    )


@pytest.mark.parametrize("which", ["generation_markers", "offsets"])
def test_train_roles_adds_user_turns_never_tool(which: str, tokenizer: Any, plain_tokenizer: Any) -> None:
    tok = tokenizer if which == "generation_markers" else plain_tokenizer
    ids, mask = render_chat(tok, TRACE, ("assistant", "user"))
    expected = [m["content"] + "<|end|>" for m in TRACE if m["role"] in ("assistant", "user")]
    # Consecutive trained turns (user then assistant) join into one run: compare the concatenation, and the headers
    # of trained turns stay out of it.
    assert "".join(_masked_runs(tok, ids, mask)) == "".join(expected)
    ids_s, mask_s = render_chat(tok, TRACE, ("system",))
    assert np.array_equal(ids_s, ids) and _masked_runs(tok, ids_s, mask_s) == ["You may call tools.<|end|>"]


def test_trace_from_jsonl_with_tool_fields(tokenizer: Any, tmp_path: Path) -> None:
    """Through `datasets`: turns without tool_calls/name get None-filled keys, which must not reach the template."""
    chats = [
        {"messages": TRACE},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]},  # nothing to train
        {"messages": [{"role": "user", "content": "ls"}, {"role": "assistant", "content": None, "tool_calls": [{}]}]},
    ]
    ds = load_rows(str(_jsonl(tmp_path / "trace.jsonl", chats)))
    summary = DataSummary()
    settings = WindowSettings(max_seq_len=512, messages_field="messages")
    windows = list(iter_windows(ds.rows, tokenizer, settings, summary))
    assert [w.row_index for w in windows] == [0, 2]
    assert dict(summary.skipped) == {"no_assistant_turn": 1}
    assert _masked_runs(tokenizer, windows[0].input_ids, windows[0].loss_mask) == ASSISTANT_TURNS
    # A tool-call-only reply (content None) trains its end-of-turn marker.
    assert _masked_runs(tokenizer, windows[1].input_ids, windows[1].loss_mask) == ["<|end|>"]
    # train_roles without such a turn: counted under its own reason
    only_system = WindowSettings(max_seq_len=512, messages_field="messages", train_roles=("system",))
    summary = DataSummary()
    assert [w.row_index for w in iter_windows(ds.rows, tokenizer, only_system, summary)] == [0]
    assert dict(summary.skipped) == {"no_train_roles_turn": 2}


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (_RAISING_TEMPLATE, r"refuses the conversation \(Conversation roles must be .*\); message 3 has role 'tool'"),
        (_DROPPING_TEMPLATE, r"renders nothing of message 3 \(role 'tool'\): it does not support this role"),
    ],
)
def test_template_without_tool_role_names_the_row(template: str, message: str, tokenizer: Any, tmp_path: Path) -> None:
    tok = _with_template(tokenizer, template)
    chats = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": TRACE},
    ]
    ds = load_rows(str(_jsonl(tmp_path / "trace.jsonl", chats)))
    # Not a skipped row: every tool trace would vanish from the cache. Stops with or without --strict.
    for strict in (False, True):
        settings = WindowSettings(max_seq_len=512, messages_field="messages", strict=strict)
        with pytest.raises(UnsupportedRoleError, match=r"^dataset row 1 \(field 'messages'\): .*" + message):
            list(iter_windows(ds.rows, tok, settings))


def test_parse_train_roles() -> None:
    assert parse_train_roles("assistant") == ("assistant",)
    assert parse_train_roles(" assistant, user,assistant ") == ("assistant", "user")
    assert parse_train_roles(["system", "assistant"]) == ("system", "assistant")
    with pytest.raises(ValueError, match="may not include `tool`: tool outputs come from the environment"):
        parse_train_roles("assistant,tool")
    with pytest.raises(ValueError, match=r"\['bot'\] unknown: choose from system, user, assistant"):
        parse_train_roles("bot")
    with pytest.raises(ValueError, match="names no role"):
        parse_train_roles(" , ")


def test_config_and_cli_name_the_flag(tmp_path: Path) -> None:
    cfg = CaptureConfig(teacher="t", dataset="d", output="o", train_roles="user, assistant")
    assert cfg.train_roles == "user,assistant" and cfg.train_role_names == ("user", "assistant")
    assert cfg.window_settings(64).train_roles == ("user", "assistant")
    with pytest.raises(ValueError, match=r"invalid capture config:[\s\S]*`--train-roles` may not include `tool`"):
        CaptureConfig(teacher="t", dataset="d", output="o", train_roles="tool")
    from logitcache.pipeline.cli import cache_teacher

    args = ["--teacher", "t", "--dataset", "d", "--output", str(tmp_path / "c"), "--train-roles", "assistant,tool"]
    result = CliRunner().invoke(cache_teacher, args)
    assert result.exit_code == 2 and "may not include `tool`" in result.output


def test_capture_records_train_roles_and_refuses_others(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    """An HF capture with user turns trained: the mask holds them, the header says so, other roles are refused."""
    from logitcache.pipeline.capture import run_capture
    from logitcache.storage import CacheReader, IdentityMismatchError

    data = _jsonl(tmp_path / "trace.jsonl", [{"messages": TRACE}])

    def capture(**kw: Any) -> Any:
        cfg = CaptureConfig(
            teacher=str(tiny_teacher_dir),
            dataset=str(data),
            output=str(tmp_path / "cache"),
            messages_field="messages",
            backend="hf",
            targets="topk",
            top_k=4,
            progress=False,
            **kw,
        )
        return run_capture(cfg)

    result = capture(train_roles="assistant,user")
    assert result.status == "finished"
    assert result.manifest["capture"]["train_roles"] == ["assistant", "user"]
    (seq,) = list(CacheReader(tmp_path / "cache").iter_sequences())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    expected = [m["content"] + "<|end|>" for m in TRACE if m["role"] in ("assistant", "user")]
    assert "".join(_masked_runs(tok, seq.input_ids, seq.loss_mask)) == "".join(expected)
    with pytest.raises(IdentityMismatchError, match=r"capture.train_roles: cache has \['assistant', 'user'\]"):
        capture()
