"""Cluster-level evaluation and recall per bin, on hand-built truth and detections.

Points are (x, y): x = column, y = row, 0-based; every image here is at 0.1 mm/px, so
10 px = 1 mm. A reported cluster is ≥ 3 detections linked within 5 mm (50 px); a truth
cluster is found when one reported cluster holds ≥ 2 of its µCs within 1 mm (10 px).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from cascade.evaluation.bins import SIZE_EDGES_MM, binned_recall, measure_contrast
from cascade.evaluation.clusters import (
    ClusterCase,
    cluster_froc,
    cluster_point,
    group_points,
    truth_clusters,
    truth_source,
)
from cascade.evaluation.froc import ImageEval
from cascade.evaluation.operating_point import calibrate_operating_point

SPACING = (0.1, 0.1)

#: A truth cluster of four µCs, 2 mm apart.
TRUTH = [[100, 100], [120, 100], [100, 120], [120, 120]]


def _case(truth, dets, scores=None, clusters=None) -> ClusterCase:
    truth_arr = np.asarray(truth, dtype=float).reshape(-1, 2)
    dets_arr = np.asarray(dets, dtype=float).reshape(-1, 2)
    scores_arr = np.ones(len(dets_arr)) if scores is None else np.asarray(scores, float)
    image = ImageEval(truth_arr, dets_arr, scores_arr, spacing_mm=SPACING)
    if clusters is None:
        clusters = (tuple(range(len(truth_arr))),) if len(truth_arr) else ()
    return ClusterCase(image, clusters)


def test_a_reported_cluster_holding_two_of_the_cluster_s_calcifications_finds_it() -> None:
    # Two detections on µCs, a third (an FP for the µC FROC) within 5 mm links them.
    point = cluster_point([_case(TRUTH, [[101, 100], [120, 101], [140, 140]])])
    assert (point.found, point.n_truth_clusters, point.sensitivity) == (1, 1, 1.0)
    assert (point.marks, point.false_marks) == (1, 0)


def test_a_reported_cluster_holding_only_one_calcification_does_not_find_it() -> None:
    point = cluster_point([_case(TRUTH, [[101, 100], [130, 130], [140, 140]])])
    assert (point.found, point.sensitivity) == (0, 0.0)
    # …and it is a false cluster mark.
    assert (point.marks, point.false_marks) == (1, 1)


def test_two_hits_without_a_reported_cluster_find_nothing() -> None:
    # Two detections on µCs are a group of 2 < 3: isolated findings, no cluster mark.
    point = cluster_point([_case(TRUTH, [[101, 100], [120, 101]])])
    assert (point.found, point.marks, point.false_marks) == (0, 0, 0)


def test_detections_more_than_5_mm_apart_do_not_form_one_cluster() -> None:
    # Three hits, but the third is 51 px (5.1 mm) from the nearest other: no group of 3.
    truth = [[100, 100], [120, 100], [171, 100]]
    point = cluster_point([_case(truth, truth)])
    assert point.marks == 0 and point.found == 0


def test_a_false_cluster_on_a_normal_image_is_counted_per_image_and_per_normal_image() -> None:
    found = _case(TRUTH, TRUTH)  # all four µCs hit: found, no false mark
    normal = _case([], [[300, 300], [310, 300], [320, 300]])  # one false cluster
    empty_normal = _case([], [])
    point = cluster_point([found, normal, empty_normal])
    assert (point.found, point.false_marks, point.false_marks_normal) == (1, 1, 1)
    assert point.n_images == 3 and point.n_normal_images == 2
    assert point.false_marks_per_image == pytest.approx(1 / 3)
    assert point.false_marks_per_normal_image == pytest.approx(1 / 2)


def test_false_marks_per_normal_image_is_none_without_a_normal_image() -> None:
    point = cluster_point([_case(TRUTH, TRUTH)])
    assert point.false_marks_per_normal_image is None
    assert point.to_json()["false_marks_per_normal_image"] is None


def test_one_truth_cluster_found_by_two_reported_clusters_counts_once() -> None:
    # µCs 0-1 and 2-3 of one truth cluster 8 mm apart, each pair in its own reported cluster.
    truth = [[100, 100], [110, 100], [180, 100], [190, 100]]
    dets = [[100, 100], [110, 100], [105, 110], [180, 100], [190, 100], [185, 110]]
    point = cluster_point([_case(truth, dets)])
    assert (point.found, point.n_truth_clusters, point.marks, point.false_marks) == (1, 1, 2, 0)


def test_curve_sweeps_thresholds_and_false_marks_can_fall_when_clusters_merge() -> None:
    # Scores 0.9 … 0.3. At 0.7 the three hits form a cluster (found). The normal image
    # has two false triplets 6 mm apart; a 0.3 detection between them merges them.
    cancer = _case(TRUTH, [[100, 100], [120, 100], [100, 120]], scores=[0.9, 0.8, 0.7])
    normal = _case(
        [],
        [[300, 300], [310, 300], [320, 300], [380, 300], [390, 300], [400, 300], [350, 300]],
        scores=[0.6, 0.6, 0.6, 0.5, 0.5, 0.5, 0.3],
    )
    curve = cluster_froc([cancer, normal])
    assert list(curve.thresholds) == [0.9, 0.8, 0.7, 0.6, 0.5, 0.3]
    assert list(curve.found) == [0, 0, 1, 1, 1, 1]
    assert list(curve.false_marks) == [0, 0, 0, 1, 2, 1]
    assert list(curve.false_marks_normal) == list(curve.false_marks)
    assert curve.point(0.55).false_marks == 1 and curve.point(1.0).marks == 0
    # The most sensitive point with ≤ 1 false mark per normal image: ties go to the
    # highest threshold (0.7: found, no false mark).
    best = curve.best_within(0.0, per="normal-image")
    assert best is not None and best.threshold == 0.7 and best.sensitivity == 1.0
    # Every threshold leaves a false mark on the normal image alone: none qualifies.
    assert cluster_froc([normal]).best_within(0.5, per="image") is None


def test_no_detections_give_an_empty_curve_and_zero_sensitivity() -> None:
    curve = cluster_froc([_case(TRUTH, [])])
    assert curve.thresholds.shape == (0,)
    point = curve.point(-math.inf)
    assert (point.sensitivity, point.found, point.marks) == (0.0, 0, 0)


def test_cluster_case_rejects_indices_outside_the_image() -> None:
    image = ImageEval([[1, 1]], [], [], spacing_mm=SPACING)
    with pytest.raises(ValueError, match="clusters\\[0\\]"):
        ClusterCase(image, ((0, 1),))


# --------------------------------------------------------------------------- grouping & truth
def test_group_points_links_within_the_distance_and_keeps_small_groups_as_singletons() -> None:
    groups = group_points(np.array([[0, 0], [50, 0], [100, 0], [400, 0]]), SPACING)
    assert [(g.indices, g.is_cluster) for g in groups] == [((0, 1, 2), True), ((3,), False)]


def test_truth_clusters_from_outlines_hold_the_calcifications_in_or_on_the_outline() -> None:
    truth = np.array([[100, 100], [120, 100], [110, 120], [110, 105], [300, 300]], float)
    hull = [(100, 100), (120, 100), (110, 120)]  # vertices are µCs, one µC inside
    assert truth_clusters(truth, SPACING, outlines=[hull]) == ((0, 1, 2, 3),)


def test_truth_clusters_by_rule_group_the_calcifications_like_the_report() -> None:
    truth = np.array([[100, 100], [120, 100], [110, 120], [300, 300]], float)
    assert truth_clusters(truth, SPACING, source="rule") == ((0, 1, 2),)


def test_truth_source_is_outlines_when_any_record_has_one() -> None:
    class Rec:
        def __init__(self, clusters: tuple) -> None:
            self.clusters = clusters

    assert truth_source([Rec(()), Rec((((1.0, 1.0),),))]) == "outlines"
    assert truth_source([Rec(()), Rec(())]) == "rule"


# --------------------------------------------------------------------------- bins
def test_binned_recall_splits_calcifications_by_size() -> None:
    # µCs of 0.15, 0.25, 0.4 and 1.0 mm (1 mm: the last bin); 0.05 mm is outside.
    truth = [[10, 10], [60, 10], [110, 10], [160, 10], [210, 10]]
    sizes = [np.array([0.15, 0.25, 0.4, 1.0, 0.05])]
    all_cands = ImageEval(
        truth, [[10, 10], [110, 10], [160, 10]], [0.9, 0.5, 0.2], spacing_mm=SPACING
    )
    table = binned_recall(
        sizes,
        {"high": ([all_cands], 0.6), "low": ([all_cands], 0.1)},
        edges=SIZE_EDGES_MM,
        quantity="size",
        unit="mm",
    )
    assert table.labels() == ["0.1–0.2", "0.2–0.3", "0.3–0.5", "0.5–1"]
    assert table.counts == (1, 1, 1, 1) and table.n_outside == 1
    assert table.recall["high"] == (1.0, 0.0, 0.0, 0.0)
    assert table.recall["low"] == (1.0, 0.0, 1.0, 1.0)
    every = binned_recall(
        sizes, {"all": ([all_cands], -math.inf)}, edges=SIZE_EDGES_MM, quantity="size", unit="mm"
    )
    assert every.recall["all"] == (1.0, 0.0, 1.0, 1.0)  # a missed µC stays missed
    assert "| 0.5–1 | 1 | 0.0 | 100.0 |" in table.table()


def test_binned_recall_reports_none_for_an_empty_bin() -> None:
    image = ImageEval([[10, 10]], [[10, 10]], [1.0], spacing_mm=SPACING)
    table = binned_recall(
        [np.array([0.15])],
        {"all": ([image], -math.inf)},
        edges=SIZE_EDGES_MM,
        quantity="size",
        unit="mm",
    )
    assert table.recall["all"] == (1.0, None, None, None)
    assert table.to_json()["recall"]["all"] == [1.0, None, None, None]


def test_measure_contrast_is_peak_minus_the_ring_background() -> None:
    image = np.full((60, 60), 0.3)
    image[30, 30] = 0.5  # a one-pixel µC, 0.2 above its background
    image[30, 10] = 0.34
    mask = np.ones(image.shape, dtype=bool)
    c = measure_contrast(image, mask, np.array([[30, 30], [10, 30]]), [0.07, None], spacing_mm=0.07)
    assert c == pytest.approx([0.2, 0.04])
    # No breast pixel in the ring: unknown.
    assert np.isnan(
        measure_contrast(image, np.zeros_like(mask), np.array([[30, 30]]), [0.1], spacing_mm=0.07)[
            0
        ]
    )


# --------------------------------------------------------------------------- calibration
@dataclass(frozen=True)
class _Det:
    x: float
    y: float
    score: float
    fpr_score: float = 1.0


@dataclass(frozen=True)
class _Scored:
    detections: tuple[_Det, ...]
    pixel_spacing_mm: tuple[float, float] = SPACING


def test_calibration_for_a_cluster_target_keeps_the_cluster_and_drops_the_false_one() -> None:
    # A found cluster scored 0.9/0.8/0.7, a false triplet on a normal image at 0.5: a
    # target of 0 false cluster marks per normal image stops at 0.7.
    cancer = _Scored(
        tuple(_Det(x, y, s) for (x, y), s in zip(TRUTH[:3], (0.9, 0.8, 0.7), strict=True))
    )
    normal = _Scored(tuple(_Det(300 + 10 * i, 300, 0.5) for i in range(3)))
    op = calibrate_operating_point(
        [(cancer, np.array(TRUTH, float)), (normal, np.zeros((0, 2)))],
        target_fp_per_image=1.0,
        target_cluster_fp=0.0,
        cluster_fp_per="normal-image",
    )
    assert op.min_score == 0.7
    cal = op.calibration
    assert cal["cluster_sensitivity"] == 1.0 and cal["false_cluster_marks_per_normal_image"] == 0.0
    # The µC target alone (1 FP/image) would have gone down to 0.5.
    assert (
        calibrate_operating_point(
            [(cancer, np.array(TRUTH, float)), (normal, np.zeros((0, 2)))], target_fp_per_image=1.5
        ).min_score
        == 0.5
    )
