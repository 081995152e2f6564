"""Plain PyTorch reference of the accumulate_stats kernel (the oracle and the fallback).

Computes the partials with one chunk per sample, in float64.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ...stats.histogram import bin_index
from ..registry import register_kernel
from .partials import Chunks, Partials, histogram_out


@register_kernel("accumulate_stats", "reference")
def accumulate_stats_reference(x: torch.Tensor, valid: torch.Tensor, sample_persona: torch.Tensor,
                             edges: Optional[torch.Tensor], num_personas: int,
                             hist_out: Optional[torch.Tensor] = None) -> Partials:
    """x: [B, T, C] activations, valid: [B, T] bool, sample_persona: [B] int64. ``hist_out``: a
    running int32 histogram the counts are added into (as the kernels do)."""
    B, T, C = x.shape
    chunks = Chunks.split(B, T, max(T, 1), sample_persona)
    xf = x.to(torch.float64)
    w = valid.unsqueeze(-1)
    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    n = valid.sum(1, keepdim=True).to(torch.float64)  # [B, 1]
    xs = torch.where(w, xf, zero)
    s = xs.sum(1)
    mean = torch.where(n > 0, s / n.clamp_min(1), zero)
    dev = torch.where(w, xf - mean.unsqueeze(1), zero)
    hist = None
    if edges is not None:
        bins = edges.numel() - 1
        b = bin_index(x, edges)  # [B, T, C]
        flat = (sample_persona.view(B, 1, 1) * C + torch.arange(C, device=x.device)) * bins + b
        hist = torch.bincount(flat[valid.unsqueeze(-1).expand_as(flat)], minlength=num_personas * C * bins)
        hist = hist.view(num_personas, C, bins)
        if hist_out is not None:
            hist = histogram_out(hist_out, (num_personas, C, bins), x.device).add_(hist.to(torch.int32))
    return Partials(
        chunks=chunks, sum=s, mean=mean, m2=(dev * dev).sum(1), sumsq=(xs * xs).sum(1), sumabs=xs.abs().sum(1),
        pos=((xf > 0) & w).sum(1), min=torch.where(w, xf, math.inf).amin(1), max=torch.where(w, xf, -math.inf).amax(1),
        absmax=xs.abs().amax(1), hist=hist,
    )
