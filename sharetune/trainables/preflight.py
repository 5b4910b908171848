"""What would only fail once trials run, tried before Ray starts.

The spec's validation checks types and ranges; this dry-runs the rest on the loaded data. The
sampler runs past its warm-up on the spec's space (`rehearse_sampler`). Every combination of the
dimensions' extremes (`SearchSpec.extreme_settings`) builds its model on the meta device, where
tensors have shapes but no storage, runs a batch of the data's shape through it (a SPIN patch
larger than the image fails here), and holds its memory while training (parameters, gradients,
optimizer moments, activations) against this machine's. An ArbNet's hash index is computed in host
memory while it builds, so its size is checked from the widths first. A `pretrained` file must be a
state dict, loaded with `weights_only=True`, whose names and shapes fit the unshared model.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Callable

import torch
from torch import Tensor, nn

from sharetune.data import Batches
from sharetune.errors import first_line
from sharetune.metrics import ModelCosts
from sharetune.models import WeightsError, get_model, load_state_dict, table_sizes
from sharetune.recipes import Recipe
from sharetune.spaces import ArbNetSettings, FamilySettings, SearchSpec, SpecError, SpinSettings, rehearse_sampler
from sharetune.trainables.build import arbnet_widths, build_model, build_spin, costs_of, unwrap
from sharetune.trainables.pretraining import show

TRAINING_COPIES = 4  # bytes of a parameter while training, in its own size: itself, its gradient, two optimizer moments
HASHING_BYTES = 24  # host bytes per virtual weight or table entry while an ArbNet hashes (the dirichlet draws' order, lookups, index)
FLOAT_BYTES = 4
PROGRESS_S = 10  # while the extremes take long to build, a line this often


def machine_memory(gpu: bool) -> tuple[int, str]:
    """Bytes a trial here can use, and what they are: the GPU's where trials take one, else the RAM."""
    if gpu and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, "this machine's GPU memory"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory"


def check_search(spec: SearchSpec, data: Batches, say: Callable[[str], None] = show) -> list[ModelCosts]:
    """SpecError (one line) for a spec whose sampler, models or pretrained weights would fail in a trial;
    else the costs of the models its dimensions' extremes build. Warns, in one line, where trials would
    enlarge the images to a resolution above the one they are stored at. Models that take long to
    build (hashing a large ArbNet's index) get a line to `say` every PROGRESS_S seconds."""
    rehearse_sampler(spec)
    memory = machine_memory(spec.resources.gpu > 0)
    # extremes that differ only in settings their conditions turn off (radius beside dirichlet) are one model
    extremes = list({settings.model_dump_json(): settings for settings in spec.extreme_settings()}.values())
    checked, costs, said = set(), [], time.monotonic()
    for settings in extremes:
        costs.append(check_model(settings, data, memory))
        if isinstance(settings, SpinSettings) and settings.pretrained and settings.pretrained not in checked:
            check_pretrained(settings, data)
            checked.add(settings.pretrained)
        if time.monotonic() - said >= PROGRESS_S and len(costs) < len(extremes):
            say(f"checking the models at the dimensions' extremes before any trial starts: {len(costs)} of {len(extremes)} built")
            said = time.monotonic()
    if (note := data.upscaling_note(settings.resolution for settings in extremes)) is not None:
        warnings.warn(f"{note} (data.img_size, or a SPIN trial's img_size)", stacklevel=2)
    return costs


def _named(settings: FamilySettings) -> str:
    """The model's settings (and the batch size) that differ from their defaults, as `field=value` pairs
    an error can point at; the recipe's other pieces do not shape the model."""
    shaping = [k for k in type(settings).model_fields if k not in Recipe.model_fields or k == "batch_size"]
    given = settings.model_dump(include=set(shaping), exclude_defaults=True)
    return ", ".join(f"{k}={given[k]!r}" for k in shaping if k in given) or "the defaults"


def check_model(settings: FamilySettings, data: Batches, memory: tuple[int, str] | None = None) -> ModelCosts:
    """SpecError if the settings' model cannot be built, cannot take a batch of the data, or needs more
    memory to train than `memory` (bytes, and what they are; default: this machine's); else its costs."""
    available, where = memory or machine_memory(False)
    data = data.with_resolution(settings.resolution)
    if isinstance(settings, ArbNetSettings):
        _check_bytes(_arbnet_hashing_bytes(settings, data), available, where, settings, "to hash its index")
    spin = isinstance(settings, SpinSettings)
    if spin:
        _check_patch(settings, data)
    layout = settings.model_copy(update={"mapping": "sequential"}) if spin else settings  # cka's groups need data
    batch = (settings.batch_size, *data.input_shape)
    try:
        with torch.device("meta"):  # fusion starts from pretrained weights: an unshared model's, shapes alone
            pretrained = unwrap(build_spin(layout, data, unshared=True)).state_dict() if spin and layout.needs_pretrained() else None
            model = build_model(layout, data, pretrained)
            activations = _arbnet_activation_bytes(settings, data) if isinstance(settings, ArbNetSettings) \
                else _activation_bytes(model, torch.empty(batch))
            costs = costs_of(model, data)
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError, MemoryError) as err:
        raise SpecError(f"model ({_named(settings)}): fails on {'x'.join(map(str, batch))} inputs: {first_line(err) or type(err).__name__}") from None
    inputs = f"to train on batches of {'x'.join(map(str, batch))} (batch_size, then the image: img_size or data.img_size)" \
        if spin else "to train"
    _check_bytes(TRAINING_COPIES * _tensor_bytes(model) + activations, available, where, settings, inputs)
    return costs


def _check_patch(settings: SpinSettings, data: Batches) -> None:
    """A patch larger than the image it cuts leaves nothing to convolve; torch says "padded input size"."""
    patch = settings.patch_size or get_model(settings.model).default("patch_size")
    side = settings.resolution or (min(data.input_shape[1:]) if len(data.input_shape) == 3 else None)
    if patch and side and patch > side:
        raise SpecError(f"patch_size: {patch}{'' if settings.patch_size else f' ({settings.model} default)'} is larger than "
                        f"the {side} x {side} images the model sees; allowed: up to {side}"
                        + ("" if settings.resolution else ", or an img_size of at least the patch"))


def _check_bytes(needed: int, available: int, where: str, settings: FamilySettings, doing: str) -> None:
    if needed > available:
        raise SpecError(f"model ({_named(settings)}): needs about {needed / 2**30:,.1f} GiB {doing}, more than "
                        f"{where} ({available / 2**30:,.1f} GiB); make it smaller")


def _tensor_bytes(model: nn.Module) -> int:
    """Parameters and buffers, each shared tensor once."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _activation_bytes(model: nn.Module, batch: Tensor) -> int:
    """Bytes of every module's output for one batch (what backward keeps), measured by running it."""
    total = 0

    def count(module: nn.Module, inputs, output) -> None:
        nonlocal total
        if isinstance(output, Tensor) and not list(module.children()):
            total += output.numel() * output.element_size()

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    try:
        model(batch)
    finally:
        for hook in hooks:
            hook.remove()
    return total


def _arbnet_layers(settings: ArbNetSettings, data: Batches) -> tuple[int, int]:
    """(virtual weights, table entries) of the ArbNet the settings build."""
    widths = arbnet_widths(settings, data)
    shapes = list(zip(widths, widths[1:]))
    sizes = table_sizes(shapes, [settings.hash] * len(shapes), settings.table_size, settings.compression)
    return sum(a * b for a, b in shapes), sum(sizes)


def _arbnet_hashing_bytes(settings: ArbNetSettings, data: Batches) -> int:
    return HASHING_BYTES * sum(_arbnet_layers(settings, data))


def _arbnet_activation_bytes(settings: ArbNetSettings, data: Batches) -> int:
    """Each step gathers the dense weights (and their gradient) and keeps three outputs per layer."""
    virtual, _ = _arbnet_layers(settings, data)
    return FLOAT_BYTES * (2 * virtual + 3 * settings.batch_size * sum(arbnet_widths(settings, data)[1:]))


def check_pretrained(settings: SpinSettings, data: Batches) -> None:
    """SpecError unless `settings.pretrained` is a state dict whose names and shapes fit the unshared model."""
    try:
        state = load_state_dict(settings.pretrained)
    except WeightsError as err:
        raise SpecError(f"pretrained: {err}") from None
    with torch.device("meta"):
        expected = unwrap(build_spin(settings, data.with_resolution(settings.resolution), unshared=True)).state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        first = f"{wrong[0]} is {tuple(state[wrong[0]].shape)}, the model's is {tuple(expected[wrong[0]].shape)}" if wrong \
            else f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise SpecError(f"pretrained: {settings.pretrained} does not fit the unshared {settings.model} "
                        f"({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} mis-shaped; {first})")
