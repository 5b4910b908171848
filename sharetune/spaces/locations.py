"""Names and URLs a spec points outside itself with, checked without touching what they name.

A search's name becomes a folder inside `--storage`, an MLflow experiment and a quoted value in
MLflow's run filter, so it must be a plain folder name: `../x` would write outside the storage and
a quote would break the filter. The Optuna storage URL is parsed by SQLAlchemy (the library Optuna
opens it with) and its dialect and driver are imported, without connecting to a server.
"""

from __future__ import annotations

import re
from pathlib import Path

from sharetune.errors import without_passwords

DEFAULT_STORAGE = "results"  # where search folders go unless --storage or $SHARETUNE_STORAGE says otherwise
DEFAULT_STORE = "mlflow.db"  # the embedded MLflow store (SQLite), unless --mlflow-uri or $MLFLOW_TRACKING_URI
UI_HOST, UI_PORT = "127.0.0.1", 5000  # where `sharetune ui` serves MLflow's UI: this machine only
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
SAFE_NAME_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 100"


def safe_name(value: str) -> str:
    """`value` if it is a safe folder name, else ValueError saying what is allowed."""
    if not SAFE_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a safe folder name; allowed: {SAFE_NAME_RULE}")
    return value


def sqlite_file(url: str) -> Path | None:
    """The file a SQLite URL names, as SQLAlchemy reads it; None for another database, an in-memory one
    or no URL at all.
    The one reading of a SQLite URL's path, for the checks, the store's creation and `~`."""
    if not url.startswith("sqlite"):
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        database = make_url(url).database
    except ArgumentError:  # no URL: check_database_url says so, in one line
        return None
    return None if database in (None, "", ":memory:") else Path(database)


def expand_home(url: str) -> str:
    """`url` with a SQLite file's `~` expanded. SQLAlchemy opens the path as written, so MLflow made
    `sqlite:///~/x.db` a folder named `~` in the working directory, while sharetune's checks (and a
    user) read it as the home folder."""
    file = sqlite_file(url)
    if file is None or not str(file).startswith("~"):
        return url
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=str(file.expanduser())).render_as_string(hide_password=False)


def check_database_url(url: str) -> str:
    """`url` if SQLAlchemy can open it here (known dialect, driver installed; for SQLite, an existing folder)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    example = "e.g. sqlite:///optuna.db or postgresql+psycopg://user@host/db"
    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as err:
        raise ValueError(without_passwords(f"{url!r} is not a database URL SQLAlchemy knows ({err}); {example}")) from None
    try:
        dialect.import_dbapi()
    except ImportError as err:
        raise ValueError(without_passwords(f"{url!r}: the {parsed.drivername} driver is not installed ({err})")) from None
    file = sqlite_file(url)
    if file is not None:
        folder = file.expanduser().parent
        if not folder.is_dir():
            raise ValueError(f"{without_passwords(url)!r}: folder {folder} does not exist")
    return url
