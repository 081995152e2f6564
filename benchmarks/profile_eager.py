"""Where an eager persona decode step spends its host time (run on a GPU machine).

1. Host microseconds per call (no sync inside the loop) of nn.Linear against MaskedLinear on a
   [1, 4096] input, for the dense route (50%: the cached masked weight) and the kernel route (90%).
2. cProfile of decode steps of a 4-layer model with Llama-3-8B layer shapes: plain, and persona.

    python benchmarks/profile_eager.py [--device cuda] [--steps 50]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_e2e_decode import llama3_8b_shaped  # noqa: E402

import persona_kernels.model as pm  # noqa: E402
from persona_kernels.app.bench import magnitude_masks  # noqa: E402
from persona_kernels.masks import MaskStore  # noqa: E402


def _host_us(fn, device, reps: int = 2000) -> float:
    for _ in range(50):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    t = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1e6 * t / reps


class _One(torch.nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.proj = lin

    def forward(self, x):
        return self.proj(x)


@torch.inference_mode()
def per_call(device, dtype) -> list[str]:
    lin = torch.nn.Linear(4096, 4096, bias=False, device=device, dtype=dtype)
    x = torch.randn(1, 1, 4096, device=device, dtype=dtype)
    lines = [f"nn.Linear: {_host_us(lambda: lin(x), device):.1f} us/call (host)"]
    for sparsity in (0.5, 0.9):
        model = _One(lin)
        g = torch.Generator().manual_seed(0)
        masks = {p: {"proj": torch.rand(4096, 4096, generator=g) >= sparsity} for p in ("a", "b")}
        pm.apply(model, MaskStore.from_masks(model, masks), persona="a")
        lines.append(f"MaskedLinear {sparsity:.0%}: {_host_us(lambda: model(x), device):.1f} us/call (host)")
        pm.remove(model)
    return lines


@torch.inference_mode()
def profile_steps(device, dtype, steps: int) -> list[str]:
    model = llama3_8b_shaped(4, dtype, str(device), False)
    ids = torch.full((1, 1), 5, dtype=torch.long, device=device)
    out = []
    for label, store in (("plain", None), ("persona 50%", magnitude_masks(model, 0.5)), ("persona 90%", magnitude_masks(model, 0.9))):
        if store is not None:
            pm.apply(model, store, persona="a")
        step = lambda: model(input_ids=ids, use_cache=False)  # noqa: E731
        out.append(f"{label}: {_host_us(step, device, reps=steps) / 1000:.3f} ms/step (host)")
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(steps):
            step()
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
        out.append(s.getvalue()[-4000:])
        if store is not None:
            pm.remove(model)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for line in per_call(device, dtype) + profile_steps(device, dtype, args.steps):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
