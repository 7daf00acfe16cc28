"""Synthetic DICOM datasets for tests: a valid mammogram and its compressed variants.

No test-framework imports here, so any test module (or a script) can do
``from tests.factories import make_mg_dataset, compress``.

The synthetic image is a phantom, not patient data: a bright half-ellipse "breast" on the
chest-wall side (column 0 for a left breast, the last column for a right breast) with a
smooth thickness gradient, mild noise and a few bright dots (micro-calcification-like
specks). Coordinates: x = column, y = row, 0-based, first pixel's centre at (0, 0).
"""

from __future__ import annotations

import copy
import datetime
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

__all__ = [
    "MG_FOR_PRESENTATION",
    "MG_FOR_PROCESSING",
    "PHANTOM_DOTS",
    "compress",
    "make_ct_dataset",
    "make_mg_dataset",
    "make_secondary_capture_dataset",
    "synthetic_breast",
]

MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
MG_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"

# Fractional (x = column, y = row) positions of the bright dots, relative to image size,
# measured from the chest wall for x. Mapped to pixel centres by `phantom_dots`.
PHANTOM_DOTS: tuple[tuple[float, float], ...] = ((0.25, 0.45), (0.40, 0.55), (0.30, 0.62))

# (code value, coding scheme, meaning) of the view codes (CID 4014).
_VIEW_CODES = {
    "CC": ("399162004", "SCT", "cranio-caudal"),
    "MLO": ("399368009", "SCT", "medio-lateral oblique"),
    "ML": ("399260004", "SCT", "medio-lateral"),
    "LM": ("399352003", "SCT", "latero-medial"),
}

# PatientOrientation (row direction, column direction) for the layout this factory draws:
# a left breast has its chest wall at column 0 (columns run towards the nipple, anterior);
# a right breast has it at the last column (columns run towards posterior).
_ORIENTATION = {
    ("L", "CC"): ("A", "R"),
    ("R", "CC"): ("P", "L"),
    ("L", "MLO"): ("A", "F"),
    ("R", "MLO"): ("P", "F"),
    ("L", "ML"): ("A", "F"),
    ("R", "ML"): ("P", "F"),
    ("L", "LM"): ("A", "F"),
    ("R", "LM"): ("P", "F"),
}


def phantom_dots(rows: int, columns: int, laterality: str = "L") -> list[tuple[int, int]]:
    """Pixel positions of the bright dots of the default phantom.

    Parameters
    ----------
    rows, columns : int
        Image size.
    laterality : str
        ``"L"`` (chest wall at column 0) or ``"R"`` (chest wall at the last column).

    Returns
    -------
    list of (x, y)
        Integer pixel-centre coordinates, x = column, y = row, 0-based.
    """
    out = []
    for fx, fy in PHANTOM_DOTS:
        x = round(fx * (columns - 1))
        if laterality == "R":
            x = columns - 1 - x
        out.append((x, round(fy * (rows - 1))))
    return out


def synthetic_breast(
    rows: int, columns: int, *, laterality: str = "L", seed: int = 0, dots: bool = True
) -> np.ndarray:
    """Synthetic anatomy in the display domain: float64 (rows, columns) in [0, 1].

    1 = most attenuating (bright). Background about 0.03, tissue 0.45–0.75 (brighter near
    the chest wall, where the breast is thicker), dots 0.95 (3 × 3 px).

    Parameters
    ----------
    rows, columns : int
        Image size.
    laterality : str
        ``"L"`` puts the chest wall at column 0, ``"R"`` at the last column.
    seed : int
        Seed of the noise.
    dots : bool
        Draw the bright dots listed by :func:`phantom_dots`.

    Returns
    -------
    numpy.ndarray
        float64 (rows, columns) in [0, 1].
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:columns].astype(np.float64)
    if laterality == "R":
        xx = columns - 1 - xx
    cy = (rows - 1) / 2.0
    ay = 0.45 * rows
    ax = 0.75 * columns
    r2 = ((yy - cy) / ay) ** 2 + (xx / ax) ** 2
    inside = r2 <= 1.0
    tissue = 0.45 + 0.30 * np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))
    img = np.where(inside, tissue, 0.03)
    img = img + rng.normal(0.0, 0.01, size=img.shape)
    if dots:
        for x, y in phantom_dots(rows, columns, laterality):
            img[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2] = 0.95
    return np.clip(img, 0.0, 1.0)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _file_meta(sop_class_uid: str, sop_instance_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "CALCNODE_TEST"
    return meta


def _patient_study(ds: Dataset, *, patient_id: str, study_uid: str | None) -> None:
    now = datetime.datetime(2024, 5, 17, 10, 30, 0)
    ds.PatientName = "PHANTOM^BREAST"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.StudyDate = now.strftime("%Y%m%d")
    ds.StudyTime = now.strftime("%H%M%S")
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.SeriesDate = ds.StudyDate
    ds.SeriesTime = ds.StudyTime
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.AcquisitionDateTime = ds.StudyDate + ds.StudyTime


def make_mg_dataset(
    *,
    rows: int = 256,
    columns: int = 192,
    pixel_spacing: tuple[float, float] | None = (0.1, 0.1),
    imager_pixel_spacing: tuple[float, float] | None = None,
    magnification: float | None = None,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    laterality: str = "L",
    view: str = "CC",
    for_processing: bool = False,
    study_uid: str | None = None,
    patient_id: str = "PHANTOM-0001",
    pixel_array: np.ndarray | None = None,
    voi: str | None = "window",
    seed: int = 0,
) -> Dataset:
    """A complete Digital Mammography X-Ray Image dataset (uncompressed, with file meta).

    Parameters
    ----------
    rows, columns : int
        Image size.
    pixel_spacing : (float, float) or None
        PixelSpacing (row, col) in mm; None leaves PixelSpacing out.
    imager_pixel_spacing : (float, float) or None
        ImagerPixelSpacing (row, col) in mm. None derives it from ``pixel_spacing``
        (× ``magnification`` when given), because the MG IOD requires it; when both are
        None the dataset has no spacing at all.
    magnification : float or None
        EstimatedRadiographicMagnificationFactor (with matching source distances).
    photometric : str
        ``"MONOCHROME2"`` or ``"MONOCHROME1"``. With the default phantom the stored values
        of MONOCHROME1 are inverted, so both render the same anatomy.
    bits_stored : int
        BitsStored (BitsAllocated is 16, unsigned).
    laterality : str
        ``"L"`` or ``"R"``; the phantom's chest wall is at column 0 for L, last column for R.
    view : str
        ViewPosition, ``"CC"``, ``"MLO"``, ``"ML"`` or ``"LM"``.
    for_processing : bool
        Use the For Processing SOP class and PresentationIntentType.
    study_uid : str or None
        StudyInstanceUID; a new one when None.
    patient_id : str
        PatientID (a phantom identifier).
    pixel_array : numpy.ndarray or None
        Stored values, (rows, columns) integers in [0, 2**bits_stored − 1], used as is
        (no inversion for MONOCHROME1); ``rows``/``columns`` are taken from it.
    voi : {"window", "sigmoid", "lut", None}
        VOI attributes: a full-range LINEAR window, the same window with SIGMOID, a
        VOILUTSequence (display = (v / maxval) ** 0.8, mirrored for MONOCHROME1 so both
        photometric interpretations render alike), or none. Ignored (none) when ``for_processing``.
    seed : int
        Seed of the phantom noise.

    Returns
    -------
    pydicom.Dataset
        Explicit VR Little Endian, ``ds.file_meta`` set; ``dcmwrite(path, ds)`` works.
    """
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    if not 1 <= bits_stored <= 16:
        raise ValueError(f"bits_stored must be in 1..16, got {bits_stored}")
    if laterality not in ("L", "R"):
        raise ValueError(f"laterality must be 'L' or 'R', got {laterality!r}")
    if view not in _VIEW_CODES:
        raise ValueError(f"view must be one of {sorted(_VIEW_CODES)}, got {view!r}")
    if voi not in ("window", "sigmoid", "lut", None):
        raise ValueError(f"voi must be 'window', 'sigmoid', 'lut' or None, got {voi!r}")

    maxval = (1 << bits_stored) - 1
    if pixel_array is None:
        anatomy = synthetic_breast(rows, columns, laterality=laterality, seed=seed)
        stored = np.round(anatomy * maxval).astype(np.uint16)
        if photometric == "MONOCHROME1":
            stored = (maxval - stored).astype(np.uint16)
    else:
        arr = np.asarray(pixel_array)
        if arr.ndim != 2:
            raise ValueError(f"pixel_array must be 2-D, got shape {arr.shape}")
        if arr.size and (arr.min() < 0 or arr.max() > maxval):
            raise ValueError(f"pixel_array values must lie in [0, {maxval}] for {bits_stored} bits")
        stored = arr.astype(np.uint16)
        rows, columns = stored.shape

    sop_class = MG_FOR_PROCESSING if for_processing else MG_FOR_PRESENTATION
    sop_instance = generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop_instance)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    _patient_study(ds, patient_id=patient_id, study_uid=study_uid)
    ds.Modality = "MG"
    ds.PresentationIntentType = "FOR PROCESSING" if for_processing else "FOR PRESENTATION"
    ds.Manufacturer = "calcnode phantom"
    ds.ManufacturerModelName = "synthetic"
    ds.InstitutionName = ""
    ds.StationName = ""
    ds.SoftwareVersions = "1"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1
    ds.SeriesDescription = "Phantom mammogram"
    ds.AcquisitionContextSequence = DicomSequence()
    ds.InstanceNumber = 1
    ds.PatientOrientation = list(_ORIENTATION[(laterality, view)])
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.QualityControlImage = "NO"

    # DX Anatomy Imaged / Mammography Image
    ds.BodyPartExamined = "BREAST"
    ds.ImageLaterality = laterality
    ds.AnatomicRegionSequence = DicomSequence([_code("76752008", "SCT", "Breast")])
    ds.OrganExposed = "BREAST"
    ds.BreastImplantPresent = "NO"
    ds.PartialView = "NO"
    ds.ViewPosition = view
    ds.ViewCodeSequence = DicomSequence([_code(*_VIEW_CODES[view])])
    ds.ViewCodeSequence[0].ViewModifierCodeSequence = DicomSequence()
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.DistanceSourceToDetector = "650"
    ds.BodyPartThickness = "45"
    ds.CompressionForce = "100"
    ds.KVP = "28"
    ds.ExposureTime = 1000
    ds.XRayTubeCurrent = 100
    ds.Exposure = 100
    ds.AnodeTargetMaterial = "TUNGSTEN"
    ds.FilterMaterial = "RHODIUM"
    ds.DetectorType = "DIRECT"
    ds.DetectorConfiguration = "AREA"

    # Spacing. The IOD requires ImagerPixelSpacing; PixelSpacing is Type 1C.
    if magnification is not None:
        if magnification <= 0:
            raise ValueError(f"magnification must be positive, got {magnification}")
        ds.EstimatedRadiographicMagnificationFactor = f"{magnification:.6g}"
        ds.DistanceSourceToPatient = f"{650.0 / magnification:.6g}"
    if imager_pixel_spacing is None and pixel_spacing is not None:
        mag = magnification or 1.0
        imager_pixel_spacing = (pixel_spacing[0] * mag, pixel_spacing[1] * mag)
    if imager_pixel_spacing is not None:
        ds.ImagerPixelSpacing = [f"{v:.6g}" for v in imager_pixel_spacing]
        ds.DetectorElementSpacing = ds.ImagerPixelSpacing
    if pixel_spacing is not None:
        ds.PixelSpacing = [f"{v:.6g}" for v in pixel_spacing]
        ds.PixelSpacingCalibrationType = "GEOMETRY"
        ds.PixelSpacingCalibrationDescription = "phantom geometry"

    # Image Pixel / DX Image
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LOG"
    # PS3.3 C.8.11.5.1.2: -1 = higher values mean less X-ray intensity (more attenuation,
    # shown bright in MONOCHROME2); +1 = lower values mean less intensity (MONOCHROME1).
    ds.PixelIntensityRelationshipSign = 1 if photometric == "MONOCHROME1" else -1
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    if for_processing:
        voi = None  # the IOD allows VOI attributes in For Presentation images only
    if voi in ("window", "sigmoid"):
        ds.WindowCenter = f"{(maxval + 1) / 2:.6g}"
        ds.WindowWidth = f"{maxval + 1}"
        ds.WindowCenterWidthExplanation = "FULL RANGE"
        ds.VOILUTFunction = "SIGMOID" if voi == "sigmoid" else "LINEAR"
    elif voi == "lut":
        n = maxval + 1
        lut = np.round(np.linspace(0.0, 1.0, n) ** 0.8 * 65535.0).astype(np.uint16)
        if photometric == "MONOCHROME1":
            # Mirrored, so that after the MONOCHROME1 inversion both render the same.
            lut = (65535 - lut[::-1]).astype(np.uint16)
        item = Dataset()
        # LUTDescriptor: number of entries (0 means 65536), first mapped value, bits per entry.
        item.LUTDescriptor = [n if n < 65536 else 0, 0, 16]
        item.LUTExplanation = "GAMMA 0.8"
        item.LUTData = lut.tolist()
        ds.VOILUTSequence = DicomSequence([item])
        # US/SS vs OW is ambiguous for LUTData; write it as US explicitly.
        ds.VOILUTSequence[0]["LUTData"].VR = "US"
        ds.VOILUTSequence[0]["LUTDescriptor"].VR = "US"
    ds.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def make_ct_dataset(*, rows: int = 64, columns: int = 64, seed: int = 0) -> Dataset:
    """A small valid-looking CT Image dataset (the wrong modality for the node).

    Returns
    -------
    pydicom.Dataset
        Explicit VR Little Endian, with file meta, PixelSpacing and a 12-bit image.
    """
    rng = np.random.default_rng(seed)
    uid = generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(CT_IMAGE_STORAGE, uid)
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = uid
    _patient_study(ds, patient_id="PHANTOM-CT", study_uid=None)
    ds.Modality = "CT"
    ds.SeriesInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PixelSpacing = ["0.5", "0.5"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
    ds.PixelData = rng.integers(0, 4096, size=(rows, columns), dtype="<u2").tobytes()
    return ds


def make_secondary_capture_dataset(
    *, rows: int = 64, columns: int = 64, rgb: bool = False, modality: str = "MG"
) -> Dataset:
    """A Secondary Capture image (a screenshot-like object, even when Modality says MG).

    Parameters
    ----------
    rows, columns : int
        Image size.
    rgb : bool
        Store an 8-bit RGB image instead of 8-bit MONOCHROME2.
    modality : str
        The Modality attribute.

    Returns
    -------
    pydicom.Dataset
        Explicit VR Little Endian, with file meta.
    """
    uid = generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(SECONDARY_CAPTURE_STORAGE, uid)
    ds.SOPClassUID = SECONDARY_CAPTURE_STORAGE
    ds.SOPInstanceUID = uid
    _patient_study(ds, patient_id="PHANTOM-SC", study_uid=None)
    ds.Modality = modality
    ds.ConversionType = "WSD"
    ds.SeriesInstanceUID = generate_uid()
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if rgb:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        ds.PixelData = np.zeros((rows, columns, 3), dtype=np.uint8).tobytes()
    else:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = np.zeros((rows, columns), dtype=np.uint8).tobytes()
    return ds


def _dcmtk_encode(ds: Dataset, args: Sequence[str]) -> Dataset:
    """Encode via a DCMTK tool (``args[0]`` is the executable) through temporary files."""
    with tempfile.TemporaryDirectory(prefix="calcnode-compress-") as tmp:
        src = os.path.join(tmp, "in.dcm")
        dst = os.path.join(tmp, "out.dcm")
        ds.save_as(src, enforce_file_format=True)
        proc = subprocess.run(
            [*args, src, dst], capture_output=True, text=True, timeout=60, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({proc.returncode}): {proc.stderr.strip()}")
        return pydicom.dcmread(dst)


def jpeg_lossless_encoder_available() -> bool:
    """Whether :func:`compress` can produce JPEG Lossless SV1 (needs DCMTK ``dcmcjpeg``)."""
    return shutil.which("dcmcjpeg") is not None


def compress(ds: Dataset, transfer_syntax_uid: str) -> Dataset:
    """A compressed copy of an uncompressed single-frame dataset.

    Parameters
    ----------
    ds : pydicom.Dataset
        Uncompressed dataset (it is not modified).
    transfer_syntax_uid : str
        JPEG 2000 Lossless (pylibjpeg-openjpeg), JPEG-LS Lossless (pyjpegls), RLE Lossless
        (pylibjpeg-rle) or JPEG Lossless SV1. pylibjpeg-libjpeg only decodes, so SV1 is
        encoded with DCMTK ``dcmcjpeg +e1``; :func:`jpeg_lossless_encoder_available` tells
        whether it is installed (else ``RuntimeError``).

    Returns
    -------
    pydicom.Dataset
        The dataset with encapsulated PixelData and the file meta's TransferSyntaxUID set.
    """
    out = copy.deepcopy(ds)
    if transfer_syntax_uid == JPEGLosslessSV1:
        if not jpeg_lossless_encoder_available():
            raise RuntimeError("JPEG Lossless SV1 needs DCMTK's dcmcjpeg, which is not installed")
        return _dcmtk_encode(out, ["dcmcjpeg", "+e1"])
    plugins = {JPEG2000Lossless: "pylibjpeg", JPEGLSLossless: "pyjpegls", RLELossless: ""}
    if transfer_syntax_uid not in plugins:
        raise ValueError(f"transfer_syntax_uid {transfer_syntax_uid} is not supported")
    out.compress(transfer_syntax_uid, encoding_plugin=plugins[transfer_syntax_uid])
    return out
