"""Multi-objective asynchronous successive halving (MO-ASHA), as a Ray Tune scheduler.

Rungs sit at grace_period x reduction_factor^k epochs (below max_t). When a trial reaches a rung,
its objectives there are ranked against every trial recorded at that rung so far: by non-dominated
sorting (NSGA-II's fronts), and within a front by each trial's exclusive hypervolume contribution,
larger first: the hypervolume its front loses without it, measured from the report's fixed reference
point (accuracy 0; the dense model's cost, or the spec's `hypervolume_reference`; for another
minimised metric, the worst value recorded at the rung). So a trial is kept for what it adds to the
front the search is judged by; a front's extremes get no free pass (NSGA-II's crowding distance
counts them as infinitely far, which kept every new smallest model going however poor it was).
The trial stops if at least `going_on(n)` of the n recorded trials rank strictly ahead of it: n /
reduction_factor rounded down (ASHA's top k), but at least one; otherwise it goes on. So, as in
ASHA, the first trial at a rung always continues, a trial is stopped only by trials that are
clearly better, and at most the top 1/reduction_factor go on once a rung has a few trials.

The rungs' records are kept in the search folder (RUNGS_FILE) as they change (sharetune.search.rungs).

What the sampler is told about a stopped trial: its objectives at the rung where it stopped, as a
complete trial (Tune reports a stopped trial's last result to the searcher). That is a choice with
a bias: a stopped trial looks worse than it would have been trained in full, so the sampler leans
away from configurations that start slowly; telling it "pruned" instead would bias it the other way,
since NSGA-II and TPE would then learn nothing from most trials.
"""

from __future__ import annotations

import math

import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from sharetune.metrics import DENSE_COST, STEP, hypervolume, pareto_mask
from sharetune.search.rungs import KeptRungs, RungsFile
from sharetune.storage_filesystem import FileStore


def fronts(points: np.ndarray) -> list[np.ndarray]:
    """Non-dominated sorting of rows (all minimised): the indices of each front, best first. Rows of a
    diverged trial (all infinite) are on no Pareto front: together they are the last."""
    remaining = np.arange(len(points))
    minimised = [False] * points.shape[1]
    result = []
    while len(remaining):
        front = pareto_mask(points[remaining], minimised)
        if not front.any():
            return [*result, remaining]
        result.append(remaining[front])
        remaining = remaining[~front]
    return result


def contributions(points: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Each row's exclusive hypervolume (all minimised) from `reference`: what the rows lose without it.
    A row no better than the reference somewhere is clipped to it there."""
    minimised = [False] * points.shape[1]
    whole = hypervolume(points, minimised, reference)
    return np.array([whole - hypervolume(np.delete(points, i, axis=0), minimised, reference) for i in range(len(points))])


def going_on(recorded: int, reduction_factor: float) -> int:
    """How many of the `recorded` trials at a rung go on: the top 1/reduction_factor, rounded down as in
    ASHA, and at least one (the first trial at a rung has nothing to be compared with)."""
    return max(1, math.floor(recorded / reduction_factor))


def ranks_ahead(points: np.ndarray, reference: np.ndarray, index: int) -> int:
    """How many rows rank strictly ahead of row `index`: an earlier front, or its front and a larger
    contribution to that front's hypervolume."""
    earlier = 0
    for members in fronts(points):
        if index in members:  # only this front's contributions matter: later fronts rank behind
            contribution = contributions(points[members], reference)
            own = contribution[members == index]
            larger = (contribution > own) & ~np.isclose(contribution, own)  # not by rounding
            return earlier + int(larger.sum())
        earlier += len(members)
    raise IndexError(index)


class MOASHARungs(RungsFile):
    rungs: dict[int, dict[str, tuple[list[float], list[float]]]]  # rung -> trial id -> (its point, its bound)


class MOASHA(KeptRungs, FIFOScheduler):
    RUNGS_FILE = "sharetune-moasha.json"
    Rungs = MOASHARungs

    def __init__(self, objectives: dict[str, str], *, max_t: int, grace_period: int, reduction_factor: float,
                 reference: dict[str, float] | None = None, store: FileStore | None = None) -> None:
        super().__init__()
        self.keep_rungs_in(store)
        self.objectives, self.reference = dict(objectives), dict(reference or {})
        self.signs = np.array([-1.0 if mode == "max" else 1.0 for mode in objectives.values()])  # all minimised
        self.reduction_factor = reduction_factor
        rungs, rung = [], grace_period
        while rung < max_t:
            rungs.append(rung)
            rung = math.ceil(rung * reduction_factor)
        # rung -> trial id -> (its point, the reference it implies: see `bound`)
        self.rungs: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {r: {} for r in rungs}
        self.stopped = 0

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # the objectives come with the scheduler

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if STEP not in result or any(not isinstance(result.get(m), (int, float)) for m in self.objectives):
            return TrialScheduler.CONTINUE
        self.restore_rungs()
        epoch = result[STEP]
        rung = max((r for r in self.rungs if r <= epoch), default=None)
        if rung is None or trial.trial_id in self.rungs[rung]:
            return TrialScheduler.CONTINUE
        recorded = self.rungs[rung]
        point = self.signs * np.array([float(result[m]) for m in self.objectives])
        if not np.isfinite(point).all():  # a diverged value: the trial ranks behind every other
            point = np.full_like(point, np.inf)
        recorded[trial.trial_id] = point, self.bound(result)
        points = np.array([point for point, _ in recorded.values()])
        reference = np.max([bound for _, bound in recorded.values()], axis=0)
        stop = ranks_ahead(points, reference, len(points) - 1) >= going_on(len(points), self.reduction_factor)
        self.stopped += stop
        self.save_rungs()
        return TrialScheduler.STOP if stop else TrialScheduler.CONTINUE

    def _rung_state(self) -> dict:
        rungs = {rung: {trial: [point.tolist(), bound.tolist()] for trial, (point, bound) in recorded.items()}
                 for rung, recorded in self.rungs.items()}
        return {"rungs": rungs, "stopped": self.stopped}

    def _load_rungs(self, state: MOASHARungs) -> None:
        for rung, recorded in state.rungs.items():  # all checked before any is loaded
            if rung not in self.rungs:
                raise ValueError(f"rungs.{rung}: not one of this search's rungs ({', '.join(map(str, self.rungs))})")
            for trial, values in recorded.items():
                if any(len(value) != len(self.objectives) for value in values):
                    raise ValueError(f"rungs.{rung}.{trial}: a point and a bound of {len(self.objectives)} values (one per "
                                     f"objective), got {' and '.join(str(len(value)) for value in values)}")
        for rung, recorded in state.rungs.items():
            self.rungs[rung] = {trial: (np.array(point), np.array(bound)) for trial, (point, bound) in recorded.items()}
        self.stopped = state.stopped

    def bound(self, result: dict) -> np.ndarray:
        """The reference point this result implies, minimised; the rung's is the largest over its trials.
        A maximised metric: 0 (every metric here is at least 0). A cost: the spec's reference, else the
        dense model's cost. Another minimised metric: its own value (the rung's worst finite one)."""
        def one(metric: str, mode: str) -> float:
            if mode == "max":
                return 0.0
            if metric in self.reference:
                return self.reference[metric]
            value = float(result.get(DENSE_COST.get(metric, metric), result[metric]))
            return value if math.isfinite(value) else 0.0
        return np.array([one(metric, mode) for metric, mode in self.objectives.items()])

    def debug_string(self) -> str:
        counts = ", ".join(f"epoch {r}: {len(t)}" for r, t in self.rungs.items())
        return f"MOASHA on {', '.join(self.objectives)}: {self.stopped} stopped; trials per rung: {counts}"
