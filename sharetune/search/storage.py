"""The search folder: a local path, a shared filesystem, or an object store URI (s3://, gs://).

Tune writes its state there through pyarrow's filesystems; so do we (the spec, where the MLflow
runs live, fusion's pretrained weights), so one folder holds everything `resume` and `report` need.
`SearchFolder` is that folder's one spelling: canonical once, then passed as is to Tune, MLflow
(the tag that finds a search's runs) and the report.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from pyarrow import fs

from sharetune.spaces import SearchSpec, parse_spec

SPEC_FILE = "sharetune-spec.yaml"
MLFLOW_FILE = "sharetune-mlflow.json"  # where this search's runs live
SKIPPED_FILE = "sharetune-skipped.jsonl"  # proposals answered without training (infeasible, duplicates)
DEFAULT_STORAGE = "results"


def is_uri(location: str) -> bool:
    return "://" in location


def canonical(location: str | Path) -> str:
    """One spelling per location (absolute path or URI)."""
    location = str(location)
    return location.rstrip("/") if is_uri(location) else str(Path(location).expanduser().resolve())


class SearchFolder(str):
    """A search's folder, canonical: `SearchFolder("results/x")` is the absolute path, and so is
    `SearchFolder` of it again."""

    def __new__(cls, location: str | Path) -> "SearchFolder":
        return location if isinstance(location, SearchFolder) else super().__new__(cls, canonical(location))

    @classmethod
    def at(cls, storage: str | Path, name: str) -> "SearchFolder":
        """The folder `name` inside `storage` (a path or URI)."""
        return cls(f"{canonical(storage)}/{name}")

    @property
    def name(self) -> str:
        return self.rpartition("/")[2]

    @property
    def storage(self) -> str:
        """The location that holds it (Tune's `storage_path`)."""
        return self.rpartition("/")[0]

    def _filesystem(self) -> tuple[fs.FileSystem, str]:
        return fs.FileSystem.from_uri(str(self))

    def write(self, filename: str, data: bytes) -> None:
        filesystem, path = self._filesystem()
        filesystem.create_dir(path, recursive=True)
        with filesystem.open_output_stream(f"{path}/{filename}") as stream:
            stream.write(data)

    def read(self, filename: str) -> bytes | None:
        filesystem, path = self._filesystem()
        if filesystem.get_file_info(f"{path}/{filename}").type != fs.FileType.File:
            return None
        with filesystem.open_input_stream(f"{path}/{filename}") as stream:
            return stream.read()

    def is_search(self) -> bool:
        """Whether a search was started here (its spec is written before Ray starts)."""
        try:
            return self.read(SPEC_FILE) is not None
        except (OSError, ValueError):
            return False

    def _required(self, filename: str) -> bytes:
        data = self.read(filename)
        if data is None:
            raise FileNotFoundError(f"{self}: not a sharetune search folder (no {filename})")
        return data

    def save_spec(self, spec: SearchSpec) -> None:
        self.write(SPEC_FILE, spec.to_yaml().encode())

    def spec(self) -> SearchSpec:
        return parse_spec(yaml.safe_load(self._required(SPEC_FILE)))

    def save_mlflow(self, tracking_uri: str, experiment: str) -> None:
        self.write(MLFLOW_FILE, json.dumps({"tracking_uri": tracking_uri, "experiment": experiment}).encode())

    def mlflow(self) -> tuple[str, str]:
        """(tracking URI, experiment name) of the search's MLflow runs."""
        location = json.loads(self._required(MLFLOW_FILE))
        return location["tracking_uri"], location["experiment"]

    @staticmethod
    def trial_dirname(trial_id: str) -> str:
        """A trial's folder inside the search's (Tune's default repeats the whole config in the name)."""
        return f"trial_{trial_id}"

    def trial_results(self, trial_id: str) -> list[dict]:
        """Every result a trial reported (Tune's result.json), oldest first."""
        data = self.read(f"{self.trial_dirname(trial_id)}/result.json")
        return [json.loads(line) for line in data.decode().splitlines() if line] if data else []

    def save_skipped(self, entries: list[dict]) -> None:
        self.write(SKIPPED_FILE, "".join(json.dumps(entry) + "\n" for entry in entries).encode())

    def skipped(self) -> list[dict]:
        """The proposals the searcher answered without training, oldest first."""
        data = self.read(SKIPPED_FILE)
        return [json.loads(line) for line in data.decode().splitlines() if line] if data else []
