"""C++/OpenMP CPU kernels for the bitmap, compacted and shared-bitmask formats
(csrc/cpu/{bitmap,compacted,shared_bitmask}_linear.cpp). Each streams the weight once per pass
and reuses it for up to 8 rows of x; the dispatcher sends larger batches to dense / vendor
GEMMs (crossover.json).
"""
from __future__ import annotations

import torch

from ... import _native
from . import new_output, register_kernel


def has_kernel(name: str = "bitmap_linear") -> bool:
    mod = _native.load("cpu")
    return mod is not None and hasattr(mod, name)


_NO_BIAS = torch.empty(0)  # one shared "no bias" tensor: no allocation on the decode path


def _bias_f32(bias):
    return bias.float().contiguous() if bias is not None else _NO_BIAS


if has_kernel("bitmap_linear"):

    @register_kernel("bitmap", "cpp")
    def bitmap_linear_cpu(x2: torch.Tensor, fmt, bias, persona_rows) -> torch.Tensor:
        y = new_output(x2.shape[0], fmt.shape[0], x2.dtype, x2.device)
        _native.require("cpu").bitmap_linear(x2.contiguous(), fmt.values, fmt.bitmap, fmt.row_ptr, _bias_f32(bias), y)
        return y


if has_kernel("compacted_linear"):

    @register_kernel("compacted", "cpp")
    def compacted_linear_cpu(x2: torch.Tensor, fmt, bias, persona_rows) -> torch.Tensor:
        y = new_output(x2.shape[0], fmt.shape[0], x2.dtype, x2.device)
        _native.require("cpu").compacted_linear(x2.contiguous(), fmt.weight, fmt.index, fmt.axis == "in",
                                                _bias_f32(bias), y)
        return y


if has_kernel("shared_bitmask_linear"):

    @register_kernel("shared_bitmask", "cpp")
    def shared_bitmask_linear_cpu(x2: torch.Tensor, fmt, bias, persona_rows) -> torch.Tensor:
        y = new_output(x2.shape[0], fmt.shape[0], x2.dtype, x2.device)
        _native.require("cpu").shared_bitmask_linear(x2.contiguous(), fmt.weight, fmt.bits,
                                                     persona_rows.contiguous(), _bias_f32(bias), y)
        return y
