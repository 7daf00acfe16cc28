"""``calcnode serve`` / ``worker`` / ``status`` / ``jobs retry``: the node as a service.

:func:`serve` runs, in one process tree,

* the DICOM SCP (:class:`node.scp.StorageSCP`, threads of the main process),
* the scheduler (:class:`node.scheduler.NodeScheduler`, a thread of the main process),
* ``worker.count`` worker *processes* (multiprocessing ``spawn`` context: no forked
  torch or database state), each loading the model once and running
  :func:`node.worker.run_worker`.

Start-up order: configuration logged → database and file store opened (created or
migrated) → model files checked (a missing model is a :class:`ConfigError` naming
``model.path`` before anything listens) → workers spawned → scheduler → SCP →
``READY=1``. SIGTERM or SIGINT: ``STOPPING=1`` → the SCP stops accepting (running
associations are aborted; the peer retries) → workers finish their current image (or
are terminated after ``STOP_TIMEOUT_SECONDS``; their job's lease then expires and it is
claimed again) → the scheduler finishes its running job → exit status 0.

A worker process that dies unexpectedly is restarted (at most once per
``RESTART_DELAY_SECONDS``); its job returns to the queue when its lease expires.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

from node import sdnotify
from node.errors import CalcnodeError
from node.settings import Settings, log_effective_settings
from node.worker import DetectorFactory, model_files, open_storage, run_worker

__all__ = [
    "RESTART_DELAY_SECONDS",
    "STOP_TIMEOUT_SECONDS",
    "configure_logging",
    "format_status",
    "retry_job",
    "run_worker",
    "serve",
    "status",
]

logger = logging.getLogger(__name__)

#: How long :func:`serve` waits for workers to finish their image on shutdown.
STOP_TIMEOUT_SECONDS = 60.0
#: Minimum delay between two restarts of a crashed worker process.
RESTART_DELAY_SECONDS = 5.0

_LOG_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


def configure_logging(settings: Settings) -> None:
    """Log to stdout (the journal under systemd) at ``logging.level``.

    A handler is added only when the root logger has none (the CLI may have configured
    one); pynetdicom is held at ``logging.pynetdicom_level`` because it logs patient
    identifiers at INFO/DEBUG.
    """
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(_LOG_FORMAT))
        root.addHandler(handler)
    root.setLevel(settings.logging.level)
    for name in ("node", "storage", "cascade"):
        logging.getLogger(name).setLevel(settings.logging.level)
    logging.getLogger("pynetdicom").setLevel(settings.logging.pynetdicom_level)
    # highdicom narrates every attribute it copies at INFO: noise in the journal.
    logging.getLogger("highdicom").setLevel(max(logging.WARNING, root.level))


# --------------------------------------------------------------------------- workers
def _worker_main(
    settings: Settings,
    device: str | None,
    worker_id: str,
    detector_factory: DetectorFactory | None,
) -> None:
    """Entry point of a spawned worker process: runs until SIGTERM."""
    configure_logging(settings)
    stop = threading.Event()
    # The parent stops a worker with SIGTERM (it then finishes its current image).
    # Ctrl-C in a terminal reaches the whole process group: the parent decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda _s, _f: stop.set())
    # sd_notify is the main process's business (NotifyAccess=main).
    os.environ.pop("NOTIFY_SOCKET", None)
    try:
        run_worker(
            settings,
            device=device,
            worker_id=worker_id,
            stop_event=stop,
            detector_factory=detector_factory,
        )
    except Exception:
        logger.exception("worker %s crashed", worker_id)
        raise SystemExit(1) from None


class _WorkerPool:
    """``count`` worker processes; restarts the ones that die."""

    def __init__(
        self,
        settings: Settings,
        count: int,
        *,
        device: str | None,
        detector_factory: DetectorFactory | None,
    ) -> None:
        self._ctx = multiprocessing.get_context("spawn")
        self._settings = settings
        self._device = device
        self._factory = detector_factory
        # Stopping is signalled with SIGTERM, not a multiprocessing.Event: its
        # Condition can deadlock between parent and child (seen in testing).
        self._stopping = False
        self._procs: list[Any] = [None] * count
        self._started_at = [0.0] * count
        self._host = socket.gethostname()

    def _spawn(self, index: int) -> None:
        worker_id = f"{self._host}:{os.getpid()}:w{index}"
        proc = self._ctx.Process(
            target=_worker_main,
            args=(self._settings, self._device, worker_id, self._factory),
            name=f"calcnode-worker-{index}",
            daemon=False,
        )
        proc.start()
        self._procs[index] = proc
        self._started_at[index] = time.monotonic()
        logger.info("worker process %d started (pid %d)", index, proc.pid)

    def start(self) -> None:
        for index in range(len(self._procs)):
            self._spawn(index)

    def supervise(self) -> None:
        """Restart dead workers (rate-limited); call periodically."""
        if self._stopping:
            return
        for index, proc in enumerate(self._procs):
            if proc is None or proc.is_alive():
                continue
            if time.monotonic() - self._started_at[index] < RESTART_DELAY_SECONDS:
                continue
            logger.error(
                "worker process %d (pid %s) exited with status %s; restarting",
                index,
                proc.pid,
                proc.exitcode,
            )
            self._spawn(index)

    def stop(self, timeout: float) -> None:
        """SIGTERM every worker, wait up to ``timeout`` for them, then SIGKILL."""
        self._stopping = True
        for proc in self._procs:
            if proc is not None and proc.is_alive():
                proc.terminate()  # SIGTERM: finish the current image, then exit
        deadline = time.monotonic() + timeout
        for proc in self._procs:
            if proc is not None:
                proc.join(max(0.0, deadline - time.monotonic()))
        for index, proc in enumerate(self._procs):
            if proc is not None and proc.is_alive():
                logger.warning(
                    "worker process %d did not stop in %.0f s; killing it (its job returns "
                    "to the queue when the lease expires)",
                    index,
                    timeout,
                )
                proc.kill()
                proc.join(5)


# --------------------------------------------------------------------------- serve
def serve(
    settings: Settings,
    *,
    workers: int | None = None,
    stop_event: threading.Event | None = None,
    ready: threading.Event | None = None,
    detector_factory: DetectorFactory | None = None,
    port: int | None = None,
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
        files = model_files(settings)  # ConfigError naming model.path before listening
        logger.info(
            "model: %s%s (%s weights, sha256 %s)",
            files.asn,
            f" + {files.fpr}" if files.fpr else " (no FPR stage)",
            "bundled" if files.bundled else "configured",
            files.sha256[:12],
        )
    if not settings.destinations:
        logger.warning("no destinations configured: results are made but sent nowhere")

    stop = stop_event if stop_event is not None else threading.Event()
    restore = _install_signal_handlers(stop)
    database, store = open_storage(settings)
    pool = _WorkerPool(settings, count, device=None, detector_factory=detector_factory)
    scheduler = NodeScheduler(database, store, settings)
    scp = StorageSCP(settings=settings, store=store, database=database, port=port)
    try:
        pool.start()
        scheduler.start()
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
        try:
            scp.stop()
        finally:
            try:
                pool.stop(STOP_TIMEOUT_SECONDS)
            finally:
                scheduler.stop(wait=True)
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
    from node.worker import queue_policy
    from storage.errors import SchemaVersionError
    from storage.queue import open_database

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
        "jobs": {state: n}, "sends": {state: n}, "studies": {state: n},
        "pending_sends": {destination: n}, "recent_errors": [...]}``.
    """
    from sqlalchemy import func, select

    from storage.models import Send

    database = _open_existing(settings)
    try:
        summary = database.status_summary()
        with database.engine.connect() as conn:
            rows = conn.execute(
                select(Send.destination, func.count())
                .where(Send.state == "pending")
                .group_by(Send.destination)
            ).all()
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
        **summary,
        "pending_sends": {dest: int(n) for dest, n in rows},
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
            text = str(err.get("error", "")).splitlines()[0][:120] if err.get("error") else ""
            lines.append(
                f"  {err.get('kind')} {err.get('id')} [{err.get('state')}, "
                f"{err.get('attempts')} attempt(s)] {err.get('at')}: {text}"
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
        database.retry_job(job_id)
        job = database.get_job(job_id)
    finally:
        database.close()
    return {
        "job_id": job.job_id,
        "state": job.state,
        "sop_instance_uid": job.sop_instance_uid,
        "study_instance_uid": job.study_instance_uid,
    }


def _main_for_tests(argv: list[str]) -> int:  # pragma: no cover - used by subprocess tests
    """``python -m node.service CONFIG [WORKERS]``: serve with a config file."""
    # Import by module name: run as __main__, this file's own functions would be
    # pickled as __main__.* for the spawned workers.
    from node.service import serve as serve_
    from node.settings import load_settings

    settings = load_settings(argv[0])
    workers = int(argv[1]) if len(argv) > 1 else None
    return serve_(settings, workers=workers)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_main_for_tests(sys.argv[1:]))
