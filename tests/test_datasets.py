"""Behaviour of cascade.data.datasets: 70-µm training images, masks, patches, augmentation.

Coordinates: points are (x = column, y = row), 0-based, the first pixel's centre at (0, 0);
manifest points are in the stored (received) grid, ``TrainingImage.centres`` in the working
grid; arrays are indexed ``[row, col]``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from skimage.draw import disk

from cascade.data.datasets import (
    Augmentation,
    PatchSampler,
    TrainingImage,
    load_training_image,
    load_training_images,
)
from cascade.data.manifest import Calcification, ImageRecord, OtherFinding
from cascade.data.preprocess import GridTransform
from cascade.errors import DatasetError
from tests.factories import make_mg_dataset

# Received shapes (rows, cols) that resample to a 200 × 160 working grid at 70 µm.
SOURCE_SHAPES = {0.05: (280, 224), 0.1: (140, 112)}
WORK_SHAPE = (200, 160)


def _write_mg(tmp_path: Path, spacing_mm: float) -> tuple[Path, pydicom.Dataset]:
    rows, cols = SOURCE_SHAPES[spacing_mm]
    ds = make_mg_dataset(rows=rows, columns=cols, pixel_spacing=(spacing_mm, spacing_mm))
    path = tmp_path / f"mg-{spacing_mm}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, ds


def _record(
    path: Path,
    ds: pydicom.Dataset,
    spacing_mm: float,
    *,
    calcs: tuple[Calcification, ...] = (),
    others: tuple[OtherFinding, ...] = (),
    rows: int | None = None,
) -> ImageRecord:
    return ImageRecord(
        path=path,
        sop_instance_uid=str(ds.SOPInstanceUID),
        rows=rows if rows is not None else int(ds.Rows),
        columns=int(ds.Columns),
        pixel_spacing_mm=(spacing_mm, spacing_mm),
        calcifications=calcs,
        others=others,
        study_instance_uid=str(ds.StudyInstanceUID),
    )


def _source_xy(spacing_mm: float, x_work: float, y_work: float) -> tuple[float, float]:
    """Received-grid point of a working-grid point (pixel-centre consistent resampling)."""
    rows, cols = SOURCE_SHAPES[spacing_mm]
    s_row, s_col = rows / WORK_SHAPE[0], cols / WORK_SHAPE[1]
    return (x_work + 0.5) * s_col - 0.5, (y_work + 0.5) * s_row - 0.5


def _dist(shape: tuple[int, int], x: float, y: float) -> np.ndarray:
    rr, cc = np.mgrid[0 : shape[0], 0 : shape[1]]
    return np.hypot(cc - x, rr - y)


# ----------------------------------------------------------------------------- load


@pytest.mark.parametrize("spacing_mm", [0.05, 0.1])
def test_load_training_image_draws_7px_positive_disks_at_the_mapped_centres(
    tmp_path: Path, spacing_mm: float
) -> None:
    path, ds = _write_mg(tmp_path, spacing_mm)
    work_pts = [(40.0, 100.0), (70.3, 60.6)]
    calcs = tuple(Calcification(*_source_xy(spacing_mm, x, y)) for x, y in work_pts)
    im = load_training_image(_record(path, ds, spacing_mm, calcs=calcs))

    assert im.image.shape == WORK_SHAPE
    assert im.image.dtype == np.float32
    assert im.positive.dtype == bool and im.ignore.dtype == bool
    assert tuple(im.transform.work_shape) == WORK_SHAPE
    np.testing.assert_allclose(im.centres, work_pts, atol=1e-6)
    expected = np.zeros(WORK_SHAPE, bool)
    for x, y in work_pts:
        d = _dist(WORK_SHAPE, x, y)
        assert im.positive[d <= 6.5].all(), "the disk must cover radius 6.5 px"
        expected |= d < 7.5
    # Nothing positive beyond 7 px (+ half a pixel) of a µC.
    assert not (im.positive & ~expected).any()
    # Each disk has the area of a 7-px-radius disk (π·49 ≈ 154 px).
    assert 140 <= im.positive.sum() / 2 <= 170
    assert not im.ignore.any()
    np.testing.assert_array_equal(im.negative, ~im.positive)


def test_load_training_image_keeps_the_preprocessed_image_and_breast_mask(
    tmp_path: Path,
) -> None:
    path, ds = _write_mg(tmp_path, 0.1)
    im = load_training_image(_record(path, ds, 0.1))
    assert im.breast_mask.shape == WORK_SHAPE
    assert 0.2 < im.breast_mask.mean() < 0.9
    assert float(im.image.min()) >= 0.0 and float(im.image.max()) <= 1.0
    assert not im.image[~im.breast_mask].any()  # background zero
    assert im.centres.shape == (0, 2)
    assert isinstance(im.transform, GridTransform)
    assert im.record.sop_instance_uid == str(ds.SOPInstanceUID)


def test_load_training_image_ignores_about_1mm_around_other_findings(tmp_path: Path) -> None:
    spacing = 0.1
    path, ds = _write_mg(tmp_path, spacing)
    xw, yw = 60.0, 100.0
    other = OtherFinding(kind="vascular", points=(_source_xy(spacing, xw, yw),))
    im = load_training_image(_record(path, ds, spacing, others=(other,)))
    assert not im.positive.any()
    d = _dist(WORK_SHAPE, xw, yw)
    # 1 mm = 14.3 working pixels: everything within 0.9 mm is ignored …
    assert im.ignore[d <= 13.0].all()
    # … and nothing beyond 1.5 mm (21 px) is: those pixels are usable negatives.
    far = im.ignore & (d > 21.0)
    assert not far.any(), (
        f"{int(far.sum())} pixels ignored beyond 1.5 mm of the finding; farthest at "
        f"{float(d[im.ignore].max()) * 0.07:.2f} mm (margin is 1 mm)"
    )


def test_load_training_image_ignores_a_band_along_a_vessel_polyline(tmp_path: Path) -> None:
    spacing = 0.1
    path, ds = _write_mg(tmp_path, spacing)
    pts = (_source_xy(spacing, 40.0, 60.0), _source_xy(spacing, 40.0, 140.0))
    im = load_training_image(
        _record(path, ds, spacing, others=(OtherFinding(kind="vascular", points=pts),))
    )
    # Along the vertical segment x = 40, y ∈ [60, 140].
    assert im.ignore[60:141, 40].all()
    assert im.ignore[100, 40 - 13 : 40 + 14].all()
    assert not im.ignore[100, 40 + 22 :].any()


def test_load_training_image_keeps_a_calcification_inside_an_ignored_margin_positive(
    tmp_path: Path,
) -> None:
    spacing = 0.1
    path, ds = _write_mg(tmp_path, spacing)
    calc = Calcification(*_source_xy(spacing, 50.0, 100.0))
    other = OtherFinding(kind="macro", points=(_source_xy(spacing, 55.0, 100.0),))
    im = load_training_image(_record(path, ds, spacing, calcs=(calc,), others=(other,)))
    assert im.positive[100, 50]
    assert im.ignore.any()
    assert not (im.ignore & im.positive).any()
    assert not im.negative[100, 50]


def test_load_training_image_fills_a_calcification_outline(tmp_path: Path) -> None:
    spacing = 0.1
    path, ds = _write_mg(tmp_path, spacing)
    # A 30 × 30 working-pixel square outline (2.1 mm: larger than the 7-px disk).
    corners = [(60.0, 80.0), (90.0, 80.0), (90.0, 110.0), (60.0, 110.0)]
    outline = tuple(_source_xy(spacing, x, y) for x, y in corners)
    calc = Calcification(*_source_xy(spacing, 75.0, 95.0), outline=outline)
    im = load_training_image(_record(path, ds, spacing, calcs=(calc,)))
    assert im.positive[81:110, 61:90].all()  # the polygon's interior
    assert not im.positive[:, :50].any() and not im.positive[:70, :].any()


def test_load_training_image_rejects_a_record_of_another_size(tmp_path: Path) -> None:
    path, ds = _write_mg(tmp_path, 0.1)
    with pytest.raises(DatasetError, match="manifest"):
        load_training_image(_record(path, ds, 0.1, rows=141))


def test_load_training_images_loads_each_record_in_order(tmp_path: Path) -> None:
    p1, ds1 = _write_mg(tmp_path, 0.1)
    p2, ds2 = _write_mg(tmp_path, 0.05)
    ims = load_training_images([_record(p1, ds1, 0.1), _record(p2, ds2, 0.05)])
    assert [im.record.path for im in ims] == [p1, p2]


# ----------------------------------------------------------------------------- PatchSampler

BREAST = 0.5  # tissue value of the synthetic training images
CALC = 0.9  # value inside the µC disks: lets a test check masks against pixels


def _training_image(
    centres: list[tuple[float, float]],
    *,
    shape: tuple[int, int] = WORK_SHAPE,
    background_cols: int = 0,
) -> TrainingImage:
    """A synthetic working-grid image: breast (0.5) but for ``background_cols`` on the right.

    With no background, a patch pixel of value 0 is padding outside the image.
    """
    h, w = shape
    breast = np.zeros(shape, bool)
    breast[:, : w - background_cols] = True
    image = np.where(breast, BREAST, 0.0).astype(np.float32)
    positive = np.zeros(shape, bool)
    for x, y in centres:
        rr, cc = disk((y, x), 7, shape=shape)
        positive[rr, cc] = True
    image[positive] = CALC
    record = ImageRecord(
        path=Path("synthetic.dcm"),
        sop_instance_uid="1.2.3.4",
        rows=h,
        columns=w,
        pixel_spacing_mm=(0.07, 0.07),
        calcifications=tuple(Calcification(x, y) for x, y in centres),
    )
    return TrainingImage(
        image=image,
        breast_mask=breast,
        positive=positive,
        ignore=np.zeros(shape, bool),
        centres=np.array(centres, dtype=np.float64).reshape(-1, 2),
        transform=GridTransform.for_spacing(shape, (0.07, 0.07)),
        record=record,
    )


@pytest.fixture
def sampler_images() -> list[TrainingImage]:
    return [_training_image([(50.0, 60.0), (100.0, 150.0)]), _training_image([(3.0, 4.0)])]


def test_patch_sampler_draws_positive_and_negative_patches_one_to_one(
    sampler_images: list[TrainingImage],
) -> None:
    batch = PatchSampler(sampler_images, patch_size=64, seed=1).sample(8)
    assert batch.images.shape == (8, 1, 64, 64)
    assert batch.images.dtype == np.float32
    assert batch.positive.shape == batch.negative.shape == (8, 1, 64, 64)
    assert batch.positive.dtype == bool and batch.negative.dtype == bool
    has_pos = batch.positive.reshape(8, -1).any(axis=1)
    assert has_pos.tolist() == [True] * 4 + [False] * 4
    assert not (batch.positive & batch.negative).any()


def test_patch_sampler_masks_line_up_with_the_patch_pixels(
    sampler_images: list[TrainingImage],
) -> None:
    batch = PatchSampler(sampler_images, patch_size=64, seed=2).sample(16)
    np.testing.assert_array_equal(batch.positive, batch.images == np.float32(CALC))
    # Negatives are exactly the breast pixels that are not µC.
    np.testing.assert_array_equal(batch.negative, batch.images == np.float32(BREAST))


def test_patch_sampler_puts_the_calcification_away_from_the_patch_border(
    sampler_images: list[TrainingImage],
) -> None:
    sampler = PatchSampler(sampler_images[:1], patch_size=64, seed=3)
    batch = sampler.sample(40)
    for k in range(20):
        pos = batch.positive[k, 0]
        rr, cc = np.nonzero(pos)
        # The whole disk (radius 7) is in the patch: the centre is ≥ 16 px from the border.
        assert pos.sum() >= 140
        assert 16 <= rr.mean() <= 64 - 16 and 16 <= cc.mean() <= 64 - 16


def test_patch_sampler_pads_outside_the_image_with_neither_label(
    sampler_images: list[TrainingImage],
) -> None:
    # The µC at (3, 4) is in the image's corner: its patches reach outside the image.
    sampler = PatchSampler(sampler_images[1:], patch_size=64, seed=4)
    batch = sampler.sample(20)
    outside = batch.images == 0.0
    assert outside[:10].any()
    assert not batch.negative[outside].any()
    assert not batch.positive[outside].any()


def test_patch_sampler_honours_the_positive_fraction(
    sampler_images: list[TrainingImage],
) -> None:
    for fraction, expected in [(0.0, 0), (0.25, 2), (1.0, 8)]:
        batch = PatchSampler(
            sampler_images, patch_size=32, positive_fraction=fraction, seed=0
        ).sample(8)
        assert int(batch.positive.reshape(8, -1).any(axis=1).sum()) == expected


def test_patch_sampler_is_reproducible_for_a_seed(sampler_images: list[TrainingImage]) -> None:
    a = PatchSampler(sampler_images, patch_size=32, seed=7, augmentation=Augmentation()).sample(6)
    b = PatchSampler(sampler_images, patch_size=32, seed=7, augmentation=Augmentation()).sample(6)
    c = PatchSampler(sampler_images, patch_size=32, seed=8, augmentation=Augmentation()).sample(6)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.positive, b.positive)
    assert not np.array_equal(a.images, c.images)


def test_patch_sampler_with_augmentation_keeps_masks_on_the_calcification(
    sampler_images: list[TrainingImage],
) -> None:
    aug = Augmentation(probability=0.0)  # geometric only: pixel values unchanged
    batch = PatchSampler(sampler_images, patch_size=64, seed=5, augmentation=aug).sample(16)
    np.testing.assert_array_equal(batch.positive, batch.images == np.float32(CALC))


def test_patch_sampler_works_with_images_without_calcifications_when_no_positives_asked() -> None:
    im = _training_image([], background_cols=20)
    batch = PatchSampler([im], patch_size=32, positive_fraction=0.0).sample(4)
    assert not batch.positive.any()
    assert batch.negative.any()


def test_patch_sampler_rejects_no_images() -> None:
    with pytest.raises(DatasetError, match="no training images"):
        PatchSampler([])


@pytest.mark.parametrize("patch_size", [8, 12, 100, 0])
def test_patch_sampler_rejects_a_bad_patch_size(
    sampler_images: list[TrainingImage], patch_size: int
) -> None:
    with pytest.raises(ValueError, match="patch_size"):
        PatchSampler(sampler_images, patch_size=patch_size)


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_patch_sampler_rejects_a_positive_fraction_outside_0_1(
    sampler_images: list[TrainingImage], fraction: float
) -> None:
    with pytest.raises(ValueError, match="positive_fraction"):
        PatchSampler(sampler_images, positive_fraction=fraction)


def test_patch_sampler_rejects_positives_without_calcifications() -> None:
    with pytest.raises(DatasetError, match="no image has a µC"):
        PatchSampler([_training_image([])], patch_size=32)


def test_patch_sampler_rejects_images_without_breast_pixels() -> None:
    im = _training_image([(50.0, 60.0)])
    empty = TrainingImage(
        image=np.zeros_like(im.image),
        breast_mask=np.zeros_like(im.breast_mask),
        positive=im.positive,
        ignore=im.ignore,
        centres=im.centres,
        transform=im.transform,
        record=im.record,
    )
    with pytest.raises(DatasetError, match="breast pixels"):
        PatchSampler([empty], patch_size=32)


@pytest.mark.parametrize("batch_size", [0, -2])
def test_patch_sampler_rejects_a_batch_size_below_one(
    sampler_images: list[TrainingImage], batch_size: int
) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        PatchSampler(sampler_images, patch_size=32).sample(batch_size)


# ----------------------------------------------------------------------------- Augmentation


def _marker_patch() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 32 × 32 patch: tissue 0.5 in the left 24 columns, background 0, a marker at (5, 9)."""
    img = np.zeros((32, 32), np.float32)
    img[:, :24] = 0.5
    img[5, 9] = 0.95  # row 5, col 9
    marker = np.zeros((32, 32), bool)
    marker[5, 9] = True
    background = img == 0
    return img, marker, background


def test_augmentation_moves_masks_with_the_image() -> None:
    img, marker, background = _marker_patch()
    aug = Augmentation(probability=0.0)
    seen = set()
    for seed in range(40):
        out, m, bg = aug(np.random.default_rng(seed), img, marker, background)
        assert out.shape == (32, 32) and out.dtype == np.float32
        assert m.dtype == bool and int(m.sum()) == 1
        (pos,) = map(tuple, np.argwhere(m))
        assert out[pos] == np.float32(0.95)
        np.testing.assert_array_equal(bg, out == 0)
        seen.add(pos)
    # Flips and quarter turns: the 8 symmetries of the square, all reachable.
    assert len(seen) == 8


def test_augmentation_keeps_the_marker_brightest_and_background_zero() -> None:
    img, marker, background = _marker_patch()
    aug = Augmentation(probability=1.0, blur_sigma=(0.0, 0.0))
    for seed in range(20):
        out, m, bg = aug(np.random.default_rng(seed), img, marker, background)
        assert np.unravel_index(np.argmax(out), out.shape) == tuple(np.argwhere(m)[0])
        assert not out[bg].any(), "background must stay exactly 0"
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_augmentation_with_blur_and_noise_keeps_the_background_zero() -> None:
    img, marker, background = _marker_patch()
    aug = Augmentation(probability=1.0, blur_sigma=(0.7, 0.8), noise_std=(0.02, 0.02))
    changed = False
    for seed in range(10):
        out, _, bg = aug(np.random.default_rng(seed), img, marker, background)
        assert not out[bg].any()
        assert out.dtype == np.float32
        changed |= not np.allclose(np.sort(out[~bg]), np.sort(img[~background]))
    assert changed


def test_augmentation_without_transforms_returns_the_patch_unchanged() -> None:
    img, marker, _ = _marker_patch()
    aug = Augmentation(flips=False, rot90=False, probability=0.0)
    out, m = aug(np.random.default_rng(0), img, marker)
    np.testing.assert_array_equal(out, img)
    np.testing.assert_array_equal(m, marker)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"contrast": (0.0, 1.0)}, "contrast"),
        ({"contrast": (1.3, 0.7)}, "contrast"),
        ({"gamma": (0.0, 1.5)}, "gamma"),
        ({"noise_std": (-0.01, 0.02)}, "noise_std"),
        ({"noise_std": (0.02, 0.01)}, "noise_std"),
        ({"blur_sigma": (1.0, 0.5)}, "blur_sigma"),
        ({"probability": -0.1}, "probability"),
        ({"probability": 1.1}, "probability"),
    ],
)
def test_augmentation_rejects_invalid_ranges_naming_them(
    kwargs: dict[str, object], name: str
) -> None:
    with pytest.raises(ValueError, match=name):
        Augmentation(**kwargs)  # type: ignore[arg-type]
