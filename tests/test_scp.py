"""Tests of node.scp: real associations on localhost (free ports, 5-s timeouts)."""

from __future__ import annotations

import copy
import hashlib
import logging
import shutil
import ssl
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.scp import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATABASE_UNAVAILABLE,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SOP_CLASS_NOT_SUPPORTED,
    StorageSCP,
)
from node.settings import LoggingSettings, NodeSettings, Settings, StorageSettings, TLSSettings
from storage.database import Database, open_database
from storage.errors import StorageError
from storage.filestore import FileStore
from tests.factories import (
    compress,
    jpeg_lossless_encoder_available,
    make_ct_dataset,
    make_mg_dataset,
    make_secondary_capture_dataset,
)

TIMEOUT = 5.0
AET = "CALCNODE"


@dataclass
class Node:
    scp: StorageSCP
    store: FileStore
    database: Database
    settings: Settings

    @property
    def port(self) -> int:
        return self.scp.port

    def instance_files(self) -> list[Path]:
        root = self.store.root / "instances"
        return sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []

    def job_count(self) -> int:
        return sum(self.database.status_summary()["jobs"].values())


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    nodes: list[Node] = []
    pynetdicom_logger = logging.getLogger("pynetdicom")
    level = pynetdicom_logger.level

    def make(
        *, min_free_mb: int = 0, pynetdicom_level: str = "WARNING", **node_kwargs: Any
    ) -> Node:
        root = tmp_path / f"node{len(nodes)}"
        node_kwargs.setdefault("ae_title", AET)
        for key in ("acse", "dimse", "network"):
            node_kwargs.setdefault(f"{key}_timeout_seconds", TIMEOUT)
        settings = Settings(
            node=NodeSettings(**node_kwargs),
            storage=StorageSettings(root=root, min_free_mb=min_free_mb),
            logging=LoggingSettings(pynetdicom_level=pynetdicom_level),
        )
        store = FileStore(root, min_free_mb=min_free_mb)
        database = open_database(f"sqlite:///{root / 'node.db'}")
        scp = StorageSCP(settings=settings, store=store, database=database, port=0)
        node = Node(scp, store, database, settings)
        nodes.append(node)
        scp.start()
        return node

    yield make
    for node in nodes:
        node.scp.stop()
        node.database.close()
    pynetdicom_logger.setLevel(level)


def scu_ae(calling: str = "TESTSCU") -> AE:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    ae.connection_timeout = TIMEOUT
    return ae


def store_datasets(
    port: int,
    datasets: list[Dataset],
    *,
    calling: str = "TESTSCU",
    called: str = AET,
) -> list[Dataset]:
    """C-STORE each dataset over one association; return the response status datasets."""
    ae = scu_ae(calling)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, [str(ds.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, "association was not established"
    try:
        return [assoc.send_c_store(ds) for ds in datasets]
    finally:
        assoc.release()


def status_of(rsp: Dataset) -> int:
    return int(rsp.Status)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- basics


def test_constructor_rejects_invalid_arguments(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "s", min_free_mb=0)
    database = open_database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        with pytest.raises(TypeError, match="settings"):
            StorageSCP(settings=None, store=store, database=database)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="store"):
            StorageSCP(settings=Settings(), store="x", database=database)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="database"):
            StorageSCP(settings=Settings(), store=store, database=None)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="port"):
            StorageSCP(settings=Settings(), store=store, database=database, port=70000)
        scp = StorageSCP(settings=Settings(), store=store, database=database, port=0)
        with pytest.raises(RuntimeError, match="not started"):
            _ = scp.port
    finally:
        database.close()


def test_start_twice_raises_and_stop_is_idempotent(make_node: Callable[..., Node]) -> None:
    node = make_node()
    assert node.port > 0
    with pytest.raises(RuntimeError, match="already started"):
        node.scp.start()
    node.scp.stop()
    node.scp.stop()
    assert not node.scp.running


def test_echo_succeeds(make_node: Callable[..., Node]) -> None:
    node = make_node()
    ae = scu_ae()
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=AET)
    assert assoc.is_established
    rsp = assoc.send_c_echo()
    assoc.release()
    assert status_of(rsp) == 0x0000


# ----------------------------------------------------------------------------- C-STORE


@pytest.mark.parametrize("for_processing", [False, True], ids=["presentation", "processing"])
def test_store_mg_returns_success_and_persists_file_and_job(
    make_node: Callable[..., Node], for_processing: bool
) -> None:
    node = make_node()
    ds = make_mg_dataset(for_processing=for_processing)
    (rsp,) = store_datasets(node.port, [ds])
    assert status_of(rsp) == 0x0000

    files = node.instance_files()
    assert len(files) == 1
    job = node.database.jobs.get_job(1)
    assert job.sop_instance_uid == ds.SOPInstanceUID
    assert job.study_instance_uid == ds.StudyInstanceUID
    assert job.sop_class_uid == ds.SOPClassUID
    assert job.calling_aet == "TESTSCU"
    assert job.state == "queued"
    assert node.store.resolve(job.path) == files[0]
    assert job.digest == sha256(files[0])
    assert job.size == files[0].stat().st_size
    stored = pydicom.dcmread(files[0])
    assert stored.SOPInstanceUID == ds.SOPInstanceUID
    assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    np.testing.assert_array_equal(stored.pixel_array, ds.pixel_array)


def test_job_and_file_exist_when_the_response_is_sent(make_node: Callable[..., Node]) -> None:
    node = make_node()
    seen: list[tuple[int, int]] = []

    def on_sent(event: evt.Event) -> None:
        if type(event.message).__name__ == "C_STORE_RSP":
            seen.append((node.job_count(), len(node.instance_files())))

    # The response is sent after the handler returns; this hook runs at that moment.
    node.scp._server.bind(evt.EVT_DIMSE_SENT, on_sent)
    (rsp,) = store_datasets(node.port, [make_mg_dataset()])
    assert status_of(rsp) == 0x0000
    assert seen == [(1, 1)]


def test_store_with_dcmtk_storescu_succeeds(make_node: Callable[..., Node], tmp_path: Path) -> None:
    if shutil.which("storescu") is None:
        pytest.skip("DCMTK storescu is not installed")
    node = make_node()
    ds = make_mg_dataset()
    path = tmp_path / "mg.dcm"
    ds.save_as(path, enforce_file_format=True)
    proc = subprocess.run(
        [
            *("storescu", "-aet", "STORESCU", "-aec", AET, "-to", "5", "-ta", "5", "-td", "5"),
            *("127.0.0.1", str(node.port), str(path)),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    job = node.database.jobs.get_job(1)
    assert job.sop_instance_uid == ds.SOPInstanceUID
    assert job.calling_aet == "STORESCU"
    (stored,) = node.instance_files()
    assert job.digest == sha256(stored)


def test_enqueue_failure_returns_failure_and_leaves_no_file_or_job(
    make_node: Callable[..., Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    node = make_node()

    def broken(**_: Any) -> None:
        raise StorageError("database operation failed: disk I/O error")

    monkeypatch.setattr(node.database.jobs, "enqueue_image", broken)
    (rsp,) = store_datasets(node.port, [make_mg_dataset()])
    # A database failure is transient: 0xA7xx (Out of Resources), which senders retry.
    assert status_of(rsp) == STATUS_DATABASE_UNAVAILABLE
    assert node.instance_files() == []
    monkeypatch.undo()
    assert node.job_count() == 0


def _compressed_cases() -> list[Any]:
    cases = [
        pytest.param(JPEG2000Lossless, id="jpeg2000-lossless"),
        pytest.param(JPEGLSLossless, id="jpeg-ls-lossless"),
        pytest.param(RLELossless, id="rle-lossless"),
        pytest.param(
            JPEGLosslessSV1,
            id="jpeg-lossless-sv1",
            marks=pytest.mark.skipif(
                not jpeg_lossless_encoder_available(), reason="needs DCMTK dcmcjpeg"
            ),
        ),
    ]
    return cases


@pytest.mark.parametrize("transfer_syntax", _compressed_cases())
def test_store_accepts_compressed_transfer_syntax(
    make_node: Callable[..., Node], transfer_syntax: str
) -> None:
    node = make_node()
    original = make_mg_dataset(rows=128, columns=96)
    ds = compress(original, transfer_syntax)
    (rsp,) = store_datasets(node.port, [ds])
    assert status_of(rsp) == 0x0000
    (stored_path,) = node.instance_files()
    stored = pydicom.dcmread(stored_path)
    assert stored.file_meta.TransferSyntaxUID == transfer_syntax
    np.testing.assert_array_equal(stored.pixel_array, original.pixel_array)
    assert node.job_count() == 1


@pytest.mark.parametrize(
    "transfer_syntax",
    [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian],
    ids=["implicit", "deflated"],
)
def test_store_accepts_other_uncompressed_transfer_syntaxes(
    make_node: Callable[..., Node], transfer_syntax: str
) -> None:
    node = make_node()
    ds = make_mg_dataset(rows=64, columns=48)
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    (rsp,) = store_datasets(node.port, [ds])
    assert status_of(rsp) == 0x0000
    (stored_path,) = node.instance_files()
    stored = pydicom.dcmread(stored_path)
    assert stored.file_meta.TransferSyntaxUID == transfer_syntax
    np.testing.assert_array_equal(stored.pixel_array, ds.pixel_array)


def test_deflated_instance_with_a_large_private_element_is_stored_as_received(
    make_node: Callable[..., Node],
) -> None:
    # The header parser skips the 3-MB element (values over 1 MiB are not read) and the
    # inflating reader drops what it skips: the instance is still checked and kept whole.
    node = make_node()
    ds = make_mg_dataset(rows=64, columns=48)
    ds.add_new(0x00090010, "LO", "CALCNODE TEST")
    ds.add_new(0x00091000, "OB", np.random.default_rng(0).bytes(3 * 1024 * 1024))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    (rsp,) = store_datasets(node.port, [ds])
    assert status_of(rsp) == 0x0000
    (stored_path,) = node.instance_files()
    stored = pydicom.dcmread(stored_path)
    assert stored[0x00091000].value == ds[0x00091000].value
    np.testing.assert_array_equal(stored.pixel_array, ds.pixel_array)


def test_duplicate_is_stored_once_with_one_job(make_node: Callable[..., Node]) -> None:
    node = make_node()
    ds = make_mg_dataset()
    first, second = store_datasets(node.port, [ds, copy.deepcopy(ds)])
    assert (status_of(first), status_of(second)) == (0x0000, 0x0000)
    assert node.job_count() == 1
    files = node.instance_files()
    assert len(files) == 1
    assert node.database.jobs.get_job(1).digest == sha256(files[0])


def test_changed_resend_replaces_the_instance_and_requeues(
    make_node: Callable[..., Node],
) -> None:
    node = make_node()
    ds = make_mg_dataset()
    (rsp,) = store_datasets(node.port, [ds])
    assert status_of(rsp) == 0x0000
    before = node.database.jobs.get_job(1)

    changed = copy.deepcopy(ds)
    pixels = changed.pixel_array.copy()
    pixels[10, 10] = (pixels[10, 10] + 100) % 4096
    changed.PixelData = pixels.astype("<u2").tobytes()
    (rsp,) = store_datasets(node.port, [changed])
    assert status_of(rsp) == 0x0000

    after = node.database.jobs.get_job(1)
    assert node.job_count() == 1
    assert after.digest != before.digest
    files = node.instance_files()
    assert len(files) == 1, "the superseded file must be removed"
    assert node.store.resolve(after.path) == files[0]
    assert after.digest == sha256(files[0])
    assert pydicom.dcmread(files[0]).pixel_array[10, 10] == pixels[10, 10]
    study = node.database.studies.get_study(ds.StudyInstanceUID)
    assert study.content_generation == 2


@pytest.mark.parametrize(
    "make", [make_ct_dataset, make_secondary_capture_dataset], ids=["ct", "secondary-capture"]
)
def test_non_mammogram_is_refused_and_nothing_queued(
    make_node: Callable[..., Node], make: Callable[[], Dataset]
) -> None:
    node = make_node()
    (rsp,) = store_datasets(node.port, [make()])
    assert status_of(rsp) == STATUS_SOP_CLASS_NOT_SUPPORTED
    assert "only MG" in str(rsp.ErrorComment)
    assert node.job_count() == 0
    assert node.instance_files() == []


def _without_spacing() -> Dataset:
    return make_mg_dataset(pixel_spacing=None, imager_pixel_spacing=None)


def _truncated_pixels() -> Dataset:
    ds = make_mg_dataset()
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    return ds


def _wrong_modality() -> Dataset:
    ds = make_mg_dataset()
    ds.Modality = "CT"
    return ds


def _colour() -> Dataset:
    ds = make_mg_dataset(rows=32, columns=32)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.PixelData = bytes(32 * 32 * 3 * 2)
    return ds


def _no_pixels() -> Dataset:
    ds = make_mg_dataset()
    del ds.PixelData
    return ds


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (_without_spacing, "no pixel spacing"),
        (_truncated_pixels, "truncated pixel data"),
        (_wrong_modality, "wrong modality"),
        (_colour, "colour"),
        (_no_pixels, "missing pixel data"),
    ],
    ids=["no-spacing", "truncated", "modality-ct", "colour", "no-pixel-data"],
)
def test_invalid_mammogram_returns_c210_with_comment(
    make_node: Callable[..., Node], make: Callable[[], Dataset], expected: str
) -> None:
    node = make_node()
    (rsp,) = store_datasets(node.port, [make()])
    assert status_of(rsp) == STATUS_CANNOT_UNDERSTAND
    assert expected in str(rsp.ErrorComment)
    assert node.job_count() == 0
    assert node.instance_files() == []


def test_store_returns_a700_when_disk_full(make_node: Callable[..., Node]) -> None:
    node = make_node(min_free_mb=10**9)
    (rsp,) = store_datasets(node.port, [make_mg_dataset()])
    assert status_of(rsp) == STATUS_OUT_OF_RESOURCES
    assert node.job_count() == 0
    assert node.instance_files() == []


# ----------------------------------------------------------------------------- access


def _associate(port: int, *, calling: str = "TESTSCU", called: str = AET) -> Any:
    ae = scu_ae(calling)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title=called)


def _reject_reason(assoc: Any) -> tuple[int, int, int]:
    rj = assoc.acceptor.primitive
    return (rj.result, rj.result_source, rj.diagnostic)


def test_unknown_calling_aet_is_rejected(
    make_node: Callable[..., Node], caplog: pytest.LogCaptureFixture
) -> None:
    node = make_node(allowed_calling_aets=("PACS",))
    with caplog.at_level(logging.WARNING, logger="node.scp"):
        assoc = _associate(node.port, calling="INTRUDER")
    assert assoc.is_rejected
    assert _reject_reason(assoc) == (1, 1, 3)  # permanent, user, calling AE not recognised
    assert "calling AE title not in node.allowed_calling_aets" in caplog.text
    assert "INTRUDER" in caplog.text
    good = _associate(node.port, calling="PACS")
    assert good.is_established
    good.release()


def test_wrong_called_aet_is_rejected(make_node: Callable[..., Node]) -> None:
    node = make_node()
    assoc = _associate(node.port, called="SOMEONE")
    assert assoc.is_rejected
    assert _reject_reason(assoc) == (1, 1, 7)  # called AE not recognised


def test_wrong_called_aet_is_accepted_when_not_required(make_node: Callable[..., Node]) -> None:
    node = make_node(require_called_aet=False)
    assoc = _associate(node.port, called="SOMEONE")
    assert assoc.is_established
    assoc.release()


def test_source_address_not_allowed_is_rejected(
    make_node: Callable[..., Node], caplog: pytest.LogCaptureFixture
) -> None:
    node = make_node(allowed_hosts=("10.0.0.0/8",))
    with caplog.at_level(logging.WARNING, logger="node.server"):
        assoc = _associate(node.port)
    # Refused at the accept, before any work: the connection is closed, no association.
    assert not assoc.is_established
    assert "source address not in node.allowed_hosts" in caplog.text
    assert "127.0.0.1" in caplog.text
    allowed = make_node(allowed_hosts=("127.0.0.0/8",))
    ok = _associate(allowed.port)
    assert ok.is_established
    ok.release()


def test_associations_beyond_max_associations_are_rejected(
    make_node: Callable[..., Node],
) -> None:
    node = make_node(max_associations=1)
    first = _associate(node.port)
    assert first.is_established
    second = _associate(node.port)
    assert second.is_rejected
    assert _reject_reason(second) == (2, 3, 2)  # transient, local limit exceeded
    first.release()
    third = _associate(node.port)
    assert third.is_established
    third.release()


# ----------------------------------------------------------------------------- TLS


def _client_context(server_cert: Path, client: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(server_cert))
    context.check_hostname = False  # the test certificate names no host
    if client is not None:
        context.load_cert_chain(certfile=str(client[0]), keyfile=str(client[1]))
    return context


def _echo_over(port: int, context: ssl.SSLContext | None) -> bool:
    ae = scu_ae()
    ae.add_requested_context(Verification)
    tls_args = (context, None) if context is not None else None
    assoc = ae.associate("127.0.0.1", port, ae_title=AET, tls_args=tls_args)
    if not assoc.is_established:
        return False
    ok = status_of(assoc.send_c_echo()) == 0x0000
    assoc.release()
    return ok


def test_tls_echo_works_and_plain_association_fails(
    make_node: Callable[..., Node], certificates: dict[str, tuple[Path, Path]]
) -> None:
    cert, key = certificates["server"]
    node = make_node(tls=TLSSettings(enabled=True, cert_file=cert, key_file=key))
    assert _echo_over(node.port, _client_context(cert)) is True
    assert _echo_over(node.port, None) is False
    # The failed plain attempt did not disturb the listener.
    assert _echo_over(node.port, _client_context(cert)) is True


def test_mutual_tls_requires_a_trusted_client_certificate(
    make_node: Callable[..., Node], certificates: dict[str, tuple[Path, Path]]
) -> None:
    cert, key = certificates["server"]
    client_cert, _ = certificates["client"]
    node = make_node(
        tls=TLSSettings(
            enabled=True,
            cert_file=cert,
            key_file=key,
            ca_file=client_cert,
            require_client_cert=True,
        )
    )
    assert _echo_over(node.port, _client_context(cert, certificates["client"])) is True
    assert _echo_over(node.port, _client_context(cert)) is False


# ----------------------------------------------------------------------------- logging


def test_no_patient_data_in_logs_at_info(
    make_node: Callable[..., Node], caplog: pytest.LogCaptureFixture
) -> None:
    node = make_node(pynetdicom_level="INFO")
    good = make_mg_dataset(patient_id="SECRET-ID-4711")
    good.PatientName = "DOE^JANE"
    good.PatientBirthDate = "19611231"
    bad = _without_spacing()
    bad.PatientName = "DOE^JANE"
    bad.PatientID = "SECRET-ID-4711"
    ct = make_ct_dataset()
    ct.PatientName = "DOE^JANE"
    with caplog.at_level(logging.INFO):
        statuses = [status_of(r) for r in store_datasets(node.port, [good, bad, ct])]
    assert statuses == [0x0000, STATUS_CANNOT_UNDERSTAND, STATUS_SOP_CLASS_NOT_SUPPORTED]
    assert good.SOPInstanceUID in caplog.text  # the log does say what happened
    for secret in ("DOE", "JANE", "SECRET-ID-4711", "19611231"):
        assert secret not in caplog.text
