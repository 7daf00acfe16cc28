"""The worker: claims queued images, runs the detector, writes per-image results.

One job = one received SOP Instance. Per job the worker

1. reads the stored file (``pydicom.dcmread``) and runs :meth:`Detector.detect` on it;
2. writes the detections as JSON (``results/<study>/<sop>.detections.json``) and keeps
   them in the job's result too (the scheduler builds the study's SRs from there);
3. builds the per-image objects enabled in ``outputs.kinds`` — a SEG (only when there
   is a finding) and a GSPS — and writes them into the file store atomically;
4. marks the job done (:meth:`Database.complete`) with its
   :class:`~node.results.JobResult` (detections, provenance, every produced object and
   file), and only then
5. queues a send per destination and kind (:func:`node.results.queue_sends`).

Completing before queueing the sends means a worker that loses its lease (it hung and
another worker took the job over) never sends anything: ``complete`` raises
:class:`~storage.errors.LeaseLostError` and the files are removed. A worker that dies
between 4 and 5 leaves a done job without sends; the scheduler queues the sends of every
done job again at study completion (``add_send`` is idempotent per destination and
SOP Instance UID), so nothing is lost and nothing is sent twice.

While a job runs, a heartbeat thread extends its lease every ``lease_seconds / 3``: a
long image keeps its lease, a dead worker loses it and the scheduler's lease recovery
gives the job to another worker.

A per-image object whose builder raises is left out (logged at ERROR, recorded in the
job result's ``build_errors``): the detections, the other objects and the study's SRs
still go out. Failures: :class:`~cascade.errors.InvalidImageError` (or a file that is
not DICOM at all) cannot go away — the job fails without retry, the error kept. Anything else is
retried with the queue's back-off up to ``worker.max_attempts``.

Coordinates: detections are in the received image's pixel grid, x = column, y = row,
0-based, first pixel's CENTRE at (0, 0); the report builders convert to DICOM graphic
coordinates (top-left CORNER at (0, 0)).

Logs carry job ids and UIDs only, never patient data.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid

from cascade.errors import InvalidImageError
from cascade.inference.detections import ImageDetections
from node import monitoring, sdnotify
from node.identity import provenance_for, series_uid_for
from node.logs import redact, remember_patient
from node.model import DetectorFactory, DetectorLike, load_detector
from node.reports.common import Provenance, conform_identifying_values
from node.results import JobResult, ResultObject, encode_dataset, queue_sends
from node.settings import Settings
from node.stores import open_storage
from storage.database import Database
from storage.errors import DiskFullError, LeaseLostError, StorageError
from storage.filestore import FileStore
from storage.jobs import ClaimedJob

__all__ = [
    "DATABASE_ERROR_LOG_SECONDS",
    "PER_IMAGE_KINDS",
    "RESULT_HEADROOM_MB",
    "Worker",
    "run_worker",
]

logger = logging.getLogger(__name__)

#: Output kinds the worker makes per image; the study-level SRs are the scheduler's.
PER_IMAGE_KINDS: tuple[str, ...] = ("seg", "gsps")
#: Free space (MiB) a job's results may take, on top of ``storage.min_free_mb``: a worker
#: claims a job only when this much is free above the floor (a SEG of a 14-Mpx image is
#: under 2 MiB; detections and the GSPS are small).
RESULT_HEADROOM_MB = 16
#: While the database keeps failing, the worker logs a one-line summary at most this
#: often (the first failure with its traceback).
DATABASE_ERROR_LOG_SECONDS = 60.0


class _RepeatedFailure:
    """Logs a repeating failure once in full, then a counted summary now and then.

    The first failure is logged with its traceback; while it goes on, one line at most
    every ``every_seconds`` says how many more there were; the first success after a
    failure says that it is over.
    """

    def __init__(self, what: str, *, every_seconds: float) -> None:
        self._what = what
        self._every = every_seconds
        self._count = 0  # failures in the current run of them
        self._unlogged = 0  # failures since the last line
        self._last_line = 0.0

    def failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        self._count += 1
        if self._count == 1:
            logger.error("%s; retrying", self._what, exc_info=exc)
            self._last_line = now
            return
        self._unlogged += 1
        if now - self._last_line >= self._every:
            logger.error(
                "%s, still (%d more failure(s) since the last line, %d in a row): %s",
                self._what,
                self._unlogged,
                self._count,
                _one_line(exc),
            )
            self._unlogged = 0
            self._last_line = now

    def succeeded(self) -> None:
        if self._count:
            logger.info("%s: over after %d failure(s)", self._what, self._count)
        self._count = self._unlogged = 0


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text.splitlines()[0][:300] if text else type(exc).__name__


# --------------------------------------------------------------------------- heartbeat
class _Heartbeat:
    """Extends a job's lease every ``interval`` seconds until stopped."""

    def __init__(
        self, database: Database, job_id: int, worker_id: str, *, lease_seconds: float
    ) -> None:
        self._database = database
        self._job_id = job_id
        self._worker_id = worker_id
        self._lease = lease_seconds
        self._stop = threading.Event()
        self.lost = False
        self._thread = threading.Thread(
            target=self._run, name=f"heartbeat-job-{job_id}", daemon=True
        )

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        interval = max(self._lease / 3.0, 0.05)
        while not self._stop.wait(interval):
            try:
                self._database.jobs.extend_lease(
                    self._job_id, self._worker_id, lease_seconds=self._lease
                )
            except LeaseLostError:
                logger.warning("job %d: lease lost while running", self._job_id)
                self.lost = True
                return
            except Exception:  # a database hiccup: try again next beat
                logger.exception("job %d: could not extend the lease", self._job_id)


# --------------------------------------------------------------------------- worker
class Worker:
    """Processes claimed jobs with one loaded detector.

    Parameters
    ----------
    settings : Settings
        Outputs, destinations, lease and poll settings.
    database : Database
        The queue.
    store : FileStore
        The file store.
    detector : DetectorLike
        A loaded detector.
    provenance : Provenance
        Identity of algorithm, model and device written into every object.
    worker_id : str
        The lease holder's name (``host:pid:n``).
    """

    def __init__(
        self,
        *,
        settings: Settings,
        database: Database,
        store: FileStore,
        detector: DetectorLike,
        provenance: Provenance,
        worker_id: str,
    ) -> None:
        if not isinstance(settings, Settings):
            raise TypeError(f"settings must be a Settings, got {type(settings).__name__}")
        if not isinstance(provenance, Provenance):
            raise TypeError(f"provenance must be a Provenance, got {type(provenance).__name__}")
        if not isinstance(worker_id, str) or not worker_id:
            raise ValueError(f"worker_id must be a non-empty str, got {worker_id!r}")
        self.settings = settings
        self.database = database
        self.store = store
        self.detector = detector
        self.provenance = provenance
        self.worker_id = worker_id
        self.jobs_done = 0
        self._paused = False

    # -- one job -----------------------------------------------------------------
    def process(self, job: ClaimedJob) -> JobResult:
        """Run the detector on a claimed job and write its files (no database change).

        Returns
        -------
        JobResult
            For :meth:`Database.complete` (as JSON): detections, provenance, the objects
            to send and every file written.

        Raises
        ------
        InvalidImageError
            The file is not a usable mammogram (or not DICOM at all).
        """
        path = self.store.resolve(job.path)
        try:
            with monitoring.timed("read"):
                source = pydicom.dcmread(path)
        except (InvalidDicomError, EOFError) as exc:
            raise InvalidImageError(f"not a readable DICOM file: {exc}") from exc
        # Before anything looks at it: no log line of this process shows its patient.
        remember_patient(source)
        # The results copy its patient and study values: valid for their VR there.
        if conform_identifying_values(source, context=f"job {job.job_id}"):
            remember_patient(source)
        started = time.monotonic()
        detections = monitoring.detect_timed(self.detector, source, path=job.path)
        seconds = time.monotonic() - started
        logger.info(
            "job %d: %d detection(s) on SOP Instance %s in %.1f s",
            job.job_id,
            len(detections.detections),
            job.sop_instance_uid,
            seconds,
        )
        detections = dataclasses.replace(detections, path=job.path)
        study = job.study_instance_uid
        written: list[str] = []
        objects: list[ResultObject] = []
        build_errors: dict[str, str] = {}
        results_started = time.monotonic()
        try:
            stored = self.store.write_atomic(
                self.store.result_path(study, f"{job.sop_instance_uid}.detections.json"),
                json.dumps(detections.to_json(), indent=1).encode("utf-8"),
            )
            written.append(stored.relpath)
            for kind in PER_IMAGE_KINDS:
                if kind not in self.settings.outputs.kinds:
                    continue
                try:
                    ds = self._build(kind, source, detections, job)
                except (InvalidImageError, StorageError):
                    raise
                except Exception as exc:
                    # One broken builder must not hold back the detections, the other
                    # objects and the study's SRs: log it, record it, go on.
                    logger.exception(
                        "job %d: building the %s for SOP Instance %s failed",
                        job.job_id,
                        kind,
                        job.sop_instance_uid,
                    )
                    build_errors[kind] = redact(f"{type(exc).__name__}: {exc}")[:500]
                    continue
                if ds is None:
                    continue
                sop_uid = str(ds.SOPInstanceUID)
                stored = self.store.write_atomic(
                    self.store.result_path(study, f"{kind}-{sop_uid}.dcm"), encode_dataset(ds)
                )
                written.append(stored.relpath)
                objects.append(ResultObject.of(ds, kind=kind, path=stored.relpath))
                logger.info(
                    "job %d: %s %s for SOP Instance %s",
                    job.job_id,
                    kind,
                    sop_uid,
                    job.sop_instance_uid,
                )
        except BaseException:
            self._remove(written)
            raise
        monitoring.observe_stage("results", time.monotonic() - results_started)
        return JobResult(
            detections=detections,
            seconds=seconds,
            provenance=self.provenance,
            worker=self.worker_id,
            objects=tuple(objects),
            build_errors=build_errors,
            paths=tuple(written),
        )

    def _build(
        self, kind: str, source: Dataset, detections: ImageDetections, job: ClaimedJob
    ) -> Dataset | None:
        common: dict[str, Any] = {
            "source": source,
            "detections": detections,
            "provenance": self.provenance,
            "series_instance_uid": series_uid_for(
                job.study_instance_uid, kind, job.sop_instance_uid
            ),
            "sop_instance_uid": generate_uid(prefix=None),
            # One object per image in a series shared by the study: the job id keeps
            # InstanceNumber distinct within the series.
            "instance_number": job.job_id,
        }
        if kind == "seg":
            from node.reports.seg import build_seg

            return build_seg(**common)
        if kind == "gsps":
            from node.reports.gsps import build_gsps

            return build_gsps(**common)
        raise ValueError(f"kind must be one of {PER_IMAGE_KINDS}, got {kind!r}")

    def _remove(self, relpaths: list[str]) -> None:
        for rel in relpaths:
            try:
                self.store.remove(rel)
            except (OSError, ValueError):
                logger.exception("could not remove %s", rel)

    def handle(self, job: ClaimedJob) -> str:
        """Process one claimed job and record the outcome; returns the job's new state.

        ``"done"``, ``"queued"`` (retry later), ``"failed"`` or ``"lost"`` (the lease
        went to someone else; the result was discarded).
        """
        outcome = self._handle(job)
        monitoring.job_finished(outcome)
        return outcome

    def _handle(self, job: ClaimedJob) -> str:
        lease = self.settings.worker.lease_seconds
        try:
            with _Heartbeat(self.database, job.job_id, self.worker_id, lease_seconds=lease):
                result = self.process(job)
        except InvalidImageError as exc:
            logger.warning("job %d: not a usable mammogram: %s", job.job_id, exc)
            return self._fail(job, f"InvalidImageError: {exc}", retry=False)
        except DiskFullError as exc:
            # The results did not fit above storage.min_free_mb: not the image's fault.
            # The job goes back without counting the attempt; the loop pauses claiming.
            logger.warning(
                "job %d: no room for its results (%s); returned to the queue", job.job_id, exc
            )
            self._release(job)
            return "queued"
        except Exception as exc:
            logger.exception("job %d failed (attempt %d)", job.job_id, job.attempt)
            text = f"{type(exc).__name__}: {exc}\n" + "".join(traceback.format_exception(exc)[-6:])
            return self._fail(job, text, retry=True)
        # A per-image object that could not be made is never silent: its reason stays on
        # the (done) job, where `calcnode status` lists it.
        warning = "; ".join(
            f"{kind} not made: {error}" for kind, error in result.build_errors.items()
        )
        try:
            with monitoring.timed("record"):
                self.database.jobs.complete(
                    job.job_id, self.worker_id, result=result.to_json(), warning=warning or None
                )
        except LeaseLostError:
            logger.warning("job %d: lease lost before completion; result discarded", job.job_id)
            self._remove(list(result.paths))
            return "lost"
        self.jobs_done += 1
        try:
            queued = queue_sends(
                self.database, self.settings, job.study_instance_uid, result.objects
            )
        except StorageError:
            # The job is done; the scheduler queues its sends at study completion.
            logger.exception("job %d: could not queue sends now", job.job_id)
        else:
            logger.info("job %d: done, %d send(s) queued", job.job_id, queued)
        return "done"

    def _fail(self, job: ClaimedJob, error: str, *, retry: bool) -> str:
        try:
            return self.database.jobs.fail(
                job.job_id, self.worker_id, error=redact(error), retry=retry
            )
        except LeaseLostError:
            logger.warning("job %d: lease lost before the failure was recorded", job.job_id)
            return "lost"

    def _release(self, job: ClaimedJob) -> None:
        try:
            self.database.jobs.release(job.job_id, self.worker_id)
        except LeaseLostError:
            logger.warning("job %d: lease lost before it was returned", job.job_id)

    # -- free space ----------------------------------------------------------------
    def has_room(self) -> bool:
        """Whether a job's results fit above ``storage.min_free_mb`` now.

        Below it the worker claims nothing (running inference whose results cannot be
        written would fail the job for no fault of its own): logged once when it starts,
        once when space is back.
        """
        try:
            free = self.store.ensure_free_space(RESULT_HEADROOM_MB * 1024 * 1024)
        except DiskFullError as exc:
            if not self._paused:
                logger.warning(
                    "worker %s: pausing, no job claimed until space returns: %s",
                    self.worker_id,
                    exc,
                )
                self._paused = True
            return False
        if self._paused:
            logger.info(
                "worker %s: free space is back (%.0f MiB): claiming jobs again",
                self.worker_id,
                free / (1024 * 1024),
            )
            self._paused = False
        return True

    # -- the loop ----------------------------------------------------------------
    def run_once(self) -> str | None:
        """Claim and handle one job; None when the queue has nothing due, or when the
        store has no room for results (see :meth:`has_room`)."""
        if not self.has_room():
            return None
        job = self.database.jobs.claim(
            self.worker_id, lease_seconds=self.settings.worker.lease_seconds
        )
        if job is None:
            return None
        return self.handle(job)

    def run(
        self, *, stop_event: threading.Event | Any | None = None, max_jobs: int | None = None
    ) -> int:
        """Loop until ``stop_event`` is set or ``max_jobs`` jobs were handled.

        Returns
        -------
        int
            Jobs handled (any outcome).
        """
        stop = stop_event if stop_event is not None else threading.Event()
        handled = 0
        poll = self.settings.worker.poll_seconds
        database_errors = _RepeatedFailure(
            f"worker {self.worker_id}: database error", every_seconds=DATABASE_ERROR_LOG_SECONDS
        )
        while not stop.is_set() and (max_jobs is None or handled < max_jobs):
            try:
                outcome = self.run_once()
            except StorageError as exc:
                database_errors.failed(exc)
                stop.wait(poll)
                continue
            database_errors.succeeded()
            if outcome is None:
                stop.wait(poll)
                continue
            handled += 1
        return handled


def _default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_worker(
    settings: Settings,
    *,
    device: str | None = None,
    worker_id: str | None = None,
    stop_event: threading.Event | Any | None = None,
    max_jobs: int | None = None,
    detector_factory: DetectorFactory | None = None,
) -> int:
    """Load the model once, then claim → process → complete/fail until stopped (blocking).

    Sends ``READY=1`` to systemd after the model is loaded. Without ``stop_event`` the
    loop runs until SIGTERM/SIGINT when called in the main thread (or ``max_jobs``).

    Parameters
    ----------
    settings : Settings
        The node's configuration.
    device : str or None
        Overrides ``model.device``.
    worker_id : str or None
        Lease holder name; ``host:pid`` when None.
    stop_event : threading.Event or multiprocessing.Event, optional
        Set it to stop after the current job.
    max_jobs : int or None
        Stop after this many jobs (tests, batch runs).
    detector_factory : callable, optional
        ``factory(settings, device)`` → detector; :func:`node.model.load_detector` when
        None. The detector's ``identity`` (weights and operating point) gives the
        objects' provenance and Device UID.

    Returns
    -------
    int
        0 (the process exit status).

    Raises
    ------
    ConfigError, CheckpointError
        The model cannot be found or loaded.
    """
    if max_jobs is not None and (isinstance(max_jobs, bool) or max_jobs < 1):
        raise ValueError(f"max_jobs must be a positive int or None, got {max_jobs!r}")
    worker_id = worker_id or _default_worker_id()
    factory = detector_factory or load_detector
    started = time.monotonic()
    detector = factory(settings, device)
    provenance = provenance_for(detector.identity)
    logger.info(
        "worker %s: model %s loaded in %.1f s (device UID %s)",
        worker_id,
        provenance.model_version,
        time.monotonic() - started,
        provenance.device_uid,
    )
    database, store = open_storage(settings)
    own_stop = stop_event is None
    stop: Any = stop_event if stop_event is not None else threading.Event()
    restore = _install_stop_handlers(stop) if own_stop else None
    worker = Worker(
        settings=settings,
        database=database,
        store=store,
        detector=detector,
        provenance=provenance,
        worker_id=worker_id,
    )
    sdnotify.notify("READY=1\nSTATUS=waiting for jobs")
    try:
        handled = worker.run(stop_event=stop, max_jobs=max_jobs)
    finally:
        sdnotify.notify("STOPPING=1")
        if restore is not None:
            restore()
        database.close()
    logger.info("worker %s: stopped after %d job(s)", worker_id, handled)
    return 0


def _install_stop_handlers(stop: Any) -> Callable[[], None] | None:
    """SIGTERM/SIGINT set ``stop`` (main thread only); returns a function restoring them."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, _frame: Any) -> None:
        logger.info("signal %d: stopping after the current job", signum)
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore
