"""Confounders: what looks like a µC or a cluster but is not one.

Vascular calcifications (tram-track walls broken into segments along a faint vessel),
macro-calcifications (popcorn, rim, lucent-centred, coarse; > 1 mm), linear structures
(ligaments, ducts) and dust specks / hot pixels. Vascular walls and macro outlines are
recorded as :class:`~cascade.data.manifest.OtherFinding`; dust and hot pixels are
artefacts outside the manifest (a detection there is a false positive).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from cascade.data.manifest import OtherFinding
from cascade.synthesis.anatomy import _Geometry, _random_point
from cascade.synthesis.calcifications import _solve_mu, _truncated_lognormal
from cascade.synthesis.raster import _Canvas, _contour, _ellipsoid_thickness, _harmonics, _sub_grid

#: Number of linear structures (ligaments, ducts) per image: [low, high).
LINEAR_COUNT = (8, 21)
#: Fraction of images with vascular calcifications (one vessel, a quarter of them two).
VASCULAR_FRACTION = 0.25


def _render_confounders(
    rng: np.random.Generator,
    canvas: _Canvas,
    geo: _Geometry,
    flip: Callable[[float, float], tuple[float, float]],
) -> tuple[list[OtherFinding], list[tuple[float, float, float]]]:
    """Render linear structures, vascular calcifications and macro-calcifications.

    Parameters
    ----------
    rng : numpy.random.Generator
        The image's generator.
    canvas : _Canvas
        Attenuation canvas (L frame), modified in place.
    geo : _Geometry
        The breast geometry.
    flip : callable
        Maps an L-frame point (pixels) to the stored frame.

    Returns
    -------
    others : list of OtherFinding
        Vascular wall segments and macro outlines, stored frame.
    macro_centres : list of (x, y, radius)
        Macro-calcifications to keep µCs away from (L frame, pixels).
    """
    p = canvas.spacing
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
    return others, macro_centres


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
