"""C++/OpenMP CPU kernel for the bitmap format (csrc/cpu/bitmap_linear.cpp).

The compacted format needs no kernel of its own: its dense GEMM on the compact weight
(compacted.py) is already the vendor GEMM reading only the kept rows.
"""
from __future__ import annotations

import torch

from ... import _native
from . import new_output, register_kernel


def has_kernel() -> bool:
    mod = _native.load("cpu")
    return mod is not None and hasattr(mod, "bitmap_linear")


if has_kernel():

    @register_kernel("bitmap", "cpp")
    def bitmap_linear_cpu(x2: torch.Tensor, fmt, bias, persona_rows) -> torch.Tensor:
        y = new_output(x2.shape[0], fmt.shape[0], x2.dtype, x2.device)
        b = bias.float().contiguous() if bias is not None else torch.empty(0)
        _native.require("cpu").bitmap_linear(x2.contiguous(), fmt.values, fmt.bitmap, fmt.row_ptr, b, y)
        return y
