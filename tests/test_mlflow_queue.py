"""MLflow down never stops a search nor loses a point: a real tracking server on loopback, stopped
mid-search and started again where it was, and the durable queue's writer in front of it."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import fill, free_port, mlflow_server, small_filesystem, tiny_spec, wait_for
from mlflow.tracking import MlflowClient

from sharetune.errors import ExitCode
from sharetune.search.mlflow_queue import SEARCH_TAG, TRIAL_TAG, MlflowQueue, check_queue, queue_path
from sharetune.search.storage import SearchFolder, StateError

EPOCHS, TRIALS = 4, 4


def sharetune(tmp_path: Path, *args: str, background: bool = False, mlflow_wait_s: str | None = "5"):
    """The CLI; `mlflow_wait_s`: how long its end waits for MLflow (None: sharetune's default)."""
    env = {k: v for k, v in os.environ.items() if k != "SHARETUNE_MLFLOW_WAIT_S"}
    if mlflow_wait_s is not None:
        env["SHARETUNE_MLFLOW_WAIT_S"] = mlflow_wait_s
    command = [sys.executable, "-m", "sharetune.cli", *args]
    if background:
        return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def parent_of(client: MlflowClient, folder: str):
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.`{SEARCH_TAG}` = '{folder}'")
    return runs[0] if runs else None


@pytest.mark.slow
def test_a_server_down_for_the_rest_of_the_search_loses_nothing_and_resume_delivers_it(tmp_path):
    spec = tiny_spec(fixed={"table_size": 64, "epochs": EPOCHS, "hidden": [16]},
                     budget={"num_samples": TRIALS, "max_concurrent": 2})
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    backend, artifacts, port = f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "artifacts", free_port()
    folder = SearchFolder(tmp_path / "results" / "outage")
    with mlflow_server(backend, artifacts, port) as uri:
        search = sharetune(tmp_path, "search", "spec.yaml", "--mlflow-uri", uri, "--name", "outage", background=True)
        client = MlflowClient(uri)
        wait_for(lambda: parent_of(client, folder) is not None, "the search's parent run", 300)
    # the server is down from the first trial on, for the rest of the search
    stdout, stderr = search.communicate(timeout=600)
    assert search.returncode == ExitCode.MLFLOW_BEHIND, stderr
    assert "writes wait for MLflow, which did not answer; `sharetune resume` delivers them" in stderr
    assert "Traceback" not in stderr
    backlog = MlflowQueue(folder, uri, "tiny").pending()
    assert backlog > TRIALS * EPOCHS  # every epoch's metrics at least, kept on disk
    trials = [p.name.removeprefix("trial_") for p in Path(folder).glob("trial_*")]
    assert len(trials) == TRIALS

    with mlflow_server(backend, artifacts, port) as uri:
        # the server is back: resume's end waits for the backlog as long as a user's would (a 5 s wait
        # ran out under two test workers with 9 writes still queued)
        done = sharetune(tmp_path, "resume", str(folder), mlflow_wait_s=None)
        assert done.returncode == ExitCode.OK, done.stderr
        # its progress line tells the trials as they ended (it said `0/4 done` and nothing leading)
        assert f"] {TRIALS}/{TRIALS} done," in done.stdout and "leading: none yet" not in done.stdout, done.stdout
        assert "View run" not in done.stdout  # MLflow's lines for each run it ends on a server: two per trial
        client = MlflowClient(uri)
        parent = parent_of(client, folder)
        assert parent.info.status == "FINISHED"
        children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        trained = [run for run in children if TRIAL_TAG in run.data.tags]
        assert all(run.data.tags.get("sharetune.kind") for run in children if run not in trained), children
        assert sorted(run.data.tags[TRIAL_TAG] for run in trained) == sorted(trials)
        for run in trained:
            assert run.info.status == "FINISHED"
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
            assert sorted(steps) == list(range(1, EPOCHS + 1))  # every epoch, once
            assert "lr" in run.data.params and run.inputs.dataset_inputs
    assert MlflowQueue(folder, uri, "tiny").pending() == 0


def test_the_writer_delivers_in_order_once_the_server_answers(tmp_path):
    folder = SearchFolder(tmp_path / "search")
    backend, artifacts, port = f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "artifacts", free_port()
    uri = f"http://127.0.0.1:{port}"
    queue = MlflowQueue(folder, uri, "writer")
    queue.put("open_parent", name="search", tags={}, params={"family": "arbnet"}, spec_yaml="name: writer\n")
    queue.put("open_trial", key="trial:a", name="a", tags={TRIAL_TAG: "a"}, params={"lr": 0.1}, dataset=None)
    for step in range(1, 6):
        queue.put("metrics", key="trial:a", step=step, timestamp=int(time.time() * 1000), metrics={"unique_params": 10.0,
                  "val_accuracy": step / 10}, tags={})
    queue.put("metrics", key="trial:a", step=3, timestamp=0, metrics={"val_accuracy": 9.0}, tags={})  # delivered twice
    queue.put("end", key="trial:a", status="FINISHED", tags={})
    queue.start()
    wait_for(lambda: queue.outage_since is not None, "the writer to notice the outage", 120)
    assert queue.pending() == 9  # nothing answers on the port: the writer waits, every write stays queued
    assert queue_path(folder).is_file()
    with mlflow_server(backend, artifacts, port):
        assert queue.drain(120) == 0
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("writer").experiment_id], f"tags.`{TRIAL_TAG}` = 'a'")
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(s, s / 10) for s in range(1, 6)]
        assert run.info.status == "FINISHED" and run.data.params["lr"] == "0.1"


def test_writes_the_full_disk_cannot_keep_reach_mlflow_in_order_and_the_rest_when_it_has_room(tmp_path):
    """A full disk under the search folder: the writes wait in memory, and the writer delivers them from
    there, after those the file holds (a search stopped by the full disk loses none)."""
    with small_filesystem(tmp_path / "disk", "2m") as disk:
        folder = SearchFolder(disk / "search")
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # MLflow's own store has room
        queue = MlflowQueue(folder, uri, "full")

        def metrics(step: int) -> None:
            queue.put("metrics", key="trial:a", step=step, timestamp=step, metrics={"unique_params": 1.0, "val_accuracy": step / 10}, tags={})

        queue.put("open_parent", name="search", tags={}, params={}, spec_yaml="name: full\n")
        queue.put("open_trial", key="trial:a", name="a", tags={TRIAL_TAG: "a"}, params={}, dataset=None)
        metrics(1)
        filler = fill(disk)
        for step in range(2, 5):
            metrics(step)
        assert queue.pending() == 6 and len(queue._held) == 3  # three in the file, three in memory only
        queue.start()
        wait_for(lambda: queue.pending() == 0, "the writer to deliver every write", 120)
        filler.unlink()  # room again: later writes go through the file
        metrics(5)
        queue.put("end", key="trial:a", status="FINISHED", tags={})
        assert queue.drain(120) == 0
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("full").experiment_id], f"tags.`{TRIAL_TAG}` = 'a'")
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert sorted((m.step, m.value) for m in history) == [(s, s / 10) for s in range(1, 6)]
        assert run.info.status == "FINISHED"


def test_a_write_that_cannot_be_delivered_is_dropped_and_the_rest_are_delivered(tmp_path, caplog):
    """An operation another version queued (an unknown field here), or one MLflow refuses, fails on every
    try: retrying it as an outage would hold every later write behind it for ever."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    queue = MlflowQueue(SearchFolder(tmp_path / "search"), uri, "mixed")
    queue.put("open_parent", name="search", tags={}, params={}, spec_yaml="name: mixed\n")
    queue.put("open_trial", key="trial:a", name="a", tags={TRIAL_TAG: "a"}, params={}, dataset=None)
    queue.put("metrics", key="trial:a", step=1, timestamp=1, metrics={"val_accuracy": 0.1}, tags={}, unknown=1)
    queue.put("metrics", key="trial:a", step=2, timestamp=2, metrics={"accuracy?": 0.2}, tags={})  # MLflow refuses the name
    queue.put("metrics", key="trial:a", step=3, timestamp=3, metrics={"val_accuracy": 0.3}, tags={})
    queue.start()
    assert queue.drain(60) == 0
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("mixed").experiment_id], f"tags.`{TRIAL_TAG}` = 'a'")
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [(3, 0.3)]
    assert "a queued metrics write cannot be delivered, dropped: TypeError: " in caplog.text
    assert "MLflow refused a metrics write, dropped: Invalid value \"accuracy?\"" in caplog.text
    assert "does not answer" not in caplog.text



@pytest.mark.parametrize("server", ["closed", "silent"])
def test_a_database_server_that_does_not_answer_is_an_outage_from_the_first_try(tmp_path, caplog, server):
    """MLflow's store retried its first connection ten times over 101 s before it raised, so the outage's
    one warning came that late: a short search ended first, then exited 4 without a word of why. A port
    that accepts connections and never answers (the kernel accepts them for a listening socket) held the
    writer for good: no warning ever, and the search's end waited out SHARETUNE_MLFLOW_WAIT_S."""
    with socket.socket() as silent:
        if server == "silent":
            silent.bind(("127.0.0.1", 0))
            silent.listen()
        port = silent.getsockname()[1] if server == "silent" else free_port()  # closed: nothing listens there
        uri = f"postgresql+psycopg://u:s3cret@127.0.0.1:{port}/db"
        queue = MlflowQueue(SearchFolder(tmp_path / "search"), uri, "down")
        queue.put("open_parent", name="search", tags={}, params={}, spec_yaml="name: down\n")
        queue.start()
        wait_for(lambda: queue.outage_since is not None, "the writer to meet the store that does not answer", 300)
        assert queue.drain(0) == 1
    assert f"MLflow at postgresql+psycopg://u:***@127.0.0.1:{port}/db does not answer (OperationalError: " in caplog.text
    assert "s3cret" not in caplog.text  # the warning reaches logs others read
    assert "Operation will be retried" not in caplog.text  # MLflow's own retries, which came first


def test_a_store_that_cannot_be_opened_yet_is_retried_and_then_takes_every_write(tmp_path):
    """An SQLite store that cannot be opened (here a file stands where its folder goes) fails as MLflow's
    client is built: the writer waits as for any outage (its thread died there once, leaving every
    write for `resume`), and delivers them once the store opens."""
    (tmp_path / "later").write_text("not a folder")
    uri = f"sqlite:///{tmp_path / 'later' / 'mlflow.db'}"
    queue = MlflowQueue(SearchFolder(tmp_path / "search"), uri, "later")
    queue.put("open_parent", name="search", tags={}, params={}, spec_yaml="name: later\n")
    queue.put("open_trial", key="trial:a", name="a", tags={TRIAL_TAG: "a"}, params={}, dataset=None)
    queue.start()
    wait_for(lambda: queue.outage_since is not None, "the writer to meet the missing store", 60)
    assert queue._thread.is_alive() and queue.pending() == 2
    (tmp_path / "later").unlink()
    (tmp_path / "later").mkdir()
    assert queue.drain(120) == 0
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("later").experiment_id], f"tags.`{TRIAL_TAG}` = 'a'")
    assert run.info.run_name == "a"


def test_the_queue_check_reads_a_healthy_queue_with_its_wal_and_refuses_a_damaged_page_in_one_line_changing_nothing(tmp_path):
    """`resume` checks the queue before anything starts (check_queue), read-only: a queue whose last writes
    are still in its WAL (its writer still holds it open here) passes untouched; one whose page is damaged
    is refused in one line (SQLite's report spans two), and neither leaves a file beside it."""
    folder = SearchFolder(tmp_path / "search")
    queue = MlflowQueue(folder, "http://127.0.0.1:1", "checked")
    for step in range(200):
        queue.put("metrics", key="trial:a", step=step, timestamp=0, metrics={"val_accuracy": 0.5}, tags={})
    path = queue_path(folder)

    def files() -> dict[str, bytes]:  # the shared-memory index (-shm) changes with every reader
        return {p.name: p.read_bytes() for p in path.parent.iterdir() if not p.name.endswith("-shm")}

    held = files()
    assert f"{path.name}-wal" in held and len(held[f"{path.name}-wal"]) > 0
    check_queue(folder)
    assert files() == held
    queue._connection().close()  # the writer's process ends: SQLite folds the WAL into the file and removes it
    damaged = bytearray(path.read_bytes())
    damaged[2 * 4096 + 1:2 * 4096 + 3] = (4000).to_bytes(2, "big")  # page 3's first free block: past its cells
    path.write_bytes(damaged)
    before = sorted(path.parent.iterdir())
    with pytest.raises(StateError, match=rf"^{path}: the queue of MLflow writes is damaged \(Page 3: free space corruption\); "
                                         "move it away to go on without the writes it held$"):
        check_queue(folder)
    assert sorted(path.parent.iterdir()) == before
