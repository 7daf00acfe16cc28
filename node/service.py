"""``calcnode serve`` / ``worker`` / ``status`` / ``jobs retry``: the node as a service.

:func:`serve` runs, in one process tree,

* the DICOM SCP (:class:`node.scp.StorageSCP`, threads of the main process),
* the scheduler (:class:`node.scheduler.NodeScheduler`, a thread of the main process),
* ``worker.count`` worker *processes* (:class:`node.pool.WorkerPool`), each loading
  the model once and running :func:`node.worker.run_worker`,
* with ``[monitoring] http_port``, ``/metrics`` and ``/healthz`` over HTTP
  (:mod:`node.monitoring`, a thread of the main process; the workers' events reach it
  through prometheus_client's multiprocess folder, made before they start).

Start-up order: configuration logged → database and file store opened (created or
migrated) → model files checked (a missing model is a :class:`ConfigError` naming
``model.path`` before anything listens) → workers spawned → scheduler → SCP →
``READY=1``. SIGTERM or SIGINT: ``STOPPING=1`` → sending stops between two objects (the one in
flight is finished and recorded, the rest stay pending) → the SCP stops accepting
(running associations are aborted; the peer retries) → workers finish their current
image (or are terminated after ``STOP_TIMEOUT_SECONDS``; their job's lease then expires
and it is claimed again) → the scheduler finishes its running task → exit status 0.
At start-up, before anything writes, temporary files a killed writer left in the store
are removed (any age).

A worker process that dies unexpectedly is restarted (at most once per
:data:`node.pool.RESTART_DELAY_SECONDS`); its job returns to the queue when its lease
expires.
"""

from __future__ import annotations

import logging
import shutil
import signal
import threading
from collections.abc import Mapping
from typing import Any

from node import monitoring, sdnotify
from node.errors import CalcnodeError
from node.logs import configure_logging
from node.model import DetectorFactory, model_weights
from node.pool import WorkerPool
from node.settings import Settings, log_effective_settings
from node.stores import open_storage

__all__ = [
    "STOP_TIMEOUT_SECONDS",
    "format_status",
    "retry_job",
    "serve",
    "status",
]

logger = logging.getLogger(__name__)

#: How long :func:`serve` waits for workers to finish their image on shutdown.
STOP_TIMEOUT_SECONDS = 60.0


# --------------------------------------------------------------------------- serve
def serve(
    settings: Settings,
    *,
    workers: int | None = None,
    stop_event: threading.Event | None = None,
    ready: threading.Event | None = None,
    detector_factory: DetectorFactory | None = None,
    port: int | None = None,
    monitoring_port: int | None = None,
) -> int:
    """Run the node until SIGTERM/SIGINT (or ``stop_event``); blocking.

    Parameters
    ----------
    settings : Settings
        The validated configuration.
    workers : int or None
        Worker processes to start; ``worker.count`` when None. 0 = none here (workers
        run as ``calcnode-worker@N`` units).
    stop_event : threading.Event, optional
        Set it to shut down (tests; signals are handled only in the main thread).
    ready : threading.Event, optional
        Set once the SCP listens (tests).
    detector_factory : callable, optional
        Passed to each worker process (must be picklable: a module-level function).
    port : int or None
        Listen on this port instead of ``node.port`` (0 = any free port).
    monitoring_port : int or None
        Serve ``/metrics`` and ``/healthz`` on this port instead of ``[monitoring]
        http_port`` (0 = off).

    Returns
    -------
    int
        0 after an orderly shutdown.

    Raises
    ------
    ConfigError
        The model cannot be found (names ``model.path``).
    ValueError, TypeError
        ``workers`` is not a non-negative int.
    OSError
        The SCP cannot bind its port.
    """
    from node.scheduler import NodeScheduler
    from node.scp import StorageSCP
    from node.server import ServerLimits

    if not isinstance(settings, Settings):
        raise TypeError(f"settings must be a Settings, got {type(settings).__name__}")
    count = settings.worker.count if workers is None else workers
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(f"workers must be an int or None, got {type(workers).__name__}")
    if count < 0:
        raise ValueError(f"workers must be >= 0, got {count}")

    configure_logging(settings)
    log_effective_settings(settings, log=logger)
    if count > 0 and detector_factory is None:
        weights = model_weights(settings)  # ConfigError naming model.path before listening
        logger.info(
            "model: %s%s (%s weights, sha256 %s)",
            weights.asn,
            f" + {weights.fpr}" if weights.fpr else " (no FPR stage)",
            "bundled" if weights.bundled else "configured",
            weights.sha256[:12],
        )
    if not settings.destinations:
        logger.warning("no destinations configured: results are made but sent nowhere")

    http_port = settings.monitoring.http_port if monitoring_port is None else monitoring_port
    stop = stop_event if stop_event is not None else threading.Event()
    restore = _install_signal_handlers(stop)
    database, store = open_storage(settings)
    # A writer killed mid-write (this node, a worker) leaves its temporary file behind;
    # this host's go now, whatever their age and whatever retention_days says (a live
    # worker unit's own are kept). Another host's (a shared store) cannot be checked from
    # here: only those older than an hour go, so a write in progress there is left alone.
    store.purge_stale_temp_files(
        older_than_seconds=0, live_writers_kept=True, other_hosts_older_than_seconds=3600
    )
    pool = WorkerPool(settings, count, device=None, detector_factory=detector_factory)
    scheduler = NodeScheduler(database, store, settings)
    node, mib = settings.node, 1024 * 1024
    limits = ServerLimits(
        handshake_timeout_seconds=node.handshake_timeout_seconds,
        associations_per_host=node.associations_per_host,
        max_dataset_bytes=node.max_instance_mb * mib,
    )
    scp = StorageSCP(
        settings=settings,
        store=store,
        database=database,
        port=port,
        limits=limits,
        max_inflated_bytes=node.max_inflated_mb * mib,
    )
    # Before the workers start (they inherit it) and before anything counts an event.
    metrics_folder = monitoring.prepare() if http_port else None
    monitor: monitoring.MonitoringServer | None = None
    try:
        pool.start()
        scheduler.start()
        if http_port:
            collector = monitoring.StateCollector(database, store, scp_up=lambda: scp.running)
            monitor = monitoring.MonitoringServer(settings.node.host, http_port, collector)
            monitor.start()
        scp.start()
        logger.info(
            "calcnode serving: AE %s on port %d, %d worker process(es)",
            settings.node.ae_title,
            scp.port,
            count,
        )
        sdnotify.notify(
            f"READY=1\nSTATUS=listening on port {scp.port} as {settings.node.ae_title}, "
            f"{count} worker(s)"
        )
        if ready is not None:
            ready.set()
        while not stop.wait(1.0):
            pool.supervise()
    finally:
        logger.info("calcnode stopping")
        sdnotify.notify("STOPPING=1\nSTATUS=stopping")
        # First: no new send starts (the one in flight finishes and is recorded), so a
        # slow PACS neither holds the stop up nor gets objects twice after a kill.
        scheduler.stop_sending()
        try:
            scp.stop()
        finally:
            try:
                pool.stop(STOP_TIMEOUT_SECONDS)
            finally:
                scheduler.stop(wait=True)
                if monitor is not None:
                    monitor.stop()
                if metrics_folder is not None:
                    shutil.rmtree(metrics_folder, ignore_errors=True)
                database.close()
                if restore is not None:
                    restore()
    logger.info("calcnode stopped")
    return 0


def _install_signal_handlers(stop: threading.Event) -> Any:
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, _frame: Any) -> None:
        logger.info("received %s: shutting down", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


# --------------------------------------------------------------------------- admin
def _open_existing(settings: Settings) -> Any:
    """Open the node's database without creating it.

    An admin command run as root must not create a root-owned database that the
    service (user ``calcnode``) then cannot write.
    """
    from node.stores import queue_policy
    from storage.database import open_database
    from storage.errors import SchemaVersionError

    try:
        return open_database(
            settings.storage.database_url, create=False, policy=queue_policy(settings)
        )
    except SchemaVersionError as exc:
        raise CalcnodeError(
            f"storage.database_url: {exc} (has the node been started with this configuration?)"
        ) from exc


def status(settings: Settings) -> dict[str, Any]:
    """The node's state from its database, for ``calcnode status`` (no patient data).

    Returns
    -------
    dict
        ``{"node": {ae_title, port, destinations}, "database": redacted URL,
        "backend": "sqlite" or "postgresql", "jobs": {state: n}, "sends": {state: n},
        "studies": {state: n},
        "pending_sends": {destination: n}, "recent_errors": [...]}``.
    """
    database = _open_existing(settings)
    try:
        summary = database.status_summary()
        pending = database.sends.pending_by_destination()
        backend = database.backend
    finally:
        database.close()
    return {
        "node": {
            "ae_title": settings.node.ae_title,
            "port": settings.node.port,
            "destinations": [
                f"{d.name} ({d.ae_title}@{d.host}:{d.port})" for d in settings.destinations
            ],
        },
        "database": settings.redacted()["storage"]["database_url"],
        "backend": backend,
        **summary,
        "pending_sends": pending,
    }


def format_status(info: Mapping[str, Any]) -> str:
    """A human-readable rendering of :func:`status`'s dictionary."""
    node = info.get("node", {})
    lines = [
        f"node       {node.get('ae_title', '?')} on port {node.get('port', '?')}",
        f"database   {info.get('database', '?')}",
        "destinations " + (", ".join(node.get("destinations", [])) or "none"),
    ]
    for section in ("jobs", "studies", "sends"):
        counts = info.get(section, {})
        lines.append(f"{section:<10} " + "  ".join(f"{k} {v}" for k, v in counts.items()))
    pending = info.get("pending_sends", {})
    if pending:
        lines.append(
            "pending    " + "  ".join(f"{dest} {n}" for dest, n in sorted(pending.items()))
        )
    errors = info.get("recent_errors", [])
    if errors:
        lines.append("recent errors:")
        for err in errors:
            # One line per error, its reason included: a decoder's message is often on
            # the lines after a generic first one.
            text = " ".join(str(err.get("error") or "").split())
            text = text if len(text) <= 200 else text[:197] + "..."
            attempts = err.get("attempts")
            tries = f", {attempts} attempt(s)" if attempts is not None else ""
            lines.append(
                f"  {err.get('kind')} {err.get('id')} [{err.get('state')}{tries}] "
                f"{err.get('at')}: {text}"
            )
    return "\n".join(lines)


def retry_job(settings: Settings, job_id: int) -> dict[str, Any]:
    """Queue a failed (or done) job again now, attempts reset (``calcnode jobs retry``).

    Returns
    -------
    dict
        ``{"job_id", "state", "sop_instance_uid", "study_instance_uid"}`` after the change.

    Raises
    ------
    CalcnodeError
        No database yet (the node never started with this configuration).
    storage.errors.JobNotFoundError
        No such job.
    ValueError
        The job is running.
    """
    if isinstance(job_id, bool) or not isinstance(job_id, int):
        raise TypeError(f"job_id must be an int, got {type(job_id).__name__}")
    database = _open_existing(settings)
    try:
        database.jobs.retry_job(job_id)
        job = database.jobs.get_job(job_id)
    finally:
        database.close()
    return {
        "job_id": job.job_id,
        "state": job.state,
        "sop_instance_uid": job.sop_instance_uid,
        "study_instance_uid": job.study_instance_uid,
    }
