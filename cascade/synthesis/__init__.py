"""Physics phantom mammograms with ground truth (see ``docs/phantom-recipe.md``).

The renderer works in the **linear (raw) domain** and follows the recipe step by step:

1. breast geometry — a half-ellipse on the chest wall, compressed thickness falling off
   over the outer 10–20 mm as ``T = T0·√(1 − (r/R)²)``, a 0.75-mm skin shell, an MLO
   pectoral muscle;
2. tissue — an anisotropic power-law field (``P(f) ∝ 1/f^β``, β 2.6–3.5, oriented toward
   the nipple) plus a clustered lumpy component, mapped to a glandular fraction ``g``;
   attenuation ``S = S0·exp(−T·[(1−g)·μa + g·μg])``;
3. objects as line integrals of extra attenuation, rendered in local patches at 2× or 4×
   and binned (the pixel aperture): µCs (ellipsoids, lobes, linear / branching),
   vascular tram-tracks, macro-calcifications, linear structures, dust specks;
4. detector blur (Gaussian), Poisson quantum noise (Gaussian approximation, N ≫ 10) and
   electronic noise, hot pixels;
5. log transform ``P = −ln(S/S0)``, window to the breast's 0.5–99.5 percentiles, storage
   as uint16 (BitsStored 12 / 14, MONOCHROME1 / 2, LINEAR window or SIGMOID VOI LUT).

Coordinates everywhere in this module are in the **stored** pixel grid: ``x`` = column,
``y`` = row, 0-based, the centre of the first pixel at ``(0, 0)``. Internally an image is
rendered with the chest wall on the left and flipped for right breasts at the end.

Entry points: :func:`render_image` (arrays and truth, no DICOM), :func:`phantom_to_dataset`
(an MG For Presentation dataset) and :func:`generate_dataset` (studies on disk with a
manifest and optional previews).
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)
from scipy import fft as sfft
from scipy import ndimage

from cascade import __version__
from cascade.data.manifest import Calcification, ImageRecord, OtherFinding, write_manifest

__all__ = [
    "DENSITIES",
    "MG_FOR_PRESENTATION",
    "VENDORS",
    "DensityClass",
    "PhantomCalcification",
    "PhantomImage",
    "PhantomStudy",
    "VendorProfile",
    "display_from_stored",
    "generate_dataset",
    "phantom_to_dataset",
    "render_image",
]

logger = logging.getLogger(__name__)

#: Digital Mammography X-Ray Image Storage – For Presentation.
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"

Size = Literal["small", "full"]
View = Literal["CC", "MLO"]
Laterality = Literal["L", "R"]

# Linear attenuation coefficients at ≈ 20 keV, cm⁻¹ (recipe; VICTRE / Hammerstein).
MU_ADIPOSE = 0.46
MU_GLANDULAR = 0.80
MU_SKIN = 0.80
MU_MUSCLE = 0.85
#: Upper bound of a calcification's effective μ (hydroxyapatite minus tissue, ≈ 20 keV).
MU_CALC_MAX = 40.0
MU_CALC_MIN = 1.0

SMALL_FIELD_MM = (100.0, 70.0)  # rows (height) × columns (width)
SKIN_MM = 0.75

#: µC peak contrast after aperture and blur: log-normal median / σ_ln, truncated.
CONTRAST_MEDIAN = 0.15
#: Peak contrast grows with size (a thicker calcification absorbs more): ∝ (d / 0.28 mm)^k.
CONTRAST_SIZE_EXPONENT = 0.5
CONTRAST_SIGMA_LN = 0.55
CONTRAST_RANGE = (0.03, 0.25)
#: µC diameter: log-normal, σ_ln 0.5, median drawn per image, truncated to 0.1–1 mm.
DIAMETER_MEDIAN_RANGE = (0.25, 0.30)
DIAMETER_SIGMA_LN = 0.5
DIAMETER_RANGE = (0.1, 1.0)
#: Fraction of images without any µC.
NEGATIVE_FRACTION = 0.4
#: Grid of the tissue texture and geometry maps (mm); upsampled linearly to the pixels.
TEXTURE_GRID_MM = 0.2
#: Number of linear structures (ligaments, ducts) per image: [low, high).
LINEAR_COUNT = (8, 21)
#: The power law flattens for periods longer than this (mm): structure up to breast size.
TEXTURE_LOWEST_PERIOD_MM = 150.0
#: Weight of the soft-thresholded (two-phase) part of the tissue field.
THRESHOLD_WEIGHT = 0.2
#: Largest weight of the clustered lumpy component in the tissue field.
LUMPY_MAX = 0.3
VASCULAR_FRACTION = 0.25


# --------------------------------------------------------------------------- profiles
@dataclass(frozen=True)
class VendorProfile:
    """What a vendor's detector and its For Presentation files look like.

    Parameters
    ----------
    name : str
        Short key (``"hologic"``, ``"ge"``, ``"siemens"``, ``"fuji"``).
    manufacturer, model : str
        DICOM Manufacturer and ManufacturerModelName.
    spacing_mm : float
        Pixel spacing (isotropic) in millimetres.
    full_shape : (int, int)
        (rows, columns) of the full-field detector.
    detector_type : str
        DICOM DetectorType: ``"DIRECT"`` (a-Se) or ``"SCINTILLATOR"`` (CsI).
    blur_sigma_px : float
        Gaussian σ of the detector blur in pixels after 2×2 binning.
    bits_stored : int
        BitsStored of the presentation image (12 or 14).
    monochrome1_probability : float
        Chance that an image is stored MONOCHROME1 (inverted).
    voi_function : str
        ``"LINEAR"`` (window centre/width) or ``"SIGMOID"``.
    jpeg2000_probability : float
        Chance that a study is written JPEG 2000 lossless.
    sid_mm : float
        Source-to-image distance.
    anode, filter : str
        AnodeTargetMaterial and FilterMaterial.
    """

    name: str
    manufacturer: str
    model: str
    spacing_mm: float
    full_shape: tuple[int, int]
    detector_type: str
    blur_sigma_px: float
    bits_stored: int
    monochrome1_probability: float
    voi_function: str
    jpeg2000_probability: float
    sid_mm: float
    anode: str
    filter: str


VENDORS: dict[str, VendorProfile] = {
    "hologic": VendorProfile(
        "hologic",
        "HOLOGIC, Inc.",
        "Selenia Dimensions",
        0.070,
        (4096, 3328),
        "DIRECT",
        0.30,
        12,
        0.0,
        "LINEAR",
        0.3,
        700.0,
        "TUNGSTEN",
        "RHODIUM",
    ),
    "ge": VendorProfile(
        "ge",
        "GE MEDICAL SYSTEMS",
        "Senographe Essential",
        0.100,
        (3070, 2400),
        "SCINTILLATOR",
        0.40,
        14,
        1.0,
        "SIGMOID",
        0.5,
        660.0,
        "RHODIUM",
        "RHODIUM",
    ),
    "siemens": VendorProfile(
        "siemens",
        "SIEMENS",
        "Mammomat Inspiration",
        0.085,
        (3584, 2816),
        "DIRECT",
        0.30,
        12,
        0.0,
        "LINEAR",
        0.2,
        650.0,
        "TUNGSTEN",
        "RHODIUM",
    ),
    "fuji": VendorProfile(
        "fuji",
        "FUJIFILM Corporation",
        "AMULET Innovality",
        0.050,
        (5928, 4728),
        "DIRECT",
        0.30,
        14,
        0.5,
        "LINEAR",
        0.3,
        650.0,
        "TUNGSTEN",
        "RHODIUM",
    ),
}


@dataclass(frozen=True)
class DensityClass:
    """A BI-RADS-like density class: central compressed thickness and mean gland fraction."""

    name: str
    thickness_mm: float
    mean_glandular: float
    probability: float


DENSITIES: dict[str, DensityClass] = {
    "fatty": DensityClass("fatty", 60.0, 0.05, 0.10),
    "scattered": DensityClass("scattered", 55.0, 0.15, 0.40),
    "heterogeneous": DensityClass("heterogeneous", 45.0, 0.34, 0.40),
    "dense": DensityClass("dense", 35.0, 0.60, 0.10),
}

_VIEW_CODES = {
    "CC": ("399162004", "SCT", "cranio-caudal"),
    "MLO": ("399368009", "SCT", "medio-lateral oblique"),
}
#: Patient Orientation (row direction, column direction) as stored: chest wall on the
#: left for L and on the right for R, lateral / superior side up (Clunie's convention).
_PATIENT_ORIENTATION = {
    ("L", "CC"): ["A", "R"],
    ("R", "CC"): ["P", "L"],
    ("L", "MLO"): ["A", "FR"],
    ("R", "MLO"): ["P", "FL"],
}


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class PhantomCalcification:
    """One rendered microcalcification (≤ 1 mm): the truth a detector must find.

    Parameters
    ----------
    x, y : float
        Centre (attenuation-weighted centroid), x = column, y = row of the stored grid,
        0-based, first pixel's centre at (0, 0).
    diameter_mm : float
        Largest extent (Feret diameter) of the µC, 0.1–1.0 mm.
    peak_contrast : float
        ``1 − S/S_bg`` at the darkest pixel after pixel aperture and detector blur,
        noise-free, relative to the local background.
    shape : str
        ``"ellipsoid"``, ``"lobulated"`` or ``"linear"``.
    mu_cm : float
        Effective linear attenuation coefficient used (cm⁻¹).
    cluster : int or None
        Index into :attr:`PhantomImage.clusters`, or None for an isolated µC.
    outline : tuple of (x, y) or None
        Closed polygon of the projected footprint, stored-grid coordinates.
    """

    x: float
    y: float
    diameter_mm: float
    peak_contrast: float
    shape: str
    mu_cm: float
    cluster: int | None = None
    outline: tuple[tuple[float, float], ...] | None = None


@dataclass(frozen=True)
class PhantomImage:
    """A rendered phantom mammogram and its ground truth.

    Arrays have shape ``(rows, columns)``; coordinates are x = column, y = row, 0-based,
    first pixel's centre at (0, 0), in the stored grid.

    Parameters
    ----------
    pixels : ndarray of uint16
        Stored pixel values, exactly as written to PixelData.
    display : ndarray of float32
        What a conformant viewer shows, in [0, 1], tissue bright, air dark: the VOI
        function of the header applied to ``pixels`` and MONOCHROME1 undone.
    log_image : ndarray of float32
        ``P = −ln(S/S0)`` after noise (the linear physics in the log domain).
    breast_mask : ndarray of bool
        Pixels inside the skin line.
    muscle_mask : ndarray of bool or None
        Pectoral muscle pixels (MLO), None for CC.
    spacing_mm : float
        Pixel spacing (isotropic), millimetres.
    vendor : VendorProfile
    view, laterality, density : str
    photometric : str
        ``"MONOCHROME1"`` or ``"MONOCHROME2"``.
    voi_function : str
        ``"LINEAR"`` or ``"SIGMOID"``.
    window_center, window_width : float
        The VOI window, in stored units.
    bits_stored : int
    transfer_syntax : str
        Transfer Syntax UID to write the image with.
    calcifications : tuple of PhantomCalcification
    clusters : tuple of tuple of (x, y)
        Convex hull of each cluster's µC centres.
    others : tuple of OtherFinding
        ``"vascular"`` wall segments (polylines) and ``"macro"`` outlines (closed).
    artefacts : tuple of (x, y, kind)
        Hot pixels and dust specks (not in the manifest: a detection there is a FP).
    size : str
        ``"small"`` or ``"full"``.
    params : dict
        The sampled physical parameters (β, thickness, quanta, …) for reports.
    """

    pixels: NDArray[np.uint16] = field(repr=False)
    display: NDArray[np.float32] = field(repr=False)
    log_image: NDArray[np.float32] = field(repr=False)
    breast_mask: NDArray[np.bool_] = field(repr=False)
    muscle_mask: NDArray[np.bool_] | None = field(repr=False)
    spacing_mm: float
    vendor: VendorProfile
    view: str
    laterality: str
    density: str
    photometric: str
    voi_function: str
    window_center: float
    window_width: float
    bits_stored: int
    transfer_syntax: str
    calcifications: tuple[PhantomCalcification, ...]
    clusters: tuple[tuple[tuple[float, float], ...], ...]
    others: tuple[OtherFinding, ...]
    artefacts: tuple[tuple[float, float, str], ...]
    size: str
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def columns(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def pixel_spacing_mm(self) -> tuple[float, float]:
        """(row spacing, column spacing) in millimetres."""
        return (self.spacing_mm, self.spacing_mm)

    @property
    def calcification_xy(self) -> NDArray[np.float64]:
        """µC centres as an ``(N, 2)`` array of (x = column, y = row)."""
        if not self.calcifications:
            return np.zeros((0, 2))
        return np.array([[c.x, c.y] for c in self.calcifications], dtype=float)

    @property
    def tags(self) -> dict[str, Any]:
        """Description for stratified reports (the manifest's ``tags``)."""
        return {
            "vendor": self.vendor.name,
            "density": self.density,
            "view": self.view,
            "laterality": self.laterality,
            "photometric": self.photometric,
            "voi": self.voi_function,
            "bits_stored": self.bits_stored,
            "transfer_syntax": "jpeg2000-lossless"
            if self.transfer_syntax == JPEG2000Lossless
            else "explicit-vr-little-endian",
            "size": self.size,
            "source": "phantom",
        }


@dataclass(frozen=True)
class PhantomStudy:
    """Patient and study attributes shared by the images of one phantom study.

    ``patient_name`` / ``patient_id`` are synthetic (``PHANTOM^0001``), never real data.
    Dates are ``YYYYMMDD``, times ``HHMMSS``.
    """

    patient_name: str
    patient_id: str
    patient_birth_date: str
    patient_age: str
    study_instance_uid: str
    study_date: str
    study_time: str
    accession_number: str
    study_id: str

    def __post_init__(self) -> None:
        for name in ("patient_name", "patient_id", "study_instance_uid"):
            if not getattr(self, name):
                raise ValueError(f"PhantomStudy.{name} must not be empty")
        for name in ("study_date", "patient_birth_date"):
            value = getattr(self, name)
            if len(value) != 8 or not value.isdigit():
                raise ValueError(f"PhantomStudy.{name} must be YYYYMMDD, got {value!r}")


# --------------------------------------------------------------------------- helpers
def _bin(arr: NDArray[np.float32], ss: int) -> NDArray[np.float32]:
    """Mean over ss×ss blocks (the pixel aperture)."""
    if ss == 1:
        return arr
    r, c = arr.shape[0] // ss, arr.shape[1] // ss
    return arr.reshape(r, ss, c, ss).mean(axis=(1, 3), dtype=np.float32)


def _sub_grid(r0: int, c0: int, nr: int, nc: int, ss: int) -> tuple[NDArray, NDArray]:
    """Sub-pixel centres (y column vector, x row vector) of a patch, in pixel units."""
    ys = (r0 + (np.arange(nr * ss, dtype=np.float32) + 0.5) / ss - 0.5)[:, None]
    xs = (c0 + (np.arange(nc * ss, dtype=np.float32) + 0.5) / ss - 0.5)[None, :]
    return ys, xs


def _contour(
    mask: NDArray[np.bool_], r0: int, c0: int, ss: int, max_points: int = 48
) -> tuple[tuple[float, float], ...] | None:
    """Largest outline of a sub-pixel mask, converted to stored (x, y) coordinates."""
    from skimage.measure import approximate_polygon, find_contours

    if not mask.any():
        return None
    padded = np.pad(mask.astype(np.float32), 1)
    contours = find_contours(padded, 0.5)
    if not contours:
        return None
    best = max(contours, key=len)
    tol = 0.2
    poly = approximate_polygon(best, tolerance=tol)
    while len(poly) > max_points:
        tol *= 1.6
        poly = approximate_polygon(best, tolerance=tol)
    pts = []
    for rr, cc in poly[:-1] if len(poly) > 3 else poly:
        y = r0 + (rr - 1 + 0.5) / ss - 0.5
        x = c0 + (cc - 1 + 0.5) / ss - 0.5
        pts.append((float(x), float(y)))
    return tuple(pts) if len(pts) >= 3 else None


def _truncated_lognormal(
    rng: np.random.Generator, median: float, sigma: float, lo: float, hi: float
) -> float:
    for _ in range(100):
        v = float(median * math.exp(sigma * rng.standard_normal()))
        if lo <= v <= hi:
            return v
    return float(min(max(median, lo), hi))


def _uc_contrast(rng: np.random.Generator, diameter_mm: float) -> float:
    """Target post-blur peak contrast of a µC: log-normal, larger for larger µCs, truncated."""
    base = _truncated_lognormal(rng, CONTRAST_MEDIAN, CONTRAST_SIGMA_LN, 0.0, math.inf)
    scaled = base * (diameter_mm / 0.28) ** CONTRAST_SIZE_EXPONENT
    return float(np.clip(scaled, *CONTRAST_RANGE))


def _solve_mu(contrast_of: Callable[[float], float], target: float) -> tuple[float, float]:
    """Bisection on ln μ so that ``contrast_of(μ)`` hits ``target``; clamped to physics."""
    c_max = contrast_of(MU_CALC_MAX)
    if c_max <= target:
        return MU_CALC_MAX, c_max
    lo, hi = math.log(MU_CALC_MIN * 0.05), math.log(MU_CALC_MAX)
    for _ in range(18):
        mid = 0.5 * (lo + hi)
        if contrast_of(math.exp(mid)) < target:
            lo = mid
        else:
            hi = mid
    mu = math.exp(0.5 * (lo + hi))
    return mu, contrast_of(mu)


# --------------------------------------------------------------------------- geometry
@dataclass
class _Canvas:
    """Attenuation line integral (dimensionless), chest wall on the left (L frame)."""

    A: NDArray[np.float32]
    spacing: float
    blur: float

    def add_patch(self, r0: int, c0: int, atten_sub: NDArray[np.float32], ss: int) -> None:
        """Add a sub-pixel attenuation patch: aperture-bin its transmission, then log."""
        trans = _bin(np.exp(-atten_sub, dtype=np.float32), ss)
        a = -np.log(np.maximum(trans, 1e-12))
        nr, nc = a.shape
        R, C = self.A.shape
        rr0, cc0 = max(r0, 0), max(c0, 0)
        rr1, cc1 = min(r0 + nr, R), min(c0 + nc, C)
        if rr1 <= rr0 or cc1 <= cc0:
            return
        self.A[rr0:rr1, cc0:cc1] += a[rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0]


@dataclass
class _Geometry:
    rows: int
    cols: int
    spacing: float
    kc: int  # coarse factor
    e_c: NDArray[np.float32]  # signed distance to the skin (mm), coarse grid
    pect_c: NDArray[np.float32] | None  # muscle fraction, coarse grid
    nipple: tuple[float, float]  # (x, y) in pixels, L frame
    band_mm: float
    t0_mm: float

    def edge_distance(self, x: float, y: float) -> float:
        """Distance (mm) of an L-frame point to the skin, negative outside; coarse lookup."""
        if not (0 <= x < self.cols and 0 <= y < self.rows):
            return -1e9
        return float(self.e_c[int(y) // self.kc, int(x) // self.kc])

    def in_muscle(self, x: float, y: float) -> bool:
        if self.pect_c is None or not (0 <= x < self.cols and 0 <= y < self.rows):
            return False
        return bool(self.pect_c[int(y) // self.kc, int(x) // self.kc] > 0.02)


def _sample_geometry(
    rng: np.random.Generator, rows: int, cols: int, p: float, view: str, t0_mm: float
) -> tuple[_Geometry, dict[str, float]]:
    H, W = rows * p, cols * p
    kc = max(1, round(TEXTURE_GRID_MM / p))
    rc, cc = -(-rows // kc), -(-cols // kc)
    y = ((np.arange(rc) * kc + (kc - 1) / 2) * p).astype(np.float32)[:, None]
    x = ((np.arange(cc) * kc + (kc - 1) / 2) * p).astype(np.float32)[None, :]
    a = float(rng.uniform(0.80, 0.95)) * W
    if view == "CC":
        yc = float(rng.uniform(0.45, 0.55)) * H
        b_up = b_lo = float(rng.uniform(0.40, 0.50)) * H
    else:
        yc = float(rng.uniform(0.48, 0.58)) * H
        b_lo = float(rng.uniform(0.36, 0.46)) * H
        b_up = yc / float(rng.uniform(0.70, 0.85))
    b = np.where(y < yc, b_up, b_lo).astype(np.float32)
    u = x / a
    v = (y - yc) / b
    theta = np.arctan2(v, u)
    # Irregular outline: low harmonics and a nipple bump at the apex.
    rs = np.ones_like(theta)
    for k in (2, 3, 4):
        rs += float(rng.uniform(0, 0.015)) * np.cos(k * theta + float(rng.uniform(0, 2 * np.pi)))
    nip_t = float(rng.normal(0.0, 0.08))
    nip_h = float(rng.uniform(1.5, 3.5)) / a
    nip_w = float(rng.uniform(6.0, 10.0)) / a
    rs += nip_h * np.exp(-0.5 * ((theta - nip_t) / nip_w) ** 2)
    rho0 = np.hypot(u, v)
    grad = np.hypot(u / a, v / b) / np.maximum(rho0, 1e-6) / rs
    e_c = ((1.0 - rho0 / rs) / np.maximum(grad, 1e-9)).astype(np.float32)
    nip_x = a * (1 + nip_h) * math.cos(nip_t)
    nip_y = yc + b_lo * math.sin(nip_t)
    params = {"semi_axis_x_mm": a, "semi_axis_y_mm": float(b_lo), "centre_y_mm": yc}
    pect_c = None
    if view == "MLO":
        x_top = a * math.sqrt(max(1 - (yc / b_up) ** 2, 0.05))
        pt = float(rng.uniform(0.50, 0.85)) * x_top
        pl = float(rng.uniform(0.45, 0.75)) * H
        kap = float(rng.uniform(-0.35, 0.25))
        q = x / pt + y / pl + kap * (x / pt) * (y / pl)
        gq = np.hypot(1 / pt + kap * y / (pt * pl), 1 / pl + kap * x / (pt * pl))
        d_p = (1.0 - q) / gq
        # A sharp muscle border (≈ 1–2 mm), then slowly thicker toward the corner.
        ramp = float(rng.uniform(0.8, 2.0))
        fmax = float(rng.uniform(0.6, 0.9))
        frac = 0.65 * np.clip(d_p / ramp, 0.0, 1.0) + 0.35 * np.clip(d_p / 40.0, 0.0, 1.0)
        pect_c = (fmax * frac).astype(np.float32)
        pect_c[e_c <= 0] = 0
        params.update(pectoral_top_mm=pt, pectoral_side_mm=pl)
    band = float(rng.uniform(10.0, 20.0))
    geo = _Geometry(rows, cols, p, kc, e_c, pect_c, (nip_x / p, nip_y / p), band, t0_mm)
    params["edge_band_mm"] = band
    return geo, params


def _upsample(coarse: NDArray[np.float32], k: int, shape: tuple[int, int]) -> NDArray:
    if k == 1:
        return coarse[: shape[0], : shape[1]].astype(np.float32, copy=True)
    out = ndimage.zoom(coarse, k, order=1, grid_mode=True, mode="nearest")
    return out[: shape[0], : shape[1]]


# --------------------------------------------------------------------------- tissue
def _texture(
    rng: np.random.Generator, geo: _Geometry, beta: float, ratio: float, lumpy_weight: float
) -> NDArray[np.float32]:
    """Anisotropic power-law field (+ lumpy part) on the coarse grid, zero mean in the breast.

    Unit variance on an unbounded field; a small field holds less of the large-scale
    variance, as a small crop of a real breast does.
    """
    shape = geo.e_c.shape
    dc = geo.kc * geo.spacing
    white = rng.standard_normal(shape, dtype=np.float32)
    spec = sfft.rfft2(white, workers=2)
    fy = sfft.fftfreq(shape[0], d=dc).astype(np.float32)[:, None]
    fx = sfft.rfftfreq(shape[1], d=dc).astype(np.float32)[None, :]
    f0 = 1.0 / TEXTURE_LOWEST_PERIOD_MM  # flatten below: the breast is finite
    angles = np.deg2rad([-40.0, 0.0, 40.0])
    fields = []
    for ang in angles:
        ca, sa = math.cos(ang), math.sin(ang)
        fpar = fx * ca + fy * sa
        fperp = -fx * sa + fy * ca
        f2 = (ratio * fpar) ** 2 + fperp**2 + f0**2
        fields.append(sfft.irfft2(spec * f2 ** (-beta / 4), s=shape, workers=2))
    rc, cc = shape
    yy = (np.arange(rc) * geo.kc + (geo.kc - 1) / 2).astype(np.float32)[:, None]
    xx = (np.arange(cc) * geo.kc + (geo.kc - 1) / 2).astype(np.float32)[None, :]
    psi = np.arctan2(geo.nipple[1] - yy, np.maximum(geo.nipple[0] - xx, 1.0))
    ws = [np.exp(-0.5 * ((psi - ang) / np.deg2rad(25.0)) ** 2) for ang in angles]
    norm = np.sqrt(sum(w**2 for w in ws)) + 1e-6
    z = sum(w * f for w, f in zip(ws, fields, strict=True)) / norm
    # Normalise by the variance the power law has on an unbounded field (analytic), not
    # by the sample: the fine-scale amplitude must not depend on the field size.
    fn = 1.0 / (2.0 * dc)
    var = (
        (dc * dc * math.pi / ratio)
        * (f0 ** (2.0 - beta) - (fn * fn + f0 * f0) ** (1.0 - beta / 2.0))
        / (beta / 2.0 - 1.0)
    )
    inside = geo.e_c > 0
    z = (z - z[inside].mean()) / math.sqrt(var)
    if lumpy_weight > 0:
        lump = _lumpy(rng, geo)
        z = math.sqrt(1 - lumpy_weight) * z + math.sqrt(lumpy_weight) * lump
    return z.astype(np.float32)


def _lumpy(rng: np.random.Generator, geo: _Geometry) -> NDArray[np.float32]:
    """Clustered lumpy background (Bochud 1999): Gaussian lumps around Poisson clusters."""
    shape = geo.e_c.shape
    dc = geo.kc * geo.spacing
    area_cm2 = shape[0] * shape[1] * dc * dc / 100.0
    n_clusters = max(1, int(rng.poisson(1.5 * area_cm2)))
    imp = np.zeros(shape, dtype=np.float32)
    cy = rng.uniform(0, shape[0], n_clusters)
    cx = rng.uniform(0, shape[1], n_clusters)
    spread = 4.0 / dc
    for y0, x0 in zip(cy, cx, strict=True):
        n = int(rng.poisson(12))
        ys = np.clip((y0 + rng.normal(0, spread, n)).astype(int), 0, shape[0] - 1)
        xs = np.clip((x0 + rng.normal(0, spread, n)).astype(int), 0, shape[1] - 1)
        np.add.at(imp, (ys, xs), 1.0)
    lump = ndimage.gaussian_filter(imp, (1.2 / dc, 2.0 / dc))
    inside = geo.e_c > 0
    return ((lump - lump[inside].mean()) / (lump[inside].std() + 1e-9)).astype(np.float32)


def _tissue_attenuation(geo: _Geometry, gland_c: NDArray[np.float32]) -> NDArray[np.float32]:
    """Full-resolution attenuation of breast tissue, skin and muscle (L frame)."""
    shape = (geo.rows, geo.cols)
    e = _upsample(geo.e_c, geo.kc, shape)
    w, t0, s = geo.band_mm, geo.t0_mm, SKIN_MM
    # Thickness: T = T0·√(1 − (r/R)²) over the outer band; r/R = (w − e)/w.
    q = np.clip((w - e) / w, 0.0, 1.0)
    T = t0 * np.sqrt(np.maximum(1.0 - q * q, 0.0))
    T[e <= 0] = 0.0
    qi = np.clip((w - e) / (w - s), 0.0, 1.0)
    T_in = (t0 - 2 * s) * np.sqrt(np.maximum(1.0 - qi * qi, 0.0))
    T_in[e <= s] = 0.0
    del e, q, qi
    g = _upsample(gland_c, geo.kc, shape)
    mu_mix = MU_ADIPOSE + (MU_GLANDULAR - MU_ADIPOSE) * g
    del g
    if geo.pect_c is not None:
        f = _upsample(geo.pect_c, geo.kc, shape)
        mu_mix += f * (MU_MUSCLE - mu_mix)
        del f
    A = T_in * mu_mix
    A += (T - T_in) * MU_SKIN
    A *= 0.1  # mm → cm
    return A.astype(np.float32, copy=False)


# --------------------------------------------------------------------------- objects
def _ellipsoid_thickness(
    dx: NDArray,
    dy: NDArray,
    a: float,
    b: float,
    c: float,
    rot: float,
    harm: Sequence[tuple[int, float, float]],
) -> NDArray:
    """Chord length (mm) through an irregular ellipsoid; dx, dy in mm from its centre."""
    ca, sa = math.cos(rot), math.sin(rot)
    u = (dx * ca + dy * sa) / a
    v = (-dx * sa + dy * ca) / b
    rho = np.hypot(u, v)
    if harm:
        th = np.arctan2(v, u)
        rs = np.ones_like(rho)
        for k, amp, ph in harm:
            rs += amp * np.cos(k * th + ph)
        rho = rho / rs
    return 2.0 * c * np.sqrt(np.maximum(1.0 - rho * rho, 0.0))


def _harmonics(
    rng: np.random.Generator, strength: float
) -> tuple[list[tuple[int, float, float]], float]:
    """Random radial harmonics (k = 2..5) and the largest radius factor they reach.

    Dividing a shape's semi-axes by the returned factor keeps its Feret diameter within
    the sampled size.
    """
    hs = [
        (k, float(rng.uniform(0, strength)) / math.sqrt(k - 1), float(rng.uniform(0, 6.28)))
        for k in (2, 3, 4, 5)
    ]
    return hs, 1.0 + sum(h[1] for h in hs)


def _segment_distance(
    dx: NDArray, dy: NDArray, x0: float, y0: float, x1: float, y1: float
) -> NDArray:
    vx, vy = x1 - x0, y1 - y0
    L2 = vx * vx + vy * vy + 1e-12
    t = np.clip(((dx - x0) * vx + (dy - y0) * vy) / L2, 0.0, 1.0)
    return np.hypot(dx - x0 - t * vx, dy - y0 - t * vy)


def _uc_thickness_fn(
    rng: np.random.Generator, diameter: float
) -> tuple[str, Callable[[NDArray, NDArray], NDArray]]:
    """Sample a µC shape of Feret diameter ``diameter`` (mm); return a chord function."""
    r = diameter / 2.0
    kind = str(rng.choice(["ellipsoid", "lobulated", "linear"], p=[0.45, 0.35, 0.20]))
    if kind == "ellipsoid":
        harm, grow = _harmonics(rng, 0.25)
        a = r / grow
        b = a / float(rng.uniform(1.0, 2.0))
        c = float(rng.uniform(b, a)) * grow
        rot = float(rng.uniform(0, np.pi))

        def fn(dx: NDArray, dy: NDArray) -> NDArray:
            return _ellipsoid_thickness(dx, dy, a, b, c, rot, harm)

        return kind, fn
    if kind == "lobulated":
        n = int(rng.integers(2, 4))
        lobes = []
        for _ in range(n):
            harm, grow = _harmonics(rng, 0.2)
            ar = r * float(rng.uniform(0.35, 0.6)) / grow
            br = ar / float(rng.uniform(1.0, 1.6))
            off = float(rng.uniform(0.2, 1.0)) * (r - ar * grow)
            ang = float(rng.uniform(0, 2 * np.pi))
            lobes.append(
                (
                    off * math.cos(ang),
                    off * math.sin(ang),
                    ar,
                    br,
                    float(rng.uniform(br, ar)),
                    float(rng.uniform(0, np.pi)),
                    harm,
                )
            )

        def fn(dx: NDArray, dy: NDArray) -> NDArray:
            out = np.zeros(np.broadcast_shapes(dx.shape, dy.shape), dtype=np.float32)
            for ox, oy, a, b, c, rot, harm in lobes:
                np.maximum(out, _ellipsoid_thickness(dx - ox, dy - oy, a, b, c, rot, harm), out=out)
            return out

        return kind, fn
    # Linear / branching: a beaded rod of length ≈ diameter, maybe with a branch.
    width = min(float(rng.uniform(0.08, 0.2)), 0.45 * diameter)
    rw = max(width / 2.0, 0.03)
    ang = float(rng.uniform(0, np.pi))
    half = r - rw
    segs = [
        (-half * math.cos(ang), -half * math.sin(ang), half * math.cos(ang), half * math.sin(ang))
    ]
    if rng.random() < 0.5:
        t = float(rng.uniform(-0.4, 0.4))
        bx, by = t * half * math.cos(ang), t * half * math.sin(ang)
        bang = ang + float(rng.choice([-1, 1])) * float(rng.uniform(0.45, 1.0))
        blen = float(rng.uniform(0.3, 0.55)) * diameter
        ex, ey = bx + blen * math.cos(bang), by + blen * math.sin(bang)
        norm = math.hypot(ex, ey)
        if norm > half:
            ex, ey = ex * half / norm, ey * half / norm
        segs.append((bx, by, ex, ey))
    bead_f = float(rng.uniform(2.0, 5.0)) / diameter
    bead_ph = float(rng.uniform(0, 6.28))

    def rod(dx: NDArray, dy: NDArray) -> NDArray:
        d = np.full(np.broadcast_shapes(dx.shape, dy.shape), np.inf, dtype=np.float32)
        for s in segs:
            np.minimum(d, _segment_distance(dx, dy, *s), out=d)
        rr = rw * (1.0 + 0.25 * np.sin(2 * np.pi * bead_f * (dx * 0.7 + dy * 0.7) + bead_ph))
        return 2.0 * np.sqrt(np.maximum(rr * rr - d * d, 0.0))

    return kind, rod


def _render_uc(
    rng: np.random.Generator, canvas: _Canvas, x: float, y: float, diameter: float, target: float
) -> PhantomCalcification | None:
    """Render one µC at (x, y) (L frame, pixels) into the canvas; return its truth."""
    p, sb = canvas.spacing, canvas.blur
    ss = 4
    kind, fn = _uc_thickness_fn(rng, diameter)
    h = math.ceil(diameter / 2 / p + 3 * sb + 2)
    r0, c0 = math.floor(y) - h, math.floor(x) - h
    n = 2 * h + 1
    ys, xs = _sub_grid(r0, c0, n, n, ss)
    t = fn((xs - x) * p, (ys - y) * p).astype(np.float32)  # chord, mm
    if not (t > 0).any():
        return None

    def contrast(mu: float) -> float:
        tr = _bin(np.exp(-0.1 * mu * t), ss)
        if sb > 0:
            tr = ndimage.gaussian_filter(tr, sb, mode="nearest")
        return float(1.0 - tr.min())

    mu, c = _solve_mu(contrast, target)
    canvas.add_patch(r0, c0, (0.1 * mu) * t, ss)
    wsum = float(t.sum())
    cy = float((t * ys).sum() / wsum)
    cx = float((t * xs).sum() / wsum)
    outline = _contour(t > 0, r0, c0, ss, max_points=24)
    return PhantomCalcification(cx, cy, diameter, c, kind, mu, None, outline)


def _arc_points(
    geo: _Geometry,
    x0: float,
    y0: float,
    heading: float,
    radius_px: float,
    turn: int,
    length_px: float,
    min_edge_mm: float,
) -> tuple[float, float, float, float, float] | None:
    """Circular arc from (x0, y0) heading ``heading``; truncated where it leaves the breast.

    Returns (centre x, centre y, start angle, signed sweep, radius) or None when too short.
    """
    cxp = x0 + turn * radius_px * math.cos(heading + math.pi / 2)
    cyp = y0 + turn * radius_px * math.sin(heading + math.pi / 2)
    phi0 = math.atan2(y0 - cyp, x0 - cxp)
    sweep = -turn * length_px / radius_px
    steps = max(int(length_px / 4), 4)
    ok = 0.0
    for i in range(1, steps + 1):
        ph = phi0 + sweep * i / steps
        px, py = cxp + radius_px * math.cos(ph), cyp + radius_px * math.sin(ph)
        if geo.edge_distance(px, py) < min_edge_mm or geo.in_muscle(px, py):
            break
        ok = sweep * i / steps
    if abs(ok) * radius_px < 0.25 * length_px:
        return None
    return cxp, cyp, phi0, ok, radius_px


def _render_arc(
    canvas: _Canvas,
    arc: tuple[float, float, float, float, float],
    halfwidth_px: float,
    profile: Callable[[NDArray, NDArray], NDArray],
    ss: int = 2,
    chunk_px: float = 120.0,
) -> None:
    """Render a profile ``f(d, s)`` (d: signed offset, s: arclength, both in pixels) along
    an arc, chunk by chunk so that only a band around the curve is evaluated."""
    cx, cy, phi0, sweep, R = arc
    length = abs(sweep) * R
    n_chunks = max(1, math.ceil(length / chunk_px))
    sign = 1.0 if sweep >= 0 else -1.0
    for i in range(n_chunks):
        pa = phi0 + sweep * i / n_chunks
        pb = phi0 + sweep * (i + 1) / n_chunks
        angs = np.linspace(pa, pb, 9)
        px = cx + R * np.cos(angs)
        py = cy + R * np.sin(angs)
        m = halfwidth_px + 2
        r0, r1 = math.floor(py.min() - m), math.ceil(py.max() + m)
        c0, c1 = math.floor(px.min() - m), math.ceil(px.max() + m)
        r0, c0 = max(r0, 0), max(c0, 0)
        r1, c1 = min(r1, canvas.A.shape[0]), min(c1, canvas.A.shape[1])
        if r1 <= r0 or c1 <= c0:
            continue
        ys, xs = _sub_grid(r0, c0, r1 - r0, c1 - c0, ss)
        dx, dy = xs - cx, ys - cy
        rr = np.hypot(dx, dy)
        phi = np.arctan2(dy, dx)
        # Angle travelled from the chunk start in the sweep direction.
        delta = np.mod(sign * (phi - pa), 2 * np.pi)
        span = abs(pb - pa)
        inside = delta <= span
        if not inside.any():
            continue
        s = (abs(pa - phi0) + delta) * R
        d = rr - R
        att = profile(d, s)
        att = np.where(inside & (np.abs(d) <= halfwidth_px), att, 0.0).astype(np.float32)
        if att.any():
            canvas.add_patch(r0, c0, att, ss)


def _intervals(
    rng: np.random.Generator,
    length_mm: float,
    on: tuple[float, float],
    off: tuple[float, float],
    duty_start: float,
) -> NDArray[np.float64]:
    out = []
    s = float(rng.uniform(0, duty_start))
    while s < length_mm:
        seg = float(rng.uniform(*on))
        out.append((s, min(s + seg, length_mm)))
        s += seg + float(rng.uniform(*off))
    return np.array(out, dtype=float).reshape(-1, 2)


def _render_vessel(
    rng: np.random.Generator,
    canvas: _Canvas,
    geo: _Geometry,
    flip: Callable[[float, float], tuple[float, float]],
) -> list[OtherFinding]:
    p, sb = canvas.spacing, canvas.blur
    for _ in range(20):
        x0, y0 = _random_point(rng, geo, min_edge_mm=6.0)
        heading = (
            math.atan2(geo.nipple[1] - y0, geo.nipple[0] - x0)
            + float(rng.normal(0, 0.6))
            + float(rng.choice([0, np.pi]))
        )
        radius = float(rng.uniform(25.0, 120.0)) / p
        length = float(rng.uniform(20.0, 80.0)) / p
        arc = _arc_points(geo, x0, y0, heading, radius, int(rng.choice([-1, 1])), length, 3.0)
        if arc is not None:
            break
    else:
        return []
    cx, cy, phi0, sweep, R = arc
    length_mm = abs(sweep) * R * p
    rv = float(rng.uniform(0.5, 1.5))  # vessel radius, mm (walls 1–3 mm apart)
    w = float(rng.uniform(0.1, 0.3))  # wall thickness, mm
    c_tube = float(rng.uniform(0.01, 0.03))
    mu_tube = -math.log(1 - c_tube) / (0.2 * rv)  # cm⁻¹, chord 2·rv mm
    target = _truncated_lognormal(rng, 0.10, 0.5, 0.04, 0.30)
    # 1-D solve of the wall μ: tangential chord of the shell, aperture + blur.
    step = p / 16
    dd = np.arange(-rv - 4 * p, rv + 4 * p, step)
    shell = 2 * (
        np.sqrt(np.maximum(rv**2 - dd**2, 0)) - np.sqrt(np.maximum((rv - w) ** 2 - dd**2, 0))
    )
    tube = 2 * np.sqrt(np.maximum(rv**2 - dd**2, 0))
    kernel = np.ones(16) / 16

    def contrast(mu: float) -> float:
        tr = np.exp(-0.1 * (mu * shell + mu_tube * tube))
        tr = np.convolve(tr, kernel, mode="same")
        if sb > 0:
            tr = ndimage.gaussian_filter1d(tr, sb * 16, mode="nearest")
        return float(1 - tr[64:-64].min())

    mu_wall, _ = _solve_mu(contrast, target)
    # Calcified stretches: a sub-range of the vessel, broken into 0.5–5 mm segments,
    # independently for the two walls.
    c_start = float(rng.uniform(0, 0.3)) * length_mm
    c_end = c_start + float(rng.uniform(0.4, 1.0)) * (length_mm - c_start)
    walls = []
    for _side in (-1, 1):
        iv = _intervals(rng, c_end - c_start, (0.5, 5.0), (0.3, 3.0), 1.0) + c_start
        walls.append(iv)
    wob_a = float(rng.uniform(0, 0.8)) / p
    wob_k = float(rng.uniform(1, 4)) * 2 * np.pi / max(abs(sweep) * R, 1)
    wob_ph = float(rng.uniform(0, 6.28))

    def calcified(s_mm: NDArray, iv: NDArray) -> NDArray:
        if len(iv) == 0:
            return np.zeros(s_mm.shape, dtype=bool)
        idx = np.searchsorted(iv[:, 0], s_mm, side="right") - 1
        ok = idx >= 0
        return ok & (s_mm < iv[np.clip(idx, 0, None), 1])

    def profile(d: NDArray, s: NDArray) -> NDArray:
        dm = (d - wob_a * np.sin(wob_k * s + wob_ph)) * p
        sm = s * p
        r2 = dm * dm
        outer = np.sqrt(np.maximum(rv * rv - r2, 0.0))
        inner = np.sqrt(np.maximum((rv - w) ** 2 - r2, 0.0))
        on = np.where(dm < 0, calcified(sm, walls[0]), calcified(sm, walls[1]))
        return 0.1 * (mu_tube * 2 * outer + mu_wall * 2 * (outer - inner) * on)

    _render_arc(canvas, arc, halfwidth_px=(rv + 0.9) / p + wob_a, profile=profile)
    found = []
    for side, iv in zip((-1, 1), walls, strict=True):
        off = side * (rv - w / 2)
        for s0, s1 in iv:
            n = max(2, int((s1 - s0) / 0.5) + 1)
            pts = []
            for sm in np.linspace(s0, s1, n):
                spx = sm / p
                ph = phi0 + math.copysign(spx / R, sweep)
                rad = R + wob_a * math.sin(wob_k * spx + wob_ph) + off / p
                pts.append(flip(cx + rad * math.cos(ph), cy + rad * math.sin(ph)))
            found.append(OtherFinding("vascular", tuple(pts), closed=False))
    return found


def _render_linear(rng: np.random.Generator, canvas: _Canvas, geo: _Geometry) -> None:
    p = canvas.spacing
    for _ in range(10):
        x0, y0 = _random_point(rng, geo, min_edge_mm=2.0)
        heading = (
            math.atan2(geo.nipple[1] - y0, geo.nipple[0] - x0)
            + float(rng.normal(0, 0.35))
            + float(rng.choice([0, np.pi]))
        )
        radius = float(rng.uniform(40.0, 300.0)) / p
        length = float(rng.uniform(20.0, 50.0)) / p
        arc = _arc_points(geo, x0, y0, heading, radius, int(rng.choice([-1, 1])), length, 1.0)
        if arc is not None:
            break
    else:
        return
    width = float(rng.uniform(0.1, 0.5))
    amp = -math.log(1 - float(rng.uniform(0.01, 0.03)))
    total = abs(arc[3]) * arc[4]

    def profile(d: NDArray, s: NDArray) -> NDArray:
        q = 2 * d * p / width
        taper = np.sqrt(np.clip(np.sin(np.pi * np.clip(s / total, 0, 1)), 0, 1))
        return amp * taper * np.sqrt(np.maximum(1 - q * q, 0.0))

    _render_arc(canvas, arc, halfwidth_px=width / 2 / p + 1, profile=profile)


def _render_macro(
    rng: np.random.Generator,
    canvas: _Canvas,
    x: float,
    y: float,
    flip: Callable[[float, float], tuple[float, float]],
) -> OtherFinding | None:
    p = canvas.spacing
    ss = 2
    kind = str(rng.choice(["popcorn", "rim", "lucent", "coarse"], p=[0.3, 0.25, 0.2, 0.25]))
    D = float(rng.uniform(1.2, 2.5)) if kind == "coarse" else float(rng.uniform(2.0, 5.0))
    R = D / 2
    h = math.ceil(R / p + 3)
    r0, c0 = math.floor(y) - h, math.floor(x) - h
    ys, xs = _sub_grid(r0, c0, 2 * h + 1, 2 * h + 1, ss)
    dx, dy = (xs - x) * p, (ys - y) * p
    mu = float(rng.uniform(8.0, 30.0))
    if kind in ("rim", "lucent"):
        wall = float(rng.uniform(0.1, 0.35)) if kind == "rim" else float(rng.uniform(0.35, 0.8))
        harm, _ = _harmonics(rng, 0.1)
        t_out = _ellipsoid_thickness(dx, dy, R, R * float(rng.uniform(0.85, 1.0)), R, 0.0, harm)
        rin = R - wall
        t_in = _ellipsoid_thickness(dx, dy, rin, rin * 0.9, rin, 0.0, harm)
        t = t_out - t_in
    elif kind == "popcorn":
        t = np.zeros(np.broadcast_shapes(dx.shape, dy.shape), dtype=np.float32)
        for _ in range(int(rng.integers(3, 8))):
            ar = float(rng.uniform(0.25, 0.45)) * R
            off = float(rng.uniform(0, 1)) * (R - ar)
            ang = float(rng.uniform(0, 2 * np.pi))
            harm, _ = _harmonics(rng, 0.25)
            np.maximum(
                t,
                _ellipsoid_thickness(
                    dx - off * math.cos(ang),
                    dy - off * math.sin(ang),
                    ar,
                    ar / float(rng.uniform(1, 1.7)),
                    ar,
                    float(rng.uniform(0, np.pi)),
                    harm,
                ),
                out=t,
            )
    else:
        harm, _ = _harmonics(rng, 0.3)
        t = _ellipsoid_thickness(
            dx, dy, R, R / float(rng.uniform(1.0, 1.5)), R * 0.8, float(rng.uniform(0, np.pi)), harm
        )
    t = t.astype(np.float32)
    if not (t > 0).any():
        return None
    canvas.add_patch(r0, c0, (0.1 * mu) * t, ss)
    outline = _contour(t > 0, r0, c0, ss, max_points=48)
    if outline is None:
        return None
    return OtherFinding("macro", tuple(flip(px, py) for px, py in outline), closed=True)


def _random_point(
    rng: np.random.Generator,
    geo: _Geometry,
    *,
    min_edge_mm: float,
    weights: NDArray[np.float32] | None = None,
    avoid_muscle: bool = True,
) -> tuple[float, float]:
    """A random L-frame point (pixels) at least ``min_edge_mm`` inside the skin."""
    ok = geo.e_c > min_edge_mm
    if geo.pect_c is not None and avoid_muscle:
        ok &= geo.pect_c <= 0.02
    # keep 1.5 mm away from the image border
    bc = math.ceil(1.5 / (geo.kc * geo.spacing))
    ok[:bc, :] = ok[-bc:, :] = False
    ok[:, -bc:] = False
    idx = np.flatnonzero(ok)
    if idx.size == 0:
        idx = np.flatnonzero(geo.e_c > 0)
    if weights is not None:
        w = weights.ravel()[idx].astype(np.float64) + 1e-6
        pick = int(rng.choice(idx, p=w / w.sum()))
    else:
        pick = int(idx[int(rng.integers(idx.size))])
    r, c = divmod(pick, geo.e_c.shape[1])
    return (c + float(rng.random())) * geo.kc - 0.5, (r + float(rng.random())) * geo.kc - 0.5


# --------------------------------------------------------------------------- display
def display_from_stored(
    pixels: NDArray,
    *,
    center: float,
    width: float,
    function: str,
    photometric: str,
    bits_stored: int,
) -> NDArray[np.float32]:
    """Apply the VOI function of the header and undo MONOCHROME1: [0, 1], tissue bright.

    Parameters
    ----------
    pixels : ndarray
        Stored values (rescale slope 1, intercept 0).
    center, width : float
        Window Center / Width in stored units.
    function : str
        ``"LINEAR"`` (PS3.3 C.11.2.1.2.1) or ``"SIGMOID"`` (C.11.2.1.3.1).
    photometric : str
        ``"MONOCHROME1"`` inverts the result.
    bits_stored : int
        Only checked for consistency (the output is already normalised).
    """
    if function not in ("LINEAR", "SIGMOID"):
        raise ValueError(f"function must be 'LINEAR' or 'SIGMOID', got {function!r}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1/2, got {photometric!r}")
    if width < 1:
        raise ValueError(f"width must be ≥ 1, got {width}")
    if bits_stored not in range(8, 17):
        raise ValueError(f"bits_stored must lie in 8..16, got {bits_stored}")
    x = pixels.astype(np.float32)
    if function == "LINEAR":
        out = np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    else:
        out = 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32)


# --------------------------------------------------------------------------- render
def render_image(
    rng: np.random.Generator,
    *,
    vendor: str,
    size: Size = "small",
    view: View = "CC",
    laterality: Laterality = "L",
    density: str | None = None,
    positive: bool | None = None,
    photometric: str | None = None,
    transfer_syntax: str | None = None,
) -> PhantomImage:
    """Render one phantom mammogram with its ground truth.

    Parameters
    ----------
    rng : numpy.random.Generator
        The only source of randomness: the same generator state gives the same image.
    vendor : str
        A key of :data:`VENDORS` (pixel spacing, blur, bit depth, VOI, photometric).
    size : {"small", "full"}
        ``"small"``: a 10 × 7 cm field (rows × columns); ``"full"``: the vendor's
        full-field detector (e.g. 4096 × 3328 at 70 µm, 5928 × 4728 at 50 µm).
    view : {"CC", "MLO"}
        MLO adds a pectoral muscle in the upper chest-wall corner.
    laterality : {"L", "R"}
        The chest wall is on the left of the stored image for L, on the right for R.
    density : str or None
        A key of :data:`DENSITIES`; sampled (10/40/40/10 %) when None.
    positive : bool or None
        Whether the image holds µCs; sampled (60 %) when None.
    photometric : str or None
        Force ``"MONOCHROME1"`` / ``"MONOCHROME2"``; sampled per vendor when None.
    transfer_syntax : str or None
        Transfer Syntax UID recorded for writing; explicit VR little endian when None.

    Returns
    -------
    PhantomImage
        Arrays of shape (rows, columns) and the truth in stored (x = column, y = row)
        coordinates.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if vendor not in VENDORS:
        raise ValueError(f"vendor must be one of {sorted(VENDORS)}, got {vendor!r}")
    if size not in ("small", "full"):
        raise ValueError(f"size must be 'small' or 'full', got {size!r}")
    if view not in ("CC", "MLO"):
        raise ValueError(f"view must be 'CC' or 'MLO', got {view!r}")
    if laterality not in ("L", "R"):
        raise ValueError(f"laterality must be 'L' or 'R', got {laterality!r}")
    if density is not None and density not in DENSITIES:
        raise ValueError(f"density must be one of {sorted(DENSITIES)}, got {density!r}")
    if photometric is not None and photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    if transfer_syntax is not None and transfer_syntax not in (
        ExplicitVRLittleEndian,
        JPEG2000Lossless,
    ):
        raise ValueError(
            "transfer_syntax must be explicit VR little endian or JPEG 2000 "
            f"lossless, got {transfer_syntax!r}"
        )
    prof = VENDORS[vendor]
    p = prof.spacing_mm
    if size == "small":
        rows, cols = round(SMALL_FIELD_MM[0] / p), round(SMALL_FIELD_MM[1] / p)
    else:
        rows, cols = prof.full_shape
    if density is None:
        names = list(DENSITIES)
        probs = np.array([DENSITIES[n].probability for n in names])
        density = str(rng.choice(names, p=probs / probs.sum()))
    dens = DENSITIES[density]
    if positive is None:
        positive = bool(rng.random() >= NEGATIVE_FRACTION)
    if photometric is None:
        photometric = (
            "MONOCHROME1" if rng.random() < prof.monochrome1_probability else "MONOCHROME2"
        )
    t0 = dens.thickness_mm * float(rng.uniform(0.85, 1.15))
    geo, params = _sample_geometry(rng, rows, cols, p, view, t0)
    beta_mean = 3.17 if view == "CC" else 3.30
    beta = float(np.clip(rng.normal(beta_mean, 0.24), 2.6, 3.5))
    ratio = float(rng.uniform(1.2, 1.5))
    lumpy_w = float(rng.uniform(0.0, LUMPY_MAX))
    z = _texture(rng, geo, beta, ratio, lumpy_w)
    s_g = float(rng.uniform(0.10, 0.18))
    # Glandular fraction: denser centrally, a subcutaneous fat layer near the skin.
    rho_c = np.clip(1.0 - geo.e_c / max(geo.e_c.max(), 1.0), 0, 1)
    fat_layer = float(rng.uniform(3.0, 10.0))
    env = np.clip(geo.e_c / fat_layer, 0, 1) ** 1.5
    gbar = dens.mean_glandular * (1.3 - 0.6 * rho_c**2)
    # Soft threshold: fat lobules with fairly sharp borders (two-phase tissue; sharp
    # interfaces keep a ≈ f^-3 spectrum, Porod's law) mixed with the smooth projection.
    gamma = float(rng.uniform(0.8, 2.0))
    zt = np.tanh(gamma * z)
    zt /= zt.std() + 1e-9
    zeta = (1.0 - THRESHOLD_WEIGHT) * z + THRESHOLD_WEIGHT * zt
    zeta /= zeta.std() + 1e-9
    # Soft floor at 0 (softplus): fat still carries a little projected gland texture.
    g_lin = gbar + s_g * zeta
    soft = 0.03
    g_pos = soft * np.logaddexp(0.0, g_lin / soft)
    gland_c = (np.clip(g_pos, 0.0, 1.0) * env).astype(np.float32)
    params.update(compression_n=float(rng.uniform(60.0, 160.0)))
    params.update(
        beta=beta,
        anisotropy=ratio,
        lumpy_weight=lumpy_w,
        texture_scale=s_g,
        thickness_mm=t0,
        mean_glandular=dens.mean_glandular,
    )

    canvas = _Canvas(_tissue_attenuation(geo, gland_c), p, prof.blur_sigma_px)

    def flip(x: float, y: float) -> tuple[float, float]:
        return ((cols - 1 - x) if laterality == "R" else x, y)

    # Confounders first (µCs must not sit on a macro-calcification).
    for _ in range(int(rng.integers(*LINEAR_COUNT))):
        _render_linear(rng, canvas, geo)
    others: list[OtherFinding] = []
    if rng.random() < VASCULAR_FRACTION:
        for _ in range(1 if rng.random() < 0.75 else 2):
            others.extend(_render_vessel(rng, canvas, geo, flip))
    macro_centres: list[tuple[float, float, float]] = []
    for _ in range(int(rng.choice([0, 1, 2], p=[0.55, 0.30, 0.15]))):
        mx, my = _random_point(rng, geo, min_edge_mm=5.0)
        found = _render_macro(rng, canvas, mx, my, flip)
        if found is not None:
            others.append(found)
            macro_centres.append((mx, my, 3.5 / p))

    calcs: list[PhantomCalcification] = []
    clusters: list[tuple[tuple[float, float], ...]] = []
    if positive:
        calcs, clusters = _render_calcifications(rng, canvas, geo, gland_c, macro_centres, flip)
    artefacts = _render_dust(rng, canvas, flip)

    # Detector: blur, quantum + electronic noise, hot pixels.
    A = canvas.A
    # Automatic exposure control: the quanta behind the breast interior are what the
    # recipe fixes (1000–3000 per 70-µm pixel); air gets exp(A_ref) times more.
    k0 = (geo.kc - 1) // 2
    a_c = A[k0 :: geo.kc, k0 :: geo.kc]
    e_c = geo.e_c[: a_c.shape[0], : a_c.shape[1]]
    interior = e_c > geo.band_mm
    if not interior.any():
        interior = e_c > 0
    a_ref = float(np.median(a_c[interior]))
    quanta70 = float(rng.uniform(1000.0, 3000.0))
    n_ref = quanta70 * (p / 0.070) ** 2
    n0 = n_ref * math.exp(a_ref)
    np.negative(A, out=A)
    np.exp(A, out=A)
    A *= n0
    S = A
    if prof.blur_sigma_px > 0:
        S = ndimage.gaussian_filter(S, prof.blur_sigma_px, mode="nearest", truncate=3.0)
    sigma_e = 0.003 * n_ref
    noise = rng.standard_normal(S.shape, dtype=np.float32)
    noise *= np.sqrt(S + sigma_e * sigma_e)
    S += noise
    del noise
    for hx, hy, kind in artefacts:  # L frame, like S
        if kind.startswith("hot"):
            S[round(hy), round(hx)] *= 0.15 if kind == "hot-bright" else 4.0
    np.maximum(S, 1.0, out=S)
    S *= 1.0 / n0
    np.log(S, out=S)
    np.negative(S, out=S)
    P = S  # −ln(S/S0), float32
    params.update(quanta_per_70um_pixel=quanta70, air_quanta=n0)

    mask = _upsample(geo.e_c, geo.kc, (rows, cols)) > 0
    muscle = None
    if geo.pect_c is not None:
        muscle = (_upsample(geo.pect_c, geo.kc, (rows, cols)) > 0.02) & mask
    if laterality == "R":
        P = np.ascontiguousarray(P[:, ::-1])
        mask = np.ascontiguousarray(mask[:, ::-1])
        if muscle is not None:
            muscle = np.ascontiguousarray(muscle[:, ::-1])

    shown = _vendor_processing(rng, P, mask, p, params)
    pixels, display, center, width, voi = _to_stored(rng, shown, mask, prof, photometric)
    del shown
    return PhantomImage(
        pixels=pixels,
        display=display,
        log_image=P,
        breast_mask=mask,
        muscle_mask=muscle,
        spacing_mm=p,
        vendor=prof,
        view=view,
        laterality=laterality,
        density=density,
        photometric=photometric,
        voi_function=voi,
        window_center=center,
        window_width=width,
        bits_stored=prof.bits_stored,
        transfer_syntax=transfer_syntax or ExplicitVRLittleEndian,
        calcifications=tuple(calcs),
        clusters=tuple(clusters),
        others=tuple(others),
        artefacts=tuple((*flip(x, y), k) for x, y, k in artefacts),
        size=size,
        params=params,
    )


def _render_calcifications(
    rng: np.random.Generator,
    canvas: _Canvas,
    geo: _Geometry,
    gland_c: NDArray[np.float32],
    macro: list[tuple[float, float, float]],
    flip: Callable[[float, float], tuple[float, float]],
) -> tuple[list[PhantomCalcification], list[tuple[tuple[float, float], ...]]]:
    from scipy.spatial import ConvexHull, QhullError

    p = canvas.spacing
    med = float(rng.uniform(*DIAMETER_MEDIAN_RANGE))
    placed: list[tuple[float, float, float]] = []  # x, y (px, L frame), diameter

    def free(x: float, y: float, dia: float) -> bool:
        if geo.edge_distance(x, y) < 3.0 or geo.in_muscle(x, y):
            return False
        if not (1.0 / p <= y < geo.rows - 1.0 / p and 1.0 / p <= x < geo.cols - 1.0 / p):
            return False
        for mx, my, mr in macro:
            if math.hypot(x - mx, y - my) < mr + dia / p:
                return False
        for px, py, pd in placed:
            if math.hypot(x - px, y - py) * p < max(0.3, 0.5 * (dia + pd)):
                return False
        return True

    out: list[PhantomCalcification] = []
    hulls: list[tuple[tuple[float, float], ...]] = []
    n_clusters = int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))
    for _ in range(n_clusters):
        cx, cy = _random_point(rng, geo, min_edge_mm=8.0, weights=gland_c + 0.05)
        sigma = float(rng.uniform(1.5, 3.0)) / p
        n = round(math.exp(rng.uniform(math.log(5), math.log(30))))
        members: list[PhantomCalcification] = []
        tries = 0
        while len(members) < n and tries < 40 * n:
            tries += 1
            x = cx + float(rng.normal(0, sigma))
            y = cy + float(rng.normal(0, sigma))
            dia = _truncated_lognormal(rng, med, DIAMETER_SIGMA_LN, *DIAMETER_RANGE)
            if not free(x, y, dia):
                continue
            target = _uc_contrast(rng, dia)
            uc = _render_uc(rng, canvas, x, y, dia, target)
            if uc is None:
                continue
            placed.append((x, y, dia))
            members.append(uc)
        if len(members) < 3:
            out.extend(members)
            continue
        k = len(hulls)
        pts = np.array([flip(m.x, m.y) for m in members])
        try:
            hull = ConvexHull(pts)
            hull_pts = tuple((float(pts[i, 0]), float(pts[i, 1])) for i in hull.vertices)
        except QhullError:
            hull_pts = tuple((float(a), float(b)) for a, b in pts)
        hulls.append(hull_pts)
        out.extend(_with_cluster(m, k) for m in members)
    for _ in range(int(rng.integers(0, 4))):
        for _attempt in range(20):
            x, y = _random_point(rng, geo, min_edge_mm=4.0)
            dia = _truncated_lognormal(rng, med, DIAMETER_SIGMA_LN, *DIAMETER_RANGE)
            if free(x, y, dia):
                target = _uc_contrast(rng, dia)
                uc = _render_uc(rng, canvas, x, y, dia, target)
                if uc is not None:
                    placed.append((x, y, dia))
                    out.append(uc)
                break
    # Truth in the stored (flipped) frame.
    final = []
    for c in out:
        fx, fy = flip(c.x, c.y)
        outline = None if c.outline is None else tuple(flip(a, b) for a, b in c.outline)
        final.append(
            PhantomCalcification(
                fx, fy, c.diameter_mm, c.peak_contrast, c.shape, c.mu_cm, c.cluster, outline
            )
        )
    return final, hulls


def _with_cluster(c: PhantomCalcification, k: int) -> PhantomCalcification:
    return PhantomCalcification(
        c.x, c.y, c.diameter_mm, c.peak_contrast, c.shape, c.mu_cm, k, c.outline
    )


def _render_dust(
    rng: np.random.Generator, canvas: _Canvas, flip: Callable[[float, float], tuple[float, float]]
) -> list[tuple[float, float, str]]:
    """0–3 hot pixels / dust specks; returned in the L frame (flipped by the caller)."""
    p = canvas.spacing
    R, C = canvas.A.shape
    found: list[tuple[float, float, str]] = []
    for _ in range(int(rng.choice(4, p=[0.5, 0.3, 0.15, 0.05]))):
        x, y = float(rng.uniform(5, C - 5)), float(rng.uniform(5, R - 5))
        if rng.random() < 0.5:
            found.append(
                (
                    float(round(x)),
                    float(round(y)),
                    "hot-bright" if rng.random() < 0.6 else "hot-dark",
                )
            )
            continue
        ss = 4
        d = float(rng.uniform(0.05, 0.3))
        h = math.ceil(d / p) + 2
        r0, c0 = int(y) - h, int(x) - h
        ys, xs = _sub_grid(r0, c0, 2 * h + 1, 2 * h + 1, ss)
        harm, _ = _harmonics(rng, 0.4)
        t = _ellipsoid_thickness(
            (xs - x) * p,
            (ys - y) * p,
            d / 2,
            d / 2 / rng.uniform(1, 2),
            1.0,
            float(rng.uniform(0, np.pi)),
            harm,
        )
        strength = -math.log(1 - float(rng.uniform(0.1, 0.4)))
        canvas.add_patch(r0, c0, (strength * (t > 0)).astype(np.float32), ss)
        found.append((x, y, "dust"))
    return found


def _vendor_processing(
    rng: np.random.Generator,
    P: NDArray[np.float32],
    mask: NDArray[np.bool_],
    p: float,
    params: dict[str, Any],
) -> NDArray[np.float32]:
    """For Presentation processing in the log domain: peripheral (thickness) equalisation
    and a mild unsharp mask, both from one ≈ 0.25-mm low-pass image."""
    kb = max(1, round(0.25 / p))
    r, c = P.shape[0] // kb * kb, P.shape[1] // kb * kb
    Pc = P[:r, :c].reshape(r // kb, kb, c // kb, kb).mean(axis=(1, 3))
    mc = mask[:r, :c].reshape(r // kb, kb, c // kb, kb).mean(axis=(1, 3), dtype=np.float32)
    dc = kb * p

    def smooth(sigma_mm: float) -> NDArray[np.float32]:
        num = ndimage.gaussian_filter(Pc * mc, sigma_mm / dc, mode="nearest")
        den = ndimage.gaussian_filter(mc, sigma_mm / dc, mode="nearest")
        return (num / np.maximum(den, 1e-3)).astype(np.float32)

    alpha = float(rng.uniform(0.5, 0.85))
    k_us = float(rng.uniform(0.0, 0.6))
    sig_us = float(rng.uniform(1.5, 3.0))
    big = smooth(8.0)
    inner = (mc > 0.99) & (ndimage.binary_erosion(mc > 0.5, iterations=max(1, round(15 / dc))))
    ref = float(np.median(big[inner])) if inner.any() else float(np.median(big[mc > 0.5]))
    corr = alpha * np.maximum(ref - big, 0.0) - k_us * smooth(sig_us)
    corr = np.pad(
        corr,
        ((0, -(-P.shape[0] // kb) - corr.shape[0]), (0, -(-P.shape[1] // kb) - corr.shape[1])),
        mode="edge",
    )
    up = _upsample(corr.astype(np.float32), kb, P.shape)
    out = P * (1.0 + k_us) + up
    out = np.where(mask, out, P)
    params.update(equalisation=alpha, unsharp_amount=k_us, unsharp_sigma_mm=sig_us)
    return out.astype(np.float32, copy=False)


def _to_stored(
    rng: np.random.Generator,
    P: NDArray[np.float32],
    mask: NDArray[np.bool_],
    prof: VendorProfile,
    photometric: str,
) -> tuple[NDArray[np.uint16], NDArray[np.float32], float, float, str]:
    """Window the log image into stored values and compute the display image."""
    step = max(1, int(math.sqrt(P.size / 2e6)))
    sample = P[::step, ::step][mask[::step, ::step]]
    if sample.size < 100:
        sample = P.ravel()
    lo, med, hi = (float(v) for v in np.percentile(sample, [0.5, 50.0, 99.5]))
    hi = max(hi, lo + 1e-3)
    maxv = (1 << prof.bits_stored) - 1
    voi = prof.voi_function
    span = hi - lo
    if voi == "LINEAR":
        pa = lo - float(rng.uniform(0.02, 0.25)) * span
        pb = hi + float(rng.uniform(0.02, 0.25)) * span
    else:
        pa = min(0.0, lo - 0.3 * span)
        pb = hi + float(rng.uniform(0.1, 0.3)) * span
    scale = maxv / (pb - pa)
    v = (P - pa) * scale
    np.clip(v, 0, maxv, out=v)
    np.rint(v, out=v)
    stored = v.astype(np.uint16)
    del v
    s_lo, s_med, s_hi = ((q - pa) * scale for q in (lo, med, hi))
    if voi == "LINEAR":
        width = float(round(s_hi - s_lo + 1))
        center = float(round(0.5 * (s_lo + s_hi) + 0.5))
    else:
        width = float(round(s_hi - s_lo))
        center = float(round(s_med))
    if photometric == "MONOCHROME1":
        np.subtract(maxv, stored, out=stored)
        center = float(maxv - center + 1) if voi == "LINEAR" else float(maxv - center)
    display = display_from_stored(
        stored,
        center=center,
        width=width,
        function=voi,
        photometric=photometric,
        bits_stored=prof.bits_stored,
    )
    return stored, display, center, width, voi


# --------------------------------------------------------------------------- DICOM
def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def phantom_to_dataset(
    image: PhantomImage,
    *,
    study: PhantomStudy,
    series_instance_uid: str,
    sop_instance_uid: str,
    instance_number: int = 1,
    series_number: int = 1,
) -> Dataset:
    """Build a Digital Mammography X-Ray Image – For Presentation dataset.

    The dataset passes ``dciodvfy`` without errors (a warning on ViewPosition CC / MLO is
    expected). When ``image.transfer_syntax`` is JPEG 2000 lossless the pixel data are
    compressed (pylibjpeg-openjpeg), otherwise stored explicit VR little endian.

    Parameters
    ----------
    image : PhantomImage
        The rendered image.
    study : PhantomStudy
        Patient and study attributes shared with the other images of the study.
    series_instance_uid, sop_instance_uid : str
        UIDs of the image's series and of the image.
    instance_number, series_number : int
        Positive integers.
    """
    if not isinstance(image, PhantomImage):
        raise TypeError(f"image must be a PhantomImage, got {type(image).__name__}")
    if not isinstance(study, PhantomStudy):
        raise TypeError(f"study must be a PhantomStudy, got {type(study).__name__}")
    for name, uid in (
        ("series_instance_uid", series_instance_uid),
        ("sop_instance_uid", sop_instance_uid),
    ):
        if not uid or not pydicom.uid.UID(uid).is_valid:
            raise ValueError(f"{name} is not a valid UID: {uid!r}")
    if instance_number < 1 or series_number < 1:
        raise ValueError("instance_number and series_number must be positive")
    prof = image.vendor
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.UID(MG_FOR_PRESENTATION)
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(sop_instance_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = "CALCNODE_" + __version__.replace(".", "")[:6]

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.InstanceCreationDate = study.study_date
    ds.InstanceCreationTime = study.study_time
    ds.SOPClassUID = MG_FOR_PRESENTATION
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study.study_date
    ds.StudyTime = ds.SeriesTime = study.study_time
    ds.AcquisitionTime = ds.ContentTime = study.study_time
    ds.AccessionNumber = study.accession_number
    ds.Modality = "MG"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = prof.manufacturer
    ds.InstitutionName = "calcnode phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "MG screening (synthetic phantom)"
    ds.SeriesDescription = f"{image.laterality} {image.view}"
    ds.ManufacturerModelName = prof.model
    ds.DeviceSerialNumber = "PHANTOM"
    ds.SoftwareVersions = f"calcnode phantom {__version__}"

    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.patient_birth_date
    ds.PatientSex = "F"
    ds.PatientAge = study.patient_age

    ds.BodyPartExamined = "BREAST"
    ds.BodyPartThickness = f"{image.params.get('thickness_mm', 50.0):.0f}"
    ds.CompressionForce = f"{float(image.params.get('compression_n', 100.0)):.0f}"
    ds.KVP = f"{26 + (float(image.params.get('thickness_mm', 50.0)) - 40) / 6:.0f}"
    ds.DistanceSourceToDetector = f"{prof.sid_mm:.0f}"
    ds.ExposureTime = "1200"
    ds.XRayTubeCurrent = "100"
    ds.Exposure = "120"
    ds.ImagerPixelSpacing = [f"{image.spacing_mm:.3f}", f"{image.spacing_mm:.3f}"]
    ds.AnodeTargetMaterial = prof.anode
    ds.FilterMaterial = prof.filter
    ds.ViewPosition = image.view
    ds.DetectorType = prof.detector_type
    ds.PositionerType = "MAMMOGRAPHIC"

    ds.StudyInstanceUID = study.study_instance_uid
    ds.SeriesInstanceUID = series_instance_uid
    ds.StudyID = study.study_id
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = _PATIENT_ORIENTATION[(image.laterality, image.view)]
    ds.ImageLaterality = image.laterality
    ds.ImageComments = "Synthetic phantom rendered by calcnode; not a patient image."

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = image.photometric
    ds.Rows, ds.Columns = image.rows, image.columns
    ds.PixelSpacing = [f"{image.spacing_mm:.3f}", f"{image.spacing_mm:.3f}"]
    ds.BitsAllocated = 16
    ds.BitsStored = image.bits_stored
    ds.HighBit = image.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.QualityControlImage = "NO"
    ds.BurnedInAnnotation = "NO"
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = -1 if image.photometric == "MONOCHROME2" else 1
    ds.WindowCenter = f"{image.window_center:.1f}"
    ds.WindowWidth = f"{image.window_width:.1f}"
    ds.WindowCenterWidthExplanation = "BREAST"
    ds.VOILUTFunction = image.voi_function
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY" if image.photometric == "MONOCHROME2" else "INVERSE"

    ds.ViewCodeSequence = DicomSequence([_code(*_VIEW_CODES[image.view])])
    ds.ViewCodeSequence[0].ViewModifierCodeSequence = DicomSequence([])
    ds.AnatomicRegionSequence = DicomSequence([_code("76752008", "SCT", "Breast")])
    ds.OrganExposed = "BREAST"
    ds.BreastImplantPresent = "NO"
    ds.PartialView = "NO"
    ds.AcquisitionContextSequence = DicomSequence([])
    ds.PixelData = np.ascontiguousarray(image.pixels, dtype="<u2").tobytes()
    if image.transfer_syntax == JPEG2000Lossless:
        # pydicom would give the compressed instance a new random SOP Instance UID by
        # default: the manifest and determinism need the one we generated.
        ds.compress(
            JPEG2000Lossless,
            np.ascontiguousarray(image.pixels),
            encoding_plugin="pylibjpeg",
            generate_instance_uid=False,
        )
    return ds


# --------------------------------------------------------------------------- datasets
def _study_plan(rng: np.random.Generator, count: int) -> list[list[tuple[str, str]]]:
    """Split ``count`` images into studies of 2–4 (laterality, view) pairs."""
    all_views = [("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")]
    studies: list[list[tuple[str, str]]] = []
    left = count
    while left > 0:
        k = int(rng.choice([2, 3, 4], p=[0.25, 0.15, 0.60]))
        k = min(k, left)
        if left - k == 1:
            k = k + 1 if k < 4 else k - 1
        if k >= 4:
            views = list(all_views)
        elif k == 3:
            idx = sorted(rng.choice(4, size=3, replace=False).tolist())
            views = [all_views[i] for i in idx]
        elif k == 2:
            lat = str(rng.choice(["L", "R"]))
            views = (
                [(lat, "CC"), (lat, "MLO")] if rng.random() < 0.6 else [("L", "CC"), ("R", "CC")]
            )
        else:
            views = [all_views[int(rng.integers(4))]]
        studies.append(views)
        left -= k
    return studies


def _uid(seed: int, *parts: object) -> str:
    return str(generate_uid(entropy_srcs=["calcnode-phantom", str(seed), *map(str, parts)]))


def _preview(image: PhantomImage, path: Path) -> None:
    from PIL import Image, ImageDraw

    disp = image.display
    factor = max(1, math.ceil(max(disp.shape) / 1600))
    if factor > 1:
        r, c = disp.shape[0] // factor * factor, disp.shape[1] // factor * factor
        disp = disp[:r, :c].reshape(r // factor, factor, c // factor, factor).mean(axis=(1, 3))
    u8 = (np.clip(disp, 0, 1) * 255 + 0.5).astype(np.uint8)
    im = Image.fromarray(u8, mode="L").convert("RGB")
    draw = ImageDraw.Draw(im)

    def xy(x: float, y: float) -> tuple[float, float]:
        return ((x + 0.5) / factor - 0.5, (y + 0.5) / factor - 0.5)

    for o in image.others:
        pts = [xy(x, y) for x, y in o.points]
        colour = (255, 140, 0) if o.kind == "vascular" else (255, 60, 200)
        if len(pts) == 1:
            x, y = pts[0]
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), outline=colour)
        else:
            draw.line(pts + ([pts[0]] if o.closed else []), fill=colour, width=1)
    for hull in image.clusters:
        pts = [xy(x, y) for x, y in hull]
        if len(pts) >= 2:
            draw.line([*pts, pts[0]], fill=(230, 210, 0), width=1)
    for c in image.calcifications:
        x, y = xy(c.x, c.y)
        rad = max(c.diameter_mm / image.spacing_mm / factor / 2 + 4, 5)
        draw.ellipse((x - rad, y - rad, x + rad, y + rad), outline=(0, 255, 0))
    draw.text(
        (6, 6),
        f"{image.vendor.name} {image.laterality}{image.view} {image.density} "
        f"{len(image.calcifications)} uC  green=uC orange=vascular magenta=macro",
        fill=(255, 255, 0),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def generate_dataset(
    out: str | Path,
    *,
    count: int,
    seed: int,
    size: Size = "small",
    vendors: Sequence[str] | None = None,
    preview: bool = False,
    progress: bool = True,
) -> Path:
    """Render ``count`` phantom images as MG studies on disk, with a manifest.

    Images are grouped in studies of 2–4 views (L/R × CC/MLO) sharing patient, study and
    vendor; files are ``out/sNNNN/<lat>-<view>.dcm``; the manifest ``out/manifest.jsonl``
    holds the truth in stored-grid coordinates (x = column, y = row, 0-based, first
    pixel's centre at (0, 0)). With ``preview=True`` PNGs go under ``out/previews/``
    (µCs circled green, vascular orange, macro magenta, cluster hulls yellow).

    Parameters
    ----------
    out : str or Path
        Output folder (created).
    count : int
        Number of images, ≥ 1.
    seed : int
        Seed, ≥ 0: the same seed gives identical pixel data and UIDs.
    size : {"small", "full"}
        Field size, see :func:`render_image`.
    vendors : sequence of str or None
        Draw each study's vendor profile from these (names of ``VENDORS``); None: all
        of them. A held-out set can so cover every vendor whatever its seed.
    preview : bool
        Also write preview PNGs.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    Path
        The manifest path.
    """
    from tqdm import tqdm

    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if size not in ("small", "full"):
        raise ValueError(f"size must be 'small' or 'full', got {size!r}")
    if vendors is None:
        vendor_names = sorted(VENDORS)
    else:
        vendor_names = sorted(set(vendors))
        unknown = [v for v in vendor_names if v not in VENDORS]
        if unknown or not vendor_names:
            raise ValueError(
                f"vendors must be a non-empty subset of {sorted(VENDORS)}, got {list(vendors)!r}"
            )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan_rng = np.random.default_rng([seed, 0])
    plan = _study_plan(plan_rng, count)
    records: list[ImageRecord] = []
    bar = tqdm(total=count, desc="phantom", unit="img", disable=not progress)
    base_date = _dt.date(2023, 1, 2)
    try:
        for si, views in enumerate(plan):
            srng = np.random.default_rng([seed, 1, si])
            vendor = vendor_names[int(srng.integers(len(vendor_names)))]
            names = list(DENSITIES)
            probs = np.array([DENSITIES[n].probability for n in names])
            density = str(srng.choice(names, p=probs / probs.sum()))
            prof = VENDORS[vendor]
            ts = (
                JPEG2000Lossless
                if srng.random() < prof.jpeg2000_probability
                else (ExplicitVRLittleEndian)
            )
            photometric = (
                "MONOCHROME1" if srng.random() < prof.monochrome1_probability else "MONOCHROME2"
            )
            date = base_date + _dt.timedelta(days=int(srng.integers(0, 730)))
            age = int(srng.integers(40, 76))
            birth = _dt.date(date.year - age, int(srng.integers(1, 13)), int(srng.integers(1, 29)))
            hh, mm, sec = (
                int(srng.integers(7, 18)),
                int(srng.integers(0, 60)),
                int(srng.integers(0, 60)),
            )
            study = PhantomStudy(
                patient_name=f"PHANTOM^{si + 1:04d}",
                patient_id=f"PH{seed}-{si + 1:04d}",
                patient_birth_date=birth.strftime("%Y%m%d"),
                patient_age=f"{age:03d}Y",
                study_instance_uid=_uid(seed, "study", si),
                study_date=date.strftime("%Y%m%d"),
                study_time=f"{hh:02d}{mm:02d}{sec:02d}",
                accession_number=f"A{seed % 10000:04d}{si + 1:05d}",
                study_id=f"{si + 1}",
            )
            folder = out / f"s{si + 1:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            for vi, (lat, view) in enumerate(views):
                irng = np.random.default_rng([seed, 2, si, vi])
                image = render_image(
                    irng,
                    vendor=vendor,
                    size=size,
                    view=view,  # type: ignore[arg-type]
                    laterality=lat,  # type: ignore[arg-type]
                    density=density,
                    photometric=photometric,
                    transfer_syntax=ts,
                )
                sop = _uid(seed, "image", si, vi)
                ds = phantom_to_dataset(
                    image,
                    study=study,
                    series_instance_uid=_uid(seed, "series", si, vi),
                    sop_instance_uid=sop,
                    instance_number=1,
                    series_number=vi + 1,
                )
                path = folder / f"{lat}-{view}.dcm"
                ds.save_as(path, enforce_file_format=True)
                logger.debug("wrote %s (%s, %d µCs)", sop, vendor, len(image.calcifications))
                records.append(_record(image, path, sop, study.study_instance_uid))
                if preview:
                    _preview(image, out / "previews" / f"s{si + 1:04d}" / f"{lat}-{view}.png")
                bar.update(1)
    finally:
        bar.close()
    manifest = write_manifest(out / "manifest.jsonl", records)
    logger.info("wrote %d phantom images in %d studies to %s", count, len(plan), out)
    return manifest


def _record(image: PhantomImage, path: Path, sop: str, study_uid: str) -> ImageRecord:
    return ImageRecord(
        path=path,
        sop_instance_uid=sop,
        rows=image.rows,
        columns=image.columns,
        pixel_spacing_mm=image.pixel_spacing_mm,
        calcifications=tuple(
            Calcification(x=c.x, y=c.y, diameter_mm=c.diameter_mm, outline=c.outline)
            for c in image.calcifications
        ),
        others=image.others,
        clusters=image.clusters,
        study_instance_uid=study_uid,
        tags=image.tags,
    )
