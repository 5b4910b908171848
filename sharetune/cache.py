"""sharetune's per-user cache folder: the compiled table kernels, the MLflow queues of searches on
object stores. Loading a cached library runs its code, so the folder is private (0700) and its
owner's alone."""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

CACHE_ENV = "SHARETUNE_CACHE"


def private(path: Path) -> bool:
    """Whether this user owns `path` and nobody else can write it."""
    info = path.stat()
    return info.st_uid == os.getuid() and not info.st_mode & 0o022


def _private_dir(path: Path) -> Path | None:
    """`path`, created 0700 (or made so, where this user owns it); None where that cannot be had."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.stat().st_uid == os.getuid():
            path.chmod(0o700)
        return path if private(path) else None
    except OSError:
        return None


def cache_dir() -> Path:
    """$SHARETUNE_CACHE or ~/.cache/sharetune; else (a read-only home, a folder someone else owns) a
    per-user temp folder, else a fresh private one for this process."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sharetune")
    fallback = Path(tempfile.gettempdir()) / f"sharetune-{os.getuid()}"
    return _private_dir(root) or _private_dir(fallback) or _process_dir()


@functools.cache
def _process_dir() -> Path:
    """The last resort: one private folder for this process, the same on every call (a queue found again)."""
    return Path(tempfile.mkdtemp(prefix="sharetune-"))
