from . import compact
from .config import StatsConfig
from .histogram import npti_edges, npti_reference_edges, percentile
from .state import StatsState, chan_merge

__all__ = ["compact", "StatsConfig", "StatsState", "chan_merge", "npti_edges", "npti_reference_edges", "percentile"]
