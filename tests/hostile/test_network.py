"""A hostile or broken peer against a real ``calcnode serve`` on localhost (issue 12,
the network-facing items): silent sockets, TLS stalls, a deflate bomb, UIDs that are not
UIDs, the database failing under a C-STORE.

Each test failed on the node before the SCP's server class (``node/server.py``) and the
checks in ``node/scp.py``. The node runs with no worker (nothing here needs inference);
one plain node is shared by the tests that do not need their own configuration.
"""

from __future__ import annotations

import contextlib
import re
import resource
import signal
import socket
import ssl
import subprocess
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.scp import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATABASE_UNAVAILABLE,
    STATUS_INFLATED_TOO_LARGE,
)
from node.settings import TLSSettings
from tests.factories import make_mg_dataset
from tests.helpers import clean_env, free_port, make_settings, start_serve, write_config

AET = "CALCNODE"
#: The client's timeouts: short, so that a stalled node shows as a failure, not a wait.
TIMEOUT = 4.0
#: The shared node's serve process may grow by this much while refusing a bomb (bytes).
RSS_BOUND = 300 * 1024 * 1024


@dataclass
class ServedNode:
    """A ``calcnode serve`` process and where to look at it."""

    process: subprocess.Popen  # type: ignore[type-arg]
    port: int
    root: Path
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.text()):
                return True
            time.sleep(0.05)
        return False

    def peak_rss(self) -> int:
        """The process's peak resident set size so far (VmHWM), in bytes."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
        assert match, status
        return int(match.group(1)) * 1024

    def directories(self) -> set[Path]:
        return {p for p in (self.root / "instances").rglob("*") if p.is_dir()}

    def instance_files(self) -> set[Path]:
        return {p for p in (self.root / "instances").rglob("*") if p.is_file()}


@contextlib.contextmanager
def serving(folder: Path, **node_options: Any) -> Iterator[ServedNode]:
    """``calcnode serve`` (no worker) on a free port, stopped (SIGTERM) at the end."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    settings = make_settings(folder / "node", port=port, node_options=node_options)
    config = write_config(folder / "calcnode.toml", settings)
    log = folder / "serve.log"
    process = start_serve(config, 0, clean_env(), log)
    node = ServedNode(process, port, folder / "node", log)
    try:
        deadline = time.monotonic() + 60
        while "calcnode serving" not in node.text():
            assert process.poll() is None, node.text()[-3000:]
            assert time.monotonic() < deadline, node.text()[-3000:]
            time.sleep(0.1)
        yield node
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


@pytest.fixture
def serve_node(tmp_path: Path) -> Iterator[Callable[..., ServedNode]]:
    """Start a node with ``[node]`` options of the test's own (stopped afterwards)."""
    with contextlib.ExitStack() as stack:

        def make(**node_options: Any) -> ServedNode:
            return stack.enter_context(serving(tmp_path / "serve", **node_options))

        yield make


@pytest.fixture(scope="module")
def plain_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedNode]:
    """One node with the default limits, shared by this module's plain tests."""
    with serving(tmp_path_factory.mktemp("plain")) as node:
        yield node


# ----------------------------------------------------------------------------- clients


def scu() -> AE:
    ae = AE(ae_title="HOSTILE")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    ae.connection_timeout = TIMEOUT
    return ae


def echo(port: int, *, tls: ssl.SSLContext | None = None) -> int:
    """C-ECHO status, or -1 when no association was established."""
    ae = scu()
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=AET, tls_args=(tls, None) if tls else None)
    if not assoc.is_established:
        return -1
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def store(
    port: int, dataset: Dataset | Path, *, tls: ssl.SSLContext | None = None
) -> Dataset | None:
    """C-STORE ``dataset`` (a file is sent as its bytes are); the response, or None."""
    if isinstance(dataset, Path):
        meta = _file_meta(dataset)
        sop_class, syntax = meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID
    else:
        sop_class, syntax = dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID
    ae = scu()
    ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title=AET, tls_args=(tls, None) if tls else None)
    if not assoc.is_established:
        return None
    try:
        rsp = assoc.send_c_store(dataset)
        return rsp if "Status" in rsp else None
    finally:
        assoc.release()


def _file_meta(path: Path) -> FileMetaDataset:
    from pydicom.filereader import read_file_meta_info

    return read_file_meta_info(path)


def silent_sockets(port: int, count: int, *, source: str) -> list[socket.socket]:
    """``count`` TCP connections from ``source`` that never send a byte."""
    socks = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        socks.append(sock)
    return socks


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


# ----------------------------------------------------------------------------- 1. TLS stall


def test_silent_sockets_do_not_hold_up_a_tls_store_and_a_failed_handshake_names_the_peer(
    serve_node: Callable[..., ServedNode], certificates: dict[str, tuple[Path, Path]]
) -> None:
    cert, key = certificates["server"]
    node = serve_node(tls=TLSSettings(enabled=True, cert_file=cert, key_file=key))
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    client.check_hostname = False  # the test certificate names no host
    silent = silent_sockets(node.port, 3, source="127.0.0.3")
    try:
        # Before: the handshake ran on the accept thread, each silent socket held every
        # other connection for the ACSE timeout (5 s here), and this store timed out.
        rsp = store(node.port, make_mg_dataset(seed=1), tls=client)
        assert rsp is not None and int(rsp.Status) == 0x0000, node.text()[-2000:]
    finally:
        close_all(silent)
    # Plain DICOM to the TLS port: refused, logged with the peer's address and why.
    assert echo(node.port) == -1
    assert node.wait_for_log(r"connection from 127\.0\.0\.1:\d+ closed: TLS handshake failed")
    assert "association from ?" not in node.text()


# ----------------------------------------------------------------------------- 2. idle sockets


def test_silent_sockets_from_a_refused_address_do_not_lock_out_an_allowed_one(
    serve_node: Callable[..., ServedNode],
) -> None:
    node = serve_node(allowed_hosts=("127.0.0.1",))
    silent = silent_sockets(node.port, 12, source="127.0.0.2")  # > max_associations (10)
    try:
        # Before: each silent socket took an association slot until the ACSE timeout and
        # the allowed peer was rejected with "local limit exceeded".
        assert echo(node.port) == 0x0000
    finally:
        close_all(silent)
    assert node.wait_for_log(
        r"connection from 127\.0\.0\.2:\d+ refused: source address not in node\.allowed_hosts"
    )


def test_silent_sockets_from_one_address_hold_at_most_associations_per_host(
    plain_node: ServedNode,
) -> None:
    silent = silent_sockets(plain_node.port, 12, source="127.0.0.2")
    try:
        assert echo(plain_node.port) == 0x0000
    finally:
        close_all(silent)
    assert plain_node.wait_for_log(
        r"connection from 127\.0\.0\.2:\d+ refused: already 4 connections from this address"
    )


def test_a_pdu_longer_than_the_node_reads_closes_the_connection_at_once(
    plain_node: ServedNode,
) -> None:
    with socket.create_connection(("127.0.0.1", plain_node.port), timeout=TIMEOUT) as sock:
        # An A-ASSOCIATE-RQ header announcing 1 GiB, then nothing. Before: the node's
        # reader waited for the gigabyte in a blocking recv() for as long as the peer
        # kept the socket open, and would have buffered it all.
        sock.sendall(b"\x01\x00" + (1 << 30).to_bytes(4, "big"))
        assert sock.recv(1024) == b""  # closed by the node (a timeout would raise)
    assert plain_node.wait_for_log(
        r"association from 127\.0\.0\.1:\d+ aborted: a PDU of 1073741824"
    )


# ----------------------------------------------------------------------------- 3. deflate bomb


def deflate_bomb(path: Path, *, inflated_bytes: int = 1 << 30) -> Path:
    """A Deflated Explicit VR Little Endian MG file (about 1 MB) whose data set inflates
    to more than ``inflated_bytes``: a private OB element of zeros before the pixels."""
    ds = make_mg_dataset(rows=64, columns=64, seed=3)
    ds.add_new(0x00090010, "LO", "BOMB")
    before = Dataset()
    after = Dataset()
    for elem in ds:
        (before if elem.tag < 0x00091000 else after).add(elem)
    head = encode(before, False, True)
    tail = encode(after, False, True)
    assert head is not None and tail is not None
    chunk = 1 << 20
    count = inflated_bytes // chunk
    element = b"\x09\x00\x00\x10OB\x00\x00" + (count * chunk).to_bytes(4, "little")
    # After a full flush the compressor starts afresh, so every 1-MiB block of zeros
    # deflates to the same bytes: deflate one, repeat it.
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [deflater.compress(head + element), deflater.flush(zlib.Z_FULL_FLUSH)]
    block = deflater.compress(bytes(chunk)) + deflater.flush(zlib.Z_FULL_FLUSH)
    parts.append(block * count)
    parts += [deflater.compress(tail), deflater.flush()]

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta.ImplementationClassUID = ds.file_meta.ImplementationClassUID
    from pydicom.filewriter import write_file_meta_info

    with path.open("wb") as fh:
        fh.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(fh, meta)
        for part in parts:
            fh.write(part)
    return path


def test_a_deflate_bomb_is_refused_and_memory_stays_bounded(
    plain_node: ServedNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bomb = deflate_bomb(tmp_path / "bomb.dcm")
    assert bomb.stat().st_size < 4 * 1024 * 1024
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the file's bytes
    files = plain_node.instance_files()
    before = plain_node.peak_rss()
    rsp = store(plain_node.port, bomb)
    # Before: accepted with 0x0000 after inflating 1 GiB (the process grew by 2 GB).
    assert rsp is not None
    assert int(rsp.Status) == STATUS_INFLATED_TOO_LARGE, plain_node.text()[-2000:]
    assert "max_inflated_mb" in str(rsp.ErrorComment)
    assert plain_node.peak_rss() - before < RSS_BOUND
    assert plain_node.instance_files() == files
    assert echo(plain_node.port) == 0x0000


# ----------------------------------------------------------------------------- 5. log injection

FORGED = "ERROR MainProcess node.scp: FORGED"  # a UID is at most 64 characters


@pytest.mark.parametrize(
    ("keyword", "value", "named"),
    [
        ("SOPInstanceUID", f"1.2.3\n{FORGED}", "SOP Instance UID"),
        ("StudyInstanceUID", "../../../../tmp/x", "StudyInstanceUID"),
        ("SeriesInstanceUID", "1.2.03.4", "SeriesInstanceUID"),  # a leading zero
    ],
    ids=["newline", "path", "leading-zero"],
)
def test_a_uid_that_is_not_a_uid_is_refused_c210_naming_the_attribute_only(
    plain_node: ServedNode, keyword: str, value: str, named: str
) -> None:
    ds = make_mg_dataset(seed=4)
    directories, files = plain_node.directories(), plain_node.instance_files()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom: "Invalid value for VR UI"
        setattr(ds, keyword, value)
        if keyword == "SOPInstanceUID":
            ds.file_meta.MediaStorageSOPInstanceUID = value
        rsp = store(plain_node.port, ds)
    # Before: 0xC211 with a traceback and a forged log line (newline), or stored under
    # that "UID" and copied into the results (path, leading zero).
    assert rsp is not None
    assert int(rsp.Status) == STATUS_CANNOT_UNDERSTAND, plain_node.text()[-2000:]
    comment = str(rsp.ErrorComment)
    assert named in comment and "not a valid UID" in comment
    assert "FORGED" not in comment and "tmp" not in comment
    assert plain_node.wait_for_log(rf"refused with 0xC210: .*{named}")
    lines = plain_node.text().splitlines()
    assert not any(line.startswith(FORGED) for line in lines)
    assert "Traceback" not in plain_node.text()
    assert plain_node.directories() == directories
    assert plain_node.instance_files() == files


# ----------------------------------------------------------------------------- 8. database


def test_a_database_failure_during_enqueue_is_a_transient_a7xx_and_keeps_nothing(
    plain_node: ServedNode,
) -> None:
    wal = Path(f"{plain_node.root / 'calcnode.db'}-wal")
    assert store(plain_node.port, make_mg_dataset(rows=64, columns=64, seed=5)) is not None
    files = plain_node.instance_files()
    # The serve process may not grow any file past the write-ahead log's present end:
    # the next commit fails in SQLite ("disk I/O error" / "database or disk is full")
    # while the (smaller) instance file is still written — the database failed, not the
    # file store. A file-size limit, as a full disk would, but only for this process.
    limit = wal.stat().st_size
    assert limit > 20_000, "the instance file must fit under the limit"
    resource.prlimit(plain_node.process.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    try:
        ds = make_mg_dataset(rows=64, columns=64, seed=6)
        rsp = store(plain_node.port, ds)
    finally:
        resource.prlimit(
            plain_node.process.pid,
            resource.RLIMIT_FSIZE,
            (resource.RLIM_INFINITY, resource.RLIM_INFINITY),
        )
    # Before: 0xC211 "Cannot understand", which a PACS may never retry.
    assert rsp is not None
    assert int(rsp.Status) == STATUS_DATABASE_UNAVAILABLE, plain_node.text()[-2000:]
    assert int(rsp.Status) >> 8 == 0xA7
    assert plain_node.instance_files() == files  # the file written was removed
    assert plain_node.wait_for_log(r"the job database failed while queueing")
    # The sender's retry, once the database is back, succeeds.
    again = store(plain_node.port, ds)
    assert again is not None and int(again.Status) == 0x0000
