"""Every metric a trial reports, as one typed record; the names Ray results, MLflow and reports use.

A trial's metrics have two producers: `model_costs` (sharetune.metrics.counts) measures what the
configuration costs before training, and `sharetune.training.train_epochs` fills one
`EpochMetrics` per epoch. `TrialMetrics` is both, flattened into one row per reported epoch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Iterable


def _numbers(*records) -> dict[str, float | int]:
    """Records as one flat name -> number map: flags as 0/1, metrics a model does not have left out."""
    values = {k: v for record in records for k, v in asdict(record).items()}
    return {k: int(v) if isinstance(v, bool) else v for k, v in values.items() if v is not None}


@dataclass(frozen=True)
class ModelCosts:
    """What a configuration stores and costs; fixed while it trains, so known (and reported, at epoch
    0) before its first batch."""

    unique_params: int  # what is stored and trained: a shared tensor once, an ArbNet table at its size
    virtual_params: int  # what the dense, unshared model of the same shapes holds
    macs: int  # multiply-adds per sample (fvcore's convention, as SPIN counts)
    effective_share_rate: float  # virtual / unique parameters (SPIN Table 7)
    entropy: float | None = None  # ArbNet: table-usage entropy in nats (eq. 7); None for other models

    def as_dict(self) -> dict[str, float | int]:
        return {STEP: 0, **_numbers(self)}


@dataclass(frozen=True)
class EpochMetrics:
    """One epoch of training and its evaluation."""

    epoch: int  # 1-based; the step of every metric in MLflow
    test_accuracy: float
    val_accuracy: float | None  # on the split held out of training for selection; None without one
    train_accuracy: float
    loss: float  # mean training loss over the epoch
    lr: float  # the learning rate the epoch's last update used
    epoch_seconds: float
    diverged: bool = False  # the loss turned NaN or infinite; training stopped
    unreadable_images: int | None = None  # an image folder's files skipped so far as undecodable (summed over a
    # multi-worker trial's ranks, each of which may meet one); None for sets in memory


@dataclass(frozen=True)
class TrialMetrics:
    """What a trial reports after each epoch."""

    costs: ModelCosts
    epoch: EpochMetrics

    def as_dict(self) -> dict[str, float | int]:
        return _numbers(self.epoch, self.costs)


STEP = "epoch"
# A cost's hypervolume reference, unless the spec sets one: the dense, unshared model's (for parameters
# its virtual count; MACs do not change with sharing), so it depends on the problem, not on the results.
DENSE_COST = {"unique_params": "virtual_params", "macs": "macs"}
COSTS = tuple(DENSE_COST)  # what reports trade accuracy against: a Pareto front each
CONSTRAINABLE = ("unique_params", "virtual_params", "macs", "effective_share_rate")  # every model has them
METRICS: tuple[str, ...] = tuple(f.name for part in (EpochMetrics, ModelCosts) for f in fields(part) if f.name != STEP)


def dense_reference(costs: Iterable[ModelCosts]) -> dict[str, float]:
    """Each front's reference cost for a search whose models have `costs` (those of its dimensions'
    extremes): the largest dense model's, known before anything trains."""
    costs = list(costs)
    return {cost: float(max(getattr(c, DENSE_COST[cost]) for c in costs)) for cost in COSTS}
