"""Distillation losses on the sparse target view (stored entries + one tail bucket), chunked over positions.

The teacher is known through the cache's sparse target view (storage/targets.py, `TeacherTargets` here): M target
ids with weights and the mass they leave uncovered (`tail_mass`). Teacher log-probs are log(weight), floored at
_LOG_FLOOR (a weight of 0 on a valid id contributes 0, never NaN).

`topk` and `adaptive` caches: the weights are the teacher's exact probabilities of the stored (head) ids H. Every loss
here compares two distributions over the same |H|+1 outcomes: the head tokens and one "tail" bucket that stands for
every other token. Teacher: P = (p_i for i in H, p_tail). Student: Q = (q_i for i in H, q_tail) with
q = softmax(student logits) over the full vocabulary and q_tail = 1 - sum_H q_i, computed as a log-sum-exp over the
complement of H (exact and stable even when the head holds nearly all of the mass, where log1p(-sum) loses digits).

`sampled` caches (`KDSettings.target_mode == "sampled"`, set from the cache's TargetSpec): the weights are the exact
top-r probabilities plus residual * count / N for each sampled id, an unbiased estimate of the teacher's probability
of every id, and they cover the whole distribution (the view's tail is 0). There is no tail bucket: forward KL is
sum_i w_i (log w_i - log q_i) with q the student's full-vocabulary softmax (NOT renormalised over the ids), i.e. the
soft cross-entropy minus a constant (the weights are renormalised to sum 1, which only undoes the codec's rounding of
the exact entries), linear in the weights, so its gradient (q - w) is an unbiased estimate of the
full-distribution gradient (q - p). Its value is not an unbiased KL (log w_i is not log p_i). The other losses (and
T != 1) need the teacher's probability of the student's tokens and are refused (train/config.py).

Divergences (per position, summed over the K+1 buckets):
    forward_kl  KL(P || Q)        = sum P (log P - log Q)
    reverse_kl  KL(Q || P)        = sum Q (log Q - log P)
    jsd(beta)   beta KL(P || M) + (1 - beta) KL(Q || M),  M = beta P + (1 - beta) Q   (beta = 0.5: the usual JSD)
    tvd         1/2 sum |P - Q|
    skew_kl(beta)  KL(P || M),  M = beta P + (1 - beta) Q   (skew forward KL of DistiLLM, Ko et al. 2024)

Temperature. The cache is stored at T=1; the teacher's distribution at T != 1 would need every tail probability
(sum_{j in tail} p_j^(1/T)), which was never stored. Tempering the tail as a single bucket (p_tail^(1/T)) while the
student is tempered over its full vocabulary (softmax(z / T)) compares two different maps, and the student that
minimises that loss is *not* the teacher: at T > 1, sum_tail q_j^(1/T) > q_tail^(1/T), so the student is pushed to
shrink its tail, the over-confidence the tail bucket exists to avoid. So both sides get the same map on the K+1
buckets: b -> b^(1/T) / sum_buckets b^(1/T), i.e. log-probs divided by T and re-normalised over the head AND the tail
bucket (the tail is tempered as one bucket with mass p_tail^(1/T), on both sides). The ratios between head tokens
are exactly those of softmax(z / T); only the tail's share differs from a full-vocabulary tempering. The divergence
of the tempered buckets is 0 iff the untempered buckets agree, so the minimiser stays "match the teacher". The KD
term is multiplied by T^2 (Hinton et al.) so its gradient scale does not shrink with T.

`no_tail=True` is the baseline other projects use: the teacher head is renormalised (the tail dropped). With
`forward_kl` it is compared with the student's full-vocabulary log-softmax (of z / T) gathered at the head ids, as
those projects do: sum_H p_i log q_i is minimised by q_i = p_i with all mass on the head. Every other loss needs two
distributions on the same support (with an unnormalised Q, reverse KL's minimiser puts head mass 1/e), so there the
student is renormalised over the head too. Either way the baseline biases the student towards over-confidence and
exists for comparisons.

Tail resolution. A stored teacher tail of 0 (or below float32's resolution of a sum near 1, `TAIL_FLOOR`) means "too
small for the engine to resolve", never a hard zero: reverse KL, JSD and skew KL weigh log p_tail by the student's
tail mass, and log(0) would make one position cost ~10^4 nats. Teacher tails are floored at `TAIL_FLOOR`.

Memory: `chunked_distillation_loss` takes the student's last hidden states and the output head and materialises
full-vocabulary logits for `chunk_size` positions at a time, recomputing them in backward (activation
checkpointing), so peak memory stays at one chunk's [chunk, V] logits instead of [positions, V]. This is the
reference implementation; training uses train/fused.py (the same losses through `bucket_logprobs_from_stats`, with the
gradient formed in the forward pass in closed form), which the tests hold equal to this one in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = [
    "LOSSES",
    "TAIL_FLOOR",
    "LossParts",
    "TeacherTargets",
    "bucket_logprobs",
    "divergence",
    "kd_loss_per_position",
    "distillation_loss",
    "chunked_distillation_loss",
]

from logitcache.train.config import DEFAULT_KD, LOSSES, KDSettings

# log-probs below this are treated as 0 probability; finite so that 0 * log(0) terms and their gradients stay 0.
_LOG_FLOOR = -1e4
# Smallest teacher tail mass the loss believes: float32's epsilon, the resolution of a float32 1 - sum(head) and the
# order of the engines' own rounding; a stored 0 means "below resolution" (see the module docstring).
TAIL_FLOOR = float(torch.finfo(torch.float32).eps)


class LossParts(NamedTuple):
    """Sums over the positions of a batch (divide by `num_positions` for means); `total` carries the gradient.

    A NamedTuple so that DDP and FSDP2 see (and hook) its tensors when a model's forward returns it.
    """

    total: torch.Tensor  # scalar: alpha * T^2 * kd_sum + (1 - alpha) * ce_sum, divided by the normaliser
    kd_sum: torch.Tensor  # scalar, detached: sum over positions of the (untempered-scale) KD divergence
    ce_sum: torch.Tensor  # scalar, detached: sum over positions of the CE on the real next token
    num_positions: int


class TeacherTargets(NamedTuple):
    """The teacher's side of the loss at N positions: the sparse target view (storage/targets.py) as tensors.

    A position's weights `probs` plus `tail_mass` sum to 1. For `topk`/`adaptive` caches the weights are the teacher's
    exact probabilities of the stored ids and `tail_mass` the mass outside them; for `sampled` caches they are
    unbiased estimates of the teacher's probabilities (exact top-r, then residual * count / N) and the tail is 0.
    """

    ids: torch.Tensor  # int [N, M], -1 = padding
    probs: torch.Tensor  # float [N, M], 0 where padded
    tail_mass: torch.Tensor  # float [N] in [0, 1], the mass `probs` leaves uncovered

    @classmethod
    def from_batch(cls, batch: Mapping[str, torch.Tensor]) -> TeacherTargets:
        """The targets of a `collate` batch (keys `target_ids`, `target_probs`, `tail_mass`)."""
        return cls(batch["target_ids"], batch["target_probs"], batch["tail_mass"])

    def rows(self, index: slice | torch.Tensor) -> TeacherTargets:
        """The targets at a subset of the positions."""
        return TeacherTargets(self.ids[index], self.probs[index], self.tail_mass[index])

    def logprobs(self) -> torch.Tensor:
        """float32 [N, M]: log of the weights, floored at _LOG_FLOOR (a weight of 0 stays a finite term of weight 0)."""
        return torch.log(_upcast(self.probs)).clamp(min=_LOG_FLOOR)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float32, or float64 when given float64 (the reference tests compare the fused path in float64)."""
    return x if x.dtype == torch.float64 else x.float()


class StudentStats(NamedTuple):
    """What the losses need from the student's full-vocabulary logits z [N, V] at N positions: a few gathers and
    log-sum-exps. Every loss here is a function of these small tensors only (`bucket_logprobs_from_stats`), which is
    what lets the fused path (train/fused.py) compute them in its own passes and chain the gradient back to z in
    closed form. Entries that a setting does not use are None."""

    z_head: torch.Tensor  # [N, M] z at the target ids (padding slots: z[0], given zero weight)
    lse: torch.Tensor  # [N, 1] logsumexp(z)
    lse_temp: torch.Tensor | None  # [N, 1] logsumexp(z / T): forward KL without a tail bucket only (lse when T = 1)
    lse_comp: torch.Tensor | None  # [N, 1] logsumexp of z over the complement of the target ids: tail bucket only
    has_tail: torch.Tensor | None  # bool [N, 1]: the complement is not empty (k = V leaves it empty)


def uses_tail_bucket(settings: KDSettings) -> bool:
    return not (settings.no_tail or settings.sampled)


def uses_full_temperature(settings: KDSettings) -> bool:
    """Forward KL without a tail bucket compares with the student's full-vocabulary log-softmax of z / T."""
    return (settings.no_tail or settings.sampled) and settings.loss == "forward_kl"


def student_stats(student_logits: torch.Tensor, teacher: TeacherTargets, settings: KDSettings) -> StudentStats:
    """The reference computation of `StudentStats` from materialised logits (differentiable by autograd)."""
    z = _upcast(student_logits)
    valid_head = teacher.ids >= 0
    ids = teacher.ids.clamp(min=0).long()
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    lse_temp = lse_comp = has_tail = None
    if uses_full_temperature(settings):
        lse_temp = lse if settings.temperature == 1.0 else torch.logsumexp(z / settings.temperature, -1, keepdim=True)
    if uses_tail_bucket(settings):
        # scatter_add, not scatter: padded slots point at id 0 too, and must not unmask a real head token 0
        head_mask = torch.zeros_like(z, dtype=torch.int32).scatter_add_(-1, ids, valid_head.to(torch.int32)) > 0
        lse_comp = torch.logsumexp(z.masked_fill(head_mask, _LOG_FLOOR), dim=-1, keepdim=True)
        has_tail = head_mask.sum(dim=-1, keepdim=True) < z.shape[-1]
    return StudentStats(z.gather(-1, ids), lse, lse_temp, lse_comp, has_tail)


def bucket_logprobs(
    student_logits: torch.Tensor, teacher: TeacherTargets, settings: KDSettings = DEFAULT_KD
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher and student log-probs on the M+1 buckets (the target ids, then the tail), tempered.

    student_logits: float [N, V] (any float dtype; computed in float32, or float64 if given); teacher: the targets at
    the N positions. Returns (teacher_lp, student_lp, valid): float [N, M+1], float [N, M+1], bool [N, M+1]. Invalid
    buckets (padding; the tail when it is dropped) hold _LOG_FLOOR and must be given zero weight. The tail bucket is
    dropped with `settings.no_tail` (the baseline) and for sampled targets (none exists); there forward KL compares
    with the student's full-vocabulary log-softmax at the target ids, every other loss with the student renormalised
    over them.
    """
    return bucket_logprobs_from_stats(student_stats(student_logits, teacher, settings), teacher, settings)


def bucket_logprobs_from_stats(
    stats: StudentStats, teacher: TeacherTargets, settings: KDSettings = DEFAULT_KD
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`bucket_logprobs` from the student's `StudentStats`: only [N, M+1]-sized operations."""
    valid_head = teacher.ids >= 0
    z_head = stats.z_head
    s_head = z_head - stats.lse  # student log q_i at T=1, [N, M]
    neg = torch.full_like(s_head, _LOG_FLOOR)
    temperature = settings.temperature

    t_head = torch.where(valid_head, teacher.logprobs().to(s_head.dtype), neg)
    if not uses_tail_bucket(settings):
        # Sampled: the weights cover the whole distribution, so sum_i w_i log q_i is the soft cross-entropy with the
        # full vocabulary (an unbiased estimate of the full one). Baseline: the renormalised teacher head.
        t_lp = torch.log_softmax(t_head / temperature, dim=-1)
        if stats.lse_temp is None:
            s_lp = torch.log_softmax(torch.where(valid_head, z_head, neg) / temperature, dim=-1)
        else:
            s_lp = (z_head / temperature) - stats.lse_temp
        tail = torch.full_like(s_head[:, :1], _LOG_FLOOR)
        valid = torch.cat([valid_head, torch.zeros_like(valid_head[:, :1])], dim=-1)
        t_lp = torch.where(valid_head, t_lp, neg)
        s_lp = torch.where(valid_head, s_lp, neg)
        return torch.cat([t_lp, tail], -1), torch.cat([s_lp, tail], -1), valid

    assert stats.lse_comp is not None and stats.has_tail is not None
    # log q_tail = logsumexp over the complement of H - logsumexp over all: exact, no cancellation.
    s_tail = stats.lse_comp - stats.lse
    t_tail = torch.log(teacher.tail_mass.to(s_head.dtype).clamp(min=TAIL_FLOOR)).unsqueeze(-1)
    s_head = torch.where(valid_head, s_head, neg)
    # The tail bucket exists only where some token lies outside the head (k = V leaves it empty on both sides).
    valid = torch.cat([valid_head, stats.has_tail], dim=-1)
    t_lp = torch.cat([t_head, t_tail], dim=-1)
    s_lp = torch.cat([s_head, s_tail.clamp(min=_LOG_FLOOR)], dim=-1)
    # Same map on both sides (see the module docstring); at T=1 this only renormalises the teacher's buckets,
    # whose quantized head plus tail may miss 1 by the codec's rounding.
    big_neg = -1e30  # excluded from the normalisation; finite so that / T cannot overflow
    t_lp = torch.log_softmax(t_lp.masked_fill(~valid, big_neg) / temperature, dim=-1)
    if temperature != 1.0:
        s_lp = torch.log_softmax(s_lp.masked_fill(~valid, big_neg) / temperature, dim=-1)
    t_lp = t_lp.masked_fill(~valid, _LOG_FLOOR).clamp(min=_LOG_FLOOR)
    s_lp = s_lp.masked_fill(~valid, _LOG_FLOOR).clamp(min=_LOG_FLOOR)
    return t_lp, s_lp, valid


def divergence(
    teacher_lp: torch.Tensor, student_lp: torch.Tensor, valid: torch.Tensor, loss: str, beta: float | None = None
) -> torch.Tensor:
    """Per-position divergence between two bucket distributions given as log-probs.

    teacher_lp, student_lp: float32 [N, B]; valid: bool [N, B] (invalid buckets weigh 0). Returns float32 [N] (nats;
    TVD in probability units).
    """
    w = valid.to(teacher_lp.dtype)
    p = teacher_lp.exp() * w
    q = student_lp.exp() * w
    if loss == "forward_kl":
        out = p * (teacher_lp - student_lp)
    elif loss == "reverse_kl":
        out = q * (student_lp - teacher_lp)
    elif loss in ("jsd", "skew_kl"):
        if beta is None or not 0.0 < beta < 1.0:
            raise ValueError(f"loss {loss!r} needs beta in (0, 1), got {beta!r}")
        log_m = torch.logaddexp(teacher_lp + math.log(beta), student_lp + math.log1p(-beta))
        out = p * (teacher_lp - log_m)
        if loss == "jsd":
            out = beta * out + (1.0 - beta) * q * (student_lp - log_m)
    elif loss == "tvd":
        out = 0.5 * (p - q).abs()
    else:
        raise ValueError(f"unknown loss {loss!r}; expected one of {', '.join(LOSSES)}")
    return out.sum(dim=-1)


def kd_loss_per_position(
    student_logits: torch.Tensor, teacher: TeacherTargets, settings: KDSettings = DEFAULT_KD
) -> torch.Tensor:
    """KD divergence at each position on the bucketed support (not scaled by T^2; alpha is not applied).

    student_logits: float [N, V]; teacher: the targets at the N positions. Uses settings.loss, beta, temperature,
    no_tail and target_mode. Returns float32 [N].
    """
    t_lp, s_lp, valid = bucket_logprobs(student_logits, teacher, settings)
    return divergence(t_lp, s_lp, valid, settings.loss, settings.beta)


def _chunk_sums(
    logits: torch.Tensor, teacher: TeacherTargets, next_token_ids: torch.Tensor, settings: KDSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weighted sum, kd sum, ce sum) of one chunk's positions; logits [C, V]."""
    ce = F.cross_entropy(_upcast(logits), next_token_ids.long(), reduction="sum")
    if settings.alpha > 0.0:
        kd = kd_loss_per_position(logits, teacher, settings).sum()
    else:
        kd = ce.new_zeros(())
    total = settings.alpha * settings.temperature**2 * kd + (1.0 - settings.alpha) * ce
    return total, kd.detach(), ce.detach()


def distillation_loss(
    student_logits: torch.Tensor,
    teacher: TeacherTargets,
    next_token_ids: torch.Tensor,
    settings: KDSettings = DEFAULT_KD,
    normalizer: float | None = None,
) -> LossParts:
    """alpha * T^2 * KD + (1 - alpha) * CE, summed over positions and divided by `normalizer` (default: N).

    All inputs are the loss-mask positions only: student_logits float [N, V]; teacher: the targets at those N
    positions; next_token_ids int [N] (the real next tokens, for the CE term).
    """
    n = int(next_token_ids.shape[0])
    total, kd, ce = _chunk_sums(student_logits, teacher, next_token_ids, settings)
    norm = float(normalizer if normalizer is not None else max(n, 1))
    return LossParts(total=total / norm, kd_sum=kd, ce_sum=ce, num_positions=n)


def chunked_distillation_loss(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    teacher: TeacherTargets,
    next_token_ids: torch.Tensor,
    settings: KDSettings = DEFAULT_KD,
    normalizer: float | None = None,
) -> LossParts:
    """`distillation_loss` of head(hidden), with the [N, V] logits only ever materialised `chunk_size` rows at once.

    hidden: float [N, D] the student's final hidden states at the loss-mask positions; head: maps [C, D] -> [C, V]
    logits (the output embedding, sliced to the cache's vocabulary). Other inputs as `distillation_loss`.
    Each chunk is recomputed during backward (torch.utils.checkpoint), so only hidden is kept between passes.
    """
    n = int(next_token_ids.shape[0])
    chunk_size = settings.chunk_size

    def run(h: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor, tail: torch.Tensor, tgt: torch.Tensor):
        return _chunk_sums(head(h), TeacherTargets(ids, probs, tail), tgt, settings)

    # A batch without loss positions (a chat window with no assistant token) still gives a loss tied to the graph:
    # its backward yields zero gradients, so DDP/FSDP ranks stay in step instead of one rank skipping a reduction.
    total = (head(hidden[:0]).float().sum() * 0.0) if n == 0 else hidden.new_zeros((), dtype=torch.float32)
    kd = torch.zeros((), dtype=torch.float32, device=hidden.device)
    ce = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, n, chunk_size):
        sl = slice(start, start + chunk_size)
        args = (hidden[sl], *teacher.rows(sl), next_token_ids[sl])
        if torch.is_grad_enabled() and hidden.requires_grad:
            t, k, c = checkpoint(run, *args, use_reentrant=False)
        else:
            t, k, c = run(*args)
        total = total + t
        kd = kd + k
        ce = ce + c
    norm = float(normalizer if normalizer is not None else max(n, 1))
    return LossParts(total=total / norm, kd_sum=kd, ce_sum=ce, num_positions=n)
