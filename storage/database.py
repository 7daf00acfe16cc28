"""The node's database: engine, transactions, schema check, and the aggregates' handle.

One :class:`Database` object per process (it owns an engine and a connection pool; it is
safe to share between threads). Open it with :func:`open_database`. It holds no queue
logic itself; it exposes the three aggregates, each in its own module:

``db.jobs`` (:class:`storage.jobs.Jobs`)
    Received instances and their processing jobs: receive/enqueue, atomic claim,
    lease, complete, fail, retry.
``db.studies`` (:class:`storage.studies.Studies`)
    Study rows: quiet/due detection, report versions.
``db.sends`` (:class:`storage.sends.Sends`)
    Outbound C-STOREs of produced objects: queue, due, outcome, retry.

Every public method of an aggregate runs in its own committed transaction
(:meth:`Database.transaction`): when it returns, the change is durable.

SQLite (the default) is opened in WAL mode with ``synchronous=FULL`` (a commit survives
power loss), a busy timeout and foreign keys on. Every transaction starts with
``BEGIN IMMEDIATE``, so writers queue on SQLite's write lock (waiting up to the busy
timeout) instead of failing when a read transaction tries to upgrade; together with the
single ``UPDATE … WHERE id = (SELECT …) RETURNING`` of :meth:`storage.jobs.Jobs.claim`,
two workers — threads or processes — never claim the same job.

PostgreSQL (``postgresql://…``, driven by psycopg 3: ``pip install calcnode[postgres]``)
gives the same guarantees by row locks instead of one write lock: the claim's sub-select
takes ``FOR UPDATE SKIP LOCKED`` (concurrent claims skip each other's row, never wait,
never share one), and every read-modify-write of a row (lease, completion, a study's
report version, a send's outcome) reads it ``FOR UPDATE``, so two transactions on one row
run one after the other as they do on SQLite. SQLite ignores those clauses.

Tasks that must run in one place at a time — reporting studies, sending, retention —
take :meth:`Database.exclusive`: a PostgreSQL advisory lock (held by a connection:
released by the server when its process dies), or an ``flock`` beside the SQLite file.
However many schedulers share the database, one reports a study version and one sends
an object.

An unreachable server (refused, timed out, a connection the server or the network
dropped) makes :meth:`Database.transaction` raise
:class:`~storage.errors.DatabaseUnavailableError` and back off: for a growing delay
(0.5 s doubling to 10 s) further transactions fail at once with the same error instead of
each waiting on a connection, then one tries again. The pool checks a PostgreSQL
connection before handing it out, without a round trip (a connection the server ended
has data or end of file waiting on its socket: it is replaced, with the pool's other
connections of its age), so the first transaction after an outage or a server restart
gets a fresh one; a connection that dies during a transaction fails that transaction
(unreachable) and SQLAlchemy drops the pool's connections with it.
Callers retry (workers poll, the scheduler's tasks run again, the SCP answers 0xA710 and
the sender retries): nothing committed is lost.

Schema version
--------------
The database is created from the models (``create_all``) and stamped with
:data:`storage.models.SCHEMA_VERSION`; opening checks the stamp, applies the upgrades it
knows (:data:`UPGRADES`: 1 → 2 adds ``studies.report_error``; 2 → 3 replaces the jobs
index on ``(state, next_attempt_at)`` by one on ``(state, next_attempt_at, id)``, the
claim's order), in the same transaction, and refuses any other version, or a file that
is not a calcnode database, with :class:`~storage.errors.SchemaVersionError`. One
version number for both backends; on PostgreSQL the opening transaction first takes an
advisory lock, so processes starting together on an empty database create (or upgrade)
it once. Adopt Alembic when an upgrade is more than a statement or two.

Times are timezone-aware UTC datetimes. Every method that depends on the time takes an
optional keyword ``now`` (tests inject it); otherwise the database's clock is used.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
import select as io_select
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, insert, inspect, select, text, update
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.engine.url import URL
from sqlalchemy.exc import (
    DatabaseError,
    DBAPIError,
    InterfaceError,
    InvalidatePoolError,
    OperationalError,
)
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from storage import jobs, sends, studies
from storage.common import check_int, check_seconds, check_time
from storage.errors import DatabaseUnavailableError, SchemaVersionError, StorageError
from storage.models import APPLICATION_NAME, SCHEMA_VERSION, Base, SchemaVersion, utcnow
from storage.policy import QueuePolicy

__all__ = [
    "POSTGRES_CONNECT_DEFAULTS",
    "UPGRADES",
    "Database",
    "engine_url",
    "is_unreachable",
    "open_database",
    "prepare_schema",
    "read_schema_version",
]

logger = logging.getLogger(__name__)

#: Schema upgrades: from version → the statements that make it the next version. Each is
#: plain SQL both SQLite and PostgreSQL run, applied in the opening transaction.
UPGRADES: dict[int, tuple[str, ...]] = {
    1: ("ALTER TABLE studies ADD COLUMN report_error TEXT",),
    # The claim's order within a state (next_attempt_at, then id) as an index: a claim
    # reads its first due entry instead of sorting the due rows. The old index is its
    # prefix, so it goes. (IF [NOT] EXISTS: a database given the index by hand.)
    2: (
        "CREATE INDEX IF NOT EXISTS ix_jobs_state_next_attempt_id "
        "ON jobs (state, next_attempt_at, id)",
        "DROP INDEX IF EXISTS ix_jobs_state_next_attempt",
    ),
}


# --------------------------------------------------------------------------- engine


#: libpq parameters set unless the URL's query names them: give up on a server that does
#: not answer within 10 s (rather than the kernel's minutes), notice a peer that vanished
#: from an idle connection (a task lock's) within about a minute, and name the client in
#: ``pg_stat_activity``.
POSTGRES_CONNECT_DEFAULTS: dict[str, int | str] = {
    "connect_timeout": 10,
    "application_name": "calcnode",
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}

#: The first key of calcnode's PostgreSQL advisory locks ("calc"); the second is a CRC-32
#: of the lock's name.
_LOCK_CLASS = 0x63616C63


def _is_memory_sqlite(database: str | None) -> bool:
    return not database or database == ":memory:" or "mode=memory" in database


def engine_url(url: str) -> URL:
    """The SQLAlchemy URL calcnode connects with: ``postgresql://`` (and ``postgres://``)
    mean psycopg 3 (the ``[postgres]`` extra), not SQLAlchemy's default psycopg2; a URL
    naming its driver (``postgresql+psycopg2://``) is kept."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _lock_keys(name: str) -> dict[str, int]:
    key = zlib.crc32(f"calcnode:{name}".encode())
    return {"a": _LOCK_CLASS, "b": key - (1 << 32) if key >= 1 << 31 else key}


def _closed_by_server(dbapi_connection: Any) -> bool:
    """Whether an idle pooled PostgreSQL connection is dead: its driver says so, or its
    socket has something to read. Between transactions the server sends nothing unless
    it ends the session (a shutdown, a restart, ``pg_terminate_backend``, an idle
    timeout: an error message, then end of file) or the socket failed (keepalives gave
    up on a vanished peer); either way the connection is not to be used. No round trip:
    one ``poll`` with timeout 0."""
    if getattr(dbapi_connection, "closed", False) or getattr(dbapi_connection, "broken", False):
        return True
    try:
        fd = dbapi_connection.fileno()
    except Exception:  # a driver that cannot say: treat it as dead
        return True
    poller = io_select.poll()
    poller.register(fd, io_select.POLLIN | io_select.POLLPRI)
    return bool(poller.poll(0))


def _make_engine(url: str, *, create: bool, busy_timeout_seconds: float) -> Engine:
    parsed = engine_url(url)
    if parsed.get_backend_name() == "postgresql":
        libpq = {k: v for k, v in POSTGRES_CONNECT_DEFAULTS.items() if k not in parsed.query}
        engine = create_engine(parsed, connect_args=libpq)

        @event.listens_for(engine, "checkout")
        def _on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
            # What pool_pre_ping did (a dead connection replaced before use, the pool's
            # other connections of the same age with it) without its SELECT 1: one
            # round trip less on every transaction.
            if _closed_by_server(dbapi_connection):
                raise InvalidatePoolError("the server closed this pooled connection")

        return engine
    if parsed.get_backend_name() != "sqlite":
        return create_engine(parsed, pool_pre_ping=True)

    database = parsed.database
    kwargs: dict[str, Any] = {}
    connect_args: dict[str, Any] = {"timeout": busy_timeout_seconds}
    memory = _is_memory_sqlite(database)
    if memory:
        # One shared connection, or every connection would see its own empty database.
        kwargs["poolclass"] = StaticPool
        connect_args["check_same_thread"] = False
    elif database is not None and not database.startswith("file:"):
        path = Path(database)
        if not path.exists():
            if not create:
                raise SchemaVersionError(
                    f"database file {path} does not exist (create=False): no calcnode schema"
                )
            path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed, connect_args=connect_args, **kwargs)
    busy_ms = int(busy_timeout_seconds * 1000)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from the sqlite3 module, so BEGIN is ours (below).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {busy_ms}")
            if not memory:
                cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = FULL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # IMMEDIATE takes the write lock now (waiting up to the busy timeout), so a
        # transaction never fails later when its first write would upgrade a read lock.
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _display_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def _first_line(error: object) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def is_unreachable(exc: BaseException, dialect_name: str) -> bool:
    """Whether a driver error means the server cannot be reached (rather than a failed
    statement): on PostgreSQL an error without SQLSTATE (no answer: refused, timed out,
    the connection dropped), a connection exception (08xxx) or an operator intervention
    (57Pxx: the server shutting down, starting up); SQLite's errors never are (a lock
    timeout is about one transaction)."""
    if dialect_name == "sqlite" or not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    if not isinstance(exc, OperationalError | InterfaceError):
        return False
    sqlstate = getattr(exc.orig, "sqlstate", None)
    return sqlstate is None or sqlstate.startswith(("08", "57P"))


class _Outage:
    """The back-off of an unreachable server: after ``n`` failures in a row, no
    transaction tries for ``min(cap, base * 2**(n-1))`` seconds (they fail at once)."""

    def __init__(self, *, base_seconds: float = 0.5, cap_seconds: float = 10.0) -> None:
        self.base = base_seconds
        self.cap = cap_seconds
        self.failures = 0
        self.retry_at = 0.0
        self.reason = ""
        self._lock = threading.Lock()

    def check(self, shown_url: str) -> None:
        with self._lock:
            wait = self.retry_at - time.monotonic()
            if self.failures and wait > 0:
                raise DatabaseUnavailableError(
                    f"database {shown_url} unreachable ({self.failures} failure(s) in a row, "
                    f"next try in {wait:.1f} s): {self.reason}"
                )

    def failed(self, reason: str, shown_url: str) -> float:
        with self._lock:
            self.failures += 1
            delay = min(self.cap, self.base * 2.0 ** min(self.failures - 1, 30))
            self.retry_at = time.monotonic() + delay
            self.reason = reason
            if self.failures == 1:
                logger.warning("database %s unreachable: %s", shown_url, reason)
            return delay

    def succeeded(self, shown_url: str) -> None:
        if not self.failures:  # the usual case: no lock taken
            return
        with self._lock:
            if self.failures:
                logger.info(
                    "database %s reachable again after %d failure(s)", shown_url, self.failures
                )
            self.failures = 0
            self.retry_at = 0.0


# --------------------------------------------------------------------------- schema


def read_schema_version(connection: Connection) -> int | None:
    """Return the database's stamped schema version, or ``None`` for an empty database.

    Raises
    ------
    SchemaVersionError
        When the database has tables but is not a calcnode database (no or a foreign
        ``schema_version`` table, or not the single row it should hold).
    """
    tables = set(inspect(connection).get_table_names())
    if not tables:
        return None
    if "schema_version" not in tables:
        shown = ", ".join(sorted(tables)[:8])
        raise SchemaVersionError(
            f"not a calcnode database: it has tables ({shown}) but no schema_version table"
        )
    try:
        rows = connection.execute(select(SchemaVersion.application, SchemaVersion.version)).all()
    except DatabaseError as exc:
        raise SchemaVersionError(
            f"not a calcnode database: its schema_version table is unreadable ({exc.orig})"
        ) from exc
    if len(rows) != 1:
        raise SchemaVersionError(
            f"not a calcnode database: schema_version holds {len(rows)} rows, expected 1"
        )
    application, version = rows[0]
    if application != APPLICATION_NAME:
        raise SchemaVersionError(
            f"not a calcnode database: schema_version names application {application!r}"
        )
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise SchemaVersionError(f"not a calcnode database: schema version {version!r}")
    return version


def prepare_schema(engine: Engine, *, create: bool = True) -> int:
    """Create the schema of an empty database, or check the version of an existing one.

    Parameters
    ----------
    engine : Engine
        The database.
    create : bool
        Create the tables in an empty database (else an empty database is refused).

    Returns
    -------
    int
        The version the database has now (0 for a database created now): an older one
        is upgraded by :data:`UPGRADES` where they reach :data:`SCHEMA_VERSION`.

    Raises
    ------
    SchemaVersionError
        The database has another schema version than :data:`SCHEMA_VERSION` (newer:
        upgrade calcnode; older: no upgrade path exists), is not a calcnode database,
        or is empty while ``create`` is false.
    """
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Processes starting together on an empty database: one creates it, the
            # others wait here and then find it (DDL is transactional on PostgreSQL).
            conn.execute(text("SELECT pg_advisory_xact_lock(:a, :b)"), _lock_keys("schema"))
        found = read_schema_version(conn)
        if found is None:
            if not create:
                raise SchemaVersionError(
                    "the database is empty (no calcnode schema) and create=False"
                )
            Base.metadata.create_all(conn)
            conn.execute(
                insert(SchemaVersion).values(
                    id=1, application=APPLICATION_NAME, version=SCHEMA_VERSION, updated_at=utcnow()
                )
            )
            logger.info("created database schema version %d", SCHEMA_VERSION)
            return 0
        start = found
        while found < SCHEMA_VERSION and found in UPGRADES:
            for statement in UPGRADES[found]:
                conn.exec_driver_sql(statement)
            found += 1
            conn.execute(update(SchemaVersion).values(version=found, updated_at=utcnow()))
        if found != start:
            logger.info("upgraded the database schema from version %d to %d", start, found)
        if found > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"the database has schema version {found}, newer than version "
                f"{SCHEMA_VERSION} that this calcnode understands: upgrade calcnode (or "
                "point it at another database); refusing to open it"
            )
        if found < SCHEMA_VERSION:
            raise SchemaVersionError(
                f"the database has schema version {found}, older than version "
                f"{SCHEMA_VERSION} that this calcnode uses, and this calcnode has no "
                "upgrade from it; refusing to open it"
            )
        return found


# --------------------------------------------------------------------------- open


def open_database(
    url: str,
    *,
    create: bool = True,
    policy: QueuePolicy | None = None,
    busy_timeout_seconds: float = 30.0,
    clock: Callable[[], dt.datetime] | None = None,
) -> Database:
    """Open (and create, or check the schema version of) the node's database.

    Parameters
    ----------
    url : str
        SQLAlchemy URL, e.g. ``"sqlite:////var/lib/calcnode/node.db"`` or
        ``"postgresql://user@host/calcnode"``. ``"sqlite://"`` is an in-memory database
        (tests only: one connection, no WAL).
    create : bool
        Create the file and schema when the database is empty; else refuse it.
    policy : QueuePolicy or None
        Retry policy; the defaults of :class:`QueuePolicy` when ``None``.
    busy_timeout_seconds : float
        How long a transaction waits for SQLite's write lock before failing.
    clock : callable or None
        Returns the current aware UTC datetime; :func:`storage.models.utcnow` when None.

    Returns
    -------
    Database

    Raises
    ------
    SchemaVersionError
        The database has another schema version, is not a calcnode database (including
        a file that is not a database at all), or is missing/empty while ``create`` is
        false.
    DatabaseUnavailableError
        The database cannot be reached or opened (a server that does not answer, a
        file that cannot be opened or created, no driver installed for the URL); the
        message names the URL (password hidden) and the driver's reason.
    """
    if not isinstance(url, str) or not url:
        raise TypeError(f"url must be a non-empty str, got {url!r}")
    check_seconds("busy_timeout_seconds", busy_timeout_seconds)
    if policy is not None and not isinstance(policy, QueuePolicy):
        raise TypeError(f"policy must be a QueuePolicy, got {type(policy).__name__}")
    try:
        engine = _make_engine(url, create=create, busy_timeout_seconds=busy_timeout_seconds)
    except ImportError as exc:  # the DBAPI module of the URL's dialect
        hint = "; pip install calcnode[postgres]" if "psycopg" in str(exc) else ""
        raise DatabaseUnavailableError(
            f"cannot open {_display_url(url)}: its database driver is not installed ({exc}{hint})"
        ) from exc
    except OSError as exc:  # the SQLite file's folder cannot be made
        where = f" (making {exc.filename})" if exc.filename else ""
        raise DatabaseUnavailableError(
            f"cannot open {_display_url(url)}: {exc.strerror or exc}{where}"
        ) from exc
    try:
        prepare_schema(engine, create=create)
    except OperationalError as exc:
        # Not the content: the server is down, the file cannot be opened, access denied.
        engine.dispose()
        raise DatabaseUnavailableError(
            f"cannot open {_display_url(url)}: {_first_line(exc.orig)}"
        ) from exc
    except DatabaseError as exc:
        engine.dispose()
        raise SchemaVersionError(
            f"{_display_url(url)} is not a calcnode database: {exc.orig}"
        ) from exc
    except BaseException:
        engine.dispose()
        raise
    logger.info("opened database %s", _display_url(url))
    return Database(engine, policy=policy, clock=clock, display_url=_display_url(url))


# --------------------------------------------------------------------------- handle


class Database:
    """The handle of the node's durable state: the engine and the three aggregates.

    Use :func:`open_database` to make one; one per process, shared by its threads. A
    ``Database`` inherited through ``fork`` notices the new process id and opens fresh
    connections (it never reuses the parent's).

    Parameters
    ----------
    engine : Engine
        An engine whose schema :func:`prepare_schema` has checked.
    policy : QueuePolicy or None
        Retry policy of jobs and sends.
    clock : callable or None
        Returns the current aware UTC datetime.
    display_url : str or None
        The URL as logs show it (as configured, password hidden); the engine's when None.

    Attributes
    ----------
    jobs : storage.jobs.Jobs
        Received instances and their jobs.
    studies : storage.studies.Studies
        Study rows and report versions.
    sends : storage.sends.Sends
        Outbound C-STOREs.
    policy : QueuePolicy
        The retry policy the aggregates apply.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        policy: QueuePolicy | None = None,
        clock: Callable[[], dt.datetime] | None = None,
        display_url: str | None = None,
    ) -> None:
        if not isinstance(engine, Engine):
            raise TypeError(f"engine must be an sqlalchemy Engine, got {type(engine).__name__}")
        if policy is not None and not isinstance(policy, QueuePolicy):
            raise TypeError(f"policy must be a QueuePolicy, got {type(policy).__name__}")
        if clock is not None and not callable(clock):
            raise TypeError("clock must be callable")
        self._engine = engine
        self.policy = policy if policy is not None else QueuePolicy()
        self._clock = clock if clock is not None else utcnow
        self._pid = os.getpid()
        self._serial: threading.Lock | None = (
            threading.Lock() if engine.dialect.name == "sqlite" else None
        )
        self._shown_url = display_url or engine.url.render_as_string(hide_password=True)
        self._outage = _Outage()
        #: In-memory SQLite: the task locks of this process (no file to lock).
        self._local_locks: dict[str, threading.Lock] = {}
        self._local_locks_guard = threading.Lock()
        self.jobs = jobs.Jobs(self)
        self.studies = studies.Studies(self)
        self.sends = sends.Sends(self)

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for diagnostics; use the aggregates to change state)."""
        return self._engine

    def close(self) -> None:
        """Close the pooled connections."""
        self._engine.dispose()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def now(self, now: dt.datetime | None = None) -> dt.datetime:
        """``now`` checked (aware, in UTC), or the clock's time when ``None``."""
        return check_time("now", self._clock() if now is None else now)

    @property
    def backend(self) -> str:
        """``"sqlite"`` or ``"postgresql"`` (the dialect's name)."""
        return str(self._engine.dialect.name)

    def _after_fork(self) -> None:
        if os.getpid() != self._pid:
            # Forked: the parent's connections must not be used (nor closed) here, and a
            # lock another parent thread held at the fork would stay locked forever.
            self._engine.dispose(close=False)
            self._serial = threading.Lock() if self._serial is not None else None
            self._local_locks = {}
            self._local_locks_guard = threading.Lock()
            self._outage = _Outage()
            self._pid = os.getpid()

    def _failure(self, exc: DBAPIError) -> StorageError:
        """The storage error for a driver error (an outage starts its back-off)."""
        reason = _first_line(exc.orig)
        if is_unreachable(exc, self.backend):
            delay = self._outage.failed(reason, self._shown_url)
            return DatabaseUnavailableError(
                f"database {self._shown_url} unreachable (next try in {delay:.1f} s): {reason}"
            )
        return StorageError(f"database operation failed: {exc.orig}")

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session in one transaction, committed on exit (rolled back on an error).

        Raises
        ------
        DatabaseUnavailableError
            The server cannot be reached (see the module notes: while it backs off,
            at once, without trying).
        StorageError
            The database failed (locked past the busy timeout, disk I/O error, ...).
        """
        self._after_fork()
        self._outage.check(self._shown_url)
        try:
            # Threads of this process queue on a Python lock (a prompt hand-over) rather
            # than on SQLite's busy handler, which sleeps in growing steps; other
            # processes still meet at SQLite's write lock.
            with (
                self._serial if self._serial is not None else nullcontext(),
                Session(self._engine, expire_on_commit=False) as session,
                session.begin(),
            ):
                yield session
        except OperationalError as exc:
            raise self._failure(exc) from exc
        except DBAPIError as exc:
            if is_unreachable(exc, self.backend):
                raise self._failure(exc) from exc
            raise  # IntegrityError and the like: the caller's business
        self._outage.succeeded(self._shown_url)

    @contextmanager
    def exclusive(self, name: str) -> Iterator[bool]:
        """Hold the database-wide lock ``name`` for the block, unless someone else does.

        For tasks that must run in one place at a time however many processes (hosts)
        share the database: making a study's reports, sending, retention. It never
        waits: it yields True when this caller holds the lock now (do the task), False
        when another process or thread holds it (skip: the task is being done there).

        PostgreSQL: a session advisory lock on a connection of its own, kept for the
        block; the server releases it when that connection ends, so a process killed
        mid-task frees it at once. SQLite: ``flock`` on ``<database file>.<name>.lock``
        (released by the kernel when the process dies); an in-memory database: a lock
        of this process.

        Parameters
        ----------
        name : str
            The task's name (letters, digits, ``-`` and ``_``).

        Raises
        ------
        DatabaseUnavailableError, StorageError
            As for :meth:`transaction` (PostgreSQL), or the lock file cannot be opened.
        """
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            raise ValueError(f"name must be letters, digits, '-' or '_', got {name!r}")
        self._after_fork()
        if self.backend == "postgresql":
            with self._advisory_lock(name) as held:
                yield held
        elif _is_memory_sqlite(self._engine.url.database):
            with self._local_locks_guard:
                lock = self._local_locks.setdefault(name, threading.Lock())
            if not lock.acquire(blocking=False):
                yield False
                return
            try:
                yield True
            finally:
                lock.release()
        else:
            with self._file_lock(name) as held:
                yield held

    @contextmanager
    def _advisory_lock(self, name: str) -> Iterator[bool]:
        self._outage.check(self._shown_url)
        keys = _lock_keys(name)
        try:
            conn = self._engine.connect()
        except DBAPIError as exc:
            raise self._failure(exc) from exc
        try:
            held = bool(conn.execute(text("SELECT pg_try_advisory_lock(:a, :b)"), keys).scalar())
            conn.commit()  # no transaction left open while the task runs
        except DBAPIError as exc:
            conn.invalidate()
            conn.close()
            raise self._failure(exc) from exc
        if not held:
            conn.close()
            yield False
            return
        try:
            yield True
        finally:
            try:
                conn.execute(text("SELECT pg_advisory_unlock(:a, :b)"), keys)
                conn.commit()
            except DBAPIError:
                # The connection is gone, or its session ends now: either way the server
                # releases the lock with it.
                conn.invalidate()
            finally:
                conn.close()

    @contextmanager
    def _file_lock(self, name: str) -> Iterator[bool]:
        path = f"{self._engine.url.database}.{name}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot open the lock file {path}: {exc.strerror}") from exc
        try:
            try:
                # One open file description per call: threads of one process exclude
                # each other as processes do.
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # releases the flock

    def ping(self) -> None:
        """Check that the database answers (one trivial statement): health checks.

        Raises
        ------
        DatabaseUnavailableError, StorageError
            As for :meth:`transaction`.
        """
        with self.transaction() as s:
            s.execute(text("SELECT 1"))

    # ------------------------------------------------------------------ across aggregates

    def status_summary(self, *, recent_errors: int = 10) -> dict[str, Any]:
        """Counts and recent errors for health checks and ``calcnode status``.

        No patient data: states, counts, job/send ids, UIDs, times and error texts.

        Returns
        -------
        dict
            ``{"jobs": {state: n}, "sends": {state: n}, "studies": {state: n},
            "recent_errors": [{"kind", "id", "uid", "state", "attempts", "at",
            "error"}, ...]}``, errors newest first, texts cut to 300 characters. Kinds:
            ``job`` (its last error; a done job's is a result object not made),
            ``send``, ``study`` (ended with a report error; ``attempts`` None);
            studies are counted by :data:`storage.studies.SHOWN_STUDY_STATES`.
        """
        check_int("recent_errors", recent_errors, minimum=0)
        with self.transaction() as s:
            summary: dict[str, Any] = {
                "jobs": jobs.state_counts(s),
                "sends": sends.state_counts(s),
                "studies": studies.state_counts(s),
            }
            errors = (
                jobs.recent_errors(s, recent_errors)
                + sends.recent_errors(s, recent_errors)
                + studies.recent_errors(s, recent_errors)
            )
        errors.sort(key=lambda e: e["at"], reverse=True)
        summary["recent_errors"] = errors[:recent_errors]
        return summary

    def purge_done_before(self, cutoff: dt.datetime, *, include_failed: bool = False) -> list[str]:
        """Retention: delete old finished rows and return the files to remove.

        In one transaction: :func:`storage.jobs.purge_finished` (jobs ``done``, and
        ``failed`` with ``include_failed``, last updated before ``cutoff`` whose study is
        ``reported``) and :func:`storage.sends.purge_sent` (sends ``sent`` before
        ``cutoff``). Study rows stay (they hold only UIDs and the report version, so a
        late image gets the next version).

        Returns
        -------
        list of str
            Sorted, de-duplicated paths relative to the store root: the purged jobs'
            images, the paths listed in their ``result["paths"]``, and the purged sends'
            objects that no remaining send refers to. Remove them with
            ``FileStore.remove``; then ``FileStore.purge_empty_dirs``.
        """
        cutoff = check_time("cutoff", cutoff)
        with self.transaction() as s:
            job_paths, job_count = jobs.purge_finished(s, cutoff, include_failed=include_failed)
            send_paths, send_count = sends.purge_sent(s, cutoff)
        logger.info(
            "retention: purged %d job(s) and %d send(s) finished before %s",
            job_count,
            send_count,
            cutoff.isoformat(),
        )
        return sorted(job_paths | send_paths)
