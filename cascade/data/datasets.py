"""Training data: manifest images in the 70-µm working grid, masks, patch sampling, augmentation.

The path of one training example::

    manifest record → io.read_mammogram → preprocess (70 µm, [0, 1], breast mask)
        → positive mask (µC outline dilated, or a 1-mm disk)    [work grid]
        → ignore mask ("other" calcifications and their surroundings)
        → 112 × 112 patches, positive : negative = 1 : 1 → augmentation

All arrays are ``(row, col)``; points are ``(x = col, y = row)``.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.draw import disk, polygon

from cascade.data.io import read_mammogram
from cascade.data.manifest import ImageRecord
from cascade.data.preprocess import GridTransform, preprocess_mammogram
from cascade.errors import DatasetError

logger = logging.getLogger(__name__)

__all__ = [
    "Augmentation",
    "PatchBatch",
    "PatchSampler",
    "TrainingImage",
    "load_training_image",
    "load_training_images",
]

#: Radius of the positive disk around a point-annotated µC: 1 mm at 70 µm (paper-notes.md).
POSITIVE_RADIUS_MM = 0.49
#: Margin (mm) around "other" calcifications that is neither positive nor negative.
IGNORE_MARGIN_MM = 1.0


@dataclass(frozen=True)
class TrainingImage:
    """One manifest image in the working grid, with its masks.

    Attributes
    ----------
    image : numpy.ndarray
        float32 ``(H, W)`` in [0, 1], 70 µm, background zero.
    breast_mask : numpy.ndarray
        bool ``(H, W)``.
    positive : numpy.ndarray
        bool ``(H, W)``: µC pixels (outline dilated, or a disk of ``positive_radius_px``).
    ignore : numpy.ndarray
        bool ``(H, W)``: pixels that are neither positive nor negative.
    centres : numpy.ndarray
        ``(N, 2)`` µC centres in the work grid, x = column, y = row.
    transform : GridTransform
        Maps work-grid points back to the stored image's grid.
    record : ImageRecord
        The manifest record it came from.
    """

    image: np.ndarray
    breast_mask: np.ndarray
    positive: np.ndarray
    ignore: np.ndarray
    centres: np.ndarray
    transform: GridTransform
    record: ImageRecord

    @property
    def negative(self) -> np.ndarray:
        """Pixels usable as negatives: neither positive nor ignored."""
        return ~(self.positive | self.ignore)


def _draw_polyline(mask: np.ndarray, pts: np.ndarray, radius: float) -> None:
    """Burn a thick polyline (or single point) into ``mask``; ``pts`` is ``(N, 2)`` x, y."""
    h, w = mask.shape
    if len(pts) == 1:
        rr, cc = disk((pts[0, 1], pts[0, 0]), max(radius, 1.0), shape=(h, w))
        mask[rr, cc] = True
        return
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        n = max(2, int(math.hypot(x1 - x0, y1 - y0)) + 1)
        for t in np.linspace(0.0, 1.0, n):
            rr, cc = disk((y0 + t * (y1 - y0), x0 + t * (x1 - x0)), max(radius, 1.0), shape=(h, w))
            mask[rr, cc] = True


def load_training_image(
    record: ImageRecord,
    *,
    positive_radius_mm: float = POSITIVE_RADIUS_MM,
    ignore_margin_mm: float = IGNORE_MARGIN_MM,
    target_spacing_mm: float = 0.07,
) -> TrainingImage:
    """Read, preprocess and annotate one manifest image in the working grid.

    Parameters
    ----------
    record : ImageRecord
        The manifest line; its coordinates are in the stored grid.
    positive_radius_mm : float
        Radius of the disk drawn around point-annotated µCs (the paper's 7 px = 0.49 mm
        radius, i.e. a 1-mm disk). Outlined µCs use their outline dilated by this radius.
    ignore_margin_mm : float
        Margin around "other" calcifications (vascular, macro) excluded from negatives.
    target_spacing_mm : float
        Working pixel spacing.

    Raises
    ------
    DatasetError
        When the image does not match its record (size, UID).
    """
    mammo = read_mammogram(record.path)
    meta = mammo.metadata
    if (meta.rows, meta.columns) != (record.rows, record.columns):
        raise DatasetError(
            f"{record.path}: image is {meta.rows}×{meta.columns} but the manifest says "
            f"{record.rows}×{record.columns}"
        )
    pre = preprocess_mammogram(mammo, target_spacing_mm=target_spacing_mm)
    tr = pre.transform
    h, w = pre.image.shape
    radius_px = positive_radius_mm / target_spacing_mm
    margin_px = ignore_margin_mm / target_spacing_mm

    positive = np.zeros((h, w), dtype=bool)
    centres = np.zeros((len(record.calcifications), 2), dtype=np.float64)
    for i, calc in enumerate(record.calcifications):
        ((cx, cy),) = tr.to_work(np.array([[calc.x, calc.y]]))
        centres[i] = (cx, cy)
        rr, cc = disk((cy, cx), radius_px, shape=(h, w))
        positive[rr, cc] = True
        if calc.outline is not None and len(calc.outline) >= 3:
            pts = tr.to_work(np.asarray(calc.outline, dtype=np.float64))
            rr, cc = polygon(pts[:, 1], pts[:, 0], shape=(h, w))
            outline_mask = np.zeros((h, w), dtype=bool)
            outline_mask[rr, cc] = True
            positive |= ndimage.binary_dilation(
                outline_mask, iterations=max(1, round(radius_px / 2))
            )

    ignore = np.zeros((h, w), dtype=bool)
    for other in record.others:
        pts = tr.to_work(np.asarray(other.points, dtype=np.float64))
        if other.closed and len(pts) >= 3:
            rr, cc = polygon(pts[:, 1], pts[:, 0], shape=(h, w))
            ignore[rr, cc] = True
        _draw_polyline(ignore, pts, margin_px)
    # A µC inside a vessel's margin stays a positive: the ignore mask only removes negatives.
    ignore &= ~positive
    return TrainingImage(
        image=pre.image,
        breast_mask=pre.breast_mask,
        positive=positive,
        ignore=ignore,
        centres=centres,
        transform=tr,
        record=record,
    )


def load_training_images(
    records: Sequence[ImageRecord], *, progress: bool = False, **kwargs: float
) -> list[TrainingImage]:
    """Load several records with :func:`load_training_image` (optionally with a progress bar)."""
    iterator: Sequence[ImageRecord] | Iterator[ImageRecord] = records
    if progress:
        from tqdm import tqdm

        iterator = tqdm(records, desc="loading images", unit="img")
    return [load_training_image(r, **kwargs) for r in iterator]


@dataclass(frozen=True)
class Augmentation:
    """Random photometric and geometric augmentation of 2-D patches.

    Geometric transforms (flips, 90° rotations) move the masks with the image;
    photometric ones (contrast, gamma, noise, blur) change only the image. They
    are what lets a model trained on our phantom survive other sources: other
    detectors' noise, blur, contrast curves and orientations.

    Parameters
    ----------
    flips, rot90 : bool
        Random horizontal/vertical flips and quarter turns.
    contrast : (float, float)
        Range of the contrast factor applied around the patch's mean.
    gamma : (float, float)
        Range of the gamma exponent (log-uniform).
    noise_std : (float, float)
        Range of the additive Gaussian noise standard deviation.
    blur_sigma : (float, float)
        Range of the Gaussian blur sigma in pixels (0 = none).
    probability : float
        Probability of applying each photometric transform.
    """

    flips: bool = True
    rot90: bool = True
    contrast: tuple[float, float] = (0.7, 1.3)
    gamma: tuple[float, float] = (0.7, 1.5)
    noise_std: tuple[float, float] = (0.0, 0.02)
    blur_sigma: tuple[float, float] = (0.0, 0.8)
    probability: float = 0.5

    def __post_init__(self) -> None:
        for name in ("contrast", "gamma", "noise_std", "blur_sigma"):
            lo, hi = getattr(self, name)
            if not (0 <= lo <= hi) or (name in ("contrast", "gamma") and lo <= 0):
                raise ValueError(f"Augmentation.{name} must be an increasing range, got {(lo, hi)}")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"Augmentation.probability must lie in [0, 1], got {self.probability}")

    def __call__(
        self, rng: np.random.Generator, image: np.ndarray, *masks: np.ndarray
    ) -> tuple[np.ndarray, ...]:
        """Augment one ``(H, W)`` image patch and the masks that go with it."""
        arrays = [image, *masks]
        if self.flips and rng.random() < 0.5:
            arrays = [a[:, ::-1] for a in arrays]
        if self.flips and rng.random() < 0.5:
            arrays = [a[::-1, :] for a in arrays]
        if self.rot90:
            k = int(rng.integers(0, 4))
            arrays = [np.rot90(a, k) for a in arrays]
        img = np.ascontiguousarray(arrays[0], dtype=np.float32)
        inside = img > 0  # background stays zero, as in preprocessing
        p = self.probability
        if rng.random() < p:
            factor = rng.uniform(*self.contrast)
            mean = float(img[inside].mean()) if inside.any() else 0.0
            img = np.where(inside, mean + factor * (img - mean), 0.0)
        if rng.random() < p:
            g = math.exp(rng.uniform(math.log(self.gamma[0]), math.log(self.gamma[1])))
            img = np.clip(img, 0.0, 1.0) ** g
        if rng.random() < p and self.blur_sigma[1] > 0:
            sigma = rng.uniform(*self.blur_sigma)
            if sigma > 0.05:
                img = ndimage.gaussian_filter(img, sigma)
        if rng.random() < p and self.noise_std[1] > 0:
            noise = rng.normal(0.0, rng.uniform(*self.noise_std), img.shape)
            img = (img + noise).astype(np.float32)
        img = np.where(inside, np.clip(img, 0.0, 1.0), 0.0).astype(np.float32)
        return (img, *(np.ascontiguousarray(a) for a in arrays[1:]))


@dataclass(frozen=True)
class PatchBatch:
    """A batch of patches, ready for torch.

    Attributes
    ----------
    images : numpy.ndarray
        float32 ``(B, 1, P, P)``.
    positive, negative : numpy.ndarray
        bool ``(B, 1, P, P)``; pixels in neither are ignored by the losses.
    """

    images: np.ndarray
    positive: np.ndarray
    negative: np.ndarray


class PatchSampler:
    """Draws patches from training images, positives and negatives 1 : 1 (the paper).

    A positive patch contains a µC at a random position (at least ``margin`` pixels
    from its border); a negative patch lies inside the breast and contains no
    positive pixel. Padding outside the image is ignored by the losses.

    Parameters
    ----------
    images : sequence of TrainingImage
        The training images.
    patch_size : int
        Side of the square patches (the paper: 112).
    positive_fraction : float
        Fraction of positive patches in a batch (the paper: 0.5).
    augmentation : Augmentation or None
        Applied to every patch; None disables augmentation.
    seed : int
        Seed of the sampler's own random generator.
    """

    def __init__(
        self,
        images: Sequence[TrainingImage],
        *,
        patch_size: int = 112,
        positive_fraction: float = 0.5,
        augmentation: Augmentation | None = None,
        seed: int = 0,
    ) -> None:
        if not images:
            raise DatasetError("no training images")
        if patch_size < 16 or patch_size % 8:
            raise ValueError(f"patch_size must be a multiple of 8 and ≥ 16, got {patch_size}")
        if not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(f"positive_fraction must lie in [0, 1], got {positive_fraction}")
        self.images = list(images)
        self.patch_size = patch_size
        self.positive_fraction = positive_fraction
        self.augmentation = augmentation
        self.rng = np.random.default_rng(seed)
        self._positives = [(i, c) for i, im in enumerate(self.images) for c in im.centres]
        if positive_fraction > 0 and not self._positives:
            raise DatasetError("positive patches were asked for, but no image has a µC")
        self._breast_pixels = [np.flatnonzero(im.breast_mask & im.negative) for im in self.images]
        if not any(len(b) for b in self._breast_pixels):
            raise DatasetError("no image has breast pixels to sample negatives from")

    def _crop(self, im: TrainingImage, top: int, left: int) -> tuple[np.ndarray, ...]:
        p = self.patch_size
        h, w = im.image.shape
        img = np.zeros((p, p), np.float32)
        pos = np.zeros((p, p), bool)
        neg = np.zeros((p, p), bool)
        r0, c0 = max(top, 0), max(left, 0)
        r1, c1 = min(top + p, h), min(left + p, w)
        sl_dst = (slice(r0 - top, r1 - top), slice(c0 - left, c1 - left))
        sl_src = (slice(r0, r1), slice(c0, c1))
        img[sl_dst] = im.image[sl_src]
        pos[sl_dst] = im.positive[sl_src]
        neg[sl_dst] = im.negative[sl_src]
        return img, pos, neg

    def _positive_patch(self) -> tuple[np.ndarray, ...]:
        i, (cx, cy) = self._positives[int(self.rng.integers(len(self._positives)))]
        p = self.patch_size
        margin = min(16, p // 4)
        top = round(cy) - int(self.rng.integers(margin, p - margin))
        left = round(cx) - int(self.rng.integers(margin, p - margin))
        return self._crop(self.images[i], top, left)

    def _negative_patch(self) -> tuple[np.ndarray, ...]:
        p = self.patch_size
        for _ in range(50):
            i = int(self.rng.integers(len(self.images)))
            pix = self._breast_pixels[i]
            if not len(pix):
                continue
            flat = int(pix[int(self.rng.integers(len(pix)))])
            cy, cx = divmod(flat, self.images[i].image.shape[1])
            crop = self._crop(self.images[i], cy - p // 2, cx - p // 2)
            if not crop[1].any():
                return crop
        # Dense clusters everywhere: fall back to a patch with its positives ignored.
        img, pos, neg = crop
        return img, np.zeros_like(pos), neg & ~pos

    def sample(self, batch_size: int) -> PatchBatch:
        """Draw one batch of ``batch_size`` patches."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        n_pos = round(batch_size * self.positive_fraction)
        imgs, poss, negs = [], [], []
        for k in range(batch_size):
            img, pos, neg = self._positive_patch() if k < n_pos else self._negative_patch()
            if self.augmentation is not None:
                img, pos, neg = self.augmentation(self.rng, img, pos, neg)
            imgs.append(img)
            poss.append(pos)
            negs.append(neg)
        return PatchBatch(
            images=np.stack(imgs)[:, None].astype(np.float32),
            positive=np.stack(poss)[:, None],
            negative=np.stack(negs)[:, None],
        )
