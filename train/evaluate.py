"""Held-out evaluation: the student's CE/perplexity on the real tokens, KL(teacher || student), top-1 agreement."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from logitcache.train.config import EvalSettings
from logitcache.train.data import CacheStream
from logitcache.train.distributed import DistEnv, all_reduce_sum
from logitcache.train.student import EvalSums

__all__ = ["evaluate", "EVAL_FIELDS"]

# name -> what it means (the CLI prints these labels)
EVAL_FIELDS = {
    "ce": "student cross-entropy on the real next tokens (nats/token)",
    "perplexity": "exp(ce)",
    "kl": (
        "KL(teacher || student) on the bucketed support (head + tail), T=1 (nats/position); on a sampled cache "
        "sum w (log w - log q) over the sampled weights w, on average above the full KL (log w is not log p)"
    ),
    "top1_agreement": (
        "share of positions where the student's argmax is the teacher's top-1 token (on a sampled cache with no "
        "exact entries, the most probable sampled token)"
    ),
    "teacher_ce": "the teacher's own cross-entropy on the same tokens, from the cache (nats/token)",
    "positions": "held-out loss positions evaluated",
}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    cache: str,
    settings: EvalSettings,
    *,
    autocast: torch.dtype | None = None,
    env: DistEnv | None = None,
) -> dict[str, Any]:
    """Metrics over the held-out split (sequence ids chosen by hash with `settings.eval_fraction`, never trained on).

    model: a DistillModel (possibly DDP/FSDP-wrapped) whose forward(batch, evaluate=True) returns its EvalSums.
    Batches are dealt to ranks round-robin and the sums all-reduced, so every rank returns the same figures. Every
    rank runs the same number of forwards (a rank short of a batch runs a masked one, which adds zeros): DDP and FSDP
    run collectives inside each forward, and a rank with one forward fewer would leave the others waiting forever.
    """
    rank, world = (env.rank, env.world_size) if env else (0, 1)
    device = env.device if env else next(model.parameters()).device
    stream = CacheStream(
        cache,
        seed=0,
        batch_count=settings.batch_count,
        batch_unit=settings.batch_unit,
        eval_fraction=settings.eval_fraction,
        split="eval",
        rank=rank,
        world_size=world,
        max_sequences=settings.max_sequences,
    )
    was_training = model.training
    model.eval()
    sums = EvalSums.zeros(device)
    try:
        for batch in stream:
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                sums = sums + model(batch, evaluate=True)
    finally:
        model.train(was_training)
    ce, kl, agree, n, teacher = all_reduce_sum(torch.stack(list(sums))).tolist()  # EvalSums' field order
    if n == 0:
        raise ValueError(
            f"{cache}: no held-out positions to evaluate (--eval-fraction {settings.eval_fraction}); raise --eval-fraction"
        )
    return {
        "ce": ce / n,
        "perplexity": math.exp(min(ce / n, 700.0)),
        "kl": kl / n,
        "top1_agreement": agree / n,
        "teacher_ce": teacher / n,
        "positions": int(n),
    }
