"""TID 1500 Measurement Report in a Comprehensive SR (highdicom), one per study.

This is the object OHIF shows: one "Planar ROI Measurements" group per detection,
each with its own Tracking UID, a CIRCLE image region (centre and a point on the
circumference, in DICOM graphic coordinates: (0, 0) at the top-left CORNER of the
first pixel, so a detection at x = column, y = row (first pixel's CENTRE at (0, 0))
is centred at (x + 0.5, y + 0.5)), finding type "Individual Calcification", the
algorithm identification, Certainty of Finding (%) and the diameter (mm).

The observer is the device (Device UID = :attr:`Provenance.device_uid`); every
MG image of the study is listed as evidence and in the Image Library.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from cascade.inference.detector import ImageDetections
from node.reports.common import (
    SERIES_DESCRIPTIONS,
    SERIES_NUMBERS,
    Provenance,
    add_provenance,
    certainty_percent,
    character_set_of,
    resolve_instance,
    to_graphic_xy,
    validate_study,
)

__all__ = ["NO_FINDING", "PROCEDURE_REPORTED", "build_tid1500_sr"]

logger = logging.getLogger(__name__)

#: "Procedure reported" (CID 100): the only code PixelMed's CID 100 check accepted.
PROCEDURE_REPORTED = hd.sr.CodedConcept("363679005", "SCT", "Imaging procedure")

#: Finding type of the one measurement group of a study without findings.
NO_FINDING = hd.sr.CodedConcept("373572006", "SCT", "Clinical finding absent")


def _finding_group(
    source: Dataset,
    detections: ImageDetections,
    index: int,
    *,
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    det = detections.detections[index]
    cx, cy = to_graphic_xy(det.x, det.y)
    radius = max(float(det.radius_px), 0.5)
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.CIRCLE,
        graphic_data=np.array([[cx, cy], [cx + radius, cy]], dtype=float),
        source_image=hd.sr.SourceImageForRegion.from_source_image(source),
    )
    col_mm = float(detections.pixel_spacing_mm[1])
    measurements = [
        hd.sr.Measurement(
            name=codes.DCM.CertaintyOfFinding,
            value=round(certainty_percent(det), 3),
            unit=codes.UCUM.Percent,
            algorithm_id=algorithm,
        ),
        hd.sr.Measurement(
            name=codes.SCT.Diameter,
            value=round(2.0 * radius * col_mm, 4),
            unit=codes.UCUM.Millimeter,
            algorithm_id=algorithm,
        ),
    ]
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(), identifier=f"calcification {index + 1}"
        ),
        referenced_region=region,
        finding_type=codes.SCT.IndividualCalcification,
        algorithm_id=algorithm,
        measurements=measurements,
    )


def _negative_group(
    sources: list[Dataset], *, algorithm: hd.sr.AlgorithmIdentification
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """A measurement group that says the algorithm ran and found nothing (TID 1501)."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="no findings"),
        finding_type=NO_FINDING,
        algorithm_id=algorithm,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(s) for s in sources],
    )


def build_tid1500_sr(
    *,
    study: Sequence[tuple[Dataset, ImageDetections]],
    provenance: Provenance,
    series_instance_uid: str,
    sop_instance_uid: str | None = None,
    instance_number: int | None = None,
    version: int = 1,
) -> Dataset:
    """Build a TID 1500 Measurement Report (Comprehensive SR) of one study.

    Parameters
    ----------
    study : sequence of (pydicom.Dataset, ImageDetections)
        Every MG image with its detections (x = column, y = row, 0-based, first
        pixel's CENTRE at (0, 0), received grid).
    provenance : Provenance
        Algorithm and device identity; the device is the observer.
    series_instance_uid : str
        Series of the SR.
    sop_instance_uid : str or None
        SOP Instance UID; None generates one.
    instance_number : int or None
        InstanceNumber; None means ``version``.
    version : int
        1 for the first report, > 1 for later ones (a new instance each time).

    Returns
    -------
    pydicom.Dataset
        A Comprehensive SR (highdicom ``ComprehensiveSR``), VerificationFlag UNVERIFIED.

    Raises
    ------
    TypeError, ValueError
        Invalid arguments; the message names the argument.
    """
    pairs = validate_study(study)
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
        _finding_group(src, dets, i, algorithm=algorithm)
        for src, dets in pairs
        for i in range(len(dets.detections))
    ]
    sources = [src for src, _ in pairs]
    measurement_groups: (
        list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]
        | list[hd.sr.MeasurementsAndQualitativeEvaluations]
    ) = groups or [_negative_group(sources, algorithm=algorithm)]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=measurement_groups,
        referenced_images=sources,
    )
    kwargs: dict[str, Any] = {}
    charset = character_set_of(sources[0])
    if charset is not None:
        kwargs["specific_character_set"] = charset
    sr = hd.sr.ComprehensiveSR(
        evidence=sources,
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
        series_description=SERIES_DESCRIPTIONS["tid1500"],
        **kwargs,
    )
    add_provenance(sr, provenance)
    logger.info(
        "TID 1500 SR %s for study %s: %d images, %d findings",
        sop_uid,
        sr.StudyInstanceUID,
        len(pairs),
        len(groups),
    )
    return sr
