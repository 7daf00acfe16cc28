"""SQLAlchemy tables of the node's durable state, and their schema version.

Tables
------
``jobs``
    One row per received SOP Instance (the image and its processing job together):
    where the file is, its digest, and the job's state machine
    ``queued → running → done | failed`` with attempts, lease and back-off.
``studies``
    One row per Study Instance UID: arrival times and the report bookkeeping used by
    the quiet-period rule (``open`` = content not yet reported, ``reported``), and
    ``report_error``: why no report can be made of its current content (a study whose
    content is dealt with but not reported, shown as *failed*).
``sends``
    Outbound C-STOREs of produced objects, ``pending → sent | failed``.
``schema_version``
    Exactly one row: the schema version and the application name that recognises
    the file as a calcnode database.

No patient data is stored: only UIDs, AE titles, paths relative to the file store,
digests, states, times and error texts (which the node must keep free of patient data).

Times are timezone-aware UTC :class:`datetime.datetime` objects in Python; they are
stored as naive UTC (SQLite has no time zones) by :class:`UTCDateTime`, which refuses
naive datetimes on the way in.

Schema version
--------------
:data:`SCHEMA_VERSION` is the version these models describe, stamped into
``schema_version`` when :func:`storage.database.prepare_schema` creates a database and
checked every time one is opened. :func:`storage.database.prepare_schema` knows the
upgrades 1 → 2 (``studies.report_error``) and 2 → 3 (the claim's index
``ix_jobs_state_next_attempt_id`` replaces ``ix_jobs_state_next_attempt``), applied at
open; any other version is refused. Adopt Alembic when upgrades stop being a statement
or two.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

__all__ = [
    "APPLICATION_NAME",
    "JOB_STATES",
    "SCHEMA_VERSION",
    "SEND_KINDS",
    "SEND_STATES",
    "STUDY_STATES",
    "UID_LENGTH",
    "Base",
    "Job",
    "SchemaVersion",
    "Send",
    "Study",
    "UTCDateTime",
    "utcnow",
]

#: The schema version the models in this module describe (2: ``studies.report_error``;
#: 3: the jobs index on ``(state, next_attempt_at, id)``).
SCHEMA_VERSION = 3

#: Written into ``schema_version.application``: recognises a calcnode database.
APPLICATION_NAME = "calcnode"

JOB_STATES = ("queued", "running", "done", "failed")
STUDY_STATES = ("open", "reported")
SEND_STATES = ("pending", "sent", "failed")
#: What an outbound object is: Mammography CAD SR, TID 1500 SR, SEG, GSPS.
SEND_KINDS = ("cad-sr", "tid1500-sr", "seg", "gsps")

#: Longest UID DICOM allows (PS3.5 §9.1).
UID_LENGTH = 64


def utcnow() -> dt.datetime:
    """Return the current time as a timezone-aware UTC datetime."""
    return dt.datetime.now(dt.UTC)


def _in(values: Sequence[str]) -> str:
    return "(" + ", ".join(f"'{v}'" for v in values) + ")"


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timezone-aware UTC datetime, stored naive in UTC.

    Binding a naive datetime raises :class:`ValueError`: a naive time is ambiguous and
    would compare wrongly against stored values.
    """

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if not isinstance(value, dt.datetime):
            raise TypeError(f"expected a datetime, got {type(value).__name__}")
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"datetime {value.isoformat()} is naive; pass a timezone-aware one")
        return value.astimezone(dt.UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if not isinstance(value, dt.datetime):
            raise TypeError(f"database returned {type(value).__name__} for a datetime column")
        return value.replace(tzinfo=dt.UTC)


class Base(DeclarativeBase):
    """Declarative base of the node's tables."""


class Study(Base):
    """A study as the quiet-period rule sees it.

    ``content_generation`` increases whenever the study's content changes (a new image,
    a changed re-send, an admin retry of one of its jobs); ``state`` is ``open`` while
    that content has not been reported, ``reported`` once it has — or once it is known
    that no report can be made of it: then ``report_error`` says why (the study is
    shown as *failed*; new content re-opens it). ``report_version`` is the version of
    the last report made (0 = none yet).
    """

    __tablename__ = "studies"
    __table_args__ = (
        CheckConstraint(f"state IN {_in(STUDY_STATES)}", name="ck_studies_state"),
        Index("ix_studies_state_last_received", "state", "last_received_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    first_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    last_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    image_count: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), default="open")
    content_generation: Mapped[int] = mapped_column(Integer, default=0)
    report_version: Mapped[int] = mapped_column(Integer, default=0)
    reported_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), default=None)
    last_report_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), default=None)
    report_error: Mapped[str | None] = mapped_column(Text, default=None)


class Job(Base):
    """A received SOP Instance and its processing job.

    ``path`` is relative to the file store's root. ``attempts`` counts claims (a claim
    is an attempt, whether it ends in ``complete``, ``fail`` or an expired lease).
    ``result`` is the worker's JSON summary (e.g. ``{"paths": [...], "findings": 3}``).

    ``ix_jobs_state_next_attempt_id`` is the claim's order (``next_attempt_at``, then
    ``id``) within a state: a claim reads the first due entry of the index, whatever
    the backlog and however many jobs share one ``next_attempt_at`` (a bulk retry),
    instead of sorting every due row.
    """

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(f"state IN {_in(JOB_STATES)}", name="ck_jobs_state"),
        CheckConstraint("attempts >= 0", name="ck_jobs_attempts"),
        CheckConstraint("max_attempts >= 1", name="ck_jobs_max_attempts"),
        Index("ix_jobs_state_next_attempt_id", "state", "next_attempt_at", "id"),
        Index("ix_jobs_study", "study_instance_uid"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    study_instance_uid: Mapped[str] = mapped_column(
        String(UID_LENGTH), ForeignKey("studies.study_instance_uid")
    )
    series_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    path: Mapped[str] = mapped_column(String(1024))
    digest: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    calling_aet: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    lease_owner: Mapped[str | None] = mapped_column(String(128), default=None)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), default=None)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class Send(Base):
    """An outbound C-STORE of a produced object to a configured destination.

    ``object_path`` is relative to the file store's root. One row per (destination,
    SOP Instance UID): adding the same object for the same destination again is a no-op.
    """

    __tablename__ = "sends"
    __table_args__ = (
        CheckConstraint(f"state IN {_in(SEND_STATES)}", name="ck_sends_state"),
        CheckConstraint(f"kind IN {_in(SEND_KINDS)}", name="ck_sends_kind"),
        UniqueConstraint("destination", "sop_instance_uid", name="uq_sends_destination_sop"),
        Index("ix_sends_state_next_try", "state", "next_try_at"),
        Index("ix_sends_study", "study_instance_uid"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    destination: Mapped[str] = mapped_column(String(128))
    object_path: Mapped[str] = mapped_column(String(1024))
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_try_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    last_status: Mapped[int | None] = mapped_column(Integer, default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), default=None)


class SchemaVersion(Base):
    """The single row saying which schema version the database has."""

    __tablename__ = "schema_version"
    __table_args__ = (CheckConstraint("id = 1", name="ck_schema_version_single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    application: Mapped[str] = mapped_column(String(32))
    version: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
