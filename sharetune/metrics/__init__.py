"""Model metrics: parameter and MAC counts (more: entropy, CKA, Pareto fronts)."""

from sharetune.metrics.counts import ParamCount, count_macs, count_params

__all__ = ["ParamCount", "count_macs", "count_params"]
