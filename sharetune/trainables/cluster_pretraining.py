"""SPIN's unshared pretraining as Ray work: where the trials run, with their resources.

A search's driver runs on the head node of a cluster, which offers no CPUs for work and has no GPU,
so it only waits. With one worker the pretraining is a Ray task asking for a trial's CPUs and GPUs;
with `resources.workers` > 1 it is a Ray Train TorchTrainer run (DDP, as a distributed trial is:
sharetune.trainables.distributed) started by a task that holds no CPU, whose rank 0 hands the
weights back as its checkpoint. Either way it trains with `pretrain` (the trial's recipe and
precision) and puts its progress lines on a Ray queue, which the driver prints while it waits; the
weights come back to the driver, which stores them in the search folder. The Ray Train path lives in
sharetune.trainables.distributed_pretraining, which reads this module's names (so it is imported
where it runs).
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import ray
import torch
from ray.util.queue import Queue

from sharetune.data import Batches, DataError
from sharetune.errors import cause_of
from sharetune.spaces import SpinSettings
from sharetune.spaces.spec import Resources
from sharetune.trainables.distributed import DRIVER_MEMORY
from sharetune.trainables.pretraining import Pretrainer, pretrain, show
from sharetune.training import pick_device

RUN = "pretraining"  # the Ray Train run's name in the search folder (with `workers` > 1)
POLL_S = 0.5  # how often the driver prints the lines that came in


def cluster_pretrainer(resources: Resources, storage: str) -> Pretrainer:
    """`pretrained_weights`' trainer for a search: pretraining on the cluster, kept under `storage`."""
    return functools.partial(pretrain_on_cluster, resources=resources, storage=storage)


def pretrain_on_cluster(settings: SpinSettings, data: Batches, *, resources: Resources, storage: str,
                        say: Callable[[str], None] = show) -> dict:
    """`pretrain` as Ray work with a trial's `resources`; its lines go to `say` as they come."""
    lines = Queue(actor_options={"num_cpus": 0})
    try:
        if resources.workers > 1:  # the Train run's driver holds a token, as a distributed trial's does
            from sharetune.trainables.distributed_pretraining import pretrain_distributed

            weights = pretrain_distributed.options(num_cpus=0, memory=DRIVER_MEMORY, name=RUN).remote(
                settings, data, resources, storage, lines)
        else:
            weights = _pretrain_alone.options(num_cpus=resources.cpu, num_gpus=resources.gpu, name=RUN).remote(
                settings, data, resources.threads, lines)
        done = False
        while not done:
            done = bool(ray.wait([weights], timeout=POLL_S)[0])
            for line in lines.get_nowait_batch(lines.qsize()):
                say(line)
        try:
            return ray.get(weights)
        except Exception as err:  # a remote DataError (this node's copy of the images differs) is the user's one line
            raise cause_of(err, DataError) or err from None
    finally:
        lines.shutdown()


def where(settings: SpinSettings, workers: int, device: torch.device) -> str:
    """Where it runs: the line a pretraining starts with (from rank 0)."""
    context = ray.get_runtime_context()
    return (f"pretraining the unshared {settings.model} on {workers} worker(s), each with "
            f"{context.get_assigned_resources()} ({device}); rank 0 is process {os.getpid()} "
            f"on node {context.get_node_id()[:8]}")


@ray.remote
def _pretrain_alone(settings: SpinSettings, data: Batches, cpus: int, lines: Queue) -> dict:
    device = pick_device()  # Ray shows the task only the GPUs it was given
    lines.put(where(settings, 1, device))
    return pretrain(settings, data, device=device, cpus=cpus, say=lines.put)
