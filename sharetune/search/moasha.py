"""Multi-objective asynchronous successive halving (MO-ASHA), as a Ray Tune scheduler.

Rungs sit at grace_period x reduction_factor^k epochs (below max_t). When a trial reaches a rung,
its objectives there are ranked against every trial recorded at that rung so far: by non-dominated
sorting (NSGA-II's fronts), and within a front by crowding distance, larger first (a front's two
extremes count as infinitely far, so they are kept before its middle). The trial stops if at least
`going_on(n)` of the n recorded trials rank strictly ahead of it: n / reduction_factor rounded down
(ASHA's top k), but at least one; otherwise it goes on. So, as in ASHA, the first trial at a rung
always continues, a trial is stopped only by trials that are clearly better, and at most the top
1/reduction_factor go on once a rung has a few trials.

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

from sharetune.metrics import STEP


def fronts(points: np.ndarray) -> list[np.ndarray]:
    """Non-dominated sorting of rows (all minimised): the indices of each front, best first."""
    remaining = np.arange(len(points))
    result = []
    while len(remaining):
        values = points[remaining]
        dominated = np.array([np.any(np.all(values <= v, axis=1) & np.any(values < v, axis=1)) for v in values])
        result.append(remaining[~dominated])
        remaining = remaining[dominated]
    return result


def crowding(points: np.ndarray) -> np.ndarray:
    """NSGA-II's crowding distance of each row within its front (the extremes: infinity)."""
    distance = np.zeros(len(points))
    for column in points.T:
        order = np.argsort(column, kind="stable")
        span = column[order[-1]] - column[order[0]]
        distance[order[[0, -1]]] = np.inf
        if span > 0 and len(points) > 2:
            distance[order[1:-1]] += (column[order[2:]] - column[order[:-2]]) / span
    return distance


def going_on(recorded: int, reduction_factor: float) -> int:
    """How many of the `recorded` trials at a rung go on: the top 1/reduction_factor, rounded down as in
    ASHA, and at least one (the first trial at a rung has nothing to be compared with)."""
    return max(1, math.floor(recorded / reduction_factor))


def ranks_ahead(points: np.ndarray, index: int) -> int:
    """How many rows rank strictly ahead of row `index`: an earlier front, or its front and farther apart."""
    front_of, distance = np.empty(len(points), int), np.empty(len(points))
    for rank, members in enumerate(fronts(points)):
        front_of[members], distance[members] = rank, crowding(points[members])
    ahead = (front_of < front_of[index]) | ((front_of == front_of[index]) & (distance > distance[index]))
    return int(ahead.sum())


class MOASHA(FIFOScheduler):
    def __init__(self, objectives: dict[str, str], *, max_t: int, grace_period: int = 1, reduction_factor: float = 3,
                 time_attr: str = STEP) -> None:
        super().__init__()
        self.objectives = dict(objectives)
        self.signs = np.array([-1.0 if mode == "max" else 1.0 for mode in objectives.values()])  # all minimised
        self.reduction_factor, self.time_attr = reduction_factor, time_attr
        rungs, rung = [], grace_period
        while rung < max_t:
            rungs.append(rung)
            rung = math.ceil(rung * reduction_factor)
        self.rungs: dict[int, dict[str, np.ndarray]] = {r: {} for r in rungs}  # rung -> trial id -> its point
        self.stopped = 0

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # the objectives come with the scheduler

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if self.time_attr not in result or any(not isinstance(result.get(m), (int, float)) for m in self.objectives):
            return TrialScheduler.CONTINUE
        epoch = result[self.time_attr]
        rung = max((r for r in self.rungs if r <= epoch), default=None)
        if rung is None or trial.trial_id in self.rungs[rung]:
            return TrialScheduler.CONTINUE
        recorded = self.rungs[rung]
        recorded[trial.trial_id] = self.signs * np.array([float(result[m]) for m in self.objectives])
        points = np.array(list(recorded.values()))
        if ranks_ahead(points, len(points) - 1) >= going_on(len(points), self.reduction_factor):
            self.stopped += 1
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def debug_string(self) -> str:
        counts = ", ".join(f"epoch {r}: {len(t)}" for r, t in self.rungs.items())
        return f"MOASHA on {', '.join(self.objectives)}: {self.stopped} stopped; trials per rung: {counts}"
