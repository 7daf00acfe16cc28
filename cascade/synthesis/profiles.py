"""Phantom profiles: the distributions a data set's µCs, tissue and detector are drawn from.

``"standard"`` is the phantom as it was before profiles existed: the same seed renders
bit-identical images. ``"wide"`` is the harder, wider training distribution (µC contrast
down to the vendor's quantum-noise floor, sizes log-uniform over 0.1–1 mm, branching and
pleomorphic shapes, clusters in dense tissue, half the images normal, detector blur and
noise varied per image). ``"subtle"`` is the validation / test distribution:
lower-contrast, mostly small µCs, clusters under dense tissue, denser breasts;
``"faint"`` is a stress set of the same shapes near the quantum-noise floor (see
``docs/phantom.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: The µC shapes a profile may draw.
SHAPES = ("ellipsoid", "lobulated", "linear", "branching", "pleomorphic")
DIAMETER_LAWS = ("lognormal", "loguniform")


@dataclass(frozen=True)
class PhantomProfile:
    """The sampling distributions of one kind of phantom data set.

    Parameters
    ----------
    name : str
        Key in :data:`PROFILES`, recorded in the manifest's ``tags["profile"]``.
    negative_fraction : float
        Share of images without any µC, in [0, 1).
    density_probabilities : tuple of 4 float
        Chance of fatty / scattered / heterogeneous / dense breasts (normalised).
    diameter_law : {"lognormal", "loguniform"}
        ``"lognormal"``: median drawn per image from ``diameter_median_range``, σ_ln
        ``diameter_sigma_ln``; ``"loguniform"``: uniform in ln d. Both truncated to 0.1–1 mm.
    diameter_median_range : (float, float)
        Per-image median diameter (mm) of the log-normal law.
    diameter_sigma_ln : float
        σ of ln d for the log-normal law.
    contrast_median, contrast_sigma_ln : float
        Log-normal target peak contrast (after aperture and blur) of a 0.28-mm µC.
    contrast_size_exponent : float
        The target grows as ``(d / 0.28 mm)^k``.
    contrast_range : (float, float)
        Truncation of the target contrast.
    contrast_floor_noise : float or None
        If set, the lower truncation is ``max(contrast_range[0], k·σ_px)``, with σ_px the
        relative quantum noise of one pixel at the profile's typical exposure for the
        vendor's pixel size (≈ 1–2 % contrast for k = 0.6): the quantum-noise floor.
    shape_probabilities : tuple of (str, float)
        Shapes (from :data:`SHAPES`) and their chances.
    linear_branch_probability : float
        Chance that a ``"linear"`` rod gets one side branch.
    cluster_density_power, cluster_density_offset : float
        Cluster centres are drawn with weight ``g^power + offset`` (g = glandular
        fraction): the larger the power, the more clusters sit in dense tissue.
    quanta_range : (float, float)
        Quanta per 70-µm pixel behind the breast interior (uniform).
    electronic_noise_range : (float, float) or None
        Electronic noise as a fraction of the reference quanta (uniform); None: 0.3 %.
    blur_jitter : (float, float) or None
        Per-image factor on the vendor's blur σ (uniform); None: the vendor's σ exactly.
    correlated_scintillator_noise : bool
        Scintillator (CsI) detectors spread the quantum noise with the light: the noise is
        low-pass filtered (variance kept), as a-Se noise is not.
    """

    name: str
    negative_fraction: float
    density_probabilities: tuple[float, float, float, float]
    diameter_law: str
    diameter_median_range: tuple[float, float]
    diameter_sigma_ln: float
    contrast_median: float
    contrast_sigma_ln: float
    contrast_size_exponent: float
    contrast_range: tuple[float, float]
    contrast_floor_noise: float | None
    shape_probabilities: tuple[tuple[str, float], ...]
    linear_branch_probability: float
    cluster_density_power: float
    cluster_density_offset: float
    quanta_range: tuple[float, float]
    electronic_noise_range: tuple[float, float] | None
    blur_jitter: tuple[float, float] | None
    correlated_scintillator_noise: bool

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("PhantomProfile.name must not be empty")
        if not 0.0 <= self.negative_fraction < 1.0:
            raise ValueError(f"negative_fraction must be in [0, 1), got {self.negative_fraction}")
        if len(self.density_probabilities) != 4 or min(self.density_probabilities) < 0:
            raise ValueError("density_probabilities must be 4 non-negative numbers")
        if self.diameter_law not in DIAMETER_LAWS:
            raise ValueError(f"diameter_law must be one of {DIAMETER_LAWS}")
        lo, hi = self.contrast_range
        if not 0.0 < lo < hi <= 0.5:
            raise ValueError(f"contrast_range must satisfy 0 < lo < hi <= 0.5, got {lo, hi}")
        kinds = [k for k, _ in self.shape_probabilities]
        if not kinds or any(k not in SHAPES for k in kinds) or len(set(kinds)) != len(kinds):
            raise ValueError(f"shape_probabilities must name distinct shapes of {SHAPES}")
        if abs(sum(p for _, p in self.shape_probabilities) - 1.0) > 1e-9:
            raise ValueError("shape_probabilities must sum to 1")
        qlo, qhi = self.quanta_range
        if not 0 < qlo <= qhi:
            raise ValueError(f"quanta_range must satisfy 0 < lo <= hi, got {qlo, qhi}")

    @property
    def is_standard(self) -> bool:
        """True for the original phantom (the code paths that keep old renders identical)."""
        return self.name == "standard"

    def noise_sigma(self, spacing_mm: float) -> float:
        """Relative quantum noise σ/S of one pixel at the typical exposure (geometric mean)."""
        q = math.sqrt(self.quanta_range[0] * self.quanta_range[1])
        return 1.0 / math.sqrt(q * (spacing_mm / 0.070) ** 2)

    def contrast_bounds(self, spacing_mm: float) -> tuple[float, float]:
        """Truncation of a µC's target contrast on a detector of this pixel spacing."""
        lo, hi = self.contrast_range
        if self.contrast_floor_noise is not None:
            lo = max(lo, self.contrast_floor_noise * self.noise_sigma(spacing_mm))
        return lo, min(max(hi, lo * 1.5), 0.5)

    def draw_positive(self, rng: np.random.Generator) -> bool:
        """Whether an image holds µCs (one uniform draw)."""
        return bool(rng.random() >= self.negative_fraction)


_STANDARD_SHAPES = (("ellipsoid", 0.45), ("lobulated", 0.35), ("linear", 0.20))

PROFILES: dict[str, PhantomProfile] = {
    "standard": PhantomProfile(
        name="standard",
        negative_fraction=0.4,
        density_probabilities=(0.10, 0.40, 0.40, 0.10),
        diameter_law="lognormal",
        diameter_median_range=(0.25, 0.30),
        diameter_sigma_ln=0.5,
        contrast_median=0.15,
        contrast_sigma_ln=0.55,
        contrast_size_exponent=0.5,
        contrast_range=(0.03, 0.25),
        contrast_floor_noise=None,
        shape_probabilities=_STANDARD_SHAPES,
        linear_branch_probability=0.5,
        cluster_density_power=1.0,
        cluster_density_offset=0.05,
        quanta_range=(1000.0, 3000.0),
        electronic_noise_range=None,
        blur_jitter=None,
        correlated_scintillator_noise=False,
    ),
    "wide": PhantomProfile(
        name="wide",
        negative_fraction=0.5,
        density_probabilities=(0.10, 0.30, 0.35, 0.25),
        diameter_law="loguniform",
        diameter_median_range=(0.25, 0.30),
        diameter_sigma_ln=0.5,
        contrast_median=0.07,
        contrast_sigma_ln=0.8,
        contrast_size_exponent=0.25,
        contrast_range=(0.01, 0.25),
        contrast_floor_noise=0.6,
        shape_probabilities=(
            ("ellipsoid", 0.30),
            ("lobulated", 0.22),
            ("linear", 0.13),
            ("branching", 0.15),
            ("pleomorphic", 0.20),
        ),
        linear_branch_probability=0.0,
        cluster_density_power=2.0,
        cluster_density_offset=0.01,
        quanta_range=(700.0, 3500.0),
        electronic_noise_range=(0.002, 0.008),
        blur_jitter=(0.85, 1.25),
        correlated_scintillator_noise=True,
    ),
    # Calibrated (2026-12-04) so that the cascade bundled then recalls about as many µCs
    # here as on the independent low-contrast set of issue 15 (R@1 ≈ 0.5); "faint" keeps
    # the first, much fainter calibration (median 3.5 %) as a stress set.
    "subtle": PhantomProfile(
        name="subtle",
        negative_fraction=0.5,
        density_probabilities=(0.05, 0.25, 0.40, 0.30),
        diameter_law="lognormal",
        diameter_median_range=(0.18, 0.24),
        diameter_sigma_ln=0.6,
        contrast_median=0.12,
        contrast_sigma_ln=0.5,
        contrast_size_exponent=0.4,
        contrast_range=(0.01, 0.25),
        contrast_floor_noise=0.6,
        shape_probabilities=(
            ("ellipsoid", 0.35),
            ("lobulated", 0.20),
            ("linear", 0.10),
            ("branching", 0.15),
            ("pleomorphic", 0.20),
        ),
        linear_branch_probability=0.0,
        cluster_density_power=3.0,
        cluster_density_offset=0.002,
        quanta_range=(1000.0, 3000.0),
        electronic_noise_range=(0.002, 0.006),
        blur_jitter=(0.9, 1.2),
        correlated_scintillator_noise=True,
    ),
    "faint": PhantomProfile(
        name="faint",
        negative_fraction=0.5,
        density_probabilities=(0.05, 0.25, 0.40, 0.30),
        diameter_law="lognormal",
        diameter_median_range=(0.18, 0.24),
        diameter_sigma_ln=0.6,
        contrast_median=0.035,
        contrast_sigma_ln=0.45,
        contrast_size_exponent=0.2,
        contrast_range=(0.01, 0.10),
        contrast_floor_noise=0.6,
        shape_probabilities=(
            ("ellipsoid", 0.35),
            ("lobulated", 0.20),
            ("linear", 0.10),
            ("branching", 0.15),
            ("pleomorphic", 0.20),
        ),
        linear_branch_probability=0.0,
        cluster_density_power=3.0,
        cluster_density_offset=0.002,
        quanta_range=(1000.0, 3000.0),
        electronic_noise_range=(0.002, 0.006),
        blur_jitter=(0.9, 1.2),
        correlated_scintillator_noise=True,
    ),
}
