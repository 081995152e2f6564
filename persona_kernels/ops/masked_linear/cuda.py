"""CUDA kernels for masked_linear (csrc/cuda/*.cu): the bitmap format.

bitmap (csrc/cuda/bitmap_linear.cu): a decode GEMV that reads the weight once, at its packed
size (nnz values + 1 bit per weight). A warp walks an output row 32 bitmap words (1024
columns) at a time, one word per lane: a warp prefix sum of the words' popcounts places each
lane's values in the row's packed run, which the warp copies coalesced (16-byte cp.async) into
a double-buffered shared-memory slot while it computes the previous 32 words; each lane then
walks its word's set bits (two values per step), multiplying with x[:, column] staged in
shared memory for the block. float32 accumulation; rows of x are handled up to 8 per pass over
the weight (N > 8 takes several passes), so it is meant for decode batches (N = 1..16).
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import _native
from ..registry import has_native, new_output, register_kernel


def masked_linear_bitmap_cuda(x2d: torch.Tensor, fmt, bias: Optional[torch.Tensor],
                       persona_rows: Optional[torch.Tensor]) -> torch.Tensor:
    """x2d [N, in] on a CUDA device, fmt a BitmapWeight on the same device -> y [N, out] in x's dtype."""
    mod = _native.require("cuda")
    if x2d.device.type != "cuda":
        raise ValueError(f"the cuda backend needs x on a CUDA device, got {x2d.device}")
    if persona_rows is not None:
        raise ValueError("a bitmap weight holds one persona: persona_rows must be None")
    x = x2d.contiguous()
    y = new_output((x.shape[0], fmt.shape[0]), x.dtype, x.device)
    if y.numel() == 0:
        return y
    mod.bitmap_linear(
        x, fmt.values.contiguous(), fmt.bitmap.contiguous(), fmt.row_ptr.contiguous(),
        bias.contiguous() if bias is not None else None, y,
    )
    return y


def bitmap_linear_config(x2d: torch.Tensor, fmt, rows_per_pass: int = 0, threads: int = 0,
                         x_in_global: bool = False) -> dict:
    """The launch configuration the bitmap kernel picks for this call (for benchmarks)."""
    mod = _native.require("cuda")
    return mod.bitmap_linear_config(x2d.contiguous(), fmt.values.contiguous(), fmt.bitmap.contiguous(),
                                    fmt.row_ptr.contiguous(), rows_per_pass=rows_per_pass, threads=threads,
                                    x_in_global=x_in_global)


if has_native("bitmap_linear", "cuda"):
    register_kernel("masked_linear", "cuda", "bitmap")(masked_linear_bitmap_cuda)
