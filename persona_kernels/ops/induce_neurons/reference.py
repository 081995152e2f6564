"""Plain PyTorch reference of the NPTI induction op."""
from __future__ import annotations

import torch


def induce_neurons_reference(a: torch.Tensor, deactivate: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    """out = (deactivate ? min(a, 0) : a) + add, per neuron (last dim), computed in float32."""
    af = a.float()
    out = torch.where(deactivate, af.clamp(max=0.0), af) + add.float()
    return out.to(a.dtype)
