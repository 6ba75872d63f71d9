"""How a model's LM head turns `hidden @ W^T` into the logits its log-softmax is taken over (array-library agnostic).

Some architectures post-process the projection: Cohere multiplies by `logit_scale`, Granite divides by
`logits_scaling`, Gemma 2/3 soft-cap with `final_logit_softcapping`. The teacher's cached log-probs are those of the
post-processed logits, and a student must be trained on the logits its own inference uses, so the capture (HF
backend) and the trainer both compute the head through this one description. It lives in storage, the one package
both stages import; it only calls tensor methods (`*`, `/`, `.tanh()`), so storage still imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["LMHeadTransform"]

T = TypeVar("T")


@dataclass(frozen=True)
class LMHeadTransform:
    """logits = softcap(scale * (hidden @ W^T + b)); scale 1 and softcap None leave the projection as it is."""

    scale: float = 1.0  # Cohere's logit_scale x 1 / Granite's logits_scaling
    softcap: float | None = None  # Gemma's final_logit_softcapping: softcap * tanh(logits / softcap)

    @classmethod
    def from_config(cls, config: Any) -> LMHeadTransform:
        """The transform of a transformers config (its text config for multimodal models)."""
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        scale = 1.0
        if getattr(cfg, "logit_scale", None):  # Cohere: logits * logit_scale
            scale *= float(cfg.logit_scale)
        if getattr(cfg, "logits_scaling", None):  # Granite: logits / logits_scaling
            scale /= float(cfg.logits_scaling)
        softcap = getattr(cfg, "final_logit_softcapping", None)
        return cls(scale=scale, softcap=float(softcap) if softcap else None)

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def apply(self, logits: T) -> T:
        """The post-processed logits: any tensor with `*`, `/` and `.tanh()` (torch); same type and shape back."""
        out: Any = logits
        if self.scale != 1.0:
            out = out * self.scale
        if self.softcap is not None:
            out = (out / self.softcap).tanh() * self.softcap
        return out  # type: ignore[no-any-return]
