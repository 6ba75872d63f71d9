"""HF transformers teacher: batched forward, then log-softmax + the stored targets a chunk of positions at a time."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from logitcache.pipeline.data import TokenWindow
from logitcache.pipeline.targets import compact_entries, targets_from_logprobs
from logitcache.storage import CachedSequence, LMHeadTransform
from logitcache.storage.targets import TargetSpec

logger = logging.getLogger(__name__)

__all__ = ["HFBackend", "topk_with_tail"]


def topk_with_tail(logits: Any, top_k: int, targets: Any) -> tuple[Any, Any, Any, Any]:
    """Top-k of log_softmax(logits) plus the target log-prob and the exact tail mass.

    logits: float [P, V] (any float dtype; computed in float32), targets: int64 [P].
    Returns entry_ids int64 [P, k], entry_logprobs float32 [P, k] (descending), next_token_logprobs float32 [P],
    tail_mass float32 [P].

    The tail is exp(logsumexp of the log-probs outside the top-k), not 1 - sum(head): the subtraction loses all
    relative precision once the tail falls below ~1e-7 (float32 rounding of each head log-prob), while the masked
    logsumexp keeps ~1e-6 relative error whatever the tail's size, and is exactly 0 when k covers the vocabulary.
    """
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    target = logp.gather(1, targets[:, None]).squeeze(1)
    spec = TargetSpec(mode="topk", top_k=min(top_k, logp.shape[-1]))
    positions = torch.zeros(logp.shape[0], dtype=torch.long, device=logp.device)  # topk draws nothing
    top_id, top_lp, tail = targets_from_logprobs(logp, spec, 0, positions, inplace=True)
    return top_id, top_lp, target, tail


class HFBackend:
    """transformers `AutoModelForCausalLM` teacher; the CPU path for tiny models and the vLLM backend's reference.

    `targets` says what each position stores (storage/targets.py); every mode is computed here in plain torch
    (pipeline/targets.py), on the model's device, `logits_chunk_size` positions at a time.
    """

    name = "hf"

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str,
        targets: TargetSpec,
        logits_chunk_size: int = 512,
        revision: str | None = None,
        trust_remote_code: bool = False,
        device: str | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.targets = targets
        self.top_k = targets.max_entries  # M: the width of every stored position (the header's capture.top_k)
        self.logits_chunk_size = logits_chunk_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model: Any = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=getattr(torch, dtype), revision=revision, trust_remote_code=trust_remote_code
        )
        self.model = model.to(self.device)
        self.model.eval()
        cfg = self.model.config
        # Architectures that post-process logits (Gemma's soft-capping, Cohere's and Granite's scales), as the
        # trainer's student head does; checked once on real data against the model's own logits.
        self._head_transform = LMHeadTransform.from_config(cfg)
        self._checked = False

    def _logits(self, hidden: Any) -> Any:
        return self._head_transform.apply(self.model.get_output_embeddings()(hidden))

    def _check_head(self, window: TokenWindow, hidden: Any) -> None:
        """The decoder + LM head split must reproduce the model's own logits (else an unknown post-processing)."""
        import torch

        ids = torch.as_tensor(window.input_ids, dtype=torch.long, device=self.device)[None]
        try:
            ref = self.model(input_ids=ids, logits_to_keep=1).logits[0, -1].float()
        except TypeError:  # architectures without `logits_to_keep`
            ref = self.model(input_ids=ids).logits[0, -1].float()
        ours = self._logits(hidden[None]).float()[0]
        err = float((ref - ours).abs().max())
        if err > 1e-3 * max(1.0, float(ref.abs().max())):
            raise RuntimeError(
                f"the hf backend's decoder+lm_head logits differ from {type(self.model).__name__}'s own by {err:.3g}; "
                "this architecture post-processes logits in a way the backend does not reproduce: use --backend vllm"
            )
        self._checked = True

    def capture(self, windows: list[TokenWindow], targets: TargetSpec | None = None) -> list[CachedSequence]:
        """One padded forward over `windows`, then the head a chunk of positions at a time (bounded logits memory).

        `targets` (default: the backend's) may differ per call, e.g. to benchmark several modes on one model.
        """
        import torch

        if not windows:
            return []
        spec = targets or self.targets
        lengths = [len(w.input_ids) for w in windows]
        batch = torch.zeros((len(windows), max(lengths)), dtype=torch.long)
        attn = torch.zeros_like(batch)
        for i, w in enumerate(windows):
            batch[i, : lengths[i]] = torch.from_numpy(w.input_ids.astype(np.int64))
            attn[i, : lengths[i]] = 1
        batch, attn = batch.to(self.device), attn.to(self.device)
        # Every predicting position 0..L-2 of every window, flattened: its sequence and its index t in the window
        # (what seeds its draws, whatever the batch around it).
        sequence_ids = torch.cat(
            [torch.full((n - 1,), w.sequence_id, dtype=torch.long) for w, n in zip(windows, lengths)]
        )
        positions = torch.cat([torch.arange(n - 1) for n in lengths])
        with torch.inference_mode():
            # Right padding: real tokens keep positions 0..L-1 and never attend to the padding after them.
            hidden = self.model.get_decoder()(input_ids=batch, attention_mask=attn).last_hidden_state
            if not self._checked:
                self._check_head(windows[0], hidden[0, lengths[0] - 1])
            h = torch.cat([hidden[i, : n - 1] for i, n in enumerate(lengths)])  # [P, H]; targets: the next tokens
            next_tokens = torch.cat([batch[i, 1:n] for i, n in enumerate(lengths)])
            parts = [
                self._targets(h[c], next_tokens[c], spec, sequence_ids[c], positions[c])
                for c in (slice(s, s + self.logits_chunk_size) for s in range(0, h.shape[0], self.logits_chunk_size))
            ]
        ids, lps, nxt, tail = (torch.cat([p[j] for p in parts]).cpu().numpy() for j in range(4))
        entry_ids, entry_logprobs, counts = compact_entries(ids, lps, spec)
        out, pos = [], 0
        for w, n in zip(windows, lengths):
            sl = slice(pos, pos + n - 1)
            pos += n - 1
            out.append(
                CachedSequence(
                    sequence_id=w.sequence_id,
                    input_ids=w.input_ids,
                    loss_mask=w.loss_mask,
                    entry_ids=entry_ids[sl],
                    entry_logprobs=entry_logprobs[sl],
                    next_token_logprobs=nxt[sl].astype(np.float32),
                    tail_mass=tail[sl].astype(np.float32),
                    sample_counts=None if counts is None else counts[sl],
                    num_samples=spec.num_samples,
                )
            )
        return out

    def _targets(
        self, hidden: Any, next_tokens: Any, spec: TargetSpec, sequence_ids: Any, positions: Any
    ) -> tuple[Any, Any, Any, Any]:
        """One chunk of positions: entry ids, entry log-probs, the next token's log-prob and the tail (torch)."""
        import torch

        logp = torch.log_softmax(self._logits(hidden).float(), dim=-1)
        nxt = logp.gather(1, next_tokens[:, None]).squeeze(1)
        dev = logp.device
        ids, lps, tail = targets_from_logprobs(logp, spec, sequence_ids.to(dev), positions.to(dev), inplace=True)
        return ids, lps, nxt, tail

    def close(self) -> None:
        del self.model
