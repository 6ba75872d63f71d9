"""Fidelity per byte: how much of the KD training signal each codec and k keeps, per byte of cache.

On a real (locally trained) teacher's outputs over held-out text, for each (codec, k): write the cache with the
real ShardWriter, read it back with the real CacheReader, and compare the forward-KL loss and its gradient w.r.t.
the student's logits (train.losses, on the bucketed support) against the same loss on the teacher's FULL
distribution (the live-teacher signal). Also the baseline others store (int32 ids + float16 log-probs + zstd,
default Parquet options) and the no-tail variant (renormalised head, the tail dropped).

The "student" is a fixed, imperfect copy of the teacher (logits * 0.7 plus N(0, 1) noise): what matters here is
that the student differs from the teacher the way a partly trained one does, so that the gradient is not zero.

    python benchmarks/bench_fidelity.py [--teacher DIR] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ensure_teacher, jsonl_windows, markdown_table, out_dir

BASELINE_OPTIONS: dict[str, Any] = {"compression": "zstd"}  # pyarrow defaults otherwise: dictionary on, no BSS


def teacher_outputs(teacher: Path, heldout: Path, max_positions: int, max_seq_len: int = 128) -> dict[str, Any]:
    """Full-vocabulary teacher log-probs [P, V] on held-out text windows, with the windows' token ids."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    windows = []
    total = 0
    for row in jsonl_windows(heldout, teacher, max_seq_len):  # whole rows until max_positions is reached
        windows += row
        total += sum(len(w) - 1 for w in row)
        if total >= max_positions:
            break
    logps = []
    with torch.inference_mode():
        for w in windows:
            logits = model(torch.from_numpy(w)[None]).logits[0, :-1].float()
            logps.append(torch.log_softmax(logits, dim=-1))
    return {"windows": windows, "logp": torch.cat(logps), "vocab": int(logps[0].shape[-1])}


def write_variant(
    root: Path, windows: list[np.ndarray], logp: Any, k: int, codec: str, options: dict[str, Any] | None
) -> tuple[float, Any]:
    """Captures `logp` at top-k into a real cache; returns (bytes per token, decoded per-position arrays)."""
    import torch

    from logitcache.pipeline.backends.hf import topk_with_tail
    from logitcache.storage import CachedSequence, CacheReader, write_cache

    vocab = logp.shape[-1]
    header = {
        "teacher": {"name": "bench", "dtype": "float32", "backend": "hf"},
        "tokenizer": {"name": None, "fingerprint": "sha256:bench", "vocab_size": vocab, "padded_vocab_size": vocab},
        "capture": {"top_k": k, "codec": codec, "max_seq_len": 128},
        "dataset": {"source": "heldout"},
        "num_replicas": 1,
    }

    def sequences() -> Iterator[CachedSequence]:
        off = 0
        for i, ids in enumerate(windows):
            n = len(ids) - 1
            top_id, top_lp, target, tail = topk_with_tail(logp[off : off + n], k, torch.from_numpy(ids[1:]))
            off += n
            yield CachedSequence(
                sequence_id=i,
                input_ids=ids.astype(np.int32),
                loss_mask=np.ones(len(ids), bool),
                entry_ids=top_id.numpy().astype(np.int32),
                entry_logprobs=top_lp.numpy(),
                next_token_logprobs=target.numpy(),
                tail_mass=tail.numpy(),
            )

    m = write_cache(root, header, sequences(), parquet_options=options)
    r = CacheReader(root)
    groups = list(r.iter_row_groups())
    decoded = {
        "entry_ids": torch.from_numpy(np.concatenate([g.entry_ids for g in groups]).astype(np.int64)),
        "entry_logprobs": torch.from_numpy(np.concatenate([g.entry_logprobs for g in groups])),
        "tail_mass": torch.from_numpy(np.concatenate([g.tail_mass for g in groups])),
    }
    return m["totals"]["num_bytes"] / m["totals"]["num_tokens"], decoded


def signal_error(
    student_logits: Any, teacher_logp: Any, decoded: Any, no_tail: bool = False, exact_grad: Any = None
) -> tuple[dict[str, float], Any]:
    """Relative error of the per-position forward-KL value and of its gradient w.r.t. the student logits, against
    the full distribution and (when given) against the same k's gradient from exact float32 values."""
    import torch

    from logitcache.train.config import KDSettings
    from logitcache.train.losses import TeacherTargets, kd_loss_per_position

    z = student_logits.clone().requires_grad_(True)
    full = (teacher_logp.exp() * (teacher_logp - torch.log_softmax(z, -1))).sum(-1)
    (g_full,) = torch.autograd.grad(full.sum(), z)
    z2 = student_logits.clone().requires_grad_(True)
    teacher = TeacherTargets(decoded["entry_ids"], decoded["entry_logprobs"].exp(), decoded["tail_mass"])
    bucket = kd_loss_per_position(z2, teacher, KDSettings(no_tail=no_tail))
    (g_b,) = torch.autograd.grad(bucket.sum(), z2)
    out = {
        "loss_rel_err": float((bucket.detach() - full.detach()).abs().mean() / full.detach().abs().mean()),
        "grad_rel_err": float((g_b - g_full).norm(dim=-1).mean() / g_full.norm(dim=-1).mean()),
    }
    if exact_grad is not None:
        out["codec_grad_rel_err"] = float((g_b - exact_grad).norm(dim=-1).mean() / exact_grad.norm(dim=-1).mean())
    return out, g_b


# (name, codec, parquet options, no_tail); the f32 row comes first: the codecs' own error is measured against it
VARIANTS: list[tuple[str, str, dict[str, Any] | None, bool]] = [
    ("f32 (exact values)", "f32", None, False),
    ("int32 ids + f16 + zstd (baseline)", "f16", BASELINE_OPTIONS, False),
    ("default: lpq16 1/512x4, 1/32", "lpq16:fine=1/512x4,coarse=1/32", None, False),
    ("lpq16 1/512x8, 1/64", "lpq16:fine=1/512x8,coarse=1/64", None, False),
    ("lpq16 1/256x1, 1/16", "lpq16:fine=1/256x1,coarse=1/16", None, False),
    ("f32, tail dropped (renormalised head)", "f32", None, True),
]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher-work", default=None, help="demo build dir holding teacher/ and data/ (default: built)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: only checks that the benchmark runs")
    return ap.parse_args()


def measure(data: dict[str, Any], student: Any, ks: list[int]) -> list[dict[str, Any]]:
    """One row per (k, variant): bytes per token and the signal errors of `signal_error`, printed as they come."""
    logp = data["logp"]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in ks:
            exact = None
            for name, codec, options, no_tail in VARIANTS:
                t0 = time.perf_counter()
                bpt, decoded = write_variant(Path(tmp) / f"k{k}-{len(rows)}", data["windows"], logp, k, codec, options)
                err, grad = signal_error(student, logp, decoded, no_tail, exact)
                if exact is None:
                    exact = grad  # the f32 row comes first: the codecs' own error is measured against it
                rows.append({"k": k, "variant": name, "bytes_per_token": bpt, **err})
                print(
                    f"k={k:<4d} {name:40s} {bpt:7.1f} B/token  loss err {err['loss_rel_err']:.2e}  "
                    f"grad err {err['grad_rel_err']:.2e}  codec {err.get('codec_grad_rel_err', 0):.1e}  ({time.perf_counter() - t0:.1f}s)"
                )
    return rows


def write_tables(out: Path, rows: list[dict[str, Any]], positions: int, vocab: int) -> None:
    """fidelity.json (every row) and fidelity.md (the table, also printed)."""
    (out / "fidelity.json").write_text(json.dumps({"positions": positions, "vocab": vocab, "rows": rows}, indent=2))
    table = markdown_table(
        ["k", "variant", "bytes/token", "KD loss rel. error", "KD grad rel. error", "grad error from the codec alone"],
        [
            [
                r["k"],
                r["variant"],
                f"{r['bytes_per_token']:.1f}",
                f"{r['loss_rel_err']:.2e}",
                f"{r['grad_rel_err']:.2e}",
                f"{r.get('codec_grad_rel_err', 0.0):.1e}",
            ]
            for r in rows
        ],
    )
    (out / "fidelity.md").write_text(table + "\n")
    print(table)


def plot(out: Path, rows: list[dict[str, Any]], ks: list[int], positions: int) -> None:
    """fidelity.png: KD gradient error against bytes per token, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, *_ in VARIANTS:
        pts = [(r["bytes_per_token"], r["grad_rel_err"]) for r in rows if r["variant"] == name]
        ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xlabel("bytes per token")
    ax.set_ylabel("relative error of the KD gradient (vs full distribution)")
    ax.set_yscale("log")
    ax.set_title(f"fidelity per byte, k in {ks}, {positions} held-out positions")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fidelity.png", dpi=120)


def main() -> None:
    args = parse_args()
    import torch

    torch.manual_seed(0)
    work = Path(args.teacher_work) if args.teacher_work else ensure_teacher(args.quick)
    data = teacher_outputs(work / "teacher", work / "data" / "heldout.jsonl", 200 if args.quick else 4000)
    logp = data["logp"]
    gen = torch.Generator().manual_seed(0)
    student = logp * 0.7 + torch.randn(logp.shape, generator=gen)
    ks = [8, 32] if args.quick else [8, 32, 64, 128]
    rows = measure(data, student, ks)
    out = out_dir("fidelity")
    write_tables(out, rows, int(logp.shape[0]), data["vocab"])
    plot(out, rows, ks, int(logp.shape[0]))
    print(f"wrote {out}/fidelity.{{json,md,png}}")


if __name__ == "__main__":
    main()
