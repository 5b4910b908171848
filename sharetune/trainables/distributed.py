"""One trial on several workers: a Ray Train `TorchTrainer` (DDP) started by the Tune trial.

Ray Train 2 runs inside Tune this way: the Tune trial is a light driver (no CPU of its own) that
starts a TorchTrainer, whose controller places the `resources.workers` workers (each `cpu` CPUs and
`gpu` GPUs, on any nodes) and relays rank 0's reports to Tune (`TuneReportCallback`). Every rank runs
the same trial (`run_trial`) on its share of each batch (`Batches.shard`) with the model wrapped in
DistributedDataParallel; the metrics are summed over the ranks in `train_epochs`, so every rank reports
the whole data's; rank 0 writes the checkpoint. The Train run is named after the trial and kept in the
search folder, so a resumed search's trial finds its checkpoint again and every rank resumes from it.
Tune holds none of these checkpoints, so it restarts a resumed trial's record: the ranks first report
again the records the checkpoint holds, and the record stays whole.

GPUs: NCCL when each worker has a whole GPU; gloo when workers share one (NCCL refuses two ranks on
one device) and on CPUs.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import ray.train
import torch
import torch.distributed as dist
from pyarrow import fs
from ray import tune
from ray.train import Result
from ray.train.torch import TorchConfig, TorchTrainer, get_device, prepare_model
from ray.tune.integration.ray_train import TuneReportCallback
from torch import nn

from sharetune.data import Batches
from sharetune.errors import first_line
from sharetune.spaces.spec import Resources
from sharetune.storage_filesystem import filesystem_and_path, tune_storage
from sharetune.trainables.trial import run_trial
from sharetune.training import TrainingState

RUNS = "train_runs"  # inside the search folder: one Ray Train run per distributed trial
# Ray Train's controller collects a worker's report when it polls the workers (every 2 s by default),
# and a worker's next report waits until its last one is collected: an epoch shorter than the poll
# would wait for it. Polling costs the controller a few remote calls.
REPORT_POLL_S = 0.2
REPORT_POLL_VARIABLE = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # Ray Train's name for the poll's period
DRIVER_MEMORY = 1 << 20  # bytes a Ray Train run's driver asks for: a token, so Ray places it without a CPU
RUN_RECORD = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints, in the run's folder
# Reading a run's record, Ray Train logs that it found one and how to start a run afresh: not news to a reader
RUN_RECORD_LOGGER = "ray.train.v2._internal.execution.checkpoint.checkpoint_manager"


def train_distributed(config: dict, data: Batches, pretrained: dict | None, resources: Resources, storage: str) -> None:
    """The Tune trial's driver: run the trial on `resources.workers` Ray Train workers and wait for them."""
    loop = {"config": config, "data": data, "pretrained": pretrained, "cpus": resources.threads}
    torch_trainer(_worker, loop, resources, run_name(tune.get_context().get_trial_id()), storage,
                  callbacks=[TuneReportCallback()]).fit()


def run_name(trial_id: str) -> str:
    """The Ray Train run of a distributed trial, under the search folder's RUNS."""
    return f"trial_{trial_id}"


def run_checkpoint(storage: str, trial_id: str) -> ray.train.Checkpoint | None:
    """The last checkpoint of trial `trial_id`'s Ray Train run in the search folder `storage` (what
    Tune holds for a one-process trial); None where the trial ran in one process or saved none.
    ValueError, in one line, for a run whose record cannot be read."""
    run = f"{storage}/{RUNS}/{run_name(trial_id)}"
    filesystem, path = filesystem_and_path(run)
    if filesystem.get_file_info(f"{path}/{RUN_RECORD}").type == fs.FileType.NotFound:
        return None
    record_log = logging.getLogger(RUN_RECORD_LOGGER)
    level = record_log.level
    record_log.setLevel(logging.WARNING)
    try:
        return Result.from_path(run).checkpoint
    except Exception as err:  # Ray's: a record of another Ray version, naming a checkpoint that is gone, ...
        raise ValueError(f"its Ray Train run {run} cannot be read ({type(err).__name__}: {first_line(err)})") from None
    finally:
        record_log.setLevel(level)


def torch_trainer(worker: Callable[[dict], None], loop: dict, resources: Resources, name: str, storage: str,
                  callbacks: list | None = None) -> TorchTrainer:
    """A TorchTrainer running `worker(loop)` on `resources.workers` workers of `resources.cpu` CPUs and
    `resources.gpu` GPUs each, its run kept as `name` under the search folder `storage`."""
    per_worker = {"CPU": resources.cpu, **({"GPU": resources.gpu} if resources.gpu else {})}
    # Ray Train hands this variable from the process that builds the trainer to its controller and workers
    os.environ.setdefault(REPORT_POLL_VARIABLE, str(REPORT_POLL_S))
    return TorchTrainer(
        worker,
        train_loop_config=loop,
        torch_config=TorchConfig(backend="nccl" if resources.gpu >= 1 else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=resources.workers, use_gpu=resources.gpu > 0,
                                               resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(name=name, **tune_storage(f"{storage}/{RUNS}"), callbacks=callbacks or [],
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)),
    )


def worker_place() -> tuple[int, int, torch.device]:
    """This Ray Train worker's rank, the number of workers, and its device."""
    context = ray.train.get_context()
    return context.get_world_rank(), context.get_world_size(), torch.device(get_device())


def ddp(model: nn.Module) -> nn.Module:
    """DDP over the model as it is (already on the worker's device). A shared SPIN tensor is one
    parameter, read by several layers: DDP sees and reduces it once, and every parameter is used in
    every step, so no unused-parameter search is needed."""
    return prepare_model(model, move_to_device=False)


def rank_samples(state: TrainingState) -> dict:
    """How many examples each rank trained on in the epoch (they add up to the epoch's)."""
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, state.epoch_samples)
    return {"world_size": len(counts), "rank_samples": counts}


def _worker(loop: dict) -> None:
    rank, world, device = worker_place()
    run_trial(loop["config"], loop["data"].shard(rank, world), loop["pretrained"], session=ray.train,
              cpus=loop["cpus"], device=device, wrap=ddp, rank=rank, extra=rank_samples, replay=True)
