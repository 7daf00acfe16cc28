"""The jobs aggregate: received instances and their processing jobs.

One row per SOP Instance UID holds both the stored file (path, digest, size) and its
job's state machine ``queued → running → done | failed``. Instances come in through
:meth:`Jobs.receive` or :meth:`Jobs.enqueue_image` (see :mod:`storage.intake`, the part
of :class:`Jobs` that decides new / duplicate / replacement); workers take jobs with
:meth:`Jobs.claim` under a lease and end them with :meth:`Jobs.complete`,
:meth:`Jobs.fail` or :meth:`Jobs.release`.

Decisions
---------
Re-sends
    See :mod:`storage.intake`: storage alone decides, from the content digest.
Attempts and expired leases
    A claim is an attempt. A job whose lease expired (its worker died or hung) counts
    that attempt: a job that kills its worker (out of memory on a huge image, a crashing
    decoder) must not loop forever. It goes back to the queue with the same back-off as
    a failure, or to ``failed`` once ``max_attempts`` is used up. A worker shutting down
    cleanly calls :meth:`Jobs.release`, which does not count the attempt.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from sqlalchemy import Integer, String, Text, Update, bindparam, func, literal, select, update
from sqlalchemy.orm import Session

from storage.common import (
    MAX_NAME_CHARS,
    check_int,
    check_seconds,
    check_text,
    check_uid,
    cut_error,
    headline,
    snapshot,
    snapshot_columns,
)
from storage.errors import JobNotFoundError, LeaseLostError
from storage.intake import Intake
from storage.models import JOB_STATES, Job, Study, UTCDateTime
from storage.studies import reopen_study

__all__ = [
    "ClaimedJob",
    "JobInfo",
    "Jobs",
    "purge_finished",
    "recent_errors",
    "state_counts",
]

logger = logging.getLogger(__name__)


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


_JOB_INFO = snapshot_columns(JobInfo, Job, job_id="id", size="size_bytes")
_CLAIMED_JOB = snapshot_columns(ClaimedJob, Job, job_id="id", size="size_bytes", attempt="attempts")


@cache
def _claim_statement() -> Update:
    """The claim's ``UPDATE``, built once: the hot path of every worker, where building
    the statement each time cost the client more CPU than the database spent on it
    (bench/scale.py). Parameters ``claim_now``, ``claim_worker`` and ``claim_expires``."""
    now = bindparam("claim_now", type_=UTCDateTime())
    next_id = (
        select(Job.id)
        .where(Job.state == "queued", Job.next_attempt_at <= now)
        .order_by(Job.next_attempt_at, Job.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    return (
        update(Job)
        .where(Job.id == next_id, Job.state == "queued")
        .values(
            state="running",
            lease_owner=bindparam("claim_worker", type_=String()),
            lease_expires_at=bindparam("claim_expires", type_=UTCDateTime()),
            attempts=Job.attempts + 1,
            updated_at=now,
        )
        .returning(*_CLAIMED_JOB)
        .execution_options(synchronize_session=False)
    )


def _owned_update(**values: Any) -> Update:
    """An ``UPDATE`` of a job the worker holds (``owned_id``, ``owned_worker``) setting
    ``values`` (SQL expressions or bound parameters); ``RETURNING id``: no row = not
    held."""
    return (
        update(Job)
        .where(
            Job.id == bindparam("owned_id", type_=Integer()),
            Job.state == "running",
            Job.lease_owner == bindparam("owned_worker", type_=String()),
        )
        .values(**values)
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    )


@cache
def _extend_statement() -> Update:
    """The heartbeat's ``UPDATE``, built once (as :func:`_claim_statement`): parameters
    ``owned_id``, ``owned_worker``, ``extend_expires`` and ``extend_now``."""
    return _owned_update(
        lease_expires_at=bindparam("extend_expires", type_=UTCDateTime()),
        updated_at=bindparam("extend_now", type_=UTCDateTime()),
    )


@cache
def _complete_statement() -> Update:
    """The completion's ``UPDATE``, built once (as :func:`_claim_statement`): parameters
    ``owned_id``, ``owned_worker``, ``done_result`` (the JSON summary), ``done_warning``
    (None or the kept error) and ``done_now``."""
    return _owned_update(
        state="done",
        result=bindparam("done_result", type_=Job.__table__.c.result.type),
        lease_owner=None,
        lease_expires_at=None,
        last_error=bindparam("done_warning", type_=Text()),
        updated_at=bindparam("done_now", type_=UTCDateTime()),
    )


# --------------------------------------------------------------------------- in a session


def _lease_lost(job_id: int, worker_id: str, state: str, owner: str | None) -> LeaseLostError:
    holder = owner if state == "running" else None
    return LeaseLostError(
        f"job {job_id} is no longer leased to worker {worker_id!r} "
        f"(state {state}, lease holder {holder!r}): discard its result"
    )


def state_counts(s: Session) -> dict[str, int]:
    """Jobs per state (every state present, 0 when none)."""
    counts = dict.fromkeys(JOB_STATES, 0)
    for state, n in s.execute(select(Job.state, func.count()).group_by(Job.state)):
        counts[state] = n
    return counts


def recent_errors(s: Session, limit: int) -> list[dict[str, Any]]:
    """The last errors of jobs, newest first (``status_summary``'s entries)."""
    if not limit:
        return []
    rows = s.execute(
        select(
            literal("job").label("kind"),
            Job.id.label("id"),
            Job.sop_instance_uid.label("uid"),
            Job.state,
            Job.attempts,
            Job.updated_at.label("at"),
            Job.last_error.label("error"),
        )
        .where(Job.last_error.is_not(None))
        .order_by(Job.updated_at.desc(), Job.id.desc())
        .limit(limit)
    )
    return [{**row._asdict(), "at": row.at.isoformat(), "error": row.error[:300]} for row in rows]


def purge_finished(
    s: Session, cutoff: dt.datetime, *, include_failed: bool = False
) -> tuple[set[str], int]:
    """Delete finished jobs of reported studies last updated before ``cutoff``.

    ``done`` jobs, and ``failed`` ones with ``include_failed``; an open study still
    needs its jobs' results. Returns the purged jobs' images plus the paths in their
    ``result["paths"]``, and how many jobs were deleted.
    """
    states = ("done", "failed") if include_failed else ("done",)
    reported = select(Study.study_instance_uid).where(Study.state == "reported")
    jobs = s.scalars(
        select(Job)
        .where(Job.state.in_(states), Job.updated_at < cutoff, Job.study_instance_uid.in_(reported))
        .with_for_update(skip_locked=True)
    ).all()
    paths: set[str] = set()
    for job in jobs:
        paths.add(job.path)
        produced = (job.result or {}).get("paths", [])
        if isinstance(produced, list):
            paths.update(p for p in produced if isinstance(p, str))
        s.delete(job)
    s.flush()
    return paths, len(jobs)


# --------------------------------------------------------------------------- aggregate


class Jobs(Intake):
    """The jobs aggregate of a :class:`~storage.database.Database` (``db.jobs``).

    :meth:`receive` and :meth:`enqueue_image` come from :class:`~storage.intake.Intake`.
    """

    # ------------------------------------------------------------------ claim and lease

    def claim(
        self, worker_id: str, *, lease_seconds: float, now: dt.datetime | None = None
    ) -> ClaimedJob | None:
        """Atomically take the next queued job whose time has come, or ``None``.

        Jobs are taken in order of ``next_attempt_at`` (arrival for new jobs), then id.
        Two callers — threads or processes — never get the same job: one
        ``UPDATE … WHERE id = (SELECT … FOR UPDATE SKIP LOCKED) RETURNING`` (SQLite
        ignores the locking clause; its ``BEGIN IMMEDIATE`` serialises writers). The
        claim counts as an attempt.

        Parameters
        ----------
        worker_id : str
            Names the lease holder (e.g. ``"host:pid:n"``); up to 128 characters.
        lease_seconds : float
            The lease lasts this long; extend it with :meth:`extend_lease`.
        now : datetime or None
            Current time (aware).
        """
        worker = check_text("worker_id", worker_id, max_chars=MAX_NAME_CHARS)
        lease = check_seconds("lease_seconds", lease_seconds)
        now = self._db.now(now)
        params = {
            "claim_now": now,
            "claim_worker": worker,
            "claim_expires": now + dt.timedelta(seconds=lease),
        }
        with self._db.transaction() as s:
            row = s.execute(_claim_statement(), params).one_or_none()
        if row is None:
            return None
        job = snapshot(ClaimedJob, row)
        logger.info(
            "job %d claimed by %s (attempt %d/%d)",
            job.job_id,
            worker,
            job.attempt,
            job.max_attempts,
        )
        return job

    def _owned(self, s: Session, job_id: int, worker_id: str) -> Job:
        check_int("job_id", job_id, minimum=1)
        check_text("worker_id", worker_id, max_chars=MAX_NAME_CHARS)
        # FOR UPDATE: on PostgreSQL a lease recovery or a re-send changing the row
        # meanwhile is waited for and seen, not overwritten (SQLite: its write lock).
        job = s.get(Job, job_id, with_for_update=True)
        if job is None:
            raise JobNotFoundError(f"no job with id {job_id}")
        if job.state != "running" or job.lease_owner != worker_id:
            raise _lease_lost(job_id, worker_id, job.state, job.lease_owner)
        return job

    def _update_owned(
        self, s: Session, statement: Update, job_id: int, worker_id: str, params: dict[str, Any]
    ) -> None:
        """Run ``statement`` (from :func:`_owned_update`) on a job the worker holds: one
        conditional ``UPDATE`` (the hot path: every completion, every heartbeat; atomic
        on both backends), with ``params`` besides the job and the worker."""
        check_int("job_id", job_id, minimum=1)
        check_text("worker_id", worker_id, max_chars=MAX_NAME_CHARS)
        params = {**params, "owned_id": job_id, "owned_worker": worker_id}
        if s.execute(statement, params).one_or_none() is not None:
            return
        row = s.execute(select(Job.state, Job.lease_owner).where(Job.id == job_id)).one_or_none()
        if row is None:
            raise JobNotFoundError(f"no job with id {job_id}")
        raise _lease_lost(job_id, worker_id, row.state, row.lease_owner)

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
        lease = check_seconds("lease_seconds", lease_seconds)
        now = self._db.now(now)
        expires = now + dt.timedelta(seconds=lease)
        params = {"extend_expires": expires, "extend_now": now}
        with self._db.transaction() as s:
            self._update_owned(s, _extend_statement(), job_id, worker_id, params)
        return expires

    def complete(
        self,
        job_id: int,
        worker_id: str,
        *,
        result: Mapping[str, Any],
        warning: str | None = None,
        now: dt.datetime | None = None,
    ) -> None:
        """Mark a held job done and store the worker's JSON summary.

        By convention ``result["paths"]`` lists produced files relative to the store
        root (``Database.purge_done_before`` returns them for removal). ``warning``
        (e.g. a result object that could not be made) is kept as the done job's
        ``last_error``, so that ``status_summary`` lists it; without it the job's
        earlier error is cleared.

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
        params = {
            "done_result": payload,
            "done_warning": cut_error(warning) if warning else None,
            "done_now": self._db.now(now),
        }
        with self._db.transaction() as s:
            self._update_owned(s, _complete_statement(), job_id, worker_id, params)
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
        text = cut_error(error)
        now = self._db.now(now)
        with self._db.transaction() as s:
            job = self._owned(s, job_id, worker_id)
            job.last_error = text
            job.lease_owner = job.lease_expires_at = None
            job.updated_at = now
            if retry and job.attempts < job.max_attempts:
                job.state = "queued"
                job.next_attempt_at = now + self._db.policy.job_backoff(job.attempts)
                logger.warning(
                    "job %d attempt %d/%d failed, retry at %s: %s",
                    job_id,
                    job.attempts,
                    job.max_attempts,
                    job.next_attempt_at.isoformat(),
                    headline(text),
                )
            else:
                job.state = "failed"
                logger.error(
                    "job %d failed after %d attempt(s): %s", job_id, job.attempts, headline(text)
                )
            return job.state

    def release(self, job_id: int, worker_id: str, *, now: dt.datetime | None = None) -> None:
        """Give a held job back without counting the attempt (clean worker shutdown).

        Raises
        ------
        JobNotFoundError, LeaseLostError
            As for :meth:`extend_lease`.
        """
        now = self._db.now(now)
        with self._db.transaction() as s:
            job = self._owned(s, job_id, worker_id)
            job.state = "queued"
            job.attempts = max(0, job.attempts - 1)
            job.lease_owner = job.lease_expires_at = None
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
        now = self._db.now(now)
        recovered: list[int] = []
        with self._db.transaction() as s:
            # SKIP LOCKED: a job a worker is completing (or another scheduler recovering)
            # right now is left to it.
            jobs = s.scalars(
                select(Job)
                .where(Job.state == "running", Job.lease_expires_at < now)
                .order_by(Job.id)
                .with_for_update(skip_locked=True)
            ).all()
            for job in jobs:
                expired = job.lease_expires_at.isoformat() if job.lease_expires_at else "?"
                job.last_error = (
                    f"lease of worker {job.lease_owner!r} expired at {expired} "
                    f"(attempt {job.attempts}/{job.max_attempts}; worker died or hung)"
                )
                job.lease_owner = job.lease_expires_at = None
                job.updated_at = now
                if job.attempts < job.max_attempts:
                    job.state = "queued"
                    job.next_attempt_at = now + self._db.policy.job_backoff(job.attempts)
                else:
                    job.state = "failed"
                recovered.append(job.id)
                logger.warning("job %d: %s -> %s", job.id, job.last_error, job.state)
        return recovered

    # ------------------------------------------------------------------ admin and reading

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
        check_int("job_id", job_id, minimum=1)
        now = self._db.now(now)
        with self._db.transaction() as s:
            job = s.get(Job, job_id, with_for_update=True)
            if job is None:
                raise JobNotFoundError(f"no job with id {job_id}")
            if job.state == "running":
                raise ValueError(
                    f"job_id {job_id} is running (lease holder {job.lease_owner!r}); "
                    "wait for it or recover its lease first"
                )
            if job.state in ("done", "failed"):
                reopen_study(s, job.study_instance_uid)
            job.state = "queued"
            job.attempts = 0
            job.max_attempts = self._db.policy.max_attempts
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
        check_int("job_id", job_id, minimum=1)
        with self._db.transaction() as s:
            row = s.execute(select(*_JOB_INFO).where(Job.id == job_id)).one_or_none()
        if row is None:
            raise JobNotFoundError(f"no job with id {job_id}")
        return snapshot(JobInfo, row)

    def study_jobs(self, study_instance_uid: str) -> list[JobInfo]:
        """The jobs of one study, by series UID then job id (empty for an unknown study)."""
        uid = check_uid("study_instance_uid", study_instance_uid)
        stmt = (
            select(*_JOB_INFO)
            .where(Job.study_instance_uid == uid)
            .order_by(Job.series_instance_uid, Job.id)
        )
        with self._db.transaction() as s:
            return [snapshot(JobInfo, row) for row in s.execute(stmt)]
