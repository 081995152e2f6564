"""2:4 semi-structured sparsity through PyTorch's own sparse semi-structured tensors.

Needs a CUDA GPU with sparse tensor cores (compute capability 8.0+) and fp16/bf16; anywhere
else ``from_dense`` raises SemiStructuredUnsupported with the reason.
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import WeightFormat, check_mask, check_weight


class SemiStructuredUnsupported(RuntimeError):
    pass


def why_unsupported(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if device.type != "cuda":
        return f"2:4 semi-structured sparsity needs a CUDA device, the weight is on {device}"
    if torch.cuda.get_device_capability(device)[0] < 8:
        return "2:4 semi-structured sparsity needs compute capability 8.0 or newer"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"2:4 semi-structured sparsity supports float16/bfloat16 here, not {dtype}"
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return "this PyTorch has no torch.sparse.to_sparse_semi_structured"
    return None


class SemiStructuredWeight(WeightFormat):
    """Runs as F.linear on the sparse tensor (PyTorch's own 2:4 kernels); the tensor subclass
    does not cross the masked_linear torch.library op, torch.compile traces it directly."""

    kind = "semi24"

    def __init__(self, sparse, shape, dtype):
        self.sparse, self.shape, self.dtype = sparse, tuple(shape), dtype

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor) -> "SemiStructuredWeight":
        w = check_weight(weight)
        m = check_mask(mask, w.shape).to(w.device)
        if w.shape[1] % 4 or not bool((m.view(w.shape[0], -1, 4).sum(-1) <= 2).all()):
            raise ValueError("mask is not a 2:4 pattern (at most 2 kept in every group of 4 inputs)")
        reason = why_unsupported(w.device, w.dtype)
        if reason:
            raise SemiStructuredUnsupported(reason)
        return cls(torch.sparse.to_sparse_semi_structured(w * m.to(w.dtype)), w.shape, w.dtype)

    def to_dense(self, persona: Optional[int] = None) -> torch.Tensor:
        return self.sparse.to_dense()

    def nbytes(self) -> int:
        d = self.dtype.itemsize if hasattr(self.dtype, "itemsize") else 2
        return self.shape[0] * self.shape[1] // 2 * d + self.shape[0] * self.shape[1] // 8  # values + metadata

    def state(self):
        return {"dense": self.to_dense()}, {}

    @classmethod
    def from_state(cls, tensors, meta):
        dense = tensors["dense"]
        return cls.from_dense(dense, dense != 0)
