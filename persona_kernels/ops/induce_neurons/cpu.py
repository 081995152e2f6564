"""Launcher of the C++/OpenMP induction kernel (csrc/cpu/induce_neurons.cpp)."""
from __future__ import annotations

import torch

from ... import _native


def has_kernel() -> bool:
    mod = _native.load("cpu")
    return mod is not None and hasattr(mod, "induce_neurons")


def induce_neurons_cpu(a: torch.Tensor, deactivate: torch.Tensor, add: torch.Tensor, act: int = 0) -> torch.Tensor:
    I = a.shape[-1]
    a2 = a.reshape(-1, I).contiguous()
    out = torch.empty_like(a2)
    _native.require("cpu").induce_neurons(a2, out, deactivate.view(torch.uint8), add, act)
    return out.view(a.shape)
