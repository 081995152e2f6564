from .accumulate_stats import accumulate_stats

__all__ = ["accumulate_stats"]
