"""Benchmark: dense_linear's C++ GEMV against F.linear (the vendor GEMV/GEMM) on the same weight.

Memory-bound at decode batch sizes: reports time, the speed-up over F.linear measured in the
same run, and achieved bytes/s as a fraction of the measured read bandwidth (the ideal: the
weight is read once per call). Shapes: SmolLM2-135M's tied output head and projections, and
Llama-3-8B's MLP. ``--write-crossover`` stores, per dtype, the largest batch at which the C++
kernel beats F.linear on every shape at every batch up to it (crossover.json, 'dense:<dtype>'),
and the same over the large shapes alone (weights of at least LARGE_BYTES) as its
``large_max_batch``: on big weights the kernel stays ahead to larger batches.

  python benchmarks/bench_dense_linear.py [--quick] [--dtype float32] [--plot out.png] [--write-crossover]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from persona_kernels.ops import registry  # noqa: E402
from persona_kernels.ops.dense_linear import dense_linear  # noqa: E402
from persona_kernels.ops.masked_linear import dispatch  # noqa: E402

from common import machine, print_table, read_bandwidth, save_bar_plot, time_fn  # noqa: E402

SHAPES = [(49152, 576), (3072, 576), (576, 1536), (960, 576), (14336, 4096), (4096, 14336)]
LARGE_BYTES = 64 << 20  # the large shapes above: SmolLM2's head and Llama-3-8B's MLP (fp32: 113-235 MB)


def run(shapes, batches, dtype, read_bw: float) -> list[dict]:
    rows = []
    for out_f, in_f in shapes:
        w = torch.randn(out_f, in_f).to(dtype)
        nbytes = w.numel() * w.element_size()
        for batch in batches:
            x = torch.randn(batch, in_f).to(dtype)
            t_vendor = time_fn(lambda: F.linear(x, w), torch.device("cpu"))
            t = time_fn(lambda: dense_linear(x, w, backend="cpp"), torch.device("cpu"))
            rows.append(dict(shape=f"{out_f}x{in_f}", dtype=str(dtype).removeprefix("torch."), batch=batch, nbytes=nbytes,
                             ms=t * 1e3, vendor_ms=t_vendor * 1e3, speedup=t_vendor / t, GBps=nbytes / t / 1e9,
                             of_ideal=nbytes / t / read_bw))
    return rows


def crossover(rows) -> int:
    """Largest batch b such that the C++ kernel beat F.linear on every shape at every batch <= b."""
    best = 0
    for b in sorted({r["batch"] for r in rows}):
        if all(r["speedup"] >= 1.0 for r in rows if r["batch"] <= b):
            best = b
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--batches", default="1,2,4,8,16,32,64")
    ap.add_argument("--plot", help="save a PNG of the speed-up over F.linear per shape and batch")
    ap.add_argument("--write-crossover", action="store_true", help="store the measured crossover (CPU table)")
    args = ap.parse_args(argv)
    if registry.get_kernel("dense_linear", "cpp") is None:
        print("dense_linear has no C++ kernel here (extension not built, or built without AVX-512): nothing to time")
        return [{"skipped": True}]
    dtype = getattr(torch, args.dtype)
    shapes, batches = ([(300, 200)], [1, 9]) if args.quick else (SHAPES, [int(b) for b in args.batches.split(",")])
    bw = read_bandwidth((1 << 20) if args.quick else (256 << 20), torch.device("cpu"))
    print(f"# dense_linear on {machine()} (torch {torch.__version__}, {dtype}, read bandwidth {bw / 1e9:.1f} GB/s)")
    rows = run(shapes, batches, dtype, bw)
    print_table([{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
                ["shape", "dtype", "batch", "ms", "vendor_ms", "speedup", "GBps", "of_ideal"])
    cross = crossover(rows)
    large = [r for r in rows if r["nbytes"] >= LARGE_BYTES]
    cross_large = crossover(large) if large else cross
    print(f"\ncrossover: the C++ kernel wins on every shape up to batch {cross}, on the large ones "
          f"(>= {LARGE_BYTES >> 20} MiB) up to {cross_large}")
    if args.write_crossover:
        entry = {dispatch.table_key("dense", dtype): {"backend": "cpp", "max_batch": cross, "large_min_bytes": LARGE_BYTES,
                                                      "large_max_batch": max(cross, cross_large)}}
        print(f"crossover written to {dispatch.store_entries({'cpu': entry})}")
    if args.plot:
        labels = [f"b{b}" for b in batches]
        series = {r0["shape"]: [r["speedup"] for r in rows if r["shape"] == r0["shape"]]
                  for r0 in rows if r0["batch"] == batches[0]}
        save_bar_plot(args.plot, labels, series, "x F.linear", f"dense_linear (C++) speed-up over F.linear, {args.dtype}")
    return rows


if __name__ == "__main__":
    main()
