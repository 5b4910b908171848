"""A durable, ordered queue of a search's MLflow writes, delivered by one background thread.

Tune's loop only appends an operation to a SQLite file (well under a millisecond, no network); the
writer delivers the operations in order and, while the tracking server does not answer, waits and
tries again for as long as it takes. An outage of any length delays MLflow and loses nothing, and
what a stopped driver left undelivered is delivered by `sharetune resume`.

The queue lives in the search folder (`sharetune-mlflow-queue.db`); a search folder on an object
store keeps its queue on the driver's disk instead (~/.cache/sharetune/mlflow-queue), since a
database cannot live in a bucket. Operations name runs by key ("parent", "trial:<id>",
"configuration:<n>"), never by MLflow's run id, so they can be written before any run exists; the
writer finds or creates the runs by their tags, so delivering an operation twice (a driver killed
between delivering and forgetting it) is harmless: metrics at a step the run already holds are
dropped, and runs are found before they are created.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import sys
import threading
import time
from pathlib import Path

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

from sharetune.cache import cache_dir
from sharetune.errors import ExitCode, first_line, without_passwords
from sharetune.search.destinations import SERVER_DATABASES
from sharetune.search.storage import SearchFolder, StateError, is_uri

QUEUE_FILE = "sharetune-mlflow-queue.db"
SPOOL = "mlflow-queue"  # under the cache folder: the queues of search folders on object stores
SEARCH_TAG = "sharetune.search_path"  # the search folder, as SearchFolder spells it
SEARCH_ID_TAG = "sharetune.search_id"  # which search in that folder: one deleted and started afresh is another
TRIAL_TAG = "sharetune.trial_id"
CONFIGURATION_TAG = "sharetune.configuration"  # a proposal answered without training: its Optuna trial number
MOST_RUNS = 10_000  # runs one query lists: a search's children, an experiment's searches
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
PROGRESS_STEP = "unique_params"  # every report carries it (the costs' at step 0 too): a run's last logged step
RETRY_MAX_S = 30.0  # the longest wait between two tries while the server does not answer
CONNECT_TIMEOUT_S = 10  # a server database's connection: one that accepts and never answers held the writer for good
# SQLAlchemy's name of a driver -> the arguments that bound its first connection (PyMySQL's connect_timeout
# ends once the socket connects; its read_timeout bounds the wait for the server's greeting)
CONNECT_TIMEOUTS = {"psycopg": ("connect_timeout",), "psycopg2": ("connect_timeout",), "mysqldb": ("connect_timeout",),
                    "pymysql": ("connect_timeout", "read_timeout"), "pg8000": ("timeout",)}
PERMANENT = {"BAD_REQUEST", "INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"}  # refusals no retry changes
DEFAULT_ARTIFACTS = "mlartifacts"

log = logging.getLogger(__name__)
# The writer retries for as long as a server is down; MLflow's client retrying each request for minutes
# on its own would only hide a server that is back. Set these to override.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
# A tracking server behind MLflow's basic-auth app: its password from a file (a Docker or Kubernetes
# secret), so it is on no command line and in no spec
PASSWORD_FILE = os.environ.get("MLFLOW_TRACKING_PASSWORD_FILE")
if PASSWORD_FILE and "MLFLOW_TRACKING_PASSWORD" not in os.environ:
    try:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = Path(PASSWORD_FILE).read_text().strip()
    except OSError as err:  # read as the module loads, so no command can answer later: one line here
        print(f"error: MLFLOW_TRACKING_PASSWORD_FILE: {PASSWORD_FILE}: {err.strerror}; give the file that holds the "
              "tracking server's password", file=sys.stderr)
        raise SystemExit(ExitCode.BAD_INPUT) from None


def queue_path(folder: SearchFolder) -> Path:
    if is_uri(folder):
        return cache_dir() / SPOOL / f"{folder.name}-{hashlib.sha256(folder.encode()).hexdigest()[:12]}.db"
    return Path(folder) / QUEUE_FILE


def check_queue(folder: SearchFolder) -> None:
    """StateError where the folder's queue file is there but is no SQLite database, or a damaged one:
    SQLite's own check, read-only, which reads the file with its WAL (a driver stopped by a full disk
    leaves its last writes there) and changes neither; the files it makes beside them to read them go
    again, so a folder `resume` refuses is left as it was."""
    path = queue_path(folder)
    if not path.is_file():
        return
    made = [file for file in (Path(f"{path}-wal"), Path(f"{path}-shm")) if not file.exists()]  # SQLite's, to read it
    try:
        with contextlib.closing(sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=30)) as db:
            (found,) = db.execute("PRAGMA quick_check(1)").fetchone()  # "ok", or the first problem
    except sqlite3.OperationalError as err:  # locked, unreadable: whole or not, it cannot be read now
        raise StateError(f"{path}: the queue of MLflow writes cannot be read ({err})") from None
    except sqlite3.DatabaseError as err:  # not a database, or too damaged to check
        found = str(err)
    finally:
        for file in made:
            file.unlink(missing_ok=True)
    if found != "ok":
        why = " ".join(found.replace("*** in database main ***", "").split())  # SQLite's report spans lines
        raise StateError(f"{path}: the queue of MLflow writes is damaged ({why}); move it away to go on without "
                         "the writes it held")


def malformed(err: Exception) -> bool:
    """Whether delivering an operation failed on the operation itself (one another version queued), so
    that every try fails alike. A server that does not answer raises OSErrors (requests' errors are,
    some of them ValueErrors too) or MlflowExceptions."""
    return isinstance(err, (TypeError, KeyError, AttributeError, ValueError)) and not isinstance(err, OSError)


def tag_filter(tag: str, value: str) -> str:
    """MLflow's search filter for runs whose `tag` is `value`. Its syntax has no escapes: a value that
    holds a single quote (a search folder under /home/o'brien) goes in double quotes."""
    quote = '"' if "'" in value else "'"
    return f"tags.`{tag}` = {quote}{value}{quote}"


def runs_filters(trial_ids: list[str]) -> list[str]:
    """For each trial, the MLflow search filter that finds its run (MLflow's search has no IN on tags)."""
    return [tag_filter(TRIAL_TAG, trial) for trial in trial_ids]


def child_runs(client: MlflowClient, experiment_id: str, parent_id: str) -> list:
    return client.search_runs([experiment_id], tag_filter(MLFLOW_PARENT_RUN_ID, parent_id), max_results=MOST_RUNS)


def search_tags(folder: SearchFolder) -> dict[str, str]:
    """The tags that tell the parent run of the search in `folder` from any other's."""
    search_id = folder.search_id()
    return {SEARCH_TAG: str(folder), **({SEARCH_ID_TAG: search_id} if search_id else {})}


def search_parent(client: MlflowClient, experiment_id: str, folder: SearchFolder):
    """The parent run of the search in `folder`; None where MLflow has none."""
    filters = " and ".join(tag_filter(tag, value) for tag, value in search_tags(folder).items())
    runs = client.search_runs([experiment_id], filters, max_results=1)
    return runs[0] if runs else None


def batched(items: list, size: int = MAX_PARAMS_TAGS_PER_BATCH):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def params_of(values: dict) -> list[Param]:
    return [Param(k, str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in sorted(values.items())]


class MlflowQueue:
    """`put` appends an operation (any thread); `start` runs the writer; `drain` waits for it. One
    per search folder in a process (`of`), so one writer delivers its operations."""

    _open: dict[str, "MlflowQueue"] = {}

    @classmethod
    def of(cls, folder: SearchFolder, uri: str, experiment: str) -> "MlflowQueue":
        if folder not in cls._open:
            cls._open[folder] = cls(folder, uri, experiment)
        return cls._open[folder]

    def __init__(self, folder: SearchFolder, uri: str, experiment: str) -> None:
        self.folder, self.uri, self.experiment = folder, uri, experiment
        self.path = queue_path(folder)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()  # one SQLite connection per thread
        with self._connection() as db:
            db.execute("CREATE TABLE IF NOT EXISTS operations (id INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT NOT NULL)")
        self._held: list[str] = []  # writes the disk had no room for, oldest first; the writer delivers them too
        self._held_lock = threading.Lock()  # the writer takes from `_held` while Tune's thread adds to it
        self._delivered = 0  # the last operation delivered (ids grow; the file may still hold it on a full disk)
        self._full = False
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self.outage_since: float | None = None  # when the server stopped answering, while it does not

    def _connection(self) -> sqlite3.Connection:
        if getattr(self._local, "db", None) is None:
            # WAL: the writer reads while the driver appends; NORMAL sync survives a killed process
            self._local.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self._local.db.execute("PRAGMA journal_mode=WAL")
            self._local.db.execute("PRAGMA synchronous=NORMAL")
        return self._local.db

    def put(self, op: str, **fields) -> None:
        """Queue one write. On a full disk it waits in memory, in order, until the folder has room; the
        writer delivers it from there meanwhile, after every write the file holds."""
        with self._held_lock:
            self._held.append(json.dumps({"op": op, **fields}))
        self._store_held()
        self._wake.set()

    def _store_held(self) -> None:
        db = self._connection()
        with self._held_lock:
            try:
                db.execute("BEGIN")  # one transaction: all held writes, or none
                try:
                    db.executemany("INSERT INTO operations (body) VALUES (?)", [(body,) for body in self._held])
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:  # SQLite rolls back itself on a full disk
                        db.execute("ROLLBACK")
                    raise
            except (sqlite3.OperationalError, OSError) as err:
                if not self._full:
                    log.warning("cannot write the MLflow queue %s (%s); %d writes wait in memory until it can",
                                self.path, err, len(self._held))
                self._full = True
                return
            self._held.clear()
            self._full = False

    def pending(self) -> int:
        """Writes not yet delivered, those held in memory included."""
        count = self._connection().execute("SELECT COUNT(*) FROM operations WHERE id > ?", (self._delivered,))
        return count.fetchone()[0] + len(self._held)

    def _oldest(self) -> tuple[int | None, str] | None:
        """The next write to deliver, with its id in the file: the file's first, then those held in
        memory (id None), which are newer than anything the file holds."""
        row = self._connection().execute("SELECT id, body FROM operations WHERE id > ? ORDER BY id LIMIT 1",
                                         (self._delivered,)).fetchone()
        if row:
            return row
        with self._held_lock:
            return (None, self._held[0]) if self._held else None

    def _forget(self, number: int | None, body: str) -> None:
        """Drop a delivered write. One held in memory may have reached the file meanwhile: then the
        file delivers it again, which is harmless (see the module's note)."""
        if number is None:
            with self._held_lock:
                if self._held and self._held[0] is body:
                    self._held.pop(0)
            return
        self._delivered = number
        with contextlib.suppress(sqlite3.OperationalError):  # a full disk: forgotten on a later try
            self._connection().execute("DELETE FROM operations WHERE id <= ?", (number,))

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._deliver_all, name="sharetune-mlflow", daemon=True)
            self._thread.start()

    def drain(self, timeout_s: float) -> int:
        """Wait up to `timeout_s` for the backlog to reach MLflow, stop the writer; returns what is left
        in the file for `resume` to deliver."""
        deadline = time.monotonic() + timeout_s
        if self._held:
            self._store_held()
        while self.pending() and time.monotonic() < deadline and self._thread is not None and self._thread.is_alive():
            time.sleep(0.05)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        lost = len(self._held)  # this process ends with them: resume cannot deliver them
        if lost:
            log.warning("%d MLflow writes are lost: neither MLflow nor the full disk under %s took them", lost, self.path)
        left = self.pending() - lost
        self._close()  # the file is free to move or unmount
        type(self)._open.pop(self.folder, None)  # a later search there (resumed, or anew) opens it afresh
        return left

    def _close(self) -> None:
        if getattr(self._local, "db", None) is not None:
            self._local.db.close()
            self._local.db = None

    def _deliver_all(self) -> None:
        try:
            self._deliver_until_stopped()
        finally:
            self._close()

    def _deliver_until_stopped(self) -> None:
        writer, wait = None, 1.0
        while not self._stop.is_set():
            oldest = self._oldest()
            if oldest is None:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            number, body = oldest
            operation = json.loads(body)
            try:
                writer = writer or Writer(self.uri, self.experiment, self.folder)  # a database store connects here
                writer.deliver(operation)
            except MlflowException as err:
                if err.error_code not in PERMANENT:
                    wait = self._unreachable(err, wait)
                    continue
                log.warning("MLflow refused a %s write, dropped: %s", operation["op"], first_line(err))
            except Exception as err:  # connection refused, timeouts, 5xx after the client's own retries
                if not malformed(err):
                    wait = self._unreachable(err, wait)
                    continue
                log.warning("a queued %s write cannot be delivered, dropped: %s: %s", operation["op"],
                            type(err).__name__, first_line(err))
            if self.outage_since is not None:
                log.warning("MLflow at %s answers again after %.0f s; delivering the backlog", without_passwords(self.uri),
                            time.monotonic() - self.outage_since)
                self.outage_since, wait = None, 1.0
            self._forget(number, body)

    def _unreachable(self, err: Exception, wait: float) -> float:
        if self.outage_since is None:
            self.outage_since = time.monotonic()
            log.warning("MLflow at %s does not answer (%s: %s); results wait in %s and are delivered when it does",
                        without_passwords(self.uri), type(err).__name__, first_line(err)[:200], self.path)
        self._stop.wait(wait)
        return min(wait * 2, RETRY_MAX_S)


def connect_once(uri: str) -> None:
    """Connect to a database server store once, which raises at once where it does not answer: MLflow's
    store retries its first connection ten times over 101 s before it raises, and the outage's warning
    came that late (a short search ended first, then exit 4 with no word of why). The drivers wait
    without end for a server that accepts and never answers (a wrong port) unless told how long, each
    by its own names (CONNECT_TIMEOUTS); a URL's own setting stays."""
    if uri.partition(":")[0].partition("+")[0] not in SERVER_DATABASES:
        return
    import sqlalchemy

    url = sqlalchemy.engine.make_url(uri)
    bounds = {name: CONNECT_TIMEOUT_S for name in CONNECT_TIMEOUTS.get(url.get_driver_name(), ()) if name not in url.query}
    engine = sqlalchemy.create_engine(url, connect_args=bounds)
    try:
        with engine.connect():
            pass
    finally:
        engine.dispose()


class Writer:
    """Delivers one operation at a time; knows the runs by key, finding them again by their tags."""

    def __init__(self, uri: str, experiment: str, folder: SearchFolder) -> None:
        connect_once(uri)
        self.client, self.experiment, self.folder = MlflowClient(uri), experiment, folder
        self.experiment_id: str | None = None
        self.runs: dict[str, str] = {}  # key -> run id
        self.last_step: dict[str, int] = {}  # key -> the last step its run holds

    def deliver(self, operation: dict) -> None:
        if self.experiment_id is None:
            self.experiment_id = experiment_id(self.client, self.experiment)
        getattr(self, f"_{operation['op']}")(**{name: value for name, value in operation.items() if name != "op"})

    def _children(self) -> list:
        return child_runs(self.client, self.experiment_id, self.run_id("parent"))

    def run_id(self, key: str) -> str | None:
        """The run of `key`, from MLflow where this writer has not met it yet (a resumed search)."""
        if key not in self.runs:
            if key == "parent":
                parent = search_parent(self.client, self.experiment_id, self.folder)
                found = [parent] if parent is not None else []
            else:
                tag, _, value = key.partition(":")
                name = {"trial": TRIAL_TAG, "configuration": CONFIGURATION_TAG}[tag]
                found = [run for run in self._children() if run.data.tags.get(name) == value]
            if not found:
                return None
            self.runs[key] = found[0].info.run_id
            history = self.client.get_metric_history(self.runs[key], PROGRESS_STEP)
            self.last_step[key] = max((m.step for m in history), default=-1)
        return self.runs[key]

    def _create(self, key: str, name: str, tags: dict, params: dict) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        self.runs[key], self.last_step[key] = run.info.run_id, -1
        for batch in batched(params_of(params)):
            self.client.log_batch(run.info.run_id, params=batch)
        return run.info.run_id

    def _open_parent(self, name: str, tags: dict, params: dict, spec_yaml: str) -> None:
        run_id = self.run_id("parent")
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            return
        run_id = self._create("parent", name, {**tags, **search_tags(self.folder)}, params)
        if spec_yaml:
            self.client.log_text(run_id, spec_yaml, "spec.yaml")

    def _open_trial(self, key: str, name: str, tags: dict, params: dict, dataset: dict | None) -> None:
        run_id = self.run_id(key)
        if run_id is not None:  # a resumed trial keeps logging into its run
            self.client.update_run(run_id, status="RUNNING")
            return
        run_id = self._create(key, name, {**tags, MLFLOW_PARENT_RUN_ID: self.run_id("parent")}, params)
        if dataset is not None:
            self.client.log_inputs(run_id, [DatasetInput(Dataset(**dataset), [InputTag(MLFLOW_DATASET_CONTEXT, "train")])])

    def _skipped(self, key: str, name: str, tags: dict, params: dict, costs: dict) -> None:
        """A finished run for a proposal answered without training, once."""
        if self.run_id(key) is not None:
            return
        run_id = self._create(key, name, {**tags, MLFLOW_PARENT_RUN_ID: self.run_id("parent")}, params)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), int(time.time() * 1000), 0) for k, v in costs.items()])
        self.client.set_terminated(run_id, status="FINISHED")

    def _metrics(self, key: str, step: int, timestamp: int, metrics: dict, tags: dict) -> None:
        """One epoch's metrics; a step the run holds already (an epoch trained again after a resume,
        or this operation delivered twice) is not logged twice."""
        run_id = self.run_id(key)
        if run_id is None or step <= self.last_step.get(key, -1):
            return
        self.client.log_batch(run_id, metrics=[Metric(k, v, timestamp, step) for k, v in metrics.items()],
                              tags=[RunTag(k, v) for k, v in tags.items()])
        self.last_step[key] = step

    def _end(self, key: str, status: str, tags: dict) -> None:
        run_id = self.run_id(key)
        if run_id is None:
            return
        for name, value in tags.items():
            self.client.set_tag(run_id, name, value)
        self.client.set_terminated(run_id, status=status)

    def _remove_orphans(self, recorded: list[str]) -> None:
        """Delete the runs of trials Tune's restored state never recorded (a driver killed between
        starting a trial and Tune's next snapshot); resumed, the search starts those trials afresh
        under new ids, so keeping the runs would count them twice."""
        for run in self._children():
            trial = run.data.tags.get(TRIAL_TAG)
            if trial is not None and trial not in recorded:
                self.client.delete_run(run.info.run_id)
                self.runs.pop(f"trial:{trial}", None)
                log.warning("removed the MLflow run of trial %s, which Tune's state never recorded", trial)


def experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment's id, created if need be, tagged as model training: without the tag MLflow 3's
    UI guesses a GenAI experiment and opens on traces instead of the runs."""
    found = client.get_experiment_by_name(name)
    if found is None:
        local = client.tracking_uri.startswith("sqlite:")  # a server chooses its own artifact store
        experiment = client.create_experiment(name, artifact_location=local_artifacts() if local else None)
    else:
        experiment = found.experiment_id
    if found is None or found.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING:
        client.set_experiment_tag(experiment, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return experiment


def local_artifacts() -> str:
    """Artifact root beside the embedded store: ./mlartifacts."""
    return Path(DEFAULT_ARTIFACTS).resolve().as_uri()
