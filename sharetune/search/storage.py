"""The search folder: a local path, a shared filesystem, or an object store URI (s3://, gs://).

Tune writes its state there through pyarrow's filesystems; so do we (the spec, where the MLflow
runs live, fusion's pretrained weights), so one folder holds everything `resume` and `report` need.
"""

from __future__ import annotations

from pathlib import Path

from pyarrow import fs


def is_uri(location: str) -> bool:
    return "://" in location


def canonical(folder: str | Path) -> str:
    """One spelling per folder (absolute path or URI): the MLflow tag that finds a search's runs."""
    folder = str(folder)
    return folder.rstrip("/") if is_uri(folder) else str(Path(folder).expanduser().resolve())


def join(storage: str, name: str) -> str:
    return f"{canonical(storage)}/{name}"


def _filesystem(folder: str) -> tuple[fs.FileSystem, str]:
    return fs.FileSystem.from_uri(canonical(folder))


def write(folder: str, filename: str, data: bytes) -> None:
    filesystem, path = _filesystem(folder)
    filesystem.create_dir(path, recursive=True)
    with filesystem.open_output_stream(f"{path}/{filename}") as stream:
        stream.write(data)


def read(folder: str, filename: str) -> bytes | None:
    filesystem, path = _filesystem(folder)
    if filesystem.get_file_info(f"{path}/{filename}").type != fs.FileType.File:
        return None
    with filesystem.open_input_stream(f"{path}/{filename}") as stream:
        return stream.read()


def is_search_folder(location: str, marker: str) -> bool:
    try:
        return read(location, marker) is not None
    except (OSError, ValueError):
        return False
