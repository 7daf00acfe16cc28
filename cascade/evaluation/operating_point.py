"""The operating point: which of the cascade's scored candidates are reported.

The cascade scores every candidate; a FROC curve (:mod:`cascade.evaluation.froc`) needs
them all. A reader sees one point of that curve: :class:`OperatingPoint` says which, and
:func:`calibrate_operating_point` chooses it on validation images for a target number
of false positives per image. Where a chosen point is stored (``weights.json``, tied to
the checkpoints it was calibrated on) is :mod:`cascade.inference.weights`' business.

Depends on evaluation only: the calibration reads detections through the small
:class:`ScoredImage` protocol, which :class:`cascade.inference.detector.ImageDetections`
satisfies.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from cascade.evaluation.froc import ImageEval, froc

logger = logging.getLogger(__name__)

__all__ = ["OperatingPoint", "ScoredImage", "calibrate_operating_point"]


class _ScoredCandidate(Protocol):
    @property
    def x(self) -> float: ...
    @property
    def y(self) -> float: ...
    @property
    def score(self) -> float: ...
    @property
    def fpr_score(self) -> float: ...


class ScoredImage(Protocol):
    """One image's scored candidates, as calibration reads them.

    ``detections`` hold ``x``, ``y`` (received grid: x = column, y = row), ``score``
    (final score) and ``fpr_score``; ``pixel_spacing_mm`` is ``(row, column)`` spacing.
    """

    @property
    def pixel_spacing_mm(self) -> tuple[float, float]: ...
    @property
    def detections(self) -> Sequence[_ScoredCandidate]: ...


@dataclass(frozen=True, kw_only=True)
class OperatingPoint:
    """Which of the cascade's scored candidates are reported.

    The cascade scores every candidate (final score = ASN score × FPR probability,
    the paper's fusion); a FROC curve needs them all. What a reader sees is one point
    on that curve:

    1. the FPR's own decision: a candidate whose FPR probability is below
       ``fpr_threshold`` is a false positive and removed (this is what leaves most
       vascular calcifications alone: their FPR probability is low while their
       summed ASN score, over a long vessel segment, is as high as a µC's);
    2. the survivors whose final score is at least ``min_score``, highest first;
    3. at most ``max_detections`` of them (0 = no limit).

    Parameters
    ----------
    fpr_threshold : float
        In [0, 1]; 0 keeps every candidate.
    min_score : float
        ≥ 0; final-score threshold, usually chosen on validation images by
        :func:`calibrate_operating_point` for a target false-positive rate.
    max_detections : int
        ≥ 0; 0 = no limit.
    calibration : mapping
        How ``min_score`` was chosen (data, target FP/image, the recall reached) and on
        which checkpoints (``asn_sha256``, ``fpr_sha256``: see
        :meth:`cascade.inference.weights.ModelWeights.stored_operating_point`).
    """

    fpr_threshold: float = 0.5
    min_score: float = 0.0
    max_detections: int = 0
    calibration: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in ("fpr_threshold", "min_score"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"OperatingPoint.{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"OperatingPoint.{name} must be finite, got {value!r}")
        if not 0.0 <= self.fpr_threshold <= 1.0:
            raise ValueError(
                f"OperatingPoint.fpr_threshold must lie in [0, 1], got {self.fpr_threshold}"
            )
        if self.min_score < 0:
            raise ValueError(f"OperatingPoint.min_score must be ≥ 0, got {self.min_score}")
        if isinstance(self.max_detections, bool) or not isinstance(self.max_detections, int):
            raise TypeError(
                f"OperatingPoint.max_detections must be an integer, got {self.max_detections!r}"
            )
        if self.max_detections < 0:
            raise ValueError(
                f"OperatingPoint.max_detections must be ≥ 0, got {self.max_detections!r}"
            )
        if not isinstance(self.calibration, Mapping):
            raise TypeError(
                f"OperatingPoint.calibration must be a mapping, got {self.calibration!r}"
            )

    def keeps(self, *, score: float, fpr_score: float) -> bool:
        """Whether a candidate passes the thresholds (the count limit aside)."""
        return fpr_score >= self.fpr_threshold and score >= self.min_score

    def select(self, scores: np.ndarray, fpr_scores: np.ndarray) -> np.ndarray:
        """Indices of the reported candidates, highest final score first.

        Parameters
        ----------
        scores, fpr_scores : numpy.ndarray
            ``(N,)`` final scores and FPR probabilities of one image's candidates.

        Returns
        -------
        numpy.ndarray
            int ``(M,)``, M ≤ N (≤ ``max_detections`` when that is set); ties keep
            their input order.
        """
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        fpr_scores = np.asarray(fpr_scores, dtype=np.float64).reshape(-1)
        if scores.shape != fpr_scores.shape:
            raise ValueError(
                f"scores and fpr_scores differ in length: {scores.shape} vs {fpr_scores.shape}"
            )
        keep = np.flatnonzero((fpr_scores >= self.fpr_threshold) & (scores >= self.min_score))
        keep = keep[np.argsort(-scores[keep], kind="stable")]
        return keep[: self.max_detections] if self.max_detections else keep

    def to_json(self) -> dict[str, Any]:
        """The ``operating_point`` object of ``weights.json``."""
        return {
            "fpr_threshold": float(self.fpr_threshold),
            "min_score": float(self.min_score),
            "max_detections": int(self.max_detections),
            "calibration": dict(self.calibration),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> OperatingPoint:
        """Inverse of :meth:`to_json`; unknown keys are an error."""
        if not isinstance(data, Mapping):
            raise ValueError(f"an operating point must be a JSON object, got {data!r}")
        unknown = sorted(
            set(data) - {"fpr_threshold", "min_score", "max_detections", "calibration"}
        )
        if unknown:
            raise ValueError(f"unknown operating-point keys: {', '.join(unknown)}")
        return cls(**dict(data))

    def thresholds_json(self) -> dict[str, Any]:
        """What decides the reported findings: :meth:`to_json` without ``calibration``."""
        return {k: v for k, v in self.to_json().items() if k != "calibration"}


def calibrate_operating_point(
    results: Sequence[tuple[ScoredImage, np.ndarray]],
    *,
    target_fp_per_image: float,
    fpr_threshold: float = 0.5,
    max_detections: int = 0,
    description: Mapping[str, Any] | None = None,
    target_cluster_fp: float | None = None,
    cluster_fp_per: str = "image",
) -> OperatingPoint:
    """Choose ``min_score`` so that about ``target_fp_per_image`` false positives remain.

    With ``target_cluster_fp`` the target is cluster-level instead: the most sensitive
    threshold (truth clusters found, :mod:`cascade.evaluation.clusters`, ties to the
    highest threshold) whose false cluster marks per image (``cluster_fp_per="image"``)
    or per normal image (``"normal-image"``) do not exceed it. The truth clusters are
    the report's own grouping (5 mm, ≥ 3) of each image's µCs.

    Parameters
    ----------
    results : sequence of (ScoredImage, numpy.ndarray)
        Every candidate of each validation image (a detector without operating point)
        with the image's ``(N, 2)`` µC centres (x = column, y = row, received grid).
    target_fp_per_image : float
        > 0; the chosen point is the lowest final-score threshold whose false
        positives per image (after the FPR threshold, 1-mm rule) do not exceed it.
    fpr_threshold : float
        The FPR decision applied before the score threshold.
    max_detections : int
        At most this many per image (0 = no limit), applied before the threshold is
        chosen, as the detector applies it.
    description : mapping or None
        What the images were (stored under ``calibration``).

    Returns
    -------
    OperatingPoint
        With ``calibration`` holding the target, the FP/image and recall reached.
    """
    if not (target_fp_per_image > 0 and math.isfinite(target_fp_per_image)):
        raise ValueError(f"target_fp_per_image must be positive, got {target_fp_per_image!r}")
    if target_cluster_fp is not None and not (
        target_cluster_fp >= 0 and math.isfinite(target_cluster_fp)
    ):
        raise ValueError(f"target_cluster_fp must be ≥ 0, got {target_cluster_fp!r}")
    if not results:
        raise ValueError("calibration needs at least one image")
    selector = OperatingPoint(fpr_threshold=fpr_threshold, max_detections=max_detections)
    evals = []
    for found, truth in results:
        order = selector.select(
            np.array([d.score for d in found.detections], dtype=np.float64),
            np.array([d.fpr_score for d in found.detections], dtype=np.float64),
        )
        kept = [found.detections[i] for i in order]
        evals.append(
            ImageEval(
                np.asarray(truth, dtype=np.float64).reshape(-1, 2),
                np.array([[d.x, d.y] for d in kept], dtype=np.float64).reshape(-1, 2),
                np.array([d.score for d in kept], dtype=np.float64),
                spacing_mm=found.pixel_spacing_mm,
            )
        )
    curve = froc(evals)
    if target_cluster_fp is not None:
        return _calibrate_clusters(
            evals,
            curve,
            target=float(target_cluster_fp),
            per=cluster_fp_per,
            fpr_threshold=fpr_threshold,
            max_detections=max_detections,
            description=description,
        )
    ok = np.flatnonzero(curve.fp_per_image <= target_fp_per_image)
    if len(ok):
        i = int(ok[-1])
        min_score, fp, recall = float(curve.thresholds[i]), curve.fp_per_image[i], curve.recall[i]
    else:  # even the best-scored detection is a false positive on too many images
        logger.warning(
            "no score threshold leaves at most %g false positives per image on these %d "
            "images: the operating point reports nothing",
            target_fp_per_image,
            curve.n_images,
        )
        min_score = (
            math.nextafter(float(curve.thresholds[0]), math.inf) if len(curve.thresholds) else 0.0
        )
        fp, recall = 0.0, 0.0
    return OperatingPoint(
        fpr_threshold=fpr_threshold,
        min_score=min_score,
        max_detections=max_detections,
        calibration={
            **dict(description or {}),
            "images": curve.n_images,
            "calcifications": curve.n_truth,
            "target_fp_per_image": float(target_fp_per_image),
            "fp_per_image": float(fp),
            "recall": float(recall),
        },
    )


def _calibrate_clusters(
    evals: Sequence[ImageEval],
    curve: Any,
    *,
    target: float,
    per: str,
    fpr_threshold: float,
    max_detections: int,
    description: Mapping[str, Any] | None,
) -> OperatingPoint:
    """The cluster-level choice of :func:`calibrate_operating_point`."""
    from cascade.evaluation.clusters import ClusterCase, cluster_froc, truth_clusters

    cases = [ClusterCase(e, truth_clusters(e.truth_xy, e.spacing_mm, source="rule")) for e in evals]
    clusters = cluster_froc(cases)
    best = clusters.best_within(target, per=per)
    if best is None or not math.isfinite(best.threshold):
        logger.warning(
            "no score threshold leaves at most %g false cluster marks per %s on these %d "
            "images: the operating point reports nothing",
            target,
            per.replace("-", " "),
            curve.n_images,
        )
        top = float(curve.thresholds[0]) if len(curve.thresholds) else 0.0
        min_score = math.nextafter(top, math.inf) if len(curve.thresholds) else 0.0
        point = clusters.point(min_score)
    else:
        min_score, point = best.threshold, best
    idx = int(np.count_nonzero(curve.thresholds >= min_score)) - 1
    fp = float(curve.fp_per_image[idx]) if idx >= 0 else 0.0
    recall = float(curve.recall[idx]) if idx >= 0 else 0.0
    return OperatingPoint(
        fpr_threshold=fpr_threshold,
        min_score=float(min_score),
        max_detections=max_detections,
        calibration={
            **dict(description or {}),
            "images": curve.n_images,
            "calcifications": curve.n_truth,
            "target_cluster_fp": target,
            "cluster_fp_per": per,
            "truth_clusters": "rule",
            "fp_per_image": fp,
            "recall": recall,
            "cluster_sensitivity": float(point.sensitivity),
            "truth_clusters_found": int(point.found),
            "n_truth_clusters": int(point.n_truth_clusters),
            "false_cluster_marks_per_image": float(point.false_marks_per_image),
            "false_cluster_marks_per_normal_image": point.false_marks_per_normal_image,
        },
    )
