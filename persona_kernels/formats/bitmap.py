"""Bitmap-compressed weight of one persona: packed non-zero values + 1 bit per weight.

Layout (shared by the CPU, Triton and CUDA kernels):
  values  [nnz]          kept weights, row-major (row 0's kept columns in order, then row 1's, ...)
  bitmap  [out, W] int32 W = ceil(in / 32) words per row, LSB first
  row_ptr [out + 1] int64 offset of each row's first value in ``values``
  values is followed by PAD zeros so that vector kernels may load 16 values at any offset.
Bytes: nnz * elt + out * W * 4 + (out + 1) * 8 (+ PAD * elt), i.e. about d * elt + 1/8 byte
per weight at density d; decode GEMV ideal speed-up over dense bf16 is 16 / (16 d + 1).
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import WeightFormat, check_mask, check_weight, pack_words, unpack_words

PAD = 16  # vector kernels load 16 values from any offset


class BitmapWeight(WeightFormat):
    kind = "bitmap"

    def __init__(self, values, bitmap, row_ptr, shape, dtype=None):
        self.values, self.bitmap, self.row_ptr = values, bitmap, row_ptr
        self.shape, self.dtype = tuple(shape), dtype or values.dtype

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor) -> "BitmapWeight":
        w = check_weight(weight)
        m = check_mask(mask, w.shape).to(w.device)
        if m.ndim != 2:
            raise ValueError("a bitmap weight holds one persona: mask must be [out, in]")
        values = torch.cat([w[m], w.new_zeros(PAD)])  # boolean indexing is row-major
        row_ptr = torch.zeros(w.shape[0] + 1, dtype=torch.int64, device=w.device)
        torch.cumsum(m.sum(1), 0, out=row_ptr[1:])
        return cls(values, pack_words(m).contiguous(), row_ptr, w.shape, w.dtype)

    @property
    def nnz(self) -> int:
        return int(self.row_ptr[-1])

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.shape[0] * self.shape[1])

    def known_sparsity(self) -> float:
        # values is the nnz kept weights plus PAD zeros: known from its shape, no sync on row_ptr
        return 1.0 - max(0, self.values.numel() - PAD) / max(1, self.shape[0] * self.shape[1])

    def mask(self) -> torch.Tensor:
        return unpack_words(self.bitmap, self.shape[1])

    def to_dense(self, persona: Optional[int] = None) -> torch.Tensor:
        out = torch.zeros(self.shape, dtype=self.dtype, device=self.values.device)
        return out.masked_scatter_(self.mask(), self.values[: self.nnz])  # row-major, like the packing

    def state(self):
        return {"values": self.values, "bitmap": self.bitmap, "row_ptr": self.row_ptr}, {"shape": list(self.shape)}

    @classmethod
    def from_state(cls, tensors, meta):
        values, row_ptr = tensors["values"], tensors["row_ptr"]
        nnz = int(row_ptr[-1])
        if values.numel() < nnz:
            raise ValueError(f"bitmap weight holds {values.numel()} values but its row pointers need {nnz}")
        if values.numel() < nnz + PAD:  # written without the padding the vector kernels rely on
            values = torch.cat([values[:nnz], values.new_zeros(PAD)])
        return cls(values, tensors["bitmap"], row_ptr, tuple(meta["shape"]))

    def op_args(self):
        return [self.values, self.bitmap, self.row_ptr], list(self.shape)

    @classmethod
    def from_op_args(cls, tensors, ints):
        return cls(*tensors, tuple(ints[:2]))
