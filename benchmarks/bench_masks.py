"""Benchmark: building the masks of every method (scores + per-row top-k, fused in the C++
kernels) for a 14336x4096 layer, reference against C++.

  python benchmarks/bench_masks.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from persona_kernels.masks import contrastive_sparse_masks, contrastive_wanda_masks, wanda_mask  # noqa: E402
from persona_kernels.masks.methods import contrastive_sparse_code_masks  # noqa: E402

from common import machine, print_table, time_fn  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    out_f, in_f = (512, 256) if args.quick else (14336, 4096)
    w = torch.randn(out_f, in_f)
    a, b = torch.rand(in_f, dtype=torch.float64), torch.rand(in_f, dtype=torch.float64)
    dev = torch.device("cpu")
    rows = []
    va, vb = a * 0.1, b * 0.1
    methods = {
        "wanda (1 mask)": lambda be: wanda_mask(w, a, 0.5, backend=be),
        "contrastive-wanda (2 masks)": lambda be: contrastive_wanda_masks(w, a, va, b, vb, 0.5, backend=be),
        "contrastive-sparse (2 masks)": lambda be: contrastive_sparse_masks(w, a, b, 0.5, backend=be),
        "contrastive-sparse, released (2 masks)": lambda be: contrastive_sparse_code_masks(w, a, va, b, vb, 0.5, backend=be),
    }
    for op, build in methods.items():
        base = None
        for backend in ("reference", "cpp"):
            try:
                t = time_fn(lambda: build(backend), dev, warmup=1, reps=3)
            except Exception as exc:  # noqa: BLE001
                print(f"{op} {backend}: unavailable ({exc})")
                continue
            base = base or t
            rows.append(dict(op=op, backend=backend, shape=f"{out_f}x{in_f}", seconds=f"{t:.3f}", vs_reference=f"{base / t:.2f}x"))
    print(f"# mask building on {machine()}")
    print_table(rows, ["op", "backend", "shape", "seconds", "vs_reference"])
    return rows


if __name__ == "__main__":
    main()
