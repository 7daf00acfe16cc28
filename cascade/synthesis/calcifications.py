"""Microcalcifications (≤ 1 mm): the truth a detector must find.

Sizes and peak contrasts follow the phantom profile (:mod:`.profiles`; log-normal in the
standard one); shapes are irregular ellipsoids, lobulated unions, linear rods, branching
casts or pleomorphic fragment groups; each µC's effective μ is solved so that its post-blur
peak contrast hits the sampled target. µCs are placed in 1–3 Gaussian clusters (convex
hulls recorded) plus a few isolated ones, away from the skin, the pectoral muscle and
macro-calcifications.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from cascade.synthesis.anatomy import _Geometry, _random_point
from cascade.synthesis.profiles import PROFILES, PhantomProfile
from cascade.synthesis.raster import (
    _bin,
    _Canvas,
    _contour,
    _ellipsoid_thickness,
    _harmonics,
    _segment_distance,
    _sub_grid,
)
from cascade.synthesis.results import PhantomCalcification

#: Upper bound of a calcification's effective μ (hydroxyapatite minus tissue, ≈ 20 keV).
MU_CALC_MAX = 40.0
MU_CALC_MIN = 1.0

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


def _truncated_lognormal(
    rng: np.random.Generator, median: float, sigma: float, lo: float, hi: float
) -> float:
    for _ in range(100):
        v = float(median * math.exp(sigma * rng.standard_normal()))
        if lo <= v <= hi:
            return v
    return float(min(max(median, lo), hi))


def _uc_contrast(
    rng: np.random.Generator,
    diameter_mm: float,
    profile: PhantomProfile | None = None,
    bounds: tuple[float, float] = CONTRAST_RANGE,
) -> float:
    """Target post-blur peak contrast of a µC: log-normal, larger for larger µCs, truncated.

    Without a profile, the standard distribution (the module constants).
    """
    if profile is None:
        base = _truncated_lognormal(rng, CONTRAST_MEDIAN, CONTRAST_SIGMA_LN, 0.0, math.inf)
        scaled = base * (diameter_mm / 0.28) ** CONTRAST_SIZE_EXPONENT
        return float(np.clip(scaled, *CONTRAST_RANGE))
    base = _truncated_lognormal(
        rng, profile.contrast_median, profile.contrast_sigma_ln, 0.0, math.inf
    )
    scaled = base * (diameter_mm / 0.28) ** profile.contrast_size_exponent
    return float(np.clip(scaled, *bounds))


def _uc_diameter(rng: np.random.Generator, profile: PhantomProfile, median: float) -> float:
    """A µC's diameter (mm): the profile's law, truncated to 0.1–1 mm."""
    if profile.diameter_law == "loguniform":
        lo, hi = DIAMETER_RANGE
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    return _truncated_lognormal(rng, median, profile.diameter_sigma_ln, *DIAMETER_RANGE)


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


def _uc_thickness_fn(
    rng: np.random.Generator, diameter: float, profile: PhantomProfile | None = None
) -> tuple[str, Callable[[NDArray, NDArray], NDArray]]:
    """Sample a µC shape of Feret diameter ``diameter`` (mm); return a chord function."""
    profile = PROFILES["standard"] if profile is None else profile
    r = diameter / 2.0
    kinds = [k for k, _ in profile.shape_probabilities]
    probs = [q for _, q in profile.shape_probabilities]
    kind = str(rng.choice(kinds, p=probs))
    if kind == "branching":
        return kind, _branching_fn(rng, diameter)
    if kind == "pleomorphic":
        return kind, _pleomorphic_fn(rng, diameter)
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
    if rng.random() < profile.linear_branch_probability:
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


def _fit_segments(
    segs: list[tuple[float, float, float, float]], half: float
) -> list[tuple[float, float, float, float]]:
    """Centre segments on their bounding box and scale them into a disc of radius ``half``."""
    pts = np.array([(s[0], s[1]) for s in segs] + [(s[2], s[3]) for s in segs])
    mid = 0.5 * (pts.min(axis=0) + pts.max(axis=0))
    ext = float(np.hypot(*(pts - mid).T).max())
    k = half / ext if ext > 1e-9 else 1.0
    mx, my = float(mid[0]), float(mid[1])
    return [((a - mx) * k, (b - my) * k, (c - mx) * k, (d - my) * k) for a, b, c, d in segs]


def _branching_fn(
    rng: np.random.Generator, diameter: float
) -> Callable[[NDArray, NDArray], NDArray]:
    """A branching cast: a trunk forking in a Y, maybe one more branch; Feret ≤ diameter."""
    width = min(float(rng.uniform(0.07, 0.18)), 0.4 * diameter)
    rw = max(width / 2.0, 0.03)
    ang = float(rng.uniform(0, 2 * np.pi))
    trunk = float(rng.uniform(0.4, 0.6)) * diameter
    segs = [(0.0, 0.0, trunk * math.cos(ang), trunk * math.sin(ang))]
    radii = [rw]
    tips = [(segs[0][2], segs[0][3], ang)]
    # A Y fork at the trunk's tip (two branches either side), then 0–1 more branches.
    side = float(rng.choice([-1, 1]))
    for i in range(2 + int(rng.integers(0, 2))):
        bx, by, bang0 = tips[0] if i < 2 else tips[int(rng.integers(1, len(tips)))]
        sgn = side * (1 if i == 0 else -1) if i < 2 else float(rng.choice([-1, 1]))
        bang = bang0 + sgn * float(rng.uniform(0.35, 0.9))
        blen = float(rng.uniform(0.25, 0.5)) * diameter
        ex, ey = bx + blen * math.cos(bang), by + blen * math.sin(bang)
        segs.append((bx, by, ex, ey))
        radii.append(rw * float(rng.uniform(0.6, 0.9)))
        tips.append((ex, ey, bang))
    segs = _fit_segments(segs, diameter / 2.0 - rw)
    bead_f = float(rng.uniform(2.0, 5.0)) / diameter
    bead_ph = float(rng.uniform(0, 6.28))

    def fn(dx: NDArray, dy: NDArray) -> NDArray:
        shape = np.broadcast_shapes(dx.shape, dy.shape)
        out = np.zeros(shape, dtype=np.float32)
        mod = 1.0 + 0.25 * np.sin(2 * np.pi * bead_f * (dx * 0.7 - dy * 0.7) + bead_ph)
        for s, rr0 in zip(segs, radii, strict=True):
            d = _segment_distance(dx, dy, *s)
            rr = rr0 * mod
            np.maximum(out, 2.0 * np.sqrt(np.maximum(rr * rr - d * d, 0.0)), out=out)
        return out

    return fn


def _pleomorphic_fn(
    rng: np.random.Generator, diameter: float
) -> Callable[[NDArray, NDArray], NDArray]:
    """A pleomorphic µC: 3–6 irregular fragments of unequal size and density, touching."""
    n = int(rng.integers(3, 7))
    frags: list[tuple[float, float, float, float, float, float, float, list]] = []
    x = y = 0.0
    for i in range(n):
        harm, grow = _harmonics(rng, 0.4)
        a = diameter * float(rng.uniform(0.12, 0.3)) / grow
        b = a / float(rng.uniform(1.0, 2.5))
        c = float(rng.uniform(0.5, 1.2)) * b
        if i:
            step = float(rng.uniform(0.6, 1.1)) * (a + frags[-1][2]) * 0.8
            th = float(rng.uniform(0, 2 * np.pi))
            x, y = frags[-1][0] + step * math.cos(th), frags[-1][1] + step * math.sin(th)
        frags.append((x, y, a * grow, a, b, c, float(rng.uniform(0, np.pi)), harm))
    cx = sum(f[0] for f in frags) / n
    cy = sum(f[1] for f in frags) / n
    ext = max(math.hypot(f[0] - cx, f[1] - cy) + f[2] for f in frags)
    k = min(1.0, diameter / 2.0 / ext)
    placed = [
        ((fx - cx) * k, (fy - cy) * k, a * k, b * k, c * k, rot, harm)
        for fx, fy, _, a, b, c, rot, harm in frags
    ]

    def fn(dx: NDArray, dy: NDArray) -> NDArray:
        out = np.zeros(np.broadcast_shapes(dx.shape, dy.shape), dtype=np.float32)
        for ox, oy, a, b, c, rot, harm in placed:
            np.maximum(out, _ellipsoid_thickness(dx - ox, dy - oy, a, b, c, rot, harm), out=out)
        return out

    return fn


def _render_uc(
    rng: np.random.Generator,
    canvas: _Canvas,
    x: float,
    y: float,
    diameter: float,
    target: float,
    profile: PhantomProfile | None = None,
) -> PhantomCalcification | None:
    """Render one µC at (x, y) (L frame, pixels) into the canvas; return its truth."""
    p, sb = canvas.spacing, canvas.blur
    ss = 4
    kind, fn = _uc_thickness_fn(rng, diameter, profile)
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


def _render_calcifications(
    rng: np.random.Generator,
    canvas: _Canvas,
    geo: _Geometry,
    gland_c: NDArray[np.float32],
    macro: list[tuple[float, float, float]],
    flip: Callable[[float, float], tuple[float, float]],
    profile: PhantomProfile | None = None,
) -> tuple[list[PhantomCalcification], list[tuple[tuple[float, float], ...]]]:
    from scipy.spatial import ConvexHull, QhullError

    prof = PROFILES["standard"] if profile is None else profile
    p = canvas.spacing
    med = float(rng.uniform(*prof.diameter_median_range))
    bounds = prof.contrast_bounds(p)

    def draw(x: float, y: float, dia: float) -> PhantomCalcification | None:
        if prof.is_standard:  # the original draws, in the original order
            return _render_uc(rng, canvas, x, y, dia, _uc_contrast(rng, dia))
        return _render_uc(rng, canvas, x, y, dia, _uc_contrast(rng, dia, prof, bounds), prof)

    if prof.is_standard:
        weights = gland_c + 0.05
    else:
        weights = gland_c**prof.cluster_density_power + prof.cluster_density_offset
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
        cx, cy = _random_point(rng, geo, min_edge_mm=8.0, weights=weights)
        sigma = float(rng.uniform(1.5, 3.0)) / p
        n = round(math.exp(rng.uniform(math.log(5), math.log(30))))
        members: list[PhantomCalcification] = []
        tries = 0
        while len(members) < n and tries < 40 * n:
            tries += 1
            x = cx + float(rng.normal(0, sigma))
            y = cy + float(rng.normal(0, sigma))
            dia = _uc_diameter(rng, prof, med)
            if not free(x, y, dia):
                continue
            uc = draw(x, y, dia)
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
            dia = _uc_diameter(rng, prof, med)
            if free(x, y, dia):
                uc = draw(x, y, dia)
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
