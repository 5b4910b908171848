"""Where a search writes, checked before Ray starts: the search folder's storage and name, and the
MLflow tracking URI. A mistake here would otherwise surface after Ray has started, or not at all
(`--name ../x` writes outside the storage)."""

from __future__ import annotations

import os
from pathlib import Path

from sharetune.errors import without_passwords
from sharetune.search.storage import SPEC_FILE, canonical, is_uri, unwritable_filesystem
from sharetune.spaces import SpecError, check_database_url, safe_name
from sharetune.spaces.locations import sqlite_file

SERVER_DATABASES = ("postgresql", "mysql", "mssql")
DATABASE_SCHEMES = ("sqlite", *SERVER_DATABASES)  # MLflow's SQLAlchemy stores
STORAGE_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")  # what pyarrow's filesystems open


def check_storage(location: str) -> None:
    """A local storage must be a folder, or creatable in one, and writable; a URI (s3://...) must name
    a filesystem pyarrow has, and is opened when the search starts (opening it here would contact the store)."""
    where = location if is_uri(location) else str(Path(location).expanduser().absolute())
    if "'" in where and '"' in where:  # the folder is a quoted value in MLflow's run filters, which have no escapes
        raise SpecError(f"--storage: {where} holds both ' and \"; MLflow's run filters cannot quote it, so give a path without one of them")
    if not is_uri(location):
        check_folder("--storage", Path(location), "or a URI like s3://bucket/x")
        return
    try:
        canonical(location)
    except SpecError as err:
        raise SpecError(f"--storage: {err}") from None
    scheme = location.partition("://")[0]
    if scheme not in STORAGE_SCHEMES:
        raise SpecError(f"--storage: no filesystem for {scheme}:// URIs; allowed schemes: {', '.join(STORAGE_SCHEMES)}, or a local path")


def check_not_file(option: str, path: Path, alternatives: str = "") -> Path:
    """The folder that holds `path`, or is it: a file there is refused."""
    path = path.expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise SpecError(f"{option}: {existing} is a file; give a folder (it is created if missing){' ' + alternatives if alternatives else ''}")
    return existing


def check_folder(option: str, path: Path, alternatives: str = "") -> None:
    """A folder to write into: an existing, writable one, or one that can be created in one, outside
    every search folder."""
    check_writable(option, check_not_file(option, path, alternatives))
    check_outside_searches(option, path)


def check_report_dir(report_dir: Path, storage: str) -> None:
    """`--report-dir`: a report goes to REPORT_DIR/<the search folder's name>, which in the storage
    itself is the search folder."""
    check_folder("--report-dir", report_dir)
    if not is_uri(storage) and report_dir.expanduser().resolve() == Path(storage).expanduser().resolve():
        raise SpecError(f"--report-dir: {report_dir} holds the search folders, where a report would go into its search's "
                        "own folder; give another folder")


def check_outside_searches(option: str, path: Path) -> None:
    """`path` (symbolic links followed) is in no search folder: a file written there replaced the
    search's own (an export over its spec left it unreadable)."""
    try:
        target = path.expanduser().resolve()
    except RuntimeError:  # a loop of symbolic links
        raise SpecError(f"{option}: {path} is a loop of symbolic links; give another path") from None
    for folder in (target, *target.parents):
        if (folder / SPEC_FILE).is_file():
            raise SpecError(f"{option}: {path} is in (or links into) the search folder {folder}, whose files it could replace; "
                            "give a path outside it")


def check_writable(option: str, folder: Path) -> None:
    """An existing folder this user can write files into. Root passes `os.access` everywhere, so the
    filesystem is asked too."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SpecError(f"{option}: {folder} is not writable by this user; give a folder you can write")
    if unwritable_filesystem(folder):
        raise SpecError(f"{option}: {folder} is on a read-only or virtual filesystem; give another folder")


def check_out_file(path: Path) -> None:
    """`sharetune export --out`: a file to write in an existing, writable folder, checked before the
    search's data loads."""
    path = path.expanduser().absolute()
    if path.is_dir():
        raise SpecError(f"--out: {path} is a folder; give a file name in it, e.g. {path / 'model.pt'}")
    if not path.parent.is_dir():
        raise SpecError(f"--out: no folder {path.parent}; create it first")
    check_writable("--out", path.parent)
    check_outside_searches("--out", path)


def check_name(name: str) -> None:
    """`--name` becomes a folder inside the storage, like a spec's name."""
    try:
        safe_name(name)
    except ValueError as err:
        raise SpecError(f"--name: {err}") from None


def check_mlflow_uri(uri: str) -> None:
    """A scheme MLflow has a tracking store for, and not a folder store MLflow refuses; a database URL
    must also be one SQLAlchemy can open here."""
    from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
    from mlflow.exceptions import MlflowException
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry as stores  # MLflow's own scheme table

    try:
        stores.get_store_builder(uri)
    except MlflowException:
        allowed = ", ".join(sorted(scheme for scheme in stores._registry if scheme and scheme != "file"))
        raise SpecError(f"--mlflow-uri: no MLflow tracking store for {without_passwords(uri)!r}; allowed schemes: {allowed}") from None
    folder_store = uri.startswith("file:") or ":" not in uri  # file:///x, or a plain path
    if folder_store and not MLFLOW_ALLOW_FILE_STORE.get():  # MLflow 3 refuses one unless told to allow it
        raise SpecError(f"--mlflow-uri: {without_passwords(uri)!r} is a folder store, which MLflow keeps in maintenance mode and "
                        "refuses; give a database such as sqlite:///mlflow.db or an http(s):// server "
                        "(or set MLFLOW_ALLOW_FILE_STORE=true)")
    if uri.partition(":")[0].partition("+")[0] in DATABASE_SCHEMES:
        try:
            check_database_url(uri)
        except ValueError as err:
            raise SpecError(f"--mlflow-uri: {err}") from None
    if uri.startswith("sqlite") and sqlite_file(uri) is None:  # in memory: each connection gets an empty one
        raise SpecError(f"--mlflow-uri: {without_passwords(uri)!r} is an in-memory database, which keeps nothing; give a file such as sqlite:///mlflow.db")


def missing_store(uri: str) -> Path | None:
    """The SQLite file `uri` names, where there is none: MLflow would create an empty database there."""
    file = sqlite_file(uri)
    return file if file is not None and not file.expanduser().is_file() else None


def create_store(uri: str) -> None:
    """Create the SQLite store `uri` names where there is none, before the search writes its folder:
    MLflow creates its tables on first use, and a creation cut short (a full disk) left a file MLflow
    never opened again ("table spans already exists"), for which every write waited. It is made under a
    name of its own, then linked into place, so a failure leaves nothing and two searches starting
    together in one folder (sharing ./mlflow.db) never remove each other's store."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from sharetune.errors import first_line

    missing = missing_store(uri)
    if missing is None:
        return
    target = missing.expanduser()
    making = target.with_name(f"{target.name}.creating-{os.getpid()}")
    try:
        making.touch(exist_ok=False)  # an empty SQLite database; fails at once where MLflow retries for minutes (read-only)
        MlflowClient(make_url(uri).set(database=str(making)).render_as_string(hide_password=False)).search_experiments(max_results=1)
        _link(making, target)
    except (MlflowException, SQLAlchemyError, OSError) as err:
        why = first_line(getattr(err, "orig", None) or err)  # SQLAlchemy's own line repeats the driver's type
        if isinstance(err, OSError) and err.strerror:
            why = err.strerror  # not our own file's name
        raise SpecError(f"--mlflow-uri: MLflow could not create its store at {missing} ({why}); "
                        "make room or write access there, or give another --mlflow-uri") from None
    finally:
        for made in (making, *(making.with_name(making.name + side) for side in ("-journal", "-wal", "-shm"))):
            if made.exists():  # unlinking a missing file on a read-only disk raises
                made.unlink()


def _link(made: Path, target: Path) -> None:
    """`made` also at `target`, unless another search put a store there first: theirs stays."""
    try:
        os.link(made, target)
    except FileExistsError:
        pass
    except OSError:  # a filesystem without hard links
        if not target.exists():
            os.replace(made, target)


def check_store_exists(uri: str) -> None:
    """A store a command only reads must be there."""
    missing = missing_store(uri)
    if missing is not None:
        raise SpecError(f"--mlflow-uri: no MLflow store at {missing}; a search writes one there")


def check_destinations(storage: str, name: str | None, mlflow_uri: str) -> None:
    """Every check above, in the order a user reads the options."""
    check_storage(storage)
    if name is not None:
        check_name(name)
        named = Path(storage).expanduser() / name
        if not is_uri(storage) and named.exists() and not named.is_dir():
            raise SpecError(f"--name: {named.absolute()} is a file; choose another name")
    check_mlflow_uri(mlflow_uri)
