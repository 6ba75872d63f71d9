"""Tiny randomly initialised models that more than one test folder builds (no downloads; seconds on CPU)."""

from __future__ import annotations

from typing import Any

# The size of every tiny test model: 2 layers, 64 wide, 2 query heads sharing 1 key/value head.
TINY_SIZES: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}


def tiny_granite(vocab_size: int, logits_scaling: float) -> Any:
    """A TINY_SIZES Granite causal LM, initialised from seed 0. Granite divides its logits by
    `logits_scaling`, so it shows whether a decoder + head split scales the logits as the model's forward does."""
    import torch
    from transformers import GraniteConfig, GraniteForCausalLM

    cfg = GraniteConfig(vocab_size=vocab_size, logits_scaling=logits_scaling, **TINY_SIZES)
    torch.manual_seed(0)
    return GraniteForCausalLM(cfg)
