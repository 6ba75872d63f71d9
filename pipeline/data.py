"""Dataset rows -> token windows for the teacher: plain text or chat (loss mask on the turns of --train-roles, by
default the assistant's; never tool outputs), split or truncated; and chat prompts for `generate`.

Every row of this replica's slice becomes one or more windows or is counted under a skip reason, so nothing
vanishes. Windows carry `sequence_id = (row_index << 16) | window_index`, deterministic across reruns and replicas.
A window with nothing to train (no loss position) is dropped and counted; its index is not reused.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from logitcache.storage import WINDOW_BITS

logger = logging.getLogger(__name__)

MAX_WINDOWS = 1 << WINDOW_BITS
# `datasets` builder per file extension, for local files and directories.
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}
# Roles whose turns `--train-roles` may put in the loss mask; `tool` turns (the environment's output) never are.
TRAINABLE_ROLES = ("system", "user", "assistant")
TRAIN_ROLES_DEFAULT = ("assistant",)


class BadRowError(ValueError):
    """A row that cannot be captured, raised under `--strict` (otherwise counted as skipped).

    `reason` is the skip-reason key in the manifest (`empty`, `no_loss_positions`, ...); `detail`, the message when
    given, says what went wrong and what to do.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason
        self.detail = detail


class UnsupportedRoleError(ValueError):
    """The chat template cannot render a role of a chat (e.g. `tool`): not a bad row but a template that does not
    fit the dataset, so it stops the capture whatever `--strict` says; iter_windows adds the row to the message."""


@dataclass
class TokenWindow:
    """One teacher input: input_ids int32 [L], loss_mask bool [L] (True = training target), L >= 2."""

    sequence_id: int
    row_index: int
    input_ids: np.ndarray
    loss_mask: np.ndarray


@dataclass
class DataSummary:
    """Counts for one replica's slice; goes into its replica summary and from there the manifest.

    `rows` = rows that gave sequences + sum(`skipped`): `skipped` counts ROWS (no sequence at all) per reason, the
    manifest's `skipped_rows`. `skipped_windows` counts WINDOWS not stored per reason, those of a row skipped whole
    included. `sequences`/`tokens`, `truncated_rows`/`split_rows` count what was stored.
    """

    rows: int = 0
    sequences: int = 0
    tokens: int = 0
    truncated_rows: int = 0
    split_rows: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    skipped_windows: Counter[str] = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "sequences": self.sequences,
            "tokens": self.tokens,
            "truncated_rows": self.truncated_rows,
            "split_rows": self.split_rows,
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_windows": dict(sorted(self.skipped_windows.items())),
        }


@dataclass(frozen=True)
class LoadedDataset:
    """A `datasets.Dataset` plus what identifies it in the cache header."""

    rows: Any  # datasets.Dataset
    source: str
    fingerprint: str


def load_rows(source: str, split: str = "train", limit: int | None = None) -> LoadedDataset:
    """Load a local file/dir (json, jsonl, parquet, txt, csv) or a hub dataset with `datasets`, first `limit` rows."""
    import datasets

    path = Path(source)
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.suffix in _BUILDERS) if path.is_dir() else [path]
        kinds = {_BUILDERS.get(p.suffix) for p in files}
        if not files or None in kinds or len(kinds) != 1:
            raise ValueError(
                f"--dataset {source}: expected one or more files of one kind ({', '.join(sorted(_BUILDERS))}), "
                f"found {[p.name for p in files][:5] or 'none'}"
            )
        # Local files hash their bytes: a changed file is a different dataset, whatever its name.
        h = hashlib.sha256()
        for p in files:
            h.update(p.name.encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())
        fingerprint = "sha256:" + h.hexdigest()
        try:
            ds = datasets.load_dataset(kinds.pop(), data_files=[str(p) for p in files], split=split)
        except ValueError as e:
            raise ValueError(f"--dataset {source} --split {split}: {e} (local files have one split, `train`)") from e
        resolved = str(path.resolve())
    else:
        if "/" not in source or source.startswith((".", "/")):
            raise FileNotFoundError(f"--dataset {source}: no such file or directory (and not a hub name owner/name)")
        ds = datasets.load_dataset(source, split=split)
        fingerprint = f"datasets:{ds._fingerprint}"
        resolved = source
    if limit is not None and limit < len(ds):
        ds = ds.select(range(limit))
    return LoadedDataset(ds, resolved, fingerprint)


def chat_template_sha256(tokenizer: Any) -> str | None:
    """sha256 of the tokenizer's chat template (part of the cache identity for chat data)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    text = template if isinstance(template, str) else repr(sorted(template.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _check_messages(messages: Any, train_roles: tuple[str, ...]) -> str | None:
    """Skip reason for a malformed `messages` value (or one without a turn of `train_roles`), else None."""
    reason = chat_problem(messages)
    if reason is None and not any(m["role"] in train_roles for m in messages):
        return "no_assistant_turn" if train_roles == TRAIN_ROLES_DEFAULT else "no_train_roles_turn"
    return reason


def chat_problem(messages: Any) -> str | None:
    """Skip reason for a `messages` value that is not a list of {role, content} turns with encodable text."""
    if messages is None:
        return "missing_field"
    if not isinstance(messages, list):
        return "not_messages"
    if not messages:
        return "empty"
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return "not_messages"
        if not _encodable(m["content"]):
            return "undecodable"
    return None


def clean_messages(messages: Any) -> Any:
    """A chat as a template expects it: keys `datasets` filled with None dropped (rows of one JSONL file share one
    schema, so a turn without `tool_calls` gets `tool_calls: None`), and an assistant turn that only calls tools
    given `content: ""`. Anything that is not a list of dicts is returned as is (`chat_problem` names it)."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return messages
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        if "content" not in m and m.get("tool_calls"):
            m["content"] = ""
        out.append(m)
    return out


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")  # lone surrogates from bad JSON escapes cannot be tokenized faithfully
    except UnicodeEncodeError:
        return False
    return True


def parse_train_roles(value: str | Sequence[str]) -> tuple[str, ...]:
    """`--train-roles`: "assistant,user" (or a list) -> ("assistant", "user"); ValueError naming the flag.

    `tool` is refused: a tool's output is written by the environment, not by the model, so a student trained to
    predict it learns to make up tool results (and the teacher's guess at them is no target worth storing).
    """
    if not isinstance(value, (str, list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"`--train-roles` must be comma-separated role names (got {value!r})")
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value)]
    roles = tuple(dict.fromkeys(n for n in names if n))
    if not roles:
        raise ValueError(f"`--train-roles` names no role (got {value!r}); e.g. `--train-roles assistant`")
    if "tool" in roles:
        raise ValueError(
            "`--train-roles` may not include `tool`: tool outputs come from the environment, not the model, and a "
            f"student trained on them learns to invent tool results; use some of {', '.join(TRAINABLE_ROLES)}"
        )
    unknown = [r for r in roles if r not in TRAINABLE_ROLES]
    if unknown:
        raise ValueError(f"`--train-roles` {unknown} unknown: choose from {', '.join(TRAINABLE_ROLES)}")
    return roles


def _has_generation_markers(template: str) -> bool:
    return "{% generation %}" in template or "{%- generation %}" in template


def _apply_template(tokenizer: Any, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
    """apply_chat_template; a template that raises (jinja's `raise_exception`) becomes UnsupportedRoleError when
    the chat has a role outside system/user/assistant (the usual cause: no `tool` support), else BadRowError."""
    from jinja2.exceptions import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except TemplateError as e:
        odd = [(j, m["role"]) for j, m in enumerate(messages) if m["role"] not in TRAINABLE_ROLES]
        if odd:
            j, role = odd[0]
            raise UnsupportedRoleError(
                f"the chat template refuses the conversation ({e}); message {j} has role {role!r}, which the "
                "template does not appear to support: use a model whose chat template renders it, or map such "
                "turns to a role the template knows"
            ) from None
        raise BadRowError("chat_template_error", f"the chat template refuses the conversation: {e}") from None


def _check_turns_rendered(text: str, messages: list[dict[str, Any]]) -> None:
    """Every turn of a role other than system/user/assistant (e.g. `tool`) must appear in the rendering: a template
    without that role (user/assistant branches, no `else`) would otherwise silently drop, e.g., a tool's output.
    (Templates that drop a system prompt are left as they were: the teacher never sees it, as in its own use.)"""
    for j, m in enumerate(messages):
        content = m["content"].strip()
        if m["role"] not in TRAINABLE_ROLES and content and content not in text:
            raise UnsupportedRoleError(
                f"the chat template renders nothing of message {j} (role {m['role']!r}): it does not support this "
                "role; use a model whose chat template renders it, or map such turns to a role the template knows"
            )


def render_chat(
    tokenizer: Any, messages: list[dict[str, Any]], train_roles: tuple[str, ...] = TRAIN_ROLES_DEFAULT
) -> tuple[np.ndarray, np.ndarray]:
    """Chat -> (input_ids int32 [L], loss_mask bool [L]) with True on the tokens of the turns of `train_roles`.

    A trained turn is its text and end-of-turn markup, not the role header before it (for assistant turns: what
    follows the generation prompt). Templates with `{% generation %}` markers give the assistant mask through
    transformers; everything else is rendered turn by turn and each turn's characters are mapped to tokens
    through the offsets, which needs a template whose rendering of a prefix is a prefix of the whole: a
    conversation rendered otherwise (a template that rewrites earlier turns) raises BadRowError. A template that
    cannot render one of the chat's roles (e.g. `tool`) raises UnsupportedRoleError.
    """
    text = _apply_template(tokenizer, messages, tokenize=False)
    _check_turns_rendered(text, messages)
    marked = _has_generation_markers(tokenizer.chat_template or "")
    if marked and train_roles == ("assistant",):
        out = _apply_template(tokenizer, messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        return np.asarray(out["input_ids"], np.int32), np.asarray(out["assistant_masks"], bool)
    by_offsets = tuple(r for r in train_roles if not (marked and r == "assistant"))
    spans = _turn_spans(tokenizer, messages, text, by_offsets)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], np.int32)
    offsets = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
    mask = np.zeros(len(offsets), bool)
    for start, end in spans:
        mask |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
    if marked and "assistant" in train_roles:
        out = _apply_template(tokenizer, messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        if not np.array_equal(np.asarray(out["input_ids"], np.int32), ids):  # the same text, tokenized twice
            raise RuntimeError("the chat template's tokenization differs from the tokenizer's own on its text")
        mask |= np.asarray(out["assistant_masks"], bool)
    return ids, mask


def render_prompt(tokenizer: Any, messages: list[dict[str, Any]]) -> np.ndarray:
    """Prompt turns + the template's generation prompt -> input_ids int32 [L] (what a model answers from).

    Raises BadRowError when the template refuses the chat, UnsupportedRoleError when it cannot render a role.
    """
    text = _apply_template(tokenizer, messages, tokenize=False, add_generation_prompt=True)
    _check_turns_rendered(text, messages)
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)


def _turn_spans(
    tokenizer: Any, messages: list[dict[str, Any]], text: str, roles: tuple[str, ...]
) -> list[tuple[int, int]]:
    """[start, end) character spans in `text` of the turns of `roles`: an assistant turn from the end of the
    generation prompt, any other from where its content starts; both through the end of the turn's markup."""
    spans = []
    for j, m in enumerate(messages):
        if m["role"] not in roles:
            continue
        before = _apply_template(tokenizer, messages[:j], tokenize=False) if j else ""
        if m["role"] == "assistant":
            head = _apply_template(tokenizer, messages[:j], tokenize=False, add_generation_prompt=True) if j else ""
        else:
            head = before
        upto = _apply_template(tokenizer, messages[: j + 1], tokenize=False)
        if not (text.startswith(upto) and upto.startswith(head) and head.startswith(before)):
            # Per row, not fatal: such templates (e.g. dropping <think> blocks from earlier assistant replies) only
            # rewrite some conversations, and the others render fine.
            raise BadRowError(
                "chat_template_rewrites_turns",
                f"the chat template rewrites earlier turns (the conversation rendered through message {j} is not a "
                "prefix of the whole, e.g. a <think> block dropped from an earlier reply), so the loss mask "
                "cannot be derived by prefix rendering; use a teacher tokenizer whose chat template marks replies "
                "with {% generation %} markers, or remove what the template rewrites from the row's earlier turns",
            )
        start = len(head)
        if m["role"] != "assistant":
            found = upto.find(m["content"].strip(), start) if m["content"].strip() else -1
            start = found if found >= 0 else start
        spans.append((start, len(upto)))
    return spans


def window_bounds(num_tokens: int, max_seq_len: int, overflow: str) -> list[tuple[int, int]]:
    """[start, end) token ranges: one window, the truncated head, or windows overlapping by one token.

    The one-token overlap makes every token from the second on a prediction target exactly once: window w's first
    token is window w-1's last, so its context restarts but no position is lost at the seam.
    """
    if num_tokens <= max_seq_len:
        return [(0, num_tokens)]
    if overflow == "truncate":
        return [(0, max_seq_len)]
    stride = max_seq_len - 1
    return [(s, min(s + max_seq_len, num_tokens)) for s in range(0, num_tokens - 1, stride)]


@dataclass(frozen=True)
class WindowSettings:
    """How dataset rows become teacher windows: built once from the capture config
    (`CaptureConfig.window_settings`) and passed whole to `iter_windows`."""

    max_seq_len: int  # tokens per window
    text_field: str = "text"  # the column of plain text, read when messages_field is None
    messages_field: str | None = None  # the column of chat messages
    train_roles: tuple[str, ...] = TRAIN_ROLES_DEFAULT  # chat turns in the loss mask (parse_train_roles)
    response_ids: bool = False  # rows carry prompt_token_ids + response_token_ids (from `generate`): score those
    overflow: str = "split"  # longer rows: windows overlapping by one token ("split") or the head ("truncate")
    replica: int = 0  # this replica takes the rows with row_index % num_replicas == replica
    num_replicas: int = 1
    strict: bool = False  # the first bad row raises BadRowError instead of being counted as skipped


def iter_windows(
    rows: Any, tokenizer: Any, settings: WindowSettings, summary: DataSummary | None = None
) -> Iterator[TokenWindow]:
    """Yield this replica's windows (rows with row_index % num_replicas == replica), counting skips in `summary`.

    With `settings.strict`, the first bad row raises BadRowError naming its index and the reason. Windows without a loss
    position are dropped and counted in `summary.skipped_windows`, under --strict too (a long prompt's first windows
    are normal); a row none of whose windows has one is a bad row (`no_loss_positions`).
    """
    max_seq_len, overflow = settings.max_seq_len, settings.overflow
    columns = _columns(rows, settings)
    column = columns[0]
    summary = summary if summary is not None else DataSummary()
    indices = range(settings.replica, len(rows), settings.num_replicas)
    # Reading the row's columns in slices keeps memory bounded and skips decoding the others.
    for base in range(0, len(indices), 1024):
        chunk = indices[base : base + 1024]
        part = rows.select(chunk).with_format(None)
        values = zip(*(part[c] for c in columns)) if settings.response_ids else part[column]
        for row_index, value in zip(chunk, values):
            summary.rows += 1
            try:
                ids, mask = _tokenize_row(value, tokenizer, settings)
                windows = _row_windows(row_index, ids, mask, max_seq_len, overflow, summary)
            except UnsupportedRoleError as e:
                raise UnsupportedRoleError(f"dataset row {row_index} (field {column!r}): {e}") from None
            except BadRowError as e:
                if settings.strict:
                    detail = f"; {e.detail}" if e.detail else ""
                    raise BadRowError(
                        e.reason,
                        f"dataset row {row_index}: {e.reason} (field {column!r}){detail}; fix the row, or drop "
                        "--strict to count such rows as skipped in the manifest",
                    ) from None
                summary.skipped[e.reason] += 1
                continue
            if len(ids) > max_seq_len:
                if overflow == "truncate":
                    summary.truncated_rows += 1
                else:
                    summary.split_rows += 1
            for window in windows:
                summary.sequences += 1
                summary.tokens += len(window.input_ids)
                yield window


RESPONSE_ID_COLUMNS = ("prompt_token_ids", "response_token_ids")  # written by `logitcache generate`


def _columns(rows: Any, settings: WindowSettings) -> tuple[str, ...]:
    """The columns a row is read from; ValueError naming the flag when the dataset lacks one."""
    if settings.response_ids:
        missing = [c for c in RESPONSE_ID_COLUMNS if c not in rows.column_names]
        if missing:
            raise ValueError(
                f"`--response-ids`: the dataset has no column {missing} (its columns are {rows.column_names}); it "
                "reads the data.jsonl of `logitcache generate`, or drop --response-ids to score the text"
            )
        return RESPONSE_ID_COLUMNS
    column = settings.messages_field or settings.text_field
    if column not in rows.column_names:
        flag = "--messages-field" if settings.messages_field else "--text-field"
        raise ValueError(f"the dataset has no column {column!r} ({flag}); its columns are {rows.column_names}")
    return (column,)


def _response_id_row(value: tuple[Any, Any], vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(prompt ids, response ids) -> (ids, mask True on the response); BadRowError for rows counted as skipped."""
    prompt, response = value
    if not isinstance(prompt, list) or not isinstance(response, list):
        raise BadRowError("not_token_ids")
    if not response:
        raise BadRowError("empty_response")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in (*prompt, *response)):
        raise BadRowError("not_token_ids")
    ids = np.asarray(prompt + response, np.int64)
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise BadRowError(
            "token_id_out_of_range",
            f"token ids must be in [0, {vocab_size}) of the teacher's tokenizer; were the responses made with another?",
        )
    mask = np.zeros(len(ids), bool)
    mask[len(prompt) :] = True
    return ids.astype(np.int32), mask


def _row_windows(
    row_index: int, ids: np.ndarray, mask: np.ndarray, max_seq_len: int, overflow: str, summary: DataSummary
) -> list[TokenWindow]:
    """One row's windows that have a loss position; dropped ones are counted in `summary.skipped_windows`.

    Raises BadRowError("no_loss_positions") when no window has one (the row then carries no training signal).
    """
    bounds = window_bounds(len(ids), max_seq_len, overflow)
    if len(bounds) > MAX_WINDOWS:
        raise ValueError(
            f"dataset row {row_index} needs {len(bounds)} windows of --max-seq-len {max_seq_len}, more "
            f"than the {MAX_WINDOWS} a sequence id can number; raise --max-seq-len or use --overflow truncate"
        )
    windows = []
    for w, (start, end) in enumerate(bounds):
        # Position t trains when loss_mask[t+1] (see train/data.py collate): a True at position 0 alone is a
        # target of the previous window, not of this one. A micro-batch of such windows has no loss to backprop.
        if not mask[start + 1 : end].any():
            summary.skipped_windows["no_loss_positions"] += 1
            continue
        windows.append(TokenWindow((row_index << WINDOW_BITS) | w, row_index, ids[start:end], mask[start:end]))
    if not windows:
        if overflow == "truncate":
            fix = f"the reply is cut off by --overflow truncate; raise --max-seq-len {max_seq_len} or use --overflow split"
        else:
            fix = "no token of the row is a training target; check the chat template's assistant mask on this row"
        raise BadRowError(
            "no_loss_positions",
            f"none of its {len(bounds)} window(s) has a training target after its first token ({fix})",
        )
    return windows


def _tokenize_row(value: Any, tokenizer: Any, settings: WindowSettings) -> tuple[np.ndarray, np.ndarray]:
    """One row's value -> (ids, mask); raises BadRowError for rows that are counted as skipped."""
    if settings.response_ids:
        ids, mask = _response_id_row(value, len(tokenizer))
    elif settings.messages_field is not None:
        value = clean_messages(value)
        reason = _check_messages(value, settings.train_roles)
        if reason:
            raise BadRowError(reason)
        ids, mask = render_chat(tokenizer, value, settings.train_roles)
    else:
        if value is None:
            raise BadRowError("missing_field")
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise BadRowError("undecodable") from None
        if not isinstance(value, str):
            raise BadRowError("not_string")
        if not value.strip():
            raise BadRowError("empty")
        if not _encodable(value):
            raise BadRowError("undecodable")
        ids = np.asarray(tokenizer(value, add_special_tokens=True)["input_ids"], np.int32)
        mask = np.ones(len(ids), bool)
    if len(ids) < 2:
        raise BadRowError("too_short")  # one token has no next token to predict
    return ids, mask
