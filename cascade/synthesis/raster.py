"""Sub-pixel rasterisation of objects into the attenuation canvas.

Objects are line integrals of extra attenuation rendered in local patches at 2× or 4×
the pixel grid and binned back (the pixel aperture); chord-length primitives give the
thickness of ellipsoids and rods, and outlines come from the sub-pixel masks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray


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
