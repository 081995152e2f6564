"""The measuring half of the GPU suite (benchmarks/gpu_suite.sh): ceilings, every kernel at
Llama-3-8B layer shapes in bf16, end-to-end decode with and without CUDA graphs.

Writes under --out: gpu_results.json (every row, the ceilings, the machine), gpu_table.md (the
summary RESULTS.md takes), crossover_gpu.json (entries in crossover.json's format, for
``--merge-crossover``), and prints the short table last. Each section runs inside a time budget;
a section that fails or runs out of time is reported as such and the others still run.

--dry (GPU_SUITE_DRY=1): tiny shapes on the CPU, Triton through the interpreter, host timers;
the same code paths, so `make test` keeps the script from rotting between GPU sessions.

  python benchmarks/gpu_bench.py --out /tmp/gpu            # on the GPU machine
  python benchmarks/gpu_bench.py --dry --out /tmp/gpu-dry  # anywhere
  python benchmarks/gpu_bench.py --merge-crossover crossover_gpu.json   # here, after a GPU run
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # the benchmarks, and the package built in place (no install)
import bench_accumulate_stats  # noqa: E402
import bench_induce_neurons  # noqa: E402
import bench_masked_linear  # noqa: E402
import profile_eager  # noqa: E402
from bench_e2e_decode import llama3_8b_shaped  # noqa: E402

from persona_kernels import model as pm  # noqa: E402
from persona_kernels.app.bench import magnitude_masks  # noqa: E402
from persona_kernels.ops.masked_linear import dispatch  # noqa: E402

from common import copy_bandwidth, machine, time_fn  # noqa: E402


def plan(dry: bool) -> dict:
    """Shapes and settings: the full GPU plan, or tiny ones for the CPU dry run."""
    if dry:
        return dict(device="cpu", dtype=torch.float32, copy_bytes=8 << 20, gemm=256, stats_shapes=[(512, 256)],
                    stats_backends=["cpp", "reference"], ml_backends=["cpp"], ml_shapes=[(64, 128)], sparsities=[0.5, 0.9], batches=[1, 16],
                    induce_shapes=[(16, 256)], e2e_layers=1, e2e_quick=True, e2e_tokens=4, e2e_sparsities=[0.7])
    return dict(device="cuda", dtype=torch.bfloat16, copy_bytes=1 << 30, gemm=8192,
                stats_shapes=[(16384, 4096), (16384, 14336)], stats_backends=["cuda", "triton"], ml_backends=None,
                ml_shapes=bench_masked_linear.LLAMA3_8B, sparsities=[0.3, 0.5, 0.7, 0.9], batches=[1, 4, 16, 64],
                induce_shapes=[(1, 14336), (16, 14336), (2048, 14336)], e2e_layers=4, e2e_quick=False, e2e_tokens=64,
                e2e_sparsities=[0.5, 0.7, 0.9])


def ceilings(p: dict) -> dict:
    dev = torch.device(p["device"])
    copy = copy_bandwidth(p["copy_bytes"], dev)
    n = p["gemm"]
    a = torch.randn(n, n, device=dev, dtype=p["dtype"])
    b = torch.randn(n, n, device=dev, dtype=p["dtype"])
    t = time_fn(lambda: a @ b, dev)
    return {"copy_GBps": copy / 1e9, "gemm_TFLOPs": 2 * n ** 3 / t / 1e12, "gemm_shape": n, "dtype": str(p["dtype"])}


def accumulate(p: dict) -> list[dict]:
    rows, _ = bench_accumulate_stats.bench_op(p["stats_shapes"], [p["dtype"]], torch.device(p["device"]), p["stats_backends"])
    return rows


def masked_linear(p: dict, deadline: float, dispatched_only: bool = False) -> list[dict]:
    """Every format and kernel, or (``dispatched_only``) only the dispatched path against dense."""
    wanted = ["-"] if dispatched_only else p["ml_backends"]  # '-' matches no kernel: 'auto' and 'torch' only
    return bench_masked_linear.run(p["ml_shapes"], p["sparsities"], p["batches"], p["dtype"], p["device"], wanted,
                                   formats=["bitmap", "shared_bitmask", "compacted", "block"], dispatched=True,
                                   log=lambda *a: print(*a, flush=True), deadline=deadline)


def profile_accumulate(p: dict) -> list[dict]:
    """Where one accumulate_stats call's device time goes, per backend: the profiler's kernels
    (name, calls, total us), largest first."""
    from torch.profiler import ProfilerActivity, profile

    import persona_kernels as pk

    dev = torch.device(p["device"])
    n, c = p["stats_shapes"][0]
    x = torch.randn(1, n, c, device=dev).to(p["dtype"])
    rows = []
    for name in p["stats_backends"]:
        state = pk.StatsState.empty(c, pk.StatsConfig(), device=dev)
        for _ in range(2):
            pk.accumulate_stats(x, state, backend=name)
        sync_all = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)  # noqa: E731
        sync_all()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            pk.accumulate_stats(x, state, backend=name)
            sync_all()
        attr = "device_time_total" if dev.type == "cuda" else "cpu_time_total"
        events = sorted(prof.key_averages(), key=lambda e: -getattr(e, attr, 0.0))
        top = [{"name": e.key[:90], "calls": e.count, "us": round(getattr(e, attr, 0.0), 1)} for e in events[:12]]
        rows.append({"backend": name, "shape": f"{n}x{c}", "top": top})
        print(f"[profile accumulate_stats {name} {n}x{c}]")
        for t in top:
            print(f"  {t['us']:>10.1f} us  x{t['calls']:<4} {t['name']}")
    return rows


def bitmap_knobs(p: dict) -> list[dict]:
    """The bitmap CUDA kernel's launch knobs at decode batches, for tuning its heuristics."""
    from persona_kernels import _native
    from persona_kernels.formats import BitmapWeight
    from persona_kernels.ops.masked_linear.cuda import bitmap_linear_config

    mod = _native.load("cuda") if p["device"] == "cuda" else None
    if mod is None:
        return []
    dev = torch.device("cuda")
    rows = []
    for (o, i) in [(14336, 4096), (4096, 14336)]:
        w = torch.randn(o, i, dtype=p["dtype"], device=dev)
        t_dense = {}
        for s in (0.5, 0.7, 0.9):
            keep = torch.rand(o, i, device=dev) >= s
            fmt = BitmapWeight.from_dense(w, keep)
            for b in (1, 4):
                x = torch.randn(b, i, dtype=p["dtype"], device=dev)
                if b not in t_dense:
                    t_dense[b] = time_fn(lambda: torch.nn.functional.linear(x, w), dev)
                y = torch.empty(b, o, dtype=p["dtype"], device=dev)
                for threads in (0, 128, 256, 512):
                    for rpp in (0, 1):
                        if rpp and b == 1:
                            continue
                        run = lambda: mod.bitmap_linear(x, fmt.values, fmt.bitmap, fmt.row_ptr, None, y, rpp, threads, False)  # noqa: E731
                        t = time_fn(run, dev)
                        cfg = bitmap_linear_config(x, fmt, rpp, threads)
                        r = {"shape": f"{o}x{i}", "sparsity": s, "batch": b, "threads": threads, "rows_per_pass": rpp,
                             "us": round(t * 1e6, 2), "dense_us": round(t_dense[b] * 1e6, 2),
                             "of_ideal": round((t_dense[b] / t) / (w.numel() * w.element_size() / fmt.nbytes()), 3),
                             "cfg": {k: cfg[k] for k in ("threads", "rows_per_pass", "x_mode", "grid", "blocks_per_sm")}}
                        rows.append(r)
                        print(f"[bitmap knobs] {r}", flush=True)
    return rows


def compacted_probe(p: dict) -> list[dict]:
    """Where the compacted 'torch' route's time goes at decode batches: the GEMM on the kept rows
    (and on them padded to a multiple of 8), the zero fill and the index_copy_, each alone."""
    dev = torch.device(p["device"])
    rows = []
    for (o, i) in p["ml_shapes"]:
        for s in p["sparsities"]:
            keep = max(1, int(round(o * (1 - s))))
            pad = -(-keep // 8) * 8
            w = torch.randn(pad, i, dtype=p["dtype"], device=dev)
            idx = torch.arange(keep, device=dev)
            for b in (1, 16):
                x = torch.randn(b, i, dtype=p["dtype"], device=dev)
                y = torch.empty(b, o, dtype=p["dtype"], device=dev)
                yc = torch.nn.functional.linear(x, w[:keep])
                r = {"shape": f"{o}x{i}", "sparsity": s, "batch": b, "kept": keep,
                     "gemm_us": time_fn(lambda: torch.nn.functional.linear(x, w[:keep]), dev) * 1e6,
                     "gemm_padded_us": time_fn(lambda: torch.nn.functional.linear(x, w), dev) * 1e6,
                     "zero_us": time_fn(lambda: y.zero_(), dev) * 1e6,
                     "index_copy_us": time_fn(lambda: y.index_copy_(1, idx, yc), dev) * 1e6}
                rows.append({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()})
                print(f"[compacted probe] {rows[-1]}", flush=True)
    return rows


def induce(p: dict, copy_GBps: float) -> list[dict]:
    return bench_induce_neurons.bench_op(p["induce_shapes"], p["dtype"], torch.device(p["device"]), copy_GBps * 1e9)


@torch.inference_mode()
def step_times(model, dev: torch.device, graphs: bool) -> float:
    """Seconds per decode step of 1 token at batch 1 without a KV cache (the weight-streaming part
    of a step), eagerly or replayed from a CUDA graph captured once."""
    ids = torch.full((1, 1), 5, dtype=torch.long, device=dev)
    run = lambda: model(input_ids=ids, use_cache=False).logits  # noqa: E731
    if not graphs:
        return time_fn(run, dev)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return time_fn(graph.replay, dev)


def e2e(p: dict) -> list[dict]:
    from persona_kernels.app.bench import decode_tokens_per_s

    dev = torch.device(p["device"])
    model = llama3_8b_shaped(p["e2e_layers"], p["dtype"], p["device"], p["e2e_quick"])
    rows = []
    dense = {"tok_s": decode_tokens_per_s(model, p["e2e_tokens"], device=dev, reps=3), "step": step_times(model, dev, False)}
    if dev.type == "cuda":
        dense["step_graph"] = step_times(model, dev, True)
    rows.append({"sparsity": 0.0, "format": "dense", **dense})
    for s in p["e2e_sparsities"]:
        store = magnitude_masks(model, s)
        for fuse in (True, False):  # fused q/k/v and gate/up persona weights (apply's default), and separate layers
            pm.apply(model, store, persona=store.personas[0], fuse=fuse)
            try:
                r = {"sparsity": s, "format": "persona (auto)" if fuse else "persona (auto, unfused)",
                     "tok_s": decode_tokens_per_s(model, p["e2e_tokens"], device=dev, reps=3), "step": step_times(model, dev, False)}
                if dev.type == "cuda":
                    try:
                        r["step_graph"] = step_times(model, dev, True)
                    except Exception as exc:  # noqa: BLE001 - a capture failure is a result to report
                        r["graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
            finally:
                pm.remove(model)
            rows.append(r)
    for r in rows:
        r["speedup_tok_s"] = r["tok_s"] / dense["tok_s"]
        r["speedup_step"] = dense["step"] / r["step"]
        if "step_graph" in r and "step_graph" in dense:
            r["speedup_step_graph"] = dense["step_graph"] / r["step_graph"]
    return rows


def gpu_crossover(rows: list[dict], dtype: torch.dtype, device_cls: str) -> dict:
    worst = 0.97 if device_cls != "cpu" else 0.9  # CUDA-event medians are steadier than a small CPU's clock
    return {device_cls: {dispatch.table_key(k, dtype): v for k, v in bench_masked_linear.crossover(rows, worst=worst).items()}}


def summary(res: dict) -> str:
    """The markdown table RESULTS.md takes: one line per kernel family, best and worst cases."""
    lines = [f"GPU suite on {res['machine']} ({res['date']}, torch {res['torch']}, triton {res['triton']})", ""]
    c = res.get("ceilings") or {}
    if c:
        lines.append(f"ceilings: copy {c['copy_GBps']:.0f} GB/s (read + write), {c['dtype']} GEMM {c['gemm_TFLOPs']:.0f} TFLOP/s "
                     f"({c['gemm_shape']}^3)")
        lines.append("")
    lines += ["| kernel | setting | result |", "|---|---|---|"]
    for r in res.get("accumulate_stats") or []:
        if r["backend"] != "eager multi-op":
            lines.append(f"| accumulate_stats {r['backend']} | {r['shape']} {r['dtype']} | {r['ms']} ms, "
                         f"{r['GBps']} GB/s = {r['of_copy_bw']} of copy, {r['speedup']}x eager |")
    ml = res.get("masked_linear") or []
    for fmt in ("bitmap", "compacted", "shared_bitmask", "block"):
        for b in sorted({r["batch"] for r in ml}):
            sel = [r for r in ml if r["format"] == fmt and r["batch"] == b and r["backend"] not in ("auto", "torch")]
            if not sel:
                continue
            best = {}
            for r in sel:  # the best kernel per (shape, sparsity)
                k = (r["shape"], r["sparsity"])
                if k not in best or r["speedup"] > best[k]["speedup"]:
                    best[k] = r
            parts = [f"{r['sparsity']:.0%}: {r['speedup']:.2f}x ({r['of_ideal']:.0%} of ideal, {r['backend']})"
                     for r in sorted(best.values(), key=lambda r: r["sparsity"]) if r["shape"] == sel[0]["shape"]]
            lines.append(f"| masked_linear {fmt} | {sel[0]['shape']} batch {b} | {'; '.join(parts)} |")
    auto = [r for r in ml if r["backend"] == "auto"]
    for b in sorted({r["batch"] for r in auto}):
        worst = min((r for r in auto if r["batch"] == b), key=lambda r: r["speedup"])
        lines.append(f"| masked_linear dispatched (worst) | batch {b} | {worst['speedup']:.2f}x dense "
                     f"({worst['format']} {worst['shape']} {worst['sparsity']:.0%} -> {worst.get('route')}) |")
    for r in res.get("induce_neurons") or []:
        lines.append(f"| induce_neurons {r['backend']} act={r['act']} | {r['shape']} {r['dtype']} | {r['ms']} ms, "
                     f"{r['of_copy_bw']} of copy, {r['speedup']}x eager |")
    for r in res.get("calibration") or []:
        lines.append(f"| calibration hooks (accumulate_stats in a forward) | {r['model']} batch {r['batch']} | "
                     f"{r['plain_ms']} ms plain, {r['with_stats_ms']} ms with statistics: {r['overhead']} |")
    for r in res.get("e2e") or []:
        graph = f", graph step {r['step_graph'] * 1e3:.3f} ms ({r.get('speedup_step_graph', 1.0):.2f}x)" if "step_graph" in r else \
            (f", graph capture failed: {r['graph_error']}" if "graph_error" in r else "")
        lines.append(f"| e2e decode {r['format']} | {r['sparsity']:.0%} | {r['tok_s']:.1f} tok/s ({r['speedup_tok_s']:.2f}x), "
                     f"step {r['step'] * 1e3:.3f} ms ({r['speedup_step']:.2f}x){graph} |")
    for r in res.get("compiled") or []:
        lines.append(f"| compiled decode step (reduce-overhead) | {r['config']} | " +
                     (f"FAILED: {r['error']} |" if "error" in r else
                      f"{r['ms']:.3f} ms ({r['speedup']:.2f}x dense), compile {r['compile_s']:.0f} s |"))
    if res.get("crossover"):
        lines += ["", f"crossover: {json.dumps(res['crossover'], sort_keys=True)}"]
    for name, err in (res.get("errors") or {}).items():
        lines.append(f"\n**{name} failed**: {err.splitlines()[-1] if err else ''}")
    return "\n".join(lines)


def merge_crossover(path: str) -> None:
    """Fold a run's crossover_gpu.json into the package's crossover.json (atomically)."""
    with open(path) as f:
        new = json.load(f)
    target = dispatch.store_entries(new)
    print(f"merged {sum(len(v) for v in new.values())} entries into {target}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-suite-out"))
    ap.add_argument("--dry", action="store_true", default=os.environ.get("GPU_SUITE_DRY", "0") == "1")
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("GPU_BENCH_BUDGET_S", 240)),
                    help="sections not started by then are skipped (and listed)")
    ap.add_argument("--merge-crossover", help="merge this crossover_gpu.json into crossover.json and exit")
    ap.add_argument("--sections", default=os.environ.get("GPU_BENCH_SECTIONS", ""),
                    help="comma-separated sections to run (default: all): ceilings, accumulate_stats, induce_neurons, "
                         "e2e, compiled, calibration, compacted_probe, profile_accumulate_stats, bitmap_knobs, masked_linear")
    ap.add_argument("--dispatched-only", action="store_true", default=os.environ.get("GPU_BENCH_DISPATCHED_ONLY", "0") == "1",
                    help="masked_linear: time only the dispatched path (and 'torch') against dense")
    args = ap.parse_args(argv)
    if args.merge_crossover:
        merge_crossover(args.merge_crossover)
        return 0
    if not args.dry and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device; use --dry (GPU_SUITE_DRY=1) for the CPU dry run", file=sys.stderr)
        return 2
    p = plan(args.dry)
    os.makedirs(args.out, exist_ok=True)
    import triton

    res = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "triton": triton.__version__,
           "dry": args.dry, "errors": {}, "skipped": []}
    start = time.perf_counter()

    chosen = {x.strip() for x in args.sections.split(",") if x.strip()}

    def section(name, fn):
        if chosen and name not in chosen:
            return None
        if time.perf_counter() - start > args.budget_s:
            res["skipped"].append(name)
            print(f"[gpu_bench] {name}: skipped (time budget {args.budget_s:.0f} s spent)", flush=True)
            return None
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception:  # noqa: BLE001 - one broken section must not lose the others
            res["errors"][name] = traceback.format_exc()
            print(f"[gpu_bench] {name}: FAILED\n{res['errors'][name]}", flush=True)
            return None
        print(f"[gpu_bench] {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        return out

    # masked_linear last: it is the largest section and stops at the budget's end, keeping what it measured
    res["ceilings"] = section("ceilings", lambda: ceilings(p))
    res["accumulate_stats"] = section("accumulate_stats", lambda: accumulate(p))
    copy = (res["ceilings"] or {}).get("copy_GBps", 1.0)
    res["induce_neurons"] = section("induce_neurons", lambda: induce(p, copy))
    res["e2e"] = section("e2e", lambda: e2e(p))
    res["compiled"] = section("compiled", lambda: profile_eager.compiled_steps(
        torch.device(p["device"]), p["dtype"], p["e2e_layers"], p["e2e_quick"]))
    res["calibration"] = section("calibration", lambda: [bench_accumulate_stats.bench_calibration_overhead(
        torch.device(p["device"]), quick=p["device"] == "cpu")])
    res["compacted_probe"] = section("compacted_probe", lambda: compacted_probe(p))
    res["profile_accumulate_stats"] = section("profile_accumulate_stats", lambda: profile_accumulate(p))
    res["bitmap_knobs"] = section("bitmap_knobs", lambda: bitmap_knobs(p))
    res["masked_linear"] = section("masked_linear", lambda: masked_linear(p, start + args.budget_s, args.dispatched_only))
    if res["masked_linear"] and not args.dispatched_only:  # the crossover needs the kernels' own rows
        res["crossover"] = gpu_crossover(res["masked_linear"], p["dtype"], dispatch.device_class(torch.device(p["device"])))
        with open(os.path.join(args.out, "crossover_gpu.json"), "w") as f:
            json.dump(res["crossover"], f, indent=2, sort_keys=True)
    with open(os.path.join(args.out, "gpu_results.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    text = summary(res)
    with open(os.path.join(args.out, "gpu_table.md"), "w") as f:
        f.write(text + "\n")
    print("\n" + text)
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
