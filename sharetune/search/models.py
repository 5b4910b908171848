"""The models people take away: each configuration on the final Pareto front (the best one, for one
objective), ranked as the report ranks them (by the mean over their seeds, where seeds repeat), as its
best seed's MLflow model in that trial's child run, built as `sharetune export` builds one (fused layers
folded, ArbNet indices recomputed), with a signature, an input example, and its classes and
preprocessing as the model's metadata."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import mlflow
import mlflow.pytorch
import pandas as pd
import torch
from mlflow.entities import Run
from mlflow.environment_variables import MLFLOW_TRACKING_URI
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from sharetune.metrics import pareto_mask
from sharetune.search.export import SearchExport
from sharetune.search.report import TRAINED, configurations, converged
from sharetune.search.storage import SearchFolder
from sharetune.spaces import SearchSpec
from sharetune.trainables import load_exported, read_exported

MODEL_NAME = "model"  # the artifact path inside the child run: runs:/<run id>/model
# in the model's MLmodel file: what its outputs mean and how raw examples become its inputs
MODEL_METADATA = ("classes", "preprocessing")
MODEL_TAG = "sharetune.model_uri"  # on a child run whose model is logged: each trial's once, however often resumed


def front_trials(trials: pd.DataFrame, spec: SearchSpec) -> list[str]:
    """The trials worth keeping: for each configuration no other dominates on the spec's objectives
    (one objective: the best), among those that trained to their end without diverging, its seed with
    the best first objective. Where seeds repeat, configurations are compared by their means, as the
    report, the summary and the sampler compare them."""
    trained = trials[trials["status"].isin(TRAINED)]
    table = converged(configurations(trained).dropna(subset=list(spec.objectives)))
    points = table[list(spec.objectives)].to_numpy(float)
    front = table["trial_id"][pareto_mask(points, [mode == "max" for mode in spec.objectives.values()])]
    first, mode = next(iter(spec.objectives.items()))
    value = trained.set_index("trial_id")[first]
    return [(max if mode == "max" else min)(seeds.split(","), key=value.__getitem__) for seeds in front]


@contextlib.contextmanager
def tracking_at(uri: str) -> Iterator[None]:
    """MLflow's fluent API (start_run, log_model, load_model) at `uri` for a while. `set_tracking_uri`
    also exports the URI to the environment, where every later subprocess (a search started from the
    same Python process) would inherit it: both are restored afterwards."""
    before = MLFLOW_TRACKING_URI.get()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # None unsets the variable


def log_front_models(folder: SearchFolder, spec: SearchSpec, trials: pd.DataFrame, uri: str,
                     runs: dict[str, Run]) -> tuple[dict[str, str], list[str]]:
    """Log each front trial's model into its child run (`runs`: trial id -> run, sharetune.search.trial_runs),
    and delete the models of trials no longer on it (logged when the search was interrupted). Returns each
    logged trial's model URI, and a line for each front trial without a model to log (it saved no checkpoint)."""
    requirements = [f"torch=={version('torch')}", f"timm=={version('timm')}", f"sharetune=={version('sharetune')}"]
    logged, missing = {}, []
    export, client = SearchExport(folder), MlflowClient(uri)
    front = front_trials(trials, spec)
    for trial_id, run in runs.items():
        if trial_id not in front and MODEL_TAG in run.data.tags:
            client.delete_tag(run.info.run_id, MODEL_TAG)  # first: a tag never names a deleted model
            with contextlib.suppress(MlflowException):  # deleted already (in the UI, say): nothing left to do
                client.delete_logged_model(run.data.tags[MODEL_TAG].removeprefix("models:/"))
    with tempfile.TemporaryDirectory() as scratch, tracking_at(uri):
        for trial_id in front:
            if trial_id not in runs:
                continue
            earlier = runs[trial_id].data.tags.get(MODEL_TAG)  # a resumed search's finished trial
            if earlier is not None:
                logged[trial_id] = earlier
                continue
            path = Path(scratch) / f"{trial_id}.pt"
            try:
                export(trial_id, path)
            except ValueError as err:
                missing.append(str(err).removeprefix("--trial: "))
                continue
            model, record = load_exported(path), read_exported(path)
            example = torch.zeros(2, *record["input_shape"])
            with torch.no_grad():
                output = model(example).numpy()
            with mlflow.start_run(run_id=runs[trial_id].info.run_id):
                info = mlflow.pytorch.log_model(model, name=MODEL_NAME, signature=infer_signature(example.numpy(), output),
                                                input_example=example.numpy(), pip_requirements=requirements,
                                                metadata={key: record.get(key) for key in MODEL_METADATA},
                                                serialization_format="pickle")  # ArbNet's table kernels do not trace
            client.set_tag(runs[trial_id].info.run_id, MODEL_TAG, info.model_uri)
            logged[trial_id] = info.model_uri
    return logged, missing
