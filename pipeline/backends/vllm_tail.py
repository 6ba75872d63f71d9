"""The frontend half of vLLM's in-engine targets: the request flag, the tail column, and where the hook may run.

vLLM returns only a top-k of prompt log-probs, from which no adaptive k or sampled draws can be made, and the tail
only as 1 - sum(exp(head)): at a confident position the float32 top-1 log-prob rounds to 0 and that tail to exactly
0, and tails below ~1e-4 come out with percent-level errors. Inside the model runner the full-vocabulary log-probs
exist, so every mode's entries and its exact tail are computed there (vllm_targets.py, the worker half, with
pipeline.targets.targets_from_logprobs as the HF backend does) and travel as prompt log-probs:
  - a request asks for them with `SamplingParams.extra_args[TARGETS_KEY] = request_targets(spec, sequence_id)`
    and `prompt_logprobs = spec.max_entries + 1`;
  - each returned row is [next token, W entries (padding -1/-inf), (TAIL_TOKEN_ID, log tail)], flat or raw;
  - the frontend checks the sentinel id in the last column (`split_tail_column`), so an engine without the
    wrapper can never pass a (W+1)-th log-prob off as a tail.
Private vLLM API: used only on TESTED_VLLM_VERSIONS. Elsewhere `topk` falls back to vLLM's own top-k with the tail
`1 - sum(head)` (recorded as HEAD_SUM_TAIL in the cache header), and `adaptive`/`sampled` refuse to start
(`engine_targets_unavailable`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from logitcache.storage.targets import TargetSpec

logger = logging.getLogger(__name__)

__all__ = [
    "ENGINE_TAIL",
    "EXTENSION_CLS",
    "HEAD_SUM_TAIL",
    "TAIL_TOKEN_ID",
    "TARGETS_KEY",
    "TESTED_VLLM_VERSIONS",
    "engine_tail_unavailable",
    "engine_targets_unavailable",
    "request_targets",
    "split_tail_column",
]

ENGINE_TAIL = "engine_complement_lse"  # exp(logsumexp over the vocabulary minus the entries), full log-probs
HEAD_SUM_TAIL = "one_minus_head_sum"  # 1 - sum(exp(top-k log-probs)): float32 rounding of the head dominates
TARGETS_KEY = "logitcache_targets"
TAIL_TOKEN_ID = -1  # id of the appended column: no token has it, so a missing wrapper cannot go unnoticed
TESTED_VLLM_VERSIONS = ("0.32.0",)
EXTENSION_CLS = "logitcache.pipeline.backends.vllm_targets.TargetsWorkerExtension"
PROMPT_LOGPROB_MODES = ("raw_logprobs", "processed_logprobs")  # prompt tokens skip processors: both are log-probs


def request_targets(spec: TargetSpec, sequence_id: int) -> dict[str, Any]:
    """The value of `extra_args[TARGETS_KEY]` for one window's request (plain types: it crosses to the engine)."""
    return {"targets": spec.to_header(), "sequence_id": int(sequence_id)}


def engine_targets_unavailable(spec: TargetSpec, vllm_version: str, engine_args: Mapping[str, Any]) -> str | None:
    """Why `spec` cannot be captured with this vLLM and these `--engine-arg`s; None when it can.

    `topk` always can (vLLM's own top-k is the fallback); `adaptive` and `sampled` need the in-engine hook.
    """
    reason = engine_tail_unavailable(vllm_version, engine_args)
    if reason is None or spec.mode == "topk":
        return None
    return (
        f"`--targets {spec.mode}` is computed inside vLLM's workers, which is supported on vLLM "
        f"{', '.join(TESTED_VLLM_VERSIONS)} only: {reason}. Use `--backend hf`, or `--targets topk`"
    )


def engine_tail_unavailable(vllm_version: str, engine_args: Mapping[str, Any]) -> str | None:
    """Why the in-engine tail cannot be used with this vLLM and these `--engine-arg`s; None when it can.

    Decided before the engine starts, so a capture can record its tail method in the header it writes first.
    """
    # the engine's own version, not the frontend's, is checked again in every worker (vllm_targets._install)
    if vllm_version not in TESTED_VLLM_VERSIONS:
        return (
            f"vLLM {vllm_version} is not among the versions the in-engine targets are tested on {TESTED_VLLM_VERSIONS}"
        )
    if engine_args.get("worker_extension_cls"):
        return "--engine-arg worker_extension_cls is set, and vLLM takes only one worker extension"
    mode = engine_args.get("logprobs_mode")
    if mode is not None and str(mode) not in PROMPT_LOGPROB_MODES:
        return f"--engine-arg logprobs_mode={mode} makes vLLM return logits, not log-probs"
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").strip().lower() in ("1", "true"):
        return "VLLM_USE_V2_MODEL_RUNNER=1 selects vLLM's V2 model runner, which the in-engine targets do not wrap"
    return None


def split_tail_column(entry_ids: np.ndarray, entry_logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[P, W+1] ids/log-probs whose last column is the engine's tail -> (ids [P,W], log-probs [P,W], tail f32 [P])."""
    if entry_ids.shape[1] < 2 or not np.all(entry_ids[:, -1] == TAIL_TOKEN_ID):
        raise RuntimeError(
            "vLLM returned no tail column (the last prompt log-prob is a token, not the in-engine tail): the worker "
            f"extension {EXTENSION_CLS} did not run in the model runner"
        )
    # log tail is a moderate negative float32 (e.g. -20 for 2e-9): exp keeps its ~1e-7 relative precision.
    tail = np.exp(entry_logprobs[:, -1].astype(np.float64)).astype(np.float32)
    return entry_ids[:, :-1], entry_logprobs[:, :-1], tail
