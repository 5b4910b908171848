"""Build the C++ table kernels once per machine and load them with ctypes.

Compiled with `-march=native` on the machine that runs them (a Ray worker may sit on another CPU
than the head), cached under $SHARETUNE_CACHE (default ~/.cache/sharetune) by a hash of the source,
flags, compiler and CPU. No compiler, or a failed build, leaves the caller on PyTorch's kernels.

Loading a library runs its code, so the cache is private: a per-user folder created 0700 (and
made so if this user owns it already), and a cached library is loaded only if this user owns it
and nobody else can write it; anything else there is rebuilt over.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path

import torch  # noqa: F401  - loaded first, so the kernels bind to PyTorch's OpenMP runtime

from sharetune.cache import cache_dir, private

SOURCE = Path(__file__).with_name("table_kernels.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]


def _cpu_identity() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next((line for line in lines if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _build(compiler: str, target: Path) -> str | None:
    """Compile to a private file and move it into place: concurrent workers never see half a library."""
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(partial)], capture_output=True, text=True)
    if done.returncode:
        partial.unlink(missing_ok=True)
        return done.stderr.strip()[-500:] or f"{compiler} exited with {done.returncode}"
    partial.chmod(0o700)  # whatever the umask: a library others can write is never loaded (see table_kernels)
    os.replace(partial, target)
    return None


@functools.cache
def table_kernels() -> ctypes.CDLL | None:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        warnings.warn("sharetune: no C++ compiler found, ArbNet layers use PyTorch's slower kernels", stacklevel=2)
        return None
    fingerprint = "\n".join([SOURCE.read_text(), *FLAGS, compiler, platform.machine(), _cpu_identity()])
    target = cache_dir() / f"table_kernels-{hashlib.sha256(fingerprint.encode()).hexdigest()[:16]}.so"
    trusted = target.exists() and private(target)  # a library someone else could have written is built over
    if not trusted and (error := _build(compiler, target)):
        warnings.warn(f"sharetune: building the C++ table kernels failed, using PyTorch's: {error}", stacklevel=2)
        return None
    lib = ctypes.CDLL(str(target))
    pointer, size, count = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.sharetune_gather.argtypes = [size, pointer, pointer, pointer, pointer, pointer, count]
    lib.sharetune_gather_small.argtypes = [*lib.sharetune_gather.argtypes, count]
    lib.sharetune_scatter_small.argtypes = [size, pointer, pointer, pointer, pointer, pointer, pointer, count]
    lib.sharetune_scatter.argtypes = [pointer, pointer, pointer, pointer, pointer, size, count, pointer, count]
    for kernel in (lib.sharetune_gather, lib.sharetune_gather_small, lib.sharetune_scatter, lib.sharetune_scatter_small):
        kernel.restype = None
    return lib
