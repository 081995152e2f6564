"""The statistics state: everything accumulate_stats keeps per (persona, channel).

Means and second moments are kept Welford-style as (count, mean, M2) and combined with Chan's
parallel merge, never as E[x^2] - E[x]^2. Per-sample L2 norms (over each sample's tokens) are
folded into a second (samples, norm_mean, norm_M2) triple the same way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

import torch

from .config import StatsConfig
from .histogram import percentile as _percentile

_F64 = torch.float64


def chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al. merge of two (count, mean, M2) triples; counts broadcast over channels."""
    n = n_a + n_b
    safe = n.clamp_min(1).to(_F64)
    delta = mean_b - mean_a
    frac_b = n_b.to(_F64) / safe
    mean = mean_a + delta * frac_b
    m2 = m2_a + m2_b + delta * delta * n_a.to(_F64) * frac_b
    return n, mean, m2


@dataclass
class StatsState:
    """Per-(persona, channel) activation statistics. Shapes: P personas, C channels, B bins."""

    count: torch.Tensor      # [P] int64   tokens seen
    sum: torch.Tensor        # [P, C] f64
    mean: torch.Tensor       # [P, C] f64  Welford mean
    m2: torch.Tensor         # [P, C] f64  sum of squared deviations from the mean
    sumsq: torch.Tensor      # [P, C] f64  Wanda's ||X_j||^2
    sumabs: torch.Tensor     # [P, C] f64
    pos: torch.Tensor        # [P, C] int64 count of x > 0 (NPTI firing)
    min: torch.Tensor        # [P, C] f64  (+inf when empty)
    max: torch.Tensor        # [P, C] f64  (-inf when empty)
    absmax: torch.Tensor     # [P, C] f64
    samples: torch.Tensor    # [P] int64   samples (with at least one valid token) seen
    norm_mean: torch.Tensor  # [P, C] f64  mean over samples of the per-sample L2 norm
    norm_m2: torch.Tensor    # [P, C] f64
    hist: Optional[torch.Tensor] = None   # [P, C, B] int64
    edges: Optional[torch.Tensor] = None  # [B + 1] f32

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def empty(cls, num_channels: int, config: StatsConfig | None = None, device="cpu") -> "StatsState":
        config = config or StatsConfig()
        if not isinstance(num_channels, int) or num_channels < 1:
            raise ValueError(f"num_channels must be a positive int, got {num_channels!r}")
        P, C = config.num_personas, num_channels
        z = lambda: torch.zeros(P, C, dtype=_F64, device=device)  # noqa: E731
        hist = edges = None
        if config.histogram:
            edges = torch.tensor(config.edges, dtype=torch.float32, device=device)
            hist = torch.zeros(P, C, config.num_bins, dtype=torch.int64, device=device)
        return cls(
            count=torch.zeros(P, dtype=torch.int64, device=device), sum=z(), mean=z(), m2=z(), sumsq=z(), sumabs=z(),
            pos=torch.zeros(P, C, dtype=torch.int64, device=device),
            min=torch.full((P, C), math.inf, dtype=_F64, device=device),
            max=torch.full((P, C), -math.inf, dtype=_F64, device=device), absmax=z(),
            samples=torch.zeros(P, dtype=torch.int64, device=device), norm_mean=z(), norm_m2=z(),
            hist=hist, edges=edges,
        )

    # ---- shape --------------------------------------------------------------------------
    @property
    def num_personas(self) -> int:
        return self.sum.shape[0]

    @property
    def num_channels(self) -> int:
        return self.sum.shape[1]

    @property
    def device(self) -> torch.device:
        return self.sum.device

    @property
    def config(self) -> StatsConfig:
        return StatsConfig(self.num_personas, self.hist is not None,
                           None if self.edges is None else self.edges.tolist())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "StatsState":
        required = [f.name for f in fields(cls) if f.name not in ("hist", "edges")]
        missing = [k for k in required if k not in tensors]
        if missing:
            raise ValueError(f"statistics state is missing tensors {missing}")
        state = cls(**{k: tensors[k] for k in required}, hist=tensors.get("hist"), edges=tensors.get("edges"))
        state.check()
        return state

    def check(self) -> None:
        P, C = self.sum.shape
        for name, t in self.tensors().items():
            want = {"count": (P,), "samples": (P,), "edges": None, "hist": None}.get(name, (P, C))
            if want is not None and tuple(t.shape) != want:
                raise ValueError(f"statistics tensor {name!r} has shape {tuple(t.shape)}, expected {want}")
        if (self.hist is None) != (self.edges is None):
            raise ValueError("statistics state has a histogram without edges or edges without a histogram")
        if self.hist is not None and tuple(self.hist.shape) != (P, C, self.edges.numel() - 1):
            raise ValueError(f"histogram shape {tuple(self.hist.shape)} does not match edges ({self.edges.numel()})")

    def to(self, device) -> "StatsState":
        return StatsState(**{k: v.to(device) for k, v in self.tensors().items()})

    def clone(self) -> "StatsState":
        return StatsState(**{k: v.clone() for k, v in self.tensors().items()})

    # ---- merging ------------------------------------------------------------------------
    def _check_compatible(self, other: "StatsState") -> None:
        if self.sum.shape != other.sum.shape:
            raise ValueError(f"cannot merge statistics of shape {tuple(other.sum.shape)} into {tuple(self.sum.shape)} (personas, channels)")
        if (self.hist is None) != (other.hist is None):
            raise ValueError("cannot merge a state with a histogram and one without")
        if self.hist is not None and not torch.equal(self.edges.cpu(), other.edges.cpu()):
            raise ValueError("cannot merge histograms with different bin edges")

    def merge_(self, other: "StatsState") -> "StatsState":
        """Fold ``other`` into this state in place (exact: same as one pass over both)."""
        self._check_compatible(other)
        other = other.to(self.device)
        cnt = self.count.unsqueeze(1), other.count.unsqueeze(1)
        _, self.mean, self.m2 = chan_merge(cnt[0], self.mean, self.m2, cnt[1], other.mean, other.m2)
        smp = self.samples.unsqueeze(1), other.samples.unsqueeze(1)
        _, self.norm_mean, self.norm_m2 = chan_merge(smp[0], self.norm_mean, self.norm_m2, smp[1], other.norm_mean, other.norm_m2)
        self.count = self.count + other.count
        self.samples = self.samples + other.samples
        for name in ("sum", "sumsq", "sumabs", "pos"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.min = torch.minimum(self.min, other.min)
        self.max = torch.maximum(self.max, other.max)
        self.absmax = torch.maximum(self.absmax, other.absmax)
        if self.hist is not None:
            self.hist = self.hist + other.hist
        return self

    def merge(self, other: "StatsState") -> "StatsState":
        return self.clone().merge_(other)

    # ---- read-outs ----------------------------------------------------------------------
    def _per_token(self, t: torch.Tensor) -> torch.Tensor:
        n = self.count.unsqueeze(1).to(_F64)
        return torch.where(n > 0, t / n.clamp_min(1), torch.full_like(t, math.nan))

    def var(self, unbiased: bool = False) -> torch.Tensor:
        n = self.count.unsqueeze(1).to(_F64) - (1 if unbiased else 0)
        return torch.where(n > 0, self.m2 / n.clamp_min(1), torch.full_like(self.m2, math.nan))

    def std(self, unbiased: bool = False) -> torch.Tensor:
        return self.var(unbiased).sqrt()

    def abs_mean(self) -> torch.Tensor:
        return self._per_token(self.sumabs)

    def firing_prob(self) -> torch.Tensor:
        """NPTI's P = #(x > 0) / #tokens."""
        return self._per_token(self.pos.to(_F64))

    def wanda_norm(self) -> torch.Tensor:
        """Token-level L2 norm of each channel, sqrt(sum_t x_tj^2) (Wanda's statistic)."""
        return self.sumsq.sqrt()

    def sample_norm_mean(self) -> torch.Tensor:
        """Mean over samples of the per-sample L2 norm (the persona-subnetwork statistic)."""
        s = self.samples.unsqueeze(1)
        return torch.where(s > 0, self.norm_mean, torch.full_like(self.norm_mean, math.nan))

    def sample_norm_var(self, unbiased: bool = False) -> torch.Tensor:
        s = self.samples.unsqueeze(1).to(_F64) - (1 if unbiased else 0)
        return torch.where(s > 0, self.norm_m2 / s.clamp_min(1), torch.full_like(self.norm_m2, math.nan))

    def percentile(self, q: float, method: str = "reference") -> torch.Tensor:
        """q-th percentile (0..100) per (persona, channel) from the histogram."""
        if self.hist is None:
            raise ValueError("this state has no histogram; accumulate with StatsConfig(histogram=True)")
        return _percentile(self.hist, self.edges, q, method, lo=self.min, hi=self.max)

    def summary(self) -> dict:
        return {
            "personas": self.num_personas, "channels": self.num_channels,
            "tokens": self.count.tolist(), "samples": self.samples.tolist(),
            "histogram_bins": 0 if self.hist is None else self.hist.shape[-1],
        }
