"""ArbNet (Chang & Lipson): MLP layers whose virtual weights are read from a hash table.

Every virtual weight w_i of a layer is `table[h(i)]` for a hash h computed once, before training.
Collisions are weight sharing. The index (an int32 buffer) is a function of the layer's recipe (hash,
options, sparsity, seed) and shape, so for a deterministic hash (`register_hash(deterministic=True)`,
all built-in ones) `state_dict` holds only the recipe and the index is recomputed at load: a
checkpoint is the size of the tables. Other hashes, and layers built `from_index`, store the index.

Sparsity (the paper leaves it undefined): a reserved zero entry. Exactly round(sparsity * n) of a
layer's n virtual weights, chosen by the layer's seed, map to an extra slot that always reads 0 and
never receives a gradient. The table itself keeps `table_size` trainable entries; the remaining
weights are hashed over them as usual.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sharetune.models.hashes import Hashed, compute_hash, is_deterministic
from sharetune.models.registry import register_model
from sharetune.models.table_ops import TablePlan, gather_tables, plan_key


class ArbLinear(nn.Module):
    """A linear layer whose `out x in` weight is gathered from a learnable table of `table_size` entries."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        table_size: int,
        hash: str,
        alpha: float | None = None,
        radius: int | None = None,
        sparsity: float = 0.0,
        seed: int = 0,
        bias: bool = True,
        sign: bool | None = None,
    ) -> None:
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity: must be in [0, 1), got {sparsity}")
        recipe = {"hash": hash, "alpha": alpha, "radius": radius, "sign": sign, "sparsity": sparsity, "seed": seed}
        hashed = hashed_index(recipe, (out_features, in_features), table_size)
        super().__init__()
        self._setup(in_features, out_features, table_size, hashed.index, hashed.sign, bias, stored=not is_deterministic(hash))
        self.hash_name, self.recipe = hash, recipe

    @classmethod
    def from_index(
        cls,
        index: np.ndarray | Tensor,
        table_size: int,
        *,
        sign: np.ndarray | Tensor | None = None,
        bias: bool = True,
    ) -> "ArbLinear":
        """A layer with an explicit `out x in` index (entries == table_size read as zero): conv, RNN, custom."""
        index = np.asarray(index)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(index.shape[1], index.shape[0], table_size, index.ravel(), sign, bias, stored=True)
        layer.hash_name, layer.recipe = "custom", None
        return layer

    def _setup(
        self, in_features: int, out_features: int, table_size: int, index: np.ndarray, sign, bias: bool, *, stored: bool
    ) -> None:
        """`stored`: whether `state_dict` holds the index (else the recipe rebuilds it, see set_extra_state)."""
        self.in_features, self.out_features, self.table_size = in_features, out_features, table_size
        index_tensor, sign_tensor = self._index_tensors(index, sign)
        self.register_buffer("index", index_tensor, persistent=stored)
        self.register_buffer("sign", sign_tensor, persistent=stored)
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default init, so dense and hashed nets start alike
        self.table = nn.Parameter(torch.empty(table_size).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound)) if bias else None

    def _index_tensors(self, index: np.ndarray, sign: np.ndarray | None) -> tuple[Tensor, Tensor | None]:
        dtype = torch.int32 if self.table_size < 2**31 - 1 else torch.int64
        index_tensor = torch.as_tensor(np.asarray(index), dtype=dtype).contiguous()
        return index_tensor, None if sign is None else torch.as_tensor(np.asarray(sign), dtype=torch.int8)

    def get_extra_state(self) -> dict | None:
        """The recipe the index is computed from (None: built `from_index`); a few hundred bytes."""
        return self.recipe

    def set_extra_state(self, recipe: dict | None) -> None:
        """A loaded recipe other than this layer's recomputes the index, where it is not stored."""
        if recipe is None or recipe == self.recipe or "index" not in self._non_persistent_buffers_set:
            return
        hashed = hashed_index(recipe, (self.out_features, self.in_features), self.table_size)
        index, sign = self._index_tensors(hashed.index, hashed.sign)
        device = self._buffers["index"].device
        self.index, self.sign = index.to(device), None if sign is None else sign.to(device)
        self.hash_name, self.recipe = recipe["hash"], dict(recipe)

    def dense_weight(self) -> Tensor:
        """The materialised `out x in` weight (differentiable with respect to the table)."""
        return gather_weights([self])[0]

    def table_plan(self) -> TablePlan:
        """Kernel data derived from the index; rebuilt only when the index or the device changes."""
        plan = self.__dict__.get("_plan")
        index, sign = self._buffers["index"], self._buffers["sign"]  # Module.__getattr__ costs a microsecond a step
        if plan is None or plan.key != plan_key(index, sign):
            shape = (self.out_features, self.in_features)
            plan = self.__dict__["_plan"] = TablePlan(index, sign, self.table_size, shape)
        return plan

    def forward(self, x: Tensor, weight: Tensor | None = None) -> Tensor:
        """`weight`: this layer's dense weight when the caller gathered it already (`gather_weights`)."""
        return F.linear(x, self.dense_weight() if weight is None else weight, self.bias)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_plan", None)  # derived data: rebuilt on first use after unpickling or copying
        return state

    def usage(self) -> Tensor:
        """How many virtual weights read each table entry (the zero slot excluded)."""
        return torch.bincount(self.index.long(), minlength=self.table_size + 1)[: self.table_size]

    def entropy(self) -> float:
        """Shannon entropy, in nats, of table usage (eq. 7); ln(table_size) when perfectly balanced."""
        counts = self.usage().double()
        p = counts[counts > 0] / counts.sum()
        return float(-(p * p.log()).sum())

    def virtual_parameter_count(self) -> int:
        """Dense-equivalent parameters: what an unshared `nn.Linear` of this shape would hold."""
        return self.index.numel() + (0 if self.bias is None else self.bias.numel())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"table_size={self.table_size}, hash={self.hash_name}"
        )


def hashed_index(recipe: dict, shape: tuple[int, int], table_size: int) -> Hashed:
    """A layer's index and signs from its recipe: the hash over `table_size` entries, then exactly
    round(sparsity * n) weights, chosen by the seed, moved to the zero slot (entry `table_size`)."""
    options = {k: recipe[k] for k in ("alpha", "radius", "sign")}
    hashed = compute_hash(recipe["hash"], shape, table_size, recipe["seed"], **options)
    zeros = round(recipe["sparsity"] * hashed.index.size)
    if not zeros:
        return hashed
    index = hashed.index.copy()
    index[np.random.default_rng((recipe["seed"], 1)).permutation(index.size)[:zeros]] = table_size
    return Hashed(index, hashed.sign)


def gather_weights(layers: Sequence[ArbLinear]) -> list[Tensor]:
    """The dense weights of several layers, gathered together (one autograd node on CPU)."""
    return gather_tables([layer.table_plan() for layer in layers], [layer._parameters["table"] for layer in layers])


# The paper's networks (section 4.3): input width, hidden widths, classes.
PAPER_MLPS: dict[str, tuple[int, tuple[int, ...], int]] = {
    "mnist": (784, (200, 200), 10),
    "cifar10": (3072, (2000,) * 5, 10),
}


def _per_layer(value, count: int, field: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{field}: expected {count} values (one per layer), got {len(value)}")
        return list(value)
    return [value] * count


def table_sizes(shapes: Sequence[tuple[int, int]], hashes: Sequence[str], table_size: int | Sequence[int] | None,
                compression: float | None) -> list[int]:
    """Each layer's table entries: `table_size` (one, or one per layer) or `compression` x the layer's
    weights; an identity layer holds all its weights."""
    if (table_size is None) == (compression is None) and not all(h == "identity" for h in hashes):
        raise ValueError("table_size/compression: give exactly one of them")
    if compression is not None:
        if not 0.0 < compression <= 1.0:
            raise ValueError(f"compression: must be in (0, 1] (table entries per weight), got {compression}")
        sizes = [max(1, round(compression * i * o)) for i, o in shapes]
    else:
        sizes = _per_layer(table_size, len(shapes), "table_size")
    return [i * o if h == "identity" else s for h, s, (i, o) in zip(hashes, sizes, shapes)]


@register_model("arbnet_mlp")
class ArbNetMLP(nn.Module):
    """The paper's MLP: [ArbLinear -> ELU -> BatchNorm] per layer, the output layer included.

    Give `table_size` (one int, or one per layer) or `compression`, the fraction of each layer's
    weights the table holds (HashedNets' compression factor, e.g. 0.1). `hash`, `alpha`, `radius`
    and `sparsity` take one value or one per layer.
    """

    def __init__(
        self,
        in_features: int = PAPER_MLPS["mnist"][0],
        hidden: Sequence[int] = PAPER_MLPS["mnist"][1],
        num_classes: int = PAPER_MLPS["mnist"][2],
        *,
        hash: str | Sequence[str],
        table_size: int | Sequence[int] | None = None,
        compression: float | None = None,
        alpha: float | Sequence[float] | None = None,
        radius: int | Sequence[int] | None = None,
        sparsity: float | Sequence[float] = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        widths = [in_features, *hidden, num_classes]
        shapes = list(zip(widths[:-1], widths[1:]))
        count = len(shapes)
        hashes = _per_layer(hash, count, "hash")
        sizes = table_sizes(shapes, hashes, table_size, compression)
        options = zip(
            hashes, sizes, _per_layer(alpha, count, "alpha"), _per_layer(radius, count, "radius"),
            _per_layer(sparsity, count, "sparsity"), shapes,
        )
        layers: list[nn.Module] = []
        for depth, (h, size, a, r, s, (fan_in, fan_out)) in enumerate(options):
            layers += [
                ArbLinear(fan_in, fan_out, table_size=size, hash=h, alpha=a, radius=r, sparsity=s, seed=seed + depth),
                nn.ELU(),
                nn.BatchNorm1d(fan_out),
            ]
        self.layers = nn.Sequential(*layers)

    @classmethod
    def paper(cls, dataset: str, **kwargs) -> "ArbNetMLP":
        """The section 4.3 network for `mnist` or `cifar10` (784-200-200-10 or 3072-2000x5-10)."""
        if dataset not in PAPER_MLPS:
            raise ValueError(f"dataset: the paper nets are {', '.join(PAPER_MLPS)}, got {dataset!r}")
        in_features, hidden, num_classes = PAPER_MLPS[dataset]
        return cls(in_features, hidden, num_classes, **kwargs)

    def arb_layers(self) -> list[ArbLinear]:
        return [m for m in self.layers if isinstance(m, ArbLinear)]

    def entropy(self) -> float:
        """Mean table-usage entropy over layers (nats)."""
        layers = self.arb_layers()
        return sum(layer.entropy() for layer in layers) / len(layers)

    def forward(self, x: Tensor) -> Tensor:
        weights = iter(gather_weights(self.arb_layers()))
        x = x.flatten(1)
        for module in self.layers:
            x = module(x, next(weights)) if isinstance(module, ArbLinear) else module(x)
        return x


def conv2d_index(
    in_channels: int, out_channels: int, kernel_size: int, input_size: tuple[int, int], *, stride: int = 1, padding: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 6: the hash that turns a conv2d into an ArbNet layer over flattened images.

    Returns (weight_index, bias_index): `weight_index` has shape (out_numel, in_numel), entries point
    into `conv.weight.flatten()` and positions outside the kernel's window point to the zero slot
    (= weight numel); `bias_index` maps every output to its channel's bias.
    """
    h, w = input_size
    k = kernel_size
    oh, ow = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    zero = out_channels * in_channels * k * k
    index = np.full((out_channels, oh, ow, in_channels, h, w), zero, dtype=np.int64)
    co, ci, ky, kx, y, x = np.meshgrid(
        np.arange(out_channels), np.arange(in_channels), np.arange(k), np.arange(k),
        np.arange(oh), np.arange(ow), indexing="ij",
    )
    iy, ix = y * stride + ky - padding, x * stride + kx - padding
    inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    weight_id = ((co * in_channels + ci) * k + ky) * k + kx
    index[co[inside], y[inside], x[inside], ci[inside], iy[inside], ix[inside]] = weight_id[inside]
    bias_index = np.repeat(np.arange(out_channels), oh * ow)
    return index.reshape(out_channels * oh * ow, in_channels * h * w), bias_index


def conv2d_as_arbnet(conv: nn.Conv2d, input_size: tuple[int, int]) -> nn.Module:
    """An ArbLinear that computes `conv` on flattened inputs, sharing exactly the conv's weights."""
    (k, _), (stride, _), (padding, _) = conv.kernel_size, conv.stride, conv.padding
    index, bias_index = conv2d_index(conv.in_channels, conv.out_channels, k, input_size, stride=stride, padding=padding)
    layer = ArbLinear.from_index(index, conv.weight.numel(), bias=False)
    with torch.no_grad():
        layer.table.copy_(conv.weight.flatten())
    if conv.bias is not None:
        layer.bias = nn.Parameter(conv.bias.detach()[torch.as_tensor(bias_index)].clone())
    return layer
