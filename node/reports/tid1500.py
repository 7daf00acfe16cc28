"""TID 1500 Measurement Report in a Comprehensive SR (highdicom), one per image.

This is the object OHIF shows, so its shape follows what OHIF 3.12 can navigate and
track (``docs/conformance.md``, "Viewer conventions"):

* **One report per image, each in its own series.** OHIF's SR viewport shows the
  series of a report's first measurement only and reads only the last SR instance of
  a series; every MG view is its own series, so a study-wide report would hide all
  views but one.
* **One measurement group per finding of the CAD SR** (the same single-linkage
  grouping, :func:`node.reports.cad_sr.cluster_detections`): a Calcification Cluster is
  one CIRCLE around its members; an isolated calcification is one POINT. What a reader
  acts on is the cluster, so members get no group (and no label) of their own.
* **Cornerstone tracking identifiers.** The Tracking Identifier (112039) text is
  ``Cornerstone3DTools@^0.1.0:CircleROI`` (clusters) or ``…:ArrowAnnotate`` (isolated
  calcifications), the identifiers OHIF writes itself; with them OHIF offers "Track
  measurements?" and hydrates every group into its Measurements panel. The DICOM
  meaning stays in the Finding (121071), the Tracking UID (112040) and the NUMs.
* **The region sits under the first NUM**: each finding is a TID 1501 measurement
  group whose first NUM (Certainty of Finding) is INFERRED FROM its "Source" SCOORD
  (TID 320), SELECTED FROM the image. OHIF's hydration reads the geometry from the
  first NUM only; TID 1410 (a group-level Image Region) forbids a SCOORD under its
  NUMs.
* **A short label** in a Comment (121106) TEXT item, e.g. ``Cluster of 9
  calcifications, 96 %``: OHIF's label of a tracked measurement.

Coordinates: detections are x = column, y = row, 0-based, first pixel's CENTRE at
(0, 0), in the received image's grid; SCOORDs hold DICOM graphic coordinates, (0, 0)
at the top-left CORNER of the first pixel (:func:`node.reports.common.to_graphic_xy`).

The observer is the device (Device UID = :attr:`Provenance.device_uid`); the image is
the report's evidence and its Image Library. An image without findings gets no report
(OHIF cannot open a report without geometry); the CAD SR says "without findings".
"""

from __future__ import annotations

import logging
import math
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from cascade.inference.detections import Detection, ImageDetections
from node.reports.cad_sr import cluster_detections
from node.reports.common import (
    SERIES_DESCRIPTIONS,
    SERIES_NUMBERS,
    Provenance,
    add_provenance,
    certainty_percent,
    character_set_of,
    laterality_of,
    resolve_instance,
    to_graphic_xy,
    validate_pair,
)

__all__ = [
    "ARROW_TRACKING_IDENTIFIER",
    "CIRCLE_TRACKING_IDENTIFIER",
    "PROCEDURE_REPORTED",
    "build_tid1500_sr",
    "cluster_label",
    "series_description",
    "view_label",
]

logger = logging.getLogger(__name__)

#: "Procedure reported" (CID 100): the only code PixelMed's CID 100 check accepted.
PROCEDURE_REPORTED = hd.sr.CodedConcept("363679005", "SCT", "Imaging procedure")

#: Tracking Identifier text of a cluster / an isolated calcification: the Cornerstone3D
#: tool OHIF hydrates the group into (a circle; an arrow with its label as text).
CIRCLE_TRACKING_IDENTIFIER = "Cornerstone3DTools@^0.1.0:CircleROI"
ARROW_TRACKING_IDENTIFIER = "Cornerstone3DTools@^0.1.0:ArrowAnnotate"

_CLUSTER = hd.sr.CodedConcept("129769006", "SCT", "Calcification Cluster")
_COMMENT = hd.sr.CodedConcept("121106", "DCM", "Comment")

#: Margin around a cluster's members inside its circle (mm), so the ring does not cut
#: through the outermost calcification.
CLUSTER_MARGIN_MM = 0.5


def view_label(source: Dataset) -> str:
    """Laterality and view of an image, e.g. ``"L CC"`` (``""`` parts left out)."""
    view = str(getattr(source, "ViewPosition", "") or "").strip().upper()
    if not view:
        seq = getattr(source, "ViewCodeSequence", None) or []
        meaning = str(getattr(seq[0], "CodeMeaning", "") if seq else "").lower()
        view = {"cranio-caudal": "CC", "medio-lateral oblique": "MLO"}.get(meaning, "")
    return " ".join(p for p in (laterality_of(source), view) if p)[:16]


def series_description(kind: str, source: Dataset) -> str:
    """SeriesDescription of a per-image object: the kind's, with the image's view.

    ``"calcnode measurements SR (not for clinical use)"`` becomes
    ``"L CC calcnode measurements SR (not for clinical use)"``: the view first, because
    a viewer's series list cuts long descriptions short.
    """
    base = SERIES_DESCRIPTIONS[kind]
    label = view_label(source)
    return f"{label} {base}"[:64] if label else base


def cluster_label(count: int, certainty: float) -> str:
    """The short label of a finding, e.g. ``"Cluster of 9 calcifications, 96 %"``.

    ASCII only: the report keeps the source's SpecificCharacterSet, which may not
    hold "µ" or "·".
    """
    if count > 1:
        return f"Cluster of {count} calcifications, {certainty:.0f} %"
    return f"Calcification, {certainty:.0f} %"


def _circle(
    members: list[Detection], *, spacing_mm: float, columns: int, rows: int
) -> tuple[np.ndarray, float]:
    """CIRCLE graphic data (centre, a point on the circle) around ``members``; radius px."""
    centres = np.array([to_graphic_xy(d.x, d.y) for d in members], dtype=float)
    cx, cy = (float(v) for v in centres.mean(axis=0))
    reach = max(
        math.hypot(x - cx, y - cy) + max(float(d.radius_px), 1.0)
        for (x, y), d in zip(centres, members, strict=True)
    )
    radius = reach + CLUSTER_MARGIN_MM / spacing_mm
    # The point on the circle must lie inside the image: pick a direction with room,
    # else shrink the circle to the room there is.
    room = {(1, 0): columns - cx, (-1, 0): cx, (0, 1): rows - cy, (0, -1): cy}
    direction = next((d for d, r in room.items() if r >= radius), None)
    if direction is None:
        direction = max(room, key=lambda d: room[d])
        radius = max(room[direction], 0.5)
    dx, dy = direction
    return np.array([[cx, cy], [cx + dx * radius, cy + dy * radius]], dtype=float), radius


def _finding_group(
    source: Dataset,
    detections: ImageDetections,
    members: list[Detection],
    *,
    is_cluster: bool,
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """One finding as a TID 1501 group whose first NUM holds the region (TID 320).

    Not TID 1410 (group-level Image Region): TID 1419 forbids a Source of Measurement
    under its NUMs, and OHIF hydrates only from the first NUM's SCOORD.
    """
    best = max(members, key=certainty_percent)
    certainty = round(certainty_percent(best), 3)
    col_mm = float(detections.pixel_spacing_mm[1])
    if is_cluster:
        graphic_type = hd.sr.GraphicTypeValues.CIRCLE
        data, _ = _circle(
            members, spacing_mm=col_mm, columns=detections.columns, rows=detections.rows
        )
        finding = _CLUSTER
        identifier = CIRCLE_TRACKING_IDENTIFIER
    else:
        graphic_type = hd.sr.GraphicTypeValues.POINT
        data = np.array([to_graphic_xy(best.x, best.y)], dtype=float)
        finding = codes.SCT.IndividualCalcification
        identifier = ARROW_TRACKING_IDENTIFIER
    region = hd.sr.CoordinatesForMeasurement(
        graphic_type=graphic_type,
        graphic_data=data,
        source_image=hd.sr.SourceImageForRegion.from_source_image(source),
    )
    # No algorithm under the NUMs (it is the group's): OHIF reads a NUM's children as
    # its geometry and skips a NUM whose first child is anything else.
    measurements = [
        hd.sr.Measurement(
            name=codes.DCM.CertaintyOfFinding,
            value=certainty,
            unit=codes.UCUM.Percent,
            referenced_coordinates=[region],
        )
    ]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=identifier),
        finding_type=finding,
        algorithm_id=algorithm,
        measurements=measurements,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )
    # The label: a Comment (121106, DCM) TEXT, where OHIF reads a tracked measurement's
    # label from (and the arrow's text). TID 1501 is extensible; PixelMed reports the
    # item as not in the template (docs/conformance.md, "Viewer conventions").
    group[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=_COMMENT,
            value=cluster_label(len(members), certainty),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    return group


def build_tid1500_sr(
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
) -> Dataset | None:
    """Build the TID 1500 Measurement Report (Comprehensive SR) of one MG image.

    Parameters
    ----------
    source : pydicom.Dataset
        The received MG image (its header is enough).
    detections : ImageDetections
        Its detections (x = column, y = row, 0-based, first pixel's CENTRE at (0, 0),
        received grid).
    provenance : Provenance
        Algorithm and device identity; the device is the observer.
    series_instance_uid : str
        Series of the SR: one per image (``node.identity.series_uid_for``).
    sop_instance_uid : str or None
        SOP Instance UID; None generates one.
    instance_number : int or None
        InstanceNumber; None means ``version``.
    version : int
        1 for the first report, > 1 for later ones (a new instance each time).
    cluster_distance_mm, min_cluster_size : float, int
        The CAD SR's grouping (:func:`node.reports.cad_sr.cluster_detections`).

    Returns
    -------
    pydicom.Dataset or None
        A Comprehensive SR (highdicom ``ComprehensiveSR``), VerificationFlag UNVERIFIED:
        one measurement group per cluster (CIRCLE) and per isolated calcification
        (POINT). None for an image without findings: a report without geometry stops
        OHIF's viewer ("Something went wrong"), and the CAD SR already says 111241
        "without findings".

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

    algorithm = hd.sr.AlgorithmIdentification(
        name=provenance.algorithm_name, version=provenance.algorithm_version
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=provenance.device_uid,
            name=provenance.algorithm_name,
            manufacturer_name=provenance.manufacturer,
            model_name=provenance.model_name,
            serial_number=provenance.device_serial_number,
        ),
    )
    groups = [
        _finding_group(
            source,
            detections,
            [detections.detections[i] for i in group.indices],
            is_cluster=group.is_cluster,
            algorithm=algorithm,
        )
        for group in cluster_detections(
            detections,
            cluster_distance_mm=cluster_distance_mm,
            min_cluster_size=min_cluster_size,
        )
    ]
    if not groups:
        logger.info("no TID 1500 SR for image %s: no findings", detections.sop_instance_uid)
        return None
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=groups,
        referenced_images=[source],
    )
    kwargs: dict[str, Any] = {}
    charset = character_set_of(source)
    if charset is not None:
        kwargs["specific_character_set"] = charset
    sr = hd.sr.ComprehensiveSR(
        evidence=[source],
        content=report,
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBERS["tid1500"],
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=provenance.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=provenance.institution_name,
        series_description=series_description("tid1500", source),
        **kwargs,
    )
    add_provenance(sr, provenance)
    logger.info(
        "TID 1500 SR %s for image %s: %d findings",
        sop_uid,
        detections.sop_instance_uid,
        len(groups),
    )
    return sr
