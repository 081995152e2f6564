"""Launcher of the C++/OpenMP topk_mask kernel (csrc/cpu/topk_mask.cpp): nth_element per row under
the reference's total order, so both give the same mask bit for bit."""
from __future__ import annotations

import torch

from ... import _native
from ..registry import has_native, register_kernel
from .reference import topk_mask_reference


def topk_mask_cpp(score: torch.Tensor, k: int) -> torch.Tensor:
    if 0 < k < score.shape[1] and score.dtype in (torch.float32, torch.float64):
        return _native.require("cpu").topk_mask(score.contiguous(), int(k))
    return topk_mask_reference(score, k)  # all/nothing kept, or a dtype the kernel does not take


if has_native("topk_mask"):
    register_kernel("topk_mask", "cpp")(topk_mask_cpp)
