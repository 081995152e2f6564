"""1 bit per weight, packed along the input dimension, LSB first: the one bit packer.

Bit j of byte b in a row holds column 8*b + j; a row of n columns takes ceil(n / 8) bytes
(padding bits are 0). Mask stores keep these bytes; the kernels' formats read them as int32
words (``pack_words``: rows padded to 32 columns, bit j of word w is column 32*w + j), which is
the same memory on a little-endian machine.
"""
from __future__ import annotations

import sys

import torch

WORD = 32
assert sys.byteorder == "little", "persona_kernels' bit packing assumes a little-endian machine"
# Bytes are shifted as uint8 (4x less traffic than int64 shifts)
_SHIFTS = torch.arange(8, dtype=torch.uint8)
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def _pack(mask: torch.Tensor, multiple: int) -> torch.Tensor:
    n = mask.shape[-1]
    pad = (-n) % multiple
    m = mask.to(torch.uint8)
    if pad:
        m = torch.nn.functional.pad(m, (0, pad))
    return (m.view(*mask.shape[:-1], -1, 8) << _SHIFTS.to(m.device)).sum(-1, dtype=torch.uint8)


def _unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    bits = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 1
    return bits.view(*packed.shape[:-1], -1)[..., :n].to(torch.bool)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool [..., n] -> uint8 [..., ceil(n / 8)]."""
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_bits expects a bool mask, got {mask.dtype}")
    return _pack(mask, 8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [..., ceil(n / 8)] -> bool [..., n]."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_bits expects uint8, got {packed.dtype}")
    if packed.shape[-1] != (n + 7) // 8:
        raise ValueError(f"packed rows have {packed.shape[-1]} bytes, expected {(n + 7) // 8} for {n} columns")
    return _unpack(packed, n)


def pack_words(mask: torch.Tensor) -> torch.Tensor:
    """bool [..., n] -> int32 [..., ceil(n / 32)], LSB first."""
    return _pack(mask, WORD).view(torch.int32)


def unpack_words(words: torch.Tensor, n: int) -> torch.Tensor:
    """int32 [..., ceil(n / 32)] -> bool [..., n]."""
    return _unpack(words.contiguous().view(torch.uint8), n)


def popcount(packed: torch.Tensor) -> int:
    """Set bits of a uint8 tensor."""
    return int(_POPCOUNT.to(packed.device)[packed.long()].sum())
