"""Intake of received instances: the one decision new / duplicate / replacement.

:class:`Intake` is the part of :class:`storage.jobs.Jobs` (``db.jobs``) that turns a
received instance into a job: :meth:`Intake.receive` decides, writes the file into the
:class:`~storage.filestore.FileStore` and records it; :meth:`Intake.enqueue_image`
records a file written already. Both decide with :func:`classify`.

Decisions
---------
Re-sends
    Storage alone decides, from the content digest (:func:`classify`). The same SOP
    Instance UID with the same content digest is a *duplicate*: nothing is written or
    re-processed and the study's content is unchanged (only its ``last_received_at``
    moves, which extends the quiet period — the study is evidently still arriving). The
    same UID with a *different* digest is a changed re-send (a corrected image): the
    record points at the new file, the job is re-queued with attempts reset (a running
    worker loses its lease and gets :class:`~storage.errors.LeaseLostError` when it
    reports), and the study is re-opened so its reports are made again with
    ``report_version + 1``.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, BinaryIO

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage.common import check_digest, check_int, check_relpath, check_text, check_uid
from storage.errors import StorageError
from storage.filestore import FileStore
from storage.models import Job
from storage.studies import touch_study

if TYPE_CHECKING:
    from storage.database import Database

__all__ = ["Content", "EnqueueOutcome", "EnqueueResult", "Intake", "classify"]

logger = logging.getLogger(__name__)


class EnqueueOutcome(StrEnum):
    """What a received instance is, decided from its SOP Instance UID and digest."""

    #: A SOP Instance UID not seen before: a new queued job.
    NEW = "new"
    #: The same UID with the same content: nothing to do (stored and processed once).
    DUPLICATE = "duplicate"
    #: The same UID with other content: the record points at the new file, re-queued.
    REPLACED = "replaced"


@dataclass(frozen=True)
class EnqueueResult:
    """What :meth:`Jobs.receive` or :meth:`Jobs.enqueue_image` did.

    Attributes
    ----------
    job_id : int
        The instance's job (the same id for a duplicate or a replacement).
    outcome : EnqueueOutcome
        ``"new"``, ``"duplicate"`` or ``"replaced"`` (a :class:`str` enum).
    path : str
        The file the instance's record points at now, relative to the store root.
    obsolete_path : str or None
        A stored file (relative to the store root) no record points at any more and
        that is still on disk. From :meth:`Jobs.enqueue_image`: the previous file of a
        replacement stored under another path, or the redundant new copy of a duplicate
        stored under another path, which the caller should remove. From
        :meth:`Jobs.receive`, which removes it itself: only a file it failed to remove.
        ``None`` otherwise.
    """

    job_id: int
    outcome: EnqueueOutcome
    path: str
    obsolete_path: str | None = None


#: What :meth:`Jobs.receive` writes with: bytes, or a callable writing to a binary file.
Content = bytes | bytearray | memoryview | Callable[[BinaryIO], object]


def classify(job: Job | None, digest: str) -> EnqueueOutcome:
    """The one decision on a received instance: new, duplicate or replacement.

    ``job`` is the row of the instance's SOP Instance UID (``None`` when unknown) and
    ``digest`` the received content's SHA-256.
    """
    if job is None:
        return EnqueueOutcome.NEW
    return EnqueueOutcome.DUPLICATE if job.digest == digest else EnqueueOutcome.REPLACED


def _instance_fields(
    *,
    sop_instance_uid: Any,
    study_instance_uid: Any,
    series_instance_uid: Any,
    sop_class_uid: Any,
    path: Any = None,
    digest: Any,
    size: Any,
    calling_aet: Any,
) -> dict[str, Any]:
    """The checked column values of a received instance (``path`` when given)."""
    fields: dict[str, Any] = {
        "sop_instance_uid": check_uid("sop_instance_uid", sop_instance_uid),
        "study_instance_uid": check_uid("study_instance_uid", study_instance_uid),
        "series_instance_uid": check_uid("series_instance_uid", series_instance_uid),
        "sop_class_uid": check_uid("sop_class_uid", sop_class_uid),
    }
    if path is not None:
        fields["path"] = check_relpath("path", path)
    fields["digest"] = check_digest("digest", digest)
    fields["size_bytes"] = check_int("size", size, minimum=0)
    fields["calling_aet"] = check_text("calling_aet", calling_aet, max_chars=16, allow_empty=True)
    return fields


def _by_sop(s: Session, sop: str) -> Job | None:
    # FOR UPDATE: two nodes receiving one instance at once decide one after the other
    # on PostgreSQL (a new UID: the second insert fails and is retried, seeing the first).
    return s.scalars(select(Job).where(Job.sop_instance_uid == sop).with_for_update()).one_or_none()


def _exists(store: FileStore, job: Job) -> bool:
    return store.resolve(job.path).is_file()


def _target(
    store: FileStore, fields: dict[str, Any], outcome: EnqueueOutcome, current: str | None
) -> str:
    """Where :meth:`Intake.receive` writes: by UID, beside the current file if it is there."""
    uids = (fields["study_instance_uid"], fields["series_instance_uid"], fields["sop_instance_uid"])
    usual = store.instance_path(*uids).as_posix()
    if outcome is EnqueueOutcome.DUPLICATE and current is not None:
        return current  # the recorded file went missing: write it back where it belongs
    if current == usual:  # a replacement: the current file must survive the switch-over
        return store.instance_path(*uids, suffix="." + fields["digest"][:16]).as_posix()
    return usual


def _remove_quietly(store: FileStore, relpath: str, sop: str) -> bool:
    try:
        store.remove(relpath)
    except (OSError, ValueError) as exc:
        logger.warning("could not remove %s (SOP Instance %s): %s", relpath, sop, exc)
        return False
    return True


# --------------------------------------------------------------------------- intake


class Intake:
    """How received instances become jobs; the base of :class:`storage.jobs.Jobs`."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._locks_guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextmanager
    def _instance_lock(self, sop: str) -> Iterator[None]:
        """Serialise this process's receipts of one SOP instance (two associations)."""
        with self._locks_guard:
            lock, users = self._locks.get(sop, (threading.Lock(), 0))
            self._locks[sop] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._locks_guard:
                lock, users = self._locks[sop]
                if users <= 1:
                    del self._locks[sop]
                else:
                    self._locks[sop] = (lock, users - 1)

    def receive(
        self,
        store: FileStore,
        *,
        sop_instance_uid: str,
        study_instance_uid: str,
        series_instance_uid: str,
        sop_class_uid: str,
        data: Content,
        digest: str,
        size: int,
        calling_aet: str,
        now: dt.datetime | None = None,
    ) -> EnqueueResult:
        """Take in a received instance: decide, store its file durably, queue its job.

        The decision (:func:`classify`) is made from ``digest`` before anything is
        written; when this returns, file and record are committed (answer the C-STORE
        only then).

        - ``"new"``: the file is written at ``FileStore.instance_path`` and a job queued.
        - ``"duplicate"``: nothing is written (unless the recorded file went missing:
          then it is written back) and no job queued; the study's ``last_received_at``
          moves.
        - ``"replaced"``: the file is written at ``instance_path`` — or, when the
          current record is there, beside it as ``<sop>.<16 digest digits>`` so that it
          survives until the record has switched over — the job is re-queued as for
          :meth:`enqueue_image`, and then the superseded file is removed.

        A failure after the write removes the file just written (no orphan file, no
        record pointing at a missing file). Receipts of one SOP Instance UID are
        serialised within the process.

        Parameters
        ----------
        store : FileStore
            Where the file goes.
        sop_instance_uid, study_instance_uid, series_instance_uid, sop_class_uid : str
            The instance's UIDs (1..64 characters).
        data : bytes or callable
            The file's content, or a callable writing it (see ``FileStore.write_atomic``).
        digest : str
            SHA-256 of that content, 64 lowercase hex digits.
        size : int
            Its size in bytes (checked against free space before writing).
        calling_aet : str
            The sender's AE title (up to 16 characters; may be empty).
        now : datetime or None
            Receipt time (aware); the clock when None.

        Returns
        -------
        EnqueueResult
            ``obsolete_path`` is ``None`` unless removing the superseded file failed.

        Raises
        ------
        DiskFullError
            Free space is below the store's floor, or the disk filled up while writing.
        StorageError
            The database failed, or the written file's digest is not ``digest``.
        """
        if not isinstance(store, FileStore):
            raise TypeError(f"store must be a FileStore, got {type(store).__name__}")
        fields = _instance_fields(
            sop_instance_uid=sop_instance_uid,
            study_instance_uid=study_instance_uid,
            series_instance_uid=series_instance_uid,
            sop_class_uid=sop_class_uid,
            digest=digest,
            size=size,
            calling_aet=calling_aet,
        )
        sop = fields["sop_instance_uid"]
        now = self._db.now(now)
        with self._instance_lock(sop):
            with self._db.transaction() as s:
                job = _by_sop(s, sop)
                outcome = classify(job, digest)
                current = job.path if job is not None else None
                if job is not None and outcome is EnqueueOutcome.DUPLICATE and _exists(store, job):
                    return self._duplicate(s, job, now, relpath=job.path)
            target = _target(store, fields, outcome, current)
            stored = store.write_atomic(target, data, expected_size=size)
            if stored.digest != digest:  # pragma: no cover - would be a bug or bad memory
                _remove_quietly(store, stored.relpath, sop)
                raise StorageError(
                    f"the written file of SOP Instance {sop} has digest {stored.digest}, "
                    f"not the {digest} received"
                )
            try:
                result = self.enqueue_image(
                    sop_instance_uid=sop,
                    study_instance_uid=study_instance_uid,
                    series_instance_uid=series_instance_uid,
                    sop_class_uid=sop_class_uid,
                    path=stored.relpath,
                    digest=digest,
                    size=stored.size,
                    calling_aet=calling_aet,
                    now=now,
                )
            except BaseException:
                if stored.relpath != current:  # never remove a file a record points at
                    _remove_quietly(store, stored.relpath, sop)
                raise
        obsolete = result.obsolete_path
        if obsolete is not None and _remove_quietly(store, obsolete, sop):
            obsolete = None
        return EnqueueResult(result.job_id, result.outcome, result.path, obsolete)

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

        Call this after the file is written (see ``FileStore.write_atomic``; or let
        :meth:`receive` do both) and before answering the C-STORE: when it returns, the
        record is committed. The outcome is :func:`classify`'s:

        - a new SOP Instance UID → a new queued job, ``"new"``;
        - a known UID with the same ``digest`` → ``"duplicate"``: no new job, no change
          of the study's content (its ``last_received_at`` moves);
        - a known UID with a different ``digest`` → ``"replaced"``: the record points at
          the new file, the job is queued again with attempts reset (a worker holding it
          loses its lease), and the study — the old one too, if the instance moved — is
          re-opened so its reports are made again with a new version.

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
        fields = _instance_fields(
            sop_instance_uid=sop_instance_uid,
            study_instance_uid=study_instance_uid,
            series_instance_uid=series_instance_uid,
            sop_class_uid=sop_class_uid,
            path=path,
            digest=digest,
            size=size,
            calling_aet=calling_aet,
        )
        now = self._db.now(now)
        for attempt in range(3):
            try:
                with self._db.transaction() as s:
                    return self._record(s, fields, now)
            except IntegrityError:
                # Another connection inserted the same UID first (possible on servers
                # without BEGIN IMMEDIATE); the next round sees its row.
                if attempt == 2:
                    raise
                logger.debug("enqueue of %s raced another insert; retrying", sop_instance_uid)
        raise AssertionError("unreachable")  # pragma: no cover

    def _record(self, s: Session, fields: dict[str, Any], now: dt.datetime) -> EnqueueResult:
        sop = fields["sop_instance_uid"]
        study_uid = fields["study_instance_uid"]
        relpath = fields["path"]
        job = _by_sop(s, sop)
        outcome = classify(job, fields["digest"])
        reset = {
            "received_at": now,
            "state": "queued",
            "attempts": 0,
            "max_attempts": self._db.policy.max_attempts,
            "next_attempt_at": now,
            "updated_at": now,
        }
        if job is None:
            touch_study(s, study_uid, now, content_changed=True, image_delta=1)
            job = Job(**fields, **reset, created_at=now)
            s.add(job)
            s.flush()
            logger.info("job %d queued for SOP Instance %s (study %s)", job.id, sop, study_uid)
            return EnqueueResult(job.id, outcome, relpath)
        if outcome is EnqueueOutcome.DUPLICATE:
            return self._duplicate(s, job, now, relpath=relpath)

        old_study, old_path, was = job.study_instance_uid, job.path, job.state
        if old_study != study_uid:
            touch_study(s, old_study, now, content_changed=True, image_delta=-1)
            touch_study(s, study_uid, now, content_changed=True, image_delta=1)
        else:
            touch_study(s, study_uid, now, content_changed=True)
        for name, value in {**fields, **reset}.items():
            setattr(job, name, value)
        job.lease_owner = job.lease_expires_at = job.last_error = job.result = None
        logger.info(
            "job %d re-queued: SOP Instance %s re-sent with different content (was %s)",
            job.id,
            sop,
            was,
        )
        obsolete = old_path if old_path != relpath else None
        return EnqueueResult(job.id, outcome, relpath, obsolete)

    def _duplicate(self, s: Session, job: Job, now: dt.datetime, *, relpath: str) -> EnqueueResult:
        touch_study(s, job.study_instance_uid, now, content_changed=False)
        logger.info("job %d: duplicate of SOP Instance %s ignored", job.id, job.sop_instance_uid)
        obsolete = relpath if relpath != job.path else None
        return EnqueueResult(job.id, EnqueueOutcome.DUPLICATE, job.path, obsolete)
