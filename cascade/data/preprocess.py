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
from skimage.filters import threshold_otsu
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


# Pixels per block where a whole-image float64 (or intp) temporary is avoided by working
# in blocks: small enough to stay a few MB, large enough to vectorise.
_BLOCK_PIXELS = 1 << 18
# Integer images with at most this many distinct levels (hi − lo + 1) are mapped through
# a lookup table (16-bit detectors: ≤ 65 536 entries).
_MAX_LUT_LEVELS = 1 << 16


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
        out = self._resample_float32(arr)
        # Never hand back the caller's own array.
        return out.copy() if np.shares_memory(out, image) else out

    def _resample_float32(self, arr: np.ndarray) -> np.ndarray:
        """:meth:`image_to_work` on a float32 ``source_shape`` array; may return ``arr``.

        On the same grid the bilinear resampling is the identity (every working pixel
        centre is a source pixel centre), so ``arr`` itself comes back, not a copy.
        """
        if self.work_shape == self.source_shape:
            return arr
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


def _otsu_threshold(values: np.ndarray, lo: np.floating, hi: np.floating) -> np.float64:
    """:func:`skimage.filters.threshold_otsu` of ``values`` (min ``lo``, max ``hi``) in float64.

    The histogram is binned in float64, exactly as ``threshold_otsu`` does on a float64
    copy (range given as float64 scalars, so NumPy casts each block of a float32 array
    to float64), without making that copy.
    """
    counts, edges = np.histogram(
        values.reshape(-1), bins=256, range=(np.float64(lo), np.float64(hi))
    )
    centers = (edges[:-1] + edges[1:]) / 2.0
    return np.float64(threshold_otsu(hist=(counts, centers)))


def _otsu_separability(values: np.ndarray, threshold: np.float64) -> float:
    """Between-class variance / total variance of an Otsu split (0 … 1), float64 sums."""
    n = values.size
    mean = float(values.sum(dtype=np.float64)) / n
    total = 0.0
    for start in range(0, n, _BLOCK_PIXELS):
        d = values[start : start + _BLOCK_PIXELS].astype(np.float64) - mean
        total += float(np.dot(d, d))
    total /= n
    if total <= 0:
        return 0.0
    above = values > threshold
    n1 = int(np.count_nonzero(above))
    if n1 in (0, n):
        return 0.0
    w1 = n1 / n
    sum1 = float(values[above].sum(dtype=np.float64))
    m1 = sum1 / n1
    m0 = (mean * n - sum1) / (n - n1)
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
    img = np.asarray(image)
    if img.dtype not in (np.float32, np.float64):
        img = img.astype(np.float64)
    if img.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {img.shape}")
    if img.size == 0:
        return np.zeros(img.shape, dtype=bool)
    lo, hi = img.min(), img.max()
    # min/max propagate NaN and reach ±inf, so this checks every pixel without a copy.
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError("image must be finite (no NaN or inf)")
    if hi <= lo:
        return np.zeros(img.shape, dtype=bool)
    # Thresholds stay float64 scalars: NumPy then compares a float32 image in float64.
    high = _otsu_threshold(img, lo, hi)
    low = high
    dark = img[img <= high]
    if dark.size >= 16 and dark.max() > dark.min():
        second = _otsu_threshold(dark, dark.min(), dark.max())
        if _otsu_separability(dark, second) >= _SECOND_SPLIT_SEPARABILITY:
            low = second
    del dark
    # Hysteresis: the components of ``img > low`` that reach above ``high`` (the same
    # regions as skimage's apply_hysteresis_threshold, labelled once).
    labels, n = ndi.label(img > low) if low < high else ndi.label(img > high)
    if n == 0:
        return np.zeros(img.shape, dtype=bool)
    flat = labels.reshape(-1)
    sizes = np.zeros(n + 1, dtype=np.int64)
    for start in range(0, flat.size, _BLOCK_PIXELS):  # bincount casts to intp: blocks
        sizes += np.bincount(flat[start : start + _BLOCK_PIXELS], minlength=n + 1)
    sizes[0] = 0
    if low < high:
        reaches_high = np.zeros(n + 1, dtype=bool)
        reaches_high[labels[img > high]] = True
        sizes[~reaches_high] = 0
    if not sizes.any():
        return np.zeros(img.shape, dtype=bool)
    largest = labels == int(np.argmax(sizes))
    del labels, flat
    # Fill the holes (as ndi.binary_fill_holes, quicker): the background components
    # (4-connected) that do not reach the image border.
    background, _ = ndi.label(~largest)
    edges = (background[0], background[-1], background[:, 0], background[:, -1])
    outside = np.zeros(int(background.max()) + 1, dtype=bool)
    outside[np.concatenate(edges)] = True
    outside[0] = False
    return np.asarray(~outside[background])


def _unit_float32(
    arr: np.ndarray, lo: np.generic, hi: np.generic, *, quantize_8bit: bool
) -> np.ndarray:
    """``(arr − lo) / (hi − lo)`` (rounded to 256 levels when asked) as a new float32 array.

    The values are the float64 computation's, rounded once to float32 (what resampling
    received before), without a float64 copy of the image: integer images of up to 16
    bits go through a float64 lookup table of their levels, anything else is mapped in
    row blocks.
    """
    lo_f, span = float(lo), float(hi) - float(lo)

    def unit64(values: np.ndarray) -> np.ndarray:
        u = (values - lo_f) / span
        if quantize_8bit:
            u = np.round(u * 255.0) / 255.0
        return u

    if np.issubdtype(arr.dtype, np.integer) and arr.dtype.itemsize <= 2:
        levels = int(hi) - int(lo) + 1
        if levels <= _MAX_LUT_LEVELS:
            lut = unit64(np.arange(levels, dtype=np.float64) + lo_f).astype(np.float32)
            # The offset from lo fits the unsigned type of the same width (modular
            # arithmetic makes it exact for signed images too).
            utype = np.dtype(f"u{arr.dtype.itemsize}")
            offset = arr.view(utype) - np.asarray(lo).astype(arr.dtype).view(utype)
            return lut[offset]
    out = np.empty(arr.shape, dtype=np.float32)
    flat_in, flat_out = arr.reshape(-1), out.reshape(-1)
    for start in range(0, flat_in.size, _BLOCK_PIXELS):
        block = slice(start, start + _BLOCK_PIXELS)
        flat_out[block] = unit64(flat_in[block].astype(np.float64))
    return out


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
    transform = GridTransform.for_spacing(arr.shape, pixel_spacing_mm, target_spacing_mm)
    lo, hi = arr.min(), arr.max()
    # min/max propagate NaN and reach ±inf, so this checks every pixel without a copy.
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError("pixels must be finite (no NaN or inf)")
    if hi <= lo:
        raise InvalidImageError(f"the image is constant (value {float(lo):g}): nothing to segment")
    unit = _unit_float32(arr, lo, hi, quantize_8bit=quantize_8bit)
    work = transform._resample_float32(unit)
    del unit
    np.clip(work, 0.0, 1.0, out=work)
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
