"""Reading mammograms: DICOM dataset → display-domain pixels + the metadata the node needs.

:func:`read_mammogram` accepts a path, a file object or a :class:`pydicom.Dataset` and
returns a :class:`Mammogram`: float32 pixels in [0, 1] where 1 is the most attenuating
tissue (bright), whatever the photometric interpretation, plus a
:class:`MammogramMetadata` without patient data. :func:`check_mammogram_header` is the
cheap header-only part of the same validation, for the C-STORE handler.

Intensity mapping, in DICOM's order:

1. stored values (BitsStored honoured by the decoder) → Modality LUT (Rescale Slope /
   Intercept or a Modality LUT Sequence);
2. VOI (``apply_voi=True`` and the dataset has one): the first window (LINEAR,
   LINEAR_EXACT or SIGMOID, PS3.3 C.11.2.1.2) whose output is taken directly in [0, 1],
   or the first VOI LUT Sequence item, whose output is scaled by the LUT's own min–max;
   without a usable VOI: a linear map of the full nominal value range (e.g. 0…4095 for
   12 bits) onto [0, 1];
3. MONOCHROME1 is inverted (``1 − v``), so the result is always "bright = attenuating".

Pixel coordinates anywhere in this package: x = column, y = row, 0-based, the centre of
the first pixel at (0, 0). No patient name or identifier ever appears in a message or a
log line; UIDs do.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi, get_decoder
from pydicom.uid import (
    UID,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from cascade.errors import InvalidImageError

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_PIXEL_SPACING_MM",
    "MG_FOR_PRESENTATION",
    "MG_FOR_PROCESSING",
    "MG_SOP_CLASSES",
    "MIN_PIXEL_SPACING_MM",
    "Mammogram",
    "MammogramMetadata",
    "check_mammogram_header",
    "read_mammogram",
]

MG_FOR_PRESENTATION = DigitalMammographyXRayImageStorageForPresentation
MG_FOR_PROCESSING = DigitalMammographyXRayImageStorageForProcessing
#: The SOP classes the node accepts: Digital Mammography X-Ray Image, both intents.
MG_SOP_CLASSES = frozenset({MG_FOR_PRESENTATION, MG_FOR_PROCESSING})

#: Plausible pixel spacing in mm (mammography detectors are 0.025–0.2 mm).
MIN_PIXEL_SPACING_MM = 0.01
MAX_PIXEL_SPACING_MM = 1.0
#: Plausible Estimated Radiographic Magnification Factor (magnification views are ≤ 2).
_ERMF_RANGE = (0.5, 4.0)
#: Image size limits (pixels per side).
_MIN_SIDE = 8
_MAX_SIDE = 30000

# View Code Sequence code values (CID 4014) → ViewPosition, when ViewPosition is empty.
_VIEW_FROM_CODE = {
    "399162004": "CC",
    "R-10242": "CC",
    "399368009": "MLO",
    "R-10226": "MLO",
    "399260004": "ML",
    "R-10224": "ML",
    "399352003": "LM",
    "R-10228": "LM",
    "399099002": "XCCL",
    "R-1024A": "XCCL",
}


@dataclass(frozen=True)
class MammogramMetadata:
    """What the node needs to know about a received mammogram (no patient data).

    Parameters
    ----------
    sop_instance_uid, sop_class_uid, study_instance_uid, series_instance_uid : str
        Identifying UIDs.
    rows, columns : int
        Size of the received pixel grid.
    pixel_spacing_mm : (float, float)
        (row, col) spacing in mm, at the detector or corrected for magnification.
    spacing_source : str
        ``"PixelSpacing"``, ``"ImagerPixelSpacing/ERMF"`` or ``"ImagerPixelSpacing"``.
    laterality : str or None
        ``"L"`` / ``"R"`` (ImageLaterality, else series Laterality).
    view : str or None
        ViewPosition (``"CC"``, ``"MLO"``, …), else derived from ViewCodeSequence.
    patient_orientation : (str, str) or None
        PatientOrientation (row direction, column direction).
    photometric_interpretation : str
        ``"MONOCHROME1"`` or ``"MONOCHROME2"`` as received.
    bits_stored : int
        BitsStored as received.
    transfer_syntax_uid : str
        Transfer syntax of the received pixel data.
    presentation_intent : str or None
        ``"FOR PRESENTATION"`` / ``"FOR PROCESSING"``.
    manufacturer : str or None
        Manufacturer of the acquiring equipment.
    """

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    rows: int
    columns: int
    pixel_spacing_mm: tuple[float, float]
    spacing_source: str
    laterality: str | None
    view: str | None
    patient_orientation: tuple[str, str] | None
    photometric_interpretation: str
    bits_stored: int
    transfer_syntax_uid: str
    presentation_intent: str | None
    manufacturer: str | None


@dataclass(frozen=True)
class Mammogram:
    """A decoded mammogram.

    Parameters
    ----------
    pixels : numpy.ndarray
        float32 ``(rows, columns)`` in [0, 1], display domain: 1 = most attenuating
        (bright tissue), whatever the photometric interpretation. ``pixels[y, x]`` with
        x = column, y = row.
    metadata : MammogramMetadata
        Header facts.
    """

    pixels: np.ndarray
    metadata: MammogramMetadata

    def __post_init__(self) -> None:
        px = self.pixels
        if not isinstance(px, np.ndarray) or px.ndim != 2 or px.dtype != np.float32:
            raise TypeError("Mammogram.pixels must be a 2-D float32 numpy array")
        if px.shape != (self.metadata.rows, self.metadata.columns):
            raise ValueError(
                f"Mammogram.pixels shape {px.shape} differs from the metadata's "
                f"(rows, columns) = ({self.metadata.rows}, {self.metadata.columns})"
            )


# --------------------------------------------------------------------------- helpers


def _str_or_none(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _uid(ds: Dataset, keyword: str) -> str:
    value = _str_or_none(ds, keyword)
    if value is None:
        raise InvalidImageError(f"the dataset has no {keyword}")
    return value


def _transfer_syntax(ds: Dataset) -> str | None:
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return str(meta.TransferSyntaxUID)
    return None


def _pair(ds: Dataset, keyword: str) -> tuple[float, float] | None:
    """A two-valued numeric attribute as floats; None when absent or empty."""
    if keyword not in ds:
        return None
    value = ds[keyword].value
    if value is None or value == "" or (isinstance(value, (list, tuple)) and not value):
        return None
    try:
        values = [float(v) for v in value] if ds[keyword].VM > 1 else [float(value)]
    except (TypeError, ValueError) as exc:
        raise InvalidImageError(f"{keyword} is not numeric ({exc})") from None
    if len(values) != 2:
        raise InvalidImageError(f"{keyword} must have 2 values (row, col), got {len(values)}")
    return values[0], values[1]


def _check_spacing(keyword: str, spacing: tuple[float, float]) -> None:
    for v in spacing:
        if not math.isfinite(v) or not MIN_PIXEL_SPACING_MM <= v <= MAX_PIXEL_SPACING_MM:
            raise InvalidImageError(
                f"absurd {keyword} {spacing[0]:g}\\{spacing[1]:g} mm: each value must lie "
                f"in [{MIN_PIXEL_SPACING_MM:g}, {MAX_PIXEL_SPACING_MM:g}] mm"
            )


def _pixel_spacing(ds: Dataset) -> tuple[tuple[float, float], str]:
    """(row, col) spacing in mm and where it came from; InvalidImageError when unusable."""
    ps = _pair(ds, "PixelSpacing")
    if ps is not None:
        _check_spacing("PixelSpacing", ps)
        return ps, "PixelSpacing"
    ips = _pair(ds, "ImagerPixelSpacing")
    if ips is None:
        raise InvalidImageError(
            "no pixel spacing: neither PixelSpacing nor ImagerPixelSpacing is present"
        )
    ermf_raw = ds.get("EstimatedRadiographicMagnificationFactor")
    if ermf_raw is not None and str(ermf_raw).strip() != "":
        try:
            ermf = float(ermf_raw)
        except (TypeError, ValueError):
            raise InvalidImageError(
                f"EstimatedRadiographicMagnificationFactor {ermf_raw!r} is not numeric"
            ) from None
        if not math.isfinite(ermf) or not _ERMF_RANGE[0] <= ermf <= _ERMF_RANGE[1]:
            raise InvalidImageError(
                f"absurd EstimatedRadiographicMagnificationFactor {ermf:g}: must lie in "
                f"[{_ERMF_RANGE[0]:g}, {_ERMF_RANGE[1]:g}]"
            )
        spacing = (ips[0] / ermf, ips[1] / ermf)
        _check_spacing("ImagerPixelSpacing/EstimatedRadiographicMagnificationFactor", spacing)
        return spacing, "ImagerPixelSpacing/ERMF"
    _check_spacing("ImagerPixelSpacing", ips)
    return ips, "ImagerPixelSpacing"


def _int_attr(ds: Dataset, keyword: str) -> int:
    value = ds.get(keyword)
    if value is None or value == "":
        raise InvalidImageError(f"the dataset has no {keyword}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InvalidImageError(f"{keyword} {value!r} is not an integer") from None


def _view(ds: Dataset) -> str | None:
    view = _str_or_none(ds, "ViewPosition")
    if view is not None:
        return view.upper()
    seq = ds.get("ViewCodeSequence")
    if seq:
        code = str(seq[0].get("CodeValue", "")).strip()
        return _VIEW_FROM_CODE.get(code)
    return None


def _laterality(ds: Dataset) -> str | None:
    for keyword in ("ImageLaterality", "Laterality"):
        value = _str_or_none(ds, keyword)
        if value is not None:
            return value.upper()
    return None


def _orientation(ds: Dataset) -> tuple[str, str] | None:
    value = ds.get("PatientOrientation")
    if value is None or value == "":
        return None
    if isinstance(value, str) or len(value) != 2:
        return None
    a, b = (str(v).strip() for v in value)
    return (a, b) if a and b else None


def _metadata(ds: Dataset, *, require_pixel_data: bool) -> MammogramMetadata:
    """Validate the header and collect the metadata; raises InvalidImageError."""
    try:
        return _metadata_unchecked(ds, require_pixel_data=require_pixel_data)
    except InvalidImageError:
        raise
    except Exception as exc:  # a value pydicom cannot convert (corrupt header)
        raise InvalidImageError(f"corrupt header: {type(exc).__name__}: {exc}") from None


def _metadata_unchecked(ds: Dataset, *, require_pixel_data: bool) -> MammogramMetadata:
    sop_class = _str_or_none(ds, "SOPClassUID")
    if sop_class is None:
        raise InvalidImageError("the dataset has no SOPClassUID")
    if sop_class not in MG_SOP_CLASSES:
        raise InvalidImageError(
            f"wrong SOP class {UID(sop_class).name} ({sop_class}), modality "
            f"{_str_or_none(ds, 'Modality') or '?'}: "
            "only Digital Mammography X-Ray Image Storage (For Presentation or For "
            "Processing) is accepted"
        )
    modality = _str_or_none(ds, "Modality")
    if modality is not None and modality.upper() != "MG":
        raise InvalidImageError(f"wrong modality {modality}: expected MG")
    sop_instance = _uid(ds, "SOPInstanceUID")

    if require_pixel_data and "PixelData" not in ds:
        other = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        extra = (
            f" (only {other[0]}, which is not supported)"
            if other
            else " (or the file is truncated before it)"
        )
        raise InvalidImageError(f"missing pixel data: no PixelData{extra}")

    frames_raw = ds.get("NumberOfFrames")
    if frames_raw not in (None, ""):
        try:
            frames = int(frames_raw)
        except (TypeError, ValueError):
            raise InvalidImageError(f"NumberOfFrames {frames_raw!r} is not an integer") from None
        if frames != 1:
            raise InvalidImageError(
                f"multi-frame image ({frames} frames): only single-frame mammograms are accepted"
            )
    samples = _int_attr(ds, "SamplesPerPixel")
    photometric = _str_or_none(ds, "PhotometricInterpretation")
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise InvalidImageError(
            f"colour or non-greyscale image (SamplesPerPixel {samples}, "
            f"PhotometricInterpretation {photometric}): expected MONOCHROME1 or MONOCHROME2"
        )
    rows = _int_attr(ds, "Rows")
    columns = _int_attr(ds, "Columns")
    for name, side in (("Rows", rows), ("Columns", columns)):
        if not _MIN_SIDE <= side <= _MAX_SIDE:
            raise InvalidImageError(
                f"absurd image size: {name} {side} not in [{_MIN_SIDE}, {_MAX_SIDE}]"
            )
    bits_allocated = _int_attr(ds, "BitsAllocated")
    bits_stored = _int_attr(ds, "BitsStored")
    if bits_allocated not in (8, 16) or not 1 <= bits_stored <= bits_allocated:
        raise InvalidImageError(
            f"unsupported bit depth: BitsAllocated {bits_allocated}, BitsStored {bits_stored}"
        )

    spacing, spacing_source = _pixel_spacing(ds)

    tsuid = _transfer_syntax(ds)
    if tsuid is None:
        # An in-memory dataset without file meta: only native pixel data makes sense.
        tsuid = ExplicitVRLittleEndian
        if require_pixel_data and "PixelData" in ds and ds["PixelData"].is_undefined_length:
            raise InvalidImageError("encapsulated pixel data but no TransferSyntaxUID")
    try:
        decoder = get_decoder(tsuid)
    except NotImplementedError:
        raise InvalidImageError(
            f"transfer syntax {UID(tsuid).name} ({tsuid}) cannot be decoded"
        ) from None
    if not decoder.is_available:
        raise InvalidImageError(
            f"transfer syntax {UID(tsuid).name} ({tsuid}) cannot be decoded: missing plugin "
            f"({'; '.join(decoder.missing_dependencies)})"
        )

    return MammogramMetadata(
        sop_instance_uid=sop_instance,
        sop_class_uid=sop_class,
        study_instance_uid=_uid(ds, "StudyInstanceUID"),
        series_instance_uid=_uid(ds, "SeriesInstanceUID"),
        rows=rows,
        columns=columns,
        pixel_spacing_mm=spacing,
        spacing_source=spacing_source,
        laterality=_laterality(ds),
        view=_view(ds),
        patient_orientation=_orientation(ds),
        photometric_interpretation=photometric,
        bits_stored=bits_stored,
        transfer_syntax_uid=str(tsuid),
        presentation_intent=_str_or_none(ds, "PresentationIntentType"),
        manufacturer=_str_or_none(ds, "Manufacturer"),
    )


def _modality_range(ds: Dataset) -> tuple[float, float]:
    """Nominal (low, high) of the Modality-LUT output for any stored value."""
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0)) == 1:
        lo, hi = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    else:
        lo, hi = 0.0, float(2**bits - 1)
    seq = ds.get("ModalityLUTSequence")
    if seq:
        return 0.0, float(2 ** int(seq[0].LUTDescriptor[2]) - 1)
    slope = ds.get("RescaleSlope")
    intercept = ds.get("RescaleIntercept")
    if slope not in (None, "") and intercept not in (None, ""):
        a, b = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
        return min(a, b), max(a, b)
    return lo, hi


def _window(values: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """The first window (PS3.3 C.11.2.1.2/3) with its output in [0, 1]; None if unusable."""
    if ds.get("WindowCenter") in (None, "") or ds.get("WindowWidth") in (None, ""):
        return None
    center_elem, width_elem = ds["WindowCenter"], ds["WindowWidth"]
    center = float(center_elem.value[0] if center_elem.VM > 1 else center_elem.value)
    width = float(width_elem.value[0] if width_elem.VM > 1 else width_elem.value)
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    x = values.astype(np.float64, copy=False)
    if function == "LINEAR" and width >= 1:
        out = (x - (center - 0.5)) / (width - 1) + 0.5 if width > 1 else (x > center - 0.5)
    elif function == "LINEAR_EXACT" and width > 0:
        out = (x - center) / width + 0.5
    elif function == "SIGMOID" and width > 0:
        out = 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    else:
        logger.warning(
            "ignoring unusable VOI window (function %s, width %g) of SOP instance %s",
            function,
            width,
            ds.get("SOPInstanceUID", "?"),
        )
        return None
    return np.clip(np.asarray(out, dtype=np.float64), 0.0, 1.0)


def _voi_lut(values: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """The first VOI LUT Sequence item, output scaled to [0, 1] by the LUT's own min–max."""
    seq = ds.get("VOILUTSequence")
    if not seq or "LUTDescriptor" not in seq[0] or "LUTData" not in seq[0]:
        return None
    mapped = apply_voi(np.round(values).astype(np.int64), ds, 0).astype(np.float64)
    lut_lo, lut_hi = float(np.min(seq[0].LUTData)), float(np.max(seq[0].LUTData))
    if lut_hi <= lut_lo:
        logger.warning("ignoring a constant VOI LUT of SOP instance %s", ds.SOPInstanceUID)
        return None
    return np.clip((mapped - lut_lo) / (lut_hi - lut_lo), 0.0, 1.0)


def _to_display(stored: np.ndarray, ds: Dataset, *, apply_voi_: bool) -> np.ndarray:
    """Stored values → float32 [0, 1], 1 = bright (most attenuating)."""
    values = apply_modality_lut(stored, ds)
    out: np.ndarray | None = None
    if apply_voi_:
        # Like DICOM viewers (and pydicom's default), a VOI LUT Sequence wins over a window.
        out = _voi_lut(values, ds)
        if out is None:
            out = _window(values, ds)
    if out is None:
        lo, hi = _modality_range(ds)
        out = np.clip((values.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0)
    if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32)


def _read_dataset(source: str | os.PathLike[str] | BinaryIO) -> Dataset:
    try:
        ds = pydicom.dcmread(source)
    except InvalidDicomError as exc:
        raise InvalidImageError(f"not a DICOM file ({exc})") from None
    except OSError:
        raise  # an I/O problem is not a property of the image
    except Exception as exc:  # pydicom raises many types on corrupt input
        raise InvalidImageError(
            f"truncated or corrupt DICOM file ({type(exc).__name__}: {exc})"
        ) from None
    if len(ds) == 0:
        # pydicom drops every element when it hits end-of-file inside an undefined-length
        # element (e.g. encapsulated pixel data), and only warns.
        raise InvalidImageError(
            "truncated or empty DICOM file: no data set after the file meta information"
        )
    return ds


# --------------------------------------------------------------------------- public API


def check_mammogram_header(ds: Dataset, *, require_pixel_data: bool = True) -> None:
    """Cheap header-only validation (no pixel decoding), for the C-STORE handler.

    Checks the SOP class (Digital Mammography X-Ray Image, For Presentation or For
    Processing), the modality, single frame, greyscale, bit depth, image size, pixel
    spacing and that a decoder exists for the transfer syntax.

    Parameters
    ----------
    ds : pydicom.Dataset
        The received dataset.
    require_pixel_data : bool
        Also require a PixelData element (set False for a header read with
        ``stop_before_pixels=True``).

    Raises
    ------
    InvalidImageError
        With a message saying what is wrong (never patient data).
    """
    if not isinstance(ds, Dataset):
        raise TypeError(f"ds must be a pydicom Dataset, got {type(ds).__name__}")
    _metadata(ds, require_pixel_data=require_pixel_data)


def read_mammogram(
    source: str | os.PathLike[str] | Dataset | BinaryIO, *, apply_voi: bool = True
) -> Mammogram:
    """Read and decode a mammogram into display-domain pixels and metadata.

    Parameters
    ----------
    source : str, os.PathLike, pydicom.Dataset or binary file object
        A DICOM file (Part 10 with preamble), or an already parsed dataset.
    apply_voi : bool
        Apply the dataset's first VOI LUT / window. When False, or when there is none,
        the full nominal value range (after the Modality LUT) maps linearly onto [0, 1].

    Returns
    -------
    Mammogram
        ``pixels``: float32 ``(rows, columns)`` in [0, 1], 1 = most attenuating
        (MONOCHROME1 inverted); indexing ``pixels[y, x]``, x = column, y = row.

    Raises
    ------
    InvalidImageError
        Not DICOM, truncated, wrong SOP class or modality, missing pixel data, multi-frame
        or colour, undecodable compressed data, missing or absurd pixel spacing, …
    OSError
        The file cannot be opened or read.
    """
    if isinstance(source, Dataset):
        ds = source
    elif isinstance(source, (str, os.PathLike)) or hasattr(source, "read"):
        ds = _read_dataset(source)
    else:
        raise TypeError(
            f"source must be a path, a binary file or a pydicom Dataset, "
            f"got {type(source).__name__}"
        )
    meta = _metadata(ds, require_pixel_data=True)
    if _transfer_syntax(ds) in (None, ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        # Native pixel data: say "truncated" rather than let the decoder mumble.
        expected = meta.rows * meta.columns * (int(ds.BitsAllocated) // 8)
        got = len(ds.PixelData) if ds.PixelData is not None else 0
        if got < expected:
            raise InvalidImageError(
                f"truncated pixel data: {got} of {expected} bytes (truncated file?)"
            )

    decode_ds: Any = ds
    if _transfer_syntax(ds) is None:
        decode_ds = copy.copy(ds)
        decode_ds.file_meta = FileMetaDataset()
        decode_ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    try:
        stored = decode_ds.pixel_array
    except Exception as exc:  # decoders raise ValueError, RuntimeError, …
        raise InvalidImageError(
            f"cannot decode pixel data ({UID(meta.transfer_syntax_uid).name}): "
            f"{type(exc).__name__}: {exc}"
        ) from None
    if stored.shape != (meta.rows, meta.columns):
        raise InvalidImageError(
            f"decoded pixel data has shape {stored.shape}, expected "
            f"({meta.rows}, {meta.columns}) from Rows/Columns"
        )
    try:
        pixels = _to_display(stored, ds, apply_voi_=apply_voi)
    except (ValueError, TypeError, AttributeError, IndexError, NotImplementedError) as exc:
        raise InvalidImageError(
            f"cannot map pixel values (Modality/VOI LUT): {type(exc).__name__}: {exc}"
        ) from None
    logger.debug(
        "read SOP instance %s: %dx%d, %s, spacing %.4g x %.4g mm (%s)",
        meta.sop_instance_uid,
        meta.rows,
        meta.columns,
        meta.photometric_interpretation,
        meta.pixel_spacing_mm[0],
        meta.pixel_spacing_mm[1],
        meta.spacing_source,
    )
    return Mammogram(pixels=pixels, metadata=meta)
