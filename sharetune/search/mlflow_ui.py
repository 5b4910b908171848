"""One light MLflow UI for a local store: a single uvicorn worker and no job runner.

`mlflow ui` by default starts four server workers and MLflow 3's job runner with its huey
consumers, 15 processes in all, for a UI one person reads; this starts `mlflow server` with one
worker and job execution off (3 processes with the caller), and tells when it answers. The server's
own output (start-up notices, a line per request) goes to a log file, out of the terminal.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from sharetune.cache import cache_dir
from sharetune.errors import without_passwords
from sharetune.search.mlflow_queue import local_artifacts
from sharetune.spaces.locations import UI_HOST

# MLflow 3 runs GenAI jobs (and their periodic tasks) in huey consumer processes the UI never uses
LIGHT_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
READY_TIMEOUT_S = 300.0  # a loaded machine takes minutes to import MLflow's server
# MLflow 3.17's UI shows its GenAI pages (an experiment's traces overview) unless a page asks for model training
MODEL_TRAINING_VIEW = "?workflowType=machine_learning"


def ui_link(server: str, run: tuple[str, str] | None = None, artifact: str | None = None) -> str:
    """A page of the UI at `server` (http://HOST:PORT) in its model-training view: the experiments, or
    a run (experiment id, run id), with one of its artifacts selected."""
    page = "experiments" if run is None else f"experiments/{run[0]}/runs/{run[1]}" + (f"/artifacts/{artifact}" if artifact else "")
    return f"{without_passwords(server).rstrip('/')}/#/{page}{MODEL_TRAINING_VIEW}"


def port_free(port: int) -> bool:
    """Whether the server can listen on UI_HOST:`port` (as uvicorn binds, reusing a closed one's address)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((UI_HOST, port))
        except OSError:
            return False
    return True


def server_log(port: int) -> Path:
    return cache_dir() / f"mlflow-ui-{port}.log"


def start_ui(uri: str, port: int) -> subprocess.Popen:
    """`mlflow server` for the store `uri` on UI_HOST:`port`, one worker, artifacts beside the store,
    its output to `server_log(port)`."""
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", UI_HOST,
               "--port", str(port), "--default-artifact-root", local_artifacts(), "--workers", "1"]
    with server_log(port).open("w") as log:
        return subprocess.Popen(command, env={**os.environ, **LIGHT_ENV}, stdout=log, stderr=subprocess.STDOUT)


def wait_until_ready(server: subprocess.Popen, port: int) -> bool:
    """Whether the server answers its health check before it exits or READY_TIMEOUT_S passes."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while server.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{UI_HOST}:{port}/health", timeout=2) as answer:
                if answer.status == 200:
                    return True
        except OSError:
            time.sleep(0.2)
    return False
