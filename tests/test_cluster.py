"""The cluster path with real parts: a two-node Ray cluster on loopback with token auth, PostgreSQL
behind an MLflow tracking server, and `sharetune submit` / `status` / `logs` as users run them."""

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import tempfile
from glob import glob
from pathlib import Path

import pytest
import yaml
from helpers import BIN, free_port, mlflow_server, tiny_spec, wait_for
from mlflow.tracking import MlflowClient

from sharetune.search import report


def postgres_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(versions[-1]).parent if versions else None


def run(command: list[str], env: dict, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, **kwargs)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout}\n{done.stderr}"
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


@contextlib.contextmanager
def ray_cluster(env: dict, temp: Path):
    """Head and a second node, each with one CPU and a resource of its own, token auth on."""
    port, dashboard = free_port(), free_port()
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
    try:
        run([str(BIN / "ray"), "start", "--head", "--port", str(port), "--dashboard-host", "127.0.0.1",
             "--dashboard-port", str(dashboard), "--include-dashboard", "true", "--temp-dir", str(temp),
             "--resources", json.dumps({"node_a": 1}), *common], env)
        run([str(BIN / "ray"), "start", "--address", f"127.0.0.1:{port}", "--resources", json.dumps({"node_b": 1}), *common], env)
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def sharetune(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return run([str(BIN / "sharetune"), *args], env, cwd=cwd)


def test_submitted_search_runs_on_both_nodes_and_logs_to_the_mlflow_server():
    with tempfile.TemporaryDirectory(prefix="sharetune-cluster-") as scratch:
        root = Path(scratch)
        os.chmod(root, 0o755)  # the postgres user must reach its data directory
        env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
               "PATH": f"{BIN}:{os.environ['PATH']}"}
        env.pop("MLFLOW_TRACKING_URI", None)
        (root / "artifacts").mkdir()
        spec = tiny_spec(name="cluster", budget={"num_samples": 4, "max_concurrent": 2},
                         fixed={"table_size": 64, "epochs": 8, "hidden": [1024, 1024]})  # long enough to overlap
        (root / "spec.yaml").write_text(yaml.safe_dump(spec))
        with postgres(root / "pg") as backend, mlflow_server(backend, root / "artifacts") as tracking, \
                ray_cluster(env, root / "ray") as dashboard:
            submitted = sharetune("submit", "spec.yaml", "--address", dashboard, "--mlflow-uri", tracking,
                                  "--storage", str(root / "results"), "--name", "run", env=env, cwd=root)
            job = submitted.stdout.strip()

            def finished() -> bool:
                state = sharetune("status", job, "--address", dashboard, env=env, cwd=root).stdout
                assert not state.startswith(("FAILED", "STOPPED")), state + sharetune("logs", job, "--address", dashboard, env=env, cwd=root).stdout
                return state.startswith("SUCCEEDED")

            wait_for(finished, "the submitted search", 600)
            logs = sharetune("logs", job, "--address", dashboard, env=env, cwd=root).stdout
            assert "4/4 done" in logs and "Pareto front" in logs
            followed = sharetune("logs", job, "--follow", "--address", dashboard, env=env, cwd=root).stdout
            assert "Pareto front" in followed  # streams to the end, then returns

            every = report.trials_from_folder(root / "results" / "run")
            trials = every[every["trial_id"].notna()]  # the rest: re-proposals answered without training
            assert len(trials) == 4 and set(trials["status"]) == {"TERMINATED"}
            assert set(every["status"]) - {"TERMINATED"} <= {"DUPLICATE"}
            assert trials["node_id"].nunique() == 2  # trials ran on both nodes

            client = MlflowClient(tracking)
            experiment = client.get_experiment_by_name("cluster")
            runs = client.search_runs([experiment.experiment_id])
            children = [r for r in runs if "sharetune.trial_id" in r.data.tags]
            duplicates = [r for r in runs if r.data.tags.get("sharetune.kind") == "duplicate"]
            assert len(children) == 4 and len(duplicates) == len(every) - 4 and len(runs) == 1 + 4 + len(duplicates)
            assert {r.data.tags["sharetune.trial_id"] for r in children} == set(trials["trial_id"])
            assert all(r.info.status == "FINISHED" for r in runs)

            # a second, long search: `sharetune stop` ends it
            second = sharetune("submit", "spec.yaml", "--address", dashboard, "--mlflow-uri", tracking, "--set",
                               "fixed.epochs=500", "--storage", str(root / "results"), "--name", "long",
                               env=env, cwd=root).stdout.strip()
            def state() -> str:
                return sharetune("status", second, "--address", dashboard, env=env, cwd=root).stdout

            wait_for(lambda: state().startswith("RUNNING"), "the second search")
            assert sharetune("stop", second, "--address", dashboard, env=env, cwd=root).stdout.strip() == "stopping"
            wait_for(lambda: state().startswith("STOPPED"), "the stopped search")
