"""What an admin watches: Prometheus text at ``/metrics``, a health check at ``/healthz``.

``calcnode serve`` with ``[monitoring] http_port`` (0, the default, = off) answers HTTP on
``node.host``:``http_port``:

``GET /metrics``
    Prometheus text exposition (``prometheus-client``): the metrics below.
``GET /healthz``
    200 and ``{"status": "ok", ...}`` when the SCP listens and the database answers;
    503 and ``{"status": "unhealthy", "reasons": [...]}`` otherwise (a load balancer's
    health check, systemd's watchdog of choice, a readiness probe).

No patient data and no UIDs in either: counts, states, destination names, seconds.

Where each metric comes from — each from where it is true
---------------------------------------------------------
*Events* (counters, histograms) are counted where they happen, in every process of the
serve process group: the SCP (main process) counts received instances and refusals, the
worker processes count finished jobs and time their stages. They are aggregated with
``prometheus_client``'s **multiprocess mode**: :func:`prepare` points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh folder before ``serve`` starts its workers (they
inherit it), every process writes its values there, and ``/metrics`` sums them. The
counts of a worker that died or was restarted stay (counters never go back); a restart
of ``serve`` starts from zero, as any process restart does.

*State* (gauges) is read **from the database and the file system at scrape time**:
queue depth by state, the oldest due job's age, studies by state, sends by destination
and state, free space, the model the workers ran. It is the state of the whole shared
queue, the same on every node that shares the database (aggregate with ``max``, not
``sum``, across nodes). A database that does not answer makes
``calcnode_database_up 0`` and leaves those gauges out (the scrape still succeeds).

Metrics
-------
======================================== ======= =============================================
``calcnode_instances_received_total``    counter C-STOREs stored, by ``outcome`` (new, duplicate,
                                                 replaced)
``calcnode_stores_refused_total``        counter C-STOREs refused, by ``status`` (0xA700, ...)
``calcnode_associations_refused_total``  counter connections/associations refused, by
                                                 ``reason``
``calcnode_jobs_finished_total``         counter jobs a worker ended, by ``outcome`` (done,
                                                 failed, retry: queued again, lost: its lease)
``calcnode_stage_seconds``               histo.  seconds per ``stage`` of a job (read, detect,
                                                 the detector's own stages, results, record)
``calcnode_jobs``                        gauge   jobs by ``state`` (queued, running, done, failed)
``calcnode_oldest_queued_job_seconds``   gauge   age of the oldest job due and not yet claimed
``calcnode_studies``                     gauge   studies by ``state`` (open, reported, failed)
``calcnode_sends``                       gauge   sends by ``destination`` and ``state``
``calcnode_disk_free_bytes``             gauge   free space of ``storage.root``
``calcnode_disk_floor_bytes``            gauge   ``storage.min_free_mb`` (refusing below it)
``calcnode_model_info``                  gauge   1, labelled with the model the workers ran
``calcnode_database_up``                 gauge   1 when the database answered this scrape
``calcnode_scp_up``                      gauge   1 while the SCP listens
``calcnode_info``                        gauge   1, labelled with the version and the backend
======================================== ======= =============================================
"""

from __future__ import annotations

import contextlib
import datetime as dt
import inspect
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = [
    "STAGE_BUCKETS",
    "MonitoringServer",
    "StateCollector",
    "association_refused",
    "detect_timed",
    "instance_received",
    "job_finished",
    "observe_stage",
    "prepare",
    "refusal_reason",
    "store_refused",
]

logger = logging.getLogger(__name__)

#: Bucket bounds of ``calcnode_stage_seconds`` (a tiny image's decode to a slow CPU's
#: full-field cascade).
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

_ENV = "PROMETHEUS_MULTIPROC_DIR"
_metrics: dict[str, Any] | None = None
_metrics_lock = threading.Lock()


def prepare() -> Path | None:
    """Switch this process, and the workers it starts after this, to multiprocess mode.

    Call before anything imports ``prometheus_client`` (the serve process does, before
    its workers): makes a fresh folder for the values (``$RUNTIME_DIRECTORY`` under
    systemd, else the temporary folder) and names it in ``PROMETHEUS_MULTIPROC_DIR``.

    Returns
    -------
    Path or None
        The folder (remove it when the process group stops), or None when
        ``prometheus_client`` was imported already in single-process mode: then only
        this process's events are exported (logged).
    """
    import sys

    if "prometheus_client.values" in sys.modules and _ENV not in os.environ:
        logger.warning(
            "metrics: prometheus_client was loaded before the worker processes could share "
            "it; /metrics shows this process's events only"
        )
        return None
    base = os.environ.get("RUNTIME_DIRECTORY") or tempfile.gettempdir()
    folder = Path(tempfile.mkdtemp(prefix="calcnode-metrics-", dir=base))
    os.environ[_ENV] = str(folder)
    return folder


def _registry_metrics() -> dict[str, Any]:
    """The event metrics of this process (made at first use, after :func:`prepare`)."""
    global _metrics
    if _metrics is not None:
        return _metrics
    with _metrics_lock:
        if _metrics is None:
            from prometheus_client import CollectorRegistry, Counter, Histogram

            registry = CollectorRegistry(auto_describe=True)
            _metrics = {
                "registry": registry,
                "received": Counter(
                    "calcnode_instances_received",
                    "C-STOREs stored, by outcome (new, duplicate, replaced)",
                    ["outcome"],
                    registry=registry,
                ),
                "refused": Counter(
                    "calcnode_stores_refused",
                    "C-STOREs refused, by DIMSE status",
                    ["status"],
                    registry=registry,
                ),
                "associations": Counter(
                    "calcnode_associations_refused",
                    "connections and associations refused, by reason",
                    ["reason"],
                    registry=registry,
                ),
                "jobs": Counter(
                    "calcnode_jobs_finished",
                    "jobs a worker ended, by outcome (done, failed, retry, lost)",
                    ["outcome"],
                    registry=registry,
                ),
                "stages": Histogram(
                    "calcnode_stage_seconds",
                    "seconds per stage of a job",
                    ["stage"],
                    buckets=STAGE_BUCKETS,
                    registry=registry,
                ),
            }
    return _metrics


def _count(name: str, label: str) -> None:
    try:
        _registry_metrics()[name].labels(label).inc()
    except Exception:  # metrics never break the node
        logger.debug("metric %s not counted", name, exc_info=True)


# --------------------------------------------------------------------------- events


def instance_received(outcome: str) -> None:
    """The SCP stored an instance (``outcome``: new, duplicate or replaced)."""
    _count("received", str(outcome))


def store_refused(status: int) -> None:
    """The SCP refused a C-STORE with ``status``."""
    _count("refused", f"0x{int(status):04X}")


#: Words of a refusal's logged reason → the low-cardinality label.
_REASONS = (
    ("allowed_hosts", "allowed_hosts"),
    ("not an IP address", "allowed_hosts"),
    ("associations_per_host", "associations_per_host"),
    ("max_associations", "max_associations"),
    ("allowed_calling_aets", "calling_aet"),
    ("called AE title", "called_aet"),
    ("A-ASSOCIATE-RQ within", "handshake_timeout"),
    ("pynetdicom", "pynetdicom"),
)


def refusal_reason(reason: str) -> str:
    """The label of a refusal from the reason the node logs (``other`` when unknown)."""
    for words, label in _REASONS:
        if words in reason:
            return label
    return "other"


def association_refused(reason: str) -> None:
    """A connection or an association was refused (``reason`` as logged)."""
    _count("associations", refusal_reason(reason))


def job_finished(outcome: str) -> None:
    """A worker ended a job: ``done``, ``failed``, ``queued`` (queued again, counted as
    ``retry``) or ``lost`` (its lease went to another worker)."""
    _count("jobs", "retry" if outcome == "queued" else str(outcome))


def observe_stage(stage: str, seconds: float) -> None:
    """One stage of a job took ``seconds`` (wall)."""
    try:
        _registry_metrics()["stages"].labels(stage).observe(max(0.0, float(seconds)))
    except Exception:
        logger.debug("stage %s not observed", stage, exc_info=True)


@contextlib.contextmanager
def timed(stage: str) -> Iterator[None]:
    """Observe the block's wall seconds as ``stage``."""
    started = time.monotonic()
    try:
        yield
    finally:
        observe_stage(stage, time.monotonic() - started)


_takes_timings: dict[type, bool] = {}


def detect_timed(detector: Any, source: Any, *, path: str) -> Any:
    """``detector.detect(source, path=path)``, observing its stages: the detector's own
    (:data:`cascade.inference.detector.STAGES`) when it can time them, else ``detect``."""
    kind = type(detector)
    if kind not in _takes_timings:
        try:
            _takes_timings[kind] = "timings" in inspect.signature(detector.detect).parameters
        except (TypeError, ValueError):
            _takes_timings[kind] = False
    started = time.monotonic()
    if not _takes_timings[kind]:
        result = detector.detect(source, path=path)
        observe_stage("detect", time.monotonic() - started)
        return result
    timings: dict[str, tuple[float, float]] = {}
    result = detector.detect(source, path=path, timings=timings)
    observe_stage("detect", time.monotonic() - started)
    for stage, (wall, _cpu) in timings.items():
        observe_stage(f"detect_{stage}", wall)
    return result


# --------------------------------------------------------------------------- state


class StateCollector:
    """The gauges read at scrape time (a ``prometheus_client`` custom collector).

    Parameters
    ----------
    database : storage.database.Database
        The shared queue.
    store : storage.filestore.FileStore
        The file store (its free space).
    scp_up : callable or None
        Returns whether the SCP listens (None: no SCP in this process group).
    """

    def __init__(self, database: Any, store: Any, *, scp_up: Callable[[], bool] | None) -> None:
        self.database = database
        self.store = store
        self.scp_up = scp_up

    def describe(self) -> list[Any]:
        return []  # collected at scrape only (nothing to check at registration)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

        from node import __version__

        info = InfoMetricFamily("calcnode", "the node's version and database backend")
        info.add_metric([], {"version": __version__, "backend": self.database.backend})
        yield info
        if self.scp_up is not None:
            yield GaugeMetricFamily(
                "calcnode_scp_up", "1 while the SCP listens", value=1 if self.scp_up() else 0
            )
        free = GaugeMetricFamily("calcnode_disk_free_bytes", "free space of storage.root")
        with contextlib.suppress(OSError):
            free.add_metric([], shutil.disk_usage(self.store.root).free)
        yield free
        yield GaugeMetricFamily(
            "calcnode_disk_floor_bytes",
            "storage.min_free_mb: the node refuses images below it",
            value=self.store.min_free_mb * 1024 * 1024,
        )
        try:
            state = _database_state(self.database)
        except Exception as exc:
            logger.debug("metrics: the database did not answer: %s", exc)
            yield GaugeMetricFamily(
                "calcnode_database_up", "1 when the database answered this scrape", value=0
            )
            return
        yield GaugeMetricFamily(
            "calcnode_database_up", "1 when the database answered this scrape", value=1
        )
        for name, label, doc in (
            ("jobs", "state", "jobs by state"),
            ("studies", "state", "studies by state (failed: ended with a report error)"),
        ):
            family = GaugeMetricFamily(f"calcnode_{name}", doc, labels=[label])
            for key, n in state[name].items():
                family.add_metric([key], n)
            yield family
        yield GaugeMetricFamily(
            "calcnode_oldest_queued_job_seconds",
            "age of the oldest job due and not yet claimed (0 when none)",
            value=state["oldest_queued_seconds"],
        )
        sends = GaugeMetricFamily(
            "calcnode_sends", "sends by destination and state", labels=["destination", "state"]
        )
        for (destination, send_state), n in sorted(state["sends"].items()):
            sends.add_metric([destination, send_state], n)
        yield sends
        if state["model"]:
            model = InfoMetricFamily("calcnode_model", "the model of the latest job done")
            model.add_metric([], state["model"])
            yield model


def _database_state(database: Any) -> dict[str, Any]:
    """Counts by state, sends per destination, the oldest due job, the latest model."""
    from sqlalchemy import func, select

    from storage import jobs, studies
    from storage.models import Job, Send

    now = database.now()
    with database.transaction() as s:
        job_counts = jobs.state_counts(s)
        study_counts = studies.state_counts(s)
        send_rows = s.execute(
            select(Send.destination, Send.state, func.count()).group_by(
                Send.destination, Send.state
            )
        ).all()
        oldest = s.scalar(
            select(func.min(Job.next_attempt_at)).where(
                Job.state == "queued", Job.next_attempt_at <= now
            )
        )
        latest = s.scalar(
            select(Job.result)
            .where(Job.state == "done")
            .order_by(Job.updated_at.desc(), Job.id.desc())
            .limit(1)
        )
    oldest_seconds = 0.0
    if isinstance(oldest, dt.datetime):
        when = oldest if oldest.tzinfo else oldest.replace(tzinfo=dt.UTC)
        oldest_seconds = max(0.0, (now - when).total_seconds())
    model: dict[str, str] = {}
    provenance = latest.get("provenance") if isinstance(latest, Mapping) else None
    if isinstance(provenance, Mapping):
        for key in ("model_version", "algorithm_name", "algorithm_version", "device_uid"):
            if isinstance(provenance.get(key), str):
                model[key] = provenance[key]
    return {
        "jobs": job_counts,
        "studies": study_counts,
        "sends": {(str(d), str(st)): int(n) for d, st, n in send_rows},
        "oldest_queued_seconds": oldest_seconds,
        "model": model,
    }


# --------------------------------------------------------------------------- HTTP


def _export_registry(collector: StateCollector) -> Any:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    folder = os.environ.get(_ENV)
    if folder:
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry, path=folder)
    else:
        registry.register(_SingleProcess())
    registry.register(collector)
    return registry


class _SingleProcess:
    """This process's event metrics (no multiprocess folder)."""

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        yield from _registry_metrics()["registry"].collect()


class MonitoringServer:
    """``/metrics`` and ``/healthz`` over HTTP on a thread of this process.

    Parameters
    ----------
    host : str
        The address to listen on (``node.host``).
    port : int
        ``[monitoring] http_port`` (0 picks a free port: tests).
    collector : StateCollector
        The scrape-time gauges; its ``database`` and ``scp_up`` are the health checks.
    """

    def __init__(self, host: str, port: int, collector: StateCollector) -> None:
        self.collector = collector
        self.registry = _export_registry(collector)
        self._httpd = ThreadingHTTPServer((host, port), self._handler())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, the JSON body of ``/healthz``)."""
        reasons: list[str] = []
        checks: dict[str, str] = {}
        scp_up = self.collector.scp_up
        if scp_up is not None:
            listening = bool(scp_up())
            checks["scp"] = "listening" if listening else "not listening"
            if not listening:
                reasons.append("the DICOM SCP is not listening")
        try:
            self.collector.database.ping()
            checks["database"] = "answers"
        except Exception as exc:
            text = " ".join(str(exc).split())[:300]
            checks["database"] = f"does not answer: {text}"
            reasons.append(f"the database does not answer: {text}")
        body: dict[str, Any] = {"status": "unhealthy" if reasons else "ok", "checks": checks}
        if reasons:
            body["reasons"] = reasons
        return not reasons, body

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

                    self._reply(200, CONTENT_TYPE_LATEST, generate_latest(server.registry))
                elif path == "/healthz":
                    healthy, body = server.health()
                    payload = (json.dumps(body, indent=1) + "\n").encode()
                    self._reply(200 if healthy else 503, "application/json", payload)
                else:
                    self._reply(404, "text/plain; charset=utf-8", b"/metrics or /healthz\n")

            def _reply(self, status: int, content_type: str, payload: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                logger.debug("monitoring %s: " + format, self.address_string(), *args)

        return Handler

    def start(self) -> MonitoringServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="calcnode-monitoring", daemon=True
        )
        self._thread.start()
        logger.info(
            "monitoring: /metrics and /healthz on http://%s:%d",
            self._httpd.server_address[0],
            self.port,
        )
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(10)
