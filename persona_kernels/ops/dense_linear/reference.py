"""Plain PyTorch reference of dense_linear: F.linear (the vendor GEMM / GEMV), which is also the
route above the crossover batch and on GPUs."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..registry import register_kernel


@register_kernel("dense_linear", "reference")
def dense_linear_reference(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return F.linear(x2, weight, bias)
