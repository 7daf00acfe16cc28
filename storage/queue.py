"""The node's job queue, study bookkeeping and outbound sends, on SQLAlchemy 2.

One :class:`Database` object per process (it owns an engine and a connection pool; it is
safe to share between threads). Open it with :func:`open_database`. Every public method
runs in its own committed transaction: when it returns, the change is durable.

SQLite (the default) is opened in WAL mode with ``synchronous=FULL`` (a commit survives
power loss), a busy timeout and foreign keys on. Every transaction starts with
``BEGIN IMMEDIATE``, so writers queue on SQLite's write lock (waiting up to the busy
timeout) instead of failing when a read transaction tries to upgrade; together with the
single ``UPDATE … WHERE id = (SELECT …) RETURNING`` of :meth:`Database.claim`, two
workers — threads or processes — never claim the same job. On PostgreSQL the claim's
sub-select takes ``FOR UPDATE SKIP LOCKED``.

Decisions
---------
Re-sends (:meth:`Database.enqueue_image`)
    The same SOP Instance UID with the same content digest is a *duplicate*: nothing is
    re-processed and the study's content is unchanged (only its ``last_received_at``
    moves, which extends the quiet period — the study is evidently still arriving). The
    same UID with a *different* digest is a changed re-send (a corrected image): the
    record points at the new file, the job is re-queued with attempts reset (a running
    worker loses its lease and gets :class:`~storage.errors.LeaseLostError` when it
    reports), and the study is re-opened so its reports are made again with
    ``report_version + 1``.
Attempts and expired leases
    A claim is an attempt. A job whose lease expired (its worker died or hung) counts
    that attempt: a job that kills its worker (out of memory on a huge image, a crashing
    decoder) must not loop forever. It goes back to the queue with the same back-off as
    a failure, or to ``failed`` once ``max_attempts`` is used up. A worker shutting down
    cleanly calls :meth:`Database.release`, which does not count the attempt.
Sends
    Retried forever with capped exponential back-off unless the policy sets
    ``send_max_attempts``: a dead PACS delays results, never loses them.

Times are timezone-aware UTC datetimes. Every method that depends on the time takes an
optional keyword ``now`` (tests inject it); otherwise the database's clock is used.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from sqlalchemy import Engine, create_engine, event, func, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DatabaseError, IntegrityError, OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from storage.errors import (
    JobNotFoundError,
    LeaseLostError,
    SchemaVersionError,
    SendNotFoundError,
    StorageError,
    StudyNotFoundError,
)
from storage.models import (
    SEND_KINDS,
    UID_LENGTH,
    Job,
    Migration,
    Send,
    Study,
    prepare_schema,
    utcnow,
)

__all__ = [
    "ClaimedJob",
    "Database",
    "EnqueueResult",
    "JobInfo",
    "QueuePolicy",
    "SendInfo",
    "StudyDue",
    "StudyInfo",
    "open_database",
]

logger = logging.getLogger(__name__)

#: Error texts longer than this are cut (the tail is usually a repeated traceback).
MAX_ERROR_CHARS = 4000
#: Longest worker id / destination name stored.
MAX_NAME_CHARS = 128
#: Longest path stored.
MAX_PATH_CHARS = 1024

_HEX = frozenset("0123456789abcdef")
_TRUNCATED = " …[truncated]"


# --------------------------------------------------------------------------- validation


def _check_time(name: str, value: Any) -> dt.datetime:
    if not isinstance(value, dt.datetime):
        raise TypeError(f"{name} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got naive {value.isoformat()}")
    return value.astimezone(dt.UTC)


def _check_uid(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if not value or len(value) > UID_LENGTH:
        raise ValueError(f"{name} must be 1..{UID_LENGTH} characters, got {len(value)}")
    if any(c.isspace() or ord(c) < 32 for c in value):
        raise ValueError(f"{name} must not contain whitespace or control characters")
    return value


def _check_text(name: str, value: Any, *, max_chars: int, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if not value and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    if len(value) > max_chars:
        raise ValueError(f"{name} must be at most {max_chars} characters, got {len(value)}")
    return value


def _check_relpath(name: str, value: Any) -> str:
    if isinstance(value, Path | PurePosixPath):
        value = value.as_posix()
    text = _check_text(name, value, max_chars=MAX_PATH_CHARS)
    pure = PurePosixPath(text)
    if pure.is_absolute() or ".." in pure.parts or "\\" in text:
        raise ValueError(
            f"{name} must be a path relative to the file store root without '..', got {text!r}"
        )
    return pure.as_posix()


def _check_int(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_seconds(name: str, value: Any, *, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0 or (positive and seconds == 0):
        kind = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be finite and {kind}, got {value}")
    return seconds


def _cut(error: Any) -> str:
    if not isinstance(error, str):
        raise TypeError(f"error must be a str, got {type(error).__name__}")
    if len(error) > MAX_ERROR_CHARS:
        return error[: MAX_ERROR_CHARS - len(_TRUNCATED)] + _TRUNCATED
    return error


def _headline(error: str) -> str:
    # First line, short: logs get the gist, the database keeps the whole text.
    lines = error.splitlines()
    return lines[0][:200] if lines else ""


def _backoff(attempts: int, base: float, cap: float) -> dt.timedelta:
    # attempts >= 1 failures so far: base, 2 base, 4 base, ... capped.
    exponent = min(max(attempts - 1, 0), 60)
    return dt.timedelta(seconds=min(cap, base * 2.0**exponent))


# --------------------------------------------------------------------------- value types


@dataclass(frozen=True)
class QueuePolicy:
    """Retry policy of jobs and sends.

    Parameters
    ----------
    max_attempts : int
        Claims a job gets before it is ``failed`` (default 3).
    retry_base_seconds, retry_cap_seconds : float
        Job back-off after the n-th failed attempt: ``min(cap, base * 2**(n-1))``.
    send_retry_base_seconds, send_retry_cap_seconds : float
        The same for sends.
    send_max_attempts : int or None
        Failed tries after which a send is ``failed``; ``None`` (default) retries forever.
    """

    max_attempts: int = 3
    retry_base_seconds: float = 30.0
    retry_cap_seconds: float = 3600.0
    send_retry_base_seconds: float = 30.0
    send_retry_cap_seconds: float = 3600.0
    send_max_attempts: int | None = None

    def __post_init__(self) -> None:
        _check_int("max_attempts", self.max_attempts, minimum=1)
        for name in (
            "retry_base_seconds",
            "retry_cap_seconds",
            "send_retry_base_seconds",
            "send_retry_cap_seconds",
        ):
            _check_seconds(name, getattr(self, name))
        if self.retry_cap_seconds < self.retry_base_seconds:
            raise ValueError(
                f"retry_cap_seconds ({self.retry_cap_seconds}) must be >= "
                f"retry_base_seconds ({self.retry_base_seconds})"
            )
        if self.send_retry_cap_seconds < self.send_retry_base_seconds:
            raise ValueError(
                f"send_retry_cap_seconds ({self.send_retry_cap_seconds}) must be >= "
                f"send_retry_base_seconds ({self.send_retry_base_seconds})"
            )
        if self.send_max_attempts is not None:
            _check_int("send_max_attempts", self.send_max_attempts, minimum=1)

    def job_backoff(self, attempts: int) -> dt.timedelta:
        """Delay before the next try of a job that has failed ``attempts`` times."""
        return _backoff(attempts, self.retry_base_seconds, self.retry_cap_seconds)

    def send_backoff(self, attempts: int) -> dt.timedelta:
        """Delay before the next try of a send that has failed ``attempts`` times."""
        return _backoff(attempts, self.send_retry_base_seconds, self.send_retry_cap_seconds)


EnqueueOutcome = Literal["new", "duplicate", "replaced"]


@dataclass(frozen=True)
class EnqueueResult:
    """What :meth:`Database.enqueue_image` did.

    Attributes
    ----------
    job_id : int
        The instance's job (the same id for a duplicate or a replacement).
    outcome : {"new", "duplicate", "replaced"}
        See :meth:`Database.enqueue_image`.
    obsolete_path : str or None
        A stored file (relative to the store root) no record points at any more, which
        the caller should remove: the previous file of a replacement stored under another
        path, or the redundant new copy of a duplicate stored under another path.
        ``None`` when the paths are the same (the usual case: layout is by UID).
    """

    job_id: int
    outcome: EnqueueOutcome
    obsolete_path: str | None = None


@dataclass(frozen=True)
class ClaimedJob:
    """A job a worker holds a lease on. ``path`` is relative to the file store root."""

    job_id: int
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    path: str
    digest: str
    size: int
    attempt: int
    max_attempts: int
    lease_expires_at: dt.datetime


@dataclass(frozen=True)
class JobInfo:
    """A snapshot of one job row (no patient data: UIDs, paths, states, times)."""

    job_id: int
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    path: str
    digest: str
    size: int
    calling_aet: str
    received_at: dt.datetime
    state: str
    attempts: int
    max_attempts: int
    lease_owner: str | None
    lease_expires_at: dt.datetime | None
    next_attempt_at: dt.datetime
    last_error: str | None
    result: dict[str, Any] | None
    updated_at: dt.datetime


@dataclass(frozen=True)
class StudyInfo:
    """A snapshot of one study row."""

    study_instance_uid: str
    state: str
    image_count: int
    content_generation: int
    report_version: int
    first_received_at: dt.datetime
    last_received_at: dt.datetime
    reported_at: dt.datetime | None
    last_report_at: dt.datetime | None


@dataclass(frozen=True)
class StudyDue:
    """A study whose reports should be made now.

    Attributes
    ----------
    study_instance_uid : str
        The study.
    version : int
        The report version to make (``report_version + 1``); pass it back to
        :meth:`Database.mark_study_reported`.
    generation : int
        The study's content generation the decision was made at; pass it back too, so an
        image that arrives while the report is built re-opens the study.
    image_count, done_count, failed_count : int
        Images in the study, and how many of their jobs are done / failed.
    first_received_at, last_received_at : datetime
        Arrival of the study's first and latest image.
    """

    study_instance_uid: str
    version: int
    generation: int
    image_count: int
    done_count: int
    failed_count: int
    first_received_at: dt.datetime
    last_received_at: dt.datetime


@dataclass(frozen=True)
class SendInfo:
    """One outbound C-STORE. ``object_path`` is relative to the file store root."""

    send_id: int
    destination: str
    object_path: str
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    kind: str
    state: str
    attempts: int
    next_try_at: dt.datetime
    last_status: int | None
    last_error: str | None
    created_at: dt.datetime
    sent_at: dt.datetime | None


def _job_info(job: Job) -> JobInfo:
    return JobInfo(
        job_id=job.id,
        sop_instance_uid=job.sop_instance_uid,
        study_instance_uid=job.study_instance_uid,
        series_instance_uid=job.series_instance_uid,
        sop_class_uid=job.sop_class_uid,
        path=job.path,
        digest=job.digest,
        size=job.size_bytes,
        calling_aet=job.calling_aet,
        received_at=job.received_at,
        state=job.state,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        lease_owner=job.lease_owner,
        lease_expires_at=job.lease_expires_at,
        next_attempt_at=job.next_attempt_at,
        last_error=job.last_error,
        result=dict(job.result) if job.result is not None else None,
        updated_at=job.updated_at,
    )


def _study_info(study: Study) -> StudyInfo:
    return StudyInfo(
        study_instance_uid=study.study_instance_uid,
        state=study.state,
        image_count=study.image_count,
        content_generation=study.content_generation,
        report_version=study.report_version,
        first_received_at=study.first_received_at,
        last_received_at=study.last_received_at,
        reported_at=study.reported_at,
        last_report_at=study.last_report_at,
    )


def _send_info(send: Send) -> SendInfo:
    return SendInfo(
        send_id=send.id,
        destination=send.destination,
        object_path=send.object_path,
        sop_class_uid=send.sop_class_uid,
        sop_instance_uid=send.sop_instance_uid,
        study_instance_uid=send.study_instance_uid,
        kind=send.kind,
        state=send.state,
        attempts=send.attempts,
        next_try_at=send.next_try_at,
        last_status=send.last_status,
        last_error=send.last_error,
        created_at=send.created_at,
        sent_at=send.sent_at,
    )


# --------------------------------------------------------------------------- engine


def _counts(s: Session, column: Any, states: Sequence[str]) -> dict[str, int]:
    counts = dict.fromkeys(states, 0)
    for state, n in s.execute(select(column, func.count()).group_by(column)):
        counts[state] = n
    return counts


def _is_memory_sqlite(database: str | None) -> bool:
    return not database or database == ":memory:" or "mode=memory" in database


def _make_engine(url: str, *, create: bool, busy_timeout_seconds: float) -> Engine:
    parsed = make_url(url)
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


def open_database(
    url: str,
    *,
    create: bool = True,
    policy: QueuePolicy | None = None,
    busy_timeout_seconds: float = 30.0,
    clock: Callable[[], dt.datetime] | None = None,
    migrations: Sequence[Migration] | None = None,
    schema_target: int | None = None,
) -> Database:
    """Open (and create or migrate) the node's database.

    Parameters
    ----------
    url : str
        SQLAlchemy URL, e.g. ``"sqlite:////var/lib/calcnode/node.db"``. ``"sqlite://"``
        is an in-memory database (tests only: one connection, no WAL).
    create : bool
        Create the file and schema when the database is empty; else refuse it.
    policy : QueuePolicy or None
        Retry policy; the defaults of :class:`QueuePolicy` when ``None``.
    busy_timeout_seconds : float
        How long a transaction waits for SQLite's write lock before failing.
    clock : callable or None
        Returns the current aware UTC datetime; :func:`storage.models.utcnow` when None.
    migrations, schema_target : optional
        Override the upgrade steps and expected version (tests of the upgrade path).

    Returns
    -------
    Database

    Raises
    ------
    SchemaVersionError
        The database is newer than this code, is not a calcnode database (including a
        file that is not a database at all), or is missing/empty while ``create`` is false.
    """
    if not isinstance(url, str) or not url:
        raise TypeError(f"url must be a non-empty str, got {url!r}")
    _check_seconds("busy_timeout_seconds", busy_timeout_seconds)
    if policy is not None and not isinstance(policy, QueuePolicy):
        raise TypeError(f"policy must be a QueuePolicy, got {type(policy).__name__}")
    engine = _make_engine(url, create=create, busy_timeout_seconds=busy_timeout_seconds)
    schema_kwargs: dict[str, Any] = {"create": create}
    if migrations is not None:
        schema_kwargs["migrations"] = migrations
    if schema_target is not None:
        schema_kwargs["target"] = schema_target
    try:
        prepare_schema(engine, **schema_kwargs)
    except DatabaseError as exc:
        engine.dispose()
        raise SchemaVersionError(
            f"{_display_url(url)} is not a calcnode database: {exc.orig}"
        ) from exc
    except BaseException:
        engine.dispose()
        raise
    logger.info("opened database %s", _display_url(url))
    return Database(engine, policy=policy, clock=clock)


# --------------------------------------------------------------------------- database


class Database:
    """The node's durable state: jobs, studies and sends.

    Use :func:`open_database` to make one; one per process, shared by its threads. A
    ``Database`` inherited through ``fork`` notices the new process id and opens fresh
    connections (it never reuses the parent's).

    Parameters
    ----------
    engine : Engine
        An engine whose schema :func:`storage.models.prepare_schema` has checked.
    policy : QueuePolicy or None
        Retry policy of jobs and sends.
    clock : callable or None
        Returns the current aware UTC datetime.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        policy: QueuePolicy | None = None,
        clock: Callable[[], dt.datetime] | None = None,
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

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for diagnostics; use the methods to change state)."""
        return self._engine

    def close(self) -> None:
        """Close the pooled connections."""
        self._engine.dispose()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _now(self, now: dt.datetime | None) -> dt.datetime:
        return _check_time("now", self._clock() if now is None else now)

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        if os.getpid() != self._pid:
            # Forked: the parent's connections must not be used (nor closed) here, and a
            # lock another parent thread held at the fork would stay locked forever.
            self._engine.dispose(close=False)
            self._serial = threading.Lock() if self._serial is not None else None
            self._pid = os.getpid()
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
            raise StorageError(f"database operation failed: {exc.orig}") from exc

    # ------------------------------------------------------------------ enqueue

    def enqueue_image(
        self,
        *,
        sop_instance_uid: str,
        study_instance_uid: str,
        series_instance_uid: str,
        sop_class_uid: str,
        path: str | PurePosixPath,
        digest: str,
        size: int,
        calling_aet: str,
        now: dt.datetime | None = None,
    ) -> EnqueueResult:
        """Record a received, durably stored instance and queue its job.

        Call this after the file is written (see ``FileStore.write_atomic``) and before
        answering the C-STORE: when it returns, the record is committed.

        - A new SOP Instance UID → a new queued job, outcome ``"new"``.
        - A known UID with the same ``digest`` → ``"duplicate"``: stored and processed
          once, no new job, no change of the study's content (its ``last_received_at``
          moves: the study is still arriving).
        - A known UID with a different ``digest`` (a changed re-send) → ``"replaced"``:
          the record points at the new file, the job is queued again with attempts reset
          (a worker holding it loses its lease), and the study — the old one too, if the
          instance moved — is re-opened so its reports are made again with a new version.

        Parameters
        ----------
        sop_instance_uid, study_instance_uid, series_instance_uid, sop_class_uid : str
            The instance's UIDs (1..64 characters).
        path : str
            Stored file, relative to the file store root.
        digest : str
            SHA-256 of the stored file, 64 lowercase hex digits.
        size : int
            Stored size in bytes.
        calling_aet : str
            The sender's AE title (up to 16 characters; may be empty).
        now : datetime or None
            Receipt time (aware); the clock when None.

        Returns
        -------
        EnqueueResult
        """
        sop = _check_uid("sop_instance_uid", sop_instance_uid)
        study_uid = _check_uid("study_instance_uid", study_instance_uid)
        series_uid = _check_uid("series_instance_uid", series_instance_uid)
        sop_class = _check_uid("sop_class_uid", sop_class_uid)
        relpath = _check_relpath("path", path)
        if not isinstance(digest, str):
            raise TypeError(f"digest must be a str, got {type(digest).__name__}")
        if len(digest) != 64 or not set(digest) <= _HEX:
            raise ValueError(f"digest must be 64 lowercase hex digits (SHA-256), got {digest!r}")
        _check_int("size", size, minimum=0)
        aet = _check_text("calling_aet", calling_aet, max_chars=16, allow_empty=True)
        now = self._now(now)

        for attempt in range(3):
            try:
                with self._tx() as s:
                    return self._enqueue(
                        s,
                        sop=sop,
                        study_uid=study_uid,
                        series_uid=series_uid,
                        sop_class=sop_class,
                        relpath=relpath,
                        digest=digest,
                        size=size,
                        aet=aet,
                        now=now,
                    )
            except IntegrityError:
                # Another connection inserted the same UID first (possible on servers
                # without BEGIN IMMEDIATE); the next round sees its row.
                if attempt == 2:
                    raise
                logger.debug("enqueue of %s raced another insert; retrying", sop)
        raise AssertionError("unreachable")  # pragma: no cover

    def _enqueue(
        self,
        s: Session,
        *,
        sop: str,
        study_uid: str,
        series_uid: str,
        sop_class: str,
        relpath: str,
        digest: str,
        size: int,
        aet: str,
        now: dt.datetime,
    ) -> EnqueueResult:
        job = s.scalars(select(Job).where(Job.sop_instance_uid == sop)).one_or_none()
        if job is None:
            self._touch_study(s, study_uid, now, content_changed=True, image_delta=1)
            job = Job(
                sop_instance_uid=sop,
                study_instance_uid=study_uid,
                series_instance_uid=series_uid,
                sop_class_uid=sop_class,
                path=relpath,
                digest=digest,
                size_bytes=size,
                received_at=now,
                calling_aet=aet,
                state="queued",
                attempts=0,
                max_attempts=self.policy.max_attempts,
                next_attempt_at=now,
                created_at=now,
                updated_at=now,
            )
            s.add(job)
            s.flush()
            logger.info("job %d queued for SOP Instance %s (study %s)", job.id, sop, study_uid)
            return EnqueueResult(job_id=job.id, outcome="new")

        if job.digest == digest:
            self._touch_study(s, job.study_instance_uid, now, content_changed=False)
            logger.info("job %d: duplicate of SOP Instance %s ignored", job.id, sop)
            obsolete = relpath if relpath != job.path else None
            return EnqueueResult(job_id=job.id, outcome="duplicate", obsolete_path=obsolete)

        old_study = job.study_instance_uid
        old_path = job.path
        was = job.state
        if old_study != study_uid:
            self._touch_study(s, old_study, now, content_changed=True, image_delta=-1)
            self._touch_study(s, study_uid, now, content_changed=True, image_delta=1)
        else:
            self._touch_study(s, study_uid, now, content_changed=True)
        job.study_instance_uid = study_uid
        job.series_instance_uid = series_uid
        job.sop_class_uid = sop_class
        job.path = relpath
        job.digest = digest
        job.size_bytes = size
        job.received_at = now
        job.calling_aet = aet
        job.state = "queued"
        job.attempts = 0
        job.max_attempts = self.policy.max_attempts
        job.lease_owner = None
        job.lease_expires_at = None
        job.next_attempt_at = now
        job.last_error = None
        job.result = None
        job.updated_at = now
        logger.info(
            "job %d re-queued: SOP Instance %s re-sent with different content (was %s)",
            job.id,
            sop,
            was,
        )
        obsolete = old_path if old_path != relpath else None
        return EnqueueResult(job_id=job.id, outcome="replaced", obsolete_path=obsolete)

    def _touch_study(
        self,
        s: Session,
        study_uid: str,
        now: dt.datetime,
        *,
        content_changed: bool,
        image_delta: int = 0,
    ) -> Study:
        study = s.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one_or_none()
        if study is None:
            study = Study(
                study_instance_uid=study_uid,
                first_received_at=now,
                last_received_at=now,
                image_count=0,
                state="open",
                content_generation=0,
                report_version=0,
            )
            s.add(study)
            s.flush()
        study.last_received_at = max(study.last_received_at, now)
        study.image_count = max(0, study.image_count + image_delta)
        if content_changed:
            study.content_generation += 1
            if study.state != "open":
                logger.info("study %s re-opened: its content changed", study_uid)
            study.state = "open"
        return study

    # ------------------------------------------------------------------ jobs

    def claim(
        self, worker_id: str, *, lease_seconds: float, now: dt.datetime | None = None
    ) -> ClaimedJob | None:
        """Atomically take the next queued job whose time has come, or ``None``.

        Jobs are taken in order of ``next_attempt_at`` (arrival for new jobs), then id.
        Two callers — threads or processes — never get the same job. The claim counts
        as an attempt.

        Parameters
        ----------
        worker_id : str
            Names the lease holder (e.g. ``"host:pid:n"``); up to 128 characters.
        lease_seconds : float
            The lease lasts this long; extend it with :meth:`extend_lease`.
        now : datetime or None
            Current time (aware).
        """
        worker = _check_text("worker_id", worker_id, max_chars=MAX_NAME_CHARS)
        lease = _check_seconds("lease_seconds", lease_seconds)
        now = self._now(now)
        next_id = (
            select(Job.id)
            .where(Job.state == "queued", Job.next_attempt_at <= now)
            .order_by(Job.next_attempt_at, Job.id)
            .limit(1)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        expires = now + dt.timedelta(seconds=lease)
        stmt = (
            update(Job)
            .where(Job.id == next_id, Job.state == "queued")
            .values(
                state="running",
                lease_owner=worker,
                lease_expires_at=expires,
                attempts=Job.attempts + 1,
                updated_at=now,
            )
            .returning(
                Job.id,
                Job.sop_instance_uid,
                Job.study_instance_uid,
                Job.series_instance_uid,
                Job.sop_class_uid,
                Job.path,
                Job.digest,
                Job.size_bytes,
                Job.attempts,
                Job.max_attempts,
            )
            .execution_options(synchronize_session=False)
        )
        with self._tx() as s:
            row = s.execute(stmt).one_or_none()
        if row is None:
            return None
        logger.info("job %d claimed by %s (attempt %d/%d)", row[0], worker, row[8], row[9])
        return ClaimedJob(
            job_id=row[0],
            sop_instance_uid=row[1],
            study_instance_uid=row[2],
            series_instance_uid=row[3],
            sop_class_uid=row[4],
            path=row[5],
            digest=row[6],
            size=row[7],
            attempt=row[8],
            max_attempts=row[9],
            lease_expires_at=expires,
        )

    def _owned_job(self, s: Session, job_id: int, worker_id: str) -> Job:
        _check_int("job_id", job_id, minimum=1)
        _check_text("worker_id", worker_id, max_chars=MAX_NAME_CHARS)
        job = s.get(Job, job_id)
        if job is None:
            raise JobNotFoundError(f"no job with id {job_id}")
        if job.state != "running" or job.lease_owner != worker_id:
            holder = job.lease_owner if job.state == "running" else None
            raise LeaseLostError(
                f"job {job_id} is no longer leased to worker {worker_id!r} "
                f"(state {job.state}, lease holder {holder!r}): discard its result"
            )
        return job

    def extend_lease(
        self,
        job_id: int,
        worker_id: str,
        *,
        lease_seconds: float,
        now: dt.datetime | None = None,
    ) -> dt.datetime:
        """Extend the lease of a job the worker holds to ``now + lease_seconds``.

        A lease that has expired but not yet been recovered can still be extended: no
        one else holds the job.

        Returns
        -------
        datetime
            The new expiry.

        Raises
        ------
        JobNotFoundError
            No such job.
        LeaseLostError
            The worker no longer holds the job.
        """
        lease = _check_seconds("lease_seconds", lease_seconds)
        now = self._now(now)
        with self._tx() as s:
            job = self._owned_job(s, job_id, worker_id)
            job.lease_expires_at = now + dt.timedelta(seconds=lease)
            job.updated_at = now
            return job.lease_expires_at

    def complete(
        self,
        job_id: int,
        worker_id: str,
        *,
        result: Mapping[str, Any],
        now: dt.datetime | None = None,
    ) -> None:
        """Mark a held job done and store the worker's JSON summary.

        By convention ``result["paths"]`` lists produced files relative to the store
        root (:meth:`purge_done_before` returns them for removal).

        Raises
        ------
        TypeError
            ``result`` is not a JSON-serialisable mapping.
        JobNotFoundError, LeaseLostError
            As for :meth:`extend_lease`: a worker whose lease was taken over must not
            complete the job.
        """
        if not isinstance(result, Mapping):
            raise TypeError(f"result must be a mapping, got {type(result).__name__}")
        try:
            payload = json.loads(json.dumps(dict(result), allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"result must be JSON-serialisable: {exc}") from exc
        now = self._now(now)
        with self._tx() as s:
            job = self._owned_job(s, job_id, worker_id)
            job.state = "done"
            job.result = payload
            job.lease_owner = None
            job.lease_expires_at = None
            job.last_error = None
            job.updated_at = now
        logger.info("job %d done by %s", job_id, worker_id)

    def fail(
        self,
        job_id: int,
        worker_id: str,
        *,
        error: str,
        retry: bool = True,
        now: dt.datetime | None = None,
    ) -> str:
        """Record a failed attempt of a held job.

        With ``retry`` and attempts left, the job is queued again after
        ``policy.job_backoff(attempts)``; otherwise it is ``failed`` with the error kept.
        Use ``retry=False`` for failures that cannot go away (not a mammogram).

        Parameters
        ----------
        error : str
            What went wrong, without patient data (cut to 4000 characters).

        Returns
        -------
        str
            The job's new state, ``"queued"`` or ``"failed"``.

        Raises
        ------
        JobNotFoundError, LeaseLostError
            As for :meth:`extend_lease`.
        """
        text = _cut(error)
        now = self._now(now)
        with self._tx() as s:
            job = self._owned_job(s, job_id, worker_id)
            job.last_error = text
            job.lease_owner = None
            job.lease_expires_at = None
            job.updated_at = now
            if retry and job.attempts < job.max_attempts:
                job.state = "queued"
                job.next_attempt_at = now + self.policy.job_backoff(job.attempts)
                logger.warning(
                    "job %d attempt %d/%d failed, retry at %s: %s",
                    job_id,
                    job.attempts,
                    job.max_attempts,
                    job.next_attempt_at.isoformat(),
                    _headline(text),
                )
            else:
                job.state = "failed"
                logger.error(
                    "job %d failed after %d attempt(s): %s",
                    job_id,
                    job.attempts,
                    _headline(text),
                )
            return job.state

    def release(self, job_id: int, worker_id: str, *, now: dt.datetime | None = None) -> None:
        """Give a held job back without counting the attempt (clean worker shutdown).

        Raises
        ------
        JobNotFoundError, LeaseLostError
            As for :meth:`extend_lease`.
        """
        now = self._now(now)
        with self._tx() as s:
            job = self._owned_job(s, job_id, worker_id)
            job.state = "queued"
            job.attempts = max(0, job.attempts - 1)
            job.lease_owner = None
            job.lease_expires_at = None
            job.next_attempt_at = now
            job.updated_at = now
        logger.info("job %d released by %s", job_id, worker_id)

    def recover_expired_leases(self, *, now: dt.datetime | None = None) -> list[int]:
        """Take running jobs whose lease expired away from their (dead or hung) workers.

        The expired attempt counts: the job is queued again after the usual back-off,
        or ``failed`` when its attempts are used up; ``last_error`` says the lease
        expired. The old worker then gets :class:`LeaseLostError` if it reports.

        Returns
        -------
        list of int
            Ids of the recovered jobs (re-queued or failed), ascending.
        """
        now = self._now(now)
        recovered: list[int] = []
        with self._tx() as s:
            jobs = s.scalars(
                select(Job)
                .where(Job.state == "running", Job.lease_expires_at < now)
                .order_by(Job.id)
            ).all()
            for job in jobs:
                expired = job.lease_expires_at.isoformat() if job.lease_expires_at else "?"
                job.last_error = (
                    f"lease of worker {job.lease_owner!r} expired at {expired} "
                    f"(attempt {job.attempts}/{job.max_attempts}; worker died or hung)"
                )
                job.lease_owner = None
                job.lease_expires_at = None
                job.updated_at = now
                if job.attempts < job.max_attempts:
                    job.state = "queued"
                    job.next_attempt_at = now + self.policy.job_backoff(job.attempts)
                else:
                    job.state = "failed"
                recovered.append(job.id)
                logger.warning("job %d: %s -> %s", job.id, job.last_error, job.state)
        return recovered

    def retry_job(self, job_id: int, *, now: dt.datetime | None = None) -> None:
        """Admin: queue a failed (or done) job again now, with attempts reset.

        The job's study is re-opened (its reports will change). ``last_error`` is kept
        until the job succeeds.

        Raises
        ------
        JobNotFoundError
            No such job.
        ValueError
            The job is running (recover its lease first).
        """
        _check_int("job_id", job_id, minimum=1)
        now = self._now(now)
        with self._tx() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise JobNotFoundError(f"no job with id {job_id}")
            if job.state == "running":
                raise ValueError(
                    f"job_id {job_id} is running (lease holder {job.lease_owner!r}); "
                    "wait for it or recover its lease first"
                )
            if job.state in ("done", "failed"):
                study = s.scalars(
                    select(Study).where(Study.study_instance_uid == job.study_instance_uid)
                ).one()
                study.content_generation += 1
                study.state = "open"
            job.state = "queued"
            job.attempts = 0
            job.max_attempts = self.policy.max_attempts
            job.next_attempt_at = now
            job.result = None
            job.updated_at = now
        logger.info("job %d re-queued by admin", job_id)

    def get_job(self, job_id: int) -> JobInfo:
        """Return a snapshot of one job.

        Raises
        ------
        JobNotFoundError
            No such job.
        """
        _check_int("job_id", job_id, minimum=1)
        with self._tx() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise JobNotFoundError(f"no job with id {job_id}")
            return _job_info(job)

    # ------------------------------------------------------------------ studies

    def due_studies(
        self, *, quiet_seconds: float, now: dt.datetime | None = None
    ) -> list[StudyDue]:
        """Studies whose reports should be made now.

        A study is due when no image arrived for ``quiet_seconds``, it has at least one
        job and all its jobs are ``done`` or ``failed``, and its current content has not
        been reported (``state == "open"``). Oldest quiet first.
        """
        quiet = _check_seconds("quiet_seconds", quiet_seconds, positive=False)
        now = self._now(now)
        threshold = now - dt.timedelta(seconds=quiet)
        busy = (
            select(Job.id)
            .where(
                Job.study_instance_uid == Study.study_instance_uid,
                Job.state.in_(("queued", "running")),
            )
            .exists()
        )
        has_jobs = select(Job.id).where(Job.study_instance_uid == Study.study_instance_uid)
        with self._tx() as s:
            studies = s.scalars(
                select(Study)
                .where(
                    Study.state == "open",
                    Study.last_received_at <= threshold,
                    ~busy,
                    has_jobs.exists(),
                )
                .order_by(Study.last_received_at, Study.id)
            ).all()
            if not studies:
                return []
            uids = [st.study_instance_uid for st in studies]
            counts: dict[tuple[str, str], int] = {}
            for uid, state, n in s.execute(
                select(Job.study_instance_uid, Job.state, func.count())
                .where(Job.study_instance_uid.in_(uids))
                .group_by(Job.study_instance_uid, Job.state)
            ):
                counts[(uid, state)] = n
            return [
                StudyDue(
                    study_instance_uid=st.study_instance_uid,
                    version=st.report_version + 1,
                    generation=st.content_generation,
                    image_count=st.image_count,
                    done_count=counts.get((st.study_instance_uid, "done"), 0),
                    failed_count=counts.get((st.study_instance_uid, "failed"), 0),
                    first_received_at=st.first_received_at,
                    last_received_at=st.last_received_at,
                )
                for st in studies
            ]

    def mark_study_reported(
        self,
        study_instance_uid: str,
        version: int,
        *,
        generation: int | None = None,
        now: dt.datetime | None = None,
    ) -> bool:
        """Record that the study's reports were made at ``version``.

        Parameters
        ----------
        study_instance_uid : str
            The study.
        version : int
            The version made (``StudyDue.version``); must be above the last one.
        generation : int or None
            ``StudyDue.generation``. When the study's content changed since (an image
            arrived while the report was built), the version is recorded but the study
            stays open, so it is due again with the next version.
        now : datetime or None
            Current time (aware).

        Returns
        -------
        bool
            True when the study is now ``reported``, False when it stays open.

        Raises
        ------
        StudyNotFoundError
            No such study.
        ValueError
            ``version`` is not above the last reported version.
        """
        uid = _check_uid("study_instance_uid", study_instance_uid)
        _check_int("version", version, minimum=1)
        if generation is not None:
            _check_int("generation", generation, minimum=0)
        now = self._now(now)
        with self._tx() as s:
            study = s.scalars(select(Study).where(Study.study_instance_uid == uid)).one_or_none()
            if study is None:
                raise StudyNotFoundError(f"no study with Study Instance UID {uid}")
            if version <= study.report_version:
                raise ValueError(
                    f"version {version} is not above the last reported version "
                    f"{study.report_version} of study {uid}"
                )
            study.report_version = version
            if study.reported_at is None:
                study.reported_at = now
            study.last_report_at = now
            if generation is not None and generation != study.content_generation:
                study.state = "open"
                logger.info(
                    "study %s reported at version %d, but its content changed meanwhile: "
                    "stays open",
                    uid,
                    version,
                )
                return False
            study.state = "reported"
        logger.info("study %s reported at version %d", uid, version)
        return True

    def get_study(self, study_instance_uid: str) -> StudyInfo:
        """Return a snapshot of one study.

        Raises
        ------
        StudyNotFoundError
            No such study.
        """
        uid = _check_uid("study_instance_uid", study_instance_uid)
        with self._tx() as s:
            study = s.scalars(select(Study).where(Study.study_instance_uid == uid)).one_or_none()
            if study is None:
                raise StudyNotFoundError(f"no study with Study Instance UID {uid}")
            return _study_info(study)

    def study_jobs(self, study_instance_uid: str) -> list[JobInfo]:
        """The jobs of one study, by series UID then job id (empty for an unknown study)."""
        uid = _check_uid("study_instance_uid", study_instance_uid)
        with self._tx() as s:
            jobs = s.scalars(
                select(Job)
                .where(Job.study_instance_uid == uid)
                .order_by(Job.series_instance_uid, Job.id)
            ).all()
            return [_job_info(job) for job in jobs]

    # ------------------------------------------------------------------ sends

    def add_send(
        self,
        *,
        destination: str,
        object_path: str | PurePosixPath,
        sop_class_uid: str,
        sop_instance_uid: str,
        study_instance_uid: str,
        kind: str,
        now: dt.datetime | None = None,
    ) -> int:
        """Queue a produced object for C-STORE to a destination, due now.

        Idempotent per (destination, SOP Instance UID): adding it again returns the
        existing send's id and changes nothing.

        Parameters
        ----------
        destination : str
            Configured destination name (up to 128 characters).
        object_path : str
            The object's file, relative to the file store root.
        sop_class_uid, sop_instance_uid, study_instance_uid : str
            The object's UIDs.
        kind : {"cad-sr", "tid1500-sr", "seg", "gsps"}
            What the object is.

        Returns
        -------
        int
            The send id.
        """
        dest = _check_text("destination", destination, max_chars=MAX_NAME_CHARS)
        relpath = _check_relpath("object_path", object_path)
        sop_class = _check_uid("sop_class_uid", sop_class_uid)
        sop = _check_uid("sop_instance_uid", sop_instance_uid)
        study = _check_uid("study_instance_uid", study_instance_uid)
        if kind not in SEND_KINDS:
            raise ValueError(f"kind must be one of {SEND_KINDS}, got {kind!r}")
        now = self._now(now)
        with self._tx() as s:
            existing = s.scalars(
                select(Send).where(Send.destination == dest, Send.sop_instance_uid == sop)
            ).one_or_none()
            if existing is not None:
                return existing.id
            send = Send(
                destination=dest,
                object_path=relpath,
                sop_class_uid=sop_class,
                sop_instance_uid=sop,
                study_instance_uid=study,
                kind=kind,
                state="pending",
                attempts=0,
                next_try_at=now,
                created_at=now,
                updated_at=now,
            )
            s.add(send)
            s.flush()
            send_id = send.id
        logger.info("send %d queued: %s %s to %s", send_id, kind, sop, dest)
        return send_id

    def due_sends(
        self,
        *,
        now: dt.datetime | None = None,
        destination: str | None = None,
        limit: int = 100,
    ) -> list[SendInfo]:
        """Pending sends whose time has come, oldest due first.

        Sends are not leased: one scheduler in the node sends them.
        """
        _check_int("limit", limit, minimum=1)
        now = self._now(now)
        stmt = select(Send).where(Send.state == "pending", Send.next_try_at <= now)
        if destination is not None:
            stmt = stmt.where(
                Send.destination
                == _check_text("destination", destination, max_chars=MAX_NAME_CHARS)
            )
        with self._tx() as s:
            sends = s.scalars(stmt.order_by(Send.next_try_at, Send.id).limit(limit)).all()
            return [_send_info(send) for send in sends]

    def _get_send(self, s: Session, send_id: int) -> Send:
        _check_int("send_id", send_id, minimum=1)
        send = s.get(Send, send_id)
        if send is None:
            raise SendNotFoundError(f"no send with id {send_id}")
        return send

    def mark_sent(
        self, send_id: int, *, status: int = 0x0000, now: dt.datetime | None = None
    ) -> None:
        """Record a successful C-STORE (``status`` 0x0000 or a warning 0xB000-0xB007).

        Raises
        ------
        SendNotFoundError
            No such send.
        """
        _check_int("status", status, minimum=0)
        now = self._now(now)
        with self._tx() as s:
            send = self._get_send(s, send_id)
            send.state = "sent"
            send.attempts += 1
            send.last_status = status
            send.sent_at = now
            send.updated_at = now
        logger.info("send %d done (status 0x%04X)", send_id, status)

    def mark_send_failed(
        self,
        send_id: int,
        *,
        error: str,
        status: int | None = None,
        retry: bool = True,
        now: dt.datetime | None = None,
    ) -> str:
        """Record a failed C-STORE try and schedule the next one.

        The next try is ``policy.send_backoff(attempts)`` later. A send is ``failed``
        only when ``retry`` is false or ``policy.send_max_attempts`` is set and reached.

        Parameters
        ----------
        error : str
            What went wrong (association refused, status text), without patient data.
        status : int or None
            The DIMSE status when the peer answered, None for a network failure.

        Returns
        -------
        str
            The send's new state, ``"pending"`` or ``"failed"``.

        Raises
        ------
        SendNotFoundError
            No such send.
        ValueError
            The send was already sent.
        """
        text = _cut(error)
        if status is not None:
            _check_int("status", status, minimum=0)
        now = self._now(now)
        limit = self.policy.send_max_attempts
        with self._tx() as s:
            send = self._get_send(s, send_id)
            if send.state == "sent":
                raise ValueError(f"send_id {send_id} was already sent; it cannot fail now")
            send.attempts += 1
            send.last_error = text
            send.last_status = status
            send.updated_at = now
            if not retry or (limit is not None and send.attempts >= limit):
                send.state = "failed"
                logger.error("send %d failed for good after %d tries", send_id, send.attempts)
            else:
                send.state = "pending"
                send.next_try_at = now + self.policy.send_backoff(send.attempts)
                logger.warning(
                    "send %d try %d failed, next at %s",
                    send_id,
                    send.attempts,
                    send.next_try_at.isoformat(),
                )
            return send.state

    def retry_send(self, send_id: int, *, now: dt.datetime | None = None) -> None:
        """Admin: make a send pending and due now, with its try count reset.

        Raises
        ------
        SendNotFoundError
            No such send.
        """
        now = self._now(now)
        with self._tx() as s:
            send = self._get_send(s, send_id)
            send.state = "pending"
            send.attempts = 0
            send.next_try_at = now
            send.updated_at = now

    def get_send(self, send_id: int) -> SendInfo:
        """Return a snapshot of one send.

        Raises
        ------
        SendNotFoundError
            No such send.
        """
        with self._tx() as s:
            return _send_info(self._get_send(s, send_id))

    # ------------------------------------------------------------------ admin

    def status_summary(self, *, recent_errors: int = 10) -> dict[str, Any]:
        """Counts and recent errors for health checks and ``calcnode status``.

        No patient data: states, counts, job/send ids, UIDs, times and error texts.

        Returns
        -------
        dict
            ``{"jobs": {state: n}, "sends": {state: n}, "studies": {state: n},
            "recent_errors": [{"kind", "id", "uid", "state", "attempts", "at",
            "error"}, ...]}``, errors newest first, texts cut to 300 characters.
        """
        _check_int("recent_errors", recent_errors, minimum=0)
        with self._tx() as s:
            jobs = _counts(s, Job.state, ("queued", "running", "done", "failed"))
            sends = _counts(s, Send.state, ("pending", "sent", "failed"))
            studies = _counts(s, Study.state, ("open", "reported"))
            errors: list[dict[str, Any]] = []
            if recent_errors:
                for job in s.scalars(
                    select(Job)
                    .where(Job.last_error.is_not(None))
                    .order_by(Job.updated_at.desc(), Job.id.desc())
                    .limit(recent_errors)
                ):
                    errors.append(
                        {
                            "kind": "job",
                            "id": job.id,
                            "uid": job.sop_instance_uid,
                            "state": job.state,
                            "attempts": job.attempts,
                            "at": job.updated_at.isoformat(),
                            "error": (job.last_error or "")[:300],
                        }
                    )
                for send in s.scalars(
                    select(Send)
                    .where(Send.last_error.is_not(None), Send.state != "sent")
                    .order_by(Send.updated_at.desc(), Send.id.desc())
                    .limit(recent_errors)
                ):
                    errors.append(
                        {
                            "kind": "send",
                            "id": send.id,
                            "uid": send.sop_instance_uid,
                            "state": send.state,
                            "attempts": send.attempts,
                            "at": send.updated_at.isoformat(),
                            "error": (send.last_error or "")[:300],
                        }
                    )
            errors.sort(key=lambda e: e["at"], reverse=True)
        return {
            "jobs": jobs,
            "sends": sends,
            "studies": studies,
            "recent_errors": errors[:recent_errors],
        }

    def purge_done_before(self, cutoff: dt.datetime, *, include_failed: bool = False) -> list[str]:
        """Retention: delete old finished rows and return the files to remove.

        Deletes jobs ``done`` (and ``failed`` with ``include_failed``) last updated
        before ``cutoff`` whose study is ``reported`` (an open study still needs its
        jobs' results), and sends ``sent`` before ``cutoff``. Study rows stay (they hold
        only UIDs and the report version, so a late image gets the next version).

        Returns
        -------
        list of str
            Sorted, de-duplicated paths relative to the store root: the purged jobs'
            images, the paths listed in their ``result["paths"]``, and the purged sends'
            objects that no remaining send refers to. Remove them with
            ``FileStore.remove``; then ``FileStore.purge_empty_dirs``.
        """
        cutoff = _check_time("cutoff", cutoff)
        states = ("done", "failed") if include_failed else ("done",)
        reported = select(Study.study_instance_uid).where(Study.state == "reported")
        paths: set[str] = set()
        with self._tx() as s:
            jobs = s.scalars(
                select(Job).where(
                    Job.state.in_(states),
                    Job.updated_at < cutoff,
                    Job.study_instance_uid.in_(reported),
                )
            ).all()
            for job in jobs:
                paths.add(job.path)
                produced = (job.result or {}).get("paths", [])
                if isinstance(produced, list):
                    paths.update(p for p in produced if isinstance(p, str))
                s.delete(job)
            sends = s.scalars(select(Send).where(Send.state == "sent", Send.sent_at < cutoff)).all()
            purged_sends = {send.id for send in sends}
            candidates = {send.object_path for send in sends}
            for send in sends:
                s.delete(send)
            s.flush()
            if candidates:
                still_used = set(
                    s.scalars(
                        select(Send.object_path).where(
                            Send.object_path.in_(candidates), Send.id.not_in(purged_sends)
                        )
                    )
                )
                paths.update(candidates - still_used)
        logger.info(
            "retention: purged %d job(s) and %d send(s) finished before %s",
            len(jobs),
            len(purged_sends),
            cutoff.isoformat(),
        )
        return sorted(paths)
