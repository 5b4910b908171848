"""Model metrics: unique and virtual parameter counts, multiply-adds per sample."""

from sharetune.metrics.counts import ParamCount, count_macs, count_params

__all__ = ["ParamCount", "count_macs", "count_params"]
