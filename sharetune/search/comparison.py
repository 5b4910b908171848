"""The parent run's interactive comparison: accuracy against unique parameters and against MACs in
one self-contained HTML file (plotly, its script inlined: the MLflow UI renders it offline), with log
axes where the costs span decades, the Pareto front drawn, trials coloured by the main searched
setting, and each point's configuration and MLflow run on hover."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from mlflow.tracking import MlflowClient
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from sharetune.search.mlflow_logger import DIMENSION_PREFIX, DIMENSIONS_PARAM, trial_runs
from sharetune.search.report import ACCURACY, Report, legend_groups, spans_decades, trained

COMPARISON_FILE = "comparison.html"
PALETTE = qualitative.Plotly


def colour_column(table: pd.DataFrame, searched: list[str]) -> str | None:
    """The main searched setting: the first that varies (continuous ones are binned, as in legends),
    preferring one every trial has over a conditional one (a radius only the neighborhood hash takes)."""
    varying = [name for name in searched if name in table and table[name].nunique(dropna=False) > 1]
    return next((name for name in varying if table[name].notna().all()), next(iter(varying), None))


def hover_text(row: pd.Series, searched: list[str], runs: dict[str, str]) -> str:
    settings = "<br>".join(f"{name} = {row[name]:.4g}" if isinstance(row[name], float) else f"{name} = {row[name]}"
                           for name in searched if name in row and pd.notna(row[name]))
    run = runs.get(str(row["trial_id"]).split(",")[0], "none")
    return f"trial {row['trial_id']}<br>{ACCURACY} {row[ACCURACY]:.4f}<br>{settings}<br>MLflow run {run}"


def write_comparison(report: Report, searched: list[str], runs: dict[str, str], out: Path) -> Path | None:
    """`searched`: the spec's dimensions, in order; `runs`: trial id -> MLflow run id. None where no
    cost varies (nothing to compare)."""
    done = trained(report.configurations)
    costs = [cost for cost in report.fronts if not report.fronts[cost].empty]
    if done.empty or not costs:
        return None
    colour = colour_column(done, searched)
    groups = legend_groups(done[colour]) if colour else pd.Series("trials", index=done.index)
    fig = make_subplots(rows=1, cols=len(costs), shared_yaxes=True, subplot_titles=[f"against {c}" for c in costs])
    for col, cost in enumerate(costs, start=1):
        for index, group in enumerate(sorted(groups.unique())):
            rows = done[groups == group]
            fig.add_trace(go.Scatter(
                x=rows[cost], y=rows[ACCURACY], mode="markers", name=f"{colour} {group}" if colour else group,
                legendgroup=group, showlegend=col == 1, marker={"size": 9, "color": PALETTE[index % len(PALETTE)]},
                error_y={"array": rows[f"{ACCURACY}_std"]} if f"{ACCURACY}_std" in rows else None,
                hovertext=[hover_text(row, searched, runs) for _, row in rows.iterrows()], hoverinfo="text",
            ), row=1, col=col)
        front = report.fronts[cost]
        fig.add_trace(go.Scatter(x=front[cost], y=front[ACCURACY], mode="lines", line={"shape": "hv", "color": "black"},
                                 name="Pareto front", legendgroup="front", showlegend=col == 1, hoverinfo="skip"),
                      row=1, col=col)
        fig.update_xaxes(title_text=cost, type="log" if spans_decades(done[cost]) else "linear", row=1, col=col)
    fig.update_yaxes(title_text=ACCURACY, row=1, col=1)
    fig.update_layout(title=report.title or "accuracy against costs", template="plotly_white", height=520)
    path = out / COMPARISON_FILE
    fig.write_html(path, include_plotlyjs=True, full_html=True)
    return path


def log_comparison(report: Report, uri: str, parent_id: str) -> Path | None:
    """Write the comparison beside the report's files and log it at the top of the parent run's
    artifacts (one click from the run). The searched settings come from the parent run's params."""
    params = MlflowClient(uri).get_run(parent_id).data.params
    searched = params[DIMENSIONS_PARAM].split(",") if params.get(DIMENSIONS_PARAM) else \
        [key.removeprefix(DIMENSION_PREFIX) for key in params if key.startswith(DIMENSION_PREFIX)]  # runs logged without it: name order
    runs = {trial_id: run.info.run_id for trial_id, run in trial_runs(uri, parent_id).items()}
    path = write_comparison(report, searched, runs, report.files[0].parent)
    if path is not None:
        MlflowClient(uri).log_artifact(parent_id, str(path))
    return path
