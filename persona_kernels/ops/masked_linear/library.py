"""masked_linear's bitmap kernel as a torch.library custom op, so it works under torch.compile.

``torch.ops.persona_kernels.bitmap_linear(x, values, bitmap, row_ptr, bias)`` takes only
tensors (formats are Python objects and cannot cross the op boundary) and dispatches on the
device to the native kernel: C++ on the CPU, CUDA (or Triton) on a GPU, with a fake
implementation for tracing.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...formats import BitmapWeight
from . import KERNELS
from .dispatch import _sparse_backend


def _run(x, values, bitmap, row_ptr, bias, out_features):
    fmt = BitmapWeight(values, bitmap, row_ptr, (out_features, x.shape[1]), values.dtype)
    name = _sparse_backend("bitmap", x.device)  # the dispatcher's own choice of kernel
    if name is None:
        return torch.nn.functional.linear(x, fmt.to_dense(), bias)
    return KERNELS[("bitmap", name)](x, fmt, bias, None)


@torch.library.custom_op("persona_kernels::bitmap_linear", mutates_args=())
def bitmap_linear(x: torch.Tensor, values: torch.Tensor, bitmap: torch.Tensor, row_ptr: torch.Tensor,
                  bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y = x W_maskedᵀ + bias for a bitmap-compressed weight (x [N, in], y [N, out])."""
    return _run(x, values, bitmap, row_ptr, bias, bitmap.shape[0])


@bitmap_linear.register_fake
def _(x, values, bitmap, row_ptr, bias):
    return x.new_empty(x.shape[0], bitmap.shape[0])
