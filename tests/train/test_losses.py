"""Losses on the sparse target view against hand-computed values, temperature, chunking, the k = V limit, and sampled
targets (soft cross-entropy, an unbiased gradient where top-k + tail is biased)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from logitcache.storage.targets import sparse_targets
from logitcache.train.config import ConfigError, KDSettings
from logitcache.train.losses import (
    LOSSES,
    TAIL_FLOOR,
    TeacherTargets,
    chunked_distillation_loss,
    distillation_loss,
    kd_loss_per_position,
)

from .conftest import sample_entries

# One position, V = 5. Teacher head = tokens [2, 0] with p = [0.5, 0.3], tail (tokens 1, 3, 4) = 0.2.
LOGITS = [0.3, -1.0, 1.2, 0.1, -0.4]
IDS = [2, 0]
P_HEAD = [0.5, 0.3]
P_TAIL = 0.2


def _buckets(temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Teacher and student bucket probabilities (head..., tail) computed by hand in float64."""
    z = np.array(LOGITS, dtype=np.float64)
    q = np.exp(z) / np.exp(z).sum()
    q_head = q[IDS]
    p = np.array([*P_HEAD, P_TAIL])
    qb = np.array([*q_head, 1.0 - q_head.sum()])
    p_t, q_t = p ** (1 / temperature), qb ** (1 / temperature)
    return p_t / p_t.sum(), q_t / q_t.sum()


def _hand(loss: str, p: np.ndarray, q: np.ndarray, beta: float = 0.3) -> float:
    kl = lambda a, b: float(np.sum(a * np.log(a / b)))  # noqa: E731
    m = beta * p + (1 - beta) * q
    return {
        "forward_kl": kl(p, q),
        "reverse_kl": kl(q, p),
        "jsd": beta * kl(p, m) + (1 - beta) * kl(q, m),
        "tvd": 0.5 * float(np.abs(p - q).sum()),
        "skew_kl": kl(p, m),
    }[loss]


def _exact(ids: torch.Tensor, logprobs: torch.Tensor, tail: torch.Tensor) -> TeacherTargets:
    """The sparse view of exact (topk) entries: weights exp(log-prob), 0 where padded (log-prob -inf)."""
    return TeacherTargets(ids, logprobs.exp(), tail)


def _inputs() -> tuple[torch.Tensor, TeacherTargets]:
    return torch.tensor([LOGITS]), TeacherTargets(torch.tensor([IDS]), torch.tensor([P_HEAD]), torch.tensor([P_TAIL]))


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_every_loss_matches_hand_computed_buckets(loss: str, temperature: float) -> None:
    beta = 0.3 if loss in ("jsd", "skew_kl") else None
    got = kd_loss_per_position(*_inputs(), KDSettings(loss=loss, beta=beta, temperature=temperature))
    p, q = _buckets(temperature)
    assert got.item() == pytest.approx(_hand(loss, p, q), rel=1e-5, abs=1e-7)


def test_jsd_half_is_symmetric_and_bounded() -> None:
    fwd = kd_loss_per_position(*_inputs(), KDSettings(loss="jsd", beta=0.5)).item()
    p, q = _buckets()
    assert fwd == pytest.approx(_hand("jsd", q, p, beta=0.5), rel=1e-5)  # swapping P and Q changes nothing
    assert 0 < fwd < math.log(2)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_student_with_teachers_buckets_has_zero_loss_at_any_temperature(loss: str, temperature: float) -> None:
    # The student spreads its tail unevenly (0.1, 0.06, 0.04), so only its *bucket* distribution matches the
    # teacher's; tempering both sides with the same bucket map keeps the minimum there.
    q = np.array([0.3, 0.1, 0.5, 0.06, 0.04])
    logits = torch.from_numpy(np.log(q)).float()[None]
    _, teacher = _inputs()
    beta = 0.4 if loss in ("jsd", "skew_kl") else None
    got = kd_loss_per_position(logits, teacher, KDSettings(loss=loss, beta=beta, temperature=temperature))
    assert got.item() == pytest.approx(0.0, abs=1e-6)


def test_naive_full_vocab_tempering_would_not_be_minimal_there() -> None:
    # Documents why the tail is tempered as a bucket on both sides: tempering the student over its full vocabulary
    # (softmax(z / T)) against a bucket-tempered teacher gives a positive loss at the student that matches the teacher.
    q = np.array([0.3, 0.1, 0.5, 0.06, 0.04])
    T = 2.0
    qt = q ** (1 / T) / (q ** (1 / T)).sum()
    q_naive = np.array([qt[2], qt[0], 1 - qt[2] - qt[0]])
    p, _ = _buckets(T)
    assert _hand("forward_kl", p, q_naive) > 1e-3


def test_forward_kl_with_k_equal_vocab_is_the_full_kl() -> None:
    torch.manual_seed(0)
    n, v = 7, 11
    student = torch.randn(n, v) * 2
    teacher_lp = torch.log_softmax(torch.randn(n, v) * 2, dim=-1)
    lps, ids = teacher_lp.sort(dim=-1, descending=True)
    tail = torch.zeros(n)  # nothing outside the head
    got = kd_loss_per_position(student, _exact(ids, lps, tail), KDSettings(loss="forward_kl"))
    want = F.kl_div(torch.log_softmax(student, -1), teacher_lp, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    student.requires_grad_(True)
    kd_loss_per_position(student, _exact(ids, lps, tail)).sum().backward()
    assert torch.isfinite(student.grad).all()


def test_padding_ids_are_ignored() -> None:
    logits, teacher = _inputs()
    padded = TeacherTargets(torch.tensor([[2, 0, -1, -1]]), torch.tensor([[*P_HEAD, 0.0, 0.0]]), teacher.tail_mass)
    for loss in ("forward_kl", "reverse_kl", "tvd"):
        a = kd_loss_per_position(logits, teacher, KDSettings(loss=loss))
        b = kd_loss_per_position(logits, padded, KDSettings(loss=loss))
        torch.testing.assert_close(a, b)


def test_no_tail_is_the_renormalised_head_baseline() -> None:
    logits, teacher = _inputs()
    got = kd_loss_per_position(logits, teacher, KDSettings(loss="forward_kl", no_tail=True)).item()
    p = np.array(P_HEAD) / sum(P_HEAD)
    s = torch.log_softmax(logits, -1)[0, IDS].numpy()
    assert got == pytest.approx(float(np.sum(p * (np.log(p) - s))), rel=1e-5)


def test_alpha_mix_temperature_scaling_and_masked_mean() -> None:
    torch.manual_seed(1)
    n, v, k = 6, 13, 4
    logits = torch.randn(n, v)
    lp, ids = torch.log_softmax(torch.randn(n, v), -1).topk(k)
    tail = 1 - lp.exp().sum(-1)
    targets = torch.randint(0, v, (n,))
    ce = F.cross_entropy(logits, targets)
    teacher = _exact(ids, lp, tail)
    kd = kd_loss_per_position(logits, teacher, KDSettings(temperature=2.0)).mean()
    parts = distillation_loss(logits, teacher, targets, KDSettings(temperature=2.0, alpha=0.25))
    torch.testing.assert_close(parts.total, 0.25 * 4.0 * kd + 0.75 * ce)
    torch.testing.assert_close(parts.ce_sum / n, ce)
    only_ce = distillation_loss(logits, teacher, targets, KDSettings(alpha=0.0))
    torch.testing.assert_close(only_ce.total, ce)
    # normalizer: the sum over the positions divided by a count given by the caller (grad accumulation, DDP)
    half = distillation_loss(logits, teacher, targets, KDSettings(temperature=2.0, alpha=0.25), 2 * n)
    torch.testing.assert_close(half.total, parts.total / 2)


@pytest.mark.parametrize("loss", LOSSES)
def test_chunked_equals_unchunked_values_and_gradients(loss: str) -> None:
    torch.manual_seed(2)
    n, d, v, k = 37, 16, 50, 6
    hidden0 = torch.randn(n, d, dtype=torch.float64)
    weight0 = torch.randn(v, d, dtype=torch.float64) * 0.5
    lp, ids = torch.log_softmax(torch.randn(n, v) * 2, -1).topk(k)
    ids[3, -2:] = -1  # some padding
    lp[3, -2:] = -math.inf
    teacher = _exact(ids, lp, (1 - lp.exp().sum(-1)).clamp(min=0))
    targets = torch.randint(0, v, (n,))
    settings = KDSettings(loss=loss, beta=0.3 if loss in ("jsd", "skew_kl") else None, temperature=1.5, alpha=0.7)

    h1, w1 = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
    full = distillation_loss(h1 @ w1.T, teacher, targets, settings)
    full.total.backward()
    for chunk in (1, 8, 64):
        h2, w2 = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
        part = chunked_distillation_loss(
            h2, lambda h, w=w2: h @ w.T, teacher, targets, dataclasses.replace(settings, chunk_size=chunk)
        )
        part.total.backward()
        torch.testing.assert_close(part.total, full.total, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(part.kd_sum, full.kd_sum, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-6, atol=1e-9)


def test_stable_tail_when_head_holds_almost_everything() -> None:
    # q_tail ~ 1e-12: 1 - sum(q_head) would cancel to 0 (or below) in float32; the complement log-sum-exp does not.
    logits = torch.tensor([[30.0, 0.0, 0.0, 2.0]])
    teacher = TeacherTargets(torch.tensor([[0]]), torch.tensor([[0.9]]), torch.tensor([0.1]))
    got = kd_loss_per_position(logits, teacher).item()
    z = np.array([30.0, 0.0, 0.0, 2.0])
    log_q = z - np.log(np.exp(z).sum())
    log_q_tail = np.log(np.exp(z[1:]).sum()) - np.log(np.exp(z).sum())
    want = 0.9 * (math.log(0.9) - log_q[0]) + 0.1 * (math.log(0.1) - log_q_tail)
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("loss", ["reverse_kl", "jsd", "skew_kl", "forward_kl", "tvd"])
def test_teacher_tail_of_zero_is_below_resolution_not_a_hard_zero(loss: str) -> None:
    # A confident position captured with float32 log-probs: top-1 rounds to log p = 0 and the tail is stored as 0.
    # The student still has real mass outside the head; the divergence must stay that of a tiny tail, not ~10^4 nats.
    logits = torch.tensor([[2.0, 0.0, 0.0, 1.0, 0.5]])
    ids, lps = torch.tensor([[0, 3]]), torch.tensor([[0.0, -17.0]])
    settings = KDSettings(loss=loss, beta=0.5 if loss in ("jsd", "skew_kl") else None)
    zero = kd_loss_per_position(logits, _exact(ids, lps, torch.tensor([0.0])), settings).item()
    tiny = kd_loss_per_position(logits, _exact(ids, lps, torch.tensor([TAIL_FLOOR])), settings).item()
    assert math.isfinite(zero) and zero < 20.0
    assert zero == pytest.approx(tiny, rel=1e-4, abs=1e-6)
    student = logits.clone().requires_grad_(True)
    kd_loss_per_position(student, _exact(ids, lps, torch.tensor([0.0])), settings).sum().backward()
    assert student.grad is not None and float(student.grad.abs().max()) < 20.0


@pytest.mark.parametrize("loss", ["reverse_kl", "jsd", "skew_kl", "tvd"])
def test_no_tail_minimiser_is_the_renormalised_teacher_head(loss: str) -> None:
    # The student's head is the teacher's (renormalised) head shape but holds only half of its mass: with the tail
    # dropped, that is a minimiser (loss 0, zero gradient). Without renormalising the student, reverse KL's minimum
    # would sit at head mass 1/e.
    p_head = np.array([0.6, 0.3, 0.1])
    q = np.array([*(0.5 * p_head), 0.25, 0.25])
    logits = torch.from_numpy(np.log(q)).float()[None].requires_grad_(True)
    ids = torch.tensor([[0, 1, 2]])
    lps = torch.from_numpy(np.log(p_head * 0.8)).float()[None]  # the cached head at T=1, tail 0.2
    beta = 0.5 if loss in ("jsd", "skew_kl") else None
    settings = KDSettings(loss=loss, beta=beta, no_tail=True)
    got = kd_loss_per_position(logits, _exact(ids, lps, torch.tensor([0.2])), settings)
    got.sum().backward()
    assert got.item() == pytest.approx(0.0, abs=1e-6)
    if loss != "tvd":  # TVD's |.| has no gradient at its minimum
        assert logits.grad is not None and float(logits.grad.abs().max()) < 1e-5


def test_chunk_without_loss_positions_backpropagates_zero() -> None:
    # A micro-batch whose windows hold no loss position (e.g. a chat window with no assistant token).
    hidden = torch.randn(0, 8, requires_grad=True)
    weight = torch.randn(10, 8, requires_grad=True)
    empty = TeacherTargets(torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3), torch.zeros(0))
    parts = chunked_distillation_loss(hidden, lambda h: h @ weight.T, empty, torch.zeros(0, dtype=torch.long))
    parts.total.backward()
    assert parts.num_positions == 0 and float(parts.total) == 0.0
    assert weight.grad is not None and float(weight.grad.abs().max()) == 0.0


SAMPLED = KDSettings(target_mode="sampled")


def _view(ids: np.ndarray, lps: np.ndarray, counts: np.ndarray, tail: np.ndarray, n: int) -> TeacherTargets:
    """The sparse view (storage's own) of sampled entries, as loss inputs."""
    view = sparse_targets(ids, lps, tail, counts, n)
    return TeacherTargets(*(torch.from_numpy(a) for a in view))


def test_sampled_targets_are_soft_cross_entropy_against_the_full_vocabulary() -> None:
    # V = 6; exact top-1 = token 2 (p = 0.5); residual 0.5, N = 4 draws: token 0 three times, token 5 once.
    z = np.array([0.3, -1.0, 1.2, 0.1, -0.4, 0.8])
    ids = np.array([[2, 0, 5, -1, -1]], dtype=np.int32)
    lps = np.array([[math.log(0.5), math.log(0.2), math.log(0.05), -math.inf, -math.inf]], dtype=np.float32)
    counts = np.array([[0, 3, 1, 0, 0]], dtype=np.uint16)
    teacher = _view(ids, lps, counts, np.array([0.5], dtype=np.float32), 4)
    assert float(teacher.tail_mass[0]) == 0.0
    w = np.zeros(6)
    w[[2, 0, 5]] = [0.5, 0.5 * 3 / 4, 0.5 * 1 / 4]
    log_q = z - np.log(np.exp(z).sum())  # the full-vocabulary log-softmax: not renormalised over the ids
    nz = w > 0
    want = float(np.sum(w[nz] * (np.log(w[nz]) - log_q[nz])))
    logits = torch.tensor(z[None]).requires_grad_(True)
    got = kd_loss_per_position(logits, teacher, SAMPLED)
    assert got.item() == pytest.approx(want, rel=1e-6)
    got.sum().backward()
    torch.testing.assert_close(logits.grad[0], torch.from_numpy(np.exp(log_q) - w))  # q - w: soft CE's gradient


def test_a_zero_weight_on_a_valid_id_contributes_nothing_and_never_nan() -> None:
    logits = torch.tensor([LOGITS])
    with_zero = TeacherTargets(torch.tensor([[2, 0, 4]]), torch.tensor([[0.6, 0.4, 0.0]]), torch.tensor([0.0]))
    without = TeacherTargets(torch.tensor([[2, 0]]), torch.tensor([[0.6, 0.4]]), torch.tensor([0.0]))
    torch.testing.assert_close(
        kd_loss_per_position(logits, with_zero, SAMPLED), kd_loss_per_position(logits, without, SAMPLED)
    )
    for loss in LOSSES:
        student = logits.clone().requires_grad_(True)
        settings = KDSettings(loss=loss, beta=0.5 if loss in ("jsd", "skew_kl") else None)
        got = kd_loss_per_position(student, with_zero.rows(slice(None)), settings)
        got.sum().backward()
        assert torch.isfinite(got).all() and torch.isfinite(student.grad).all(), loss


def test_sampled_gradient_is_unbiased_where_top_k_with_tail_is_not() -> None:
    # The average over many independent draws of the sampled soft-CE gradient w.r.t. the student's logits equals the
    # full-distribution forward-KL gradient (q - p); top-k + tail bucket at the same number of entries does not: it
    # spreads the teacher's tail over the student's own tail shape (p_tail q_j / q_tail instead of p_j).
    rng = np.random.default_rng(0)
    vocab, exact_top, samples, draws = 12, 2, 4, 20_000
    teacher_lp = np.log(np.exp(z := rng.standard_normal(vocab) * 1.5) / np.exp(z).sum())
    student = torch.from_numpy(rng.standard_normal(vocab))
    full = torch.softmax(student, -1) - torch.from_numpy(np.exp(teacher_lp))  # d KL(p || q) / dz

    ids, lps, counts, tail = sample_entries(rng, np.repeat(teacher_lp[None], draws, 0), exact_top, samples)
    logits = student.expand(draws, vocab).clone().requires_grad_(True)
    kd_loss_per_position(logits, _view(ids, lps, counts, tail, samples), SAMPLED).sum().backward()
    grads = logits.grad
    mean, stderr = grads.mean(0), grads.std(0) / math.sqrt(draws)
    # within 5 standard errors (12 components), plus float32's rounding where the exact top-r leave no variance
    assert bool(((mean - full).abs() <= 5.0 * stderr + 1e-6).all()), ((mean - full) / stderr).tolist()
    assert float((mean - full).abs().max()) < 0.01

    k = exact_top + samples
    top_lp, top_ids = torch.from_numpy(teacher_lp).topk(k)
    topk = _exact(top_ids[None], top_lp[None].float(), torch.tensor([1.0 - float(top_lp.exp().sum())]))
    one = student[None].clone().requires_grad_(True)
    kd_loss_per_position(one, topk).sum().backward()
    bias = float((one.grad[0] - full).abs().max())
    assert bias > 20 * float(stderr.max()) and bias > 0.02, (bias, float(stderr.max()))


@pytest.mark.parametrize("loss", [x for x in LOSSES if x != "forward_kl"])
def test_kd_settings_refuse_other_losses_temperature_and_no_tail_on_sampled_targets(loss: str) -> None:
    beta = 0.5 if loss in ("jsd", "skew_kl") else None
    with pytest.raises(ConfigError, match=f"loss '{loss}' can't train on sampled targets: it needs the teacher's"):
        KDSettings(loss=loss, beta=beta, target_mode="sampled")
    with pytest.raises(ConfigError, match="temperature 2.0 can't be used with sampled targets: the tokens were drawn"):
        KDSettings(temperature=2.0, target_mode="sampled")
    with pytest.raises(ConfigError, match="no tail bucket"):
        KDSettings(no_tail=True, target_mode="sampled")
    KDSettings(loss=loss, beta=beta, temperature=2.0, target_mode="adaptive")  # exact targets: every loss, any T
