"""One evaluation of a detections document: µC FROC, cluster figures, recall per bin.

What ``calcnode evaluate`` reports (:func:`evaluate_detections`):

* the µC FROC of every candidate (:func:`cascade.evaluation.froc.froc`);
* the cluster-level figures (:mod:`cascade.evaluation.clusters`: sensitivity, false
  cluster marks per image and per normal image) at the score thresholds of the µC FROC
  points R@k (``point_ks``) and, when an operating point is given, at it (what the
  node reports: :meth:`OperatingPoint.select` per image, then the report's grouping);
* µC recall per size bin and per contrast bin (:mod:`cascade.evaluation.bins`) at the
  same points.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cascade.evaluation.bins import CONTRAST_EDGES, SIZE_EDGES_MM, BinnedRecall, binned_recall
from cascade.evaluation.clusters import (
    ClusterFroc,
    ClusterPoint,
    cases_from_records,
    cluster_froc,
    cluster_point,
    summary_json,
    truth_source,
)
from cascade.evaluation.froc import FrocResult, froc, images_from_detections
from cascade.evaluation.operating_point import OperatingPoint

__all__ = ["OPERATING_POINT", "Evaluation", "evaluate_detections", "point_name"]

#: Name of the operating-point column.
OPERATING_POINT = "operating point"


def point_name(k: float) -> str:
    """Column name of the FROC point R@k."""
    return f"R@{k:g}"


@dataclass(frozen=True, eq=False)
class Evaluation:
    """Everything :func:`evaluate_detections` measured; see the module docstring."""

    froc: FrocResult
    clusters: ClusterFroc
    cluster_points: dict[str, ClusterPoint]
    truth_clusters: str
    bins: tuple[BinnedRecall, ...]
    operating_point: OperatingPoint | None
    at_operating_point: dict[str, Any] | None

    def to_json(self) -> dict[str, Any]:
        """``froc.json``'s extra objects: ``clusters``, ``recall_by_bin``, the point."""
        return {
            "operating_point": None
            if self.operating_point is None
            else self.operating_point.thresholds_json(),
            "at_operating_point": self.at_operating_point,
            "clusters": summary_json(
                self.clusters, self.cluster_points, source=self.truth_clusters
            ),
            "recall_by_bin": {b.quantity: b.to_json() for b in self.bins},
        }

    def text(self) -> str:
        """Markdown: the cluster table and one recall table per binned quantity."""
        lines = [
            f"Clusters ({self.clusters.n_truth_clusters} truth clusters from "
            f"{'the manifest outlines' if self.truth_clusters == 'outlines' else 'the rule'}, "
            f"{self.clusters.n_images} images, {self.clusters.n_normal_images} normal; a "
            "reported cluster is ≥ 3 detections linked within 5 mm, as in the CAD SR, and finds "
            "a truth cluster when it holds ≥ 2 of its µCs within 1 mm):",
            "",
            "| Point | score ≥ | cluster sensitivity | false marks / image | "
            "false marks / normal image | marks / image |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, p in self.cluster_points.items():
            fn = p.false_marks_per_normal_image
            thr = "all" if not math.isfinite(p.threshold) else f"{p.threshold:.4g}"
            lines.append(
                f"| {name} | {thr} | {100.0 * p.sensitivity:.1f} % ({p.found}/"
                f"{p.n_truth_clusters}) | {p.false_marks_per_image:.3f} | "
                f"{'–' if fn is None else f'{fn:.3f}'} | {p.marks_per_image:.2f} |"
            )
        if self.at_operating_point is not None:
            a = self.at_operating_point
            lines += [
                "",
                f"At the operating point (FPR ≥ {a['fpr_threshold']:g}, score ≥ "
                f"{a['min_score']:.4g}): µC recall {100.0 * a['recall']:.1f} %, "
                f"{a['fp_per_image']:.2f} FP/image, {a['findings_per_image']:.1f} findings/image.",
            ]
        for b in self.bins:
            lines += [
                "",
                f"µC recall per {b.quantity} bin, % ({b.n_outside} µCs outside the bins):",
                "",
                b.table().rstrip("\n"),
            ]
        return "\n".join(lines) + "\n"


def _filtered(detections: Mapping[str, Any], op: OperatingPoint) -> dict[str, Any]:
    """The detections document with only what ``op`` reports."""
    images = []
    for img in detections.get("images", []):
        dets = list(img.get("detections", []))
        keep = op.select(
            np.array([d["score"] for d in dets], dtype=np.float64),
            np.array([d.get("fpr_score", 1.0) for d in dets], dtype=np.float64),
        )
        images.append({**img, "detections": [dets[i] for i in keep]})
    return {**detections, "images": images}


def evaluate_detections(
    records: Sequence[Any],
    detections: Mapping[str, Any],
    *,
    operating_point: OperatingPoint | None = None,
    breast_areas_cm2: Mapping[str, float] | None = None,
    contrasts: Mapping[str, np.ndarray] | None = None,
    use_ignore: bool = False,
    ks: Sequence[float] = (0.5, 1, 2, 5, 10, 15, 20),
    point_ks: Sequence[float] = (1, 5),
    truth: str = "auto",
) -> Evaluation:
    """Evaluate a ``detections.json`` document against manifest records.

    Parameters
    ----------
    records : sequence of cascade.data.manifest.ImageRecord
        The ground truth.
    detections : mapping
        A decoded ``detections.json`` (every candidate, for the whole curve).
    operating_point : OperatingPoint or None
        Also report what it keeps (µC recall, FP/image, clusters, bins).
    breast_areas_cm2 : mapping or None
        Breast area per SOP Instance UID (FP/cm²).
    contrasts : mapping or None
        Per SOP Instance UID, the measured contrast of each µC
        (:func:`cascade.evaluation.bins.measure_contrast`); without, no contrast bins.
    use_ignore : bool
        The µC FROC's ``use_ignore``.
    ks : sequence of float
        FP/image values of the µC FROC's R@k.
    point_ks : sequence of float
        FROC points at which clusters and bins are reported.
    truth : str
        Truth clusters: ``"auto"``, ``"outlines"`` or ``"rule"``
        (:func:`cascade.evaluation.clusters.truth_clusters`).
    """
    images = images_from_detections(records, detections, breast_areas_cm2=breast_areas_cm2)
    result = froc(images, ks=ks, use_ignore=use_ignore)
    source = truth_source(records) if truth == "auto" else truth
    cases = cases_from_records(records, images, source=source)
    curve = cluster_froc(cases)
    thresholds = {point_name(k): result.threshold_at_fp(k) for k in point_ks}
    points = {name: curve.point(t) for name, t in thresholds.items()}
    columns: dict[str, tuple[Sequence[Any], float]] = {
        name: (images, t) for name, t in thresholds.items()
    }
    at_op: dict[str, Any] | None = None
    if operating_point is not None:
        kept_doc = _filtered(detections, operating_point)
        kept = images_from_detections(records, kept_doc, breast_areas_cm2=breast_areas_cm2)
        points[OPERATING_POINT] = cluster_point(cases_from_records(records, kept, source=source))
        columns[OPERATING_POINT] = (kept, -math.inf)
        res_op = froc(kept, ks=ks, use_ignore=use_ignore)
        last = len(res_op.thresholds) - 1
        at_op = {
            **operating_point.thresholds_json(),
            "recall": float(res_op.recall[last]) if last >= 0 else 0.0,
            "fp_per_image": float(res_op.fp_per_image[last]) if last >= 0 else 0.0,
            "findings_per_image": res_op.n_detections / max(res_op.n_images, 1),
            "clusters": points[OPERATING_POINT].to_json(),
        }
    sizes = [
        np.array(
            [np.nan if c.diameter_mm is None else c.diameter_mm for c in rec.calcifications],
            dtype=np.float64,
        )
        for rec in records
    ]
    bins = [binned_recall(sizes, columns, edges=SIZE_EDGES_MM, quantity="size", unit="mm")]
    if contrasts is not None:
        values = [
            np.asarray(
                contrasts.get(rec.sop_instance_uid, np.full(len(rec.calcifications), np.nan)),
                dtype=np.float64,
            )
            for rec in records
        ]
        bins.append(
            binned_recall(
                values,
                columns,
                edges=CONTRAST_EDGES,
                quantity="contrast",
                unit="measured local contrast, [0, 1] image",
            )
        )
    return Evaluation(
        froc=result,
        clusters=curve,
        cluster_points=points,
        truth_clusters=source,
        bins=tuple(bins),
        operating_point=operating_point,
        at_operating_point=at_op,
    )
