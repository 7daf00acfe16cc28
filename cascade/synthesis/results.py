"""What the renderer returns: a phantom image with its truth, and the study attributes.

Coordinates are in the **stored** pixel grid: ``x`` = column, ``y`` = row, 0-based, the
centre of the first pixel at ``(0, 0)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom.uid import JPEG2000Lossless

from cascade.data.manifest import OtherFinding
from cascade.synthesis.vendors import VendorProfile


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
        ``"ellipsoid"``, ``"lobulated"``, ``"linear"``, ``"branching"`` or
        ``"pleomorphic"`` (the last two only in the "wide", "subtle" and "faint" profiles).
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
    profile : str
        The phantom profile that drew the image (``"standard"``, ``"wide"``, ``"subtle"``,
        ``"faint"``).
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
    profile: str = "standard"

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
            "profile": self.profile,
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
