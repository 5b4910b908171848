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


# Below this many weights a parallel launch costs more than it saves: PyTorch's ops win there.
NUMBA_MIN_WEIGHTS = 1 << 14

if numba is not None:
    _gather = njit(parallel=True, fastmath=True, boundscheck=False, cache=True)(_gather_loop)
    _scatter = njit(parallel=True, fastmath=True, boundscheck=False, cache=True)(_scatter_loop)


def _use_numba(table: Tensor, weights: int) -> bool:
    choice = os.environ.get(KERNEL_ENV, "auto")
    if choice not in ("auto", "numba", "torch"):
        raise ValueError(f"{KERNEL_ENV}: must be auto, numba or torch, got {choice!r}")
    eligible = numba is not None and table.device.type == "cpu" and table.dtype == torch.float32
    if choice == "numba" and not eligible:
        raise RuntimeError(f"{KERNEL_ENV}=numba needs numba and a float32 CPU table")
    return choice == "numba" or (eligible and choice == "auto" and weights >= NUMBA_MIN_WEIGHTS)


def _threads() -> int:
    """Numba follows torch's thread budget (Ray sets it per trial)."""
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    return threads


class _NumbaGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table: Tensor, index: Tensor, sign: Tensor) -> Tensor:
        ctx.save_for_backward(index, sign)
        ctx.table_size = table.shape[0]
        out = torch.empty(index.shape[0], dtype=table.dtype)
        _threads()
        _gather(table.detach().contiguous().numpy(), index.numpy(), sign.numpy(), out.numpy())
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        index, sign = ctx.saved_tensors
        out = torch.empty(ctx.table_size, dtype=grad.dtype)
        _scatter(grad.contiguous().numpy(), index.numpy(), sign.numpy(), out.numpy(), _threads())
        return out, None, None


_NO_SIGN = torch.empty(0, dtype=torch.int8)


def gather_table(table: Tensor, index: Tensor, sign: Tensor | None = None) -> Tensor:
    """Return `table[index] * sign` (flat), with index == len(table) reading as a fixed zero."""
    if _use_numba(table, index.shape[0]):
        return _NumbaGather.apply(table, index, _NO_SIGN if sign is None else sign)
    padded = torch.cat([table, table.new_zeros(1)])
    values = padded.index_select(0, index)
    return values if sign is None else values * sign.to(values.dtype)
