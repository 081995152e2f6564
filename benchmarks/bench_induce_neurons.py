"""Benchmark: the NPTI induction op vs the eager PyTorch expression, on an MLP activation.

Memory-bound (read a, write out): reports time, speed-up over eager measured in the same run,
and achieved bytes/s as a fraction of the measured copy bandwidth (the ideal for this op).
Rows with act=silu time the op fused into the MLP activation (input: the gate projection's
output) against eager F.silu followed by the edit, and against F.silu followed by the unfused op.

  python benchmarks/bench_induce_neurons.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from persona_kernels import backends  # noqa: E402
from persona_kernels.ops.induce_neurons import induce_neurons, induce_neurons_reference  # noqa: E402

from common import copy_bandwidth, machine, print_table, time_fn  # noqa: E402


def bench_op(shapes, dtype, dev: torch.device, copy_bw: float) -> list[dict]:
    """Rows per (shape, act, backend): time, eager baseline and the unfused (act, then edit) path."""
    rows = []
    for n, i in shapes:
        a = torch.randn(n, i, device=dev, dtype=dtype)
        deact = torch.rand(i, device=dev) > 0.9
        add = torch.where(torch.rand(i, device=dev) > 0.9, torch.rand(i, device=dev), torch.zeros(i, device=dev))
        nbytes = 2 * a.numel() * a.element_size()
        for act in (None, "silu"):
            t_eager = time_fn(lambda: induce_neurons_reference(a if act is None else F.silu(a), deact, add), dev)
            for name in ("cpp", "triton", "reference"):
                if not backends.available(name, dev) or (name == "triton" and backends.triton_interpreter()):
                    continue
                t = time_fn(lambda: induce_neurons(a, deact, add, backend=name, act=act), dev)
                t_unfused = t if act is None else time_fn(lambda: induce_neurons(F.silu(a), deact, add, backend=name), dev)
                rows.append(dict(shape=f"{n}x{i}", dtype=str(dtype).split(".")[-1], act=act or "-", backend=name,
                                 ms=f"{t * 1e3:.3f}", eager_ms=f"{t_eager * 1e3:.3f}", speedup=f"{t_eager / t:.2f}",
                                 vs_unfused=f"{t_unfused / t:.2f}", of_copy_bw=f"{nbytes / t / copy_bw:.0%}"))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    shapes = [(64, 1024)] if args.quick else [(1, 14336), (16, 14336), (2048, 14336)]
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    bw = copy_bandwidth(256 << 20 if not args.quick else 1 << 20, dev)
    rows = bench_op(shapes, dtype, dev, bw)
    print(f"# induce_neurons on {machine()} (copy bandwidth {bw / 1e9:.1f} GB/s)")
    print_table(rows, ["shape", "dtype", "act", "backend", "ms", "eager_ms", "speedup", "vs_unfused", "of_copy_bw"])
    return rows


if __name__ == "__main__":
    main()
