"""Stable fingerprints: of a tokenizer (what makes ids mean the same tokens) and of files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

__all__ = ["tokenizer_fingerprint", "sha256_file"]


def tokenizer_fingerprint(tokenizer_json: str) -> str:
    """sha256 of a HF `tokenizer.json`'s vocabulary, merges and special tokens (not of its formatting or
    normalizer options that leave ids unchanged), as "sha256:<hex>".

    Two tokenizers with the same fingerprint map the same strings to the same ids, so a student may reuse a
    teacher's cache; the padded embedding size of a model is not part of it.
    """
    doc = json.loads(tokenizer_json)
    model = doc.get("model", {})
    merges = model.get("merges") or []
    # merges appear as "a b" strings in older files and as ["a", "b"] pairs in newer ones: normalise.
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    added = sorted((t.get("id"), t.get("content"), bool(t.get("special"))) for t in doc.get("added_tokens") or [])
    canonical = json.dumps(
        {"type": model.get("type"), "vocab": model.get("vocab"), "merges": merges, "added": added},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a local file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()
