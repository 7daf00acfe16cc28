"""Render one phantom mammogram: the pipeline from geometry to stored pixels.

Geometry and density, tissue, confounders, µCs and dust are accumulated as attenuation in
the L frame (chest wall on the left); the detector exposes it, right breasts are flipped,
and the log image is processed and stored the vendor's way (see ``docs/phantom.md``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from cascade.synthesis.anatomy import DENSITIES, _sample_geometry, _upsample
from cascade.synthesis.calcifications import NEGATIVE_FRACTION, _render_calcifications
from cascade.synthesis.confounders import _render_confounders, _render_dust
from cascade.synthesis.detector import _expose
from cascade.synthesis.presentation import _to_stored, _vendor_processing
from cascade.synthesis.profiles import PROFILES
from cascade.synthesis.raster import _Canvas
from cascade.synthesis.results import PhantomCalcification, PhantomImage
from cascade.synthesis.tissue import _glandular_fraction, _tissue_attenuation
from cascade.synthesis.vendors import VENDORS

Size = Literal["small", "full"]
View = Literal["CC", "MLO"]
Laterality = Literal["L", "R"]

SMALL_FIELD_MM = (100.0, 70.0)  # rows (height) × columns (width)


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
    profile: str = "standard",
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
        A key of :data:`DENSITIES`; sampled when None (10/40/40/10 % in the standard
        profile, the profile's ``density_probabilities`` otherwise).
    positive : bool or None
        Whether the image holds µCs; sampled when None (60 % in the standard profile,
        50 % in "wide", "subtle" and "faint").
    photometric : str or None
        Force ``"MONOCHROME1"`` / ``"MONOCHROME2"``; sampled per vendor when None.
    transfer_syntax : str or None
        Transfer Syntax UID recorded for writing; explicit VR little endian when None.
    profile : str
        A key of :data:`~cascade.synthesis.profiles.PROFILES`: the distributions of µCs,
        density and detector noise. ``"standard"`` renders exactly what the phantom did
        before profiles existed; ``"wide"`` (training) and ``"subtle"`` (validation) are
        harder (see ``docs/phantom.md``).

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
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {profile!r}")
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
    phantom = PROFILES[profile]
    if density is None:
        density = _draw_density(rng, profile)
    dens = DENSITIES[density]
    if positive is None:
        if phantom.is_standard:
            positive = bool(rng.random() >= NEGATIVE_FRACTION)
        else:
            positive = phantom.draw_positive(rng)
    if photometric is None:
        photometric = (
            "MONOCHROME1" if rng.random() < prof.monochrome1_probability else "MONOCHROME2"
        )
    t0 = dens.thickness_mm * float(rng.uniform(0.85, 1.15))
    geo, params = _sample_geometry(rng, rows, cols, p, view, t0)
    gland_c, texture = _glandular_fraction(rng, geo, view, dens.mean_glandular)
    params.update(compression_n=float(rng.uniform(60.0, 160.0)))
    params.update(**texture, thickness_mm=t0, mean_glandular=dens.mean_glandular)

    blur = prof.blur_sigma_px
    if not phantom.is_standard and phantom.blur_jitter is not None:
        blur *= float(rng.uniform(*phantom.blur_jitter))
        params.update(blur_sigma_px=blur)
    canvas = _Canvas(_tissue_attenuation(geo, gland_c), p, blur)

    def flip(x: float, y: float) -> tuple[float, float]:
        return ((cols - 1 - x) if laterality == "R" else x, y)

    # Confounders first (µCs must not sit on a macro-calcification).
    others, macro_centres = _render_confounders(rng, canvas, geo, flip)

    calcs: list[PhantomCalcification] = []
    clusters: list[tuple[tuple[float, float], ...]] = []
    if positive:
        calcs, clusters = _render_calcifications(
            rng, canvas, geo, gland_c, macro_centres, flip, phantom
        )
    artefacts = _render_dust(rng, canvas, flip)

    # Detector: blur, quantum + electronic noise, hot pixels.
    P = _expose(
        rng,
        canvas,
        geo,
        artefacts,
        params,
        phantom,
        scintillator=prof.detector_type == "SCINTILLATOR",
    )

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
        profile=profile,
    )


def _draw_density(rng: np.random.Generator, profile: str) -> str:
    """A density class drawn the profile's way (one ``rng.choice``)."""
    names = list(DENSITIES)
    if PROFILES[profile].is_standard:
        probs = np.array([DENSITIES[n].probability for n in names])
    else:
        probs = np.array(PROFILES[profile].density_probabilities)
    return str(rng.choice(names, p=probs / probs.sum()))
