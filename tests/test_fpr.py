"""Behaviour of cascade.inference.fpr: crops around candidates, batched FPR scoring, CropSet.

Coordinates: centres are (x = column, y = row) in the 70-µm working grid, 0-based, the
first pixel's centre at (0, 0); arrays are indexed ``[row, col]``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cascade.inference.fpr import CROP_SIZE, CropSet, extract_crops, prepare_batch, score_crops
from cascade.models import get_model


def _ramp_image(h: int = 80, w: int = 100) -> np.ndarray:
    """float32 (h, w) image whose value encodes its position: 1 + row * 1000 + col."""
    rr, cc = np.mgrid[0:h, 0:w]
    return (1.0 + rr * 1000.0 + cc).astype(np.float32)


# ----------------------------------------------------------------------------- extract_crops


def test_extract_crops_puts_the_centre_pixel_at_half_size() -> None:
    img = np.zeros((120, 150), np.float32)
    img[70, 33] = 1.0  # row 70, col 33
    crops = extract_crops(img, np.array([[33.0, 70.0]]))
    assert crops.shape == (1, CROP_SIZE, CROP_SIZE)
    assert crops.dtype == np.float32
    assert np.argwhere(crops[0] == 1.0).tolist() == [[CROP_SIZE // 2, CROP_SIZE // 2]]


@pytest.mark.parametrize("size", [56, 15, 8])
def test_extract_crops_copies_the_window_around_the_centre(size: int) -> None:
    img = _ramp_image()
    half = size // 2
    crops = extract_crops(img, np.array([[50.0, 40.0], [47.4, 31.6]]), size=size)
    np.testing.assert_array_equal(
        crops[0], img[40 - half : 40 - half + size, 50 - half : 50 - half + size]
    )
    # Non-integer centres round to the nearest pixel: (47.4, 31.6) → col 47, row 32.
    np.testing.assert_array_equal(
        crops[1], img[32 - half : 32 - half + size, 47 - half : 47 - half + size]
    )


def test_extract_crops_zero_pads_at_the_top_left_corner() -> None:
    img = _ramp_image()
    half = CROP_SIZE // 2
    (crop,) = extract_crops(img, np.array([[0.0, 0.0]]))
    # The image's first `half` rows/cols lie in the crop's lower-right quadrant …
    np.testing.assert_array_equal(crop[half:, half:], img[: CROP_SIZE - half, : CROP_SIZE - half])
    # … and everything above or left of the image is zero.
    assert not crop[:half, :].any()
    assert not crop[:, :half].any()


def test_extract_crops_zero_pads_at_the_bottom_right_corner() -> None:
    img = _ramp_image(80, 100)
    half = CROP_SIZE // 2
    (crop,) = extract_crops(img, np.array([[99.0, 79.0]]))
    np.testing.assert_array_equal(crop[: half + 1, : half + 1], img[79 - half :, 99 - half :])
    assert not crop[half + 1 :, :].any()
    assert not crop[:, half + 1 :].any()


def test_extract_crops_keeps_centres_outside_the_image_with_partial_content() -> None:
    img = _ramp_image(80, 100)
    half = CROP_SIZE // 2
    centres = np.array([[-10.0, 40.0], [110.0, 40.0], [50.0, -20.0], [50.0, 96.0]])
    crops = extract_crops(img, centres)
    assert crops.shape == (4, CROP_SIZE, CROP_SIZE)  # never dropped
    # Centre 10 px left of the image: crop columns 0..half+10-1 are padding.
    left = crops[0]
    assert not left[:, : half + 10].any()
    np.testing.assert_array_equal(
        left[:, half + 10 :], img[40 - half : 40 - half + CROP_SIZE, : CROP_SIZE - half - 10]
    )
    # Centre 10 px right of the last column (x = 110, last column 99).
    right = crops[1]
    np.testing.assert_array_equal(
        right[:, : half - 10], img[40 - half : 40 - half + CROP_SIZE, 110 - half :]
    )
    assert not right[:, half - 10 :].any()
    # Centre 20 px above the first row.
    top = crops[2]
    assert not top[: half + 20].any()
    np.testing.assert_array_equal(
        top[half + 20 :], img[: CROP_SIZE - half - 20, 50 - half : 50 - half + CROP_SIZE]
    )
    # Centre 17 px below the last row (y = 96, last row 79).
    bottom = crops[3]
    np.testing.assert_array_equal(
        bottom[: half - 16], img[96 - half :, 50 - half : 50 - half + CROP_SIZE]
    )
    assert not bottom[half - 16 :].any()


@pytest.mark.parametrize(
    "centre",
    [(50.0, 5000.0), (5000.0, 40.0), (50.0, -5000.0), (-5000.0, 40.0), (1e6, 1e6)],
    ids=["far-below", "far-right", "far-above", "far-left", "far-diagonal"],
)
@pytest.mark.parametrize("size", [56, 15])
def test_extract_crops_of_a_centre_far_outside_the_image_are_all_zero(
    centre: tuple[float, float], size: int
) -> None:
    # The whole image is non-zero, so any image pixel leaking into the crop shows.
    img = _ramp_image(80, 100)
    (crop,) = extract_crops(img, np.array([centre]), size=size)
    assert crop.shape == (size, size)
    leaked = np.count_nonzero(crop)
    assert leaked == 0, f"{leaked} image pixels leaked into the crop of a centre at {centre}"


def test_extract_crops_of_no_centres_is_an_empty_stack() -> None:
    crops = extract_crops(np.ones((30, 30), np.float32), np.zeros((0, 2)), size=16)
    assert crops.shape == (0, 16, 16)
    assert crops.dtype == np.float32


def test_extract_crops_rejects_a_non_2d_image() -> None:
    with pytest.raises(ValueError, match="image"):
        extract_crops(np.zeros((2, 30, 30), np.float32), np.array([[5.0, 5.0]]))


@pytest.mark.parametrize("size", [1, 0, -4])
def test_extract_crops_rejects_a_size_below_two(size: int) -> None:
    with pytest.raises(ValueError, match="size"):
        extract_crops(np.zeros((30, 30), np.float32), np.array([[5.0, 5.0]]), size=size)


def test_extract_crops_rejects_centres_that_are_not_xy_pairs() -> None:
    # Two points of three coordinates must not be silently read as three (x, y) pairs.
    with pytest.raises(ValueError, match="centres"):
        extract_crops(np.zeros((30, 30), np.float32), np.zeros((2, 3)))


# ----------------------------------------------------------------------------- scoring


@pytest.fixture(scope="module")
def fpr56() -> torch.nn.Module:
    torch.manual_seed(0)
    model = get_model("fpr_resnet50", width=2, input_size=56)
    # Non-trivial BN running statistics, so that eval mode differs from train mode.
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(8, 1, 56, 56))
    return model.eval()


def _crops(n: int, size: int = CROP_SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, size, size), dtype=np.float32)


def test_score_crops_gives_the_same_probabilities_for_any_batch_size(
    fpr56: torch.nn.Module,
) -> None:
    crops = _crops(20)
    p256 = score_crops(fpr56, crops, input_size=56, batch_size=256)
    p7 = score_crops(fpr56, crops, input_size=56, batch_size=7)
    p1 = score_crops(fpr56, crops, input_size=56, batch_size=1)
    assert p256.shape == (20,)
    assert p256.dtype == np.float64
    assert np.all((p256 >= 0.0) & (p256 <= 1.0))
    np.testing.assert_allclose(p7, p256, rtol=0, atol=1e-6)
    np.testing.assert_allclose(p1, p256, rtol=0, atol=1e-6)
    # The crops differ, so must their scores (a constant output would hide batching bugs).
    assert np.ptp(p256) > 1e-6


def test_score_crops_matches_a_manual_sigmoid_of_the_logits(fpr56: torch.nn.Module) -> None:
    crops = _crops(5, seed=3)
    with torch.no_grad():
        expected = torch.sigmoid(fpr56(torch.from_numpy(crops)[:, None]).reshape(-1)).double()
    np.testing.assert_allclose(
        score_crops(fpr56, crops, input_size=56), expected.numpy(), atol=1e-6
    )


def test_score_crops_runs_in_eval_mode_and_restores_training_mode(fpr56: torch.nn.Module) -> None:
    crops = _crops(6, seed=4)
    fpr56.eval()
    p_eval = score_crops(fpr56, crops, input_size=56)
    fpr56.train()
    p_from_train = score_crops(fpr56, crops, input_size=56)
    assert fpr56.training  # restored
    fpr56.eval()
    np.testing.assert_allclose(p_from_train, p_eval, atol=1e-6)


def test_score_crops_of_no_crops_is_empty(fpr56: torch.nn.Module) -> None:
    out = score_crops(fpr56, np.zeros((0, CROP_SIZE, CROP_SIZE), np.float32), input_size=56)
    assert out.shape == (0,)


@pytest.mark.parametrize("batch_size", [0, -1])
def test_score_crops_rejects_a_batch_size_below_one(
    fpr56: torch.nn.Module, batch_size: int
) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        score_crops(fpr56, _crops(2), input_size=56, batch_size=batch_size)


def test_prepare_batch_resizes_56_px_crops_to_224() -> None:
    crops = np.full((3, CROP_SIZE, CROP_SIZE), 0.25, np.float32)
    crops[1] = 0.75
    x = prepare_batch(crops, input_size=224, device="cpu")
    assert tuple(x.shape) == (3, 1, 224, 224)
    assert x.dtype == torch.float32
    # Bilinear resizing of a constant crop keeps the constant.
    np.testing.assert_allclose(x[0].numpy(), 0.25, atol=1e-6)
    np.testing.assert_allclose(x[1].numpy(), 0.75, atol=1e-6)


def test_prepare_batch_keeps_native_crops_unchanged() -> None:
    crops = _crops(2)
    x = prepare_batch(crops, input_size=56, device="cpu")
    assert tuple(x.shape) == (2, 1, 56, 56)
    np.testing.assert_array_equal(x[:, 0].numpy(), crops)


def test_prepare_batch_puts_a_centred_dot_at_the_centre_of_the_224_input() -> None:
    crops = np.zeros((1, CROP_SIZE, CROP_SIZE), np.float32)
    crops[0, 27:29, 27:29] = 1.0  # the 2 × 2 block around the crop's centre
    x = prepare_batch(crops, input_size=224, device="cpu")[0, 0].numpy()
    rows, cols = np.nonzero(x > 0.5)
    assert abs(rows.mean() - 111.5) < 0.5
    assert abs(cols.mean() - 111.5) < 0.5


def test_score_crops_resizes_for_a_224_input_model() -> None:
    torch.manual_seed(1)
    model = get_model("fpr_resnet50", width=2, input_size=224).eval()
    crops = _crops(3, seed=5)
    p = score_crops(model, crops, input_size=224, batch_size=2)
    assert p.shape == (3,)
    assert np.all(np.isfinite(p)) and np.all((p >= 0) & (p <= 1))
    np.testing.assert_allclose(
        p, score_crops(model, crops, input_size=224, batch_size=3), atol=1e-6
    )


# ----------------------------------------------------------------------------- CropSet


def test_cropset_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="same length"):
        CropSet(crops=_crops(3), labels=np.ones(2, np.float32), sources=("truth",) * 3)
    with pytest.raises(ValueError, match="same length"):
        CropSet(crops=_crops(2), labels=np.ones(2, np.float32), sources=("truth",))


def test_cropset_concatenate_keeps_order_labels_and_sources() -> None:
    a = CropSet(
        crops=_crops(2, seed=1), labels=np.array([1, 0], np.float32), sources=("truth", "candidate")
    )
    b = CropSet(crops=_crops(1, seed=2), labels=np.array([0.0]), sources=("candidate",))
    c = CropSet.concatenate([a, b])
    assert c.crops.shape == (3, CROP_SIZE, CROP_SIZE)
    np.testing.assert_array_equal(c.crops[2], b.crops[0])
    np.testing.assert_array_equal(c.labels, [1.0, 0.0, 0.0])
    assert c.labels.dtype == np.float32
    assert c.sources == ("truth", "candidate", "candidate")


def test_cropset_concatenate_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="no crop sets"):
        CropSet.concatenate([])
