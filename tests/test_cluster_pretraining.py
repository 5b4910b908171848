"""SPIN's unshared pretraining as Ray work (a task, or a Ray Train run on several workers) on a real local Ray."""

import os
import re
from pathlib import Path

import pytest
import torch
from helpers import tiny_spec

from sharetune.data import load
from sharetune.search import report, tuner
from sharetune.spaces import parse_spec, trial_settings
from sharetune.spaces.spec import Resources
from sharetune.trainables import PRETRAINED_FILE, pretrain
from sharetune.trainables.build import build_spin, unwrap
from sharetune.trainables.cluster_pretraining import pretrain_on_cluster

# conftest: one local Ray for the module; xdist_group keeps the module on one worker, so it starts once
pytestmark = [pytest.mark.usefixtures("local_ray"), pytest.mark.xdist_group("test_cluster_pretraining")]


def test_a_fusion_search_pretrains_once_in_a_ray_worker_with_the_trials_resources_fuses_and_resume_reuses_the_weights(
        tmp_path, capfd):
    spec = parse_spec(tiny_spec(
        family="spin", sampler="grid", budget={"max_concurrent": 2}, resources={"cpu": 1},
        fixed={"dim": 16, "depth": 4, "patch_size": 2, "kernel_size": 3, "epochs": 1, "share_rate": 2, "pretrain_epochs": 2},
        dimensions={"fusion": {"choice": [None, "mean", "channel_weighted_mean"]}}))
    search = tuner.run(spec, storage=str(tmp_path / "results"), mlflow_uri=f"sqlite:///{tmp_path}/mlflow.db", progress=False)
    out = capfd.readouterr().out
    (where,) = re.findall(r"pretraining the unshared convmixer on 1 worker\(s\), each with \{'CPU': 1\.0\} \(cpu\); "
                          r"rank 0 is process (\d+) on node \w+", out)
    assert int(where) != os.getpid()  # a Ray worker trained it, not the search's driver
    assert re.findall(r"pretraining the unshared convmixer: epoch (\d)/2, loss [\d.]+, test accuracy [\d.]+", out) == ["1", "2"]
    weights = Path(search.folder) / PRETRAINED_FILE
    settings = trial_settings({"family": "spin", **spec.fixed})
    unshared = unwrap(build_spin(settings, tuner.load_data(spec), unshared=True))
    assert torch.load(weights, weights_only=True).keys() == unshared.state_dict().keys()
    trials = report.trials_from_folder(search.folder)
    assert len(trials) == 3 and set(trials["status"]) == {"TERMINATED"}
    params = trials.set_index(trials["fusion"].fillna("none"))["unique_params"]
    # counted as deployed (folded); fusion shares whole layers, biases too (SPIN Table 3: 10.84 M vs 11.02 M)
    assert params["channel_weighted_mean"] == params["mean"] == params["none"] - (4 - 2) * 16

    written = weights.stat().st_mtime_ns
    tuner.resume(search.folder)
    assert "pretraining" not in capfd.readouterr().out and weights.stat().st_mtime_ns == written


# A LayerNorm model (no BatchNorm statistics that depend on the per-rank batch), without random
# augmentation, on 512 examples in batches of 64: two workers train what one process does.
DDP = {"family": "spin", "model": "convnext_isotropic", "dim": 8, "depth": 2, "patch_size": 2, "kernel_size": 3,
       "share_rate": 2, "recipe": "arbnet", "lr": 0.05, "batch_size": 64, "fusion": "mean", "pretrain_epochs": 2}


@pytest.mark.slow
def test_pretraining_on_two_workers_is_a_ray_train_run_that_trains_what_one_process_does(tmp_path):
    settings = trial_settings(DDP)
    data = load("synthetic", val_fraction=0)
    lines = []
    state = pretrain_on_cluster(settings, data, resources=Resources(workers=2, cpu=1), storage=str(tmp_path), say=lines.append)
    assert lines[0].startswith("pretraining the unshared convnext_isotropic on 2 worker(s), each with {'CPU': 1.0} (cpu)")
    assert (tmp_path / "train_runs" / "pretraining").is_dir()
    alone_lines = []
    alone = pretrain(settings, data, device=torch.device("cpu"), say=alone_lines.append)
    assert len(lines) == 3 and [line.split(",")[0] for line in lines[1:]] == [line.split(",")[0] for line in alone_lines]
    assert state.keys() == alone.keys()
    for name in alone:
        torch.testing.assert_close(state[name], alone[name], rtol=1e-4, atol=1e-5, msg=name)
