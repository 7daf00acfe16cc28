"""Our presentation states as independent consumers render them (issue 11, item 3).

Two Debian packages apply a GSPS to its image:

* **DCMTK ``dcmp2pgm``** renders the image through the state's grey-level pipeline
  (Modality LUT, VOI, Presentation LUT) and displayed area, but, as its manual says,
  not the graphic layer ("textual and graphical annotations will not be visible").
* **DICOMscope** (OFFIS's viewer, package ``dicomscope``) draws the graphic layer: DCMTK's
  ``dcmpstat`` parses the state (through the viewer's JNI library) and the viewer's own
  Java classes draw each graphic and text object. :data:`RENDERER` is a small headless
  driver that does what the viewer's ``ScreenImageHandler`` does when it shows an image:
  build the ``PresentationStateGraphicsHandler``, draw the image through its
  ``JavaTransformationConverter`` at the state's displayed area on a screen the image's
  size, then ``drawPaintStructure`` (the layers) on top. It is compiled with ``javac``
  at test time.

What is checked: the grey levels through our state equal the image's own (MONOCHROME1
and MONOCHROME2; a MONOCHROME1 state with an IDENTITY Presentation LUT must not, so the
tools are not blind to it); the whole image is displayed; each ring DICOMscope draws
(diff with and without the layer) is centred within 2 px of its detection with the
radius we wrote; each cluster outline encloses its calcifications without crossing
them; one label per finding (cluster or isolated calcification) in the TID 1500
report's words, drawn from its bounding box's corner (the driver prints the rectangle
DICOMscope computes for each text), none on another label or on a ring. DICOMscope
draws a PIXEL coordinate c at screen c − 2 (:data:`DICOMSCOPE_SHIFT`), where PS3.3
C.10.5.1.2 (and we) put 0\\0 at the first pixel's top-left corner,
so its marks sit 2 px up and left: the raw marks are checked within 2 px on each axis,
and within 0.5 px once that shift is taken off.
Coordinates: detections x = column, y = row, pixel centres; GSPS graphic
coordinates = detection + 0.5.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from cascade.inference.detector import Detection, ImageDetections
from node.reports import Provenance, build_gsps, build_tid1500_sr
from node.reports.gsps import GRAPHIC_LAYER
from tests.factories import make_mg_dataset

pytestmark = [pytest.mark.external, pytest.mark.xdist_group("gsps_render")]

DICOMSCOPE_JAR = Path("/usr/share/java/DICOMscope.jar")
DICOMSCOPE_JNI = Path("/usr/lib/x86_64-linux-gnu/jni")
DICOMSCOPE_CONFIG = Path("/etc/dcmtk/DICOMscope.cfg")
ROWS, COLUMNS, SPACING = 400, 320, 0.1
RADIUS = 2.5  # detection radius (px); our ring is drawn 2 px outside it
#: Where DICOMscope draws a PIXEL coordinate c on a screen showing image pixel i on
#: [i, i + 1) (zoom 1): at c − 2. Its graphic and text objects subtract 1 from every
#: coordinate (PresentationStateGraphicObject, PresentationStateTextObject) and its
#: screen transform for them (TransformationConverter) translates by one more image
#: pixel; the image itself is drawn unshifted (the grey-level test compares it with
#: dcmp2pgm pixel for pixel). Two image pixels at any zoom.
DICOMSCOPE_SHIFT = -2.0
#: Isolated calcifications, far enough apart (> 5 mm) that none is a cluster and their
#: labels (50 px beside each anchor) do not meet.
ISOLATED = [(70.0, 90.0, 0.95), (220.0, 110.0, 0.81), (90.0, 290.0, 0.66), (240.0, 320.0, 0.9)]
#: A cluster of four (within 5 mm) and one isolated calcification.
CLUSTER = [(110.0, 150.0, 0.93), (121.0, 158.0, 0.84), (104.0, 166.0, 0.79), (116.0, 171.0, 0.7)]
CLUSTER_AND_ONE = [*CLUSTER, (250.0, 300.0, 0.88)]
#: docs/img/gsps-dicomscope.png: a cluster of four and two isolated calcifications.
PICTURE = [*CLUSTER_AND_ONE, (60.0, 320.0, 0.72)]

PROVENANCE = Provenance(
    algorithm_name="calcnode uC cascade",
    algorithm_version="0.1.0",
    model_version="phantom-2024-01",
    device_uid="1.2.826.0.1.3680043.8.498.1234567890",
)

#: A headless DICOMscope: load image (+ state), draw as the viewer's ScreenImageHandler
#: does, write an 8-bit grey PNG. Arguments: config image pstate|- out.png [nographics].
#: DICOMscope's MainContext asks the screen device for its colour model in its
#: constructor (impossible headless) and is used only for the 8-bit grey colour model
#: afterwards, so an instance is made without its constructor.
RENDERER = r"""
import J2Ci.jDVInterface;
import java.awt.Dimension;
import java.awt.image.*;
import java.io.File;
import javax.imageio.ImageIO;
import main.GrayColorIndex;
import main.MainContext;
import viewer.presentation.JavaTransformationConverter;
import viewer.presentation.PresentationStateGraphicLayer;
import viewer.presentation.PresentationStateGraphicsHandler;
import viewer.presentation.PresentationStateTextObject;

public class RenderGsps {
    public static void main(String[] args) throws Exception {
        String config = args[0], image = args[1], pstate = args[2], out = args[3];
        boolean graphics = args.length < 5 || !args[4].equals("nographics");
        Class.forName("main.MainContext");  // its static block loads libjInterface
        GrayColorIndex.fillIndexColorModel();
        java.lang.reflect.Field uf = sun.misc.Unsafe.class.getDeclaredField("theUnsafe");
        uf.setAccessible(true);
        sun.misc.Unsafe unsafe = (sun.misc.Unsafe) uf.get(null);
        java.lang.reflect.Field inst = MainContext.class.getDeclaredField("theInstance");
        inst.setAccessible(true);
        inst.set(null, unsafe.allocateInstance(MainContext.class));

        jDVInterface dvi = new jDVInterface(config);
        int status = pstate.equals("-") ? dvi.loadImage(image) : dvi.loadPState(pstate, image);
        if (status != 0) throw new RuntimeException("DICOMscope could not load: " + status);
        PresentationStateGraphicsHandler h = new PresentationStateGraphicsHandler(dvi);
        h.buildPresentationState();
        int w = h.getImageWidth(), ht = h.getImageHeight();
        h.setScreenSize(new Dimension(w, ht));
        JavaTransformationConverter tc = new JavaTransformationConverter(h);
        byte[] px = new byte[w * ht];
        WritableRaster wr = Raster.createInterleavedRaster(
            new DataBufferByte(px, px.length), w, ht, w, 1, new int[] {0}, null);
        IndexColorModel cm = (IndexColorModel) MainContext.instance().getIndexColorModel();
        BufferedImage bi = new BufferedImage(cm, wr, false, null);
        tc.drawInDeviceSpaceFirst(bi, h.getZoomValue(), true, 0);
        if (graphics) {
            h.drawPaintStructure(
                bi, tc.getTransformation(), tc.getOverlayTransformation(), false, 8, false);
        }
        // Where DICOMscope put each text (screen pixels): the rectangle it computes for
        // the drawn text (its origin and the text's advance and ascent).
        java.lang.reflect.Field rect =
            PresentationStateTextObject.class.getDeclaredField("boundingRect");
        rect.setAccessible(true);
        for (Object layer : h.getListPresentationStateGraphicLayer()) {
            for (Object o : ((PresentationStateGraphicLayer) layer).listPresentationStateObject) {
                if (graphics && o instanceof PresentationStateTextObject) {
                    java.awt.geom.Rectangle2D r = (java.awt.geom.Rectangle2D) rect.get(o);
                    System.err.println("LABEL " + r.getX() + " " + r.getY() + " "
                        + r.getWidth() + " " + r.getHeight() + " "
                        + ((PresentationStateTextObject) o).getTextValue());
                }
            }
        }
        ImageIO.write(bi, "png", new File(out));
        System.err.println("RENDERED " + w + "x" + ht + " zoom " + h.getZoomValue()
            + " layers " + h.getListPresentationStateGraphicLayer().size()
            + " transform " + tc.getTransformation());
    }
}
"""


def _missing_dicomscope() -> str | None:
    if not DICOMSCOPE_JAR.exists() or not (DICOMSCOPE_JNI / "libjInterface.so").exists():
        return "DICOMscope is not installed (apt-get install dicomscope)"
    if shutil.which("javac") is None or shutil.which("java") is None:
        return "a JDK is not installed (apt-get install default-jdk-headless)"
    return None


@pytest.fixture(scope="module")
def dicomscope(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The compiled renderer's folder."""
    reason = _missing_dicomscope()
    if reason:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("dicomscope")
    (folder / "RenderGsps.java").write_text(RENDERER)
    subprocess.run(
        ["javac", "-nowarn", "-cp", str(DICOMSCOPE_JAR), "RenderGsps.java"],
        cwd=folder,
        check=True,
        capture_output=True,
        timeout=120,
    )
    return folder


def _render(renderer: Path, image: Path, pstate: Path | None, *, graphics: bool = True) -> Any:
    """DICOMscope's rendering of ``image`` (through ``pstate``) as a (rows, columns) array."""
    return _render_with_labels(renderer, image, pstate, graphics=graphics)[0]


def _render_with_labels(
    renderer: Path, image: Path, pstate: Path | None, *, graphics: bool = True
) -> tuple[Any, list[tuple[float, float, float, float, str]]]:
    """DICOMscope's rendering, and where it put each text: (left, top, right, bottom,
    text) in screen pixels (= image pixels at zoom 1), as the viewer computes it."""
    out = image.parent / f"{image.stem}-{pstate.stem if pstate else 'own'}-{int(graphics)}.png"
    args = [str(DICOMSCOPE_CONFIG), str(image), str(pstate) if pstate else "-", str(out)]
    proc = subprocess.run(
        [
            "java",
            "-Djava.awt.headless=true",
            f"-Djava.library.path={DICOMSCOPE_JNI}",
            "-cp",
            f"{DICOMSCOPE_JAR}:{renderer}",
            "RenderGsps",
            *args,
            *([] if graphics else ["nographics"]),
        ],
        cwd=image.parent,  # DICOMscope's config logs into ./log
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "RENDERED" in proc.stderr, proc.stderr[-2000:]
    from PIL import Image

    labels = []
    for line in proc.stderr.splitlines():
        if line.startswith("LABEL "):
            x, y, w, h, text = line.split(" ", 5)[1:]
            left, top = float(x), float(y)
            labels.append((left, top, left + float(w), top + float(h), text))
    return np.asarray(Image.open(out).convert("L")).astype(int), labels


def _dcmp2pgm(image: Path, pstate: Path | None) -> Any:
    from PIL import Image

    out = image.parent / f"{image.stem}-{pstate.stem if pstate else 'own'}.pgm"
    cmd = ["dcmp2pgm", *(["-p", str(pstate)] if pstate else []), str(image), str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    return np.asarray(Image.open(out)).astype(int)


def _detections(ds: Dataset, points: list[tuple[float, float, float]]) -> ImageDetections:
    return ImageDetections(
        sop_instance_uid=str(ds.SOPInstanceUID),
        path="unused.dcm",
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        pixel_spacing_mm=(SPACING, SPACING),
        detections=tuple(
            Detection(x=x, y=y, score=s, asn_score=1.0, fpr_score=s, radius_px=RADIUS)
            for x, y, s in points
        ),
    )


def _write(
    folder: Path,
    points: list[tuple[float, float, float]],
    *,
    photometric: str = "MONOCHROME2",
    keep: tuple[str, ...] = ("GraphicObjectSequence", "TextObjectSequence"),
) -> tuple[Dataset, Dataset, Path, Path]:
    """An MG image and our GSPS of ``points`` on it, as files; ``keep`` chooses which
    annotation sequences stay in the state (to render rings, outlines, texts apart)."""
    folder.mkdir(parents=True, exist_ok=True)
    mg = make_mg_dataset(
        rows=ROWS, columns=COLUMNS, pixel_spacing=(SPACING, SPACING), photometric=photometric
    )
    pr = build_gsps(
        source=mg,
        detections=_detections(mg, points),
        provenance=PROVENANCE,
        series_instance_uid=generate_uid(),
    )
    for annotation in getattr(pr, "GraphicAnnotationSequence", []):
        for name in ("GraphicObjectSequence", "TextObjectSequence"):
            if name not in keep and name in annotation:
                delattr(annotation, name)
    if not keep:  # an annotation item needs graphic or text objects: none at all
        del pr.GraphicAnnotationSequence
    image, state = folder / "mg.dcm", folder / "pr.dcm"
    mg.save_as(image, enforce_file_format=True)
    pr.save_as(state, enforce_file_format=True)
    return mg, pydicom.dcmread(state), image, state


def _components(mask: Any) -> list[Any]:
    """8-connected components of a boolean mask, each as an (n, 2) array of (x, y)."""
    from scipy import ndimage

    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
    return [np.argwhere(labels == i + 1)[:, ::-1] for i in range(count)]


# --------------------------------------------------------------------------- grey levels
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dcmp2pgm_and_dicomscope_show_the_image_through_our_state_as_it_shows_itself(
    dicomscope: Path, tmp_path: Path, photometric: str
) -> None:
    if shutil.which("dcmp2pgm") is None:
        pytest.skip("dcmp2pgm (dcmtk) is not installed")
    _, _, image, state = _write(tmp_path, ISOLATED, photometric=photometric, keep=())
    own, through_state = _dcmp2pgm(image, None), _dcmp2pgm(image, state)
    # Displayed area: the whole image, one output pixel per image pixel.
    assert through_state.shape == own.shape == (ROWS, COLUMNS)
    assert np.abs(own - through_state).max() <= 1
    assert own.std() > 20  # a picture, not a flat field
    # DICOMscope, the same pipeline in the viewer: same grey levels, nothing drawn.
    shown = _render(dicomscope, image, state, graphics=False)
    assert shown.shape == (ROWS, COLUMNS)
    assert np.abs(shown - through_state).max() <= 1
    if photometric == "MONOCHROME1":
        # The tools apply the Presentation LUT: IDENTITY would show it inverted.
        wrong = pydicom.dcmread(state)
        wrong.PresentationLUTShape = "IDENTITY"
        wrong.save_as(tmp_path / "identity.dcm", enforce_file_format=True)
        inverted = _dcmp2pgm(image, tmp_path / "identity.dcm")
        assert np.corrcoef(inverted.ravel(), own.ravel())[0, 1] < -0.9


# --------------------------------------------------------------------------- graphic layer
def test_dicomscope_draws_each_ring_around_its_calcification(
    dicomscope: Path, tmp_path: Path
) -> None:
    _, _, image, state = _write(tmp_path, ISOLATED, keep=("GraphicObjectSequence",))
    bare = _render(dicomscope, image, state, graphics=False)
    drawn = _render(dicomscope, image, state)
    rings = [c for c in _components(drawn != bare) if len(c) >= 8]
    assert len(rings) == len(ISOLATED), [len(c) for c in rings]
    centres = [(c + 0.5).mean(axis=0) for c in rings]  # of the pixel centres
    offsets = []
    for x, y, _ in ISOLATED:
        i = int(np.argmin([np.hypot(cx - x - 0.5, cy - y - 0.5) for cx, cy in centres]))
        dx, dy = centres[i][0] - (x + 0.5), centres[i][1] - (y + 0.5)
        # Within 2 px of the detection on each axis as DICOMscope draws it, and within
        # 0.5 px once its own shift is taken off.
        assert max(abs(dx), abs(dy)) <= 2.0, (x, y, centres[i])
        assert np.hypot(dx - DICOMSCOPE_SHIFT, dy - DICOMSCOPE_SHIFT) <= 0.5, (x, y, dx, dy)
        radius = float(np.hypot(*((rings[i] + 0.5) - centres[i]).T).mean())
        assert abs(radius - (RADIUS + 2.0)) <= 1.0, (x, y, radius)
        offsets.append((dx, dy))
    # One translation for every mark: DICOMscope's, not a per-mark error of ours.
    assert np.ptp(np.array(offsets), axis=0).max() <= 0.5, offsets


def test_dicomscope_draws_the_cluster_outline_around_its_members(
    dicomscope: Path, tmp_path: Path
) -> None:
    from scipy import ndimage
    from scipy.spatial import ConvexHull

    _, pr, image, state = _write(tmp_path, CLUSTER_AND_ONE, keep=("GraphicObjectSequence",))
    objects = pr.GraphicAnnotationSequence[0].GraphicObjectSequence
    outlines = [o for o in objects if o.GraphicType == "POLYLINE"]
    assert len(outlines) == 1  # the cluster, not the isolated one
    # Only the outline drawn: the rings removed from the state.
    only = pydicom.dcmread(state)
    only.GraphicAnnotationSequence[0].GraphicObjectSequence = outlines
    only.save_as(tmp_path / "outline.dcm", enforce_file_format=True)
    bare = _render(dicomscope, image, tmp_path / "outline.dcm", graphics=False)
    drawn = _render(dicomscope, image, tmp_path / "outline.dcm") != bare
    (line,) = [c for c in _components(drawn) if len(c) >= 8]
    inside = ndimage.binary_fill_holes(drawn)
    # Members where DICOMscope puts them (pixel centres, its shift applied).
    members = np.array(
        [(x + 0.5 + DICOMSCOPE_SHIFT, y + 0.5 + DICOMSCOPE_SHIFT) for x, y, _ in CLUSTER]
    )
    points = line + 0.5
    for mx, my in members:
        # Every member inside the outline, and the line never crosses a calcification.
        assert inside[int(my), int(mx)], (mx, my)
        assert float(np.hypot(points[:, 0] - mx, points[:, 1] - my).min()) >= RADIUS
    # The outline hugs the cluster: each drawn point lies our margin (radius + 4 px)
    # from the members' convex hull, give or take 2 px.
    hull = members[ConvexHull(members).vertices]
    edges = list(zip(hull, np.roll(hull, -1, axis=0), strict=True))
    for p in points:
        gap = min(_segment_distance(p, a, b) for a, b in edges)
        assert abs(gap - (RADIUS + 4.0)) <= 2.0, (p, gap)
    # The isolated calcification is outside it.
    assert not inside[int(300 + 0.5 + DICOMSCOPE_SHIFT), int(250 + 0.5 + DICOMSCOPE_SHIFT)]


def _segment_distance(p: Any, a: Any, b: Any) -> float:
    t = float(np.clip(np.dot(p - a, b - a) / np.dot(b - a, b - a), 0.0, 1.0))
    return float(np.hypot(*(p - (a + t * (b - a)))))


#: A crowded image: two clusters 7 mm apart, a pair of calcifications 3 mm apart (two
#: singletons: a cluster needs three), singletons at the top, right and bottom edges.
CROWDED = [
    *CLUSTER,
    (150.0, 215.0, 0.9),
    (160.0, 222.0, 0.8),
    (146.0, 230.0, 0.75),
    (60.0, 250.0, 0.86),
    (85.0, 262.0, 0.61),
    (300.0, 60.0, 0.77),
    (200.0, 6.0, 0.99),
    (150.0, 392.0, 0.68),
]


@pytest.mark.parametrize("case", ["picture", "crowded"])
def test_dicomscope_draws_one_label_per_finding_none_over_another(
    dicomscope: Path, tmp_path: Path, case: str
) -> None:
    """What a reader acts on: one label per cluster and per isolated calcification, with
    the report's words, in its bounding box, none on another label or on a mark."""
    points = PICTURE if case == "picture" else CROWDED
    mg, pr, image, state = _write(tmp_path, points)
    texts = pr.GraphicAnnotationSequence[0].TextObjectSequence
    # The words of the TID 1500 report's labels (its Comments), one per finding.
    report = build_tid1500_sr(
        source=mg,
        detections=_detections(mg, points),
        provenance=PROVENANCE,
        series_instance_uid=generate_uid(),
    )
    assert report is not None
    comments = sorted(
        str(item.TextValue)
        for group in report.ContentSequence[-1].ContentSequence
        for item in group.ContentSequence
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "121106"
    )
    assert sorted(str(t.UnformattedTextValue) for t in texts) == comments
    clusters = [t for t in comments if t.startswith("Cluster of")]
    assert len(clusters) == (1 if case == "picture" else 2)
    shown, drawn = _render_with_labels(dicomscope, image, state)
    if case == "picture":
        _keep_picture(_render(dicomscope, image, None), shown, tmp_path)
    assert sorted(label[4] for label in drawn) == comments
    # No label on another (DICOMscope's own text rectangles, 1 px for the descenders).
    for i, a in enumerate(drawn):
        for b in drawn[i + 1 :]:
            apart = a[2] <= b[0] or b[2] <= a[0] or a[3] + 1 <= b[1] or b[3] + 1 <= a[1]
            assert apart, (a, b)
    # Each text where the state puts it: from its box's top-left corner (DICOMscope's
    # shift applied), inside the box, and on no calcification's ring.
    for text in texts:
        (label,) = [d for d in drawn if d[4] == text.UnformattedTextValue and _in_box(d, text)]
        for x, y, _ in points:
            cx, cy = x + 0.5 + DICOMSCOPE_SHIFT, y + 0.5 + DICOMSCOPE_SHIFT
            ring = RADIUS + 2.0
            near_x = min(max(cx, label[0]), label[2])
            near_y = min(max(cy, label[1]), label[3] + 4)
            assert np.hypot(near_x - cx, near_y - cy) > ring, (label, x, y)
    # The anchor of each label on its finding's marks: the ring of an isolated
    # calcification, the outline of a cluster.
    for text in texts:
        ax, ay = (float(v) for v in text.AnchorPoint)
        gap = min(np.hypot(ax - x - 0.5, ay - y - 0.5) for x, y, _ in points)
        limit = RADIUS + 2.0 if text.UnformattedTextValue.startswith("Calc") else 30.0
        assert gap <= limit + 0.5, (text.UnformattedTextValue, ax, ay, gap)
        assert text.AnchorPointVisibility == "Y"


def _keep_picture(own: Any, through_state: Any, tmp_path: Path) -> None:
    """docs/img/gsps-dicomscope.png: the image as DICOMscope shows it alone (left) and
    through our state (right), 6 white pixels apart, in ``$CALCNODE_GSPS_ARTIFACTS``
    (default: the test's tmp dir)."""
    from PIL import Image

    folder = Path(os.environ.get("CALCNODE_GSPS_ARTIFACTS") or tmp_path / "pictures")
    folder.mkdir(parents=True, exist_ok=True)
    gap = np.full((own.shape[0], 6), 255)
    picture = np.concatenate([own, gap, through_state], axis=1).astype(np.uint8)
    Image.fromarray(picture).save(folder / "gsps-dicomscope.png", optimize=True)


def _in_box(label: tuple[float, float, float, float, str], text: Dataset) -> bool:
    """Whether DICOMscope drew ``label`` from the top-left corner of ``text``'s bounding
    box (its 2-px shift applied) and within the box (3 px for the glyphs' bearings)."""
    left, top = (float(v) + DICOMSCOPE_SHIFT for v in text.BoundingBoxTopLeftHandCorner)
    right, bottom = (float(v) + DICOMSCOPE_SHIFT for v in text.BoundingBoxBottomRightHandCorner)
    return (
        abs(label[0] - left) <= 1.0
        and abs(label[1] - top) <= 1.0
        and label[2] <= right + 3.0
        and label[3] <= bottom + 3.0
    )


# --------------------------------------------------------------------------- geometry
def test_graphic_layer_is_in_the_referenced_images_pixel_grid(tmp_path: Path) -> None:
    """What any consumer relies on, whatever it draws: the annotation references the
    image, names the declared layer, and every coordinate is in PIXEL units inside it."""
    mg, pr, _, _ = _write(tmp_path, CLUSTER_AND_ONE)
    assert [str(layer.GraphicLayer) for layer in pr.GraphicLayerSequence] == [GRAPHIC_LAYER]
    (annotation,) = pr.GraphicAnnotationSequence
    assert annotation.GraphicLayer == GRAPHIC_LAYER
    (ref,) = annotation.ReferencedImageSequence
    assert ref.ReferencedSOPInstanceUID == mg.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == mg.SOPClassUID
    (series,) = pr.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == mg.SeriesInstanceUID
    circles = [o for o in annotation.GraphicObjectSequence if o.GraphicType == "CIRCLE"]
    assert len(circles) == len(CLUSTER_AND_ONE)
    for obj in annotation.GraphicObjectSequence:
        assert obj.GraphicAnnotationUnits == "PIXEL"
        xy = np.asarray(obj.GraphicData, dtype=float).reshape(-1, 2)
        assert ((xy >= 0) & (xy <= (COLUMNS, ROWS))).all()
    for circle, (x, y, _) in zip(circles, CLUSTER_AND_ONE, strict=True):
        cx, cy, px, py = (float(v) for v in circle.GraphicData)
        assert (cx, cy) == (x + 0.5, y + 0.5)
        assert np.hypot(px - cx, py - cy) == pytest.approx(RADIUS + 2.0)
    for text in annotation.TextObjectSequence:
        assert text.AnchorPointAnnotationUnits == "PIXEL"
    # The displayed area is the whole image, scaled to fit.
    (area,) = pr.DisplayedAreaSelectionSequence
    assert [int(v) for v in area.DisplayedAreaTopLeftHandCorner] == [1, 1]
    assert [int(v) for v in area.DisplayedAreaBottomRightHandCorner] == [COLUMNS, ROWS]
    assert area.PresentationSizeMode == "SCALE TO FIT"
