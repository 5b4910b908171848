"""Parameter and MAC counts, and Pareto fronts with their hypervolume."""

from sharetune.metrics.counts import ParamCount, count_macs, count_params
from sharetune.metrics.pareto import hypervolume_2d, pareto_mask

__all__ = ["ParamCount", "count_macs", "count_params", "hypervolume_2d", "pareto_mask"]
