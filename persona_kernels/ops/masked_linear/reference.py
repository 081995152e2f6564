"""Plain PyTorch reference of masked_linear: F.linear on the format's dense (masked) weight."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ...formats import FORMAT_KINDS, WeightFormat
from ..registry import register_kernel


def masked_linear_reference(x: torch.Tensor, fmt: WeightFormat, bias: Optional[torch.Tensor],
                            persona: Optional[torch.Tensor], cached: bool = False) -> torch.Tensor:
    """x [N, in]; persona None (single-persona formats), or [N] int64 persona of each row.

    ``cached``: use the format's cached dense weight (the dispatcher's dense path) instead of
    densifying afresh (the oracle).
    """
    dense = fmt.dense_for if cached else fmt.to_dense
    if persona is None:
        return F.linear(x, dense(), bias)
    personas = persona.unique().tolist()
    if len(personas) == 1:
        return F.linear(x, dense(personas[0]), bias)
    out = torch.empty(x.shape[0], fmt.shape[0], dtype=x.dtype, device=x.device)
    for p in personas:
        rows = persona == p
        out[rows] = F.linear(x[rows], dense(p), bias)
    return out


def masked_linear_reference_launcher(x2: torch.Tensor, fmt: WeightFormat, bias: Optional[torch.Tensor],
                                     persona_rows: Optional[torch.Tensor]) -> torch.Tensor:
    return masked_linear_reference(x2, fmt, bias, persona_rows)


for _kind in FORMAT_KINDS:  # the oracle runs every format
    register_kernel("masked_linear", "reference", _kind)(masked_linear_reference_launcher)
