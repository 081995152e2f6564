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
    ``lo``/``hi`` (min/max) when given. Rows with no counts give NaN.
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    if method not in ("reference", "interpolate"):
        raise ValueError(f"unknown percentile method {method!r}; use 'reference' or 'interpolate'")
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
