"""The physics phantom: determinism, truth, vendor variety and MG headers."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import JPEG2000Lossless

from cascade.data.manifest import read_manifest
from cascade.synthesis import (
    MG_FOR_PRESENTATION,
    NEGATIVE_FRACTION,
    PROFILES,
    VENDORS,
    PhantomImage,
    PhantomProfile,
    PhantomStudy,
    display_from_stored,
    generate_dataset,
    phantom_to_dataset,
    render_image,
)

STUDY = PhantomStudy(
    patient_name="PHANTOM^0001",
    patient_id="PH-0001",
    patient_birth_date="19700101",
    patient_age="054Y",
    study_instance_uid="1.2.826.0.1.3680043.8.498.1",
    study_date="20240101",
    study_time="101010",
    accession_number="A1",
    study_id="1",
)


def _render(seed: int, **kw: object) -> PhantomImage:
    kw.setdefault("vendor", "ge")  # the smallest grid: fastest
    return render_image(np.random.default_rng(seed), **kw)  # type: ignore[arg-type]


def _dataset(image: PhantomImage) -> pydicom.Dataset:
    ds = phantom_to_dataset(
        image,
        study=STUDY,
        series_instance_uid="1.2.826.0.1.3680043.8.498.2",
        sop_instance_uid="1.2.826.0.1.3680043.8.498.3",
    )
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantom")
    generate_dataset(out, count=6, seed=11, preview=True, progress=False)
    return out


@pytest.fixture(scope="module")
def vendor_images() -> dict[str, PhantomImage]:
    return {
        v: _render(3, vendor=v, view="MLO", laterality="R", positive=True) for v in sorted(VENDORS)
    }


# --------------------------------------------------------------------------- determinism
def test_render_image_is_identical_for_the_same_seed() -> None:
    a, b = _render(5, positive=True), _render(5, positive=True)
    assert np.array_equal(a.pixels, b.pixels)
    assert a.calcifications == b.calcifications
    assert a.others == b.others


def test_render_image_differs_between_seeds() -> None:
    a, b = _render(5), _render(6)
    assert not np.array_equal(a.pixels, b.pixels)


def test_generate_dataset_same_seed_gives_identical_pixels_and_uids(tmp_path: Path) -> None:
    m1 = generate_dataset(tmp_path / "a", count=2, seed=4, progress=False)
    m2 = generate_dataset(tmp_path / "b", count=2, seed=4, progress=False)
    r1, r2 = read_manifest(m1), read_manifest(m2)
    assert [r.sop_instance_uid for r in r1] == [r.sop_instance_uid for r in r2]
    for a, b in zip(r1, r2, strict=True):
        da, db = pydicom.dcmread(a.path), pydicom.dcmread(b.path)
        assert da.StudyInstanceUID == db.StudyInstanceUID
        assert da.SeriesInstanceUID == db.SeriesInstanceUID
        assert np.array_equal(da.pixel_array, db.pixel_array)
    assert (tmp_path / "a" / "manifest.jsonl").read_text() != ""


# --------------------------------------------------------------------------- geometry / truth
def test_small_profile_is_a_10_by_7_cm_field(vendor_images: dict[str, PhantomImage]) -> None:
    for image in vendor_images.values():
        assert image.rows * image.spacing_mm == pytest.approx(100.0, abs=0.1)
        assert image.columns * image.spacing_mm == pytest.approx(70.0, abs=0.1)


@pytest.mark.parametrize("laterality", ["L", "R"])
def test_chest_wall_is_on_the_side_given_by_laterality(laterality: str) -> None:
    image = _render(8, laterality=laterality, view="CC")
    mask = image.breast_mask
    wall, far = (0, -1) if laterality == "L" else (-1, 0)
    assert mask[:, wall].mean() > 0.6
    assert mask[:, far].mean() == 0.0
    # Air is darkest after display mapping, tissue brighter.
    assert image.display[~mask].mean() < image.display[mask].mean() - 0.3


def test_mlo_has_a_pectoral_muscle_in_the_upper_chest_wall_corner() -> None:
    image = _render(9, view="MLO", laterality="L")
    assert image.muscle_mask is not None and image.muscle_mask.any()
    rows, cols = np.nonzero(image.muscle_mask)
    assert rows.mean() < image.rows / 2 and cols.mean() < image.columns / 2
    assert _render(9, view="CC").muscle_mask is None


def test_calcification_truth_lies_inside_image_and_breast(
    vendor_images: dict[str, PhantomImage],
) -> None:
    n = 0
    for image in vendor_images.values():
        for c in image.calcifications:
            assert 0 <= c.x <= image.columns - 1 and 0 <= c.y <= image.rows - 1
            assert image.breast_mask[round(c.y), round(c.x)]
            assert 0.1 <= c.diameter_mm <= 1.0
            assert 0.0 < c.peak_contrast <= 0.3
            n += 1
    assert n >= 20


def test_calcification_truth_marks_a_brighter_spot(vendor_images: dict[str, PhantomImage]) -> None:
    # The log image at the truth centre exceeds its 1-mm surroundings' median for strong µCs.
    hits = total = 0
    for image in vendor_images.values():
        r = round(1.0 / image.spacing_mm)
        for c in image.calcifications:
            if c.peak_contrast < 0.12:
                continue
            y, x = round(c.y), round(c.x)
            patch = image.log_image[max(y - r, 0) : y + r + 1, max(x - r, 0) : x + r + 1]
            centre = image.log_image[y - 1 : y + 2, x - 1 : x + 2].max()
            total += 1
            hits += centre > np.median(patch) + 0.5 * c.peak_contrast
    assert total > 0 and hits / total > 0.8


def test_clusters_have_hulls_and_member_indices(vendor_images: dict[str, PhantomImage]) -> None:
    for image in vendor_images.values():
        for c in image.calcifications:
            if c.cluster is not None:
                assert 0 <= c.cluster < len(image.clusters)
        for hull in image.clusters:
            assert len(hull) >= 3


def test_macro_calcifications_are_others_larger_than_1_mm() -> None:
    found = 0
    for seed in range(20, 32):
        image = _render(seed, positive=False)
        assert image.calcifications == ()
        for o in image.others:
            assert o.kind in ("vascular", "macro")
            if o.kind == "macro":
                pts = np.array(o.points)
                extent_mm = (pts.max(axis=0) - pts.min(axis=0)).max() * image.spacing_mm
                assert extent_mm > 1.0 and o.closed
                found += 1
        if found >= 2:
            break
    assert found >= 2


def test_vascular_calcifications_are_tram_track_polylines() -> None:
    for seed in range(40, 80):
        image = _render(seed, positive=False)
        walls = [o for o in image.others if o.kind == "vascular"]
        if walls:
            break
    else:
        pytest.fail("no vascular calcification in 40 images")
    assert len(walls) >= 2
    assert all(not w.closed and len(w.points) >= 2 for w in walls)


# --------------------------------------------------------------------------- vendors / DICOM
def test_vendors_vary_spacing_bits_photometric_and_voi(
    vendor_images: dict[str, PhantomImage],
) -> None:
    spacings = {round(im.spacing_mm, 3) for im in vendor_images.values()}
    assert spacings == {0.05, 0.07, 0.085, 0.1}
    assert {im.bits_stored for im in vendor_images.values()} == {12, 14}
    ge = vendor_images["ge"]
    assert ge.photometric == "MONOCHROME1" and ge.voi_function == "SIGMOID"
    assert vendor_images["hologic"].photometric == "MONOCHROME2"
    for im in vendor_images.values():
        assert im.pixels.dtype == np.uint16
        assert int(im.pixels.max()) <= (1 << im.bits_stored) - 1


def test_display_is_the_header_voi_applied_to_stored_pixels(
    vendor_images: dict[str, PhantomImage],
) -> None:
    for im in vendor_images.values():
        ds = _dataset(im)
        shown = display_from_stored(
            ds.pixel_array,
            center=float(ds.WindowCenter),
            width=float(ds.WindowWidth),
            function=ds.VOILUTFunction,
            photometric=ds.PhotometricInterpretation,
            bits_stored=ds.BitsStored,
        )
        np.testing.assert_allclose(shown, im.display, atol=1e-5)


def test_jpeg2000_lossless_files_decode_exactly() -> None:
    image = _render(12, transfer_syntax=JPEG2000Lossless)
    ds = _dataset(image)
    assert ds.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert np.array_equal(ds.pixel_array, image.pixels)


def test_jpeg2000_files_keep_the_sop_instance_uid_of_the_manifest() -> None:
    # pydicom's compress() would otherwise draw a new random UID, and evaluation that
    # pairs detections with the manifest by UID would silently find nothing.
    ds = _dataset(_render(12, transfer_syntax=JPEG2000Lossless))
    assert ds.SOPInstanceUID == "1.2.826.0.1.3680043.8.498.3"
    assert ds.file_meta.MediaStorageSOPInstanceUID == "1.2.826.0.1.3680043.8.498.3"


@pytest.mark.parametrize(
    ("laterality", "view", "orientation"),
    [
        ("L", "CC", ["A", "R"]),
        ("R", "CC", ["P", "L"]),
        ("L", "MLO", ["A", "FR"]),
        ("R", "MLO", ["P", "FL"]),
    ],
)
def test_header_has_mg_for_presentation_attributes(
    laterality: str, view: str, orientation: list[str]
) -> None:
    image = _render(13, laterality=laterality, view=view)
    ds = _dataset(image)
    assert ds.SOPClassUID == MG_FOR_PRESENTATION
    assert ds.Modality == "MG"
    assert ds.PresentationIntentType == "FOR PRESENTATION"
    assert list(ds.ImageType)[:2] == ["ORIGINAL", "PRIMARY"]
    assert [float(v) for v in ds.PixelSpacing] == [0.1, 0.1]
    assert [float(v) for v in ds.ImagerPixelSpacing] == [0.1, 0.1]
    assert ds.ImageLaterality == laterality
    assert ds.ViewPosition == view
    code = ds.ViewCodeSequence[0]
    assert code.CodingSchemeDesignator == "SCT"
    assert code.CodeValue == {"CC": "399162004", "MLO": "399368009"}[view]
    assert list(ds.PatientOrientation) == orientation
    assert ds.BodyPartExamined == "BREAST"
    assert ds.BurnedInAnnotation == "NO"
    assert ds.VOILUTFunction in ("LINEAR", "SIGMOID")
    assert float(ds.WindowWidth) > 1
    assert ds.Manufacturer == "GE MEDICAL SYSTEMS"
    assert str(ds.PatientName).startswith("PHANTOM^")
    assert (ds.Rows, ds.Columns) == image.pixels.shape


# --------------------------------------------------------------------------- datasets
def test_dataset_groups_images_into_studies_sharing_patient_and_study(dataset_dir: Path) -> None:
    records = read_manifest(dataset_dir / "manifest.jsonl")
    assert len(records) == 6
    by_study: dict[str, list[pydicom.Dataset]] = defaultdict(list)
    for r in records:
        ds = pydicom.dcmread(r.path, stop_before_pixels=True)
        assert ds.StudyInstanceUID == r.study_instance_uid
        by_study[ds.StudyInstanceUID].append(ds)
    for images in by_study.values():
        assert 2 <= len(images) <= 4
        assert len({d.PatientID for d in images}) == 1
        assert len({d.Manufacturer for d in images}) == 1
        assert len({(d.ImageLaterality, d.ViewPosition) for d in images}) == len(images)
    assert len({r.sop_instance_uid for r in records}) == 6


def test_manifest_truth_is_valid_and_tagged(dataset_dir: Path) -> None:
    records = read_manifest(dataset_dir / "manifest.jsonl")
    for r in records:
        assert r.path.is_file()
        for c in r.calcifications:
            assert 0 <= c.x <= r.columns - 1 and 0 <= c.y <= r.rows - 1
            assert c.diameter_mm is not None and c.diameter_mm <= 1.0
        for o in r.others:
            assert o.kind in ("vascular", "macro")
        assert {
            "vendor",
            "density",
            "view",
            "laterality",
            "photometric",
            "voi",
            "transfer_syntax",
            "size",
        } <= set(r.tags)
        assert r.tags["size"] == "small"
    negatives = sum(1 for r in records if not r.calcifications)
    assert 1 <= negatives <= 5
    assert 0.3 <= NEGATIVE_FRACTION <= 0.5


def test_previews_are_written_for_every_image(dataset_dir: Path) -> None:
    records = read_manifest(dataset_dir / "manifest.jsonl")
    pngs = sorted((dataset_dir / "previews").rglob("*.png"))
    assert len(pngs) == len(records)
    with Image.open(pngs[0]) as im:
        assert im.mode == "RGB" and min(im.size) > 200


@pytest.mark.external
@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) absent")
def test_dciodvfy_finds_no_errors(dataset_dir: Path, tmp_path: Path) -> None:
    files = sorted(dataset_dir.rglob("*.dcm"))
    j2k = tmp_path / "j2k.dcm"
    phantom_to_dataset(
        _render(14, transfer_syntax=JPEG2000Lossless),
        study=STUDY,
        series_instance_uid="1.2.826.0.1.3680043.8.498.2",
        sop_instance_uid="1.2.826.0.1.3680043.8.498.4",
    ).save_as(j2k, enforce_file_format=True)
    for f in [*files, j2k]:
        proc = subprocess.run(
            ["dciodvfy", str(f)], capture_output=True, text=True, timeout=60, check=False
        )
        errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")]
        assert errors == [], f"{f}: {errors}"


@pytest.mark.slow
def test_full_field_hologic_has_the_detector_matrix() -> None:
    image = render_image(np.random.default_rng(1), vendor="hologic", size="full")
    assert image.pixels.shape == (4096, 3328)
    assert image.breast_mask.mean() > 0.3


def test_generate_dataset_draws_only_the_vendors_asked_for(tmp_path: Path) -> None:
    manifest = generate_dataset(tmp_path, count=3, seed=5, vendors=["fuji"], progress=False)
    records = read_manifest(manifest)
    assert len(records) == 3
    assert {r.tags["vendor"] for r in records} == {"fuji"}
    assert {r.pixel_spacing_mm for r in records} == {(0.05, 0.05)}


def test_cli_vendor_choices_are_the_phantom_vendors() -> None:
    from cascade.synthesis import VENDORS
    from node.cli import PHANTOM_VENDORS

    assert tuple(sorted(VENDORS)) == PHANTOM_VENDORS


# --------------------------------------------------------------------------- profiles
# sha256 of ``render_image(np.random.default_rng(7), vendor="ge").pixels.tobytes()`` and of
# the repr of its µC truth, computed with the code of commit 4cdac70 (before profiles
# existed) from ``git archive``: the standard profile must keep every old seed's render.
STANDARD_SEED7_PIXELS = "fa70c41a07056504f734beaaabd0aa2d3a86288a4c71c71034b2d1d851545432"
STANDARD_SEED7_TRUTH = "3c3f8269223dbdaddaeaa68d07cdd6813cad6d5faaf2a4d41d5e4330a6c1fabf"


@pytest.fixture(scope="module")
def profile_images() -> dict[str, list[PhantomImage]]:
    images = {"standard": [_render(7, profile="standard")]}
    for name in ("wide", "subtle", "faint"):
        images[name] = [_render(seed, profile=name, positive=True) for seed in (7, 8)]
    return images


def _truth_digest(image: PhantomImage) -> str:
    truth = [
        (c.x, c.y, c.diameter_mm, c.peak_contrast, c.shape, c.cluster) for c in image.calcifications
    ]
    return hashlib.sha256(repr(truth).encode()).hexdigest()


def test_standard_profile_renders_exactly_what_the_phantom_rendered_before_profiles(
    profile_images: dict[str, list[PhantomImage]],
) -> None:
    image = profile_images["standard"][0]
    assert len(image.calcifications) == 34
    assert hashlib.sha256(image.pixels.tobytes()).hexdigest() == STANDARD_SEED7_PIXELS
    assert _truth_digest(image) == STANDARD_SEED7_TRUTH
    assert image.profile == "standard" and image.tags["profile"] == "standard"


def test_faint_profile_has_microcalcifications_near_the_noise_floor(
    profile_images: dict[str, list[PhantomImage]],
) -> None:
    def contrasts(name: str) -> np.ndarray:
        return np.array([c.peak_contrast for im in profile_images[name] for c in im.calcifications])

    standard, faint, wide = contrasts("standard"), contrasts("faint"), contrasts("wide")
    assert len(faint) >= 20 and len(wide) >= 20
    assert np.median(faint) < 0.5 * np.median(standard)
    assert np.median(faint) < 0.05
    # Down to the quantum-noise floor (σ/S of one 100-µm GE pixel ≈ 1.6 %).
    assert np.quantile(faint, 0.1) < 0.025 and np.quantile(wide, 0.1) < 0.03
    assert faint.max() <= 0.12


def test_subtle_profile_has_lower_contrast_than_standard_and_more_than_faint(
    profile_images: dict[str, list[PhantomImage]],
) -> None:
    def median_contrast(name: str) -> float:
        values = [c.peak_contrast for im in profile_images[name] for c in im.calcifications]
        return float(np.median(values))

    assert PROFILES["faint"].contrast_median < PROFILES["subtle"].contrast_median
    assert PROFILES["subtle"].contrast_median < PROFILES["standard"].contrast_median
    assert median_contrast("faint") < median_contrast("subtle") < median_contrast("standard")


def test_wide_profile_sizes_span_0_1_to_1_mm(profile_images: dict[str, list[PhantomImage]]) -> None:
    sizes = np.array([c.diameter_mm for im in profile_images["wide"] for c in im.calcifications])
    assert sizes.min() >= 0.1 and sizes.max() <= 1.0
    assert sizes.min() < 0.15 and sizes.max() > 0.7
    assert (sizes >= 0.5).mean() > 0.15  # log-uniform: ≈ 30 % are 0.5–1 mm
    subtle = [c.diameter_mm for im in profile_images["subtle"] for c in im.calcifications]
    assert np.median(subtle) < 0.3  # mostly small


def test_wide_and_subtle_profiles_draw_branching_and_pleomorphic_shapes(
    profile_images: dict[str, list[PhantomImage]],
) -> None:
    old = {"ellipsoid", "lobulated", "linear"}
    assert {c.shape for c in profile_images["standard"][0].calcifications} <= old
    for name in ("wide", "subtle", "faint"):
        shapes = {c.shape for im in profile_images[name] for c in im.calcifications}
        assert {"branching", "pleomorphic"} <= shapes, name
        for im in profile_images[name]:
            for c in im.calcifications:
                assert im.breast_mask[round(c.y), round(c.x)]
                assert c.outline is not None and len(c.outline) >= 3


def test_wide_and_subtle_profiles_have_about_half_normal_images() -> None:
    from cascade.synthesis.render import _draw_density

    def planned_positive(seed: int, name: str) -> bool:
        # render_image's own first draws: the density class, then positive or not.
        rng = np.random.default_rng(seed)
        _draw_density(rng, name)
        return PROFILES[name].draw_positive(rng)

    for name in ("wide", "subtle", "faint"):
        plan = [planned_positive(seed, name) for seed in range(40)]
        assert 0.35 <= 1 - np.mean(plan) <= 0.65, name
    assert PROFILES["standard"].negative_fraction == NEGATIVE_FRACTION
    # render_image follows that plan.
    plan = [planned_positive(seed, "wide") for seed in range(40)]
    neg, pos = plan.index(False), plan.index(True)
    assert _render(neg, profile="wide").calcifications == ()
    assert len(_render(pos, profile="wide").calcifications) > 0


def test_manifest_records_the_profile(dataset_dir: Path, tmp_path: Path) -> None:
    assert {r.tags["profile"] for r in read_manifest(dataset_dir / "manifest.jsonl")} == {
        "standard"
    }
    manifest = generate_dataset(tmp_path, count=2, seed=3, profile="subtle", progress=False)
    assert {r.tags["profile"] for r in read_manifest(manifest)} == {"subtle"}


def test_cli_profile_choices_are_the_phantom_profiles() -> None:
    from node.cli import build_parser

    parser = build_parser()
    for name in PROFILES:
        assert parser.parse_args(["phantom", "--out", "x", "--profile", name]).profile == name
    assert parser.parse_args(["phantom", "--out", "x"]).profile == "standard"
    with pytest.raises(SystemExit):
        parser.parse_args(["phantom", "--out", "x", "--profile", "hard"])


def test_phantom_profile_rejects_inconsistent_distributions() -> None:
    import dataclasses

    base = PROFILES["wide"]
    with pytest.raises(ValueError, match="negative_fraction"):
        dataclasses.replace(base, negative_fraction=1.0)
    with pytest.raises(ValueError, match="shape_probabilities"):
        dataclasses.replace(base, shape_probabilities=(("star", 1.0),))
    with pytest.raises(ValueError, match="shape_probabilities"):
        dataclasses.replace(base, shape_probabilities=(("linear", 0.5),))
    with pytest.raises(ValueError, match="contrast_range"):
        dataclasses.replace(base, contrast_range=(0.2, 0.1))
    assert isinstance(base, PhantomProfile)


# --------------------------------------------------------------------------- invalid input
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"count": 0, "seed": 1}, "count"),
        ({"count": 2, "seed": -1}, "seed"),
        ({"count": 2, "seed": 1, "size": "huge"}, "size"),
        ({"count": True, "seed": 1}, "count"),
        ({"count": 2, "seed": 1, "vendors": ["acme"]}, "vendors"),
        ({"count": 2, "seed": 1, "vendors": []}, "vendors"),
        ({"count": 2, "seed": 1, "profile": "hard"}, "profile"),
    ],
)
def test_generate_dataset_rejects_bad_arguments(tmp_path: Path, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        generate_dataset(tmp_path, progress=False, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"vendor": "acme"}, "vendor"),
        ({"view": "ML"}, "view"),
        ({"laterality": "B"}, "laterality"),
        ({"size": "tiny"}, "size"),
        ({"density": "extreme"}, "density"),
        ({"photometric": "RGB"}, "photometric"),
        ({"transfer_syntax": "1.2.3"}, "transfer_syntax"),
        ({"profile": "wider"}, "profile"),
    ],
)
def test_render_image_rejects_bad_arguments(kwargs: dict, name: str) -> None:
    args = {"vendor": "ge", **kwargs}
    with pytest.raises(ValueError, match=name):
        render_image(np.random.default_rng(0), **args)


def test_render_image_needs_a_generator() -> None:
    with pytest.raises(TypeError, match="rng"):
        render_image(0, vendor="ge")  # type: ignore[arg-type]


def test_display_from_stored_rejects_unknown_function() -> None:
    with pytest.raises(ValueError, match="function"):
        display_from_stored(
            np.zeros((2, 2), np.uint16),
            center=1,
            width=2,
            function="LOG",
            photometric="MONOCHROME2",
            bits_stored=12,
        )


def test_phantom_study_rejects_bad_dates_and_empty_ids() -> None:
    with pytest.raises(ValueError, match="study_date"):
        PhantomStudy("PHANTOM^1", "P", "19700101", "054Y", "1.2.3", "2024-01-01", "1", "A", "1")
    with pytest.raises(ValueError, match="patient_id"):
        PhantomStudy("PHANTOM^1", "", "19700101", "054Y", "1.2.3", "20240101", "1", "A", "1")


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_phantom_to_dataset_rejects_invalid_uids() -> None:
    image = _render(0)
    with pytest.raises(ValueError, match="sop_instance_uid"):
        phantom_to_dataset(
            image, study=STUDY, series_instance_uid="1.2.3", sop_instance_uid="not a uid"
        )
    with pytest.raises(TypeError, match="study"):
        phantom_to_dataset(
            image,
            study="x",
            series_instance_uid="1.2.3",  # type: ignore[arg-type]
            sop_instance_uid="1.2.4",
        )
