"""C++/OpenMP CPU kernel for accumulate_stats (csrc/cpu/accumulate_stats.cpp).

One streaming pass over the activation. The channels are split into one contiguous slice per
thread (for wide activations), each thread folds the valid rows of every chunk 8 at a time
into vectorised per-channel accumulators (each 8-row tile's exact Welford triple is
Chan-merged into the running one, on values shifted by the chunk's first valid row), and
the histogram bin of each element is found with a lookup table over the edges, finished by
float32 comparisons against the edges themselves, so the bins are exactly those of a binary
search. The partials' mean is float64 (shift + compensated mean of the shifted values).
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import _native
from ..registry import has_native, register_kernel
from .partials import Chunks, Partials, empty_partials

# Rows per chunk: a chunk's sums of squares/abs accumulate in float32 before stage 2's float64
# merge, and stage 2 (and the first-touch page faults of the partials) cost O(K * C). Measured
# on [16384, 4096] float32, 2 threads (kernel alone, best of 9): 256 rows 16.0 ms, 512 10.8,
# 1024 9.9, 2048 10.1, 4096 10.2: 1024 is as fast as the larger sizes with half the float32
# accumulation length.
ROWS_PER_CHUNK = 1024


def accumulate_stats_cpp(x: torch.Tensor, valid: torch.Tensor, sample_persona: torch.Tensor,
                       edges: Optional[torch.Tensor], num_personas: int,
                       rows_per_chunk: int = ROWS_PER_CHUNK, num_threads: Optional[int] = None,
                       hist_out: Optional[torch.Tensor] = None, **tuning) -> Partials:
    """Launcher. x: [B, T, C] contiguous, valid: [B, T] bool, sample_persona: [B] int64.

    num_threads: OpenMP threads (default: torch.get_num_threads()).
    tuning:      knobs of the C++ kernel, for benchmarks and tests (the results do not depend
                 on them beyond float rounding): min_slice (least channels per thread slice,
                 256), block (channels per block, 512), order (1: channel blocks outside the
                 row tiles), vector_hist (0: scalar histogram path), private_budget (bytes of
                 per-thread histogram copies before falling back to atomics, 256 MiB).
    """
    mod = _native.require("cpu")
    if rows_per_chunk < 1:
        raise ValueError(f"rows_per_chunk must be >= 1, got {rows_per_chunk}")
    B, T, C = x.shape
    chunks = Chunks.split(B, T, rows_per_chunk, sample_persona)
    has_hist = edges is not None
    p = empty_partials(chunks, C, x.device, (num_personas, C, edges.numel() - 1) if has_hist else None,
                       mean_dtype=torch.float64, hist_out=hist_out)
    edges_arg = edges.to(device=x.device, dtype=torch.float32).contiguous() if has_hist else None
    mod.accumulate_stats_partials(
        x, valid, chunks.start, chunks.length, chunks.persona, edges_arg, p.hist,
        p.sum, p.mean, p.m2, p.sumsq, p.sumabs, p.pos, p.min, p.max, p.absmax,
        num_threads=-1 if num_threads is None else int(num_threads), **tuning,
    )
    return p


if has_native("accumulate_stats_partials"):
    register_kernel("accumulate_stats", "cpp")(accumulate_stats_cpp)
