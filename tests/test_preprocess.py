"""Pre-processing: intensity map, 70-µm resampling, breast mask, and the grid transform.

Points are (x = column, y = row), 0-based, first pixel's centre at (0, 0), in both grids.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

from cascade.data.io import read_mammogram
from cascade.data.preprocess import (
    GridTransform,
    PreprocessedImage,
    breast_mask,
    preprocess,
    preprocess_mammogram,
)
from cascade.errors import InvalidImageError
from tests.factories import make_mg_dataset, synthetic_breast

SPACINGS = [(0.05, 0.05), (0.07, 0.07), (0.085, 0.085), (0.1, 0.1), (0.05, 0.1), (0.1, 0.065)]
SPACING_IDS = ["50um", "70um", "85um", "100um", "aniso-50x100", "aniso-100x65"]


def _dense_breast(
    rows: int = 400, columns: int = 300, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A dense breast: bright core (0.85) inside a fatty periphery (0.35), dark background.

    Returns the image and the true breast region (core + periphery).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:columns].astype(float)
    r2 = ((yy - rows / 2) / (0.47 * rows)) ** 2 + (xx / (0.9 * columns)) ** 2
    breast = r2 <= 1.0
    img = np.full((rows, columns), 0.03)
    img[breast] = 0.35
    img[r2 <= 0.75**2] = 0.85
    img += rng.normal(0.0, 0.02, img.shape)
    return np.clip(img, 0.0, 1.0), breast


def _disk(shape: tuple[int, int], cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def _centroid(image: np.ndarray) -> tuple[float, float]:
    """Intensity centroid (x, y) of a non-negative image."""
    yy, xx = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
    return float((image * xx).sum() / image.sum()), float((image * yy).sum() / image.sum())


# ---------------------------------------------------------------- preprocess


def test_preprocess_returns_unit_range_float32_with_zero_background() -> None:
    m = read_mammogram(make_mg_dataset(rows=256, columns=192, pixel_spacing=(0.1, 0.1)))
    p = preprocess_mammogram(m)
    assert isinstance(p, PreprocessedImage)
    assert p.image.dtype == np.float32 and p.breast_mask.dtype == bool
    assert p.image.shape == p.breast_mask.shape == (366, 274)  # round(256·0.1/0.07), …
    assert float(p.image.min()) == 0.0
    assert float(p.image.max()) == pytest.approx(1.0, abs=1e-6)
    assert np.all(p.image[~p.breast_mask] == 0.0)
    # Breast (a half-ellipse 0.45·rows × 0.75·cols) ≈ 0.53 of the image.
    assert 0.48 < float(p.breast_mask.mean()) < 0.58
    # Tissue stays bright; only the interpolated skin-line pixels are darker.
    assert float(np.percentile(p.image[p.breast_mask], 2)) > 0.3


def test_preprocess_work_shape_rounds_shape_times_spacing_over_70um() -> None:
    p = preprocess(synthetic_breast(300, 200), (0.085, 0.05))
    assert p.image.shape == (round(300 * 0.085 / 0.07), round(200 * 0.05 / 0.07))
    t = p.transform
    assert t.work_spacing_mm == pytest.approx((0.085 * 300 / 364, 0.05 * 200 / 143))
    assert t.work_spacing_mm == pytest.approx((0.07, 0.07), rel=0.005)


def test_quantize_8bit_puts_values_on_256_levels_at_native_spacing() -> None:
    pixels = synthetic_breast(128, 96, seed=2)
    q = preprocess(pixels, (0.07, 0.07), quantize_8bit=True).image
    levels = q * 255.0
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
    f = preprocess(pixels, (0.07, 0.07), quantize_8bit=False).image
    assert np.abs(f * 255 - np.round(f * 255)).max() > 0.1
    # Linear min–max map: the minimum goes to 0, the maximum to 1.
    expected = (pixels - pixels.min()) / (pixels.max() - pixels.min())
    mask = preprocess(pixels, (0.07, 0.07)).breast_mask
    np.testing.assert_allclose(f[mask], expected[mask], atol=1e-6)


def test_preprocess_mammogram_uses_the_metadata_spacing() -> None:
    m = read_mammogram(
        make_mg_dataset(pixel_spacing=None, imager_pixel_spacing=(0.1, 0.1), magnification=1.25)
    )
    p = preprocess_mammogram(m, quantize_8bit=False)
    assert p.transform.source_spacing_mm == pytest.approx((0.08, 0.08))
    assert p.image.shape == (round(256 * 0.08 / 0.07), round(192 * 0.08 / 0.07))


def test_constant_image_is_an_invalid_image() -> None:
    with pytest.raises(InvalidImageError, match="constant"):
        preprocess(np.full((64, 64), 0.4), (0.07, 0.07))


@pytest.mark.parametrize(
    ("pixels", "spacing", "kw", "error", "pattern"),
    [
        (np.zeros((4, 4, 3)), (0.07, 0.07), {}, ValueError, "pixels must be 2-D"),
        (np.full((8, 8), np.nan), (0.07, 0.07), {}, ValueError, "pixels must be finite"),
        (np.zeros((8, 8), bool), (0.07, 0.07), {}, TypeError, "real numeric"),
        (np.eye(8), (0.0, 0.07), {}, ValueError, "source_spacing_mm must be positive"),
        (np.eye(8), (0.07,), {}, TypeError, "source_spacing_mm must be a pair"),
        (np.eye(8), (0.07, 0.07), {"target_spacing_mm": -1.0}, ValueError, "target_spacing_mm"),
    ],
)
def test_preprocess_rejects_invalid_arguments(pixels, spacing, kw, error, pattern) -> None:
    with pytest.raises(error, match=pattern):
        preprocess(pixels, spacing, **kw)


def test_preprocess_mammogram_rejects_a_plain_array() -> None:
    with pytest.raises(TypeError, match="m must be a Mammogram"):
        preprocess_mammogram(np.zeros((8, 8)))  # type: ignore[arg-type]


# ---------------------------------------------------------------- breast mask


def test_breast_mask_keeps_the_fatty_periphery_of_a_dense_breast() -> None:
    img, truth = _dense_breast()
    # Plain Otsu splits dense vs (fat + background): it would lose the periphery.
    plain = ndi.binary_fill_holes(img > threshold_otsu(img))
    assert float(plain[truth].mean()) < 0.8
    mask = breast_mask(img)
    assert float(mask[truth].mean()) > 0.995
    assert float(mask[~truth].mean()) < 0.005


def test_dense_breast_survives_full_preprocessing() -> None:
    img, truth = _dense_breast(seed=1)
    p = preprocess(img, (0.07, 0.07))
    assert float(p.breast_mask[truth].mean()) > 0.995
    assert float((p.image[truth] > 0).mean()) > 0.995


def test_breast_mask_on_a_fatty_breast_does_not_leak_into_noisy_background() -> None:
    img = synthetic_breast(300, 220, seed=3)
    truth = synthetic_breast(300, 220, seed=3, dots=False) > 0.3
    mask = breast_mask(img)
    assert float(mask[truth].mean()) > 0.995
    assert float(mask[~truth].mean()) < 0.005


def test_breast_mask_keeps_only_the_largest_component_and_fills_holes() -> None:
    img, _ = _dense_breast(seed=2)
    img[10:30, 250:290] = 0.95  # a burned-in marker in the background
    img[190:210, 60:80] = 0.03  # a dark hole inside the breast
    mask = breast_mask(img)
    assert not mask[10:30, 250:290].any()
    assert mask[190:210, 60:80].all()
    assert ndi.label(mask)[1] == 1


def test_breast_mask_of_a_constant_image_is_empty_and_input_is_validated() -> None:
    assert not breast_mask(np.full((16, 16), 0.5)).any()
    with pytest.raises(ValueError, match="image must be 2-D"):
        breast_mask(np.zeros(16))
    with pytest.raises(ValueError, match="finite"):
        breast_mask(np.full((4, 4), np.inf))


# ---------------------------------------------------------------- grid transform


@pytest.mark.parametrize("spacing", SPACINGS, ids=SPACING_IDS)
def test_points_round_trip_and_image_edges_coincide(spacing: tuple[float, float]) -> None:
    t = GridTransform.for_spacing((517, 389), spacing)
    rng = np.random.default_rng(0)
    pts = rng.uniform([-0.5, -0.5], [388.5, 516.5], size=(200, 2))
    np.testing.assert_allclose(t.to_source(t.to_work(pts)), pts, atol=1e-9)
    h, w = t.work_shape
    corners = np.array([[-0.5, -0.5], [388.5, 516.5]])
    np.testing.assert_allclose(t.to_work(corners), [[-0.5, -0.5], [w - 0.5, h - 0.5]], atol=1e-9)
    # A single point of shape (2,) works too.
    assert t.to_work(np.array([10.0, 20.0])).shape == (2,)


@pytest.mark.parametrize("spacing", SPACINGS, ids=SPACING_IDS)
def test_bright_dot_peaks_where_the_transform_says(spacing: tuple[float, float]) -> None:
    rows, columns = 300, 240
    base = synthetic_breast(rows, columns, seed=5, dots=False)
    base[0, 0] = 1.0  # fixes the min–max map, so the dot alone changes the image
    plain = preprocess(base, spacing, quantize_8bit=False)
    for x, y in [(60, 140), (97, 151), (33, 170), (121, 88)]:
        pixels = base.copy()
        pixels[y, x] = 1.0
        p = preprocess(pixels, spacing, quantize_8bit=False)
        # (The Otsu threshold may move a skin-line pixel; compare inside both masks.)
        both = p.breast_mask & plain.breast_mask
        assert (p.breast_mask ^ plain.breast_mask).sum() <= 5
        response = np.clip(np.where(both, p.image - plain.image, 0.0), 0.0, None)
        wx, wy = p.transform.to_work(np.array([x, y], dtype=float))
        peak_y, peak_x = np.unravel_index(np.argmax(response), response.shape)
        assert abs(peak_x - wx) <= 1.0 and abs(peak_y - wy) <= 1.0
        cx, cy = _centroid(response)
        assert abs(cx - wx) < 0.5 and abs(cy - wy) < 0.5, (spacing, (x, y), (cx, cy), (wx, wy))


@pytest.mark.parametrize("spacing", SPACINGS, ids=SPACING_IDS)
def test_work_grid_disk_maps_back_to_a_source_ellipse_of_the_right_place_and_size(
    spacing: tuple[float, float],
) -> None:
    t = GridTransform.for_spacing((400, 300), spacing)
    cx, cy, r = 101.3, 147.8, 18.0
    disk = _disk(t.work_shape, cx, cy, r)
    src = t.mask_to_source(disk)
    assert src.dtype == bool and src.shape == (400, 300)
    ys, xs = np.nonzero(src)
    ex, ey = t.to_source(np.array([cx, cy]))
    assert abs(xs.mean() - ex) < 0.2 and abs(ys.mean() - ey) < 0.2
    # A filled ellipse with semi-axes a, b has area π·a·b and std a/2 along its axis.
    s_row, s_col = t.scale
    assert 2 * xs.std() == pytest.approx(r * s_col, abs=0.35)
    assert 2 * ys.std() == pytest.approx(r * s_row, abs=0.35)
    assert float(src.sum()) == pytest.approx(np.pi * r * r * s_row * s_col, rel=0.03)
    # Source → work → the same disk again (IoU).
    back = t.mask_to_work(src)
    iou = (back & disk).sum() / (back | disk).sum()
    assert iou > 0.95


@pytest.mark.parametrize("spacing", SPACINGS, ids=SPACING_IDS)
def test_source_disk_maps_to_the_work_grid_at_the_transformed_centre(
    spacing: tuple[float, float],
) -> None:
    t = GridTransform.for_spacing((400, 300), spacing)
    cx, cy, r = 120.6, 210.2, 15.0
    work = t.mask_to_work(_disk((400, 300), cx, cy, r))
    ys, xs = np.nonzero(work)
    ex, ey = t.to_work(np.array([cx, cy]))
    assert abs(xs.mean() - ex) < 0.2 and abs(ys.mean() - ey) < 0.2
    s_row, s_col = t.scale
    assert 2 * xs.std() == pytest.approx(r / s_col, abs=0.35)
    assert 2 * ys.std() == pytest.approx(r / s_row, abs=0.35)


def test_lengths_scale_by_the_exact_column_ratio() -> None:
    t = GridTransform.for_spacing((1000, 801), (0.1, 0.1))
    assert t.work_shape == (1429, 1144)
    np.testing.assert_allclose(t.lengths_to_source([7.0, 14.0]), np.array([7, 14]) * 801 / 1144)
    assert float(t.lengths_to_work(t.lengths_to_source(7.0))) == pytest.approx(7.0)


def test_preprocess_transform_matches_the_resampled_image() -> None:
    pixels = synthetic_breast(200, 150, seed=8)
    p = preprocess(pixels, (0.05, 0.1))
    t = p.transform
    assert t.source_shape == (200, 150)
    assert t.source_spacing_mm == (0.05, 0.1)
    assert t.work_shape == p.image.shape == (143, 214)


@pytest.mark.parametrize(
    ("call", "error", "pattern"),
    [
        (lambda t: t.to_work(np.zeros((3, 3))), ValueError, r"xy must have shape \(N, 2\)"),
        (lambda t: t.to_source(np.zeros(3)), ValueError, r"xy must have shape"),
        (lambda t: t.mask_to_source(np.zeros((5, 5), bool)), ValueError, "mask must have shape"),
        (lambda t: t.mask_to_work(np.zeros((40, 30))), TypeError, "mask must be a boolean"),
        (lambda t: t.image_to_work(np.zeros((3, 3))), ValueError, "image must have shape"),
    ],
)
def test_transform_methods_reject_wrong_shapes(call, error, pattern) -> None:
    t = GridTransform.for_spacing((40, 30), (0.1, 0.1))
    with pytest.raises(error, match=pattern):
        call(t)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"source_shape": (0, 10)}, ValueError, "source_shape must be positive"),
        ({"work_shape": "ab"}, TypeError, "work_shape must be a pair of integers"),
        ({"source_spacing_mm": (0.1, -0.1)}, ValueError, "source_spacing_mm must be positive"),
        ({"work_spacing_mm": (np.inf, 0.07)}, ValueError, "work_spacing_mm must be positive"),
    ],
)
def test_grid_transform_constructor_validates(kwargs, error, pattern) -> None:
    args = {
        "source_shape": (10, 10),
        "source_spacing_mm": (0.1, 0.1),
        "work_shape": (14, 14),
        "work_spacing_mm": (0.07, 0.07),
    }
    args.update(kwargs)
    with pytest.raises(error, match=pattern):
        GridTransform(**args)


def test_preprocessed_image_rejects_inconsistent_parts() -> None:
    t = GridTransform.for_spacing((10, 10), (0.07, 0.07))
    img = np.zeros((10, 10), np.float32)
    with pytest.raises(ValueError, match="breast_mask must be bool"):
        PreprocessedImage(image=img, breast_mask=np.zeros((10, 10)), transform=t)
    with pytest.raises(ValueError, match=r"differs from transform\.work_shape"):
        PreprocessedImage(
            image=np.zeros((9, 10), np.float32), breast_mask=np.zeros((9, 10), bool), transform=t
        )
    with pytest.raises(TypeError, match="float32"):
        PreprocessedImage(image=img.astype(float), breast_mask=img > 0, transform=t)
