"""The fused loss on a GPU (issue 11), one short script for a lent device (torch + transformers there, no vLLM).

    python benchmarks/gpu_fused.py            # CUDA: checks, then KD vs CE steps of a 1B-class student, JSON lines
    python benchmarks/gpu_fused.py --tiny     # any device: the same code at toy sizes (a smoke check, CPU included)

1. correctness on the device: the fused loss (train/fused.py) against the reference (train/losses.py) in float64
   for every loss with and without the tail bucket, and in bf16 autocast within 2% (loss) / 5% (gradient norm);
2. step time and peak memory of one optimizer step of a Llama student (hidden 2048, 16 layers, 16 heads, V=128,256,
   8 x 1,024 = 8k tokens per step, bf16 autocast, AdamW): HF's `labels=` CE step, the fused CE step (alpha=0), the
   fused KD step (alpha=0.5, k=64 targets with tail) and the reference KD step; each median of 5 after 2 warm-up.
The goal (issue 11): fused KD <= 1.05x HF's CE step on a GPU, peak memory <= CE's. Record the lines in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any


def check_equal(device: Any) -> bool:
    import torch

    from logitcache.train.config import LOSSES, KDSettings
    from logitcache.train.fused import fused_distillation_loss
    from logitcache.train.losses import TeacherTargets, chunked_distillation_loss

    torch.manual_seed(0)
    n, d, v, m = 300, 64, 1000, 16
    ok = True
    for dtype in (torch.float64, torch.float32):
        hidden = torch.randn(n, d, dtype=torch.float64, device=device)
        weight = torch.randn(v, d, dtype=torch.float64, device=device) * 0.3
        lp, ids = torch.log_softmax(torch.randn(n, v, dtype=torch.float64, device=device) * 2, -1).topk(m)
        teacher = TeacherTargets(ids, lp.exp(), (1 - lp.exp().sum(-1)).clamp(min=0))
        y = torch.randint(0, v, (n,), device=device)
        for loss in LOSSES:
            for no_tail in (False, True):
                s = KDSettings(loss=loss, beta=0.5 if loss in ("jsd", "skew_kl") else None, alpha=0.7, no_tail=no_tail,
                               temperature=2.0, chunk_size=128)  # fmt: skip
                grads = []
                for fused in (False, True):
                    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
                    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.float32)
                    with amp:
                        if fused:
                            p = fused_distillation_loss(h, w, None, teacher, y, s)
                        else:
                            p = chunked_distillation_loss(h, lambda x, w=w: x @ w.T, teacher, y, s)
                    p.total.backward()
                    grads.append((p.total.double(), w.grad.double()))
                (ref_l, ref_g), (got_l, got_g) = grads
                tol_l, tol_g = (1e-9, 1e-9) if dtype == torch.float64 else (0.02, 0.05)
                good = bool(abs(got_l - ref_l) <= tol_l * abs(ref_l) + 1e-12)
                good &= bool((got_g - ref_g).norm() <= tol_g * ref_g.norm() + 1e-12)
                ok &= good
                print(json.dumps({"check": "fused == reference", "dtype": "float64" if dtype == torch.float64 else
                                  "bf16 autocast", "loss": loss, "no_tail": no_tail, "ok": good}))  # fmt: skip
    return ok


def step_times(device: Any, tiny: bool) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from logitcache.train.config import KDSettings
    from logitcache.train.student import DistillModel

    if tiny:
        shape = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
        vocab, batch, seq, k = 1000, 2, 64, 16
    else:
        shape = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 16, "intermediate_size": 8192}
        vocab, batch, seq, k = 128256, 8, 1024, 64
    cfg = LlamaConfig(vocab_size=vocab, num_key_value_heads=shape["num_attention_heads"] // 2, **shape)
    torch.manual_seed(0)
    gen = torch.Generator(device="cpu").manual_seed(1)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    n = batch * (seq - 1)
    lp, ids = torch.log_softmax(torch.randn(n, vocab, generator=gen) * 3, -1).topk(k)
    batch_d = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "positions": (torch.arange(batch)[:, None] * seq + torch.arange(seq - 1)[None]).reshape(-1).to(device),
        "next_token_ids": input_ids[:, 1:].reshape(-1),
        "target_ids": ids.to(device),
        "target_probs": lp.exp().to(device),
        "tail_mass": (1 - lp.exp().sum(-1)).clamp(min=0).to(device),
    }
    for variant, alpha, fused in (("ce_hf", None, None), ("ce_fused", 0.0, True), ("kd_fused", 0.5, True),
                                  ("kd_reference", 0.5, False)):  # fmt: skip
        model = LlamaForCausalLM(cfg).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        dm = DistillModel(model, vocab, KDSettings(alpha=alpha or 0.0, fused_loss=bool(fused), chunk_size=1024))
        times = []
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        for _ in range(7):
            t = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                if alpha is None:
                    loss = model(input_ids=input_ids, labels=input_ids).loss
                else:
                    loss = dm(batch_d, float(n)).total
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else None
        print(json.dumps({"variant": variant, "median_step_s": statistics.median(times[2:]), "peak_bytes": peak,
                          "tokens_per_step": batch * seq, "vocab": vocab, "device": str(device)}))  # fmt: skip
        del model, opt, dm


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="toy sizes on whatever device there is")
    args = ap.parse_args()
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        print(json.dumps({"check": "cuda", "ok": False, "why": "no CUDA device (use --tiny for a CPU smoke run)"}))
        return 1
    ok = check_equal(device)
    step_times(device, args.tiny)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
