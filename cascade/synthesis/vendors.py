"""Vendor profiles: the detector and For Presentation conventions of four vendors.

Pixel spacing and full-field shape, detector type and blur, bit depth, photometric
interpretation, VOI function, JPEG 2000 share and the acquisition attributes written to
the header (see ``docs/phantom.md``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VendorProfile:
    """What a vendor's detector and its For Presentation files look like.

    Parameters
    ----------
    name : str
        Short key (``"hologic"``, ``"ge"``, ``"siemens"``, ``"fuji"``).
    manufacturer, model : str
        DICOM Manufacturer and ManufacturerModelName.
    spacing_mm : float
        Pixel spacing (isotropic) in millimetres.
    full_shape : (int, int)
        (rows, columns) of the full-field detector.
    detector_type : str
        DICOM DetectorType: ``"DIRECT"`` (a-Se) or ``"SCINTILLATOR"`` (CsI).
    blur_sigma_px : float
        Gaussian σ of the detector blur in pixels after 2×2 binning.
    bits_stored : int
        BitsStored of the presentation image (12 or 14).
    monochrome1_probability : float
        Chance that an image is stored MONOCHROME1 (inverted).
    voi_function : str
        ``"LINEAR"`` (window centre/width) or ``"SIGMOID"``.
    jpeg2000_probability : float
        Chance that a study is written JPEG 2000 lossless.
    sid_mm : float
        Source-to-image distance.
    anode, filter : str
        AnodeTargetMaterial and FilterMaterial.
    """

    name: str
    manufacturer: str
    model: str
    spacing_mm: float
    full_shape: tuple[int, int]
    detector_type: str
    blur_sigma_px: float
    bits_stored: int
    monochrome1_probability: float
    voi_function: str
    jpeg2000_probability: float
    sid_mm: float
    anode: str
    filter: str


VENDORS: dict[str, VendorProfile] = {
    "hologic": VendorProfile(
        "hologic",
        "HOLOGIC, Inc.",
        "Selenia Dimensions",
        0.070,
        (4096, 3328),
        "DIRECT",
        0.30,
        12,
        0.0,
        "LINEAR",
        0.3,
        700.0,
        "TUNGSTEN",
        "RHODIUM",
    ),
    "ge": VendorProfile(
        "ge",
        "GE MEDICAL SYSTEMS",
        "Senographe Essential",
        0.100,
        (3070, 2400),
        "SCINTILLATOR",
        0.40,
        14,
        1.0,
        "SIGMOID",
        0.5,
        660.0,
        "RHODIUM",
        "RHODIUM",
    ),
    "siemens": VendorProfile(
        "siemens",
        "SIEMENS",
        "Mammomat Inspiration",
        0.085,
        (3584, 2816),
        "DIRECT",
        0.30,
        12,
        0.0,
        "LINEAR",
        0.2,
        650.0,
        "TUNGSTEN",
        "RHODIUM",
    ),
    "fuji": VendorProfile(
        "fuji",
        "FUJIFILM Corporation",
        "AMULET Innovality",
        0.050,
        (5928, 4728),
        "DIRECT",
        0.30,
        14,
        0.5,
        "LINEAR",
        0.3,
        650.0,
        "TUNGSTEN",
        "RHODIUM",
    ),
}
