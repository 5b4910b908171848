"""The search folder: a local path, a shared filesystem, or an object store URI (s3://, gs://).

Tune writes its state there through pyarrow's filesystems; so do we (the spec, where the MLflow
runs live, fusion's pretrained weights), so one folder holds everything `resume` and `report` need.
`SearchFolder` is that folder's one spelling: canonical once, then passed as is to Tune, MLflow
(the tag that finds a search's runs) and the report.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from pyarrow import fs

from sharetune.errors import first_line
from sharetune.metrics import METRICS, STEP
from sharetune.spaces import SearchSpec, SpecError, parse_spec
from sharetune.spaces.documents import load_yaml
from sharetune.storage_filesystem import CHECKPOINT_PREFIX, filesystem_and_path, is_tune_state, is_uri

SPEC_FILE = "sharetune-spec.yaml"
MLFLOW_FILE = "sharetune-mlflow.json"  # where this search's runs live
LISTING_FILE = "sharetune-data-listing.txt"  # the data's listing where the search started (Batches.listing)
SKIPPED_FILE = "sharetune-skipped.jsonl"  # proposals answered without training, each of a kind:
INFEASIBLE_KIND, DUPLICATE_KIND = "infeasible", "duplicate"  # outside the constraints; a configuration proposed before
FINISHED, FAILED = "TERMINATED", "ERROR"  # Tune's statuses of a trial that ended
TUNER_FILE = "tuner.pkl"  # Tune's own record of the run, which Tuner.restore reads
MIN_FREE_BYTES = 100 * 2**20  # refused below this: Tune's state, result logs and checkpoints of small nets


class StateError(RuntimeError):
    """A search folder that cannot be resumed or written; the message is one line."""


class StorageFull(StateError):
    """The disk holding the search folder filled up mid-search."""


def full_disk_cause(err: BaseException | None) -> OSError | None:
    """The full-disk error (ENOSPC) that is this error or caused it, if any."""
    while err is not None:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return err
        err = err.__cause__ or err.__context__
    return None


def vanished_staging_file(err: BaseException | None) -> bool:
    """Whether `err` is Tune's upload missing a temporary file of its staging folder. Tune saves its
    searcher's state there (to a hidden temporary file, renamed over the state file) while its last
    upload may still be copying the folder, so the upload can list a temporary file that is gone by
    the time it opens it; the next upload carries the state."""
    while err is not None:
        if isinstance(err, FileNotFoundError) and STAGING_TEMPORARY.search(str(err)):
            return True
        err = err.__cause__ or err.__context__
    return False


class StateSaveLog(logging.Filter):
    """Tune logs a failed save of its state with the whole traceback. On a full disk the search stops
    with its own line about it, so the record keeps its message and the error's one line; a save that
    missed a temporary staging file is not a failure anyone can act on, so it is not logged. Tune tries
    again every few seconds: a failure logged once is not logged again (a search folder made read-only
    mid-run printed some 3,400 lines of the same traceback)."""

    full_disk = False  # whether a save failed on a full disk

    def __init__(self) -> None:
        super().__init__()
        self.logged: set[str] = set()  # the failures logged so far, as their error's type and line

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and vanished_staging_file(record.exc_info[1]):
            return False
        failure = _error_line(record.exc_info[1]) if record.exc_info else record.getMessage()
        if failure in self.logged:
            return False
        self.logged.add(failure)
        full = full_disk_cause(record.exc_info[1]) if record.exc_info else None
        if full is not None:
            self.full_disk = True
            record.msg = f"{record.getMessage()}{full}"
            record.args, record.exc_info, record.exc_text = None, None, None
        return True


def _error_line(err: BaseException) -> str:
    """The innermost error behind `err` (Tune wraps the filesystem's), as its type and first line."""
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {first_line(err)}"


TUNE_STATE_LOGGER = "ray.tune.execution.experiment_state"
STAGING_TEMPORARY = re.compile(r"/\.[0-9a-f-]{36}-tmp-")  # Tune's searcher saves its state to /.<uuid>-tmp-<name>


@contextlib.contextmanager
def stop_on_full_disk(folder: str):
    """Turn a full disk under the running search into StorageFull: what Tune saved last stays, and
    `resume` continues from it once there is room. Tune only logs a failed save of its state: a search
    whose last trials end while the disk is full ends as if nothing happened, its saved state stale
    (trials still running), and is StorageFull too."""
    one_line = StateSaveLog()
    logging.getLogger(TUNE_STATE_LOGGER).addFilter(one_line)
    full = StorageFull(f"{folder}: no space left on its disk mid-search; free some space, then "
                       f"`sharetune resume {folder}` continues from Tune's last saved state")
    try:
        yield
    except Exception as err:
        if full_disk_cause(err) is None:
            raise
        raise full from None
    finally:
        logging.getLogger(TUNE_STATE_LOGGER).removeFilter(one_line)
    if one_line.full_disk and not SearchFolder(folder).state_ended():
        raise full


def canonical(location: str | Path) -> str:
    """One spelling per location (absolute path or URI). A URI's options (`?endpoint_override=...`)
    are refused: the search's folder name goes after the path, and the folder is spelled in MLflow's tags."""
    location = str(location)
    if not is_uri(location):
        return str(Path(location).expanduser().resolve())
    if "?" in location:
        raise SpecError(f"{location}: options in a URI (after '?') are not supported; set them in the environment "
                        "instead, e.g. AWS_ENDPOINT_URL=http://host:9000 for an S3-compatible store")
    return location.rstrip("/")


def unwritable_filesystem(path: Path) -> bool:
    """Whether `path` is on a filesystem mounted read-only, or one that holds no files (/proc, /sys):
    there even root's `os.access` says writable."""
    disk = os.statvfs(path)
    return bool(disk.f_flag & os.ST_RDONLY) or not disk.f_blocks


def check_free_space(storage: str) -> None:
    """Refuse a local storage with less than MIN_FREE_BYTES free before anything is written; a full
    disk mid-search loses checkpoints. An object store's space is its own business."""
    if is_uri(storage):
        return
    path = Path(canonical(storage))
    while not path.exists():
        path = path.parent
    if unwritable_filesystem(path):  # checked with --storage; again for the folder `resume` starts
        raise StateError(f"{storage}: {path} is on a read-only or virtual filesystem, which cannot hold a search; "
                         "pass --storage elsewhere")
    free = shutil.disk_usage(path).free
    if free < MIN_FREE_BYTES:
        raise StateError(f"{storage}: {free / 2**20:.0f} MB free, but a search needs at least {MIN_FREE_BYTES / 2**20:.0f} MB; "
                         "free some space or pass --storage elsewhere")


def _numbers_checked(result: dict) -> dict:
    """A saved result whose epoch is a whole number and whose metrics are numbers (or null), else
    TypeError: an edited state's `"epoch": "x"` broke `sharetune list` of the whole storage."""
    epoch, metrics = result.get(STEP, 0), [result.get(name) for name in METRICS]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or any(
            isinstance(value, (bool, str, list, dict)) for value in metrics):  # JSON's other kinds
        raise TypeError(f"{STEP} or a metric is not a number")
    return result


@dataclass(frozen=True)
class SavedTrial:
    """A trial as Tune's saved state records it, read from the state's plain JSON fields alone: its
    other fields are pickles, which run whatever code they name, and a search folder may come from
    anyone (a shared storage, a copy). Only `resume` hands the state to Tune, which unpickles it."""

    trial_id: str
    status: str
    config: dict
    last_result: dict


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
        return filesystem_and_path(str(self))

    def write(self, filename: str, data: bytes) -> None:
        """Whole: a crash or a full disk mid-write leaves the old file (or none), never half of one.
        `filename` may sit in a subfolder."""
        filesystem, path = self._filesystem()
        filesystem.create_dir(f"{path}/{filename}".rpartition("/")[0], recursive=True)
        with filesystem.open_output_stream(f"{path}/{filename}") as stream:
            stream.write(data)

    def read(self, filename: str, most_bytes: int | None = None) -> bytes | None:
        """The file's bytes, up to `most_bytes` (None: all); None where there is no such file."""
        filesystem, path = self._filesystem()
        if filesystem.get_file_info(f"{path}/{filename}").type != fs.FileType.File:
            return None
        with filesystem.open_input_stream(f"{path}/{filename}") as stream:
            return stream.read(most_bytes)

    def remove(self, filename: str) -> None:
        filesystem, path = self._filesystem()
        with contextlib.suppress(FileNotFoundError):
            filesystem.delete_file(f"{path}/{filename}")

    def is_search(self) -> bool:
        """Whether a search was started here (its spec is written before its trials start)."""
        try:
            return self.read(SPEC_FILE) is not None
        except (OSError, ValueError):
            if is_uri(self):  # an object store that did not answer: the caller's one line says so
                raise
            return False

    def check_search(self) -> None:
        """FileNotFoundError, in one line, where no search was started here."""
        self._required(SPEC_FILE)

    def _required(self, filename: str) -> bytes:
        data = self.read(filename)
        if data is None and not is_uri(self) and not Path(self).exists():
            raise FileNotFoundError(f"{self}: no such folder")
        if data is None:
            raise FileNotFoundError(f"{self}: not a sharetune search folder (no {filename})")
        return data

    def save_spec(self, spec: SearchSpec) -> None:
        self.write(SPEC_FILE, spec.to_yaml().encode())

    def spec(self) -> SearchSpec:
        """The search's spec; SpecError (one line, naming the file) where the file is damaged."""
        data = self._required(SPEC_FILE)
        try:
            return parse_spec(load_yaml(data, SPEC_FILE, most_bytes=None), saved=True)
        except SpecError as err:
            raise SpecError(f"{self}: damaged spec: {err}") from None

    def save_data_listing(self, listing: str | None) -> None:
        if listing is not None:
            self.write(LISTING_FILE, listing.encode())

    def data_listing(self) -> str | None:
        """The data's listing where the search started; None for data in memory, and where an earlier version
        started it. StateError, naming the file, where it is damaged."""
        data = self.read(LISTING_FILE)
        try:
            return data.decode("ascii") if data is not None else None
        except UnicodeDecodeError:
            raise StateError(f"{self}: {LISTING_FILE} is damaged; it records the data the search started with") from None

    def save_mlflow(self, tracking_uri: str, experiment: str) -> None:
        """Where the search's runs live, and what they are tagged with: the folder (where it starts), and
        an id of this search, which a later search in a folder of the same name does not share."""
        record = {"tracking_uri": tracking_uri, "experiment": experiment, "search_path": str(self),
                  "search_id": uuid.uuid4().hex}
        self.write(MLFLOW_FILE, json.dumps(record).encode())

    def _mlflow_record(self, required: bool = True) -> dict:
        """sharetune-mlflow.json ({} where it is missing and not `required`: FileNotFoundError); StateError,
        naming the file, where it is damaged."""
        data = self._required(MLFLOW_FILE) if required else self.read(MLFLOW_FILE)
        if data is None:
            return {}
        try:
            record = json.loads(data)
            if not isinstance(record.get("tracking_uri"), str) or not isinstance(record.get("experiment"), str):
                raise ValueError("no tracking_uri or experiment")
        except (ValueError, AttributeError) as err:  # cut short, or not the record
            raise StateError(f"{self}: {MLFLOW_FILE} is damaged ({first_line(err)}); it records where the "
                             "search's MLflow runs are") from None
        return record

    def search_id(self) -> str | None:
        """The id its MLflow runs are tagged with; None for a folder an earlier version wrote (or none)."""
        return self._mlflow_record(required=False).get("search_id")

    def check_in_place(self) -> None:
        """A search resumes only in the folder it started in: Tune's state makes the trials it adds
        there (in Ray 2.60 it keeps the storage path it started with), and the MLflow runs are tagged
        with that path. StateError for a moved or copied folder; one an earlier version wrote, which
        recorded no path, passes."""
        started = self._mlflow_record().get("search_path", self)
        if started != self:
            raise StateError(f"{self}: the search started in {started} and was moved or copied here; Tune's "
                             "state and its MLflow runs name that folder, so resume it there")

    def mlflow(self) -> tuple[str, str]:
        """(tracking URI, experiment name) of the search's MLflow runs."""
        record = self._mlflow_record()
        return record["tracking_uri"], record["experiment"]

    def tune_trials(self) -> list:
        """Tune's trials of the search, as its newest saved state records them; none where Tune has written
        no state (yet). Reading them needs no running Ray, and unpickles nothing (SavedTrial)."""
        states = self._tune_states()
        if not states:
            return []
        filesystem, _ = self._filesystem()
        with filesystem.open_input_stream(states[-1]) as stream:
            text = stream.read()
        try:
            saved = []
            for trial, run in json.loads(text)["trial_data"]:
                trial, run = json.loads(trial), json.loads(run)
                saved.append(SavedTrial(str(trial["trial_id"]), str(trial["status"]), dict(trial["config"]),
                                        _numbers_checked(dict(run["last_result"] or {}))))
            return saved
        except (ValueError, KeyError, TypeError):  # cut short or overwritten: not JSON, or not Tune's
            raise self._damaged(states[-1]) from None

    def _tune_states(self) -> list[str]:
        """The paths of Tune's saved states (experiment_state-*.json), oldest first."""
        filesystem, path = self._filesystem()
        try:
            return sorted(info.path for info in filesystem.get_file_info(fs.FileSelector(path))
                          if is_tune_state(info.path))
        except OSError:  # no folder there
            return []

    def state_ended(self) -> bool:
        """Whether Tune's newest saved state (a whole one) records every trial ended."""
        try:
            return all(trial.status in (FINISHED, FAILED) for trial in self.tune_trials())
        except StateError:  # cut short
            return False

    def tune_started(self) -> bool:
        """Whether Tune started here: it writes its tuner record first, then its states."""
        return self.read(TUNER_FILE) is not None or bool(self._tune_states())

    def tune_trial_ids(self) -> list[str]:
        """The trials Tune's newest saved state records. A folder whose state is missing, unreadable or
        records no trial raises StateError, so `resume` never starts a new search over it."""
        filesystem, path = self._filesystem()
        states = self._tune_states()
        if not states or self.read(TUNER_FILE) is None:
            raise StateError(f"{self}: no Tune state to resume (no {TUNER_FILE} or experiment_state-*.json); "
                             "the search never started its trials here, so run `sharetune search` again")
        recorded = [trial.trial_id for trial in self.tune_trials()]
        if not recorded:  # Ray 2.60's restore fails on a state with no trial (an IndexError, inside Tune)
            raise StateError(f"{self}: Tune's state records no trial, so there is nothing to continue; "
                             "run `sharetune search` again")
        self._check_searcher_state(filesystem, path)
        return recorded

    def forget_pending_decisions(self) -> None:
        """Drop the decisions Tune's last driver held for its trials' actors until a save resolved (stop,
        pause). Ray 2.60 keeps them in its saved state and, after a restore, applies them when the
        restarted trial's first checkpoint is saved: a failed trial that `resume` retried was stopped
        after one epoch and counted as cut short, exit 0. Those actors are gone; a scheduler decides again."""
        newest = self._tune_states()[-1]
        filesystem, _ = self._filesystem()
        try:
            with filesystem.open_input_stream(newest) as stream:
                saved = json.loads(stream.read())
            runner = saved.get("runner_data")
            if isinstance(runner, dict) and (runner.get("_cached_trial_decisions") or runner.get("_queued_trial_decisions")):
                runner.update(_cached_trial_decisions={}, _queued_trial_decisions={})
                with filesystem.open_output_stream(newest) as stream:  # whole: the old file stays until it is written
                    stream.write(json.dumps(saved).encode())
        except OSError as err:  # (tune_trial_ids read this file as JSON already)
            raise StateError(f"{self}: Tune's state {newest.rpartition('/')[2]} cannot be updated ({first_line(err)})") from None

    def _damaged(self, path: str) -> StateError:
        return StateError(f"{self}: Tune's state {path.rpartition('/')[2]} is damaged and cannot be restored; "
                          "the folder is left as it is")

    def _check_searcher_state(self, filesystem: fs.FileSystem, path: str) -> None:
        """The searcher's saved state, cut short (a full disk mid-write), fails Tune's restore deep inside
        its loop: check it whole first, without unpickling it. Both files are pickles (whatever the
        name says), and a whole pickle ends with its STOP opcode."""
        for info in filesystem.get_file_info(fs.FileSelector(path)):
            if not info.base_name.startswith(("search_gen_state-", "searcher-state-")):
                continue
            with filesystem.open_input_stream(info.path) as stream:
                data = stream.read()
            if not data.endswith(pickle.STOP):
                raise self._damaged(info.path)

    @staticmethod
    def trial_dirname(trial_id: str) -> str:
        """A trial's folder inside the search's (Tune's default repeats the whole config in the name)."""
        return f"trial_{trial_id}"

    def last_checkpoint(self, trial_id: str) -> str | None:
        """The path of the trial's newest checkpoint (the one Tune keeps), None where it saved none."""
        filesystem, path = self._filesystem()
        try:
            found = filesystem.get_file_info(fs.FileSelector(f"{path}/{self.trial_dirname(trial_id)}"))
        except OSError:  # no trial folder
            return None
        names = [info.base_name for info in found if info.type == fs.FileType.Directory
                 and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", info.base_name)]
        return f"{self}/{self.trial_dirname(trial_id)}/{max(names)}" if names else None

    def trial_results(self, trial_id: str) -> list[dict]:
        """Every result a trial reported (Tune's result.json), oldest first."""
        data = self.read(f"{self.trial_dirname(trial_id)}/result.json")
        return [json.loads(line) for line in data.decode().splitlines() if line] if data else []

    def save_skipped(self, entries: list[dict]) -> None:
        self.write(SKIPPED_FILE, "".join(json.dumps(entry) + "\n" for entry in entries).encode())

    def skipped(self) -> list[dict]:
        """The proposals the searcher answered without training, oldest first; StateError, naming the
        file, where it is damaged."""
        data = self.read(SKIPPED_FILE)
        try:
            entries = [json.loads(line) for line in data.decode().splitlines() if line] if data else []
            if not all(isinstance(entry, dict) and {"kind", "config"} <= entry.keys() for entry in entries):
                raise ValueError("an entry without its kind or config")
        except ValueError as err:  # not JSON, not UTF-8, or not the searcher's
            raise StateError(f"{self}: {SKIPPED_FILE} is damaged ({first_line(err)})") from None
        return entries
