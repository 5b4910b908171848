"""What a search prints on the console: its top trials and its Pareto fronts, as text tables."""

from __future__ import annotations

import pandas as pd

from sharetune.metrics import COSTS
from sharetune.search.outcome import CUT, INFEASIBLE
from sharetune.search.report import ACCURACY, SETTINGS, TRAINED, Report, proposed
from sharetune.spaces import FAMILIES, SearchSpec
from sharetune.text import number

TOP = 5  # the trials the console shows


def _table(frame: pd.DataFrame) -> str:
    """A null setting (fusion: null, no transform groups) reads `none`, not pandas' NaN."""
    return frame.to_string(index=False, na_rep="none", float_format=number)


def top_trials(trials: pd.DataFrame, spec: SearchSpec) -> str:
    """The best trials (configurations, where seeds repeat) by the first objective, with every
    objective (mean and standard deviation over repeats), the costs and the searched settings."""
    first, mode = next(iter(spec.objectives.items()))
    trained = trials[trials["status"].isin(TRAINED)]  # not the unfinished (PENDING, RUNNING) nor the skipped
    cut = int((trials["status"] == CUT).sum())
    title = "top trials" + (f" (left out: {cut} the time limit cut short)" if cut else "")
    if trained.empty:
        return f"{title}: none trained to its end"
    ranked = trained.sort_values(first, ascending=mode == "min").head(TOP)
    units = FAMILIES[spec.family].COST_UNITS  # the costs beside the objectives, in the family's paper's units
    shown = {cost: units.get(cost, (cost, 1)) for cost in COSTS if cost in ranked and cost not in spec.objectives}
    costs = {column: ranked[cost] / scale for cost, (column, scale) in shown.items()}  # an objective shows as it is
    ranked = ranked.assign(**costs)
    objectives = [c for name in spec.objectives for c in (name, f"{name}_std") if c in trials]
    # a scheduler's early stop (or a divergence) leaves a trial's objectives from fewer epochs: say so beside them
    epochs = ["epochs_done"] if "epochs_done" in ranked and ranked["epochs_done"].nunique() > 1 else []
    columns = ["trial_id", "status", *epochs, "repeats", *objectives, *costs, *[c for c in spec.dimensions if c in trials]]
    return f"{title}:\n" + _table(ranked[[c for c in dict.fromkeys(columns) if c in ranked]])


def space_note(trials: pd.DataFrame, spec: SearchSpec) -> str | None:
    """A line where a finite space ran out before the budget did, so fewer trials trained than the
    progress counted on; None where the search stopped for another reason or trained them all."""
    planned, started = spec.planned_trials(), int(trials["trial_id"].notna().sum())
    if started >= planned or not spec.ran_out(proposed(trials)):  # Ctrl-C, the time limit, a continuous space
        return None
    distinct = spec.distinct_configurations()
    infeasible = int((trials["status"] == INFEASIBLE).sum())
    return (f"{started} of the {planned} planned trials: the space holds {distinct} configurations"
            + (f", {infeasible} of them outside the constraints," if infeasible else "") + " and the search proposed each once")


def unreadable_note(trials: pd.DataFrame) -> str | None:
    """A line where trials skipped images they could not decode (the warning that names them goes to
    the trial's own log, on its node); None where none did."""
    skipped = trials["unreadable_images"].max() if "unreadable_images" in trials else 0
    if not skipped > 0:  # NaN too: the sets in memory count none
        return None
    return (f"unreadable images: a trial skipped up to {int(skipped)} it could not decode (the metric unreadable_images; "
            "the trials' logs name the files)")


def front_table(front: pd.DataFrame, cost: str, searched: list[str]) -> str:
    return _table(front[[c for c in ("trial_id", ACCURACY, cost, *searched) if c in front]])


def fronts(report: Report) -> str:
    """Each non-empty front with its hypervolume and the settings its trials differ in, and a line
    for each front there is not."""
    trained = report.configurations[report.configurations["status"].isin(TRAINED)]
    searched = [c for c in trained if c in SETTINGS and trained[c].astype(str).nunique() > 1]
    shown = "".join(f"\nPareto front, {ACCURACY} against {cost} (hypervolume {report.hypervolume[cost]:.4f}):\n"
                    f"{front_table(front, cost, searched)}\n" for cost, front in report.fronts.items() if not front.empty)
    return shown + "".join(f"\nPareto front, {ACCURACY} against {cost}: none; {why}\n" for cost, why in report.skipped.items())
