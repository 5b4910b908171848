"""Search folders on an object store, as a cluster's shared storage: a real S3 server (moto's, on
loopback) through pyarrow's S3 filesystem, with the endpoint given as users give MinIO's
(AWS_ENDPOINT_URL); and a store that does not answer."""

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from helpers import free_port, parent_and_child_runs, tiny_spec
from mlflow.tracking import MlflowClient
from pyarrow import fs
from typer.testing import CliRunner

from sharetune.cli import app
from sharetune.search.mlflow_queue import QUEUE_FILE
from sharetune.trainables import load_exported

BUCKET = "sharetune-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def s3_endpoint():
    """An S3 server on loopback holding one empty bucket."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._port}"
    try:
        fs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True, access_key="test", secret_key="test",
                        region="us-east-1").create_dir(BUCKET)
        yield endpoint
    finally:
        server.stop()


def sharetune(env: dict, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sharetune.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def result_rows(bucket: fs.FileSystem, folder: str) -> dict[str, list[int]]:
    """Each trial's epochs in its result.json on the store, so far."""
    rows = {}
    for info in bucket.get_file_info(fs.FileSelector(folder, allow_not_found=True)):
        log = f"{info.path}/result.json"
        if info.base_name.startswith("trial_") and bucket.get_file_info(log).type == fs.FileType.File:
            with bucket.open_input_stream(log) as stream:
                lines = stream.read().decode().splitlines()
            rows[info.base_name.removeprefix("trial_")] = [json.loads(line)["epoch"] for line in lines if line.endswith("}")]
    return rows


@pytest.mark.slow
def test_a_search_on_s3_resumes_after_ctrl_c_and_lists_reports_and_exports_from_there(s3_endpoint, tmp_path, monkeypatch):
    env = {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint, "SHARETUNE_CACHE": str(tmp_path / "cache"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    epochs = 12
    spec = tiny_spec(fixed={"table_size": 64, "epochs": epochs, "hidden": [256, 256]}, budget={"num_samples": 2, "max_concurrent": 2})
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    storage, folder = f"s3://{BUCKET}/results", f"s3://{BUCKET}/results/run"
    bucket = fs.S3FileSystem(endpoint_override=s3_endpoint, access_key="test", secret_key="test", region="us-east-1")

    search = subprocess.Popen([sys.executable, "-m", "sharetune.cli", "search", "spec.yaml", "--storage", storage, "--name", "run"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not any(len(epochs_so_far) > 3 for epochs_so_far in result_rows(bucket, folder[5:]).values()):
        assert search.poll() is None, search.stdout.read()
        time.sleep(1)
    search.send_signal(signal.SIGINT)
    output, _ = search.communicate(timeout=120)
    assert search.returncode == 130, output
    assert f"search folder: {folder}  (continue it with: sharetune resume {folder})" in output

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    resumed = sharetune(env, elsewhere, "resume", folder)
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stdout + resumed.stderr
    rows = result_rows(bucket, folder[5:])
    assert len(rows) == 2 and all(epochs_done == list(range(epochs + 1)) for epochs_done in rows.values()), rows  # each epoch once
    for trial in rows:  # the checkpoint the saved state names, and no other
        names = [info.base_name for info in bucket.get_file_info(fs.FileSelector(f"{folder[5:]}/trial_{trial}"))]
        assert [name for name in names if name.startswith("checkpoint_")] == [f"checkpoint_{epochs - 1:06d}"]
    # the queue of MLflow writes cannot live in a bucket: it is on the driver's disk, emptied
    assert not bucket.get_file_info(f"{folder[5:]}/{QUEUE_FILE}").type == fs.FileType.File
    assert len(list((tmp_path / "cache" / "mlflow-queue").glob("run-*.db"))) == 1
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    parents, children = parent_and_child_runs(client, "tiny")
    assert [p.info.status for p in parents] == ["FINISHED"] and parents[0].data.tags["sharetune.search_path"] == folder
    assert sorted(c.data.tags["sharetune.trial_id"] for c in children) == sorted(rows)
    for child in children:
        steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, "test_accuracy"))
        assert child.info.status == "FINISHED" and steps == list(range(1, epochs + 1))

    for name in (*CREDENTIALS, "AWS_ENDPOINT_URL"):  # the commands that only read the store, in this process
        monkeypatch.setenv(name, env[name])
    listed = CliRunner().invoke(app, ["list", "--storage", storage])
    assert listed.exit_code == 0, listed.output
    (line,) = [line for line in listed.output.splitlines() if line.endswith(folder)]
    assert " finished " in line and " 2/2 " in line
    reported = CliRunner().invoke(app, ["report", folder, "--out", str(tmp_path / "report")])
    assert reported.exit_code == 0, reported.output
    table = (tmp_path / "report" / "trials.csv").read_text().splitlines()
    assert sorted(row.split(",")[0] for row in table[1:]) == sorted(rows)
    trial = sorted(rows)[0]
    exported = CliRunner().invoke(app, ["export", folder, "--trial", trial, "--out", str(tmp_path / "model.pt")])
    assert exported.exit_code == 0, exported.output
    assert load_exported(tmp_path / "model.pt")(torch.zeros(2, 1, 8, 8)).shape == (2, 4)  # synthetic: 1x8x8, 4 classes


def test_a_store_that_does_not_answer_is_one_line_naming_it_and_a_search_starts_nothing(tmp_path):
    """A pyarrow traceback before, and `search` got as far as starting Ray and loading the data."""
    closed = free_port()
    env = {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed}"}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(tiny_spec()))
    commands = {"search": ["search", "spec.yaml", "--storage", "s3://nobucket/results", "--name", "x"],
                "resume": ["resume", "s3://nobucket/results/x"], "report": ["report", "s3://nobucket/results/x"],
                "list": ["list", "--storage", "s3://nobucket/results"],
                "export": ["export", "s3://nobucket/results/x", "--trial", "a", "--out", str(tmp_path / "m.pt")]}
    with ThreadPoolExecutor(len(commands)) as pool:  # pyarrow retries each for about ten seconds
        done = dict(zip(commands, pool.map(lambda args: sharetune(env, tmp_path, *args), commands.values())))
    refused = "AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7, Could not connect to server"
    prefixes = {"search": "error: ", "resume": "error: ", "report": "error: s3://nobucket/results/x: ",
                "list": "error: --storage: ", "export": "error: s3://nobucket/results/x: "}
    for command, result in done.items():
        assert result.returncode == 2 and "Traceback" not in result.stderr, (command, result.stderr)
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(prefixes[command]) and refused in line and "bucket 'nobucket'" in line, (command, line)
    assert not (tmp_path / "results").exists() and not (tmp_path / "mlflow.db").exists()
