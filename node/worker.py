"""The worker: claims queued images, runs the detector, writes per-image results.

One job = one received SOP Instance. Per job the worker

1. reads the stored file (``pydicom.dcmread``) and runs :meth:`Detector.detect` on it;
2. writes the detections as JSON (``results/<study>/<sop>.detections.json``) and keeps
   them in the job's result too (the scheduler builds the study's SRs from there);
3. builds the per-image objects enabled in ``outputs.kinds`` — a SEG (only when there
   is a finding) and a GSPS — and writes them into the file store atomically;
4. marks the job done (:meth:`Database.complete`) with a result that lists every
   produced object, and only then
5. queues a send per destination and kind (:meth:`Database.add_send`).

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
still go out. Failures: :class:`~cascade.errors.InvalidImageError` (or a file that is not DICOM at
all) cannot go away — the job fails without retry, the error kept. Anything else is
retried with the queue's back-off up to ``worker.max_attempts``.

Coordinates: detections are in the received image's pixel grid, x = column, y = row,
0-based, first pixel's CENTRE at (0, 0); the report builders convert to DICOM graphic
coordinates (top-left CORNER at (0, 0)).

Logs carry job ids and UIDs only, never patient data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid

from cascade.errors import InvalidImageError
from cascade.inference.detector import (
    BUNDLED_WEIGHTS,
    Detection,
    ImageDetections,
    OperatingPoint,
    resolve_operating_point,
)
from node import __version__, sdnotify
from node.errors import ConfigError
from node.reports.common import Provenance
from node.settings import Settings
from storage.errors import LeaseLostError, StorageError
from storage.filestore import FileStore
from storage.queue import ClaimedJob, Database, QueuePolicy, open_database

__all__ = [
    "ALGORITHM_NAME",
    "PER_IMAGE_KINDS",
    "DetectorFactory",
    "DetectorLike",
    "ModelFiles",
    "Worker",
    "derived_uid",
    "detections_from_json",
    "device_uid_for",
    "encode_dataset",
    "load_detector",
    "make_provenance",
    "model_files",
    "open_storage",
    "queue_policy",
    "run_worker",
    "series_uid_for",
    "with_operating_point",
]

logger = logging.getLogger(__name__)

#: Algorithm Name (TID 4019) of every result object.
ALGORITHM_NAME = "calcnode uC cascade"
#: Output kinds the worker makes per image; the study-level SRs are the scheduler's.
PER_IMAGE_KINDS: tuple[str, ...] = ("seg", "gsps")


class DetectorLike(Protocol):
    """What the worker needs of a detector (:class:`cascade.inference.detector.Detector`)."""

    @property
    def model_version(self) -> str: ...

    def detect(self, source: Any, *, path: str = "") -> ImageDetections: ...


#: Builds the detector in the worker process: ``factory(settings, device)``. Tests pass
#: one (a slow or failing detector); the default is :func:`load_detector`.
DetectorFactory = Callable[[Settings, str | None], DetectorLike]


# --------------------------------------------------------------------------- identity
def derived_uid(*parts: str) -> str:
    """A stable UID under the ``2.25`` root from the first 128 bits of a SHA-256.

    The same ``parts`` always give the same UID (≤ 44 characters), e.g. one series per
    study and output kind, so every version of a report lands in the same series.
    """
    if not parts or not all(isinstance(p, str) for p in parts):
        raise TypeError("parts must be one or more str")
    digest = hashlib.sha256("\x00".join(parts).encode("utf-8")).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def device_uid_for(model_sha256: str) -> str:
    """The Device UID of a trained model: ``2.25.`` + the int of its sha256's first 128 bits.

    Parameters
    ----------
    model_sha256 : str
        64 hex digits identifying the model's weights.

    Raises
    ------
    ValueError
        ``model_sha256`` is not 64 hex digits.
    """
    if not isinstance(model_sha256, str) or len(model_sha256) != 64:
        raise ValueError(f"model_sha256 must be 64 hex digits, got {model_sha256!r}")
    try:
        value = int(model_sha256[:32], 16)
    except ValueError:
        raise ValueError(f"model_sha256 must be 64 hex digits, got {model_sha256!r}") from None
    return f"2.25.{value}"


def series_uid_for(study_instance_uid: str, kind: str) -> str:
    """The Series Instance UID of one output kind in one study (stable across versions)."""
    return derived_uid("calcnode-series", study_instance_uid, kind)


def with_operating_point(
    model_version: str, model_sha256: str, op: OperatingPoint | None
) -> tuple[str, str]:
    """The model's identity including what it reports.

    The same checkpoints at another operating point send other findings, so the
    operating point (thresholds and cap, not its descriptive ``calibration``) becomes
    part of the model version (``"<version> op <8 hex>"``) and of the sha256 the Device
    UID derives from. Without an operating point both are returned unchanged.
    """
    if op is None:
        return model_version, model_sha256
    point = {k: v for k, v in op.to_json().items() if k != "calibration"}
    tag = hashlib.sha256(json.dumps(point, sort_keys=True).encode()).hexdigest()
    combined = hashlib.sha256(f"{model_sha256}:{tag}".encode()).hexdigest()
    return f"{model_version} op {tag[:8]}", combined


def make_provenance(*, model_version: str, model_sha256: str) -> Provenance:
    """The :class:`Provenance` of objects made by the given model with this calcnode."""
    return Provenance(
        algorithm_name=ALGORITHM_NAME,
        algorithm_version=__version__,
        model_version=model_version[:64] or model_sha256[:12],
        device_uid=device_uid_for(model_sha256),
    )


@dataclass(frozen=True)
class ModelFiles:
    """The checkpoint files the node runs and their combined identity.

    Attributes
    ----------
    asn : Path
        ASN checkpoint.
    fpr : Path or None
        FPR checkpoint (None: ASN proposals alone).
    sha256 : str
        SHA-256 of the ASN file, or of ``"<asn sha256>:<fpr sha256>"`` with an FPR:
        changes with every trained model.
    bundled : bool
        Whether these are the weights shipped with calcnode.
    """

    asn: Path
    fpr: Path | None
    sha256: str
    bundled: bool


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_files(settings: Settings) -> ModelFiles:
    """Resolve the model the node runs.

    ``model.path`` names the ASN checkpoint; an ``fpr.pt`` in the same folder is its
    FPR stage. Empty ``model.path`` means the bundled weights (``cascade/weights/asn.pt``
    and ``fpr.pt``).

    Raises
    ------
    ConfigError
        No checkpoint where one is expected; the message names ``model.path``.
    """
    if settings.model.path is not None:
        asn = Path(settings.model.path)
        bundled = False
        if not asn.is_file():
            raise ConfigError(f"model.path: no such checkpoint file {asn}")
    else:
        asn = BUNDLED_WEIGHTS / "asn.pt"
        bundled = True
        if not asn.is_file():
            raise ConfigError(
                f"model.path: empty (use the bundled weights), but this installation has no "
                f"bundled weights at {asn}; train a model (calcnode train asn/fpr) and set "
                f"model.path to its ASN checkpoint"
            )
    fpr_candidate = asn.parent / "fpr.pt"
    fpr = fpr_candidate if fpr_candidate.is_file() and fpr_candidate != asn else None
    digest = _file_sha256(asn)
    if fpr is not None:
        digest = hashlib.sha256(f"{digest}:{_file_sha256(fpr)}".encode()).hexdigest()
    return ModelFiles(asn=asn, fpr=fpr, sha256=digest, bundled=bundled)


def load_detector(settings: Settings, device: str | None = None) -> DetectorLike:
    """Load the configured detector once (the default :data:`DetectorFactory`).

    Parameters
    ----------
    settings : Settings
        ``model.path``, ``model.device``, ``model.torch_threads``; what it reports:
        ``model.operating_point`` and ``model.max_findings`` (:func:`operating_point`).
    device : str or None
        Overrides ``model.device`` (``calcnode worker --device cuda:0``).

    Raises
    ------
    ConfigError
        No checkpoint (see :func:`model_files`).
    CheckpointError
        The checkpoint cannot be loaded.
    """
    import torch

    from cascade.inference.detector import Detector

    files = model_files(settings)
    if settings.model.torch_threads > 0:
        torch.set_num_threads(settings.model.torch_threads)
    return Detector(
        files.asn,
        files.fpr,
        device=device or settings.model.device,
        operating_point=operating_point(settings, files),
    )


def operating_point(settings: Settings, files: ModelFiles) -> OperatingPoint:
    """What the node reports: ``model.operating_point`` and ``model.max_findings``.

    Parameters
    ----------
    settings : Settings
        ``model.operating_point`` (``calibrated`` or ``all``) and ``model.max_findings``.
    files : ModelFiles
        The checkpoints the detector loads.

    Returns
    -------
    OperatingPoint
        ``calibrated``: the point stored in ``weights.json`` beside the ASN checkpoint
        when it was calibrated on these checkpoints, else the FPR's decision alone
        (probability ≥ 0.5), with a warning (:func:`cascade.inference.detector.resolve_operating_point`);
        ``all``: every candidate. ``max_findings`` then caps it (the smaller of the two
        limits when the stored point has one too).

    Raises
    ------
    CheckpointError
        ``weights.json`` holds an unusable operating point.
    """
    if settings.model.operating_point == "all":
        op = OperatingPoint(fpr_threshold=0.0, min_score=0.0)
    else:
        op = resolve_operating_point(files.asn, files.fpr)
    limit = settings.model.max_findings
    if limit:
        op = dataclasses.replace(
            op, max_detections=min(limit, op.max_detections) if op.max_detections else limit
        )
    logger.info(
        "operating point (%s): FPR probability ≥ %g, final score ≥ %.4g, at most %s findings "
        "per image",
        settings.model.operating_point,
        op.fpr_threshold,
        op.min_score,
        op.max_detections or "any number of",
    )
    return op


# --------------------------------------------------------------------------- storage
def queue_policy(settings: Settings) -> QueuePolicy:
    """The queue's retry policy from ``worker`` and ``send`` settings."""
    # QueuePolicy wants strictly positive delays; a configured 0 means "at once".
    tiny = 0.001
    job_base = max(settings.worker.retry_backoff_seconds, tiny)
    send_base = max(settings.send.retry_initial_seconds, tiny)
    return QueuePolicy(
        max_attempts=settings.worker.max_attempts,
        retry_base_seconds=job_base,
        retry_cap_seconds=max(job_base, 3600.0),
        send_retry_base_seconds=send_base,
        send_retry_cap_seconds=max(settings.send.retry_max_seconds, send_base),
        send_max_attempts=settings.send.max_attempts,
    )


def open_storage(settings: Settings) -> tuple[Database, FileStore]:
    """Open (creating or migrating) the database and the file store of ``storage``."""
    store = FileStore(settings.storage.root, min_free_mb=settings.storage.min_free_mb)
    database = open_database(settings.storage.database_url, policy=queue_policy(settings))
    return database, store


def encode_dataset(ds: Dataset) -> bytes:
    """A dataset as DICOM Part 10 bytes (file meta required)."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


# --------------------------------------------------------------------------- detections
def detections_from_json(data: Mapping[str, Any]) -> ImageDetections:
    """Rebuild :class:`ImageDetections` from :meth:`ImageDetections.to_json` (no masks).

    Raises
    ------
    ValueError
        A missing or invalid field; the message names it.
    """
    try:
        dets = tuple(
            Detection(
                x=float(d["x"]),
                y=float(d["y"]),
                score=float(d["score"]),
                asn_score=float(d["asn_score"]),
                fpr_score=float(d["fpr_score"]),
                radius_px=float(d["radius_px"]),
            )
            for d in data["detections"]
        )
        spacing = tuple(float(s) for s in data["pixel_spacing_mm"])
        return ImageDetections(
            sop_instance_uid=str(data["sop_instance_uid"]),
            path=str(data.get("path", "")),
            rows=int(data["rows"]),
            columns=int(data["columns"]),
            pixel_spacing_mm=(spacing[0], spacing[1]),
            detections=dets,
        )
    except KeyError as exc:
        raise ValueError(f"detections JSON lacks {exc.args[0]!r}") from None
    except (TypeError, IndexError) as exc:
        raise ValueError(f"detections JSON is malformed: {exc}") from None


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
                self._database.extend_lease(
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

    # -- one job -----------------------------------------------------------------
    def process(self, job: ClaimedJob) -> tuple[dict[str, Any], list[dict[str, str]]]:
        """Run the detector on a claimed job and write its files (no database change).

        Returns
        -------
        (result, objects)
            ``result`` for :meth:`Database.complete` (detections, provenance, produced
            ``paths``); ``objects`` the DICOM objects to send, each ``{"kind", "path",
            "sop_class_uid", "sop_instance_uid"}``.

        Raises
        ------
        InvalidImageError
            The file is not a usable mammogram (or not DICOM at all).
        """
        path = self.store.resolve(job.path)
        try:
            source = pydicom.dcmread(path)
        except (InvalidDicomError, EOFError) as exc:
            raise InvalidImageError(f"not a readable DICOM file: {exc}") from exc
        started = time.monotonic()
        detections = self.detector.detect(source, path=job.path)
        seconds = time.monotonic() - started
        logger.info(
            "job %d: %d detection(s) on SOP Instance %s in %.1f s",
            job.job_id,
            len(detections.detections),
            job.sop_instance_uid,
            seconds,
        )
        study = job.study_instance_uid
        written: list[str] = []
        objects: list[dict[str, str]] = []
        build_errors: dict[str, str] = {}
        try:
            det_json = detections.to_json()
            det_json["path"] = job.path
            stored = self.store.write_atomic(
                self.store.result_path(study, f"{job.sop_instance_uid}.detections.json"),
                json.dumps(det_json, indent=1).encode("utf-8"),
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
                    build_errors[kind] = f"{type(exc).__name__}: {exc}"[:500]
                    continue
                if ds is None:
                    continue
                sop_uid = str(ds.SOPInstanceUID)
                stored = self.store.write_atomic(
                    self.store.result_path(study, f"{kind}-{sop_uid}.dcm"), encode_dataset(ds)
                )
                written.append(stored.relpath)
                objects.append(
                    {
                        "kind": kind,
                        "path": stored.relpath,
                        "sop_class_uid": str(ds.SOPClassUID),
                        "sop_instance_uid": sop_uid,
                    }
                )
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
        result = {
            "detections": det_json,
            "detection_count": len(detections.detections),
            "seconds": round(seconds, 3),
            "provenance": {
                "algorithm_name": self.provenance.algorithm_name,
                "algorithm_version": self.provenance.algorithm_version,
                "model_version": self.provenance.model_version,
                "device_uid": self.provenance.device_uid,
            },
            "worker": self.worker_id,
            "objects": objects,
            "build_errors": build_errors,
            "paths": written,
        }
        return result, objects

    def _build(
        self, kind: str, source: Dataset, detections: ImageDetections, job: ClaimedJob
    ) -> Dataset | None:
        common: dict[str, Any] = {
            "source": source,
            "detections": detections,
            "provenance": self.provenance,
            "series_instance_uid": series_uid_for(job.study_instance_uid, kind),
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

    def queue_sends(self, study_instance_uid: str, objects: list[dict[str, str]]) -> int:
        """Queue every object for each destination that takes its kind; returns how many."""
        count = 0
        for dest in self.settings.destinations:
            kinds = self.settings.destination_kinds(dest)
            for obj in objects:
                if obj["kind"] not in kinds:
                    continue
                self.database.add_send(
                    destination=dest.name,
                    object_path=obj["path"],
                    sop_class_uid=obj["sop_class_uid"],
                    sop_instance_uid=obj["sop_instance_uid"],
                    study_instance_uid=study_instance_uid,
                    kind=obj["kind"],
                )
                count += 1
        return count

    def handle(self, job: ClaimedJob) -> str:
        """Process one claimed job and record the outcome; returns the job's new state.

        ``"done"``, ``"queued"`` (retry later), ``"failed"`` or ``"lost"`` (the lease
        went to someone else; the result was discarded).
        """
        lease = self.settings.worker.lease_seconds
        try:
            with _Heartbeat(self.database, job.job_id, self.worker_id, lease_seconds=lease):
                result, objects = self.process(job)
        except InvalidImageError as exc:
            logger.warning("job %d: not a usable mammogram: %s", job.job_id, exc)
            return self._fail(job, f"InvalidImageError: {exc}", retry=False)
        except Exception as exc:
            logger.exception("job %d failed (attempt %d)", job.job_id, job.attempt)
            text = f"{type(exc).__name__}: {exc}\n" + "".join(traceback.format_exception(exc)[-6:])
            return self._fail(job, text, retry=True)
        try:
            self.database.complete(job.job_id, self.worker_id, result=result)
        except LeaseLostError:
            logger.warning("job %d: lease lost before completion; result discarded", job.job_id)
            self._remove(list(result["paths"]))
            return "lost"
        self.jobs_done += 1
        try:
            queued = self.queue_sends(job.study_instance_uid, objects)
        except StorageError:
            # The job is done; the scheduler queues its sends at study completion.
            logger.exception("job %d: could not queue sends now", job.job_id)
        else:
            logger.info("job %d: done, %d send(s) queued", job.job_id, queued)
        return "done"

    def _fail(self, job: ClaimedJob, error: str, *, retry: bool) -> str:
        try:
            return self.database.fail(job.job_id, self.worker_id, error=error, retry=retry)
        except LeaseLostError:
            logger.warning("job %d: lease lost before the failure was recorded", job.job_id)
            return "lost"

    # -- the loop ----------------------------------------------------------------
    def run_once(self) -> str | None:
        """Claim and handle one job; None when the queue has nothing due."""
        job = self.database.claim(self.worker_id, lease_seconds=self.settings.worker.lease_seconds)
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
        while not stop.is_set() and (max_jobs is None or handled < max_jobs):
            try:
                outcome = self.run_once()
            except StorageError:
                logger.exception("worker %s: database error; retrying", self.worker_id)
                stop.wait(poll)
                continue
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
    model_sha256: str | None = None,
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
        ``factory(settings, device)`` → detector; :func:`load_detector` when None.
    model_sha256 : str or None
        Identity of the model for the Device UID; the checkpoint files' (see
        :func:`model_files`) when None, or a hash of the factory's ``model_version``.

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
    if model_sha256 is None and detector_factory is None:
        model_sha256 = model_files(settings).sha256
    started = time.monotonic()
    detector = factory(settings, device)
    model_version = str(getattr(detector, "model_version", "") or "")
    if model_sha256 is None:
        model_sha256 = hashlib.sha256(f"model:{model_version}".encode()).hexdigest()
    if not model_version or model_version == "unknown":
        model_version = model_sha256[:12]
    model_version, model_sha256 = with_operating_point(
        model_version, model_sha256, getattr(detector, "operating_point", None)
    )
    provenance = make_provenance(model_version=model_version, model_sha256=model_sha256)
    logger.info(
        "worker %s: model %s loaded in %.1f s (device UID %s)",
        worker_id,
        model_version,
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
