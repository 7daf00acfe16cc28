"""Behaviour of cascade.inference.proposals: tiled residual maps and candidates from them.

Coordinates: points are (x = column, y = row), 0-based, the first pixel's centre at (0, 0),
in the 70-µm working grid (``x_work``, ``y_work``) and in the received grid (``x``, ``y``);
arrays are indexed ``[row, col]``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from cascade.data.preprocess import GridTransform, preprocess
from cascade.inference.proposals import (
    Candidate,
    ProposalConfig,
    candidates_xy,
    propose,
    residual_map,
)
from cascade.models import get_model
from tests.factories import synthetic_breast

# Received-grid shapes (rows, cols) that resample to a 200 × 160 working grid at 70 µm.
SOURCE_SHAPES = {0.05: (280, 224), 0.085: (165, 132), 0.1: (140, 112)}
WORK_SHAPE = (200, 160)


def _transform(spacing_mm: float) -> GridTransform:
    """The transform of a synthetic received image of ``spacing_mm``, via ``preprocess``."""
    rows, cols = SOURCE_SHAPES[spacing_mm]
    pre = preprocess(synthetic_breast(rows, cols, seed=1), (spacing_mm, spacing_mm))
    assert tuple(pre.transform.work_shape) == WORK_SHAPE  # the test's own arithmetic
    return pre.transform


@pytest.fixture(scope="module")
def transform100() -> GridTransform:
    return _transform(0.1)


def _blob(
    shape: tuple[int, int], x: float, y: float, amplitude: float, sigma: float = 2.0
) -> np.ndarray:
    """A Gaussian blob centred at (x = col, y = row)."""
    rr, cc = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    return (amplitude * np.exp(-((cc - x) ** 2 + (rr - y) ** 2) / (2 * sigma**2))).astype(
        np.float32
    )


def _map(*blobs: tuple[float, float, float]) -> np.ndarray:
    out = np.zeros(WORK_SHAPE, np.float32)
    for x, y, a in blobs:
        out = out + _blob(WORK_SHAPE, x, y, a)
    return np.clip(out, 0.0, 1.0)


# ----------------------------------------------------------------------------- ProposalConfig


@pytest.mark.parametrize("threshold", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_proposal_config_rejects_a_threshold_outside_the_open_unit_interval(
    threshold: float,
) -> None:
    with pytest.raises(ValueError, match="threshold"):
        ProposalConfig(threshold=threshold)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"min_area_px": 0}, "min_area_px"),
        ({"split": "blobs"}, "split"),
        ({"min_peak_distance_px": 0}, "min_peak_distance_px"),
        ({"max_candidates": 0}, "max_candidates"),
    ],
)
def test_proposal_config_rejects_invalid_values_naming_them(
    kwargs: dict[str, object], name: str
) -> None:
    with pytest.raises(ValueError, match=name):
        ProposalConfig(**kwargs)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- propose


BLOBS = ((40.3, 50.7, 0.9), (120.0, 150.0, 0.6), (100.5, 30.25, 0.4))


@pytest.mark.parametrize("spacing_mm", [0.05, 0.085, 0.1])
@pytest.mark.parametrize("split", ["component", "maxima"])
def test_propose_finds_each_blob_at_its_centre_in_both_grids(spacing_mm: float, split: str) -> None:
    tr = _transform(spacing_mm)
    rows, cols = SOURCE_SHAPES[spacing_mm]
    s_row, s_col = rows / WORK_SHAPE[0], cols / WORK_SHAPE[1]
    cands = propose(_map(*BLOBS), tr, config=ProposalConfig(split=split))  # type: ignore[arg-type]
    assert len(cands) == 3
    # Highest score first: the blobs are ordered by amplitude.
    for cand, (x, y, _) in zip(cands, BLOBS, strict=True):
        assert cand.x_work == pytest.approx(x, abs=0.15)
        assert cand.y_work == pytest.approx(y, abs=0.15)
        # Received grid: pixel centres, work pixel i ↔ source (i + 0.5) · s − 0.5.
        assert cand.x == pytest.approx((x + 0.5) * s_col - 0.5, abs=0.15 * s_col)
        assert cand.y == pytest.approx((y + 0.5) * s_row - 0.5, abs=0.15 * s_row)
        assert cand.x == pytest.approx((cand.x_work + 0.5) * s_col - 0.5, abs=1e-9)
        assert cand.y == pytest.approx((cand.y_work + 0.5) * s_row - 0.5, abs=1e-9)
        # In millimetres the two grids agree to a fraction of a working pixel.
        x_mm_work = (cand.x_work + 0.5) * tr.work_spacing_mm[1]
        assert (cand.x + 0.5) * spacing_mm == pytest.approx(x_mm_work, abs=1e-6)


def test_propose_scores_a_component_by_its_summed_residual(transform100: GridTransform) -> None:
    rmap = _map(*BLOBS)
    cands = propose(rmap, transform100, config=ProposalConfig(split="component"))
    labels, _ = ndimage.label(rmap > 0.1, structure=np.ones((3, 3)))
    for cand, (x, y, _) in zip(cands, BLOBS, strict=True):
        region = labels == labels[round(y), round(x)]
        assert cand.asn_score == pytest.approx(float(rmap[region].sum()), rel=1e-5)
        assert cand.area_px == int(region.sum())
        assert cand.radius_px == pytest.approx(
            math.sqrt(region.sum() / math.pi) * transform100.scale[1], rel=1e-9
        )


def test_propose_returns_footprints_consistent_with_their_bounding_boxes(
    transform100: GridTransform,
) -> None:
    rmap = _map(*BLOBS)
    for cand in propose(rmap, transform100):
        r0, c0, r1, c1 = cand.bbox
        assert cand.mask.dtype == bool
        assert cand.mask.shape == (r1 - r0, c1 - c0)
        assert int(cand.mask.sum()) == cand.area_px
        # Every footprint pixel is above the threshold; the centre lies inside the bbox.
        assert np.all(rmap[r0:r1, c0:c1][cand.mask] > 0.1)
        assert r0 <= cand.y_work < r1 and c0 <= cand.x_work < c1


def test_touching_blobs_make_one_component_candidate_but_two_maxima_candidates(
    transform100: GridTransform,
) -> None:
    left, right = (60.0, 100.0), (68.0, 100.0)
    rmap = _map((*left, 0.8), (*right, 0.8))
    # They are connected above the threshold: a single component.
    assert ndimage.label(rmap > 0.1)[1] == 1

    (one,) = propose(rmap, transform100, config=ProposalConfig(split="component"))
    assert one.x_work == pytest.approx(64.0, abs=0.1)
    assert one.y_work == pytest.approx(100.0, abs=0.1)

    two = propose(rmap, transform100, config=ProposalConfig(split="maxima"))
    assert len(two) == 2
    xs = sorted(c.x_work for c in two)
    assert xs[0] == pytest.approx(left[0], abs=1.0)
    assert xs[1] == pytest.approx(right[0], abs=1.0)
    assert all(c.y_work == pytest.approx(100.0, abs=0.1) for c in two)
    # Splitting partitions the component: scores and areas add up.
    assert sum(c.asn_score for c in two) == pytest.approx(one.asn_score, rel=1e-5)
    assert sum(c.area_px for c in two) == one.area_px


def test_maxima_rule_keeps_two_touching_blobs_apart_beside_a_fainter_one(
    transform100: GridTransform,
) -> None:
    # Two equal µCs 8 px (0.56 mm) apart with a fainter one 8 px below them: each peak
    # is its own plateau. (The plateau merge once joined every peak reachable above the
    # lowest peak's height, which put one candidate midway between the two.)
    rmap = _map((60.0, 100.0, 0.9), (68.0, 100.0, 0.9), (64.0, 108.0, 0.35))
    cands = propose(rmap, transform100, config=ProposalConfig(split="maxima"))
    assert len(cands) == 3
    upper = sorted(c.x_work for c in cands if c.y_work < 104)
    assert upper == [pytest.approx(60.0, abs=1.0), pytest.approx(68.0, abs=1.0)]
    (lower,) = (c for c in cands if c.y_work >= 104)
    assert (lower.x_work, lower.y_work) == (
        pytest.approx(64.0, abs=1.0),
        pytest.approx(108.0, abs=1.0),
    )


def test_maxima_rule_keeps_one_candidate_per_isolated_blob(transform100: GridTransform) -> None:
    rmap = _map((50.0, 50.0, 0.9), (110.0, 150.0, 0.5))
    cands = propose(rmap, transform100, config=ProposalConfig(split="maxima"))
    assert len(cands) == 2


def test_maxima_rule_keeps_a_flat_plateau_as_one_candidate(transform100: GridTransform) -> None:
    rmap = np.zeros(WORK_SHAPE, np.float32)
    rmap[80:90, 60:75] = 0.5  # 10 × 15 plateau, no strict maximum
    cands = propose(rmap, transform100, config=ProposalConfig(split="maxima"))
    assert len(cands) == 1
    assert cands[0].area_px == 150
    assert cands[0].x_work == pytest.approx(67.0)
    assert cands[0].y_work == pytest.approx(84.5)


def test_propose_drops_components_smaller_than_min_area(transform100: GridTransform) -> None:
    rmap = _map((100.0, 100.0, 0.9))
    rmap[20, 20] = 0.5  # 1 px
    rmap[40:42, 140:142] = 0.5  # 4 px
    assert len(propose(rmap, transform100)) == 1  # default min_area_px = 8
    assert len(propose(rmap, transform100, config=ProposalConfig(min_area_px=4))) == 2
    areas = sorted(
        c.area_px for c in propose(rmap, transform100, config=ProposalConfig(min_area_px=1))
    )
    assert areas[:2] == [1, 4]
    assert len(areas) == 3


def test_propose_orders_by_score_and_keeps_at_most_max_candidates(
    transform100: GridTransform,
) -> None:
    amplitudes = [0.3, 0.9, 0.5, 0.7, 0.4]
    blobs = [(20.0 + 30.0 * i, 30.0 + 35.0 * i, a) for i, a in enumerate(amplitudes)]
    rmap = _map(*blobs)
    cands = propose(rmap, transform100)
    scores = [c.asn_score for c in cands]
    assert scores == sorted(scores, reverse=True)
    assert [round(c.x_work) for c in cands] == [50, 110, 80, 140, 20]

    top2 = propose(rmap, transform100, config=ProposalConfig(max_candidates=2))
    assert [round(c.x_work) for c in top2] == [50, 110]


def test_propose_of_an_empty_map_gives_no_candidates(transform100: GridTransform) -> None:
    assert propose(np.zeros(WORK_SHAPE, np.float32), transform100) == []
    assert propose(np.full(WORK_SHAPE, 0.05, np.float32), transform100) == []


def test_propose_rejects_a_map_of_another_shape(transform100: GridTransform) -> None:
    with pytest.raises(ValueError, match="shape"):
        propose(np.zeros((100, 80), np.float32), transform100)


def test_candidates_xy_returns_work_or_received_centres(transform100: GridTransform) -> None:
    cands = propose(_map(*BLOBS), transform100)
    work = candidates_xy(cands, grid="work")
    src = candidates_xy(cands, grid="source")
    assert work.shape == src.shape == (3, 2)
    np.testing.assert_allclose(work, [[c.x_work, c.y_work] for c in cands])
    np.testing.assert_allclose(src, transform100.to_source(work), atol=1e-9)
    assert candidates_xy([], grid="work").shape == (0, 2)


def test_candidate_radius_is_at_least_half_a_received_pixel() -> None:
    # At 50 µm a 1-px working footprint is 1.4 received px wide: radius ≥ 0.5 anyway.
    tr = _transform(0.05)
    rmap = np.zeros(WORK_SHAPE, np.float32)
    rmap[10, 10] = 0.5
    (cand,) = propose(rmap, tr, config=ProposalConfig(min_area_px=1))
    assert isinstance(cand, Candidate)
    assert cand.radius_px == pytest.approx(max(math.sqrt(1 / math.pi) * 1.4, 0.5))


# ----------------------------------------------------------------------------- residual_map


class _ConstantModel(torch.nn.Module):
    """Reconstructs every pixel as 0.5: the residual is |0.5 − I|."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, 0.5)


class _SegmentationModel(torch.nn.Module):
    """Two logits (0, 4·I): the µC probability is sigmoid(4·I)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), 4.0 * x], dim=1)


def _image(h: int = 150, w: int = 130, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w), dtype=np.float32)


@pytest.mark.parametrize(
    ("residual", "expected"),
    [
        ("l1", lambda d: np.abs(d)),
        ("l2", lambda d: d**2),
        ("smooth_l1", lambda d: 0.5 * d**2),  # |d| ≤ 0.5 < 1
    ],
)
def test_residual_map_computes_the_configured_residual(residual: str, expected) -> None:  # type: ignore[no-untyped-def]
    img = _image()
    out = residual_map(_ConstantModel(), img, residual=residual, tile=64, overlap=16)
    assert out.shape == img.shape
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected(0.5 - img), atol=1e-6)


def test_residual_map_of_a_segmentation_model_is_the_class_one_probability() -> None:
    img = _image()
    out = residual_map(_SegmentationModel(), img, kind="segmentation", tile=64, overlap=8)
    np.testing.assert_allclose(out, 1.0 / (1.0 + np.exp(-4.0 * img)), atol=1e-6)


def test_residual_map_is_zero_outside_the_mask() -> None:
    img = _image()
    mask = np.zeros(img.shape, bool)
    rr, cc = np.mgrid[0 : img.shape[0], 0 : img.shape[1]]
    mask[(rr - 70) ** 2 + (cc - 60) ** 2 < 45**2] = True
    out = residual_map(_ConstantModel(), img, mask=mask, tile=64, overlap=16)
    assert not out[~mask].any()
    np.testing.assert_allclose(out[mask], np.abs(0.5 - img[mask]), atol=1e-6)


def test_residual_map_of_an_empty_mask_is_all_zero() -> None:
    img = _image()
    out = residual_map(_ConstantModel(), img, mask=np.zeros(img.shape, bool))
    assert out.shape == img.shape
    assert not out.any()


def test_residual_map_restores_the_model_training_mode() -> None:
    model = get_model("asn_unet", width=2)
    model.train()
    residual_map(model, _image(64, 64), tile=64, overlap=8)
    assert model.training


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"tile": 60}, "tile"),
        ({"tile": 64, "overlap": 32}, "tile"),
        ({"tile": 64, "overlap": 40}, "tile"),
    ],
)
def test_residual_map_rejects_bad_tiling(kwargs: dict[str, int], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        residual_map(_ConstantModel(), _image(), **kwargs)


def test_residual_map_rejects_a_non_2d_image_and_a_mask_of_another_shape() -> None:
    with pytest.raises(ValueError, match="image"):
        residual_map(_ConstantModel(), np.zeros((1, 32, 32), np.float32))
    with pytest.raises(ValueError, match="mask"):
        residual_map(_ConstantModel(), _image(), mask=np.ones((10, 10), bool))


def _asn(convs_per_stage: int) -> torch.nn.Module:
    """A real ASN U-Net (width 2) with non-trivial batch-norm statistics, in eval mode."""
    torch.manual_seed(0)
    model = get_model("asn_unet", width=2, convs_per_stage=convs_per_stage)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(4, 1, 64, 64))
    return model.eval()


def _whole_image_residual(model: torch.nn.Module, img: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(img)[None, None]
    with torch.no_grad():
        return (model(x) - x).abs()[0, 0].numpy()


# Away from the image border by more than the network's receptive field.
INTERIOR = (slice(100, -100), slice(100, -100))


@pytest.fixture(scope="module")
def asn1() -> torch.nn.Module:
    return _asn(convs_per_stage=1)


@pytest.fixture(scope="module")
def asn3() -> torch.nn.Module:
    return _asn(convs_per_stage=3)


@pytest.fixture(scope="module")
def noise_image() -> np.ndarray:
    return _image(320, 304, seed=0)


def test_residual_map_tiles_equal_a_whole_image_pass_away_from_the_border(
    asn1: torch.nn.Module, noise_image: np.ndarray
) -> None:
    whole = _whole_image_residual(asn1, noise_image)
    for tile, overlap in [(128, 32), (192, 64), (1024, 0)]:
        tiled = residual_map(asn1, noise_image, tile=tile, overlap=overlap)
        diff = np.abs(tiled - whole)[INTERIOR].max()
        assert diff < 1e-5, f"tile {tile}, overlap {overlap}: max |Δ| = {diff:.3g}"


def test_residual_map_tiles_of_the_paper_network_match_a_whole_image_pass_closely(
    asn3: torch.nn.Module, noise_image: np.ndarray
) -> None:
    whole = _whole_image_residual(asn3, noise_image)
    tiled = residual_map(asn3, noise_image, tile=192, overlap=64)
    diff = np.abs(tiled - whole)[INTERIOR]
    assert diff.max() < 1e-3, f"max |Δ| = {diff.max():.3g}"


@pytest.mark.parametrize("top_left", [(8, 16), (5, 3), (8, 12), (1, 0)])
def test_residual_map_does_not_depend_on_where_the_mask_bounding_box_starts(
    asn1: torch.nn.Module, noise_image: np.ndarray, top_left: tuple[int, int]
) -> None:
    # The breast mask's bounding box can start at any row/column; the map inside it must
    # not change with that offset (the U-Net's 2×2 poolings must stay on the same grid).
    whole = _whole_image_residual(asn1, noise_image)
    mask = np.zeros(noise_image.shape, bool)
    mask[top_left[0] :, top_left[1] :] = True
    for tile, overlap in [(1024, 0), (128, 32)]:
        out = residual_map(asn1, noise_image, mask=mask, tile=tile, overlap=overlap)
        diff = np.abs(out - whole)[INTERIOR].max()
        assert diff < 1e-5, (
            f"mask bbox at (row, col) = {top_left}, tile {tile}, overlap {overlap}: "
            f"max |Δ| = {diff:.3g} against a whole-image pass"
        )


def test_residual_map_never_silently_misaligns_tiles_for_an_overlap_not_a_multiple_of_8(
    asn1: torch.nn.Module, noise_image: np.ndarray
) -> None:
    # More context than (128, 32) must not make the result worse: either the overlap is
    # rejected, or the tiles stay on the network's pooling grid.
    whole = _whole_image_residual(asn1, noise_image)
    try:
        out = residual_map(asn1, noise_image, tile=256, overlap=36)
    except ValueError as exc:
        assert "overlap" in str(exc)
        return
    diff = np.abs(out - whole)[INTERIOR].max()
    assert diff < 1e-5, f"tile 256, overlap 36: max |Δ| = {diff:.3g}"


def test_a_degenerate_map_with_flat_maxima_everywhere_gives_one_peak_per_patch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # An untrained network: most of the image above threshold, flat. Two flat plateaus
    # joined into one component, 300 × 300 px of maxima: far beyond MAX_RAW_PEAKS.
    tr = GridTransform((400, 320), (0.07, 0.07), (400, 320), (0.07, 0.07))
    rmap = np.zeros((400, 320), np.float32)
    rmap[10:160, 10:310] = 0.5
    rmap[160:310, 10:310] = 0.7
    cfg = ProposalConfig(split="maxima", min_area_px=1)
    with caplog.at_level("WARNING", logger="cascade.inference.proposals"):
        cands = propose(rmap, tr, config=cfg)
    assert "local maxima above threshold" in caplog.text
    assert 1 <= len(cands) <= 2
    assert sum(c.area_px for c in cands) == 300 * 300
