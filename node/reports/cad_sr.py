"""Mammography CAD SR (TID 4000), one per study, built from pydicom content items.

highdicom cannot build TID 4000 (it lacks by-reference ``SELECTED FROM``), so the
tree is assembled here item by item, in the order and with the relationships that
dsrdump, dciodvfy and PixelMed's DicomSRValidator accept without error (see
``docs/conformance.md``).

Coordinates: detections come in the project convention (x = column, y = row,
0-based, first pixel's CENTRE at (0, 0), received image grid); every SCOORD holds
DICOM graphic coordinates, (0, 0) at the top-left CORNER, via
:func:`node.reports.common.to_graphic_xy`.

Findings
--------
Detections of one image are grouped by single-linkage: two detections are linked
when their centres lie within ``cluster_distance_mm`` (default 5 mm). A connected
group of at least ``min_cluster_size`` (default 3) detections becomes a
"Calcification Cluster" finding, with its members as "Individual Calcification"
findings INFERRED FROM under it; every other detection is a top-level
"Individual Calcification" finding. The grouping is
:func:`cascade.evaluation.clusters.cluster_detections`, the one ``calcnode evaluate``
scores cluster sensitivity with.

Rendering intent
----------------
Without ``operating_point`` every finding is "Presentation Required" (the detector
already applied its threshold). With ``operating_point`` (on the fused score,
:attr:`cascade.inference.detector.Detection.score`), a detection at or above it is
"Presentation Required"; below it, "Presentation Optional" with CAD Operating
Point 1 (operating point 0 is the node's configured one, 1 the more sensitive
level that shows everything the detector kept). A cluster is "Presentation
Required" when at least one member is.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian, MammographyCADSRStorage

from cascade.evaluation.clusters import Cluster, cluster_detections
from cascade.inference.detections import Detection, ImageDetections
from node.reports.common import (
    SERIES_DESCRIPTIONS,
    SERIES_NUMBERS,
    Provenance,
    add_provenance,
    certainty_percent,
    character_set_of,
    circle_outline,
    code_item,
    copy_patient_and_study,
    evidence_sequence,
    laterality_of,
    now_date_time,
    resolve_instance,
    to_graphic_xy,
    validate_study,
)

__all__ = [
    "MAMMOGRAPHY_CAD_SR_SOP_CLASS_UID",
    "Cluster",
    "build_cad_sr",
    "cluster_detections",
]

logger = logging.getLogger(__name__)

MAMMOGRAPHY_CAD_SR_SOP_CLASS_UID = MammographyCADSRStorage

_LATERALITY_CODES = {
    "L": ("80248007", "SCT", "Left breast"),
    "R": ("73056007", "SCT", "Right breast"),
    "B": ("63762007", "SCT", "Both breasts"),
}
_CLUSTER = {
    False: ("129769006", "SCT", "Calcification Cluster"),
    True: ("F-01775", "SRT", "Calcification Cluster"),
}
_INDIVIDUAL = {
    False: ("129770007", "SCT", "Individual Calcification"),
    True: ("F-01776", "SRT", "Individual Calcification"),
}
_PRESENTATION_REQUIRED = (
    "111150",
    "DCM",
    "Presentation Required: Rendering device is expected to present",
)
_PRESENTATION_OPTIONAL = ("111151", "DCM", "Presentation Optional: Rendering device may present")


# --- content items --------------------------------------------------------------------------


def _concept(ds: Dataset, name: tuple[str, str, str]) -> None:
    ds.ConceptNameCodeSequence = DicomSequence([code_item(*name)])


def _container(rel: str | None, name: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    if rel is not None:
        item.RelationshipType = rel
    item.ValueType = "CONTAINER"
    _concept(item, name)
    item.ContinuityOfContent = "SEPARATE"
    item.ContentSequence = DicomSequence([])
    return item


def _code(rel: str, name: tuple[str, str, str], value: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.RelationshipType = rel
    item.ValueType = "CODE"
    _concept(item, name)
    item.ConceptCodeSequence = DicomSequence([code_item(*value)])
    return item


def _text(rel: str, name: tuple[str, str, str], value: str) -> Dataset:
    item = Dataset()
    item.RelationshipType = rel
    item.ValueType = "TEXT"
    _concept(item, name)
    item.TextValue = value
    return item


def _num(rel: str, name: tuple[str, str, str], value: float, unit: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.RelationshipType = rel
    item.ValueType = "NUM"
    _concept(item, name)
    measured = Dataset()
    measured.MeasurementUnitsCodeSequence = DicomSequence([code_item(*unit)])
    measured.NumericValue = _ds_str(value)
    item.MeasuredValueSequence = DicomSequence([measured])
    return item


def _ds_str(value: float) -> str:
    """Format a number for DS (≤ 16 characters)."""
    text = f"{value:.6g}"
    if len(text) > 16:  # pragma: no cover - only for absurd magnitudes
        text = f"{value:.8e}"
    return text


def _date(rel: str, name: tuple[str, str, str], value: str) -> Dataset:
    item = Dataset()
    item.RelationshipType = rel
    item.ValueType = "DATE"
    _concept(item, name)
    item.Date = value
    return item


def _time(rel: str, name: tuple[str, str, str], value: str) -> Dataset:
    item = Dataset()
    item.RelationshipType = rel
    item.ValueType = "TIME"
    _concept(item, name)
    item.Time = value
    return item


def _scoord(
    name: tuple[str, str, str], graphic_type: str, data: Sequence[float], image_ref: list[int]
) -> Dataset:
    item = Dataset()
    item.RelationshipType = "HAS PROPERTIES"
    item.ValueType = "SCOORD"
    _concept(item, name)
    item.GraphicType = graphic_type
    item.GraphicData = [float(v) for v in data]
    ref = Dataset()
    ref.RelationshipType = "SELECTED FROM"
    ref.ReferencedContentItemIdentifier = list(image_ref)
    item.ContentSequence = DicomSequence([ref])
    return item


def _by_ref(rel: str, target: list[int]) -> Dataset:
    item = Dataset()
    item.RelationshipType = rel
    item.ReferencedContentItemIdentifier = list(target)
    return item


def _algorithm(provenance: Provenance) -> list[Dataset]:
    """TID 4019 Algorithm Identification with HAS PROPERTIES (as TID 4000 needs)."""
    return [
        _text("HAS PROPERTIES", ("111001", "DCM", "Algorithm Name"), provenance.algorithm_name),
        _text(
            "HAS PROPERTIES", ("111003", "DCM", "Algorithm Version"), provenance.algorithm_version
        ),
    ]


def _library_entry(source: Dataset) -> Dataset:
    """TID 4020 CAD Image Library Entry: an IMAGE item (no concept name) with context."""
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "IMAGE"
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    item.ReferencedSOPSequence = DicomSequence([ref])
    ctx = "HAS ACQ CONTEXT"
    children: list[Dataset] = []
    laterality = laterality_of(source)
    if laterality in _LATERALITY_CODES:
        children.append(
            _code(ctx, ("111027", "DCM", "Image Laterality"), _LATERALITY_CODES[laterality])
        )
    view_seq = getattr(source, "ViewCodeSequence", None)
    if view_seq:
        view = view_seq[0]
        view_item = _code(
            ctx,
            ("111031", "DCM", "Image View"),
            (view.CodeValue, view.CodingSchemeDesignator, view.CodeMeaning),
        )
        modifiers = getattr(view, "ViewModifierCodeSequence", None) or []
        if modifiers:
            view_item.ContentSequence = DicomSequence(
                [
                    _code(
                        "HAS CONCEPT MOD",
                        ("111032", "DCM", "Image View Modifier"),
                        (m.CodeValue, m.CodingSchemeDesignator, m.CodeMeaning),
                    )
                    for m in modifiers
                ]
            )
        children.append(view_item)
    orientation = list(getattr(source, "PatientOrientation", None) or [])
    if len(orientation) == 2:
        children.append(
            _text(ctx, ("111044", "DCM", "Patient Orientation Row"), str(orientation[0]))
        )
        children.append(
            _text(ctx, ("111043", "DCM", "Patient Orientation Column"), str(orientation[1]))
        )
    study_date = str(getattr(source, "StudyDate", "") or "")
    study_time = str(getattr(source, "StudyTime", "") or "")
    content_date = str(
        getattr(source, "ContentDate", "") or getattr(source, "AcquisitionDate", "") or study_date
    )
    content_time = str(
        getattr(source, "ContentTime", "") or getattr(source, "AcquisitionTime", "") or study_time
    )
    if study_date:
        children.append(_date(ctx, ("111060", "DCM", "Study Date"), study_date))
    if study_time:
        children.append(_time(ctx, ("111061", "DCM", "Study Time"), study_time))
    if content_date:
        children.append(_date(ctx, ("111018", "DCM", "Content Date"), content_date))
    if content_time:
        children.append(_time(ctx, ("111019", "DCM", "Content Time"), content_time))
    spacing = getattr(source, "PixelSpacing", None) or getattr(source, "ImagerPixelSpacing", None)
    if spacing is not None and len(spacing) == 2:
        # PixelSpacing is (row spacing = vertical, column spacing = horizontal), in mm.
        um = ("um", "UCUM", "micrometer")
        children.append(
            _num(ctx, ("111026", "DCM", "Horizontal Pixel Spacing"), float(spacing[1]) * 1000, um)
        )
        children.append(
            _num(ctx, ("111066", "DCM", "Vertical Pixel Spacing"), float(spacing[0]) * 1000, um)
        )
    if children:
        item.ContentSequence = DicomSequence(children)
    return item


@dataclass(frozen=True)
class _Intent:
    required: bool

    def items(self) -> list[Dataset]:
        intent = _code(
            "HAS CONCEPT MOD",
            ("111056", "DCM", "Rendering Intent"),
            _PRESENTATION_REQUIRED if self.required else _PRESENTATION_OPTIONAL,
        )
        if not self.required:
            # CAD Operating Point hangs under the Rendering Intent it qualifies (PS3.17 O.2.2).
            intent.ContentSequence = DicomSequence(
                [
                    _num(
                        "HAS PROPERTIES",
                        ("111071", "DCM", "CAD Operating Point"),
                        1,
                        ("{1:n}", "UCUM", "range: 1:n"),
                    )
                ]
            )
        return [intent]


def _operating_points() -> list[Dataset]:
    """TID 4023 CAD Operating Points: 0 = the configured threshold, 1 = everything kept."""
    return [
        _num(
            "HAS PROPERTIES",
            ("111072", "DCM", "Maximum CAD Operating Point"),
            1,
            ("[arb'U]", "UCUM", "arbitrary unit"),
        ),
        _num(
            "HAS PROPERTIES",
            ("111092", "DCM", "Recommended CAD Operating Point"),
            0,
            ("{0:n}", "UCUM", "range:0:n"),
        ),
    ]


def _individual(
    rel: str,
    det: Detection,
    *,
    image_ref: list[int],
    provenance: Provenance,
    operating_point: float | None,
    legacy: bool,
) -> Dataset:
    item = _code(rel, ("111059", "DCM", "Single Image Finding"), _INDIVIDUAL[legacy])
    required = operating_point is None or det.score >= operating_point
    cx, cy = to_graphic_xy(det.x, det.y)
    item.ContentSequence = DicomSequence(
        [
            *_Intent(required).items(),
            *_algorithm(provenance),
            _num(
                "HAS PROPERTIES",
                ("111012", "DCM", "Certainty of Finding"),
                certainty_percent(det),
                ("%", "UCUM", "Percent"),
            ),
            _scoord(("111010", "DCM", "Center"), "POINT", [cx, cy], image_ref),
        ]
    )
    return item


def _cluster(
    members: list[Detection],
    *,
    image_ref: list[int],
    provenance: Provenance,
    operating_point: float | None,
    legacy: bool,
    bounds: tuple[int, int],
) -> Dataset:
    item = _code("CONTAINS", ("111059", "DCM", "Single Image Finding"), _CLUSTER[legacy])
    required = operating_point is None or any(d.score >= operating_point for d in members)
    centres = [to_graphic_xy(d.x, d.y) for d in members]
    cx = float(np.mean([c[0] for c in centres]))
    cy = float(np.mean([c[1] for c in centres]))
    outline = circle_outline(centres, [d.radius_px for d in members], bounds=bounds)
    best = max(members, key=certainty_percent)
    children = [
        *_Intent(required).items(),
        *_algorithm(provenance),
        _num(
            "HAS PROPERTIES",
            ("111012", "DCM", "Certainty of Finding"),
            certainty_percent(best),
            ("%", "UCUM", "Percent"),
        ),
        _scoord(("111010", "DCM", "Center"), "POINT", [cx, cy], image_ref),
        _scoord(("111041", "DCM", "Outline"), "POLYLINE", outline.ravel().tolist(), image_ref),
        _num(
            "HAS PROPERTIES",
            ("111038", "DCM", "Number of calcifications"),
            len(members),
            ("1", "UCUM", "no units"),
        ),
    ]
    children += [
        _individual(
            "INFERRED FROM",
            d,
            image_ref=image_ref,
            provenance=provenance,
            operating_point=operating_point,
            legacy=legacy,
        )
        for d in members
    ]
    item.ContentSequence = DicomSequence(children)
    return item


def build_cad_sr(
    *,
    study: Sequence[tuple[Dataset, ImageDetections]],
    provenance: Provenance,
    series_instance_uid: str,
    sop_instance_uid: str | None = None,
    instance_number: int | None = None,
    version: int = 1,
    operating_point: float | None = None,
    legacy_srt_codes: bool = False,
    cluster_distance_mm: float = 5.0,
    min_cluster_size: int = 3,
) -> Dataset:
    """Build the Mammography CAD SR (TID 4000) of one study.

    Parameters
    ----------
    study : sequence of (pydicom.Dataset, ImageDetections)
        Every MG image of the study with its detections (x = column, y = row, 0-based,
        first pixel's CENTRE at (0, 0), in that image's received grid). Images
        without detections still enter the Image Library.
    provenance : Provenance
        Algorithm and device identity.
    series_instance_uid : str
        Series of the SR (the caller keeps one per study and kind).
    sop_instance_uid : str or None
        SOP Instance UID; None generates a new one (each version is a new instance).
    instance_number : int or None
        InstanceNumber; None means ``version``.
    version : int
        1 for the first report of the study, > 1 when it got new images later.
    operating_point : float or None
        Threshold on :attr:`Detection.score` that splits Presentation Required from
        Presentation Optional findings; None makes every finding Presentation Required.
    legacy_srt_codes : bool
        Use SRT F-01775 / F-01776 instead of SCT 129769006 / 129770007 for the finding
        codes (for viewers that only know the old codes; dciodvfy then warns).
    cluster_distance_mm, min_cluster_size : float, int
        Single-linkage clustering, see :func:`cluster_detections`.

    Returns
    -------
    pydicom.Dataset
        A Mammography CAD SR with file meta (Explicit VR Little Endian), ready for
        ``dcmwrite``.

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
    if operating_point is not None and not (
        isinstance(operating_point, (int, float)) and math.isfinite(operating_point)
    ):
        raise ValueError(
            f"operating_point must be a finite number or None, got {operating_point!r}"
        )
    legacy = bool(legacy_srt_codes)

    first = pairs[0][0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(MAMMOGRAPHY_CAD_SR_SOP_CLASS_UID)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    charset = character_set_of(first)
    if charset is not None:
        ds.SpecificCharacterSet = charset
    content_date, content_time = now_date_time()
    ds.InstanceCreationDate, ds.InstanceCreationTime = content_date, content_time
    ds.SOPClassUID = MAMMOGRAPHY_CAD_SR_SOP_CLASS_UID
    ds.SOPInstanceUID = sop_uid
    copy_patient_and_study(first, ds)
    ds.Modality = "SR"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = SERIES_NUMBERS["cad_sr"]
    ds.SeriesDescription = SERIES_DESCRIPTIONS["cad_sr"]
    ds.ReferencedPerformedProcedureStepSequence = DicomSequence([])
    add_provenance(ds, provenance)
    ds.InstanceNumber = instance_number
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ContentDate, ds.ContentTime = content_date, content_time
    ds.PerformedProcedureCodeSequence = DicomSequence([])
    ds.CurrentRequestedProcedureEvidenceSequence = evidence_sequence([p[0] for p in pairs])
    template = Dataset()
    template.MappingResource = "DCMR"
    template.TemplateIdentifier = "4000"
    ds.ContentTemplateSequence = DicomSequence([template])

    ds.ValueType = "CONTAINER"
    _concept(ds, ("111036", "DCM", "Mammography CAD Report"))
    ds.ContinuityOfContent = "SEPARATE"

    language = _code(
        "HAS CONCEPT MOD",
        ("121049", "DCM", "Language of Content Item and Descendants"),
        ("en", "RFC5646", "English"),
    )
    library = _container("CONTAINS", ("111028", "DCM", "Image Library"))
    library.ContentSequence = DicomSequence([_library_entry(src) for src, _ in pairs])

    # ReferencedContentItemIdentifier is 1-based from the root: language is [1, 1],
    # the library [1, 2], its k-th image [1, 2, k + 1].
    findings: list[Dataset] = []
    n_clusters = n_individual = 0
    for k, (_src, dets) in enumerate(pairs):
        image_ref = [1, 2, k + 1]
        for group in cluster_detections(
            dets, cluster_distance_mm=cluster_distance_mm, min_cluster_size=min_cluster_size
        ):
            members = [dets.detections[i] for i in group.indices]
            if group.is_cluster:
                n_clusters += 1
                n_individual += len(members)
                finding = _cluster(
                    members,
                    image_ref=image_ref,
                    provenance=provenance,
                    operating_point=operating_point,
                    legacy=legacy,
                    bounds=(int(dets.columns), int(dets.rows)),
                )
            else:
                n_individual += 1
                finding = _individual(
                    "CONTAINS",
                    members[0],
                    image_ref=image_ref,
                    provenance=provenance,
                    operating_point=operating_point,
                    legacy=legacy,
                )
            impression = _container(
                "INFERRED FROM", ("111034", "DCM", "Individual Impression/Recommendation")
            )
            # The impression carries the rendering intent of its finding.
            # (without the CAD Operating Point, which TID 4003 does not have).
            intent = copy.deepcopy(finding.ContentSequence[0])
            if "ContentSequence" in intent:
                del intent.ContentSequence
            impression.ContentSequence = DicomSequence([intent, finding])
            findings.append(impression)

    has_findings = bool(findings)
    summary = _code(
        "CONTAINS",
        ("111017", "DCM", "CAD Processing and Findings Summary"),
        ("111242", "DCM", "All algorithms succeeded; with findings")
        if has_findings
        else ("111241", "DCM", "All algorithms succeeded; without findings"),
    )
    if findings:
        summary.ContentSequence = DicomSequence(findings)

    detections_summary = _code(
        "CONTAINS", ("111064", "DCM", "Summary of Detections"), ("111222", "DCM", "Succeeded")
    )
    successful = _container("INFERRED FROM", ("111063", "DCM", "Successful Detections"))
    performed = []
    for finding_code in (_CLUSTER[legacy], _INDIVIDUAL[legacy]):
        item = _code("CONTAINS", ("111022", "DCM", "Detection Performed"), finding_code)
        children = [*_algorithm(provenance)]
        children += [_by_ref("HAS PROPERTIES", [1, 2, k + 1]) for k in range(len(pairs))]
        if operating_point is not None:
            children += _operating_points()
        item.ContentSequence = DicomSequence(children)
        performed.append(item)
    successful.ContentSequence = DicomSequence(performed)
    detections_summary.ContentSequence = DicomSequence([successful])

    analyses_summary = _code(
        "CONTAINS", ("111065", "DCM", "Summary of Analyses"), ("111225", "DCM", "Not Attempted")
    )
    ds.ContentSequence = DicomSequence(
        [language, library, summary, detections_summary, analyses_summary]
    )
    logger.info(
        "CAD SR %s for study %s: %d images, %d clusters, %d calcifications",
        sop_uid,
        ds.StudyInstanceUID,
        len(pairs),
        n_clusters,
        n_individual,
    )
    return ds
