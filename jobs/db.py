"""Storage: an engine from a URL, SQLite pragmas, sessions, and versioned migrations.

The database is SQLite by default (``$WORKBENCH_HOME/workbench.db``); PostgreSQL
(``postgresql+psycopg://user:password@host/db``, psycopg 3) is the backend for several machines on one
queue. Either is given as an argument or in ``$WORKBENCH_DB_URL``.

PostgreSQL connections come from a pool (``POOL_SIZE`` kept open, ``MAX_OVERFLOW`` more under load,
each checked with a ping before use, so a server restart costs one retry, not an error) and give up
connecting after ``CONNECT_TIMEOUT_S``, so an unreachable server is a one-line error, not a hang.
Time that several machines compare (worker heartbeats, leases) is the database's clock: ``db_now()``.

SQLite is used in WAL mode (readers never block the writer) with a busy timeout (a writer waits for
another instead of failing with "database is locked"; ``$WORKBENCH_DB_TIMEOUT`` seconds, default 30).
Transactions are explicit: a read session opens a deferred ``BEGIN``; a write session opens ``BEGIN
IMMEDIATE``, taking the write lock up front (waiting under the busy timeout) so it can never fail
half-way when it upgrades from reading to writing.

Schema versions: ``schema_version`` holds one number. A new database is created from the models in
``jobs.schema`` (the head of the schema) and stamped with the latest version; an older one gets the
functions of ``MIGRATIONS`` after its version applied in order, each in its own transaction. A
release that changes the schema edits the models *and* appends a migration, e.g.::

    def _m2_add_study(conn):                       # MIGRATIONS.append((2, "studies", _m2_add_study))
        add_column(conn, "jobs", sa.Column("study_id", sa.Integer, nullable=True))

Whatever keeps the database from being opened, read or written (a corrupt or read-only file, a folder
where the file should be, a lock held past the timeout, a newer schema, a server that does not answer)
raises ``DatabaseError``: one line naming the database as the user gave it and what to do about it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.functions import FunctionElement

from core.paths import DEFAULT_HOME, HOME_ENV, workbench_home  # torch-free: core loads its modules lazily

from .schema import Base

BUSY_TIMEOUT_S = 30.0
TIMEOUT_ENV = "WORKBENCH_DB_TIMEOUT"
URL_ENV = "WORKBENCH_DB_URL"
DB_FILE = "workbench.db"
POOL_SIZE = 5           # PostgreSQL connections kept open per process (a worker, the web server, a job)
MAX_OVERFLOW = 10       # more opened under a burst, closed again after
CONNECT_TIMEOUT_S = 10  # an unreachable server fails the call after this, instead of hanging


class DatabaseError(RuntimeError):
    """The database cannot be opened, read or written; the message is one line naming it and the remedy."""


class SchemaError(DatabaseError):
    """The database was written by a newer release, is not ours, or a migration failed."""


def default_url() -> str:
    """``$WORKBENCH_DB_URL``, else a SQLite file in ``$WORKBENCH_HOME``."""
    url = os.environ.get(URL_ENV, "").strip()
    if url:
        return url
    return f"sqlite:///{workbench_home() / DB_FILE}"


def busy_timeout() -> float:
    """Seconds a writer waits for another's lock: ``$WORKBENCH_DB_TIMEOUT``, default ``BUSY_TIMEOUT_S``."""
    value = os.environ.get(TIMEOUT_ENV, "").strip()
    if not value:
        return BUSY_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < 1e6:
        raise DatabaseError(f"{TIMEOUT_ENV} must be a number of seconds >= 0, not {value!r}")
    return seconds


def database_name(url: str | None = None) -> str:
    """How messages name the database: the SQLite file as the user wrote it, else the URL less its password."""
    if not url and not os.environ.get(URL_ENV, "").strip():
        return str(Path(os.environ.get(HOME_ENV) or DEFAULT_HOME) / DB_FILE)
    url = url or os.environ.get(URL_ENV, "").strip()
    try:
        url_obj = sa.make_url(url)
    except sa.exc.ArgumentError:
        return url
    if url_obj.get_backend_name() == "sqlite":
        path = _sqlite_file(url_obj)
        return str(path) if path is not None else url
    return url_obj.render_as_string(hide_password=True)


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


def make_engine(url: str | None = None, busy_timeout_s: float | None = None) -> Engine:
    """An engine for ``url`` (default ``default_url()``); SQLite gets WAL, busy timeout, foreign keys.

    ``busy_timeout_s`` (default ``busy_timeout()``) is how long a writer waits for another's lock.
    """
    url_obj = sa.make_url(url or default_url())
    timeout = busy_timeout() if busy_timeout_s is None else busy_timeout_s
    if url_obj.get_backend_name() == "postgresql":
        return sa.create_engine(url_obj, pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW, pool_pre_ping=True,
                                pool_timeout=max(timeout, 1.0), connect_args={"connect_timeout": CONNECT_TIMEOUT_S})
    if url_obj.get_backend_name() != "sqlite":
        return sa.create_engine(url_obj, pool_pre_ping=True)
    path = _sqlite_file(url_obj)
    if path is not None:
        path.expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url_obj, connect_args={"timeout": timeout, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # noqa: ANN001
        dbapi_conn.isolation_level = None  # the driver's implicit transactions off: we emit BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
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


class db_now(FunctionElement):
    """The database server's current UTC time as a naive timestamp, ``offset_s`` seconds added (a number
    or a column): one clock for every machine sharing the database, whatever their own clocks say.

    ``db_now()`` in a query compiles to PostgreSQL's ``now()`` (the transaction's start) in UTC, or to
    SQLite's ``strftime('now')`` with milliseconds, both comparable with the ``DateTime`` columns.
    """

    type = sa.DateTime()
    inherit_cache = True

    def __init__(self, offset_s: Any = 0):
        super().__init__(sa.cast(offset_s, sa.Float) if isinstance(offset_s, sa.ColumnElement)
                         else sa.literal(float(offset_s), sa.Float))


@compiles(db_now, "postgresql")
def _db_now_postgresql(element: db_now, compiler: Any, **kw: Any) -> str:
    return f"(timezone('utc', now()) + make_interval(secs => {compiler.process(element.clauses, **kw)}))"


@compiles(db_now, "sqlite")
def _db_now_sqlite(element: db_now, compiler: Any, **kw: Any) -> str:
    return f"strftime('%Y-%m-%d %H:%M:%f', 'now', ({compiler.process(element.clauses, **kw)}) || ' seconds')"


_LOCKED = ("database is locked", "database table is locked")
_NOT_OURS = ("file is not a database", "encrypted or is not a database", "disk image is malformed")


def _first_line(err: BaseException) -> str:
    text = str(getattr(err, "orig", None) or err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _cannot_open(name: str, path: Path | None, reason: str) -> str:
    """Why SQLite could not open (or create) the file at ``path``, told from what is on disk."""
    other = f"or set {URL_ENV} to another database"
    if path is None:
        return f"cannot open {name} ({reason}); check the URL, {other}"
    folder = Path(name).parent if str(Path(name).parent) != "." else "the current folder"
    if path.is_dir():
        return f"{name} is a folder, not a database file; move it away, {other}"
    if path.exists():
        if not os.access(path, os.R_OK | os.W_OK):
            return f"{name} is read-only; make it writable, {other}"
        if not os.access(path.parent, os.W_OK | os.X_OK):
            return f"{name} is in a read-only folder ({folder}; SQLite writes its journal beside it); " \
                   f"make the folder writable, {other}"
        return f"cannot open {name} ({reason}); check the file and its permissions, {other}"
    if not os.access(path.parent, os.W_OK | os.X_OK):
        return f"cannot create {name}: its folder {folder} is read-only; make it writable, {other}"
    return f"cannot create {name} ({reason}); check the folder and its permissions, {other}"


def explain(err: BaseException, name: str, path: Path | None = None,
            timeout_s: float | None = None) -> DatabaseError | None:
    """The one-line ``DatabaseError`` for an error met opening or using the database ``name``
    (SQLite file ``path``, if it is one), or None for errors that are not about the database itself
    (a constraint violation, a bug in a query): those propagate unchanged."""
    other = f"or set {URL_ENV} to another database"
    if isinstance(err, DatabaseError):
        return err
    if isinstance(err, sa.exc.NoSuchModuleError):
        return DatabaseError(f"{name}: unknown kind of database ({_first_line(err)}); check the URL, {other}")
    if isinstance(err, sa.exc.ArgumentError):
        return DatabaseError(f"{name!r} is not a database URL; write sqlite:///path/to/{DB_FILE} or another "
                             f"SQLAlchemy URL")
    if isinstance(err, ImportError):
        return DatabaseError(f"cannot use {name}: its database driver is not installed ({err.name or err})")
    if isinstance(err, OSError):  # making the folder of a SQLite file
        folder = Path(name).parent
        if isinstance(err, (FileExistsError, NotADirectoryError)):
            return DatabaseError(f"cannot create {name}: {folder} is a file, not a folder; {other}")
        return DatabaseError(f"cannot create {name}: its folder {folder} cannot be made "
                             f"({(err.strerror or str(err)).lower()}); {other}")
    if not isinstance(err, sa.exc.DBAPIError) or isinstance(err, (sa.exc.IntegrityError, sa.exc.ProgrammingError)):
        return None
    reason = _first_line(err)
    low = reason.lower()
    if any(s in low for s in _LOCKED):
        waited = f" longer than the {timeout_s:g} s busy timeout" if timeout_s is not None else ""
        return DatabaseError(f"{name} is locked: another process held it{waited}; try again when it is done "
                             f"(${TIMEOUT_ENV} sets the wait in seconds)")
    if "readonly" in low or "read-only" in low:
        if path is not None and path.exists() and os.access(path, os.R_OK | os.W_OK):
            return DatabaseError(_cannot_open(name, path, reason))  # the file is fine: its folder is not
        return DatabaseError(f"{name} is read-only; make it and its folder writable, {other}")
    if any(s in low for s in _NOT_OURS):
        return DatabaseError(f"{name} is not a SQLite database (a corrupt or other kind of file); move it "
                             f"aside to start a new one, {other}")
    if "unable to open database file" in low or "disk i/o error" in low:
        return DatabaseError(_cannot_open(name, path, reason))
    if path is None and isinstance(err, (sa.exc.OperationalError, sa.exc.InterfaceError)):
        return DatabaseError(f"cannot connect to {name} ({reason}); check the URL and that the server is up, {other}")
    if isinstance(err, sa.exc.OperationalError):
        return DatabaseError(f"{name}: {reason}")
    return None


class Database:
    """An engine plus its session factories; the schema is created or migrated on construction.

    ``busy_timeout_s`` (default ``$WORKBENCH_DB_TIMEOUT`` or 30) is how long a writer waits for another.
    Opening and every session raise ``DatabaseError`` (one line, naming the database) for a corrupt,
    read-only, locked, missing or newer database.
    """

    def __init__(self, url: str | None = None, busy_timeout_s: float | None = None):
        self.name = database_name(url)
        self.engine: Engine | None = None
        self._path: Path | None = None
        self.busy_timeout_s = busy_timeout_s
        with self._errors(opening=True):
            self.busy_timeout_s = busy_timeout() if busy_timeout_s is None else busy_timeout_s
            self.url = absolute_url(url or default_url())
            self._path = _sqlite_file(sa.make_url(self.url))
            self.engine = make_engine(self.url, self.busy_timeout_s)
            self.is_sqlite = self.engine.dialect.name == "sqlite"
            write_bind = self.engine.execution_options(sqlite_begin="IMMEDIATE") if self.is_sqlite else self.engine
            self._read = sessionmaker(self.engine, expire_on_commit=False)
            self._write = sessionmaker(write_bind, expire_on_commit=False)
            try:
                migrate(self.engine, name=self.name)
            except BaseException:
                self.engine.dispose()
                raise

    @contextlib.contextmanager
    def _errors(self, opening: bool = False) -> Iterator[None]:
        """Driver errors about the database itself become one-line ``DatabaseError``s (when ``opening``,
        also a bad URL, a missing driver, a folder that cannot be made)."""
        try:
            yield
        except (sa.exc.SQLAlchemyError, ImportError, OSError) if opening else sa.exc.DBAPIError as err:
            clear = explain(err, self.name, self._path, self.busy_timeout_s)
            if clear is None or clear is err:
                raise
            raise clear from err

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reads (deferred transaction, closed at the end; nothing is committed)."""
        with self._errors(), self._read() as session:
            try:
                yield session
            finally:
                session.rollback()

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        """A session holding the write lock from its first statement; commits on success."""
        with self._errors(), self._write() as session:
            with session.begin():
                yield session

    def dispose(self) -> None:
        if self.engine is not None:
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


def _m3_owners(conn: Connection) -> None:
    """Version 3: an owner on jobs, evaluations and studies (existing rows belong to ``local``), and the
    uploads table."""
    from .schema import LOCAL_OWNER, Upload

    for table in ("jobs", "evaluations", "studies"):
        if "owner" not in {c["name"] for c in sa.inspect(conn).get_columns(table)}:  # v2 made studies from the models
            add_column(conn, table, sa.Column("owner", sa.String(200), nullable=False, server_default=LOCAL_OWNER))
        conn.exec_driver_sql(f"CREATE INDEX IF NOT EXISTS ix_{table}_owner ON {table} (owner)")
    Upload.__table__.create(conn, checkfirst=True)


def _m4_metric_names(conn: Connection) -> None:
    """Version 4: metric points use ``core.metrics``' names (``type`` step/eval, ``loss``). (A database
    whose version 1 was made from later models has them already.)"""
    columns = {c["name"] for c in sa.inspect(conn).get_columns("metric_points")}
    if "kind" in columns:
        conn.exec_driver_sql("ALTER TABLE metric_points RENAME COLUMN kind TO type")
    if "train_loss" in columns:
        conn.exec_driver_sql("ALTER TABLE metric_points RENAME COLUMN train_loss TO loss")
    conn.exec_driver_sql("UPDATE metric_points SET type = 'step' WHERE type = 'train'")


def _m5_workers(conn: Connection) -> None:
    """Version 5: the workers table, and on jobs what they need to run (``device``, ``processes``,
    ``gpu_memory``, filled in from the spec of jobs still queued) and which worker claimed them."""
    from .launch import processes
    from .schema import WorkerRecord

    WorkerRecord.__table__.create(conn, checkfirst=True)
    columns = {c["name"] for c in sa.inspect(conn).get_columns("jobs")}
    for column in (sa.Column("worker_id", sa.Integer, nullable=True),
                   sa.Column("device", sa.String(8), nullable=False, server_default="auto"),
                   sa.Column("processes", sa.Integer, nullable=False, server_default="1"),
                   sa.Column("gpu_memory", sa.BigInteger, nullable=True)):
        if column.name not in columns:
            add_column(conn, "jobs", column)
    conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS ix_jobs_worker_id ON jobs (worker_id)")
    jobs = sa.table("jobs", sa.column("id"), sa.column("kind"), sa.column("status"), sa.column("spec", sa.JSON),
                    sa.column("device"), sa.column("processes"))
    queued = sa.select(jobs.c.id, jobs.c.kind, jobs.c.spec).where(jobs.c.status == "queued")
    for job_id, kind, spec in conn.execute(queued).all():
        device = ((spec or {}).get("model") or {}).get("device")
        conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(
            device=device if device in ("auto", "cpu", "cuda") else "auto", processes=processes(spec, kind)))


def _m6_arena(conn: Connection) -> None:
    """Version 6: the blind arena's pools and votes."""
    from .schema import ArenaPool, ArenaVote

    ArenaPool.__table__.create(conn, checkfirst=True)
    ArenaVote.__table__.create(conn, checkfirst=True)


def _m7_protocols(conn: Connection) -> None:
    """Version 7: the protocol as part of a result's identity: ``evaluations.protocol`` (existing results
    were all generated: ``generate``) and ``accuracy_norm``, and each sample's per-choice ``scores``."""
    columns = {c["name"] for c in sa.inspect(conn).get_columns("evaluations")}
    for column in (sa.Column("protocol", sa.String(32), nullable=False, server_default="generate"),
                   sa.Column("accuracy_norm", sa.Float, nullable=True)):
        if column.name not in columns:
            add_column(conn, "evaluations", column)
    if "scores" not in {c["name"] for c in sa.inspect(conn).get_columns("eval_samples")}:
        add_column(conn, "eval_samples", sa.Column("scores", sa.JSON, nullable=True))


# (version, description, function taking a Connection inside a transaction), in order.
MIGRATIONS: list[Migration] = [
    (1, "initial schema: jobs, metric_points, evaluations, eval_samples", _m1_initial),
    (2, "studies", _m2_studies),
    (3, "owners and uploads", _m3_owners),
    (4, "metric names of core.metrics", _m4_metric_names),
    (5, "workers, and what each job needs to run", _m5_workers),
    (6, "arena pools and votes", _m6_arena),
    (7, "evaluation protocols, acc_norm and per-choice scores", _m7_protocols),
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


SCHEMA_LOCK = 0x776F726B62656E63  # PostgreSQL advisory lock id ("workbenc") held while the schema changes


def _lock_schema(conn: Connection) -> None:
    """Serialise schema changes between processes: SQLite's ``BEGIN IMMEDIATE`` already holds the write
    lock; PostgreSQL takes a transaction-level advisory lock (two workers starting on a new database
    would otherwise both create the tables, and one would fail)."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK})


def migrate(engine: Engine, migrations: list[Migration] | None = None, name: str | None = None) -> int:
    """Create or upgrade the schema; return the version now in the database.

    Runs under the write lock (SQLite) or an advisory lock (PostgreSQL), so two processes starting on
    a new database at once create it once. ``name`` is how ``SchemaError`` messages name the database
    (default: from the engine's URL).
    """
    name = name or database_name(engine.url.render_as_string(hide_password=False))
    other = f"or set {URL_ENV} to another database"
    migrations = migrations if migrations is not None else MIGRATIONS
    head = latest_version(migrations)
    options = {"sqlite_begin": "IMMEDIATE"} if engine.dialect.name == "sqlite" else {}
    with engine.connect().execution_options(**options) as conn:
        with conn.begin():
            _lock_schema(conn)
            current = schema_version(conn)
            if current == head:
                return head
            if current is None:
                if sa.inspect(conn).has_table("jobs"):
                    raise SchemaError(f"{name} has job tables but no schema version: not a workbench database; "
                                      f"move it aside, {other}")
                version_table.create(conn)
                Base.metadata.create_all(conn)
                conn.execute(version_table.insert().values(version=head))
                return head
            if current > head:
                raise SchemaError(f"{name} is at schema version {current}, newer than this release understands "
                                  f"({head}): it was written by a newer Adapter Workbench; upgrade, {other}")
        for version, description, fn in migrations:
            if version <= current:
                continue
            with conn.begin():
                _lock_schema(conn)
                now = schema_version(conn)
                if now is not None and now >= version:  # another process got there first
                    continue
                try:
                    fn(conn)
                except Exception as err:
                    raise SchemaError(f"{name}: migration {version} ({description}) failed, the database stays "
                                      f"at version {now}: {_first_line(err)}") from err
                conn.execute(version_table.delete())
                conn.execute(version_table.insert().values(version=version))
        return head
