"""The acceptance test: a real PACS (Orthanc) routes a study to calcnode and gets results.

Orthanc (the Debian package) runs on free loopback ports with a generated configuration
that names calcnode as a DICOM modality; ``calcnode serve`` runs as a subprocess with
Orthanc as its destination. Orthanc sends the study (REST ``/modalities/calcnode/store``,
the PACS routing path), and the test polls Orthanc's REST API until the study holds the
Mammography CAD SR, the TID 1500 SR, the SEGs and the GSPSs.

Coordinates: the CAD SR's Center points are DICOM graphic coordinates (top-left CORNER
of the first pixel at (0, 0)); the detector's points are pixel CENTRES (x = column,
y = row, first pixel's centre at (0, 0)); so SR point − 0.5 = detector point.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from factories import make_mg_dataset

from node.settings import DestinationSettings, Settings, dump_toml
from storage.database import open_database
from tests.helpers import OrthancServer, free_port, make_settings

pytestmark = [pytest.mark.external, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
SERVE = (
    "import sys; from node.settings import load_settings; from node.service import serve; "
    "sys.exit(serve(load_settings(sys.argv[1]), workers=1))"
)
CAD_SR = "1.2.840.10008.5.1.4.1.1.88.50"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"


class Node:
    """``calcnode serve`` as a subprocess."""

    def __init__(self, folder: Path, settings: Settings) -> None:
        self.folder = folder
        self.settings = settings
        self.log = folder / "calcnode.log"
        self.config = folder / "calcnode.toml"
        self.config.write_text(dump_toml(settings))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Node:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CALCNODE_")}
        env.pop("NOTIFY_SOCKET", None)
        env["PYTHONUNBUFFERED"] = "1"
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVE, str(self.config)],
            cwd=REPO,
            env=env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"calcnode exited: {self.log.read_text()[-3000:]}")
            if "calcnode serving" in self.log.read_text():
                return self
            time.sleep(0.2)
        raise RuntimeError("calcnode did not start")

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(90)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode

    def tail(self) -> str:
        return self.log.read_text()[-4000:] if self.log.exists() else ""


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Any]:
    nodes: list[Node] = []

    def make(settings: Settings) -> Node:
        folder = tmp_path / f"calcnode{len(nodes)}"
        folder.mkdir()
        node = Node(folder, settings)
        nodes.append(node)
        return node

    try:
        yield make
    finally:
        for node in nodes:
            node.stop()


def pair(
    tmp_path: Path,
    orthanc_factory: Any,
    tiny_model: Path,
    *,
    database_url: str | None = None,
    **kw: Any,
) -> tuple[Any, Any]:
    """An Orthanc that knows calcnode, and calcnode settings that send to that Orthanc
    (their database at ``database_url`` when given, else the store's SQLite file)."""
    node_port = free_port()
    orthanc: OrthancServer = orthanc_factory(
        modalities={"calcnode": ["CALCNODE", "127.0.0.1", node_port]}
    )
    dest = DestinationSettings(
        name="orthanc", ae_title=orthanc.ae_title, host="127.0.0.1", port=orthanc.dicom_port
    )
    settings = make_settings(
        tmp_path / "store",
        port=node_port,
        model_path=tiny_model,
        destinations=(dest,),
        quiet_seconds=2.0,
        **kw,
    )
    if database_url is not None:
        storage = settings.storage.model_copy(update={"database_url": database_url})
        settings = settings.model_copy(update={"storage": storage})
    return orthanc, settings


def study_instances(orthanc: OrthancServer, study_uid: str) -> dict[str, list[pydicom.Dataset]]:
    """The study's instances in Orthanc, parsed, by SOP Class UID."""
    found = orthanc.post("/tools/lookup", study_uid)
    ids = [f["ID"] for f in found or [] if f.get("Type") == "Study"]
    out: dict[str, list[pydicom.Dataset]] = {}
    if not ids:
        return out
    for inst in orthanc.get(f"/studies/{ids[0]}/instances"):
        raw = orthanc.get_bytes(f"/instances/{inst['ID']}/file")
        ds = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True)
        out.setdefault(str(ds.SOPClassUID), []).append(ds)
    return out


def wait_for_results(
    orthanc: OrthancServer, study_uid: str, *, images: int, timeout: float, node: Node
) -> dict[str, list[pydicom.Dataset]]:
    deadline = time.monotonic() + timeout
    found: dict[str, list[pydicom.Dataset]] = {}
    while time.monotonic() < deadline:
        if node.process is not None and node.process.poll() is not None:
            raise AssertionError(f"calcnode exited early:\n{node.tail()}")
        try:
            found = study_instances(orthanc, study_uid)
        except OSError:
            found = {}
        if (
            len(found.get(CAD_SR, [])) >= 1
            and len(found.get(COMPREHENSIVE_SR, [])) >= 1
            and len(found.get(GSPS, [])) >= images
            and len(found.get(SEG, [])) >= images
        ):
            return found
        time.sleep(1.0)
    counts = {k: len(v) for k, v in found.items()}
    raise AssertionError(f"results incomplete after {timeout:.0f} s: {counts}\n{node.tail()}")


def cad_sr_points(sr: pydicom.Dataset) -> dict[str, list[tuple[float, float]]]:
    """Centres of the Individual Calcification findings, per referenced SOP Instance UID.

    Returned in the project convention (pixel centres): SR graphic coordinates − 0.5.
    """
    library = next(
        item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "111028"
    )
    images = [
        str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for item in library.ContentSequence
    ]
    points: dict[str, list[tuple[float, float]]] = {uid: [] for uid in images}

    def walk(item: pydicom.Dataset, parent_is_individual: bool) -> None:
        for child in getattr(item, "ContentSequence", []):
            name = (
                child.ConceptNameCodeSequence[0].CodeValue
                if "ConceptNameCodeSequence" in child
                else ""
            )
            if child.get("ValueType") == "SCOORD" and name == "111010" and parent_is_individual:
                ref = child.ContentSequence[0].ReferencedContentItemIdentifier
                gx, gy = (float(v) for v in child.GraphicData)
                points[images[int(ref[2]) - 1]].append((gx - 0.5, gy - 0.5))
            individual = (
                name == "111059"
                and child.get("ValueType") == "CODE"
                and child.ConceptCodeSequence[0].CodeValue == "129770007"
            )
            walk(child, individual)

    walk(sr, False)
    return points


def test_orthanc_routes_a_phantom_study_and_receives_all_results(
    tmp_path: Path, orthanc_factory: Any, node_factory: Any, tiny_model: Path
) -> None:
    import torch

    from cascade.inference.detector import Detector
    from cascade.synthesis import generate_dataset

    generate_dataset(tmp_path / "phantoms", count=2, seed=7, size="small", progress=False)
    files = sorted((tmp_path / "phantoms").rglob("*.dcm"))
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    files = [
        f
        for f in files
        if pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID == study_uid
    ]

    orthanc, settings = pair(tmp_path, orthanc_factory, tiny_model)
    orthanc.start()
    node = node_factory(settings).start()
    for f in files:
        orthanc.upload(f)
    orthanc_study = orthanc.post("/tools/lookup", study_uid)[0]["ID"]
    # The PACS routes the study to calcnode: a real C-STORE from Orthanc's SCU.
    orthanc.post("/modalities/calcnode/store", {"Resources": [orthanc_study], "Synchronous": True})

    found = wait_for_results(orthanc, study_uid, images=len(files), timeout=600, node=node)
    assert node.stop() == 0

    for sop_class in (CAD_SR, COMPREHENSIVE_SR, SEG, GSPS):
        for ds in found[sop_class]:
            assert ds.StudyInstanceUID == study_uid
    cad = found[CAD_SR][0]
    assert cad.VerificationFlag == "UNVERIFIED"
    sr_points = cad_sr_points(cad)
    assert set(sr_points) == {
        str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files
    }

    torch.set_num_threads(1)  # as the node's worker (model.torch_threads = 1)
    detector = Detector(tiny_model, tiny_model.parent / "fpr.pt", device="cpu")
    for f in files:
        expected = detector.detect(f)
        got = sr_points[expected.sop_instance_uid]
        assert len(got) == len(expected.detections)
        for det in expected.detections:
            nearest = min(abs(x - det.x) + abs(y - det.y) for x, y in got)
            assert nearest <= 0.5, (det.x, det.y)


def test_results_reach_the_pacs_once_it_is_back_after_an_outage(
    tmp_path: Path, orthanc_factory: Any, node_factory: Any, tiny_model: Path, database_url: str
) -> None:
    # On both backends (the node's jobs, studies and send retries on PostgreSQL too);
    # SQLite as configured by default (the store's calcnode.db).
    orthanc, settings = pair(
        tmp_path,
        orthanc_factory,
        tiny_model,
        send_retry_seconds=1.0,
        database_url=database_url if database_url.startswith("postgresql") else None,
    )
    orthanc.start()
    node = node_factory(settings).start()
    ds = make_mg_dataset(seed=11)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    orthanc.post("/instances", buffer.getvalue())
    orthanc_study = orthanc.post("/tools/lookup", str(ds.StudyInstanceUID))[0]["ID"]
    orthanc.post("/modalities/calcnode/store", {"Resources": [orthanc_study], "Synchronous": True})
    orthanc.stop()  # the PACS goes down before any result is back

    database = open_database(settings.storage.database_url, create=False)
    try:
        deadline = time.monotonic() + 300
        failing: list[Any] = []
        while time.monotonic() < deadline:
            summary = database.status_summary()
            failing = [e for e in summary["recent_errors"] if e["kind"] == "send"]
            if summary["studies"]["reported"] == 1 and len(failing) >= 4:
                break
            assert summary["jobs"]["failed"] == 0, node.tail()
            time.sleep(0.5)
        assert len(failing) >= 4, node.tail()  # CAD SR, TID 1500, SEG, GSPS all refused
        assert summary["sends"]["sent"] == 0
    finally:
        database.close()

    orthanc.start()  # same storage folder and ports: the PACS is back
    found = wait_for_results(orthanc, str(ds.StudyInstanceUID), images=1, timeout=120, node=node)
    assert len(found[CAD_SR]) == 1
    assert node.stop() == 0
