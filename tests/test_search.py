"""The search service end to end: a real local Ray, real Optuna, a real MLflow SQLite store."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from helpers import image_folder, tiny_spec, trial_rows
from mlflow.tracking import MlflowClient

from sharetune.metrics import pareto_mask
from sharetune.search import report, tuner
from sharetune.spaces import parse_spec

pytestmark = pytest.mark.usefixtures("local_ray")  # conftest: one local Ray for the module


def search(tmp_path: Path, storage: str | None = None, **changes) -> tuple[tuner.Search, pd.DataFrame, MlflowClient]:
    spec = parse_spec(tiny_spec(**changes))
    result = tuner.run(spec, storage=storage or str(tmp_path / "results"),
                       mlflow_uri=f"sqlite:///{tmp_path}/mlflow.db", progress=False)
    return result, report.trials_from_folder(result.folder), MlflowClient(result.mlflow_uri)


def runs(client: MlflowClient, name: str):
    experiment = client.get_experiment_by_name(name)
    every = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in every if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in every if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def test_multi_objective_search_logs_parent_and_children_and_yields_a_front(tmp_path):
    result, trials, client = search(
        tmp_path, objectives={"test_accuracy": "max", "unique_params": "min"}, sampler="nsga2",
        description="tables against accuracy", sampler_options={"population_size": 4}, dimensions={
            "hash": {"choice": ["uniform", "dirichlet"]}, "alpha": {"loguniform": [0.01, 10.0]},
            "table_size": {"choice": [8, 64, 512]}}, fixed={"epochs": 2, "hidden": [16]},
    )
    assert len(trials) == 4 and set(trials["status"]) == {"TERMINATED"}
    parents, children = runs(client, "tiny")
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.params["sampler"] == "nsga2"
    assert parent.data.tags["sharetune.search_path"] == result.folder and parent.data.tags["sharetune.git_commit"]
    # MLflow as the comparison tool: the UI opens on the runs; readable names; every effective setting
    assert client.get_experiment_by_name("tiny").tags["mlflow.experimentKind"] == "custom_model_development"
    assert parent.data.tags["mlflow.note.content"] == "tables against accuracy"
    assert client.download_artifacts(parent.info.run_id, "spec.yaml", str(tmp_path)) and parse_spec(
        yaml.safe_load((tmp_path / "spec.yaml").read_text())).sampler == "nsga2"
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        config = child.data.params
        hash_part = config["hash"] + (f" a={float(config['alpha']):.3g}" if config["hash"] == "dirichlet" else "")
        assert child.info.run_name == f"{hash_part} ts={config['table_size']} #{child.data.tags['sharetune.trial_id'][-4:]}"
        assert {"lr": "0.1", "batch_size": "128", "recipe": "arbnet", "sparsity": "0.0", "seed": "0"}.items() <= config.items()
        assert child.data.tags["mlflow.source.git.commit"] and child.data.tags["mlflow.user"]
        (dataset,) = client.get_run(child.info.run_id).inputs.dataset_inputs
        assert dataset.dataset.name == "synthetic" and dataset.dataset.source == "generated" and len(dataset.dataset.digest) == 10
        assert {"test_accuracy", "train_accuracy", "loss", "unique_params", "virtual_params", "macs", "entropy",
                "effective_share_rate", "lr", "diverged", "epoch_seconds"} <= set(child.data.metrics)
        assert child.data.params["family"] == "arbnet" and "table_size" in child.data.params
        history = client.get_metric_history(child.info.run_id, "test_accuracy")
        assert sorted(m.step for m in history) == [1, 2]
    built = report.build_report(trials, tmp_path / "report")
    front = built.fronts["unique_params"]
    assert not front.empty and 0 < built.hypervolume["unique_params"] <= 1
    points = trials[["test_accuracy", "unique_params"]].to_numpy(float)
    assert set(front["trial_id"]) == set(trials["trial_id"][pareto_mask(points, [True, False])])
    assert {"trials.csv", "trials.parquet", "pareto_unique_params.png"} <= {p.name for p in built.files}
    # every ArbNet of one architecture has the same MACs: no front against them (issue 16), and a reason
    assert "pareto_macs.png" not in {p.name for p in built.files} and built.skipped["macs"].startswith("every trial has macs")
    assert len(pd.read_parquet(tmp_path / "report" / "trials.parquet")) == 4
    report.log_report(built, result.mlflow_uri, parent.info.run_id)
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/trials.csv" in logged
    from_mlflow, parent_id = report.trials_from_mlflow("tiny", result.mlflow_uri)
    assert parent_id == parent.info.run_id
    assert sorted(from_mlflow["trial_id"]) == sorted(trials["trial_id"])
    assert from_mlflow.set_index("trial_id")["test_accuracy"].to_dict() == trials.set_index("trial_id")["test_accuracy"].to_dict()


def test_grid_search_into_an_optuna_storage_and_a_storage_uri(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    uri = (tmp_path / "bucket").as_uri()  # file://: the pyarrow filesystem path s3:// and gs:// take too
    result, trials, _ = search(
        tmp_path, storage=uri, sampler="grid", budget={"max_concurrent": 2}, optuna_storage=storage,
        dimensions={"hash": {"choice": ["uniform", "modulus"]}, "sparsity": {"choice": [0.0, 0.5, 0.9]}},
    )
    assert len(trials) == 6
    assert result.folder.startswith("file://") and result.folder.spec().sampler == "grid"
    assert (tmp_path / "bucket" / Path(result.folder).name / "sharetune-spec.yaml").is_file()
    study = optuna.load_study(study_name=result.folder.name, storage=storage)  # what optuna-dashboard shows
    assert study.metric_names == ["test_accuracy"] and len(study.trials) == 6 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert sorted(zip(trials["hash"], trials["sparsity"])) == sorted(
        (h, s) for h in ("uniform", "modulus") for s in (0.0, 0.5, 0.9))


def test_a_diverging_trial_is_reported_and_the_others_finish(tmp_path):
    _, trials, client = search(
        tmp_path, sampler="grid", budget={"max_concurrent": 2}, fixed={"table_size": 64, "epochs": 3, "hidden": [16]},
        dimensions={"lr": {"choice": [0.1, 1e30]}},
    )
    by_lr = trials.set_index("lr")
    assert by_lr.loc[1e30, "diverged"] == 1 and by_lr.loc[1e30, "epochs_done"] == 1 and math.isnan(by_lr.loc[1e30, "loss"])
    assert by_lr.loc[0.1, "diverged"] == 0 and by_lr.loc[0.1, "epochs_done"] == 3
    _, children = runs(client, "tiny")
    status = {c.data.params["lr"]: (c.info.status, c.data.tags.get("diverged")) for c in children}
    assert status == {"1e+30": ("FAILED", "true"), "0.1": ("FINISHED", None)}


def test_single_objective_search_with_asha_and_spin_models(tmp_path):
    _, trials, _ = search(
        tmp_path, family="spin", sampler="tpe", scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2},
        fixed={"dim": 16, "depth": 4, "patch_size": 2, "kernel_size": 3, "epochs": 2, "lr": 0.05},
        dimensions={"share_rate": {"choice": [1, 2, 4]}, "mapping": {"choice": ["sequential", "strided"]}},
    )
    assert len(trials) == 4 and set(trials["status"]) == {"TERMINATED"}
    for _, trial in trials.iterrows():
        assert trial["effective_share_rate"] == pytest.approx(trial["virtual_params"] / trial["unique_params"])
        assert trial["unique_params"] < trial["virtual_params"] or trial["effective_share_rate"] == 1


def test_share_rate_setting_and_effective_share_rate_metric_both_reach_the_report_and_mlflow(tmp_path):
    arch = {"dim": 16, "depth": 4, "patch_size": 2, "kernel_size": 3}
    result, trials, client = search(
        tmp_path, family="spin", sampler="grid", budget={"max_concurrent": 2}, fixed={**arch, "share_rate": 2, "epochs": 2},
        dimensions={"mapping": {"choice": ["sequential", "strided"]}},
    )
    # ConvMixer-16/4/2/3 on 1x8x8 inputs, 4 classes: stem 1*16*4+16 conv + 32 BN, per block 16*9+16 depthwise
    # + 32 BN + 16*16+16 pointwise + 32 BN, head 16*4+4; rate 2 stores two of the four pointwise weights.
    virtual = (64 + 16 + 32) + 4 * (144 + 16 + 32 + 256 + 16 + 32) + (64 + 4)
    effective = virtual / (virtual - 2 * 256)
    built = report.build_report(trials, tmp_path / "report")
    table = pd.read_csv(tmp_path / "report" / "trials.csv")
    assert len(table) == 2 and set(table["share_rate"]) == {2}
    assert table["effective_share_rate"].tolist() == pytest.approx([effective] * 2)  # 1.31
    assert "trials.csv" in {p.name for p in built.files}
    _, children = runs(client, "tiny")
    assert len(children) == 2
    for child in children:
        assert child.data.params["share_rate"] == "2"
        assert child.data.metrics["effective_share_rate"] == pytest.approx(effective)
        lr = sorted(client.get_metric_history(child.info.run_id, "lr"), key=lambda m: m.step)
        assert [m.step for m in lr] == [1, 2] and lr[0].value > lr[1].value  # the spin recipe's one cycle, per epoch
        final = trials.set_index("trial_id").loc[child.data.tags["sharetune.trial_id"], "final_lr"]
        assert final == pytest.approx(lr[1].value)
        # the costs are known before training: reported once at epoch 0, then with every epoch
        assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "unique_params")) == [0, 1, 2]
        results = Path(result.folder) / f"trial_{child.data.tags['sharetune.trial_id']}" / "result.json"
        first = json.loads(results.read_text().splitlines()[0])
        assert first["epoch"] == 0 and first["effective_share_rate"] == pytest.approx(effective) and "test_accuracy" not in first


def _result_lines(folder: Path) -> list[int]:
    return sorted(len(p.read_text().splitlines()) for p in folder.glob("*/result.json"))


def interrupt_then_resume(tmp_path: Path, spec: dict, interrupt_when, stop: signal.Signals = signal.SIGINT,
                          before_resume=lambda folder, client: None) -> tuple[Path, dict, subprocess.CompletedProcess]:
    """Run `sharetune search` on `spec`, send it `stop` (Ctrl-C, or kill -9) once `interrupt_when(result
    line counts)` holds, check that something was left unfinished (after Ctrl-C: exit code 130, one line
    saying so, no unfinished trial among the top trials, the MLflow parent and running children KILLED),
    call `before_resume(folder, MlflowClient)`, then `sharetune resume` the folder."""
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    folder = tmp_path / "results" / "run"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    command = [sys.executable, "-m", "sharetune.cli", "search", "spec.yaml", "--storage", "results", "--name", "run"]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not interrupt_when(_result_lines(folder)):
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.2)
    process.send_signal(stop)
    output, _ = process.communicate(timeout=120)
    trials = report.trials_from_folder(folder)
    unfinished = trials[~trials["status"].isin(["TERMINATED", "ERROR"])]
    assert not unfinished.empty
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    if stop == signal.SIGINT:
        assert process.returncode == 130, output
        assert f"interrupted: {len(unfinished)} of {len(trials)} trials unfinished; continue with `sharetune resume`" in output
        top = output.split("top trials:")[1].split("Pareto front")[0]
        assert "RUNNING" not in top and "PENDING" not in top
        parents, children = runs(client, spec["name"])
        assert [p.info.status for p in parents] == ["KILLED"]
        by_trial = {c.data.tags["sharetune.trial_id"]: c.info.status for c in children}
        assert {by_trial[t] for t in unfinished["trial_id"] if t in by_trial} <= {"KILLED"} and "RUNNING" not in by_trial.values()
    before_resume(folder, client)
    resumed = subprocess.run([sys.executable, "-m", "sharetune.cli", "resume", str(folder)], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    return folder, env, resumed


@pytest.mark.slow
def test_interrupted_search_resumes_with_nothing_lost_or_repeated(tmp_path):
    spec = tiny_spec(sampler="grid", budget={"max_concurrent": 1}, fixed={"table_size": 64, "epochs": 15, "hidden": [1024, 1024]},
                     data={"name": "synthetic"}, dimensions={"hash": {"choice": ["uniform", "modulus", "neighborhood"]}})
    # mid-search: one trial done, one running, one not started
    folder, env, resumed = interrupt_then_resume(tmp_path, spec, lambda lines: len(lines) >= 2 and lines[-1] >= 15)
    assert "3/3 done" in resumed.stdout and "Pareto front" in resumed.stdout and "sharetune ui" in resumed.stdout
    # quiet unless --verbose: none of Ray's, Tune's, Optuna's or MLflow's start-up output
    for noise in ("Configuration for experiment", "TensorBoard", "Token authentication", "A new study", "Creating initial MLflow"):
        assert noise not in resumed.stdout + resumed.stderr
    trials = report.trials_from_folder(folder)
    assert len(trials) == 3 and set(trials["status"]) == {"TERMINATED"} and set(trials["epochs_done"]) == {15}
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    parents, children = runs(client, "tiny")
    assert len(parents) == 1 and len(children) == 3
    assert sorted(c.data.params["hash"] for c in children) == ["modulus", "neighborhood", "uniform"]
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "test_accuracy")]
        assert sorted(steps) == list(range(1, 16))  # every epoch once
        assert child.info.status == "FINISHED"


def test_cli_rejects_a_bad_spec_before_starting_ray(tmp_path):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(tiny_spec(sampler="grid")))
    done = subprocess.run([sys.executable, "-m", "sharetune.cli", "search", "bad.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "dimensions.alpha: the grid sampler needs unconditional `choice` dimensions" in done.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "mlflow.db").exists()


def test_ui_serves_the_store_on_loopback(tmp_path):
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    process = subprocess.Popen([sys.executable, "-m", "sharetune.cli", "ui", "--mlflow-uri", uri, "--port", str(port)],
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline, status = time.monotonic() + 120, None
        while time.monotonic() < deadline and status != 200:
            try:
                status = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status
            except OSError:
                time.sleep(0.5)
        assert status == 200
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


@pytest.mark.slow
def test_a_folder_search_with_the_spin_recipe_learns_selects_on_val_and_resumes(tmp_path):
    root = image_folder(tmp_path / "images", per_class=40, test_per_class=10)
    spec = {"name": "folders", "family": "spin", "sampler": "grid", "budget": {"max_concurrent": 1},
            "data": {"name": "imagefolder", "root": str(root), "img_size": 16, "val_fraction": 0.2, "workers": 2},
            "fixed": {"dim": 16, "depth": 2, "patch_size": 4, "kernel_size": 3, "epochs": 8, "batch_size": 16,
                      "lr": 0.01, "lr_batch": 0},  # the spin recipe, at a rate this tiny set learns in a few steps
            "dimensions": {"share_rate": {"choice": [1, 2]}}, "objectives": {"val_accuracy": "max"}}
    # mid-trial: the first trial has reported three of its eight epochs
    folder, env, _ = interrupt_then_resume(tmp_path, spec, lambda lines: bool(lines) and lines[-1] >= 3)
    trials = report.trials_from_folder(folder)
    assert len(trials) == 2 and set(trials["status"]) == {"TERMINATED"} and set(trials["epochs_done"]) == {8}
    assert trials["test_accuracy"].max() > 0.6 and trials["val_accuracy"].max() > 0.6  # chance is 1/3
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    _, children = runs(client, "folders")
    for child in children:
        for metric in ("val_accuracy", "test_accuracy", "lr"):
            assert sorted(m.step for m in client.get_metric_history(child.info.run_id, metric)) == list(range(1, 9))


def test_a_bad_image_folder_fails_in_one_line_before_ray_starts(tmp_path):
    root = image_folder(tmp_path / "images", per_class=2, test_per_class=1)
    for image in (root / "val" / "class_0").iterdir():
        image.unlink()
    spec = tiny_spec(family="spin", data={"name": "imagefolder", "root": str(root)}, dimensions={}, fixed={"epochs": 1})
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec))
    done = subprocess.run([sys.executable, "-m", "sharetune.cli", "search", "bad.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"error: {root}/val/class_0: an empty class folder (no .jpg or .png); add its images or remove it" in done.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_a_killed_driver_resumes_with_no_orphan_run_and_every_epoch_once(tmp_path):
    spec = tiny_spec(sampler="grid", budget={"max_concurrent": 1}, fixed={"table_size": 64, "epochs": 6, "hidden": [1024, 1024]},
                     dimensions={"hash": {"choice": ["uniform", "modulus"]}})
    orphan = {}

    def add_orphan(folder: Path, client: MlflowClient) -> None:
        """The run a trial gets when the driver dies before Tune's next snapshot records that trial."""
        parents, _ = runs(client, "tiny")
        parent = parents[0]
        assert parent.info.status == "RUNNING"  # kill -9: nothing closed it
        tags = {"mlflow.parentRunId": parent.info.run_id, "sharetune.trial_id": "0rphan00"}
        orphan["run"] = client.create_run(parent.info.experiment_id, tags=tags).info.run_id

    folder, env, _ = interrupt_then_resume(tmp_path, spec, lambda lines: bool(lines) and lines[-1] >= 3,
                                           stop=signal.SIGKILL, before_resume=add_orphan)
    trials = report.trials_from_folder(folder)
    assert len(trials) == 2 and set(trials["status"]) == {"TERMINATED"} and set(trials["epochs_done"]) == {6}
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    parents, children = runs(client, "tiny")
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert client.get_run(orphan["run"]).info.lifecycle_stage == "deleted"
    assert sorted(c.data.tags["sharetune.trial_id"] for c in children) == sorted(trials["trial_id"])  # runs == trials
    # the old checkpoints the killed driver was keeping until Tune saved its state are gone too
    assert {trial: len(list((folder / f"trial_{trial}").glob("checkpoint_*"))) for trial in trials["trial_id"]} == {
        trial: 1 for trial in trials["trial_id"]}
    for child in children:
        assert child.info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "test_accuracy")) == list(range(1, 7))


def _trial_pids(folder: Path) -> dict[str, list[int]]:
    """Each trial's reporting process ids, one per result row, oldest first."""
    return {trial: [row["pid"] for row in rows] for trial, rows in trial_rows(folder).items()}


def kill_a_worker(tmp_path: Path, max_failures: int) -> tuple[Path, str, subprocess.CompletedProcess, MlflowClient]:
    """Run a one-trial `sharetune search`, kill -9 its trial's worker process once it has reported an
    epoch (and so checkpointed one), and let the search end; returns the folder, the trial id, the
    command's exit code and output, and the MLflow client."""
    spec = tiny_spec(sampler="grid", budget={"max_concurrent": 1, "max_failures": max_failures},
                     fixed={"table_size": 64, "epochs": 6, "hidden": [1024, 1024]}, dimensions={"hash": {"choice": ["uniform"]}})
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    folder = tmp_path / "results" / "run"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    command = [sys.executable, "-m", "sharetune.cli", "search", "spec.yaml", "--storage", "results", "--name", "run"]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, killed = time.monotonic() + 300, None
    while killed is None and time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        for trial, pids in _trial_pids(folder).items():
            if len(pids) >= 2:  # epoch 0 (the costs) and epoch 1, with its checkpoint
                os.kill(pids[-1], signal.SIGKILL)  # the trial's worker process, mid-training
                killed = trial
        time.sleep(0.2)
    output, _ = process.communicate(timeout=400)
    return folder, killed, subprocess.CompletedProcess(command, process.returncode, output), MlflowClient(env["MLFLOW_TRACKING_URI"])


@pytest.mark.slow
def test_a_trial_whose_worker_dies_is_retried_from_its_checkpoint(tmp_path):
    folder, trial, done, client = kill_a_worker(tmp_path, max_failures=2)
    assert done.returncode == 0, done.stdout
    trials = report.trials_from_folder(folder).set_index("trial_id")
    assert trials.loc[trial, "status"] == "TERMINATED" and trials.loc[trial, "epochs_done"] == 6
    rows = [json.loads(line) for line in (folder / f"trial_{trial}" / "result.json").read_text().splitlines()]
    assert len({row["pid"] for row in rows}) == 2 and {row["epoch"] for row in rows} == set(range(7))
    _, (child,) = runs(client, "tiny")
    assert child.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "test_accuracy")) == list(range(1, 7))


@pytest.mark.slow
def test_a_trial_out_of_retries_fails_the_search_with_its_error_in_one_line(tmp_path):
    folder, trial, done, client = kill_a_worker(tmp_path, max_failures=0)
    _, (child,) = runs(client, "tiny")
    error = child.data.tags["error"]
    assert child.info.status == "FAILED" and error.startswith("The actor is dead because its worker process has died")
    assert "\n" not in error and str(tmp_path) not in error
    assert done.returncode == 3 and f"1 of 1 trials failed: {trial}: {error}" in done.stdout, done.stdout


def test_resources_the_cluster_lacks_are_refused_before_the_folder_is_written(tmp_path):
    from sharetune.search.cluster import ClusterError

    with pytest.raises(ClusterError, match=r"^resources\.gpu: 1 per trial, but the cluster has 0 GPUs$"):
        search(tmp_path, resources={"gpu": 1})
    with pytest.raises(ClusterError, match=r"^resources\.cpu: 64 per trial, but the cluster has 2 CPUs$"):
        search(tmp_path, resources={"cpu": 64})
    assert not (tmp_path / "results").exists()


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_whose_tune_state_cannot_be_restored_is_refused_and_left_untouched(tmp_path):
    import shutil

    from sharetune.search.storage import SearchFolder, StateError

    result, _, _ = search(tmp_path, budget={"num_samples": 2, "max_concurrent": 2}, fixed={"table_size": 64, "epochs": 1, "hidden": [16]})
    damages = {
        "truncated": lambda f: next(f.glob("experiment_state-*.json")).write_text('{"trial_data": [["{\\"trial'),
        "pickle": lambda f: (f / "tuner.pkl").write_bytes(b"not a pickle"),
        "none": lambda f: [p.unlink() for p in f.glob("experiment_state-*.json")],
    }
    messages = {"truncated": r"Tune's state experiment_state-.*\.json is damaged and cannot be restored; the folder is left as it is$",
                "pickle": r"Tune's state cannot be restored \(UnpicklingError: .*\); the folder is left as it is$",
                "none": r"no Tune state to resume"}
    for damage, apply in damages.items():
        folder = tmp_path / damage
        shutil.copytree(result.folder, folder)
        apply(folder)
        before = _files(folder)
        with pytest.raises(StateError, match=messages[damage]):
            tuner.resume(SearchFolder(folder))
        assert _files(folder) == before, damage
    done = subprocess.run([sys.executable, "-m", "sharetune.cli", "resume", str(tmp_path / "truncated")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "is damaged and cannot be restored" in done.stderr
