"""Behaviour of cascade.inference.detector's result types and of the work → received mask mapping.

Coordinates: points are (x = column, y = row), 0-based, the first pixel's centre at
(0, 0), in the received image's grid unless a name says ``work`` (the 70-µm grid);
arrays are indexed ``[row, col]``; ``mask_origin`` is ``(row, col)``.
(The trained Detector end to end is exercised in test_train.py.)
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cascade.data.preprocess import GridTransform, preprocess
from cascade.inference.detector import Detection, ImageDetections, _mask_to_source
from cascade.inference.proposals import Candidate
from tests.factories import synthetic_breast


def _det(**kw: object) -> Detection:
    base: dict[str, object] = dict(
        x=10.0, y=20.0, score=0.5, asn_score=2.0, fpr_score=0.25, radius_px=3.0
    )
    base.update(kw)
    return Detection(**base)  # type: ignore[arg-type]


def _image(dets: tuple[Detection, ...], rows: int = 40, columns: int = 50) -> ImageDetections:
    return ImageDetections(
        sop_instance_uid="1.2.826.0.1.3680043.8.498.1",
        path="in/a.dcm",
        rows=rows,
        columns=columns,
        pixel_spacing_mm=(0.1, 0.1),
        detections=dets,
    )


# ----------------------------------------------------------------------------- Detection


@pytest.mark.parametrize("name", ["x", "y", "score", "asn_score", "fpr_score", "radius_px"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), "1.0", None])
def test_detection_rejects_non_finite_or_non_numeric_fields(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"Detection.{name}"):
        _det(**{name: value})


@pytest.mark.parametrize("fpr_score", [-0.01, 1.01])
def test_detection_rejects_an_fpr_score_outside_0_1(fpr_score: float) -> None:
    with pytest.raises(ValueError, match="fpr_score"):
        _det(fpr_score=fpr_score)


@pytest.mark.parametrize("radius", [0.0, -1.0])
def test_detection_rejects_a_non_positive_radius(radius: float) -> None:
    with pytest.raises(ValueError, match="radius_px"):
        _det(radius_px=radius)


def test_detection_rejects_a_negative_asn_score() -> None:
    # The ASN score is a summed residual: documented ≥ 0.
    with pytest.raises(ValueError, match="asn_score"):
        _det(asn_score=-0.5)


@pytest.mark.parametrize(
    "mask", [np.ones((3, 3), np.uint8), np.ones((2, 3, 3), bool), np.ones(4, bool)]
)
def test_detection_rejects_a_mask_that_is_not_2d_boolean(mask: np.ndarray) -> None:
    with pytest.raises(ValueError, match="mask"):
        _det(mask=mask)


def test_detection_accepts_boundary_values() -> None:
    d = _det(fpr_score=0.0, asn_score=0.0, score=0.0, radius_px=1e-3, x=-0.5, y=0)
    assert d.fpr_score == 0.0
    assert _det(fpr_score=1.0).fpr_score == 1.0


def test_detection_to_json_has_the_schema_keys_and_plain_floats() -> None:
    d = _det(mask=np.ones((2, 2), bool), mask_origin=(3, 4))
    out = d.to_json()
    assert set(out) == {"x", "y", "score", "asn_score", "fpr_score", "radius_px"}
    assert out == {
        "x": 10.0,
        "y": 20.0,
        "score": 0.5,
        "asn_score": 2.0,
        "fpr_score": 0.25,
        "radius_px": 3.0,
    }
    assert all(type(v) is float for v in out.values())


# ----------------------------------------------------------------------------- ImageDetections


def test_image_detections_to_json_has_exactly_the_detections_json_keys() -> None:
    img = _image((_det(), _det(x=30.0, y=5.0, score=0.1)))
    out = img.to_json()
    assert set(out) == {
        "sop_instance_uid",
        "path",
        "rows",
        "columns",
        "pixel_spacing_mm",
        "detections",
    }
    assert out["sop_instance_uid"] == "1.2.826.0.1.3680043.8.498.1"
    assert out["path"] == "in/a.dcm"
    assert (out["rows"], out["columns"]) == (40, 50)
    assert out["pixel_spacing_mm"] == [0.1, 0.1]
    dets = out["detections"]
    assert isinstance(dets, list) and len(dets) == 2
    for d in dets:
        assert set(d) == {"x", "y", "score", "asn_score", "fpr_score", "radius_px"}
    assert dets[1]["x"] == 30.0
    # Round-trips through JSON unchanged (no numpy scalars, no tuples).
    assert json.loads(json.dumps(out)) == out


def test_image_detections_to_json_of_no_detections_is_an_empty_list() -> None:
    assert _image(()).to_json()["detections"] == []


def test_full_mask_places_detection_masks_at_their_origin() -> None:
    m = np.array([[True, False, True], [False, True, False]])
    img = _image((_det(mask=m, mask_origin=(5, 7)),))
    full = img.full_mask()
    assert full.shape == (40, 50)
    assert full.dtype == bool
    assert sorted(map(tuple, np.argwhere(full))) == [(5, 7), (5, 9), (6, 8)]


def test_full_mask_clips_masks_that_cross_the_image_edges() -> None:
    m = np.ones((4, 4), bool)
    m[0, 0] = False
    img = _image(
        (
            _det(mask=m, mask_origin=(-2, -1)),  # top-left: rows 0..1, cols 0..2
            _det(mask=np.ones((5, 5), bool), mask_origin=(38, 48)),  # bottom-right 2 × 2
            _det(mask=np.ones((3, 3), bool), mask_origin=(100, 100)),  # entirely outside
            _det(mask=np.ones((3, 3), bool), mask_origin=(-10, 20)),  # entirely above
        )
    )
    full = img.full_mask()
    expected = np.zeros((40, 50), bool)
    expected[0:2, 0:3] = m[2:4, 1:4]
    expected[38:40, 48:50] = True
    np.testing.assert_array_equal(full, expected)


def test_full_mask_draws_disks_for_detections_without_a_mask() -> None:
    img = _image((_det(x=20.0, y=10.0, radius_px=2.0),))
    full = img.full_mask()
    yy, xx = np.mgrid[0:40, 0:50]
    np.testing.assert_array_equal(full, (xx - 20) ** 2 + (yy - 10) ** 2 <= 4)
    assert full.sum() == 13


def test_full_mask_clips_disks_at_the_image_corners() -> None:
    img = _image((_det(x=0.0, y=0.0, radius_px=2.0), _det(x=49.0, y=39.0, radius_px=2.0)))
    full = img.full_mask()
    assert full.sum() == 12  # two quarter disks of 6 pixels
    assert full[0, 0] and full[0, 2] and full[2, 0] and not full[2, 2]
    assert full[39, 49] and full[39, 47] and not full[37, 47]


def test_full_mask_draws_at_least_a_one_pixel_radius_disk() -> None:
    img = _image((_det(x=20.0, y=10.0, radius_px=0.2),))
    assert sorted(map(tuple, np.argwhere(img.full_mask()))) == [
        (9, 20),
        (10, 19),
        (10, 20),
        (10, 21),
        (11, 20),
    ]


def test_full_mask_unions_masks_and_disks() -> None:
    img = _image(
        (
            _det(x=20.0, y=10.0, radius_px=1.0),
            _det(mask=np.ones((2, 2), bool), mask_origin=(10, 20)),
        )
    )
    # Disk: 5 px around (row 10, col 20); mask adds (10, 21) [shared], (11, 20) [shared],
    # (11, 21).
    assert img.full_mask().sum() == 6


# ----------------------------------------------------------------------------- _mask_to_source


def _transform(spacing_mm: float, shape: tuple[int, int]) -> GridTransform:
    pre = preprocess(synthetic_breast(*shape, seed=2), (spacing_mm, spacing_mm))
    return pre.transform


def _candidate(tr: GridTransform, footprint: np.ndarray, top_left: tuple[int, int]) -> Candidate:
    """A candidate with ``footprint`` (bool) whose [0, 0] is work pixel (row, col) top_left."""
    r0, c0 = top_left
    rr, cc = np.nonzero(footprint)
    xw, yw = float(cc.mean() + c0), float(rr.mean() + r0)
    ((x, y),) = tr.to_source(np.array([[xw, yw]]))
    return Candidate(
        x_work=xw,
        y_work=yw,
        x=float(x),
        y=float(y),
        asn_score=1.0,
        area_px=int(footprint.sum()),
        bbox=(r0, c0, r0 + footprint.shape[0], c0 + footprint.shape[1]),
        radius_px=1.0,
        mask=footprint,
    )


def _expected_source_mask(tr: GridTransform, cand: Candidate) -> np.ndarray:
    """Brute force: a received pixel is set when its centre falls in a footprint pixel."""
    rows, cols = tr.source_shape
    yy, xx = np.mgrid[0:rows, 0:cols]
    work = tr.to_work(np.stack([xx.ravel(), yy.ravel()], axis=1).astype(float))
    ix = np.rint(work[:, 0]).astype(int).reshape(rows, cols)
    iy = np.rint(work[:, 1]).astype(int).reshape(rows, cols)
    r0, c0, r1, c1 = cand.bbox
    inside = (iy >= r0) & (iy < r1) & (ix >= c0) & (ix < c1)
    out = np.zeros((rows, cols), bool)
    out[inside] = cand.mask[iy[inside] - r0, ix[inside] - c0]
    return out


def _place(mask: np.ndarray, origin: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    out = np.zeros(shape, bool)
    r0, c0 = origin
    assert r0 >= 0 and c0 >= 0
    assert r0 + mask.shape[0] <= shape[0] and c0 + mask.shape[1] <= shape[1]
    out[r0 : r0 + mask.shape[0], c0 : c0 + mask.shape[1]] = mask
    return out


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return xx**2 + yy**2 <= radius**2


@pytest.mark.parametrize(
    ("spacing_mm", "shape"), [(0.1, (140, 112)), (0.05, (280, 224)), (0.085, (165, 132))]
)
@pytest.mark.parametrize("top_left", [(50, 40), (0, 0), (187, 147)])
def test_mask_to_source_maps_the_footprint_to_the_received_pixels_it_covers(
    spacing_mm: float, shape: tuple[int, int], top_left: tuple[int, int]
) -> None:
    tr = _transform(spacing_mm, shape)
    assert tr.work_shape == (200, 160)
    footprint = _disk(6)
    footprint[0:4, :] = False  # not symmetric, so flips would show
    cand = _candidate(tr, footprint, top_left)
    mask, origin = _mask_to_source(cand, tr)
    assert mask.dtype == bool
    placed = _place(mask, origin, tr.source_shape)
    np.testing.assert_array_equal(placed, _expected_source_mask(tr, cand))
    # Area scales with the squared spacing ratio (70 µm work pixels vs the received ones).
    ratio = (tr.work_spacing_mm[0] / spacing_mm) ** 2
    assert placed.sum() == pytest.approx(footprint.sum() * ratio, rel=0.2)


def test_mask_to_source_centre_of_mass_matches_the_candidate_centre() -> None:
    tr = _transform(0.05, (280, 224))
    cand = _candidate(tr, _disk(5), (100, 60))
    mask, (r0, c0) = _mask_to_source(cand, tr)
    rr, cc = np.nonzero(mask)
    assert cc.mean() + c0 == pytest.approx(cand.x, abs=0.3)
    assert rr.mean() + r0 == pytest.approx(cand.y, abs=0.3)


def test_mask_to_source_marks_the_centre_pixel_of_a_footprint_no_received_centre_falls_in() -> None:
    tr = _transform(0.1, (140, 112))
    # Work columns that no received pixel centre rounds to (200 → 140 rows, 160 → 112 cols).
    hit_cols = set(np.rint(tr.to_work(np.stack([np.arange(112.0), np.zeros(112)], 1))[:, 0]))
    hit_rows = set(np.rint(tr.to_work(np.stack([np.zeros(140), np.arange(140.0)], 1))[:, 1]))
    col = next(c for c in range(10, 160) if c not in hit_cols)
    row = next(r for r in range(10, 200) if r not in hit_rows)
    cand = _candidate(tr, np.ones((1, 1), bool), (row, col))
    mask, origin = _mask_to_source(cand, tr)
    assert mask.shape == (1, 1) and mask[0, 0]
    assert origin == (round(cand.y), round(cand.x))


def test_mask_to_source_stays_inside_the_received_image_at_the_far_corner() -> None:
    tr = _transform(0.05, (280, 224))
    cand = _candidate(tr, np.ones((6, 6), bool), (194, 154))  # touches the last row/col
    mask, (r0, c0) = _mask_to_source(cand, tr)
    assert r0 + mask.shape[0] <= 280 and c0 + mask.shape[1] <= 224
    assert mask[-1, -1]  # reaches the image corner
    assert math.isclose(mask.sum(), 36 * (0.07 / 0.05) ** 2, rel_tol=0.25)
