"""`logitcache demo-teacher --quick`: an offline, deterministic teacher + datasets, reused when already built."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from logitcache.storage.cli import main


def test_demo_teacher_quick_builds_and_reuses(tmp_path: Path, tiny_demo_dir: Path) -> None:
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo-teacher", "--output", str(out), "--quick", "--steps", "2"])
    assert result.exit_code == 0, result.output
    teacher = out / "teacher"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (teacher / name).is_file(), name
    config = json.loads((teacher / "config.json").read_text())
    assert config["model_type"] == "llama" and config["head_dim"] == 32 and config["tie_word_embeddings"]
    rows = [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    chats = [json.loads(line) for line in (out / "data" / "chat.jsonl").read_text().splitlines()]
    assert rows and all(r["text"].strip() for r in rows)
    assert chats and all(any(m["role"] == "assistant" for m in c["messages"]) for c in chats)
    assert (out / "data" / "heldout.jsonl").is_file() and (out / "data" / "chat_heldout.jsonl").is_file()
    # Deterministic: the same data as the session fixture's build (same spec, same seed, same stdlib).
    assert (out / "data" / "train.jsonl").read_text() == (tiny_demo_dir / "data" / "train.jsonl").read_text()
    assert (teacher / "tokenizer.json").read_text() == (tiny_demo_dir / "teacher" / "tokenizer.json").read_text()
    # A second run with the same settings reuses the build.
    stamp = (teacher / "model.safetensors").stat().st_mtime_ns
    result = CliRunner().invoke(main, ["demo-teacher", "--output", str(out), "--quick", "--steps", "2"])
    assert result.exit_code == 0, result.output
    assert (teacher / "model.safetensors").stat().st_mtime_ns == stamp
