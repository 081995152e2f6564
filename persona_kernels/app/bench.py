"""End-to-end decode benchmark: tokens/s of the dense model vs persona masks, and switch cost.

Masks for speed measurements are magnitude masks (top-k |W| per row, the same unstructured
pattern as Wanda masks); calibration does not change the kernels' speed.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import torch
import torch.nn as nn

from .. import model as pm
from ..hf import linear_shape
from ..masks import MaskStore, linear_weight
from ..masks.methods import select


def magnitude_masks(model: nn.Module, sparsity: float, personas: Sequence[str] = ("a", "b"), seed: int = 0) -> MaskStore:
    """Per-row top-k masks of |W| (+ a little noise per persona so personas differ) for every linear layer."""
    g = torch.Generator().manual_seed(seed)
    out = {p: {} for p in personas}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, m in model.named_modules():
        if linear_shape(m) is None or m is head or getattr(m, "_pk_wrapper", False):
            continue
        w = linear_weight(m).detach().float().abs().cpu()
        for p in personas:
            noise = 1 + 0.05 * torch.rand(w.shape, generator=g)
            out[p][name] = select(w * noise, sparsity)
    return MaskStore.from_masks(model, out, "magnitude", {"sparsity": sparsity})


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def decode_tokens_per_s(model: nn.Module, tokens: int, batch: int = 1, prompt_len: int = 8, device="cpu",
                        reps: int = 2) -> float:
    """Greedy decode of ``tokens`` new tokens with the KV cache; best of ``reps`` (prefill excluded)."""
    vocab = model.config.vocab_size
    ids = torch.randint(3, min(vocab, 100), (batch, prompt_len), generator=torch.Generator().manual_seed(0)).to(device)
    best = 0.0
    for _ in range(reps):
        out = model(input_ids=ids, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(tokens):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        best = max(best, batch * tokens / (time.perf_counter() - t0))
    return best


def switch_cost_ms(model: nn.Module, names: Sequence[str], reps: int = 200) -> float:
    t0 = time.perf_counter()
    for i in range(reps):
        pm.set_persona(model, names[i % len(names)])
    return (time.perf_counter() - t0) / reps * 1e3


def bench_model(model: nn.Module, sparsities: Sequence[float], tokens: int = 32, batch: int = 1, device="cpu",
                formats: Sequence[str] = ("auto",), log=print) -> list[dict]:
    """Rows of {sparsity, format, tok/s, speedup, switch ms/layer, persona bytes} vs dense measured in the same run."""
    dense = decode_tokens_per_s(model, tokens, batch, device=device)
    rows = [dict(sparsity=0.0, format="dense", tokens_per_s=dense, speedup=1.0)]
    log(f"dense: {dense:.1f} tok/s")
    for s in sparsities:
        store = magnitude_masks(model, s)
        for fmt in formats:
            handle = pm.apply(model, store, persona=store.personas[0], format=fmt)
            try:
                tps = decode_tokens_per_s(model, tokens, batch, device=device)
                sw = switch_cost_ms(model, store.personas) / max(1, len(handle.swapped))
            finally:
                pm.remove(model)
            rows.append(dict(sparsity=s, format=handle.format, tokens_per_s=tps, speedup=tps / dense,
                             switch_ms_per_layer=sw))
            log(f"sparsity {s:.0%} {handle.format}: {tps:.1f} tok/s ({tps / dense:.2f}x dense), "
                f"switch {sw * 1e3:.2f} us/layer")
    return rows


def bench_mixed_batch(model: nn.Module, sparsity: float, batch: int, personas: int = 4, tokens: int = 32,
                      device="cpu", log=print) -> dict:
    """Decode tokens/s of a batch whose sequences carry different personas (shared bitmask, one
    persona per sequence), against the dense model at the same batch size, in the same run."""
    dense = decode_tokens_per_s(model, tokens, batch, device=device)
    store = magnitude_masks(model, sparsity, personas=[f"p{i}" for i in range(personas)])
    pm.apply(model, store, format="shared_bitmask")
    try:
        pm.set_batch_personas(model, [store.personas[i % personas] for i in range(batch)])
        tps = decode_tokens_per_s(model, tokens, batch, device=device)
    finally:
        pm.remove(model)
    log(f"mixed batch of {batch} ({personas} personas, {sparsity:.0%}, shared bitmask): {tps:.1f} tok/s, "
        f"dense {dense:.1f} tok/s ({tps / dense:.2f}x)")
    return dict(sparsity=sparsity, format=f"shared_bitmask, {personas} personas mixed", batch=batch,
                tokens_per_s=tps, speedup=tps / dense, dense_tokens_per_s=dense)


def run_decode_bench(model_spec: str, sparsities: Sequence[float], tokens: int = 32, device="cpu",
                     out: Optional[str] = None) -> list[dict]:
    from .loading import input_device, load_model

    model, _ = load_model(model_spec, "float32", device)
    return bench_model(model, sparsities, tokens, device=input_device(model))
