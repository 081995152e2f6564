"""Stage 2 of accumulate_stats, shared by every backend.

Each backend's kernel makes one pass over the activation and writes *chunk partials*: for
every chunk (a run of consecutive tokens of one sample) and channel, the count-weighted
Welford triple and the other raw accumulators. This module turns those partials into a
StatsState (float64) with the multi-way form of Chan's merge, so the numerics of merging are
written once, not once per backend.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch

from ...stats import StatsState
from ..registry import new_output

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
        start, length, sample = _layout(num_samples, tokens, rows_per_chunk, sample_persona.device)
        return cls(start, length, sample, sample_persona[sample])

    def __len__(self) -> int:
        return self.start.numel()


@functools.lru_cache(maxsize=256)
def _layout(num_samples: int, tokens: int, rows_per_chunk: int, device: torch.device) -> tuple:
    """(start, length, sample) of the chunks of a [num_samples, tokens] activation: the same for
    every call of that shape (a calibration run repeats a few shapes many times), so cached."""
    per_sample = max(1, math.ceil(tokens / rows_per_chunk))
    sample = torch.arange(num_samples, device=device).repeat_interleave(per_sample)
    j = torch.arange(per_sample, device=device).repeat(num_samples)
    start = sample * tokens + j * rows_per_chunk
    length = (tokens - j * rows_per_chunk).clamp(max=rows_per_chunk)
    return start, length, sample


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


PARTIAL_FIELDS = ("sum", "mean", "m2", "sumsq", "sumabs", "pos", "min", "max", "absmax")


def valid_counts(chunks: Chunks, row_valid: torch.Tensor) -> torch.Tensor:
    """Valid tokens per chunk, from the flat [R] validity mask."""
    cs = torch.zeros(row_valid.numel() + 1, dtype=torch.int64, device=row_valid.device)
    torch.cumsum(row_valid.to(torch.int64), 0, out=cs[1:])
    return cs[chunks.start + chunks.length] - cs[chunks.start]


# Largest |activation| accepted. The backends accumulate squares in float32 (C++, Triton, CUDA)
# or float64 (reference); below this bound no backend's sum of squares can overflow, above it
# every backend refuses, so they agree. Real activations stay far below (bf16 LLMs: ~1e4).
MAX_ABS_ACTIVATION = 1e15


def _nonfinite(p: Partials) -> torch.Tensor:
    """[chunks, C] bool: a NaN or Inf input (it poisons its chunk's sum) or an |x| above
    MAX_ABS_ACTIVATION (an Inf's absmax is above it too; below it no sum of squares overflows)."""
    return ~torch.isfinite(p.sum) | (p.absmax > MAX_ABS_ACTIVATION)


def nonfinite_flag(p: Partials) -> torch.Tensor:
    """0-dim bool on the partials' device, any channel _nonfinite (no host read)."""
    return _nonfinite(p).any()


def nonfinite_channels(p: Partials) -> torch.Tensor:
    """The channels with a _nonfinite chunk (an empty index in the common case)."""
    bad = _nonfinite(p)
    if not bool(bad.any()):  # the common case: one reduction, no index work
        return bad.new_zeros(0, dtype=torch.int64)
    return bad.any(0).nonzero().flatten()


def _one_hot(group: torch.Tensor, groups: int) -> torch.Tensor:
    """[groups, K] float64 indicator: a matmul with it sums rows by group. (index_add_ and
    scatter_reduce_ take tens of ms on small CPU tensors in some torch builds; this does not.)"""
    return (group.unsqueeze(0) == torch.arange(groups, device=group.device).unsqueeze(1)).to(F64)


def _group_welford(n: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, onehot: torch.Tensor):
    """Multi-way Chan merge of K (n, mean, M2) triples into one triple per row of ``onehot``."""
    nf = n.to(F64)
    tot = onehot @ nf
    gmean = (onehot @ (mean * nf[:, None])) / tot.clamp_min(1)[:, None]
    dev = mean - (onehot.t() @ gmean)  # each chunk's mean minus its group's
    gm2 = onehot @ (m2 + nf[:, None] * dev * dev)
    return tot.round().to(torch.int64), gmean, gm2


def _group_extreme(t: torch.Tensor, group: torch.Tensor, groups: int, how: str, fill: float) -> torch.Tensor:
    out = torch.full((groups, t.shape[1]), fill, dtype=F64, device=t.device)
    for g in group.unique().tolist():
        sel = t[group == g]
        out[g] = sel.amin(0) if how == "min" else sel.amax(0)
    return out


def reduce_partials(p: Partials, n: torch.Tensor, num_samples: int, num_personas: int, edges: Optional[torch.Tensor]) -> StatsState:
    """Fold chunk partials into a fresh StatsState (one call's worth of statistics)."""
    ch = p.chunks
    P = num_personas
    per = ch.persona
    as64 = {k: getattr(p, k).to(F64) for k in ("sum", "mean", "m2", "sumsq", "sumabs", "min", "max", "absmax")}
    by_persona = _one_hot(per, P)
    count, mean, m2 = _group_welford(n, as64["mean"], as64["m2"], by_persona)

    # per-sample L2 norms over tokens, then their Welford triple across the samples of each persona
    by_sample = _one_hot(ch.sample, num_samples)
    sample_n = by_sample @ n.to(F64)
    sample_sq = by_sample @ as64["sumsq"]
    seen = sample_n > 0
    sample_persona = torch.zeros(num_samples, dtype=torch.int64, device=per.device).scatter_(0, ch.sample, per)
    norms = sample_sq[seen].sqrt()
    samples, norm_mean, norm_m2 = _group_welford(
        torch.ones(norms.shape[0], dtype=torch.int64, device=per.device), norms, torch.zeros_like(norms),
        _one_hot(sample_persona[seen], P))

    return StatsState(
        count=count, sum=by_persona @ as64["sum"], mean=mean, m2=m2, sumsq=by_persona @ as64["sumsq"],
        sumabs=by_persona @ as64["sumabs"], pos=(by_persona @ p.pos.to(F64)).round().to(torch.int64),
        min=_group_extreme(as64["min"], per, P, "min", math.inf), max=_group_extreme(as64["max"], per, P, "max", -math.inf),
        absmax=_group_extreme(as64["absmax"], per, P, "max", 0.0), samples=samples, norm_mean=norm_mean, norm_m2=norm_m2,
        hist=None if p.hist is None else p.hist.to(torch.int64), edges=edges,
    )


def histogram_out(hist_out: Optional[torch.Tensor], shape: Optional[tuple], device) -> Optional[torch.Tensor]:
    """The int32 histogram a kernel adds its counts into: ``hist_out`` (a running histogram kept
    across calls, so no call allocates and zeroes its own) or a fresh zeroed one."""
    if shape is None:
        return None
    if hist_out is None:
        return torch.zeros(shape, dtype=torch.int32, device=device)
    if tuple(hist_out.shape) != tuple(shape) or hist_out.dtype != torch.int32 or hist_out.device != torch.device(device) \
            or not hist_out.is_contiguous():
        raise ValueError(f"hist_out must be a contiguous int32 {tuple(shape)} tensor on {device}, got "
                         f"{hist_out.dtype} {tuple(hist_out.shape)} on {hist_out.device}")
    return hist_out


def empty_partials(chunks: Chunks, num_channels: int, device, hist_shape: Optional[tuple],
                   mean_dtype: torch.dtype = torch.float32, hist_out: Optional[torch.Tensor] = None) -> Partials:
    """Output buffers for a kernel backend: float32 accumulators, int32 counts, int32 histogram
    (the histogram is added into: zeroed, or ``hist_out``; the rest is poisoned under tests).

    A kernel that keeps its running mean as shift + offset can ask for a float64 mean so the
    chunk means keep the precision stage 2's merge needs when |mean| >> std.
    """
    shape = (len(chunks), num_channels)
    # the float32 fields are views of one allocation: an allocation costs more than a small kernel
    names = [f for f in PARTIAL_FIELDS if f != "pos" and not (f == "mean" and mean_dtype != torch.float32)]
    block = new_output((len(names), *shape), torch.float32, device, fill=1.2345e6)
    fields = dict(zip(names, block.unbind(0)))
    if "mean" not in fields:
        fields["mean"] = new_output(shape, mean_dtype, device, fill=1.2345e6)
    return Partials(chunks=chunks, **fields, pos=new_output(shape, torch.int32, device, fill=-777),
                    hist=histogram_out(hist_out, hist_shape, device))
