"""Shared timing, table and plot helpers for the benchmark scripts."""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Sequence

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_FLUSH: dict = {}


def flush_cache(device: torch.device) -> None:
    """Overwrite a buffer larger than the last-level cache (64 MiB on this CPU's 32 MiB L3,
    256 MiB against a GPU's L2): in a real decode step the other layers' weights have evicted
    this layer's, so a kernel timed with a warm cache would look faster than it is."""
    key = (device.type, device.index)
    if key not in _FLUSH:
        with torch.inference_mode(False):  # a normal tensor, whatever mode the first caller runs in
            _FLUSH[key] = torch.empty((256 if device.type == "cuda" else 64) * 2**20 // 4, dtype=torch.float32, device=device)
    _FLUSH[key].fill_(1.0)
    sync(device)


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 2, reps: int = 7, min_time: float = 0.05,
            cold: bool = True) -> float:
    """Median seconds per call (at least ``reps`` timed calls, more until ``min_time`` has passed).

    ``cold``: flush the caches before each timed call (see flush_cache). On a GPU the timing is
    triton.testing.do_bench's: CUDA events around each call, the L2 cleared (a 256 MiB buffer
    zeroed) before each, the median; a host clock would add ~10 us of launch and sync per call.
    """
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=10, rep=max(20, int(min_time * 1e3)), return_mode="median") * 1e-3
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start) < min_time and len(times) < 200:
        if cold:
            flush_cache(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(nbytes: int, device: torch.device) -> float:
    """Measured device copy bandwidth in bytes/s (read + write) on a buffer of ``nbytes``."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / t


def read_bandwidth(nbytes: int, device: torch.device) -> float:
    """Measured read-only bandwidth in bytes/s (a sum over a buffer of ``nbytes``): the ideal of
    a GEMV, which reads its weight once and writes almost nothing."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    return src.numel() * 4 / time_fn(lambda: src.sum(), device)


def print_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    text = "\n".join(lines)
    print(text)
    return text


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import platform

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def save_bar_plot(path: str, labels: Sequence[str], series: dict[str, Sequence[float]], ylabel: str, title: str) -> bool:
    """Grouped bar chart to PNG; returns False (with a message) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install persona-kernels[plot]); no plot written")
        return False
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels)), 4))
    width = 0.8 / max(1, len(series))
    for i, (name, vals) in enumerate(series.items()):
        ax.bar([j + i * width for j in range(len(labels))], vals, width, label=name)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot written to {path}")
    return True
