"""Grayscale Softcopy Presentation State (highdicom) with the findings drawn, one per image.

Graphic layer ``CALCNODE``: a CIRCLE per detection (centre and a point on the
circumference, PIXEL units), a TextObject with its Certainty of Finding, and a
closed POLYLINE around each cluster (same clustering as the CAD SR). Graphic
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
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from cascade.inference.detector import ImageDetections
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

__all__ = ["GRAPHIC_LAYER", "build_gsps", "presentation_lut_shape"]

logger = logging.getLogger(__name__)

GRAPHIC_LAYER = "CALCNODE"


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
    texts: list[hd.pr.TextObject] = []
    cols, rows = int(detections.columns), int(detections.rows)
    for det in detections.detections:
        cx, cy = to_graphic_xy(det.x, det.y)
        radius = max(float(det.radius_px), 1.0) + 2.0  # a ring just outside the speck
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
        texts.append(
            hd.pr.TextObject(
                text_value=f"{certainty_percent(det):.0f}%",
                units=hd.pr.AnnotationUnitsValues.PIXEL,
                anchor_point=clip_to_image(cx + radius, cy - radius, columns=cols, rows=rows),
                anchor_point_visible=False,
                text_justification=hd.pr.TextJustificationValues.LEFT,
            )
        )
    for group in cluster_detections(
        detections, cluster_distance_mm=cluster_distance_mm, min_cluster_size=min_cluster_size
    ):
        if not group.is_cluster:
            continue
        members = [detections.detections[i] for i in group.indices]
        outline = circle_outline(
            [to_graphic_xy(d.x, d.y) for d in members],
            [max(d.radius_px, 1.0) + 4.0 for d in members],
            bounds=(cols, rows),
        )
        graphics.append(
            hd.pr.GraphicObject(
                graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                graphic_data=outline,
                units=hd.pr.AnnotationUnitsValues.PIXEL,
            )
        )
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
