"""A tracking server behind MLflow's basic-auth app, set up as the compose stack's (docker/mlflow-auth.ini,
the admin's password from the environment): it refuses strangers, and a search logs in with the
password from a file, which appears on no process's command line."""

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers import mlflow_server, tiny_spec
from mlflow.tracking import MlflowClient

DOCKER = Path(__file__).parent.parent / "docker"


def command_lines() -> list[str]:
    lines = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            lines.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:  # gone meanwhile
            pass
    return lines


@pytest.mark.slow
def test_a_search_logs_in_to_a_basic_auth_server_with_a_password_from_a_file(tmp_path):
    password = "s3cret-" + os.urandom(6).hex()
    (tmp_path / "mlflow_password").write_text(password + "\n")
    ini = (DOCKER / "mlflow-auth.ini").read_text().replace(
        "postgresql://mlflow@postgres:5432/mlflow", f"sqlite:///{tmp_path / 'auth.db'}")
    (tmp_path / "auth.ini").write_text(ini)
    server_env = {"MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth.ini"), "MLFLOW_AUTH_ADMIN_PASSWORD": password,
                  "MLFLOW_FLASK_SERVER_SECRET_KEY": os.urandom(16).hex()}
    with mlflow_server(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts", options=("--app-name", "basic-auth"),
                       env=server_env) as uri:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
        assert refused.value.code == 401

        (tmp_path / "spec.yaml").write_text(yaml.safe_dump(tiny_spec(budget={"num_samples": 2, "max_concurrent": 2})))
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
        env.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD_FILE=str(tmp_path / "mlflow_password"))
        search = subprocess.Popen([sys.executable, "-m", "sharetune.cli", "search", "spec.yaml", "--mlflow-uri", uri],
                                  cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        seen = []
        while search.poll() is None:  # every process of the search and its Ray workers, while they run
            seen += [line for line in command_lines() if password in line]
            time.sleep(0.25)  # a scan costs a core for a while; the processes that hold settings live for seconds
        stdout, stderr = search.communicate()
        assert search.returncode == 0, stderr
        assert seen == []

        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = "admin", password
        try:
            client = MlflowClient(uri)
            runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
        finally:
            del os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
        assert len([run for run in runs if "sharetune.trial_id" in run.data.tags]) == 2
