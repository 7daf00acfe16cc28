"""FROC evaluation (the paper's 1-mm rule, R@k) and the difference-of-Gaussians baseline.

Coordinates: every point is ``(x, y)`` with x = column, y = row, 0-based, the centre of
the first pixel at ``(0, 0)``, in the pixel grid of the image it belongs to. Distances
are measured in millimetres with that image's own ``(row, col)`` spacing, so
anisotropic grids are fine.

The rule (Zhang et al., CVPR 2019, "Evaluation protocol"):

* a µC is **recalled** at threshold ``t`` if at least one detection with score ≥ ``t``
  lies within ``radius_mm`` (1 mm) of it — the boundary is inclusive;
* a detection is a **false positive** if it lies within ``radius_mm`` of no µC. Several
  detections on one µC recall it once and none of them is a false positive; one
  detection within the radius of two µCs recalls both (the paper's rule says nothing
  against it: each µC asks only "is there a prediction near me?");
* FP/image = total false positives / number of images (images without µCs count in
  the denominator); FP/cm² = total false positives / total breast area, reported only
  when every image gives its breast area;
* R@k = the largest recall among the operating points whose FP/image is ≤ k, 0 if none.

Operating points are the distinct detection scores pooled over all images, in
decreasing order; detections with equal scores enter together. Per µC the
"first-hit score" is the largest score among detections within the radius, per
detection a flag (µC nearby / false positive / ignored); the curve is then two sorted
arrays and a binary search — O((N + M) log(N + M)) with a KD-tree per image.

Edge cases (decisions):

* no images → ``ValueError``;
* no µCs at all → recall is 0 at every operating point (``n_truth == 0`` says why);
  never NaN, so ``to_json`` stays strict JSON;
* no detections → empty curve arrays and every R@k = 0;
* distances are compared with a relative tolerance of 1e-9 so that a detection at
  exactly ``radius_mm`` counts even when ``px * spacing`` rounds up
  (``10 * 0.07 = 0.7000000000000001``);
* ``ignore_xy`` (points of non-µC calcifications, e.g. macro-calcifications) is used
  only with ``froc(..., use_ignore=True)``: a detection within the radius of an ignore
  point and of no µC is neither a true nor a false positive; a detection near a µC
  always counts for the µC.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

__all__ = [
    "DEFAULT_KS",
    "DEFAULT_KS_PER_CM2",
    "DET_FALSE_POSITIVE",
    "DET_IGNORED",
    "DET_NEAR_TRUTH",
    "FrocResult",
    "ImageEval",
    "ImageMatch",
    "dog_detect",
    "froc",
    "froc_table",
    "images_from_detections",
    "match_image",
    "plot_froc",
]

logger = logging.getLogger(__name__)

#: FP/image values at which :func:`froc` reports recall by default.
DEFAULT_KS: tuple[float, ...] = (0.5, 1, 2, 5, 10, 15, 20)
#: FP/cm² values at which :func:`froc` reports recall when breast areas are known.
DEFAULT_KS_PER_CM2: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
#: The paper's Table 1 columns (final models).
PAPER_KS: tuple[float, ...] = (1, 5, 10, 15, 20)

#: Detection status codes of :class:`ImageMatch`.
DET_FALSE_POSITIVE = 0
DET_NEAR_TRUTH = 1
DET_IGNORED = -1

_REL_TOL = 1e-9
_REFERENCE_SPACING_MM = 0.07


def _points(value: Any, name: str) -> np.ndarray:
    """Coerce ``value`` to a finite float array of shape (K, 2); empty input → (0, 2)."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"ImageEval.{name} must be numeric, got {type(value).__name__}") from exc
    if arr.size == 0:
        return np.zeros((0, 2), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"ImageEval.{name} must have shape (N, 2) as (x, y), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"ImageEval.{name} must hold finite values")
    return arr


@dataclass(frozen=True, eq=False)
class ImageEval:
    """Ground truth and detections of one image, for :func:`froc`.

    Parameters
    ----------
    truth_xy : numpy.ndarray
        ``(N, 2)`` µC centres, x = column, y = row, 0-based, first pixel's centre at
        ``(0, 0)``, in this image's grid. ``N`` may be 0.
    det_xy : numpy.ndarray
        ``(M, 2)`` detections, same convention and grid. ``M`` may be 0.
    det_scores : numpy.ndarray
        ``(M,)`` finite scores; higher = more confident.
    spacing_mm : tuple of float
        Keyword-only. ``(row, col)`` millimetres per pixel of this grid, both > 0.
    breast_area_cm2 : float or None
        Keyword-only. Breast area of the image, > 0, for FP per cm².
    ignore_xy : numpy.ndarray or None
        Keyword-only. ``(K, 2)`` points of non-µC calcifications (x, y); used only by
        ``froc(..., use_ignore=True)``.

    Raises
    ------
    ValueError
        A shape, a non-finite value, a non-positive spacing or area; the message names
        the field.
    """

    truth_xy: np.ndarray
    det_xy: np.ndarray
    det_scores: np.ndarray
    _: KW_ONLY
    spacing_mm: tuple[float, float]
    breast_area_cm2: float | None = None
    ignore_xy: np.ndarray | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "truth_xy", _points(self.truth_xy, "truth_xy"))
        set_(self, "det_xy", _points(self.det_xy, "det_xy"))
        try:
            scores = np.asarray(self.det_scores, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError("ImageEval.det_scores must be numeric") from exc
        if scores.size == 0:
            scores = np.zeros((0,), dtype=np.float64)
        if scores.ndim != 1:
            raise ValueError(f"ImageEval.det_scores must have shape (M,), got {scores.shape}")
        if scores.shape[0] != self.det_xy.shape[0]:
            raise ValueError(
                f"ImageEval.det_scores has {scores.shape[0]} values but det_xy has "
                f"{self.det_xy.shape[0]} points"
            )
        if not np.all(np.isfinite(scores)):
            raise ValueError("ImageEval.det_scores must hold finite values")
        set_(self, "det_scores", scores)

        spacing = self.spacing_mm
        if isinstance(spacing, (str, bytes)) or not isinstance(spacing, Iterable):
            raise ValueError(f"ImageEval.spacing_mm must be (row, col) in mm, got {spacing!r}")
        spacing_t = tuple(spacing)
        if len(spacing_t) != 2 or not all(
            isinstance(s, (int, float, np.integer, np.floating))
            and not isinstance(s, bool)
            and math.isfinite(s)
            and s > 0
            for s in spacing_t
        ):
            raise ValueError(
                f"ImageEval.spacing_mm must be two finite positive numbers (row, col), "
                f"got {spacing!r}"
            )
        set_(self, "spacing_mm", (float(spacing_t[0]), float(spacing_t[1])))

        area = self.breast_area_cm2
        if area is not None:
            if (
                not isinstance(area, (int, float, np.integer, np.floating))
                or isinstance(area, bool)
                or not math.isfinite(area)
                or area <= 0
            ):
                raise ValueError(
                    f"ImageEval.breast_area_cm2 must be a finite positive number, got {area!r}"
                )
            set_(self, "breast_area_cm2", float(area))
        if self.ignore_xy is not None:
            set_(self, "ignore_xy", _points(self.ignore_xy, "ignore_xy"))

    @property
    def n_truth(self) -> int:
        """Number of µCs."""
        return int(self.truth_xy.shape[0])

    @property
    def n_detections(self) -> int:
        """Number of detections."""
        return int(self.det_xy.shape[0])


@dataclass(frozen=True, eq=False)
class ImageMatch:
    """How the detections of one image relate to its µCs under the radius rule.

    Attributes
    ----------
    truth_hit_score : numpy.ndarray
        ``(N,)`` per µC, the largest score of the detections within the radius
        (``-inf`` if none): the µC is recalled at every threshold ≤ this value.
    det_status : numpy.ndarray
        ``(M,)`` int8 per detection: :data:`DET_NEAR_TRUTH` (1, within the radius of a
        µC), :data:`DET_FALSE_POSITIVE` (0) or :data:`DET_IGNORED` (-1, near an ignore
        point only, when ignoring is on).
    """

    truth_hit_score: np.ndarray
    det_status: np.ndarray


def _to_mm(xy: np.ndarray, spacing_mm: tuple[float, float]) -> np.ndarray:
    # x = column → column spacing, y = row → row spacing.
    return xy * np.array([spacing_mm[1], spacing_mm[0]], dtype=np.float64)


def match_image(
    image: ImageEval, *, radius_mm: float = 1.0, use_ignore: bool = False
) -> ImageMatch:
    """Apply the radius rule to one image.

    Parameters
    ----------
    image : ImageEval
        Ground truth and detections (x = column, y = row).
    radius_mm : float
        Hit radius in millimetres (inclusive), > 0.
    use_ignore : bool
        Mark detections near ``image.ignore_xy`` (and near no µC) as ignored.

    Returns
    -------
    ImageMatch
        First-hit score per µC and a status per detection.
    """
    if not isinstance(image, ImageEval):
        raise TypeError(f"image must be an ImageEval, got {type(image).__name__}")
    radius = _check_radius(radius_mm)
    r_eff = radius * (1.0 + _REL_TOL)
    n, m = image.n_truth, image.n_detections
    hit = np.full(n, -np.inf, dtype=np.float64)
    status = np.zeros(m, dtype=np.int8)
    if m == 0:
        return ImageMatch(truth_hit_score=hit, det_status=status)
    det_mm = _to_mm(image.det_xy, image.spacing_mm)
    det_tree = cKDTree(det_mm)
    if n > 0:
        truth_mm = _to_mm(image.truth_xy, image.spacing_mm)
        neighbours = det_tree.query_ball_point(truth_mm, r_eff)
        counts = np.fromiter((len(lst) for lst in neighbours), dtype=np.intp, count=n)
        if counts.sum() > 0:
            det_idx = np.concatenate([np.asarray(lst, dtype=np.intp) for lst in neighbours])
            truth_idx = np.repeat(np.arange(n), counts)
            np.maximum.at(hit, truth_idx, image.det_scores[det_idx])
            status[det_idx] = DET_NEAR_TRUTH
    if use_ignore and image.ignore_xy is not None and image.ignore_xy.shape[0] > 0:
        ign_tree = cKDTree(_to_mm(image.ignore_xy, image.spacing_mm))
        # query's distance_upper_bound is strict; r_eff already carries the tolerance.
        dist, _ = ign_tree.query(det_mm, k=1, distance_upper_bound=r_eff * (1.0 + _REL_TOL))
        near_ignore = np.isfinite(dist) & (status != DET_NEAR_TRUTH)
        status[near_ignore] = DET_IGNORED
    return ImageMatch(truth_hit_score=hit, det_status=status)


def _check_radius(radius_mm: float) -> float:
    if (
        not isinstance(radius_mm, (int, float, np.integer, np.floating))
        or isinstance(radius_mm, bool)
        or not math.isfinite(radius_mm)
        or radius_mm <= 0
    ):
        raise ValueError(f"radius_mm must be a finite positive number, got {radius_mm!r}")
    return float(radius_mm)


def _check_ks(ks: Iterable[float], name: str) -> tuple[float, ...]:
    if isinstance(ks, (str, bytes)) or not isinstance(ks, Iterable):
        raise ValueError(f"{name} must be a sequence of numbers, got {ks!r}")
    out = []
    for k in ks:
        if (
            not isinstance(k, (int, float, np.integer, np.floating))
            or isinstance(k, bool)
            or not math.isfinite(k)
            or k < 0
        ):
            raise ValueError(f"{name} must hold finite non-negative numbers, got {k!r}")
        out.append(float(k))
    return tuple(out)


def _recall_at(recall: np.ndarray, fp_rate: np.ndarray, k: float) -> float:
    """Largest recall among operating points with ``fp_rate ≤ k`` (0 if none)."""
    ok = fp_rate <= k * (1.0 + _REL_TOL) + 1e-12
    if not np.any(ok):
        return 0.0
    return float(np.max(recall[ok]))


@dataclass(frozen=True, eq=False)
class FrocResult:
    """A FROC curve and its R@k summary.

    Attributes
    ----------
    thresholds : numpy.ndarray
        ``(T,)`` distinct detection scores, decreasing; one operating point each
        (detections with score ≥ threshold are kept).
    recall : numpy.ndarray
        ``(T,)`` fraction of µCs recalled, non-decreasing (0 everywhere if no µCs).
    fp_per_image : numpy.ndarray
        ``(T,)`` false positives per image, non-decreasing.
    fp_per_cm2 : numpy.ndarray or None
        ``(T,)`` false positives per cm² of breast, or None if an area is missing.
    n_images, n_truth, n_detections : int
        Images, µCs and detections (all of them, ignored ones included).
    recall_at : dict
        FP/image k → R@k.
    recall_at_per_cm2 : dict or None
        FP/cm² k → recall, or None if an area is missing.
    radius_mm : float
        The hit radius used.
    n_ignored : int
        Detections that were neither true nor false positives (``use_ignore``).
    """

    thresholds: np.ndarray
    recall: np.ndarray
    fp_per_image: np.ndarray
    fp_per_cm2: np.ndarray | None
    n_images: int
    n_truth: int
    n_detections: int
    recall_at: dict[float, float]
    recall_at_per_cm2: dict[float, float] | None
    radius_mm: float = 1.0
    n_ignored: int = 0

    def recall_at_fp(self, k: float) -> float:
        """R@k for any k (FP/image): the largest recall with FP/image ≤ k, 0 if none."""
        (k_f,) = _check_ks([k], "k")
        return _recall_at(self.recall, self.fp_per_image, k_f)

    def threshold_at_fp(self, k: float) -> float:
        """The lowest score threshold whose FP/image is ≤ k (its recall is R@k).

        ``inf`` (keep nothing) when even the best-scored detection exceeds ``k``.
        """
        (k_f,) = _check_ks([k], "k")
        ok = np.flatnonzero(self.fp_per_image <= k_f * (1.0 + _REL_TOL) + 1e-12)
        return float(self.thresholds[ok[-1]]) if ok.size else math.inf

    def recall_at_fp_per_cm2(self, k: float) -> float:
        """Largest recall with FP/cm² ≤ k; ``ValueError`` if breast areas were missing."""
        if self.fp_per_cm2 is None:
            raise ValueError("k: FP per cm² is unknown (an image had no breast_area_cm2)")
        (k_f,) = _check_ks([k], "k")
        return _recall_at(self.recall, self.fp_per_cm2, k_f)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types only; dict keys of ``recall_at`` become strings like ``"0.5"``."""

        def keyed(d: dict[float, float] | None) -> dict[str, float] | None:
            return None if d is None else {repr(float(k)): float(v) for k, v in d.items()}

        return {
            "thresholds": [float(v) for v in self.thresholds],
            "recall": [float(v) for v in self.recall],
            "fp_per_image": [float(v) for v in self.fp_per_image],
            "fp_per_cm2": None if self.fp_per_cm2 is None else [float(v) for v in self.fp_per_cm2],
            "n_images": int(self.n_images),
            "n_truth": int(self.n_truth),
            "n_detections": int(self.n_detections),
            "recall_at": keyed(self.recall_at),
            "recall_at_per_cm2": keyed(self.recall_at_per_cm2),
            "radius_mm": float(self.radius_mm),
            "n_ignored": int(self.n_ignored),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FrocResult:
        """Rebuild a result written by :meth:`to_json`; ``ValueError`` names a missing key."""
        required = (
            "thresholds",
            "recall",
            "fp_per_image",
            "fp_per_cm2",
            "n_images",
            "n_truth",
            "n_detections",
            "recall_at",
            "recall_at_per_cm2",
        )
        for key in required:
            if key not in data:
                raise ValueError(f"data: missing key {key!r}")

        def unkeyed(d: Mapping[str, float] | None) -> dict[float, float] | None:
            return None if d is None else {float(k): float(v) for k, v in d.items()}

        def arr(v: Any) -> np.ndarray:
            return np.asarray(v, dtype=np.float64).reshape(-1)

        return cls(
            thresholds=arr(data["thresholds"]),
            recall=arr(data["recall"]),
            fp_per_image=arr(data["fp_per_image"]),
            fp_per_cm2=None if data["fp_per_cm2"] is None else arr(data["fp_per_cm2"]),
            n_images=int(data["n_images"]),
            n_truth=int(data["n_truth"]),
            n_detections=int(data["n_detections"]),
            recall_at=unkeyed(data["recall_at"]) or {},
            recall_at_per_cm2=unkeyed(data["recall_at_per_cm2"]),
            radius_mm=float(data.get("radius_mm", 1.0)),
            n_ignored=int(data.get("n_ignored", 0)),
        )


def froc(
    images: Sequence[ImageEval],
    *,
    radius_mm: float = 1.0,
    ks: Iterable[float] = DEFAULT_KS,
    use_ignore: bool = False,
    ks_per_cm2: Iterable[float] = DEFAULT_KS_PER_CM2,
) -> FrocResult:
    """FROC curve over a set of images with the paper's 1-mm rule.

    Parameters
    ----------
    images : sequence of ImageEval
        One entry per image, images without µCs included (their detections are false
        positives and they count in the FP/image denominator).
    radius_mm : float
        Hit radius in millimetres, inclusive (paper: 1 mm = 14 px at 70 µm).
    ks : iterable of float
        FP/image values for :attr:`FrocResult.recall_at`.
    use_ignore : bool
        Treat detections near ``ignore_xy`` points (and near no µC) as neither TP nor FP.
    ks_per_cm2 : iterable of float
        FP/cm² values for :attr:`FrocResult.recall_at_per_cm2`.

    Returns
    -------
    FrocResult

    Raises
    ------
    ValueError
        No images, a non-positive radius, a negative or non-finite k.
    TypeError
        An element of ``images`` is not an :class:`ImageEval`.
    """
    radius = _check_radius(radius_mm)
    ks_t = _check_ks(ks, "ks")
    ks_cm2_t = _check_ks(ks_per_cm2, "ks_per_cm2")
    image_list = list(images)
    if not image_list:
        raise ValueError("images must hold at least one ImageEval")
    for i, image in enumerate(image_list):
        if not isinstance(image, ImageEval):
            raise TypeError(f"images[{i}] must be an ImageEval, got {type(image).__name__}")

    hit_scores: list[np.ndarray] = []
    fp_scores: list[np.ndarray] = []
    all_scores: list[np.ndarray] = []
    n_ignored = 0
    for image in image_list:
        match = match_image(image, radius_mm=radius, use_ignore=use_ignore)
        hit_scores.append(match.truth_hit_score)
        fp_scores.append(image.det_scores[match.det_status == DET_FALSE_POSITIVE])
        # Ignored detections define no operating point of their own.
        all_scores.append(image.det_scores[match.det_status != DET_IGNORED])
        n_ignored += int(np.count_nonzero(match.det_status == DET_IGNORED))

    hits = np.sort(np.concatenate(hit_scores)) if hit_scores else np.zeros(0)
    fps = np.sort(np.concatenate(fp_scores))
    thresholds = np.unique(np.concatenate(all_scores))[::-1].copy()
    n_images = len(image_list)
    n_truth = int(hits.shape[0])
    n_detections = sum(image.n_detections for image in image_list)

    # Count of values ≥ t in an ascending array = len − (index of the first value ≥ t).
    recalled = hits.shape[0] - np.searchsorted(hits, thresholds, side="left")
    fp_count = fps.shape[0] - np.searchsorted(fps, thresholds, side="left")
    if n_truth > 0:
        recall = recalled.astype(np.float64) / n_truth
    else:
        recall = np.zeros(thresholds.shape[0], dtype=np.float64)
    fp_per_image = fp_count.astype(np.float64) / n_images

    areas = [image.breast_area_cm2 for image in image_list]
    fp_per_cm2: np.ndarray | None = None
    recall_at_per_cm2: dict[float, float] | None = None
    if all(a is not None for a in areas):
        total_area = float(sum(a for a in areas if a is not None))
        fp_per_cm2 = fp_count.astype(np.float64) / total_area
        recall_at_per_cm2 = {k: _recall_at(recall, fp_per_cm2, k) for k in ks_cm2_t}

    recall_at = {k: _recall_at(recall, fp_per_image, k) for k in ks_t}
    if n_truth == 0:
        logger.warning("froc: no µCs in %d images; recall is reported as 0", n_images)
    logger.debug(
        "froc: %d images, %d µCs, %d detections (%d ignored), %d operating points",
        n_images,
        n_truth,
        n_detections,
        n_ignored,
        thresholds.shape[0],
    )
    return FrocResult(
        thresholds=thresholds,
        recall=recall,
        fp_per_image=fp_per_image,
        fp_per_cm2=fp_per_cm2,
        n_images=n_images,
        n_truth=n_truth,
        n_detections=n_detections,
        recall_at=recall_at,
        recall_at_per_cm2=recall_at_per_cm2,
        radius_mm=radius,
        n_ignored=n_ignored,
    )


def dog_detect(
    image: np.ndarray,
    *,
    spacing_mm: float,
    mask: np.ndarray | None = None,
    sigmas_px: tuple[float, float] = (1.2, 3.0),
    min_distance_px: int = 3,
    max_detections: int = 500,
) -> tuple[np.ndarray, np.ndarray]:
    """Difference-of-Gaussians µC detector: the baseline the cascade must beat.

    The response is ``G(σ1) * I − G(σ2) * I``; its positive local maxima inside the mask
    are the detections and the response is the score.

    Parameters
    ----------
    image : numpy.ndarray
        2-D display-domain float image, bright = calcification (any intensity scale;
        scores are in its units).
    spacing_mm : float
        Pixel spacing of ``image`` in mm (isotropic), > 0.
    mask : numpy.ndarray or None
        Boolean ``image.shape`` breast mask; peaks outside it are dropped.
    sigmas_px : (float, float)
        ``(σ1, σ2)`` with ``0 < σ1 < σ2``, in pixels **at 70 µm**; scaled by
        ``0.07 / spacing_mm`` so the detector sees the same physical scale on any grid.
    min_distance_px : int
        Minimal distance between peaks in pixels of ``image`` (not scaled), ≥ 1.
    max_detections : int
        Keep at most this many peaks, the strongest, ≥ 1.

    Returns
    -------
    xy : numpy.ndarray
        ``(M, 2)`` float, x = column, y = row, 0-based pixel centres of ``image``.
    scores : numpy.ndarray
        ``(M,)`` DoG responses (> 0), decreasing.

    Raises
    ------
    ValueError
        A bad image, spacing, mask, sigma or count; the message names the argument.
    """
    from skimage.feature import peak_local_max

    img = np.asarray(image)
    if img.ndim != 2 or img.size == 0:
        raise ValueError(f"image must be a non-empty 2-D array, got shape {img.shape}")
    if not np.issubdtype(img.dtype, np.number) or np.issubdtype(img.dtype, np.complexfloating):
        raise ValueError(f"image must be real-valued, got dtype {img.dtype}")
    img = img.astype(np.float64, copy=False)
    if not np.all(np.isfinite(img)):
        raise ValueError("image must hold finite values")
    if (
        not isinstance(spacing_mm, (int, float, np.integer, np.floating))
        or isinstance(spacing_mm, bool)
        or not math.isfinite(spacing_mm)
        or spacing_mm <= 0
    ):
        raise ValueError(f"spacing_mm must be a finite positive number, got {spacing_mm!r}")
    if mask is not None:
        mask_arr = np.asarray(mask)
        if mask_arr.shape != img.shape or mask_arr.dtype != bool:
            raise ValueError(
                f"mask must be a boolean array of shape {img.shape}, got "
                f"{mask_arr.dtype} {mask_arr.shape}"
            )
    else:
        mask_arr = np.ones(img.shape, dtype=bool)
    try:
        s1, s2 = (float(s) for s in sigmas_px)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"sigmas_px must be two numbers, got {sigmas_px!r}") from exc
    if not (math.isfinite(s1) and math.isfinite(s2) and 0 < s1 < s2):
        raise ValueError(f"sigmas_px must satisfy 0 < sigma1 < sigma2, got {sigmas_px!r}")
    if isinstance(min_distance_px, bool) or not isinstance(min_distance_px, (int, np.integer)):
        raise ValueError(f"min_distance_px must be an int, got {min_distance_px!r}")
    if min_distance_px < 1:
        raise ValueError(f"min_distance_px must be ≥ 1, got {min_distance_px}")
    if isinstance(max_detections, bool) or not isinstance(max_detections, (int, np.integer)):
        raise ValueError(f"max_detections must be an int, got {max_detections!r}")
    if max_detections < 1:
        raise ValueError(f"max_detections must be ≥ 1, got {max_detections}")

    scale = _REFERENCE_SPACING_MM / float(spacing_mm)
    fine = ndimage.gaussian_filter(img, s1 * scale, mode="nearest")
    coarse = ndimage.gaussian_filter(img, s2 * scale, mode="nearest")
    dog = fine - coarse
    # Outside the mask nothing may peak: 0 is below the strict threshold_abs=0 below.
    dog_in = np.where(mask_arr, dog, 0.0)
    peaks = peak_local_max(
        dog_in,
        min_distance=int(min_distance_px),
        threshold_abs=0.0,
        exclude_border=False,
        num_peaks=int(max_detections),
    )
    if peaks.shape[0] == 0:
        return np.zeros((0, 2), dtype=np.float64), np.zeros((0,), dtype=np.float64)
    rows, cols = peaks[:, 0], peaks[:, 1]
    scores = dog_in[rows, cols]
    keep = scores > 0
    rows, cols, scores = rows[keep], cols[keep], scores[keep]
    order = np.argsort(-scores, kind="stable")
    xy = np.stack([cols[order], rows[order]], axis=1).astype(np.float64)
    return xy, scores[order].astype(np.float64)


def _k_label(k: float) -> str:
    return f"R@{k:g}"


def _check_results(results: Mapping[str, FrocResult]) -> None:
    if not isinstance(results, Mapping) or len(results) == 0:
        raise ValueError("results must be a non-empty mapping of name → FrocResult")
    for name, res in results.items():
        if not isinstance(res, FrocResult):
            raise TypeError(f"results[{name!r}] must be a FrocResult, got {type(res).__name__}")


def plot_froc(
    results: Mapping[str, FrocResult],
    path: str | Path,
    *,
    title: str = "",
    max_fp: float = 20,
    log_x: bool = False,
) -> Path:
    """Draw FROC curves (recall vs FP/image) to a PNG.

    Parameters
    ----------
    results : mapping of str to FrocResult
        Curve name (legend label) → result.
    path : str or Path
        Output PNG; parent folders are created.
    title : str
        Figure title.
    max_fp : float
        Right end of the x axis (FP/image), > 0.
    log_x : bool
        Logarithmic x axis from ``min(0.1, max_fp / 10)`` to ``max_fp``; linear 0..max_fp
        otherwise.

    Returns
    -------
    Path
        The written file.
    """
    # Figure without pyplot: the Agg canvas, no global backend switch, thread-safe.
    from matplotlib.figure import Figure

    _check_results(results)
    if (
        not isinstance(max_fp, (int, float, np.integer, np.floating))
        or isinstance(max_fp, bool)
        or not math.isfinite(max_fp)
        or max_fp <= 0
    ):
        raise ValueError(f"max_fp must be a finite positive number, got {max_fp!r}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)

    fig = Figure(figsize=(6.4, 4.8), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for name, res in results.items():
        # Start at the empty operating point (no detection kept): 0 FP, recall 0.
        x = np.concatenate([[0.0], res.fp_per_image])
        y = np.concatenate([[0.0], res.recall])
        label = f"{name} (R@1 {res.recall_at_fp(1):.3f}, n={res.n_truth})"
        ax.plot(x, y, drawstyle="steps-post", label=label)
    if log_x:
        ax.set_xscale("log")
        ax.set_xlim(min(0.1, max_fp / 10), max_fp)
    else:
        ax.set_xlim(0, max_fp)
    ax.set_ylim(0, 1.0)
    ax.set_xlabel("false positives per image")
    ax.set_ylabel("recall (µC within 1 mm)" if _all_radius(results, 1.0) else "recall")
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    ax.legend(loc="lower right", fontsize="small")
    fig.savefig(out, format="png")
    logger.info("wrote FROC plot %s (%d curves)", out, len(results))
    return out


def _all_radius(results: Mapping[str, FrocResult], radius: float) -> bool:
    return all(abs(r.radius_mm - radius) < 1e-12 for r in results.values())


def froc_table(results: Mapping[str, FrocResult], ks: Iterable[float] = PAPER_KS) -> str:
    """Markdown table shaped like the paper's Table 1: one row per method, R@k in percent.

    Parameters
    ----------
    results : mapping of str to FrocResult
        Method name → result, in row order.
    ks : iterable of float
        FP/image columns (default 1, 5, 10, 15, 20: the paper's final-model columns);
        values missing from ``recall_at`` are computed from the curve.

    Returns
    -------
    str
        ``| Method | R@1 | … |`` header, separator, rows with two decimals, and a
        trailing newline.
    """
    _check_results(results)
    ks_t = _check_ks(ks, "ks")
    if not ks_t:
        raise ValueError("ks must hold at least one value")
    lines = [
        "| Method | " + " | ".join(_k_label(k) for k in ks_t) + " |",
        "|---|" + "---|" * len(ks_t),
    ]
    for name, res in results.items():
        cells = []
        for k in ks_t:
            value = res.recall_at[k] if k in res.recall_at else res.recall_at_fp(k)
            cells.append(f"{100.0 * value:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def images_from_detections(
    records: Sequence[Any],
    detections: Mapping[str, Any],
    *,
    breast_areas_cm2: Mapping[str, float] | None = None,
) -> list[ImageEval]:
    """Pair manifest records with a ``detections.json`` document by SOP Instance UID.

    Parameters
    ----------
    records : sequence of cascade.data.manifest.ImageRecord
        The ground truth; every record becomes one :class:`ImageEval`.
    detections : mapping
        A decoded ``detections.json`` (``{"images": [...]}``). An image of the
        manifest missing from it counts with no detections (logged); images not
        in the manifest are ignored (logged).
    breast_areas_cm2 : mapping or None
        Breast area per SOP Instance UID, for FP/cm².
    """
    by_uid = {img["sop_instance_uid"]: img for img in detections.get("images", [])}
    uids = {r.sop_instance_uid for r in records}
    extra = set(by_uid) - uids
    if extra:
        logger.warning("%d images in the detections are not in the manifest", len(extra))
    out = []
    for rec in records:
        img = by_uid.get(rec.sop_instance_uid)
        if img is None:
            logger.warning("image %s has no detections entry", rec.sop_instance_uid)
            dets: list[Mapping[str, Any]] = []
        else:
            dets = img.get("detections", [])
            if (img.get("rows"), img.get("columns")) != (rec.rows, rec.columns):
                raise ValueError(
                    f"image {rec.sop_instance_uid}: detections are for a "
                    f"{img.get('rows')}×{img.get('columns')} grid, the manifest says "
                    f"{rec.rows}×{rec.columns}"
                )
        out.append(
            ImageEval(
                np.array([[c.x, c.y] for c in rec.calcifications], float).reshape(-1, 2),
                np.array([[d["x"], d["y"]] for d in dets], float).reshape(-1, 2),
                np.array([d["score"] for d in dets], float),
                spacing_mm=tuple(rec.pixel_spacing_mm),
                breast_area_cm2=None
                if breast_areas_cm2 is None
                else breast_areas_cm2.get(rec.sop_instance_uid),
                ignore_xy=np.array([p for o in rec.others for p in o.points], float).reshape(-1, 2),
            )
        )
    return out
