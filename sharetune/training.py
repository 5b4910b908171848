"""The training loop, shared by the CLI and every trainable, on a `Recipe` (sharetune.recipes).

`train_epochs` is a generator so callers (the CLI, Ray Tune trainables) report each epoch as it ends;
it evaluates on every split the data has (val for selection, test) after each epoch.

Speed settings, where the hardware has them: `precision` (autocast to bf16 or fp16, the latter with a
gradient scaler), `channels_last` for convolutional models, `compile` (torch.compile; a model that
fails to compile warns once and trains eagerly). Under torch.distributed (a Ray Train worker) every
metric is summed over the ranks, so an epoch's accuracy and loss are the whole data's.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import time
import warnings
from fnmatch import fnmatch
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from sharetune.data import Batches, epoch_seed, seed_host_generators
from sharetune.errors import first_line
from sharetune.metrics import EpochMetrics
from sharetune.recipes import Recipe

R = TypeVar("R")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(device: torch.device | str | None = None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """The precision a run trains in: the setting, or by default bf16 where the device computes in it
    (CUDA since Ampere) and fp32 elsewhere. One the device lacks fails here, naming the setting: fp16
    on a CPU would only be slower (no fp16 kernels), so it is refused rather than emulated."""
    cuda = device.type == "cuda"
    bf16 = cuda and torch.cuda.is_bf16_supported(including_emulation=False)
    if precision is None:
        return "bf16" if bf16 else "fp32"
    if precision == "fp16" and not cuda:
        raise ValueError(f"precision: fp16 needs a CUDA device (this run is on {device.type}); allowed here: fp32, bf16")
    if precision == "bf16" and cuda and not bf16:
        raise ValueError(f"precision: {torch.cuda.get_device_name(device)} has no bf16; allowed here: fp32, fp16")
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Where the forward pass runs in `precision` (fp32: as it is)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def channels_last(model: nn.Module, recipe: Recipe, device: torch.device) -> bool:
    """Whether images go channels-last: the setting, or by default for convolutional models on CUDA
    (where cuDNN's NHWC kernels, and tensor cores under autocast, are faster)."""
    wanted = recipe.channels_last if recipe.channels_last is not None else device.type == "cuda"
    return wanted and any(isinstance(m, nn.Conv2d) for m in model.modules())


class EagerFallback:
    """`torch.compile(model)`, called like the model; a failure to compile (no compiler, an
    unsupported operation) warns once and every later call runs the model eagerly."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.compiled = model, torch.compile(model)

    def __call__(self, x: Tensor) -> Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(x)
            except Exception as err:  # noqa: BLE001 - dynamo and inductor raise many kinds; eager re-raises real bugs
                self._give_up(err)
        return self.model(x)

    def step(self, run: Callable[..., R], *args, updates: Callable[[], int]) -> R:
        """`run(*args)` (a training step: forward and backward) through the compiled model. The backward graph
        compiles lazily, in the first backward pass, so a failure there falls back too: the step runs
        again, eagerly. `updates` counts the updates made: an error after the step's update is no
        compiler's, and is raised (running the step again would update twice)."""
        if self.compiled is None:
            return run(*args)
        made = updates()
        try:
            return run(*args)
        except Exception as err:  # noqa: BLE001 - as above
            if updates() != made:
                raise
            self._give_up(err)
            return run(*args)

    def _give_up(self, err: Exception) -> None:
        with warnings.catch_warnings():  # every trial says so, also the next one in a reused worker process
            warnings.simplefilter("always")
            warnings.warn(f"compile: torch.compile failed ({type(err).__name__}: {first_line(err)[:200]}); training eagerly",
                          stacklevel=3)
        self.compiled = None


def seed_epoch(seed: int, epoch: int) -> None:
    """Seed every generator a recipe's random pieces draw from by the seed and the epoch alone: torch's
    (dropout, drop-path), NumPy's (timm's MixUp and CutMix) and Python's (timm's random erasing). A
    run is then reproducible from its seed, and a resumed one goes on as if it had never stopped."""
    value = epoch_seed(seed, epoch) % 2**32
    seed_host_generators(value)
    torch.manual_seed(value)  # and the devices' (dropout on a GPU)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def summed(values: Tensor) -> Tensor:
    """`values` summed over the ranks of a distributed run (as they are in a single process)."""
    if _distributed():
        values = values.clone()
        dist.all_reduce(values)
    return values


def take_rank0_statistics(model: nn.Module) -> None:
    """Give every rank rank 0's floating-point buffers (BatchNorm's running statistics, an EMA's).

    Parameters stay equal across ranks, but each rank's last forward updated its running statistics
    from its own share of the batch: without this, each rank would evaluate a slightly different model
    and the global accuracy would not be that of the one rank 0 checkpoints."""
    if _distributed():
        for buffer in model.buffers():
            if buffer.is_floating_point():
                dist.broadcast(buffer, src=0)


@functools.cache
def keep_freed_memory() -> None:
    """Let glibc keep the memory a training step frees, for the next step, instead of returning it.

    Every step frees and reallocates the same tens of MB (ArbNet's gathered weights, autograd's
    weight gradients). With glibc's adaptive defaults some of it goes back to the OS and the next
    step faults it in again: 20 K page faults and a 15-30% slower CIFAR ArbNet step at batch 512.
    This keeps up to 1 GB of freed memory, as jemalloc or tcmalloc would. No-op without glibc.
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks up to 32 MB (glibc's most) come from the heap
        mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: give the heap back only past 1 GB free


_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LayerNorm, nn.GroupNorm)


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Parameter groups with no weight decay on norm layers and biases, and on what a module names in
    timm's `no_weight_decay()` (patterns under that module: DeiT's position embedding and class token,
    a fused layer's biases and norm scales); each shared tensor once."""
    exempt = {id(p) for m in model.modules() if isinstance(m, _NORMS) for p in m.parameters(recurse=False)}
    exempt |= {id(p) for name, p in model.named_parameters() if "bias" in name.rpartition(".")[2]}
    for module in model.modules():
        declared = getattr(module, "no_weight_decay", None)
        if callable(declared):
            patterns = declared()
            exempt |= {id(p) for name, p in module.named_parameters() if any(fnmatch(name, pat) for pat in patterns)}
    params = list(model.parameters())
    return [{"params": [p for p in params if id(p) not in exempt], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) in exempt], "weight_decay": 0.0}]


class TrainingState:
    """Everything a recipe updates besides the model: optimizer, schedule, EMA, MixUp/CutMix. Its
    `state_dict` (with the model's) resumes a trial exactly."""

    def __init__(self, model: nn.Module, recipe: Recipe, steps_per_epoch: int, num_classes: int) -> None:
        from timm.optim import create_optimizer_v2

        self.recipe, self.updates = recipe, 0
        self.last_lr: float | None = None  # the rate of the latest update
        self.device = next(model.parameters()).device  # the model is on its device before its state is made
        self.precision = resolve_precision(recipe.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")  # bf16 needs none
        self.optimizer = create_optimizer_v2(decay_groups(model, recipe.weight_decay), opt=recipe.optimizer,
                                             lr=recipe.scaled_lr, momentum=recipe.momentum)
        self.scheduler = _scheduler(self.optimizer, recipe, steps_per_epoch)
        self.ema = None
        if recipe.ema_decay:
            from sharetune.ema import ModelEma

            self.ema = ModelEma(model, decay=recipe.ema_decay)
        self.mixup = None
        if recipe.mixup or recipe.cutmix:
            from timm.data import Mixup
            from timm.loss import SoftTargetCrossEntropy

            self.mixup = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, switch_prob=0.5,
                               label_smoothing=recipe.label_smoothing, num_classes=num_classes)
            self.soft_loss = SoftTargetCrossEntropy()

    @classmethod
    def for_data(cls, model: nn.Module, recipe: Recipe, data: Batches) -> TrainingState:
        """The state for training `model` on `data`: its steps per epoch (for the schedule) and classes (for MixUp)."""
        return cls(model, recipe, data.steps_per_epoch(recipe.batch_size), data.num_classes)

    def loss(self, model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The batch's loss and logits, the forward pass in the run's precision (MixUp/CutMix mix the
        batch and soften its targets). `model`: the module, or what runs it (DDP, torch.compile)."""
        if self.mixup is not None:
            if len(x) % 2:  # timm mixes pairs
                x, y = x[:-1], y[:-1]
            x, soft = self.mixup(x, y)
        with autocast(self.precision, self.device):
            logits = model(x)
        logits = logits.float()  # the loss in fp32, as autocast would compute it
        if self.mixup is None:
            return F.cross_entropy(logits, y, label_smoothing=self.recipe.label_smoothing), logits
        return self.soft_loss(logits, soft), logits

    def step(self, model: nn.Module, loss: Tensor) -> None:
        """Backward and update; under fp16 through the gradient scaler, which skips a step whose
        gradients overflowed and lowers its scale: the schedule and the EMA then skip it too."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.recipe.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), self.recipe.grad_clip)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None  # fp16 only: it waits for the device
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if scale is not None and self.scaler.get_scale() < scale:
            return
        self.updates += 1
        self.last_lr = self.optimizer.param_groups[0]["lr"]  # before the schedule moves on to the next update's
        if self.recipe.schedule == "onecycle":
            self.scheduler.step()
        elif self.recipe.schedule == "cosine":
            self.scheduler.step_update(self.updates)
        if self.ema is not None:
            self.ema.update(model, step=self.updates)

    def end_epoch(self, train_accuracy: float) -> None:
        if self.recipe.schedule == "plateau":
            self.scheduler.step(train_accuracy)

    def evaluated(self, model: nn.Module) -> nn.Module:
        return model if self.ema is None else self.ema.module

    @property
    def lr(self) -> float:
        """The rate the latest update used (the next one's before any): an epoch's `lr` metric. The rate the
        schedule holds after the last update is the next step's, and one-cycle's past its end mirrors its
        descent (a short run's last two epochs read the same)."""
        return self.optimizer.param_groups[0]["lr"] if self.last_lr is None else self.last_lr

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "updates": self.updates,
                "ema": None if self.ema is None else self.ema.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.updates = state["updates"]
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if state.get("scaler"):  # empty when the scaler is off (not fp16)
            self.scaler.load_state_dict(state["scaler"])


def _scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, steps_per_epoch: int):
    if recipe.schedule == "plateau":  # PyTorch lowers the rate after `patience` bad epochs *plus one*
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.1, patience=recipe.plateau_epochs - 1)
    if recipe.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.scaled_lr, total_steps=recipe.epochs * steps_per_epoch,
                                                   cycle_momentum=False)
    from timm.scheduler import create_scheduler_v2

    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=recipe.epochs, warmup_epochs=recipe.warmup_epochs,
                                       step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    return scheduler


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterator[tuple[Tensor, Tensor]], precision: str = "fp32") -> float:
    """Top-1 accuracy of `model` in eval mode, over every rank's share of the split when distributed."""
    model.eval()
    correct, seen = torch.zeros((), dtype=torch.int64, device=next(model.parameters()).device), 0
    for x, y in batches:
        with autocast(precision, x.device):
            correct += (model(x).argmax(1) == y).sum()
        seen += len(y)
    correct, seen = summed(torch.stack([correct, correct.new_tensor(seen)])).tolist()
    return correct / seen


def train_epochs(
    model: nn.Module,
    data: Batches,
    recipe: Recipe,
    *,
    device: torch.device | str | None = None,
    state: TrainingState | None = None,
    start_epoch: int = 0,
    workers: int = 0,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
) -> Iterator[EpochMetrics]:
    """Train `model` on `data`, yielding one EpochMetrics per epoch; stops early if the loss diverges.

    Pass the TrainingState restored from a checkpoint (and `start_epoch`) to resume: each epoch's
    data order depends only on the seed and the epoch, so a resumed run sees the same batches.
    `workers`: DataLoader processes for data streamed from disk. `wrap`: what the training forward
    runs through (a Ray Train worker's DistributedDataParallel); evaluation runs the model itself.
    After each epoch `state.epoch_samples` holds the examples this process trained on.
    """
    keep_freed_memory()
    device = pick_device(device)
    model.to(device)
    layout = torch.channels_last if channels_last(model, recipe, device) else None
    if layout is not None:
        model.to(memory_format=layout)
    state = state or TrainingState.for_data(model, recipe, data)
    forward = wrap(model) if wrap is not None else model
    forward = EagerFallback(forward) if recipe.compile else forward

    def train_step(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        loss, logits = state.loss(forward, x, y)
        state.step(model, loss)
        return loss, logits

    if isinstance(forward, EagerFallback):  # a step whose backward fails to compile runs again, eagerly
        train_step = functools.partial(forward.step, train_step, updates=lambda: state.updates)
    for epoch in range(start_epoch, recipe.epochs):
        started = time.perf_counter()
        seed_epoch(recipe.seed, epoch)
        model.train()
        total_loss, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
        for x, y in data.train_batches(epoch, recipe.batch_size, recipe.seed, device, augment=recipe.augment, workers=workers):
            if layout is not None:
                x = x.contiguous(memory_format=layout)
            loss, logits = train_step(x, y)
            total_loss += loss.detach() * len(logits)
            correct += (logits.argmax(1) == y[: len(logits)]).sum()
            seen += len(logits)
        state.epoch_samples = seen
        mean_loss, correct, seen = summed(torch.stack([total_loss, correct, total_loss.new_tensor(seen)])).tolist()
        mean_loss, train_accuracy = mean_loss / seen, correct / seen
        diverged = not math.isfinite(mean_loss)
        evaluated = state.evaluated(model)
        take_rank0_statistics(evaluated)
        accuracy = {split: 0.0 if diverged else evaluate(evaluated, data.eval_batches(split, device, workers=workers), state.precision)
                    for split in data.splits()}
        state.end_epoch(train_accuracy)
        unreadable = data.unreadable()
        yield EpochMetrics(
            epoch=epoch + 1,
            test_accuracy=accuracy["test"],
            val_accuracy=accuracy.get("val"),
            train_accuracy=train_accuracy,
            loss=mean_loss,
            lr=state.lr,
            epoch_seconds=time.perf_counter() - started,
            diverged=diverged,
            unreadable_images=None if unreadable is None else int(summed(torch.tensor(unreadable, device=device)).item()),
        )
        if diverged:
            return
