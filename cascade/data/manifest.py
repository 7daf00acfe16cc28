"""The dataset manifest: one JSON Lines format for training and evaluation.

Each line describes one image and its ground truth. Coordinates are in the stored
image's own pixel grid: ``x`` = column, ``y`` = row, 0-based, the centre of the first
pixel at ``(0, 0)``. The format is documented in ``docs/dataset-format.md``.

Example line (wrapped here)::

    {"path": "s0001/L-CC.dcm", "sop_instance_uid": "1.2.3", "rows": 1000,
     "columns": 1400, "pixel_spacing_mm": [0.07, 0.07],
     "calcifications": [{"x": 510.2, "y": 233.0, "diameter_mm": 0.31}],
     "others": [{"kind": "vascular", "points": [[10, 20], [30, 25]], "closed": false}],
     "clusters": [{"points": [[500, 220], [530, 220], [520, 250]]}],
     "tags": {"vendor": "hologic", "density": "scattered"}}
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cascade.errors import DatasetError

__all__ = [
    "MANIFEST_SCHEMA",
    "Calcification",
    "ImageRecord",
    "OtherFinding",
    "iter_manifest",
    "read_manifest",
    "write_manifest",
]

#: Version of the manifest format, written into every record as ``"schema"``.
MANIFEST_SCHEMA = 1

#: Largest diameter (mm) that still counts as a microcalcification.
MAX_MICRO_DIAMETER_MM = 1.0


def _point(value: Any, what: str) -> tuple[float, float]:
    try:
        x, y = value
        xf, yf = float(x), float(y)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{what}: expected an [x, y] pair, got {value!r}") from exc
    if not (math.isfinite(xf) and math.isfinite(yf)):
        raise DatasetError(f"{what}: coordinates must be finite, got {value!r}")
    return xf, yf


def _points(values: Any, what: str) -> tuple[tuple[float, float], ...]:
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise DatasetError(f"{what}: expected a list of [x, y] pairs")
    return tuple(_point(v, f"{what}[{i}]") for i, v in enumerate(values))


@dataclass(frozen=True)
class Calcification:
    """One microcalcification (≤ 1 mm): centre and, when known, size and outline.

    Parameters
    ----------
    x, y : float
        Centre, x = column and y = row of the stored image, 0-based.
    diameter_mm : float or None
        Equivalent diameter in millimetres, when known.
    outline : tuple of (x, y) or None
        Closed polygon of the calcification's border, same convention, when known.
    """

    x: float
    y: float
    diameter_mm: float | None = None
    outline: tuple[tuple[float, float], ...] | None = None

    def __post_init__(self) -> None:
        _point((self.x, self.y), "calcification centre")
        if self.diameter_mm is not None and not (self.diameter_mm > 0):
            raise DatasetError(f"diameter_mm must be positive, got {self.diameter_mm!r}")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"x": round(self.x, 3), "y": round(self.y, 3)}
        if self.diameter_mm is not None:
            out["diameter_mm"] = round(self.diameter_mm, 4)
        if self.outline is not None:
            out["outline"] = [[round(x, 2), round(y, 2)] for x, y in self.outline]
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str) -> Calcification:
        if not isinstance(data, Mapping) or "x" not in data or "y" not in data:
            raise DatasetError(f"{where}: a calcification needs 'x' and 'y'")
        x, y = _point((data["x"], data["y"]), where)
        dia = data.get("diameter_mm")
        outline = data.get("outline")
        return cls(
            x=x,
            y=y,
            diameter_mm=None if dia is None else float(dia),
            outline=None if outline is None else _points(outline, f"{where}.outline"),
        )


@dataclass(frozen=True)
class OtherFinding:
    """A calcification or structure that is not a µC (vascular, macro, > 1 mm …).

    Never a positive; left out of the ASN's loss; a negative for the FPR (see
    docs/dataset-format.md). A detection on it is not
    counted as a false positive by evaluation tools that choose to ignore it.

    Parameters
    ----------
    kind : str
        Free label, e.g. ``"vascular"``, ``"macro"``, ``"calcification"``.
    points : tuple of (x, y)
        A point (one pair), a polyline or an outline, x = column, y = row.
    closed : bool
        True when ``points`` is a closed outline.
    """

    kind: str
    points: tuple[tuple[float, float], ...]
    closed: bool = False

    def __post_init__(self) -> None:
        if not self.kind:
            raise DatasetError("an 'other' finding needs a non-empty kind")
        if not self.points:
            raise DatasetError(f"the {self.kind!r} finding has no points")

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "points": [[round(x, 2), round(y, 2)] for x, y in self.points],
            "closed": self.closed,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str) -> OtherFinding:
        if not isinstance(data, Mapping):
            raise DatasetError(f"{where}: expected an object")
        return cls(
            kind=str(data.get("kind", "")),
            points=_points(data.get("points", []), f"{where}.points"),
            closed=bool(data.get("closed", False)),
        )


@dataclass(frozen=True)
class ImageRecord:
    """One manifest line: an image file and its ground truth.

    Parameters
    ----------
    path : Path
        The DICOM file. Relative paths in a manifest file are relative to the
        manifest's folder; :func:`read_manifest` resolves them.
    sop_instance_uid : str
        The image's SOP Instance UID.
    rows, columns : int
        Size of the stored pixel grid.
    pixel_spacing_mm : (float, float)
        (row spacing, column spacing) in millimetres, as used for the 1-mm rule.
    calcifications : tuple of Calcification
        The microcalcifications (the positives).
    others : tuple of OtherFinding
        Calcifications and structures that are not µCs.
    clusters : tuple of tuple of (x, y)
        Cluster outlines, when annotated.
    study_instance_uid : str or None
        Study the image belongs to.
    tags : dict
        Free description (vendor, density, view, …) for stratified reports.
    """

    path: Path
    sop_instance_uid: str
    rows: int
    columns: int
    pixel_spacing_mm: tuple[float, float]
    calcifications: tuple[Calcification, ...] = ()
    others: tuple[OtherFinding, ...] = ()
    clusters: tuple[tuple[tuple[float, float], ...], ...] = ()
    study_instance_uid: str | None = None
    tags: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.sop_instance_uid:
            raise DatasetError(f"{self.path}: sop_instance_uid is empty")
        if self.rows <= 0 or self.columns <= 0:
            raise DatasetError(f"{self.path}: rows and columns must be positive")
        if len(self.pixel_spacing_mm) != 2 or not all(
            0 < s < math.inf for s in self.pixel_spacing_mm
        ):
            raise DatasetError(
                f"{self.path}: pixel_spacing_mm must be two positive numbers, "
                f"got {self.pixel_spacing_mm!r}"
            )

    def to_json(self, relative_to: Path | None = None) -> dict[str, Any]:
        """Return the JSON object of this record (paths relative to ``relative_to``)."""
        path = self.path
        if relative_to is not None:
            try:
                path = self.path.resolve().relative_to(relative_to.resolve())
            except ValueError:
                path = self.path.resolve()
        out: dict[str, Any] = {
            "schema": MANIFEST_SCHEMA,
            "path": path.as_posix(),
            "sop_instance_uid": self.sop_instance_uid,
            "rows": self.rows,
            "columns": self.columns,
            "pixel_spacing_mm": [float(s) for s in self.pixel_spacing_mm],
            "calcifications": [c.to_json() for c in self.calcifications],
            "others": [o.to_json() for o in self.others],
            "clusters": [
                {"points": [[round(x, 2), round(y, 2)] for x, y in c]} for c in self.clusters
            ],
        }
        if self.study_instance_uid:
            out["study_instance_uid"] = self.study_instance_uid
        if self.tags:
            out["tags"] = dict(self.tags)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, base: Path, where: str) -> ImageRecord:
        """Build a record from one decoded manifest line; ``base`` resolves relative paths."""
        if not isinstance(data, Mapping):
            raise DatasetError(f"{where}: expected a JSON object")
        schema = data.get("schema", MANIFEST_SCHEMA)
        if schema != MANIFEST_SCHEMA:
            raise DatasetError(
                f"{where}: manifest schema {schema!r} is not supported "
                f"(this calcnode reads schema {MANIFEST_SCHEMA})"
            )
        for key in ("path", "sop_instance_uid", "rows", "columns", "pixel_spacing_mm"):
            if key not in data:
                raise DatasetError(f"{where}: missing required key {key!r}")
        if not isinstance(data["sop_instance_uid"], str):
            raise DatasetError(f"{where}: sop_instance_uid must be a string")
        path = Path(str(data["path"]))
        if not path.is_absolute():
            path = base / path
        try:
            spacing = tuple(float(s) for s in data["pixel_spacing_mm"])
            rows, columns = data["rows"], data["columns"]
            if not (isinstance(rows, int) and isinstance(columns, int)):
                raise TypeError("rows and columns must be integers")
        except (TypeError, ValueError) as exc:
            raise DatasetError(f"{where}: rows, columns or pixel_spacing_mm malformed") from exc
        if len(spacing) != 2:
            raise DatasetError(f"{where}: pixel_spacing_mm must hold [row, col]")
        calcs = data.get("calcifications", [])
        others = data.get("others", [])
        clusters = data.get("clusters", [])
        return cls(
            path=path,
            sop_instance_uid=str(data["sop_instance_uid"]),
            rows=rows,
            columns=columns,
            pixel_spacing_mm=(spacing[0], spacing[1]),
            calcifications=tuple(
                Calcification.from_json(c, f"{where}.calcifications[{i}]")
                for i, c in enumerate(calcs)
            ),
            others=tuple(
                OtherFinding.from_json(o, f"{where}.others[{i}]") for i, o in enumerate(others)
            ),
            clusters=tuple(
                _points(
                    c.get("points", []) if isinstance(c, Mapping) else c, f"{where}.clusters[{i}]"
                )
                for i, c in enumerate(clusters)
            ),
            study_instance_uid=data.get("study_instance_uid"),
            tags=dict(data.get("tags", {})),
        )


def iter_manifest(path: str | Path) -> Iterator[ImageRecord]:
    """Yield the records of a JSON Lines manifest; blank lines and ``#`` lines are skipped.

    Raises
    ------
    DatasetError
        When the file is missing or a line is not a valid record (the message
        names the file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"manifest {path} does not exist")
    base = path.parent
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            where = f"{path}:{lineno}"
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{where}: not valid JSON ({exc.msg})") from exc
            try:
                record = ImageRecord.from_json(data, base=base, where=where)
            except DatasetError as exc:
                # Constructor checks (diameter, kind, spacing) do not know the line.
                if str(exc).startswith(where):
                    raise
                raise DatasetError(f"{where}: {exc}") from exc
            except (TypeError, ValueError) as exc:
                raise DatasetError(f"{where}: malformed value ({exc})") from exc
            yield record


def read_manifest(path: str | Path) -> list[ImageRecord]:
    """Read a whole manifest; see :func:`iter_manifest`."""
    return list(iter_manifest(path))


def write_manifest(path: str | Path, records: Iterable[ImageRecord]) -> Path:
    """Write records as JSON Lines, paths relative to the manifest's folder when possible.

    The file is written to a temporary name and renamed, so a reader never sees
    half a manifest.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record.to_json(relative_to=path.parent)) + "\n")
    tmp.replace(path)
    return path
