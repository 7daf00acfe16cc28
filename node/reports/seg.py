"""Binary Segmentation (highdicom) of the detected calcifications, one per image.

The mask has the received image's Rows × Columns (row index = y, column index = x,
the same pixel grid as the detections; see :meth:`ImageDetections.full_mask`). A
mammogram has no frame of reference, so the SEG is a single frame without plane
positions, tied to its source image by the Source Image / Derivation references. It
carries a Plane Orientation (shared functional group), which OHIF needs to place it:
the source's ImageOrientationPatient, or ``[1, 0, 0, 0, 1, 0]`` (the image's own pixel
axes) for the usual MG image without one. One SEG per image, each in its own series
(OHIF offers only the last SEG of a series).

No findings, no SEG: :func:`build_seg` returns None when the union mask is empty.
highdicom drops empty frames and a SEG without frames tells a viewer nothing that
the CAD SR (111241 "without findings") does not say better.
"""

from __future__ import annotations

import logging
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from cascade.inference.detections import ImageDetections
from node.reports.common import (
    SERIES_NUMBERS,
    Provenance,
    add_provenance,
    character_set_of,
    laterality_of,
    resolve_instance,
    validate_pair,
)
from node.reports.tid1500 import series_description

__all__ = [
    "IDENTITY_ORIENTATION",
    "SEGMENT_COLOR_LAB",
    "SEGMENT_COLOR_RGB",
    "SEGMENT_LABEL",
    "build_seg",
    "image_orientation",
]

logger = logging.getLogger(__name__)

SEGMENT_LABEL = "Calcification"

#: The segment's Recommended Display CIELab Value: saturated red, sRGB (255, 0, 0), as
#: (L*, a*, b*) under D65. Red, not the GSPS's yellow: the SEG paints the calcification
#: pixels themselves, which are the brightest on a light grey breast, and yellow is nearly
#: as light as they are; red differs from them in hue *and* lightness. A SEG without one
#: is painted in the viewer's own colour (OHIF: its first label colour, with a "not found"
#: warning).
SEGMENT_COLOR_LAB = (53.24, 80.09, 67.20)
#: :data:`SEGMENT_COLOR_LAB` in sRGB, what a viewer should paint.
SEGMENT_COLOR_RGB = (255, 0, 0)

_BREAST_REGION = {
    "L": hd.sr.CodedConcept("80248007", "SCT", "Left breast"),
    "R": hd.sr.CodedConcept("73056007", "SCT", "Right breast"),
    "B": hd.sr.CodedConcept("63762007", "SCT", "Both breasts"),
    "": hd.sr.CodedConcept("76752008", "SCT", "Breast"),
}


#: ImageOrientationPatient of the SEG of an image that has none: the image's own pixel
#: axes, which is what OHIF / Cornerstone assume for such an image.
IDENTITY_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def image_orientation(source: Dataset) -> list[float]:
    """The ImageOrientationPatient a SEG of ``source`` carries (see ``docs/conformance.md``).

    The source's own ImageOrientationPatient when it has one, else
    :data:`IDENTITY_ORIENTATION`. Not one derived from PatientOrientation: OHIF compares
    the SEG's orientation with the one it assumes for the image ([1, 0, 0, 0, 1, 0] when
    the image has none) and transposes or flips the mask to match, or refuses it as
    oblique (MLO), so a derived orientation misplaces the overlay.
    """
    iop = getattr(source, "ImageOrientationPatient", None)
    if iop is not None and len(iop) == 6:
        return [float(v) for v in iop]
    return list(IDENTITY_ORIENTATION)


def build_seg(
    *,
    source: Dataset,
    detections: ImageDetections,
    provenance: Provenance,
    series_instance_uid: str,
    sop_instance_uid: str | None = None,
    instance_number: int | None = None,
    version: int = 1,
) -> Dataset | None:
    """Build a BINARY SEG with one segment "Calcification" for one MG image.

    Parameters
    ----------
    source : pydicom.Dataset
        The received MG image (For Presentation or For Processing).
    detections : ImageDetections
        Its detections; their masks (or discs of ``radius_px`` where a mask is missing)
        are united into one ``(Rows, Columns)`` boolean mask in the received grid.
    provenance : Provenance
        Algorithm and device identity (segment Algorithm Identification, equipment).
    series_instance_uid : str
        Series of the SEG.
    sop_instance_uid : str or None
        SOP Instance UID; None generates one.
    instance_number : int or None
        InstanceNumber; None means ``version``.
    version : int
        1 for the first result of the study, > 1 for later ones.

    Returns
    -------
    pydicom.Dataset or None
        The Segmentation, or None when the mask is empty (no findings).

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

    mask = detections.full_mask()
    if not mask.any():
        logger.info("no SEG for image %s: no findings", detections.sop_instance_uid)
        return None

    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.IndividualCalcification,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=provenance.algorithm_name,
            family=codes.DCM.ArtificialIntelligence,
            version=provenance.algorithm_version,
        ),
        # Laterality goes into the segment's anatomic region: dciodvfy refuses both
        # General Series Laterality and Frame Anatomy in a SEG.
        anatomic_regions=[_BREAST_REGION.get(laterality_of(source), _BREAST_REGION[""])],
        display_color=hd.color.CIELabColor(*SEGMENT_COLOR_LAB),
    )
    kwargs: dict[str, Any] = {}
    charset = character_set_of(source)
    if charset is not None:
        kwargs["specific_character_set"] = charset
    seg = hd.seg.Segmentation(
        source_images=[source],
        pixel_array=mask[None, :, :].astype(bool),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBERS["seg"],
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=provenance.manufacturer,
        manufacturer_model_name=provenance.model_name,
        software_versions=provenance.software_versions,
        device_serial_number=provenance.device_serial_number,
        series_description=series_description("seg", source),
        content_label="CALCNODE",
        content_description="calcnode microcalcifications"[:64],
        **kwargs,
    )
    # highdicom copies neither PatientOrientation (Type 2C) nor laterality.
    seg.PatientOrientation = list(getattr(source, "PatientOrientation", None) or [])
    # OHIF places a SEG frame by its Plane Orientation; without one it stops with
    # "Cannot read properties of undefined (reading 'ImageOrientationPatient')".
    orientation = Dataset()
    orientation.ImageOrientationPatient = image_orientation(source)
    seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence = [orientation]
    add_provenance(seg, provenance)
    logger.info(
        "SEG %s for image %s: %d detections, %d mask pixels",
        sop_uid,
        detections.sop_instance_uid,
        len(detections.detections),
        int(mask.sum()),
    )
    return seg
