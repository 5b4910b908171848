"""The filesystem Ray Tune and Ray Train write a local search folder through, so that a full disk or a
killed driver never leaves Tune's saved state pointing at something that is gone.

- Files are written whole. Tune keeps each trial's result log and its own state in a staging folder
  and copies them over the search folder's every few seconds; a plain copy truncates the stored file
  first, so a disk that filled mid-copy left it cut short or empty, and the rows it held were lost.
  Here each file goes to a hidden partial file, moved over its name once complete.
- Tune's state file is stored only when it is whole JSON. Tune rewrites it in the staging folder
  (truncate, then write) before it checks whether its last upload is still running, so an upload
  can read it cut short; such a copy is dropped, and the folder keeps the last whole state until
  the next upload. (Its other state files are written whole in the staging folder already.) What
  this cannot catch: pyarrow copies in 1 MiB reads, so a state file over 1 MiB (a search of a few
  dozen trials or more) read across a rewrite can join the old file's start to the new one's end
  and still parse; `resume` then reports the state as one that cannot be restored.
- A trial's old checkpoint is deleted only once Tune's saved state no longer names it. Tune deletes
  the previous checkpoint as soon as it registers a new one (`num_to_keep`), before its state
  recording the new one is saved; if that save fails (a full disk) or never happens (a killed
  driver), the saved state names a deleted checkpoint and the trial cannot resume. The delete waits
  for the second state file saved after it is asked for: syncs run one at a time, so that one was
  written after the request and names the newer checkpoint. When the search ends, each trial keeps
  only the checkpoint Tune's final state names (`keep_final_checkpoints`), which also removes those
  a killed driver left waiting.

Object stores (s3://, gs://) write whole objects already; URIs keep pyarrow's own filesystems.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Callable, Protocol

from pyarrow import PythonFile, fs

PARTIAL_SUFFIX = ".partial"  # a file being written; never read as the file itself
STATE_PREFIX, STATE_SUFFIX = "experiment_state-", ".json"  # Tune's saved state, one per driver session
CHECKPOINT_PREFIX = "checkpoint_"


class FileStore(Protocol):
    """Files read and written whole by name: a search folder (SearchFolder) is one; the pretrained
    weights and MO-ASHA's rungs are kept in it."""

    def read(self, filename: str) -> bytes | None: ...

    def write(self, filename: str, data: bytes) -> None: ...


def partial_name(path: str) -> str:
    """The hidden name `path` is written under until it is whole."""
    directory, _, name = path.rpartition("/")
    return f"{directory}/.{name}{PARTIAL_SUFFIX}"


def is_uri(location: str) -> bool:
    """Whether `location` names an object store or other URI rather than a path."""
    return "://" in location


def is_tune_state(path: str) -> bool:
    """Whether `path` names one of Tune's saved states."""
    name = path.rpartition("/")[2]
    return name.startswith(STATE_PREFIX) and name.endswith(STATE_SUFFIX)


def _whole_json(path: str) -> bool:
    try:
        json.loads(Path(path).read_bytes())
    except ValueError:
        return False
    return True


class _WholeFile:
    """A file-like object pyarrow writes to: the bytes go to the partial file, and closing moves it
    over the target. A failed write or close deletes the partial file and leaves the target alone."""

    def __init__(self, path: str, on_commit: Callable[[str], None]) -> None:
        self.path, self.partial, self._on_commit = path, partial_name(path), on_commit
        self._out = open(self.partial, "wb")

    @property
    def closed(self) -> bool:
        return self._out.closed

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._out.tell()

    def write(self, data: bytes) -> int:
        return self._guarded(self._out.write, data)

    def flush(self) -> None:
        self._guarded(self._out.flush)

    def close(self) -> None:
        if self._out.closed:
            return
        self._guarded(self._out.close)
        if is_tune_state(self.path) and not _whole_json(self.partial):
            os.unlink(self.partial)
            return
        self._guarded(os.replace, self.partial, self.path)  # fails where the target is a folder, say
        self._on_commit(self.path)

    def _guarded(self, operation, *args):
        try:
            return operation(*args)
        except BaseException:
            with contextlib.suppress(OSError):
                self._out.close()  # closes even where its last flush fails
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.partial)
            raise


class _DeferredCheckpointDeletes:
    """The checkpoints Tune asked to delete in this process, each waiting for two saves of its
    search's state (one process-wide record: Tune's handles on the filesystem are many copies)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._saves: dict[str, int] = {}  # search folder -> state files saved whole so far
        self._waiting: list[tuple[str, str, int]] = []  # (checkpoint, its search folder, saves when asked)

    def defer(self, checkpoint: str, search: str) -> None:
        with self._lock:
            self._waiting.append((checkpoint, search, self._saves.get(search, 0)))

    def state_saved(self, search: str) -> None:
        with self._lock:
            self._saves[search] = self._saves.get(search, 0) + 1
            due = [entry for entry in self._waiting if entry[1] == search and self._saves[search] >= entry[2] + 2]
            self._waiting = [entry for entry in self._waiting if entry not in due]
        for checkpoint, _, _ in due:
            _delete_dir(checkpoint)

    def forget(self, search: str) -> None:
        with self._lock:
            self._waiting = [entry for entry in self._waiting if entry[1] != search]


def _delete_dir(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        fs.LocalFileSystem().delete_dir(path)


_DEFERRED = _DeferredCheckpointDeletes()


def keep_final_checkpoints(search: str, final: list[str]) -> None:
    """Once a search has ended with its final state saved: each trial of the local folder `search`
    keeps only the checkpoint that state names (`final`). The others waited for saves that will not
    come, or were left waiting by a driver that was killed."""
    if is_uri(search):
        return
    _DEFERRED.forget(Path(search).as_posix())
    for checkpoint in map(Path, final):
        for other in checkpoint.parent.glob(f"{CHECKPOINT_PREFIX}*"):
            if other != checkpoint and other.is_dir():
                _delete_dir(other.as_posix())


class SearchFolderHandler(fs.FileSystemHandler):
    """pyarrow's local filesystem, with whole-file writes and deferred checkpoint deletes."""

    def __init__(self) -> None:
        self.local = fs.LocalFileSystem()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SearchFolderHandler)

    def __reduce__(self):  # Ray ships the filesystem to its workers
        return SearchFolderHandler, ()

    def get_type_name(self) -> str:
        return "sharetune-search-folder"

    def normalize_path(self, path: str) -> str:
        return self.local.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[fs.FileInfo]:
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector: fs.FileSelector) -> list[fs.FileInfo]:
        return self.local.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self.local.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        directory = Path(path)
        search = directory.parent.parent  # <search>/<trial>/checkpoint_k
        if directory.name.startswith(CHECKPOINT_PREFIX) and any(search.glob(f"{STATE_PREFIX}*{STATE_SUFFIX}")):
            _DEFERRED.defer(path, search.as_posix())
        else:
            self.local.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("refusing to delete the root folder's contents")

    def delete_file(self, path: str) -> None:
        self.local.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.local.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        with self.local.open_input_stream(src) as source, self.open_output_stream(dest, None) as target:
            while chunk := source.read(1 << 20):
                target.write(chunk)

    def open_input_stream(self, path: str):
        return self.local.open_input_stream(path)

    def open_input_file(self, path: str):
        return self.local.open_input_file(path)

    def open_output_stream(self, path: str, metadata) -> PythonFile:
        return PythonFile(_WholeFile(path, _committed), mode="w")

    def open_append_stream(self, path: str, metadata):
        return self.local.open_append_stream(path)


def _committed(path: str) -> None:
    if is_tune_state(path):
        _DEFERRED.state_saved(Path(path).parent.as_posix())


def filesystem_and_path(location: str) -> tuple[fs.FileSystem, str]:
    """The filesystem to write `location` (an absolute path or a URI) through, and its path there."""
    filesystem, path = fs.FileSystem.from_uri(location)
    if isinstance(filesystem, fs.LocalFileSystem):  # a path, or a file:// URI
        return fs.PyFileSystem(SearchFolderHandler()), path
    return filesystem, path


def tune_storage(location: str) -> dict:
    """`storage_path` and `storage_filesystem` for Ray Tune's and Ray Train's run configurations."""
    filesystem, path = filesystem_and_path(location)
    return {"storage_path": path, "storage_filesystem": filesystem}
