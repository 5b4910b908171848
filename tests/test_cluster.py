"""The cluster path with real parts: a two-node Ray cluster on loopback with token auth, PostgreSQL
behind an MLflow tracking server, `sharetune submit` / `status` / `logs` / `stop` as users run them,
and a node that crashes mid-trial."""

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from glob import glob
from pathlib import Path

import pytest
import yaml
from helpers import BIN, all_processes, free_port, mlflow_server, tiny_spec, trial_rows, wait_for
from mlflow.tracking import MlflowClient

from sharetune.search import report


def postgres_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(versions[-1]).parent if versions else None


def run(command: list[str], env: dict, expect: int = 0, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, **kwargs)
    assert done.returncode == expect, f"{' '.join(command)}\n{done.stdout}\n{done.stderr}"
    return done


@contextlib.contextmanager
def postgres(folder: Path):
    """A real PostgreSQL server in a temporary data directory, on loopback."""
    pg = postgres_bin()
    if pg is None:
        pytest.skip("PostgreSQL server binaries not found (make test installs Debian's postgresql)")
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # initdb refuses root
    folder.mkdir()
    if as_postgres:
        shutil.chown(folder, "postgres")
    port, data = free_port(), folder / "data"
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    run([*as_postgres, str(pg / "initdb"), "-D", str(data), "-U", "sharetune", "--auth=trust"], env)
    run([*as_postgres, str(pg / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w", "start",
         "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"], env)
    try:
        run([*as_postgres, str(pg / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "sharetune", "mlflow"], env)
        yield f"postgresql://sharetune@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*as_postgres, str(pg / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], env=env,
                       capture_output=True, timeout=120)


@dataclass
class Cluster:
    dashboard: str  # where jobs are submitted
    second_node: str  # the second node's Ray node id
    crash_second_node: Callable[[], None]  # kill -9 of all its processes, as when its machine fails


def stop_node(node: subprocess.Popen, sig: signal.Signals, wait_s: float = 30) -> None:
    """Signal every process of a `ray start --block` node: its session (Ray's daemons, the command) and
    every descendant (the raylet's workers, which may leave the session); wait up to `wait_s` for it to end."""
    processes, doomed = all_processes(), {node.pid}
    while grown := {pid for pid, (parent, session) in processes.items()
                    if pid not in doomed and (parent in doomed or session == node.pid)}:
        doomed |= grown
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        node.wait(timeout=wait_s)


@contextlib.contextmanager
def ray_cluster(env: dict, temp: Path):
    """Head and a second node, each with one CPU, token auth on. Each node runs in a process group of
    its own (`ray start --block` in a new session), so the test stops exactly its nodes, never another
    Ray on the machine, and can crash the second node alone."""
    port, dashboard = free_port(), free_port()
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats", "--block"]
    nodes: list[subprocess.Popen] = []

    def start(*args: str, agent: int) -> subprocess.Popen:
        # each node's job agent on a port of its own: Ray's default (52365) may be another Ray's on this machine
        nodes.append(subprocess.Popen([str(BIN / "ray"), "start", *args, "--dashboard-agent-listen-port", str(agent), *common],
                                      env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return nodes[-1]

    def listening(port: int) -> bool:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True

    def node_ids() -> dict[str, str]:
        alive = {"filter_keys": "state", "filter_predicates": "=", "filter_values": "ALIVE"}
        listed = dashboard_get(f"http://127.0.0.1:{dashboard}", f"/api/v0/nodes?{urllib.parse.urlencode(alive)}", env)
        return {"second" if "second_node" in node["resources_total"] else "head": node["node_id"]
                for node in listed["data"]["result"]["result"]}

    try:
        head_agent = free_port()
        head = start("--head", "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                     "--include-dashboard", "true", "--temp-dir", str(temp), agent=head_agent)
        wait_for(lambda: "head" in node_ids(), "the head node", 120, head)
        # jobs go to the head's agent, which starts after its node is listed (past submit's 60 s on a loaded machine)
        wait_for(lambda: listening(head_agent), "the head's job agent", 180, head)
        second = start("--address", f"127.0.0.1:{port}", "--resources", json.dumps({"second_node": 1}), agent=free_port())
        wait_for(lambda: "second" in node_ids(), "the second node", 120, second)
        yield Cluster(f"http://127.0.0.1:{dashboard}", node_ids()["second"], lambda: stop_node(second, signal.SIGKILL))
    finally:
        for node in reversed(nodes):
            stop_node(node, signal.SIGTERM, wait_s=5)  # the head's `ray start --block` takes more than 30 s to end on it
            stop_node(node, signal.SIGKILL)  # whatever SIGTERM left


# What the compose stack and the KubeRay manifests set on every node: `sharetune stop` sends Ctrl-C's signal
STOP_AS_CTRL_C = {"RAY_JOB_STOP_SIGNAL": "SIGINT", "RAY_JOB_STOP_WAIT_TIME_S": "120"}


def sharetune(*args: str, env: dict, cwd: Path, expect: int = 0) -> subprocess.CompletedProcess:
    return run([str(BIN / "sharetune"), *args], env, expect, cwd=cwd)


def dashboard_get(dashboard: str, path: str, env: dict) -> dict:
    """The dashboard's REST answer at `path`, to poll with: a `sharetune status` or `ray list` command
    starts a process that imports Ray (seconds of a core each call)."""
    request = urllib.request.Request(f"{dashboard}{path}", headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def job_status(dashboard: str, job: str, env: dict) -> str:
    return dashboard_get(dashboard, f"/api/jobs/{job}", env)["status"]


def submit_entrypoint(dashboard: str, env: dict, entrypoint: str, runtime_env: dict | None = None) -> str:
    """A job that `sharetune submit` would not send (a driver that fails), through the dashboard's REST API."""
    body = json.dumps({"entrypoint": entrypoint, "runtime_env": runtime_env or {}}).encode()
    request = urllib.request.Request(f"{dashboard}/api/jobs/", data=body, headers={
        "Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["submission_id"]


@pytest.mark.slow
def test_a_submitted_search_survives_a_crashed_node_and_logs_every_epoch_once_to_the_mlflow_server():
    with tempfile.TemporaryDirectory(prefix="sharetune-cluster-") as scratch:
        root = Path(scratch)
        os.chmod(root, 0o755)  # the postgres user must reach its data directory
        env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
               "PATH": f"{BIN}:{os.environ['PATH']}", **STOP_AS_CTRL_C}
        env.pop("MLFLOW_TRACKING_URI", None)
        (root / "artifacts").mkdir()
        epochs = 60  # about 20 s a trial: the second starts while the first trains, so on the second node
        spec = tiny_spec(name="cluster", budget={"num_samples": 2, "max_concurrent": 2},
                         fixed={"table_size": 64, "epochs": epochs, "hidden": [1024, 1024]})
        (root / "spec.yaml").write_text(yaml.safe_dump(spec))
        folder = root / "results" / "run"
        with postgres(root / "pg") as backend, mlflow_server(backend, root / "artifacts") as tracking, \
                ray_cluster(env, root / "ray") as cluster:
            submitted = sharetune("submit", "spec.yaml", "--address", cluster.dashboard, "--mlflow-uri", tracking,
                                  "--storage", str(root / "results"), "--name", "run", env=env, cwd=root)
            job = submitted.stdout.strip()

            def status() -> str:
                return sharetune("status", job, "--address", cluster.dashboard, env=env, cwd=root).stdout

            # one trial per node (one CPU each); the second node crashes once Tune holds its trial's checkpoint of
            # epoch 1: Tune records a checkpoint after it logs the result, and takes the next result only then
            def second_node_trial() -> str | None:
                return next((t for t, rows in trial_rows(folder).items() if len(rows) >= 3 and rows[-1]["node_id"] == cluster.second_node), None)

            wait_for(second_node_trial, "a trial on the second node", 300)
            crashed = second_node_trial()
            cluster.crash_second_node()

            ended = ("SUCCEEDED", "FAILED", "STOPPED")
            wait_for(lambda: job_status(cluster.dashboard, job, env) in ended, "the submitted search", 600, every=2)
            state = status()
            assert state.startswith("SUCCEEDED"), state + sharetune("logs", job, "--address", cluster.dashboard, env=env, cwd=root).stdout
            logs = sharetune("logs", job, "--address", cluster.dashboard, env=env, cwd=root).stdout
            assert "2/2 done" in logs and "Pareto front" in logs
            followed = sharetune("logs", job, "--follow", "--address", cluster.dashboard, env=env, cwd=root)
            assert "Pareto front" in followed.stdout and followed.stderr == ""  # streams to the end, then exits 0

            every = report.trials_from_folder(folder)
            trials = every[every["trial_id"].notna()]  # the rest: re-proposals answered without training
            assert len(trials) == 2 and set(trials["status"]) == {"TERMINATED"} and set(trials["epochs_done"]) == {epochs}
            assert set(every["status"]) - {"TERMINATED"} <= {"DUPLICATE"}
            # the crashed node's trial went on from its checkpoint on the head, which trained the rest
            rows = trial_rows(folder)[crashed]
            assert [row["epoch"] for row in rows] == list(range(epochs + 1)) and rows[-1]["node_id"] != cluster.second_node
            assert len({row["node_id"] for row in rows}) == 2

            client = MlflowClient(tracking)
            experiment = client.get_experiment_by_name("cluster")
            runs = client.search_runs([experiment.experiment_id])
            children = [r for r in runs if "sharetune.trial_id" in r.data.tags]
            duplicates = [r for r in runs if r.data.tags.get("sharetune.kind") == "duplicate"]
            assert len(children) == 2 and len(duplicates) == len(every) - 2 and len(runs) == 1 + 2 + len(duplicates)
            assert {r.data.tags["sharetune.trial_id"] for r in children} == set(trials["trial_id"])
            assert all(r.info.status == "FINISHED" for r in runs)
            for child in children:  # every epoch once, the crashed trial's included
                steps = [m.step for m in client.get_metric_history(child.info.run_id, "test_accuracy")]
                assert sorted(steps) == list(range(1, epochs + 1))

            # a second, long search on the head alone: `sharetune stop` ends it
            second = sharetune("submit", "spec.yaml", "--address", cluster.dashboard, "--mlflow-uri", tracking, "--set",
                               "fixed.epochs=500", "--storage", str(root / "results"), "--name", "long",
                               env=env, cwd=root).stdout.strip()

            wait_for(lambda: trial_rows(root / "results" / "long"), "the second search's first trial", 300)
            with subprocess.Popen([str(BIN / "sharetune"), "logs", second, "--follow", "--address", cluster.dashboard],
                                  env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as follower:
                try:
                    streamed = follower.stdout.readline()  # following the running search's stream
                    assert sharetune("stop", second, "--address", cluster.dashboard, env=env, cwd=root).stdout.strip() == "stopping"
                    wait_for(lambda: job_status(cluster.dashboard, second, env) == "STOPPED", "the stopped search")
                    rest, errors = follower.communicate(timeout=120)  # the stream went on to the end: exit 130, as Ctrl-C
                finally:
                    follower.kill()
            assert sharetune("status", second, "--address", cluster.dashboard, env=env, cwd=root).stdout.startswith("STOPPED")
            # stopped as Ctrl-C stops a search (the stack's RAY_JOB_STOP_SIGNAL), not killed: its runs end KILLED
            assert "continue with `sharetune resume`" in sharetune("logs", second, "--address", cluster.dashboard, env=env, cwd=root).stdout
            assert follower.returncode == 130 and "continue with `sharetune resume`" in streamed + rest and errors == "", errors
            sharetune("logs", second, "--follow", "--address", cluster.dashboard, env=env, cwd=root, expect=130)  # and once ended
            stopped = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("sharetune.search_path", "").endswith("/long")]
            assert [r.info.status for r in stopped] == ["KILLED"]

            # a driver that refuses its input and one that cannot start: `status` in one line, and `logs --follow`
            # exits with the search's own code, or with 1 and Ray's reason
            refused = submit_entrypoint(cluster.dashboard, env, "sharetune search missing.yaml")
            unstartable = submit_entrypoint(cluster.dashboard, env, "true", {"working_dir": "file:///nonexistent.zip"})
            wait_for(lambda: {job_status(cluster.dashboard, j, env) for j in (refused, unstartable)} == {"FAILED"}, "the failed jobs")
            assert sharetune("status", refused, "--address", cluster.dashboard, env=env, cwd=root).stdout == \
                f"FAILED: the search exited with code 2; its output: sharetune logs {refused}\n"
            followed = sharetune("logs", refused, "--follow", "--address", cluster.dashboard, env=env, cwd=root, expect=2)
            assert "error: spec: no such file missing.yaml" in followed.stdout and followed.stderr == "", followed
            followed = sharetune("logs", unstartable, "--follow", "--address", cluster.dashboard, env=env, cwd=root, expect=1)
            assert followed.stderr.count("\n") == 1 and "nonexistent.zip" in followed.stderr, followed.stderr
            for missing in ({"RAY_AUTH_MODE": "disabled"}, {"RAY_AUTH_TOKEN": "deadbeef"}):  # no token, a wrong one
                refused = subprocess.run([str(BIN / "sharetune"), "status", job, "--address", cluster.dashboard],
                                         env={**env, **missing}, cwd=root, capture_output=True, text=True, timeout=120)
                assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
                assert "the dashboard refused this client's token" in refused.stderr
            unknown = subprocess.run([str(BIN / "sharetune"), "logs", "raysubmit_none", "--follow", "--address", cluster.dashboard],
                                     env=env, cwd=root, capture_output=True, text=True, timeout=120)
            assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1 and "raysubmit_none" in unknown.stderr, unknown.stderr
