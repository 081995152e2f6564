"""Stage 2 of accumulate_stats, shared by every backend.

Each backend's kernel makes one pass over the activation and writes *chunk partials*: for
every chunk (a run of consecutive tokens of one sample) and channel, the count-weighted
Welford triple and the other raw accumulators. This module turns those partials into a
StatsState (float64) with the multi-way form of Chan's merge, so the numerics of merging are
written once, not once per backend.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ...stats import StatsState

F64 = torch.float64


@dataclass
class Chunks:
    """Consecutive token rows of the flattened [B*T, C] activation; each lies in one sample."""

    start: torch.Tensor    # [K] int64 first row
    length: torch.Tensor   # [K] int64 rows (>= 1)
    sample: torch.Tensor   # [K] int64 sample index
    persona: torch.Tensor  # [K] int64 persona (segment id) of the sample

    @classmethod
    def split(cls, num_samples: int, tokens: int, rows_per_chunk: int, sample_persona: torch.Tensor) -> "Chunks":
        per_sample = max(1, math.ceil(tokens / rows_per_chunk))
        dev = sample_persona.device
        sample = torch.arange(num_samples, device=dev).repeat_interleave(per_sample)
        j = torch.arange(per_sample, device=dev).repeat(num_samples)
        start = sample * tokens + j * rows_per_chunk
        length = (tokens - j * rows_per_chunk).clamp(max=rows_per_chunk)
        return cls(start, length, sample, sample_persona[sample])

    def __len__(self) -> int:
        return self.start.numel()


@dataclass
class Partials:
    """Per-(chunk, channel) accumulators written by a backend kernel ([K, C] each)."""

    chunks: Chunks
    sum: torch.Tensor
    mean: torch.Tensor       # Welford mean over the chunk's valid tokens (0 if none)
    m2: torch.Tensor
    sumsq: torch.Tensor
    sumabs: torch.Tensor
    pos: torch.Tensor
    min: torch.Tensor        # +inf if no valid token
    max: torch.Tensor        # -inf if no valid token
    absmax: torch.Tensor
    hist: Optional[torch.Tensor] = None  # [P, C, bins] counts of this call


def valid_counts(chunks: Chunks, row_valid: torch.Tensor) -> torch.Tensor:
    """Valid tokens per chunk, from the flat [R] validity mask."""
    cs = torch.zeros(row_valid.numel() + 1, dtype=torch.int64, device=row_valid.device)
    torch.cumsum(row_valid.to(torch.int64), 0, out=cs[1:])
    return cs[chunks.start + chunks.length] - cs[chunks.start]


def nonfinite_channels(p: Partials) -> torch.Tensor:
    """Channels whose partial sums are not finite: a NaN or +-Inf input poisons its chunk's sum."""
    bad = ~torch.isfinite(p.sum) | ~torch.isfinite(p.sumsq)
    return bad.any(0).nonzero().flatten()


def _group_welford(n: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, group: torch.Tensor, groups: int):
    """Multi-way Chan merge of K (n, mean, M2) triples into `groups` triples."""
    C = mean.shape[1]
    nf = n.to(F64)
    tot = torch.zeros(groups, dtype=F64, device=n.device).index_add_(0, group, nf)
    gsum = torch.zeros(groups, C, dtype=F64, device=n.device).index_add_(0, group, mean * nf[:, None])
    gmean = gsum / tot.clamp_min(1)[:, None]
    dev = mean - gmean[group]
    gm2 = torch.zeros(groups, C, dtype=F64, device=n.device).index_add_(0, group, m2 + nf[:, None] * dev * dev)
    return tot.to(torch.int64), gmean, gm2


def reduce_partials(p: Partials, n: torch.Tensor, num_samples: int, num_personas: int, edges: Optional[torch.Tensor]) -> StatsState:
    """Fold chunk partials into a fresh StatsState (one call's worth of statistics)."""
    ch = p.chunks
    C = p.sum.shape[1]
    dev = p.sum.device
    P = num_personas
    per = ch.persona
    as64 = {k: getattr(p, k).to(F64) for k in ("sum", "mean", "m2", "sumsq", "sumabs", "min", "max", "absmax")}
    count, mean, m2 = _group_welford(n, as64["mean"], as64["m2"], per, P)

    def add(t):
        return torch.zeros(P, C, dtype=t.dtype, device=dev).index_add_(0, per, t)

    def reduce(t, how, fill):
        out = torch.full((P, C), fill, dtype=F64, device=dev)
        return out.scatter_reduce_(0, per[:, None].expand(-1, C), t, reduce=how, include_self=True)

    # per-sample L2 norms over tokens, then their Welford triple across the samples of each persona
    sample_n = torch.zeros(num_samples, dtype=torch.int64, device=dev).index_add_(0, ch.sample, n)
    sample_sq = torch.zeros(num_samples, C, dtype=F64, device=dev).index_add_(0, ch.sample, as64["sumsq"])
    seen = sample_n > 0
    sample_persona = torch.zeros(num_samples, dtype=torch.int64, device=dev).scatter_(0, ch.sample, per)
    norms = sample_sq[seen].sqrt()
    samples, norm_mean, norm_m2 = _group_welford(
        torch.ones(norms.shape[0], dtype=torch.int64, device=dev), norms, torch.zeros_like(norms), sample_persona[seen], P)

    return StatsState(
        count=count, sum=add(as64["sum"]), mean=mean, m2=m2, sumsq=add(as64["sumsq"]), sumabs=add(as64["sumabs"]),
        pos=add(p.pos.to(torch.int64)), min=reduce(as64["min"], "amin", math.inf), max=reduce(as64["max"], "amax", -math.inf),
        absmax=reduce(as64["absmax"], "amax", 0.0), samples=samples, norm_mean=norm_mean, norm_m2=norm_m2,
        hist=None if p.hist is None else p.hist.to(torch.int64), edges=edges,
    )


# Tests set this to poison the kernels' output buffers, so an element a kernel forgets to
# write shows up as a wrong statistic instead of stale memory that happens to be right.
POISON_OUTPUTS = False


def empty_partials(chunks: Chunks, num_channels: int, device, hist_shape: Optional[tuple],
                   mean_dtype: torch.dtype = torch.float32) -> Partials:
    """Output buffers for a kernel backend: float32 accumulators, int32 counts, int32 histogram.

    A kernel that keeps its running mean as shift + offset can ask for a float64 mean so the
    chunk means keep the precision stage 2's merge needs when |mean| >> std.
    """
    K, C = len(chunks), num_channels
    if POISON_OUTPUTS:
        f = lambda dt=torch.float32: torch.full((K, C), 1.2345e6, dtype=dt, device=device)  # noqa: E731
        pos = torch.full((K, C), -777, dtype=torch.int32, device=device)
    else:
        f = lambda dt=torch.float32: torch.empty(K, C, dtype=dt, device=device)  # noqa: E731
        pos = torch.empty(K, C, dtype=torch.int32, device=device)
    return Partials(
        chunks=chunks, sum=f(), mean=f(mean_dtype), m2=f(), sumsq=f(), sumabs=f(), pos=pos, min=f(), max=f(), absmax=f(),
        hist=None if hist_shape is None else torch.zeros(hist_shape, dtype=torch.int32, device=device),
    )
