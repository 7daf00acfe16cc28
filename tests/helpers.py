"""Helpers of the node tests: settings, a received-image helper, fake detectors, a
pynetdicom receiver and an Orthanc server. Fixtures that use them live in conftest.py.

Import them as ``from tests.helpers import …`` (the test data builders are in
``tests.factories``). Everything binds to 127.0.0.1 on free ports.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock
from pydicom.dataset import Dataset

from cascade.inference.detections import Detection, ImageDetections
from cascade.inference.weights import ModelIdentity
from node.identity import make_provenance
from node.settings import (
    DestinationSettings,
    LoggingSettings,
    ModelSettings,
    NodeSettings,
    OutputSettings,
    SchedulerSettings,
    SendSettings,
    Settings,
    StorageSettings,
    StudySettings,
    WorkerSettings,
)
from node.stores import open_storage
from node.worker import Worker

ORTHANC = Path("/usr/sbin/Orthanc")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (bind to 0, read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_tiny_model(folder: Path, *, seed: int = 0) -> Path:
    """A random-weight ASN + FPR pair (the demo's untrained model); returns ``asn.pt``.

    Its detections are arbitrary: fine for plumbing, not accuracy.
    """
    from node.demo import write_untrained_model

    return write_untrained_model(folder, seed=seed)


def make_settings(
    root: Path,
    *,
    model_path: Path | None = None,
    operating_point: str = "all",
    destinations: tuple[DestinationSettings, ...] = (),
    port: int = 11112,
    quiet_seconds: float = 0.0,
    lease_seconds: float = 30.0,
    retry_backoff_seconds: float = 0.0,
    max_attempts: int = 3,
    worker_count: int = 0,
    poll_seconds: float = 0.1,
    send_retry_seconds: float = 1.0,
    kinds: tuple[str, ...] = ("cad-sr", "tid1500-sr", "seg", "gsps"),
    study_check_seconds: float = 0.5,
    send_check_seconds: float = 0.5,
    lease_check_seconds: float = 1.0,
    allowed_calling_aets: tuple[str, ...] = (),
    node_options: dict[str, Any] | None = None,
) -> Settings:
    """Node settings for tests: store under ``root``, loopback, fast intervals, CPU.

    ``node_options`` adds or overrides ``[node]`` keys (TLS, allow-lists, limits).
    """
    node: dict[str, Any] = {
        "ae_title": "CALCNODE",
        "host": "127.0.0.1",
        "port": port,
        "allowed_calling_aets": allowed_calling_aets,
        "acse_timeout_seconds": 5.0,
        "dimse_timeout_seconds": 30.0,
        "network_timeout_seconds": 30.0,
        **(node_options or {}),
    }
    return Settings(
        node=NodeSettings(**node),
        storage=StorageSettings(root=root, min_free_mb=0, retention_days=30),
        study=StudySettings(quiet_seconds=quiet_seconds),
        outputs=OutputSettings(kinds=kinds),
        destinations=destinations,
        # "all": the tiny random model's FPR is undecided (≈ 0.5 everywhere); plumbing
        # tests need its candidates whatever side of the FPR decision they fall.
        model=ModelSettings(
            path=model_path, device="cpu", torch_threads=1, operating_point=operating_point
        ),
        worker=WorkerSettings(
            count=worker_count,
            lease_seconds=lease_seconds,
            max_attempts=max_attempts,
            retry_backoff_seconds=retry_backoff_seconds,
            poll_seconds=poll_seconds,
        ),
        send=SendSettings(
            retry_initial_seconds=send_retry_seconds,
            retry_max_seconds=max(send_retry_seconds, 2.0),
            max_attempts=50,
            timeout_seconds=10.0,
        ),
        scheduler=SchedulerSettings(
            study_check_seconds=study_check_seconds,
            send_check_seconds=send_check_seconds,
            lease_check_seconds=lease_check_seconds,
            retention_check_seconds=3600.0,
        ),
        logging=LoggingSettings(level="INFO", pynetdicom_level="WARNING"),
    )


# --------------------------------------------------------------------------- serve process
REPO = Path(__file__).resolve().parent.parent
#: ``python -c SERVE <config> <workers>`` runs ``calcnode serve`` in a fresh process.
SERVE = (
    "import sys; from node.settings import load_settings; from node.service import serve; "
    "sys.exit(serve(load_settings(sys.argv[1]), workers=int(sys.argv[2])))"
)


def write_config(path: Path, settings: Settings) -> Path:
    """``settings`` as a TOML configuration file at ``path``."""
    from node.settings import dump_toml

    path.write_text(dump_toml(settings))
    return path


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without CALCNODE_* overrides nor $NOTIFY_SOCKET, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALCNODE_")}
    env.pop("NOTIFY_SOCKET", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def start_serve(config: Path, workers: int, env: dict[str, str], log: Path) -> subprocess.Popen:  # type: ignore[type-arg]
    """``calcnode serve`` on ``config`` with its output (stdout and stderr) in ``log``."""
    return subprocess.Popen(
        [sys.executable, "-c", SERVE, str(config), str(workers)],
        cwd=REPO,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


def openssl_cert(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed P-256 certificate and its key (``<name>.crt``, ``<name>.key``)."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec"),
            *("-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"),
            *("-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert)),
        ],
        capture_output=True,
        check=True,
        timeout=30,
    )
    return cert, key


def receive(
    database: Any,
    store: Any,
    ds: Dataset,
    *,
    calling_aet: str = "TEST",
    now: dt.datetime | None = None,
) -> int:
    """Store ``ds`` and queue its job as the SCP would; returns the job id."""
    from node.results import encode_dataset

    rel = store.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    stored = store.write_atomic(rel, encode_dataset(ds))
    result = database.jobs.enqueue_image(
        sop_instance_uid=str(ds.SOPInstanceUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        path=stored.relpath,
        digest=stored.digest,
        size=stored.size,
        calling_aet=calling_aet,
        now=now,
    )
    return result.job_id


# --------------------------------------------------------------------------- fake detectors
class FakeDetector:
    """Detections at fixed points (x = column, y = row, pixel centres); optional delay."""

    def __init__(
        self,
        points: tuple[tuple[float, float], ...] = ((40.0, 50.0), (120.0, 90.0)),
        *,
        delay: float = 0.0,
        fail_times: int = 0,
        error: type[Exception] = RuntimeError,
    ) -> None:
        self.points = points
        self.delay = delay
        self.fail_times = fail_times
        self.error = error
        self.calls = 0

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity(version="fake-1", sha256=hashlib.sha256(b"model:fake-1").hexdigest())

    def detect(self, source: Any, *, path: str = "") -> ImageDetections:
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        if self.calls <= self.fail_times:
            raise self.error(f"simulated failure {self.calls}")
        spacing = tuple(float(v) for v in source.PixelSpacing)
        return ImageDetections(
            sop_instance_uid=str(source.SOPInstanceUID),
            path=path,
            rows=int(source.Rows),
            columns=int(source.Columns),
            pixel_spacing_mm=(spacing[0], spacing[1]),
            detections=tuple(
                Detection(x=x, y=y, score=0.9, asn_score=2.0, fpr_score=0.45, radius_px=2.0)
                for x, y in self.points
            ),
        )


def slow_factory(settings: Settings, device: str | None) -> FakeDetector:
    """A detector that hangs for a minute: the worker gets killed while it runs."""
    return FakeDetector(delay=60.0)


def fast_factory(settings: Settings, device: str | None) -> FakeDetector:
    return FakeDetector()


def make_worker(settings: Settings, detector: Any, worker_id: str = "w-test") -> Worker:
    database, store = open_storage(settings)
    return Worker(
        settings=settings,
        database=database,
        store=store,
        detector=detector,
        provenance=make_provenance(model_version="fake-1", model_sha256="ab" * 32),
        worker_id=worker_id,
    )


# --------------------------------------------------------------------------- receiver
@dataclass
class Receiver:
    """A pynetdicom C-STORE SCP that keeps what it receives (a stand-in PACS)."""

    ae_title: str = "RECEIVER"
    port: int = 0
    datasets: list[Dataset] = field(default_factory=list)
    arrival: dict[str, float] = field(default_factory=dict)
    _server: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Receiver:
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.ae_title)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax)
        ae.add_supported_context(Verification)

        def on_store(event: Any) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            with self._lock:
                self.datasets.append(ds)
                self.arrival[str(ds.SOPInstanceUID)] = time.monotonic()
            return 0x0000

        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
        )
        self.port = int(self._server.server_address[1])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def by_modality(self, modality: str) -> list[Dataset]:
        with self._lock:
            return [ds for ds in self.datasets if ds.Modality == modality]


# --------------------------------------------------------------------------- Orthanc
class OrthancServer:
    """Orthanc (the Debian package) on loopback ports with a generated configuration.

    ``storage`` persists across :meth:`stop` / :meth:`start`, so a restarted server has
    the same studies (the "PACS was down" test).
    """

    def __init__(self, folder: Path, *, modalities: dict[str, list[Any]] | None = None) -> None:
        self.folder = folder
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.ae_title = "ORTHANC"
        self.modalities = modalities or {}
        self.process: subprocess.Popen[bytes] | None = None
        self.log = folder / "orthanc.log"

    def write_config(self) -> Path:
        config = {
            "Name": "calcnode-test",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "storage"),
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": self.modalities,
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            "StableAge": 2,
            "Plugins": [],
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "StorageCompression": False,
        }
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def start(self, timeout: float = 60.0) -> OrthancServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.write_config()
        log = self.log.open("ab")
        self.process = subprocess.Popen(
            [str(ORTHANC), str(config)], stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {self.log.read_text()[-2000:]}")
            try:
                self.get("/system")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        raise RuntimeError("Orthanc did not start in time")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def _url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self._url(path), timeout=30) as resp:
            return json.loads(resp.read())

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(self._url(path), timeout=30) as resp:
            return bytes(resp.read())

    def post(self, path: str, body: bytes | str | dict[str, Any], timeout: float = 300) -> Any:
        if isinstance(body, dict):
            data = json.dumps(body).encode()
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = body
        req = urllib.request.Request(self._url(path), data=data, method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def upload(self, path: Path) -> dict[str, Any]:
        return dict(self.post("/instances", path.read_bytes()))


#: Orthanc's DICOMweb plugin (Debian ``orthanc-dicomweb``).
ORTHANC_DICOMWEB = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class OrthancWebServer(OrthancServer):
    """:class:`OrthancServer` with the DICOMweb plugin (QIDO-RS, WADO-RS under ``/dicom-web``).

    The DicomWeb section leaves out ``"Host"``: Debian's default file sets it to
    ``"localhost"``, which puts a port-less host into every BulkDataURI.
    """

    def write_config(self) -> Path:
        path = super().write_config()
        config = json.loads(path.read_text())
        config["Plugins"] = [str(ORTHANC_DICOMWEB)]
        config["DicomWeb"] = {
            "Enable": True,
            "Root": "/dicom-web/",
            "EnableWado": True,
            "WadoRoot": "/wado",
            "Ssl": False,
        }
        path.write_text(json.dumps(config, indent=2))
        return path


def shared_temp(factory: pytest.TempPathFactory) -> Path:
    """The temporary folder every xdist worker of this run shares (its own without xdist)."""
    base = factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(factory: pytest.TempPathFactory, name: str, build: Callable[[Path], object]) -> Path:
    """The folder ``name``, filled by ``build(folder)`` once per test run.

    Under pytest-xdist every worker is its own session; session fixtures would train the
    tiny cascade once per worker. The workers share the parent of their base temporary
    folders, so the first worker to get there builds the folder under a file lock and the
    others wait for it and reuse it (the pattern of pytest-xdist's documentation). The
    folders are read-only for the tests that use them.
    """
    shared = shared_temp(factory)
    folder = shared / name
    with FileLock(str(shared / f"{name}.lock")):
        if not (folder / ".built").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".built").touch()
    return folder
