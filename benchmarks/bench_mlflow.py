"""How long Tune's loop waits on MLflow per result, behind a deliberately slow tracking server.

    python benchmarks/bench_mlflow.py [--delay 0.5]

A real MLflow server on loopback sits behind a proxy that holds every request `--delay` seconds.
A real search (synthetic data, 4 trials x 5 epochs, local Ray) logs to it through the proxy; the
time spent inside the MLflow callback's hooks is what Tune's loop waits. The baseline, timed in the
same run through the same proxy, is one synchronous `log_batch` of an epoch's metrics: what a
callback that writes from Tune's loop (sharetune's before its queue, Ray's MLflowLoggerCallback
with one request per metric, worse) waits per result. Target: at most 50 ms per result.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import ray
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from sharetune.search import tuner
from sharetune.search.mlflow_logger import MlflowLogger
from sharetune.search.mlflow_ui import LIGHT_ENV
from sharetune.spaces import parse_spec

SPEC = {"name": "bench-mlflow", "family": "arbnet", "data": {"name": "synthetic"},
        "fixed": {"table_size": 64, "epochs": 5, "hidden": [16]},
        "dimensions": {"hash": {"choice": ["uniform", "dirichlet"]}, "alpha": {"loguniform": [0.01, 10.0]}},
        "objectives": {"test_accuracy": "max"}, "budget": {"num_samples": 4, "max_concurrent": 2}}
HOOKS = ("setup", "on_trial_start", "on_trial_result", "on_trial_complete", "on_experiment_end")


def slow_proxy(target: str, delay: float) -> http.server.ThreadingHTTPServer:
    """Forwards every request to `target` after `delay` seconds."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def forward(self) -> None:
            time.sleep(delay)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
            request = urllib.request.Request(target + self.path, data=body, method=self.command,
                                             headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
            try:
                with urllib.request.urlopen(request, timeout=60) as answer:
                    status, headers, payload = answer.status, answer.headers, answer.read()
            except urllib.error.HTTPError as err:
                status, headers, payload = err.code, err.headers, err.read()
            self.send_response(status)
            for name, value in headers.items():
                if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = forward

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def start_mlflow(root: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", (root / "artifacts").as_uri(), "--serve-artifacts", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, **LIGHT_ENV})
    for _ in range(240):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("the MLflow server did not start")


def timed(hook, waits: dict[str, list[float]]):
    @functools.wraps(hook)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return hook(*args, **kwargs)
        finally:
            waits[hook.__name__].append(time.perf_counter() - start)

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, default=0.5, help="seconds the proxy holds each request")
    delay = parser.parse_args().delay
    root = Path(tempfile.mkdtemp(prefix="bench-mlflow-"))
    port = 45000 + os.getpid() % 10000
    server = start_mlflow(root, port)
    proxy = slow_proxy(f"http://127.0.0.1:{port}", delay)
    uri = f"http://127.0.0.1:{proxy.server_address[1]}"
    try:
        waits: dict[str, list[float]] = {name: [] for name in HOOKS}
        for name in HOOKS:
            setattr(MlflowLogger, name, timed(getattr(MlflowLogger, name), waits))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        start = time.perf_counter()
        search = tuner.run(parse_spec(SPEC), storage=root / "results", mlflow_uri=uri, name="slow", progress=False)
        took = time.perf_counter() - start
        ray.shutdown()

        client = MlflowClient(uri)  # the baseline: one epoch's metrics written from the loop, through the same proxy
        run = client.create_run(client.get_experiment_by_name(SPEC["name"]).experiment_id).info.run_id
        synchronous = []
        for step in range(10):
            metrics = [Metric(k, 0.5, int(time.time() * 1000), step) for k in ("val_accuracy", "test_accuracy", "train_loss")]
            begin = time.perf_counter()
            client.log_batch(run, metrics=metrics)
            synchronous.append(time.perf_counter() - begin)
    finally:
        server.terminate()
        proxy.shutdown()
        shutil.rmtree(root, ignore_errors=True)

    per_result = waits["on_trial_result"]
    print(f"MLflow behind a proxy holding each request {delay:.2f} s; search of 4 trials x 5 epochs in {took:.0f} s, "
          f"backlog left {search.mlflow_backlog}")
    print(f"{'hook':20s} {'calls':>6s} {'median ms':>10s} {'max ms':>8s}")
    for name in HOOKS:
        if waits[name]:
            print(f"{name:20s} {len(waits[name]):6d} {1000 * statistics.median(waits[name]):10.2f} {1000 * max(waits[name]):8.2f}")
    base = statistics.median(synchronous)
    print(f"{'sync log_batch':20s} {len(synchronous):6d} {1000 * base:10.2f} {1000 * max(synchronous):8.2f}   (baseline)")
    print(f"per result: queue {1000 * max(per_result):.2f} ms at most (target <= 50 ms), "
          f"{statistics.median(per_result) / base:.4f} of a synchronous write")


if __name__ == "__main__":
    main()
