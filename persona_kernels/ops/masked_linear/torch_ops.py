"""The 'torch' backend: formats whose fastest kernel is a PyTorch op already.

Compacted weights run a dense GEMM on the compact matrix, the vendor GEMM (MKL/oneDNN on CPU,
cuBLAS on GPU) reading only the kept rows/columns; 2:4 weights run F.linear on PyTorch's
semi-structured sparse tensor (cuSPARSELt / CUTLASS sparse tensor cores).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import new_output, register_kernel


@register_kernel("masked_linear", "torch", "compacted")
def masked_linear_compacted_torch(x2: torch.Tensor, fmt, bias, persona_rows) -> torch.Tensor:
    if fmt.axis == "in":
        return F.linear(x2.index_select(1, fmt.index), fmt.weight, bias)
    y = new_output((x2.shape[0], fmt.shape[0]), x2.dtype, x2.device)
    if bias is None:
        y.zero_()
    else:
        y.copy_(bias.expand_as(y))
    y.index_copy_(1, fmt.index, F.linear(x2, fmt.weight, None if bias is None else bias.index_select(0, fmt.index)))
    return y


@register_kernel("masked_linear", "torch", "semi24")
def masked_linear_semi24_torch(x2: torch.Tensor, fmt, bias, persona_rows) -> torch.Tensor:
    return F.linear(x2, fmt.sparse, bias)
