"""The node's periodic tasks: study completion, sends, lease recovery, retention.

Vocabulary: a *job* is a queue row (one received image, :mod:`storage.jobs`); a *task*
is one of the periodic functions here (APScheduler calls them "jobs" internally).

Each task is a plain function of ``(database, store, settings, *, now=None)`` that tests
call directly with an injected ``now``; :class:`NodeScheduler` runs them on an
APScheduler 3 ``BackgroundScheduler`` at the intervals of ``[scheduler]``. Every task
catches and logs its own exceptions: one bad study or a dead PACS never stops the
scheduler.

Study completion (the quiet-period rule)
    DICOM has no end-of-study signal. A study is complete ``study.quiet_seconds`` after
    its last received image, once every image's job is done or failed
    (:meth:`Database.due_studies`). Then the study-level objects enabled in
    ``outputs.kinds`` are made from the source headers (read without pixel data) and
    the detections stored in the jobs' results:

    * ``cad-sr`` — Mammography CAD SR (TID 4000), also for a study without findings
      (111241 "All algorithms succeeded; without findings");
    * ``tid1500-sr`` — TID 1500 measurement report, one per image with findings, each
      in its own series (``node.identity.series_uid_for``).

    ``version`` is the study's report version: 1 the first time; an image that arrives
    after the report re-opens the study and the next report is version 2, a new
    instance in the same series (one series per study and kind, per image for the TID
    1500 SRs). Images whose job
    failed are left out of the report (logged). Per-image objects of done jobs are
    queued for sending again (idempotent) in case a worker died between completing its
    job and queueing its sends.

    When one SR kind cannot be built the other still goes out (the error is logged);
    a study for which no SR can be built at all is retried with a growing delay (in memory:
    from 1 check interval up to an hour) rather than every few seconds forever — unless
    its builders refused its content (:data:`PERMANENT_REPORT_ERRORS`, e.g. images with
    different PatientIDs): the same content gives the same refusal, so the study is
    ended at once with the reason (``Studies.mark_study_failed``: ``failed`` in
    ``calcnode status``), logged once at ERROR, until new content re-opens it.

    The source headers are read with their patient values remembered by the log guard
    (:func:`node.logs.remember_patient`) and made valid for their VR
    (:func:`node.reports.common.conform_identifying_values`), as the worker does.

Sends
    :func:`send_results` stops between two objects once :meth:`NodeScheduler.stop_sending`
    was called (``calcnode serve`` calls it first on SIGTERM): the object in flight is
    finished and recorded, the others stay pending.

Several schedulers on one database
    Two ``calcnode serve`` (two hosts behind one address) share the database: study
    completion, sending and retention each run under ``Database.exclusive`` (a
    PostgreSQL advisory lock, an ``flock`` for SQLite), so one scheduler at a time
    lists and reports the due studies — a study version is reported once, one CAD SR
    made — and one sends: an object goes out once. The other skips that run (its next
    one may take over; a killed holder's lock is freed with its connection). Lease
    recovery needs no lock (its rows are taken ``FOR UPDATE SKIP LOCKED``).
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from cascade.inference.detections import ImageDetections
from node.identity import series_uid_for
from node.logs import redact, remember_patient
from node.reports.common import MG_SOP_CLASS_UIDS, Provenance, conform_identifying_values
from node.results import JobResult, ResultObject, encode_dataset, queue_sends
from node.settings import Settings
from storage.database import Database
from storage.errors import DatabaseUnavailableError
from storage.filestore import FileStore
from storage.jobs import JobInfo
from storage.models import utcnow
from storage.studies import StudyDue

__all__ = [
    "PERMANENT_REPORT_ERRORS",
    "STUDY_KINDS",
    "NodeScheduler",
    "ReportFailures",
    "complete_studies",
    "purge_retention",
    "recover_leases",
    "report_study",
    "send_results",
]

logger = logging.getLogger(__name__)

#: Output kinds made once per study (the per-image ones are the worker's).
STUDY_KINDS: tuple[str, ...] = ("cad-sr", "tid1500-sr")
#: What a report builder raises when it refuses its input (house style: constructors
#: validate, ``ValueError``/``TypeError`` naming the argument): the same content would be
#: refused again, so a study whose every report is refused is ended, not retried.
PERMANENT_REPORT_ERRORS: tuple[type[Exception], ...] = (ValueError, TypeError)


@dataclass
class ReportFailures:
    """In-memory back-off of studies whose report failed: uid → (failures, next try)."""

    base_seconds: float = 5.0
    cap_seconds: float = 3600.0
    entries: dict[str, tuple[int, dt.datetime]] = field(default_factory=dict)

    def blocked(self, uid: str, now: dt.datetime) -> bool:
        entry = self.entries.get(uid)
        return entry is not None and now < entry[1]

    def failed(self, uid: str, now: dt.datetime) -> dt.datetime:
        count = self.entries.get(uid, (0, now))[0] + 1
        delay = min(self.cap_seconds, self.base_seconds * 2.0 ** (count - 1))
        retry_at = now + dt.timedelta(seconds=delay)
        self.entries[uid] = (count, retry_at)
        return retry_at

    def succeeded(self, uid: str) -> None:
        self.entries.pop(uid, None)


#: A task that cannot reach the database says so at most this often (no traceback).
UNAVAILABLE_LOG_SECONDS = 60.0
_unavailable_logged: dict[str, float] = {}


def _log_task_failure(what: str) -> None:
    """Log the exception being handled: an unreachable database as one line per task at
    most every :data:`UNAVAILABLE_LOG_SECONDS` (it is retried at the next check, and the
    storage logs the outage and its end), anything else with its traceback."""
    exc = sys.exc_info()[1]
    if isinstance(exc, DatabaseUnavailableError):
        now = time.monotonic()
        last = _unavailable_logged.get(what)
        if last is None or now - last >= UNAVAILABLE_LOG_SECONDS:
            _unavailable_logged[what] = now
            logger.warning("%s: %s (tried again at each check)", what, exc)
        return
    logger.exception(what)


def _now(now: dt.datetime | None) -> dt.datetime:
    return utcnow() if now is None else now


def _results_of(jobs: Iterable[JobInfo]) -> dict[int, JobResult]:
    """The :class:`JobResult` of every done job (job id → result); unreadable ones logged."""
    results: dict[int, JobResult] = {}
    for job in jobs:
        if job.state != "done" or not job.result:
            continue
        try:
            results[job.job_id] = JobResult.from_json(job.result)
        except ValueError as exc:
            logger.error("job %d: unreadable result (%s); left out of the report", job.job_id, exc)
    return results


def _provenance_of(jobs: Iterable[JobInfo], results: Mapping[int, JobResult]) -> Provenance | None:
    """The provenance stored by the worker in the latest done job of the study."""
    latest: tuple[dt.datetime, Provenance] | None = None
    seen: set[str] = set()
    for job in jobs:
        result = results.get(job.job_id)
        if result is None:
            continue
        seen.add(result.provenance.device_uid)
        if latest is None or job.updated_at > latest[0]:
            latest = (job.updated_at, result.provenance)
    if latest is None:
        return None
    if len(seen) > 1:
        logger.warning(
            "images of one study were processed by %d different models; the report names "
            "the latest",
            len(seen),
        )
    return latest[1]


def _study_pairs(
    store: FileStore, jobs: list[JobInfo], results: Mapping[int, JobResult]
) -> tuple[list[tuple[Dataset, ImageDetections]], list[JobInfo]]:
    """(source header, detections) of every done job; and the jobs left out."""
    pairs: list[tuple[Dataset, ImageDetections]] = []
    left_out: list[JobInfo] = []
    for job in jobs:
        result = results.get(job.job_id)
        if result is None or job.sop_class_uid not in MG_SOP_CLASS_UIDS:
            left_out.append(job)
            continue
        # The SRs need the header only (UIDs, rows/columns, laterality, view, spacing).
        source = pydicom.dcmread(store.resolve(job.path), stop_before_pixels=True)
        remember_patient(source)  # no log line of this process shows its patient
        if conform_identifying_values(source, context=f"job {job.job_id}"):
            remember_patient(source)
        pairs.append((source, result.detections))
    return pairs, left_out


def report_study(
    database: Database,
    store: FileStore,
    settings: Settings,
    due: StudyDue,
    *,
    now: dt.datetime | None = None,
) -> list[ResultObject]:
    """Make, store and queue the study-level objects of one due study; mark it reported.

    Returns
    -------
    list of ResultObject
        The objects made.
    """
    from node.reports.cad_sr import build_cad_sr
    from node.reports.tid1500 import build_tid1500_sr

    uid = due.study_instance_uid
    jobs = database.jobs.study_jobs(uid)
    results = _results_of(jobs)
    pairs, left_out = _study_pairs(store, jobs, results)
    for job in left_out:
        logger.warning(
            "study %s: image %s (job %d, %s) is not in the report",
            uid,
            job.sop_instance_uid,
            job.job_id,
            job.state,
        )
    made: list[ResultObject] = []
    incomplete: str | None = None  # why not every report was made (the study shows failed)
    provenance = _provenance_of(jobs, results)
    if not pairs or provenance is None:
        logger.error(
            "study %s: no image was processed successfully (%d failed); no report made",
            uid,
            due.failed_count,
        )
    else:
        # (kind, builder) per object: the CAD SR covers the study; the TID 1500 SR is one
        # per image, each in its own series (what OHIF can navigate).
        builds: list[tuple[str, Callable[..., Dataset | None]]] = []
        if "cad-sr" in settings.outputs.kinds:
            builds.append(
                (
                    "cad-sr",
                    lambda **kw: build_cad_sr(
                        study=pairs,
                        series_instance_uid=series_uid_for(uid, "cad-sr"),
                        legacy_srt_codes=settings.outputs.legacy_srt_codes,
                        **kw,
                    ),
                )
            )
        if "tid1500-sr" in settings.outputs.kinds:
            for src, dets in pairs:
                builds.append(
                    (
                        "tid1500-sr",
                        lambda src=src, dets=dets, **kw: build_tid1500_sr(
                            source=src,
                            detections=dets,
                            series_instance_uid=series_uid_for(
                                uid, "tid1500-sr", str(src.SOPInstanceUID)
                            ),
                            **kw,
                        ),
                    )
                )
        errors: dict[str, Exception] = {}
        for kind, build in builds:
            try:
                ds = build(
                    provenance=provenance,
                    sop_instance_uid=generate_uid(prefix=None),
                    version=due.version,
                )
            except PERMANENT_REPORT_ERRORS as exc:
                # A refusal of the content: one line below, not a traceback per attempt.
                errors[kind] = exc
                continue
            except Exception as exc:
                logger.exception("study %s: building the %s failed", uid, kind)
                errors[kind] = exc
                continue
            if ds is None:  # a TID 1500 SR of an image without findings
                continue
            sop_uid = str(ds.SOPInstanceUID)
            stored = store.write_atomic(
                store.result_path(uid, f"{kind}-{sop_uid}.dcm"), encode_dataset(ds)
            )
            made.append(ResultObject.of(ds, kind=kind, path=stored.relpath))
            logger.info("study %s: %s %s version %d", uid, kind, sop_uid, due.version)
        refused = {k: e for k, e in errors.items() if isinstance(e, PERMANENT_REPORT_ERRORS)}
        if errors and not made and len(refused) < len(errors):
            # Nothing could be built, for a reason that may pass: leave the study open
            # (retried with back-off).
            raise next(e for e in errors.values() if not isinstance(e, PERMANENT_REPORT_ERRORS))
        if refused and not made:
            _end_study(database, settings, due, results, _reasons(refused), now=_now(now))
            return []
        for kind, refusal in refused.items():
            logger.error("study %s: the %s was not made: %s", uid, kind, _reasons({kind: refusal}))
        if refused:
            incomplete = _reasons(refused)
    # Per-image objects of done jobs, again: queueing is idempotent, and this covers a
    # worker that died between completing its job and queueing its sends.
    objects = made + [obj for result in results.values() for obj in result.objects]
    when = _now(now)
    queued = queue_sends(database, settings, uid, objects, now=when)
    database.studies.mark_study_reported(
        uid, due.version, generation=due.generation, now=when, error=incomplete
    )
    logger.info(
        "study %s: report version %d, %d image(s), %d object(s) made, %d send(s) ensured",
        uid,
        due.version,
        len(pairs),
        len(made),
        queued,
    )
    return made


def _reasons(errors: Mapping[str, Exception]) -> str:
    """One line naming each refusal, without patient data."""
    texts = {f"{kind}: {type(exc).__name__}: {exc}" for kind, exc in errors.items()}
    return redact(" ".join("; ".join(sorted(texts)).split()))[:1000]


def _end_study(
    database: Database,
    settings: Settings,
    due: StudyDue,
    results: Mapping[int, JobResult],
    reason: str,
    *,
    now: dt.datetime,
) -> None:
    """End a study no report can be made of (see the module notes); per-image objects
    of its done jobs are queued all the same (idempotent)."""
    uid = due.study_instance_uid
    objects = [obj for result in results.values() for obj in result.objects]
    queue_sends(database, settings, uid, objects, now=now)
    if database.studies.mark_study_failed(uid, error=reason, generation=due.generation, now=now):
        logger.error(
            "study %s: no report can be made of its images (%s); the study is failed until "
            "its content changes (a new or re-sent image, or calcnode jobs retry)",
            uid,
            reason,
        )


def complete_studies(
    database: Database,
    store: FileStore,
    settings: Settings,
    *,
    now: dt.datetime | None = None,
    failures: ReportFailures | None = None,
) -> int:
    """Report every study that has gone quiet (see the module docstring).

    Returns
    -------
    int
        Studies reported (or ended as failed) in this run.
    """
    try:
        with database.exclusive("study-completion") as held:
            if not held:  # another scheduler on this database is reporting
                return 0
            return _complete_due(database, store, settings, when=_now(now), failures=failures)
    except Exception:
        _log_task_failure("study completion failed")
        return 0


def _complete_due(
    database: Database,
    store: FileStore,
    settings: Settings,
    *,
    when: dt.datetime,
    failures: ReportFailures | None,
) -> int:
    try:
        due = database.studies.due_studies(quiet_seconds=settings.study.quiet_seconds, now=when)
    except Exception:
        _log_task_failure("study completion: cannot list due studies")
        return 0
    reported = 0
    for study in due:
        uid = study.study_instance_uid
        if failures is not None and failures.blocked(uid, when):
            continue
        try:
            report_study(database, store, settings, study, now=when)
        except Exception:
            logger.exception("study %s: report version %d failed", uid, study.version)
            if failures is not None:
                retry_at = failures.failed(uid, when)
                logger.warning("study %s: next report attempt at %s", uid, retry_at.isoformat())
            continue
        if failures is not None:
            failures.succeeded(uid)
        reported += 1
    return reported


def send_results(
    database: Database,
    store: FileStore,
    settings: Settings,
    *,
    now: dt.datetime | None = None,
    stop: threading.Event | None = None,
) -> int:
    """C-STORE every due send (new or retry) through :func:`node.scu.send_due`.

    Parameters
    ----------
    stop : threading.Event or None
        Once set, sending stops between two objects (see :func:`node.scu.send_due`).

    Returns
    -------
    int
        What :func:`node.scu.send_due` returns (sends tried); 0 on an error (logged).
    """
    if not settings.destinations:
        return 0
    try:
        from node.scu import send_due

        with database.exclusive("sends") as held:
            if not held:  # another scheduler on this database is sending
                return 0
            return int(send_due(database, store, settings, now=now, stop=stop))
    except Exception:
        _log_task_failure("sending results failed")
        return 0


def recover_leases(database: Database, *, now: dt.datetime | None = None) -> list[int]:
    """Return jobs whose worker died or hung to the queue (or fail them); ids recovered."""
    try:
        return database.jobs.recover_expired_leases(now=now)
    except Exception:
        _log_task_failure("lease recovery failed")
        return []


def purge_retention(
    database: Database, store: FileStore, settings: Settings, *, now: dt.datetime | None = None
) -> int:
    """Delete images, results and rows finished more than ``retention_days`` ago.

    Returns
    -------
    int
        Files removed (0 when ``storage.retention_days`` is 0: keep everything).
    """
    days = settings.storage.retention_days
    if days <= 0:
        return 0
    try:
        with database.exclusive("retention") as held:
            if not held:
                return 0
            return _purge(database, store, days, _now(now))
    except Exception:
        _log_task_failure("retention purge failed")
        return 0


def _purge(database: Database, store: FileStore, days: int, now: dt.datetime) -> int:
    cutoff = now - dt.timedelta(days=days)
    removed = 0
    for rel in database.purge_done_before(cutoff):
        try:
            if store.remove(rel):
                removed += 1
        except (OSError, ValueError):
            logger.exception("retention: could not remove %s", rel)
    store.purge_empty_dirs()
    store.purge_stale_temp_files()
    if removed:
        logger.info("retention: removed %d file(s) older than %d days", removed, days)
    return removed


class NodeScheduler:
    """The periodic tasks on an APScheduler ``BackgroundScheduler`` (one per node).

    Parameters
    ----------
    database, store, settings
        What the tasks work on; intervals from ``settings.scheduler``.
    """

    def __init__(self, database: Database, store: FileStore, settings: Settings) -> None:
        self.database = database
        self.store = store
        self.settings = settings
        self.failures = ReportFailures(
            base_seconds=settings.scheduler.study_check_seconds, cap_seconds=3600.0
        )
        self._scheduler: Any = None
        self._lock = threading.Lock()
        self._stop_sending = threading.Event()

    def _complete_studies(self) -> int:
        reported = complete_studies(
            self.database, self.store, self.settings, failures=self.failures
        )
        if reported and self.settings.destinations:
            self.wake("sends")  # results out now, not at the next send check
        return reported

    def _tasks(self) -> list[tuple[str, Callable[[], object], float]]:
        s = self.settings
        return [
            (
                "study-completion",
                self._complete_studies,
                s.scheduler.study_check_seconds,
            ),
            (
                "sends",
                lambda: send_results(self.database, self.store, s, stop=self._stop_sending),
                s.scheduler.send_check_seconds,
            ),
            (
                "lease-recovery",
                lambda: recover_leases(self.database),
                s.scheduler.lease_check_seconds,
            ),
            (
                "retention",
                lambda: purge_retention(self.database, self.store, s),
                s.scheduler.retention_check_seconds,
            ),
        ]

    def start(self) -> None:
        """Start the background thread; the first run of every task is immediate."""
        from apscheduler.schedulers.background import BackgroundScheduler

        with self._lock:
            if self._scheduler is not None:
                raise RuntimeError("the scheduler is already started")
            scheduler = BackgroundScheduler(timezone=dt.UTC)
            start = dt.datetime.now(dt.UTC)
            for name, func, seconds in self._tasks():
                scheduler.add_job(
                    _guarded(name, func),
                    "interval",
                    seconds=seconds,
                    id=name,
                    name=name,
                    next_run_time=start,
                    max_instances=1,
                    coalesce=True,
                    misfire_grace_time=None,
                )
            # "skipped: maximum number of running instances" when a check outlasts its interval is
            # expected (max_instances=1), not worth a warning every tick.
            logging.getLogger("apscheduler").setLevel(logging.ERROR)
            scheduler.start()
            self._scheduler = scheduler
        logger.info(
            "scheduler started: studies every %gs (quiet %gs), sends every %gs, leases every "
            "%gs, retention every %gs",
            self.settings.scheduler.study_check_seconds,
            self.settings.study.quiet_seconds,
            self.settings.scheduler.send_check_seconds,
            self.settings.scheduler.lease_check_seconds,
            self.settings.scheduler.retention_check_seconds,
        )

    def wake(self, name: str) -> None:
        """Run a task now (e.g. ``"sends"`` after a study was reported)."""
        with self._lock:
            if self._scheduler is not None:
                self._scheduler.modify_job(name, next_run_time=dt.datetime.now(dt.UTC))

    def stop_sending(self) -> None:
        """Stop sending between two objects (the one in flight finishes and is recorded;
        the others stay pending). Call it first when the node stops: a slow PACS must not
        hold the stop up, and a kill after it must not lose a delivered object's record."""
        self._stop_sending.set()

    def stop(self, *, wait: bool = True) -> None:
        """Stop the scheduler; with ``wait`` the running tasks finish first (a send task
        after the object in flight: :meth:`stop_sending` is implied)."""
        self._stop_sending.set()
        with self._lock:
            scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            scheduler.shutdown(wait=wait)
            logger.info("scheduler stopped")


def _guarded(name: str, func: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        try:
            func()
        except Exception:  # the functions catch their own; this is the last line
            logger.exception("scheduled task %s failed", name)

    run.__name__ = f"calcnode_{name.replace('-', '_')}"
    return run
