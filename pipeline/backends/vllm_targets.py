"""Sparse teacher targets computed inside vLLM's workers, where the full-vocabulary log-probs exist (vLLM 0.32).

Loaded in the worker processes as vLLM's `worker_extension_cls` (vllm_tail.EXTENSION_CLS); the frontend half of the
protocol (request flag, tail column, version checks) is vllm_tail.py.

  - `llm.collective_rpc("logitcache_install_targets")` wraps each worker's own model runner (an instance
    attribute: nothing global is patched, other engines are untouched).
  - A request whose `SamplingParams.extra_args[TARGETS_KEY]` holds a target spec and its window's sequence_id asks
    for `prompt_logprobs = W + 1` (W = spec.max_entries). vLLM's `_get_prompt_logprobs_dict` is run once for the
    other requests, then once per one of ours with `num_prompt_logprobs` narrowed to it and the sampler's gather
    swapped for one bound to that request's spec, sequence_id and chunk start. That gather calls
    `pipeline.targets.targets_from_logprobs` on the [n, V] log-probs and returns per row [actual next token, the
    W entries, (TAIL_TOKEN_ID, log tail)], which vLLM copies into the request's buffer and ships as prompt
    log-probs, flat or raw, to the frontend.
  - Chunked prefill: vLLM's code reads the chunk's first prompt index as `request.num_computed_tokens` (set by
    `_update_states` at the start of the step) and writes the chunk's rows at that offset, so row i of a gather
    call is window position `num_computed_tokens + i`; the wrapper reads the same attribute just before the call
    (nothing changes it in between). TP: every rank holds the all-gathered logits and computes the same rows (the
    draws are counter-based, not RNG state); the driver's output is returned. PP: only the last stage computes them.
Private vLLM API: installed only on vllm_tail.TESTED_VLLM_VERSIONS.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, cast

from logitcache.pipeline.backends.vllm_tail import (
    PROMPT_LOGPROB_MODES,
    TAIL_TOKEN_ID,
    TARGETS_KEY,
    TESTED_VLLM_VERSIONS,
)
from logitcache.storage.targets import TargetSpec

__all__ = ["TargetsWorkerExtension"]


class TargetsWorkerExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); its methods are called with `collective_rpc`."""

    model_runner: Any  # the worker's, set by vLLM

    def logitcache_install_targets(self) -> str:
        """Wrap this worker's model runner; returns "" when done, else why it could not."""
        return _install(self.model_runner)


def _install(runner: Any) -> str:
    import vllm
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if vllm.__version__ not in TESTED_VLLM_VERSIONS:
        return f"vLLM {vllm.__version__} in the worker is not among {TESTED_VLLM_VERSIONS}"
    if not isinstance(runner, GPUModelRunner):
        return f"the worker's model runner {type(runner).__name__} is not vLLM's V1 GPUModelRunner (or a subclass)"
    runner = cast(Any, runner)  # instance attributes are set below
    mode = runner.model_config.logprobs_mode
    if mode not in PROMPT_LOGPROB_MODES:
        return f"logprobs_mode {mode!r} returns logits, not log-probs"
    if getattr(runner, "_logitcache_targets", False):
        return ""
    original = runner._get_prompt_logprobs_dict

    def prompt_logprobs_dict(hidden_states: Any, num_scheduled_tokens: dict[str, int]) -> dict[str, Any]:
        return _prompt_logprobs_with_targets(runner, original, hidden_states, num_scheduled_tokens)

    runner._get_prompt_logprobs_dict = prompt_logprobs_dict
    runner._logitcache_targets = True
    return ""


@functools.lru_cache(maxsize=64)
def _spec(items: tuple[tuple[str, Any], ...]) -> TargetSpec:
    return TargetSpec(**dict(items))


def _request_job(request: Any) -> tuple[TargetSpec, int] | None:
    """(spec, sequence_id) of one of our requests; None for any other request."""
    params = getattr(request, "sampling_params", None)
    job = (params.extra_args or {}).get(TARGETS_KEY) if params is not None else None
    if not job:
        return None
    return _spec(tuple(sorted(job["targets"].items()))), int(job["sequence_id"])


def _prompt_logprobs_with_targets(
    runner: Any, original: Callable[..., dict[str, Any]], hidden_states: Any, num_scheduled_tokens: dict[str, int]
) -> dict[str, Any]:
    """vLLM's `_get_prompt_logprobs_dict`, run once for other requests and once per one of ours (its own gather).

    `runner.num_prompt_logprobs` (req id -> width) is what vLLM's loop iterates and prunes as prefills complete;
    each call sees only its share, and the shared dict keeps the requests that no call completed.
    """
    pending = runner.num_prompt_logprobs
    ours = {r: job for r in pending if (job := _request_job(runner.requests.get(r))) is not None}
    if not ours:
        return original(hidden_states, num_scheduled_tokens)
    others = {r: n for r, n in pending.items() if r not in ours}
    out: dict[str, Any] = {}
    narrowed: list[tuple[dict[str, int], list[str]]] = []  # each call's share, and its ids before the call

    def call(share: dict[str, int]) -> None:
        narrowed.append((share, list(share)))
        runner.num_prompt_logprobs = share
        out.update(original(hidden_states, num_scheduled_tokens))

    try:
        if others:
            call(others)
        for r, (spec, sequence_id) in ours.items():
            if r not in num_scheduled_tokens:
                continue  # not in this step (vLLM's loop skips it too)
            start = runner.requests[r].num_computed_tokens  # the chunk's first prompt index, as vLLM's loop reads it
            runner.sampler.gather_logprobs = functools.partial(_gather_targets, spec, sequence_id, start)
            call({r: pending[r]})
    finally:
        runner.sampler.__dict__.pop("gather_logprobs", None)  # the instance attribute shadowed the static method
        runner.num_prompt_logprobs = pending
        for share, before in narrowed:
            for r in before:
                if r not in share:
                    del pending[r]  # its prefill completed: vLLM's loop removed it from the share
    return out


def _gather_targets(
    spec: TargetSpec, sequence_id: int, start: int, logprobs: Any, num_logprobs: int, token_ids: Any
) -> Any:
    """Stands in for `Sampler.gather_logprobs` for one request's chunk: rows = window positions start.. start+n-1.

    logprobs: float32 [n, V] full-vocabulary log-probs (overwritten: vLLM's loop reads them no more after the
    gather); token_ids: int64 [n] the prompt's next tokens. Returns vLLM's LogprobsTensors with, per row,
    [next token, W entries, TAIL_TOKEN_ID] ids (int32) and [its log-prob, W log-probs, log tail] (float32);
    num_logprobs = W + 1. Ranks are not computed (a pass over [n, V] nothing reads): 0.
    """
    import torch
    from vllm.v1.outputs import LogprobsTensors

    from logitcache.pipeline.targets import targets_from_logprobs

    width = spec.max_entries
    if num_logprobs != width + 1:
        raise RuntimeError(f"prompt_logprobs {num_logprobs} != max_entries {width} + 1 for {spec.to_header()}")
    n = logprobs.shape[0]
    token_ids = token_ids[:, None]
    next_lps = logprobs.gather(1, token_ids)
    positions = torch.arange(start, start + n, dtype=torch.int64, device=logprobs.device)
    ids, lps, tail = targets_from_logprobs(logprobs, spec, sequence_id, positions, inplace=True)
    sentinel = torch.full((n, 1), TAIL_TOKEN_ID, dtype=ids.dtype, device=ids.device)
    all_ids = torch.cat([token_ids, ids, sentinel], dim=1).to(torch.int32)
    all_lps = torch.cat([next_lps, lps, tail.log()[:, None]], dim=1)
    ranks = torch.zeros(n, dtype=torch.int32, device=logprobs.device)
    return LogprobsTensors(all_ids, all_lps, ranks)
