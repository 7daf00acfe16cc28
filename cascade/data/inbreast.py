"""INbreast import: OsiriX XML annotations + DICOM headers → a dataset manifest.

INbreast ships one OsiriX XML property list per annotated image, named
``<number>.xml``, where ``<number>`` is the first ``_``-separated token of the DICOM
file name (``<number>_<hash>_MG_<lat>_<view>_ANON.dcm``). Each file holds a dict with
``"Images"`` → list of dicts, each with ``"ROIs"`` → list of dicts whose ``"Name"``
says what was drawn and whose ``"Point_px"`` holds the vertices as strings
``"(x, y)"``, x = column and y = row of the stored pixel grid.

Mapping rules (documented in ``docs/dataset-format.md``):

* ROIs named ``Calcification``, ``Calcifications``, ``Unnamed`` or ``Point 3``
  (case-insensitive) are calcifications. One distinct point → a point µC (no size).
  Several points → an outline: centre = polygon (area) centroid, size = maximum
  Feret diameter (largest distance between two vertices, in mm). Larger than
  :data:`~cascade.data.manifest.MAX_MICRO_DIAMETER_MM` (1 mm) → an "other" finding of
  kind ``"calcification"``, not a µC.
* ``Cluster`` → a cluster outline.
* Any other name (``Mass``, ``Spiculated Region``, ``Asymmetry``, …) → an "other"
  finding whose kind is the name in lower case.

Coordinates: OsiriX places ``(0, 0)`` at the top-left **corner** of the first pixel
(a pixel ``(c, r)`` covers ``[c, c + 1) × [r, r + 1)``, which is also what every
public INbreast loader assumes when it truncates ``Point_px`` to an index). The
manifest puts the first pixel's **centre** at ``(0, 0)``, so every point is shifted
by :data:`OSIRIX_TO_MANIFEST_OFFSET` (−0.5 px) on both axes — a sub-pixel matter.
"""

from __future__ import annotations

import logging
import math
import plistlib
import re
import xml.parsers.expat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from cascade.data.manifest import (
    MAX_MICRO_DIAMETER_MM,
    Calcification,
    ImageRecord,
    OtherFinding,
    write_manifest,
)
from cascade.errors import DatasetError

__all__ = [
    "CALCIFICATION_NAMES",
    "CLUSTER_NAMES",
    "OSIRIX_TO_MANIFEST_OFFSET",
    "InbreastFindings",
    "InbreastRoi",
    "convert_inbreast",
    "findings_from_rois",
    "parse_inbreast_xml",
    "parse_point",
]

logger = logging.getLogger(__name__)

#: ROI names (lower case) that INbreast uses for calcifications.
CALCIFICATION_NAMES = frozenset({"calcification", "calcifications", "unnamed", "point 3"})

#: ROI names (lower case) that outline a cluster of calcifications.
CLUSTER_NAMES = frozenset({"cluster"})

#: Added to OsiriX ``Point_px`` coordinates (corner origin) to get the manifest's
#: convention (first pixel's centre at (0, 0)).
OSIRIX_TO_MANIFEST_OFFSET = -0.5

#: How far (pixels) a point may lie outside the image before the XML is rejected
#: as belonging to another image.
_BOUNDS_TOLERANCE_PX = 2.0

#: Tolerance of the 1-mm rule against floating-point rounding.
_SIZE_EPS_MM = 1e-9

_POINT_RE = re.compile(r"^\s*\(\s*([^,()\s]+)\s*,\s*([^,()\s]+)\s*\)\s*$")

Point = tuple[float, float]


@dataclass(frozen=True)
class InbreastRoi:
    """One ROI of an INbreast XML file, as stored (no coordinate shift applied).

    Parameters
    ----------
    name : str
        The ROI's ``"Name"`` as written (``"Calcification"``, ``"Mass"``, …).
    points : tuple of (x, y)
        ``Point_px`` parsed to floats: x = column, y = row, OsiriX convention
        (top-left corner of the first pixel at (0, 0)).
    image_index : int
        ``"ImageIndex"`` of the image entry the ROI belongs to (0 in INbreast).
    roi_index : int
        0-based position of the ROI in that image's ``"ROIs"`` list.
    """

    name: str
    points: tuple[Point, ...]
    image_index: int = 0
    roi_index: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"InbreastRoi.name must be a non-empty string, got {self.name!r}")
        if not self.points:
            raise ValueError("InbreastRoi.points must hold at least one (x, y) point")
        for x, y in self.points:
            if not (math.isfinite(x) and math.isfinite(y)):
                raise ValueError(f"InbreastRoi.points must be finite, got {(x, y)!r}")

    @property
    def kind(self) -> str:
        """The name in lower case with runs of white space collapsed (``"point 3"``)."""
        return " ".join(self.name.split()).lower()


@dataclass(frozen=True)
class InbreastFindings:
    """The ground truth of one image, in the manifest's convention.

    Every coordinate is x = column, y = row, 0-based, first pixel's centre at (0, 0).

    Parameters
    ----------
    calcifications : tuple of Calcification
        The µCs (≤ 1 mm or of unknown size).
    others : tuple of OtherFinding
        Calcifications > 1 mm (kind ``"calcification"``) and other lesions.
    clusters : tuple of tuple of (x, y)
        Cluster outlines.
    """

    calcifications: tuple[Calcification, ...] = ()
    others: tuple[OtherFinding, ...] = ()
    clusters: tuple[tuple[Point, ...], ...] = ()


# --------------------------------------------------------------------------- XML
def parse_point(text: str, *, where: str = "point") -> Point:
    """Parse an OsiriX point string ``"(x, y)"`` into floats.

    Parameters
    ----------
    text : str
        E.g. ``"(1234.5, 678.25)"``; x = column, y = row.
    where : str
        Names the file and ROI in error messages.

    Returns
    -------
    (float, float)
        ``(x, y)`` exactly as written (no coordinate shift).

    Raises
    ------
    DatasetError
        When the string is not two finite numbers in parentheses.
    """
    if not isinstance(text, str):
        raise DatasetError(f"{where}: expected a point string '(x, y)', got {text!r}")
    match = _POINT_RE.match(text)
    if match is None:
        raise DatasetError(f"{where}: malformed point string {text!r} (expected '(x, y)')")
    try:
        x, y = float(match.group(1)), float(match.group(2))
    except ValueError as exc:
        raise DatasetError(f"{where}: malformed point string {text!r} (not numbers)") from exc
    if not (math.isfinite(x) and math.isfinite(y)):
        raise DatasetError(f"{where}: point {text!r} is not finite")
    return x, y


def _int_or(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def parse_inbreast_xml(path: str | Path) -> list[InbreastRoi]:
    """Read the ROIs of one INbreast OsiriX XML (Apple plist) file.

    Parameters
    ----------
    path : str or Path
        The ``<number>.xml`` file.

    Returns
    -------
    list of InbreastRoi
        Every ROI of every image entry, in file order; points as stored
        (x = column, y = row, OsiriX corner origin). Empty when the file holds
        no ROI.

    Raises
    ------
    DatasetError
        When the file cannot be read or parsed, lacks ``"Images"``, or an ROI has
        no name, no points or a malformed point string (the message names the
        file and the ROI).
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = plistlib.load(fh, fmt=plistlib.FMT_XML)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except (plistlib.InvalidFileException, xml.parsers.expat.ExpatError, ValueError) as exc:
        raise DatasetError(f"{path}: not a valid OsiriX XML property list ({exc})") from exc
    if not isinstance(data, Mapping) or not isinstance(data.get("Images"), list):
        raise DatasetError(f"{path}: expected a dict with an 'Images' list at the top")

    rois: list[InbreastRoi] = []
    for pos, image in enumerate(data["Images"]):
        if not isinstance(image, Mapping):
            raise DatasetError(f"{path}: Images[{pos}] is not a dict")
        image_index = _int_or(image.get("ImageIndex"), pos)
        roi_list = image.get("ROIs", [])
        if not isinstance(roi_list, list):
            raise DatasetError(f"{path}: Images[{pos}].ROIs is not a list")
        declared = image.get("NumberOfROIs")
        if declared is not None and _int_or(declared, -1) != len(roi_list):
            logger.warning(
                "%s: NumberOfROIs says %s but %d ROIs are listed; using the list",
                path,
                declared,
                len(roi_list),
            )
        for index, roi in enumerate(roi_list):
            rois.append(_parse_roi(roi, path=path, image_index=image_index, roi_index=index))
    return rois


def _parse_roi(roi: Any, *, path: Path, image_index: int, roi_index: int) -> InbreastRoi:
    where = f"{path}: ROI {roi_index}"
    if not isinstance(roi, Mapping):
        raise DatasetError(f"{where}: expected a dict")
    name = roi.get("Name")
    if not isinstance(name, str) or not name.strip():
        raise DatasetError(f"{where}: missing or empty 'Name'")
    where = f"{path}: ROI {roi_index} ({name!r})"
    raw = roi.get("Point_px")
    if not isinstance(raw, list):
        raise DatasetError(f"{where}: 'Point_px' missing or not a list")
    if not raw:
        raise DatasetError(f"{where}: 'Point_px' holds no point")
    points = tuple(parse_point(p, where=f"{where} Point_px[{i}]") for i, p in enumerate(raw))
    declared = roi.get("NumberOfPoints")
    if declared is not None and _int_or(declared, -1) != len(points):
        logger.warning(
            "%s: NumberOfPoints says %s but %d points are listed; using the list",
            where,
            declared,
            len(points),
        )
    return InbreastRoi(name=name, points=points, image_index=image_index, roi_index=roi_index)


# --------------------------------------------------------------------------- geometry
def _distinct(points: Sequence[Point]) -> list[Point]:
    """Drop repeated consecutive vertices and a closing vertex equal to the first."""
    out: list[Point] = []
    for p in points:
        if not out or p != out[-1]:
            out.append(p)
    if len(out) > 1 and out[0] == out[-1]:
        out.pop()
    return out


def _centroid(points: Sequence[Point]) -> Point:
    """Area centroid of a simple polygon; vertex mean when it has (almost) no area."""
    xy = np.asarray(points, dtype=float)
    if len(xy) < 3:
        return float(xy[:, 0].mean()), float(xy[:, 1].mean())
    x, y = xy[:, 0], xy[:, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    area2 = cross.sum()
    if abs(area2) < 1e-9:
        return float(x.mean()), float(y.mean())
    cx = ((x + xn) * cross).sum() / (3.0 * area2)
    cy = ((y + yn) * cross).sum() / (3.0 * area2)
    return float(cx), float(cy)


def _max_feret_mm(points: Sequence[Point], pixel_spacing_mm: tuple[float, float]) -> float:
    """Largest distance (mm) between two vertices; spacing is (row, column) mm."""
    xy = np.asarray(points, dtype=float)
    mm = xy * np.array([pixel_spacing_mm[1], pixel_spacing_mm[0]])
    diff = mm[:, None, :] - mm[None, :, :]
    return float(np.sqrt((diff**2).sum(axis=-1)).max())


def findings_from_rois(
    rois: Iterable[InbreastRoi],
    *,
    pixel_spacing_mm: tuple[float, float],
    image_size: tuple[int, int] | None = None,
    where: str = "INbreast XML",
) -> InbreastFindings:
    """Map INbreast ROIs to the manifest's µCs, other findings and clusters.

    Parameters
    ----------
    rois : iterable of InbreastRoi
        ROIs as parsed by :func:`parse_inbreast_xml` (OsiriX corner origin).
    pixel_spacing_mm : (float, float)
        (row spacing, column spacing) of the stored image in millimetres.
    image_size : (int, int) or None
        ``(rows, columns)``; when given, a point more than 2 pixels outside the
        image is an error (the XML most likely belongs to another image).
    where : str
        Names the XML file in error messages.

    Returns
    -------
    InbreastFindings
        Coordinates shifted to the manifest's convention: x = column, y = row,
        0-based, first pixel's centre at (0, 0).

    Raises
    ------
    DatasetError
        When a point lies outside the image.
    ValueError
        When ``pixel_spacing_mm`` is not two positive numbers.
    """
    if len(pixel_spacing_mm) != 2 or not all(s > 0 for s in pixel_spacing_mm):
        raise ValueError(f"pixel_spacing_mm must be two positive numbers, got {pixel_spacing_mm!r}")
    calcs: list[Calcification] = []
    others: list[OtherFinding] = []
    clusters: list[tuple[Point, ...]] = []
    off = OSIRIX_TO_MANIFEST_OFFSET
    for roi in rois:
        label = f"{where}: ROI {roi.roi_index} ({roi.name!r})"
        points = tuple((x + off, y + off) for x, y in roi.points)
        if image_size is not None:
            _check_bounds(points, image_size, label)
        kind = roi.kind
        if kind in CLUSTER_NAMES:
            clusters.append(points)
        elif kind in CALCIFICATION_NAMES:
            raw = _distinct(roi.points)
            vertices = [(x + off, y + off) for x, y in raw]
            if len(vertices) == 1:
                calcs.append(Calcification(x=vertices[0][0], y=vertices[0][1]))
                continue
            cx, cy = _centroid(vertices)
            # Measured on the points as written: the shift changes nothing but rounding,
            # and a 10-px segment at 0.1 mm must come out as exactly 1 mm (still a µC).
            diameter = _max_feret_mm(raw, pixel_spacing_mm)
            if diameter > MAX_MICRO_DIAMETER_MM + _SIZE_EPS_MM:
                others.append(
                    OtherFinding(
                        kind="calcification", points=tuple(vertices), closed=len(vertices) >= 3
                    )
                )
            else:
                outline = tuple(vertices) if len(vertices) >= 3 else None
                calcs.append(Calcification(x=cx, y=cy, diameter_mm=diameter, outline=outline))
        else:
            others.append(OtherFinding(kind=kind, points=points, closed=len(points) >= 3))
    return InbreastFindings(
        calcifications=tuple(calcs), others=tuple(others), clusters=tuple(clusters)
    )


def _check_bounds(points: Sequence[Point], image_size: tuple[int, int], label: str) -> None:
    rows, columns = image_size
    tol = _BOUNDS_TOLERANCE_PX
    back = -OSIRIX_TO_MANIFEST_OFFSET  # to quote the point as the XML writes it
    for x, y in points:
        if not (-0.5 - tol <= x <= columns - 0.5 + tol and -0.5 - tol <= y <= rows - 0.5 + tol):
            raise DatasetError(
                f"{label}: point (x={x + back:g}, y={y + back:g}) as written lies outside the "
                f"{columns}×{rows} image (columns × rows); is the XML paired with the right DICOM?"
            )


# --------------------------------------------------------------------------- DICOM
@dataclass(frozen=True)
class _Header:
    sop_instance_uid: str
    study_instance_uid: str | None
    rows: int
    columns: int
    pixel_spacing_mm: tuple[float, float]
    laterality: str | None
    view: str | None
    manufacturer: str | None


def _spacing(ds: pydicom.Dataset) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is None:
            continue
        try:
            row, col = (float(v) for v in value)
        except (TypeError, ValueError):
            continue
        if row > 0 and col > 0 and math.isfinite(row) and math.isfinite(col):
            return row, col
    return None


def _read_header(path: Path) -> _Header:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise DatasetError(f"{path}: not a readable DICOM file ({exc})") from exc
    uid = str(ds.get("SOPInstanceUID", "") or "").strip()
    if not uid:
        raise DatasetError(f"{path}: no SOPInstanceUID")
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError) as exc:
        raise DatasetError(f"{path}: Rows/Columns missing or malformed") from exc
    spacing = _spacing(ds)
    if spacing is None:
        raise DatasetError(f"{path}: neither PixelSpacing nor ImagerPixelSpacing is usable")
    study = str(ds.get("StudyInstanceUID", "") or "").strip() or None
    laterality = str(ds.get("ImageLaterality", "") or ds.get("Laterality", "") or "").strip()
    view = str(ds.get("ViewPosition", "") or "").strip()
    manufacturer = str(ds.get("Manufacturer", "") or "").strip()
    return _Header(
        sop_instance_uid=uid,
        study_instance_uid=study,
        rows=rows,
        columns=columns,
        pixel_spacing_mm=spacing,
        laterality=laterality.upper() or None,
        view=view.upper() or None,
        manufacturer=manufacturer.lower() or None,
    )


def _name_tags(path: Path) -> dict[str, str]:
    """Number, case key, laterality and view from ``<number>_<hash>_MG_<lat>_<view>_ANON.dcm``.

    Laterality and view may come in either order after ``MG``.
    """
    tokens = path.stem.split("_")
    tags: dict[str, str] = {"inbreast_id": tokens[0]}
    if len(tokens) > 1 and tokens[1].upper() != "MG":
        # The second token is INbreast's pseudonymous case (patient) key: what a
        # leakage-free split groups by. It is in the path anyway.
        tags["inbreast_case"] = tokens[1]
    upper = [t.upper() for t in tokens]
    if "MG" in upper:
        for token in upper[upper.index("MG") + 1 :]:
            if token in ("L", "R"):
                tags.setdefault("laterality", token)
            elif token.isalpha() and token != "ANON":
                tags.setdefault("view", token)
    return tags


def _index_files(folder: Path, suffix: str, what: str) -> dict[str, Path]:
    """Map the first ``_`` token of each file name to the file, refusing duplicates."""
    if not folder.is_dir():
        raise DatasetError(f"{what} folder {folder} does not exist")
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        # Skip macOS resource forks ("._1234.xml") and other hidden files.
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() != suffix:
            continue
        key = path.stem.split("_")[0] if suffix == ".dcm" else path.stem
        if key in found:
            raise DatasetError(
                f"two {what} files share the INbreast number {key!r}: {found[key]} and {path}"
            )
        found[key] = path
    return found


def _sort_key(key: str) -> tuple[int, int | str]:
    return (0, int(key)) if key.isdigit() else (1, key)


def convert_inbreast(*, xml_dir: str | Path, dicom_dir: str | Path, out: str | Path) -> Path:
    """Write a manifest for INbreast from its XML annotations and DICOM files.

    Every DICOM file (``*.dcm``, searched recursively) becomes one record. Its XML
    is ``<xml_dir>/<number>.xml`` where ``<number>`` is the first ``_`` token of the
    DICOM file name; an image without XML is a normal image (no findings), an XML
    without DICOM is skipped with a warning. Only DICOM headers are read.

    Parameters
    ----------
    xml_dir : str or Path
        Folder of the OsiriX XML files (``AllXML`` in the distribution).
    dicom_dir : str or Path
        Folder of the DICOM files (``AllDICOMs``).
    out : str or Path
        The manifest to write (JSON Lines). Image paths are written relative to
        its folder when they lie below it, absolute otherwise.

    Returns
    -------
    Path
        ``out``.

    Raises
    ------
    DatasetError
        When a folder is missing, no DICOM file is found, a DICOM header lacks
        what the manifest needs, two files share a number or a UID, or an XML is
        malformed (the message names the file and ROI).
    """
    xml_dir, dicom_dir, out = Path(xml_dir), Path(dicom_dir), Path(out)
    xmls = _index_files(xml_dir, ".xml", "XML")
    dicoms = _index_files(dicom_dir, ".dcm", "DICOM")
    if not dicoms:
        raise DatasetError(f"no DICOM (*.dcm) file found in {dicom_dir}")
    for key in sorted(set(xmls) - set(dicoms), key=_sort_key):
        logger.warning("INbreast XML %s has no DICOM file; skipped", xmls[key].name)

    records: list[ImageRecord] = []
    seen_uids: dict[str, Path] = {}
    n_calc = n_other = n_cluster = n_annotated = 0
    for key in sorted(dicoms, key=_sort_key):
        dcm = dicoms[key]
        header = _read_header(dcm)
        if header.sop_instance_uid in seen_uids:
            raise DatasetError(
                f"{dcm} and {seen_uids[header.sop_instance_uid]} share the SOP Instance UID "
                f"{header.sop_instance_uid}"
            )
        seen_uids[header.sop_instance_uid] = dcm
        findings = InbreastFindings()
        if key in xmls:
            n_annotated += 1
            findings = findings_from_rois(
                parse_inbreast_xml(xmls[key]),
                pixel_spacing_mm=header.pixel_spacing_mm,
                image_size=(header.rows, header.columns),
                where=str(xmls[key]),
            )
        tags: dict[str, Any] = {"source": "inbreast", **_name_tags(dcm)}
        if header.laterality:
            tags.setdefault("laterality", header.laterality)
        if header.view:
            tags.setdefault("view", header.view)
        if header.manufacturer:
            tags["vendor"] = header.manufacturer
        records.append(
            ImageRecord(
                path=dcm.resolve(),
                sop_instance_uid=header.sop_instance_uid,
                rows=header.rows,
                columns=header.columns,
                pixel_spacing_mm=header.pixel_spacing_mm,
                calcifications=findings.calcifications,
                others=findings.others,
                clusters=findings.clusters,
                study_instance_uid=header.study_instance_uid,
                tags=tags,
            )
        )
        n_calc += len(findings.calcifications)
        n_other += len(findings.others)
        n_cluster += len(findings.clusters)

    path = write_manifest(out, records)
    logger.info(
        "INbreast: %d images (%d with XML), %d µCs, %d other findings, %d clusters → %s",
        len(records),
        n_annotated,
        n_calc,
        n_other,
        n_cluster,
        path,
    )
    return path
