"""What identifies a teacher in a cache header: resolved path, weights hash, dtype, tokenizer, vocabulary, limits."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["TeacherInfo", "resolve_teacher", "weights_sha256"]


@dataclass(frozen=True)
class TeacherInfo:
    """A loaded teacher config + tokenizer, and the facts the capture needs before starting an engine."""

    name: str
    path: str
    revision: str | None
    dtype: str  # resolved: never "auto"
    config: Any  # transformers PretrainedConfig
    tokenizer: Any  # transformers tokenizer
    vocab_size: int  # tokens the tokenizer defines
    padded_vocab_size: int  # rows of the LM head (model config vocab_size), >= vocab_size
    max_positions: int  # longest sequence the model was built for


def weights_sha256(model_dir: Path) -> str | None:
    """sha256 over the sorted `*.safetensors` files (name + content hash); None when there are none."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    from logitcache.storage import sha256_file

    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def _checkpoint_dtype(config: Any) -> str:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    return name if name in ("float32", "float16", "bfloat16") else "float32"


def resolve_teacher(
    teacher: str, dtype: str = "auto", revision: str | None = None, trust_remote_code: bool = False
) -> TeacherInfo:
    """Load the teacher's config and tokenizer (not its weights) with clear errors for a missing/odd path."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(teacher)
    local = path.exists()
    if not local and (teacher.startswith((".", "/", "~")) or teacher.count("/") != 1):
        raise FileNotFoundError(
            f"--teacher {teacher}: no such directory, and not a hub model name (owner/name); "
            "pass a directory with config.json and the weights, or build the demo with `logitcache demo-teacher`"
        )
    if local and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"--teacher {teacher}: {path / 'config.json'} is missing; is this a HF model directory?"
        )
    source = str(path.resolve()) if local else teacher
    config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise FileNotFoundError(f"--teacher {teacher}: could not load its tokenizer ({e})") from e
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ValueError(f"--teacher {teacher}: needs a fast tokenizer (tokenizer.json) to fingerprint and align it")
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    padded = int(text_config.vocab_size)
    if len(tokenizer) > padded:
        raise ValueError(
            f"--teacher {teacher}: the tokenizer has {len(tokenizer)} tokens but the model only {padded} embeddings; "
            "the tokenizer does not belong to this model"
        )
    return TeacherInfo(
        name=path.name if local else teacher,
        path=source,
        revision=revision,
        dtype=_checkpoint_dtype(config) if dtype == "auto" else dtype,
        config=config,
        tokenizer=tokenizer,
        vocab_size=len(tokenizer),
        padded_vocab_size=padded,
        max_positions=int(getattr(text_config, "max_position_embeddings", 0) or 1 << 20),
    )
