"""The search service in process, end to end: a real local Ray (one for the module, its tests on one
pytest worker), real Optuna, a real MLflow SQLite store. The command line through faults is in
test_search_cli.py."""

import json
import math
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
import yaml
from helpers import parent_and_child_runs, tiny_spec
from mlflow.tracking import MlflowClient

from sharetune.errors import ExitCode
from sharetune.metrics import pareto_mask
from sharetune.search import SearchFolder, report, tuner
from sharetune.search.asha import KeptASHA
from sharetune.search.console import top_trials
from sharetune.search.listing import describe
from sharetune.search.mlflow_logger import MlflowLogger
from sharetune.search.outcome import CUT, failed_trials, outcome
from sharetune.search.storage import StateError
from sharetune.spaces import SpecError, parse_spec

# conftest: one local Ray for the module; xdist_group keeps the module on one worker, so it starts once
pytestmark = [pytest.mark.usefixtures("local_ray"), pytest.mark.xdist_group("test_search")]


def search(tmp_path: Path, storage: str | None = None, mlflow_uri: str | None = None,
           **changes) -> tuple[tuner.Search, pd.DataFrame, MlflowClient]:
    spec = parse_spec(tiny_spec(**changes))
    result = tuner.run(spec, storage=storage or str(tmp_path / "results"),
                       mlflow_uri=mlflow_uri or f"sqlite:///{tmp_path}/mlflow.db", progress=False)
    return result, report.trials_from_folder(result.folder), MlflowClient(result.mlflow_uri)


def test_multi_objective_search_logs_parent_and_children_and_yields_a_front(tmp_path):
    result, trials, client = search(
        tmp_path, objectives={"test_accuracy": "max", "unique_params": "min"}, sampler="nsga2",
        description="tables against accuracy", sampler_options={"population_size": 4}, dimensions={
            "hash": {"choice": ["uniform", "dirichlet"]}, "alpha": {"loguniform": [0.01, 10.0]},
            "table_size": {"choice": [8, 64, 512]}}, fixed={"epochs": 2, "hidden": [16]},
    )
    assert len(trials) == 4 and set(trials["status"]) == {"TERMINATED"}
    assert {p.name for p in Path(result.folder).glob("trial_*/*")} == {"params.json", "params.pkl", "result.json", "checkpoint_000001"}
    parents, children = parent_and_child_runs(client, "tiny")
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    # the spec at a glance: what it searched, how, and over which settings (MLflow keeps params as text)
    reference = result.spec.hypervolume_reference
    assert parent.data.params == {
        "name": "tiny", "family": "arbnet", "dataset": "synthetic", "sampler": "nsga2", "num_samples": "4",
        "objectives": "test_accuracy:max,unique_params:min", "scheduler": "none", "fixed.epochs": "2", "fixed.hidden": "[16]",
        "dimension.hash": "choice ['uniform', 'dirichlet']", "dimension.alpha": "loguniform (0.01, 10.0)",
        "dimension.table_size": "choice [8, 64, 512]", "dimensions": "hash,alpha,table_size",
        **{f"hypervolume_reference.{cost}": str(value) for cost, value in reference.items()}}
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
    # the seeded first generation drew dirichlet four times: plots against alpha and entropy, no hash to tell apart
    assert set(trials["hash"]) == {"dirichlet"} and trials["alpha"].notna().all()
    assert [p.name for p in built.files] == ["trials.csv", "trials.parquet", "pareto_unique_params.png", "accuracy_vs_alpha.png",
                                             "accuracy_vs_entropy.png"]
    # every ArbNet of one architecture has the same MACs: no front against them (issue 16), and a reason
    assert "pareto_macs.png" not in {p.name for p in built.files} and built.skipped["macs"].startswith("every trial has macs")
    assert len(pd.read_parquet(tmp_path / "report" / "trials.parquet")) == 4
    report.log_report(built, result.mlflow_uri, parent.info.run_id)
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/trials.csv" in logged
    from_mlflow, parent_id = report.trials_from_mlflow("tiny", result.mlflow_uri)
    assert parent_id == parent.info.run_id
    # the fronts' reference, fixed before anything trained: the dense model's costs, in the saved spec and the parent run
    assert reference == {"unique_params": trials["virtual_params"].max(), "macs": trials["macs"].max()}
    assert result.folder.spec().hypervolume_reference == reference
    assert report.parent_context(result.mlflow_uri, parent_id) == (reference, "tiny on synthetic")  # a report from MLflow: its title
    assert sorted(from_mlflow["trial_id"]) == sorted(trials["trial_id"])
    assert from_mlflow.set_index("trial_id")["test_accuracy"].to_dict() == trials.set_index("trial_id")["test_accuracy"].to_dict()


def test_grid_search_into_an_optuna_storage_and_a_storage_uri(tmp_path, monkeypatch):
    """The databases named from the home folder (`~`) are there, not in a folder named `~` where the
    search ran (SQLAlchemy opens a path as written)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    storage = f"sqlite:///{tmp_path}/optuna.db"
    uri = (tmp_path / "bucket").as_uri()  # file://: the pyarrow filesystem path s3:// and gs:// take too
    result, trials, _ = search(
        tmp_path, storage=uri, mlflow_uri="sqlite:///~/mlflow.db", sampler="grid", budget={"max_concurrent": 2},
        optuna_storage="sqlite:///~/optuna.db",
        dimensions={"hash": {"choice": ["uniform", "modulus"]}, "sparsity": {"choice": [0.0, 0.5, 0.9]}},
    )
    assert result.mlflow_uri == f"sqlite:///{tmp_path}/mlflow.db" and not (tmp_path / "~").exists()
    assert len(parent_and_child_runs(MlflowClient(result.mlflow_uri), "tiny")[1]) == 6
    assert len(trials) == 6
    assert result.folder.startswith("file://") and result.folder.spec().sampler == "grid"
    assert (tmp_path / "bucket" / Path(result.folder).name / "sharetune-spec.yaml").is_file()
    study = optuna.load_study(study_name=result.folder.name, storage=storage)  # what optuna-dashboard shows
    assert study.metric_names == ["test_accuracy"] and len(study.trials) == 6 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert sorted(zip(trials["hash"], trials["sparsity"])) == sorted(
        (h, s) for h in ("uniform", "modulus") for s in (0.0, 0.5, 0.9))
    again = parse_spec(tiny_spec(optuna_storage=storage))  # the same name in another storage: the study is taken
    with pytest.raises(SpecError, match=f"^optuna_storage: its study {result.folder.name} belongs to another search"):
        tuner.run(again, storage=str(tmp_path / "elsewhere"), name=result.folder.name, mlflow_uri=f"sqlite:///{tmp_path}/m.db")
    assert not (tmp_path / "elsewhere").exists()


def test_a_search_in_a_deleted_searchs_folder_gets_its_own_mlflow_parent_run(tmp_path):
    import shutil

    from sharetune.search.mlflow_logger import parent_run_of

    def once(epochs: int) -> tuple[tuner.Search, str]:
        spec = parse_spec(tiny_spec(budget={"num_samples": 1}, fixed={"table_size": 64, "epochs": epochs, "hidden": [16]}))
        result = tuner.run(spec, storage=str(tmp_path / "results"), mlflow_uri=f"sqlite:///{tmp_path}/mlflow.db",
                           name="again", progress=False)
        return result, parent_run_of(result.folder)[1]

    first, first_parent = once(1)
    shutil.rmtree(first.folder)
    second, second_parent = once(2)
    assert first_parent != second_parent  # it joined the deleted search's run, whose report then held both
    client = MlflowClient(second.mlflow_uri)
    children = client.search_runs([client.get_run(second_parent).info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{second_parent}'")
    assert [child.data.params["epochs"] for child in children] == ["2"]
    assert report.trials_from_mlflow("tiny", second.mlflow_uri)[1] == second_parent


@pytest.fixture(scope="module")
def diverging(tmp_path_factory) -> tuple[tuner.Search, pd.DataFrame, MlflowClient]:
    """A finished search of two trials, one of which diverges."""
    return search(tmp_path_factory.mktemp("diverging"), sampler="grid", budget={"max_concurrent": 2},
                  fixed={"table_size": 64, "epochs": 3, "hidden": [16]}, dimensions={"lr": {"choice": [0.1, 1e30]}})


def test_a_diverging_trial_is_reported_and_the_others_finish(diverging):
    _, trials, client = diverging
    by_lr = trials.set_index("lr")
    assert by_lr.loc[1e30, "diverged"] == 1 and by_lr.loc[1e30, "epochs_done"] == 1 and math.isnan(by_lr.loc[1e30, "loss"])
    assert by_lr.loc[0.1, "diverged"] == 0 and by_lr.loc[0.1, "epochs_done"] == 3
    _, children = parent_and_child_runs(client, "tiny")
    status = {c.data.params["lr"]: (c.info.status, c.data.tags.get("diverged")) for c in children}
    assert status == {"1e+30": ("FAILED", "true"), "0.1": ("FINISHED", None)}
    from_mlflow, _ = report.trials_from_mlflow("tiny", diverging[0].mlflow_uri)  # a report from MLflow reads as one from the folder
    assert from_mlflow.set_index("lr")["status"].to_dict() == {1e30: "TERMINATED", 0.1: "TERMINATED"}


def test_a_search_whose_every_trial_diverged_lists_no_best(tmp_path):
    """`sharetune list` gave the diverged nets' accuracy as the best (0), while the progress and the
    summary give none."""
    result, trials, _ = search(tmp_path, sampler="grid", fixed={"table_size": 64, "epochs": 2, "hidden": [16]},
                               dimensions={"lr": {"choice": [1e30]}})
    assert trials["diverged"].tolist() == [1]
    listed = describe(result.folder)
    assert (listed.best, listed.status) == ({}, "finished")


def test_a_time_limit_ends_the_search_with_exit_0_and_keeps_the_trials_it_cut_out_of_the_top(tmp_path):
    result, trials, client = search(tmp_path, fixed={"table_size": 64, "epochs": 100_000, "hidden": [16]}, dimensions={},
                                    budget={"num_samples": 1, "time_limit_s": 10})
    (cut,) = trials.itertuples()
    assert cut.status == CUT and cut.epochs_done < 100_000  # on a loaded machine, maybe before its first epoch
    assert outcome(trials) == (ExitCode.OK, None)  # it spent the budget it was given
    assert top_trials(trials, result.spec) == "top trials (left out: 1 the time limit cut short): none trained to its end"
    listed = describe(result.folder)  # nor is it `sharetune list`'s best (its partial accuracy was), and a resume trains no more
    assert (listed.best, listed.status) == ({}, "out of time")
    (parent,), (child,) = parent_and_child_runs(client, "tiny")
    assert parent.info.status == child.info.status == "KILLED"
    from_mlflow, _ = report.trials_from_mlflow("tiny", result.mlflow_uri)  # reads as the folder does
    assert list(from_mlflow["status"]) == [CUT]
    resumed = tuner.resume(result.folder)  # Tune keeps what is left of the budget: none, so it says why nothing trains
    assert resumed.note == "budget.time_limit_s: the search had spent its 10 s, so nothing more trained; a new search trains more"
    assert report.trials_from_folder(result.folder)["epochs_done"].tolist() == [cut.epochs_done]


@pytest.mark.parametrize("time_limit_s", [10, None])
def test_a_trial_stopped_before_its_first_epoch_leaves_the_parent_run_killed_and_a_cut_one_has_a_run(tmp_path, time_limit_s):
    """The time limit stops every trial, one whose worker was still starting too (TERMINATED without a
    result): MLflow had no run for it, while the folder's table lists it as cut. Ctrl-C stops it so
    too (resume trains it): the parent run ended FINISHED."""
    from ray.tune.experiment import Trial

    from sharetune.search.mlflow_logger import CUT_TAG, TRIAL_TAG, deliver_backlog

    folder = SearchFolder.at(tmp_path / "results", "tiny")
    folder.save_mlflow(uri := f"sqlite:///{tmp_path}/mlflow.db", "tiny")
    logger = MlflowLogger(uri, "tiny", folder, {}, {}, time_limit_s=time_limit_s)
    logger.setup()
    config = {"family": "arbnet", "epochs": 2, "hidden": [16], "hash": "uniform"}
    stopped = Trial("tiny", config=config, trial_id="a_0001", stub=True)
    stopped.set_status(Trial.TERMINATED)
    logger.started = time.monotonic() - 11  # past the limit, where there is one
    logger.on_experiment_end([stopped])
    assert deliver_backlog(folder) == 0
    (parent,), children = parent_and_child_runs(MlflowClient(uri), "tiny")
    assert parent.info.status == "KILLED"
    runs = sorted((c.data.tags[TRIAL_TAG], c.info.status, c.data.tags.get(CUT_TAG), c.data.params["hash"]) for c in children)
    assert runs == ([("a_0001", "KILLED", "true", "uniform")] if time_limit_s else [])


def test_a_search_stopped_before_tune_started_its_trials_is_started_by_resume(tmp_path):
    """Stopped while it pretrained (or loaded its data), a search's folder holds its spec and MLflow
    store but no Tune state: `search --name` refuses the folder, and `resume` starts its trials."""
    folder = SearchFolder.at(tmp_path / "results", "early")
    spec = parse_spec(tiny_spec(budget={"num_samples": 2, "max_concurrent": 2}))
    folder.save_spec(spec)
    folder.save_mlflow(f"sqlite:///{tmp_path}/mlflow.db", spec.name)
    result = tuner.resume(folder)
    assert result.mlflow_uri == f"sqlite:///{tmp_path}/mlflow.db"
    trials = report.trials_from_folder(result.folder)
    assert len(trials) == 2 and set(trials["status"]) == {"TERMINATED"}
    (parent,), children = parent_and_child_runs(MlflowClient(result.mlflow_uri), "tiny")
    assert parent.info.status == "FINISHED" and len(children) == 2


def test_a_resumed_search_counts_the_time_its_earlier_drivers_spent_toward_its_time_limit(tmp_path):
    """Tune keeps what is left of the limit, so a resumed search's trials are cut when the limit is
    spent over both drivers: MLflow marks them cut then, as the folder's report does."""
    logger = MlflowLogger("sqlite:///unused.db", "tiny", SearchFolder(tmp_path), {}, {}, time_limit_s=10)
    logger.started = time.monotonic() - 8  # set up 8 s ago; then the search was interrupted
    before = logger.spent_s()
    resumed = pickle.loads(pickle.dumps(logger))  # as Tune restores its callbacks
    assert before <= resumed.spent_s() <= logger.spent_s()  # what it had spent when pickled, and no clock running on
    resumed.started = time.monotonic() - 3  # its setup, 3 s ago: past the 2 s the limit had left
    assert resumed.spent_s() >= 10


def test_a_trial_whose_configuration_cannot_be_built_fails_once_and_the_others_finish(tmp_path):
    """DeiT-Ti's three heads need a width divisible by three: the extremes 6 and 12 pass the spec's dry
    runs, the widths between them that are not multiples of three fail in their trial. Retrying those
    would fail alike, so they get no retry (budget.max_failures is 2), while a worker that dies does
    (test_search_cli)."""
    result, trials, client = search(
        tmp_path, family="spin", sampler="random", sampler_options={"seed": 0}, budget={"num_samples": 4, "max_concurrent": 2},
        fixed={"model": "deit_tiny", "depth": 1, "patch_size": 4, "epochs": 1}, dimensions={"dim": {"int": [6, 12]}})
    trained = trials[trials["trial_id"].notna()].set_index("trial_id")
    unbuildable = set(trained.index[trained["dim"] % 3 != 0])
    assert unbuildable and set(trained.index) - unbuildable  # seed 0 samples both kinds
    assert set(trained.loc[list(unbuildable), "status"]) == {"ERROR"}
    assert set(trained.drop(index=list(unbuildable))["status"]) == {"TERMINATED"}
    messages = {trial_id: f"the configuration cannot be built: ValueError: dim: {trained.loc[trial_id, 'dim']} is not a "
                          "multiple of deit_tiny's 3 attention heads; allowed: multiples of 3" for trial_id in unbuildable}
    for trial_id in unbuildable:
        failures = (Path(result.folder) / f"trial_{trial_id}" / "error.txt").read_text()
        assert failures.count("Failure # ") == 1 and messages[trial_id] in failures  # tried once
    _, children = parent_and_child_runs(client, "tiny")
    errors = {c.data.tags["sharetune.trial_id"]: c.data.tags.get("error") for c in children if c.info.status == "FAILED"}
    assert errors.keys() == unbuildable and all(errors[trial_id].endswith(messages[trial_id]) for trial_id in errors)
    assert trained["error"].dropna().to_dict() == errors  # in the report, from the folder and from MLflow
    from_mlflow, _ = report.trials_from_mlflow("tiny", result.mlflow_uri)
    assert from_mlflow.set_index("trial_id")["error"].dropna().to_dict() == errors
    statuses = lambda table: sorted(zip(table["trial_id"].fillna(""), table["status"]))
    assert statuses(from_mlflow) == statuses(trials)  # failed as ERROR, skipped proposals as their kind
    # The exit code's count: also where Tune's last snapshot missed the errors (a search that ended first)
    folder = SearchFolder(result.folder)
    assert failed_trials(folder).keys() == unbuildable
    listed = describe(folder)  # `sharetune list`: failed trials ended, their metrics are no one's best
    assert (listed.status, listed.done, listed.failed, listed.pending) == ("finished", 4, len(unbuildable), 0)
    assert listed.best == {"test_accuracy": trained.drop(index=list(unbuildable))["test_accuracy"].max()}
    (state,) = Path(result.folder).glob("experiment_state-*.json")
    saved = json.loads(state.read_text())
    saved["trial_data"] = [[json.dumps({**json.loads(trial), "status": "RUNNING"}), run] for trial, run in saved["trial_data"]]
    state.write_text(json.dumps(saved))
    assert failed_trials(folder).keys() == unbuildable
    listed = describe(folder)  # and `sharetune list`, and the report, count them
    assert (listed.status, listed.done, listed.failed, listed.pending) == ("incomplete", len(unbuildable), len(unbuildable), 1)
    # `sharetune report` in a process with no Ray running (Tune's trials locate their error files through Ray)
    command = [str(Path(sys.executable).parent / "sharetune"), "report", result.folder, "--out", str(tmp_path / "report")]
    reported = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert reported.returncode == 0 and not reported.stderr, reported.stderr
    assert pd.read_csv(tmp_path / "report" / "trials.csv").set_index("trial_id")["error"].dropna().to_dict() == errors
    assert {f"failed: {trial_id}: {error}" for trial_id, error in errors.items()} <= set(reported.stdout.splitlines())


def test_single_objective_search_with_asha_and_spin_models(tmp_path):
    result, trials, _ = search(
        tmp_path, family="spin", sampler="tpe", scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2},
        fixed={"dim": 16, "depth": 4, "patch_size": 2, "kernel_size": 3, "epochs": 2, "lr": 0.05},
        dimensions={"share_rate": {"choice": [1, 2, 4]}, "mapping": {"choice": ["sequential", "strided"]}},
    )
    assert len(trials) == 4 and set(trials["status"]) == {"TERMINATED"}
    rungs = json.loads((Path(result.folder) / KeptASHA.RUNGS_FILE).read_text())  # for `resume`: every trial reached epoch 1
    assert set(rungs["brackets"][0][-1]) == set(trials["trial_id"])
    kept = Path(result.folder) / KeptASHA.RUNGS_FILE
    whole, files = kept.read_text(), sorted(Path(result.folder).rglob("*"))
    kept.write_text(whole[:len(whole) // 2])  # damaged: `resume` refuses it before anything starts, naming it
    with pytest.raises(StateError, match=rf"^{result.folder}: sharetune-asha.json is damaged \(.*\); move it away to resume "
                                         r"with empty rungs"):
        tuner.resume(SearchFolder(result.folder))
    assert sorted(Path(result.folder).rglob("*")) == files
    kept.write_text(whole)
    for _, trial in trials.iterrows():
        assert trial["effective_share_rate"] == pytest.approx(trial["virtual_params"] / trial["unique_params"])
        assert trial["unique_params"] < trial["virtual_params"] or trial["effective_share_rate"] == 1


def test_share_rate_setting_and_effective_share_rate_metric_both_reach_the_report_and_mlflow(tmp_path):
    arch = {"dim": 16, "depth": 4, "patch_size": 2, "kernel_size": 3}
    result, trials, client = search(  # under a folder with a quote in its name, as /home/o'brien: MLflow's filters quote it
        tmp_path, str(tmp_path / "o'brien"), family="spin", sampler="grid", budget={"max_concurrent": 2},
        fixed={**arch, "share_rate": 2, "epochs": 2}, dimensions={"mapping": {"choice": ["sequential", "strided"]}},
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
    _, children = parent_and_child_runs(client, "tiny")
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


def test_resources_the_cluster_lacks_are_refused_before_the_folder_is_written(tmp_path):
    from sharetune.search.cluster import ClusterError

    with pytest.raises(ClusterError, match=r"^resources\.gpu: 1 per trial, but the cluster has 0 GPUs$"):
        search(tmp_path, resources={"gpu": 1})
    with pytest.raises(ClusterError, match=r"^resources\.cpu: 64 per trial, but the cluster has 2 CPUs$"):
        search(tmp_path, resources={"cpu": 64})
    assert not (tmp_path / "results").exists()


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_whose_tune_state_cannot_be_restored_is_refused_and_left_untouched(tmp_path, diverging):
    import shutil

    result, _, _ = diverging

    def started_here(folder: SearchFolder) -> None:  # a copy's record names the folder it was copied from
        folder.save_mlflow(*folder.mlflow())

    damages = {
        "truncated": lambda f: next(f.glob("experiment_state-*.json")).write_text('{"trial_data": [["{\\"trial'),
        "pickle": lambda f: (f / "tuner.pkl").write_bytes(b"not a pickle"),
        "none": lambda f: [p.unlink() for p in f.glob("experiment_state-*.json")],
        "moved": lambda f: None,
        "no trial": lambda f: [p.write_text(json.dumps({**json.loads(p.read_text()), "trial_data": []}))
                               for p in f.glob("experiment_state-*.json")],  # as a search no proposal was feasible in
    }
    messages = {"truncated": r"Tune's state experiment_state-.*\.json is damaged and cannot be restored; the folder is left as it is$",
                "pickle": r"Tune's state cannot be restored \(UnpicklingError: .*\); the folder is left as it is$",
                "none": r"no Tune state to resume",
                "moved": rf"moved: the search started in {re.escape(str(result.folder))} and was moved or copied here; Tune's state "
                         r"and its MLflow runs name that folder, so resume it there$",
                "no trial": r"Tune's state records no trial, so there is nothing to continue; run `sharetune search` again$"}
    for damage, apply in damages.items():
        folder = tmp_path / damage.replace(" ", "-")
        shutil.copytree(result.folder, folder)
        if damage != "moved":
            started_here(SearchFolder(folder))
        apply(folder)
        before = _files(folder)
        with pytest.raises(StateError, match=messages[damage]):
            tuner.resume(SearchFolder(folder))
        assert _files(folder) == before, damage
    done = subprocess.run([sys.executable, "-m", "sharetune.cli", "resume", str(tmp_path / "truncated")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "is damaged and cannot be restored" in done.stderr
    done = subprocess.run([sys.executable, "-m", "sharetune.cli", "resume", str(tmp_path / "moved")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "was moved or copied here" in done.stderr


def test_a_two_worker_arbnet_trial_reports_the_accuracy_of_the_model_rank_0_saves(tmp_path):
    """ArbNet under DDP: its tables are plain parameters, reduced with the rest. Each rank's BatchNorm
    statistics (and its model EMA's) come from its own share of the batch, so the ranks take rank 0's
    before evaluating: the accuracy reported over both ranks' shards is that of the model the trial
    exports (the EMA, which evaluation uses)."""
    from sharetune.search import SearchFolder
    from sharetune.search.export import export
    from sharetune.trainables import load_exported
    from sharetune.training import evaluate

    two_workers = {"dimensions": {}, "data": {"name": "synthetic", "val_fraction": 0},
                   "fixed": {"epochs": 3, "hidden": [32], "table_size": 64, "batch_size": 16, "ema_decay": 0.9},
                   "resources": {"workers": 2, "cpu": 1}, "budget": {"num_samples": 1, "max_concurrent": 1}}
    result, trials, _ = search(tmp_path, **two_workers)
    (trial_id,) = trials["trial_id"]
    (log,) = Path(result.folder).glob("trial_*/result.json")
    reported = [json.loads(line) for line in log.read_text().splitlines() if "world_size" in line]
    data = tuner.load_data(parse_spec(tiny_spec(**two_workers)))
    assert [r["world_size"] for r in reported] == [2, 2, 2]
    assert all(sum(r["rank_samples"]) == len(data.y_train) for r in reported)
    export(SearchFolder(result.folder), trial_id, tmp_path / "model.pt")
    saved = load_exported(tmp_path / "model.pt")
    assert evaluate(saved, data.eval_batches("test", torch.device("cpu"))) == reported[-1]["test_accuracy"]
