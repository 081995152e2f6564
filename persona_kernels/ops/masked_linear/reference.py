"""Plain PyTorch reference of masked_linear: F.linear on the format's dense (masked) weight."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ...formats import WeightFormat


def masked_linear_reference(x: torch.Tensor, fmt: WeightFormat, bias: Optional[torch.Tensor],
                            persona: Optional[torch.Tensor]) -> torch.Tensor:
    """x [N, in]; persona None (single-persona formats), or [N] int64 persona of each row."""
    if persona is None:
        return F.linear(x, fmt.to_dense(), bias)
    out = torch.empty(x.shape[0], fmt.shape[0], dtype=x.dtype, device=x.device)
    for p in persona.unique().tolist():
        rows = persona == p
        out[rows] = F.linear(x[rows], fmt.to_dense(p), bias)
    return out
