"""Launcher of the C++/OpenMP topk_mask kernel (csrc/cpu/topk_mask.cpp)."""
from __future__ import annotations

import torch

from ... import _native


def has_kernel() -> bool:
    mod = _native.load("cpu")
    return mod is not None and hasattr(mod, "topk_mask")


def topk_mask_cpu(score: torch.Tensor, k: int) -> torch.Tensor:
    return _native.require("cpu").topk_mask(score.contiguous(), int(k))
