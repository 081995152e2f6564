"""Launcher of the C++/OpenMP induction kernel (csrc/cpu/induce_neurons.cpp)."""
from __future__ import annotations

import torch

from ... import _native
from ..registry import has_native, new_output, register_kernel


def induce_neurons_cpp(a: torch.Tensor, deactivate: torch.Tensor, add: torch.Tensor, act: int = 0) -> torch.Tensor:
    I = a.shape[-1]
    a2 = a.reshape(-1, I).contiguous()
    out = new_output(a2.shape, a2.dtype, a2.device)
    _native.require("cpu").induce_neurons(a2, out, deactivate.view(torch.uint8), add, act)
    return out.view(a.shape)


if has_native("induce_neurons"):
    register_kernel("induce_neurons", "cpp")(induce_neurons_cpp)
