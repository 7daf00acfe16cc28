"""The studies aggregate: study rows, the quiet-period rule and report versions.

A study row is made by the first image of its Study Instance UID
(:func:`touch_study`, called by :mod:`storage.jobs` inside its own transaction).
``content_generation`` increases whenever the study's content changes (a new image, a
changed re-send, an admin retry of one of its jobs) and re-opens it; a study is *due*
(:meth:`Studies.due_studies`) when it is open, quiet for long enough and none of its
jobs is queued or running. The report made for it gets ``report_version + 1``
(:meth:`Studies.mark_study_reported`); an image that arrived while the report was
built keeps the study open, so it is due again with the next version.

When no report can be made of a study's content (its images disagree on the patient,
say), :meth:`Studies.mark_study_failed` ends it with the reason (``report_error``); when
only some could, :meth:`Studies.mark_study_reported` takes the reason too. Either way
its snapshot's state is ``failed`` (stored as ``reported`` with a reason: the content is
dealt with), and only new content re-opens it.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, case, func, literal, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.selectable import ScalarSelect

from storage.common import (
    check_int,
    check_seconds,
    check_uid,
    cut_error,
    snapshot,
    snapshot_columns,
)
from storage.errors import StudyNotFoundError
from storage.models import STUDY_STATES, Job, Study

if TYPE_CHECKING:
    from storage.database import Database

__all__ = [
    "SHOWN_STUDY_STATES",
    "Studies",
    "StudyDue",
    "StudyInfo",
    "recent_errors",
    "reopen_study",
    "state_counts",
    "touch_study",
]

#: The states a study is shown in: the stored ones, and ``failed`` (``reported`` with a
#: ``report_error``: no report could be made of its content).
SHOWN_STUDY_STATES = (*STUDY_STATES, "failed")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyInfo:
    """A snapshot of one study row; ``state`` is one of :data:`SHOWN_STUDY_STATES`."""

    study_instance_uid: str
    state: str
    image_count: int
    content_generation: int
    report_version: int
    first_received_at: dt.datetime
    last_received_at: dt.datetime
    reported_at: dt.datetime | None
    last_report_at: dt.datetime | None
    report_error: str | None


@dataclass(frozen=True)
class StudyDue:
    """A study whose reports should be made now.

    Attributes
    ----------
    study_instance_uid : str
        The study.
    version : int
        The report version to make (``report_version + 1``); pass it back to
        :meth:`Studies.mark_study_reported`.
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


def _jobs_in_state(state: str) -> ScalarSelect[int]:
    return (
        select(func.count(Job.id))
        .where(Job.study_instance_uid == Study.study_instance_uid, Job.state == state)
        .correlate(Study)
        .scalar_subquery()
    )


#: The state shown: ``failed`` for a study ended with a report error.
_SHOWN_STATE = case(
    (and_(Study.state == "reported", Study.report_error.is_not(None)), literal("failed")),
    else_=Study.state,
)
_STUDY_INFO = snapshot_columns(StudyInfo, Study, state=_SHOWN_STATE)
_STUDY_DUE = snapshot_columns(
    StudyDue,
    Study,
    version=Study.report_version + 1,
    generation=Study.content_generation,
    done_count=_jobs_in_state("done"),
    failed_count=_jobs_in_state("failed"),
)


# --------------------------------------------------------------------------- in a session


def _study(s: Session, uid: str) -> Study | None:
    """The study row to change, locked (PostgreSQL: two images of one study arriving at
    two nodes count both; two schedulers cannot both record one report version)."""
    return s.scalars(
        select(Study).where(Study.study_instance_uid == uid).with_for_update()
    ).one_or_none()


def touch_study(
    s: Session,
    study_uid: str,
    now: dt.datetime,
    *,
    content_changed: bool,
    image_delta: int = 0,
) -> Study:
    """Record an image's arrival in its study (made when new), in the caller's session.

    ``last_received_at`` moves to ``now`` (a duplicate too: the study is still
    arriving); ``image_count`` changes by ``image_delta``; with ``content_changed`` the
    content generation increases and the study is re-opened.
    """
    study = _study(s, study_uid)
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
        _reopen(study)
    return study


def reopen_study(s: Session, study_uid: str) -> None:
    """Mark an existing study's content as changed (its reports will be made again)."""
    study = s.scalars(
        select(Study).where(Study.study_instance_uid == study_uid).with_for_update()
    ).one()
    _reopen(study)


def _reopen(study: Study) -> None:
    study.content_generation += 1
    if study.state != "open":
        logger.info("study %s re-opened: its content changed", study.study_instance_uid)
    study.state = "open"
    study.report_error = None  # about the old content


def state_counts(s: Session) -> dict[str, int]:
    """Studies per shown state (:data:`SHOWN_STUDY_STATES`, 0 when none)."""
    counts = dict.fromkeys(SHOWN_STUDY_STATES, 0)
    for state, n in s.execute(select(_SHOWN_STATE, func.count()).group_by(_SHOWN_STATE)):
        counts[state] = n
    return counts


def recent_errors(s: Session, limit: int) -> list[dict[str, Any]]:
    """Studies ended with a report error, newest first (``status_summary``'s entries)."""
    if not limit:
        return []
    rows = s.execute(
        select(
            literal("study").label("kind"),
            Study.id.label("id"),
            Study.study_instance_uid.label("uid"),
            literal("failed").label("state"),
            Study.last_report_at.label("at"),
            Study.report_error.label("error"),
        )
        .where(Study.state == "reported", Study.report_error.is_not(None))
        .order_by(Study.last_report_at.desc(), Study.id.desc())
        .limit(limit)
    )
    return [
        {
            **row._asdict(),
            "attempts": None,
            "at": (row.at or dt.datetime.min.replace(tzinfo=dt.UTC)).isoformat(),
            "error": row.error[:300],
        }
        for row in rows
    ]


# --------------------------------------------------------------------------- aggregate


class Studies:
    """The studies aggregate of a :class:`~storage.database.Database` (``db.studies``)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def due_studies(
        self, *, quiet_seconds: float, now: dt.datetime | None = None
    ) -> list[StudyDue]:
        """Studies whose reports should be made now.

        A study is due when no image arrived for ``quiet_seconds``, it has at least one
        job and all its jobs are ``done`` or ``failed``, and its current content has not
        been reported (``state == "open"``). Oldest quiet first.
        """
        quiet = check_seconds("quiet_seconds", quiet_seconds, positive=False)
        threshold = self._db.now(now) - dt.timedelta(seconds=quiet)
        of_study = Job.study_instance_uid == Study.study_instance_uid
        busy = select(Job.id).where(of_study, Job.state.in_(("queued", "running"))).exists()
        has_jobs = select(Job.id).where(of_study).exists()
        stmt = (
            select(*_STUDY_DUE)
            .where(Study.state == "open", Study.last_received_at <= threshold, ~busy, has_jobs)
            .order_by(Study.last_received_at, Study.id)
        )
        with self._db.transaction() as s:
            return [snapshot(StudyDue, row) for row in s.execute(stmt)]

    def mark_study_reported(
        self,
        study_instance_uid: str,
        version: int,
        *,
        generation: int | None = None,
        now: dt.datetime | None = None,
        error: str | None = None,
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
        error : str or None
            Why not every report could be made (some were): kept as ``report_error``,
            so the study shows as ``failed`` (its reason in ``status_summary``) until new
            content re-opens it. None clears an earlier one.

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
        uid = check_uid("study_instance_uid", study_instance_uid)
        check_int("version", version, minimum=1)
        if generation is not None:
            check_int("generation", generation, minimum=0)
        now = self._db.now(now)
        with self._db.transaction() as s:
            study = _study(s, uid)
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
            study.report_error = cut_error(error) if error else None
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

    def mark_study_failed(
        self,
        study_instance_uid: str,
        *,
        error: str,
        generation: int | None = None,
        now: dt.datetime | None = None,
    ) -> bool:
        """End a study of which no report can be made, with the reason.

        The study is no longer due (its snapshot's state is ``failed``, its
        ``report_error`` the reason) until its content changes: a new or changed image,
        or an admin retry of one of its jobs, re-opens it. Its report version does not
        change (no report was made); ``last_report_at`` is the time of the attempt.

        Parameters
        ----------
        study_instance_uid : str
            The study.
        error : str
            Why, without patient data (cut to 4000 characters).
        generation : int or None
            ``StudyDue.generation``: when the content changed since, the study stays
            open (the new content may well be reportable).
        now : datetime or None
            Current time (aware).

        Returns
        -------
        bool
            True when the study is now failed, False when it stays open.

        Raises
        ------
        StudyNotFoundError
            No such study.
        """
        uid = check_uid("study_instance_uid", study_instance_uid)
        text = cut_error(error)
        if generation is not None:
            check_int("generation", generation, minimum=0)
        now = self._db.now(now)
        with self._db.transaction() as s:
            study = _study(s, uid)
            if study is None:
                raise StudyNotFoundError(f"no study with Study Instance UID {uid}")
            if generation is not None and generation != study.content_generation:
                return False
            study.state = "reported"
            study.report_error = text
            study.last_report_at = now
        return True

    def get_study(self, study_instance_uid: str) -> StudyInfo:
        """Return a snapshot of one study.

        Raises
        ------
        StudyNotFoundError
            No such study.
        """
        uid = check_uid("study_instance_uid", study_instance_uid)
        with self._db.transaction() as s:
            row = s.execute(
                select(*_STUDY_INFO).where(Study.study_instance_uid == uid)
            ).one_or_none()
        if row is None:
            raise StudyNotFoundError(f"no study with Study Instance UID {uid}")
        return snapshot(StudyInfo, row)
