"""Tests of node.scu: C-STORE of results to peers on localhost (free ports, 5-s timeouts)."""

from __future__ import annotations

import datetime as dt
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.scp import StorageSCP
from node.scu import SendOutcome, send_due, send_file, send_files
from node.settings import (
    DestinationSettings,
    LoggingSettings,
    NodeSettings,
    SendSettings,
    Settings,
    StorageSettings,
    TLSSettings,
)
from storage.database import Database, open_database
from storage.filestore import FileStore
from storage.policy import QueuePolicy
from tests.factories import compress, make_mg_dataset, make_secondary_capture_dataset

TIMEOUT = 5.0
T0 = dt.datetime(2026, 1, 5, 12, 0, 0, tzinfo=dt.UTC)
PEER_AET = "PEER"


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Peer:
    """A pynetdicom storage SCP standing in for a PACS."""

    status: int = 0x0000
    received: list[Dataset] = field(default_factory=list)
    transfer_syntaxes: list[str] = field(default_factory=list)
    associations: set[int] = field(default_factory=set)
    server: Any = None

    def start(self, port: int = 0, *, ae_title: str = PEER_AET) -> int:
        ae = AE(ae_title=ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
        ae.require_called_aet = True
        syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless]
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, syntaxes)
        ae.add_supported_context(Verification)
        self.server = ae.start_server(
            ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        return int(self.server.server_address[1])

    def _on_store(self, event: evt.Event) -> int:
        self.associations.add(id(event.assoc))
        self.transfer_syntaxes.append(str(event.context.transfer_syntax))
        self.received.append(event.dataset)
        return self.status

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer()
    yield p
    p.stop()


def destination(port: int, name: str = "pacs", ae_title: str = PEER_AET) -> DestinationSettings:
    return DestinationSettings(name=name, ae_title=ae_title, host="127.0.0.1", port=port)


def settings_for(root: Path, *dests: DestinationSettings) -> Settings:
    return Settings(
        node=NodeSettings(ae_title="CALCNODE"),
        storage=StorageSettings(root=root, min_free_mb=0),
        destinations=dests,
        send=SendSettings(timeout_seconds=TIMEOUT),
        logging=LoggingSettings(pynetdicom_level="WARNING"),
    )


@dataclass
class Queue:
    store: FileStore
    database: Database

    def add(self, ds: Dataset, *, destination_name: str = "pacs", kind: str = "cad-sr") -> int:
        relpath = self.store.result_path(ds.StudyInstanceUID, f"{ds.SOPInstanceUID}.dcm")
        self.store.write_atomic(relpath, lambda fh: ds.save_as(fh, enforce_file_format=True))
        return self.database.sends.add_send(
            destination=destination_name,
            object_path=relpath.as_posix(),
            sop_class_uid=ds.SOPClassUID,
            sop_instance_uid=ds.SOPInstanceUID,
            study_instance_uid=ds.StudyInstanceUID,
            kind=kind,
            now=at(-1),
        )


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[Queue]:
    store = FileStore(tmp_path / "store", min_free_mb=0)
    database = open_database(
        f"sqlite:///{tmp_path / 'node.db'}",
        policy=QueuePolicy(send_retry_base_seconds=30.0, send_retry_cap_seconds=600.0),
    )
    yield Queue(store, database)
    database.close()


def result_object() -> Dataset:
    """A small object to send (the peer does not care what it is)."""
    return make_secondary_capture_dataset(rows=16, columns=16)


# ----------------------------------------------------------------------------- send_file


def test_send_file_to_pynetdicom_scp_is_ok(peer: Peer, tmp_path: Path) -> None:
    port = peer.start()
    ds = result_object()
    path = tmp_path / "obj.dcm"
    ds.save_as(path, enforce_file_format=True)
    outcome = send_file(path, destination(port), calling_aet="CALCNODE", timeout_seconds=TIMEOUT)
    assert outcome == SendOutcome(True, 0x0000, f"stored by {PEER_AET}@127.0.0.1:{port}")
    assert [r.SOPInstanceUID for r in peer.received] == [ds.SOPInstanceUID]


def test_send_file_proposes_the_files_compressed_transfer_syntax(
    peer: Peer, tmp_path: Path
) -> None:
    port = peer.start()
    ds = compress(make_mg_dataset(rows=64, columns=48), JPEG2000Lossless)
    path = tmp_path / "mg.dcm"
    ds.save_as(path, enforce_file_format=True)
    outcome = send_file(path, destination(port), calling_aet="CALCNODE", timeout_seconds=TIMEOUT)
    assert outcome.ok
    assert peer.transfer_syntaxes == [JPEG2000Lossless]


def test_send_file_rejects_invalid_arguments(tmp_path: Path) -> None:
    path = tmp_path / "x.dcm"
    with pytest.raises(TypeError, match="destination"):
        send_file(path, "pacs", calling_aet="A", timeout_seconds=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout_seconds"):
        send_file(path, destination(104), calling_aet="A", timeout_seconds=0)
    with pytest.raises(TypeError, match="tls"):
        send_file(path, destination(104), calling_aet="A", timeout_seconds=1, tls="yes")  # type: ignore[arg-type]


def test_send_file_of_a_missing_file_fails_without_status(tmp_path: Path) -> None:
    outcome = send_file(
        tmp_path / "gone.dcm", destination(104), calling_aet="CALCNODE", timeout_seconds=TIMEOUT
    )
    assert not outcome.ok
    assert outcome.status is None
    assert "does not exist" in outcome.message


def test_send_file_to_wrong_called_aet_reports_the_rejection(peer: Peer, tmp_path: Path) -> None:
    port = peer.start()
    path = tmp_path / "obj.dcm"
    result_object().save_as(path, enforce_file_format=True)
    outcome = send_file(
        path, destination(port, ae_title="NOTPEER"), calling_aet="CALCNODE", timeout_seconds=TIMEOUT
    )
    assert not outcome.ok
    assert outcome.status is None
    assert "association rejected" in outcome.message
    assert "Called AE" in outcome.message


# ----------------------------------------------------------------------------- send_due


def test_send_due_marks_sends_sent_over_one_association(
    peer: Peer, queue: Queue, tmp_path: Path
) -> None:
    port = peer.start()
    objects = [result_object() for _ in range(3)]
    ids = [queue.add(ds) for ds in objects]
    settings = settings_for(tmp_path, destination(port))
    assert send_due(queue.database, queue.store, settings, now=at(0)) == 3
    for send_id in ids:
        info = queue.database.sends.get_send(send_id)
        assert (info.state, info.last_status, info.attempts) == ("sent", 0x0000, 1)
    assert sorted(r.SOPInstanceUID for r in peer.received) == sorted(
        ds.SOPInstanceUID for ds in objects
    )
    assert len(peer.associations) == 1
    assert send_due(queue.database, queue.store, settings, now=at(1)) == 0  # nothing left


def test_send_due_to_dcmtk_storescp_marks_sent(queue: Queue, tmp_path: Path) -> None:
    if shutil.which("storescp") is None:
        pytest.skip("DCMTK storescp is not installed")
    port = free_port()
    out = tmp_path / "received"
    out.mkdir()
    proc = subprocess.Popen(
        ["storescp", "-aet", PEER_AET, "-od", str(out), "-ta", "5", "-td", "5", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_listening(port, proc)
        ds = result_object()
        send_id = queue.add(ds)
        settings = settings_for(tmp_path, destination(port))
        assert send_due(queue.database, queue.store, settings, now=at(0)) == 1
        assert queue.database.sends.get_send(send_id).state == "sent"
        assert len(list(out.iterdir())) == 1
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"storescp exited: {proc.stderr.read() if proc.stderr else ''!r}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("storescp did not start listening")


def test_dead_port_fails_with_backoff_and_is_retried_later(
    peer: Peer, queue: Queue, tmp_path: Path
) -> None:
    port = free_port()  # nothing listens here yet
    send_id = queue.add(result_object())
    settings = settings_for(tmp_path, destination(port))

    assert send_due(queue.database, queue.store, settings, now=at(0)) == 0
    info = queue.database.sends.get_send(send_id)
    assert (info.state, info.attempts, info.last_status) == ("pending", 1, None)
    assert info.next_try_at == at(30)  # the queue's back-off: 30 s after the first failure
    assert "127.0.0.1" in (info.last_error or "")

    assert send_due(queue.database, queue.store, settings, now=at(29)) == 0
    assert queue.database.sends.get_send(send_id).attempts == 1  # not due yet: not tried

    peer.start(port)  # the peer comes back on its usual port
    assert send_due(queue.database, queue.store, settings, now=at(31)) == 1
    info = queue.database.sends.get_send(send_id)
    assert (info.state, info.attempts) == ("sent", 2)


def test_peer_answering_a700_fails_and_is_not_sent(
    peer: Peer, queue: Queue, tmp_path: Path
) -> None:
    peer.status = 0xA700
    port = peer.start()
    send_id = queue.add(result_object())
    settings = settings_for(tmp_path, destination(port))
    assert send_due(queue.database, queue.store, settings, now=at(0)) == 0
    info = queue.database.sends.get_send(send_id)
    assert (info.state, info.last_status, info.attempts) == ("pending", 0xA700, 1)
    assert "0xA700" in (info.last_error or "")
    assert info.sent_at is None


@pytest.mark.parametrize("warning", [0xB000, 0xB006, 0xB007], ids=lambda w: f"0x{w:04X}")
def test_warning_status_counts_as_sent(
    peer: Peer, queue: Queue, tmp_path: Path, warning: int
) -> None:
    peer.status = warning
    port = peer.start()
    send_id = queue.add(result_object())
    settings = settings_for(tmp_path, destination(port))
    assert send_due(queue.database, queue.store, settings, now=at(0)) == 1
    info = queue.database.sends.get_send(send_id)
    assert (info.state, info.last_status) == ("sent", warning)


def test_unknown_destination_fails_for_good_with_clear_error(queue: Queue, tmp_path: Path) -> None:
    send_id = queue.add(result_object(), destination_name="gone")
    settings = settings_for(tmp_path, destination(104, name="pacs"))
    assert send_due(queue.database, queue.store, settings, now=at(0)) == 0
    info = queue.database.sends.get_send(send_id)
    assert info.state == "failed"
    assert info.last_error == "destination 'gone' is not configured (configured: pacs)"


def test_missing_object_file_fails_for_good(peer: Peer, queue: Queue, tmp_path: Path) -> None:
    port = peer.start()
    send_id = queue.add(result_object())
    queue.store.remove(queue.database.sends.get_send(send_id).object_path)
    settings = settings_for(tmp_path, destination(port))
    assert send_due(queue.database, queue.store, settings, now=at(0)) == 0
    info = queue.database.sends.get_send(send_id)
    assert info.state == "failed"
    assert "is missing" in (info.last_error or "")
    assert peer.received == []


def test_send_files_reports_each_file_in_order(peer: Peer, tmp_path: Path) -> None:
    port = peer.start()
    good = tmp_path / "good.dcm"
    result_object().save_as(good, enforce_file_format=True)
    outcomes = send_files(
        [tmp_path / "missing.dcm", good],
        destination(port),
        calling_aet="CALCNODE",
        timeout_seconds=TIMEOUT,
    )
    assert [o.ok for o in outcomes] == [False, True]
    assert len(peer.received) == 1


def test_send_file_over_tls_to_calcnode_scp(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (needed to make a test certificate)")
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-nodes", "-days", "1", "-subj", "/CN=calcnode"),
            *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        capture_output=True,
        check=True,
        timeout=30,
    )
    root = tmp_path / "node"
    settings = Settings(
        node=NodeSettings(
            ae_title="CALCNODE",
            host="127.0.0.1",
            tls=TLSSettings(enabled=True, cert_file=cert, key_file=key),
            acse_timeout_seconds=TIMEOUT,
        ),
        storage=StorageSettings(root=root, min_free_mb=0),
    )
    database = open_database(f"sqlite:///{root / 'node.db'}")
    scp = StorageSCP(
        settings=settings, store=FileStore(root, min_free_mb=0), database=database, port=0
    )
    scp.start()
    try:
        path = tmp_path / "mg.dcm"
        make_mg_dataset(rows=64, columns=48).save_as(path, enforce_file_format=True)
        context = ssl.create_default_context(cafile=str(cert))
        context.check_hostname = False  # the test certificate names no host
        dest = DestinationSettings(
            name="calcnode", ae_title="CALCNODE", host="127.0.0.1", port=scp.port
        )
        tls_outcome = send_file(
            path, dest, calling_aet="TESTSCU", timeout_seconds=TIMEOUT, tls=context
        )
        plain_outcome = send_file(path, dest, calling_aet="TESTSCU", timeout_seconds=TIMEOUT)
    finally:
        scp.stop()
        database.close()
    assert (tls_outcome.ok, tls_outcome.status) == (True, 0x0000)
    assert (plain_outcome.ok, plain_outcome.status) == (False, None)


# ----------------------------------------------------------------------------- issue 12, 6


class WatchingPeer(Peer):
    """A peer that runs ``on_each(dataset)`` as each object arrives, before answering."""

    def __init__(self, on_each: Any) -> None:
        super().__init__()
        self.on_each = on_each

    def _on_store(self, event: evt.Event) -> int:
        self.on_each(event.dataset)
        return super()._on_store(event)


def test_each_outcome_is_recorded_as_soon_as_the_peer_answered_that_object(
    queue: Queue, tmp_path: Path
) -> None:
    objects = [result_object() for _ in range(4)]
    ids = {str(ds.SOPInstanceUID): queue.add(ds) for ds in objects}
    seen: list[tuple[str, list[str]]] = []

    def on_each(ds: Dataset) -> None:
        # What the node has recorded of the objects this peer already acknowledged.
        earlier = [uid for uid, _ in seen]
        states = [queue.database.sends.get_send(ids[uid]).state for uid in earlier]
        seen.append((str(ds.SOPInstanceUID), states))

    peer = WatchingPeer(on_each)
    port = peer.start()
    try:
        settings = settings_for(tmp_path, destination(port))
        assert send_due(queue.database, queue.store, settings, now=at(0)) == 4
    finally:
        peer.stop()
    # Before: every send stayed pending until the association ended.
    assert [states for _, states in seen] == [[], ["sent"], ["sent"] * 2, ["sent"] * 3]


def test_a_stop_ends_sending_between_objects_and_leaves_the_rest_pending_untouched(
    queue: Queue, tmp_path: Path
) -> None:
    import threading

    objects = [result_object() for _ in range(4)]
    ids = [queue.add(ds) for ds in objects]
    stop = threading.Event()
    peer = WatchingPeer(lambda _ds: stop.set())  # stopped while the first is in flight
    port = peer.start()
    try:
        settings = settings_for(tmp_path, destination(port))
        assert send_due(queue.database, queue.store, settings, now=at(0), stop=stop) == 1
    finally:
        peer.stop()
    assert len(peer.received) == 1  # the one in flight was finished, nothing after it
    infos = [queue.database.sends.get_send(i) for i in ids]
    assert infos[0].state == "sent"
    assert [(i.state, i.attempts, i.last_error) for i in infos[1:]] == [("pending", 0, None)] * 3
    # Stopped before anything: nothing is even tried.
    assert send_due(queue.database, queue.store, settings, now=at(1), stop=stop) == 0
    assert [queue.database.sends.get_send(i).attempts for i in ids[1:]] == [0, 0, 0]
