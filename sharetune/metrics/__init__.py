"""What a trial measures: parameter and MAC counts, the trial's metric record, Pareto fronts."""

from sharetune.metrics.counts import ParamCount, count_macs, count_params, model_costs
from sharetune.metrics.pareto import hypervolume, pareto_mask
from sharetune.metrics.record import (
    CONSTRAINABLE,
    COSTS,
    DENSE_COST,
    METRICS,
    STEP,
    EpochMetrics,
    ModelCosts,
    TrialMetrics,
    dense_reference,
)

__all__ = [
    "CONSTRAINABLE", "COSTS", "DENSE_COST", "METRICS", "STEP", "EpochMetrics", "ModelCosts", "ParamCount", "TrialMetrics", "count_macs", "count_params",
    "dense_reference", "hypervolume", "model_costs", "pareto_mask",
]
