"""Triton kernel for accumulate_stats: one read of each activation element.

Grid: (chunk, channel block). A program streams the rows of one chunk through registers in
[BLOCK_T, BLOCK_C] tiles; each tile's Welford triple is exact (its mean and centred squares
come from the tile in registers), and tiles fold into the running triple with Chan's merge.
The running mean is kept as shift + offset (shift = the first tile's max): with a large
common offset (|mean| >> std) a plain float32 running mean would round away the deltas the
merge needs, while x - shift is exact and small.
The histogram bin of each element is found by a fixed-step binary search over the edges and
counted with an atomic add (only compiled in when a histogram is asked for).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ..registry import register_kernel
from .partials import Chunks, Partials, empty_partials

ROWS_PER_CHUNK = 1024


@triton.jit
def _accumulate_stats_kernel(
    x_ptr, valid_ptr, start_ptr, length_ptr, persona_ptr, edges_ptr, hist_ptr,
    sum_ptr, mean_ptr, m2_ptr, sumsq_ptr, sumabs_ptr, pos_ptr, min_ptr, max_ptr, absmax_ptr,
    C, stride_x, num_edges,
    HAS_HIST: tl.constexpr, SEARCH_STEPS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    k = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    start = tl.load(start_ptr + k)
    length = tl.load(length_ptr + k)
    persona = tl.load(persona_ptr + k)
    offs_t = tl.arange(0, BLOCK_T)

    n = tl.zeros((), dtype=tl.float32)
    shift = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mu = tl.zeros((BLOCK_C,), dtype=tl.float32)  # running mean - shift
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    s = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sq = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sa = tl.zeros((BLOCK_C,), dtype=tl.float32)
    pos = tl.zeros((BLOCK_C,), dtype=tl.int32)
    mn = tl.full((BLOCK_C,), float("inf"), dtype=tl.float32)
    mx = tl.full((BLOCK_C,), float("-inf"), dtype=tl.float32)
    amx = tl.zeros((BLOCK_C,), dtype=tl.float32)

    for t0 in range(0, length, BLOCK_T):
        rows = start + t0 + offs_t
        rmask = (t0 + offs_t) < length
        rvalid = (tl.load(valid_ptr + rows, mask=rmask, other=0) != 0) & rmask
        m = rvalid[:, None] & cmask[None, :]
        xt = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)

        nt = tl.sum(rvalid.to(tl.float32), axis=0)
        tsum = tl.sum(xt, axis=0)
        tmax = tl.max(tl.where(m, xt, float("-inf")), axis=0)
        shift = tl.where((n == 0) & (nt > 0), tmax, shift)
        xs = tl.where(m, xt - shift[None, :], 0.0)
        tmean = tl.sum(xs, axis=0) / tl.maximum(nt, 1.0)
        d = tl.where(m, xs - tmean[None, :], 0.0)
        tm2 = tl.sum(d * d, axis=0)
        n_new = n + nt
        frac = nt / tl.maximum(n_new, 1.0)
        delta = tmean - mu
        mu = mu + delta * frac
        m2 = m2 + tm2 + delta * delta * n * frac
        n = n_new

        ax = tl.abs(xt)
        s += tsum
        sq += tl.sum(xt * xt, axis=0)
        sa += tl.sum(ax, axis=0)
        pos += tl.sum((m & (xt > 0)).to(tl.int32), axis=0)
        mn = tl.minimum(mn, tl.min(tl.where(m, xt, float("inf")), axis=0))
        mx = tl.maximum(mx, tmax)
        amx = tl.maximum(amx, tl.max(ax, axis=0))

        if HAS_HIST:
            # count of edges strictly below x; bin = that - 1, clamped to the open outer bins
            lo = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.int32)
            hi = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.int32) + num_edges
            for _ in tl.static_range(SEARCH_STEPS):
                active = lo < hi
                mid = (lo + hi) // 2
                e = tl.load(edges_ptr + mid, mask=active, other=0.0)
                right = e < xt
                lo = tl.where(active & right, mid + 1, lo)
                hi = tl.where(active & (~right), mid, hi)
            b = tl.minimum(tl.maximum(lo - 1, 0), num_edges - 2)
            hoff = (persona * C + cols[None, :]).to(tl.int64) * (num_edges - 1) + b
            tl.atomic_add(hist_ptr + hoff, tl.full((BLOCK_T, BLOCK_C), 1, tl.int32), mask=m)

    out = k.to(tl.int64) * C + cols
    tl.store(sum_ptr + out, s, mask=cmask)
    tl.store(mean_ptr + out, shift.to(tl.float64) + mu.to(tl.float64), mask=cmask)
    tl.store(m2_ptr + out, m2, mask=cmask)
    tl.store(sumsq_ptr + out, sq, mask=cmask)
    tl.store(sumabs_ptr + out, sa, mask=cmask)
    tl.store(pos_ptr + out, pos, mask=cmask)
    tl.store(min_ptr + out, mn, mask=cmask)
    tl.store(max_ptr + out, mx, mask=cmask)
    tl.store(absmax_ptr + out, amx, mask=cmask)


@register_kernel("accumulate_stats", "triton")
def accumulate_stats_triton(x: torch.Tensor, valid: torch.Tensor, sample_persona: torch.Tensor,
                          edges: Optional[torch.Tensor], num_personas: int,
                          rows_per_chunk: int = ROWS_PER_CHUNK, block_t: int = 32, block_c: int = 64,
                          hist_out: Optional[torch.Tensor] = None) -> Partials:
    """Launcher. x: [B, T, C] contiguous, valid: [B, T] bool, sample_persona: [B] int64."""
    B, T, C = x.shape
    chunks = Chunks.split(B, T, rows_per_chunk, sample_persona)
    x2 = x.view(B * T, C)
    has_hist = edges is not None
    p = empty_partials(chunks, C, x.device, (num_personas, C, edges.numel() - 1) if has_hist else None, mean_dtype=torch.float64,
                       hist_out=hist_out)
    num_edges = edges.numel() if has_hist else 2
    edges_arg = edges.to(device=x.device, dtype=torch.float32).contiguous() if has_hist else p.sum
    grid = (len(chunks), triton.cdiv(C, block_c))
    _accumulate_stats_kernel[grid](
        x2, valid.view(-1).view(torch.uint8), chunks.start, chunks.length, chunks.persona, edges_arg,
        p.hist if has_hist else p.pos,
        p.sum, p.mean, p.m2, p.sumsq, p.sumabs, p.pos, p.min, p.max, p.absmax,
        C, x2.stride(0), num_edges,
        HAS_HIST=has_hist, SEARCH_STEPS=max(1, math.ceil(math.log2(num_edges + 1))),
        BLOCK_T=block_t, BLOCK_C=block_c,
    )
    return p
