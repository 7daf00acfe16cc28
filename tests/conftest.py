"""Shared fixtures of the tests: a tiny random-weight model, a pynetdicom receiver, an
Orthanc server, test TLS certificates, a tiny trained cascade, logger levels restored
after each test, a throwaway PostgreSQL server and the database URL of either backend.

The helpers they use are in ``tests/helpers.py``, ``tests/factories.py`` and
``tests/pg.py`` (the PostgreSQL server).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock

from tests.helpers import (
    ORTHANC,
    OrthancServer,
    Receiver,
    built_once,
    openssl_cert,
    shared_temp,
    write_tiny_model,
)
from tests.pg import INFO_FILE, PostgresServer, start_server, unavailable_reason


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of the tiny random ASN checkpoint (``fpr.pt`` lies next to it)."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def certificates(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    """A "server" and a "client" self-signed certificate (skips without openssl)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (needed to make a test certificate)")
    return {name: openssl_cert(tmp_path, name) for name in ("server", "client")}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver().start()
    try:
        yield rec
    finally:
        rec.stop()


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Any]:
    """Make (and finally stop) Orthanc servers; skips when Orthanc is not installed."""
    if not ORTHANC.exists() or shutil.which(str(ORTHANC)) is None:
        pytest.skip("Orthanc is not installed (/usr/sbin/Orthanc; apt-get install orthanc)")
    servers: list[OrthancServer] = []

    def make(**kwargs: Any) -> OrthancServer:
        server = OrthancServer(tmp_path / f"orthanc{len(servers)}", **kwargs)
        servers.append(server)
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.stop()


#: Loggers whose levels the node sets when it starts (node.logs.configure_logging).
_NODE_LOGGERS = ("", "node", "storage", "cascade", "pynetdicom", "highdicom", "apscheduler")


@pytest.fixture(autouse=True)
def _restore_logger_levels() -> Iterator[None]:
    """Tests that start the node (the demo, serve) leave logger levels as they found them,
    so a later test's caplog sees what it expects whatever the order."""
    levels = {name: logging.getLogger(name).level for name in _NODE_LOGGERS}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def _render_phantoms(out: Path) -> None:
    from cascade.synthesis import generate_dataset

    generate_dataset(out, count=4, seed=0, size="small", preview=False, progress=False)


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four small phantoms (seed 0) and their manifest."""
    return built_once(tmp_path_factory, "phantoms", _render_phantoms) / "manifest.jsonl"


@pytest.fixture(scope="session")
def small_manifest(phantoms: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The phantoms that have µCs (fewer images: faster loading)."""
    from cascade.data.manifest import read_manifest, write_manifest

    def build(out: Path) -> None:
        recs = [r for r in read_manifest(phantoms) if r.calcifications][:2]
        assert recs, "the phantom set has no µC"
        write_manifest(out / "manifest.jsonl", recs)

    return built_once(tmp_path_factory, "small", build) / "manifest.jsonl"


@pytest.fixture(scope="session")
def asn_run(small_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run folder of the "tiny" ASN preset trained on ``small_manifest`` (slow tests)."""

    def build(out: Path) -> None:
        import torch

        from cascade.training import ASN_PRESETS, train_asn

        torch.set_num_threads(2)
        best = train_asn(
            manifest=small_manifest,
            out=out,
            config=ASN_PRESETS["tiny"],
            val_manifest=small_manifest,
            device="cpu",
            progress=False,
        )
        assert best == out / "best.pt"

    return built_once(tmp_path_factory, "asn", build)


@pytest.fixture(scope="session")
def fpr_run(small_manifest: Path, asn_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run folder of the "tiny" FPR preset trained on ``asn_run``'s candidates."""

    def build(out: Path) -> None:
        from dataclasses import replace

        from cascade.training import FPR_PRESETS, train_fpr

        best = train_fpr(
            manifest=small_manifest,
            asn_checkpoint=asn_run / "best.pt",
            out=out,
            config=replace(FPR_PRESETS["tiny"], proposal={"max_candidates": 20}),
            val_manifest=small_manifest,
            device="cpu",
            progress=False,
        )
        assert best == out / "best.pt"

    return built_once(tmp_path_factory, "fpr", build)


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> PostgresServer:
    """One throwaway PostgreSQL server for the whole run (tests/pg.py), skipping with the
    reason when none can be started here.

    Under xdist the first worker to ask starts it under a file lock in the workers'
    shared temporary folder and leaves its address there for the others; the controlling
    process stops it when the run ends (:func:`pytest_sessionfinish`).
    """
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    shared = shared_temp(tmp_path_factory)
    info, failed = shared / INFO_FILE, shared / "postgres-server.failed"
    with FileLock(str(shared / "postgres-server.lock")):
        if failed.is_file():
            pytest.skip(failed.read_text())
        if info.is_file():
            server = PostgresServer.from_json(info.read_text())
            if server.alive():
                return server
        try:
            server = start_server()
        except RuntimeError as exc:
            failed.write_text(str(exc))
            pytest.skip(str(exc))
        info.write_text(server.to_json())
    return server


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Stop the run's PostgreSQL server (in the controlling process, after every worker)."""
    if hasattr(session.config, "workerinput"):  # an xdist worker: not its server to stop
        return
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None:
        return
    try:
        info = factory.getbasetemp() / INFO_FILE
    except OSError:
        return
    if info.is_file():
        PostgresServer.from_json(info.read_text()).stop()
        info.unlink(missing_ok=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a fresh, empty database on the run's server, dropped after the test."""
    with postgres_server.database() as url:
        yield url


#: The database backends a test runs on; the PostgreSQL ones are marked ``postgres``.
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of each backend: ``sqlite:///<tmp_path>/node.db``, or a fresh
    database on the run's PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'node.db'}"
    return str(request.getfixturevalue("postgres_url"))
