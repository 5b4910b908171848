"""SPIN (Lin et al.): cross-layer weight sharing in isotropic networks.

A `SharingPlan` maps each of a network's L layers to an entry of a weight bank. `share` applies a
plan to chosen sub-modules of every block: the first layer of each bank entry keeps its module
(moved into `model.spin_bank`), and every layer using that entry gets an `Alias` that runs the
bank's module. Parameters live only in the bank, so `parameters()`, `state_dict()`, checkpoints,
optimizers and EMAs see each entry once, and `count_params` reports the shared count.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from torch import nn

from sharetune.metrics.counts import ALIASED, count_params

# How layers map to bank entries. The topologies need only the depth (SharingPlan.from_topology);
# "cka" groups contiguous layers whose outputs are most alike in a pretrained model (`cka_plan`;
# beyond the paper, which only suggests CKA as a guide).
MAPPINGS = ("sequential", "strided", "pyramid", "random")
SIMILARITY_MAPPINGS = ("cka",)
ALL_MAPPINGS = MAPPINGS + SIMILARITY_MAPPINGS
DISTRIBUTIONS = ("uniform", "front", "middle", "back")
DEFAULT_MAPPING, DEFAULT_DISTRIBUTION = MAPPINGS[0], DISTRIBUTIONS[0]  # SPIN's own: sequential groups, uniformly


def _choice(field: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{field}: unknown value {value!r}; allowed: {', '.join(allowed)}")
    return value


def _group_sizes(layers: int, entries: int, mapping: str) -> list[int]:
    """Layers per bank entry for the contiguous mappings: exactly `entries` groups, as even as the depth
    allows (a non-integer share rate such as 1.5 alternates sizes rather than rounding up to 2)."""
    if mapping == "pyramid":  # triangular profile: entries near the centre take more layers
        weights = np.array([min(k + 1, entries - k) for k in range(entries)], dtype=float)
        exact = weights / weights.sum() * (layers - entries) + 1
        sizes = np.floor(exact).astype(int)
        for k in np.argsort(-(exact - sizes), kind="stable")[: layers - sizes.sum()]:
            sizes[k] += 1
        return sizes.tolist()
    size, larger = divmod(layers, entries)
    return [size + (k < larger) for k in range(entries)]


def _section_ids(layers: int, share_rate: float, mapping: str, seed: int) -> list[int]:
    entries = math.ceil(layers / share_rate)
    if mapping == "strided":
        return [i % entries for i in range(layers)]
    if mapping == "random":
        sequential = _section_ids(layers, share_rate, "sequential", seed)
        return np.random.default_rng(seed).permutation(sequential).tolist()
    sizes = _group_sizes(layers, entries, mapping)
    return [entry for entry, size in enumerate(sizes) for _ in range(size)]


@dataclass(frozen=True)
class SharingPlan:
    """`bank_ids[i]` is the bank entry layer i uses; entries are numbered 0..P-1 in order of first use."""

    bank_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        ids = list(self.bank_ids)
        if not ids:
            raise ValueError("plan: must cover at least one layer")
        first_use = list(dict.fromkeys(ids))
        if sorted(first_use) != list(range(len(first_use))):
            raise ValueError(f"plan: bank ids must be 0..{len(first_use) - 1} with none skipped, got {ids}")
        object.__setattr__(self, "bank_ids", tuple(int(i) for i in ids))

    @property
    def depth(self) -> int:
        return len(self.bank_ids)

    @property
    def num_entries(self) -> int:
        return len(set(self.bank_ids))

    @property
    def share_rate(self) -> float:
        return self.depth / self.num_entries

    def members(self, entry: int) -> list[int]:
        """The layers that use bank entry `entry`."""
        return [layer for layer, e in enumerate(self.bank_ids) if e == entry]

    @classmethod
    def from_ids(cls, ids: Sequence[int]) -> "SharingPlan":
        first_use = {}
        return cls(tuple(first_use.setdefault(i, len(first_use)) for i in ids))

    @classmethod
    def from_notation(cls, text: str) -> "SharingPlan":
        """The paper's N x S notation: "[4x1,1x2,2x3]" is 4 entries used once, 1 used twice, 2 used 3 times."""
        compact = re.sub(r"[\s\[\]]", "", text).replace("X", "x").replace("×", "x")
        groups = re.findall(r"(\d+)x(\d+)", compact)
        if not groups or compact != ",".join(f"{n}x{s}" for n, s in groups):
            raise ValueError(f"plan: {text!r} is not N x S notation, e.g. [4x1,1x2,2x3,1x2,4x1]")
        ids: list[int] = []
        for count, size in ((int(n), int(s)) for n, s in groups):
            if count < 1 or size < 1:
                raise ValueError(f"plan: {count}x{size}: counts and share rates must be >= 1")
            for _ in range(count):
                ids += [len(set(ids))] * size
        return cls.from_ids(ids)

    @classmethod
    def from_topology(
        cls, depth: int, share_rate: float, mapping: str = DEFAULT_MAPPING, distribution: str = DEFAULT_DISTRIBUTION, seed: int = 0
    ) -> "SharingPlan":
        """A mapping x distribution at an overall share rate (depth / bank entries), as in SPIN Table 1.

        Non-uniform distributions share only a section (front, middle or back) at share_rate + 1 and keep
        the other layers unshared, the section sized in whole groups of share_rate + 1 layers to come near
        `share_rate`: exactly where the depth allows (depth 32, share_rate 2: 24 shared layers at 3 and 8
        unshared), else near it (depth 20, share_rate 4: 20 layers at 5, so 5 overall, as the metric
        effective_share_rate reports).
        """
        if mapping in SIMILARITY_MAPPINGS:
            raise ValueError(f"mapping: {mapping!r} groups layers by their similarity in a pretrained model; use cka_plan")
        _choice("mapping", mapping, MAPPINGS)
        _choice("distribution", distribution, DISTRIBUTIONS)
        _check_share_rate(share_rate, depth)
        if distribution == "uniform" or share_rate == 1:
            return cls.from_ids(_section_ids(depth, share_rate, mapping, seed))
        section_rate = share_rate + 1
        shared = round(depth * (1 - 1 / share_rate) / (1 - 1 / section_rate) / section_rate) * section_rate
        shared = min(depth, max(int(section_rate), int(shared)))
        start = {"front": 0, "back": depth - shared, "middle": (depth - shared) // 2}[distribution]
        section = _section_ids(shared, section_rate, mapping, seed)
        ids = list(range(start)) + [start + i for i in section]
        ids += [start + max(section) + 1 + k for k in range(depth - start - shared)]
        return cls.from_ids(ids)


def _check_share_rate(share_rate: float, depth: int) -> None:
    if not 1 <= share_rate <= depth:
        raise ValueError(f"share_rate: must be between 1 and the depth ({depth}), got {share_rate}")


def make_plan(depth: int, spec: "SharingPlan | str | Sequence[int] | dict") -> SharingPlan:
    """Accept a plan, N x S notation, a list of bank ids, or {share_rate, mapping, distribution, seed}."""
    if isinstance(spec, SharingPlan):
        plan = spec
    elif isinstance(spec, str):
        plan = SharingPlan.from_notation(spec)
    elif isinstance(spec, dict):
        allowed = {"share_rate", "mapping", "distribution", "seed"}
        unknown = sorted(set(spec) - allowed)
        if unknown:
            raise ValueError(f"sharing: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
        if "share_rate" not in spec:
            raise ValueError("sharing: needs share_rate (layers per bank entry)")
        plan = SharingPlan.from_topology(depth, **spec)
    else:
        plan = SharingPlan.from_ids(list(spec))
    if plan.depth != depth:
        raise ValueError(f"plan: covers {plan.depth} layers but the model has {depth}")
    return plan


class Alias(nn.Module):
    """Runs a module owned by the weight bank. Holds no parameters of its own."""

    def __init__(self, target: nn.Module) -> None:
        super().__init__()
        self.__dict__["target"] = target  # not registered: the bank owns it

    def forward(self, *args, **kwargs):
        return self.target(*args, **kwargs)

    def virtual_parameter_count(self) -> int:
        return count_params(self.target).virtual

    def extra_repr(self) -> str:
        return f"-> {type(self.target).__name__}"


class WeightBank(nn.Module):
    """The unique modules and parameters of a shared model; counted through the layers that use them."""

    def virtual_parameter_count(self) -> int:
        return 0

    def __getitem__(self, key: str):
        return getattr(self, key)


def alias_parameter(module: nn.Module, name: str, shared: nn.Parameter) -> None:
    """Make `module.<name>` read a bank parameter without registering (and so storing) it again."""
    module._parameters.pop(name, None)
    module.__dict__[name] = shared
    module.__dict__.setdefault(ALIASED, set()).add(name)


def submodule(module: nn.Module, path: str) -> nn.Module:
    """`module.get_submodule(path)`, with "" for the module itself (a whole block)."""
    return module.get_submodule(path) if path else module


def names_a_parameter(module: nn.Module, path: str) -> bool:
    """Whether `path` inside `module` is one parameter ("1.weight") rather than a sub-module ("attn", "")."""
    parent, _, leaf = path.rpartition(".")
    return leaf in dict(submodule(module, parent).named_parameters(recurse=False))


def replace_submodule(module: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(submodule(module, parent), name, value)


def share(
    model: nn.Module,
    plan: SharingPlan | str | Sequence[int] | dict,
    components: Sequence[str],
    *,
    make_entry: Callable[[list[nn.Module]], nn.Module] | None = None,
) -> nn.Module:
    """Share `components` across the layers in `model.blocks` (every isotropic net's).

    A component is a path inside one block: a sub-module ("attn", "" for the whole block) or a single
    parameter ("1.weight"), which shares that tensor and leaves the rest of its module unshared.
    `make_entry` builds a bank entry from the sub-modules it replaces (default: keep the first one;
    fusion passes a FusedLayer).
    """
    layers = model.blocks
    plan = make_plan(len(layers), plan)
    bank = getattr(model, "spin_bank", None) or WeightBank()
    for component in components:
        parent, _, leaf = component.rpartition(".")
        is_parameter = names_a_parameter(layers[0], component)
        key = component.replace(".", "_") or "block"
        for entry in range(plan.num_entries):
            members = plan.members(entry)
            if is_parameter:
                modules = [submodule(layers, f"{layer}.{parent}" if parent else str(layer)) for layer in members]
                shared = getattr(modules[0], leaf)
                bank.register_parameter(f"{key}__{entry}", shared)
                for module in modules:
                    alias_parameter(module, leaf, shared)
                continue
            paths = [f"{layer}.{component}" if component else str(layer) for layer in members]
            owner = (make_entry or (lambda modules: modules[0]))([submodule(layers, path) for path in paths])
            bank.add_module(f"{key}__{entry}", owner)
            for path in paths:
                replace_submodule(layers, path, Alias(owner))
    model.spin_bank = bank
    model.sharing_plan = plan
    return model


def cka_plan(similarity: np.ndarray, share_rate: float) -> SharingPlan:
    """Contiguous groups of mutually similar layers: exactly ceil(L / share_rate) bank entries, chosen by
    dynamic programming to minimise the summed dissimilarity (1 - CKA) over pairs within a group."""
    depth = similarity.shape[0]
    _check_share_rate(share_rate, depth)
    entries = int(np.ceil(depth / share_rate))
    distance = 1.0 - np.asarray(similarity, dtype=float)
    cost = np.zeros((depth + 1, depth + 1))  # cost[i, j]: group of layers i..j-1
    for i in range(depth):
        for j in range(i + 2, depth + 1):
            cost[i, j] = cost[i, j - 1] + distance[i:j - 1, j - 1].sum()
    best = np.full((entries + 1, depth + 1), np.inf)
    cut = np.zeros((entries + 1, depth + 1), dtype=int)
    best[0, 0] = 0.0
    for groups in range(1, entries + 1):
        for end in range(groups, depth + 1):
            starts = np.arange(groups - 1, end)
            totals = best[groups - 1, starts] + cost[starts, end]
            k = int(np.argmin(totals))
            best[groups, end], cut[groups, end] = totals[k], starts[k]
    bounds, end = [], depth
    for groups in range(entries, 0, -1):
        bounds.append((cut[groups, end], end))
        end = cut[groups, end]
    ids = [entry for entry, (start, stop) in enumerate(reversed(bounds)) for _ in range(start, stop)]
    return SharingPlan.from_ids(ids)
