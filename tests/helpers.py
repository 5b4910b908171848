"""Tiny specs for tests (synthetic data, small nets, a handful of epochs), and the devices to test on."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from sharetune.search.mlflow_ui import LIGHT_ENV

BIN = Path(sys.executable).parent

# Every model kind a search builds, tiny, as trial configs (build_kind builds one)
_SPIN = {"family": "spin", "dim": 8, "depth": 4, "patch_size": 2, "kernel_size": 3, "share_rate": 2}
MODEL_KINDS = {
    "arbnet dirichlet": {"family": "arbnet", "hidden": [16], "table_size": 32},
    "arbnet neighborhood": {"family": "arbnet", "hidden": [16], "hash": "neighborhood", "radius": 2, "table_size": 32},
    "convmixer shared": {**_SPIN, "model": "convmixer"},
    "convmixer transformed": {**_SPIN, "model": "convmixer", "transform_groups": 2},
    **{f"convmixer fused, {fusion}": {**_SPIN, "model": "convmixer", "fusion": fusion}
       for fusion in ("choose_first", "mean", "scalar_weighted_mean", "channel_weighted_mean", "pointwise_conv")},
    "convnext shared": {**_SPIN, "model": "convnext_isotropic"},
    "convnext, whole blocks": {**_SPIN, "model": "convnext_isotropic", "components": "block", "share_rate": 4},
    "convnext fused, whole blocks": {**_SPIN, "model": "convnext_isotropic", "components": "block", "fusion": "channel_weighted_mean"},
    "deit shared": {**_SPIN, "model": "deit_tiny", "dim": 24},
    "deit fused": {**_SPIN, "model": "deit_tiny", "dim": 24, "fusion": "scalar_weighted_mean"},
}


def build_kind(kind: str, data, **changes):
    """(settings, model) of MODEL_KINDS[kind] with `changes`, seeded; a fused kind fuses from an unshared
    model of its own settings."""
    from sharetune.spaces import trial_settings
    from sharetune.trainables import build_model
    from sharetune.trainables.build import build_spin, unwrap

    settings = trial_settings({**MODEL_KINDS[kind], **changes})
    torch.manual_seed(0)
    pretrained = unwrap(build_spin(settings, data, unshared=True)).state_dict() if settings.needs_pretrained() else None
    return settings, build_model(settings, data, pretrained)


# CUDA runs where a GPU is present, and shows as skipped elsewhere
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


def all_processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, session id) of every process on the machine, from /proc."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
            found[int(stat.parent.name)] = (int(fields[1]), int(fields[3]))
    return found


def tiny_spec(**changes) -> dict:
    spec = {
        "name": "tiny", "family": "arbnet", "data": {"name": "synthetic"},
        "fixed": {"table_size": 64, "epochs": 2, "hidden": [16]},
        "dimensions": {"hash": {"choice": ["uniform", "dirichlet"]}, "alpha": {"loguniform": [0.01, 10.0]}},
        "objectives": {"test_accuracy": "max"},
        "budget": {"num_samples": 4, "max_concurrent": 2},
    }
    spec.update(changes)
    return spec


COLOURS = [(220, 40, 40), (40, 200, 60), (50, 60, 230)]


def image_folder(root, per_class: int = 24, test_per_class: int = 8, size: int = 16, classes: int = 3):
    """A tiny ImageNet-layout folder of PNGs: one colour per class, with noise, so it is learnable."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", test_per_class)):
        for label in range(classes):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(np.array(COLOURS[label]) + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def trial_rows(folder: Path) -> dict[str, list[dict]]:
    """Each trial's result rows in a search folder so far, oldest first (up to a row being written)."""
    found = {}
    for path in folder.glob("trial_*/result.json"):
        rows = found[path.parent.name.removeprefix("trial_")] = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                break
    return found


def start_local_ray() -> None:
    """A new local Ray for in-process searches (two CPUs, as on the build machines), never another
    test's or a cluster's that runs on this machine."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(check, what: str, timeout: float = 120, process: subprocess.Popen | None = None, every: float = 0.5) -> None:
    """Poll `check` every `every` seconds until it holds (a check that runs a command costs a core while it
    runs: poll it seldom)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(every)
    raise TimeoutError(f"{what} did not come up in {timeout:.0f}s")


@contextlib.contextmanager
def mlflow_server(backend: str, artifacts: Path, port: int | None = None, *, options: tuple[str, ...] = (),
                  env: dict | None = None):
    """An MLflow tracking server on loopback (on `port`, to start one again where it was), with more
    command-line `options` and environment `env`."""
    port = port or free_port()
    log = open(artifacts.parent / "mlflow-server.log", "w")
    process = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", backend, "--artifacts-destination", artifacts.as_uri(),
         "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}", *options],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **LIGHT_ENV, **(env or {})})
    uri = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_for(lambda: urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200, "the MLflow server", 180, process)
        except (RuntimeError, TimeoutError) as err:
            log.flush()
            raise RuntimeError(f"{err}:\n{(artifacts.parent / 'mlflow-server.log').read_text()[-3000:]}") from None
        yield uri
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
        log.close()


@contextlib.contextmanager
def small_filesystem(mount: Path, size: str, read_only: bool = False):
    """A real filesystem of `size` (tmpfs, e.g. "20m") at `mount`, read-only if asked; skips where mounting needs root."""
    mount.mkdir()
    options = f"size={size}{',ro' if read_only else ''}"
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def fill(disk: Path) -> Path:
    """Write zeros until the disk has no byte left."""
    filler = disk / "filler"
    with open(filler, "wb") as out:
        try:
            while True:
                out.write(bytes(1 << 20))
                out.flush()
        except OSError:
            pass
    return filler


def parent_and_child_runs(client, name: str) -> tuple[list, list]:
    """An MLflow experiment's parent runs and child runs."""
    experiment = client.get_experiment_by_name(name)
    every = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in every if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in every if "mlflow.parentRunId" in r.data.tags]
    return parents, children
