"""Compacted weights run as a dense GEMM on the compact matrix: the optimal kernel is the
vendor GEMM itself (MKL/oneDNN on CPU, cuBLAS on GPU), reading only the kept rows/columns."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import new_output, register_kernel


@register_kernel("compacted", "torch")
def compacted_linear(x2: torch.Tensor, fmt, bias, persona_rows) -> torch.Tensor:
    if fmt.axis == "in":
        return F.linear(x2.index_select(1, fmt.index), fmt.weight, bias)
    y = new_output(x2.shape[0], fmt.shape[0], x2.dtype, x2.device)
    if bias is None:
        y.zero_()
    else:
        y.copy_(bias.expand_as(y))
    y.index_copy_(1, fmt.index, F.linear(x2, fmt.weight, None if bias is None else bias.index_select(0, fmt.index)))
    return y
