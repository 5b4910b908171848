"""Refusals before any trial (unreachable cluster, full disk) and the search folder's atomic writes:
real sockets, a real small filesystem, real files. Searches that end badly are in test_search.py."""

import contextlib
import errno
import json
import logging
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import fill, small_filesystem, tiny_spec
from mlflow.tracking import MlflowClient
from pyarrow import fs

from sharetune.search import report
from sharetune.search.cluster import ClusterError, check_resources, interrupt_on_sigterm
from sharetune.search.destinations import _link, create_store
from sharetune.search.outcome import error_line
from sharetune.search.result_log import rewrite, rows_up_to
from sharetune.search.storage import SPEC_FILE, TUNE_STATE_LOGGER, SearchFolder, StorageFull, stop_on_full_disk
from sharetune.spaces import SpecError
from sharetune.spaces.spec import Resources
from sharetune.storage_filesystem import keep_final_checkpoints, tune_storage


def sharetune(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(tiny_spec()))
    return subprocess.run([sys.executable, "-m", "sharetune.cli", "search", "spec.yaml", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # free once the probe closes: nothing listens there


@pytest.mark.parametrize("address", ["bogus:1", "127.0.0.1:CLOSED", "ray://bogus:10001"])
def test_an_unreachable_address_fails_in_one_line_well_within_a_minute(tmp_path, address):
    address = address.replace("CLOSED", str(closed_port()))
    start = time.monotonic()
    done = sharetune(tmp_path, "--address", address)
    took = time.monotonic() - start
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [
        next(line for line in done.stderr.splitlines() if line.startswith(f"error: --address {address}: no Ray cluster answers there"))]
    assert took < 60  # a correctness bound (Ray alone retries for minutes), not a speed claim
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("command", [["status", "raysubmit_x"], ["logs", "raysubmit_x", "--follow"], ["stop", "raysubmit_x"]])
def test_job_commands_against_an_unreachable_dashboard_answer_in_one_line_without_loading_torch(tmp_path, command):
    """As the `sharetune` command runs them (sharetune.launch): torch, Tune and MLflow take seconds to load."""
    dashboard = f"http://127.0.0.1:{closed_port()}"
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "from sharetune.launch import main; main()", *command,
                           "--address", dashboard], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    imported = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    said = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    assert done.returncode == 2 and done.stdout == ""
    assert said == [f"error: --address {dashboard}: Failed to connect to Ray at address: {dashboard}."]
    assert "ray.job_submission" in imported and not imported & {"torch", "ray.tune", "mlflow", "sharetune.cli"}


def test_ctrl_c_before_tune_starts_the_trials_exits_130_with_its_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from sharetune.cli import app
    from sharetune.search import tuner

    def interrupted(*args, **kwargs):  # Ctrl-C while the data loads or Ray starts: Tune's handler is not there yet
        raise KeyboardInterrupt

    monkeypatch.setattr(tuner, "run", interrupted)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(tiny_spec()))
    monkeypatch.chdir(tmp_path)
    done = CliRunner().invoke(app, ["search", "spec.yaml"])
    assert done.exit_code == 130 and done.output == "error: interrupted before Tune started the trials\n", done.output


def test_ctrl_c_while_the_command_loads_its_libraries_is_one_line_and_exit_130(tmp_path):
    """torch and Ray take seconds to import; a Ctrl-C then printed the import's traceback."""
    command = subprocess.Popen([str(Path(sys.executable).parent / "sharetune"), "list"], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # Python is up, torch is loading
    command.send_signal(signal.SIGINT)
    stdout, stderr = command.communicate(timeout=60)
    assert (command.returncode, stdout, stderr) == (130, "", "error: interrupted before the command started\n")


@pytest.mark.slow
def test_a_second_ctrl_c_while_the_search_ends_is_one_line_exit_130_and_resume_finishes_it(tmp_path):
    """Tune takes the first Ctrl-C and gives the next back to Python: landing in Tune's last save, the
    MLflow backlog or the report, it was exit 130 and not a word (typer's answer); in Ray's shutdown at
    exit, a traceback. Where it lands varies with timing: each place gets a line that says to resume."""
    spec = tiny_spec(fixed={"table_size": 64, "epochs": 30, "hidden": [1024, 1024]}, budget={"num_samples": 2, "max_concurrent": 2})
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    folder = tmp_path / "results" / "twice"
    command = [sys.executable, "-m", "sharetune.cli", "search", "spec.yaml", "--storage", "results", "--name", "twice"]
    search = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while search.poll() is None and not any(len(p.read_text().splitlines()) > 2 for p in folder.glob("trial_*/result.json")):
        time.sleep(0.2)
    search.send_signal(signal.SIGINT)
    time.sleep(0.3)  # Tune is ending the run
    search.send_signal(signal.SIGINT)
    _, stderr = search.communicate(timeout=300)
    assert search.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] in (
        f"error: interrupted while the search ended; `sharetune resume {folder}` continues it and writes its report",
        "interrupted: 2 of the 2 trials started are unfinished; continue with `sharetune resume`"), stderr
    resumed = subprocess.run([sys.executable, "-m", "sharetune.cli", "resume", str(folder)], cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    table = report.trials_from_folder(folder)
    assert list(table["status"]) == ["TERMINATED"] * 2 and list(table["epochs_done"]) == [30, 30]


def test_list_before_any_search_says_so(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from sharetune.cli import app

    monkeypatch.chdir(tmp_path)  # no results/ yet: the default storage is not an error
    listed = CliRunner().invoke(app, ["list"])
    assert listed.exit_code == 0 and listed.output == "no searches yet under results (--storage, $SHARETUNE_STORAGE)\n", listed.output
    listed = CliRunner().invoke(app, ["list", "--storage", str(tmp_path / "nowhere")])  # one given must be there
    assert listed.exit_code == 2 and "--storage: no folder" in listed.output


def test_a_job_commands_address_wins_over_rays_variables_and_needs_its_scheme(tmp_path):
    """Ray's client takes $RAY_API_SERVER_ADDRESS over the address it is given: the job went elsewhere."""
    dashboard, elsewhere = (f"http://127.0.0.1:{closed_port()}" for _ in range(2))
    env = {**os.environ, "RAY_API_SERVER_ADDRESS": elsewhere}
    for address, line in [(dashboard, f"error: --address {dashboard}: Failed to connect to Ray at address: {dashboard}."),
                          ("127.0.0.1:1", "error: --address 127.0.0.1:1: give the dashboard's URL, e.g. http://127.0.0.1:8265"),
                          ("ftp://h:21", "error: --address ftp://h:21: give the dashboard's URL, e.g. http://h:8265")]:  # Ray: a module
        done = subprocess.run([sys.executable, "-m", "sharetune.cli", "status", "raysubmit_x", "--address", address],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and done.stderr.splitlines() == [line], done.stderr


EMBEDDED_RAY = """
import json, time, ray
from sharetune.search.cluster import start_ray
start_ray(None)
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "agent": ray.nodes()[0]["DashboardAgentListenPort"]}), flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_the_embedded_ray_answers_no_client_without_its_token(tmp_path):
    """Ray 2.60 has no setting to bind its ports to 127.0.0.1 (ray.init turns 127.0.0.1 into the node's
    routable address), so the embedded Ray's protection is its token: a stranger on the network (no
    ~/.ray token, no RAY_AUTH_MODE) can neither join it nor submit a job to its node's agent."""
    host = subprocess.Popen([sys.executable, "-c", EMBEDDED_RAY], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, cwd=tmp_path, start_new_session=True)
    try:
        ports = json.loads(host.stdout.readline())
        node_ip = ports["gcs"].rpartition(":")[0]
        assert node_ip != "127.0.0.1"  # what a stranger on the LAN would reach
        stranger = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {
            "HOME": str(tmp_path), "RAY_gcs_server_port_wait_time_s": "1"}  # one attempt, not Ray's twenty
        join = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address={ports['gcs']!r}); print('joined')"],
                              env=stranger, capture_output=True, text=True, timeout=120)
        assert join.returncode != 0 and "joined" not in join.stdout
        assert "Authentication token is missing or incorrect" in join.stderr
        if ports["agent"] == -1:  # another Ray on this machine (a parallel test) holds the agent's port: no jobs here at all
            return
        submit = urllib.request.Request(f"http://{node_ip}:{ports['agent']}/api/job_agent/jobs/", method="POST",
                                        data=json.dumps({"entrypoint": "id"}).encode(),
                                        headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(submit, timeout=30)
        assert refused.value.code == 401
    finally:  # its Ray with it (SIGTERM, which a search takes as Ctrl-C, would leave it waiting on its dead GCS)
        os.killpg(host.pid, signal.SIGKILL)
        host.wait(timeout=60)


@pytest.fixture
def small_disk(tmp_path):
    """A real 20 MB filesystem."""
    with small_filesystem(tmp_path / "small", "20m") as mount:
        yield mount


@pytest.mark.slow
def test_a_disk_that_fills_mid_search_stops_it_in_one_line_and_resume_finishes_it_exactly(tmp_path):
    with small_filesystem(tmp_path / "disk", "130m") as disk:
        epochs, trials = 30, 4
        spec = tiny_spec(fixed={"table_size": 64, "epochs": epochs, "hidden": [16]}, budget={"num_samples": trials, "max_concurrent": 2})
        (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
        folder = disk / "results" / "full"
        command = [sys.executable, "-m", "sharetune.cli"]
        search = subprocess.Popen([*command, "search", "spec.yaml", "--storage", str(disk / "results"), "--name", "full"],
                                  cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while search.poll() is None and not any(len(p.read_text().splitlines()) > 3 for p in folder.glob("trial_*/result.json")):
            time.sleep(0.2)
        filler = fill(disk)  # a few epochs in: the disk is full from here on
        _, stderr = search.communicate(timeout=600)
        assert search.returncode == 5 and "Traceback" not in stderr, stderr
        assert stderr.strip().splitlines()[-1] == (f"error: {folder}: no space left on its disk mid-search; free some space, "
                                                   f"then `sharetune resume {folder}` continues from Tune's last saved state")

        # Every file of the folder is written whole and no checkpoint the saved state names is gone, so
        # resume finishes the search exactly, wherever the disk filled
        filler.unlink()
        done = subprocess.run([*command, "resume", str(folder)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert "Traceback" not in done.stderr, done.stderr
        assert done.returncode == 0, done.stderr
        table = report.trials_from_folder(folder)
        table = table[table["trial_id"].notna()]  # the rest: re-proposals answered without training
        assert len(table) == trials and set(table["status"]) == {"TERMINATED"} and set(table["epochs_done"]) == {epochs}
        for trial in table["trial_id"]:
            rows = [json.loads(line) for line in (folder / f"trial_{trial}" / "result.json").read_text().splitlines()]
            assert [row["epoch"] for row in rows] == list(range(epochs + 1))  # each once
            assert len(list((folder / f"trial_{trial}").glob("checkpoint_*"))) == 1
        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        children = client.search_runs([client.get_experiment_by_name("tiny").experiment_id], "tags.`mlflow.parentRunId` != ''")
        children = [run for run in children if "sharetune.trial_id" in run.data.tags]
        assert sorted(run.data.tags["sharetune.trial_id"] for run in children) == sorted(table["trial_id"])
        for run in children:
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy"))
            assert steps == list(range(1, epochs + 1)) and run.info.status == "FINISHED"


def test_tune_failing_to_save_its_state_on_a_full_disk_logs_one_line_other_errors_their_traceback_each_once(caplog):
    """Tune swallows a failed save of its state and logs it with the traceback; on a full disk that would
    print a pyarrow traceback above the search's own one-line error (seen in CI)."""
    tune_state = logging.getLogger(TUNE_STATE_LOGGER)

    def log_failed_save(err: OSError) -> logging.LogRecord | None:
        caplog.clear()
        try:
            raise RuntimeError("sync failed") from err
        except RuntimeError:
            tune_state.error("Saving experiment state to storage at '%s' failed with exception: ", "/x", exc_info=True)
        return caplog.records[-1] if caplog.records else None

    with pytest.raises(StorageFull), stop_on_full_disk("/x"):
        full = log_failed_save(OSError(errno.ENOSPC, "No space left on device"))
        assert full.exc_info is None and "Traceback" not in caplog.text
        assert caplog.text.strip().endswith("failed with exception: [Errno 28] No space left on device")
        other = log_failed_save(OSError(errno.EACCES, "Permission denied"))
        assert other.exc_info is not None and "Traceback" in caplog.text
        for again in (errno.EACCES, errno.ENOSPC):  # Tune tries again every few seconds: each failure is logged once
            assert log_failed_save(OSError(again, os.strerror(again))) is None
        raise OSError(errno.ENOSPC, "No space left on device")
    assert log_failed_save(OSError(errno.ENOSPC, "No space left on device")).exc_info is not None  # filter removed


def test_a_search_whose_last_state_save_failed_on_a_full_disk_ends_as_storage_full(tmp_path, caplog):
    """Its last trials ended while the disk was full: Tune logged the failed save and ended the search as
    if nothing happened, so the saved state still had them running, and the search exited 130 as
    interrupted. A saved state that records every trial ended needs nothing of resume."""
    tune_state = logging.getLogger(TUNE_STATE_LOGGER)
    for status, stops in (("RUNNING", True), ("TERMINATED", False)):
        folder = tmp_path / status
        folder.mkdir()
        trial = json.dumps({"trial_id": "a", "status": status, "config": {}})
        (folder / "experiment_state-2026-12-06_00-00-00.json").write_text(json.dumps({"trial_data": [[trial, '{"last_result": {}}']]}))
        with contextlib.ExitStack() as stack:
            if stops:
                stack.enter_context(pytest.raises(StorageFull, match="no space left on its disk mid-search"))
            stack.enter_context(stop_on_full_disk(str(folder)))
            try:
                raise RuntimeError("sync failed") from OSError(errno.ENOSPC, "No space left on device")
            except RuntimeError:
                tune_state.error("Saving experiment state to storage at '%s' failed with exception: ", folder, exc_info=True)


def test_a_state_save_that_missed_a_temporary_staging_file_is_not_logged(caplog):
    """Tune's upload listed the searcher's temporary state file, which the next save had renamed away
    before the upload opened it: Tune logged the failed save with a pyarrow traceback (seen in CI)."""
    staged = "/tmp/ray/session_x/artifacts/full/driver_artifacts"
    vanished = FileNotFoundError(errno.ENOENT, f"Failed to open local file '{staged}/.bd871261-855a-43fe-9fcc-b30b2dc25dcc"
                                               "-tmp-searcher-state-2026-12-04_22-09-45.pkl'. Detail: [errno 2] No such file or directory")
    other = FileNotFoundError(errno.ENOENT, f"Failed to open local file '{staged}/experiment_state-2026.json'")
    tune_state = logging.getLogger(TUNE_STATE_LOGGER)
    with stop_on_full_disk("/x"):
        for err in (vanished, other):
            try:
                raise RuntimeError("sync failed") from err
            except RuntimeError:
                tune_state.error("Saving experiment state to storage at '%s' failed with exception: ", "/x", exc_info=True)
    (kept,) = caplog.records
    assert kept.exc_info[1].__cause__ is other and "Traceback" in caplog.text


def test_a_storage_without_room_is_refused_before_anything_is_written(tmp_path, small_disk):
    done = sharetune(tmp_path, "--storage", str(small_disk / "results"))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"error: {small_disk}/results: 20 MB free, but a search needs at least 100 MB" in done.stderr
    assert list(small_disk.iterdir()) == []


def test_a_new_mlflow_store_its_disk_cannot_hold_is_one_line_before_the_folder_is_written_and_is_removed(tmp_path):
    """MLflow creates a SQLite store's tables on first use: cut short by a full disk, it left a file MLflow
    never opened again ("table spans already exists"), and every write of the search and of each resume
    waited for it. The store is now created before the search writes its folder, and a failed one removed."""
    with small_filesystem(tmp_path / "tiny", "200k") as disk:
        store = disk / "mlflow.db"
        done = sharetune(tmp_path, "--storage", str(tmp_path / "results"), "--name", "x", "--mlflow-uri", f"sqlite:///{store}")
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.strip().splitlines() == [
            f"error: --mlflow-uri: MLflow could not create its store at {store} (database or disk is full); "
            "make room or write access there, or give another --mlflow-uri"]
        assert list(disk.iterdir()) == [] and not (tmp_path / "results").exists()


def test_sigterm_stops_a_search_whose_ctrl_c_is_ignored():
    """A script's `sharetune search ... &` starts with SIGINT ignored: SIGTERM, taken as Ctrl-C, was
    ignored with it outside Tune's loop (loading, pretraining, the end's MLflow backlog and report)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with pytest.raises(KeyboardInterrupt):
            interrupt_on_sigterm(signal.SIGTERM, None)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_train_interrupted_mid_run_says_so_in_one_line_and_writes_no_model(tmp_path):
    """Typer's answer to Ctrl-C was exit 130 and no word."""
    out = tmp_path / "model.pt"
    train = subprocess.Popen([sys.executable, "-m", "sharetune.cli", "train", "arbnet", "--dataset", "synthetic", "--epochs", "100000",
                              "--out", str(out)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert any(line.startswith("epoch") for line in train.stdout)  # an epoch trained (and the loop waits for it)
    train.send_signal(signal.SIGINT)
    _, stderr = train.communicate(timeout=60)
    assert train.returncode == 130, stderr
    assert re.fullmatch(rf"error: interrupted after \d+ epochs? of 100000; {out} was not written", stderr.strip()), stderr
    assert not out.exists()


def test_a_new_mlflow_store_in_a_read_only_folder_is_one_line_at_once(tmp_path):
    """MLflow retried its connection to such a store for about 100 s, then the clean-up's own error
    (unlinking a missing file on a read-only disk) escaped as a traceback."""
    with small_filesystem(tmp_path / "ro", "1m", read_only=True) as disk:
        with pytest.raises(SpecError) as refused:
            create_store(f"sqlite:///{disk}/mlflow.db")
        assert str(refused.value) == (f"--mlflow-uri: MLflow could not create its store at {disk}/mlflow.db (Read-only file "
                                      "system); make room or write access there, or give another --mlflow-uri")


def test_a_new_mlflow_store_is_made_aside_and_never_replaces_one_another_search_made_meanwhile(tmp_path):
    store = tmp_path / "mlflow.db"
    create_store(f"sqlite:///{store}")
    assert [p.name for p in tmp_path.iterdir()] == ["mlflow.db"]  # nothing left beside it
    assert [e.name for e in MlflowClient(f"sqlite:///{store}").search_experiments()] == ["Default"]
    theirs, ours = tmp_path / "theirs.db", tmp_path / "ours.db"
    theirs.write_bytes(b"their store")
    ours.write_bytes(b"our store")
    _link(ours, theirs)  # theirs appeared while ours was being made
    assert theirs.read_bytes() == b"their store"


def test_a_report_dir_without_room_at_the_end_is_one_line_exit_5_and_the_results_stay(tmp_path, small_disk):
    """The trials finished, then the report could not be written: a traceback before, and exit 1."""
    filler = fill(small_disk)
    done = sharetune(tmp_path, "--storage", str(tmp_path / "results"), "--name", "x", "--report-dir", str(small_disk),
                     "--set", "budget.num_samples=2")
    assert done.returncode == 5 and "Traceback" not in done.stderr, done.stderr
    folder = tmp_path / "results" / "x"
    assert done.stderr.strip().splitlines()[-1] == (f"--report-dir: {small_disk}/x: No space left on device; the report was not "
                                                    f"written: free some space, then sharetune report {folder}")
    assert "top trials:" in done.stdout and "search folder:" in done.stdout
    filler.unlink()
    reported = subprocess.run([sys.executable, "-m", "sharetune.cli", "report", str(folder), "--out", str(small_disk / "x")],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert reported.returncode == 0, reported.stderr
    assert pd.read_csv(small_disk / "x" / "trials.csv")["trial_id"].tolist() == report.trials_from_folder(folder)["trial_id"].tolist()


def test_a_restarted_trials_log_keeps_its_whole_rows_up_to_its_checkpoint_and_appends_after_them(tmp_path):
    """What a trial that starts again appends to: the full-disk test met a row cut short in CI (the disk
    filled mid-row), and a Ctrl-C'd search's log once held rows past the checkpoint Tune's state named."""
    rows = [json.dumps({"epoch": e, "training_iteration": e + 1}) for e in range(4)]
    cases = {"cut": "\n".join(rows) + "\n" + rows[0][:5], "unterminated": "\n".join(rows), "whole": "\n".join(rows) + "\n",
             "only_a_cut": rows[0][:5], "empty": "", "appended_after_a_cut": rows[0] + "\n" + rows[1][:5] + rows[1] + "\n" + rows[2] + "\n"}
    for name, text in cases.items():
        (tmp_path / f"{name}.json").write_text(text)
    appending = {name: (tmp_path / f"{name}.json").open("at") for name in cases}  # as Tune's logger holds them
    for name in cases:
        log = tmp_path / f"{name}.json"
        stored = log.read_bytes()
        rewrite(log, stored, rows_up_to(stored, iteration=3))  # resumes from the checkpoint of epoch 2
        appending[name].write(rows[3] + "\n")  # epoch 3 again
        appending[name].close()
    read = {name: (tmp_path / f"{name}.json").read_text() for name in cases}
    every_epoch_once = "\n".join(rows) + "\n"
    assert read == {"cut": every_epoch_once, "unterminated": every_epoch_once, "whole": every_epoch_once,
                    "only_a_cut": rows[3] + "\n", "empty": rows[3] + "\n",
                    "appended_after_a_cut": "\n".join([rows[0], rows[2], rows[3]]) + "\n"}  # the row glued to the cut is lost


def test_the_folder_writes_whole_files(tmp_path):
    with small_filesystem(tmp_path / "disk", "2m") as disk:
        folder = SearchFolder(disk / "run")
        folder.write(SPEC_FILE, b"first")
        folder.write(SPEC_FILE, b"second")
        assert folder.read(SPEC_FILE) == b"second"
        with pytest.raises(OSError) as failed:
            folder.write(SPEC_FILE, bytes(3 * 2**20))  # the disk fills mid-write
        assert failed.value.errno == errno.ENOSPC
        assert folder.read(SPEC_FILE) == b"second" and [p.name for p in Path(folder).iterdir()] == [SPEC_FILE]


ROW0, ROW1 = '{"epoch": 0}\n', '{"epoch": 1}\n'


def test_tunes_copy_of_a_result_log_onto_a_full_disk_leaves_the_stored_log_whole(tmp_path):
    """Tune copies each trial's result.json from its staging folder over the search folder's every few
    seconds; a plain copy truncates the stored log first, so a disk that filled mid-copy lost the rows
    of epochs 0-4 that no checkpoint repeats (seen in CI)."""
    staged = tmp_path / "staging" / "trial_a"
    staged.mkdir(parents=True)
    with small_filesystem(tmp_path / "disk", "2m") as disk:
        stored = disk / "search" / "trial_a" / "result.json"
        stored.parent.mkdir(parents=True)
        staged.joinpath("result.json").write_text(ROW0 + json.dumps({"epoch": 1, "pad": "x" * 3_000_000}) + "\n")
        storage = tune_storage(str(disk / "search"))
        filesystem = pickle.loads(pickle.dumps(storage["storage_filesystem"]))  # as Ray ships it to the trials
        for filesystem_in_use, stored_after in ((fs.LocalFileSystem(), "cut"), (filesystem, "whole")):
            stored.write_text(ROW0)
            with pytest.raises(OSError) as failed:
                fs.copy_files(str(staged.parent), storage["storage_path"], destination_filesystem=filesystem_in_use)
            assert failed.value.errno == errno.ENOSPC
            whole = stored.read_text() == ROW0 and sorted(p.name for p in stored.parent.iterdir()) == ["result.json"]
            assert whole == (stored_after == "whole")

        staged.joinpath("result.json").write_text(ROW0 + ROW1)
        fs.copy_files(str(staged.parent), storage["storage_path"], destination_filesystem=filesystem)
        assert stored.read_text() == ROW0 + ROW1 and sorted(p.name for p in stored.parent.iterdir()) == ["result.json"]


def test_an_upload_that_read_tunes_state_mid_rewrite_leaves_the_last_whole_state_stored(tmp_path):
    """Tune rewrites its state file in the staging folder (truncate, then write) before it checks whether
    its last upload is still reading it; a copy cut short that way was the newest state when the disk
    filled, and resume refused the folder as damaged (seen in CI)."""
    staging, search = tmp_path / "staging", tmp_path / "search"
    staging.mkdir()
    old = search / "trial_a" / "checkpoint_000000"
    old.mkdir(parents=True)
    name = "experiment_state-2026.json"
    storage = tune_storage(str(search))
    filesystem = pickle.loads(pickle.dumps(storage["storage_filesystem"]))
    whole = json.dumps({"trial_data": [[json.dumps({"trial_id": "a"}), "{}"]]})

    def upload(state: str) -> None:
        staging.joinpath(name).write_text(state)
        fs.copy_files(str(staging), storage["storage_path"], destination_filesystem=filesystem)

    upload(whole)
    filesystem.delete_dir(str(old))  # waits for two whole saves
    for cut in (whole[:len(whole) // 2], ""):
        upload(cut)
        assert (search / name).read_text() == whole and old.exists()
        assert sorted(p.name for p in search.iterdir()) == [name, "trial_a"]
    upload(whole)
    upload(whole)
    assert not old.exists()


def test_an_old_checkpoint_outlives_every_saved_tune_state_that_may_name_it(tmp_path):
    """Tune deletes a trial's previous checkpoint when it registers a new one, before its state naming
    the new one is saved; a full disk then left the saved state naming a deleted checkpoint (seen in
    this session's run of the full-disk test: resume failed both unfinished trials)."""
    search = tmp_path / "search"
    old, new = search / "trial_a" / "checkpoint_000000", search / "trial_a" / "checkpoint_000001"
    for checkpoint in (old, new):
        checkpoint.mkdir(parents=True)
    trainer_run = tmp_path / "search" / "train_runs" / "trial_a" / "checkpoint_000000"  # Ray Train's, no Tune state
    trainer_run.mkdir(parents=True)
    filesystem = pickle.loads(pickle.dumps(tune_storage(str(search))["storage_filesystem"]))

    def save_state() -> None:
        with filesystem.open_output_stream(f"{search}/experiment_state-2026.json") as stream:
            stream.write(b"{}")

    save_state()
    filesystem.delete_dir(str(old))  # Tune registered `new`
    filesystem.delete_dir(str(trainer_run))
    assert old.exists() and not trainer_run.exists()
    save_state()  # this sync may have begun before `new` was registered
    assert old.exists()
    save_state()  # begun after the first one ended: names `new`
    assert not old.exists() and new.exists()

    newest = search / "trial_a" / "checkpoint_000002"
    newest.mkdir()
    filesystem.delete_dir(str(new))
    left_by_a_killed_driver = search / "trial_b" / "checkpoint_000003"
    left_by_a_killed_driver.mkdir(parents=True)
    (search / "trial_b" / "checkpoint_000004").mkdir()
    keep_final_checkpoints(str(search), [str(newest), str(search / "trial_b" / "checkpoint_000004")])  # the search ended
    assert sorted(p.relative_to(search).as_posix() for p in search.glob("trial_*/checkpoint_*")) == [
        "trial_a/checkpoint_000002", "trial_b/checkpoint_000004"]
    save_state()
    save_state()  # nothing waits any more
    assert newest.exists()


def test_resources_are_checked_against_the_whole_cluster():
    cluster = {"CPU": 2.0, "memory": 1e9}
    check_resources(Resources(cpu=2), cluster)
    with pytest.raises(ClusterError, match=r"^resources\.gpu: 1 per trial, but the cluster has 0 GPUs$"):
        check_resources(Resources(gpu=1), cluster)
    with pytest.raises(ClusterError, match=r"^resources\.cpu: 64 per trial, but the cluster has 2 CPUs$"):
        check_resources(Resources(cpu=64), cluster)
    with pytest.raises(ClusterError, match=r"^resources\.cpu: 1 per worker x 3 workers = 3 per trial, but the cluster has 2 CPUs$"):
        check_resources(Resources(cpu=1, workers=3), cluster)


def test_an_error_is_its_exception_line():
    try:
        raise ValueError("table_size: 0 is too small")
    except ValueError:
        import traceback

        text = f"Failure # 1 (occurred at 2026-01-01_00-00-00)\nray::ImplicitFunc.train() (pid=1)\n{traceback.format_exc()}"
    assert error_line(text) == "ValueError: table_size: 0 is too small"
    dead = ("ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task. "
            "Some common causes include: (1) the process was killed by the OOM killer due to high memory usage, "
            "(2) ray stop --force was called, or (3) the worker crashed unexpectedly.")
    assert error_line(f"Failure # 1\n{dead}") == "ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task."
    assert error_line("x" * 300) == "x" * 200 + "…"
    unbuildable = ("sharetune.trainables.trial.ConfigurationError: the configuration cannot be built: ValueError: dim: 8 is not "
                   "a multiple of deit_tiny's 3 attention heads; allowed: multiples of 3")
    assert error_line(f"Failure # 1\n{unbuildable}") == unbuildable.split("ConfigurationError: ")[1]  # our own: its message alone


def test_constraints_no_proposal_met_are_bad_input_not_success():
    import pandas as pd

    from sharetune.errors import ExitCode
    from sharetune.search.outcome import outcome

    skipped = pd.DataFrame({"trial_id": [None, None], "status": ["INFEASIBLE", "INFEASIBLE"]})
    assert outcome(skipped) == (ExitCode.BAD_INPUT, "constraints: none of the 2 proposals met them, so no trial "
                                                        "trained; loosen them")
    trained = pd.concat([skipped, pd.DataFrame({"trial_id": ["a"], "status": ["TERMINATED"]})])
    assert outcome(trained) == (ExitCode.OK, None)


def test_resume_forgets_the_decisions_tune_held_for_the_last_drivers_actors_and_nothing_else(tmp_path):
    """Ray saves a stop it held until a trial's save resolved, and applies it after a restore to the
    restarted trial's first save (a retried trial stopped after one epoch, in CI)."""
    folder = SearchFolder(tmp_path / "run")
    (tmp_path / "run").mkdir()
    state = tmp_path / "run" / "experiment_state-2026-12-06_10-00-00.json"
    runner = {"_cached_trial_decisions": {}, "_queued_trial_decisions": {}, "_iteration": 7, "_stopper": {"_type": "CLOUDPICKLE_FALLBACK"}}
    saved = {"trial_data": [["{}", "{}"]], "runner_data": runner, "stats": {"start_time": 1.5}}
    state.write_text(json.dumps(saved))
    before = state.stat().st_mtime_ns, state.read_bytes()
    folder.forget_pending_decisions()
    assert (state.stat().st_mtime_ns, state.read_bytes()) == before  # nothing to forget: not rewritten
    state.write_text(json.dumps({**saved, "runner_data": {**runner, "_cached_trial_decisions": {"a1": "STOP"},
                                                           "_queued_trial_decisions": {"b2": "PAUSE"}}}))
    folder.forget_pending_decisions()
    assert json.loads(state.read_text()) == saved
