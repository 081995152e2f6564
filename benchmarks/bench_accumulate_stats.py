"""Benchmark: fused accumulate_stats vs the eager multi-op PyTorch baseline.

Prints, per shape/dtype/backend: time, speed-up over the eager baseline measured in the same
run, achieved bandwidth over the bytes of ONE read of x, and that as a fraction of the
measured device copy bandwidth. Also reports calibration overhead on a tiny Llama.

  python benchmarks/bench_accumulate_stats.py                 # CPU defaults ([16384, 4096] fp32)
  python benchmarks/bench_accumulate_stats.py --quick         # small shapes (smoke test)
  python benchmarks/bench_accumulate_stats.py --plot out.png  # also save a PNG
On a GPU the default shape list adds [16384, 14336] bf16.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import persona_kernels as pk  # noqa: E402
from persona_kernels import backends  # noqa: E402

from common import copy_bandwidth, machine, print_table, save_bar_plot, time_fn  # noqa: E402


def eager_stats(x: torch.Tensor, valid: torch.Tensor | None = None):
    """What pruning libraries do per hook call: one eager op (and pass) per statistic."""
    xf = x.reshape(-1, x.shape[-1]).float()
    if valid is not None:
        xf = xf[valid.reshape(-1)]
    var, mean = torch.var_mean(xf, 0, unbiased=False)
    return (mean, var, xf.sum(0), (xf * xf).sum(0), xf.abs().sum(0), (xf > 0).sum(0), xf.amin(0), xf.amax(0),
            xf.abs().amax(0), torch.linalg.vector_norm(xf, dim=0))


def bench_op(shapes, dtypes, device, backend_names, histogram=False):
    rows = []
    # at least 256 MiB so the copy runs from memory, not from cache
    copy_bw = copy_bandwidth(max(256 << 20, *(s[0] * s[1] * 4 for s in shapes)), device)
    for (n, c) in shapes:
        for dtype in dtypes:
            x = torch.randn(1, n, c, device=device).to(dtype)
            nbytes = x.numel() * x.element_size()
            t_eager = time_fn(lambda: eager_stats(x), device)
            rows.append(dict(shape=f"{n}x{c}", dtype=str(dtype).split(".")[-1], backend="eager multi-op",
                             ms=f"{t_eager * 1e3:.2f}", speedup="1.00", GBps=f"{nbytes / t_eager / 1e9:.1f}",
                             of_copy_bw=f"{nbytes / t_eager / copy_bw:.0%}"))
            for name in backend_names:
                if not backends.available(name, device):
                    continue
                cfg = pk.StatsConfig(histogram=histogram)
                state = pk.StatsState.empty(c, cfg, device=device)
                t = time_fn(lambda: pk.accumulate_stats(x, state, backend=name), device)
                rows.append(dict(shape=f"{n}x{c}", dtype=str(dtype).split(".")[-1],
                                 backend=f"fused {name}" + (" +hist" if histogram else ""),
                                 ms=f"{t * 1e3:.2f}", speedup=f"{t_eager / t:.2f}", GBps=f"{nbytes / t / 1e9:.1f}",
                                 of_copy_bw=f"{nbytes / t / copy_bw:.0%}"))
    return rows, copy_bw


def bench_calibration_overhead(device, quick: bool):
    from persona_kernels.calibrate import CalibrationConfig, _Collector
    from persona_kernels.sites import discover_sites
    from persona_kernels.testing import tiny_causal_lm

    size = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2) if quick else \
        dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)
    model = tiny_causal_lm("llama", **size).to(device)
    B, T = (2, 32) if quick else (8, 256)
    ids = torch.randint(4, 100, (B, T), device=device)
    mask = torch.ones(B, T, dtype=torch.long, device=device)
    with torch.inference_mode():
        t_plain = time_fn(lambda: model(input_ids=ids, attention_mask=mask, use_cache=False), device)
        col = _Collector(model, discover_sites(model), 1, CalibrationConfig(progress=False))
        col.valid, col.segments = mask.bool(), torch.zeros(B, dtype=torch.int64)
        try:
            t_hooks = time_fn(lambda: model(input_ids=ids, attention_mask=mask, use_cache=False), device)
        finally:
            col.remove()
    return dict(model=f"llama h={size['hidden_size']} L={size['num_hidden_layers']}", batch=f"{B}x{T}",
                plain_ms=f"{t_plain * 1e3:.2f}", with_stats_ms=f"{t_hooks * 1e3:.2f}", overhead=f"{t_hooks / t_plain:.2f}x")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--plot", help="save a PNG bar chart of the speed-ups here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        shapes, dtypes = [(512, 256)], [torch.float32]
    elif device.type == "cuda":
        shapes, dtypes = [(16384, 4096), (16384, 14336)], [torch.bfloat16, torch.float32]
    else:
        shapes, dtypes = [(16384, 4096), (4096, 1024)], [torch.float32, torch.bfloat16]
    names = ["cuda", "triton"] if device.type == "cuda" else ["cpp"]
    if args.quick and device.type == "cpu":
        names = ["cpp", "reference"]
    print(f"# accumulate_stats on {machine()} (torch {torch.__version__})")
    rows, copy_bw = bench_op(shapes, dtypes, device, names)
    hist_rows, _ = bench_op(shapes[:1], dtypes[:1], device, names[:1], histogram=True)
    rows += hist_rows[1:]
    print(f"measured copy bandwidth: {copy_bw / 1e9:.1f} GB/s (read + write)")
    print_table(rows, ["shape", "dtype", "backend", "ms", "speedup", "GBps", "of_copy_bw"])
    print("\n# calibration overhead (forward with statistics hooks / plain forward)")
    print_table([bench_calibration_overhead(device, args.quick)], ["model", "batch", "plain_ms", "with_stats_ms", "overhead"])
    if args.plot:
        fused = [r for r in rows if r["backend"] != "eager multi-op"]
        save_bar_plot(args.plot, [f"{r['shape']} {r['dtype']} {r['backend']}" for r in fused],
                      {"speed-up over eager": [float(r["speedup"]) for r in fused]}, "x eager", "accumulate_stats")
    return rows


if __name__ == "__main__":
    main()
