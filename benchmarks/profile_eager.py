"""Where an eager persona decode step spends its host time (run on a GPU machine).

1. Host microseconds per call (no sync inside the loop) of nn.Linear against MaskedLinear on a
   [1, 4096] input, for the dense route (50%: the cached masked weight) and the kernel route (90%).
2. cProfile of decode steps of a 4-layer model with Llama-3-8B layer shapes: plain, and persona.
4. (--compiled) decode steps of the 4-layer model compiled with mode="reduce-overhead" (inductor
   + CUDA graphs, fullgraph): dense, and persona at 90% / 50%, with the compile time.
3. (--formats) each format's dispatched call against F.linear: host µs per call, device µs per
   call back to back, and device µs replayed from a CUDA graph (no host work): a gap between
   the last two is host-bound launching, not the kernels.

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


@torch.inference_mode()
def formats_host_vs_device(device, dtype) -> list[str]:
    from persona_kernels.formats import BitmapWeight, CompactedWeight
    from persona_kernels.ops.masked_linear import masked_linear

    lines = []
    for out_f, in_f in ((1024, 4096), (14336, 4096)):
        w = torch.randn(out_f, in_f, device=device, dtype=dtype)
        x = torch.randn(1, in_f, device=device, dtype=dtype)
        g = torch.Generator().manual_seed(0)
        rows = (torch.rand(out_f, 1, generator=g) >= 0.9).expand(out_f, in_f).to(device)
        cases = {"dense F.linear": lambda: torch.nn.functional.linear(x, w),
                 "compacted 90%": (lambda f: lambda: masked_linear(x, f))(CompactedWeight.from_dense(w, rows)),
                 "bitmap 90%": (lambda f: lambda: masked_linear(x, f))(
                     BitmapWeight.from_dense(w, torch.rand(out_f, in_f, generator=g).to(device) >= 0.9))}
        for name, fn in cases.items():
            host = _host_us(fn, device, reps=500)
            line = f"{out_f}x{in_f} {name}: host {host:.1f} us/call"
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(200):
                    fn()
                end.record()
                torch.cuda.synchronize()
                back_to_back = 1000 * start.elapsed_time(end) / 200
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for _ in range(20):
                        fn()
                graph.replay()
                start.record()
                for _ in range(10):
                    graph.replay()
                end.record()
                torch.cuda.synchronize()
                line += f", device back to back {back_to_back:.1f} us, in a CUDA graph {1000 * start.elapsed_time(end) / 200:.1f} us"
            lines.append(line)
    return lines


@torch.inference_mode()
def compiled_steps(device, dtype, layers: int = 4, quick: bool = False) -> list[dict]:
    """Rows {config, ms, speedup, compile_s} (or error) of compiled decode steps."""
    import torch._dynamo

    from common import time_fn

    model = llama3_8b_shaped(layers, dtype, str(device), quick)
    ids = torch.full((1, 1), 5, dtype=torch.long, device=device)
    rows, dense = [], None
    for sparsity in (0.0, 0.9, 0.5):
        config = "dense" if not sparsity else f"persona {sparsity:.0%}"
        if sparsity:
            pm.apply(model, magnitude_masks(model, sparsity), persona="a")
        try:
            torch._dynamo.reset()
            kw = dict(mode="reduce-overhead") if device.type == "cuda" else dict(backend="aot_eager")
            step = torch.compile(model, fullgraph=True, **kw)
            t0 = time.perf_counter()
            for _ in range(3):
                step(input_ids=ids, use_cache=False)
            compile_s = time.perf_counter() - t0
            t = time_fn(lambda: step(input_ids=ids, use_cache=False).logits, device)
            dense = dense or t
            rows.append(dict(config=config, ms=1000 * t, speedup=dense / t, compile_s=compile_s))
            print(f"compiled step, {config}: {1000 * t:.3f} ms ({dense / t:.2f}x dense; compile {compile_s:.0f} s)",
                  flush=True)
        except Exception as exc:  # noqa: BLE001 - a failing configuration is a result to report
            rows.append(dict(config=config, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))
            print(f"compiled step, {config}: FAILED {rows[-1]['error']}", flush=True)
        finally:
            if sparsity:
                pm.remove(model)
    torch._dynamo.reset()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--formats", action="store_true", help="only part 3")
    ap.add_argument("--compiled", action="store_true", help="only part 4")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.compiled:
        compiled_steps(device, dtype)
        return 0
    parts = formats_host_vs_device(device, dtype) if args.formats else \
        per_call(device, dtype) + profile_steps(device, dtype, args.steps) + formats_host_vs_device(device, dtype)
    for line in parts:
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
