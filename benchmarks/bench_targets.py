"""Which sparse target mode should a cache store? topk vs adaptive vs sampled, side by side (issue 10).

Two teacher regimes: the benchmark teacher as trained (benchmarks/_common.py; flat, V=4096) and the same teacher
SHARPENED to a real LLM's entropy: its final RMSNorm gain multiplied by beta (logits x beta exactly; the norm gain
is not tied, unlike the output embedding), saved as a real HF model dir, beta found by bisection so that the mean
entropy on the held-out windows is --target-entropy (1.5 nats). The teacher's full log-softmax over the training
windows is computed once per regime; each row's targets then go through the real path: full log-probs ->
`pipeline.targets.targets_from_logprobs` + `compact_entries` -> CachedSequence -> `storage.write_cache` ->
`CacheReader` -> the sparse target view -> `train.data.collate` -> `train.student.DistillModel` (the trainer's loss).

Rows: CE only (alpha=0), full-distribution KD (forward KL on the full vocabulary: what a live teacher gives, its
deterministic log-probs precomputed), topk k in {8, 32, 64, 128} (+ exact tail), sampled N in {4, 12, 24, 48} x
exact top-r in {0, 4}, adaptive p in {0.9, 0.99} (cap 128). Pure KD (alpha=1) except the CE row. Per seed: the same
student init and the same batches in every row (paired); a sampled cache is drawn with capture seed = the seed, so
the spread over seeds includes the capture's randomness. Held-out metrics against the regime's FULL distribution:
CE on the real tokens, KL(teacher || student) over the vocabulary, top-1 agreement; share of the full-KD gain
(CE_only - row) / (CE_only - full KD), per seed, on KL and on CE; paired differences vs full KD and vs topk-64 with
95% t-intervals.

Bytes: each row's cache (shards' bytes / tokens, the manifest's totals) and a naive dump of the same teacher outputs
at k=64: int32 ids + float16 log-probs + zstd with pyarrow's default Parquet options (bench_codec's baseline).

Gradient fidelity: on a fixed student (the CE-only student of seed 0) at held-out positions, the KD gradient w.r.t.
the student logits of each mode (the trainer's loss on the view read back from a cache) against the full-distribution
gradient softmax(z) - p: squared bias ||E g - g_full||^2 (debiased by var/S) and variance sum_v Var g_v over S capture
seeds (sampled), means over positions, relative to mean ||g_full||^2.

Sizes (Settings): tiny-llama students, 64 steps of 8 windows of 64 tokens (every training window seen once, in a
per-seed order), lr 3e-3 cosine, 150 held-out windows; sized so that 2 regimes x 16 rows x 5 seeds fit in ~45
minutes on 2 shared cores with --jobs 2, the default (one process per regime, 1 thread each; CE only is trained in both, the
same student). Teacher: `--teacher DIR` replaces the benchmark teacher (same tokenizer as the benchmark data).

Equal wall-clock time (--equal-time, issue 11): KD from the cache against CE only given the same time, not the same
steps. In each regime's process, at its own shapes, the wall time of one training step (the same function as the
training loop: collate -> DistillModel -> clip -> AdamW -> schedule) is measured for each compared KD row (default
sampled N=24 r=0, the cache default, and topk k=64; alpha=1) and for CE only (alpha=0, the same DistillModel path),
on one student and the same batches, interleaved (the order rotated every repetition) after warm-up; R = the larger
KD row's median of the per-repetition ratios KD / CE. The row "CE only, equal time" trains for ceil(R x steps) steps:
the KD rows' per-seed order of their windows, continued with further windows of the training data that no row sees
(in a per-seed order; a second pass over all of them only if the data runs out), its cosine schedule over its own
steps. Table: held-out CE and KL of every row, paired per seed against the equal-time CE row, with 95% t-intervals;
CE only at equal steps and full KD kept for reference. Writes results/targets-equal-time.{json,md}.

    python benchmarks/bench_targets.py            # the tables in BENCHMARKS.md (2 regimes x 16 rows x 5 seeds)
    python benchmarks/bench_targets.py --quick    # the test-sized teacher, 1 seed, 3 steps: checks it runs
    python benchmarks/bench_targets.py --equal-time   # KD vs CE only at equal wall-clock time (2 regimes x 5 seeds)
    python benchmarks/bench_targets.py --equal-time --alpha 0.5   # the same with KD rows mixing in CE (alpha 0.5)
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, ensure_teacher, jsonl_windows, markdown_table, out_dir

from logitcache.storage import CachedSequence, TargetSpec

RESULTS = ROOT / "benchmarks" / "results"
EQUAL_TIME_ROW = "CE only, equal time"
EQUAL_TIME_KD_ROWS = ("sampled N=24 r=0", "topk k=64")  # --equal-time's default rows: the cache default and topk-64
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


@dataclass(frozen=True)
class Row:
    name: str
    kind: str  # "ce" | "full" | "cache" | "ce_time" (CE only for ceil(R x steps) steps, --equal-time)
    spec: TargetSpec | None = None

    def spec_for(self, seed: int) -> TargetSpec:
        """The row's spec with the capture seed (sampled draws differ per seed; other modes ignore it)."""
        assert self.spec is not None
        return TargetSpec(**{**asdict(self.spec), "seed": seed}) if self.spec.mode == "sampled" else self.spec


def rows() -> list[Row]:
    out = [Row("CE only", "ce"), Row("full KD", "full")]
    out += [Row(f"topk k={k}", "cache", TargetSpec("topk", top_k=k)) for k in (8, 32, 64, 128)]
    for r in (0, 4):
        for n in (4, 12, 24, 48):
            out.append(Row(f"sampled N={n} r={r}", "cache", TargetSpec("sampled", exact_top=r, samples=n)))
    out += [Row(f"adaptive p={p}", "cache", TargetSpec("adaptive", top_k=128, top_p=p)) for p in (0.9, 0.99)]
    return out


def selected_rows(st: Settings) -> list[Row]:
    """The rows a run trains: CE only and full KD always, the cache rows in st.row_names (all without it), and the
    equal-time CE row with --equal-time."""
    out = [r for r in rows() if not st.row_names or r.name in st.row_names or r.kind != "cache"]
    return out + ([Row(EQUAL_TIME_ROW, "ce_time")] if st.equal_time else [])


@dataclass(frozen=True)
class Settings:
    """Sizes of one benchmark run (the full run's and --quick's)."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    steps: int = 64
    batch_size: int = 8
    max_seq_len: int = 64
    train_windows: int = 512  # = steps x batch: every window is seen once, in a per-seed order
    heldout_windows: int = 150
    fidelity_windows: int = 16  # held-out windows for the gradient check
    fidelity_seeds: int = 16  # capture seeds per sampled mode in the gradient check
    lr: float = 3e-3
    warmup: float = 0.05
    target_entropy: float = 1.5
    codec: str = "lpq16:fine=1/512x4,coarse=1/32"
    threads: int = 1
    regimes: tuple[str, ...] = ("trained", "sharpened")
    row_names: tuple[str, ...] = ()  # only these rows (default: all)
    no_fidelity: bool = False
    equal_time: bool = False  # add "CE only, equal time": ceil(R x steps) steps, R = KD / CE step time (measured)
    timing_warmup: int = 5  # repetitions (one step of each compared row) discarded before timing R
    kd_alpha: float = 1.0  # alpha of the KD rows (full KD and every cache row): 1 = pure KD, < 1 mixes in CE
    timing_reps: int = 60  # timed repetitions

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            seeds=(0,), steps=3, train_windows=24, heldout_windows=4, fidelity_windows=2, fidelity_seeds=2,
            timing_warmup=1, timing_reps=3,
        )  # fmt: skip


def stat_ci(xs: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval; 0 for one value)."""
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, 0.0
    return m, _T95.get(len(xs) - 1, 1.96) * statistics.stdev(xs) / math.sqrt(len(xs))


# ---------------------------------------------------------------------------------------------------- teacher


def load_windows(jsonl: Path, tokenizer_dir: Path, max_seq_len: int, limit: int) -> list[np.ndarray]:
    """Non-overlapping windows (int64 token ids, >= 2 tokens) of the rows' texts, in file order, at most `limit`."""
    return list(
        itertools.islice(itertools.chain.from_iterable(jsonl_windows(jsonl, tokenizer_dir, max_seq_len)), limit)
    )


def teacher_logits(model_dir: Path, windows: Sequence[np.ndarray]) -> Any:
    """float32 [P, V]: the teacher's logits at every position of every window (P = sum of len - 1), window order."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    with torch.inference_mode():
        for w in windows:
            outs.append(model(torch.from_numpy(w)[None]).logits[0, :-1].float())
    return torch.cat(outs)


def entropy_stats(logprobs: Any) -> dict[str, float]:
    """Mean entropy (nats), mean top-1 probability and mean head mass at k=8/64 of [P, V] log-probs."""
    p = logprobs.exp()
    top = p.topk(64, dim=-1).values
    return {
        "entropy": float(-(p * logprobs).sum(-1).mean()),
        "top1_prob": float(top[:, 0].mean()),
        "head_mass_k8": float(top[:, :8].sum(-1).mean()),
        "head_mass_k64": float(top.sum(-1).mean()),
        "positions": int(logprobs.shape[0]),
    }


def find_beta(logits: Any, target: float) -> float:
    """The logit scale whose mean entropy on `logits` is `target` (bisection on log beta; entropy falls with beta)."""
    import torch

    def ent(beta: float) -> float:
        lp = torch.log_softmax(logits * beta, dim=-1)
        return float(-(lp.exp() * lp).sum(-1).mean())

    lo, hi = math.log(0.05), math.log(64.0)
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ent(math.exp(mid)) > target else (lo, mid)
    return math.exp((lo + hi) / 2)


def sharpened_teacher(teacher: Path, out: Path, beta: float) -> Path:
    """A copy of the teacher whose logits are beta x the original's: the final norm's gain scaled (not tied)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    with torch.no_grad():
        model.get_decoder().norm.weight.mul_(beta)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(out)
    (out / "sharpened.json").write_text(json.dumps({"from": str(teacher), "logit_scale": beta}))
    return out


# ---------------------------------------------------------------------------------------------------- caches


def positions_of(windows: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per flat position: its window index (= sequence_id) and its index t inside the window."""
    seq = np.concatenate([np.full(len(w) - 1, i, dtype=np.int64) for i, w in enumerate(windows)])
    t = np.concatenate([np.arange(len(w) - 1, dtype=np.int64) for w in windows])
    return seq, t


def captured_sequences(windows: Sequence[np.ndarray], logprobs: Any, spec: TargetSpec) -> Iterator[CachedSequence]:
    """The CachedSequences a capture in this mode stores (pipeline.targets, as the HF backend calls it)."""
    import torch

    from logitcache.pipeline.targets import compact_entries, targets_from_logprobs

    seq_ids, pos = positions_of(windows)
    offsets = np.concatenate([[0], np.cumsum([len(w) - 1 for w in windows])])
    per_chunk = 32  # windows per call: a few [n, V] float64 temporaries for the draws
    for c0 in range(0, len(windows), per_chunk):
        c1 = min(c0 + per_chunk, len(windows))
        a, b = int(offsets[c0]), int(offsets[c1])
        ids, lps, tail = targets_from_logprobs(
            logprobs[a:b], spec, torch.from_numpy(seq_ids[a:b]), torch.from_numpy(pos[a:b])
        )
        e_ids, e_lps, counts = compact_entries(ids.numpy(), lps.numpy(), spec)
        tail_np = tail.numpy()
        for i in range(c0, c1):
            s, e = int(offsets[i]) - a, int(offsets[i + 1]) - a
            w = windows[i]
            yield CachedSequence(
                sequence_id=i,
                input_ids=w.astype(np.int32),
                loss_mask=np.ones(len(w), dtype=bool),
                entry_ids=e_ids[s:e],
                entry_logprobs=e_lps[s:e],
                next_token_logprobs=logprobs[a + s : a + e].gather(1, torch.from_numpy(w[1:, None])).squeeze(1).numpy(),
                tail_mass=tail_np[s:e],
                sample_counts=None if counts is None else counts[s:e],
                num_samples=spec.num_samples,
            )


def cache_header(spec: TargetSpec, vocab: int, codec: str, max_seq_len: int) -> dict[str, Any]:
    capture: dict[str, Any] = {"top_k": spec.max_entries, "codec": codec, "max_seq_len": max_seq_len}
    capture["targets"] = spec.to_header()
    return {
        "teacher": {"name": "bench_targets", "dtype": "float32", "backend": "hf"},
        "tokenizer": {"name": None, "fingerprint": "sha256:bench", "vocab_size": vocab, "padded_vocab_size": vocab},
        "capture": capture,
        "dataset": {"source": "bench_targets"},
        "num_replicas": 1,
    }


def write_and_read(
    path: Path, windows: Sequence[np.ndarray], logprobs: Any, spec: TargetSpec, codec: str, max_seq_len: int
) -> tuple[float, list[CachedSequence]]:
    """Writes the mode's cache (storage.write_cache) and reads it back (CacheReader); (B/token, sequences)."""
    from logitcache.storage import CacheReader, write_cache

    if path.exists():
        shutil.rmtree(path)
    header = cache_header(spec, int(logprobs.shape[1]), codec, max_seq_len)
    manifest = write_cache(path, header, captured_sequences(windows, logprobs, spec))
    seqs = sorted(CacheReader(path).iter_sequences(), key=lambda s: s.sequence_id)
    return manifest["totals"]["num_bytes"] / manifest["totals"]["num_tokens"], seqs


def naive_baseline_bytes(windows: Sequence[np.ndarray], logprobs: Any, top_k: int = 64) -> float:
    """B/token of a naive dump of the same outputs: int32 ids + float16 log-probs (+ the other columns at their
    natural types), zstd, pyarrow's default Parquet options otherwise; one row group per ~16 MiB of raw arrays."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lps, ids = logprobs.topk(top_k, dim=-1)
    lps, ids = lps.numpy(), ids.numpy().astype(np.int32)
    tail = (1.0 - np.exp(lps.astype(np.float64)).sum(-1)).clip(0).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum([len(w) - 1 for w in windows])])

    def lists(values: list[np.ndarray], typ: pa.DataType) -> pa.Array:
        return pa.array([v.reshape(-1) for v in values], pa.list_(typ))

    table = pa.table(
        {
            "sequence_id": pa.array(np.arange(len(windows), dtype=np.int64)),
            "input_ids": lists([w.astype(np.int32) for w in windows], pa.int32()),
            "loss_mask": lists([np.ones(len(w), bool) for w in windows], pa.bool_()),
            "topk_ids": lists([ids[a:b] for a, b in itertools.pairwise(offsets)], pa.int32()),
            "topk_logprobs": lists([lps[a:b].astype(np.float16) for a, b in itertools.pairwise(offsets)], pa.float16()),
            "tail_mass": lists([tail[a:b] for a, b in itertools.pairwise(offsets)], pa.float32()),
        }
    )
    sink = pa.BufferOutputStream()
    raw_per_row = (ids.nbytes + lps.nbytes) / max(len(windows), 1)
    pq.write_table(table, sink, compression="zstd", row_group_size=max(1, int((16 << 20) / raw_per_row)))
    return sink.getvalue().size / sum(len(w) for w in windows)


# ---------------------------------------------------------------------------------------------------- training


def kd_settings(alpha: float, mode: str) -> Any:
    """The trainer's KD settings for a cache of this target mode (forward KL, T=1)."""
    from logitcache.train.config import KDSettings

    return KDSettings(alpha=alpha, target_mode=mode)


class FullTargets:
    """The full-KD row: forward KL on the full vocabulary against the teacher's precomputed log-probs (what a live,
    deterministic teacher gives), sum_v p (log p - log q), on the student's logits from the trainer's model wrapper
    (with --alpha < 1 mixed with CE on the real next tokens)."""

    def __init__(self, windows: Sequence[np.ndarray], logprobs: Any) -> None:
        self.windows = windows
        self.lp = logprobs
        self.offsets = np.concatenate([[0], np.cumsum([len(w) - 1 for w in windows])])
        self.inputs = NoTargets(windows)

    def loss(self, dm: Any, idx: np.ndarray) -> Any:
        import torch

        from logitcache.train.data import collate

        batch = collate([self.inputs[int(i)] for i in idx], dm.vocab_size)
        rows = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in idx])
        t_lp = self.lp[torch.from_numpy(rows)]  # batch positions are row-major (sequence, t), all in the loss
        s_lp = torch.log_softmax(
            dm.head(dm.hidden_at(batch["input_ids"], batch["attention_mask"], batch["positions"])), -1
        )
        kd = (t_lp.exp() * (t_lp - s_lp)).sum()
        alpha = dm.settings.alpha  # --alpha < 1: mixed with CE on the real next tokens, as the cache rows are
        if alpha == 1.0:
            return kd / len(rows)
        ce = -s_lp.gather(1, batch["next_token_ids"].long()[:, None]).sum()
        return (alpha * kd + (1.0 - alpha) * ce) / len(rows)


class CachedTargets:
    """A row's sequences (read back from its cache), or CE-only inputs: the trainer's collate + DistillModel loss."""

    def __init__(self, seqs: Any) -> None:
        self.seqs = seqs

    def loss(self, dm: Any, idx: np.ndarray) -> Any:
        from logitcache.train.data import collate

        batch = collate([self.seqs[int(i)] for i in idx], dm.vocab_size)
        return dm(batch, float(batch["num_positions"])).total


class NoTargets:
    """CE-only sequences: the KD term is off (alpha=0), so one dummy entry per position."""

    def __init__(self, windows: Sequence[np.ndarray]) -> None:
        self.windows = windows

    def __getitem__(self, i: int) -> CachedSequence:
        w = self.windows[i]
        n = len(w) - 1
        return CachedSequence(
            i, w.astype(np.int32), np.ones(len(w), bool), np.zeros((n, 1), np.int32), np.zeros((n, 1), np.float32),
            np.zeros(n, np.float32), np.zeros(n, np.float32),
        )  # fmt: skip


def new_student(vocab: int, seed: int) -> Any:
    """The `tiny-llama` preset from scratch, initialised from `seed` (as train.student.build_student does)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from logitcache.train.student import PRESETS

    cfg = AutoConfig.for_model("llama", vocab_size=vocab, max_position_embeddings=2048, **PRESETS["tiny-llama"])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.config.use_cache = False
    return model


def data_order(seed: int, first: int, total: int) -> np.ndarray:
    """Window indices in training order: a per-seed permutation of the first `first` windows (every row's data),
    continued by a per-seed permutation of windows first..total-1 (the equal-time CE row's further windows)."""
    order = np.random.default_rng(seed).permutation(first)
    if total > first:
        order = np.concatenate([order, first + np.random.default_rng([seed, 1]).permutation(total - first)])
    return order


def optimizer(dm: Any, st: Settings, steps: int) -> tuple[Any, Any]:
    """AdamW(0.9, 0.95) at TrainConfig's weight decay (none on vectors) and a cosine schedule with warmup."""
    import torch
    from transformers import get_scheduler

    from logitcache.train.config import TrainConfig

    wd = TrainConfig.__dataclass_fields__["weight_decay"].default
    decay = [p for p in dm.parameters() if p.ndim >= 2]
    no_decay = [p for p in dm.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=st.lr, betas=(0.9, 0.95))
    return opt, get_scheduler("cosine", opt, num_warmup_steps=round(st.warmup * steps), num_training_steps=steps)


def train_step(targets: FullTargets | CachedTargets, dm: Any, idx: np.ndarray, opt: Any, sched: Any) -> None:
    """One optimizer step on the windows `idx`: the trainer's collate -> DistillModel loss -> backward -> clip (at
    TrainConfig's clip norm) -> AdamW -> schedule."""
    import torch

    from logitcache.train.config import TrainConfig

    targets.loss(dm, idx).backward()
    torch.nn.utils.clip_grad_norm_(dm.parameters(), TrainConfig.__dataclass_fields__["max_grad_norm"].default)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


def train_student(
    targets: FullTargets | CachedTargets,
    vocab: int,
    seed: int,
    alpha: float,
    mode: str,
    st: Settings,
    steps: int | None = None,
    windows: int | None = None,
) -> tuple[Any, float]:
    """Trains a fresh student (init and batch order from `seed`) for `steps` (default st.steps) on `windows` training
    windows (default st.train_windows, see data_order); returns (model, seconds).

    The step is the trainer's (train_step): collate -> DistillModel (fused loss) -> clip -> AdamW(0.9, 0.95) ->
    cosine with warmup, at TrainConfig's defaults for weight decay and the clip norm.
    """
    from logitcache.train.student import DistillModel

    steps = steps or st.steps
    model = new_student(vocab, seed)
    dm = DistillModel(model, vocab, kd_settings(alpha, mode))
    opt, sched = optimizer(dm, st, steps)
    order = data_order(seed, st.train_windows, windows or st.train_windows)
    t0 = time.perf_counter()
    dm.train()
    for step in range(steps):
        train_step(targets, dm, order[(np.arange(st.batch_size) + step * st.batch_size) % len(order)], opt, sched)
    return model.eval(), time.perf_counter() - t0


def step_costs(
    train_w: Sequence[np.ndarray], row_seqs: dict[str, list[CachedSequence]], vocab: int, st: Settings
) -> dict[str, Any]:
    """Wall seconds of one training step of each KD row in `row_seqs` (name -> its cache's sequences; alpha=1) and
    of CE only (alpha=0), on one student (seed st.seeds[0]) and the same batches: per repetition one step of each
    row, in an order rotated every repetition, st.timing_warmup repetitions discarded. Per KD row the median of the
    per-repetition ratios KD / CE, with a distribution-free 95% interval of that median; R = the largest median."""
    from logitcache.train.student import DistillModel

    seed = st.seeds[0]
    model = new_student(vocab, seed)
    kinds: dict[str, tuple[CachedTargets, Any]] = {
        "CE only": (CachedTargets(NoTargets(train_w)), kd_settings(0.0, "topk"))
    }
    by_name = {r.name: r for r in rows()}
    for name, seqs in row_seqs.items():
        spec = by_name[name].spec
        assert spec is not None
        kinds[name] = (CachedTargets(seqs), kd_settings(st.kd_alpha, spec.mode))
    dms = {name: DistillModel(model, vocab, kd) for name, (_, kd) in kinds.items()}  # one student, shared weights
    total = st.timing_warmup + st.timing_reps
    opt, sched = optimizer(dms["CE only"], st, total * len(kinds))
    order = data_order(seed, st.train_windows, st.train_windows)
    names = list(kinds)
    secs: dict[str, list[float]] = {n: [] for n in names}
    model.train()
    for rep in range(total):
        idx = order[(np.arange(st.batch_size) + rep * st.batch_size) % len(order)]
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            t0 = time.perf_counter()
            train_step(kinds[name][0], dms[name], idx, opt, sched)
            if rep >= st.timing_warmup:
                secs[name].append(time.perf_counter() - t0)
    out: dict[str, Any] = {
        "reps": st.timing_reps,
        "warmup": st.timing_warmup,
        "median_step_seconds": {n: statistics.median(v) for n, v in secs.items()},
        "ratio": {},
    }
    n = st.timing_reps
    lo, hi = max(math.floor(n / 2 - 0.98 * math.sqrt(n)), 0), min(math.ceil(n / 2 + 0.98 * math.sqrt(n)), n - 1)
    for name in row_seqs:
        ratios = sorted(k / c for k, c in zip(secs[name], secs["CE only"]))
        out["ratio"][name] = {"median": statistics.median(ratios), "ci95": [ratios[lo], ratios[hi]]}
    out["R"] = max((r["median"] for r in out["ratio"].values()), default=1.0)
    out["ce_steps"] = math.ceil(out["R"] * st.steps)
    return out


class HeldOut:
    """Held-out windows with each regime's full teacher log-probs; evaluates a student against them."""

    def __init__(self, windows: Sequence[np.ndarray]) -> None:
        self.windows = windows

    def student_logprobs(self, model: Any, vocab: int) -> Any:
        import torch

        with torch.inference_mode():
            return torch.cat(
                [
                    torch.log_softmax(model(input_ids=torch.from_numpy(w)[None]).logits[0, :-1, :vocab].float(), -1)
                    for w in self.windows
                ]
            )

    def metrics(self, s_lp: Any, t_lp: Any) -> dict[str, float]:
        """CE on the real tokens, KL(teacher || student) over the full vocabulary, top-1 agreement (means)."""
        import torch

        targets = torch.from_numpy(np.concatenate([w[1:] for w in self.windows]))
        kl = (t_lp.exp() * (t_lp - s_lp)).sum(-1)
        return {
            "ce": float(-s_lp.gather(1, targets[:, None]).mean()),
            "kl": float(kl.mean()),
            "top1": float((s_lp.argmax(-1) == t_lp.argmax(-1)).double().mean()),
        }


# ---------------------------------------------------------------------------------------------------- fidelity


def kd_grad(z: Any, seqs: Sequence[CachedSequence], mode: str) -> Any:
    """d/dz of the trainer's KD loss (summed over positions) on the sparse views of `seqs`, at student logits z [P, V]."""
    import torch

    from logitcache.train.losses import TeacherTargets, kd_loss_per_position

    views = [s.sparse_targets() for s in seqs]
    teacher = TeacherTargets(
        torch.from_numpy(np.concatenate([v.target_ids for v in views]).astype(np.int64)),
        torch.from_numpy(np.concatenate([v.target_probs for v in views])),
        torch.from_numpy(np.concatenate([v.tail_mass for v in views])),
    )
    zz = z.detach().clone().requires_grad_(True)
    kd_loss_per_position(zz, teacher, kd_settings(1.0, mode)).sum().backward()
    return zz.grad


def gradient_fidelity(
    z: Any, windows: Sequence[np.ndarray], t_lp: Any, row: Row, st: Settings, work: Path
) -> dict[str, float]:
    """Bias^2, variance and MSE of the mode's KD gradient against softmax(z) - p, per position, relative to
    mean ||g_full||^2; sampled modes over st.fidelity_seeds capture seeds."""
    import torch

    g_full = torch.softmax(z, -1) - t_lp.exp()
    norm2 = float((g_full**2).sum(-1).mean())
    assert row.spec is not None
    n_seeds = st.fidelity_seeds if row.spec.mode == "sampled" else 1
    s1 = torch.zeros_like(z, dtype=torch.float64)
    s2 = torch.zeros_like(z, dtype=torch.float64)
    for c in range(n_seeds):
        spec = row.spec_for(1000 + c)
        _, seqs = write_and_read(work / "fidelity-cache", windows, t_lp, spec, st.codec, st.max_seq_len)
        g = kd_grad(z, seqs, spec.mode).double()
        s1 += g
        s2 += g * g
    mean = s1 / n_seeds
    var = ((s2 - n_seeds * mean * mean) / max(n_seeds - 1, 1)).clamp(min=0) if n_seeds > 1 else torch.zeros_like(s1)
    var_pos = var.sum(-1).mean()
    bias2 = float(((mean - g_full.double()) ** 2).sum(-1).mean() - var_pos / n_seeds)
    return {
        "bias2_rel": bias2 / norm2,
        "var_rel": float(var_pos) / norm2,
        "mse_rel": (bias2 + float(var_pos)) / norm2,
        "capture_seeds": n_seeds,
        "positions": int(z.shape[0]),
    }


# ---------------------------------------------------------------------------------------------------- report


def summarise(
    results: list[dict[str, Any]], regime: str, row_names: Sequence[str], refs: Sequence[str] = ("full KD", "topk k=64")
) -> list[dict[str, Any]]:
    """Per row of a regime: means with 95% t-intervals, shares of the full-KD gain, paired differences vs `refs`."""
    by = {(r["row"], r["seed"]): r for r in results if r["regime"] == regime}
    seeds = sorted({s for (_, s) in by})
    out = []
    for name in row_names:
        rs = [by[(name, s)] for s in seeds if (name, s) in by]
        if not rs:
            continue
        row: dict[str, Any] = {"row": name, "seeds": len(rs), "bytes_per_token": rs[0].get("bytes_per_token")}
        for m in ("ce", "kl", "top1"):
            row[m] = stat_ci([r[m] for r in rs])
        for m in ("kl", "ce"):
            shares = []
            for r in rs:
                ce_r, full_r = by.get(("CE only", r["seed"])), by.get(("full KD", r["seed"]))
                if ce_r and full_r and ce_r[m] != full_r[m]:
                    shares.append((ce_r[m] - r[m]) / (ce_r[m] - full_r[m]))
            row[f"share_{m}"] = stat_ci(shares) if shares else None
            for ref in refs:
                d = [r[m] - by[(ref, r["seed"])][m] for r in rs if (ref, r["seed"]) in by]
                row[f"d_{m}_vs_{ref}"] = stat_ci(d) if d else None
        row["train_seconds"] = statistics.fmean(r["train_seconds"] for r in rs)
        if "steps" in rs[0]:
            row["steps"] = rs[0]["steps"]
        out.append(row)
    return out


def _pm(x: tuple[float, float] | None, fmt: str, signed: bool = False) -> str:
    if x is None:
        return "-"
    m, h = x
    return f"{format(m, ('+' if signed else '') + fmt)} ± {format(h, fmt)}"


def tables(doc: dict[str, Any]) -> str:
    parts = []
    for regime, summary in doc["summary"].items():
        st = doc["regimes"][regime]
        fid = doc["fidelity"].get(regime, {})
        base = doc["baseline_bytes_per_token"][regime]
        parts.append(
            f"#### Regime `{regime}`: mean entropy {st['entropy']:.2f} nats, top-1 p {st['top1_prob']:.2f}, "
            f"head mass {st['head_mass_k8']:.2f} at k=8 / {st['head_mass_k64']:.2f} at k=64"
            + (f" (logits x {st['logit_scale']:.3f})" if "logit_scale" in st else "")
            + f"; naive baseline (k=64, int32 + f16 + zstd): {base:.1f} B/token\n"
        )
        ordered = sorted(summary, key=lambda r: r["bytes_per_token"] or 0.0)
        body = []
        for r in ordered:
            b = r["bytes_per_token"]
            f = fid.get(r["row"], {})
            body.append(
                [
                    r["row"],
                    "-" if b is None else f"{b:.1f}",
                    "-" if b is None else f"{b / base:.2f}",
                    _pm(r["kl"], ".4f"),
                    _pm(r["ce"], ".4f"),
                    _pm(r["top1"], ".3f"),
                    _pm(r["share_kl"], ".2f"),
                    _pm(r["share_ce"], ".2f"),
                    _pm(r["d_kl_vs_full KD"], ".4f", True),
                    _pm(r["d_kl_vs_topk k=64"], ".4f", True),
                    _pm(r["d_ce_vs_topk k=64"], ".4f", True),
                    "-" if not f else f"{f['bias2_rel']:.2e}",
                    "-" if not f else f"{f['var_rel']:.2e}",
                    "-" if not f else f"{f['mse_rel']:.2e}",
                ]
            )
        header = [
            "row (by bytes)",
            "B/token",
            "x baseline",
            "held-out KL, full vocab",
            "held-out CE",
            "top-1 agree",
            "share of KD gain (KL)",
            "share (CE)",
            "KL - full KD (paired)",
            "KL - topk64 (paired)",
            "CE - topk64 (paired)",
            "grad bias²",
            "grad var",
            "grad MSE",
        ]
        parts.append(markdown_table(header, body) + "\n")
        parts.append(equal_bytes(doc, regime, summary) + "\n")
        parts.append(goals(regime, summary, base) + "\n")
    return "\n".join(parts)


def equal_bytes(doc: dict[str, Any], regime: str, summary: list[dict[str, Any]]) -> str:
    """Each sampled/adaptive row against the topk row nearest in bytes: paired (same seed) differences."""
    by = {(r["row"], r["seed"]): r for r in doc["results"] if r["regime"] == regime}
    topk = [r for r in summary if r["row"].startswith("topk")]
    body = []
    for r in summary:
        if r["bytes_per_token"] is None or r["row"].startswith("topk") or not topk:
            continue
        t = min(topk, key=lambda x: abs(math.log(x["bytes_per_token"] / r["bytes_per_token"])))
        d = {
            m: [by[(r["row"], s)][m] - by[(t["row"], s)][m] for (n, s) in by if n == r["row"] and (t["row"], s) in by]
            for m in ("kl", "ce")
        }
        body.append(
            [
                f"{r['row']} vs {t['row']}",
                f"{r['bytes_per_token']:.1f} / {t['bytes_per_token']:.1f}",
                _pm(stat_ci(d["kl"]), ".4f", True),
                _pm(stat_ci(d["ce"]), ".4f", True),
            ]
        )
    head = ["pair (the topk row nearest in bytes)", "B/token", "KL difference (paired)", "CE difference (paired)"]
    return f"Equal bytes, `{regime}` (negative: the first row is better):\n\n" + markdown_table(head, body)


def goals(regime: str, summary: list[dict[str, Any]], base: float) -> str:
    """Plain statements: which rows reach >= 95% of the full-KD KL gain with <= 1/3 of the baseline's bytes."""
    small = [r for r in summary if r["bytes_per_token"] is not None and r["bytes_per_token"] <= base / 3]
    meet = [r["row"] for r in small if r["share_kl"] and r["share_kl"][0] >= 0.95]
    sure = [r["row"] for r in small if r["share_kl"] and r["share_kl"][0] - r["share_kl"][1] >= 0.95]
    return (
        f"Goal check, `{regime}`: rows within 1/3 of the baseline's bytes ({base / 3:.1f} B/token): "
        f"{', '.join(r['row'] for r in small) or 'none'}; mean share of the KL gain >= 95%: {', '.join(meet) or 'none'}"
        f"; with the 95% interval's lower end >= 95%: {', '.join(sure) or 'none'}."
    )


def equal_time_tables(doc: dict[str, Any]) -> str:
    """--equal-time: per regime, R as measured, then every row against CE only at equal wall-clock time."""
    parts = []
    for regime, summary in doc["summary"].items():
        st, tm = doc["regimes"][regime], doc["timing"][regime]
        ce_secs = next(r["train_seconds"] for r in summary if r["row"] == "CE only")
        ratios = "; ".join(
            f"{name} / CE only {r['median']:.3f} (95% interval of the median {r['ci95'][0]:.3f}-{r['ci95'][1]:.3f})"
            for name, r in tm["ratio"].items()
        )
        steps = ", ".join(f"{n} {1e3 * s:.0f} ms" for n, s in tm["median_step_seconds"].items())
        parts.append(
            f"#### Regime `{regime}`: mean entropy {st['entropy']:.2f} nats, top-1 p {st['top1_prob']:.2f}\n\n"
            f"Step time ratio, median over {tm['reps']} interleaved repetitions after {tm['warmup']} of warm-up: "
            f"{ratios}. R = {tm['R']:.3f}: {EQUAL_TIME_ROW} trains for {tm['ce_steps']} steps on "
            f"{tm['ce_windows']} windows. Median step: {steps}.\n"
        )
        body = [
            [
                r["row"],
                r.get("steps", "-"),
                f"{r['train_seconds']:.1f} ({r['train_seconds'] / ce_secs:.2f}x)",
                _pm(r["ce"], ".4f"),
                _pm(r["kl"], ".4f"),
                _pm(r["top1"], ".3f"),
                _pm(r[f"d_ce_vs_{EQUAL_TIME_ROW}"], ".4f", True),
                _pm(r[f"d_kl_vs_{EQUAL_TIME_ROW}"], ".4f", True),
            ]
            for r in summary
        ]
        header = [
            "row",
            "steps",
            "train s (x CE only)",
            "held-out CE",
            "held-out KL, full vocab",
            "top-1 agree",
            "CE - CE equal time (paired)",
            "KL - CE equal time (paired)",
        ]
        parts.append(markdown_table(header, body) + "\n")
    return "\n".join(parts)


def _alpha_suffix(settings: dict[str, Any]) -> str:
    """Results of KD rows at alpha != 1 go to their own files ("-alpha0.5")."""
    alpha = settings.get("kd_alpha", 1.0)
    return "" if alpha == 1.0 else f"-alpha{alpha:g}"


def write_outputs(doc: dict[str, Any], out: Path, quick: bool) -> None:
    name = ("targets-equal-time" if doc["settings"]["equal_time"] else "targets") + _alpha_suffix(doc["settings"])
    text = equal_time_tables(doc) if doc["settings"]["equal_time"] else tables(doc)
    (out / f"{name}.json").write_text(json.dumps(doc, indent=1))
    (out / f"{name}.md").write_text(text)
    if not quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=1))
        (RESULTS / f"{name}.md").write_text(text)
        if name == "targets":
            plot(doc, RESULTS / "targets.png")


def plot(doc: dict[str, Any], path: Path) -> None:
    """Share of the full-KD KL gain (mean, 95% interval) against cache bytes/token, one panel per regime."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = list(doc["summary"])
    fig, axes = plt.subplots(1, len(regimes), figsize=(6.5 * len(regimes), 4.8), squeeze=False)
    colors = {"topk": "C0", "sampled": "C1", "adaptive": "C2"}
    for ax, regime in zip(axes[0], regimes):
        base = doc["baseline_bytes_per_token"][regime]
        for r in doc["summary"][regime]:
            if r["bytes_per_token"] is None or not r["share_kl"]:
                continue
            kind = r["row"].split()[0]
            marker = "s" if "r=4" in r["row"] else "o"
            (m, h), x = r["share_kl"], r["bytes_per_token"]
            ax.errorbar(
                x,
                m,
                yerr=h,
                fmt=marker,
                color=colors[kind],
                ms=4,
                label=kind if kind not in ax.get_legend_handles_labels()[1] else None,
            )
            ax.annotate(r["row"].split(" ", 1)[1], (x, m), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.axvline(base / 3, color="r", lw=0.8, ls=":", label="1/3 of the naive k=64 dump")
        ax.axhline(0.95, color="k", lw=0.6, ls="--", label="95% of the full-KD gain")
        ax.set_xscale("log")
        ax.set_xlabel("cache bytes/token")
        ax.set_ylabel("share of the full-KD gain in held-out KL (CE only = 0)")
        st = doc["regimes"][regime]
        ax.set_title(f"{regime} teacher: entropy {st['entropy']:.2f} nats, top-1 p {st['top1_prob']:.2f}", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------------- driver


def prepare_regimes(build: Path, teacher: Path, st: Settings, work: Path) -> list[tuple[str, Path, dict[str, Any]]]:
    """(name, model dir, stats) per regime; the sharpened teacher is found (bisection) and saved here."""
    import torch

    held_w = load_windows(build / "data" / "heldout.jsonl", teacher, st.max_seq_len, st.heldout_windows)
    held_logits = teacher_logits(teacher, held_w)
    out = []
    for name in st.regimes:
        if name == "trained":
            model_dir, stats = teacher, {}
        else:
            beta = find_beta(held_logits, st.target_entropy)
            model_dir = sharpened_teacher(teacher, work / "teacher-sharpened", beta)
            stats = {"logit_scale": beta}
        h_lp = torch.log_softmax(teacher_logits(model_dir, held_w), -1)
        if name != "trained":  # the saved model must be the scaled teacher
            want = torch.log_softmax(held_logits * stats["logit_scale"], -1)
            assert torch.allclose(h_lp, want, atol=1e-3), float((h_lp - want).abs().max())
        stats.update(entropy_stats(h_lp))
        out.append((name, model_dir, stats))
        print(f"regime {name}: {json.dumps(stats)}", flush=True)
    return out


@dataclass(frozen=True)
class Job:
    """One regime's share of the benchmark (run in its own process with --jobs 2)."""

    regime: str
    model_dir: Path
    data: Path
    work: Path
    st: Settings


def run_regime(job: Job) -> dict[str, Any]:
    """Every row x seed of one regime (CE only included), and the gradient fidelity; returns the results."""
    import torch

    st, t_start = job.st, time.perf_counter()
    torch.set_num_threads(st.threads)
    train_w = load_windows(job.data / "train.jsonl", job.model_dir, st.max_seq_len, st.train_windows)
    if len(train_w) < st.train_windows:
        raise SystemExit(f"only {len(train_w)} training windows in {job.data}; use fewer --steps")
    held = HeldOut(load_windows(job.data / "heldout.jsonl", job.model_dir, st.max_seq_len, st.heldout_windows))
    held_lp = torch.log_softmax(teacher_logits(job.model_dir, held.windows), -1)
    train_lp = torch.log_softmax(teacher_logits(job.model_dir, train_w), -1)
    vocab = int(train_lp.shape[1])
    out: dict[str, Any] = {"results": [], "baseline": naive_baseline_bytes(train_w, train_lp), "fidelity": {}}
    all_rows = selected_rows(st)
    captured: dict[TargetSpec, tuple[float, list[CachedSequence]]] = {}

    def capture(spec: TargetSpec) -> tuple[float, list[CachedSequence]]:
        if spec not in captured:  # topk/adaptive captures do not depend on the seed: written once
            cache = job.work / f"cache-{job.regime}"
            captured[spec] = write_and_read(cache, train_w, train_lp, spec, st.codec, st.max_seq_len)
        return captured[spec]

    ce_steps, ce_w = st.steps, train_w
    if st.equal_time:
        kd_rows = [r for r in all_rows if r.kind == "cache"]
        out["timing"] = step_costs(train_w, {r.name: capture(r.spec_for(st.seeds[0]))[1] for r in kd_rows}, vocab, st)
        ce_steps = out["timing"]["ce_steps"]
        ce_w = load_windows(job.data / "train.jsonl", job.model_dir, st.max_seq_len, ce_steps * st.batch_size)
        out["timing"]["ce_windows"] = len(ce_w)
        print(f"{job.regime} step cost: {json.dumps(out['timing'])}", flush=True)
    for seed in st.seeds:
        for row in all_rows:
            t0 = time.perf_counter()
            bpt: float | None = None
            mode, alpha, steps, windows = "topk", st.kd_alpha, st.steps, st.train_windows
            if row.kind == "ce":
                targets: FullTargets | CachedTargets = CachedTargets(NoTargets(train_w))
                alpha = 0.0
            elif row.kind == "ce_time":
                targets, alpha, steps, windows = CachedTargets(NoTargets(ce_w)), 0.0, ce_steps, len(ce_w)
            elif row.kind == "full":
                targets = FullTargets(train_w, train_lp)
            else:
                spec = row.spec_for(seed)
                mode = spec.mode
                bpt, seqs = capture(spec)
                if mode == "sampled":
                    del captured[spec]
                targets = CachedTargets(seqs)
            cap = time.perf_counter() - t0
            model, secs = train_student(targets, vocab, seed, alpha, mode, st, steps, windows)
            m = held.metrics(held.student_logprobs(model, vocab), held_lp)
            rec = {"regime": job.regime, "row": row.name, "seed": seed, "train_seconds": secs, "capture_seconds": cap}
            rec["steps"] = steps
            out["results"].append(rec | ({"bytes_per_token": bpt} if bpt is not None else {}) | m)
            print(
                f"{job.regime} seed {seed} {row.name:22s} KL {m['kl']:.4f} CE {m['ce']:.4f} top1 {m['top1']:.3f} "
                f"B/tok {bpt or 0:.1f} (capture {cap:.0f}s, train {secs:.0f}s)",
                flush=True,
            )
            if row.kind == "ce" and seed == st.seeds[0] and not st.no_fidelity:
                t_fid = time.perf_counter()
                out["fidelity"] = fidelity(model, held, held_lp, job.regime, all_rows, st, job.work, vocab)
                out["fidelity_seconds"] = time.perf_counter() - t_fid
            out["wall_seconds"] = time.perf_counter() - t_start
            (job.work / f"partial-{job.regime}.json").write_text(json.dumps(out, indent=1))
    return out


def fidelity(
    model: Any, held: HeldOut, held_lp: Any, regime: str, all_rows: Sequence[Row], st: Settings, work: Path, vocab: int
) -> dict[str, Any]:
    windows = held.windows[: st.fidelity_windows]
    p = sum(len(w) - 1 for w in windows)
    z = held.student_logprobs(model, vocab)[:p]
    out = {}
    for row in all_rows:
        if row.kind == "cache":
            out[row.name] = gradient_fidelity(z, windows, held_lp[:p], row, st, work / f"fidelity-{regime}")
    print(f"fidelity {regime}: " + ", ".join(f"{k} {v['mse_rel']:.2e}" for k, v in out.items()), flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the test-sized teacher, 1 seed, 3 steps")
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--steps", type=int, help="optimizer steps per student (train windows = steps x batch)")
    ap.add_argument("--rows", nargs="+", help="only these rows (names as in the table)")
    ap.add_argument("--regimes", nargs="+", choices=["trained", "sharpened"])
    ap.add_argument("--no-fidelity", action="store_true")
    ap.add_argument(
        "--equal-time",
        action="store_true",
        help=f"KD vs CE only at equal wall-clock time: adds {EQUAL_TIME_ROW!r} (ceil(R x steps) steps, R measured); "
        f"rows default to {', '.join(EQUAL_TIME_KD_ROWS)}; no gradient fidelity; results/targets-equal-time.*",
    )
    ap.add_argument("--alpha", type=float, help="alpha of the KD rows (default 1: pure KD); results get a suffix")
    ap.add_argument("--jobs", type=int, default=2, help="regimes run in parallel processes (1 thread each)")
    ap.add_argument(
        "--teacher",
        type=Path,
        help="teacher model dir (default: the benchmark teacher); it must use the benchmark data's tokenizer",
    )
    args = ap.parse_args()
    st = Settings.quick() if args.quick else Settings()
    changes: dict[str, Any] = {"no_fidelity": args.no_fidelity}
    if args.seeds:
        changes["seeds"] = tuple(args.seeds)
    if args.steps:
        changes.update(steps=args.steps, train_windows=args.steps * st.batch_size)
    if args.rows:
        changes["row_names"] = tuple(args.rows)
    if args.regimes:
        changes["regimes"] = tuple(args.regimes)
    if args.alpha is not None:
        changes["kd_alpha"] = args.alpha
    if args.equal_time:
        changes.update(equal_time=True, no_fidelity=True, row_names=changes.get("row_names", EQUAL_TIME_KD_ROWS))
    st = Settings(**{**asdict(st), **changes})
    import torch

    torch.set_num_threads(st.threads)
    cmd = "python benchmarks/bench_targets.py" + ("" if len(sys.argv) < 2 else " " + " ".join(sys.argv[1:]))
    t_start = time.perf_counter()
    import subprocess

    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(
        [*git, "status", "--short", "--", "storage", "pipeline", "train"], capture_output=True, text=True
    )
    build = ensure_teacher(args.quick)
    teacher = args.teacher or build / "teacher"
    suffix = ("-equal-time" if st.equal_time else "") + _alpha_suffix(asdict(st)) + ("-quick" if args.quick else "")
    work = out_dir("targets" + suffix)
    regimes = prepare_regimes(build, teacher, st, work)
    jobs = [Job(name, model_dir, build / "data", work, st) for name, model_dir, _ in regimes]
    if args.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(run_regime, jobs))
    else:
        parts = [run_regime(j) for j in jobs]
    row_names = [r.name for r in selected_rows(st)]
    results = [r for part in parts for r in part["results"]]
    doc: dict[str, Any] = {
        "command": cmd,
        "code": {"commit": head, "uncommitted": dirty.stdout.split("\n")[:-1]},
        "settings": asdict(st),
        "teacher": str(teacher),
        "data": str(build / "data"),
        "regimes": {name: stats for name, _, stats in regimes},
        "baseline_bytes_per_token": {j.regime: p["baseline"] for j, p in zip(jobs, parts)},
        "fidelity": {j.regime: p["fidelity"] for j, p in zip(jobs, parts)},
        "summary": {j.regime: summarise(results, j.regime, row_names) for j in jobs},
        "wall_seconds": time.perf_counter() - t_start,
        "results": results,
    }
    if st.equal_time:
        doc["timing"] = {j.regime: p["timing"] for j, p in zip(jobs, parts)}
        doc["summary"] = {j.regime: summarise(results, j.regime, row_names, (EQUAL_TIME_ROW,)) for j in jobs}
    write_outputs(doc, work, args.quick)
    print(equal_time_tables(doc) if st.equal_time else tables(doc))
    print(f"total {doc['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
