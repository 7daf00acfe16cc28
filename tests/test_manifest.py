"""The JSON Lines manifest: round trip, path resolution and validation.

Coordinates in every record: x = column, y = row, 0-based, first pixel's centre at (0, 0).
Test values are chosen to survive the writer's rounding (3 decimals for centres, 2 for
outline and finding points, 4 for diameters), so records compare equal after a round trip.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cascade.data.manifest import (
    MANIFEST_SCHEMA,
    Calcification,
    ImageRecord,
    OtherFinding,
    iter_manifest,
    read_manifest,
    write_manifest,
)
from cascade.errors import DatasetError


def _record(path: Path, **overrides: Any) -> ImageRecord:
    values: dict[str, Any] = {
        "path": path,
        "sop_instance_uid": "1.2.826.0.1.3680043.8.498.1",
        "rows": 1000,
        "columns": 1400,
        "pixel_spacing_mm": (0.07, 0.07),
        "calcifications": (
            Calcification(x=510.25, y=233.0, diameter_mm=0.31),
            Calcification(
                x=12.5,
                y=7.125,
                diameter_mm=0.2,
                outline=((11.0, 6.0), (14.0, 6.5), (13.25, 8.0)),
            ),
            Calcification(x=0.0, y=0.0),
        ),
        "others": (
            OtherFinding(kind="vascular", points=((10.0, 20.0), (30.0, 25.5))),
            OtherFinding(
                kind="calcification", points=((5.0, 5.0), (9.0, 5.0), (7.0, 9.0)), closed=True
            ),
        ),
        "clusters": (((500.0, 220.0), (530.0, 220.0), (520.0, 250.0)),),
        "study_instance_uid": "1.2.826.0.1.3680043.8.498.2",
        "tags": {"vendor": "hologic", "density": "scattered", "view": "CC"},
    }
    values.update(overrides)
    return ImageRecord(**values)


def _valid_line(**overrides: Any) -> dict[str, Any]:
    line: dict[str, Any] = {
        "schema": MANIFEST_SCHEMA,
        "path": "a.dcm",
        "sop_instance_uid": "1.2.3",
        "rows": 100,
        "columns": 80,
        "pixel_spacing_mm": [0.1, 0.1],
    }
    line.update(overrides)
    return line


def _write_lines(path: Path, *lines: Any) -> Path:
    """Write raw lines: dicts are JSON-encoded, strings written as they are."""
    text = "".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines)
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- round trip
def test_write_then_read_returns_equal_records(tmp_path: Path) -> None:
    base = tmp_path.resolve()
    records = [
        _record(base / "images" / "s1" / "L-CC.dcm"),
        _record(
            base / "images" / "s1" / "R-CC.dcm",
            sop_instance_uid="1.2.3.4",
            calcifications=(),
            others=(),
            clusters=(),
            study_instance_uid=None,
            tags={},
        ),
    ]
    out = write_manifest(base / "m.jsonl", records)
    assert out == base / "m.jsonl"
    assert read_manifest(out) == records


def test_written_lines_carry_the_schema_and_relative_paths(tmp_path: Path) -> None:
    base = tmp_path.resolve()
    out = write_manifest(base / "m.jsonl", [_record(base / "img" / "x.dcm")])
    (line,) = out.read_text(encoding="utf-8").splitlines()
    data = json.loads(line)
    assert data["schema"] == MANIFEST_SCHEMA == 1
    assert data["path"] == "img/x.dcm"
    assert data["calcifications"][0] == {"x": 510.25, "y": 233.0, "diameter_mm": 0.31}
    assert data["clusters"] == [{"points": [[500.0, 220.0], [530.0, 220.0], [520.0, 250.0]]}]


def test_image_outside_the_manifest_folder_is_written_absolute(tmp_path: Path) -> None:
    base = tmp_path.resolve()
    image = base / "elsewhere" / "x.dcm"
    out = write_manifest(base / "manifests" / "m.jsonl", [_record(image)])
    assert json.loads(out.read_text(encoding="utf-8"))["path"] == image.as_posix()
    (record,) = read_manifest(out)
    assert record.path == image


def test_write_manifest_creates_folders_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    out = write_manifest(tmp_path / "a" / "b" / "m.jsonl", [_record(tmp_path / "x.dcm")])
    assert out.is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.jsonl"]


def test_relative_paths_resolve_against_the_manifest_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    manifest = _write_lines(
        folder / "m.jsonl",
        _valid_line(path="sub/a.dcm"),
        _valid_line(path="/abs/b.dcm", sop_instance_uid="1.2.4"),
    )
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    first, second = read_manifest(manifest)
    assert first.path == folder / "sub" / "a.dcm"
    assert second.path == Path("/abs/b.dcm")


def test_blank_and_comment_lines_are_skipped(tmp_path: Path) -> None:
    manifest = _write_lines(
        tmp_path / "m.jsonl",
        "# INbreast, converted 2024-05-17",
        "",
        "   ",
        _valid_line(),
        "  # a comment with leading blanks",
        _valid_line(sop_instance_uid="1.2.4"),
    )
    assert [r.sop_instance_uid for r in read_manifest(manifest)] == ["1.2.3", "1.2.4"]


def test_optional_keys_default_to_empty(tmp_path: Path) -> None:
    (record,) = read_manifest(_write_lines(tmp_path / "m.jsonl", _valid_line()))
    assert record.calcifications == ()
    assert record.others == ()
    assert record.clusters == ()
    assert record.study_instance_uid is None
    assert record.tags == {}
    assert record.pixel_spacing_mm == (0.1, 0.1)


def test_line_without_schema_is_read_as_the_current_schema(tmp_path: Path) -> None:
    line = _valid_line()
    del line["schema"]
    (record,) = read_manifest(_write_lines(tmp_path / "m.jsonl", line))
    assert record.rows == 100


def test_clusters_may_be_bare_point_lists(tmp_path: Path) -> None:
    line = _valid_line(clusters=[[[1, 2], [3, 4], [5, 2]]])
    (record,) = read_manifest(_write_lines(tmp_path / "m.jsonl", line))
    assert record.clusters == (((1.0, 2.0), (3.0, 4.0), (5.0, 2.0)),)


def test_iter_manifest_yields_records_lazily(tmp_path: Path) -> None:
    # The second line is broken; the first record is still delivered before the error.
    manifest = _write_lines(tmp_path / "m.jsonl", _valid_line(), "{broken")
    records = iter_manifest(manifest)
    assert next(records).sop_instance_uid == "1.2.3"
    with pytest.raises(DatasetError, match=r"m\.jsonl:2"):
        next(records)


# --------------------------------------------------------------------------- validation
def test_missing_manifest_raises_dataset_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        read_manifest(tmp_path / "absent.jsonl")


def test_bad_json_line_names_file_and_line(tmp_path: Path) -> None:
    manifest = _write_lines(tmp_path / "m.jsonl", "# header", "", _valid_line(), '{"path": ')
    with pytest.raises(DatasetError, match=r"m\.jsonl:4: not valid JSON"):
        read_manifest(manifest)


@pytest.mark.parametrize("key", ["path", "sop_instance_uid", "rows", "columns", "pixel_spacing_mm"])
def test_missing_required_key_names_the_key_and_line(tmp_path: Path, key: str) -> None:
    line = _valid_line()
    del line[key]
    manifest = _write_lines(tmp_path / "m.jsonl", _valid_line(), line)
    with pytest.raises(DatasetError, match=rf"m\.jsonl:2: missing required key '{key}'"):
        read_manifest(manifest)


@pytest.mark.parametrize("schema", [0, 2, "1"])
def test_unsupported_schema_raises_dataset_error(tmp_path: Path, schema: object) -> None:
    manifest = _write_lines(tmp_path / "m.jsonl", _valid_line(schema=schema))
    with pytest.raises(DatasetError, match=r"m\.jsonl:1: manifest schema .* is not supported"):
        read_manifest(manifest)


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_calcification_coordinates_raise_dataset_error(tmp_path: Path, bad: str) -> None:
    # json.dumps cannot be asked for these spellings portably; write them by hand.
    line = json.dumps(_valid_line())[:-1] + f', "calcifications": [{{"x": {bad}, "y": 3}}]}}'
    manifest = _write_lines(tmp_path / "m.jsonl", line)
    with pytest.raises(DatasetError, match=r"m\.jsonl:1\.calcifications\[0\]: .*finite"):
        read_manifest(manifest)


def test_non_finite_outline_point_raises_dataset_error(tmp_path: Path) -> None:
    line = json.dumps(_valid_line())[:-1]
    line += ', "calcifications": [{"x": 1, "y": 3, "outline": [[1, 2], [NaN, 2], [3, 4]]}]}'
    manifest = _write_lines(tmp_path / "m.jsonl", line)
    with pytest.raises(DatasetError, match=r"calcifications\[0\]\.outline\[1\]: .*finite"):
        read_manifest(manifest)


@pytest.mark.parametrize("diameter", [-0.2, 0.0])
def test_non_positive_diameter_raises_dataset_error(tmp_path: Path, diameter: float) -> None:
    line = _valid_line(calcifications=[{"x": 1, "y": 2, "diameter_mm": diameter}])
    manifest = _write_lines(tmp_path / "m.jsonl", line)
    with pytest.raises(DatasetError, match="diameter_mm must be positive"):
        read_manifest(manifest)


@pytest.mark.parametrize(
    ("calc", "message"),
    [
        ({"x": 1}, r"calcifications\[0\]: a calcification needs 'x' and 'y'"),
        ({"x": "left", "y": 2}, r"calcifications\[0\]: expected an \[x, y\] pair"),
        ({"x": 1, "y": 2, "outline": [[1, 2], [3]]}, r"outline\[1\]: expected an \[x, y\] pair"),
        ({"x": 1, "y": 2, "outline": "1,2"}, r"outline: expected a list of \[x, y\] pairs"),
    ],
)
def test_malformed_calcification_raises_dataset_error(
    tmp_path: Path, calc: dict[str, Any], message: str
) -> None:
    manifest = _write_lines(tmp_path / "m.jsonl", _valid_line(calcifications=[calc]))
    with pytest.raises(DatasetError, match=message):
        read_manifest(manifest)


@pytest.mark.parametrize(
    ("other", "message"),
    [
        ({"kind": "", "points": [[1, 2]]}, "non-empty kind"),
        ({"kind": "vascular", "points": []}, "has no points"),
        ({"kind": "vascular", "points": [[1, 2, 3]]}, r"others\[0\]\.points\[0\]"),
        ("vascular", r"others\[0\]: expected an object"),
    ],
)
def test_malformed_other_finding_raises_dataset_error(
    tmp_path: Path, other: Any, message: str
) -> None:
    manifest = _write_lines(tmp_path / "m.jsonl", _valid_line(others=[other]))
    with pytest.raises(DatasetError, match=message):
        read_manifest(manifest)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rows": 0}, "rows and columns must be positive"),
        ({"columns": -5}, "rows and columns must be positive"),
        ({"rows": "many"}, r"m\.jsonl:1: rows, columns or pixel_spacing_mm malformed"),
        ({"pixel_spacing_mm": [0.1]}, r"m\.jsonl:1: pixel_spacing_mm must hold \[row, col\]"),
        ({"pixel_spacing_mm": [0.1, -0.1]}, "pixel_spacing_mm must be two positive numbers"),
        ({"pixel_spacing_mm": 0.1}, r"m\.jsonl:1: rows, columns or pixel_spacing_mm malformed"),
        ({"sop_instance_uid": ""}, "sop_instance_uid is empty"),
    ],
)
def test_invalid_image_geometry_raises_dataset_error(
    tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    manifest = _write_lines(tmp_path / "m.jsonl", _valid_line(**overrides))
    with pytest.raises(DatasetError, match=message):
        read_manifest(manifest)


def test_line_that_is_not_an_object_raises_dataset_error(tmp_path: Path) -> None:
    manifest = _write_lines(tmp_path / "m.jsonl", "[1, 2, 3]")
    with pytest.raises(DatasetError, match=r"m\.jsonl:1: expected a JSON object"):
        read_manifest(manifest)


def test_constructors_reject_invalid_values_directly(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="diameter_mm must be positive"):
        Calcification(x=1.0, y=2.0, diameter_mm=-1.0)
    with pytest.raises(DatasetError, match="finite"):
        Calcification(x=float("inf"), y=2.0)
    with pytest.raises(DatasetError, match="non-empty kind"):
        OtherFinding(kind="", points=((1.0, 2.0),))
    with pytest.raises(DatasetError, match="pixel_spacing_mm"):
        _record(tmp_path / "x.dcm", pixel_spacing_mm=(0.07,))


@pytest.mark.parametrize(
    "overrides",
    [
        {"calcifications": [{"x": 1, "y": 2, "diameter_mm": "big"}]},
        {"calcifications": 5},
        {"tags": ["vendor", "hologic"]},
        {"calcifications": [{"x": 1, "y": 2, "diameter_mm": -1}]},
    ],
)
def test_wrongly_typed_values_raise_dataset_error_naming_the_line(
    tmp_path: Path, overrides: dict[str, Any]
) -> None:
    manifest = _write_lines(tmp_path / "m.jsonl", _valid_line(**overrides))
    with pytest.raises(DatasetError) as info:
        read_manifest(manifest)
    assert "m.jsonl:1" in str(info.value)
