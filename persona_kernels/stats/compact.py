"""Statistics on disk at their exact values, in fewer bytes.

A StatsState in memory keeps int64 counts and float64 moments (exact merging). On disk:

- counts (the histogram, ``pos``) take the cheapest exact layout for their values: int16 or
  int32 when the largest count fits, or uint8 plus a table of the few entries above 255
  (their flat index and value), which suits histograms whose mass sits in a few bins;
- ``min``/``max``/``absmax`` are values of float32/float16/bfloat16 activations, so float32 holds
  them exactly (checked; float64 is kept otherwise);
- the moments stay float64.

``pack`` and ``unpack`` are inverses bit for bit.
"""
from __future__ import annotations

import torch

EXTREMES = ("min", "max", "absmax")
COUNTS = ("hist", "pos")
_OVER_IDX, _OVER_VAL = ".over_idx", ".over_val"


def _pack_counts(name: str, t: torch.Tensor) -> dict:
    if t.numel() == 0 or int(t.min()) < 0:
        return {name: t}
    top = int(t.max())
    flat = t.reshape(-1)
    over = (flat > 255).nonzero().flatten()
    costs = {"u8": flat.numel() + over.numel() * 12}
    if top < 2 ** 15:
        costs["i16"] = 2 * flat.numel()
    if top < 2 ** 31:
        costs["i32"] = 4 * flat.numel()
    best = min(costs, key=costs.get)
    if costs[best] >= 8 * flat.numel():
        return {name: t}
    if best == "i16":
        return {name: t.to(torch.int16)}
    if best == "i32":
        return {name: t.to(torch.int32)}
    base = flat.clamp(max=255).to(torch.uint8).view(t.shape)
    return {name: base, name + _OVER_IDX: over.to(torch.int32 if flat.numel() < 2 ** 31 else torch.int64),
            name + _OVER_VAL: flat[over].to(torch.int32 if top < 2 ** 31 else torch.int64)}


def pack(tensors: dict) -> dict:
    """A state's tensors (StatsState.tensors()) -> the tensors to store."""
    out = {}
    for name, t in tensors.items():
        if name in COUNTS:
            out.update(_pack_counts(name, t))
        elif name in EXTREMES and t.dtype == torch.float64 and torch.equal(t.float().double(), t):
            out[name] = t.float()  # exact: these are activation values
        else:
            out[name] = t
    return out


def unpack(tensors: dict) -> dict:
    """Stored tensors -> the state's tensors (int64 counts, float64 extremes)."""
    out = {}
    for name, t in tensors.items():
        if name.endswith((_OVER_IDX, _OVER_VAL)):
            continue
        if name in COUNTS:
            t = t.to(torch.int64)
            idx, val = tensors.get(name + _OVER_IDX), tensors.get(name + _OVER_VAL)
            if (idx is None) != (val is None):
                raise ValueError(f"statistics tensor {name!r}: half of its overflow table is missing")
            if idx is not None:
                if idx.numel() != val.numel() or (idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= t.numel())):
                    raise ValueError(f"statistics tensor {name!r}: malformed overflow table")
                t = t.reshape(-1).clone()
                t[idx.to(torch.int64)] = val.to(torch.int64)
                t = t.view(tensors[name].shape)
        elif name in EXTREMES:
            t = t.to(torch.float64)
        out[name] = t
    return out


__all__ = ["pack", "unpack"]
