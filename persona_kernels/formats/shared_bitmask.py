"""Shared dense + bitmask: one copy of the weights, 1 bit per weight per persona.

Right for memory (N personas cost N/16 of a bf16 weight's bytes), never for speed: the
kernel reads the dense weight plus the bits. A batch may carry a different persona per row.
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import WeightFormat, check_mask, check_weight, pack_words, unpack_words


class SharedBitmask(WeightFormat):
    kind = "shared_bitmask"

    def __init__(self, weight: torch.Tensor, bits: torch.Tensor, shape: tuple):
        self.weight, self.bits, self.shape, self.dtype = weight, bits, tuple(shape), weight.dtype

    @classmethod
    def from_dense(cls, weight: torch.Tensor, masks: torch.Tensor) -> "SharedBitmask":
        """weight [out, in]; masks bool [P, out, in] (or [out, in] for one persona)."""
        w = check_weight(weight)
        m = check_mask(masks, w.shape, "masks")
        if m.ndim == 2:
            m = m.unsqueeze(0)
        if m.ndim != 3:
            raise ValueError(f"masks must be [personas, out, in], got {tuple(m.shape)}")
        return cls(w.contiguous(), pack_words(m.to(w.device)).contiguous(), w.shape)

    @property
    def num_personas(self) -> int:
        return self.bits.shape[0]

    def mask(self, persona: int) -> torch.Tensor:
        return unpack_words(self.bits[persona], self.shape[1])

    def to_dense(self, persona: Optional[int] = 0) -> torch.Tensor:
        return self.weight * self.mask(persona or 0).to(self.weight.dtype)

    def persona_nbytes(self) -> int:
        """Bytes that one more resident persona costs (its bits)."""
        return self.bits[0].numel() * 4

    def state(self):
        return {"weight": self.weight, "bits": self.bits}, {}

    @classmethod
    def from_state(cls, tensors, meta):
        return cls(tensors["weight"], tensors["bits"], tuple(tensors["weight"].shape))

    def op_args(self):
        return [self.weight, self.bits], list(self.shape)

    @classmethod
    def from_op_args(cls, tensors, ints):
        return cls(tensors[0], tensors[1], tuple(ints[:2]))
