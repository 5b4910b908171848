"""SPIN's unshared pretraining on `resources.workers` > 1: a Ray Train TorchTrainer run (DDP, as a
distributed trial is), started by a task that holds no CPU; rank 0 hands the weights back as its
checkpoint. sharetune.trainables.cluster_pretraining starts it and prints its lines."""

from __future__ import annotations

import tempfile
from pathlib import Path

import ray
import ray.train
import torch
from ray.util.queue import Queue

from sharetune.data import Batches
from sharetune.spaces import SpinSettings
from sharetune.spaces.spec import Resources
from sharetune.trainables.cluster_pretraining import RUN, where
from sharetune.trainables.distributed import ddp, torch_trainer, worker_place
from sharetune.trainables.pretraining import PRETRAINED_FILE, pretrain


@ray.remote
def pretrain_distributed(settings: SpinSettings, data: Batches, resources: Resources, storage: str,
                         lines: Queue) -> dict:
    loop = {"settings": settings, "data": data, "cpus": resources.threads, "lines": lines}
    result = torch_trainer(_worker, loop, resources, RUN, storage).fit()
    with result.checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / PRETRAINED_FILE, map_location="cpu", weights_only=True)  # tensors, never code


def _worker(loop: dict) -> None:
    """One rank: its share of every batch, DDP; rank 0 speaks and checkpoints the weights."""
    rank, world, device = worker_place()
    say = loop["lines"].put if rank == 0 else (lambda line: None)
    say(where(loop["settings"], world, device))
    state = pretrain(loop["settings"], loop["data"].shard(rank, world), device=device, cpus=loop["cpus"], wrap=ddp,
                     say=say)
    with tempfile.TemporaryDirectory() as folder:
        if rank == 0:
            torch.save(state, Path(folder) / PRETRAINED_FILE)
        ray.train.report({}, checkpoint=ray.train.Checkpoint.from_directory(folder) if rank == 0 else None)
