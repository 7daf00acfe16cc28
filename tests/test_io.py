"""Reading mammograms: every decoder path, intensity mapping, spacing, and bad input."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from cascade.data.io import (
    MG_FOR_PRESENTATION,
    MG_FOR_PROCESSING,
    Mammogram,
    check_mammogram_header,
    read_mammogram,
)
from cascade.errors import InvalidImageError
from tests.factories import (
    compress,
    jpeg_lossless_encoder_available,
    make_ct_dataset,
    make_mg_dataset,
    make_secondary_capture_dataset,
    synthetic_breast,
)

PATIENT_STRINGS = ("PHANTOM-0001", "PHANTOM^BREAST", "PHANTOM-CT", "PHANTOM-SC", "19700101")


def _write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _roundtrip(ds: Dataset) -> Dataset:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf)


def _ramp(bits: int, rows: int = 64, columns: int = 64) -> np.ndarray:
    """Stored values covering 0 … 2**bits − 1 in row-major order."""
    maxval = (1 << bits) - 1
    return np.linspace(0, maxval, rows * columns).round().astype(np.uint16).reshape(rows, columns)


# ---------------------------------------------------------------- happy paths


def test_read_from_path_returns_unit_float32_pixels_and_header_metadata(tmp_path: Path) -> None:
    ds = make_mg_dataset(rows=256, columns=192, laterality="R", view="MLO")
    m = read_mammogram(_write(ds, tmp_path / "mg.dcm"))
    assert isinstance(m, Mammogram)
    assert m.pixels.dtype == np.float32
    assert m.pixels.shape == (256, 192)
    assert float(m.pixels.min()) >= 0.0 and float(m.pixels.max()) <= 1.0
    md = m.metadata
    assert md.sop_instance_uid == ds.SOPInstanceUID
    assert md.sop_class_uid == MG_FOR_PRESENTATION
    assert md.study_instance_uid == ds.StudyInstanceUID
    assert md.series_instance_uid == ds.SeriesInstanceUID
    assert (md.rows, md.columns) == (256, 192)
    assert md.pixel_spacing_mm == (0.1, 0.1)
    assert md.spacing_source == "PixelSpacing"
    assert (md.laterality, md.view) == ("R", "MLO")
    assert md.patient_orientation == ("P", "F")
    assert md.photometric_interpretation == "MONOCHROME2"
    assert md.bits_stored == 12
    assert md.transfer_syntax_uid == "1.2.840.10008.1.2.1"
    assert md.presentation_intent == "FOR PRESENTATION"
    assert md.manufacturer == "calcnode phantom"


def test_read_from_dataset_file_object_and_path_give_the_same_pixels(tmp_path: Path) -> None:
    ds = make_mg_dataset(seed=3)
    path = _write(ds, tmp_path / "mg.dcm")
    a = read_mammogram(ds).pixels
    b = read_mammogram(str(path)).pixels
    with open(path, "rb") as fh:
        c = read_mammogram(fh).pixels
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_full_range_window_maps_stored_values_linearly_with_bright_tissue_high() -> None:
    ds = make_mg_dataset(seed=1)
    m = read_mammogram(ds)
    anatomy = synthetic_breast(256, 192, seed=1)
    expected = np.round(anatomy * 4095) / 4095
    # Full-range LINEAR window: (x − 2047.5) / 4095 + 0.5 = x / 4095.
    np.testing.assert_allclose(m.pixels, expected, atol=1e-6)
    assert m.pixels[128, 10] > 0.6  # chest-wall tissue (column 0 for a left breast)
    assert m.pixels[5, 190] < 0.1  # background corner


@pytest.mark.parametrize("voi", ["window", "sigmoid", "lut", None])
def test_monochrome1_and_monochrome2_of_the_same_anatomy_read_identically(voi: str | None) -> None:
    mono2 = read_mammogram(make_mg_dataset(photometric="MONOCHROME2", voi=voi, seed=2))
    mono1_ds = make_mg_dataset(photometric="MONOCHROME1", voi=voi, seed=2)
    mono1 = read_mammogram(mono1_ds)
    assert mono1.metadata.photometric_interpretation == "MONOCHROME1"
    assert int(mono1_ds.pixel_array[128, 10]) < int(mono1_ds.pixel_array[5, 190])  # stored dark
    # The sigmoid centre sits half a stored unit off the range's midpoint, hence the atol.
    np.testing.assert_allclose(mono1.pixels, mono2.pixels, atol=1e-3 if voi == "sigmoid" else 2e-5)
    assert mono1.pixels[128, 10] > 0.5 > mono1.pixels[5, 190]


@pytest.mark.parametrize("bits", [12, 14, 16])
def test_bits_stored_12_14_16_give_the_same_display_image(bits: int) -> None:
    m = read_mammogram(make_mg_dataset(bits_stored=bits, seed=4))
    assert m.metadata.bits_stored == bits
    anatomy = synthetic_breast(256, 192, seed=4)
    np.testing.assert_allclose(m.pixels, anatomy, atol=0.5 / 4095 + 1e-6)


def test_bits_stored_masks_unused_high_bits() -> None:
    ds = make_mg_dataset(pixel_array=_ramp(12), voi=None)
    raw = np.frombuffer(ds.PixelData, dtype="<u2").copy()
    raw |= 0xF000  # garbage in the 4 unused bits must be ignored
    ds.PixelData = raw.tobytes()
    m = read_mammogram(ds)
    np.testing.assert_allclose(m.pixels.ravel(), _ramp(12).ravel() / 4095, atol=1e-6)


def test_narrow_linear_window_follows_ps3_3_formula_and_clips() -> None:
    ds = make_mg_dataset(pixel_array=_ramp(12))
    ds.WindowCenter, ds.WindowWidth = "1000", "201"
    m = read_mammogram(ds)
    x = _ramp(12).astype(float)
    expected = np.clip((x - 999.5) / 200 + 0.5, 0, 1)
    np.testing.assert_allclose(m.pixels, expected, atol=1e-6)
    assert float(m.pixels.min()) == 0.0 and float(m.pixels.max()) == 1.0


def test_sigmoid_window_is_one_half_at_the_centre() -> None:
    ds = make_mg_dataset(pixel_array=_ramp(12), voi="sigmoid")
    ds.WindowCenter, ds.WindowWidth = "2000", "400"
    m = read_mammogram(ds)
    x = _ramp(12).astype(float)
    expected = 1 / (1 + np.exp(-4 * (x - 2000) / 400))
    np.testing.assert_allclose(m.pixels, expected, atol=1e-6)


def test_voi_lut_sequence_is_applied_and_scaled_to_unit_range() -> None:
    m = read_mammogram(make_mg_dataset(pixel_array=_ramp(12), voi="lut"))
    x = _ramp(12).astype(float) / 4095
    # The factory's LUT is round(x**0.8 · 65535) over 4096 entries.
    np.testing.assert_allclose(m.pixels, x**0.8, atol=2e-5)


def test_apply_voi_false_maps_the_full_stored_range_linearly() -> None:
    ds = make_mg_dataset(pixel_array=_ramp(14), bits_stored=14)
    ds.WindowCenter, ds.WindowWidth = "1000", "201"
    m = read_mammogram(ds, apply_voi=False)
    np.testing.assert_allclose(m.pixels, _ramp(14) / 16383, atol=1e-6)


def test_rescale_slope_and_intercept_apply_before_the_window() -> None:
    ds = make_mg_dataset(pixel_array=_ramp(12))
    ds.RescaleSlope, ds.RescaleIntercept = "2", "-100"
    ds.WindowCenter, ds.WindowWidth = "4000", "2001"
    m = read_mammogram(ds)
    v = _ramp(12).astype(float) * 2 - 100
    np.testing.assert_allclose(m.pixels, np.clip((v - 3999.5) / 2000 + 0.5, 0, 1), atol=1e-6)
    nominal = read_mammogram(ds, apply_voi=False)
    # Without VOI the nominal output range is [−100, 8090].
    np.testing.assert_allclose(nominal.pixels, (v + 100) / 8190, atol=1e-6)


@pytest.mark.parametrize(
    "tsuid",
    [JPEG2000Lossless, JPEGLSLossless, RLELossless, JPEGLosslessSV1],
    ids=["jpeg2000", "jpegls", "rle", "jpeg-lossless-sv1"],
)
@pytest.mark.parametrize("bits", [12, 16])
def test_compressed_transfer_syntaxes_decode_equal_to_uncompressed(tsuid: str, bits: int) -> None:
    if tsuid == JPEGLosslessSV1 and not jpeg_lossless_encoder_available():
        pytest.skip("no JPEG Lossless encoder: pylibjpeg-libjpeg decodes only; needs dcmcjpeg")
    ds = make_mg_dataset(bits_stored=bits, seed=5)
    plain = read_mammogram(ds)
    packed = _roundtrip(compress(ds, tsuid))
    assert packed.file_meta.TransferSyntaxUID == tsuid
    assert packed["PixelData"].is_undefined_length  # really encapsulated
    m = read_mammogram(packed)
    assert m.metadata.transfer_syntax_uid == tsuid
    np.testing.assert_array_equal(m.pixels, plain.pixels)


def test_imager_pixel_spacing_is_used_when_pixel_spacing_is_absent() -> None:
    ds = make_mg_dataset(pixel_spacing=None, imager_pixel_spacing=(0.085, 0.09))
    md = read_mammogram(ds).metadata
    assert md.pixel_spacing_mm == (0.085, 0.09)
    assert md.spacing_source == "ImagerPixelSpacing"


def test_imager_pixel_spacing_is_divided_by_the_magnification_factor() -> None:
    ds = make_mg_dataset(pixel_spacing=None, imager_pixel_spacing=(0.1, 0.1), magnification=1.25)
    md = read_mammogram(ds).metadata
    assert md.pixel_spacing_mm == pytest.approx((0.08, 0.08))
    assert md.spacing_source == "ImagerPixelSpacing/ERMF"


def test_pixel_spacing_wins_over_imager_pixel_spacing_and_magnification() -> None:
    ds = make_mg_dataset(pixel_spacing=(0.05, 0.05), magnification=1.5)
    assert ds.ImagerPixelSpacing == [0.075, 0.075]
    md = read_mammogram(ds).metadata
    assert md.pixel_spacing_mm == (0.05, 0.05)
    assert md.spacing_source == "PixelSpacing"


def test_for_processing_images_are_accepted() -> None:
    ds = make_mg_dataset(for_processing=True, bits_stored=14, seed=6)
    assert "WindowCenter" not in ds
    m = read_mammogram(_roundtrip(ds))
    assert m.metadata.sop_class_uid == MG_FOR_PROCESSING
    assert m.metadata.presentation_intent == "FOR PROCESSING"
    np.testing.assert_allclose(m.pixels, synthetic_breast(256, 192, seed=6), atol=1e-4)


def test_view_falls_back_to_view_code_sequence_and_laterality_to_series() -> None:
    ds = make_mg_dataset(view="MLO", laterality="R")
    ds.ViewPosition = ""
    del ds.ImageLaterality
    ds.Laterality = "R"
    md = read_mammogram(ds).metadata
    assert (md.view, md.laterality) == ("MLO", "R")


def test_dataset_without_file_meta_is_read_as_native_pixel_data() -> None:
    ds = make_mg_dataset(seed=7)
    expected = read_mammogram(ds).pixels
    del ds.file_meta
    np.testing.assert_array_equal(read_mammogram(ds).pixels, expected)


def test_check_header_accepts_a_header_read_without_pixel_data(tmp_path: Path) -> None:
    path = _write(make_mg_dataset(), tmp_path / "mg.dcm")
    header = pydicom.dcmread(path, stop_before_pixels=True)
    check_mammogram_header(header, require_pixel_data=False)
    with pytest.raises(InvalidImageError, match="missing pixel data"):
        check_mammogram_header(header)


# ---------------------------------------------------------------- bad input


def _mg_without(keyword: str) -> Dataset:
    ds = make_mg_dataset()
    delattr(ds, keyword)
    return ds


def _mg_with(**attrs: object) -> Dataset:
    ds = make_mg_dataset()
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def _mg_rgb() -> Dataset:
    ds = make_mg_dataset(rows=32, columns=32)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = np.zeros((32, 32, 3), np.uint8).tobytes()
    return ds


def _mg_multiframe() -> Dataset:
    ds = make_mg_dataset(rows=32, columns=32)
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    return ds


def _mg_corrupt_jpeg2000() -> Dataset:
    ds = compress(make_mg_dataset(rows=64, columns=64), JPEG2000Lossless)
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])
    return _roundtrip(ds)


def _mg_unknown_transfer_syntax() -> Dataset:
    ds = make_mg_dataset()
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6"
    return ds


BAD_DATASETS = {
    "ct": (lambda: make_ct_dataset(), r"wrong SOP class CT Image Storage"),
    "secondary-capture": (
        lambda: make_secondary_capture_dataset(modality="MG"),
        r"wrong SOP class Secondary Capture Image Storage",
    ),
    "mg-class-with-ct-modality": (lambda: _mg_with(Modality="CT"), r"wrong modality CT"),
    "missing-pixel-data": (lambda: _mg_without("PixelData"), r"missing pixel data"),
    "rgb": (_mg_rgb, r"colour or non-greyscale image \(SamplesPerPixel 3"),
    "multi-frame": (_mg_multiframe, r"multi-frame image \(2 frames\)"),
    "missing-spacing": (
        lambda: make_mg_dataset(pixel_spacing=None, imager_pixel_spacing=None),
        r"no pixel spacing",
    ),
    "zero-spacing": (lambda: _mg_with(PixelSpacing=["0", "0.1"]), r"absurd PixelSpacing"),
    "huge-spacing": (lambda: _mg_with(PixelSpacing=["5", "5"]), r"absurd PixelSpacing"),
    "one-valued-spacing": (lambda: _mg_with(PixelSpacing="0.1"), r"PixelSpacing must have 2"),
    "absurd-magnification": (
        lambda: make_mg_dataset(
            pixel_spacing=None, imager_pixel_spacing=(0.1, 0.1), magnification=40.0
        ),
        r"absurd EstimatedRadiographicMagnificationFactor",
    ),
    "no-sop-class": (lambda: _mg_without("SOPClassUID"), r"no SOPClassUID"),
    "bits-allocated-32": (lambda: _mg_with(BitsAllocated=32), r"unsupported bit depth"),
    "tiny-image": (lambda: make_mg_dataset(rows=4, columns=4), r"absurd image size: Rows 4"),
    "corrupt-jpeg2000": (_mg_corrupt_jpeg2000, r"cannot decode pixel data \(JPEG 2000"),
    "unknown-transfer-syntax": (
        _mg_unknown_transfer_syntax,
        r"transfer syntax .*1\.2\.3\.4\.5\.6.* cannot be decoded",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_DATASETS))
def test_invalid_datasets_raise_invalid_image_error_naming_the_problem(case: str) -> None:
    make, pattern = BAD_DATASETS[case]
    with pytest.raises(InvalidImageError, match=pattern) as info:
        read_mammogram(make())
    assert not any(s in str(info.value) for s in PATIENT_STRINGS)


@pytest.mark.parametrize(
    "case", ["ct", "secondary-capture", "missing-pixel-data", "rgb", "missing-spacing"]
)
def test_check_header_rejects_what_read_rejects(case: str) -> None:
    make, pattern = BAD_DATASETS[case]
    with pytest.raises(InvalidImageError, match=pattern):
        check_mammogram_header(make())


def test_check_header_accepts_a_valid_mammogram_of_each_intent() -> None:
    check_mammogram_header(make_mg_dataset())
    check_mammogram_header(make_mg_dataset(for_processing=True))
    check_mammogram_header(compress(make_mg_dataset(), JPEGLSLossless))


def test_random_bytes_file_is_not_dicom(tmp_path: Path) -> None:
    path = tmp_path / "noise.dcm"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(InvalidImageError, match="not a DICOM file"):
        read_mammogram(path)


def test_file_truncated_inside_pixel_data_is_reported_truncated(tmp_path: Path) -> None:
    data = (_write(make_mg_dataset(), tmp_path / "mg.dcm")).read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidImageError, match=r"truncated pixel data: \d+ of 98304 bytes"):
        read_mammogram(path)


def test_file_truncated_inside_the_header_is_reported(tmp_path: Path) -> None:
    data = (_write(make_mg_dataset(), tmp_path / "mg.dcm")).read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[:700])
    with pytest.raises(InvalidImageError, match=r"truncated|missing pixel data|no \w+"):
        read_mammogram(path)


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_compressed_file_truncated_is_undecodable(tmp_path: Path) -> None:
    path = _write(compress(make_mg_dataset(), JPEGLSLossless), tmp_path / "ls.dcm")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 2000])
    with pytest.raises(InvalidImageError, match=r"truncated|cannot decode"):
        read_mammogram(path)


def test_missing_file_raises_os_error_not_invalid_image(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_mammogram(tmp_path / "absent.dcm")


def test_source_of_wrong_type_raises_type_error() -> None:
    with pytest.raises(TypeError, match="source must be"):
        read_mammogram(42)  # type: ignore[arg-type]


def test_mammogram_rejects_pixels_not_matching_metadata() -> None:
    m = read_mammogram(make_mg_dataset())
    with pytest.raises(ValueError, match="differs from the metadata"):
        Mammogram(pixels=np.zeros((3, 3), np.float32), metadata=m.metadata)
    with pytest.raises(TypeError, match="float32"):
        Mammogram(pixels=m.pixels.astype(np.float64), metadata=m.metadata)


# ---------------------------------------------------------------- external validator


@pytest.mark.external
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {
            "photometric": "MONOCHROME1",
            "voi": "lut",
            "laterality": "R",
            "view": "MLO",
            "pixel_spacing": None,
            "imager_pixel_spacing": (0.1, 0.1),
            "magnification": 1.5,
        },
        {"for_processing": True, "bits_stored": 14},
        {"voi": "sigmoid", "bits_stored": 16},
    ],
    ids=["default", "mono1-lut-mag", "for-processing", "sigmoid-16bit"],
)
def test_factory_dataset_passes_dciodvfy_without_errors(tmp_path: Path, kwargs: dict) -> None:
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    path = _write(make_mg_dataset(**kwargs), tmp_path / "mg.dcm")
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    report = proc.stdout + proc.stderr
    assert "MammographyImageFor" in report
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert errors == []
