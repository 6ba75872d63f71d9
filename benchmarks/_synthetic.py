"""Synthetic-but-realistic teacher outputs for benchmarks: top-k (id, log-prob) heads with exact tail mass.

The model (all numpy, vectorised per sequence; no [positions, V] array is ever built):

- Unigram prior: a Zipf-Mandelbrot law over the vocabulary, p(r) ~ (r + q)^-s for frequency rank r, used as
  the background logits (tempered by ``prior_scale``). Token *ids* are a noisy monotone function of frequency
  rank (BPE merges give frequent tokens low ids, but not in order): id order = argsort(log(1 + r) + noise).
- Context: each sequence has a "topic pool" of tokens (drawn from a flattened Zipf: content words) whose boosts
  drift slowly along the sequence (a moving average of white noise), so neighbouring positions share most of
  their top-k sets, as real LMs do. Each position also boosts a few fresh tokens drawn from the unigram law
  (function words, local syntax), and one "predicted" token gets an extra confidence boost, so top-1 ranges
  from uncertain (~0.1) to near-certain (>0.9), with per-position entropy mostly 1-3 nats.
- Exact normalisation: logits = prior + sparse boost, so Z = Z_prior + sum_boosted e^prior (e^boost - 1) is
  exact without touching the other V - |boosted| tokens; the top-k is taken over the boosted tokens plus the
  k + |boosted| highest-prior tokens, which provably contain the true top-k. Tail mass = 1 - sum(head) in float64.
- The next token (input_ids[t+1]) is sampled from the teacher distribution (head, or the tail through the
  prior), and next_token_logprobs holds its exact log-prob.

`generate(...)` returns a list of `logitcache.storage.CachedSequence`; `distribution_stats(...)` summarises
entropy / top-1 / tail mass so a benchmark can print what it measured on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from logitcache.storage import CachedSequence

__all__ = ["SyntheticTeacher", "generate", "distribution_stats"]


@dataclass(frozen=True)
class SyntheticTeacher:
    vocab_size: int = 128256
    zipf_s: float = 1.07  # Zipf-Mandelbrot exponent and offset of the unigram law
    zipf_q: float = 2.7
    prior_scale: float = 0.75  # background logits = prior_scale * log p_unigram
    id_noise: float = 1.0  # std of the noise (in log-rank units) between frequency rank and token id
    pool_size: int = 128  # topic tokens per sequence
    pool_flatten: float = 0.55  # pool tokens ~ p_unigram ** pool_flatten (content words: mid-frequency)
    pool_boost: float = 4.5  # mean boost of a topic token (nats)
    pool_boost_std: float = 1.5  # per-sequence spread of topic boosts
    pool_drift: float = 3.0  # std of the slow per-position drift of a topic boost
    drift_window: int = 16  # positions over which the drift is correlated
    num_local: int = 48  # fresh unigram-drawn tokens boosted at each position
    local_boost: float = 4.0
    local_boost_std: float = 2.0
    confidence_max: float = 10.0  # the predicted token's extra boost ~ U(0, confidence_max)

    def id_of_rank(self, seed: int = 12345) -> np.ndarray:
        """int32 [V]: token id of each frequency rank (the tokenizer's fixed id order)."""
        rng = np.random.default_rng(seed)
        key = np.log1p(np.arange(self.vocab_size)) + self.id_noise * rng.standard_normal(self.vocab_size)
        order = np.argsort(key, kind="stable")  # ranks in id order
        out = np.empty(self.vocab_size, dtype=np.int32)
        out[order] = np.arange(self.vocab_size, dtype=np.int32)
        return out

    def log_unigram(self) -> np.ndarray:
        """float64 [V]: log unigram probability by frequency rank (normalised)."""
        lw = -self.zipf_s * np.log(np.arange(self.vocab_size) + self.zipf_q)
        return lw - np.logaddexp.reduce(lw)


def _smooth_noise(rng: np.random.Generator, n: int, m: int, window: int) -> np.ndarray:
    """[n, m] unit-variance noise correlated over `window` consecutive rows (moving average of white noise)."""
    w = max(1, window)
    white = rng.standard_normal((n + w, m))
    cs = np.cumsum(white, axis=0)
    return (cs[w:] - cs[:-w]) / np.sqrt(w)


class _Boosted(NamedTuple):
    """Per position, the tokens whose logit is raised above the prior: [P, nb] each, sorted by rank."""

    ranks: np.ndarray
    boost: np.ndarray
    valid: np.ndarray  # False on a repeat of the previous rank (one occurrence kept)


class _Sampler:
    def __init__(self, cfg: SyntheticTeacher, id_seed: int) -> None:
        self.cfg = cfg
        self.log_uni = cfg.log_unigram()
        self.uni_cdf = np.cumsum(np.exp(self.log_uni))
        self.uni_cdf /= self.uni_cdf[-1]
        pri = cfg.prior_scale * self.log_uni
        self.prior = pri - np.logaddexp.reduce(pri)  # normalised background log-probs, descending in rank
        self.prior_plogp = float(np.sum(np.exp(self.prior) * self.prior))
        self.entropies: list[np.ndarray] = []  # exact full-vocabulary entropy of every generated position
        self.pool_logw = cfg.pool_flatten * self.log_uni
        self.id_of_rank = cfg.id_of_rank(id_seed)

    def unigram_ranks(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        r = np.searchsorted(self.uni_cdf, rng.random(shape), side="right")
        return np.minimum(r, self.cfg.vocab_size - 1)

    def sequence(self, rng: np.random.Generator, seq_id: int, length: int, k: int) -> CachedSequence:
        b = self._boosted(rng, length - 1)
        log_z = self._log_normaliser(b)
        top_rank, top_lp, tail = self._head(b, log_z, k)
        nxt_rank, target = self._next_tokens(rng, b, log_z, top_rank, top_lp, tail)
        first = self.unigram_ranks(rng, (1,))
        input_ids = self.id_of_rank[np.concatenate([first, nxt_rank])].astype(np.int32)
        return CachedSequence(
            sequence_id=seq_id,
            input_ids=input_ids,
            loss_mask=np.ones(length, dtype=bool),
            entry_ids=self.id_of_rank[top_rank].astype(np.int32),
            entry_logprobs=top_lp.astype(np.float32),
            next_token_logprobs=target.astype(np.float32),
            tail_mass=tail.astype(np.float32),
        )

    def _boosted(self, rng: np.random.Generator, P: int) -> _Boosted:
        """The tokens each of P positions boosts: the sequence's topic pool, fresh local tokens, one predicted."""
        cfg, V = self.cfg, self.cfg.vocab_size
        # topic pool: distinct ranks via the Gumbel-top-k trick on the flattened unigram law
        g = self.pool_logw - np.log(-np.log(rng.random(V)))
        pool = np.argpartition(-g, cfg.pool_size)[: cfg.pool_size]
        pool_b = cfg.pool_boost + cfg.pool_boost_std * rng.standard_normal(cfg.pool_size)
        b_pool = pool_b[None, :] + cfg.pool_drift * _smooth_noise(rng, P, cfg.pool_size, cfg.drift_window)
        # per-position fresh tokens
        local = self.unigram_ranks(rng, (P, cfg.num_local))
        b_local = cfg.local_boost + cfg.local_boost_std * rng.standard_normal((P, cfg.num_local))
        ranks = np.concatenate([np.broadcast_to(pool, (P, cfg.pool_size)), local], axis=1)
        boost = np.concatenate([b_pool, b_local], axis=1)
        # the "predicted" token: one of the boosted tokens gets an extra confidence boost
        nb = ranks.shape[1]
        pick = rng.integers(0, nb, size=P)
        boost[np.arange(P), pick] += rng.uniform(0.0, cfg.confidence_max, size=P)
        # dedup (a local token may repeat or hit the pool): keep one occurrence
        order = np.argsort(ranks, axis=1, kind="stable")
        ranks = np.take_along_axis(ranks, order, axis=1)
        boost = np.take_along_axis(boost, order, axis=1)
        valid = np.ones_like(ranks, dtype=bool)
        valid[:, 1:] = ranks[:, 1:] != ranks[:, :-1]
        return _Boosted(ranks, boost, valid)

    def _log_normaliser(self, b: _Boosted) -> np.ndarray:
        """[P] exact log Z; records the exact full-vocabulary entropy of each position in `self.entropies`."""
        # exact normaliser: Z = 1 + sum_boosted e^prior (e^boost - 1)   (prior is normalised)
        pr = self.prior[b.ranks]
        z = 1.0 + np.sum(np.where(b.valid, np.exp(pr) * np.expm1(b.boost), 0.0), axis=1)
        log_z = np.log(z)
        # exact full-vocabulary entropy: H = log Z - (1/Z) sum_i e^l_i l_i
        sb = np.sum(np.where(b.valid, np.exp(pr + b.boost) * (pr + b.boost) - np.exp(pr) * pr, 0.0), axis=1)
        self.entropies.append(log_z - (self.prior_plogp + sb) / z)
        return log_z

    def _head(self, b: _Boosted, log_z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The exact top-k per position: ranks and log-probs [P, k] (descending), and the tail mass [P]."""
        P, nb = b.ranks.shape
        pr = self.prior[b.ranks]
        # candidates: boosted tokens + the k0 highest-prior tokens (those boosted are masked in that segment)
        k0 = min(self.cfg.vocab_size, k + nb)
        top_boosted = np.zeros((P, k0), dtype=bool)
        rows = np.nonzero(b.valid & (b.ranks < k0))
        top_boosted[rows[0], b.ranks[rows]] = True
        cand_rank = np.concatenate([np.broadcast_to(np.arange(k0), (P, k0)), b.ranks], axis=1)
        cand_lp = (
            np.concatenate(
                [np.where(top_boosted, -np.inf, self.prior[None, :k0]), np.where(b.valid, pr + b.boost, -np.inf)],
                axis=1,
            )
            - log_z[:, None]
        )
        top = np.argpartition(-cand_lp, k - 1, axis=1)[:, :k]
        top_lp = np.take_along_axis(cand_lp, top, axis=1)
        srt = np.argsort(-top_lp, axis=1, kind="stable")
        top = np.take_along_axis(top, srt, axis=1)
        top_lp = np.take_along_axis(top_lp, srt, axis=1)
        top_rank = np.take_along_axis(cand_rank, top, axis=1)
        tail = np.clip(1.0 - np.exp(top_lp).sum(axis=1), 0.0, 1.0)
        return top_rank, top_lp, tail

    def _next_tokens(
        self,
        rng: np.random.Generator,
        b: _Boosted,
        log_z: np.ndarray,
        top_rank: np.ndarray,
        top_lp: np.ndarray,
        tail: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each position's next token (rank), sampled from the teacher distribution, and its exact log-prob."""
        P, k = top_lp.shape
        # next token: from the head with prob 1 - tail, else from the tail (through the unigram law)
        u = rng.random(P)
        from_head = u < 1.0 - tail
        cum = np.cumsum(np.exp(top_lp), axis=1)
        j = np.minimum((cum < u[:, None]).sum(axis=1), k - 1)
        nxt_rank = np.where(from_head, top_rank[np.arange(P), j], self.unigram_ranks(rng, (P,)))
        # exact log-prob of the next token: in the head, boosted, or plain prior
        in_head = top_rank == nxt_rank[:, None]
        hit_b = b.valid & (b.ranks == nxt_rank[:, None])
        lp_b = np.where(
            hit_b.any(axis=1), (self.prior[b.ranks] + b.boost)[np.arange(P), hit_b.argmax(axis=1)], self.prior[nxt_rank]
        )
        target = np.where(in_head.any(axis=1), top_lp[np.arange(P), in_head.argmax(axis=1)], lp_b - log_z)
        return nxt_rank, target


def generate(
    num_sequences: int,
    *,
    vocab_size: int = 128256,
    top_k: int = 64,
    min_len: int = 512,
    max_len: int = 2048,
    seed: int = 0,
    id_seed: int = 12345,
    config: SyntheticTeacher | None = None,
    entropies: list[np.ndarray] | None = None,
) -> list[CachedSequence]:
    """`num_sequences` CachedSequences of lengths U[min_len, max_len], seeded; same id order for a given id_seed.

    If `entropies` is a list, the exact full-vocabulary entropy (nats) of each sequence's positions is appended.
    """
    cfg = config if config is not None else SyntheticTeacher(vocab_size=vocab_size)
    if cfg.vocab_size != vocab_size:
        cfg = SyntheticTeacher(**{**cfg.__dict__, "vocab_size": vocab_size})
    sampler = _Sampler(cfg, id_seed)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, size=num_sequences)
    seqs = [sampler.sequence(rng, seed * 1_000_000 + i, int(n), top_k) for i, n in enumerate(lengths)]
    if entropies is not None:
        entropies.extend(sampler.entropies)
    return seqs


def distribution_stats(seqs: list[CachedSequence], entropies: list[np.ndarray] | None = None) -> dict[str, float]:
    """Entropy (nats: exact if `entropies` from generate() is given, else head + tail as one bucket), top-1 prob,
    tail mass and the overlap of neighbouring positions' top-k sets."""
    lp = np.concatenate([s.entry_logprobs for s in seqs]).astype(np.float64)
    tail = np.concatenate([s.tail_mass for s in seqs]).astype(np.float64)
    p = np.exp(lp)
    if entropies:
        ent = np.concatenate(entropies)
    else:
        ent = -(p * lp).sum(axis=1) - np.where(tail > 0, tail * np.log(np.maximum(tail, 1e-300)), 0.0)
    overlaps = []
    for s in seqs:
        a, b = np.sort(s.entry_ids[:-1], axis=1), np.sort(s.entry_ids[1:], axis=1)
        k = a.shape[1]
        # |A ∩ B| per row via a merged sort
        both = np.sort(np.concatenate([a, b], axis=1), axis=1)
        overlaps.append((both[:, 1:] == both[:, :-1]).sum(axis=1) / k)
    top1 = p[:, 0]
    return {
        "positions": float(lp.shape[0]),
        "entropy_mean": float(ent.mean()),
        "entropy_p10": float(np.percentile(ent, 10)),
        "entropy_p90": float(np.percentile(ent, 90)),
        "top1_mean": float(top1.mean()),
        "top1_p10": float(np.percentile(top1, 10)),
        "top1_p90": float(np.percentile(top1, 90)),
        "tail_mean": float(tail.mean()),
        "neighbour_overlap": float(np.concatenate(overlaps).mean()),
    }
