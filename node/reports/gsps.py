"""Grayscale Softcopy Presentation State (highdicom) with the findings drawn, one per image.

Graphic layer ``CALCNODE``: an unlabelled CIRCLE per detection (centre and a point on
the circumference, PIXEL units) and a closed POLYLINE around each cluster (same
clustering as the CAD SR). What a reader acts on is the finding, so each cluster and each
isolated calcification gets one TextObject, in the words of the TID 1500 report's
Comment (:func:`node.reports.tid1500.cluster_label`: ``Cluster of 9 calcifications,
96 %``, ``Calcification, 88 %``), in a bounding box that :func:`layout_labels` places
clear of every other label and every mark, with a visible anchor point on the finding's
outline or ring (the viewer draws a line from the text to it). Graphic
coordinates put (0, 0) at the top-left CORNER of the first pixel: a detection at
x = column, y = row (project convention, first pixel's CENTRE at (0, 0)) is drawn
at (x + 0.5, y + 0.5).

Grey levels: the presentation state replaces the image's own display pipeline, so
it must restate it. The Modality LUT and the first VOI window (else the first VOI
LUT) are copied from the source; a source without VOI (For Processing) gets a window spanning its
stored values. The Presentation LUT Shape is ``INVERSE`` for a MONOCHROME1 source
and ``IDENTITY`` otherwise: a viewer applying a presentation state takes its
output as P-values (white = high) and ignores the image's Photometric
Interpretation, so without INVERSE a MONOCHROME1 mammogram would be shown
inverted (PS3.3 C.11.6, PS3.4 N.2).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from cascade.inference.detections import Detection, ImageDetections
from node.reports.cad_sr import cluster_detections
from node.reports.common import (
    SERIES_DESCRIPTIONS,
    SERIES_NUMBERS,
    Provenance,
    add_provenance,
    certainty_percent,
    character_set_of,
    circle_outline,
    clip_to_image,
    conformed_header,
    laterality_of,
    resolve_instance,
    to_graphic_xy,
    validate_pair,
)
from node.reports.tid1500 import cluster_label

__all__ = [
    "GRAPHIC_LAYER",
    "LAYOUT_VIEWPORT_PX",
    "LabelledFinding",
    "build_gsps",
    "label_scale",
    "layout_labels",
    "presentation_lut_shape",
]

logger = logging.getLogger(__name__)

GRAPHIC_LAYER = "CALCNODE"

#: Ring of a calcification: this many pixels outside its radius.
RING_MARGIN_PX = 2.0
#: Cluster outline: this many pixels outside each member's radius.
OUTLINE_MARGIN_PX = 4.0
#: Labels are laid out for a viewer that shows the whole image (scale to fit) with its
#: longer side on at least this many screen pixels, in a font whose line and mean
#: character advance on screen are :data:`LABEL_LINE_PX` and :data:`LABEL_CHAR_PX`
#: (DICOMscope's 18-point font, measured by tests/test_gsps_render.py). In image
#: pixels each length is multiplied by :func:`label_scale`.
LAYOUT_VIEWPORT_PX = 1024
LABEL_LINE_PX = 22.0
LABEL_CHAR_PX = 9.5
#: Free space kept between a label and any other label or mark (screen pixels).
LABEL_GAP_PX = 6.0

Box = tuple[float, float, float, float]  # left, top, right, bottom (graphic coordinates)


@dataclass(frozen=True)
class LabelledFinding:
    """One finding as the label layout sees it: its text and a circle around its marks."""

    text: str
    x: float
    y: float
    reach: float
    is_cluster: bool


def _ring_radius(det: Detection) -> float:
    """Radius (px) of the ring drawn around a calcification: just outside the speck."""
    return max(float(det.radius_px), 1.0) + RING_MARGIN_PX


def label_scale(*, columns: int, rows: int) -> float:
    """Image pixels per screen pixel when the image is shown at the layout's zoom.

    A viewer that fits the image's longer side into :data:`LAYOUT_VIEWPORT_PX` screen
    pixels shows one screen pixel per ``max(columns, rows) / LAYOUT_VIEWPORT_PX`` image
    pixels; smaller images are taken at zoom 1 (a viewer enlarges them, which only
    makes the labels' room larger).
    """
    return max(1.0, max(int(columns), int(rows)) / LAYOUT_VIEWPORT_PX)


def _overlap(a: Box, b: Box) -> float:
    """Area shared by two boxes (0 when apart)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0.0) * max(h, 0.0)


def _grown(box: Box, by: float) -> Box:
    return (box[0] - by, box[1] - by, box[2] + by, box[3] + by)


def layout_labels(
    findings: Sequence[LabelledFinding], *, columns: int, rows: int
) -> list[tuple[Box, tuple[float, float]]]:
    """Place one label box per finding so that no box meets another box or any mark.

    Each label is tried beside its finding (right, left, above, below, then the
    diagonals), ever further out, and takes the first place inside the image that
    keeps :data:`LABEL_GAP_PX` from every label placed before it and from the circle
    around every finding's marks. Clusters are placed first. When no place is free
    (a crowded image), the one with the least overlap is taken.

    Parameters
    ----------
    findings : sequence of LabelledFinding
        Text and the circle (centre, reach) around each finding's marks, graphic
        coordinates.
    columns, rows : int
        The image's size.

    Returns
    -------
    list of (box, anchor)
        Per finding, in order: the label's bounding box (left, top, right, bottom) and
        its anchor point, on the circle around the finding's marks facing the box.
    """
    scale = label_scale(columns=columns, rows=rows)
    gap = LABEL_GAP_PX * scale
    marks = [(f.x - f.reach, f.y - f.reach, f.x + f.reach, f.y + f.reach) for f in findings]
    placed: dict[int, Box] = {}
    order = sorted(range(len(findings)), key=lambda i: (not findings[i].is_cluster, i))
    diag = float(np.sqrt(0.5))
    for i in order:
        f = findings[i]
        w = min(len(f.text) * LABEL_CHAR_PX * scale, float(columns))
        h = min(LABEL_LINE_PX * scale, float(rows))
        best: tuple[float, float, Box] | None = None
        for step in range(24):
            d = f.reach + gap + step * h
            corners = [
                (f.x + d, f.y - h / 2),  # right
                (f.x - d - w, f.y - h / 2),  # left
                (f.x - w / 2, f.y - d - h),  # above
                (f.x - w / 2, f.y + d),  # below
                (f.x + d * diag, f.y - d * diag - h),  # above right
                (f.x + d * diag, f.y + d * diag),  # below right
                (f.x - d * diag - w, f.y - d * diag - h),  # above left
                (f.x - d * diag - w, f.y + d * diag),  # below left
            ]
            for left, top in corners:
                left = min(max(left, 0.0), columns - w)
                top = min(max(top, 0.0), rows - h)
                box = (left, top, left + w, top + h)
                roomy = _grown(box, gap)
                on_labels = sum(_overlap(roomy, b) for b in placed.values())
                on_marks = sum(_overlap(box, m) for m in marks)
                cost = (on_labels, on_marks)
                if best is None or cost < best[:2]:
                    best = (*cost, box)
            if best is not None and best[0] == 0.0 and best[1] == 0.0:
                break
        assert best is not None
        placed[i] = best[2]
    result = []
    for i, f in enumerate(findings):
        box = placed[i]
        nx, ny = min(max(f.x, box[0]), box[2]), min(max(f.y, box[1]), box[3])
        dist = float(np.hypot(nx - f.x, ny - f.y))
        if dist > 0:
            t = min(f.reach, dist) / dist
            ax, ay = f.x + (nx - f.x) * t, f.y + (ny - f.y) * t
        else:
            ax, ay = f.x, f.y
        result.append((box, clip_to_image(ax, ay, columns=columns, rows=rows)))
    return result


def presentation_lut_shape(source: Dataset) -> str:
    """``"INVERSE"`` for a MONOCHROME1 source, else ``"IDENTITY"`` (see the module notes)."""
    photometric = str(getattr(source, "PhotometricInterpretation", "MONOCHROME2")).strip()
    return "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"


def _first(value: Any) -> Any:
    """The first value of a possibly multi-valued attribute."""
    if isinstance(value, (list, tuple, MultiValue)):
        return value[0]
    return value


def _source_voi(source: Dataset) -> list[hd.pr.SoftcopyVOILUTTransformation] | None:
    """The source's first VOI window (else its first VOI LUT) as a GSPS transformation.

    Built here rather than left to highdicom, whose copy of a VOI LUT fails when
    LUTData was decoded as a list of values (US), as pydicom does.
    """
    if "WindowCenter" in source and "WindowWidth" in source:
        explanation = source.get("WindowCenterWidthExplanation")
        function = source.get("VOILUTFunction")
        return [
            hd.pr.SoftcopyVOILUTTransformation(
                window_center=[float(_first(source.WindowCenter))],
                window_width=[float(_first(source.WindowWidth))],
                window_explanation=[str(_first(explanation))] if explanation else None,
                voi_lut_function=str(function) if function else None,
            )
        ]
    seq = getattr(source, "VOILUTSequence", None)
    if seq:
        item = seq[0]
        descriptor = [int(v) for v in item.LUTDescriptor]
        raw = item.LUTData
        if isinstance(raw, bytes):
            data = np.frombuffer(raw, dtype=np.uint8 if descriptor[2] <= 8 else np.uint16)
        else:
            data = np.asarray(raw if isinstance(raw, (list, tuple)) else list(raw), dtype=np.uint16)
        if descriptor[2] <= 8:
            data = data.astype(np.uint8)
        explanation = item.get("LUTExplanation")
        return [
            hd.pr.SoftcopyVOILUTTransformation(
                voi_luts=[
                    hd.VOILUT(
                        first_mapped_value=descriptor[1],
                        lut_data=data,
                        lut_explanation=str(explanation) if explanation else None,
                    )
                ]
            )
        ]
    return None


def _full_range_window(source: Dataset) -> hd.pr.SoftcopyVOILUTTransformation:
    """A LINEAR window spanning the modality values of ``source`` (min to max)."""
    pixels = source.pixel_array.astype(np.float64)
    slope = float(getattr(source, "RescaleSlope", 1) or 1)
    intercept = float(getattr(source, "RescaleIntercept", 0) or 0)
    values = pixels * slope + intercept
    lo, hi = float(values.min()), float(values.max())
    width = max(hi - lo + 1.0, 2.0)
    return hd.pr.SoftcopyVOILUTTransformation(
        window_center=[round(lo + width / 2.0, 3)],
        window_width=[round(width, 3)],
        window_explanation=["calcnode full range"],
    )


def build_gsps(
    *,
    source: Dataset,
    detections: ImageDetections,
    provenance: Provenance,
    series_instance_uid: str,
    sop_instance_uid: str | None = None,
    instance_number: int | None = None,
    version: int = 1,
    cluster_distance_mm: float = 5.0,
    min_cluster_size: int = 3,
) -> Dataset:
    """Build a GSPS that draws the detections of one MG image.

    Parameters
    ----------
    source : pydicom.Dataset
        The received MG image (For Presentation or For Processing).
    detections : ImageDetections
        Its detections (x = column, y = row, 0-based, first pixel's CENTRE at (0, 0)).
        Without detections the GSPS still carries the layer and the grey-level pipeline.
    provenance : Provenance
        Device identity (equipment attributes).
    series_instance_uid : str
        Series of the presentation state.
    sop_instance_uid : str or None
        SOP Instance UID; None generates one.
    instance_number : int or None
        InstanceNumber; None means ``version``.
    version : int
        1 for the first result of the study, > 1 for later ones.
    cluster_distance_mm, min_cluster_size : float, int
        Clustering for the cluster outlines, as in the CAD SR.

    Returns
    -------
    pydicom.Dataset
        The Grayscale Softcopy Presentation State.

    Raises
    ------
    TypeError, ValueError
        Invalid arguments; the message names the argument.
    """
    validate_pair(source, detections)
    if not isinstance(provenance, Provenance):
        raise TypeError("provenance must be a Provenance")
    series_uid, sop_uid, instance_number = resolve_instance(
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
        version=version,
        instance_number=instance_number,
    )
    layer = hd.pr.GraphicLayer(
        layer_name=GRAPHIC_LAYER,
        order=1,
        description="calcnode microcalcification marks",
        display_color=hd.color.CIELabColor(97.0, -21.0, 94.0),  # yellow
    )
    graphics: list[hd.pr.GraphicObject] = []
    findings: list[LabelledFinding] = []
    cols, rows = int(detections.columns), int(detections.rows)
    for det in detections.detections:
        cx, cy = to_graphic_xy(det.x, det.y)
        radius = _ring_radius(det)
        # The circumference point must lie in the image: take the side with room.
        px = cx + radius if cx + radius <= cols else cx - radius
        px, py = clip_to_image(px, cy, columns=cols, rows=rows)
        graphics.append(
            hd.pr.GraphicObject(
                graphic_type=hd.pr.GraphicTypeValues.CIRCLE,
                graphic_data=np.array([[cx, cy], [px, py]], dtype=float),
                units=hd.pr.AnnotationUnitsValues.PIXEL,
            )
        )
    for group in cluster_detections(
        detections, cluster_distance_mm=cluster_distance_mm, min_cluster_size=min_cluster_size
    ):
        members = [detections.detections[i] for i in group.indices]
        certainty = round(max(certainty_percent(d) for d in members), 3)
        centres = np.array([to_graphic_xy(d.x, d.y) for d in members], dtype=float)
        if group.is_cluster:
            margins = [max(d.radius_px, 1.0) + OUTLINE_MARGIN_PX for d in members]
            outline = circle_outline(
                [(float(x), float(y)) for x, y in centres], margins, bounds=(cols, rows)
            )
            graphics.append(
                hd.pr.GraphicObject(
                    graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                    graphic_data=outline,
                    units=hd.pr.AnnotationUnitsValues.PIXEL,
                )
            )
            cx, cy = (float(v) for v in centres.mean(axis=0))
            reach = float(np.hypot(outline[:, 0] - cx, outline[:, 1] - cy).max())
        else:
            cx, cy = (float(v) for v in centres[0])
            reach = _ring_radius(members[0])
        findings.append(
            LabelledFinding(
                text=cluster_label(len(members), certainty),
                x=cx,
                y=cy,
                reach=reach,
                is_cluster=group.is_cluster,
            )
        )
    texts = [
        hd.pr.TextObject(
            text_value=finding.text,
            units=hd.pr.AnnotationUnitsValues.PIXEL,
            bounding_box=box,
            anchor_point=anchor,
            anchor_point_visible=True,
            text_justification=hd.pr.TextJustificationValues.LEFT,
        )
        for finding, (box, anchor) in zip(
            findings, layout_labels(findings, columns=cols, rows=rows), strict=True
        )
    ]
    # highdicom copies the patient and study values of the image it references and
    # refuses (with the value in its message) one that breaks its VR, e.g. a
    # PatientBirthDate "1941-02-03": it gets the header with those values made valid.
    reference = conformed_header(source, context="GSPS")
    annotations = []
    if graphics or texts:
        annotations.append(
            hd.pr.GraphicAnnotation(
                referenced_images=[reference],
                graphic_layer=layer,
                graphic_objects=graphics or None,
                text_objects=texts or None,
            )
        )
    voi = _source_voi(source) or [_full_range_window(source)]
    kwargs: dict[str, Any] = {}
    charset = character_set_of(source)
    if charset is not None:
        kwargs["specific_character_set"] = charset
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[reference],
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBERS["gsps"],
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=provenance.manufacturer,
        manufacturer_model_name=provenance.model_name,
        software_versions=provenance.software_versions,
        device_serial_number=provenance.device_serial_number,
        content_label="CALCNODE",
        content_description="calcnode microcalcification marks",
        graphic_annotations=annotations or None,
        graphic_layers=[layer],
        institution_name=provenance.institution_name,
        voi_lut_transformations=voi,
        presentation_lut_transformation=hd.PresentationLUTTransformation(
            presentation_lut_shape=presentation_lut_shape(source)
        ),
        series_description=SERIES_DESCRIPTIONS["gsps"],
        **kwargs,
    )
    laterality = laterality_of(source)
    gsps.Laterality = laterality if laterality in ("L", "R") else ""
    add_provenance(gsps, provenance)
    logger.info(
        "GSPS %s for image %s: %d marks",
        sop_uid,
        detections.sop_instance_uid,
        len(detections.detections),
    )
    return gsps
