"""Clusters of µCs: how the CAD report groups detections, and how such groups are scored.

A reader acts on a cluster mark, not on one µC, so the report and its evaluation use
one grouping, :func:`group_points`: single linkage, two points linked when their
centres lie within ``cluster_distance_mm`` (5 mm), a connected group of at least
``min_cluster_size`` (3) points being a cluster. The CAD SR, the TID 1500 report and the
GSPS group an image's detections with :func:`cluster_detections` (a thin wrapper);
:func:`cluster_froc` scores the same groups against truth clusters.

The rule (decisions):

* a **reported cluster** is a group of ≥ ``min_cluster_size`` kept detections; smaller
  groups are isolated findings and never a cluster mark;
* a truth cluster is **found** when one reported cluster holds ≥ ``min_hits`` (2) of its
  µCs, a µC being held when a member detection lies within ``radius_mm`` (1 mm, the µC
  FROC's rule, inclusive) of it; several reported clusters finding one truth cluster find
  it once, and one reported cluster may find two truth clusters;
* a **false cluster mark** is a reported cluster that finds no truth cluster (isolated µCs
  of the truth do not make a mark true);
* a **normal image** is one without µCs; false marks per normal image = false marks on
  normal images / normal images (None when there is none);
* operating points are the distinct detection scores pooled over all images, decreasing,
  as in :func:`cascade.evaluation.froc.froc`; unlike the µC FROC, false marks need not
  grow as the threshold falls (a new detection can merge two false marks into one).

Truth clusters (:func:`truth_clusters`): the manifest stores cluster *outlines* (the
phantom writes each cluster's convex hull, ``ImageRecord.clusters``; INbreast its
"Cluster" ROIs), no cluster id per µC. A µC belongs to every outline it lies in or on
(within ``0.05`` mm, the manifest rounds coordinates). A data set whose records hold no
outline at all gets its truth clusters from the report's own rule applied to the truth
µCs (``source="rule"``); ``source="auto"`` picks per data set (:func:`truth_source`).

Coordinates: ``(x, y)``, x = column, y = row, 0-based, first pixel's centre at
``(0, 0)``, in the image's own grid; distances in mm with its ``(row, col)`` spacing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from cascade.evaluation.froc import ImageEval

__all__ = [
    "CLUSTER_DISTANCE_MM",
    "MIN_CLUSTER_SIZE",
    "MIN_HITS",
    "Cluster",
    "ClusterCase",
    "ClusterFroc",
    "ClusterPoint",
    "cases_from_records",
    "cluster_detections",
    "cluster_froc",
    "cluster_point",
    "group_points",
    "summary_json",
    "truth_clusters",
    "truth_source",
]

logger = logging.getLogger(__name__)

#: The report's linkage distance (mm) and smallest cluster (detections).
CLUSTER_DISTANCE_MM = 5.0
MIN_CLUSTER_SIZE = 3
#: µCs of a truth cluster a reported cluster must hold to find it.
MIN_HITS = 2
#: Tolerance (mm) of "on an outline": the manifest rounds coordinates to 0.01 px.
OUTLINE_TOLERANCE_MM = 0.05

_REL_TOL = 1e-9


@dataclass(frozen=True)
class Cluster:
    """A group of detections of one image; ``indices`` index ``ImageDetections.detections``."""

    indices: tuple[int, ...]
    is_cluster: bool


class _Point(Protocol):
    @property
    def x(self) -> float: ...
    @property
    def y(self) -> float: ...


class PointsImage(Protocol):
    """An image's detections as the grouping reads them (``ImageDetections`` satisfies it)."""

    @property
    def pixel_spacing_mm(self) -> tuple[float, float]: ...
    @property
    def detections(self) -> Sequence[_Point]: ...


def _check_grouping(cluster_distance_mm: float, min_cluster_size: int) -> None:
    if not (isinstance(cluster_distance_mm, (int, float)) and cluster_distance_mm > 0):
        raise ValueError(f"cluster_distance_mm must be positive, got {cluster_distance_mm!r}")
    if isinstance(min_cluster_size, bool) or not isinstance(min_cluster_size, int):
        raise TypeError("min_cluster_size must be an int")
    if min_cluster_size < 2:
        raise ValueError(f"min_cluster_size must be ≥ 2, got {min_cluster_size}")


def group_points(
    xy: np.ndarray,
    spacing_mm: tuple[float, float],
    *,
    cluster_distance_mm: float = CLUSTER_DISTANCE_MM,
    min_cluster_size: int = MIN_CLUSTER_SIZE,
) -> list[Cluster]:
    """Group points of one image by single linkage within ``cluster_distance_mm``.

    Parameters
    ----------
    xy : numpy.ndarray
        ``(N, 2)`` points, x = column, y = row.
    spacing_mm : tuple of float
        ``(row, column)`` spacing of their grid in mm.
    cluster_distance_mm : float
        Two points whose centres are at most this far apart are linked.
    min_cluster_size : int
        Connected groups of at least this many points are clusters; members of
        smaller groups are returned as singletons (``is_cluster`` False).

    Returns
    -------
    list of Cluster
        Clusters first (largest first), then singletons, each sorted by index.
    """
    _check_grouping(cluster_distance_mm, min_cluster_size)
    pts = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    n = pts.shape[0]
    if n == 0:
        return []
    row_mm, col_mm = (float(s) for s in spacing_mm)
    xy_mm = np.column_stack([pts[:, 0] * col_mm, pts[:, 1] * row_mm])
    pairs = cKDTree(xy_mm).query_pairs(r=float(cluster_distance_mm), output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), (n, n))
    _, component = connected_components(graph, directed=False)
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(component.tolist()):
        groups.setdefault(c, []).append(i)
    clusters = [
        Cluster(tuple(sorted(g)), True) for g in groups.values() if len(g) >= min_cluster_size
    ]
    clusters.sort(key=lambda c: (-len(c.indices), c.indices[0]))
    singles = sorted(i for g in groups.values() if len(g) < min_cluster_size for i in g)
    return clusters + [Cluster((i,), False) for i in singles]


def cluster_detections(
    detections: PointsImage,
    *,
    cluster_distance_mm: float = CLUSTER_DISTANCE_MM,
    min_cluster_size: int = MIN_CLUSTER_SIZE,
) -> list[Cluster]:
    """Group an image's detections by single-linkage within ``cluster_distance_mm``.

    Parameters
    ----------
    detections : ImageDetections
        Detections (x = column, y = row, received grid) and the grid's pixel spacing
        (row spacing, column spacing) in mm.
    cluster_distance_mm : float
        Two detections whose centres are at most this far apart are linked.
    min_cluster_size : int
        Connected groups of at least this many detections are clusters; members of
        smaller groups are returned as singletons (``is_cluster`` False).

    Returns
    -------
    list of Cluster
        Clusters first (largest first), then singletons, each sorted by index.
    """
    _check_grouping(cluster_distance_mm, min_cluster_size)
    dets = detections.detections
    xy = np.array([[d.x, d.y] for d in dets], dtype=np.float64).reshape(-1, 2)
    return group_points(
        xy,
        detections.pixel_spacing_mm,
        cluster_distance_mm=cluster_distance_mm,
        min_cluster_size=min_cluster_size,
    )


# --------------------------------------------------------------------------- truth clusters
def _on_or_in_polygon(pt: np.ndarray, poly: np.ndarray, tol: float) -> bool:
    """Whether ``pt`` lies inside ``poly`` (mm, even-odd rule) or within ``tol`` of its border."""
    n = poly.shape[0]
    if n == 1:
        return bool(np.hypot(*(pt - poly[0])) <= tol)
    a = poly
    b = np.roll(poly, -1, axis=0)
    ab = b - a
    length2 = np.einsum("ij,ij->i", ab, ab)
    t = np.clip(np.einsum("ij,ij->i", pt - a, ab) / np.where(length2 > 0, length2, 1.0), 0.0, 1.0)
    nearest = a + t[:, None] * ab
    if float(np.min(np.hypot(*(pt - nearest).T))) <= tol:
        return True
    if n < 3:
        return False
    x, y = float(pt[0]), float(pt[1])
    inside = False
    for (x1, y1), (x2, y2) in zip(a, b, strict=True):
        if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
            inside = not inside
    return inside


def truth_clusters(
    truth_xy: np.ndarray,
    spacing_mm: tuple[float, float],
    *,
    outlines: Sequence[Sequence[tuple[float, float]]] = (),
    source: str = "outlines",
    cluster_distance_mm: float = CLUSTER_DISTANCE_MM,
    min_cluster_size: int = MIN_CLUSTER_SIZE,
) -> tuple[tuple[int, ...], ...]:
    """The truth clusters of one image, as tuples of indices into ``truth_xy``.

    Parameters
    ----------
    truth_xy : numpy.ndarray
        ``(N, 2)`` µC centres (x, y).
    spacing_mm : tuple of float
        ``(row, column)`` spacing in mm.
    outlines : sequence of polygons
        Cluster outlines (``ImageRecord.clusters``), same grid; for ``source="outlines"``.
    source : str
        ``"outlines"``: a µC belongs to each outline it lies in or on (within
        :data:`OUTLINE_TOLERANCE_MM`); an outline holding no µC is dropped.
        ``"rule"``: the report's grouping (:func:`group_points`) of the truth µCs.
    cluster_distance_mm, min_cluster_size : float, int
        The grouping of ``source="rule"``.
    """
    pts = np.asarray(truth_xy, dtype=np.float64).reshape(-1, 2)
    scale = np.array([float(spacing_mm[1]), float(spacing_mm[0])])
    if source == "rule":
        groups = group_points(
            pts,
            spacing_mm,
            cluster_distance_mm=cluster_distance_mm,
            min_cluster_size=min_cluster_size,
        )
        return tuple(g.indices for g in groups if g.is_cluster)
    if source != "outlines":
        raise ValueError(f"source must be 'outlines' or 'rule', got {source!r}")
    pts_mm = pts * scale
    out = []
    for outline in outlines:
        poly = np.asarray(outline, dtype=np.float64).reshape(-1, 2) * scale
        if poly.shape[0] == 0:
            continue
        members = tuple(
            i
            for i in range(pts_mm.shape[0])
            if _on_or_in_polygon(pts_mm[i], poly, OUTLINE_TOLERANCE_MM)
        )
        if members:
            out.append(members)
    return tuple(out)


def truth_source(records: Iterable[Any]) -> str:
    """``"outlines"`` when any record has a cluster outline, else ``"rule"``."""
    return "outlines" if any(getattr(r, "clusters", ()) for r in records) else "rule"


# --------------------------------------------------------------------------- scoring
@dataclass(frozen=True, eq=False)
class ClusterCase:
    """One image for cluster scoring: µCs, detections and which µCs form truth clusters.

    Parameters
    ----------
    image : ImageEval
        µCs, detections, scores and spacing (its ``ignore_xy`` is not used).
    clusters : tuple of tuple of int
        Truth clusters as indices into ``image.truth_xy`` (each with ≥ 1 index).
    """

    image: ImageEval
    clusters: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.image, ImageEval):
            raise TypeError(f"ClusterCase.image must be an ImageEval, got {self.image!r}")
        n = self.image.n_truth
        norm = []
        for k, members in enumerate(self.clusters):
            idx = tuple(sorted({int(i) for i in members}))
            if not idx or idx[0] < 0 or idx[-1] >= n:
                raise ValueError(
                    f"ClusterCase.clusters[{k}] must hold indices of the image's {n} µCs, "
                    f"got {tuple(members)!r}"
                )
            norm.append(idx)
        object.__setattr__(self, "clusters", tuple(norm))

    @property
    def is_normal(self) -> bool:
        """An image without µCs."""
        return self.image.n_truth == 0


def _hits_per_detection(image: ImageEval, radius_mm: float) -> list[frozenset[int]]:
    """Per detection, the µCs within ``radius_mm`` (inclusive)."""
    m = image.n_detections
    if m == 0 or image.n_truth == 0:
        return [frozenset()] * m
    scale = np.array([image.spacing_mm[1], image.spacing_mm[0]])
    tree = cKDTree(image.truth_xy * scale)
    near = tree.query_ball_point(image.det_xy * scale, radius_mm * (1.0 + _REL_TOL))
    return [frozenset(int(i) for i in lst) for lst in near]


def _outcome(
    xy: np.ndarray,
    hits: Sequence[frozenset[int]],
    case: ClusterCase,
    *,
    cluster_distance_mm: float,
    min_cluster_size: int,
    min_hits: int,
) -> tuple[frozenset[int], int, int]:
    """(truth clusters found, reported clusters, false marks) for the given detections."""
    found: set[int] = set()
    marks = false = 0
    truth_sets = [frozenset(c) for c in case.clusters]
    for group in group_points(
        xy,
        case.image.spacing_mm,
        cluster_distance_mm=cluster_distance_mm,
        min_cluster_size=min_cluster_size,
    ):
        if not group.is_cluster:
            continue
        marks += 1
        held: set[int] = set()
        for i in group.indices:
            held |= hits[i]
        mine = {k for k, t in enumerate(truth_sets) if len(held & t) >= min_hits}
        found |= mine
        if not mine:
            false += 1
    return frozenset(found), marks, false


@dataclass(frozen=True)
class ClusterPoint:
    """Cluster-level figures at one operating point.

    Attributes
    ----------
    threshold : float
        Detections with score ≥ this were kept (``-inf``: all given ones).
    sensitivity : float
        Truth clusters found / truth clusters (0 when there is none).
    found, n_truth_clusters : int
        Truth clusters found, and in all.
    marks, false_marks, false_marks_normal : int
        Reported clusters, those that find no truth cluster, and those of them on
        normal images.
    n_images, n_normal_images : int
        Images, and images without µCs.
    """

    threshold: float
    sensitivity: float
    found: int
    n_truth_clusters: int
    marks: int
    false_marks: int
    false_marks_normal: int
    n_images: int
    n_normal_images: int

    @property
    def false_marks_per_image(self) -> float:
        """False cluster marks per image."""
        return self.false_marks / self.n_images

    @property
    def false_marks_per_normal_image(self) -> float | None:
        """False cluster marks per normal image (None without a normal image)."""
        return None if self.n_normal_images == 0 else self.false_marks_normal / self.n_normal_images

    @property
    def marks_per_image(self) -> float:
        """Reported clusters per image."""
        return self.marks / self.n_images

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types; ``threshold`` ``-inf`` becomes None."""
        return {
            "threshold": None if not math.isfinite(self.threshold) else float(self.threshold),
            "sensitivity": float(self.sensitivity),
            "found": int(self.found),
            "n_truth_clusters": int(self.n_truth_clusters),
            "marks": int(self.marks),
            "false_marks": int(self.false_marks),
            "false_marks_normal": int(self.false_marks_normal),
            "false_marks_per_image": float(self.false_marks_per_image),
            "false_marks_per_normal_image": self.false_marks_per_normal_image,
            "marks_per_image": float(self.marks_per_image),
            "n_images": int(self.n_images),
            "n_normal_images": int(self.n_normal_images),
        }


@dataclass(frozen=True, eq=False)
class ClusterFroc:
    """Cluster sensitivity and false cluster marks at every operating point.

    Attributes
    ----------
    thresholds : numpy.ndarray
        ``(T,)`` distinct detection scores, decreasing.
    found, marks, false_marks, false_marks_normal : numpy.ndarray
        ``(T,)`` int counts at each threshold (see :class:`ClusterPoint`).
    n_truth_clusters, n_images, n_normal_images : int
        Truth clusters, images, normal images.
    """

    thresholds: np.ndarray
    found: np.ndarray
    marks: np.ndarray
    false_marks: np.ndarray
    false_marks_normal: np.ndarray
    n_truth_clusters: int
    n_images: int
    n_normal_images: int

    @property
    def sensitivity(self) -> np.ndarray:
        """``(T,)`` truth clusters found / truth clusters (0 without truth clusters)."""
        if self.n_truth_clusters == 0:
            return np.zeros(self.thresholds.shape[0])
        return self.found / self.n_truth_clusters

    @property
    def false_marks_per_image(self) -> np.ndarray:
        """``(T,)`` false cluster marks per image."""
        return self.false_marks / self.n_images

    @property
    def false_marks_per_normal_image(self) -> np.ndarray | None:
        """``(T,)`` false cluster marks per normal image, None without a normal image."""
        if self.n_normal_images == 0:
            return None
        return self.false_marks_normal / self.n_normal_images

    def point(self, threshold: float) -> ClusterPoint:
        """The figures when detections with score ≥ ``threshold`` are kept."""
        idx = int(np.count_nonzero(self.thresholds >= threshold)) - 1
        values = (
            (0, 0, 0, 0)
            if idx < 0
            else (
                int(self.found[idx]),
                int(self.marks[idx]),
                int(self.false_marks[idx]),
                int(self.false_marks_normal[idx]),
            )
        )
        found, marks, false, false_normal = values
        return ClusterPoint(
            threshold=float(threshold),
            sensitivity=found / self.n_truth_clusters if self.n_truth_clusters else 0.0,
            found=found,
            n_truth_clusters=self.n_truth_clusters,
            marks=marks,
            false_marks=false,
            false_marks_normal=false_normal,
            n_images=self.n_images,
            n_normal_images=self.n_normal_images,
        )

    def best_within(self, target: float, *, per: str = "image") -> ClusterPoint | None:
        """The most sensitive point whose false marks per ``per`` do not exceed ``target``.

        ``per`` is ``"image"`` or ``"normal-image"``. Among equally sensitive points the
        highest threshold (fewest detections) wins. None when no threshold qualifies.
        """
        if per == "image":
            rate = self.false_marks_per_image
        elif per == "normal-image":
            rate_n = self.false_marks_per_normal_image
            if rate_n is None:
                raise ValueError("no normal image: false marks per normal image are undefined")
            rate = rate_n
        else:
            raise ValueError(f"per must be 'image' or 'normal-image', got {per!r}")
        ok = np.flatnonzero(rate <= target * (1.0 + _REL_TOL) + 1e-12)
        if ok.size == 0:
            return None
        best = ok[self.found[ok] == self.found[ok].max()][0]
        return self.point(float(self.thresholds[best]))

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types."""
        fn = self.false_marks_per_normal_image
        return {
            "thresholds": [float(v) for v in self.thresholds],
            "sensitivity": [float(v) for v in self.sensitivity],
            "false_marks_per_image": [float(v) for v in self.false_marks_per_image],
            "false_marks_per_normal_image": None if fn is None else [float(v) for v in fn],
            "n_truth_clusters": int(self.n_truth_clusters),
            "n_images": int(self.n_images),
            "n_normal_images": int(self.n_normal_images),
        }


def _check_cases(cases: Sequence[ClusterCase]) -> list[ClusterCase]:
    out = list(cases)
    if not out:
        raise ValueError("cases must hold at least one ClusterCase")
    for i, c in enumerate(out):
        if not isinstance(c, ClusterCase):
            raise TypeError(f"cases[{i}] must be a ClusterCase, got {type(c).__name__}")
    return out


def cluster_froc(
    cases: Sequence[ClusterCase],
    *,
    radius_mm: float = 1.0,
    cluster_distance_mm: float = CLUSTER_DISTANCE_MM,
    min_cluster_size: int = MIN_CLUSTER_SIZE,
    min_hits: int = MIN_HITS,
) -> ClusterFroc:
    """Cluster sensitivity and false cluster marks at every score threshold.

    Parameters
    ----------
    cases : sequence of ClusterCase
        One per image, normal images included.
    radius_mm : float
        A detection holds a µC within this distance (inclusive).
    cluster_distance_mm, min_cluster_size : float, int
        The report's grouping (:func:`group_points`).
    min_hits : int
        µCs of a truth cluster one reported cluster must hold to find it (≥ 1).

    Returns
    -------
    ClusterFroc
    """
    items = _check_cases(cases)
    _check_grouping(cluster_distance_mm, min_cluster_size)
    if not (isinstance(radius_mm, (int, float)) and math.isfinite(radius_mm) and radius_mm > 0):
        raise ValueError(f"radius_mm must be a finite positive number, got {radius_mm!r}")
    if isinstance(min_hits, bool) or not isinstance(min_hits, int) or min_hits < 1:
        raise ValueError(f"min_hits must be an int ≥ 1, got {min_hits!r}")
    thresholds = (
        np.unique(np.concatenate([c.image.det_scores for c in items]))[::-1].copy()
        if any(c.image.n_detections for c in items)
        else np.zeros(0)
    )
    t = thresholds.shape[0]
    found = np.zeros(t, dtype=np.int64)
    marks = np.zeros(t, dtype=np.int64)
    false = np.zeros(t, dtype=np.int64)
    false_normal = np.zeros(t, dtype=np.int64)
    for case in items:
        image = case.image
        if image.n_detections == 0:
            continue
        order = np.argsort(-image.det_scores, kind="stable")
        xy = image.det_xy[order]
        scores = image.det_scores[order]
        unordered = _hits_per_detection(image, radius_mm)
        hits = [unordered[i] for i in order]
        levels = np.unique(scores)[::-1]
        per_level = np.zeros((levels.shape[0], 3), dtype=np.int64)
        for li, level in enumerate(levels):
            n = int(np.count_nonzero(scores >= level))
            f, mk, fa = _outcome(
                xy[:n],
                hits[:n],
                case,
                cluster_distance_mm=cluster_distance_mm,
                min_cluster_size=min_cluster_size,
                min_hits=min_hits,
            )
            per_level[li] = (len(f), mk, fa)
        # Global threshold j keeps this image's levels with score ≥ thresholds[j].
        idx = np.searchsorted(-levels, -thresholds, side="right") - 1
        have = idx >= 0
        vals = np.zeros((t, 3), dtype=np.int64)
        vals[have] = per_level[idx[have]]
        found += vals[:, 0]
        marks += vals[:, 1]
        false += vals[:, 2]
        if case.is_normal:
            false_normal += vals[:, 2]
    n_truth_clusters = sum(len(c.clusters) for c in items)
    n_normal = sum(1 for c in items if c.is_normal)
    logger.debug(
        "cluster_froc: %d images (%d normal), %d truth clusters, %d operating points",
        len(items),
        n_normal,
        n_truth_clusters,
        t,
    )
    return ClusterFroc(
        thresholds=thresholds,
        found=found,
        marks=marks,
        false_marks=false,
        false_marks_normal=false_normal,
        n_truth_clusters=n_truth_clusters,
        n_images=len(items),
        n_normal_images=n_normal,
    )


def cluster_point(
    cases: Sequence[ClusterCase],
    *,
    radius_mm: float = 1.0,
    cluster_distance_mm: float = CLUSTER_DISTANCE_MM,
    min_cluster_size: int = MIN_CLUSTER_SIZE,
    min_hits: int = MIN_HITS,
) -> ClusterPoint:
    """Cluster figures of the detections as given (all kept), e.g. at an operating point."""
    curve = cluster_froc(
        cases,
        radius_mm=radius_mm,
        cluster_distance_mm=cluster_distance_mm,
        min_cluster_size=min_cluster_size,
        min_hits=min_hits,
    )
    return curve.point(-math.inf)


def cases_from_records(
    records: Sequence[Any],
    images: Sequence[ImageEval],
    *,
    source: str = "auto",
) -> list[ClusterCase]:
    """Pair manifest records with their :class:`ImageEval` (same order) as cluster cases.

    ``source``: ``"outlines"``, ``"rule"`` or ``"auto"`` (:func:`truth_source` of
    ``records``).
    """
    if len(records) != len(images):
        raise ValueError(f"{len(records)} records but {len(images)} images")
    src = truth_source(records) if source == "auto" else source
    return [
        ClusterCase(
            image,
            truth_clusters(
                image.truth_xy, image.spacing_mm, outlines=getattr(rec, "clusters", ()), source=src
            ),
        )
        for rec, image in zip(records, images, strict=True)
    ]


def summary_json(
    curve: ClusterFroc, points: Mapping[str, ClusterPoint], *, source: str
) -> dict[str, Any]:
    """The ``clusters`` object of ``calcnode evaluate``'s JSON: rule, points, curve."""
    return {
        "rule": {
            "cluster_distance_mm": CLUSTER_DISTANCE_MM,
            "min_cluster_size": MIN_CLUSTER_SIZE,
            "min_hits": MIN_HITS,
            "radius_mm": 1.0,
            "truth_clusters": source,
        },
        "points": {name: p.to_json() for name, p in points.items()},
        "curve": curve.to_json(),
    }
