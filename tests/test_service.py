"""Tests of node.service: ``serve`` as a real process, signals, readiness, status, retry."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from factories import make_mg_dataset
from pydicom.dataset import Dataset

from node.errors import ConfigError
from node.service import format_status, retry_job, serve, status
from node.settings import DestinationSettings
from storage.errors import JobNotFoundError
from tests.helpers import (
    REPO,
    SERVE,
    FakeDetector,
    Receiver,
    clean_env,
    free_port,
    make_settings,
    make_worker,
    receive,
    start_serve,
    write_config,
)


class NotifySocket:
    """A Unix datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in m for m in self.messages):
                return True
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                break
        return any(text in m for m in self.messages)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    # Unix socket paths are limited to ~107 bytes: pytest's tmp_path can be longer.
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="cn-notify-"))
    sock = NotifySocket(folder / "notify")
    try:
        yield sock
    finally:
        sock.close()
        (folder / "notify").unlink(missing_ok=True)
        folder.rmdir()


def echo(port: int, *, called: str = "CALCNODE") -> int:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return -1
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def test_serve_process_answers_echo_and_exits_0_on_sigterm(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    port = free_port()
    config = write_config(tmp_path / "calcnode.toml", make_settings(tmp_path / "node", port=port))
    log = tmp_path / "serve.log"
    proc = start_serve(config, 0, clean_env(NOTIFY_SOCKET=str(notify_socket.path)), log)
    try:
        assert notify_socket.wait_for("READY=1", 60), log.read_text()
        assert echo(port) == 0x0000
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert notify_socket.wait_for("STOPPING=1", 5)
    text = log.read_text()
    assert "configuration [node]" in text  # the effective settings were logged
    assert "calcnode stopped" in text
    assert "Traceback" not in text


def test_serve_refuses_a_config_with_an_unknown_key_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[node]\nprot = 11112\n")
    result = subprocess.run(
        [sys.executable, "-c", SERVE, str(config), "0"],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "ConfigError" in result.stderr
    assert "prot" in result.stderr and "node" in result.stderr


def test_serve_without_model_weights_raises_config_error_naming_model_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("cascade.inference.weights.BUNDLED_WEIGHTS", tmp_path / "no-weights")
    settings = make_settings(tmp_path / "node", port=free_port())
    with pytest.raises(ConfigError, match=r"model\.path"):
        serve(settings, workers=1)


@pytest.mark.parametrize(("workers", "error"), [(-1, ValueError), ("2", TypeError)])
def test_serve_rejects_a_bad_worker_count(
    tmp_path: Path, workers: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match="workers"):
        serve(make_settings(tmp_path), workers=workers)  # type: ignore[arg-type]


def test_serve_in_a_thread_stops_on_its_stop_event(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, port=free_port())
    stop, ready = threading.Event(), threading.Event()
    codes: list[int] = []
    thread = threading.Thread(
        target=lambda: codes.append(serve(settings, workers=0, stop_event=stop, ready=ready))
    )
    thread.start()
    try:
        assert ready.wait(30)
        assert echo(settings.node.port) == 0x0000
    finally:
        stop.set()
        thread.join(30)
    assert codes == [0]


#: What the main process of ``calcnode serve`` runs: the SCP, the scheduler and its
#: reports, the sender, monitoring, the worker pool (its processes import the rest).
MAIN_PROCESS_MODULES = (
    "node.cli",
    "node.service",
    "node.scheduler",
    "node.scp",
    "node.scu",
    "node.monitoring",
    "node.pool",
    "node.model",
    "node.reports",
)


def test_the_main_process_modules_import_neither_torch_nor_onnxruntime() -> None:
    code = (
        f"import sys; import {', '.join(MAIN_PROCESS_MODULES)}; "
        "print(sorted({'torch', 'onnxruntime'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert result.stdout.strip() == "[]", result.stderr


@dataclass
class ServedImage:
    """One ``calcnode serve`` (one worker, the tiny model) that received one image."""

    ds: Dataset
    receiver: Receiver
    ready: bool
    stored: bool
    #: ``/proc/<pid>/maps`` of the main process once the SRs were sent (None off Linux).
    main_libraries: str | None
    exit_code: int | None
    log: str


@pytest.fixture(scope="module")
def served_image(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServedImage]:
    """``calcnode serve`` with one worker and the tiny model, one MG image stored to it,
    run until the results reached the receiver, then SIGTERM.

    Shared by the tests of what that run did (a serve process with a worker costs a
    torch import and a model load each time), which read the recorded outcome.
    """
    import tempfile

    from pynetdicom import AE

    tmp_path = tmp_path_factory.mktemp("served-image")
    folder = Path(tempfile.mkdtemp(prefix="cn-notify-"))  # Unix socket paths ≲ 107 bytes
    notify_socket = NotifySocket(folder / "notify")
    receiver = Receiver().start()
    port = free_port()
    dest = DestinationSettings(
        name="rx", ae_title=receiver.ae_title, host="127.0.0.1", port=receiver.port
    )
    settings = make_settings(
        tmp_path / "node", port=port, model_path=tiny_model, destinations=(dest,), quiet_seconds=1
    )
    config = write_config(tmp_path / "calcnode.toml", settings)
    log = tmp_path / "serve.log"
    proc = start_serve(config, 1, clean_env(NOTIFY_SOCKET=str(notify_socket.path)), log)
    ds = make_mg_dataset(seed=5)
    stored, libraries, code = False, None, None
    try:
        # start-up checked the model files (hashed, never loaded) before listening
        ready = notify_socket.wait_for("READY=1", 60)
        assert ready, log.read_text()
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="CALCNODE")
        if assoc.is_established:
            stored = assoc.send_c_store(ds).Status == 0x0000
            assoc.release()
        # the SRs are built and sent by the main process's scheduler
        deadline = time.monotonic() + 120
        while stored and time.monotonic() < deadline and len(receiver.by_modality("SR")) < 2:
            time.sleep(0.5)
        maps = Path(f"/proc/{proc.pid}/maps")
        libraries = maps.read_text() if maps.exists() else None
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        yield ServedImage(ds, receiver, ready, stored, libraries, code, log.read_text())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        receiver.stop()
        notify_socket.close()
        (folder / "notify").unlink(missing_ok=True)
        folder.rmdir()


@pytest.mark.slow
@pytest.mark.xdist_group("served_image")
def test_serve_processes_a_stored_image_and_sends_results(served_image: ServedImage) -> None:
    run, receiver, ds = served_image, served_image.receiver, served_image.ds
    assert run.ready and run.stored, run.log[-3000:]
    assert run.exit_code == 0, run.log[-3000:]
    assert len(receiver.by_modality("SR")) == 2, run.log[-3000:]
    assert len(receiver.by_modality("SEG")) == 1
    assert len(receiver.by_modality("PR")) == 1
    assert {d.StudyInstanceUID for d in receiver.datasets} == {ds.StudyInstanceUID}


@pytest.mark.slow
@pytest.mark.xdist_group("served_image")
def test_serve_main_process_runs_without_torch_while_its_worker_detects(
    served_image: ServedImage,
) -> None:
    run = served_image
    assert run.ready and run.stored, run.log[-3000:]
    assert len(run.receiver.by_modality("SR")) == 2, run.log[-3000:]
    if sys.platform != "linux":
        pytest.skip("reads the main process's /proc/<pid>/maps, which only Linux has")
    # on Linux a missing maps file means the main process was gone when it was read
    assert run.main_libraries is not None, run.log[-3000:]
    # read while the node was serving, after its worker had detected
    assert "libtorch" not in run.main_libraries
    assert "onnxruntime" not in run.main_libraries
    assert run.exit_code == 0, run.log[-3000:]


def test_status_counts_jobs_and_formats_without_patient_data(tmp_path: Path) -> None:
    dest = DestinationSettings(name="pacs", ae_title="PACS", host="127.0.0.1", port=4242)
    settings = make_settings(tmp_path, destinations=(dest,), max_attempts=1)
    worker = make_worker(settings, FakeDetector(fail_times=1))
    receive(worker.database, worker.store, make_mg_dataset(patient_id="SECRET-ID-42"))
    receive(worker.database, worker.store, make_mg_dataset(patient_id="SECRET-ID-42"))
    worker.detector = FakeDetector(fail_times=1)
    assert worker.run_once() == "failed"
    worker.detector = FakeDetector()
    assert worker.run_once() == "done"

    info = status(settings)
    assert info["jobs"] == {"queued": 0, "running": 0, "done": 1, "failed": 1}
    assert info["pending_sends"] == {"pacs": 2}
    assert info["recent_errors"][0]["kind"] == "job"
    text = format_status(info)
    assert "done 1" in text and "failed 1" in text
    assert "pacs 2" in text
    assert "simulated failure" in text
    assert "SECRET-ID-42" not in text


def test_retry_job_requeues_a_failed_job(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, max_attempts=1)
    worker = make_worker(settings, FakeDetector(fail_times=1))
    job_id = receive(worker.database, worker.store, make_mg_dataset())
    assert worker.run_once() == "failed"
    assert retry_job(settings, job_id)["state"] == "queued"
    assert worker.run_once() == "done"
    with pytest.raises(JobNotFoundError):
        retry_job(settings, 999)
    with pytest.raises(TypeError, match="job_id"):
        retry_job(settings, "1")  # type: ignore[arg-type]


def test_status_without_a_database_says_so_and_creates_nothing(tmp_path: Path) -> None:
    from node.errors import CalcnodeError

    settings = make_settings(tmp_path / "never-started")
    with pytest.raises(CalcnodeError, match=r"storage\.database_url"):
        status(settings)
    assert not (tmp_path / "never-started" / "calcnode.db").exists()
