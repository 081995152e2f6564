"""Configuration of the activation-statistics state."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Optional

from .histogram import npti_edges, validate_edges


@dataclass
class StatsConfig:
    """What one statistics state tracks.

    num_personas: personas accumulated side by side (segment ids index them).
    histogram:    also keep a fixed-bin histogram per (persona, channel) for percentiles.
    edges:        histogram bin edges (default: NPTI's -inf, 0.00, 0.01, ..., 3.00, +inf).
    """

    num_personas: int = 1
    histogram: bool = False
    edges: Optional[list] = field(default=None)

    def __post_init__(self):
        if not isinstance(self.num_personas, int) or isinstance(self.num_personas, bool) or self.num_personas < 1:
            raise ValueError(f"num_personas must be a positive int, got {self.num_personas!r}")
        if self.histogram:
            self.edges = [float(e) for e in (self.edges if self.edges is not None else npti_edges())]
            validate_edges(self.edges)
        elif self.edges is not None:
            raise ValueError("edges were given but histogram=False")

    @property
    def num_bins(self) -> int:
        return len(self.edges) - 1 if self.histogram else 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), allow_nan=True)

    @classmethod
    def from_json(cls, text: str) -> "StatsConfig":
        return cls(**json.loads(text))
