"""Past searches: `sharetune list` and `sharetune export` on real finished tiny searches (a local Ray, Tune's
own state and checkpoints), and the light `sharetune ui`."""

import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import ray
import torch
from helpers import start_local_ray, tiny_spec
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from sharetune.cli import app
from sharetune.search import SearchFolder, report, tuner
from sharetune.search.listing import past_searches
from sharetune.spaces import parse_spec, trial_settings
from sharetune.trainables import build_model, load_exported, pretrained_weights

SPIN = {"dim": 16, "depth": 4, "patch_size": 2, "kernel_size": 3, "epochs": 1, "share_rate": 2, "pretrain_epochs": 1,
        "fusion": "channel_weighted_mean"}


pytestmark = pytest.mark.xdist_group("test_past_searches")  # one worker builds the module's searches once


@pytest.fixture(scope="module")
def searches(tmp_path_factory) -> tuple[Path, tuner.Search, tuner.Search]:
    """Two finished searches in one storage: ArbNets, and fused SPIN nets (one plan by topology, one by CKA)."""
    root = tmp_path_factory.mktemp("past")
    start_local_ray()
    try:
        options = {"storage": str(root / "results"), "mlflow_uri": f"sqlite:///{root}/mlflow.db", "progress": False}
        arbnet = tuner.run(parse_spec(tiny_spec(budget={"num_samples": 2, "max_concurrent": 2})), name="arbnet", **options)
        spin = tuner.run(parse_spec(tiny_spec(
            name="fused", family="spin", sampler="grid", budget={"max_concurrent": 2}, fixed=SPIN,
            dimensions={"mapping": {"choice": ["strided", "cka"]}})), name="spin", **options)
    finally:
        ray.shutdown()
    return root, arbnet, spin


def checkpointed_model(folder: SearchFolder, trial_id: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """A trial's model as training left it (built from its config, loaded from Tune's checkpoint), and inputs."""
    from ray import tune

    spec = folder.spec()
    trial = next(t for t in tune.ExperimentAnalysis(folder).trials if t.trial_id == trial_id)
    data = tuner.load_data(spec)
    model = build_model(trial_settings(trial.config), data, pretrained_weights(spec, data, folder))
    checkpoint = torch.load(Path(trial.checkpoint.path) / "trial.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint["model"])
    return model.eval(), data.sample_inputs(32)


def test_an_exported_model_computes_what_the_trial_trained(searches, tmp_path):
    _, arbnet, spin = searches
    for search in (arbnet, spin):
        for trial_id in report.trials_from_folder(search.folder)["trial_id"]:
            out = tmp_path / f"{trial_id}.pt"
            result = CliRunner().invoke(app, ["export", search.folder, "--trial", trial_id, "--out", str(out)])
            assert result.exit_code == 0, result.output
            reference, inputs = checkpointed_model(search.folder, trial_id)
            exported = load_exported(out)  # reads with weights_only=True
            with torch.no_grad():
                torch.testing.assert_close(exported(inputs), reference(inputs), rtol=1e-5, atol=1e-6)
            state = torch.load(out, weights_only=True)["state_dict"]
            assert not [k for k in state if k.endswith(("index", "sources.0", "sources.1"))]  # derived or folded away
            assert sum(p.numel() for p in exported.parameters()) < sum(p.numel() for p in reference.parameters()) or search is arbnet


def test_export_names_a_bad_folder_or_trial_in_one_line(searches, tmp_path):
    root, arbnet, _ = searches
    trial_id = report.trials_from_folder(arbnet.folder)["trial_id"][0]
    shutil.copytree(arbnet.folder, tmp_path / "edited")  # a trial's settings of the wrong type in Tune's state
    (state_file,) = (tmp_path / "edited").glob("experiment_state-*.json")
    state = json.loads(state_file.read_text())
    for entry in state["trial_data"]:
        trial = json.loads(entry[0])
        entry[0] = json.dumps({**trial, "config": {**trial["config"], "epochs": "x"}})
    state_file.write_text(json.dumps(state))
    for args, out, message in [
        ([str(tmp_path / "edited"), "--trial", trial_id], tmp_path / "model.pt",
         f"--trial: {trial_id}: its settings in Tune's state are damaged (epochs: got 'x'; "),
        ([str(root / "results"), "--trial", "nope"], tmp_path / "model.pt", "not a sharetune search folder (no sharetune-spec.yaml)"),
        ([arbnet.folder, "--trial", "nope"], tmp_path / "model.pt", "--trial: no trial 'nope' in"),
        ([arbnet.folder, "--trial", trial_id], tmp_path / "missing" / "model.pt", f"--out: no folder {tmp_path / 'missing'}; create it first"),
        ([arbnet.folder, "--trial", trial_id], tmp_path, f"--out: {tmp_path} is a folder; give a file name in it"),
        ([arbnet.folder, "--trial", trial_id], Path("/dev/full"), "--out: /dev/full: cannot be written ("),  # a full disk
    ]:
        result = CliRunner().invoke(app, ["export", *args, "--out", str(out)])
        assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1, result.output
        assert not (tmp_path / "model.pt").exists()


def test_list_shows_each_past_search_newest_first(searches):
    root, arbnet, spin = searches
    unstarted = SearchFolder.at(root / "results", "unstarted")  # its spec written, then stopped before Tune started
    unstarted.save_spec(parse_spec(tiny_spec(name="unstarted")))
    cut = SearchFolder.at(root / "results", "cut")  # Tune's state cut short, by hand (the folder's writes are whole)
    cut.save_spec(parse_spec(tiny_spec(name="cut")))
    (Path(cut) / "experiment_state-2026-01-01_00-00-00.json").write_bytes(b'{"trial_da')
    damaged = SearchFolder.at(root / "results", "damaged")  # folders that cannot be read do not hide the others
    damaged.write("sharetune-spec.yaml", b"name: [")
    found = {s.folder: s for s in past_searches(str(root / "results"))}
    assert list(found) == [damaged, cut, unstarted, spin.folder, arbnet.folder]
    assert found[damaged].status == "damaged" and found[damaged].damaged.startswith(f"{damaged}: damaged spec: sharetune-spec.yaml: not valid YAML")
    assert found[cut].status == "damaged" and "experiment_state-2026-01-01_00-00-00.json is damaged" in found[cut].damaged
    reported = CliRunner().invoke(app, ["report", cut, "--out", str(root / "cut-report")])
    assert reported.exit_code == 2 and reported.output.startswith(f"error: {cut}: Tune's state"), reported.output
    for path, why in ((root / "results", "not a sharetune search folder (no sharetune-spec.yaml)"),
                      (root / "results" / "nosuch", "no such folder")):  # a path, not an experiment's name
        reported = CliRunner().invoke(app, ["report", str(path), "--out", str(root / "no-report")])
        assert reported.exit_code == 2 and reported.output == f"error: {path}: {why}\n", reported.output
    store = root / "none.db"  # a store the report would only read: never created
    reported = CliRunner().invoke(app, ["report", "tiny", "--mlflow-uri", f"sqlite:///{store}", "--out", str(root / "no-report")])
    assert reported.exit_code == 2 and reported.output == f"error: --mlflow-uri: no MLflow store at {store}; a search writes one there\n"
    assert not store.exists()
    copied = root / "copied"  # a folder whose store is gone (copied off its machine): reported, logged nowhere
    shutil.copytree(arbnet.folder, copied)
    (copied / "sharetune-mlflow.json").write_text(json.dumps({"tracking_uri": f"sqlite:///{store}", "experiment": "tiny"}))
    reported = CliRunner().invoke(app, ["report", str(copied), "--out", str(root / "copied-report")])
    assert reported.exit_code == 0 and f"not logged to MLflow: the search's store {store} is gone" in reported.output, reported.output
    assert (root / "copied-report" / "trials.csv").is_file() and not store.exists()
    store = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(store)  # an earlier search of the same name, in the same experiment
    client.create_run(client.get_experiment_by_name("tiny").experiment_id, start_time=1,
                      tags={"sharetune.search_path": str(root / "results" / "earlier")})
    reported = CliRunner().invoke(app, ["report", "tiny", "--mlflow-uri", store, "--out", str(root / "tiny-report")])
    assert reported.exit_code == 0 and reported.output.startswith(
        f"experiment tiny holds 2 searches: this reports the newest, {arbnet.folder}; give a search's folder to report another\n"), reported.output
    # from its folder, which this machine reads: the very report `report FOLDER` writes
    reported = CliRunner().invoke(app, ["report", arbnet.folder, "--out", str(root / "folder-report")])
    assert reported.exit_code == 0 and reported.output.startswith("Pareto front, "), reported.output  # no blank line first
    assert sorted(p.name for p in (root / "tiny-report").iterdir()) == sorted(p.name for p in (root / "folder-report").iterdir())
    assert (root / "tiny-report" / "trials.csv").read_text() == (root / "folder-report" / "trials.csv").read_text()
    client.create_run(client.create_experiment("empty"), tags={"sharetune.search_path": str(root / "results" / "empty")})
    reported = CliRunner().invoke(app, ["report", "empty", "--mlflow-uri", store, "--out", str(root / "empty-report")])
    assert (reported.exit_code, reported.output) == (
        2, f"error: experiment: the newest search in 'empty' ({root / 'results' / 'empty'}) has saved no trials yet\n")

    for search in (arbnet, spin):
        trials = report.trials_from_folder(search.folder)
        listed = found[search.folder]
        assert (listed.name, listed.status, listed.done, listed.planned, listed.failed) == (
            search.spec.name, "finished", len(trials), search.spec.planned_trials(), 0)
        assert listed.best == {"test_accuracy": trials["test_accuracy"].max()}
    assert (found[unstarted].status, found[unstarted].done, found[unstarted].best) == ("no trials", 0, {})  # nothing to resume
    result = CliRunner().invoke(app, ["list", "--storage", str(root / "results")])
    assert result.exit_code == 0, result.output
    header, *rows, damaged_line, cut_line = result.output.strip().splitlines()
    assert header.split() == ["name", "started", "status", "trials", "best", "folder"]
    assert [row.split()[0] for row in rows] == ["damaged", "cut", "unstarted", "fused", "tiny"]
    assert rows[0].split()[3:] == ["damaged", "0/0", "-", damaged]  # the reason, below the table, keeps the columns readable
    assert (damaged_line, cut_line) == (f"damaged: {found[damaged].damaged}", f"damaged: {found[cut].damaged}")
    assert "finished" in rows[4] and "2/2" in rows[4] and arbnet.folder in rows[4]
    missing = CliRunner().invoke(app, ["list", "--storage", str(root / "nowhere")])
    assert missing.exit_code == 2 and "--storage: no folder" in missing.output

    refused = SearchFolder.at(root / "results", "refused")  # no proposal met its constraints: no trial, one infeasible
    refused.save_spec(parse_spec(tiny_spec(name="refused")))
    refused.save_mlflow(store, "refused")
    refused.save_skipped([{"kind": "infeasible", "config": {"hash": "uniform", "configuration": 0}, "costs": {"unique_params": 9}}])
    reported = CliRunner().invoke(app, ["report", refused, "--out", str(root / "refused-report")])
    assert reported.exit_code == 0 and "failed" not in reported.output, reported.output
    assert pd.read_csv(root / "refused-report" / "trials.csv")["status"].tolist() == ["INFEASIBLE"]


def session_commands(session: int) -> list[str]:
    """The command lines of the processes in a session (Linux /proc)."""
    commands = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rpartition(")")[2].split()[3]) == session:
                commands.append((stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, ValueError):
            continue  # ended meanwhile
    return commands


def test_ui_is_one_light_server_that_says_when_it_is_ready(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "ui.log"
    with log.open("w") as output:
        process = subprocess.Popen([sys.executable, "-m", "sharetune.cli", "ui", "--mlflow-uri", f"sqlite:///{tmp_path}/mlflow.db",
                                    "--port", str(port)], cwd=tmp_path, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while f"MLflow UI ready on http://127.0.0.1:{port}" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status == 200  # ready means serving
        said = log.read_text().splitlines()  # the server's own lines go to its log, not the terminal
        assert [line.split(" for ")[0].split(" on ")[0] for line in said] == ["starting the MLflow UI", "MLflow UI ready"], said
        assert said[0].endswith(f"(no store at {tmp_path}/mlflow.db yet: the UI stays empty until a search from here, or one "
                                "given this --mlflow-uri, writes to it)")  # an empty UI, and why
        in_use = subprocess.run([sys.executable, "-m", "sharetune.cli", "ui", "--mlflow-uri", f"sqlite:///{tmp_path}/mlflow.db",
                                 "--port", str(port)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert (in_use.returncode, in_use.stdout, in_use.stderr) == (2, "", f"error: --port {port}: in use on 127.0.0.1; give another port\n")
        time.sleep(3)  # MLflow's job runner, were it on, would have started by now
        commands = session_commands(process.pid)
        assert len(commands) <= 3 and not [c for c in commands if "huey" in c or "job_runner" in c], commands
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


class Payload:
    """Code a pickle runs when it is loaded: it would leave `ran` behind."""

    def __init__(self, ran):
        self.ran = ran

    def __reduce__(self):
        return (Path.touch, (self.ran,))


def test_reading_a_search_folder_runs_no_code_its_tune_state_names(searches, tmp_path):
    """Tune's saved state holds pickles beside its JSON; a folder from a shared storage or a copy may
    hold one that runs code. `report`, `list` and `export` read the JSON alone."""
    root, arbnet, _ = searches
    hostile = tmp_path / "storage" / "hostile"
    shutil.copytree(arbnet.folder, hostile)
    SearchFolder(hostile).save_mlflow(f"sqlite:///{tmp_path}/mlflow.db", "tiny")  # its record names this folder
    payload = pickle.dumps(Payload(tmp_path / "ran")).hex()
    for state in hostile.glob("experiment_state-*.json"):
        saved = json.loads(state.read_text())
        saved["trial_data"] = [[json.dumps({**json.loads(trial), "_default_placement_group_factory": payload,
                                            "placement_group_factory": payload}), run] for trial, run in saved["trial_data"]]
        state.write_text(json.dumps(saved))
    trial_id = report.trials_from_folder(arbnet.folder)["trial_id"][0]
    for args in (["report", str(hostile), "--out", str(tmp_path / "report")], ["list", "--storage", str(tmp_path / "storage")],
                 ["export", str(hostile), "--trial", trial_id, "--out", str(tmp_path / "model.pt")]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
    assert (tmp_path / "model.pt").is_file() and not (tmp_path / "ran").exists()


def test_a_damaged_search_file_is_one_line_naming_it_and_list_still_shows_the_others(searches, tmp_path):
    _, arbnet, spin = searches
    storage = tmp_path / "storage"
    damages = {"skipped": ("sharetune-skipped.jsonl", "{not json\n"), "entry": ("sharetune-skipped.jsonl", '{"a": 1}\n'),
               "mlflow": ("sharetune-mlflow.json", '{"tracking_uri": "sqli'), "record": ("sharetune-mlflow.json", "{}")}
    for name, (filename, text) in damages.items():
        shutil.copytree(arbnet.folder, storage / name)
        (storage / name / filename).write_text(text)
        reported = CliRunner().invoke(app, ["report", str(storage / name), "--out", str(tmp_path / name)])
        assert reported.exit_code == 2 and reported.output.startswith(f"error: {storage / name}: {filename} is damaged ("), reported.output
        assert len(reported.output.strip().splitlines()) == 1, reported.output
    shutil.copytree(spin.folder, storage / "whole")
    shutil.copytree(arbnet.folder, storage / "edited")  # Tune's state of the right shape, a value of the wrong type
    (state_file,) = (storage / "edited").glob("experiment_state-*.json")
    state = json.loads(state_file.read_text())
    run = json.loads(state["trial_data"][0][1])
    state["trial_data"][0][1] = json.dumps({**run, "last_result": {**run["last_result"], "epoch": "x"}})
    state_file.write_text(json.dumps(state))
    listed = CliRunner().invoke(app, ["list", "--storage", str(storage)])
    assert listed.exit_code == 0, listed.output
    damaged = [line for line in listed.output.splitlines() if line.startswith("damaged: ")]
    assert sorted(damaged) == sorted([*(f"damaged: {storage / name}: sharetune-skipped.jsonl is damaged ({why})" for name, why in
                                        [("skipped", "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
                                         ("entry", "an entry without its kind or config")]),
                                      f"damaged: {storage / 'edited'}: Tune's state {state_file.name} is damaged and cannot be "
                                      "restored; the folder is left as it is"])
    assert "whole" in listed.output and listed.output.count("finished") == 3  # the others, mlflow's damage unread


def test_resume_refuses_a_damaged_queue_of_mlflow_writes_in_one_line_before_it_starts(searches, tmp_path):
    """A traceback after Ray and Tune had started, before. (A search resumes only where it ran: the
    module's own folder is damaged, and mended after.)"""
    _, arbnet, _ = searches
    queue = Path(arbnet.folder) / "sharetune-mlflow-queue.db"
    whole = queue.read_bytes()
    damages = {"file is not a database": b"not a database, " * 512,
               "database disk image is malformed": whole[:100] + b"Z" * (len(whole) - 100)}  # SQLite's header, then garbage
    files = sorted(Path(arbnet.folder).iterdir())
    for why, damaged in damages.items():
        queue.write_bytes(damaged)
        try:
            resumed = CliRunner().invoke(app, ["resume", str(arbnet.folder), "--report-dir", str(tmp_path / "reports")])
            assert sorted(Path(arbnet.folder).iterdir()) == files  # nothing written beside it
        finally:
            queue.write_bytes(whole)
        assert (resumed.exit_code, resumed.output) == (2, f"error: {queue}: the queue of MLflow writes is damaged ({why}); "
                                                          "move it away to go on without the writes it held\n")
    assert not ray.is_initialized()
