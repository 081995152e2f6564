"""1 bit per weight: masks packed along the input dimension, LSB first.

Bit j of byte b in a row holds column 8*b + j; a row of n columns takes ceil(n / 8) bytes
(padding bits are 0).
"""
from __future__ import annotations

import torch

_SHIFTS = torch.arange(8, dtype=torch.uint8)
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool [..., n] -> uint8 [..., ceil(n / 8)]."""
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_bits expects a bool mask, got {mask.dtype}")
    n = mask.shape[-1]
    pad = (-n) % 8
    m = torch.nn.functional.pad(mask.to(torch.uint8), (0, pad)) if pad else mask.to(torch.uint8)
    m = m.view(*mask.shape[:-1], -1, 8)
    return (m << _SHIFTS.to(m.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [..., ceil(n / 8)] -> bool [..., n]."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_bits expects uint8, got {packed.dtype}")
    if packed.shape[-1] != (n + 7) // 8:
        raise ValueError(f"packed rows have {packed.shape[-1]} bytes, expected {(n + 7) // 8} for {n} columns")
    bits = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 1
    return bits.view(*packed.shape[:-1], -1)[..., :n].to(torch.bool)


def popcount(packed: torch.Tensor) -> int:
    return int(_POPCOUNT.to(packed.device)[packed.long()].sum())
