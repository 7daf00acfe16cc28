"""What a radiologist sees: the node's results opened in OHIF in a real browser.

A small phantom study (three views: two with findings, one without) goes through the
node's own worker and study report (a fixed-point detector stands in for the cascade, so
every expected mark is known), and everything the node emits is stored in Orthanc with
its DICOMweb plugin. OHIF (the pinned prebuilt ``@ohif/app``, unpacked by ``make ohif``)
is served with Orthanc's DICOMweb on one origin (:class:`tests.viewer.OhifServer`) and
driven in Debian's headless Chromium through Playwright. Per view:

* its TID 1500 SR opens, drawing one mark per finding (clusters as circles, isolated
  calcifications as arrows) within 2 px of the detection, with labels that do not
  overlap;
* "Track measurements?" is offered; "Yes" lists every finding in the Measurements
  panel with its label, and clicking an entry shows its view;
* the view's SEG paints the calcifications in its Recommended Display CIELab colour
  (saturated pixels of that hue on the canvas where the detections are, none far away);
* no console error of the kinds OHIF showed before (``TypeError``, "No spatial
  coordinates group found", "not compatible", …).

Screenshots are kept in ``$CALCNODE_OHIF_ARTIFACTS`` (default: the test's tmp dir); the
ones in docs/img/ are these, scaled down. The study's view without findings must have no
report, and showing it must raise no console error. Coordinates: detections are
x = column, y = row, pixel centres; SR graphic coordinates = detection + 0.5.
"""

from __future__ import annotations

import colorsys
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from cascade.inference.detector import Detection, ImageDetections
from cascade.inference.weights import ModelIdentity
from node.reports.cad_sr import cluster_detections
from node.reports.seg import SEGMENT_COLOR_RGB
from node.scheduler import complete_studies
from tests.factories import make_mg_dataset, synthetic_breast
from tests.helpers import (
    ORTHANC,
    ORTHANC_DICOMWEB,
    OrthancWebServer,
    make_settings,
    make_worker,
    receive,
)
from tests.viewer import CHROMIUM, CHROMIUM_ARGS, OhifServer, ohif_dist

# One xdist worker runs them all: Orthanc, the server and Chromium start once.
pytestmark = [
    pytest.mark.viewer,
    pytest.mark.external,
    pytest.mark.slow,
    pytest.mark.xdist_group("ohif"),
]

ROWS, COLUMNS, SPACING = 520, 400, 0.1
#: Findings per view (x = column, y = row, FPR probability): L CC has a cluster of five
#: and two isolated calcifications, R MLO a cluster of three and one isolated one, R CC
#: none (its report says "no findings").
VIEWS: dict[tuple[str, str], list[tuple[float, float, float]]] = {
    ("L", "CC"): [
        (120.0, 230.0, 0.96),
        (131.0, 238.0, 0.81),
        (114.0, 246.0, 0.77),
        (127.0, 255.0, 0.9),
        (140.0, 226.0, 0.7),
        (260.0, 140.0, 0.88),
        (210.0, 400.0, 0.65),
    ],
    ("R", "MLO"): [
        (250.0, 300.0, 0.93),
        (262.0, 309.0, 0.84),
        (244.0, 316.0, 0.79),
        (300.0, 120.0, 0.72),
    ],
    ("R", "CC"): [],
}
#: Console messages that mean OHIF could not show an object (what issue 11 saw).
BAD_CONSOLE = (
    "TypeError",
    "No spatial coordinates group found",
    "not compatible",
    "is not supported",
    "Unable to generate tool state",
    "Cannot read properties",
)


class ViewDetector:
    """A detector with fixed findings per (laterality, view): every mark is known."""

    identity = ModelIdentity(version="viewer-test", sha256="cd" * 32)

    def detect(self, source: Any, *, path: str = "") -> ImageDetections:
        ds = source if isinstance(source, Dataset) else pydicom.dcmread(source)
        points = VIEWS[(str(ds.ImageLaterality), str(ds.ViewPosition))]
        return ImageDetections(
            sop_instance_uid=str(ds.SOPInstanceUID),
            path=path,
            rows=int(ds.Rows),
            columns=int(ds.Columns),
            pixel_spacing_mm=(SPACING, SPACING),
            detections=tuple(
                Detection(x=x, y=y, score=p, asn_score=2.0, fpr_score=p, radius_px=2.5)
                for x, y, p in points
            ),
        )


@dataclass
class ViewResult:
    """One view as the node reported it."""

    laterality: str
    view: str
    image: Dataset
    detections: ImageDetections
    objects: dict[str, Path] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.laterality} {self.view}"

    def findings(self) -> list[tuple[bool, float, float, int]]:
        """(is cluster, x, y, members) per finding, as the CAD SR groups them (pixel centres)."""
        out = []
        for group in cluster_detections(self.detections):
            members = [self.detections.detections[i] for i in group.indices]
            x = sum(d.x for d in members) / len(members)
            y = sum(d.y for d in members) / len(members)
            out.append((group.is_cluster, x, y, len(members)))
        return out


def process_study(folder: Path) -> tuple[str, list[ViewResult]]:
    """Route a three-view phantom study through the node's worker and study report.

    Returns the Study Instance UID and, per view, its image, detections and the
    objects the node stored (kind → file).
    """
    settings = make_settings(folder / "node", quiet_seconds=0.0)
    worker = make_worker(settings, ViewDetector())
    study_uid = pydicom.uid.generate_uid()
    views = []
    for seed, (laterality, view) in enumerate(VIEWS):
        # The phantom with a bright 3 × 3 speck at each finding (and no others).
        anatomy = synthetic_breast(ROWS, COLUMNS, laterality=laterality, seed=seed, dots=False)
        for x, y, _ in VIEWS[(laterality, view)]:
            anatomy[int(y) - 1 : int(y) + 2, int(x) - 1 : int(x) + 2] = 0.95
        ds = make_mg_dataset(
            pixel_spacing=(SPACING, SPACING),
            laterality=laterality,
            view=view,
            study_uid=study_uid,
            pixel_array=np.round(anatomy * 4095).astype(np.uint16),
        )
        ds.SeriesDescription = f"{laterality} {view}"
        receive(worker.database, worker.store, ds)
        views.append(ViewResult(laterality, view, ds, ViewDetector().detect(ds)))
    while worker.run_once() is not None:
        pass
    assert complete_studies(worker.database, worker.store, settings) == 1
    by_sop = {str(v.image.SOPInstanceUID): v for v in views}
    for path in sorted((worker.store.root / "results" / study_uid).glob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        kind = path.name.split("-2.25.")[0]
        if kind == "cad-sr":
            for v in views:
                v.objects[kind] = path
            continue
        refs = _referenced_images(ds)
        for uid in refs:
            by_sop[uid].objects[kind] = path
    return study_uid, views


def _referenced_images(ds: Dataset) -> set[str]:
    found: set[str] = set()

    def walk(item: Any) -> None:
        if isinstance(item, Dataset):
            for elem in item:
                if elem.keyword == "ReferencedSOPInstanceUID":
                    found.add(str(elem.value))
                elif elem.VR == "SQ":
                    for child in elem.value:
                        walk(child)

    walk(ds)
    found.discard(str(ds.SOPInstanceUID))
    return found


def _missing() -> str | None:
    if not ORTHANC.exists():
        return "Orthanc is not installed (apt-get install orthanc)"
    if not ORTHANC_DICOMWEB.exists():
        return "Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
    if not CHROMIUM.exists():
        return "Chromium is not installed (apt-get install chromium)"
    if not (ohif_dist() / "index.html").exists():
        return f"OHIF is not unpacked at {ohif_dist()} (make ohif; needs npm)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[dev]')"
    return None


@dataclass
class Viewer:
    """Orthanc + OHIF server + one Chromium, shared by the module's tests."""

    study_uid: str
    views: list[ViewResult]
    orthanc: OrthancWebServer
    server: OhifServer
    browser: Any
    artifacts: Path


@pytest.fixture(scope="module")
def viewer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Viewer]:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    folder = tmp_path_factory.mktemp("ohif")
    artifacts = Path(os.environ.get("CALCNODE_OHIF_ARTIFACTS") or folder / "screenshots")
    artifacts.mkdir(parents=True, exist_ok=True)
    study_uid, views = process_study(folder)
    orthanc = OrthancWebServer(folder / "orthanc")
    orthanc.start()
    server: OhifServer | None = None
    try:
        uploaded: set[Path] = set()
        for v in views:
            orthanc.post("/instances", _part10(v.image))
            for path in v.objects.values():
                if path not in uploaded:
                    orthanc.upload(path)
                    uploaded.add(path)
        server = OhifServer(ohif_dist(), orthanc.http_port).start()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=str(CHROMIUM), args=list(CHROMIUM_ARGS), headless=True
            )
            try:
                yield Viewer(study_uid, views, orthanc, server, browser, artifacts)
            finally:
                browser.close()
    finally:
        if server is not None:
            server.stop()
        orthanc.stop()


def _part10(ds: Dataset) -> bytes:
    from node.results import encode_dataset

    return encode_dataset(ds)


# --------------------------------------------------------------------------- in the browser
#: Image (x = column, y = row, pixel centres) → canvas coordinates of the one viewport.
_TO_CANVAS = """([x, y]) => {
  const vp = window.cornerstone.getEnabledElements()[0].viewport;
  const id = vp.getCurrentImageId();
  const world = window.cornerstone.utilities.imageToWorldCoords(id, [x + 0.5, y + 0.5]);
  const [cx, cy] = vp.worldToCanvas(world);
  const r = vp.canvas.getBoundingClientRect();
  return [cx + r.left, cy + r.top, id];
}"""
#: Every SVG text box of the annotations: its text and its page rectangle.
_LABELS = """() => [...document.querySelectorAll('svg text')].map(e => {
  const r = e.getBoundingClientRect();
  return [e.textContent, r.left, r.top, r.right, r.bottom];
}).filter(t => t[0].trim())"""
#: Hydrated annotations of the viewport: tool, label, first point in image coordinates.
_ANNOTATIONS = """() => {
  const vp = window.cornerstone.getEnabledElements()[0].viewport;
  const id = vp.getCurrentImageId();
  return window.cornerstoneTools.annotation.state.getAllAnnotations()
    .filter(a => ['CircleROI', 'ArrowAnnotate'].includes(a.metadata.toolName))
    .map(a => {
      const p = a.data.handles.points[a.metadata.toolName === 'ArrowAnnotate' ? 0 : 0];
      const [x, y] = window.cornerstone.utilities.worldToImageCoords(id, p);
      return [a.metadata.toolName, a.data.label || a.data.text || '', x, y];
    });
}"""


class Page:
    """One OHIF page of the study, with its console collected."""

    def __init__(self, viewer: Viewer) -> None:
        self.viewer = viewer
        self.context = viewer.browser.new_context(viewport={"width": 1400, "height": 900})
        # The first-visit onboarding tour would cover the thumbnails.
        self.context.add_init_script(
            "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))"
        )
        self.page = self.context.new_page()
        self.console: list[str] = []
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        self.page.goto(f"{viewer.server.url}/viewer?StudyInstanceUIDs={viewer.study_uid}")
        self.page.wait_for_selector('[data-cy="series-description-label"]', timeout=60_000)

    def open_series(self, description: str) -> None:
        thumb = self.page.locator('[data-cy="series-description-label"]', has_text=description)
        thumb.first.dblclick()

    def repaint(self) -> None:
        # Marks on an image without a Frame of Reference appear on the next render.
        self.page.set_viewport_size({"width": 1400, "height": 901})
        self.page.set_viewport_size({"width": 1400, "height": 900})
        self.page.wait_for_timeout(500)

    def labels(self) -> list[tuple[str, float, float, float, float]]:
        return [tuple(t) for t in self.page.evaluate(_LABELS)]

    def wait_for_labels(self, count: int, timeout: float = 20.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        found: list[Any] = []
        while time.monotonic() < deadline:
            self.repaint()
            found = self.labels()
            if len(found) >= count:
                return found
        return found

    def canvas_xy(self, x: float, y: float) -> tuple[float, float, str]:
        cx, cy, image_id = self.page.evaluate(_TO_CANVAS, [x, y])
        return float(cx), float(cy), str(image_id)

    def screenshot(self, name: str) -> Path:
        path = self.viewer.artifacts / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path

    def bad_console(self) -> list[str]:
        return [line for line in self.console if any(b in line for b in BAD_CONSOLE)]

    def close(self) -> None:
        self.context.close()


def _pixel(image: Any, x: float, y: float) -> tuple[int, int, int]:
    """The RGB value of a screenshot pixel (page coordinates)."""
    r, g, b = image.getpixel((int(x), int(y)))[:3]
    return int(r), int(g), int(b)


def _saturation_hue(rgb: tuple[int, ...]) -> tuple[float, float]:
    """HSV saturation (0–1) and hue (degrees) of a screenshot pixel."""
    h, s, _ = colorsys.rgb_to_hsv(*(c / 255 for c in rgb[:3]))
    return s, h * 360


def _is_segment_colour(rgb: tuple[int, ...]) -> bool:
    """Saturated (≥ 0.85) and within 15° of the hue of the SEG's display colour.

    OHIF's fallback for a segment without a colour, (221, 84, 84), has a saturation of
    0.62: it does not pass, so the SEG's own colour must have been used.
    """
    saturation, hue = _saturation_hue(rgb)
    _, want = _saturation_hue(SEGMENT_COLOR_RGB)
    return saturation >= 0.85 and min(abs(hue - want), 360 - abs(hue - want)) <= 15


def _overlapping(boxes: list[tuple[str, float, float, float, float]]) -> list[tuple[str, str]]:
    out = []
    for i, (ta, l1, t1, r1, b1) in enumerate(boxes):
        for tb, l2, t2, r2, b2 in boxes[i + 1 :]:
            if l1 < r2 and l2 < r1 and t1 < b2 and t2 < b1:
                out.append((ta, tb))
    return out


def _expected_label(is_cluster: bool, members: int) -> str:
    return f"Cluster of {members} calcifications" if is_cluster else "Calcification, "


WITH_FINDINGS = [v for v in VIEWS if VIEWS[v]]


@pytest.mark.parametrize("key", WITH_FINDINGS, ids=[f"{lat}-{view}" for lat, view in WITH_FINDINGS])
def test_each_views_report_opens_tracks_and_lists_every_finding(
    viewer: Viewer, key: tuple[str, str]
) -> None:
    view = next(v for v in viewer.views if (v.laterality, v.view) == key)
    findings = view.findings()
    page = Page(viewer)
    try:
        page.open_series(f"{view.label} calcnode measurements SR")
        # "Track measurements?": offered for the Cornerstone tracking identifiers.
        yes = page.page.get_by_role("button", name="Yes")
        yes.wait_for(timeout=30_000)
        assert "tracking measurements" in page.page.locator("body").inner_text()

        # Read-only: one labelled mark per finding, no label over another.
        labels = page.wait_for_labels(len(findings))
        assert len(labels) == len(findings), labels
        for is_cluster, _, _, members in findings:
            want = _expected_label(is_cluster, members)
            assert any(want in text for text, *_ in labels), (want, labels)
        assert _overlapping(labels) == []
        page.screenshot(f"{view.label.replace(' ', '-')}-report")

        # Tracked: every finding in the Measurements panel, each within 2 px.
        yes.click()
        page.page.wait_for_function(
            f"() => window.cornerstoneTools.annotation.state.getAllAnnotations()"
            f".filter(a => ['CircleROI','ArrowAnnotate'].includes(a.metadata.toolName))"
            f".length >= {len(findings)}",
            timeout=30_000,
        )
        tracked = page.page.evaluate(_ANNOTATIONS)
        assert len(tracked) == len(findings), tracked
        for is_cluster, x, y, members in findings:
            tool = "CircleROI" if is_cluster else "ArrowAnnotate"
            # Annotation points are in image coordinates: pixel corner origin (+ 0.5).
            near = [
                t
                for t in tracked
                if t[0] == tool and abs(t[2] - (x + 0.5)) <= 2 and abs(t[3] - (y + 0.5)) <= 2
            ]
            assert len(near) == 1, (tool, x, y, tracked)
            assert _expected_label(is_cluster, members) in near[0][1]
        page.page.click('[data-cy="trackedMeasurements-btn"]')
        rows = page.page.locator('[data-cy="trackedMeasurements-panel"] [data-cy="data-row"]')
        rows.first.wait_for(timeout=15_000)
        assert rows.count() == len(findings)
        panel = page.page.locator('[data-cy="trackedMeasurements-panel"]').inner_text()
        for is_cluster, _, _, members in findings:
            assert _expected_label(is_cluster, members) in panel
        page.repaint()
        assert _overlapping(page.labels()) == []
        page.screenshot(f"{view.label.replace(' ', '-')}-tracked")

        # Only the views with findings have a report.
        names = page.page.locator('[data-cy="series-description-label"]').all_inner_texts()
        reports = [n.split(" calcnode")[0] for n in names if "measurements SR" in n]
        assert sorted(reports) == sorted(v.label for v in viewer.views if v.detections.detections)

        # Clicking an entry brings its view back after another image (the view without
        # findings) was shown.
        other = next(v for v in viewer.views if not v.detections.detections)
        page.open_series(other.label)
        page.page.wait_for_timeout(1500)
        rows.first.click()
        page.page.wait_for_function(
            "uid => window.cornerstone.getEnabledElements()[0].viewport"
            ".getCurrentImageId().includes(uid)",
            arg=str(view.image.SOPInstanceUID),
            timeout=15_000,
        )
        assert page.bad_console() == []
    finally:
        page.close()


@pytest.mark.parametrize("key", WITH_FINDINGS, ids=[f"{lat}-{view}" for lat, view in WITH_FINDINGS])
def test_each_seg_paints_its_calcifications_on_their_image(
    viewer: Viewer, key: tuple[str, str]
) -> None:
    from PIL import Image

    view = next(v for v in viewer.views if (v.laterality, v.view) == key)
    page = Page(viewer)
    try:
        page.open_series(f"{view.label} calcnode SEG")
        yes = page.page.get_by_role("button", name="Yes")
        yes.wait_for(timeout=30_000)  # "Do you want to open this Segmentation?"
        yes.click()
        page.page.wait_for_timeout(3000)
        page.repaint()
        shot = page.screenshot(f"{view.label.replace(' ', '-')}-seg")
        image = Image.open(shot).convert("RGB")
        assert page.bad_console() == []
        # The SEG's own colour was used (OHIF warns when it falls back to its own).
        assert (
            "RecommendedDisplayCIELabValue not found" not in page.page.locator("body").inner_text()
        )
        for det in view.detections.detections:
            cx, cy, image_id = page.canvas_xy(det.x, det.y)
            assert str(view.image.SOPInstanceUID) in image_id
            # A pixel of the segment's colour (its hue, saturated) within 3 px of the
            # detection's centre: a colour a reader notices, not a grey dot.
            box = [_pixel(image, cx + dx, cy + dy) for dx in range(-3, 4) for dy in range(-3, 4)]
            assert any(_is_segment_colour(p) for p in box), (det.x, det.y, box[:5])
        # And nothing coloured far from every detection (a flipped mask would be).
        far = [(40.0, 40.0), (float(COLUMNS - 40), float(ROWS - 40))]
        for x, y in far:
            cx, cy, _ = page.canvas_xy(x, y)
            p = _pixel(image, cx, cy)
            assert _saturation_hue(p)[0] < 0.15, (x, y, p)
    finally:
        page.close()


# --------------------------------------------------------------------------- make demo
#: A finished ``calcnode demo --out DIR`` folder (``make demo`` writes ``demo-out``): the
#: opt-in check of the demo's study in OHIF. Unset, the test is skipped.
DEMO_ENV = "CALCNODE_OHIF_DEMO"
CAD_SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.50"
TID1500_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def _concept(item: Dataset) -> str:
    seq = getattr(item, "ConceptNameCodeSequence", None)
    return str(seq[0].CodeValue) if seq else ""


def cad_findings_per_image(cad: Dataset) -> dict[str, int]:
    """Findings (clusters and isolated calcifications) per image UID, as the CAD SR lists
    them: each Single Image Finding (111059) an Individual Impression/Recommendation
    (111034) CONTAINS, placed on its image by its Center's SELECTED FROM reference into
    the Image Library (111028)."""
    root = list(cad.ContentSequence)
    k, library = next((i, c) for i, c in enumerate(root, start=1) if _concept(c) == "111028")
    images = [
        str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for item in library.ContentSequence
    ]
    counts = dict.fromkeys(images, 0)

    def walk(items: list[Dataset]) -> None:
        for item in items:
            children = list(getattr(item, "ContentSequence", []))
            if _concept(item) == "111034":
                for finding in children:
                    if _concept(finding) == "111059" and finding.RelationshipType == "CONTAINS":
                        centre = next(c for c in finding.ContentSequence if _concept(c) == "111010")
                        ref = [
                            int(v)
                            for v in centre.ContentSequence[0].ReferencedContentItemIdentifier
                        ]
                        assert ref[:2] == [1, k], ref
                        counts[images[ref[2] - 1]] += 1
            walk(children)

    walk(root)
    return counts


def tid1500_groups(sr: Dataset) -> int:
    """Measurement groups (125007) of a TID 1500 report: one per finding."""

    def walk(items: list[Dataset]) -> int:
        return sum(
            int(_concept(i) == "125007") + walk(list(getattr(i, "ContentSequence", [])))
            for i in items
        )

    return walk(list(sr.ContentSequence))


@pytest.fixture(scope="module")
def demo_viewer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Viewer, Path]]:
    """Orthanc holding a finished demo's phantoms and results, OHIF and Chromium."""
    folder_env = os.environ.get(DEMO_ENV)
    if not folder_env:
        pytest.skip(f"set {DEMO_ENV} to a finished `calcnode demo --out DIR` folder (make demo)")
    demo = Path(folder_env)
    if not (demo / "received").is_dir():
        pytest.skip(f"{demo} holds no demo results (received/)")
    reason = _missing()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    folder = tmp_path_factory.mktemp("ohif-demo")
    artifacts = Path(os.environ.get("CALCNODE_OHIF_ARTIFACTS") or folder / "screenshots")
    artifacts.mkdir(parents=True, exist_ok=True)
    files = sorted((demo / "phantoms").rglob("*.dcm")) + sorted((demo / "received").rglob("*.dcm"))
    studies = {str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files}
    # The 4-view study (the demo groups its phantoms into studies of 2–4 views).
    orthanc = OrthancWebServer(folder / "orthanc")
    orthanc.start()
    server: OhifServer | None = None
    try:
        for path in files:
            orthanc.upload(path)
        server = OhifServer(ohif_dist(), orthanc.http_port).start()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=str(CHROMIUM), args=list(CHROMIUM_ARGS), headless=True
            )
            try:
                for study in sorted(studies):
                    yield Viewer(study, [], orthanc, server, browser, artifacts), demo
                    break  # one study per run: the demo's default makes one
            finally:
                browser.close()
    finally:
        if server is not None:
            server.stop()
        orthanc.stop()


def test_the_demo_study_in_ohif_every_finding_reachable_tracked_and_readable(
    demo_viewer: tuple[Viewer, Path],
) -> None:
    """Per view of the demo's study: OHIF draws, tracks and lists as many marks as the CAD
    SR has findings there (clusters and isolated calcifications, from the bundled
    detector), labels do not overlap at the default zoom, and the view's SEG paints in
    its colour. A view without findings has no report and no SEG."""
    viewer, demo = demo_viewer
    headers = [
        pydicom.dcmread(f, stop_before_pixels=True)
        for f in sorted((demo / "received").rglob("*.dcm"))
    ]
    headers = [h for h in headers if str(h.StudyInstanceUID) == viewer.study_uid]
    images = {
        str(h.SOPInstanceUID): h
        for h in (
            pydicom.dcmread(f, stop_before_pixels=True) for f in (demo / "phantoms").rglob("*.dcm")
        )
        if str(h.StudyInstanceUID) == viewer.study_uid
    }
    (cad,) = [h for h in headers if str(h.SOPClassUID) == CAD_SR_CLASS]
    expected = cad_findings_per_image(cad)
    assert set(expected) == set(images)
    reports = {
        str(_referenced_images(h).intersection(images).pop()): h
        for h in headers
        if str(h.SOPClassUID) == TID1500_CLASS
    }
    segs = {
        str(_referenced_images(h).intersection(images).pop()): h
        for h in headers
        if str(h.SOPClassUID) == SEG_CLASS
    }
    # Reports and SEGs exactly for the views with findings, one group per finding.
    assert set(reports) == set(segs) == {uid for uid, n in expected.items() if n}
    seen: dict[str, tuple[int, int, int, int]] = {}
    for uid, report in sorted(reports.items(), key=lambda kv: str(kv[1].SeriesDescription)):
        view = f"{images[uid].ImageLaterality} {images[uid].ViewPosition}"
        findings = expected[uid]
        assert tid1500_groups(report) == findings, view
        page = Page(viewer)
        try:
            page.open_series(str(report.SeriesDescription).split(" (")[0])
            yes = page.page.get_by_role("button", name="Yes")
            yes.wait_for(timeout=30_000)
            labels = page.wait_for_labels(findings)
            overlaps = _overlapping(labels)
            page.screenshot(f"demo-{view.replace(' ', '-')}-report")
            yes.click()
            page.page.wait_for_function(
                "n => window.cornerstoneTools.annotation.state.getAllAnnotations()"
                ".filter(a => ['CircleROI','ArrowAnnotate'].includes(a.metadata.toolName))"
                ".length >= n",
                arg=findings,
                timeout=30_000,
            )
            tracked = len(page.page.evaluate(_ANNOTATIONS))
            page.page.click('[data-cy="trackedMeasurements-btn"]')
            rows = page.page.locator('[data-cy="trackedMeasurements-panel"] [data-cy="data-row"]')
            rows.first.wait_for(timeout=15_000)
            listed = rows.count()
            page.repaint()
            page.screenshot(f"demo-{view.replace(' ', '-')}-tracked")
            seen[view] = (findings, len(labels), tracked, listed)
            print(
                f"demo {view}: {findings} findings, {len(labels)} labelled marks, "
                f"{tracked} tracked, {listed} listed, overlapping labels {overlaps}"
            )
            assert (len(labels), tracked, listed) == (findings, findings, findings), view
            assert overlaps == [], (view, overlaps)
            assert page.bad_console() == [], view
        finally:
            page.close()
        page = Page(viewer)
        try:
            page.open_series(str(segs[uid].SeriesDescription).split(" (")[0])
            yes = page.page.get_by_role("button", name="Yes")
            yes.wait_for(timeout=30_000)
            yes.click()
            page.page.wait_for_timeout(3000)
            page.repaint()
            from PIL import Image

            shot = Image.open(page.screenshot(f"demo-{view.replace(' ', '-')}-seg")).convert("RGB")
            rgb = np.asarray(shot).reshape(-1, 3)
            painted = sum(
                int(n)
                for colour, n in zip(*np.unique(rgb, axis=0, return_counts=True), strict=True)
                if _is_segment_colour(tuple(int(c) for c in colour))
            )
            print(f"demo {view}: SEG painted {painted} screen pixels in its colour")
            assert painted > 0, view
            assert page.bad_console() == [], view
        finally:
            page.close()
    assert seen, "the demo study has no view with findings"
