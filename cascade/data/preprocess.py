"""The paper's pre-processing: intensity map, resampling to 70 µm, Otsu breast mask.

:func:`preprocess` maps the display-domain pixels linearly (min–max) onto [0, 1],
optionally quantising to 8 bits as the paper does, resamples to the working spacing
(70 µm by default), segments the breast and zeroes the background. It returns the
:class:`GridTransform` that maps points, lengths and masks between the received
("source") grid and the working grid, because every finding sent out must be in the
received image's pixel grid.

Coordinates: x = column, y = row, 0-based, the centre of the first pixel at (0, 0), in
both grids. The resampling is pixel-centre consistent (the image edges coincide): with
``s = source_shape / work_shape`` per axis, work pixel centre ``i`` lies at source
coordinate ``(i + 0.5) · s − 0.5``. That is what :func:`skimage.transform.resize` does,
and the transform uses exactly the same ``s`` (not the nominal spacing ratio), so points
round-trip exactly.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import apply_hysteresis_threshold, threshold_otsu
from skimage.transform import resize

from cascade.data.io import Mammogram
from cascade.errors import InvalidImageError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SPACING_MM",
    "GridTransform",
    "PreprocessedImage",
    "breast_mask",
    "preprocess",
    "preprocess_mammogram",
]

#: The paper's working pixel spacing (mm).
DEFAULT_SPACING_MM = 0.07

# A second Otsu split of the darker class is trusted only when that class is clearly
# bimodal: Otsu's separability (between-class / total variance) is 2/π ≈ 0.64 for a
# Gaussian and 0.75 for a uniform distribution, above 0.8 for two distinct modes.
_SECOND_SPLIT_SEPARABILITY = 0.8


def _shape(value: object, name: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in value)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair of integers, got {value!r}") from None
    if a < 1 or b < 1:
        raise ValueError(f"{name} must be positive, got {(a, b)}")
    return a, b


def _spacing(value: object, name: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair of numbers (row, col), got {value!r}") from None
    if not (math.isfinite(a) and math.isfinite(b) and a > 0 and b > 0):
        raise ValueError(f"{name} must be positive and finite, got {(a, b)}")
    return a, b


def _points(xy: np.ndarray, name: str = "xy") -> np.ndarray:
    arr = np.asarray(xy, dtype=np.float64)
    if arr.shape == (2,):
        return arr
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name} must have shape (N, 2) or (2,) as (x, y), got {arr.shape}")
    return arr


@dataclass(frozen=True)
class GridTransform:
    """Maps between the received (source) pixel grid and the working grid.

    Parameters
    ----------
    source_shape : (int, int)
        (rows, columns) of the received image.
    source_spacing_mm : (float, float)
        (row, col) spacing of the received image in mm.
    work_shape : (int, int)
        (rows, columns) of the resampled image.
    work_spacing_mm : (float, float)
        (row, col) effective spacing of the working grid, ``source_spacing × scale``
        (close to, not exactly, the target spacing because shapes are integers).

    Notes
    -----
    Points are ``(x, y)`` = (column, row), 0-based, first pixel's centre at (0, 0).
    ``scale = source_shape / work_shape`` per axis (row, col); a working pixel centre
    ``i`` lies at source coordinate ``(i + 0.5) · scale − 0.5``.
    """

    source_shape: tuple[int, int]
    source_spacing_mm: tuple[float, float]
    work_shape: tuple[int, int]
    work_spacing_mm: tuple[float, float]

    def __post_init__(self) -> None:
        object.__setattr__(self, "source_shape", _shape(self.source_shape, "source_shape"))
        object.__setattr__(self, "work_shape", _shape(self.work_shape, "work_shape"))
        object.__setattr__(
            self, "source_spacing_mm", _spacing(self.source_spacing_mm, "source_spacing_mm")
        )
        object.__setattr__(
            self, "work_spacing_mm", _spacing(self.work_spacing_mm, "work_spacing_mm")
        )

    @classmethod
    def for_spacing(
        cls,
        source_shape: tuple[int, int],
        source_spacing_mm: tuple[float, float],
        target_spacing_mm: float = DEFAULT_SPACING_MM,
    ) -> GridTransform:
        """The transform to a target spacing: ``work_shape = round(shape × spacing / target)``.

        Parameters
        ----------
        source_shape : (int, int)
            (rows, columns) of the received image.
        source_spacing_mm : (float, float)
            (row, col) spacing in mm.
        target_spacing_mm : float
            Working spacing in mm (0.07 in the paper).

        Returns
        -------
        GridTransform
        """
        shape = _shape(source_shape, "source_shape")
        spacing = _spacing(source_spacing_mm, "source_spacing_mm")
        if not (math.isfinite(target_spacing_mm) and target_spacing_mm > 0):
            raise ValueError(f"target_spacing_mm must be positive, got {target_spacing_mm}")
        work = tuple(
            max(1, round(n * sp / target_spacing_mm)) for n, sp in zip(shape, spacing, strict=True)
        )
        work_spacing = tuple(sp * n / w for n, sp, w in zip(shape, spacing, work, strict=True))
        return cls(shape, spacing, work, work_spacing)  # type: ignore[arg-type]

    @property
    def scale(self) -> tuple[float, float]:
        """(row, col) source pixels per working pixel: ``source_shape / work_shape``."""
        return (
            self.source_shape[0] / self.work_shape[0],
            self.source_shape[1] / self.work_shape[1],
        )

    def _xy_scale(self) -> np.ndarray:
        s_row, s_col = self.scale
        return np.array([s_col, s_row])  # (x, y) order

    def to_work(self, xy: np.ndarray) -> np.ndarray:
        """Source-grid points → working-grid points.

        Parameters
        ----------
        xy : numpy.ndarray
            ``(N, 2)`` or ``(2,)`` as (x = column, y = row), pixel-centre convention.

        Returns
        -------
        numpy.ndarray
            float64, same shape.
        """
        return (_points(xy) + 0.5) / self._xy_scale() - 0.5

    def to_source(self, xy: np.ndarray) -> np.ndarray:
        """Working-grid points → source-grid points (inverse of :meth:`to_work`).

        Parameters
        ----------
        xy : numpy.ndarray
            ``(N, 2)`` or ``(2,)`` as (x = column, y = row), pixel-centre convention.

        Returns
        -------
        numpy.ndarray
            float64, same shape.
        """
        return (_points(xy) + 0.5) * self._xy_scale() - 0.5

    def lengths_to_source(self, lengths_px: np.ndarray | float) -> np.ndarray:
        """Working-grid lengths (px) → source-grid lengths (px) along the column axis.

        Parameters
        ----------
        lengths_px : array-like or float
            Lengths in working pixels (e.g. radii).

        Returns
        -------
        numpy.ndarray
            float64, same shape, ``lengths × scale[col]``.
        """
        return np.asarray(lengths_px, dtype=np.float64) * self.scale[1]

    def lengths_to_work(self, lengths_px: np.ndarray | float) -> np.ndarray:
        """Source-grid lengths (px) → working-grid lengths (px) along the column axis."""
        return np.asarray(lengths_px, dtype=np.float64) / self.scale[1]

    def _resample_mask(
        self, mask: np.ndarray, shape_in: tuple[int, int], out: tuple[int, int], name: str
    ) -> np.ndarray:
        arr = np.asarray(mask)
        if arr.dtype != bool:
            raise TypeError(f"{name} must be a boolean array, got {arr.dtype}")
        if arr.shape != shape_in:
            raise ValueError(f"{name} must have shape {shape_in}, got {arr.shape}")
        if arr.shape == out:
            return arr.copy()
        down = any(o < i for o, i in zip(out, shape_in, strict=True))
        # A target pixel is in the mask when the interpolated mask value at its centre is
        # ≥ 0.5, with the same centre mapping as the image (area-averaged when shrinking).
        frac = resize(
            arr.astype(np.float32),
            out,
            order=1,
            mode="edge",
            anti_aliasing=down,
            preserve_range=True,
        )
        return np.asarray(frac >= 0.5)

    def mask_to_source(self, mask: np.ndarray) -> np.ndarray:
        """Boolean working-grid mask → boolean source-grid mask.

        Parameters
        ----------
        mask : numpy.ndarray
            bool ``work_shape``.

        Returns
        -------
        numpy.ndarray
            bool ``source_shape``: a source pixel is set when the bilinearly interpolated
            mask at its centre is ≥ 0.5.
        """
        return self._resample_mask(mask, self.work_shape, self.source_shape, "mask")

    def mask_to_work(self, mask: np.ndarray) -> np.ndarray:
        """Boolean source-grid mask → boolean working-grid mask (see :meth:`mask_to_source`).

        Parameters
        ----------
        mask : numpy.ndarray
            bool ``source_shape``.

        Returns
        -------
        numpy.ndarray
            bool ``work_shape``.
        """
        return self._resample_mask(mask, self.source_shape, self.work_shape, "mask")

    def image_to_work(self, image: np.ndarray) -> np.ndarray:
        """Resample a float source-grid image onto the working grid (bilinear).

        Anti-aliased (Gaussian, σ = (scale − 1) / 2) along axes that shrink; edges
        replicated.

        Parameters
        ----------
        image : numpy.ndarray
            ``source_shape`` array.

        Returns
        -------
        numpy.ndarray
            float32 ``work_shape``.
        """
        arr = np.asarray(image, dtype=np.float32)
        if arr.shape != self.source_shape:
            raise ValueError(f"image must have shape {self.source_shape}, got {arr.shape}")
        down = any(w < s for w, s in zip(self.work_shape, self.source_shape, strict=True))
        out = resize(
            arr, self.work_shape, order=1, mode="edge", anti_aliasing=down, preserve_range=True
        )
        return np.asarray(out, dtype=np.float32)


@dataclass(frozen=True)
class PreprocessedImage:
    """The cascade's input image.

    Parameters
    ----------
    image : numpy.ndarray
        float32 ``(H, W)`` in [0, 1] at the working spacing, background 0.
    breast_mask : numpy.ndarray
        bool ``(H, W)``.
    transform : GridTransform
        Maps the working grid back to the received grid.
    """

    image: np.ndarray
    breast_mask: np.ndarray
    transform: GridTransform

    def __post_init__(self) -> None:
        if self.image.ndim != 2 or self.image.dtype != np.float32:
            raise TypeError("PreprocessedImage.image must be a 2-D float32 array")
        if self.breast_mask.dtype != bool or self.breast_mask.shape != self.image.shape:
            raise ValueError("PreprocessedImage.breast_mask must be bool with the image's shape")
        if tuple(self.image.shape) != self.transform.work_shape:
            raise ValueError(
                f"PreprocessedImage.image shape {self.image.shape} differs from "
                f"transform.work_shape {self.transform.work_shape}"
            )


def _otsu_separability(values: np.ndarray, threshold: float) -> float:
    """Between-class variance / total variance of an Otsu split (0 … 1)."""
    total = float(values.var())
    if total <= 0:
        return 0.0
    above = values > threshold
    w1 = float(above.mean())
    if w1 in (0.0, 1.0):
        return 0.0
    m1 = float(values[above].mean())
    m0 = float(values[~above].mean())
    return w1 * (1.0 - w1) * (m1 - m0) ** 2 / total


def breast_mask(image: np.ndarray) -> np.ndarray:
    """Otsu breast segmentation: the largest bright component, holes filled.

    Plain Otsu splits a dense breast into "dense" vs "fat + background" and loses the
    fatty periphery. So the darker Otsu class is split once more, and when it is clearly
    bimodal (background vs faint tissue) the region grows by hysteresis from the Otsu
    class down to that second threshold (only pixels connected to bright tissue).

    Parameters
    ----------
    image : numpy.ndarray
        2-D float, brighter = more attenuating (any range).

    Returns
    -------
    numpy.ndarray
        bool, same shape; all False for a constant image.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {img.shape}")
    if not np.all(np.isfinite(img)):
        raise ValueError("image must be finite (no NaN or inf)")
    if img.size == 0 or img.max() <= img.min():
        return np.zeros(img.shape, dtype=bool)
    high = float(threshold_otsu(img))
    low = high
    dark = img[img <= high]
    if dark.size >= 16 and dark.max() > dark.min():
        second = float(threshold_otsu(dark))
        if _otsu_separability(dark, second) >= _SECOND_SPLIT_SEPARABILITY:
            low = second
    seed = apply_hysteresis_threshold(img, low, high) if low < high else img > high
    labels, n = ndi.label(seed)
    if n == 0:
        return np.zeros(img.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    largest = labels == int(np.argmax(sizes))
    return np.asarray(ndi.binary_fill_holes(largest), dtype=bool)


def preprocess(
    pixels: np.ndarray,
    pixel_spacing_mm: tuple[float, float],
    *,
    target_spacing_mm: float = DEFAULT_SPACING_MM,
    quantize_8bit: bool = True,
) -> PreprocessedImage:
    """Map to [0, 1], resample to the working spacing, mask the breast, zero the background.

    Parameters
    ----------
    pixels : numpy.ndarray
        2-D ``(rows, columns)`` display-domain image, brighter = more attenuating (e.g.
        :attr:`cascade.data.io.Mammogram.pixels`).
    pixel_spacing_mm : (float, float)
        (row, col) spacing of ``pixels`` in mm.
    target_spacing_mm : float
        Working spacing (0.07 mm in the paper).
    quantize_8bit : bool
        Quantise the min–max-mapped image to 256 levels before resampling, as the paper
        does; False keeps full precision.

    Returns
    -------
    PreprocessedImage
        float32 image in [0, 1] (background 0), its breast mask and the
        :class:`GridTransform` to the received grid.

    Raises
    ------
    InvalidImageError
        The image is constant (nothing to segment).
    """
    arr = np.asarray(pixels)
    if arr.ndim != 2:
        raise ValueError(f"pixels must be 2-D (rows, columns), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise TypeError(f"pixels must be a real numeric array, got {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError("pixels must be finite (no NaN or inf)")
    transform = GridTransform.for_spacing(arr.shape, pixel_spacing_mm, target_spacing_mm)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        raise InvalidImageError(f"the image is constant (value {lo:g}): nothing to segment")
    unit = (arr - lo) / (hi - lo)
    if quantize_8bit:
        unit = np.round(unit * 255.0) / 255.0
    work = np.clip(transform.image_to_work(unit), 0.0, 1.0).astype(np.float32)
    mask = breast_mask(work)
    work[~mask] = 0.0
    logger.debug(
        "preprocessed %s px at %.4g x %.4g mm → %s px at %.4g x %.4g mm, breast %.1f %%",
        transform.source_shape,
        *transform.source_spacing_mm,
        transform.work_shape,
        *transform.work_spacing_mm,
        100.0 * float(mask.mean()),
    )
    return PreprocessedImage(image=work, breast_mask=mask, transform=transform)


def preprocess_mammogram(m: Mammogram, **kw: object) -> PreprocessedImage:
    """:func:`preprocess` on a :class:`cascade.data.io.Mammogram` with its own pixel spacing.

    Parameters
    ----------
    m : Mammogram
        A decoded mammogram.
    **kw
        ``target_spacing_mm``, ``quantize_8bit`` (see :func:`preprocess`).

    Returns
    -------
    PreprocessedImage
    """
    if not isinstance(m, Mammogram):
        raise TypeError(f"m must be a Mammogram, got {type(m).__name__}")
    return preprocess(m.pixels, m.metadata.pixel_spacing_mm, **kw)  # type: ignore[arg-type]
