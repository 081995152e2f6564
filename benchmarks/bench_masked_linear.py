"""Benchmark: masked_linear formats vs dense F.linear on Llama-3-8B layer shapes.

For every (layer shape, sparsity, batch, format/backend): time, speed-up over dense
F.linear measured in the same run, the ideal speed-up from bytes (dense weight bytes over the
format's bytes; for the bitmap at bf16 that is 16 / (16 d + 1)), the fraction of that ideal
reached, the bytes per second each kernel streams (the format's bytes over its time: the dense
baseline itself may be far from the memory roof, e.g. MKL sgemv at batch 1 on a small VM), and
memory per persona. ``--write-crossover`` stores, per format, the largest batch
at which the sparse kernel still beats dense (the dispatcher's table for this device class).

  python benchmarks/bench_masked_linear.py --quick
  python benchmarks/bench_masked_linear.py --shapes 14336x4096 --batches 1,4,16 --plot ml.png
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from persona_kernels.formats import BitmapWeight, BlockSparseWeight, CompactedWeight, SharedBitmask  # noqa: E402
from persona_kernels.masks.methods import block_mask, select  # noqa: E402
from persona_kernels.ops.masked_linear import (  # noqa: E402
    available_backends,
    dispatch,  # noqa: E402
    masked_linear,
)

from common import machine, print_table, save_bar_plot, time_fn  # noqa: E402

LLAMA3_8B = [(14336, 4096), (4096, 14336), (4096, 4096), (1024, 4096)]  # [out, in]: up/gate, down, q/o, k/v


def make_formats(w: torch.Tensor, sparsity: float, device):
    g = torch.Generator().manual_seed(0)
    score = w.float().abs().cpu() * (1 + 0.05 * torch.rand(w.shape, generator=g))
    mask = select(score, sparsity).to(device)
    out = {"bitmap": BitmapWeight.from_dense(w, mask), "shared_bitmask": SharedBitmask.from_dense(w, mask.unsqueeze(0))}
    # neuron-structured mask at the same density: whole output rows removed
    keep_rows = torch.zeros(w.shape[0], dtype=torch.bool, device=device)
    keep_rows[: int(round(w.shape[0] * (1 - sparsity)))] = True
    out["compacted"] = CompactedWeight.from_dense(w, keep_rows[:, None].expand_as(w).contiguous())
    if w.shape[0] % 16 == 0 and w.shape[1] % 16 == 0:  # 16x16 blocks of the same scores
        out["block"] = BlockSparseWeight.from_dense(w, block_mask(score, (16, 16), sparsity).to(device).unsqueeze(0), (16, 16))
    return out


def run(shapes, sparsities, batches, dtype, device, backends_wanted=None, log=print, formats=None, dispatched=False,
        deadline=None):
    """Rows per (shape, sparsity, batch, format, backend); ``dispatched`` adds backend 'auto' (the
    dispatcher's route, what a persona model runs) for each format. ``deadline`` (a
    time.perf_counter() value): the (shape, sparsity) cases not started by then are left out
    and logged, so a time-boxed GPU run keeps what it measured."""
    rows = []
    for (o, i) in shapes:
        w = torch.randn(o, i, dtype=dtype, device=device)
        dense_bytes = w.numel() * w.element_size()
        for s in sparsities:
            if deadline is not None and time.perf_counter() > deadline:
                log(f"{o}x{i} s={s:.0%}: left out (time budget spent)")
                continue
            fmts = make_formats(w, s, device)
            for b in batches:
                x = torch.randn(b, i, dtype=dtype, device=device)
                t_dense = time_fn(lambda: F.linear(x, w), torch.device(device))
                for name, fmt in fmts.items():
                    if formats and name not in formats:
                        continue
                    names = available_backends(fmt, torch.device(device)) + (["auto"] if dispatched else [])
                    for backend in names:
                        if backend == "reference":
                            continue  # the reference re-densifies: not a kernel worth timing
                        if backends_wanted and backend not in backends_wanted and backend not in ("torch", "auto"):
                            continue
                        multi = name in ("shared_bitmask", "block")
                        t = time_fn(lambda: masked_linear(x, fmt, persona=0 if multi else None,
                                                          backend=backend), torch.device(device))
                        ideal = dense_bytes / fmt.nbytes()
                        rows.append(dict(shape=f"{o}x{i}", sparsity=s, batch=b, format=name, backend=backend,
                                         ms=t * 1e3, dense_ms=t_dense * 1e3, speedup=t_dense / t, ideal=ideal,
                                         of_ideal=(t_dense / t) / ideal, GBps=fmt.nbytes() / t / 1e9,
                                         dense_GBps=dense_bytes / t_dense / 1e9,
                                         persona_MB=(fmt.persona_nbytes() if name == "shared_bitmask" else fmt.nbytes()) / 2**20))
                        if backend == "auto":
                            rows[-1]["route"] = dispatch.choose(fmt, x, mixed=False)
                        log(f"{o}x{i} s={s:.0%} b={b} {name}/{backend}: {t * 1e3:.3f} ms, dense {t_dense * 1e3:.3f} ms, "
                            f"{t_dense / t:.2f}x (ideal {ideal:.2f}x)")
    return rows


def crossover(rows, worst: float = 0.9) -> dict:
    """Per format: the largest batch up to which its best sparse kernel beats the fallback
    (geometric-mean speed-up over the measured shapes > 1) and is nowhere more than 1/``worst``
    slower (single-run noise on a small machine is about 5-10%), over the sparsities at or above
    ``min_sparsity``: the lowest measured sparsity from which on the kernel wins at batch 1 (at
    least 50%). Below it, or above the batch, the dispatcher runs the fallback: dense F.linear, or
    for compacted weights the 'torch' GEMM on the compact weight."""
    fallback_ms = {(r["shape"], r["sparsity"], r["batch"]): r["ms"] for r in rows
                   if r["format"] == "compacted" and r["backend"] == "torch"}

    def ratio(r):  # fallback time / kernel time
        base = fallback_ms.get((r["shape"], r["sparsity"], r["batch"])) if r["format"] == "compacted" else r["dense_ms"]
        return None if base is None else base / r["ms"]

    def wins(sel, backend, batch, min_s):
        ratios = [ratio(r) for r in sel if r["batch"] == batch and r["backend"] == backend and r["sparsity"] >= min_s]
        ratios = [q for q in ratios if q is not None]
        return bool(ratios) and math.prod(ratios) ** (1 / len(ratios)) > 1.0 and min(ratios) >= worst

    table = {}
    for fmt in sorted({r["format"] for r in rows}):
        sel = [r for r in rows if r["format"] == fmt and r["sparsity"] >= 0.5 and r["backend"] not in ("torch", "reference", "auto")]
        if not sel:
            continue
        best_backend = max(sel, key=lambda r: r["speedup"])["backend"]
        batches = sorted({r["batch"] for r in sel})
        min_s = next((s for s in sorted({r["sparsity"] for r in sel}) if wins(sel, best_backend, batches[0], s)), None)
        max_b = 0
        for b in batches if min_s is not None else ():
            if not wins(sel, best_backend, b, min_s):
                break
            max_b = b
        entry = {"max_batch": max_b, "backend": best_backend}
        if max_b and min_s > 0.5:
            entry["min_sparsity"] = min_s
        table[fmt] = entry
    return table


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes and few settings (smoke run)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--shapes", help="comma-separated OUTxIN (default: Llama-3-8B layers)")
    ap.add_argument("--sparsities", default="0.3,0.5,0.7,0.9")
    ap.add_argument("--batches", default="1,4,16,64,512")
    ap.add_argument("--backends", help="comma-separated backends to time (default: all available)")
    ap.add_argument("--formats", help="comma-separated formats to time (default: bitmap,shared_bitmask,compacted)")
    ap.add_argument("--plot", help="save a PNG of speed-up vs sparsity at batch 1")
    ap.add_argument("--json", help="write all rows as JSON here")
    ap.add_argument("--write-crossover", action="store_true", help="store the measured crossover for this device class")
    args = ap.parse_args(argv)
    device = args.device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    if args.quick:
        shapes, sparsities, batches = [(256, 512)], [0.5, 0.9], [1, 16]
    else:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else LLAMA3_8B
        sparsities = [float(s) for s in args.sparsities.split(",")]
        batches = [int(b) for b in args.batches.split(",")]
    print(f"# masked_linear on {machine()} (torch {torch.__version__}, {dtype})")
    rows = run(shapes, sparsities, batches, dtype, device, args.backends.split(",") if args.backends else None,
               formats=args.formats.split(",") if args.formats else None)
    table = [{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
    print_table(table, ["shape", "sparsity", "batch", "format", "backend", "ms", "dense_ms", "speedup", "ideal",
                        "of_ideal", "GBps", "dense_GBps", "persona_MB"])
    cross = crossover(rows)
    print(f"\ncrossover (largest batch where the sparse kernel beats the dispatcher's fallback at sparsity >= 50%): {cross}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.write_crossover:
        cls = dispatch.device_class(torch.device(device))
        # entries for the measured dtype only
        path = dispatch.store_entries({cls: {dispatch.table_key(kind, dtype): e for kind, e in cross.items()}})
        print(f"crossover written to {path}")
    if args.plot:
        b1 = [r for r in rows if r["batch"] == batches[0]]
        labels = sorted({f"{r['shape']} {r['sparsity']:.0%}" for r in b1})
        series = {}
        for r in b1:
            series.setdefault(f"{r['format']}/{r['backend']}", {})[f"{r['shape']} {r['sparsity']:.0%}"] = r["speedup"]
        save_bar_plot(args.plot, labels, {k: [v.get(lbl, 0) for lbl in labels] for k, v in series.items()},
                      "x dense", f"masked_linear speed-up, batch {batches[0]}")
    return rows


if __name__ == "__main__":
    main()
