"""Pareto fronts and hypervolume for the trade-offs people compare (accuracy vs parameters, MACs)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


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


def hypervolume_2d(points: np.ndarray, maximize: Sequence[bool], reference: Sequence[float]) -> float:
    """Area dominated by `points` and bounded by `reference` (a point worse than all of them)."""
    values = _as_minimised(points, maximize)
    ref = _as_minimised(np.asarray([reference]), maximize)[0]
    front = values[pareto_mask(points, maximize)]
    front = front[np.all(front < ref, axis=1)]
    front = front[np.argsort(front[:, 0])]
    area, last_y = 0.0, ref[1]
    for x, y in front:  # sweep along x; each point adds the strip below the previous point's y
        area += (ref[0] - x) * (last_y - y)
        last_y = y
    return float(area)
