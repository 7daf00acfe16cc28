"""The detector: exposure, blur, Poisson and electronic noise, hot pixels, log.

The transmitted quanta ``S = N0·exp(−A)`` are blurred with the vendor's Gaussian
(pixel-aperture binning is done when objects are rasterised), get Poisson noise in the
Gaussian approximation (N ≫ 10) plus electronic noise, hot pixels are applied, and the
result is log-transformed to ``P = −ln(S/S0)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from cascade.synthesis.anatomy import _Geometry
from cascade.synthesis.profiles import PhantomProfile
from cascade.synthesis.raster import _Canvas


def _expose(
    rng: np.random.Generator,
    canvas: _Canvas,
    geo: _Geometry,
    artefacts: Sequence[tuple[float, float, str]],
    params: dict[str, Any],
    profile: PhantomProfile | None = None,
    *,
    scintillator: bool = False,
) -> NDArray[np.float32]:
    """Expose the detector: quanta, blur, quantum and electronic noise, hot pixels, log.

    The canvas's array is reused in place (the attenuation is gone afterwards).

    Parameters
    ----------
    rng : numpy.random.Generator
        The image's generator.
    canvas : _Canvas
        Attenuation line integral (L frame); consumed.
    geo : _Geometry
        The breast geometry (interior for the exposure reference).
    artefacts : sequence of (x, y, kind)
        Hot pixels (``"hot-bright"`` / ``"hot-dark"``) in the L frame; others ignored.
    params : dict
        Updated with the quanta drawn.
    profile : PhantomProfile or None
        Quanta and electronic-noise ranges, correlated scintillator noise; None or the
        standard profile: the original draws (1000–3000 quanta, 0.3 % electronic noise).
    scintillator : bool
        The detector is a scintillator (CsI): with a profile that asks for it, the
        quantum noise is spread like the light (low-pass, same per-pixel variance).

    Returns
    -------
    ndarray of float32
        ``P = −ln(S/S0)`` after noise, L frame.
    """
    p = canvas.spacing
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
    standard = profile is None or profile.is_standard
    if standard:
        quanta70 = float(rng.uniform(1000.0, 3000.0))
        e_frac = 0.003
    else:
        assert profile is not None
        quanta70 = float(rng.uniform(*profile.quanta_range))
        e_frac = (
            0.003
            if profile.electronic_noise_range is None
            else float(rng.uniform(*profile.electronic_noise_range))
        )
    n_ref = quanta70 * (p / 0.070) ** 2
    n0 = n_ref * math.exp(a_ref)
    np.negative(A, out=A)
    np.exp(A, out=A)
    A *= n0
    S = A
    if canvas.blur > 0:
        S = ndimage.gaussian_filter(S, canvas.blur, mode="nearest", truncate=3.0)
    sigma_e = e_frac * n_ref
    noise = rng.standard_normal(S.shape, dtype=np.float32)
    correlated = (
        not standard
        and profile is not None
        and profile.correlated_scintillator_noise
        and scintillator
        and canvas.blur > 0
    )
    if correlated:
        noise = ndimage.gaussian_filter(noise, 0.6 * canvas.blur, mode="nearest", truncate=3.0)
        noise *= np.float32(1.0 / (float(noise.std()) + 1e-12))
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
    if not standard:
        params.update(electronic_noise=e_frac, correlated_noise=correlated)
    return P
