"""Opt-in "tensor passthrough" for vLLM prompt log-probs: keep the engine's [n, k+1] arrays, skip per-entry Python.

vLLM's frontend turns every prompt chunk's log-prob tensors into Python lists and appends each (token, log-prob,
rank) entry one by one (`LogprobsProcessor._update_prompt_logprobs`), even with `flat_logprobs=True`. For a
request whose `SamplingParams.extra_args` holds `RAW_FLAG`, this patch keeps the numpy views of those tensors
instead; all other requests take vLLM's own path. It patches a private vLLM class, so it is applied only on the
vLLM versions it was tested with (TESTED_VLLM_VERSIONS); elsewhere `install()` returns False and the caller uses
the flat path.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["RAW_FLAG", "RawPromptLogprobs", "TESTED_VLLM_VERSIONS", "install", "decode_raw_prompt_logprobs"]

RAW_FLAG = "logitcache_raw_prompt_logprobs"
TESTED_VLLM_VERSIONS = ("0.32.0",)
_installed = False


class RawPromptLogprobs:
    """One request's prompt log-probs as the engine sent them: chunks of token ids / log-probs, each [n_i, k+1]."""

    def __init__(self) -> None:
        self.token_ids: list[np.ndarray] = []
        self.logprobs: list[np.ndarray] = []

    def __len__(self) -> int:  # as vLLM counts prompt log-probs: one (empty) entry for the first token
        return 1 + sum(len(c) for c in self.token_ids)


def install() -> bool:
    """Patch vLLM's frontend logprobs processor (once); False when this vLLM version is untested."""
    global _installed
    if _installed:
        return True
    import vllm
    from vllm.v1.engine.logprobs import LogprobsProcessor

    if vllm.__version__ not in TESTED_VLLM_VERSIONS:
        logger.warning("vLLM %s is not among %s: using the flat log-prob path", vllm.__version__, TESTED_VLLM_VERSIONS)
        return False
    original_new = LogprobsProcessor.from_new_request.__func__  # type: ignore[attr-defined]
    original_update = LogprobsProcessor._update_prompt_logprobs

    def from_new_request(cls: Any, tokenizer: Any, request: Any) -> Any:
        proc = original_new(cls, tokenizer, request)
        extra = getattr(request.sampling_params, "extra_args", None) or {}
        if extra.get(RAW_FLAG) and proc.prompt_logprobs is not None:
            proc.prompt_logprobs = RawPromptLogprobs()
        return proc

    def update_prompt_logprobs(self: Any, tensors: Any) -> None:
        if not isinstance(self.prompt_logprobs, RawPromptLogprobs):
            return original_update(self, tensors)
        token_ids, logprobs, *_ = tensors
        # Copies: the engine may reuse the buffers these tensors view.
        self.prompt_logprobs.token_ids.append(token_ids.numpy().copy())
        self.prompt_logprobs.logprobs.append(logprobs.numpy().copy())
        return None

    LogprobsProcessor.from_new_request = classmethod(from_new_request)  # type: ignore[method-assign,assignment]
    LogprobsProcessor._update_prompt_logprobs = update_prompt_logprobs  # type: ignore[method-assign,assignment]
    _installed = True
    return True


def decode_raw_prompt_logprobs(raw: Any, input_ids: np.ndarray, top_k: int) -> tuple[np.ndarray, ...]:
    """RawPromptLogprobs of one prompt -> (entry_ids int32 [L-1,k], entry_logprobs f32 [L-1,k], target f32 [L-1]).

    Each row is [actual next token, top-1..top-k] as in the flat layout; rows cover prompt positions 0..L-2.
    """
    if not isinstance(raw, RawPromptLogprobs):
        raise RuntimeError(f"expected raw prompt log-probs, got {type(raw).__name__}; was the patch installed?")
    n = len(input_ids) - 1
    ids = np.concatenate(raw.token_ids) if raw.token_ids else np.zeros((0, top_k + 1), np.int64)
    lps = np.concatenate(raw.logprobs) if raw.logprobs else np.zeros((0, top_k + 1), np.float32)
    if ids.shape != (n, top_k + 1):
        raise RuntimeError(f"raw prompt log-probs have shape {ids.shape}, expected {(n, top_k + 1)}")
    if not np.array_equal(ids[:, 0], input_ids[1:]):
        raise RuntimeError("raw prompt log-probs: the first column is not the prompt's next token")
    return ids[:, 1:].astype(np.int32), lps[:, 1:].astype(np.float32, copy=False), lps[:, 0].astype(np.float32)
