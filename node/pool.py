"""The worker processes of ``calcnode serve``: started, supervised, restarted, stopped.

Each process runs :func:`node.worker.run_worker` until SIGTERM (it finishes its current
image first). Processes are spawned, not forked: torch and SQLite connections do not
survive a fork.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from typing import Any

from node.logs import configure_logging
from node.model import DetectorFactory
from node.settings import Settings

__all__ = ["RESTART_DELAY_SECONDS", "WorkerPool", "worker_device"]

logger = logging.getLogger(__name__)

#: Minimum delay between two restarts of a crashed worker process.
RESTART_DELAY_SECONDS = 5.0


def worker_device(configured: str, index: int, gpu_count: int) -> str:
    """The device worker ``index`` uses: ``cuda:(index mod k)`` on a host with k > 1 GPUs.

    Only ``"auto"`` and ``"cuda"`` are spread over the GPUs; an explicit ``"cuda:N"``,
    ``"cpu"`` or a host with at most one GPU keeps the configured device.

    Parameters
    ----------
    configured : str
        ``model.device`` (or the command line's override).
    index : int
        The worker's index in the pool (0-based).
    gpu_count : int
        CUDA devices the worker sees.
    """
    if index < 0 or gpu_count < 0:
        raise ValueError(f"index and gpu_count must be ≥ 0, got {index}, {gpu_count}")
    if configured in ("auto", "cuda") and gpu_count > 1:
        return f"cuda:{index % gpu_count}"
    return configured


def _pinned_device(configured: str, index: int) -> str:
    """:func:`worker_device` with the GPUs this (worker) process sees; imports torch."""
    if configured not in ("auto", "cuda"):
        return configured
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return worker_device(configured, index, count)


def _worker_main(
    settings: Settings,
    device: str | None,
    worker_id: str,
    detector_factory: DetectorFactory | None,
    index: int = 0,
) -> None:
    """Entry point of a spawned worker process: runs until SIGTERM.

    On a host with several GPUs worker ``index`` is pinned to GPU ``index mod k``
    (:func:`worker_device`), counted here, in the worker.
    """
    # Imported here, in the worker: the main process (SCP, scheduler) never loads torch.
    from node.worker import run_worker

    configure_logging(settings)
    device = _pinned_device(device or settings.model.device, index)
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


class WorkerPool:
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
            args=(self._settings, self._device, worker_id, self._factory, index),
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
