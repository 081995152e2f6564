"""Histogram bin edges and percentile read-outs for the activation statistics."""
from __future__ import annotations

import math
from typing import Sequence

import torch


def npti_edges() -> list[float]:
    """The issue's NPTI binning: 303 edges -inf, 0.00, 0.01, ..., 3.00, +inf (302 bins, bin i = (e[i], e[i+1]]).

    (The NPTI reference stops at 2.99, one bin fewer; the extra bin only splits (2.99, inf].)
    """
    return [-math.inf] + [round(0.01 * i, 2) for i in range(301)] + [math.inf]


def npti_reference_edges() -> list[float]:
    """The NPTI code's own edges (search_neuron.py), for parity: -inf, then float32
    arange(0, 3.01, 0.01) with its last edge replaced by +inf: 302 edges, 301 bins, the last
    finite edge 2.99, values as float32 rounds them."""
    e = torch.arange(0, 3.01, 0.01, dtype=torch.float32)
    e[-1] = math.inf
    return [-math.inf] + e.tolist()


def validate_edges(edges: Sequence[float]) -> torch.Tensor:
    t = torch.as_tensor(list(edges), dtype=torch.float32)
    if t.ndim != 1 or t.numel() < 2:
        raise ValueError(f"histogram edges must be a 1-D sequence of at least 2 values, got shape {tuple(t.shape)}")
    if torch.isnan(t).any():
        raise ValueError("histogram edges contain NaN")
    if not bool((t[1:] > t[:-1]).all()):
        raise ValueError("histogram edges must be strictly increasing (after rounding to float32)")
    return t


def bin_index(values: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Bin of each value: bin i holds edges[i] < v <= edges[i+1]; the outer bins are open.

    Comparisons are made in float32, exactly as the kernels make them.
    """
    idx = torch.searchsorted(edges.to(torch.float32), values.to(torch.float32).contiguous(), right=False) - 1
    return idx.clamp_(0, edges.numel() - 2)


def percentile(hist: torch.Tensor, edges: torch.Tensor, q: float, method: str = "reference",
               lo: torch.Tensor | None = None, hi: torch.Tensor | None = None) -> torch.Tensor:
    """q-th percentile (q in [0, 100]) read from histograms ``hist[..., bins]``.

    ``reference``: the lower edge of the first bin whose cumulative count reaches q% of the
    total (NPTI's read-out; can be -inf when that is the first bin's edge).
    ``interpolate``: linear inside that bin; infinite outer edges are replaced by the observed
    ``lo``/``hi`` (min/max) when given. ``npti-code``: the released code's arithmetic (float32
    cumulative sum, threshold q% of the total, searchsorted left, that bin's lower edge). Rows
    with no counts give NaN.
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    if method not in ("reference", "interpolate", "npti-code"):
        raise ValueError(f"unknown percentile method {method!r}; use 'reference', 'interpolate' or 'npti-code'")
    if method == "npti-code":  # the released read-out: float32 cumsum, searchsorted left at 0.95 * total
        h32 = hist.to(torch.float32)
        cum32 = h32.cumsum(-1)
        thr = h32.sum(-1, keepdim=True) * (q / 100.0)
        idx = torch.searchsorted(cum32.contiguous(), thr.contiguous(), right=False).clamp(max=h32.shape[-1] - 1)
        out = edges.to(device=hist.device, dtype=torch.float32)[idx].squeeze(-1).to(torch.float64)
        return torch.where(thr.squeeze(-1) > 0, out, torch.full_like(out, math.nan))
    h = hist.to(torch.float64)
    total = h.sum(-1, keepdim=True)
    cum = h.cumsum(-1)
    target = total * (q / 100.0)
    # first bin at which the cumulative count reaches the target (count >= target)
    reached = cum >= target
    idx = torch.argmax(reached.to(torch.uint8), dim=-1, keepdim=True)
    e = edges.to(device=h.device, dtype=torch.float64)
    lower = e[idx]
    if method == "reference":
        out = lower.squeeze(-1)
    else:
        upper = e[idx + 1]
        if lo is not None:
            lower = torch.where(torch.isinf(lower), lo.to(torch.float64).unsqueeze(-1), lower)
        if hi is not None:
            upper = torch.where(torch.isinf(upper), hi.to(torch.float64).unsqueeze(-1), upper)
        before = torch.gather(cum, -1, idx) - torch.gather(h, -1, idx)
        in_bin = torch.gather(h, -1, idx)
        frac = torch.where(in_bin > 0, (target - before) / in_bin.clamp_min(1), torch.zeros_like(in_bin))
        out = (lower + frac.clamp(0, 1) * (upper - lower)).squeeze(-1)
    return torch.where(total.squeeze(-1) > 0, out, torch.full_like(out, math.nan))
