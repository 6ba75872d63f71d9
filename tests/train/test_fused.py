"""The fused linear + sparse-KD + CE loss (train/fused.py) against the reference (train/losses.py) in float64: values
and gradients for every loss x temperature x tail / no-tail / sampled x alpha x chunk size x padding, an empty batch,
the head transforms and a bias; bf16 autocast within a stated tolerance; a head that holds nearly everything."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from logitcache.storage import LMHeadTransform
from logitcache.train.config import KDSettings
from logitcache.train.fused import fused_distillation_loss
from logitcache.train.losses import LOSSES, TeacherTargets, chunked_distillation_loss

N, D, V, M = 37, 16, 50, 6


def _case(seed: int = 0, sampled: bool = False, n: int = N, pad: bool = True) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(seed)
    hidden = torch.randn(n, D, dtype=torch.float64)
    weight = torch.randn(V, D, dtype=torch.float64) * 0.5
    bias = torch.randn(V, dtype=torch.float64) * 0.1
    lp, ids = torch.log_softmax(torch.randn(n, V, dtype=torch.float64) * 2, -1).topk(M)
    probs = lp.exp()
    tail = (1 - probs.sum(-1)).clamp(min=0)
    if sampled:  # weights that cover everything (the sampled view): renormalised, tail 0
        probs = probs / probs.sum(-1, keepdim=True)
        tail = torch.zeros_like(tail)
    if pad and n > 5:
        ids[3, -2:] = -1  # padding at the end of a row
        probs[3, -2:] = 0.0
        ids[5, 1:] = -1  # a single entry
        probs[5, 1:] = 0.0
        ids[4, -1] = 0 if ids[4, 0] != 0 else 1  # token 0 as a real head id next to padding elsewhere
    targets = torch.randint(0, V, (n,))
    return hidden, weight, bias, ids, probs, tail, targets


def _both(settings: KDSettings, case: tuple[torch.Tensor, ...], transform: LMHeadTransform, use_bias: bool):
    hidden, weight, bias, ids, probs, tail, targets = case
    teacher = TeacherTargets(ids, probs, tail)
    out = []
    for fused in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        b = bias.clone().requires_grad_() if use_bias else None
        if fused:
            parts = fused_distillation_loss(h, w, b, teacher, targets, settings, normalizer=11.0, transform=transform)
        else:

            def head(x: torch.Tensor, w: torch.Tensor = w, b: torch.Tensor | None = b) -> torch.Tensor:
                return transform.apply(torch.nn.functional.linear(x, w, b))

            parts = chunked_distillation_loss(h, head, teacher, targets, settings, normalizer=11.0)
        parts.total.backward()
        out.append((parts, h.grad, w.grad, b.grad if b is not None else None))
    return out


def _check(ref, got, rtol: float = 1e-9, atol: float = 1e-11) -> None:
    (rp, rh, rw, rb), (gp, gh, gw, gb) = ref, got
    for name in ("total", "kd_sum", "ce_sum"):
        torch.testing.assert_close(
            getattr(gp, name), getattr(rp, name), rtol=rtol, atol=atol, msg=name, check_dtype=False
        )
    assert gp.num_positions == rp.num_positions
    torch.testing.assert_close(gh, rh, rtol=rtol, atol=atol)
    torch.testing.assert_close(gw, rw, rtol=rtol, atol=atol)
    if rb is not None:
        torch.testing.assert_close(gb, rb, rtol=rtol, atol=atol)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("no_tail", [False, True])
@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_equals_reference_every_loss(loss: str, temperature: float, no_tail: bool, alpha: float) -> None:
    beta = 0.3 if loss in ("jsd", "skew_kl") else None
    settings = KDSettings(loss=loss, beta=beta, temperature=temperature, no_tail=no_tail, alpha=alpha, chunk_size=8)
    ref, got = _both(settings, _case(), LMHeadTransform(), use_bias=False)
    _check(ref, got)


@pytest.mark.parametrize("chunk", [1, 8, 36, 37, 512])
@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.0])
def test_equals_reference_sampled_and_chunk_sizes(chunk: int, alpha: float) -> None:
    settings = KDSettings(alpha=alpha, chunk_size=chunk, target_mode="sampled")
    ref, got = _both(settings, _case(1, sampled=True), LMHeadTransform(), use_bias=False)
    _check(ref, got)
    settings = KDSettings(alpha=alpha, chunk_size=chunk, temperature=1.5)
    ref, got = _both(settings, _case(2), LMHeadTransform(), use_bias=True)
    _check(ref, got)


@pytest.mark.parametrize("transform", [LMHeadTransform(scale=0.25), LMHeadTransform(scale=2.0, softcap=3.0)])
def test_equals_reference_with_head_transform_and_bias(transform: LMHeadTransform) -> None:
    settings = KDSettings(loss="jsd", beta=0.5, alpha=0.7, chunk_size=10)
    ref, got = _both(settings, _case(3), transform, use_bias=True)
    _check(ref, got)


def test_empty_batch_gives_zero_loss_and_zero_gradients() -> None:
    settings = KDSettings(alpha=0.5)
    ref, got = _both(settings, _case(4, n=0), LMHeadTransform(), use_bias=True)
    _check(ref, got)
    assert got[0].total.item() == 0.0 and got[2].abs().sum().item() == 0.0
    assert got[1].shape == (0, D)


def test_head_covering_the_vocabulary_has_no_tail() -> None:
    # k = V: the complement is empty; the tail bucket is invalid on both sides, no NaN anywhere.
    torch.manual_seed(5)
    hidden, weight = torch.randn(4, D, dtype=torch.float64), torch.randn(V, D, dtype=torch.float64)
    lp, ids = torch.log_softmax(torch.randn(4, V, dtype=torch.float64), -1).topk(V)
    case = (hidden, weight, torch.zeros(V, dtype=torch.float64), ids, lp.exp(), torch.zeros(4, dtype=torch.float64))
    case = (*case, torch.randint(0, V, (4,)))
    for loss in ("forward_kl", "reverse_kl"):
        ref, got = _both(KDSettings(loss=loss), case, LMHeadTransform(), use_bias=False)
        _check(ref, got)
        assert torch.isfinite(got[2]).all()


def test_complement_far_below_the_head_float32() -> None:
    # The student puts the complement ~100 nats below its max: exp underflows in float32, the log-space fallback
    # keeps value and gradient equal to the float64 reference (and finite).
    hidden = torch.eye(3, D, dtype=torch.float64)
    weight = torch.zeros(V, D, dtype=torch.float64)
    weight[:3, :3] = 100.0 * torch.eye(3, dtype=torch.float64)
    ids = torch.tensor([[0, 1], [1, 2], [2, -1]])
    probs = torch.tensor([[0.6, 0.3], [0.5, 0.2], [0.9, 0.0]], dtype=torch.float64)
    tail = 1 - probs.sum(-1)
    targets = torch.tensor([0, 1, 7])
    settings = KDSettings(loss="reverse_kl", alpha=0.5)
    ref, _ = _both(settings, (hidden, weight, weight[:, 0], ids, probs, tail, targets), LMHeadTransform(), False)
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    teacher = TeacherTargets(ids, probs.float(), tail.float())
    parts = fused_distillation_loss(h, w, None, teacher, targets, settings, normalizer=11.0)
    parts.total.backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    torch.testing.assert_close(parts.total.double(), ref[0].total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), ref[2], rtol=1e-4, atol=1e-4)


def test_bf16_autocast_within_tolerance() -> None:
    # bf16 matmuls (autocast), float32 softmax: loss within 2% and gradients within 5% (relative, in norm) of the
    # float64 reference; bf16 keeps 8 bits of mantissa, so the logits themselves carry ~0.4% relative error.
    settings = KDSettings(alpha=0.5, temperature=2.0, chunk_size=16)
    hidden, weight, bias, ids, probs, tail, targets = _case(6)
    ref, _ = _both(settings, (hidden, weight, bias, ids, probs, tail, targets), LMHeadTransform(), False)
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts = fused_distillation_loss(
            h, w, None, TeacherTargets(ids, probs.float(), tail.float()), targets, settings, 11.0
        )
    parts.total.backward()
    assert w.grad.dtype == torch.float32 and h.grad.dtype == torch.float32
    assert math.isclose(parts.total.item(), ref[0].total.item(), rel_tol=0.02)
    for got, want in ((h.grad, ref[1]), (w.grad, ref[2])):
        assert (got.double() - want).norm() <= 0.05 * want.norm()


def test_no_grad_gives_values_only() -> None:
    hidden, weight, _, ids, probs, tail, targets = _case(7)
    settings = KDSettings(alpha=0.5)
    teacher = TeacherTargets(ids, probs, tail)
    with torch.no_grad():
        parts = fused_distillation_loss(hidden, weight, None, teacher, targets, settings)
    ref = chunked_distillation_loss(hidden, lambda x: x @ weight.T, teacher, targets, settings)
    torch.testing.assert_close(parts.total, ref.total, rtol=1e-9, atol=1e-11)
    assert not parts.total.requires_grad


def test_tied_weight_gradients_accumulate_with_the_embedding() -> None:
    # A tied head: the same weight feeds the input embedding and the loss; autograd adds both contributions.
    settings = dataclasses.replace(KDSettings(alpha=0.5), chunk_size=5)
    hidden, weight, _, ids, probs, tail, targets = _case(8)
    teacher = TeacherTargets(ids, probs, tail)
    tokens = torch.randint(0, V, (N,))
    grads = []
    for fused in (False, True):
        w = weight.clone().requires_grad_()
        h = torch.nn.functional.embedding(tokens, w) + hidden
        if fused:
            parts = fused_distillation_loss(h, w, None, teacher, targets, settings)
        else:
            parts = chunked_distillation_loss(h, lambda x, w=w: x @ w.T, teacher, targets, settings)
        parts.total.backward()
        grads.append(w.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-11)
