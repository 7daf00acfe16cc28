"""Breast anatomy: density classes, the outline, thickness band and pectoral muscle.

The breast is a half-ellipse on the chest wall with an irregular outline and a nipple
bump; the signed distance to the skin and the MLO pectoral muscle live on a coarse grid
(:data:`TEXTURE_GRID_MM`) in the L frame (chest wall on the left).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

#: Grid of the tissue texture and geometry maps (mm); upsampled linearly to the pixels.
TEXTURE_GRID_MM = 0.2


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
