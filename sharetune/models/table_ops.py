"""Gather virtual weights from a hash table, and scatter their gradients back.

The index never changes during training, so the forward is one gather and the backward one
segmented sum whose layout is precomputed once. On CPU the fastest kernels we measured are small
C++ OpenMP loops (`table_kernels.cpp`, built on first use): they run on PyTorch's own thread pool,
the gather across all cores (vector gathers or scalar loads, whichever this CPU runs faster), the
scatter with each core owning a cache-sized part of a large table (no atomics) or summing into
private copies of a small one. Without a compiler, CPU layers gather with `index_select` and scatter
with a sparse matrix-vector product (CSR, int32 indices), the fastest pure-PyTorch pair we measured.
On CUDA, `index_select`, whose autograd backward is `index_add_`, beats sort-based scatters; a net's
layers are gathered by one of them, from their tables laid end to end (`_IndexSelectBatch`).

Index convention: entry `table_size` is the reserved zero slot (sparsity); it reads as 0 and
never receives a gradient.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import time
import warnings
from functools import cache, cached_property
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef

from sharetune.models.native import table_kernels

KERNEL_ENV = "SHARETUNE_TABLE_KERNEL"  # "auto" (default), "native", "sparse" or "torch": for benchmarks
KERNELS = ("native", "sparse", "torch")

# Bytes of table a scatter part may own: up to about half of a core's L2 (2 MB here) stays in it
# beside the streams; 1 MB parts beat 512 KB ones by 5-10% on the CIFAR layers.
PART_BYTES = 1 << 20
# Tables up to this many entries are scattered through private copies (four per thread fit in
# L2), which needs no precomputed layout; larger ones through cache-sized parts. Their indices,
# zero slot included, also fit in 16 bits, which the small-table kernels take.
SMALL_TABLE = 1 << 14


def choose_kernel(index: Tensor) -> str:
    choice = os.environ.get(KERNEL_ENV, "auto")
    if choice not in ("auto", *KERNELS):
        raise ValueError(f"{KERNEL_ENV}: must be auto, {', '.join(KERNELS)}; got {choice!r}")
    if index.device.type != "cpu":
        return "torch"
    if index.dtype != torch.int32:  # tables of 2**31 entries or more: beyond the C++ kernels' int32
        return "sparse"
    if choice == "native" and table_kernels() is None:
        raise RuntimeError(f"{KERNEL_ENV}=native needs a C++ compiler with OpenMP (set CXX)")
    if choice != "auto":
        return choice
    return "native" if table_kernels() is not None else "sparse"


# Bits of a scatter word that hold the entry within its part (all ones: skip); the rest hold the step.
LOCAL_BITS = (PART_BYTES // 4).bit_length()


def _partition(index: np.ndarray, table_size: int, parts: int) -> list[Tensor]:
    """Each part's weights as the words `sharetune_scatter` reads (see there), and where each part starts."""
    part_lo = np.linspace(0, table_size, parts + 1).astype(np.int64)
    assert (np.diff(part_lo) < (1 << LOCAL_BITS) - 1).all(), "a part's entries must fit beside the skip value"
    kept = np.flatnonzero(index < table_size)
    part = np.searchsorted(part_lo, index[kept], side="right") - 1
    order = np.argsort(part, kind="stable")  # by part, positions ascending within one
    positions, part = kept[order], part[order]
    local = index[positions] - part_lo[part]
    first = np.r_[True, part[1:] != part[:-1]]
    steps = np.where(first, positions, positions - np.roll(positions, 1))
    longest = (1 << (32 - LOCAL_BITS)) - 1
    skips = np.maximum(steps - 1, 0) // longest  # words that only step `longest` ahead, before the weight's
    ends = np.r_[0, np.cumsum(skips + 1)]  # weight k's words end at ends[k + 1]
    words = np.full(ends[-1], (longest << LOCAL_BITS) | ((1 << LOCAL_BITS) - 1), dtype=np.uint32)
    words[ends[1:] - 1] = ((steps - skips * longest) << LOCAL_BITS) | local
    starts = ends[np.searchsorted(part, np.arange(parts + 1))]
    return [torch.from_numpy(words.view(np.int32)), torch.from_numpy(starts), torch.from_numpy(part_lo)]


class TablePlan:
    """What a fixed index lets us precompute for one device, built once and reused every step."""

    def __init__(self, index: Tensor, sign: Tensor | None, table_size: int, shape: tuple[int, ...]) -> None:
        self.key = plan_key(index, sign)
        self.table_size = table_size
        self.shape = shape  # of the gathered weights: a view node per step costs microseconds
        self.kernel = choose_kernel(index)
        self.index = index
        self.sign = sign
        self.partition: list[Tensor] | None = None  # native kernel, large tables: see _partition
        self.index16: Tensor | None = None  # native kernel, small tables: the index in 16 bits
        self.batches: dict[tuple, _NativeBatch | _IndexSelectBatch] = {}  # batched calls that start with this plan
        if self.kernel == "native" and table_size > SMALL_TABLE:
            threads = _threads()
            parts = max(1, -(-table_size * 4 // PART_BYTES))
            parts = -(-parts // threads) * threads  # whole rounds of threads
            self.partition = _partition(index.numpy(), table_size, parts)
        elif self.kernel == "native":
            self.index16 = index.to(torch.int16)  # read as uint16: entries up to SMALL_TABLE
        elif self.kernel == "sparse":
            kept = (index < table_size).nonzero().squeeze(1)
            values = torch.ones(len(kept)) if sign is None else sign[kept].float()
            entries = torch.stack([index[kept].long(), kept])
            with warnings.catch_warnings():  # "sparse CSR support is in beta": matrix-vector is stable
                warnings.simplefilter("ignore", UserWarning)
                shape = (table_size, index.numel())
                csr = torch.sparse_coo_tensor(entries, values, shape).coalesce().to_sparse_csr()
                # int32 indices: MKL's kernel takes them as they are; int64 ones are converted every call
                self.transpose = torch.sparse_csr_tensor(
                    csr.crow_indices().int(), csr.col_indices().int(), csr.values(), shape
                )

    @cached_property
    def index64(self) -> Tensor:
        return self.index.long()  # index_select is fastest with int64 on CPU

    @cached_property
    def has_zero_slot(self) -> bool:
        return bool((self.index == self.table_size).any())

    def padded(self, table: Tensor) -> Tensor:
        """The table with its zero slot appended, when some weight reads it."""
        return torch.cat([table, table.new_zeros(1)]) if self.has_zero_slot else table

    def native(self, table: Tensor) -> bool:
        return self.kernel == "native" and table.dtype == torch.float32

    def gather(self, table: Tensor) -> Tensor:
        if self.native(table):
            return _NativeGather.apply((self,), table)[0]
        if self.kernel == "sparse" and table.dtype == torch.float32:
            return _SparseGather.apply(table, self)
        return self.index_select(table)

    def index_select(self, table: Tensor) -> Tensor:
        values = self.padded(table).index_select(0, self.index64)
        values = values if self.sign is None else values * self.sign.to(values.dtype)
        return values.view(self.shape)

    def scatter_parts(self, grad: Tensor) -> Tensor:
        """The large-table scatter, through the precomputed parts."""
        out = torch.empty(self.table_size, dtype=grad.dtype)
        words, starts, part_lo = self.partition
        table_kernels().sharetune_scatter(
            grad.data_ptr(), words.data_ptr(), _address(self.sign), starts.data_ptr(), part_lo.data_ptr(),
            len(starts) - 1, LOCAL_BITS, out.data_ptr(), _threads(),
        )
        return out


def gather_tables(plans: Sequence[TablePlan], tables: Sequence[Tensor]) -> list[Tensor]:
    """The virtual weights of several layers, each in its plan's shape; small native tables share one
    autograd node.

    A Python autograd node costs tens of microseconds, as much as the kernels of an MNIST-sized
    layer. Large tables keep a node each, so that each scatter runs as soon as its gradient is
    computed, while that gradient is still in cache, instead of after the whole backward pass.
    """
    native = [i for i, (plan, table) in enumerate(zip(plans, tables)) if plan.native(table) and plan.partition is None]
    if native and len(native) == len(plans):  # the common case, and every step: no bookkeeping
        return list(_NativeGather.apply(tuple(plans), *tables))
    if len(plans) > 1 and all(plan.kernel == "torch" for plan in plans) and len({t.dtype for t in tables}) == 1:
        return _batch(plans, _IndexSelectBatch).gather(tables)  # CUDA: a few launches for the whole net
    weights = [None if i in native else plan.gather(table) for i, (plan, table) in enumerate(zip(plans, tables))]
    if native:
        gathered = _NativeGather.apply(tuple(plans[i] for i in native), *(tables[i] for i in native))
        for i, weight in zip(native, gathered):
            weights[i] = weight
    return weights


def plan_key(index: Tensor, sign: Tensor | None) -> tuple:
    """Changes whenever the index is replaced or written in place (e.g. by load_state_dict)."""
    return (index.data_ptr(), index._version, index.device, None if sign is None else (sign.data_ptr(), sign._version))


def _threads() -> int:
    """PyTorch's thread budget (Ray sets it per trial). Always all of it, even for small layers:
    an OpenMP team of another size costs more to set up than the extra threads save."""
    return torch.get_num_threads()


@cache
def vector_gathers_pay() -> bool:
    """Whether explicit vector gathers beat scalar loads from a table in L1 (see gather_range in
    table_kernels.cpp): they do on the Intel CPUs we measured and not on AMD Zen 4, where scalar loads
    make an MNIST training step 2-4% faster. Timed once per process, on one thread, in about 2 ms."""
    own = torch.Generator().manual_seed(0)  # the global generator is the run's: drawing from it would change its results
    table, index = torch.randn(1001, generator=own), torch.randint(0, 1001, (1 << 16,), dtype=torch.int16, generator=own)
    out = torch.empty(1 << 16)
    args = (1, _pointers([table]), _pointers([index]), _pointers([None]), _pointers([out]), _sizes([index.numel()]), 1)
    seconds: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(25):
        for vector, times in seconds.items():
            start = time.perf_counter()
            table_kernels().sharetune_gather_small(*args, vector)
            times.append(time.perf_counter() - start)
    return statistics.median(seconds[True]) < statistics.median(seconds[False])


def _address(tensor: Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _pointers(tensors: Sequence[Tensor | None]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[None if tensor is None else tensor.data_ptr() for tensor in tensors])


def _sizes(values: Sequence[int]) -> ctypes.Array:
    return (ctypes.c_int64 * len(values))(*values)


def _holders(storage: StorageWeakRef) -> int | None:
    """Strong references to a storage, counted as torch._inductor's CUDA graph trees count them."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)  # private: if it goes, never reuse
    return None if use_count is None else use_count(storage.cdata)


class _ReusedBuffers:
    """Tensors of fixed shapes, handed out again once nothing else holds them (the step that used
    them is gone), with their addresses for the kernels: in an MNIST step, allocating and first
    touching the gathered weights costs 1%, and every tensor created costs microseconds."""

    def __init__(self, shapes: Sequence[tuple[int, ...]]) -> None:
        self.shapes = shapes
        self.buffers: list[Tensor] = []

    def get(self) -> list[Tensor]:
        if not self._free():
            self.buffers = [torch.empty(shape) for shape in self.shapes]
            self.storages = [StorageWeakRef(buffer.untyped_storage()) for buffer in self.buffers]
            self.idle = [_holders(storage) for storage in self.storages]  # only self.buffers hold them
            self.addresses = _pointers(self.buffers)
        return [buffer.detach() for buffer in self.buffers]

    def _free(self) -> bool:
        """False when the count is unknown (see `_holders`): then every call allocates."""
        holders = [_holders(storage) for storage in self.storages] if self.buffers else [None]
        return None not in holders and holders == self.idle


class _NativeBatch:
    """The layers one native call gathers, with the call's arguments that never change.

    Built once per set of plans and cached on the first one (`_batch`): in a training step,
    each Python operation around the kernels costs about a microsecond, and an MNIST layer's kernels
    only tens. Holds the other plans, so that their ids, the cache key, are not reused.
    """

    def __init__(self, plans: Sequence[TablePlan]) -> None:
        self.others = plans[1:]
        self.count = len(plans)
        self.shapes = [plan.shape for plan in plans]
        self.table_sizes = [plan.table_size for plan in plans]
        self.small = plans[0].partition is None  # else a large table, alone: see gather_tables
        self.vector_gathers = self.small and vector_gathers_pay()  # large tables always gather with vectors
        self.indices = _pointers([plan.index16 if self.small else plan.index for plan in plans])
        self.signs = _pointers([plan.sign for plan in plans])
        self.sizes = _sizes([plan.index.numel() for plan in plans])
        self.table_size_array = _sizes(self.table_sizes)
        self.weights = _ReusedBuffers(self.shapes)
        self.table_grads = _ReusedBuffers([(size,) for size in self.table_sizes])
        self.inputs = (ctypes.c_void_p * self.count)()  # the tables, then the gradients: filled per call

    def _point_at(self, tensors: Sequence[Tensor]) -> ctypes.Array:
        for i, tensor in enumerate(tensors):
            self.inputs[i] = tensor.data_ptr()
        return self.inputs

    def gather(self, plans: Sequence[TablePlan], tables: Sequence[Tensor]) -> list[Tensor]:
        padded = [plan.padded(table.contiguous()) for plan, table in zip(plans, tables)]  # held: read by address
        outs = self.weights.get()
        args = (self.count, self._point_at(padded), self.indices, self.signs, self.weights.addresses, self.sizes, _threads())
        if self.small:
            table_kernels().sharetune_gather_small(*args, self.vector_gathers)
        else:
            table_kernels().sharetune_gather(*args)
        return outs

    def scatter(self, plans: Sequence[TablePlan], grads: Sequence[Tensor]) -> list[Tensor]:
        grads = [grad.contiguous() for grad in grads]
        if not self.small:
            return [plans[0].scatter_parts(grads[0])]
        outs = self.table_grads.get()
        table_kernels().sharetune_scatter_small(
            self.count, self._point_at(grads), self.indices, self.signs, self.sizes, self.table_size_array,
            self.table_grads.addresses, _threads(),
        )
        return outs


class _IndexSelectBatch:
    """Several layers' tables read by one `index_select` (on CUDA, where each kernel launch costs as
    much as a small layer's gather): the tables laid end to end with one zero slot after them, and
    every layer's index shifted to its table's place, made once and kept on the device.

    A step is then one concatenation, one gather and, with signs, one multiplication, whatever the
    number of layers; autograd's backward is one `index_add_` and views of its result.
    """

    def __init__(self, plans: Sequence[TablePlan]) -> None:
        self.others = plans[1:]  # held, so that their ids (the cache key) are not reused
        starts = np.cumsum([0] + [plan.table_size for plan in plans])
        zero = int(starts[-1])  # the shared zero slot
        self.index = torch.cat([torch.where(plan.index64 == plan.table_size, zero, plan.index64 + int(start))
                                for plan, start in zip(plans, starts)])
        signs = [plan.sign for plan in plans]
        self.sign = None if all(s is None for s in signs) else torch.cat(
            [torch.ones(p.index.numel(), dtype=torch.int8, device=p.index.device) if s is None else s for p, s in zip(plans, signs)])
        self.sizes = [plan.index.numel() for plan in plans]
        self.shapes = [plan.shape for plan in plans]
        self.typed: dict[torch.dtype, tuple[Tensor, Tensor | None]] = {}  # per table dtype: zero slot, signs

    def gather(self, tables: Sequence[Tensor]) -> list[Tensor]:
        dtype = tables[0].dtype
        if dtype not in self.typed:
            self.typed[dtype] = (self.index.new_zeros(1, dtype=dtype), None if self.sign is None else self.sign.to(dtype))
        zero, sign = self.typed[dtype]
        values = torch.cat([*tables, zero]).index_select(0, self.index)
        values = values if sign is None else values * sign
        return [part.view(shape) for part, shape in zip(values.split(self.sizes), self.shapes)]


def _batch(plans: Sequence[TablePlan], kind: type):
    """The `kind` of batch for these plans, built once and cached on the first plan."""
    key = (kind, *map(id, plans[1:]))
    batch = plans[0].batches.get(key)
    if batch is None:
        batch = plans[0].batches[key] = kind(plans)
    return batch


class _NativeGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plans: tuple[TablePlan, ...], *tables: Tensor) -> tuple[Tensor, ...]:
        ctx.plans, ctx.batch = plans, _batch(plans, _NativeBatch)
        return tuple(ctx.batch.gather(plans, tables))

    @staticmethod
    def backward(ctx, *grads: Tensor):
        return None, *ctx.batch.scatter(ctx.plans, grads)


class _SparseGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table: Tensor, plan: TablePlan) -> Tensor:
        ctx.plan = plan
        return plan.index_select(table.detach())

    @staticmethod
    def backward(ctx, grad: Tensor):
        return torch.mv(ctx.plan.transpose, grad.reshape(-1)), None
