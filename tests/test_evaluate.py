"""FROC evaluation (1-mm rule, R@k, FP/cm²) and the DoG baseline, against hand-computed values.

Points are (x, y): x = column, y = row, 0-based, first pixel's centre at (0, 0).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from cascade.evaluation.froc import (
    DET_FALSE_POSITIVE,
    DET_IGNORED,
    DET_NEAR_TRUTH,
    FrocResult,
    ImageEval,
    dog_detect,
    froc,
    froc_table,
    match_image,
    plot_froc,
)


def _three_images() -> list[ImageEval]:
    """2 images with 3 µCs plus one image without µC; 7 detections, scores chosen by hand.

    Image A (0.1 mm/px, 2 cm²): µCs T1 (10, 10), T2 (30, 10).
      d 0.9 at (10, 12): 0.2 mm from T1 → T1
      d 0.8 at (50, 50): far from all → FP
      d 0.5 at (31, 10): 0.1 mm from T2 → T2
      d 0.5 at (10, 9):  second detection on T1 → not an FP (tie with the T2 hit)
    Image B (0.07 mm/px, 4 cm²): µC T3 (100, 100).
      d 0.7 at (0, 0): FP
      d 0.3 at (100, 112): 12 px in rows = 0.84 mm → T3
    Image C (0.1 mm/px, 2 cm²): no µC.
      d 0.95 at (5, 5): FP
    """
    a = ImageEval(
        [[10, 10], [30, 10]],
        [[10, 12], [50, 50], [31, 10], [10, 9]],
        [0.9, 0.8, 0.5, 0.5],
        spacing_mm=(0.1, 0.1),
        breast_area_cm2=2.0,
    )
    b = ImageEval(
        [[100, 100]],
        [[0, 0], [100, 112]],
        [0.7, 0.3],
        spacing_mm=(0.07, 0.07),
        breast_area_cm2=4.0,
    )
    c = ImageEval(np.zeros((0, 2)), [[5, 5]], [0.95], spacing_mm=(0.1, 0.1), breast_area_cm2=2.0)
    return [a, b, c]


# --------------------------------------------------------------------------- froc: values


def test_froc_hand_computed_curve_on_three_images() -> None:
    result = froc(_three_images())
    np.testing.assert_array_equal(result.thresholds, [0.95, 0.9, 0.8, 0.7, 0.5, 0.3])
    np.testing.assert_allclose(result.recall, [0, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 1])
    # FP counts 1, 1, 2, 3, 3, 3 over 3 images (the µC-free image C counts).
    np.testing.assert_allclose(result.fp_per_image, [1 / 3, 1 / 3, 2 / 3, 1, 1, 1])
    assert (result.n_images, result.n_truth, result.n_detections) == (3, 3, 7)


def test_froc_hand_computed_recall_at_k() -> None:
    result = froc(_three_images(), ks=(0, 0.25, 0.5, 1, 2))
    # FP/image ≤ 0.25: no operating point → 0; ≤ 0.5: thresholds 0.95, 0.9 → 1/3;
    # ≤ 1: every operating point → 1.
    assert result.recall_at == pytest.approx({0.0: 0.0, 0.25: 0.0, 0.5: 1 / 3, 1.0: 1.0, 2.0: 1.0})
    assert result.recall_at_fp(2 / 3) == pytest.approx(1 / 3)
    assert result.recall_at_fp(30) == pytest.approx(1.0)


def test_froc_fp_per_cm2_uses_total_breast_area() -> None:
    result = froc(_three_images(), ks_per_cm2=(0.1, 0.125, 0.25, 0.375))
    assert result.fp_per_cm2 is not None
    # Total area 2 + 4 + 2 = 8 cm²; FP counts 1, 1, 2, 3, 3, 3.
    np.testing.assert_allclose(result.fp_per_cm2, np.array([1, 1, 2, 3, 3, 3]) / 8)
    assert result.recall_at_per_cm2 == pytest.approx(
        {0.1: 0.0, 0.125: 1 / 3, 0.25: 1 / 3, 0.375: 1.0}
    )
    assert result.recall_at_fp_per_cm2(0.3) == pytest.approx(1 / 3)


def test_froc_fp_per_cm2_is_none_when_an_area_is_missing() -> None:
    images = _three_images()
    images[1] = ImageEval(
        images[1].truth_xy, images[1].det_xy, images[1].det_scores, spacing_mm=(0.07, 0.07)
    )
    result = froc(images)
    assert result.fp_per_cm2 is None
    assert result.recall_at_per_cm2 is None
    with pytest.raises(ValueError, match="k"):
        result.recall_at_fp_per_cm2(0.1)


def test_equal_scores_enter_together() -> None:
    # Two detections with score 0.5: one hits the µC, one is an FP; there is no operating
    # point that keeps the hit without the FP.
    image = ImageEval([[10, 10]], [[10, 10], [40, 40]], [0.5, 0.5], spacing_mm=(0.1, 0.1))
    result = froc([image], ks=(0, 1))
    np.testing.assert_array_equal(result.thresholds, [0.5])
    np.testing.assert_array_equal(result.recall, [1.0])
    np.testing.assert_array_equal(result.fp_per_image, [1.0])
    assert result.recall_at == {0.0: 0.0, 1.0: 1.0}


def test_image_without_microcalcifications_contributes_fps_and_denominator() -> None:
    hit = ImageEval([[10, 10]], [[10, 10]], [0.9], spacing_mm=(0.1, 0.1))
    empty = ImageEval([], [[1, 1], [20, 20]], [0.8, 0.7], spacing_mm=(0.1, 0.1))
    result = froc([hit, empty])
    np.testing.assert_allclose(result.fp_per_image, [0.0, 0.5, 1.0])
    np.testing.assert_allclose(result.recall, [1.0, 1.0, 1.0])


def test_image_without_detections_still_counts_in_the_denominator() -> None:
    with_fp = ImageEval([[10, 10]], [[50, 50]], [0.9], spacing_mm=(0.1, 0.1))
    nothing = ImageEval([[10, 10]], [], [], spacing_mm=(0.1, 0.1))
    result = froc([with_fp, nothing])
    np.testing.assert_allclose(result.fp_per_image, [0.5])
    np.testing.assert_allclose(result.recall, [0.0])
    assert result.n_truth == 2


def test_no_detections_anywhere_gives_empty_curve_and_zero_recall() -> None:
    image = ImageEval([[10, 10]], np.zeros((0, 2)), np.zeros(0), spacing_mm=(0.1, 0.1))
    result = froc([image], ks=(1, 5))
    assert result.thresholds.shape == (0,)
    assert result.recall.shape == (0,)
    assert result.fp_per_image.shape == (0,)
    assert result.recall_at == {1.0: 0.0, 5.0: 0.0}
    assert (result.n_truth, result.n_detections) == (1, 0)


def test_no_microcalcifications_anywhere_reports_recall_zero_not_nan() -> None:
    image = ImageEval([], [[5, 5], [9, 9]], [0.4, 0.2], spacing_mm=(0.1, 0.1))
    result = froc([image], ks=(1, 5))
    np.testing.assert_array_equal(result.recall, [0.0, 0.0])
    np.testing.assert_allclose(result.fp_per_image, [1.0, 2.0])
    assert result.n_truth == 0
    assert result.recall_at == {1.0: 0.0, 5.0: 0.0}
    json.dumps(result.to_json(), allow_nan=False)


# ------------------------------------------------------------------- froc: the 1-mm rule


def test_detection_12_px_in_columns_at_70um_is_a_hit_but_15_px_is_a_miss() -> None:
    truth = [[100, 100]]
    near = ImageEval(truth, [[112, 100]], [1.0], spacing_mm=(0.07, 0.07))  # 0.84 mm
    far = ImageEval(truth, [[115, 100]], [1.0], spacing_mm=(0.07, 0.07))  # 1.05 mm
    assert froc([near]).recall.tolist() == [1.0]
    assert froc([near]).fp_per_image.tolist() == [0.0]
    assert froc([far]).recall.tolist() == [0.0]
    assert froc([far]).fp_per_image.tolist() == [1.0]


def test_anisotropic_spacing_measures_rows_and_columns_separately() -> None:
    # Rows 0.1 mm, columns 0.07 mm: 12 px along x (columns) = 0.84 mm → hit;
    # 12 px along y (rows) = 1.2 mm → miss.
    spacing = (0.1, 0.07)
    along_x = ImageEval([[100, 100]], [[112, 100]], [1.0], spacing_mm=spacing)
    along_y = ImageEval([[100, 100]], [[100, 112]], [1.0], spacing_mm=spacing)
    assert froc([along_x]).recall.tolist() == [1.0]
    assert froc([along_y]).recall.tolist() == [0.0]
    # Diagonal 6 px x, 8 px y: sqrt(0.42² + 0.8²) = 0.9035 mm → hit.
    diag = ImageEval([[100, 100]], [[106, 108]], [1.0], spacing_mm=spacing)
    assert froc([diag]).recall.tolist() == [1.0]


def test_detection_at_exactly_the_radius_is_a_hit() -> None:
    # 10 px at 0.1 mm = 1.0 mm exactly.
    exact = ImageEval([[20, 20]], [[30, 20]], [1.0], spacing_mm=(0.1, 0.1))
    assert froc([exact]).recall.tolist() == [1.0]
    # 10 * 0.07 = 0.7000000000000001 in floating point: still on the 0.7 mm boundary.
    rounded = ImageEval([[0, 0]], [[10, 0]], [1.0], spacing_mm=(0.07, 0.07))
    assert 10 * 0.07 > 0.7
    assert froc([rounded], radius_mm=0.7).recall.tolist() == [1.0]
    assert froc([rounded], radius_mm=0.69).recall.tolist() == [0.0]


def test_several_detections_on_one_microcalcification_are_one_hit_and_no_fp() -> None:
    image = ImageEval(
        [[50, 50]],
        [[50, 50], [52, 50], [50, 55], [45, 45]],
        [0.9, 0.6, 0.4, 0.2],
        spacing_mm=(0.1, 0.1),
    )
    result = froc([image])
    np.testing.assert_array_equal(result.recall, [1.0, 1.0, 1.0, 1.0])
    np.testing.assert_array_equal(result.fp_per_image, [0.0, 0.0, 0.0, 0.0])
    match = match_image(image)
    np.testing.assert_array_equal(match.truth_hit_score, [0.9])
    np.testing.assert_array_equal(match.det_status, [DET_NEAR_TRUTH] * 4)


def test_one_detection_between_two_microcalcifications_recalls_both() -> None:
    # µCs 2 mm apart, the detection 1.0 mm from each (the paper's rule, inclusive).
    image = ImageEval([[0, 0], [20, 0]], [[10, 0]], [0.5], spacing_mm=(0.1, 0.1))
    result = froc([image])
    np.testing.assert_array_equal(result.recall, [1.0])
    np.testing.assert_array_equal(result.fp_per_image, [0.0])


def test_first_hit_score_is_the_best_detection_within_the_radius() -> None:
    image = ImageEval(
        [[10, 10], [100, 100]],
        [[11, 10], [12, 10], [100, 103], [200, 200]],
        [0.3, 0.8, 0.6, 0.9],
        spacing_mm=(0.1, 0.1),
    )
    match = match_image(image)
    np.testing.assert_array_equal(match.truth_hit_score, [0.8, 0.6])
    np.testing.assert_array_equal(
        match.det_status, [DET_NEAR_TRUTH, DET_NEAR_TRUTH, DET_NEAR_TRUTH, DET_FALSE_POSITIVE]
    )
    missed = match_image(ImageEval([[10, 10]], [], [], spacing_mm=(0.1, 0.1)))
    assert missed.truth_hit_score.tolist() == [-math.inf]


def test_radius_mm_changes_the_rule() -> None:
    # 15 px at 0.1 mm = 1.5 mm: a miss at 1 mm, a hit at 2 mm.
    image = ImageEval([[0, 0]], [[15, 0]], [1.0], spacing_mm=(0.1, 0.1))
    assert froc([image], radius_mm=1.0).recall.tolist() == [0.0]
    two = froc([image], radius_mm=2.0)
    assert two.recall.tolist() == [1.0]
    assert two.radius_mm == 2.0


# ---------------------------------------------------------------------- froc: ignore_xy


def _ignore_image() -> ImageEval:
    # µC at (10, 10); a macro-calcification at (50, 50).
    return ImageEval(
        [[10, 10]],
        [[10, 10], [52, 50], [200, 200], [55, 50]],
        [0.9, 0.8, 0.7, 0.6],
        spacing_mm=(0.1, 0.1),
        ignore_xy=[[50, 50]],
    )


def test_ignore_points_are_off_by_default() -> None:
    result = froc([_ignore_image()])
    # Detections at 0.2 mm and 0.5 mm from the macro-calcification are FPs.
    np.testing.assert_array_equal(result.thresholds, [0.9, 0.8, 0.7, 0.6])
    np.testing.assert_array_equal(result.fp_per_image, [0, 1, 2, 3])
    assert result.n_ignored == 0


def test_use_ignore_drops_detections_near_ignore_points_from_fp_and_thresholds() -> None:
    result = froc([_ignore_image()], use_ignore=True)
    np.testing.assert_array_equal(result.thresholds, [0.9, 0.7])
    np.testing.assert_array_equal(result.fp_per_image, [0, 1])
    np.testing.assert_array_equal(result.recall, [1, 1])
    assert result.n_ignored == 2
    assert result.n_detections == 4
    status = match_image(_ignore_image(), use_ignore=True).det_status
    np.testing.assert_array_equal(
        status, [DET_NEAR_TRUTH, DET_IGNORED, DET_FALSE_POSITIVE, DET_IGNORED]
    )


def test_detection_near_both_a_microcalcification_and_an_ignore_point_counts_as_hit() -> None:
    image = ImageEval([[10, 10]], [[12, 10]], [0.5], spacing_mm=(0.1, 0.1), ignore_xy=[[14, 10]])
    result = froc([image], use_ignore=True)
    np.testing.assert_array_equal(result.recall, [1.0])
    assert result.n_ignored == 0


# ------------------------------------------------------------- froc: against brute force


def _brute_force(images: list[ImageEval], radius_mm: float) -> tuple[np.ndarray, ...]:
    thresholds = np.unique(np.concatenate([im.det_scores for im in images]))[::-1]
    n_truth = sum(im.n_truth for im in images)
    recalls, fps = [], []
    for t in thresholds:
        recalled = fp = 0
        for im in images:
            keep = im.det_scores >= t
            det = im.det_xy[keep] * [im.spacing_mm[1], im.spacing_mm[0]]
            tru = im.truth_xy * [im.spacing_mm[1], im.spacing_mm[0]]
            d = np.sqrt(((tru[:, None, :] - det[None, :, :]) ** 2).sum(-1))
            near = d <= radius_mm
            recalled += int(near.any(axis=1).sum())
            fp += int((~near.any(axis=0)).sum())
        recalls.append(recalled / n_truth)
        fps.append(fp / len(images))
    return thresholds, np.array(recalls), np.array(fps)


def test_froc_matches_a_brute_force_reference_on_random_images() -> None:
    rng = np.random.default_rng(7)
    images = []
    for _ in range(6):
        truth = rng.uniform(0, 80, size=(int(rng.integers(0, 12)), 2))
        det = rng.uniform(0, 80, size=(int(rng.integers(0, 40)), 2))
        # Rounded scores make ties common.
        scores = np.round(rng.uniform(0, 1, size=det.shape[0]), 1)
        spacing = (float(rng.uniform(0.05, 0.12)), float(rng.uniform(0.05, 0.12)))
        images.append(ImageEval(truth, det, scores, spacing_mm=spacing))
    assert sum(im.n_truth for im in images) > 0
    result = froc(images)
    thresholds, recall, fp = _brute_force(images, 1.0)
    np.testing.assert_array_equal(result.thresholds, thresholds)
    np.testing.assert_allclose(result.recall, recall)
    np.testing.assert_allclose(result.fp_per_image, fp)
    assert np.all(np.diff(result.recall) >= 0)
    assert np.all(np.diff(result.fp_per_image) >= 0)


# ------------------------------------------------------------------------ serialisation


def test_to_json_is_plain_and_round_trips() -> None:
    result = froc(_three_images())
    data = result.to_json()
    text = json.dumps(data, allow_nan=False)
    assert data["recall_at"]["1.0"] == 1.0
    assert data["recall_at"]["0.5"] == pytest.approx(1 / 3)
    assert all(type(v) is float for v in data["recall"])
    back = FrocResult.from_json(json.loads(text))
    np.testing.assert_array_equal(back.thresholds, result.thresholds)
    np.testing.assert_array_equal(back.recall, result.recall)
    np.testing.assert_array_equal(back.fp_per_image, result.fp_per_image)
    assert back.fp_per_cm2 is not None and result.fp_per_cm2 is not None
    np.testing.assert_array_equal(back.fp_per_cm2, result.fp_per_cm2)
    assert back.recall_at == result.recall_at
    assert back.recall_at_per_cm2 == result.recall_at_per_cm2
    assert (back.n_images, back.n_truth, back.n_detections) == (3, 3, 7)
    assert back.to_json() == data


def test_to_json_writes_null_fp_per_cm2_when_areas_are_missing() -> None:
    image = ImageEval([[1, 1]], [[1, 1]], [0.5], spacing_mm=(0.1, 0.1))
    data = json.loads(json.dumps(froc([image]).to_json()))
    assert data["fp_per_cm2"] is None
    assert data["recall_at_per_cm2"] is None
    assert FrocResult.from_json(data).fp_per_cm2 is None


def test_from_json_names_a_missing_key() -> None:
    data = froc(_three_images()).to_json()
    del data["recall"]
    with pytest.raises(ValueError, match="recall"):
        FrocResult.from_json(data)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"truth_xy": [[1, 2, 3]]}, "truth_xy"),
        ({"truth_xy": [[np.nan, 2]]}, "truth_xy"),
        ({"truth_xy": [1, 2]}, "truth_xy"),
        ({"det_xy": [[1, 2], [3, 4]]}, "det_scores"),
        ({"det_xy": [[np.inf, 2]]}, "det_xy"),
        ({"det_scores": [np.nan]}, "det_scores"),
        ({"det_scores": [[0.5]]}, "det_scores"),
        ({"spacing_mm": (0.1,)}, "spacing_mm"),
        ({"spacing_mm": (0.1, 0.0)}, "spacing_mm"),
        ({"spacing_mm": (-0.1, 0.1)}, "spacing_mm"),
        ({"spacing_mm": (0.1, math.inf)}, "spacing_mm"),
        ({"spacing_mm": 0.1}, "spacing_mm"),
        ({"spacing_mm": "0.1"}, "spacing_mm"),
        ({"breast_area_cm2": 0.0}, "breast_area_cm2"),
        ({"breast_area_cm2": -3.0}, "breast_area_cm2"),
        ({"breast_area_cm2": math.nan}, "breast_area_cm2"),
        ({"ignore_xy": [[1, 2, 3]]}, "ignore_xy"),
        ({"ignore_xy": [[1, np.nan]]}, "ignore_xy"),
    ],
)
def test_image_eval_rejects_invalid_fields(kwargs: dict, field: str) -> None:
    args = {
        "truth_xy": [[1, 2]],
        "det_xy": [[1, 2]],
        "det_scores": [0.5],
        "spacing_mm": (0.1, 0.1),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        ImageEval(args.pop("truth_xy"), args.pop("det_xy"), args.pop("det_scores"), **args)


def test_image_eval_metadata_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        ImageEval([[1, 2]], [[1, 2]], [0.5], (0.1, 0.1))  # type: ignore[misc]


def test_image_eval_coerces_and_accepts_empty_lists() -> None:
    image = ImageEval([], [], [], spacing_mm=[0.1, 0.2])
    assert image.truth_xy.shape == (0, 2)
    assert image.det_xy.shape == (0, 2)
    assert image.det_scores.shape == (0,)
    assert image.spacing_mm == (0.1, 0.2)


def test_froc_rejects_no_images() -> None:
    with pytest.raises(ValueError, match="images"):
        froc([])


def test_froc_rejects_a_non_image_eval() -> None:
    with pytest.raises(TypeError, match=r"images\[0\]"):
        froc([{"truth_xy": []}])  # type: ignore[list-item]


@pytest.mark.parametrize("radius", [0.0, -1.0, math.nan, math.inf])
def test_froc_rejects_bad_radius(radius: float) -> None:
    with pytest.raises(ValueError, match="radius_mm"):
        froc(_three_images(), radius_mm=radius)


@pytest.mark.parametrize("ks", [(-1,), (math.nan,), ("1",), 5])
def test_froc_rejects_bad_ks(ks: object) -> None:
    with pytest.raises(ValueError, match="ks"):
        froc(_three_images(), ks=ks)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- dog_detect


def _dot_phantom(spacing_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """20 × 20 mm smooth ramp with five Gaussian dots (σ 0.084 mm, +0.2); dots in mm (x, y)."""
    n = round(20.0 / spacing_mm)
    yy, xx = np.mgrid[0:n, 0:n] * spacing_mm
    image = 0.3 + 0.01 * xx + 0.005 * yy
    dots = np.array([[3, 4], [10, 5], [15, 15], [6, 12], [12, 9.5]], dtype=float)
    sigma = 0.084
    for x, y in dots:
        image += 0.2 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    return image, dots


@pytest.mark.parametrize("spacing", [0.07, 0.035])
def test_dog_detect_finds_gaussian_dots_on_a_smooth_background(spacing: float) -> None:
    image, dots = _dot_phantom(spacing)
    xy, scores = dog_detect(image, spacing_mm=spacing)
    assert xy.shape == (scores.shape[0], 2)
    assert np.all(np.diff(scores) <= 0)
    # The five strongest peaks are the dots, each within one pixel of its centre,
    # and they stand far above anything on the ramp.
    top_mm = xy[:5] * spacing
    for x, y in dots:
        assert np.min(np.hypot(top_mm[:, 0] - x, top_mm[:, 1] - y)) <= spacing * 1.01
    assert scores[4] > 0.06
    assert scores[5] < 0.1 * scores[4]
    truth = dots / spacing
    result = froc([ImageEval(truth, xy, scores, spacing_mm=(spacing, spacing))], ks=(0,))
    assert result.recall_at[0.0] == 1.0


def test_dog_detect_scales_sigmas_with_spacing_on_a_unit_impulse() -> None:
    # DoG of a unit impulse peaks at 1/(2π s1²) − 1/(2π s2²), s = σ·0.07/spacing.
    image = np.zeros((81, 81))
    image[40, 30] = 1.0
    for spacing in (0.07, 0.035):
        s1, s2 = 1.2 * 0.07 / spacing, 3.0 * 0.07 / spacing
        expected = 1 / (2 * math.pi * s1**2) - 1 / (2 * math.pi * s2**2)
        xy, scores = dog_detect(image, spacing_mm=spacing)
        assert xy.tolist() == [[30.0, 40.0]]
        assert scores[0] == pytest.approx(expected, rel=1e-3)
    # Hand values: 0.09284 at 70 µm, 0.02321 at 35 µm.
    assert dog_detect(image, spacing_mm=0.07)[1][0] == pytest.approx(0.09284, abs=1e-5)
    assert dog_detect(image, spacing_mm=0.035)[1][0] == pytest.approx(0.02321, abs=1e-5)


def test_dog_detect_same_physical_scene_scores_alike_at_two_spacings() -> None:
    scores = []
    for spacing in (0.07, 0.035):
        image, _ = _dot_phantom(spacing)
        scores.append(np.sort(dog_detect(image, spacing_mm=spacing)[1][:5]))
    np.testing.assert_allclose(scores[0], scores[1], rtol=0.05)


def test_dog_detect_keeps_only_peaks_inside_the_mask() -> None:
    image, _ = _dot_phantom(0.07)
    mask = np.ones(image.shape, dtype=bool)
    mask[:, : int(8.0 / 0.07)] = False  # drops the dots at x = 3 mm and x = 6 mm
    xy, scores = dog_detect(image, spacing_mm=0.07, mask=mask)
    assert np.all(mask[xy[:, 1].astype(int), xy[:, 0].astype(int)])
    strong = xy[scores > 0.06] * 0.07
    assert len(strong) == 3
    assert sorted(np.round(strong[:, 0]).tolist()) == [10.0, 12.0, 15.0]


def test_dog_detect_respects_max_detections_and_returns_empty_on_flat_image() -> None:
    image, _ = _dot_phantom(0.07)
    xy, scores = dog_detect(image, spacing_mm=0.07, max_detections=3)
    assert xy.shape == (3, 2)
    assert scores.shape == (3,)
    xy, scores = dog_detect(np.full((40, 40), 0.5), spacing_mm=0.07)
    assert xy.shape == (0, 2)
    assert scores.shape == (0,)


def test_dog_detect_min_distance_merges_close_peaks() -> None:
    image = np.zeros((60, 60))
    image[30, 28] = image[30, 32] = 1.0  # two impulses 4 px apart
    assert dog_detect(image, spacing_mm=0.14, min_distance_px=1)[0].shape[0] == 2
    assert dog_detect(image, spacing_mm=0.14, min_distance_px=5)[0].shape[0] == 1


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"image": np.zeros((3, 3, 3))}, "image"),
        ({"image": np.zeros((0, 5))}, "image"),
        ({"image": np.array([[np.nan, 0.0]])}, "image"),
        ({"image": np.array([["a", "b"]])}, "image"),
        ({"spacing_mm": 0.0}, "spacing_mm"),
        ({"spacing_mm": math.nan}, "spacing_mm"),
        ({"mask": np.ones((4, 4), dtype=bool)}, "mask"),
        ({"mask": np.ones((10, 10), dtype=int)}, "mask"),
        ({"sigmas_px": (3.0, 1.2)}, "sigmas_px"),
        ({"sigmas_px": (0.0, 1.2)}, "sigmas_px"),
        ({"sigmas_px": (1.2,)}, "sigmas_px"),
        ({"min_distance_px": 0}, "min_distance_px"),
        ({"min_distance_px": 2.5}, "min_distance_px"),
        ({"max_detections": 0}, "max_detections"),
    ],
)
def test_dog_detect_rejects_invalid_arguments(kwargs: dict, name: str) -> None:
    args = {"image": np.zeros((10, 10)), "spacing_mm": 0.07}
    args.update(kwargs)
    image = args.pop("image")
    with pytest.raises(ValueError, match=name):
        dog_detect(image, **args)


# ----------------------------------------------------------------------- plot and table


def test_plot_froc_writes_a_png(tmp_path: Path) -> None:
    results = {"A": froc(_three_images()), "B": froc(_three_images(), radius_mm=0.5)}
    out = plot_froc(results, tmp_path / "sub" / "froc.png", title="phantoms", max_fp=5)
    assert out == tmp_path / "sub" / "froc.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5000
    log_out = plot_froc(results, tmp_path / "log.png", log_x=True)
    assert log_out.read_bytes()[:4] == b"\x89PNG"


def test_plot_froc_rejects_empty_results_and_bad_max_fp(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="results"):
        plot_froc({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="max_fp"):
        plot_froc({"A": froc(_three_images())}, tmp_path / "x.png", max_fp=0)
    with pytest.raises(TypeError, match="results"):
        plot_froc({"A": 1.0}, tmp_path / "x.png")  # type: ignore[dict-item]


def test_froc_table_is_shaped_like_the_papers_table() -> None:
    results = {"DoG": froc(_three_images()), "strict": froc(_three_images(), radius_mm=0.15)}
    table = froc_table(results, ks=(0.5, 1, 30))
    # radius 0.15 mm: T1 and T2 are hit only by the 0.5 detections (0.1 mm away), T3 by
    # nothing; FP counts 1, 2, 3, 4, 4, 5 → recall 2/3 first at 4/3 FP/image.
    assert table == (
        "| Method | R@0.5 | R@1 | R@30 |\n"
        "|---|---|---|---|\n"
        "| DoG | 33.33 | 100.00 | 100.00 |\n"
        "| strict | 0.00 | 0.00 | 66.67 |\n"
    )


def test_froc_table_default_columns_are_the_papers() -> None:
    header = froc_table({"x": froc(_three_images())}).splitlines()[0]
    assert header == "| Method | R@1 | R@5 | R@10 | R@15 | R@20 |"


def test_froc_table_rejects_empty_results_and_empty_ks() -> None:
    with pytest.raises(ValueError, match="results"):
        froc_table({})
    with pytest.raises(ValueError, match="ks"):
        froc_table({"x": froc(_three_images())}, ks=())


# --------------------------------------------------------------------------- calcnode evaluate
def test_calcnode_evaluate_reports_clusters_and_recall_per_bin(
    phantoms: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Perfect detections find every truth cluster; a false triplet on a normal image counts."""
    from cascade.data.manifest import read_manifest
    from node.cli import main

    records = read_manifest(phantoms)
    normal = next(r for r in records if not r.calcifications)
    images = []
    for rec in records:
        dets = [{"x": c.x, "y": c.y} for c in rec.calcifications]
        if rec is normal:
            x0, y0 = rec.columns / 2, rec.rows / 2
            dets = [{"x": x0 + 10 * i, "y": y0} for i in range(3)]
        images.append(
            {
                "sop_instance_uid": rec.sop_instance_uid,
                "rows": rec.rows,
                "columns": rec.columns,
                "detections": [
                    {**d, "score": 1.0, "asn_score": 1.0, "fpr_score": 1.0, "radius_px": 3.0}
                    for d in dets
                ],
            }
        )
    det_dir = tmp_path / "det"
    det_dir.mkdir()
    (det_dir / "detections.json").write_text(json.dumps({"images": images}))
    (det_dir / "operating_point.json").write_text(
        json.dumps({"fpr_threshold": 0.5, "min_score": 0.0, "max_detections": 0})
    )
    out = tmp_path / "eval"
    args = [
        "evaluate",
        "--manifest",
        str(phantoms),
        "--detections",
        str(det_dir / "detections.json"),
    ]
    assert main([*args, "--out", str(out)]) == 0
    data = json.loads((out / "froc.json").read_text())
    FrocResult.from_json(data)  # still the FROC document
    point = data["clusters"]["points"]["operating point"]
    n_clusters = sum(len(r.clusters) for r in records)
    assert n_clusters > 0 and point["n_truth_clusters"] == n_clusters
    assert point["sensitivity"] == 1.0
    n_normal = sum(1 for r in records if not r.calcifications)
    assert point["false_marks"] == 1 and point["false_marks_normal"] == 1
    assert point["false_marks_per_normal_image"] == pytest.approx(1 / n_normal)
    sizes = data["recall_by_bin"]["size"]
    assert sizes["bins"] == ["0.1–0.2", "0.2–0.3", "0.3–0.5", "0.5–1"]
    assert all(v in (1.0, None) for v in sizes["recall"]["operating point"])
    assert sum(data["recall_by_bin"]["contrast"]["counts"]) > 0
    text = capsys.readouterr().out
    assert "cluster sensitivity" in text and "µC recall per size bin" in text
