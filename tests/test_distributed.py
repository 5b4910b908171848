"""Trials on several workers: Ray Train's TorchTrainer (DDP, gloo on CPU) inside a real Tune search."""

import itertools
import json
import re
from pathlib import Path

import mlflow.pytorch
import pytest
import torch
from helpers import MODEL_KINDS, build_kind, parent_and_child_runs, tiny_spec
from mlflow import MlflowClient

from sharetune.data import load
from sharetune.metrics.counts import count_params
from sharetune.search import tuner
from sharetune.search.models import tracking_at
from sharetune.spaces import parse_spec, trial_settings
from sharetune.trainables import build_model
from sharetune.training import evaluate, train_epochs

# A model whose outputs do not depend on how a batch is split (LayerNorm, no BatchNorm), trained
# without random augmentation, on 512 examples in batches of 64: 32 per worker, every step.
FIXED = {"model": "convnext_isotropic", "dim": 8, "depth": 2, "patch_size": 2, "kernel_size": 3, "share_rate": 2,
         "recipe": "arbnet", "lr": 0.05, "batch_size": 64, "epochs": 60}  # Ctrl-C lands mid-trial: the folder gets rows in batches of a dozen epochs
COMPARED = 8  # epochs that match one process within float tolerance (later, the loss nears 0 and rounding grows)


def ddp_spec(**changes) -> dict:
    return tiny_spec(**{"family": "spin", "fixed": FIXED, "dimensions": {}, "data": {"name": "synthetic", "val_fraction": 0},
                        "resources": {"workers": 2, "cpu": 1}, "budget": {"num_samples": 1, "max_concurrent": 1}, **changes})


def results(folder: Path) -> list[dict]:
    (trial,) = folder.glob("trial_*/result.json")
    return [json.loads(line) for line in trial.read_text().splitlines()]


@pytest.mark.slow
def test_a_two_worker_trial_trains_what_one_process_does_and_resumes_every_rank_after_ctrl_c(tmp_path):
    from test_search_cli import Stop, stop_and_resume

    spec = ddp_spec()
    interrupted = []
    folder, env, resumed = stop_and_resume(tmp_path, spec, Stop(lambda lines: bool(lines) and lines[-1] >= 4,
                                                                then=lambda folder, client: interrupted.extend(results(folder))))
    reported = results(folder)  # Tune restarts the trial's record: the ranks report the checkpoint's records again
    assert [r["epoch"] for r in reported] == list(range(FIXED["epochs"] + 1))  # the whole record, each epoch once
    assert all(r["world_size"] == 2 and r["rank_samples"] == [256, 256] for r in reported[1:])  # both ranks, whole epochs
    assert (folder / "train_runs").is_dir()  # the Ray Train run, where the resumed trial found its checkpoint
    # the epochs before the checkpoint were not trained again: their records are the first run's, timings included
    replayed = reported[:len(interrupted)]
    assert len(interrupted) >= 4 and all(r.get("epoch_seconds") == i.get("epoch_seconds") for r, i in zip(replayed, interrupted))
    assert "1/1 done" in resumed.stdout
    # and the ranks went on from the checkpoint's weights and optimizer, not from fresh ones: no epoch after
    # the interruption is back up near the first epoch's loss (measured: 1.38 at epoch 1, 0.79 at 6, then below)
    first, last = reported[1]["loss"], interrupted[-1]["loss"]
    assert max(r["loss"] for r in reported[len(interrupted):]) < (first + last) / 2

    # the model people take away is the last checkpoint of the trial's Ray Train run (Tune holds none):
    # it scores on the test split what the trial reported last
    parsed = parse_spec(spec)
    data = tuner.load_data(parsed)
    assert "MLflow models: 1 trial on the front of the search's objectives (test_accuracy max):\n  trial " in resumed.stdout and "not logged as a model" not in resumed.stdout
    (child,) = parent_and_child_runs(MlflowClient(env["MLFLOW_TRACKING_URI"]), spec["name"])[1]
    (printed,) = re.findall(rf"^  trial {child.data.tags['sharetune.trial_id']}: (\S+)  \(mlflow.pytorch.load_model\)$",
                            resumed.stdout, re.MULTILINE)
    with tracking_at(env["MLFLOW_TRACKING_URI"]):  # as the CLI's line says to load it
        model = mlflow.pytorch.load_model(printed)
    assert evaluate(model, data.eval_batches("test", torch.device("cpu"))) == reported[-1]["test_accuracy"]

    # the first epochs are what one process trains on the same data and seed (the all-reduce sums in
    # another order: as the loss nears zero the runs drift apart by rounding, an example's prediction flips)
    settings = trial_settings({"family": "spin", **parsed.fixed})
    torch.manual_seed(settings.seed)
    alone = list(itertools.islice(train_epochs(build_model(settings, data), data, settings, device="cpu"), COMPARED))
    for ddp, single in zip(reported[1:COMPARED + 1], alone, strict=True):
        assert ddp["loss"] == pytest.approx(single.loss, rel=1e-4)
        assert ddp["train_accuracy"] == pytest.approx(single.train_accuracy, abs=1e-9)
        assert ddp["test_accuracy"] == pytest.approx(single.test_accuracy, abs=1e-9)


def test_ddp_reduces_each_shared_tensor_once_and_every_parameter_every_step(tmp_path):
    """For every model kind: what DDP all-reduces in a step is each unique tensor once (a SPIN bank entry
    read by several layers is one parameter, not one per layer, tied; an ArbNet table is read through
    its index). An unused parameter would fail the second step."""
    from torch.nn.parallel import DistributedDataParallel

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        data = load("synthetic")
        for kind in MODEL_KINDS:
            _, model = build_kind(kind, data)
            reduced = []

            def count(state, bucket, reduced=reduced):
                reduced.append(bucket.buffer().numel())
                done = torch.futures.Future()
                done.set_result(bucket.buffer())
                return done

            ddp = DistributedDataParallel(model)
            ddp.register_comm_hook(None, count)
            for _ in range(2):
                ddp(data.sample_inputs(4)).square().sum().backward()
            assert sum(reduced) == 2 * count_params(model).unique, kind
    finally:
        torch.distributed.destroy_process_group()


def test_a_trial_without_a_ray_train_run_has_no_run_checkpoint_and_an_unreadable_run_is_one_line(tmp_path):
    from sharetune.trainables import run_checkpoint
    from sharetune.trainables.distributed import RUN_RECORD, RUNS, run_name

    assert run_checkpoint(str(tmp_path), "abc") is None  # one process: Tune holds its checkpoints
    run = tmp_path / RUNS / run_name("abc")
    run.mkdir(parents=True)
    (run / RUN_RECORD).write_text('{"ray_version": "0.0.0", "checkpoints": [')  # cut short
    with pytest.raises(ValueError, match=rf"^its Ray Train run {run} cannot be read \(\w+: .*\)$"):
        run_checkpoint(str(tmp_path), "abc")
