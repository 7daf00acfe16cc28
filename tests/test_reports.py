"""The DICOM result objects: content, coordinates, round trips and argument validation.

The validator runs (dciodvfy, dsrdump, PixelMed) are in test_report_validators.py.
Coordinates: detections use x = column, y = row, 0-based, first pixel's CENTRE at
(0, 0); DICOM graphic data put (0, 0) at the first pixel's top-left CORNER.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from cascade.inference.detector import Detection, ImageDetections
from node.reports import (
    SERIES_DESCRIPTIONS,
    Provenance,
    build_cad_sr,
    build_gsps,
    build_seg,
    build_tid1500_sr,
    cluster_detections,
    to_graphic_xy,
)
from node.reports.gsps import presentation_lut_shape
from tests.factories import make_mg_dataset

PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
)


@pytest.fixture(scope="module")
def provenance() -> Provenance:
    return Provenance(
        algorithm_name="calcnode uC cascade",
        algorithm_version="0.1.0",
        model_version="phantom-2024-01",
        device_uid="1.2.826.0.1.3680043.8.498.1234567890",
    )


def image_detections(
    ds: Dataset, points: list[tuple[float, float, float]], *, radius: float = 2.0
) -> ImageDetections:
    """Detections at (x = column, y = row, score) on ``ds``'s grid; fpr_score = min(score, 1)."""
    spacing = tuple(float(v) for v in ds.PixelSpacing)
    return ImageDetections(
        sop_instance_uid=str(ds.SOPInstanceUID),
        path="unused.dcm",
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        pixel_spacing_mm=(spacing[0], spacing[1]),
        detections=tuple(
            Detection(x=x, y=y, score=s, asn_score=1.0, fpr_score=min(s, 1.0), radius_px=radius)
            for x, y, s in points
        ),
    )


def roundtrip(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def walk(
    items: list[Dataset], prefix: tuple[int, ...] = (1,)
) -> Iterator[tuple[tuple[int, ...], Dataset]]:
    """Yield (1-based identifier from the root, content item) for every item below a node."""
    for i, item in enumerate(items, start=1):
        path = (*prefix, i)
        yield path, item
        yield from walk(list(getattr(item, "ContentSequence", [])), path)


def concept(item: Dataset) -> str:
    seq = getattr(item, "ConceptNameCodeSequence", None)
    return str(seq[0].CodeValue) if seq else ""


def value_code(item: Dataset) -> str:
    return str(item.ConceptCodeSequence[0].CodeValue)


def items_named(sr: Dataset, code: str) -> list[tuple[tuple[int, ...], Dataset]]:
    return [(p, it) for p, it in walk(list(sr.ContentSequence)) if concept(it) == code]


# --- coordinates ------------------------------------------------------------------------------


def test_to_graphic_xy_moves_pixel_centre_to_corner_origin() -> None:
    assert to_graphic_xy(10, 20) == (10.5, 20.5)
    assert to_graphic_xy(0.0, 0.0) == (0.5, 0.5)


def test_to_graphic_xy_rejects_non_finite() -> None:
    with pytest.raises(ValueError, match="finite"):
        to_graphic_xy(float("nan"), 1.0)


def test_cad_sr_center_of_detection_at_10_20_is_10_5_20_5(provenance: Provenance) -> None:
    mg = make_mg_dataset()
    sr = roundtrip(
        build_cad_sr(
            study=[(mg, image_detections(mg, [(10, 20, 0.9)]))],
            provenance=provenance,
            series_instance_uid=generate_uid(),
        )
    )
    centres = items_named(sr, "111010")
    assert len(centres) == 1
    item = centres[0][1]
    assert item.GraphicType == "POINT"
    assert [float(v) for v in item.GraphicData] == [10.5, 20.5]


def test_gsps_circle_of_detection_at_10_20_is_centred_at_10_5_20_5(
    provenance: Provenance,
) -> None:
    mg = make_mg_dataset()
    pr = roundtrip(
        build_gsps(
            source=mg,
            detections=image_detections(mg, [(10, 20, 0.9)], radius=2.0),
            provenance=provenance,
            series_instance_uid=generate_uid(),
        )
    )
    (circle,) = pr.GraphicAnnotationSequence[0].GraphicObjectSequence
    assert circle.GraphicType == "CIRCLE"
    assert circle.GraphicAnnotationUnits == "PIXEL"
    data = [float(v) for v in circle.GraphicData]
    assert data[:2] == [10.5, 20.5]
    assert data[3] == 20.5 and data[2] > 10.5 + 2.0  # ring outside the 2-px speck


def test_tid1500_point_of_detection_at_10_20_is_at_10_5_20_5(
    provenance: Provenance,
) -> None:
    mg = make_mg_dataset()
    sr = build_tid1500_sr(
        source=mg,
        detections=image_detections(mg, [(10, 20, 0.9)], radius=3.0),
        provenance=provenance,
        series_instance_uid=generate_uid(),
    )
    assert sr is not None
    scoords = [
        it for _, it in walk(list(roundtrip(sr).ContentSequence)) if it.ValueType == "SCOORD"
    ]
    assert len(scoords) == 1
    assert scoords[0].GraphicType == "POINT"
    assert [float(v) for v in scoords[0].GraphicData] == [10.5, 20.5]


def test_tid1500_cluster_is_one_circle_around_its_members(provenance: Provenance) -> None:
    mg = make_mg_dataset()  # 0.1 mm pixels: the three lie within 1 mm
    pts = [(40.0, 60.0, 0.9), (46.0, 60.0, 0.8), (43.0, 66.0, 0.7)]
    sr = build_tid1500_sr(
        source=mg,
        detections=image_detections(mg, pts, radius=2.0),
        provenance=provenance,
        series_instance_uid=generate_uid(),
    )
    assert sr is not None
    scoords = [
        it for _, it in walk(list(roundtrip(sr).ContentSequence)) if it.ValueType == "SCOORD"
    ]
    assert [s.GraphicType for s in scoords] == ["CIRCLE"]
    cx, cy, px, py = (float(v) for v in scoords[0].GraphicData)
    assert (cx, cy) == pytest.approx((43.5, 62.5))
    radius = ((px - cx) ** 2 + (py - cy) ** 2) ** 0.5
    for x, y, _ in pts:  # every member's disc inside, with the 0.5-mm margin
        assert ((x + 0.5 - cx) ** 2 + (y + 0.5 - cy) ** 2) ** 0.5 + 2.0 + 5.0 <= radius + 1e-6


# --- common attributes of every kind ---------------------------------------------------------


def _build(kind: str, mg: Dataset, dets: ImageDetections, provenance: Provenance, **kw) -> Dataset:
    series = generate_uid()
    if kind == "cad_sr":
        return build_cad_sr(
            study=[(mg, dets)], provenance=provenance, series_instance_uid=series, **kw
        )
    if kind == "tid1500":
        sr = build_tid1500_sr(
            source=mg, detections=dets, provenance=provenance, series_instance_uid=series, **kw
        )
        assert sr is not None
        return sr
    if kind == "seg":
        seg = build_seg(
            source=mg, detections=dets, provenance=provenance, series_instance_uid=series, **kw
        )
        assert seg is not None
        return seg
    return build_gsps(
        source=mg, detections=dets, provenance=provenance, series_instance_uid=series, **kw
    )


KINDS = ("cad_sr", "tid1500", "seg", "gsps")
MODALITY = {"cad_sr": "SR", "tid1500": "SR", "seg": "SEG", "gsps": "PR"}
SOP_CLASS = {
    "cad_sr": "1.2.840.10008.5.1.4.1.1.88.50",
    "tid1500": "1.2.840.10008.5.1.4.1.1.88.33",
    "seg": "1.2.840.10008.5.1.4.1.1.66.4",
    "gsps": "1.2.840.10008.5.1.4.1.1.11.1",
}


@pytest.mark.parametrize("kind", KINDS)
def test_result_survives_bytes_roundtrip_in_the_source_study(
    kind: str, provenance: Provenance
) -> None:
    mg = make_mg_dataset(patient_id="PHANTOM-0042")
    mg.AccessionNumber = "A123"
    built = _build(kind, mg, image_detections(mg, [(30, 40, 0.8)]), provenance)
    back = roundtrip(built)
    assert back.SOPClassUID == SOP_CLASS[kind]
    assert back.SOPInstanceUID == built.SOPInstanceUID
    assert back.Modality == MODALITY[kind]
    for keyword in PATIENT_STUDY:
        assert str(back.get(keyword, "")) == str(mg.get(keyword, "")), keyword
    assert back.SeriesInstanceUID != mg.SeriesInstanceUID
    # Per-image objects name their view first (a series list cuts descriptions short).
    view = "L CC " if kind in ("tid1500", "seg") else ""
    assert back.SeriesDescription == view + SERIES_DESCRIPTIONS[kind]
    assert "not for clinical use" in back.SeriesDescription
    assert back.Manufacturer == provenance.manufacturer
    assert back.ManufacturerModelName == provenance.model_name
    assert back.SoftwareVersions == "0.1.0 model phantom-2024-01"
    assert back.DeviceUID == provenance.device_uid
    equipment = back.ContributingEquipmentSequence[0]
    assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert equipment.DeviceUID == provenance.device_uid
    assert back.InstanceNumber == 1


def test_cad_sr_is_unverified_complete_and_lists_every_image_as_evidence(
    provenance: Provenance,
) -> None:
    study_uid = generate_uid()
    left = make_mg_dataset(study_uid=study_uid, laterality="L")
    right = make_mg_dataset(study_uid=study_uid, laterality="R", view="MLO")
    sr = roundtrip(
        build_cad_sr(
            study=[
                (left, image_detections(left, [(30, 40, 0.8)])),
                (right, image_detections(right, [])),
            ],
            provenance=provenance,
            series_instance_uid=generate_uid(),
        )
    )
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.CompletionFlag == "COMPLETE"
    listed = {
        ref.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert listed == {left.SOPInstanceUID, right.SOPInstanceUID}


def test_tid1500_sr_is_unverified_complete_and_lists_its_image_as_evidence(
    provenance: Provenance,
) -> None:
    mg = make_mg_dataset(laterality="R", view="MLO")
    sr = build_tid1500_sr(
        source=mg,
        detections=image_detections(mg, [(30, 40, 0.8)]),
        provenance=provenance,
        series_instance_uid=generate_uid(),
    )
    assert sr is not None
    sr = roundtrip(sr)
    assert (sr.VerificationFlag, sr.CompletionFlag) == ("UNVERIFIED", "COMPLETE")
    listed = [
        ref.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    ]
    assert listed == [mg.SOPInstanceUID]
    assert sr.SeriesDescription.startswith("R MLO calcnode measurements SR")


@pytest.mark.parametrize("kind", KINDS)
def test_version_two_is_a_new_instance_numbered_two(kind: str, provenance: Provenance) -> None:
    mg = make_mg_dataset()
    dets = image_detections(mg, [(30, 40, 0.8)])
    first = _build(kind, mg, dets, provenance)
    second = _build(kind, mg, dets, provenance, version=2)
    assert second.InstanceNumber == 2
    assert second.SOPInstanceUID != first.SOPInstanceUID


# --- CAD SR content --------------------------------------------------------------------------


def test_cad_sr_without_findings_says_without_findings(provenance: Provenance) -> None:
    mg = make_mg_dataset()
    sr = roundtrip(
        build_cad_sr(
            study=[(mg, image_detections(mg, []))],
            provenance=provenance,
            series_instance_uid=generate_uid(),
        )
    )
    assert [concept(it) for it in sr.ContentSequence] == [
        "121049",
        "111028",
        "111017",
        "111064",
        "111065",
    ]
    assert value_code(sr.ContentSequence[2]) == "111241"
    assert "ContentSequence" not in sr.ContentSequence[2]
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "4000"
    assert sr.ContentTemplateSequence[0].MappingResource == "DCMR"


def test_cad_sr_groups_three_close_calcifications_into_a_cluster(provenance: Provenance) -> None:
    mg = make_mg_dataset(pixel_spacing=(0.1, 0.1))
    # Three within 1 mm of each other, one 10 mm away: one cluster + one individual.
    dets = image_detections(mg, [(50, 50, 0.9), (55, 52, 0.8), (52, 58, 0.7), (150, 150, 0.95)])
    sr = roundtrip(
        build_cad_sr(study=[(mg, dets)], provenance=provenance, series_instance_uid=generate_uid())
    )
    summary = sr.ContentSequence[2]
    assert value_code(summary) == "111242"
    findings = [imp.ContentSequence[1] for imp in summary.ContentSequence]
    assert [value_code(f) for f in findings] == ["129769006", "129770007"]
    cluster = findings[0]
    (count,) = [it for it in cluster.ContentSequence if concept(it) == "111038"]
    assert float(count.MeasuredValueSequence[0].NumericValue) == 3
    members = [it for it in cluster.ContentSequence if concept(it) == "111059"]
    assert len(members) == 3
    assert all(m.RelationshipType == "INFERRED FROM" for m in members)
    (outline,) = [it for it in cluster.ContentSequence if concept(it) == "111041"]
    assert outline.GraphicType == "POLYLINE"
    data = np.asarray(outline.GraphicData, dtype=float).reshape(-1, 2)
    assert np.allclose(data[0], data[-1])  # closed
    assert data[:, 0].min() < 50.5 and data[:, 0].max() > 55.5


def test_cad_sr_selected_from_references_resolve_to_the_right_library_image(
    provenance: Provenance,
) -> None:
    study_uid = generate_uid()
    left = make_mg_dataset(study_uid=study_uid, laterality="L")
    right = make_mg_dataset(study_uid=study_uid, laterality="R", photometric="MONOCHROME1")
    sr = roundtrip(
        build_cad_sr(
            study=[
                (left, image_detections(left, [])),
                (right, image_detections(right, [(20, 30, 0.9)])),
            ],
            provenance=provenance,
            series_instance_uid=generate_uid(),
        )
    )
    by_path = dict(walk(list(sr.ContentSequence)))
    ((_, centre),) = items_named(sr, "111010")
    (ref,) = centre.ContentSequence
    assert ref.RelationshipType == "SELECTED FROM"
    assert "ValueType" not in ref
    target = by_path[tuple(int(v) for v in ref.ReferencedContentItemIdentifier)]
    assert target.ValueType == "IMAGE"
    assert target.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == right.SOPInstanceUID
    laterality = [it for it in target.ContentSequence if concept(it) == "111027"]
    assert value_code(laterality[0]) == "73056007"  # Right breast


def test_cad_sr_library_records_pixel_spacing_in_micrometres(provenance: Provenance) -> None:
    mg = make_mg_dataset(pixel_spacing=(0.05, 0.05))
    sr = build_cad_sr(
        study=[(mg, image_detections(mg, []))],
        provenance=provenance,
        series_instance_uid=generate_uid(),
    )
    ((_, horizontal),) = items_named(sr, "111026")
    assert float(horizontal.MeasuredValueSequence[0].NumericValue) == pytest.approx(50.0)


def test_cad_sr_marks_findings_below_operating_point_presentation_optional(
    provenance: Provenance,
) -> None:
    mg = make_mg_dataset()
    dets = image_detections(mg, [(20, 20, 0.9), (150, 200, 0.3)])
    sr = build_cad_sr(
        study=[(mg, dets)],
        provenance=provenance,
        series_instance_uid=generate_uid(),
        operating_point=0.5,
    )
    intents = {}
    for imp in sr.ContentSequence[2].ContentSequence:
        finding = imp.ContentSequence[1]
        (centre,) = [it for it in finding.ContentSequence if concept(it) == "111010"]
        intent = finding.ContentSequence[0]
        assert concept(intent) == "111056"
        intents[float(centre.GraphicData[0])] = intent
    assert value_code(intents[20.5]) == "111150"
    assert "ContentSequence" not in intents[20.5]
    assert value_code(intents[150.5]) == "111151"
    (point,) = intents[150.5].ContentSequence
    assert concept(point) == "111071"
    assert float(point.MeasuredValueSequence[0].NumericValue) == 1
    assert len(items_named(sr, "111072")) == 2  # Maximum CAD Operating Point per detection kind


def test_cad_sr_certainty_is_fpr_probability_in_percent(provenance: Provenance) -> None:
    mg = make_mg_dataset()
    sr = build_cad_sr(
        study=[(mg, image_detections(mg, [(20, 20, 0.87)]))],
        provenance=provenance,
        series_instance_uid=generate_uid(),
    )
    ((_, certainty),) = items_named(sr, "111012")
    assert float(certainty.MeasuredValueSequence[0].NumericValue) == pytest.approx(87.0)
    assert certainty.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "%"


def test_cad_sr_legacy_switch_uses_srt_finding_codes(provenance: Provenance) -> None:
    mg = make_mg_dataset()
    sr = build_cad_sr(
        study=[(mg, image_detections(mg, [(20, 20, 0.9)]))],
        provenance=provenance,
        series_instance_uid=generate_uid(),
        legacy_srt_codes=True,
    )
    finding = sr.ContentSequence[2].ContentSequence[0].ContentSequence[1]
    assert finding.ConceptCodeSequence[0].CodeValue == "F-01776"
    assert finding.ConceptCodeSequence[0].CodingSchemeDesignator == "SRT"


# --- clustering --------------------------------------------------------------------------------


def _dets_at(points_px: list[tuple[float, float]], spacing_mm: float) -> ImageDetections:
    return ImageDetections(
        sop_instance_uid="1.2.3",
        path="x",
        rows=1000,
        columns=1000,
        pixel_spacing_mm=(spacing_mm, spacing_mm),
        detections=tuple(
            Detection(x=x, y=y, score=0.9, asn_score=1.0, fpr_score=0.9, radius_px=2.0)
            for x, y in points_px
        ),
    )


def test_clustering_distance_is_in_millimetres_not_pixels() -> None:
    # A chain with 40-px gaps: 4 mm at 100 µm (linked), 8 mm at 200 µm (not linked).
    points = [(100.0, 100.0), (140.0, 100.0), (180.0, 100.0)]
    linked = cluster_detections(_dets_at(points, 0.1), cluster_distance_mm=5.0)
    apart = cluster_detections(_dets_at(points, 0.2), cluster_distance_mm=5.0)
    assert [(c.indices, c.is_cluster) for c in linked] == [((0, 1, 2), True)]
    assert [(c.indices, c.is_cluster) for c in apart] == [
        ((0,), False),
        ((1,), False),
        ((2,), False),
    ]


def test_clustering_keeps_pairs_as_individual_calcifications() -> None:
    groups = cluster_detections(_dets_at([(10, 10), (12, 10)], 0.1), min_cluster_size=3)
    assert [(g.indices, g.is_cluster) for g in groups] == [((0,), False), ((1,), False)]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"cluster_distance_mm": 0.0}, ValueError, "cluster_distance_mm"),
        ({"min_cluster_size": 1}, ValueError, "min_cluster_size"),
        ({"min_cluster_size": 2.5}, TypeError, "min_cluster_size"),
    ],
)
def test_clustering_rejects_bad_parameters(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        cluster_detections(_dets_at([(1, 1)], 0.1), **kwargs)


# --- TID 1500 -------------------------------------------------------------------------------


def test_tid1500_gives_each_finding_its_own_tracking_uid_and_device_observer(
    provenance: Provenance,
) -> None:
    mg = make_mg_dataset()
    sr = build_tid1500_sr(
        source=mg,
        detections=image_detections(mg, [(20, 20, 0.9), (60, 80, 0.7), (100, 30, 0.6)]),
        provenance=provenance,
        series_instance_uid=generate_uid(),
    )
    assert sr is not None
    items = [it for _, it in walk(list(roundtrip(sr).ContentSequence))]
    tracking = [str(it.UID) for it in items if concept(it) == "112040"]
    assert len(tracking) == 3 and len(set(tracking)) == 3
    device_uids = [str(it.UID) for it in items if concept(it) == "121012"]
    assert device_uids == [provenance.device_uid]
    procedure = [it for it in items if concept(it) == "121058"]
    assert value_code(procedure[0]) == "363679005"
    finding_types = [value_code(it) for it in items if concept(it) == "121071"]
    assert finding_types == ["129770007"] * 3


def test_tid1500_is_skipped_without_findings(provenance: Provenance) -> None:
    # OHIF cannot open a report without geometry; the CAD SR says "without findings".
    mg = make_mg_dataset()
    sr = build_tid1500_sr(
        source=mg,
        detections=image_detections(mg, []),
        provenance=provenance,
        series_instance_uid=generate_uid(),
    )
    assert sr is None


def test_tid1500_follows_ohif_conventions(provenance: Provenance) -> None:
    # A cluster of three and one isolated calcification: two groups, each with a
    # Cornerstone tracking identifier, a label, and the region under the first NUM.
    mg = make_mg_dataset()
    pts = [(40.0, 60.0, 0.96), (46.0, 60.0, 0.8), (43.0, 66.0, 0.7), (150.0, 200.0, 0.88)]
    sr = build_tid1500_sr(
        source=mg,
        detections=image_detections(mg, pts),
        provenance=provenance,
        series_instance_uid=generate_uid(),
    )
    assert sr is not None
    report = roundtrip(sr)
    groups = [item for _, item in items_named(report, "125007")]
    assert len(groups) == 2
    seen = []
    for group in groups:
        children = list(group.ContentSequence)
        tracking = next(c.TextValue for c in children if concept(c) == "112039")
        label = next(c.TextValue for c in children if concept(c) == "121106")  # Comment
        finding = next(value_code(c) for c in children if concept(c) == "121071")
        first_num = next(c for c in children if c.ValueType == "NUM")
        assert concept(first_num) == "111012"  # Certainty of Finding
        source = [c for c in first_num.ContentSequence if c.ValueType == "SCOORD"]
        assert len(source) == 1 and source[0].RelationshipType == "INFERRED FROM"
        assert source[0].ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
            mg.SOPInstanceUID
        )
        # OHIF reads a NUM's first child as its geometry: nothing may come before it.
        assert first_num.ContentSequence[0].ValueType == "SCOORD"
        assert not [c for c in children if c.ValueType == "SCOORD"]  # no group-level region
        seen.append((tracking, finding, source[0].GraphicType, label))
    assert sorted(seen) == [
        ("Cornerstone3DTools@^0.1.0:ArrowAnnotate", "129770007", "POINT", "Calcification, 88 %"),
        (
            "Cornerstone3DTools@^0.1.0:CircleROI",
            "129769006",
            "CIRCLE",
            "Cluster of 3 calcifications, 96 %",
        ),
    ]


# --- SEG ---------------------------------------------------------------------------------------


def test_seg_mask_equals_the_detections_full_mask(provenance: Provenance) -> None:
    mg = make_mg_dataset(rows=120, columns=90, laterality="R")
    dets = image_detections(mg, [(10, 20, 0.9), (60, 100, 0.8)], radius=3.0)
    seg = roundtrip(
        build_seg(
            source=mg, detections=dets, provenance=provenance, series_instance_uid=generate_uid()
        )
    )
    assert (seg.Rows, seg.Columns) == (120, 90)
    assert seg.NumberOfFrames == 1
    mask = seg.pixel_array.astype(bool)
    assert np.array_equal(mask, dets.full_mask())
    assert mask[20, 10] and not mask[0, 0]
    assert list(seg.PatientOrientation) == list(mg.PatientOrientation)
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "Calcification"
    assert segment.AnatomicRegionSequence[0].CodeValue == "73056007"  # Right breast
    assert segment.SegmentAlgorithmName == provenance.algorithm_name


def test_seg_is_skipped_without_findings(provenance: Provenance) -> None:
    mg = make_mg_dataset()
    assert (
        build_seg(
            source=mg,
            detections=image_detections(mg, []),
            provenance=provenance,
            series_instance_uid=generate_uid(),
        )
        is None
    )


# --- GSPS ------------------------------------------------------------------------------------


def _display(values: np.ndarray, center: float, width: float, shape: str) -> np.ndarray:
    """P-values in [0, 1] (1 = white) after a LINEAR window and a Presentation LUT shape."""
    out = np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    return 1.0 - out if shape == "INVERSE" else out


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_gsps_shows_the_image_as_its_own_photometric_interpretation_does(
    photometric: str, provenance: Provenance
) -> None:
    mg = make_mg_dataset(photometric=photometric)
    pr = roundtrip(
        build_gsps(
            source=mg,
            detections=image_detections(mg, [(20, 20, 0.9)]),
            provenance=provenance,
            series_instance_uid=generate_uid(),
        )
    )
    expected = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    assert pr.PresentationLUTShape == expected == presentation_lut_shape(mg)
    voi = pr.SoftcopyVOILUTSequence[0]
    stored = mg.pixel_array.astype(float)
    # The image on its own: window, then MONOCHROME1 means low values are white.
    native = _display(stored, float(mg.WindowCenter), float(mg.WindowWidth), "IDENTITY")
    if photometric == "MONOCHROME1":
        native = 1.0 - native
    through_gsps = _display(
        stored, float(voi.WindowCenter), float(voi.WindowWidth), pr.PresentationLUTShape
    )
    assert np.allclose(native, through_gsps)


def test_gsps_for_processing_source_gets_a_full_range_window(provenance: Provenance) -> None:
    mg = make_mg_dataset(for_processing=True)
    assert "WindowCenter" not in mg
    pr = build_gsps(
        source=mg,
        detections=image_detections(mg, []),
        provenance=provenance,
        series_instance_uid=generate_uid(),
    )
    voi = pr.SoftcopyVOILUTSequence[0]
    lo, hi = float(mg.pixel_array.min()), float(mg.pixel_array.max())
    assert float(voi.WindowWidth) == pytest.approx(hi - lo + 1, abs=1e-3)
    assert float(voi.WindowCenter) - float(voi.WindowWidth) / 2 == pytest.approx(lo, abs=1e-3)


def test_gsps_copies_a_voi_lut_from_the_source(provenance: Provenance) -> None:
    mg = make_mg_dataset(voi="lut")
    pr = roundtrip(
        build_gsps(
            source=mg,
            detections=image_detections(mg, []),
            provenance=provenance,
            series_instance_uid=generate_uid(),
        )
    )
    lut = pr.SoftcopyVOILUTSequence[0].VOILUTSequence[0]
    source_lut = mg.VOILUTSequence[0]
    assert [int(v) for v in lut.LUTDescriptor] == [int(v) for v in source_lut.LUTDescriptor]
    got = (
        np.frombuffer(lut.LUTData, dtype=np.uint16)
        if isinstance(lut.LUTData, bytes)
        else np.asarray(lut.LUTData)
    )
    assert np.array_equal(got, np.asarray(source_lut.LUTData, dtype=np.uint16))


def test_gsps_draws_layer_text_and_laterality(provenance: Provenance) -> None:
    mg = make_mg_dataset(laterality="R")
    dets = image_detections(mg, [(20, 20, 0.9), (24, 22, 0.8), (22, 27, 0.7)])
    pr = roundtrip(
        build_gsps(
            source=mg, detections=dets, provenance=provenance, series_instance_uid=generate_uid()
        )
    )
    assert pr.Laterality == "R"
    assert pr.GraphicLayerSequence[0].GraphicLayer == "CALCNODE"
    annotation = pr.GraphicAnnotationSequence[0]
    assert annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID == mg.SOPInstanceUID
    # One label for the cluster, in the TID 1500 report's words; its members unlabelled.
    (text,) = annotation.TextObjectSequence
    assert text.UnformattedTextValue == "Cluster of 3 calcifications, 90 %"
    types = sorted(g.GraphicType for g in annotation.GraphicObjectSequence)
    assert types == ["CIRCLE", "CIRCLE", "CIRCLE", "POLYLINE"]  # three marks + cluster outline


def test_gsps_labels_each_finding_once_in_boxes_apart(provenance: Provenance) -> None:
    """Clusters and isolated calcifications: one label each, in a bounding box inside
    the image that meets no other label box and no ring, anchored (visibly) on its
    finding's marks."""
    mg = make_mg_dataset(rows=400, columns=320)
    points = [
        (110, 150, 0.93), (121, 158, 0.84), (104, 166, 0.79),  # a cluster
        (150, 215, 0.9), (160, 222, 0.8), (146, 230, 0.75),  # another, 7 mm away
        (60, 250, 0.86), (85, 262, 0.61),  # a pair: two isolated calcifications
        (316, 4, 0.77),  # in the top right corner
    ]  # fmt: skip
    dets = image_detections(mg, points, radius=2.5)
    pr = roundtrip(
        build_gsps(
            source=mg, detections=dets, provenance=provenance, series_instance_uid=generate_uid()
        )
    )
    texts = pr.GraphicAnnotationSequence[0].TextObjectSequence
    assert sorted(str(t.UnformattedTextValue) for t in texts) == [
        "Calcification, 61 %",
        "Calcification, 77 %",
        "Calcification, 86 %",
        "Cluster of 3 calcifications, 90 %",
        "Cluster of 3 calcifications, 93 %",
    ]
    boxes = [
        (*(float(v) for v in t.BoundingBoxTopLeftHandCorner),
         *(float(v) for v in t.BoundingBoxBottomRightHandCorner))
        for t in texts
    ]  # fmt: skip
    for i, (left, top, right, bottom) in enumerate(boxes):
        assert 0 <= left < right <= 320 and 0 <= top < bottom <= 400
        for other in boxes[i + 1 :]:
            assert right <= other[0] or other[2] <= left or bottom <= other[1] or other[3] <= top
        for x, y, _ in points:
            near = (min(max(x + 0.5, left), right), min(max(y + 0.5, top), bottom))
            assert np.hypot(near[0] - x - 0.5, near[1] - y - 0.5) > 2.5 + 2.0
    for text in texts:
        assert text.AnchorPointVisibility == "Y"
        assert text.BoundingBoxTextHorizontalJustification == "LEFT"


# --- validation of arguments -------------------------------------------------------------------


def test_provenance_rejects_an_invalid_device_uid() -> None:
    with pytest.raises(ValueError, match="device_uid"):
        Provenance(
            algorithm_name="a", algorithm_version="1", model_version="m", device_uid="model 7"
        )


def test_provenance_rejects_non_ascii_algorithm_name() -> None:
    with pytest.raises(ValueError, match="algorithm_name"):
        Provenance(
            algorithm_name="µC cascade",
            algorithm_version="1",
            model_version="m",
            device_uid="1.2.3",
        )


def test_provenance_rejects_a_backslash_in_versions() -> None:
    with pytest.raises(ValueError, match="model_version"):
        Provenance(
            algorithm_name="a", algorithm_version="1", model_version="a\\b", device_uid="1.2.3"
        )


def test_cad_sr_rejects_an_empty_study(provenance: Provenance) -> None:
    with pytest.raises(ValueError, match="study"):
        build_cad_sr(study=[], provenance=provenance, series_instance_uid=generate_uid())


@pytest.mark.parametrize("kind", KINDS)
def test_builders_reject_detections_of_another_image(kind: str, provenance: Provenance) -> None:
    mg, other = make_mg_dataset(), make_mg_dataset()
    with pytest.raises(ValueError, match="sop_instance_uid"):
        _build(kind, mg, image_detections(other, [(1, 1, 0.9)]), provenance)


@pytest.mark.parametrize("kind", KINDS)
def test_builders_reject_detections_on_another_grid(kind: str, provenance: Provenance) -> None:
    mg = make_mg_dataset(rows=100, columns=80)
    dets = dataclasses.replace(image_detections(mg, []), rows=200)
    with pytest.raises(ValueError, match="Rows x Columns"):
        _build(kind, mg, dets, provenance)


@pytest.mark.parametrize("kind", KINDS)
def test_builders_reject_a_bad_series_uid(kind: str, provenance: Provenance) -> None:
    mg = make_mg_dataset()
    dets = image_detections(mg, [(1, 1, 0.9)])
    with pytest.raises(ValueError, match="series_instance_uid"):
        if kind == "cad_sr":
            build_cad_sr(study=[(mg, dets)], provenance=provenance, series_instance_uid="1.02.x")
        elif kind == "tid1500":
            build_tid1500_sr(
                source=mg, detections=dets, provenance=provenance, series_instance_uid="1.02.x"
            )
        elif kind == "seg":
            build_seg(
                source=mg, detections=dets, provenance=provenance, series_instance_uid="1.02.x"
            )
        else:
            build_gsps(
                source=mg, detections=dets, provenance=provenance, series_instance_uid="1.02.x"
            )


@pytest.mark.parametrize("kind", KINDS)
def test_builders_reject_version_zero(kind: str, provenance: Provenance) -> None:
    mg = make_mg_dataset()
    with pytest.raises(ValueError, match="version"):
        _build(kind, mg, image_detections(mg, []), provenance, version=0)


def test_cad_sr_rejects_images_of_two_studies(provenance: Provenance) -> None:
    a, b = make_mg_dataset(), make_mg_dataset()
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        build_cad_sr(
            study=[(a, image_detections(a, [])), (b, image_detections(b, []))],
            provenance=provenance,
            series_instance_uid=generate_uid(),
        )


def test_cad_sr_rejects_a_non_mammography_source(provenance: Provenance) -> None:
    mg = make_mg_dataset()
    mg.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    with pytest.raises(ValueError, match="Digital Mammography"):
        build_cad_sr(
            study=[(mg, image_detections(mg, []))],
            provenance=provenance,
            series_instance_uid=generate_uid(),
        )


def test_cad_sr_rejects_a_non_finite_operating_point(provenance: Provenance) -> None:
    mg = make_mg_dataset()
    with pytest.raises(ValueError, match="operating_point"):
        build_cad_sr(
            study=[(mg, image_detections(mg, []))],
            provenance=provenance,
            series_instance_uid=generate_uid(),
            operating_point=float("inf"),
        )


def test_builders_reject_a_provenance_of_the_wrong_type() -> None:
    mg = make_mg_dataset()
    with pytest.raises(TypeError, match="provenance"):
        build_gsps(
            source=mg,
            detections=image_detections(mg, []),
            provenance="calcnode",  # type: ignore[arg-type]
            series_instance_uid=generate_uid(),
        )


@pytest.mark.parametrize("corner", ["top-left", "bottom-right"])
def test_marks_of_findings_at_the_image_edge_stay_inside_the_image(
    corner: str, provenance: Provenance
) -> None:
    # A cluster in a corner: rings, labels and the cluster outline must not leave the
    # image, or highdicom (and viewers) refuse the objects.
    mg = make_mg_dataset()
    cols, rows = int(mg.Columns), int(mg.Rows)
    if corner == "top-left":
        pts = [(0.0, 0.0, 0.9), (3.0, 1.0, 0.8), (1.0, 4.0, 0.7)]
    else:
        pts = [
            (cols - 1.0, rows - 1.0, 0.9),
            (cols - 3.0, rows - 2.0, 0.8),
            (cols - 2.0, rows - 5.0, 0.7),
        ]
    dets = image_detections(mg, pts, radius=6.0)
    pr = roundtrip(
        build_gsps(
            source=mg, detections=dets, provenance=provenance, series_instance_uid=generate_uid()
        )
    )
    ann = pr.GraphicAnnotationSequence[0]
    coords = [float(v) for g in ann.GraphicObjectSequence for v in g.GraphicData]
    coords += [float(v) for t in ann.TextObjectSequence for v in t.AnchorPoint]
    xs, ys = coords[0::2], coords[1::2]
    assert min(xs) >= 0 and max(xs) <= cols
    assert min(ys) >= 0 and max(ys) <= rows
    assert any(g.GraphicType == "POLYLINE" for g in ann.GraphicObjectSequence)
    sr = roundtrip(
        build_cad_sr(study=[(mg, dets)], provenance=provenance, series_instance_uid=generate_uid())
    )
    tid = build_tid1500_sr(
        source=mg, detections=dets, provenance=provenance, series_instance_uid=generate_uid()
    )
    assert tid is not None
    circles = [
        it for _, it in walk(list(roundtrip(tid).ContentSequence)) if it.ValueType == "SCOORD"
    ]
    assert [c.GraphicType for c in circles] == ["CIRCLE"]
    data = [float(v) for v in circles[0].GraphicData]
    assert min(data[0::2]) >= 0 and max(data[0::2]) <= cols
    assert min(data[1::2]) >= 0 and max(data[1::2]) <= rows
    outlines = [item for _, item in items_named(sr, "111041")]
    assert outlines, "the cluster has an Outline"
    for item in outlines:
        data = [float(v) for v in item.GraphicData]
        assert min(data[0::2]) >= 0 and max(data[0::2]) <= cols
        assert min(data[1::2]) >= 0 and max(data[1::2]) <= rows


def test_per_image_kinds_get_one_stable_series_per_image_and_the_others_one_per_study() -> None:
    from node.identity import series_uid_for

    study, a, b = "1.2.3", "1.2.3.4", "1.2.3.5"
    for kind in ("seg", "tid1500-sr"):
        assert series_uid_for(study, kind, a) == series_uid_for(study, kind, a)  # re-sends
        assert series_uid_for(study, kind, a) != series_uid_for(study, kind, b)
        with pytest.raises(ValueError, match="one series per image"):
            series_uid_for(study, kind)
    assert series_uid_for(study, "seg", a) != series_uid_for(study, "tid1500-sr", a)
    for kind in ("cad-sr", "gsps"):
        assert series_uid_for(study, kind, a) == series_uid_for(study, kind, b)
        assert series_uid_for(study, kind) == series_uid_for(study, kind, a)
