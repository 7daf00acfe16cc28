"""``/metrics`` and ``/healthz`` of a real ``calcnode serve``, on both backends; the
metric helpers; ``calcnode status --json``.

The node runs as a subprocess with one worker process (the fixed-points detector), so
the worker's counters and stage histograms reach ``/metrics`` through prometheus_client's
multiprocess folder, as in production.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from factories import make_mg_dataset
from pynetdicom import AE
from sqlalchemy.engine import make_url

from node import monitoring
from node.settings import DestinationSettings, Settings
from storage.database import open_database
from storage.filestore import FileStore
from tests.helpers import REPO, Receiver, clean_env, free_port, make_settings, write_config

#: ``calcnode serve`` with the fixed-points detector and /metrics on ``argv[2]``.
SERVE_MONITORED = (
    "import sys; from node.settings import load_settings; from node.service import serve; "
    "from tests.helpers import fast_factory; sys.exit(serve(load_settings(sys.argv[1]), "
    "workers=1, detector_factory=fast_factory, monitoring_port=int(sys.argv[2])))"
)


def wait_until(condition: Callable[[], object], timeout: float, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return bool(condition())


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return -1, ""


def sample(metrics: str, name: str, **labels: str) -> float | None:
    """The value of one sample of the exposition text, or None when absent."""
    for line in metrics.splitlines():
        if line.startswith("#"):
            continue
        match = re.match(r"^([a-zA-Z_:][\w:]*)(\{(.*)\})? (\S+)$", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(3) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(4))
    return None


class MonitoredNode:
    def __init__(self, folder: Path, settings: Settings) -> None:
        self.settings = settings
        self.http_port = free_port()
        self.config = write_config(folder / "calcnode.toml", settings)
        self.log = folder / "serve.log"
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVE_MONITORED, str(self.config), str(self.http_port)],
            cwd=REPO,
            env=clean_env(),
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def get(self, path: str) -> tuple[int, str]:
        return http_get(f"http://127.0.0.1:{self.http_port}{path}")

    def metrics(self) -> str:
        status, text = self.get("/metrics")
        assert status == 200, (status, self.log.read_text()[-2000:])
        return text

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(90)


@pytest.fixture
def monitored(tmp_path: Path) -> Iterator[Callable[..., MonitoredNode]]:
    nodes: list[MonitoredNode] = []

    def start(settings: Settings) -> MonitoredNode:
        node = MonitoredNode(tmp_path, settings)
        nodes.append(node)
        assert wait_until(
            lambda: node.get("/healthz")[0] == 200 or node.process.poll() is not None, 120
        ), node.log.read_text()[-3000:]
        assert node.process.poll() is None, node.log.read_text()[-3000:]
        return node

    yield start
    for node in nodes:
        if node.process.poll() is None:
            node.process.kill()
            node.process.wait(10)


def _associate(port: int, calling: str) -> Any:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = 5
    ds = make_mg_dataset()
    ae.add_requested_context(ds.SOPClassUID, [str(ds.file_meta.TransferSyntaxUID)])
    return ae.associate("127.0.0.1", port, ae_title="CALCNODE"), ds


def test_serve_exports_metrics_and_health_on_each_backend(
    tmp_path: Path,
    database_url: str,
    monitored: Callable[..., MonitoredNode],
    receiver: Receiver,
    request: pytest.FixtureRequest,
) -> None:
    pacs = DestinationSettings(
        name="pacs", ae_title="RECEIVER", host="127.0.0.1", port=receiver.port
    )
    settings = make_settings(
        tmp_path / "node",
        port=free_port(),
        destinations=(pacs,),
        kinds=("cad-sr", "gsps"),
        allowed_calling_aets=("TESTSCU",),
    )
    if database_url.startswith("postgresql"):
        storage = settings.storage.model_copy(update={"database_url": database_url})
        settings = settings.model_copy(update={"storage": storage})
    node = monitored(settings)
    _, body = node.get("/healthz")
    assert json.loads(body) == {
        "status": "ok",
        "checks": {"scp": "listening", "database": "answers"},
    }

    refused, _ = _associate(settings.node.port, "INTRUDER")
    assert not refused.is_established
    assoc, ds = _associate(settings.node.port, "TESTSCU")
    assert assoc.is_established
    assert int(assoc.send_c_store(ds).Status) == 0x0000
    assoc.release()

    def settled() -> bool:
        text = node.metrics()
        return sample(text, "calcnode_sends", destination="pacs", state="sent") == 2.0

    assert wait_until(settled, 60), node.metrics()
    text = node.metrics()
    assert sample(text, "calcnode_instances_received_total", outcome="new") == 1
    assert sample(text, "calcnode_associations_refused_total", reason="calling_aet") == 1
    # From the worker process, through the multiprocess folder:
    assert sample(text, "calcnode_jobs_finished_total", outcome="done") == 1
    assert sample(text, "calcnode_stage_seconds_count", stage="detect") == 1
    assert sample(text, "calcnode_stage_seconds_count", stage="read") == 1
    # From the database at scrape time:
    assert sample(text, "calcnode_jobs", state="done") == 1
    assert sample(text, "calcnode_jobs", state="queued") == 0
    assert sample(text, "calcnode_studies", state="reported") == 1
    assert sample(text, "calcnode_oldest_queued_job_seconds") == 0
    assert sample(text, "calcnode_model_info", model_version="fake-1") == 1
    backend = "postgresql" if database_url.startswith("postgresql") else "sqlite"
    assert sample(text, "calcnode_info", backend=backend) == 1
    assert sample(text, "calcnode_database_up") == sample(text, "calcnode_scp_up") == 1
    assert (sample(text, "calcnode_disk_free_bytes") or 0) > 0
    assert "PHANTOM" not in text and str(ds.StudyInstanceUID) not in text  # no patient data
    assert node.get("/nothing")[0] == 404

    # calcnode status --json, as an admin runs it next to the node.
    proc = subprocess.run(
        [sys.executable, "-m", "node.cli", "status", "--config", str(node.config), "--json"],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["jobs"]["done"] == 1 and info["sends"]["sent"] == 2
    assert info["studies"]["reported"] == 1 and info["backend"] == backend

    if backend == "postgresql":
        server = request.getfixturevalue("postgres_server")
        name = str(make_url(database_url).database)
        server.suspend(name)
        try:
            assert wait_until(lambda: node.get("/healthz")[0] == 503, 30)
            _, body = node.get("/healthz")
            health = json.loads(body)
            assert health["status"] == "unhealthy"
            assert health["reasons"][0].startswith("the database does not answer")
            assert sample(node.metrics(), "calcnode_database_up") == 0  # scrape still works
        finally:
            server.resume(name)
        assert wait_until(lambda: node.get("/healthz")[0] == 200, 30)
    assert node.stop() == 0
    # No traceback but the worker's first failure during the outage (its later ones are
    # counted lines; the storage logs the outage and its end, the scheduler a line a task).
    records = re.split(r"\n(?=\d{4}-\d\d-\d\d )", node.log.read_text())
    tracebacks = [r.splitlines()[0] for r in records if "Traceback" in r]
    assert all("database error; retrying" in r for r in tracebacks), tracebacks
    assert len(tracebacks) <= (1 if backend == "postgresql" else 0), tracebacks


def test_refusal_reasons_map_to_few_labels() -> None:
    cases = {
        "source address not in node.allowed_hosts": "allowed_hosts",
        "already 4 connections from this address (node.associations_per_host)": (
            "associations_per_host"
        ),
        "calling AE title not in node.allowed_calling_aets": "calling_aet",
        "called AE title is not 'CALCNODE'": "called_aet",
        "already 10 associations (max_associations)": "max_associations",
        "no A-ASSOCIATE-RQ within 10 s": "handshake_timeout",
        "something new": "other",
    }
    for reason, label in cases.items():
        assert monitoring.refusal_reason(reason) == label


def test_state_collector_reports_a_database_that_does_not_answer(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    database = open_database(f"sqlite:///{tmp_path / 'node.db'}")
    store = FileStore(tmp_path / "store", min_free_mb=5)
    registry = CollectorRegistry()
    registry.register(monitoring.StateCollector(database, store, scp_up=None))
    text = generate_latest(registry).decode()
    assert sample(text, "calcnode_database_up") == 1
    assert sample(text, "calcnode_disk_floor_bytes") == 5 * 1024 * 1024
    assert sample(text, "calcnode_jobs", state="queued") == 0

    def broken() -> Any:
        raise OSError("disk I/O error")

    database.transaction = broken  # type: ignore[method-assign]
    text = generate_latest(registry).decode()
    assert sample(text, "calcnode_database_up") == 0
    assert sample(text, "calcnode_jobs", state="queued") is None
    database.close()
