"""For Presentation processing, storage as uint16 and the viewer's display mapping.

Peripheral equalisation and mild unsharp masking in the log domain, windowing to the
breast's 0.5–99.5 percentiles into BitsStored 12 / 14 (MONOCHROME1 inverted), the VOI
window (LINEAR or SIGMOID) and :func:`display_from_stored`, what a conformant viewer
shows.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from cascade.synthesis.anatomy import _upsample
from cascade.synthesis.vendors import VendorProfile


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
