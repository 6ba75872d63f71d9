"""The exact tail mass for vLLM prompt log-probs, computed inside the engine where the full distribution exists.

vLLM returns only the top-k log-probs, from which the tail can only be 1 - sum(exp(head)): at a confident
position the float32 top-1 log-prob rounds to 0 and that tail to exactly 0, and tails below ~1e-4 come out with
percent-level errors. Inside the model runner the full-vocabulary log-probs exist, so the tail is computed there
as the HF backend does: exp(logsumexp of the log-probs outside the top-k), small relative error at any size.

How it gets there and back (vLLM 0.32, V1 model runner; the CPU runner inherits it):
  - `TailWorkerExtension` is passed as the engine argument `worker_extension_cls`; vLLM mixes it into the worker
    class of every worker process, so `llm.collective_rpc("logitcache_install_tail")` can wrap each worker's own
    model runner (an instance attribute: nothing global is patched, other engines are untouched).
  - A request whose `SamplingParams.extra_args` holds TAIL_FLAG asks for `prompt_logprobs = k + 1`. For such
    requests the wrapped `_get_prompt_logprobs_dict` runs vLLM's own code with the sampler's gather swapped for
    one that gathers the top-k and appends a column (TAIL_TOKEN_ID, log tail). Everything else is vLLM's:
    chunked prefill (a chunk's rows are copied into the request's buffer), the mapping to request ids, TP (every
    rank holds the all-gathered logits and computes the same column; the driver's output is returned), PP (only
    the last stage computes prompt log-probs), and the transport to the frontend, flat or raw.
  - The frontend checks the sentinel id in the last column (`split_tail_column`), so an engine without the
    wrapper can never pass a (k+1)-th log-prob off as a tail.
Private vLLM API: applied only on the versions it was tested with (TESTED_VLLM_VERSIONS); elsewhere the backend
falls back to `tail_from_topk` and records that in the cache header.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, cast

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "ENGINE_TAIL",
    "HEAD_SUM_TAIL",
    "TAIL_FLAG",
    "TAIL_TOKEN_ID",
    "TESTED_VLLM_VERSIONS",
    "TailWorkerExtension",
    "engine_tail_unavailable",
    "split_tail_column",
]

ENGINE_TAIL = "engine_complement_lse"  # exp(logsumexp over the vocabulary minus the top-k), full log-probs
HEAD_SUM_TAIL = "one_minus_head_sum"  # 1 - sum(exp(top-k log-probs)): float32 rounding of the head dominates
TAIL_FLAG = "logitcache_engine_tail"
TAIL_TOKEN_ID = -1  # id of the appended column: no token has it, so a missing wrapper cannot go unnoticed
TESTED_VLLM_VERSIONS = ("0.32.0",)
EXTENSION_CLS = f"{__name__}.TailWorkerExtension"
_PROMPT_LOGPROB_MODES = ("raw_logprobs", "processed_logprobs")  # prompt tokens skip processors: both are log-probs


def engine_tail_unavailable(vllm_version: str, engine_args: Mapping[str, Any]) -> str | None:
    """Why the in-engine tail cannot be used with this vLLM and these `--engine-arg`s; None when it can.

    Decided before the engine starts, so a capture can record its tail method in the header it writes first.
    """
    if vllm_version not in TESTED_VLLM_VERSIONS:
        return f"vLLM {vllm_version} is not among the versions the in-engine tail is tested on {TESTED_VLLM_VERSIONS}"
    if engine_args.get("worker_extension_cls"):
        return "--engine-arg worker_extension_cls is set, and vLLM takes only one worker extension"
    mode = engine_args.get("logprobs_mode")
    if mode is not None and str(mode) not in _PROMPT_LOGPROB_MODES:
        return f"--engine-arg logprobs_mode={mode} makes vLLM return logits, not log-probs"
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").strip().lower() in ("1", "true"):
        return "VLLM_USE_V2_MODEL_RUNNER=1 selects vLLM's V2 model runner, which the in-engine tail does not wrap"
    return None


def split_tail_column(entry_ids: np.ndarray, entry_logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[P, k+1] ids/log-probs whose last column is the engine's tail -> (ids [P,k], log-probs [P,k], tail f32 [P])."""
    if entry_ids.shape[1] < 2 or not np.all(entry_ids[:, -1] == TAIL_TOKEN_ID):
        raise RuntimeError(
            "vLLM returned no tail column (the last prompt log-prob is a token, not the in-engine tail): the worker "
            f"extension {EXTENSION_CLS} did not run in the model runner"
        )
    # log tail is a moderate negative float32 (e.g. -20 for 2e-9): exp keeps its ~1e-7 relative precision.
    tail = np.exp(entry_logprobs[:, -1].astype(np.float64)).astype(np.float32)
    return entry_ids[:, :-1], entry_logprobs[:, :-1], tail


class TailWorkerExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); its methods are called with `collective_rpc`."""

    model_runner: Any  # the worker's, set by vLLM

    def logitcache_install_tail(self) -> str:
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
    if mode not in _PROMPT_LOGPROB_MODES:
        return f"logprobs_mode {mode!r} returns logits, not log-probs"
    if getattr(runner, "_logitcache_tail", False):
        return ""
    original = runner._get_prompt_logprobs_dict

    def prompt_logprobs_dict(hidden_states: Any, num_scheduled_tokens: dict[str, int]) -> dict[str, Any]:
        return _prompt_logprobs_with_tail(runner, original, hidden_states, num_scheduled_tokens)

    runner._get_prompt_logprobs_dict = prompt_logprobs_dict
    runner._logitcache_tail = True
    return ""


def _wants_tail(request: Any) -> bool:
    params = getattr(request, "sampling_params", None)
    return bool(params is not None and (params.extra_args or {}).get(TAIL_FLAG))


def _prompt_logprobs_with_tail(
    runner: Any, original: Callable[..., dict[str, Any]], hidden_states: Any, num_scheduled_tokens: dict[str, int]
) -> dict[str, Any]:
    """vLLM's `_get_prompt_logprobs_dict`, run once for other requests and once, with the tail gather, for ours.

    `runner.num_prompt_logprobs` (req id -> k) is what vLLM's loop iterates and prunes as prefills complete; each
    call sees only its share, and the shared dict keeps the requests neither call completed.
    """
    pending = runner.num_prompt_logprobs
    ours = {r: n for r, n in pending.items() if _wants_tail(runner.requests.get(r))}
    if not ours:
        return original(hidden_states, num_scheduled_tokens)
    others = {r: n for r, n in pending.items() if r not in ours}
    out: dict[str, Any] = {}
    try:
        if others:
            runner.num_prompt_logprobs = others
            out.update(original(hidden_states, num_scheduled_tokens))
        runner.num_prompt_logprobs = ours
        runner.sampler.gather_logprobs = _gather_with_tail  # shadows the static method for this call only
        try:
            out.update(original(hidden_states, num_scheduled_tokens))
        finally:
            del runner.sampler.gather_logprobs
    finally:
        runner.num_prompt_logprobs = pending
        for r in [r for r in pending if r not in others and r not in ours]:
            del pending[r]
    return out


def _gather_with_tail(logprobs: Any, num_logprobs: int, token_ids: Any) -> Any:
    """vLLM's gather of the top-(num_logprobs - 1) plus a last column (TAIL_TOKEN_ID, log of the mass outside them).

    logprobs: float32 [n, V] full-vocabulary log-probs, overwritten; token_ids: int64 [n] prompt targets.
    log tail = m + log(sum over the complement of exp(logprob - m)), m = the k-th log-prob: every complement term is
    <= 1, so nothing overflows, and the sum has no cancellation (~1e-7 relative error, as a masked logsumexp).
    In place: vLLM's loop reads the log-probs no more after this gather (0.32), and an in-place pass costs 80 ms per
    1024 x 32k positions on one CPU core where a masked copy + logsumexp costs 360 ms (log_softmax: 185 ms), and
    needs no memory beyond vLLM's own.
    """
    import torch
    from vllm.v1.outputs import LogprobsTensors
    from vllm.v1.sample.sampler import Sampler

    ids, lps, ranks, *_ = Sampler.gather_logprobs(logprobs, num_logprobs - 1, token_ids)
    # -inf when k reaches past the finite log-probs; then the complement is all -inf and the tail 0
    shift = lps[:, -1:].clamp(min=torch.finfo(logprobs.dtype).min)
    terms = logprobs.sub_(shift).exp_()  # head terms may overflow to inf: they are zeroed next
    terms.scatter_(1, ids[:, 1:], 0.0)
    log_tail = shift[:, 0] + terms.sum(dim=-1).log()
    sentinel = torch.full((ids.shape[0], 1), TAIL_TOKEN_ID, dtype=ids.dtype, device=ids.device)
    return LogprobsTensors(torch.cat([ids, sentinel], 1), torch.cat([lps, log_tail[:, None].to(lps.dtype)], 1), ranks)
