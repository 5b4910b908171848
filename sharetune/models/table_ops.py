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


def _scatter_loop(grad, index, sign, out, threads):  # pragma: no cover - compiled by Numba
    size = out.shape[0]
    signed = sign.shape[0] > 0
    n = index.shape[0]
    private = np.zeros((threads, size), dtype=out.dtype)
    chunk = (n + threads - 1) // threads
    for t in prange(threads):
        acc = private[t]
        for i in range(t * chunk, min(n, (t + 1) * chunk)):
            j = index[i]
            if j < size:
                acc[j] += grad[i] * sign[i] if signed else grad[i]
    for j in prange(size):
        total = out.dtype.type(0)
        for t in range(threads):
            total += private[t, j]
        out[j] = total


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
            return
        self.index64 = index.long()  # index_select is fastest with int64 on CPU
        self.has_zero_slot = bool((index == table_size).any())
        self.sign_values = None if sign is None else sign.float()
        if self.kernel == "sparse":
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

    def gather(self, table: Tensor) -> Tensor:
        if self.kernel == "numba" and table.dtype == torch.float32:
            return _NumbaGather.apply(table, self)
        if self.kernel == "sparse" and table.dtype == torch.float32:
            return _SparseGather.apply(table, self)
        return self.index_select(table)

    def index_select(self, table: Tensor) -> Tensor:
        padded = torch.cat([table, table.new_zeros(1)]) if self.has_zero_slot else table
        values = padded.index_select(0, self.index64)
        return values if self.sign_values is None else values * self.sign_values.to(values.dtype)


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
        _scatter(grad.contiguous().numpy(), plan.index.numpy(), plan.sign.numpy(), out.numpy(), _threads())
        return out, None


class _SparseGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table: Tensor, plan: TablePlan) -> Tensor:
        ctx.plan = plan
        return plan.index_select(table.detach())

    @staticmethod
    def backward(ctx, grad: Tensor):
        return torch.mv(ctx.plan.transpose, grad.contiguous()), None
