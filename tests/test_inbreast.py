"""INbreast import: OsiriX XML + DICOM headers → manifest.

Fixtures write XML property lists in INbreast's layout (``plistlib.dump``) next to small
MG DICOM files named like the distribution's (``<number>_<hash>_MG_<lat>_<view>_ANON.dcm``).
XML points are OsiriX pixel coordinates (x = column, y = row, corner origin); the
manifest's are shifted by −0.5 px (first pixel's centre at (0, 0)).
"""

from __future__ import annotations

import logging
import math
import plistlib
from collections.abc import Sequence
from pathlib import Path

import pydicom
import pytest

from cascade.data.inbreast import (
    InbreastRoi,
    convert_inbreast,
    findings_from_rois,
    parse_inbreast_xml,
    parse_point,
)
from cascade.data.manifest import Calcification, read_manifest
from cascade.errors import DatasetError
from tests.factories import make_mg_dataset

Roi = tuple[str, Sequence[str]]


def _roi_dict(name: str, points: Sequence[str], index: int) -> dict[str, object]:
    """One ROI with every key INbreast writes (values that the import ignores are dummies)."""
    return {
        "Area": 0.0,
        "Center": "(0.000000, 0.000000, 0.000000)",
        "Dev": 0.0,
        "IndexInImage": index,
        "Max": 0.0,
        "Mean": 0.0,
        "Min": 0.0,
        "Name": name,
        "NumberOfPoints": len(points),
        "Point_mm": ["(0.000000, 0.000000, 0.000000)" for _ in points],
        "Point_px": list(points),
        "Total": 0.0,
        "Type": 19 if len(points) == 1 else 15,
    }


def write_xml(path: Path, rois: Sequence[Roi]) -> Path:
    """Write an INbreast OsiriX XML plist holding one image with ``rois``."""
    data = {
        "Images": [
            {
                "ImageHeight": 0,
                "ImageIndex": 0,
                "ImageWidth": 0,
                "NumberOfROIs": len(rois),
                "ROIs": [_roi_dict(name, pts, i) for i, (name, pts) in enumerate(rois)],
            }
        ]
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        plistlib.dump(data, fh, fmt=plistlib.FMT_XML)
    return path


def write_dicom(
    folder: Path,
    number: str,
    *,
    rows: int = 200,
    columns: int = 160,
    pixel_spacing: tuple[float, float] | None = (0.1, 0.1),
    imager_pixel_spacing: tuple[float, float] | None = None,
    laterality: str = "R",
    view: str = "CC",
) -> Path:
    """Write a small MG file named like INbreast's and return its path."""
    ds = make_mg_dataset(
        rows=rows,
        columns=columns,
        pixel_spacing=pixel_spacing,
        imager_pixel_spacing=imager_pixel_spacing,
        laterality=laterality,
        view=view,
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{number}_6c613a14b80a8591_MG_{laterality}_{view}_ANON.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def convert_one(tmp_path: Path, rois: Sequence[Roi], **dicom_kwargs: object):
    """Convert one image with ``rois`` and return its manifest record."""
    write_xml(tmp_path / "AllXML" / "22678622.xml", rois)
    write_dicom(tmp_path / "AllDICOMs", "22678622", **dicom_kwargs)  # type: ignore[arg-type]
    out = convert_inbreast(
        xml_dir=tmp_path / "AllXML", dicom_dir=tmp_path / "AllDICOMs", out=tmp_path / "m.jsonl"
    )
    (record,) = read_manifest(out)
    return record


# --------------------------------------------------------------------------- parsing
def test_parse_point_reads_integer_and_fractional_coordinates() -> None:
    assert parse_point("(1234.5, 678.25)") == (1234.5, 678.25)
    assert parse_point(" ( 12 ,  7 ) ") == (12.0, 7.0)
    assert parse_point("(1.5e2, -0.25)") == (150.0, -0.25)


@pytest.mark.parametrize(
    "text", ["(12, )", "12, 13", "(a, b)", "(nan, 1)", "(1, inf)", "(1, 2, 3)", "", "()"]
)
def test_parse_point_rejects_malformed_strings(text: str) -> None:
    with pytest.raises(DatasetError, match="ROI 3"):
        parse_point(text, where="x.xml: ROI 3")


def test_parse_point_rejects_non_strings() -> None:
    with pytest.raises(DatasetError, match="point string"):
        parse_point(12.5)  # type: ignore[arg-type]


def test_parse_inbreast_xml_returns_rois_as_stored(tmp_path: Path) -> None:
    path = write_xml(
        tmp_path / "1.xml",
        [("Calcification", ["(1234.5, 678.25)"]), ("Mass", ["(1, 2)", "(3, 4)", "(5, 2)"])],
    )
    rois = parse_inbreast_xml(path)
    assert rois == [
        InbreastRoi(name="Calcification", points=((1234.5, 678.25),), image_index=0, roi_index=0),
        InbreastRoi(
            name="Mass", points=((1.0, 2.0), (3.0, 4.0), (5.0, 2.0)), image_index=0, roi_index=1
        ),
    ]


def test_parse_inbreast_xml_of_image_without_rois_is_empty(tmp_path: Path) -> None:
    assert parse_inbreast_xml(write_xml(tmp_path / "1.xml", [])) == []


def test_bad_point_string_raises_dataset_error_naming_file_and_roi(tmp_path: Path) -> None:
    path = write_xml(
        tmp_path / "5.xml",
        [("Calcification", ["(1, 2)"]), ("Cluster", ["(1, 2)", "(3; 4)", "(5, 6)"])],
    )
    with pytest.raises(DatasetError) as info:
        parse_inbreast_xml(path)
    message = str(info.value)
    assert "5.xml" in message
    assert "ROI 1" in message
    assert "'Cluster'" in message
    assert "Point_px[1]" in message


def test_bad_point_string_fails_the_whole_conversion(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"22678622\.xml: ROI 0 \('Calcification'\)"):
        convert_one(tmp_path, [("Calcification", ["(12.5 14)"])])


def test_file_that_is_not_a_plist_raises_dataset_error(tmp_path: Path) -> None:
    path = tmp_path / "7.xml"
    path.write_text("<plist><dict><key>Images</key>", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"7\.xml: not a valid OsiriX XML"):
        parse_inbreast_xml(path)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"Foo": 1}, "'Images' list"),
        ({"Images": [{"ROIs": "nope"}]}, r"Images\[0\]\.ROIs is not a list"),
        ({"Images": [{"ROIs": [{"Point_px": ["(1, 2)"]}]}]}, "ROI 0: missing or empty 'Name'"),
        ({"Images": [{"ROIs": [{"Name": "Mass"}]}]}, r"ROI 0 \('Mass'\): 'Point_px' missing"),
        ({"Images": [{"ROIs": [{"Name": "Mass", "Point_px": []}]}]}, "holds no point"),
    ],
)
def test_structurally_wrong_xml_raises_dataset_error(
    tmp_path: Path, data: dict[str, object], message: str
) -> None:
    path = tmp_path / "9.xml"
    with path.open("wb") as fh:
        plistlib.dump(data, fh, fmt=plistlib.FMT_XML)
    with pytest.raises(DatasetError, match=message):
        parse_inbreast_xml(path)


def test_missing_xml_file_raises_dataset_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cannot read"):
        parse_inbreast_xml(tmp_path / "absent.xml")


# --------------------------------------------------------------------------- mapping
def test_point_roi_becomes_point_microcalcification_at_pixel_centre(tmp_path: Path) -> None:
    record = convert_one(tmp_path, [("Calcification", ["(50, 40)"])])
    assert record.calcifications == (Calcification(x=49.5, y=39.5),)
    assert record.others == ()
    assert record.clusters == ()


@pytest.mark.parametrize("name", ["Calcification", "calcification", "Unnamed", "Point 3"])
def test_calcification_names_all_become_microcalcifications(tmp_path: Path, name: str) -> None:
    record = convert_one(tmp_path, [(name, ["(10.25, 20.75)"])])
    assert record.calcifications == (Calcification(x=9.75, y=20.25),)


def test_outline_roi_becomes_microcalcification_with_centroid_and_feret_diameter(
    tmp_path: Path,
) -> None:
    # An L-shaped outline: its area centroid (11.667, 11.667) differs from the vertex
    # mean (12, 12); the longest vertex pair, (14, 10)–(10, 14), is 4√2 px = 0.566 mm.
    outline = ["(10, 10)", "(14, 10)", "(14, 12)", "(12, 12)", "(12, 14)", "(10, 14)"]
    record = convert_one(tmp_path, [("Calcification", outline)])
    (calc,) = record.calcifications
    assert calc.x == pytest.approx(140 / 12 - 0.5, abs=1e-3)
    assert calc.y == pytest.approx(140 / 12 - 0.5, abs=1e-3)
    assert calc.diameter_mm == pytest.approx(0.4 * math.sqrt(2), abs=1e-4)
    assert calc.outline == (
        (9.5, 9.5),
        (13.5, 9.5),
        (13.5, 11.5),
        (11.5, 11.5),
        (11.5, 13.5),
        (9.5, 13.5),
    )
    assert record.others == ()


def test_repeated_closing_vertex_does_not_move_the_centroid(tmp_path: Path) -> None:
    square = ["(10, 10)", "(16, 10)", "(16, 14)", "(10, 14)", "(10, 10)"]
    (calc,) = convert_one(tmp_path, [("Calcification", square)]).calcifications
    assert (calc.x, calc.y) == pytest.approx((12.5, 11.5))
    assert calc.outline is not None and len(calc.outline) == 4


def test_outline_of_identical_points_is_a_point_microcalcification(tmp_path: Path) -> None:
    record = convert_one(tmp_path, [("Calcification", ["(30, 31)", "(30, 31)"])])
    assert record.calcifications == (Calcification(x=29.5, y=30.5),)


def test_calcification_larger_than_1_mm_becomes_other_finding(tmp_path: Path) -> None:
    # 12 × 2 px at 0.1 mm: diagonal 1.217 mm > 1 mm.
    rect = ["(20, 30)", "(32, 30)", "(32, 32)", "(20, 32)"]
    record = convert_one(tmp_path, [("Calcification", rect)])
    assert record.calcifications == ()
    (other,) = record.others
    assert other.kind == "calcification"
    assert other.closed is True
    assert other.points == ((19.5, 29.5), (31.5, 29.5), (31.5, 31.5), (19.5, 31.5))


def test_calcification_of_exactly_1_mm_stays_a_microcalcification(tmp_path: Path) -> None:
    # Two vertices 10 px apart at 0.1 mm: exactly 1 mm, which the 1-mm rule still keeps.
    record = convert_one(tmp_path, [("Calcification", ["(10, 10)", "(20, 10)"])])
    (calc,) = record.calcifications
    assert calc.diameter_mm == pytest.approx(1.0)
    assert (calc.x, calc.y) == (14.5, 9.5)
    assert calc.outline is None  # two points are a segment, not an outline
    assert record.others == ()


@pytest.mark.parametrize(
    ("spacing", "is_micro"),
    [((0.2, 0.1), False), ((0.1, 0.2), True)],  # (row, column) spacing in mm
)
def test_feret_diameter_uses_row_spacing_for_y(
    tmp_path: Path, spacing: tuple[float, float], is_micro: bool
) -> None:
    # A vertical segment of 6 rows: 1.2 mm at 0.2 mm/row, 0.6 mm at 0.1 mm/row.
    record = convert_one(
        tmp_path, [("Calcification", ["(10, 10)", "(10, 16)"])], pixel_spacing=spacing
    )
    assert len(record.calcifications) == int(is_micro)
    assert len(record.others) == int(not is_micro)


def test_cluster_roi_becomes_cluster_outline(tmp_path: Path) -> None:
    record = convert_one(
        tmp_path,
        [("Cluster", ["(40, 40)", "(60, 40)", "(50, 60)"]), ("Calcification", ["(50, 45)"])],
    )
    assert record.clusters == (((39.5, 39.5), (59.5, 39.5), (49.5, 59.5)),)
    assert record.calcifications == (Calcification(x=49.5, y=44.5),)


@pytest.mark.parametrize(
    ("name", "kind"),
    [("Mass", "mass"), ("Spiculated Region", "spiculated region"), ("Asymmetry", "asymmetry")],
)
def test_other_lesions_become_others_with_lowercase_kind(
    tmp_path: Path, name: str, kind: str
) -> None:
    record = convert_one(tmp_path, [(name, ["(10, 10)", "(30, 10)", "(20, 30)"])])
    assert record.calcifications == ()
    (other,) = record.others
    assert other.kind == kind
    assert other.closed is True
    assert other.points == ((9.5, 9.5), (29.5, 9.5), (19.5, 29.5))


def test_point_far_outside_the_image_raises_dataset_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="outside the 160×200 image"):
        convert_one(tmp_path, [("Calcification", ["(400, 20)"])], rows=200, columns=160)


def test_point_on_the_image_border_is_accepted(tmp_path: Path) -> None:
    record = convert_one(tmp_path, [("Calcification", ["(160, 200)"])], rows=200, columns=160)
    assert record.calcifications == (Calcification(x=159.5, y=199.5),)


def test_findings_from_rois_rejects_bad_spacing() -> None:
    roi = InbreastRoi(name="Calcification", points=((1.0, 1.0),))
    with pytest.raises(ValueError, match="pixel_spacing_mm"):
        findings_from_rois([roi], pixel_spacing_mm=(0.1, 0.0))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": " ", "points": ((1.0, 1.0),)}, "name"),
        ({"name": "Mass", "points": ()}, "points"),
        ({"name": "Mass", "points": ((1.0, math.nan),)}, "finite"),
    ],
)
def test_inbreast_roi_rejects_invalid_values(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        InbreastRoi(**kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- conversion
def test_convert_inbreast_writes_a_manifest_that_reads_back(tmp_path: Path) -> None:
    xml_dir, dcm_dir = tmp_path / "AllXML", tmp_path / "AllDICOMs"
    write_xml(
        xml_dir / "10.xml",
        [
            ("Calcification", ["(50, 40)"]),
            ("Calcification", ["(20, 30)", "(32, 30)", "(32, 32)", "(20, 32)"]),
            ("Cluster", ["(40, 40)", "(60, 40)", "(50, 60)"]),
            ("Mass", ["(10, 10)", "(30, 10)", "(20, 30)"]),
        ],
    )
    annotated = write_dicom(dcm_dir, "10", laterality="L", view="MLO")
    normal = write_dicom(dcm_dir, "9", rows=120, columns=100, pixel_spacing=(0.07, 0.07))

    out = convert_inbreast(xml_dir=xml_dir, dicom_dir=dcm_dir, out=tmp_path / "m.jsonl")

    assert out == tmp_path / "m.jsonl"
    first, second = read_manifest(out)
    # Sorted by INbreast number as a number: 9 before 10.
    assert first.path == normal.resolve()
    assert (first.rows, first.columns, first.pixel_spacing_mm) == (120, 100, (0.07, 0.07))
    assert (first.calcifications, first.others, first.clusters) == ((), (), ())
    assert second.path == annotated.resolve()
    assert (second.rows, second.columns, second.pixel_spacing_mm) == (200, 160, (0.1, 0.1))
    assert len(second.calcifications) == 1
    assert sorted(o.kind for o in second.others) == ["calcification", "mass"]
    assert len(second.clusters) == 1
    assert second.tags == {
        "source": "inbreast",
        "inbreast_id": "10",
        "inbreast_case": "6c613a14b80a8591",
        "laterality": "L",
        "view": "MLO",
        "vendor": "calcnode phantom",
    }
    ds = pydicom.dcmread(annotated, stop_before_pixels=True)
    assert second.sop_instance_uid == ds.SOPInstanceUID
    assert second.study_instance_uid == ds.StudyInstanceUID
    # Image paths below the manifest's folder are written relative to it.
    assert '"path": "AllDICOMs/10_' in out.read_text(encoding="utf-8")


def test_image_without_xml_is_a_normal_image(tmp_path: Path) -> None:
    (tmp_path / "AllXML").mkdir()
    dcm = write_dicom(tmp_path / "AllDICOMs", "53586896")
    out = convert_inbreast(
        xml_dir=tmp_path / "AllXML", dicom_dir=tmp_path / "AllDICOMs", out=tmp_path / "m.jsonl"
    )
    (record,) = read_manifest(out)
    assert record.path == dcm.resolve()
    assert (record.calcifications, record.others, record.clusters) == ((), (), ())


def test_xml_without_dicom_is_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_xml(tmp_path / "AllXML" / "1.xml", [("Calcification", ["(5, 5)"])])
    write_xml(tmp_path / "AllXML" / "2.xml", [("Calcification", ["(6, 6)"])])
    write_dicom(tmp_path / "AllDICOMs", "1")
    with caplog.at_level(logging.WARNING, logger="cascade.data.inbreast"):
        out = convert_inbreast(
            xml_dir=tmp_path / "AllXML", dicom_dir=tmp_path / "AllDICOMs", out=tmp_path / "m.jsonl"
        )
    (record,) = read_manifest(out)
    assert record.calcifications == (Calcification(x=4.5, y=4.5),)
    assert any("2.xml has no DICOM" in r.getMessage() for r in caplog.records)


def test_imager_pixel_spacing_is_used_when_pixel_spacing_is_absent(tmp_path: Path) -> None:
    record = convert_one(tmp_path, [], pixel_spacing=None, imager_pixel_spacing=(0.085, 0.085))
    assert record.pixel_spacing_mm == (0.085, 0.085)


def test_dicom_without_any_spacing_raises_dataset_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="PixelSpacing nor ImagerPixelSpacing"):
        convert_one(tmp_path, [], pixel_spacing=None, imager_pixel_spacing=None)


def test_unreadable_dicom_raises_dataset_error(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    bad = tmp_path / "d" / "3_abc_MG_R_CC_ANON.dcm"
    bad.parent.mkdir()
    bad.write_bytes(b"not a dicom file at all")
    with pytest.raises(DatasetError, match="not a readable DICOM"):
        convert_inbreast(xml_dir=tmp_path / "x", dicom_dir=tmp_path / "d", out=tmp_path / "m")


def test_two_dicoms_with_the_same_number_raise_dataset_error(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    write_dicom(tmp_path / "d", "4", view="CC")
    write_dicom(tmp_path / "d", "4", view="MLO")
    with pytest.raises(DatasetError, match="share the INbreast number '4'"):
        convert_inbreast(xml_dir=tmp_path / "x", dicom_dir=tmp_path / "d", out=tmp_path / "m")


def test_missing_folder_raises_dataset_error(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(DatasetError, match=r"XML folder .* does not exist"):
        convert_inbreast(xml_dir=tmp_path / "nope", dicom_dir=tmp_path / "d", out=tmp_path / "m")


def test_folder_without_dicom_files_raises_dataset_error(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "d").mkdir()
    with pytest.raises(DatasetError, match=r"no DICOM \(\*\.dcm\) file"):
        convert_inbreast(xml_dir=tmp_path / "x", dicom_dir=tmp_path / "d", out=tmp_path / "m")


def test_cli_dataset_inbreast_writes_the_manifest(tmp_path: Path) -> None:
    from node.cli import main

    write_xml(tmp_path / "AllXML" / "8.xml", [("Calcification", ["(5, 6)"])])
    write_dicom(tmp_path / "AllDICOMs", "8")
    out = tmp_path / "out" / "inbreast.jsonl"
    argv = ["dataset", "inbreast", "--xml", str(tmp_path / "AllXML")]
    argv += ["--dicom", str(tmp_path / "AllDICOMs"), "--out", str(out)]
    assert main(argv) == 0
    (record,) = read_manifest(out)
    assert record.calcifications == (Calcification(x=4.5, y=5.5),)


def test_laterality_and_view_are_read_from_the_name_in_either_order(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "d").mkdir()
    ds = make_mg_dataset(rows=64, columns=48, laterality="R", view="CC")
    # The header says R/CC; INbreast's file name is what the import trusts first.
    ds.save_as(tmp_path / "d" / "7_abc123_MG_MLO_L_ANON.dcm", enforce_file_format=True)
    out = convert_inbreast(xml_dir=tmp_path / "x", dicom_dir=tmp_path / "d", out=tmp_path / "m")
    (record,) = read_manifest(out)
    assert (record.tags["laterality"], record.tags["view"]) == ("L", "MLO")
    assert record.tags["inbreast_case"] == "abc123"


def test_header_fills_laterality_and_view_when_the_name_lacks_them(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "d").mkdir()
    ds = make_mg_dataset(rows=64, columns=48, laterality="R", view="MLO")
    ds.save_as(tmp_path / "d" / "12.dcm", enforce_file_format=True)
    write_xml(tmp_path / "x" / "12.xml", [("Calcification", ["(3, 4)"])])
    out = convert_inbreast(xml_dir=tmp_path / "x", dicom_dir=tmp_path / "d", out=tmp_path / "m")
    (record,) = read_manifest(out)
    assert record.tags["inbreast_id"] == "12"
    assert (record.tags["laterality"], record.tags["view"]) == ("R", "MLO")
    assert "inbreast_case" not in record.tags
    assert record.calcifications == (Calcification(x=2.5, y=3.5),)
