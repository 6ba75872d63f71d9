"""The fused linear + sparse-KD + CE loss: logits once per chunk, the loss and its gradient in the same pass.

`chunked_distillation_loss` (train/losses.py, the reference) materialises a chunk's [C, V] logits, runs every loss
through autograd (several full-vocabulary temporaries), and `torch.utils.checkpoint` recomputes the output projection
in backward. Here a custom autograd Function (the pattern of Liger-Kernel's fused linear cross entropy) does, per chunk
of C positions, in two reused [C, V] buffers:

    z  = transform(h W^T + b)                          one matmul (A)
    m  = max_j z_j;  e_j = exp(z_j - m);  S = sum_j e_j         lse = m + log S                      (B = e)
    for the tail bucket: E_c = sum_{j not in H} e_j (B with the head zeroed), lse_comp = m + log E_c
    the small statistics (train/losses.py `StudentStats`: z at the target ids, lse, lse_comp, logsumexp(z / T))
    -> the loss of every kind (the same `bucket_logprobs_from_stats` + `divergence` as the reference) and the
       gradient of the chunk's total with respect to those statistics: autograd on [C, M+1] tensors, O(C M)
    -> the gradient with respect to z in closed form (below), written into B
    grad_h = G W,  grad_W += G^T h,  grad_b += sum_rows G                                          two matmuls

Closed form. Every loss here (five divergences on the head + tail buckets, temperature, `--no-tail`, sampled
targets, the alpha mix with CE) is a function L(z_H, z_y, lse, lse_comp, lse_T) of the student's logits through
z_H (z at the M target ids H), z_y (at the real next token, for CE), lse = logsumexp(z), lse_comp = logsumexp over
the complement of H and lse_T = logsumexp(z / T). Their derivatives with respect to z_j are

    d z_H,i / d z_j = [j = H_i]           d lse / d z_j = q_j = e_j / S
    d lse_comp / d z_j = [j not in H] q_j / q_tail = [j not in H] e_j / E_c
    d lse_T / d z_j = softmax(z / T)_j / T

so with g_x = dL/dx (from the small autograd graph),

    dL/dz_j = q_j g_lse + [j not in H] (e_j / E_c) g_comp + softmax(z/T)_j g_T / T + sum_i [j = H_i] g_H,i + [j = y] g_y

i.e. one scale of the complement's e_j per row (g_lse / S + g_comp / E_c), then the head's q_j g_lse + g_H,i and
the target's g_y scattered in (O(C M) work), plus the lse_T term in the only setting that needs it (forward KL with
no tail bucket at T != 1). For example forward KL with the tail bucket at T = 1 has g_H,i = -p_i, g_lse = 1 and
g_comp = -p_tail, which gives the familiar dL/dz_j = q_j - p_j on the head and q_j (1 - p_tail / q_tail) on the
complement: the student's tail gradient spreads over the complement in proportion to q. The head transform (Cohere/Granite scale,
Gemma softcap) chains in elementwise: dz/d(raw) = scale (1 - (z / softcap)^2).

Why the bucket-level gradient comes from autograd rather than five hand-written formulas: it is exact, it is the
reference's own code (one definition of every loss), and it costs O(C M) next to the O(C V) passes above; what the
fusion removes is every full-vocabulary temporary and the recomputation, which is where the time goes.

Numerics: E_c underflows in float32 only when the complement lies ~87 nats below the max logit; those rows (rare)
are recomputed in log space from z. Inputs in float64 are computed in float64 (the reference tests); otherwise in
float32, with the two matmuls in the autocast dtype when autocast is on (bf16 on a GPU).

Nothing [N, V] outlives its chunk: what is kept for backward is grad_h [N, D] and grad_W [V, D] (and grad_b),
scaled by the incoming gradient in backward.
"""

from __future__ import annotations

from typing import Any

import torch

from logitcache.storage import LMHeadTransform
from logitcache.train.config import DEFAULT_KD, KDSettings
from logitcache.train.losses import (
    LossParts,
    StudentStats,
    TeacherTargets,
    bucket_logprobs_from_stats,
    divergence,
    uses_full_temperature,
    uses_tail_bucket,
)

__all__ = ["fused_distillation_loss"]

# Below this a row's complement sum E_c (relative to the row's max) has lost float32 precision: recompute in log space.
_TINY_COMPLEMENT = 1e-30


def _compute_dtypes(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(matmul dtype, softmax dtype): float64 stays float64; autocast picks the matmul dtype, float32 otherwise."""
    if hidden.dtype == torch.float64 and weight.dtype == torch.float64:
        return torch.float64, torch.float64
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type), torch.float32
    return weight.dtype, torch.float32


def _chunk_loss(
    stats: StudentStats, z_y: torch.Tensor, teacher: TeacherTargets, settings: KDSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(alpha T^2 KD + (1 - alpha) CE, KD, CE) summed over the chunk's positions, from the statistics."""
    ce = (stats.lse.squeeze(-1) - z_y).sum()
    if settings.alpha > 0.0:
        t_lp, s_lp, valid = bucket_logprobs_from_stats(stats, teacher, settings)
        kd = divergence(t_lp, s_lp, valid, settings.loss, settings.beta).sum()
    else:
        kd = torch.zeros((), dtype=ce.dtype, device=ce.device)
    total = settings.alpha * settings.temperature**2 * kd + (1.0 - settings.alpha) * ce
    return total, kd, ce


class _FusedLoss(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        ids: torch.Tensor,
        probs: torch.Tensor,
        tail_mass: torch.Tensor,
        next_token_ids: torch.Tensor,
        settings: KDSettings,
        transform: LMHeadTransform,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, v = int(hidden.shape[0]), int(weight.shape[0])
        mm_dtype, sm_dtype = _compute_dtypes(hidden, weight)
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        h_all = hidden.to(mm_dtype)
        w = weight.to(mm_dtype)
        b = bias.to(mm_dtype) if bias is not None else None
        grad_h = torch.zeros_like(hidden) if want_grad else None
        grad_w = torch.zeros(weight.shape, dtype=sm_dtype, device=weight.device) if want_grad else None
        grad_b = torch.zeros(v, dtype=sm_dtype, device=weight.device) if want_grad and bias is not None else None
        sums = torch.zeros(3, dtype=sm_dtype, device=hidden.device)  # total, kd, ce
        chunk = settings.chunk_size
        rows = min(chunk, n)
        # Two [chunk, V] buffers reused by every chunk: the logits (A) and exp / the gradient (B).
        buf_a = torch.empty((rows, v), dtype=sm_dtype, device=hidden.device)
        buf_b = torch.empty((rows, v), dtype=sm_dtype, device=hidden.device)
        for start in range(0, n, chunk):
            sl = slice(start, min(start + chunk, n))
            c = sl.stop - sl.start
            h = h_all[sl]
            z, e = buf_a[:c], buf_b[:c]
            teacher = TeacherTargets(ids[sl], probs[sl], tail_mass[sl])
            _logits(h, w, b, transform, out=z)
            g = _chunk_forward_backward(z, e, teacher, next_token_ids[sl], settings, sums, want_grad)
            if g is None:
                continue
            if transform.softcap is not None:  # z = cap tanh(u / cap): dz/du = 1 - (z / cap)^2
                g.mul_(1.0 - (z / transform.softcap).square())
            if transform.scale != 1.0:
                g.mul_(transform.scale)
            gm = g.to(mm_dtype)
            assert grad_h is not None and grad_w is not None
            grad_h[sl] = (gm @ w).to(grad_h.dtype)
            if mm_dtype == sm_dtype:
                grad_w.addmm_(gm.t(), h)
            else:  # bf16 matmul (fp32 accumulation inside), added to the float32 accumulator
                grad_w += gm.t() @ h
            if grad_b is not None:
                grad_b += g.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        total, kd, ce = sums.unbind()
        ctx.mark_non_differentiable(kd, ce)
        return total, kd, ce

    @staticmethod
    def backward(ctx: Any, g_total: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w, grad_b = ctx.saved_tensors
        gh = grad_h * g_total.to(grad_h.dtype) if grad_h is not None and ctx.needs_input_grad[0] else None
        gw = (grad_w * g_total).to(ctx.weight_dtype) if grad_w is not None and ctx.needs_input_grad[1] else None
        gb = (grad_b * g_total).to(ctx.weight_dtype) if grad_b is not None and ctx.needs_input_grad[2] else None
        return gh, gw, gb, None, None, None, None, None, None


def _logits(
    h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transform: LMHeadTransform, out: torch.Tensor
) -> None:
    """out <- transform(h W^T + b), in out's dtype, in place (LMHeadTransform.apply would allocate new [C, V]
    tensors, which the reused buffer exists to avoid)."""
    if out.dtype == h.dtype:
        torch.matmul(h, w.t(), out=out)
        if b is not None:
            out += b
    else:
        out.copy_(h @ w.t() if b is None else torch.addmm(b, h, w.t()))
    if transform.scale != 1.0:
        out.mul_(transform.scale)
    if transform.softcap is not None:
        out.div_(transform.softcap).tanh_().mul_(transform.softcap)


def _chunk_forward_backward(
    z: torch.Tensor,
    e: torch.Tensor,
    teacher: TeacherTargets,
    targets: torch.Tensor,
    settings: KDSettings,
    sums: torch.Tensor,
    want_grad: bool,
) -> torch.Tensor | None:
    """Adds the chunk's (total, kd, ce) to `sums`; returns dL/dz written into `e` (None without want_grad)."""
    valid = teacher.ids >= 0
    ids = teacher.ids.clamp(min=0).long()
    y = targets.long().unsqueeze(-1)
    need_kd = settings.alpha > 0.0
    tail = need_kd and uses_tail_bucket(settings)
    full_temp = need_kd and uses_full_temperature(settings)
    tempered = full_temp and settings.temperature != 1.0

    leaves: dict[str, torch.Tensor] = {"z_head": z.gather(-1, ids), "z_y": z.gather(-1, y).squeeze(-1)}
    m = z.amax(dim=-1, keepdim=True)
    torch.sub(z, m, out=e)
    e.exp_()
    s = e.sum(dim=-1, keepdim=True)
    leaves["lse"] = m + s.log()
    e_head = e.gather(-1, ids)
    e_comp = has_tail = None
    bad = None
    if tail:
        # Zero the head in e with amin: 0 at valid slots, +inf at padding (a no-op even where padding points at a
        # head id; a plain scatter would race between the two writes).
        e.scatter_reduce_(-1, ids, _head_fill(valid, 0.0, e.dtype), reduce="amin")
        e_comp = e.sum(dim=-1, keepdim=True)
        leaves["lse_comp"] = m + e_comp.log()
        has_tail = valid.sum(dim=-1, keepdim=True) < z.shape[-1]
        # (an empty complement, k = V, is not "bad": its tail bucket is invalid and gets no gradient)
        bad = ((e_comp < _TINY_COMPLEMENT) & has_tail).squeeze(-1).nonzero().squeeze(-1)
        if bad.numel():  # log space for the rows whose complement underflowed (see the module docstring)
            leaves["lse_comp"][bad] = torch.logsumexp(_complement(z[bad], ids[bad], valid[bad]), dim=-1, keepdim=True)
    if tempered:
        leaves["lse_temp"] = torch.logsumexp(z / settings.temperature, dim=-1, keepdim=True)

    with torch.enable_grad():
        for t in leaves.values():
            t.requires_grad_(want_grad)
        lse_temp = leaves.get("lse_temp", leaves["lse"]) if full_temp else None
        stats = StudentStats(leaves["z_head"], leaves["lse"], lse_temp, leaves.get("lse_comp"), has_tail)
        total, kd, ce = _chunk_loss(stats, leaves["z_y"], teacher, settings)
        sums += torch.stack([total.detach(), kd.detach(), ce.detach()])
        if not want_grad:
            return None
        names = list(leaves)
        found = torch.autograd.grad(total, [leaves[k] for k in names], allow_unused=True)
    g = {k: torch.zeros_like(leaves[k]) if gk is None else gk for k, gk in zip(names, found)}

    # Complement (and, without a tail bucket, every id): e_j (g_lse / S + g_comp / E_c).
    coef = g["lse"] / s
    if tail:
        assert e_comp is not None and bad is not None
        g_comp = g["lse_comp"]
        coef = coef + torch.where(g_comp != 0, g_comp / e_comp, 0.0)
        e.mul_(coef)
        if bad.numel():
            comp = _complement(z[bad], ids[bad], valid[bad])
            e[bad] = (comp - leaves["lse"][bad]).exp() * g["lse"][bad] + (
                comp - leaves["lse_comp"][bad]
            ).exp() * g_comp[bad]
        # the head slots of e are 0 here: add q_i g_lse + g_H,i (padding adds 0)
        e.scatter_add_(-1, ids, torch.where(valid, e_head / s * g["lse"] + g["z_head"], 0.0))
    else:
        e.mul_(coef)  # q_j g_lse everywhere, the head included
        e.scatter_add_(-1, ids, torch.where(valid, g["z_head"], 0.0))
    if tempered:
        e.add_(torch.softmax(z / settings.temperature, dim=-1) * (g["lse_temp"] / settings.temperature))
    e.scatter_add_(-1, y, g["z_y"].unsqueeze(-1))
    return e


def _head_fill(valid: torch.Tensor, value: float, dtype: torch.dtype) -> torch.Tensor:
    """`value` at valid slots, +inf at padding: the src of an amin scatter that leaves padding's ids untouched."""
    return torch.where(valid, value, torch.inf).to(dtype)


def _complement(z: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """z with the head ids set to -inf (a copy)."""
    return z.scatter_reduce(-1, ids, _head_fill(valid, -torch.inf, z.dtype), reduce="amin")


def fused_distillation_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher: TeacherTargets,
    next_token_ids: torch.Tensor,
    settings: KDSettings = DEFAULT_KD,
    normalizer: float | None = None,
    transform: LMHeadTransform | None = None,
) -> LossParts:
    """`chunked_distillation_loss` of transform(hidden @ weight^T + bias), fused (see the module docstring).

    hidden: float [N, D] the student's final hidden states at the loss-mask positions; weight: [V, D] the output
    embedding sliced to the cache's vocabulary (bias [V] or None); teacher: the targets at the N positions;
    next_token_ids int [N]. Same values and gradients as the reference, no [N, V] tensor kept, nothing recomputed.
    """
    n = int(next_token_ids.shape[0])
    total, kd, ce = _FusedLoss.apply(
        hidden,
        weight,
        bias,
        teacher.ids,
        teacher.probs,
        teacher.tail_mass,
        next_token_ids,
        settings,
        transform or LMHeadTransform(),
    )
    norm = float(normalizer if normalizer is not None else max(n, 1))
    return LossParts(total=total / norm, kd_sum=kd, ce_sum=ce, num_positions=n)
