"""End-to-end decode benchmark: tokens/s of the dense model vs persona masks, and switch cost.

Masks for speed measurements are magnitude masks (top-k |W| per row, the same unstructured
pattern as Wanda masks); calibration does not change the kernels' speed.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn

from .. import model as pm
from ..hf import cache_kwargs, linear_shape, output_cache
from ..masks import MaskStore, linear_weight
from ..masks.methods import select
from ..ops.dense_linear import dense_linear


def magnitude_masks(model: nn.Module, sparsity: float, personas: Sequence[str] = ("a", "b"), seed: int = 0) -> MaskStore:
    """Per-row top-k masks of |W| (+ a little noise per persona so personas differ) for every linear layer."""
    gens: dict = {}  # one generator per device: the scores are made where the weight lives (a GPU's 8B layers take seconds on a CPU)
    out = {p: {} for p in personas}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, m in model.named_modules():
        if linear_shape(m) is None or m is head or getattr(m, "_pk_wrapper", False):
            continue
        w = linear_weight(m).detach().float().abs()
        if w.device not in gens:
            gens[w.device] = torch.Generator(device=w.device).manual_seed(seed)
        for p in personas:
            noise = 1 + 0.05 * torch.rand(w.shape, generator=gens[w.device], device=w.device)
            out[p][name] = select(w * noise, sparsity).cpu()
    return MaskStore.from_masks(model, out, "magnitude", {"sparsity": sparsity})


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timing:
    """Tokens/s of several runs: the median and the range."""

    runs: list

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    def __str__(self) -> str:
        return f"{self.median:.1f} tok/s (min {min(self.runs):.1f}, max {max(self.runs):.1f}, {len(self.runs)} runs)"


@torch.inference_mode()
def decode_runs(model: nn.Module, tokens: int, batch: int = 1, prompt_len: int = 8, device="cpu", runs: int = 5) -> Timing:
    """Greedy decode of ``tokens`` new tokens with the KV cache, ``runs`` times from a fresh cache
    (prefill and a warm-up step excluded): tokens/s of each run."""
    vocab = model.config.vocab_size
    ids = torch.randint(3, min(vocab, 100), (batch, prompt_len), generator=torch.Generator().manual_seed(0)).to(device)
    out = []
    for _ in range(runs):
        step = model(input_ids=ids, use_cache=True)
        cache, nxt = output_cache(step), step.logits[:, -1:].argmax(-1)
        step = model(input_ids=nxt, use_cache=True, **cache_kwargs(model, cache))  # warm-up step
        cache, nxt = output_cache(step), step.logits[:, -1:].argmax(-1)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(tokens):
            step = model(input_ids=nxt, use_cache=True, **cache_kwargs(model, cache))
            cache, nxt = output_cache(step), step.logits[:, -1:].argmax(-1)
        _sync(device)
        out.append(batch * tokens / (time.perf_counter() - t0))
    return Timing(out)


def decode_tokens_per_s(model: nn.Module, tokens: int, batch: int = 1, prompt_len: int = 8, device="cpu",
                        reps: int = 5) -> float:
    """Median tokens/s of ``reps`` decode runs (see decode_runs)."""
    return decode_runs(model, tokens, batch, prompt_len, device, reps).median


@contextlib.contextmanager
def dense_linear_everywhere(model: nn.Module):
    """Every nn.Linear of the (unapplied) model runs the dense_linear op for the duration: the
    dense model as fast as this package's own dense kernel makes it, so that a persona's speed-up
    can be split into what the sparse formats give and what a faster GEMV alone would."""
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    for m in linears:
        m.forward = lambda x, m=m: dense_linear(x, m.weight, m.bias)
    try:
        yield
    finally:
        for m in linears:
            del m.forward


def switch_cost_ns(model: nn.Module, names: Sequence[str], reps: int = 200_000) -> float:
    """Nanoseconds per set_persona (the whole model: one attribute write, whatever its size),
    from a long loop timed with the nanosecond clock, less the loop's own cost."""
    n = len(names)
    t0 = time.perf_counter_ns()
    for i in range(reps):
        pm.set_persona(model, names[i % n])
    t1 = time.perf_counter_ns()
    for i in range(reps):
        names[i % n]
    t2 = time.perf_counter_ns()
    return max(0.0, ((t1 - t0) - (t2 - t1)) / reps)


def bench_model(model: nn.Module, sparsities: Sequence[float] = (), tokens: int = 32, batch: int = 1, device="cpu",
                formats: Sequence[str] = ("auto",), log=print, runs: int = 5, masks: Optional[MaskStore] = None,
                persona: Optional[str] = None, fuse: Sequence[bool] = (True,),
                dense_head: Sequence[bool] = (True,)) -> list[dict]:
    """Rows of {sparsity, format, fused, dense_head, tok/s (median, min, max), speedup,
    vs_kernel_dense, switch ns} against the dense model measured in the same run (plain
    transformers, and the same with every linear layer on dense_linear): magnitude masks at
    ``sparsities``, or the user's ``masks`` (their ``persona``, default the first); ``fuse`` /
    ``dense_head``: apply()'s options on, off, or both (False, True) to compare."""
    dense = decode_runs(model, tokens, batch, device=device, runs=runs)
    rows = [dict(sparsity=0.0, format="dense", tokens_per_s=dense.median, min=min(dense.runs), max=max(dense.runs),
                 speedup=1.0)]
    log(f"dense: {dense}")
    with dense_linear_everywhere(model):
        kernel = decode_runs(model, tokens, batch, device=device, runs=runs)
    rows.append(dict(sparsity=0.0, format="dense, every linear on dense_linear", tokens_per_s=kernel.median,
                     min=min(kernel.runs), max=max(kernel.runs), speedup=kernel.median / dense.median))
    log(f"dense, every linear on dense_linear: {kernel}, {kernel.median / dense.median:.2f}x dense")
    stores = [(masks, persona)] if masks is not None else \
        [(magnitude_masks(model, s), None) for s in sparsities]
    for store, who in stores:
        who = who or store.personas[0]
        density = store.density(who)["*"]
        for fmt, fused, head in ((f, u, d) for f in formats for u in fuse for d in dense_head):
            handle = pm.apply(model, store, persona=who, format=fmt, fuse=fused, dense_head=head)
            try:
                t = decode_runs(model, tokens, batch, device=device, runs=runs)
                sw = switch_cost_ns(model, store.personas)
            finally:
                pm.remove(model)
            rows.append(dict(sparsity=1 - density, format=handle.format, fused=fused, dense_head=head, persona=who,
                             tokens_per_s=t.median, min=min(t.runs), max=max(t.runs), speedup=t.median / dense.median,
                             vs_kernel_dense=t.median / kernel.median, switch_ns=sw))
            log(f"{who} ({1 - density:.0%} sparse, {handle.format}{'' if fused else ', unfused'}"
                f"{'' if head else ', head on F.linear'}): {t}, {t.median / dense.median:.2f}x dense "
                f"({t.median / kernel.median:.2f}x the dense model on dense_linear); persona switch {sw:.0f} ns")
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
                     out: Optional[str] = None, dtype: str = "float32", runs: int = 5, batch: int = 1,
                     masks: Optional[str] = None, persona: Optional[str] = None,
                     fuse: Sequence[bool] = (True,), dense_head: Sequence[bool] = (True,)) -> list[dict]:
    from .loading import input_device, load_model

    model, _ = load_model(model_spec, dtype, device)
    store = MaskStore.load(masks, model=model) if masks else None
    if store is not None and persona is not None:
        store.index(persona)  # an unknown persona is an error before any timing
    rows = bench_model(model, sparsities, tokens, batch, device=input_device(model), runs=runs, masks=store,
                       persona=persona, fuse=fuse, dense_head=dense_head)
    if out:
        import json
        import os

        from ..io import atomic_write_text

        meta = dict(model=model_spec, dtype=dtype, device=str(device), tokens=tokens, batch=batch, runs=runs)
        path = atomic_write_text(os.path.join(out, "bench.json"), json.dumps(dict(meta, rows=rows), indent=1))
        print(f"wrote {path}")
    return rows
