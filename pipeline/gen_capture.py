"""`cache-teacher --generate`: the teacher writes the responses, then its targets are stored on the tokens it wrote.

Sequence-level KD (Kim & Rush 2016) with word-level targets on top, in one command and one engine:
1. generation: `run_generate` over the prompt rows into OUTPUT-responses/ (data.jsonl + generation.json: resumable,
   seeded per response), sampled at --generate-temperature / --generate-top-p;
2. scoring: `run_capture` over those rows with `--response-ids` semantics: each sequence is the prompt's tokens plus
   exactly the sampled ids, and only the sampled ids are training targets. The targets are the teacher's T=1
   distribution (the capture path's raw log-probs) whatever the sampling temperature was.

Why two passes of one engine instead of reading log-probs at sampling time: vLLM's sample log-probs are a top-k after
the sampler's processing, with no tail mass and no way to draw the sampled-mode targets, which the capture path
computes inside the engine on the prompt log-probs of a prefill. The second pass is a prefill of (prompt + response)
(prefix caching stays off: vLLM returns no prompt log-probs for cached tokens); BENCHMARKS.md ("Generation")
measures its share of the command's time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from logitcache.pipeline.backends.vllm_backend import seeded_sampling_args
from logitcache.pipeline.capture import BatchProgress, CaptureResult, open_backend, resolve_max_seq_len, run_capture
from logitcache.pipeline.config import CaptureConfig, GenerateConfig
from logitcache.pipeline.generate import GENERATION_FILE, GenerateProgress, run_generate
from logitcache.pipeline.teacher import resolve_teacher
from logitcache.storage.options import settings_from

logger = logging.getLogger(__name__)

__all__ = ["generate_config", "run_generate_capture"]


def generate_config(cfg: CaptureConfig, max_seq_len: int) -> GenerateConfig:
    """The `generate` run of a `cache-teacher --generate` capture: responses fit one window (prompt + response <=
    max_seq_len tokens), so every generated token is scored with its whole context."""
    # the fields of the same name (dataset, text/messages field, split, dtype, engine settings) come from cfg
    return settings_from(
        GenerateConfig,
        cfg,
        model=cfg.teacher,
        output=cfg.responses_dir,
        max_prompts=cfg.limit,
        n=cfg.generate_n,
        temperature=cfg.generate_temperature,
        top_p=cfg.generate_top_p,
        max_new_tokens=cfg.generate_max_new_tokens,
        seed=cfg.generate_seed,
        prompt_format=cfg.generate_prompt_format,
        prompt_tokens=cfg.generate_prompt_tokens,
        max_model_len=max_seq_len,
        batch_size=cfg.batch_size or 256,
        stop=(),
        progress=False,
    )


def _generation_finished(output: str) -> bool:
    path = Path(output) / GENERATION_FILE
    return path.exists() and bool(json.loads(path.read_text()).get("finished"))


def run_generate_capture(
    cfg: CaptureConfig,
    on_batch: Callable[[BatchProgress], None] | None = None,
    on_generate: Callable[[GenerateProgress], None] | None = None,
) -> CaptureResult:
    """Generate the responses (or finish a killed generation), then capture the teacher's targets on them; one vLLM
    engine serves both steps. A rerun resumes whichever step was interrupted."""
    if not cfg.generate:
        raise ValueError("run_generate_capture needs a config with --generate")
    teacher = resolve_teacher(cfg.teacher, cfg.dtype, cfg.revision, cfg.trust_remote_code)
    max_seq_len = resolve_max_seq_len(cfg, teacher)
    gen_cfg = generate_config(cfg, max_seq_len)
    backend: Any = None
    try:
        if not _generation_finished(gen_cfg.output):
            engine_args = {**seeded_sampling_args(), **cfg.engine_args}  # the responses are seeded
            backend = open_backend(dataclasses.replace(cfg, engine_args=engine_args), teacher, max_seq_len)
            result = run_generate(gen_cfg, on_batch=on_generate, llm=backend.llm)
            counts = result.generation["counts"]
            logger.info(
                "generated %d responses (%d tokens) into %s",
                counts["samples"],
                counts["response_tokens"],
                result.output,
            )
        return run_capture(cfg, on_batch=on_batch, backend=backend)
    finally:
        if backend is not None:
            backend.close()
