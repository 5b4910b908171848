"""Results people use: the parent run's interactive comparison, rendered by a real browser from a
real MLflow server, and the front trials as MLflow models that predict as the trials do."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import mlflow.pytorch
import numpy as np
import pandas as pd
import pytest
import ray
import torch
from helpers import start_local_ray, tiny_spec
from mlflow.tracking import MlflowClient

from sharetune.search import report, tuner
from sharetune.search.comparison import log_comparison
from sharetune.search.export import export
from sharetune.search.mlflow_logger import trial_runs
from sharetune.search.mlflow_ui import MODEL_TRAINING_VIEW, ui_link
from sharetune.search.models import front_trials, log_front_models, tracking_at
from sharetune.search.storage import SearchFolder
from sharetune.spaces import parse_spec
from sharetune.trainables import load_exported, load_preprocessing

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


pytestmark = pytest.mark.xdist_group("test_results")  # one worker builds the module's searches once


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished multi-objective search whose table sizes span decades, reported and logged."""
    tmp = tmp_path_factory.mktemp("results")
    start_local_ray()
    try:
        spec = parse_spec(tiny_spec(
            objectives={"test_accuracy": "max", "unique_params": "min"}, sampler="grid", budget={"max_concurrent": 2},
            fixed={"epochs": 2, "hidden": [16], "hash": "uniform"},
            dimensions={"table_size": {"choice": [8, 64, 1024]}, "lr": {"choice": [0.1, 1e-9]}}))
        result = tuner.run(spec, storage=str(tmp / "results"), mlflow_uri=f"sqlite:///{tmp}/mlflow.db", progress=False)
    finally:
        ray.shutdown()
    trials = report.trials_from_folder(result.folder)
    built = report.build_report(trials, tmp / "report", title="tiny on synthetic")
    parent = MlflowClient(result.mlflow_uri).search_runs(
        [MlflowClient(result.mlflow_uri).get_experiment_by_name("tiny").experiment_id], "tags.`sharetune.search_path` != ''")[0]
    return result, trials, built, parent.info.run_id, tmp


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here: `make test` installs Debian's chromium where it can")
def test_the_comparison_renders_every_trial_in_a_browser_from_the_mlflow_server(finished):
    result, trials, built, parent_id, tmp = finished
    path = log_comparison(built, result.mlflow_uri, parent_id)
    html = path.read_text()
    assert "Pareto front" in html and '"type":"log"' in html  # 8 to 1024 entries: a log axis
    assert '"name":"table_size ' in html and '"name":"lr ' not in html  # coloured by the spec's first dimension
    runs = trial_runs(result.mlflow_uri, parent_id)
    assert all(run.info.run_id in html for run in runs.values())  # each point's hover names its MLflow run
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "sharetune.cli", "ui", "--mlflow-uri", result.mlflow_uri, "--port",
                               str(port)], cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/get-artifact?path=comparison.html&run_uuid={parent_id}"
        deadline, served = time.monotonic() + 180, None
        while time.monotonic() < deadline and served is None:
            try:
                served = urllib.request.urlopen(url, timeout=5).read().decode()
            except OSError:
                time.sleep(1)
        assert served == html  # what the UI's artifact view fetches and shows in a frame
        # a real browser runs plotly's script on the served page and draws one marker per trained trial
        # (the server sends it as a download, which a browser's address bar would save, not show)
        page = tmp / "served.html"
        page.write_text(served)
        dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
                             capture_output=True, text=True, timeout=120).stdout
        drawn = len(re.findall(r'class="point"', dom))
        trained = (trials["status"] == "TERMINATED").sum()
        costs = len([c for c, front in built.fronts.items() if not front.empty])
        assert trained == 6 and drawn == trained * costs
        # the link the search prints opens the UI on the comparison, in its model-training view: MLflow 3.17's
        # UI opens an experiment on its GenAI overview (traces, judges) otherwise, whatever the experiment's kind
        experiment = MlflowClient(result.mlflow_uri).get_run(parent_id).info.experiment_id
        link = ui_link(f"http://127.0.0.1:{port}", (experiment, parent_id), path.name)
        selected = f'title="{path.name}">{path.name}</span>'  # the run's artifact view, the comparison selected
        for address, model_training in ((link, True), (link.replace(MODEL_TRAINING_VIEW, ""), False)):
            for _ in range(3):  # the page fetches the run and its artifacts after it loads: slower on a loaded machine
                dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=30000",
                                      "--dump-dom", address], capture_output=True, text=True, timeout=180).stdout
                if selected in dom:
                    break
            assert selected in dom, address
            assert ("Model registry" in dom and "Training runs" not in dom) == model_training, address
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_front_trials_are_mlflow_models_that_predict_as_the_trials_do(finished):
    result, trials, _, parent_id, tmp = finished
    spec = result.folder.spec()
    front = front_trials(trials, spec)
    trained = trials[trials["status"] == "TERMINATED"]
    points = trained.set_index("trial_id")[["test_accuracy", "unique_params"]]
    for trial_id in front:  # no other trial is at least as good on both and better on one
        better = (points["test_accuracy"] >= points.loc[trial_id, "test_accuracy"]) & (
            points["unique_params"] <= points.loc[trial_id, "unique_params"])
        assert (better & (points.index != trial_id) & ((points["test_accuracy"] > points.loc[trial_id, "test_accuracy"]) | (
            points["unique_params"] < points.loc[trial_id, "unique_params"]))).sum() == 0
    before = os.environ.get("MLFLOW_TRACKING_URI")
    uris, missing = log_front_models(SearchFolder(result.folder), spec, trials, result.mlflow_uri,
                                     trial_runs(result.mlflow_uri, parent_id))
    assert 0 < len(uris) == len(front) < len(trained) and list(uris) == front and missing == []
    again = log_front_models(SearchFolder(result.folder), spec, trials, result.mlflow_uri, trial_runs(result.mlflow_uri, parent_id))
    assert again == (uris, [])  # as `resume` of a finished search calls it: nothing logged twice
    experiment = MlflowClient(result.mlflow_uri).get_experiment_by_name("tiny").experiment_id
    assert len(MlflowClient(result.mlflow_uri).search_logged_models(experiment_ids=[experiment])) == len(front)
    assert os.environ.get("MLFLOW_TRACKING_URI") == before  # none left for later subprocesses to inherit (seen in CI)
    x = torch.randn(5, 1, 8, 8)
    for trial_id, uri in uris.items():
        export(SearchFolder(result.folder), trial_id, tmp / f"{trial_id}.pt")
        expected = load_exported(tmp / f"{trial_id}.pt")(x)
        with tracking_at(result.mlflow_uri):
            loaded = mlflow.pytorch.load_model(uri)
            info = mlflow.models.get_model_info(uri)
        assert torch.allclose(loaded(x), expected)
        assert info.signature is not None and tuple(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 1, 8, 8)
        # what its outputs mean and how its inputs are made, for whoever loads it from the registry
        assert info.metadata == {"classes": ["0", "1", "2", "3"], "preprocessing": load_preprocessing(tmp / f"{trial_id}.pt").as_dict()}
        assert info.metadata["preprocessing"]["max_value"] == 1 and info.metadata["preprocessing"]["mode"] is None

    # An interrupted search logs the front of the trials that had finished; its end (resume) logs the whole
    # search's and deletes the models of trials that front leaves out: one model per front trial, tagged once
    def logged_models() -> list[str]:
        return sorted("models:/" + m.model_id for m in MlflowClient(result.mlflow_uri).search_logged_models(experiment_ids=[experiment]))

    def tagged() -> dict[str, str]:
        return {trial: run.data.tags["sharetune.model_uri"] for trial, run in trial_runs(result.mlflow_uri, parent_id).items()
                if "sharetune.model_uri" in run.data.tags}

    for finished_then in (trials[trials["trial_id"].isin(set(trained["trial_id"]) - set(front))], trials):
        now, _ = log_front_models(SearchFolder(result.folder), spec, finished_then, result.mlflow_uri, trial_runs(result.mlflow_uri, parent_id))
        assert now and logged_models() == sorted(now.values()) and tagged() == now
        if finished_then is not trials:  # someone deletes one of them in the UI: the end goes on without it
            MlflowClient(result.mlflow_uri).delete_logged_model(next(iter(now.values())).removeprefix("models:/"))
    assert list(now) == front


def test_with_repeated_seeds_the_front_is_of_configuration_means_and_keeps_each_ones_best_seed():
    """What the summary ranks and the sampler was told: one configuration's lucky seed (0.9, mean 0.7) is
    not the best configuration (0.81 and 0.79, mean 0.8)."""
    spec = parse_spec(tiny_spec(repeats=2))
    trials = pd.DataFrame({"trial_id": ["lucky", "unlucky", "steady1", "steady2"], "status": ["TERMINATED"] * 4,
                           "configuration": [0, 0, 1, 1], "seed": [0, 1, 0, 1], "diverged": [0] * 4,
                           "test_accuracy": [0.9, 0.5, 0.79, 0.81]})
    assert front_trials(trials, spec) == ["steady2"]
    two = parse_spec(tiny_spec(repeats=2, objectives={"test_accuracy": "max", "unique_params": "min"}))
    costs = trials.assign(unique_params=[100, 100, 1000, 1000])  # configuration 0 is the smaller: both are on the front
    assert front_trials(costs, two) == ["lucky", "steady2"]


def test_spin_reports_get_the_papers_table(tmp_path):
    trials = pd.DataFrame({"trial_id": ["a", "b"], "status": ["TERMINATED"] * 2, "family": ["spin"] * 2, "diverged": [0, 0],
                           "share_rate": [1.0, 2.0], "unique_params": [2_100_000, 1_200_000], "virtual_params": [2_100_000] * 2,
                           "macs": [5.0e9, 5.0e9], "test_accuracy": [0.81, 0.79], "val_accuracy": [0.8, 0.78]})
    built = report.build_report(trials, tmp_path)
    table = pd.read_csv(tmp_path / "spin_table.csv")
    assert table.columns.tolist() == ["share_rate", "params (M)", "MACs (G)", "val_accuracy (%)", "test_accuracy (%)"]
    assert table.values.tolist() == [[1.0, 2.1, 5.0, 80.0, 81.0], [2.0, 1.2, 5.0, 78.0, 79.0]]
    assert "|   share_rate |   params (M) |" in (tmp_path / "spin_table.md").read_text() and tmp_path / "spin_table.md" in built.files
    assert np.isfinite(table["params (M)"]).all()
