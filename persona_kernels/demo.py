"""`make demo`: the pipeline on a built-in model and built-in persona texts.

For now: calibrate a small Llama-architecture model on two opposing personas with the fused
statistics op, save the statistics artifact, and print what differs between the personas.
"""
from __future__ import annotations

import os
import time

import torch

from .calibrate import CalibrationResult, calibrate
from .data import builtin_texts
from .models import char_tokenizer, tiny_causal_lm


def _contrast(res: CalibrationResult, site: str) -> float:
    """Mean |z| of the per-sample norm between persona 0 and 1 (the Contrastive-Wanda z-score)."""
    st = res.stats[site]
    m, v = st.sample_norm_mean(), st.sample_norm_var()
    z = (m[0] - m[1]) / (v[0] + v[1] + 1e-6).sqrt()
    return float(z.abs().mean())


def run(out_dir: str = "reports/demo", backend: str = "auto", quiet: bool = False) -> CalibrationResult:
    torch.manual_seed(0)
    model = tiny_causal_lm("llama", seed=0, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2)
    tok = char_tokenizer()
    texts = {p: builtin_texts(p) for p in ("extraversion", "introversion")}
    t0 = time.perf_counter()
    res = calibrate(model, tok, texts, batch_size=8, backend=backend, progress=not quiet)
    elapsed = time.perf_counter() - t0
    path = res.save(os.path.join(out_dir, "statistics.safetensors"))
    print(res.summary())
    print(f"calibrated in {elapsed:.2f} s; statistics written to {path}")
    print("\nsite                                  channels  mean|z| extra/intro  firing P (act sites)")
    for name, site in res.sites.items():
        st = res.stats[name]
        fire = ""
        if site.kind == "act":
            p = st.firing_prob()
            fire = f"{float(p[0].mean()):.3f} / {float(p[1].mean()):.3f}  median p95 {float(st.percentile(95, 'interpolate')[0].median()):.3f}"
        print(f"{name:<38}{site.channels:>8}  {_contrast(res, name):>8.3f}      {fire}")
    return res
