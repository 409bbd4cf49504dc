"""Storage: an engine from a URL, SQLite pragmas, sessions, and versioned migrations.

The database is SQLite by default (``$WORKBENCH_HOME/workbench.db``); any SQLAlchemy URL works, given as
an argument or in ``$WORKBENCH_DB_URL``.

SQLite is used in WAL mode (readers never block the writer) with a busy timeout (a writer waits for
another instead of failing with "database is locked"). Transactions are explicit: a read session
opens a deferred ``BEGIN``; a write session opens ``BEGIN IMMEDIATE``, taking the write lock up front
(waiting under the busy timeout) so it can never fail half-way when it upgrades from reading to
writing.

Schema versions: ``schema_version`` holds one number. A new database is created from the models in
``jobs.schema`` (the head of the schema) and stamped with the latest version; an older one gets the
functions of ``MIGRATIONS`` after its version applied in order, each in its own transaction. A
release that changes the schema edits the models *and* appends a migration, e.g.::

    def _m2_add_study(conn):                       # MIGRATIONS.append((2, "studies", _m2_add_study))
        add_column(conn, "jobs", sa.Column("study_id", sa.Integer, nullable=True))
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable, Iterator

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from .schema import Base

BUSY_TIMEOUT_S = 30.0
DB_FILE = "workbench.db"


class SchemaError(RuntimeError):
    """The database was written by a newer release, or a migration failed."""


_paths_module = None


def workbench_home() -> Path:
    """``core.paths.workbench_home()``, read from core/paths.py without importing the ``core`` package
    (whose ``__init__`` loads torch: two seconds that ``python -m jobs list`` does not need)."""
    global _paths_module
    if "core.paths" in sys.modules:
        return sys.modules["core.paths"].workbench_home()
    if _paths_module is None:
        source = Path(__file__).resolve().parents[1] / "core" / "paths.py"
        spec = importlib.util.spec_from_file_location("_workbench_core_paths", source)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _paths_module = module
    return _paths_module.workbench_home()


def default_url() -> str:
    """``$WORKBENCH_DB_URL``, else a SQLite file in ``$WORKBENCH_HOME``."""
    url = os.environ.get("WORKBENCH_DB_URL", "").strip()
    if url:
        return url
    return f"sqlite:///{workbench_home() / DB_FILE}"


def _sqlite_file(url: sa.URL) -> Path | None:
    db = url.database
    if url.get_backend_name() != "sqlite" or not db or db == ":memory:" or db.startswith("file:"):
        return None
    return Path(db)


def absolute_url(url: str) -> str:
    """The URL with a relative SQLite path made absolute (child processes run in another directory)."""
    url_obj = sa.make_url(url)
    path = _sqlite_file(url_obj)
    if path is None or path.is_absolute():
        return url
    return url_obj.set(database=str(path.expanduser().resolve())).render_as_string(hide_password=False)


def make_engine(url: str | None = None) -> Engine:
    """An engine for ``url`` (default ``default_url()``); SQLite gets WAL, busy timeout, foreign keys."""
    url_obj = sa.make_url(url or default_url())
    if url_obj.get_backend_name() != "sqlite":
        return sa.create_engine(url_obj, pool_pre_ping=True)
    path = _sqlite_file(url_obj)
    if path is not None:
        path.expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url_obj, connect_args={"timeout": BUSY_TIMEOUT_S, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # noqa: ANN001
        dbapi_conn.isolation_level = None  # the driver's implicit transactions off: we emit BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        if path is not None:
            cur.execute("PRAGMA journal_mode = WAL")
            cur.execute("PRAGMA synchronous = NORMAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "")
        conn.exec_driver_sql(f"BEGIN {mode}".strip())

    return engine


class Database:
    """An engine plus its session factories; the schema is created or migrated on construction."""

    def __init__(self, url: str | None = None):
        self.url = absolute_url(url or default_url())
        self.engine = make_engine(self.url)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        write_bind = self.engine.execution_options(sqlite_begin="IMMEDIATE") if self.is_sqlite else self.engine
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(write_bind, expire_on_commit=False)
        migrate(self.engine)

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reads (deferred transaction, closed at the end; nothing is committed)."""
        with self._read() as session:
            try:
                yield session
            finally:
                session.rollback()

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        """A session holding the write lock from its first statement; commits on success."""
        with self._write() as session:
            with session.begin():
                yield session

    def dispose(self) -> None:
        self.engine.dispose()


# --------------------------------------------------------------------------------------------------
# Migrations

version_table = sa.Table("schema_version", sa.MetaData(), sa.Column("version", sa.Integer, nullable=False))

Migration = tuple[int, str, Callable[[Connection], None]]


def _m1_initial(conn: Connection) -> None:
    """Version 1: jobs, metric points, evaluations and their samples (created from the models)."""
    Base.metadata.create_all(conn)


def _m2_studies(conn: Connection) -> None:
    """Version 2: the studies table (jobs.study_id existed since version 1)."""
    from .schema import Study

    Study.__table__.create(conn, checkfirst=True)


# (version, description, function taking a Connection inside a transaction), in order.
MIGRATIONS: list[Migration] = [
    (1, "initial schema: jobs, metric_points, evaluations, eval_samples", _m1_initial),
    (2, "studies", _m2_studies),
]


def latest_version(migrations: list[Migration] | None = None) -> int:
    return (migrations if migrations is not None else MIGRATIONS)[-1][0]


def add_column(conn: Connection, table: str, column: sa.Column) -> None:
    """``ALTER TABLE ... ADD COLUMN`` for a migration (nullable columns or ones with a server default)."""
    ddl = sa.schema.CreateColumn(column).compile(dialect=conn.dialect)
    conn.exec_driver_sql(f"ALTER TABLE {conn.dialect.identifier_preparer.quote(table)} ADD COLUMN {ddl}")


def schema_version(conn: Connection) -> int | None:
    if not sa.inspect(conn).has_table("schema_version"):
        return None
    return conn.execute(sa.select(sa.func.max(version_table.c.version))).scalar()


def migrate(engine: Engine, migrations: list[Migration] | None = None) -> int:
    """Create or upgrade the schema; return the version now in the database.

    Runs under the write lock on SQLite, so two processes starting on a new database at once create
    it once.
    """
    migrations = migrations if migrations is not None else MIGRATIONS
    head = latest_version(migrations)
    options = {"sqlite_begin": "IMMEDIATE"} if engine.dialect.name == "sqlite" else {}
    with engine.connect().execution_options(**options) as conn:
        with conn.begin():
            current = schema_version(conn)
            if current == head:
                return head
            if current is None:
                if sa.inspect(conn).has_table("jobs"):
                    raise SchemaError("the database has job tables but no schema_version: not one of ours?")
                version_table.create(conn)
                Base.metadata.create_all(conn)
                conn.execute(version_table.insert().values(version=head))
                return head
            if current > head:
                raise SchemaError(f"the database is at schema version {current}, newer than this release "
                                  f"understands ({head}); upgrade Adapter Workbench or use another database")
        for version, description, fn in migrations:
            if version <= current:
                continue
            with conn.begin():
                now = schema_version(conn)
                if now is not None and now >= version:  # another process got there first
                    continue
                try:
                    fn(conn)
                except Exception as err:
                    raise SchemaError(f"migration {version} ({description}) failed: {err}") from err
                conn.execute(version_table.delete())
                conn.execute(version_table.insert().values(version=version))
        return head
