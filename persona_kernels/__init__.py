"""persona-kernels: fast kernels for persona subnetworks in transformers LLMs."""
from ._version import __version__
from ._native import BackendUnavailable
from .ops.accumulate_stats import NonFiniteActivationError, accumulate_stats
from .stats import StatsConfig, StatsState

__all__ = [
    "__version__", "BackendUnavailable", "NonFiniteActivationError", "accumulate_stats", "StatsConfig", "StatsState",
]
