"""`logitcache generate`: a model writes responses to a prompt set through vLLM, as chat rows cache-teacher reads.

OUT_DIR/generation.json  what made the rows (model, tokenizer fingerprint, sampling, dataset), then the counts
OUT_DIR/data.jsonl       one row per response: messages (prompt turns + the assistant turn; with --prompt-format
                         text instead `prompt` and `text` = prompt + response), finish_reason,
                         prompt_index (the dataset row), sample_index, response_tokens, and the exact token ids
                         (prompt_token_ids: the rendered prompt; response_token_ids: what the model sampled, its
                         end-of-sequence token included), which `cache-teacher --response-ids` scores as they are
OUT_DIR/progress.json    after every batch of prompts, fsync'd: dataset rows consumed, and the rows and bytes of
                         data.jsonl they produced

Resume: data.jsonl is cut back to the recorded bytes (a batch half-appended when the process died) and generation
continues at the recorded row. A batch is always the same range of dataset rows and every response is seeded by
(seed, prompt index, sample index), so a resumed run writes exactly the rows of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from logitcache.pipeline.config import GenerateConfig
from logitcache.pipeline.data import (
    BadRowError,
    UnsupportedRoleError,
    chat_problem,
    chat_template_sha256,
    clean_messages,
    load_rows,
    render_prompt,
)
from logitcache.pipeline.teacher import TeacherInfo, resolve_teacher, weights_sha256
from logitcache.storage import tokenizer_fingerprint
from logitcache.storage.writer import atomic_write_json

logger = logging.getLogger(__name__)

__all__ = ["GenerateProgress", "GenerateResult", "run_generate", "sample_seed", "GENERATION_FILE", "DATA_FILE"]

GENERATION_FILE = "generation.json"
DATA_FILE = "data.jsonl"
PROGRESS_FILE = "progress.json"
MAX_DEFAULT_MODEL_LEN = 8192
FINISH_REASONS = ("stop", "length")


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The vLLM request seed of one response (63 bits): a hash, so neighbouring prompts' seeds are unrelated."""
    digest = hashlib.sha256(f"{seed}:{prompt_index}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class GenerateProgress:
    """What data.jsonl holds, as progress.json records it after each batch (and what the progress bar shows)."""

    rows_done: int = 0  # dataset rows consumed: the next batch starts here
    rows_total: int = 0
    samples: int = 0  # rows of data.jsonl
    data_bytes: int = 0  # its length: anything after it is a batch that was not recorded
    response_tokens: int = 0
    finish_reasons: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)  # dataset rows without a response, per reason

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows_done": self.rows_done,
            "samples": self.samples,
            "data_bytes": self.data_bytes,
            "response_tokens": self.response_tokens,
            "finish_reasons": dict(sorted(self.finish_reasons.items())),
            "skipped_prompts": dict(sorted(self.skipped.items())),
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any], rows_total: int) -> GenerateProgress:
        return cls(
            rows_done=int(doc["rows_done"]),
            rows_total=rows_total,
            samples=int(doc["samples"]),
            data_bytes=int(doc["data_bytes"]),
            response_tokens=int(doc["response_tokens"]),
            finish_reasons=Counter(doc["finish_reasons"]),
            skipped=Counter(doc["skipped_prompts"]),
        )


@dataclass
class GenerateResult:
    """`status`: "finished", or "already_finished" (nothing to do); `generation` is generation.json's content."""

    status: str
    output: Path
    generation: dict[str, Any]


@dataclass(frozen=True)
class _Prompt:
    index: int  # dataset row
    messages: list[dict[str, Any]] | None  # None: a plain-text prompt (--prompt-format text)
    token_ids: list[int]
    text: str = ""  # the plain-text prompt as its token ids decode


def _prompt_text(value: Any) -> str:
    """A dataset value that is a text prompt; BadRowError (a skip reason) otherwise."""
    if value is None:
        raise BadRowError("missing_field")
    if not isinstance(value, str):
        raise BadRowError("not_string")
    if not value.strip():
        raise BadRowError("empty")
    return value


def _text_prompt(index: int, value: Any, tokenizer: Any, prompt_tokens: int | None) -> _Prompt:
    """A plain-text prompt (its first `prompt_tokens` tokens); BadRowError for a value that is not one."""
    ids = tokenizer(_prompt_text(value), add_special_tokens=True)["input_ids"][:prompt_tokens]
    return _Prompt(index, None, list(ids), tokenizer.decode(ids, skip_special_tokens=True))


def _prompt_messages(value: Any, chat: bool) -> list[dict[str, Any]]:
    """A dataset value -> prompt turns; BadRowError (a skip reason) for a value that is not a prompt."""
    if not chat:
        value = [{"role": "user", "content": _prompt_text(value)}]
    messages = clean_messages(value)
    reason = chat_problem(messages)
    if reason is not None:
        raise BadRowError(reason)
    if messages[-1]["role"] != "user":
        raise BadRowError("last_turn_not_user")
    return list(messages)


def _identity(cfg: GenerateConfig, model: TeacherInfo, dataset_fingerprint: str, max_model_len: int) -> dict[str, Any]:
    """What makes two runs' rows the same: a rerun into OUT_DIR must agree on every key."""
    local = Path(model.path).is_dir()
    return {
        "model": {
            "path": model.path,
            "revision": model.revision,
            "weights_sha256": weights_sha256(Path(model.path)) if local else None,
            "dtype": model.dtype,
            "tokenizer_fingerprint": tokenizer_fingerprint(model.tokenizer.backend_tokenizer.to_str()),
            "chat_template_sha256": chat_template_sha256(model.tokenizer),
        },
        "sampling": {**cfg.sampling(), "max_model_len": max_model_len},
        "dataset": {
            "source": Path(cfg.dataset).name if Path(cfg.dataset).exists() else cfg.dataset,  # content: fingerprint
            "fingerprint": dataset_fingerprint,
            "split": cfg.split,
            "text_field": None if cfg.messages_field else cfg.text_field,
            "messages_field": cfg.messages_field,
            "max_prompts": cfg.max_prompts,
            "prompt_format": cfg.prompt_format,
            "prompt_tokens": cfg.prompt_tokens,
        },
    }


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`section.key: old -> new` for every key of the identity that differs."""
    return [
        f"{section}.{key}: it has {old.get(section, {}).get(key)!r}, this run {value!r}"
        for section, values in new.items()
        for key, value in values.items()
        if old.get(section, {}).get(key) != value
    ]


def _open_output(cfg: GenerateConfig, identity: dict[str, Any], rows_total: int) -> tuple[GenerateProgress, bool]:
    """Creates OUT_DIR for this run, or reopens it after checking it holds this run; data.jsonl is cut back to the
    last recorded batch. Returns the progress and whether the run had already finished."""
    out = Path(cfg.output)
    generation = out / GENERATION_FILE
    if generation.exists():
        existing = json.loads(generation.read_text())
        diffs = _differences(existing.get("identity", {}), identity)
        if diffs:
            raise ValueError(
                f"{out} holds generations made with other settings ({'; '.join(diffs)}); use another --output "
                "directory, or delete this one to regenerate"
            )
        finished = bool(existing.get("finished"))
    else:
        if out.exists() and any(out.iterdir()):
            names = sorted(p.name for p in out.iterdir())[:3]
            raise ValueError(f"{out} is not empty and holds no {GENERATION_FILE} ({names}); choose a new --output")
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(generation, {"identity": identity, "config": cfg.to_dict(), "finished": False})
        finished = False
    progress_file = out / PROGRESS_FILE
    if progress_file.exists():
        progress = GenerateProgress.from_dict(json.loads(progress_file.read_text()), rows_total)
    else:
        progress = GenerateProgress(rows_total=rows_total)
    data = out / DATA_FILE
    size = data.stat().st_size if data.exists() else 0
    if size < progress.data_bytes:
        raise ValueError(
            f"{data} has {size} bytes, fewer than the {progress.data_bytes} that {PROGRESS_FILE} records: it was cut or "
            "replaced; delete OUT_DIR to regenerate"
        )
    if size > progress.data_bytes:
        logger.info("dropping %d bytes of an unrecorded batch from %s", size - progress.data_bytes, data)
    with data.open("ab") as f:
        f.truncate(progress.data_bytes)
    return progress, finished


class _Engine:
    """The vLLM engine (`pipeline.backends.vllm_backend.start_llm`), started when the first batch needs it; one
    given by the caller is used as is and not shut down here."""

    def __init__(self, cfg: GenerateConfig, model: TeacherInfo, max_model_len: int, llm: Any = None) -> None:
        self._cfg, self._model, self._max_model_len = cfg, model, max_model_len
        self._llm, self._owned = llm, llm is None
        if llm is not None and llm.llm_engine.model_config.max_model_len < max_model_len:
            raise ValueError(f"the given engine's max_model_len is below this run's {max_model_len}")

    def get(self) -> Any:
        if self._llm is None:
            from logitcache.pipeline.backends.vllm_backend import EngineSettings, seeded_sampling_args, start_llm

            cfg = self._cfg
            settings = EngineSettings(
                self._model.path,
                self._model.dtype,
                self._max_model_len,
                cfg.tensor_parallel_size,
                cfg.pipeline_parallel_size,
                cfg.gpu_memory_utilization,
            )
            self._llm = start_llm(
                settings,
                max_logprobs=0,  # no log-probs are returned: the teacher scores the rows later
                revision=cfg.revision,
                trust_remote_code=cfg.trust_remote_code,
                engine_args={**seeded_sampling_args(), **cfg.engine_args},
            )
        return self._llm

    def close(self) -> None:
        if self._llm is not None and self._owned:
            from logitcache.pipeline.backends.vllm_backend import shutdown_llm

            shutdown_llm(self._llm)


def _batch_prompts(
    rows: Any, start: int, stop: int, cfg: GenerateConfig, tokenizer: Any, max_model_len: int
) -> tuple[list[_Prompt], Counter[str]]:
    """Dataset rows [start, stop) -> their prompts, and the rows skipped per reason."""
    column = cfg.messages_field or cfg.text_field
    values = rows.select(range(start, stop)).with_format(None)[column]
    prompts, skipped = [], Counter[str]()
    for index, value in zip(range(start, stop), values):
        try:
            if cfg.prompt_format == "text":
                prompt = _text_prompt(index, value, tokenizer, cfg.prompt_tokens)
            else:
                messages = _prompt_messages(value, chat=cfg.messages_field is not None)
                prompt = _Prompt(index, messages, render_prompt(tokenizer, messages).tolist())
            if len(prompt.token_ids) >= max_model_len:
                raise BadRowError("prompt_too_long")
        except UnsupportedRoleError as e:
            raise UnsupportedRoleError(f"dataset row {index} (field {column!r}): {e}") from None
        except BadRowError as e:
            skipped[e.reason] += 1
            continue
        prompts.append(prompt)
    return prompts, skipped


def _generate_rows(llm: Any, prompts: list[_Prompt], cfg: GenerateConfig, max_model_len: int) -> list[dict[str, Any]]:
    """One `generate` call for every (prompt, sample) of a batch; rows in prompt, then sample order."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    requests, params = [], []
    for p in prompts:
        for j in range(cfg.n):
            requests.append(TokensPrompt(prompt_token_ids=p.token_ids))
            params.append(
                SamplingParams(
                    n=1,
                    temperature=cfg.temperature,
                    top_p=cfg.top_p,
                    max_tokens=min(cfg.max_new_tokens, max_model_len - len(p.token_ids)),
                    seed=sample_seed(cfg.seed, p.index, j),
                    stop=list(cfg.stop) or None,
                )
            )
    outputs = llm.generate(requests, params, use_tqdm=False) if requests else []
    rows = []
    for k, output in enumerate(outputs):
        p, j = prompts[k // cfg.n], k % cfg.n
        (completion,) = output.outputs
        if completion.finish_reason not in FINISH_REASONS:
            raise RuntimeError(f"vLLM finished prompt {p.index} sample {j} with {completion.finish_reason!r}")
        if p.messages is None:
            written: dict[str, Any] = {"prompt": p.text, "text": p.text + completion.text}
        else:
            written = {"messages": [*p.messages, {"role": "assistant", "content": completion.text}]}
        rows.append(
            {
                **written,
                "finish_reason": completion.finish_reason,
                "prompt_index": p.index,
                "sample_index": j,
                "response_tokens": len(completion.token_ids),
                # Re-tokenizing the text need not give back the sampled ids (BPE has many spellings of a string,
                # and the text drops the EOS token): on-policy scoring needs the ids the model produced.
                "prompt_token_ids": p.token_ids,
                "response_token_ids": list(completion.token_ids),
            }
        )
    return rows


def _append_batch(
    out: Path, rows: list[dict[str, Any]], skipped: Counter[str], end: int, progress: GenerateProgress
) -> None:
    """Appends a batch's rows to data.jsonl (fsync'd), then records the progress: a batch counts once it is recorded."""
    with (out / DATA_FILE).open("ab") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())
        progress.data_bytes = f.tell()
    progress.rows_done = end
    progress.samples += len(rows)
    progress.response_tokens += sum(r["response_tokens"] for r in rows)
    progress.finish_reasons.update(r["finish_reason"] for r in rows)
    progress.skipped.update(skipped)
    atomic_write_json(out / PROGRESS_FILE, progress.to_dict())


def _resolve_max_model_len(cfg: GenerateConfig, model: TeacherInfo) -> int:
    if cfg.max_model_len is None:
        return min(model.max_positions, MAX_DEFAULT_MODEL_LEN)
    if cfg.max_model_len > model.max_positions:
        raise ValueError(
            f"`--max-model-len` {cfg.max_model_len} is over the model's max_position_embeddings ({model.max_positions})"
        )
    return cfg.max_model_len


def run_generate(
    cfg: GenerateConfig, on_batch: Callable[[GenerateProgress], None] | None = None, llm: Any = None
) -> GenerateResult:
    """Generate `cfg.n` responses for every prompt of `cfg.dataset` into `cfg.output`, resuming a killed run.

    `llm` reuses a running vLLM `LLM` (tests, benchmarks; not shut down here); by default one is started when the
    first batch needs it.
    """
    import vllm

    model = resolve_teacher(cfg.model, cfg.dtype, cfg.revision, cfg.trust_remote_code)
    if cfg.prompt_format == "chat" and not model.tokenizer.chat_template:
        raise ValueError(
            f"--model {cfg.model}: its tokenizer has no chat template, which `--prompt-format chat` needs; use "
            "`--prompt-format text` for a base model"
        )
    max_model_len = _resolve_max_model_len(cfg, model)
    data = load_rows(cfg.dataset, cfg.split, cfg.max_prompts)
    column = cfg.messages_field or cfg.text_field
    if column not in data.rows.column_names:
        flag = "--messages-field" if cfg.messages_field else "--text-field"
        raise ValueError(f"the dataset has no column {column!r} ({flag}); its columns are {data.rows.column_names}")
    identity = _identity(cfg, model, data.fingerprint, max_model_len)
    out = Path(cfg.output)
    progress, finished = _open_output(cfg, identity, len(data.rows))
    if finished:
        return GenerateResult("already_finished", out, json.loads((out / GENERATION_FILE).read_text()))
    if progress.rows_done:
        logger.info("resuming at dataset row %d (%d responses stored)", progress.rows_done, progress.samples)
    engine = _Engine(cfg, model, max_model_len, llm)
    start_time, seconds = time.monotonic(), 0.0
    try:
        for start in range(progress.rows_done, len(data.rows), cfg.batch_size):
            end = min(start + cfg.batch_size, len(data.rows))
            prompts, skipped = _batch_prompts(data.rows, start, end, cfg, model.tokenizer, max_model_len)
            t0 = time.monotonic()
            rows = _generate_rows(engine.get(), prompts, cfg, max_model_len) if prompts else []
            seconds += time.monotonic() - t0
            _append_batch(out, rows, skipped, end, progress)
            if on_batch:
                on_batch(progress)
    finally:
        engine.close()
    generation = {
        "identity": identity,
        "config": cfg.to_dict(),
        "engine_version": f"vllm {vllm.__version__}",
        "counts": {"prompts": len(data.rows), **progress.to_dict()},
        # of this invocation (a resumed run counts its own part)
        "run_seconds": round(time.monotonic() - start_time, 2),
        "engine_seconds": round(seconds, 2),
        "finished": True,
    }
    atomic_write_json(out / GENERATION_FILE, generation)
    return GenerateResult("finished", out, generation)
