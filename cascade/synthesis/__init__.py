"""Physics phantom mammograms with ground truth (see ``docs/phantom.md``).

The renderer works in the linear (raw) domain — breast geometry (:mod:`.anatomy`),
tissue texture and attenuation (:mod:`.tissue`), µCs (:mod:`.calcifications`) and
confounders (:mod:`.confounders`) rasterised at sub-pixel resolution (:mod:`.raster`),
then the detector (:mod:`.detector`) and the vendor's For Presentation processing
(:mod:`.presentation`, profiles in :mod:`.vendors`). Coordinates are in the stored pixel
grid: ``x`` = column, ``y`` = row, 0-based, the centre of the first pixel at ``(0, 0)``.

Entry points: :func:`render_image` (arrays and truth, no DICOM), :func:`phantom_to_dataset`
(an MG For Presentation dataset) and :func:`generate_dataset` (studies on disk with a
manifest and optional previews). Each takes a keyword-only ``profile`` (:data:`PROFILES`):
``"standard"`` (the default, unchanged renders), ``"wide"`` (harder training data),
``"subtle"`` (lower-contrast validation / test µCs) or ``"faint"`` (a stress set).
"""

from __future__ import annotations

from cascade.synthesis.anatomy import DENSITIES, TEXTURE_GRID_MM, DensityClass
from cascade.synthesis.calcifications import (
    CONTRAST_MEDIAN,
    CONTRAST_RANGE,
    CONTRAST_SIGMA_LN,
    CONTRAST_SIZE_EXPONENT,
    DIAMETER_MEDIAN_RANGE,
    DIAMETER_RANGE,
    DIAMETER_SIGMA_LN,
    MU_CALC_MAX,
    MU_CALC_MIN,
    NEGATIVE_FRACTION,
)
from cascade.synthesis.confounders import LINEAR_COUNT, VASCULAR_FRACTION
from cascade.synthesis.dataset import generate_dataset
from cascade.synthesis.dicom import MG_FOR_PRESENTATION, phantom_to_dataset
from cascade.synthesis.presentation import display_from_stored
from cascade.synthesis.profiles import PROFILES, SHAPES, PhantomProfile
from cascade.synthesis.render import SMALL_FIELD_MM, Laterality, Size, View, render_image
from cascade.synthesis.results import PhantomCalcification, PhantomImage, PhantomStudy
from cascade.synthesis.tissue import (
    LUMPY_MAX,
    MU_ADIPOSE,
    MU_GLANDULAR,
    MU_MUSCLE,
    MU_SKIN,
    SKIN_MM,
    TEXTURE_LOWEST_PERIOD_MM,
    THRESHOLD_WEIGHT,
)
from cascade.synthesis.vendors import VENDORS, VendorProfile

__all__ = [
    "CONTRAST_MEDIAN",
    "CONTRAST_RANGE",
    "CONTRAST_SIGMA_LN",
    "CONTRAST_SIZE_EXPONENT",
    "DENSITIES",
    "DIAMETER_MEDIAN_RANGE",
    "DIAMETER_RANGE",
    "DIAMETER_SIGMA_LN",
    "LINEAR_COUNT",
    "LUMPY_MAX",
    "MG_FOR_PRESENTATION",
    "MU_ADIPOSE",
    "MU_CALC_MAX",
    "MU_CALC_MIN",
    "MU_GLANDULAR",
    "MU_MUSCLE",
    "MU_SKIN",
    "NEGATIVE_FRACTION",
    "PROFILES",
    "SHAPES",
    "SKIN_MM",
    "SMALL_FIELD_MM",
    "TEXTURE_GRID_MM",
    "TEXTURE_LOWEST_PERIOD_MM",
    "THRESHOLD_WEIGHT",
    "VASCULAR_FRACTION",
    "VENDORS",
    "DensityClass",
    "Laterality",
    "PhantomCalcification",
    "PhantomImage",
    "PhantomProfile",
    "PhantomStudy",
    "Size",
    "VendorProfile",
    "View",
    "display_from_stored",
    "generate_dataset",
    "phantom_to_dataset",
    "render_image",
]
