"""C++/OpenMP CPU kernels for the bitmap, compacted and shared-bitmask formats
(csrc/cpu/{bitmap,compacted,shared_bitmask}_linear.cpp). Each streams the weight once per pass
and reuses it for up to 8 rows of x; the dispatcher sends larger batches to dense / vendor
GEMMs (crossover.json).
"""
from __future__ import annotations

import torch

from ... import _native
from ..linear_args import native_bias
from ..registry import has_native, new_output, register_kernel


def _out(x2: torch.Tensor, fmt) -> torch.Tensor:
    return new_output((x2.shape[0], fmt.shape[0]), x2.dtype, x2.device)


def masked_linear_bitmap_cpp(x2: torch.Tensor, fmt, bias, persona_rows) -> torch.Tensor:
    y = _out(x2, fmt)
    _native.require("cpu").bitmap_linear(x2.contiguous(), fmt.values, fmt.bitmap, fmt.row_ptr, native_bias(bias), y)
    return y


def masked_linear_compacted_cpp(x2: torch.Tensor, fmt, bias, persona_rows) -> torch.Tensor:
    y = _out(x2, fmt)
    _native.require("cpu").compacted_linear(x2.contiguous(), fmt.weight, fmt.index, fmt.axis == "in", native_bias(bias), y)
    return y


def masked_linear_shared_bitmask_cpp(x2: torch.Tensor, fmt, bias, persona_rows) -> torch.Tensor:
    y = _out(x2, fmt)
    _native.require("cpu").shared_bitmask_linear(x2.contiguous(), fmt.weight, fmt.bits, persona_rows.contiguous(),
                                                 native_bias(bias), y)
    return y


for _fmt, _native_name, _launcher in (("bitmap", "bitmap_linear", masked_linear_bitmap_cpp),
                                      ("compacted", "compacted_linear", masked_linear_compacted_cpp),
                                      ("shared_bitmask", "shared_bitmask_linear", masked_linear_shared_bitmask_cpp)):
    if has_native(_native_name):
        register_kernel("masked_linear", "cpp", _fmt)(_launcher)
