"""Gather virtual weights from a hash table, and scatter their gradients back.

The index never changes during training, so the forward is one gather and the backward one
segmented sum. On CPU the fastest kernels we measured are small Numba loops: the gather runs
across all cores, and the scatter gives each core a private copy of the table (it stays in cache)
and sums the copies at the end, avoiding atomics. Elsewhere (CUDA, other dtypes, no Numba) we use
`index_select`, whose autograd backward is `index_add_`: on CUDA that beats sort-based scatters.
Layers under NUMBA_MIN_WEIGHTS also take that path on CPU: there a parallel launch costs more
than it saves.

Index convention: entry `table_size` is the reserved zero slot (sparsity); it reads as 0 and
never receives a gradient.
"""

from __future__ import annotations

import os
import warnings
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

try:
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - numba is a dependency; this keeps exotic platforms working
    numba = None

KERNEL_ENV = "SHARETUNE_TABLE_KERNEL"  # "auto" (default), "numba" or "torch": for benchmarks


def _gather_loop(table, index, sign, out):  # pragma: no cover - compiled by Numba
    size = table.shape[0]
    signed = sign.shape[0] > 0
    for i in prange(index.shape[0]):
        j = index[i]
        if j < size:
            out[i] = table[j] * sign[i] if signed else table[j]
        else:
            out[i] = 0.0


def _scatter_loop(grad, positions, local, starts, part_lo, sign, out):  # pragma: no cover - compiled
    # Part p owns table entries [part_lo[p], part_lo[p+1]) and the weights positions[starts[p]:starts[p+1]],
    # so threads never write the same entry and each part's slice of the table stays in cache.
    signed = sign.shape[0] > 0
    for p in prange(starts.shape[0] - 1):
        lo = part_lo[p]
        for j in range(lo, part_lo[p + 1]):
            out[j] = 0.0
        for k in range(starts[p], starts[p + 1]):
            i = positions[k]
            out[lo + local[k]] += grad[i] * sign[i] if signed else grad[i]


def _partition(index: np.ndarray, table_size: int, parts: int):
    """Group weights by the table part they read, positions ascending within a part."""
    part_lo = np.linspace(0, table_size, parts + 1).astype(np.int64)
    kept = np.flatnonzero(index < table_size).astype(np.int32)
    part = np.searchsorted(part_lo, index[kept], side="right") - 1
    order = np.argsort(part, kind="stable")
    positions = kept[order]
    local = (index[positions] - part_lo[part[order]]).astype(np.int32)
    starts = np.zeros(parts + 1, dtype=np.int64)
    starts[1:] = np.cumsum(np.bincount(part, minlength=parts))
    return positions, local, starts, part_lo


# Bytes of table a scatter part may own: a few hundred KB stays in a core's L2 beside the streams.
PART_BYTES = 512 * 1024

# Below this many weights a Numba launch costs more than it saves (its thread pool and PyTorch's
# contend for the cores); there a sparse matrix-vector product, which runs on PyTorch's own
# threads, is the fastest backward we measured.
NUMBA_MIN_WEIGHTS = 1 << 18
KERNELS = ("numba", "sparse", "torch")

if numba is not None:
    _gather = njit(parallel=True, fastmath=True, boundscheck=False, cache=True)(_gather_loop)
    _scatter = njit(parallel=True, fastmath=True, boundscheck=False, cache=True)(_scatter_loop)

_NO_SIGN = torch.empty(0, dtype=torch.int8)


def choose_kernel(device: torch.device, weights: int) -> str:
    choice = os.environ.get(KERNEL_ENV, "auto")
    if choice not in ("auto", *KERNELS):
        raise ValueError(f"{KERNEL_ENV}: must be auto, {', '.join(KERNELS)}; got {choice!r}")
    if device.type != "cpu":
        return "torch"
    if choice == "numba" and numba is None:
        raise RuntimeError(f"{KERNEL_ENV}=numba needs the numba package")
    if choice != "auto":
        return choice
    return "numba" if numba is not None and weights >= NUMBA_MIN_WEIGHTS else "sparse"


class TablePlan:
    """What a fixed index lets us precompute for one device, built once and reused every step."""

    def __init__(self, index: Tensor, sign: Tensor | None, table_size: int) -> None:
        self.key = plan_key(index, sign)
        self.table_size = table_size
        self.kernel = choose_kernel(index.device, index.numel())
        self.index = index
        self.sign = _NO_SIGN if sign is None else sign
        if self.kernel == "numba":
            threads = numba.config.NUMBA_NUM_THREADS
            parts = max(1, -(-table_size * 4 // PART_BYTES))
            parts = -(-parts // threads) * threads  # whole rounds of threads
            self.partition = _partition(index.numpy(), table_size, parts)
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

    def gather(self, table: Tensor) -> Tensor:
        if self.kernel == "numba" and table.dtype == torch.float32:
            return _NumbaGather.apply(table, self)
        if self.kernel == "sparse" and table.dtype == torch.float32:
            return _SparseGather.apply(table, self)
        return self.index_select(table)

    def index_select(self, table: Tensor) -> Tensor:
        padded = torch.cat([table, table.new_zeros(1)]) if self.has_zero_slot else table
        values = padded.index_select(0, self.index64)
        return values if not len(self.sign) else values * self.sign.to(values.dtype)


def plan_key(index: Tensor, sign: Tensor | None) -> tuple:
    """Changes whenever the index is replaced or written in place (e.g. by load_state_dict)."""
    return (index.data_ptr(), index._version, index.device, None if sign is None else (sign.data_ptr(), sign._version))


def _threads() -> int:
    """Numba follows torch's thread budget (Ray sets it per trial)."""
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    return threads


class _NumbaGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table: Tensor, plan: TablePlan) -> Tensor:
        ctx.plan = plan
        out = torch.empty(plan.index.shape[0], dtype=table.dtype)
        _threads()
        _gather(table.detach().contiguous().numpy(), plan.index.numpy(), plan.sign.numpy(), out.numpy())
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        plan = ctx.plan
        out = torch.empty(plan.table_size, dtype=grad.dtype)
        _threads()
        _scatter(grad.contiguous().numpy(), *plan.partition, plan.sign.numpy(), out.numpy())
        return out, None


class _SparseGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table: Tensor, plan: TablePlan) -> Tensor:
        ctx.plan = plan
        return plan.index_select(table.detach())

    @staticmethod
    def backward(ctx, grad: Tensor):
        return torch.mv(ctx.plan.transpose, grad.contiguous()), None
