"""Breast tissue: power-law and lumpy texture, glandular fraction, attenuation.

An anisotropic power-law field (``P(f) ∝ 1/f^β``, oriented toward the nipple) plus a
clustered lumpy component is mapped to a glandular fraction ``g``; with the thickness
profile and the skin shell it gives the tissue's attenuation line integral
``T·[(1−g)·μa + g·μg]``.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray
from scipy import fft as sfft
from scipy import ndimage

from cascade.synthesis.anatomy import _Geometry, _upsample

# Linear attenuation coefficients at ≈ 20 keV, cm⁻¹ (recipe; VICTRE / Hammerstein).
MU_ADIPOSE = 0.46
MU_GLANDULAR = 0.80
MU_SKIN = 0.80
MU_MUSCLE = 0.85
#: Thickness of the skin shell (mm).
SKIN_MM = 0.75

#: The power law flattens for periods longer than this (mm): structure up to breast size.
TEXTURE_LOWEST_PERIOD_MM = 150.0
#: Weight of the soft-thresholded (two-phase) part of the tissue field.
THRESHOLD_WEIGHT = 0.2
#: Largest weight of the clustered lumpy component in the tissue field.
LUMPY_MAX = 0.3


def _glandular_fraction(
    rng: np.random.Generator, geo: _Geometry, view: str, mean_glandular: float
) -> tuple[NDArray[np.float32], dict[str, float]]:
    """Sample the tissue texture and map it to a glandular fraction on the coarse grid.

    Parameters
    ----------
    rng : numpy.random.Generator
        The image's generator (drawn from in a fixed order).
    geo : _Geometry
        The breast geometry (coarse grid, skin distance, nipple).
    view : str
        ``"CC"`` or ``"MLO"``: the mean power-law exponent β differs.
    mean_glandular : float
        The density class's mean glandular fraction.

    Returns
    -------
    gland_c : ndarray of float32
        Glandular fraction in [0, 1] on the coarse grid.
    params : dict
        The sampled texture parameters (β, anisotropy, lumpy weight, texture scale).
    """
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
    gbar = mean_glandular * (1.3 - 0.6 * rho_c**2)
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
    texture = {"beta": beta, "anisotropy": ratio, "lumpy_weight": lumpy_w, "texture_scale": s_g}
    return gland_c, texture


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
