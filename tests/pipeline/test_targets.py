"""pipeline/targets.py against float64 references: the sampler's statistics, seeded determinism, adaptive k, tails."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from logitcache.pipeline.targets import (
    compact_entries,
    draw_uniforms,
    hash_uniform_reference,
    targets_from_logprobs,
)
from logitcache.storage.targets import TargetSpec, sparse_targets


def _logprobs(n: int, vocab: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(n, vocab, generator=gen, dtype=torch.float64) * scale, -1).float()


def _peaked(n: int = 64, vocab: int = 512) -> torch.Tensor:
    """Heads that swallow all but 1e-6..1e-14 of the mass: tails that `1 - sum(head)` would lose."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(n, vocab, generator=gen) * 2
    logits[:, :4] += torch.linspace(20, 35, n)[:, None]
    return torch.log_softmax(logits, -1)


def _reference_tail(logprobs: torch.Tensor, ids: torch.Tensor) -> np.ndarray:
    """float64 mass outside the given ids (-1 ignored), summing the tail itself."""
    p = logprobs.double().exp().numpy()
    ids = ids.numpy()
    keep = np.zeros_like(p, dtype=bool)
    rows = np.repeat(np.arange(len(p)), ids.shape[1])
    flat = ids.reshape(-1)
    keep[rows[flat >= 0], flat[flat >= 0]] = True
    return np.where(keep, 0.0, p).sum(-1)


# ---- the seeded uniforms -------------------------------------------------------------------------------------------


def test_uniforms_equal_the_python_definition_bit_for_bit() -> None:
    # int64 wrap-around and logical shifts in torch must reproduce the unsigned 64-bit hash exactly.
    cases = [(0, 0, 0), (7, 5 << 40, 3), (2**63 - 1, 123456789, 4095), (12345, 2**62 + 17, 1)]
    for seed, sid, t in cases:
        u = draw_uniforms(seed, sid, torch.tensor([t]), 20)[0].tolist()
        assert u == [hash_uniform_reference(seed, sid, t, j) for j in range(20)]
    u = draw_uniforms(3, torch.tensor([1, 2**40]), torch.tensor([9, 9]), 4)
    assert u[0].tolist() == [hash_uniform_reference(3, 1, 9, j) for j in range(4)]
    assert u[1].tolist() == [hash_uniform_reference(3, 2**40, 9, j) for j in range(4)]


def test_uniforms_look_uniform_and_independent() -> None:
    u = draw_uniforms(0, 1, torch.arange(20_000), 8).numpy()
    assert u.min() >= 0.0 and u.max() < 1.0
    counts = np.histogram(u, bins=20, range=(0, 1))[0]
    expected = u.size / 20
    assert ((counts - expected) ** 2 / expected).sum() < 60  # chi-square, 19 dof: p ~ 1e-5
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.03
    assert abs(np.corrcoef(u[:-1, 0], u[1:, 0])[0, 1]) < 0.03


# ---- topk and adaptive ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("inplace", [False, True])
def test_topk_matches_float64_reference(inplace: bool) -> None:
    lp = _peaked()
    spec = TargetSpec("topk", top_k=4)
    ids, lps, tail = targets_from_logprobs(lp.clone(), spec, 0, torch.arange(len(lp)), inplace=inplace)
    ref = lp.double().topk(4, -1)
    assert ids.dtype == torch.int64 and lps.dtype == torch.float32 and tail.dtype == torch.float32
    assert torch.equal(ids, ref.indices) and torch.equal(lps, ref.values.float())
    ref_tail = _reference_tail(lp, ids)
    assert ref_tail.min() < 1e-12
    np.testing.assert_allclose(tail.double().numpy(), ref_tail, rtol=1e-4)
    # K over the vocabulary: every id, then padding, no tail
    ids, lps, tail = targets_from_logprobs(lp[:, :8].log_softmax(-1), TargetSpec("topk", top_k=10), 0, torch.arange(64))
    assert (ids[:, 8:] == -1).all() and torch.isneginf(lps[:, 8:]).all() and (ids[:, :8] >= 0).all()
    assert float(tail.abs().max()) == 0.0


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99, 1.0])
def test_adaptive_k_is_the_smallest_reaching_top_p_capped(top_p: float) -> None:
    cap = 12
    lp = torch.cat([_logprobs(200, 300, scale=s) for s in (0.5, 2.0, 6.0)])  # flat to confident rows
    spec = TargetSpec("adaptive", top_k=cap, top_p=top_p)
    ids, lps, tail = targets_from_logprobs(lp.clone(), spec, 0, torch.arange(len(lp)))
    p_sorted = np.sort(lp.double().exp().numpy(), axis=1)[:, ::-1]
    head = np.cumsum(p_sorted, axis=1)
    want_k = np.minimum((head < top_p).sum(axis=1) + 1, cap)
    got_k = (ids >= 0).sum(1).numpy()
    # float32 log-probs move the head mass by ~1e-7: only rows clear of the threshold must agree exactly
    clear = np.abs(head[np.arange(len(head)), np.minimum(want_k, cap) - 1] - top_p) > 1e-5
    assert np.array_equal(got_k[clear], want_k[clear])
    assert len(set(got_k.tolist())) > (3 if top_p < 0.999 else 0)  # the rows really differ (1.0: always the cap)
    full = lp.double().topk(cap, -1)
    for i, k in enumerate(got_k):  # entries: the top-k, sorted; padding (-1, -inf) after them
        assert torch.equal(ids[i, :k], full.indices[i, :k]) and (ids[i, k:] == -1).all()
        assert torch.isneginf(lps[i, k:]).all()
    np.testing.assert_allclose(tail.double().numpy(), _reference_tail(lp, ids), rtol=1e-4, atol=1e-7)
    ids2, _, tail2 = targets_from_logprobs(lp.clone(), spec, 0, torch.arange(len(lp)), inplace=True)
    assert torch.equal(ids, ids2) and torch.equal(tail, tail2)
    e_ids, _, counts = compact_entries(ids.numpy(), lps.numpy(), spec)
    assert counts is None and e_ids.dtype == np.int32 and np.array_equal(e_ids, ids.numpy())


# ---- sampled: layout, exactness, determinism -----------------------------------------------------------------------


def _inverse_cdf_reference(lp: torch.Tensor, r: int, seed: int, sid: int, t: int, n_draws: int) -> list[int]:
    """Draws by the module doc's definition, in float64 numpy from the Python hash."""
    p = np.exp(lp.double().numpy())
    p[np.argsort(-p, kind="stable")[:r]] = 0.0
    cdf = np.cumsum(p / p.max())
    out = []
    for j in range(n_draws):
        x = hash_uniform_reference(seed, sid, t, j) * cdf[-1]
        out.append(min(int(np.searchsorted(cdf, x, side="right")), len(p) - 1))
    return out


@pytest.mark.parametrize("r", [0, 3])
def test_sampled_layout_and_draws_match_the_definition(r: int) -> None:
    lp = _logprobs(40, 257, scale=3.0)
    spec = TargetSpec("sampled", exact_top=r, samples=9, seed=11)
    pos = torch.arange(100, 140)
    ids, lps, tail = targets_from_logprobs(lp.clone(), spec, 42, pos)
    assert ids.shape == (40, r + 9) and lps.shape == (40, r + 9)
    top = lp.double().topk(max(r, 1), -1)
    if r:
        assert torch.equal(ids[:, :r], top.indices[:, :r])
    for i in range(40):
        assert ids[i, r:].tolist() == _inverse_cdf_reference(lp[i], r, 11, 42, 100 + i, 9)
        assert not set(ids[i, r:].tolist()) & set(ids[i, :r].tolist())  # draws never hit the exact top-r
    assert torch.equal(lps, lp.gather(1, ids))  # every entry carries its exact log-prob
    np.testing.assert_allclose(tail.double().numpy(), _reference_tail(lp, ids[:, :r]), rtol=1e-5)
    ids2, lps2, tail2 = targets_from_logprobs(lp.clone(), spec, 42, pos, inplace=True)
    assert torch.equal(ids, ids2) and torch.equal(lps, lps2) and torch.equal(tail, tail2)


def test_sampled_tiny_residual_and_none() -> None:
    lp = _peaked()
    spec = TargetSpec("sampled", exact_top=4, samples=5)
    ids, lps, tail = targets_from_logprobs(lp.clone(), spec, 0, torch.arange(64))
    np.testing.assert_allclose(tail.double().numpy(), _reference_tail(lp, ids[:, :4]), rtol=1e-4)
    assert (ids[:, 4:] >= 4).all() and torch.isfinite(lps).all()  # residual 1e-14 still draws real ids
    # r covers the vocabulary: no residual, no draws (padding), tail exactly 0
    small = lp[:, :6].log_softmax(-1)
    ids, lps, tail = targets_from_logprobs(small, TargetSpec("sampled", exact_top=8, samples=5), 0, torch.arange(64))
    assert (ids[:, :6] >= 0).all() and (ids[:, 6:] == -1).all() and torch.isneginf(lps[:, 6:]).all()
    assert float(tail.abs().max()) == 0.0
    # -inf log-probs (a padded vocabulary) are never drawn
    masked = lp.clone()
    masked[:, 100:] = float("-inf")
    ids, _, _ = targets_from_logprobs(masked, TargetSpec("sampled", samples=64), 0, torch.arange(64))
    assert int(ids.max()) < 100


def test_draws_depend_only_on_seed_sequence_and_position() -> None:
    spec = TargetSpec("sampled", exact_top=2, samples=16, seed=5)
    lp = _logprobs(30, 128, scale=1.0)
    sids = torch.tensor([7] * 10 + [8] * 10 + [9 << 16] * 10)
    pos = torch.arange(30) % 10
    ids, _, _ = targets_from_logprobs(lp.clone(), spec, sids, pos)
    # one sequence at a time, in another order, in other chunks: the same draws per (sequence, position)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(1))
    shuffled, _, _ = targets_from_logprobs(lp[perm].clone(), spec, sids[perm], pos[perm])
    assert torch.equal(shuffled, ids[perm])
    for s in range(3):
        part, _, _ = targets_from_logprobs(lp[10 * s : 10 * s + 10].clone(), spec, int(sids[10 * s]), pos[:10])
        assert torch.equal(part, ids[10 * s : 10 * s + 10])
    # another seed, sequence or position: other draws
    other_seed, _, _ = targets_from_logprobs(
        lp.clone(), TargetSpec("sampled", exact_top=2, samples=16, seed=6), sids, pos
    )
    other_pos, _, _ = targets_from_logprobs(lp.clone(), spec, sids, pos + 1)
    for other in (other_seed, other_pos):
        assert (other[:, 2:] != ids[:, 2:]).float().mean() > 0.5
    assert torch.equal(other_seed[:, :2], ids[:, :2])  # the exact top-r does not depend on the seed


# ---- sampled: statistics --------------------------------------------------------------------------------------------

SEEDS = 6000  # independent draws per position: positions of one row (the hash decorrelates them like seeds)


def _repeated_draws(p: np.ndarray, spec: TargetSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lp = torch.from_numpy(np.log(p)).float()
    rows = lp[None].expand(SEEDS, -1).contiguous()
    return targets_from_logprobs(rows, spec, 3, torch.arange(SEEDS))


def _teacher(vocab: int = 200) -> np.ndarray:
    """Probabilities from 0.2 down to ~1e-5: every bin of p gets ids."""
    p = np.exp(-np.linspace(0, 10, vocab)) * (1 + 0.3 * np.sin(np.arange(vocab)))
    return p / p.sum()


def inclusion_z_scores(p: np.ndarray, included: np.ndarray, n_draws: int) -> np.ndarray:
    """z-scores of inclusion counts per p-bin against 1-(1-p)^N; included: bool [S, V] (id drawn at least once).

    The variance is the sum of the ids' binomial variances: inclusions of different ids are negatively
    correlated, so this over-estimates the bin's variance and the test is conservative for a correct sampler.
    """
    q = 1 - (1 - p) ** n_draws
    s = included.shape[0]
    edges = np.quantile(q, np.linspace(0, 1, 11))
    bins = np.clip(np.searchsorted(edges, q, side="right") - 1, 0, 9)
    obs, exp, var = (np.bincount(bins, w, minlength=10) for w in (included.sum(0), s * q, s * q * (1 - q)))
    return (obs - exp) / np.sqrt(var)


@pytest.mark.parametrize(("r", "n_draws"), [(0, 12), (0, 48), (4, 12)])
def test_inclusion_frequencies_match_one_minus_one_minus_p_to_the_n(r: int, n_draws: int) -> None:
    p = _teacher()
    spec = TargetSpec("sampled", exact_top=r, samples=n_draws, seed=1)
    ids, _, tail = _repeated_draws(p, spec)
    top = np.argsort(-p)[:r]
    residual = np.delete(p, top).sum()
    np.testing.assert_allclose(tail.numpy(), residual, rtol=1e-5)
    drawn = ids[:, r:].numpy()
    included = np.zeros((SEEDS, len(p)), dtype=bool)
    included[np.repeat(np.arange(SEEDS), n_draws), drawn.reshape(-1)] = True
    q_p = p / residual
    q_p[top] = 0.0
    rest = np.setdiff1d(np.arange(len(p)), top)
    z = inclusion_z_scores(q_p[rest], included[:, rest], n_draws)
    assert np.abs(z).max() < 4.5, z  # 10 bins: a correct sampler exceeds 4.5 with probability ~7e-5
    assert (z**2).sum() < 35, z  # chi-square, 10 dof: p ~ 1e-4
    # per id too (binomial, 200 ids): catches a bias that a bin would average out
    q = 1 - (1 - q_p[rest]) ** n_draws
    z_id = (included[:, rest].sum(0) - SEEDS * q) / np.sqrt(SEEDS * q * (1 - q) + 1e-12)
    assert np.abs(z_id).max() < 5, np.abs(z_id).max()


@pytest.mark.parametrize("r", [0, 4])
def test_weights_expectation_is_the_teacher_probability_and_sums_to_one(r: int) -> None:
    p = _teacher()
    n_draws = 12
    spec = TargetSpec("sampled", exact_top=r, samples=n_draws, seed=2)
    ids, lps, tail = _repeated_draws(p, spec)
    e_ids, e_lps, counts = compact_entries(ids.numpy(), lps.numpy(), spec)
    assert counts is not None
    view = sparse_targets(e_ids, e_lps, tail.numpy(), counts, n_draws)
    total = view.target_probs.astype(np.float64).sum(1) + view.tail_mass
    np.testing.assert_allclose(total, 1.0, atol=2e-6)
    assert float(np.abs(view.tail_mass).max()) == 0.0
    weights = np.zeros((SEEDS, len(p)))
    rows = np.repeat(np.arange(SEEDS), e_ids.shape[1])
    valid = e_ids.reshape(-1) >= 0
    np.add.at(weights, (rows[valid], e_ids.reshape(-1)[valid]), view.target_probs.reshape(-1)[valid])
    mean = weights.mean(0)
    residual = tail.numpy()[0].astype(np.float64)
    q = np.where(np.isin(np.arange(len(p)), np.argsort(-p)[:r]), 0.0, p / residual)
    sd = residual * np.sqrt(q * (1 - q) / (n_draws * SEEDS))  # exact top-r ids: sd 0, weight exp(lp)
    exact = q == 0
    np.testing.assert_allclose(mean[exact], p[exact], rtol=1e-5)
    z = (mean[~exact] - p[~exact]) / sd[~exact]
    assert np.abs(z).max() < 5, np.abs(z).max()


def test_compact_entries_uniques_with_counts_sorted() -> None:
    spec = TargetSpec("sampled", exact_top=2, samples=6)
    ids = np.array([[9, 4, 5, 7, 5, 5, 3, 7], [9, 4, -1, -1, -1, -1, -1, -1], [1, 2, 8, 8, 8, 8, 8, 8]])
    lp_of = {9: -0.5, 4: -1.0, 5: -2.0, 7: -3.0, 3: -2.0, 1: -0.1, 2: -0.2, 8: -5.0}
    lps = np.array([[lp_of.get(int(i), -np.inf) for i in row] for row in ids], np.float32)
    e_ids, e_lps, counts = compact_entries(ids, lps, spec)
    assert e_ids.dtype == np.int32 and e_lps.dtype == np.float32 and counts is not None and counts.dtype == np.uint16
    assert e_ids.tolist() == [
        [9, 4, 3, 5, 7, -1, -1, -1],
        [9, 4, -1, -1, -1, -1, -1, -1],
        [1, 2, 8, -1, -1, -1, -1, -1],
    ]
    assert counts.tolist() == [[0, 0, 1, 3, 2, 0, 0, 0], [0] * 8, [0, 0, 6, 0, 0, 0, 0, 0]]
    assert e_lps[0, :5].tolist() == [-0.5, -1.0, -2.0, -2.0, -3.0] and np.isneginf(e_lps[0, 5:]).all()
    assert np.isneginf(e_lps[1, 2:]).all()


def test_compact_entries_keeps_every_draw() -> None:
    spec = TargetSpec("sampled", exact_top=1, samples=30, seed=4)
    lp = _logprobs(50, 40, scale=1.5)
    ids, lps, _ = targets_from_logprobs(lp, spec, 0, torch.arange(50))
    e_ids, e_lps, counts = compact_entries(ids.numpy(), lps.numpy(), spec)
    assert counts is not None
    for i in range(50):
        n = int((e_ids[i] >= 0).sum())
        assert (e_ids[i, n:] == -1).all() and (counts[i, n:] == 0).all() and counts[i, 0] == 0
        got = np.repeat(e_ids[i, 1:n], counts[i, 1:n])
        assert sorted(got.tolist()) == sorted(ids[i, 1:].tolist())
        assert np.all(np.diff(e_lps[i, 1:n]) <= 0)  # sorted by log-prob, descending
        np.testing.assert_array_equal(e_lps[i, :n], lp[i, e_ids[i, :n]].numpy())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_draws_equal_cpu_draws() -> None:
    lp = _logprobs(300, 4096, scale=2.0)
    for spec in (
        TargetSpec("sampled", exact_top=4, samples=24, seed=9),
        TargetSpec("adaptive", top_k=32, top_p=0.9),
        TargetSpec("topk", top_k=32),
    ):
        cpu = targets_from_logprobs(lp.clone(), spec, 5, torch.arange(300))
        gpu = targets_from_logprobs(lp.cuda(), spec, 5, torch.arange(300).cuda(), inplace=True)
        assert torch.equal(cpu[0], gpu[0].cpu()), spec
        torch.testing.assert_close(cpu[1], gpu[1].cpu())
        torch.testing.assert_close(cpu[2], gpu[2].cpu(), rtol=1e-5, atol=1e-7)
