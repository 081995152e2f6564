"""Block-structured masks over one shared dense weight.

The weight is tiled into blocks of ``block`` = (rows, cols); each persona keeps a set of
whole blocks. Kernels skip dropped blocks entirely, so personas share one weight copy and
still read fewer bytes. Masks must be block-structured (``masks.block_mask`` makes one from
scores); per persona the kept blocks of each block-row are listed in ``cols`` / ``ptr``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import WeightFormat, check_mask, check_weight


class BlockSparseWeight(WeightFormat):
    kind = "block"

    def __init__(self, weight, block_mask_, block, shape):
        self.weight, self.blocks, self.block = weight, block_mask_, tuple(block)
        self.shape, self.dtype = tuple(shape), weight.dtype

    @classmethod
    def from_dense(cls, weight: torch.Tensor, masks: torch.Tensor, block=(16, 16)) -> "BlockSparseWeight":
        """masks bool [P, out, in] (or [out, in]); each must be constant on every block."""
        w = check_weight(weight)
        m = check_mask(masks, w.shape, "masks").to(w.device)
        m = m.unsqueeze(0) if m.ndim == 2 else m
        br, bc = block
        if w.shape[0] % br or w.shape[1] % bc:
            raise ValueError(f"weight shape {tuple(w.shape)} is not a multiple of the block {tuple(block)}")
        tiles = m.view(m.shape[0], w.shape[0] // br, br, w.shape[1] // bc, bc)
        any_, all_ = tiles.any(4).any(2), tiles.all(4).all(2)
        if not torch.equal(any_, all_):
            raise ValueError(f"mask is not block-structured for blocks of {tuple(block)}: some blocks are partly kept "
                             "(build it with persona_kernels.masks.block_mask)")
        return cls(w.contiguous(), any_.contiguous(), block, w.shape)

    @property
    def num_personas(self) -> int:
        return self.blocks.shape[0]

    def mask(self, persona: int) -> torch.Tensor:
        br, bc = self.block
        return self.blocks[persona].repeat_interleave(br, 0).repeat_interleave(bc, 1)

    def to_dense(self, persona: Optional[int] = 0) -> torch.Tensor:
        return self.weight * self.mask(persona or 0).to(self.dtype)

    def state(self):
        return {"weight": self.weight, "blocks": self.blocks}, {"block": list(self.block)}

    @classmethod
    def from_state(cls, tensors, meta):
        return cls(tensors["weight"], tensors["blocks"], tuple(meta["block"]), tuple(tensors["weight"].shape))

    def op_args(self):
        return [self.weight, self.blocks], [*self.shape, *self.block]

    @classmethod
    def from_op_args(cls, tensors, ints):
        return cls(tensors[0], tensors[1], tuple(ints[2:4]), tuple(ints[:2]))
