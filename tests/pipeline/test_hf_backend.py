"""HF backend vs a direct full-softmax reference in every target mode; chunking and batching do not change results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from logitcache.pipeline.backends.hf import HFBackend, topk_with_tail
from logitcache.pipeline.data import TokenWindow
from logitcache.pipeline.targets import targets_from_logprobs
from logitcache.storage.targets import TargetSpec
from tests.models import tiny_granite

K = 16
TOPK = TargetSpec("topk", top_k=K)


@pytest.fixture(scope="module")
def windows() -> list[TokenWindow]:
    rng = np.random.default_rng(0)
    out = []
    for i, n in enumerate([40, 7, 23, 2]):
        ids = rng.integers(0, 500, n).astype(np.int32)
        out.append(TokenWindow(i << 16, i, ids, np.ones(n, bool)))
    return out


def _reference(model: torch.nn.Module, w: TokenWindow) -> tuple[np.ndarray, ...]:
    """Full logits of one unpadded sequence, float64 softmax: the definition the backend must match."""
    with torch.inference_mode():
        logits = model(input_ids=torch.as_tensor(w.input_ids[None], dtype=torch.long)).logits[0, :-1].double()
    logp = torch.log_softmax(logits, -1)
    top = logp.topk(K, -1)
    target = logp.gather(1, torch.as_tensor(w.input_ids[1:, None], dtype=torch.long))[:, 0]
    probs = logp.exp()
    tail = probs.scatter(1, top.indices, 0.0).sum(-1)
    return top.indices.numpy(), top.values.numpy(), target.numpy(), tail.numpy()


def test_matches_full_softmax_reference(tiny_teacher_dir: Path, windows: list[TokenWindow]) -> None:
    backend = HFBackend(str(tiny_teacher_dir), dtype="float32", targets=TOPK, logits_chunk_size=5)
    seqs = backend.capture(windows)
    for w, s in zip(windows, seqs):
        ids, lps, target, tail = _reference(backend.model, w)
        n = len(w.input_ids) - 1
        assert s.sequence_id == w.sequence_id and s.entry_ids.shape == (n, K) and s.entry_ids.dtype == np.int32
        assert s.entry_logprobs.dtype == np.float32 and s.tail_mass.shape == (n,)
        np.testing.assert_allclose(s.entry_logprobs, lps, atol=2e-5)
        np.testing.assert_allclose(s.next_token_logprobs, target, atol=2e-5)
        np.testing.assert_allclose(s.tail_mass, tail, atol=1e-6, rtol=1e-4)
        # Same ids wherever the reference has no near-tie at that rank.
        gaps = np.abs(np.diff(lps, axis=1))
        clear = np.concatenate([gaps[:, :1], np.minimum(gaps[:, 1:], gaps[:, :-1]), gaps[:, -1:]], axis=1) > 1e-4
        assert np.array_equal(s.entry_ids[clear], ids[clear])
    # One window at a time (no padding), with a different chunk size: the same numbers.
    alone = HFBackend(str(tiny_teacher_dir), dtype="float32", targets=TOPK, logits_chunk_size=512)
    for w, s in zip(windows, seqs):
        (a,) = alone.capture([w])
        np.testing.assert_allclose(a.entry_logprobs, s.entry_logprobs, atol=1e-5)
        np.testing.assert_allclose(a.tail_mass, s.tail_mass, atol=1e-6)


def test_tail_keeps_relative_precision_when_tiny() -> None:
    """Peaked distributions: the masked-logsumexp tail matches float64 to ~1e-5 relative even at 1e-12."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 512, generator=gen) * 2
    logits[:, :4] += torch.linspace(20, 35, 64)[:, None]  # the head swallows all but 1e-6..1e-14 of the mass
    top_id, _, _, tail = topk_with_tail(logits, 4, torch.zeros(64, dtype=torch.long))
    p = torch.softmax(logits.double(), -1)
    ref = p.scatter(1, top_id, 0.0).sum(-1)  # summing the tail itself: subtracting from 1 would lose it
    assert float(ref.min()) < 1e-12
    np.testing.assert_allclose(tail.double().numpy(), ref.numpy(), rtol=1e-4)
    # k = vocabulary: no tail at all.
    assert float(topk_with_tail(logits, 512, torch.zeros(64, dtype=torch.long))[3].abs().max()) == 0.0


def test_granite_logits_scaling_is_reproduced(tmp_path: Path, windows: list[TokenWindow]) -> None:
    # Granite divides its logits by `logits_scaling`; the backend's decoder + head split must do the same (one helper
    # with the trainer's student head), not refuse the architecture.
    tiny_granite(vocab_size=512, logits_scaling=8.0).save_pretrained(tmp_path / "granite")
    backend = HFBackend(str(tmp_path / "granite"), dtype="float32", targets=TOPK)
    for w, s in zip(windows, backend.capture(windows)):
        _, lps, target, tail = _reference(backend.model, w)
        np.testing.assert_allclose(s.entry_logprobs, lps, atol=2e-5)
        np.testing.assert_allclose(s.next_token_logprobs, target, atol=2e-5)
        np.testing.assert_allclose(s.tail_mass, tail, atol=1e-6, rtol=1e-4)


def _reference_logprobs(model: torch.nn.Module, w: TokenWindow) -> torch.Tensor:
    with torch.inference_mode():
        logits = model(input_ids=torch.as_tensor(w.input_ids[None], dtype=torch.long)).logits[0, :-1].double()
    return torch.log_softmax(logits, -1)


@pytest.mark.parametrize(
    "spec",
    [
        TargetSpec("adaptive", top_k=K, top_p=0.5),
        TargetSpec("sampled", exact_top=0, samples=12, seed=3),
        TargetSpec("sampled", exact_top=4, samples=12, seed=3),
    ],
    ids=["adaptive", "sampled_r0", "sampled_r4"],
)
def test_every_mode_matches_the_reference(tiny_teacher_dir: Path, windows: list[TokenWindow], spec: TargetSpec) -> None:
    """Each window's entries are what targets_from_logprobs makes of the reference log-probs, at window positions."""
    backend = HFBackend(str(tiny_teacher_dir), dtype="float32", targets=TOPK, logits_chunk_size=7)
    seqs = backend.capture(windows, spec)  # one model, another mode per call
    draws_equal = draws_total = 0
    for w, s in zip(windows, seqs):
        ref_lp = _reference_logprobs(backend.model, w)
        n = len(w.input_ids) - 1
        m = spec.max_entries
        assert s.entry_ids.shape == (n, m) and s.entry_ids.dtype == np.int32 and s.entry_logprobs.dtype == np.float32
        assert s.num_samples == spec.num_samples
        ids, _, tail = targets_from_logprobs(ref_lp.float(), spec, w.sequence_id, torch.arange(n))
        valid = s.entry_ids >= 0
        stored_lp = ref_lp.gather(1, torch.as_tensor(np.where(valid, s.entry_ids, 0), dtype=torch.long)).numpy()
        np.testing.assert_allclose(s.entry_logprobs[valid], stored_lp[valid], atol=2e-5)  # exact log-probs
        assert np.isneginf(s.entry_logprobs[~valid]).all()
        np.testing.assert_allclose(s.tail_mass, tail.numpy(), atol=1e-6, rtol=1e-4)
        if spec.mode == "adaptive":
            assert s.sample_counts is None and np.array_equal(s.entry_ids, ids.numpy())
            continue
        r = spec.exact_top
        assert s.sample_counts is not None and s.sample_counts.dtype == np.uint16
        assert np.array_equal(s.entry_ids[:, :r], ids[:, :r].numpy()) and (s.sample_counts[:, :r] == 0).all()
        assert (s.sample_counts.sum(1) == spec.samples).all()
        for t in range(n):  # the draws as a multiset: float32 noise may move a rare draw across a CDF boundary
            got = np.repeat(s.entry_ids[t], s.sample_counts[t])
            want = ids[t, r:].numpy()
            draws_equal += int(np.sum(np.sort(got) == np.sort(want)))
            draws_total += spec.samples
        view = s.sparse_targets()
        np.testing.assert_allclose(view.target_probs.astype(np.float64).sum(1) + view.tail_mass, 1.0, atol=1e-5)
    if draws_total:
        assert draws_equal >= 0.98 * draws_total, (draws_equal, draws_total)
