"""Pareto fronts and hypervolume for the trade-offs people compare (accuracy vs parameters, MACs)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from optuna._hypervolume import compute_hypervolume  # exported there, not in Optuna's documented API; Optuna is pinned


def _as_minimised(points: np.ndarray, maximize: Sequence[bool]) -> np.ndarray:
    signs = np.where(np.asarray(maximize), -1.0, 1.0)
    return np.asarray(points, dtype=float) * signs


def pareto_mask(points: np.ndarray, maximize: Sequence[bool]) -> np.ndarray:
    """True for points no other point dominates (at least as good everywhere, better somewhere)."""
    values = _as_minimised(points, maximize)
    finite = np.isfinite(values).all(axis=1)
    mask = finite.copy()
    for i in np.flatnonzero(finite):
        others = values[finite]
        dominated = np.any(np.all(others <= values[i], axis=1) & np.any(others < values[i], axis=1))
        mask[i] = not dominated
    return mask


def hypervolume(points: np.ndarray, maximize: Sequence[bool], reference: Sequence[float]) -> float:
    """Volume dominated by `points` and bounded by `reference` (a point worse than all of them), exact
    for any number of objectives (Optuna's WFG). A point past the reference somewhere counts up to it
    there; a point with a value that is not finite counts for nothing."""
    values = _as_minimised(points, maximize)
    ref = _as_minimised(np.asarray([reference]), maximize)[0]
    finite = values[np.isfinite(values).all(axis=1)]
    return float(compute_hypervolume(np.minimum(finite, ref), ref))
