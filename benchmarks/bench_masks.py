"""Benchmark: building one persona mask (score + per-row top-k) for a 14336x4096 layer.

  python benchmarks/bench_masks.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from persona_kernels.masks import contrastive_sparse_masks, contrastive_wanda_masks, wanda_mask  # noqa: E402

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
    for backend in ("reference", "cpp", "auto"):
        try:
            wanda_mask(w[:4], a, backend=backend)
        except Exception as exc:  # noqa: BLE001
            print(f"{backend}: unavailable ({exc})")
            continue
        t = time_fn(lambda: wanda_mask(w, a, 0.5, backend=backend), dev, warmup=1, reps=3)
        rows.append(dict(op="wanda row top-k", backend=backend, shape=f"{out_f}x{in_f}", seconds=f"{t:.3f}"))
    t = time_fn(lambda: contrastive_wanda_masks(w, a, a * 0.1, b, b * 0.1, 0.5), dev, warmup=1, reps=3)
    rows.append(dict(op="contrastive-wanda (2 masks)", backend="auto", shape=f"{out_f}x{in_f}", seconds=f"{t:.3f}"))
    t = time_fn(lambda: contrastive_sparse_masks(w, a, b, 0.5), dev, warmup=1, reps=3)
    rows.append(dict(op="contrastive-sparse (2 masks)", backend="auto", shape=f"{out_f}x{in_f}", seconds=f"{t:.3f}"))
    print(f"# mask building on {machine()}")
    print_table(rows, ["op", "backend", "shape", "seconds"])
    return rows


if __name__ == "__main__":
    main()
