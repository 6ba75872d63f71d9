"""A PNG of a run's curves (train loss with its KD and CE parts, held-out KL and CE) from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["plot_metrics", "PLOT_NAME"]

PLOT_NAME = "curves.png"


def plot_metrics(run_dir: str | Path) -> Path:
    """Writes RUN_DIR/curves.png (matplotlib, Agg backend: no display needed) and returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval" in r]
    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in train]
    for key, label in (("loss", "total"), ("kd_loss", "KD"), ("ce_loss", "CE")):
        ax_train.plot(steps, [r[key] for r in train], label=label)
    ax_train.set(title="training loss", xlabel="step", ylabel="nats / position")
    ax_train.legend()
    if evals:
        e_steps = [r["step"] for r in evals]
        ax_eval.plot(e_steps, [r["eval"]["kl"] for r in evals], "o-", label="KL(teacher || student)")
        ax_eval.plot(e_steps, [r["eval"]["ce"] for r in evals], "s-", label="student CE")
        ax_eval.plot(e_steps, [r["eval"]["teacher_ce"] for r in evals], "--", label="teacher CE")
        ax_eval.legend()
    ax_eval.set(title="held-out", xlabel="step", ylabel="nats / position")
    fig.tight_layout()
    out = run_dir / PLOT_NAME
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
