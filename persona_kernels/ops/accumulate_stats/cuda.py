"""CUDA kernel for accumulate_stats (csrc/cuda/accumulate_stats.cu), stage 1: chunk partials.

One streaming read of the activation. Grid (chunk, channel block); a block of 128 threads
covers 256 channels (2 per thread, bf16x2/half2/float2 loads) of one chunk, or 128 channels
when C is odd or x is not aligned to two elements. Each block compacts the chunk's valid rows
in shared memory, then streams them 8 per batch (the next batch's loads are in flight while
the current one is folded) through a per-row Welford update on values shifted by the chunk's
first valid value, so the chunk mean (written in float64) and M2 stay exact when
|mean| >> std. The histogram, when asked for, is a binary search over the edges staged in
shared memory plus an atomicAdd per run of equal bins.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from ... import _native
from ..registry import has_native, register_kernel
from .partials import Chunks, Partials, empty_partials

# Launch geometry of the kernels (PK_ACC_THREADS / PK_ACC_MIN_BLOCKS_PER_SM in
# csrc/cuda/accumulate_stats.h); only the default chunk size depends on them here.
THREADS = 128
BLOCKS_PER_SM = 8
# Blocks per SM from which the loads in flight (8 rows x 32 lanes x 4-8 bytes per warp,
# double-buffered) should keep HBM busy on an H100, so that a wave with fewer runs as long as
# one with this many. An estimate (Little's law, ~18 KiB in flight per SM), not a measurement:
# tune it with the benchmark on the GPU.
SATURATING_BLOCKS_PER_SM = 6
# Chunks shorter than this are never chosen automatically (their partials cost more than
# the rows they cover).
MIN_ROWS_PER_CHUNK = 256
# Estimated memory traffic of one (chunk, channel) partial: the kernel's 9 outputs plus the
# float64 reads/writes of stage 2 (partials.reduce_partials).
PARTIAL_BYTES = 256


@functools.lru_cache(maxsize=1024)
def default_rows_per_chunk(num_samples: int, tokens: int, channels: int, elem_bytes: int,
                           channels_per_block: int, num_sms: int) -> int:
    """Rows per chunk that minimise (activation bytes / wave efficiency + partials' bytes).

    More chunks give more blocks (the grid is chunks x channel blocks), hence a better filled
    GPU, but more partials to write and merge. A wave of blocks (at most BLOCKS_PER_SM per
    SM resident) runs as long as a full one when it holds fewer than SATURATING_BLOCKS_PER_SM
    per SM. Samples of at most MIN_ROWS_PER_CHUNK tokens are one chunk each.
    """
    if tokens <= MIN_ROWS_PER_CHUNK:
        return max(tokens, 1)
    cblocks = -(-channels // channels_per_block)
    slots = max(1, num_sms * BLOCKS_PER_SM)
    saturating = max(1, num_sms * SATURATING_BLOCKS_PER_SM)
    activation = num_samples * tokens * channels * elem_bytes
    best_cost, best_rows, last = None, tokens, None
    for m in range(1, max(1, tokens // MIN_ROWS_PER_CHUNK) + 1):
        rows = -(-tokens // m)
        per_sample = -(-tokens // rows)
        if per_sample == last:
            continue
        last = per_sample
        partials = num_samples * per_sample * channels * PARTIAL_BYTES
        if best_cost is not None and partials >= best_cost:
            break  # the partials alone cost more from here on
        blocks = num_samples * per_sample * cblocks
        full, rest = divmod(blocks, slots)
        wave_blocks = full * slots + (max(rest, saturating) if rest else 0)
        cost = activation * wave_blocks / blocks + partials
        if best_cost is None or cost < best_cost:
            best_cost, best_rows = cost, rows
    return best_rows


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def accumulate_stats_cuda(x: torch.Tensor, valid: torch.Tensor, sample_persona: torch.Tensor,
                        edges: Optional[torch.Tensor], num_personas: int,
                        rows_per_chunk: Optional[int] = None, hist_out: Optional[torch.Tensor] = None) -> Partials:
    """Launcher. x: [B, T, C] on a CUDA device, valid: [B, T] bool, sample_persona: [B] int64.

    rows_per_chunk: tokens per chunk (default: default_rows_per_chunk, which fills the GPU;
    samples of at most 256 tokens are one chunk each). The partials' mean is float64.
    """
    mod = _native.require("cuda")
    if x.device.type != "cuda":
        raise ValueError(f"the cuda backend needs x on a CUDA device, got {x.device}")
    if x.ndim != 3:
        raise ValueError(f"x must be [B, T, C], got shape {tuple(x.shape)}")
    B, T, C = x.shape
    x = x.contiguous()
    pairs = C % 2 == 0 and x.data_ptr() % (2 * x.element_size()) == 0
    vec = 2 if pairs else 1
    if rows_per_chunk is None:
        rows_per_chunk = default_rows_per_chunk(B, T, C, x.element_size(), THREADS * vec, _num_sms(x.device.index))
    elif rows_per_chunk < 1:
        raise ValueError(f"rows_per_chunk must be >= 1, got {rows_per_chunk}")
    chunks = Chunks.split(B, T, rows_per_chunk, sample_persona.to(device=x.device, dtype=torch.int64))
    has_hist = edges is not None
    p = empty_partials(chunks, C, x.device, (num_personas, C, edges.numel() - 1) if has_hist else None,
                       mean_dtype=torch.float64, hist_out=hist_out)
    edges_arg = edges.to(device=x.device, dtype=torch.float32).contiguous() if has_hist else None
    valid_arg = valid.to(device=x.device, dtype=torch.bool).reshape(-1).contiguous()
    mod.accumulate_stats_partials(
        x, valid_arg, chunks.start, chunks.length, chunks.persona, edges_arg, p.hist,
        p.sum, p.mean, p.m2, p.sumsq, p.sumabs, p.pos, p.min, p.max, p.absmax, vec=vec,
    )
    return p


if has_native("accumulate_stats_partials", "cuda"):
    register_kernel("accumulate_stats", "cuda")(accumulate_stats_cuda)
