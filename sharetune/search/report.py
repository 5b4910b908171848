"""Reports: every trial as a table, Pareto fronts with hypervolume, and the papers' plots.

Source: a search folder (Tune's state) or an MLflow experiment name (its latest search's child runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; works without a display
import matplotlib.pyplot as plt
import matplotlib.ticker
import pandas as pd
from mlflow.tracking import MlflowClient

from sharetune.analysis.figures import save_figure
from sharetune.errors import without_passwords
from sharetune.metrics import COSTS, DENSE_COST, METRICS, STEP, hypervolume, pareto_mask
from sharetune.search.mlflow_logger import (
    CUT_TAG,
    DATASET_PARAM,
    DUPLICATE_TAG,
    ERROR_TAG,
    KIND_TAG,
    NAME_PARAM,
    REFERENCE_PREFIX,
    TRIAL_TAG,
    tracking_uri,
)
from sharetune.search.mlflow_queue import MOST_RUNS, SEARCH_TAG, child_runs
from sharetune.search.outcome import CUT, DUPLICATE, FAILED, FINISHED, INFEASIBLE, cut_short, failed_trials
from sharetune.search.searcher import CONFIGURATION, duplicate_of
from sharetune.search.storage import DUPLICATE_KIND, SearchFolder
from sharetune.spaces import FAMILIES
from sharetune.text import number

ACCURACY = "test_accuracy"
LEGEND_GROUPS = 4  # continuous settings are binned to this many legend entries


@dataclass
class Report:
    trials: pd.DataFrame
    configurations: pd.DataFrame  # a row per configuration (repeats as mean and _std); `trials` without repeats
    title: str = ""  # the search and its data, on every plot
    fronts: dict[str, pd.DataFrame] = field(default_factory=dict)  # cost -> front rows
    hypervolume: dict[str, float] = field(default_factory=dict)  # cost -> normalised hypervolume
    skipped: dict[str, str] = field(default_factory=dict)  # cost -> why it has no front
    files: list[Path] = field(default_factory=list)


def trials_from_folder(folder: SearchFolder | str | Path) -> pd.DataFrame:
    """One row per trial: its settings (config) and its last reported metrics, side by side (and the
    error line of one that failed); then a row per proposal answered without training (status
    INFEASIBLE, with its costs, or DUPLICATE)."""
    folder = SearchFolder(folder)
    trials = folder.tune_trials()
    if not trials and not folder.skipped():
        raise FileNotFoundError(f"{folder}: the search has saved no trials yet")
    failed = failed_trials(folder, trials)
    rows = []
    for trial in trials:
        last = trial.last_result or {}
        status = FAILED if trial.trial_id in failed else CUT if trial.status == FINISHED and cut_short(trial) else trial.status
        rows.append({"trial_id": trial.trial_id, "status": status,
                     "error": failed.get(trial.trial_id), "epochs_done": last.get(STEP, 0),
                     "node_id": last.get("node_id", last.get("node_ip")), **trial.config,
                     **_metric_columns(last)})
    for entry in folder.skipped():
        first = {"duplicate_of": duplicate_of(entry)} if entry["kind"] == DUPLICATE_KIND else {}
        rows.append({"trial_id": None, "status": entry["kind"].upper(), "error": None, "epochs_done": 0, **entry["config"],
                     **_metric_columns(entry.get("costs", {})), **first})
    table = pd.DataFrame(rows)
    for column in ("seed", CONFIGURATION):  # whole numbers, though proposals answered without training have no seed
        if column in table:
            table[column] = table[column].astype("Int64")
    return table


SETTINGS = {name for family in FAMILIES.values() for name in family.model_fields}


def _metric_columns(metrics: dict) -> dict:
    """The last value of every metric, beside the settings without overwriting one: a metric named
    like a setting (`lr`, the last epoch's rate; the setting is the initial one) is `final_<name>`."""
    return {f"final_{m}" if m in SETTINGS else m: metrics.get(m, math.nan) for m in METRICS}


def _search_parents(client: MlflowClient, experiment_id: str, most: int = MOST_RUNS) -> list:
    """The parent runs of the experiment's searches, newest first."""
    return client.search_runs([experiment_id], f"tags.`{SEARCH_TAG}` != ''", order_by=["attributes.start_time DESC"],
                              max_results=most)


def search_folders(experiment: str, uri: str | None = None) -> list[str]:
    """The folders of the experiment's searches (their parent runs' tag), newest first."""
    client = MlflowClient(tracking_uri(uri))
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else [parent.data.tags[SEARCH_TAG] for parent in _search_parents(client, found.experiment_id)]


def trials_from_mlflow(experiment: str, uri: str | None = None) -> tuple[pd.DataFrame, str]:
    """The child runs of the experiment's latest search, and that search's parent run id."""
    client = MlflowClient(tracking_uri(uri))
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"experiment: no MLflow experiment {experiment!r} in {without_passwords(client.tracking_uri)}")
    parents = _search_parents(client, found.experiment_id, most=1)
    if not parents:
        raise ValueError(f"experiment: {experiment!r} has no sharetune search runs")
    parent_id = parents[0].info.run_id
    runs = child_runs(client, found.experiment_id, parent_id)
    if not runs:
        raise ValueError(f"experiment: the newest search in {experiment!r} ({parents[0].data.tags[SEARCH_TAG]}) "
                         "has saved no trials yet")
    rows = [{"trial_id": r.data.tags.get(TRIAL_TAG), "status": _tune_status(r), "error": r.data.tags.get(ERROR_TAG),
             **{k: _number(v) for k, v in r.data.params.items()}, **_metric_columns(r.data.metrics),
             **({"duplicate_of": r.data.tags[DUPLICATE_TAG]} if DUPLICATE_TAG in r.data.tags else {})}
            for r in runs]
    return pd.DataFrame(rows), parent_id


def _tune_status(run) -> str:
    """A child run's status as the folder's table has it: a proposal answered without training as its
    kind, a trial that raised as failed, one that diverged (MLflow's FAILED without an error: it
    trained, and stopped) as finished."""
    if KIND_TAG in run.data.tags:
        return run.data.tags[KIND_TAG].upper()
    if ERROR_TAG in run.data.tags:
        return FAILED
    if CUT_TAG in run.data.tags:
        return CUT
    return FINISHED if run.info.status in ("FINISHED", "FAILED") else run.info.status


def _number(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return None if text == "None" else text


TRAINED = (FINISHED,)  # the status of a trial that trained to its end (or diverged), from either source
SKIPPED = (INFEASIBLE, DUPLICATE)  # proposals the searcher answered without training (benchmarks leave them out)


def trained(table: pd.DataFrame) -> pd.DataFrame:
    """The rows that trained to their end and report an accuracy (a diverged one too: its NaN is kept)."""
    return table[table["status"].isin(TRAINED)].dropna(subset=[ACCURACY])


def converged(table: pd.DataFrame) -> pd.DataFrame:
    """The rows whose training did not diverge."""
    return table[table["diverged"].fillna(0) == 0] if "diverged" in table else table


def proposed(trials: pd.DataFrame) -> int:
    """How many different configurations the searcher proposed: those trained (or training) and those
    outside the constraints (a duplicate proposes none anew)."""
    return int(trials.loc[trials["status"] != DUPLICATE, CONFIGURATION].nunique()) if CONFIGURATION in trials else 0


def configurations(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration: the trials of its repeats (seeds) as the mean of each metric, with
    `<metric>_std` (sample standard deviation) and `repeats` (how many trained). Tables without
    repeats come back unchanged."""
    trained = trials[trials["status"].isin(TRAINED)]
    if CONFIGURATION not in trials or not trained[CONFIGURATION].duplicated().any():
        return trials
    metrics = [c for c in _metric_columns({}) if c in trained]
    groups = trained.sort_values("seed", kind="stable").groupby(CONFIGURATION, sort=False)  # seeds in order, resumed or not
    table = groups.first()
    table[metrics] = groups[metrics].mean()
    spread = groups[metrics].std().add_suffix("_std")
    table = pd.concat([table, spread], axis=1)
    table["repeats"] = groups.size()
    table["trial_id"] = groups["trial_id"].agg(",".join)
    table["seed"] = groups["seed"].agg(lambda seeds: ",".join(str(int(seed)) for seed in seeds))
    rest = trials[~trials["status"].isin(TRAINED)]
    return pd.concat([table.reset_index(), rest], ignore_index=True)


def reference_cost(trials: pd.DataFrame, cost: str, reference: dict[str, float] | None = None) -> float:
    """The spec's reference cost for `cost`, else the dense model's (the largest one searched)."""
    if reference and cost in reference:
        return float(reference[cost])
    return float(trials[DENSE_COST[cost]].max())


def pareto(trials: pd.DataFrame, cost: str, reference: dict[str, float] | None = None) -> tuple[pd.DataFrame, float]:
    """Front of accuracy against `cost`, and its hypervolume normalised to [0, 1] by the box from
    the reference point (accuracy 0, `reference_cost`) to (accuracy 1, cost 0)."""
    usable = converged(trials).dropna(subset=[ACCURACY, cost])
    if usable.empty:
        return usable, 0.0
    points = usable[[ACCURACY, cost]].to_numpy(float)
    mask = pareto_mask(points, [True, False])
    ceiling = reference_cost(usable, cost, reference)
    volume = hypervolume(points, [True, False], (0.0, ceiling)) / ceiling
    return usable[mask].sort_values(cost), volume


def legend_groups(values: pd.Series) -> pd.Series:
    """Readable legend labels: a continuous setting in LEGEND_GROUPS ranges (2 significant digits), values to 3."""
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.isna().any() or numeric.nunique() <= LEGEND_GROUPS:
        return values.map(lambda v: f"{v:.3g}" if isinstance(v, float) else str(v))
    bins = pd.qcut(numeric, LEGEND_GROUPS, duplicates="drop")
    return bins.map(lambda b: f"{max(b.left, numeric.min()):.2g}-{b.right:.2g}").astype(str)


def _label(trials: pd.DataFrame) -> str | None:
    """What distinguishes SPIN trials in the papers' tables."""
    for column in ("variant", "fusion", "transform_groups", "mapping", "share_rate", "hash"):
        if column in trials and trials[column].nunique(dropna=False) > 1:
            return column
    return None


def _error_bars(rows: pd.DataFrame) -> pd.Series | None:
    """The accuracy's standard deviation over repeated seeds, where the rows have one."""
    column = f"{ACCURACY}_std"
    return rows[column].fillna(0) if column in rows else None


def _accuracy_axis(rows: pd.DataFrame) -> str:
    """The accuracy axis' label: what a point and its bar are where seeds repeat."""
    if "repeats" not in rows or rows["repeats"].max() <= 1:
        return ACCURACY
    return f"{ACCURACY}: mean ± sample std over {int(rows['repeats'].max())} seeds"


def spans_decades(values: pd.Series) -> bool:
    """Whether positive values span a factor of ten or more: sizes like that read on a log axis."""
    values = pd.to_numeric(values, errors="coerce").dropna()
    return bool(len(values)) and values.min() > 0 and values.max() >= 10 * values.min()


def _cost_axis(ax, values: pd.Series) -> None:
    if spans_decades(values):
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap on short ranges


def _title(report_title: str, what: str) -> str:
    return f"{report_title}\n{what}" if report_title else what


def _plot_front(trials: pd.DataFrame, front: pd.DataFrame, cost: str, path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(trials[cost], trials[ACCURACY], yerr=_error_bars(trials), fmt="o", ms=4, alpha=0.5, capsize=2,
                label="configurations" if "repeats" in trials else "trials")
    ax.step(front[cost], front[ACCURACY], where="post", color="C3", marker="o", label="Pareto front")
    _cost_axis(ax, trials[cost])
    ax.set(xlabel=cost, ylabel=_accuracy_axis(trials), title=_title(title, f"{ACCURACY} against {cost}"))
    ax.legend()
    save_figure(fig, path)


def _plot_lines(trials: pd.DataFrame, x: str, path: Path, log: bool, title: str) -> None:
    """Accuracy against `x`, one line per sparsity (ArbNet Figures 2-4)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    groups = trials.groupby(legend_groups(trials["sparsity"])) if "sparsity" in trials else [("all", trials)]
    for sparsity, group in groups:
        group = group.sort_values(x)
        ax.errorbar(group[x], group[ACCURACY], yerr=_error_bars(group), marker="o", capsize=2, label=f"sparsity {sparsity}")
    if log:
        ax.set_xscale("log")
    ax.set(xlabel=x, ylabel=_accuracy_axis(trials), title=_title(title, f"{ACCURACY} against {x}"))
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _plot_labelled(trials: pd.DataFrame, label: str, path: Path, title: str) -> None:
    """Accuracy against unique parameters per topology / fusion / variant (SPIN Tables 1-5)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for value, group in trials.groupby(legend_groups(trials[label])):
        ax.errorbar(group["unique_params"], group[ACCURACY], yerr=_error_bars(group), fmt="o", capsize=2,
                    label=f"{label} {value}")
    _cost_axis(ax, trials["unique_params"])
    ax.set(xlabel="unique_params", ylabel=_accuracy_axis(trials), title=_title(title, f"{ACCURACY} against parameters, by {label}"))
    ax.legend(fontsize=7)
    save_figure(fig, path)


def build_report(trials: pd.DataFrame, out: str | Path, reference: dict[str, float] | None = None,
                 title: str = "") -> Report:
    """Write trials.csv/.parquet, fronts and plots under `out`; `reference`: the spec's reference
    costs for the hypervolume (default: the dense model's); `title`: the search and its data."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(trials, configurations(trials), title=title)
    trials.to_csv(out / "trials.csv", index=False)
    # Parquet columns need one type: a choice of None and strings is stored as text
    trials.astype({c: str for c in trials.columns if trials[c].dtype == object}).to_parquet(out / "trials.parquet", index=False)
    report.files += [out / "trials.csv", out / "trials.parquet"]
    if report.configurations is not trials:  # repeated seeds: the fronts and plots are of their means
        report.configurations.to_csv(out / "configurations.csv", index=False)
        report.files.append(out / "configurations.csv")
    done = trained(report.configurations)
    for cost in COSTS:
        if done.empty:  # a hypervolume of 0 would read as a result
            report.skipped[cost] = "no trial trained to its end: nothing to plot or measure"
            continue
        if cost in done and done[cost].nunique() == 1:
            report.skipped[cost] = (f"every trial has {cost} {number(done[cost].iloc[0])}: no trade-off against it to plot "
                                    f"or measure")
            continue
        front, volume = pareto(done, cost, reference)
        report.fronts[cost], report.hypervolume[cost] = front, volume
        if not front.empty:
            _plot_front(done, front, cost, out / f"pareto_{cost}.png", title)
            report.files.append(out / f"pareto_{cost}.png")
    healthy = converged(done)
    for x, log in (("alpha", True), ("entropy", False), ("radius", False)):
        if x in healthy and healthy[x].dropna().nunique() > 1 and ("alpha" in healthy or x != "entropy"):
            _plot_lines(healthy.dropna(subset=[x]), x, out / f"accuracy_vs_{x}.png", log, title)
            report.files.append(out / f"accuracy_vs_{x}.png")
    label = _label(healthy)
    if label is not None:
        _plot_labelled(healthy, label, out / f"accuracy_vs_params_by_{label}.png", title)
        report.files.append(out / f"accuracy_vs_params_by_{label}.png")
    if "family" in healthy and (healthy["family"] == "spin").any():
        report.files += paper_table(healthy, label, out)
    return report


def paper_table(trials: pd.DataFrame, label: str | None, out: Path) -> list[Path]:
    """SPIN's kind of table: one row per trial (or configuration), what distinguishes it, parameters
    in millions, MACs in billions, accuracy in percent (as the paper gives it); as CSV and Markdown."""
    accuracies = [c for c in ("val_accuracy", ACCURACY) if c in trials and trials[c].notna().any()]
    (_, million), (_, billion) = (FAMILIES["spin"].COST_UNITS[cost] for cost in ("unique_params", "macs"))
    table = pd.DataFrame({
        label or "trial": trials[label] if label else trials["trial_id"],
        "params (M)": (trials["unique_params"] / million).round(3), "MACs (G)": (trials["macs"] / billion).round(3),
        **{f"{name} (%)": (100 * trials[name]).round(2) for name in accuracies}})
    table = table.sort_values("params (M)", ascending=False)
    table.to_csv(out / "spin_table.csv", index=False)
    (out / "spin_table.md").write_text(table.to_markdown(index=False) + "\n")
    return [out / "spin_table.csv", out / "spin_table.md"]


def search_title(name: str, dataset: str) -> str:
    """What every plot of a search's report is titled."""
    return f"{name} on {dataset}"


def parent_context(uri: str, parent_id: str) -> tuple[dict[str, float], str]:
    """What a search's parent run records of its spec for a report: the reference costs
    (`hypervolume_reference`) and the title."""
    params = MlflowClient(uri).get_run(parent_id).data.params
    reference = {k.removeprefix(REFERENCE_PREFIX): float(v) for k, v in params.items() if k.startswith(REFERENCE_PREFIX)}
    return reference, search_title(params.get(NAME_PARAM, "?"), params.get(DATASET_PARAM, "?"))


def log_report(report: Report, uri: str, parent_id: str) -> None:
    """Attach the report to the search's parent run."""
    client = MlflowClient(uri)
    for path in report.files:
        client.log_artifact(parent_id, str(path), artifact_path="report")
    for cost, volume in report.hypervolume.items():
        client.log_metric(parent_id, f"hypervolume_{cost}", volume)
    for name, value in best_configuration(report).items():
        client.log_metric(parent_id, name, value)


def best_configuration(report: Report) -> dict[str, float]:
    """Where seeds repeat: the accuracies of the configuration with the best mean val accuracy (test
    accuracy without a val split), as mean and standard deviation over its seeds."""
    table = report.configurations
    if "repeats" not in table:
        return {}
    ranking = "val_accuracy" if table.get("val_accuracy", pd.Series(dtype=float)).notna().any() else ACCURACY
    done = table.dropna(subset=[ranking])
    if done.empty:
        return {}
    best = done.loc[done[ranking].idxmax()]
    return {f"best_{name}_{part}": float(best[name if part == "mean" else f"{name}_std"])
            for name in dict.fromkeys([ranking, ACCURACY]) for part in ("mean", "std")}
