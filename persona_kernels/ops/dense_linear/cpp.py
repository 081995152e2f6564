"""Launcher of the C++/OpenMP dense GEMV (csrc/cpu/dense_linear.cpp). Registered only where the
extension was built with AVX-512: its scalar fallback would be slower than the vendor GEMV."""
from __future__ import annotations

from typing import Optional

import torch

from ... import _native
from ..linear_args import native_bias
from ..registry import has_native, new_output, register_kernel


def dense_linear_cpp(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    y = new_output((x2.shape[0], weight.shape[0]), x2.dtype, x2.device)
    _native.require("cpu").dense_linear(x2.contiguous(), weight.contiguous(), native_bias(bias), y)
    return y


if has_native("dense_linear") and getattr(_native.load("cpu"), "avx512", False):
    register_kernel("dense_linear", "cpp")(dense_linear_cpp)
