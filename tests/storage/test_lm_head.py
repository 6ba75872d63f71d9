"""LMHeadTransform: the LM-head post-processing of each architecture family, read from its config."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from logitcache.storage import LMHeadTransform


@pytest.mark.parametrize(
    ("config", "scale", "softcap"),
    [
        (SimpleNamespace(), 1.0, None),
        (SimpleNamespace(logit_scale=0.0625), 0.0625, None),  # Cohere: logits * logit_scale
        (SimpleNamespace(logits_scaling=8.0), 0.125, None),  # Granite: logits / logits_scaling
        (SimpleNamespace(final_logit_softcapping=30.0), 1.0, 30.0),  # Gemma 2
        (SimpleNamespace(logit_scale=None, logits_scaling=None, final_logit_softcapping=None), 1.0, None),
    ],
)
def test_transform_from_config(config: object, scale: float, softcap: float | None) -> None:
    t = LMHeadTransform.from_config(config)
    assert (t.scale, t.softcap) == (scale, softcap)
    assert t.is_identity == (scale == 1.0 and softcap is None)


def test_apply_scales_then_softcaps() -> None:
    torch = pytest.importorskip("torch", reason="apply() is called with torch tensors by both stages")
    x = torch.tensor([-100.0, -1.0, 0.0, 2.0, 100.0])
    got = LMHeadTransform(scale=0.5, softcap=10.0).apply(x)
    np.testing.assert_allclose(got.numpy(), 10.0 * np.tanh(0.5 * x.numpy() / 10.0), rtol=1e-6)
    assert LMHeadTransform().apply(x) is x
