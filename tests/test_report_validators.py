"""Every result object passes dciodvfy, dsrdump and PixelMed's DicomSRValidator.

No errors are allowed. The warnings left are whitelisted here by their exact text
and explained in docs/conformance.md; any other warning fails the test. Scenarios:
with and without findings, two images L/R, MONOCHROME1, 100-µm and 50-µm spacing,
For Processing, findings below the operating point (Presentation Optional), VOI LUT.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from cascade.inference.detector import Detection, ImageDetections
from node.reports import Provenance, build_cad_sr, build_gsps, build_seg, build_tid1500_sr
from tests import validators as v
from tests.factories import make_mg_dataset
from tests.helpers import built_once

# One worker builds and validates every object once (PixelMed: one JVM for all files).
pytestmark = [pytest.mark.external, pytest.mark.xdist_group("report_validators")]

#: dciodvfy (dicom3tools 2022) does not know Device UID (0018,1002), which calcnode writes
#: in General Equipment and in the Contributing Equipment item (see docs/conformance.md).
DCIODVFY_ALLOWED = frozenset(
    {
        "Warning - Attribute is not present in standard DICOM IOD - (0x0018,0x1002) UI Device UID",
        "Warning - Dicom dataset contains attributes not present in standard DICOM IOD - "
        "this is a Standard Extended SOP Class",
    }
)
#: dsrdump (DCMTK 3.6.7) says this for every Mammography CAD SR, whatever it holds.
DSRDUMP_ALLOWED_CAD = frozenset({v.DSRDUMP_ALWAYS})
DSRDUMP_ALLOWED_TID1500: frozenset[str] = frozenset()
PIXELMED_ALLOWED: frozenset[str] = frozenset()
#: Each TID 1500 finding carries its label as a Comment (121106, DCM) TEXT, the item OHIF
#: reads a tracked measurement's label from. PixelMed (2022) has no TEXT row in TID 1501
#: (an extensible template) and says "Content Item not in template", which
#: tests/validators.py counts as an error. This one item, and nothing else, is accepted
#: (docs/conformance.md, "Viewer conventions").
PIXELMED_TID1500_COMMENT = re.compile(
    r"Warning: [0-9.]+: /CONTAINER \(126000,DCM,\"Imaging Measurement Report\"\)"
    r"/CONTAINER \(126010,DCM,\"Imaging Measurements\"\)"
    r"/CONTAINER \(125007,DCM,\"Measurement Group\"\)"
    r"/TEXT \(121106,DCM,\"Comment\"\): Content Item not in template"
)

needs_dciodvfy = pytest.mark.skipif(not v.have_dciodvfy(), reason="dciodvfy not installed")

PROVENANCE = Provenance(
    algorithm_name="calcnode uC cascade",
    algorithm_version="0.1.0",
    model_version="phantom-2024-01",
    device_uid="1.2.826.0.1.3680043.8.498.1234567890",
    institution_name="Phantom Lab",
    station_name="CALCNODE1",
)

Study = list[tuple[Dataset, ImageDetections]]


def _dets(ds: Dataset, points: list[tuple[float, float, float]]) -> ImageDetections:
    """Detections at (x = column, y = row, score) in ``ds``'s grid."""
    spacing = [float(s) for s in ds.PixelSpacing]
    return ImageDetections(
        sop_instance_uid=str(ds.SOPInstanceUID),
        path="unused.dcm",
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        pixel_spacing_mm=(spacing[0], spacing[1]),
        detections=tuple(
            Detection(x=x, y=y, score=s, asn_score=1.0, fpr_score=min(s, 1.0), radius_px=2.5)
            for x, y, s in points
        ),
    )


# A cluster of three within a few mm, one isolated calcification, one weak mark.
FINDINGS = [(40.0, 60.0, 0.9), (44.0, 63.0, 0.8), (41.0, 68.0, 0.75), (120.0, 200.0, 0.95)]
WEAK = [(90.0, 30.0, 0.3)]


def _study(name: str) -> Study:
    uid = generate_uid()
    if name == "findings_two_images_LR_100um":
        left = make_mg_dataset(study_uid=uid, laterality="L", view="CC")
        right = make_mg_dataset(study_uid=uid, laterality="R", view="MLO")
        return [(left, _dets(left, FINDINGS)), (right, _dets(right, FINDINGS[:1]))]
    if name == "without_findings":
        left = make_mg_dataset(study_uid=uid, laterality="L")
        right = make_mg_dataset(study_uid=uid, laterality="R")
        return [(left, _dets(left, [])), (right, _dets(right, []))]
    if name == "monochrome1":
        mg = make_mg_dataset(study_uid=uid, photometric="MONOCHROME1", laterality="R")
        return [(mg, _dets(mg, FINDINGS))]
    if name == "spacing_100um":
        mg = make_mg_dataset(study_uid=uid, pixel_spacing=(0.1, 0.1))
        return [(mg, _dets(mg, FINDINGS))]
    if name == "spacing_50um":
        mg = make_mg_dataset(study_uid=uid, pixel_spacing=(0.05, 0.05), rows=300, columns=240)
        return [(mg, _dets(mg, FINDINGS))]
    if name == "for_processing":
        mg = make_mg_dataset(study_uid=uid, for_processing=True)
        return [(mg, _dets(mg, FINDINGS))]
    if name == "below_operating_point":
        mg = make_mg_dataset(study_uid=uid)
        return [(mg, _dets(mg, FINDINGS + WEAK))]
    if name == "voi_lut":
        mg = make_mg_dataset(study_uid=uid, voi="lut")
        return [(mg, _dets(mg, FINDINGS))]
    raise AssertionError(name)


SR_SCENARIOS = [
    "findings_two_images_LR_100um",
    "without_findings",
    "monochrome1",
    "spacing_50um",
    "for_processing",
    "below_operating_point",
]
IMAGE_SCENARIOS = [
    "findings_two_images_LR_100um",
    "without_findings",
    "monochrome1",
    "spacing_50um",
    "for_processing",
    "voi_lut",
]


def _write(ds: Dataset, path: Path) -> Path:
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def _check(found: v.Findings, allowed: frozenset[str]) -> None:
    assert found.errors == [], str(found)
    assert v.unexpected(found.warnings, allowed) == [], str(found)


def _cad(study: Study, scenario: str) -> list[Dataset]:
    return [
        build_cad_sr(
            study=study,
            provenance=PROVENANCE,
            series_instance_uid=generate_uid(),
            operating_point=0.5 if scenario == "below_operating_point" else None,
        )
    ]


def _tid1500(study: Study, scenario: str) -> list[Dataset]:
    """One report per image with findings (none for an image without)."""
    built = [
        build_tid1500_sr(
            source=mg, detections=dets, provenance=PROVENANCE, series_instance_uid=generate_uid()
        )
        for mg, dets in study
    ]
    return [sr for sr in built if sr is not None]


SR_BUILDERS: dict[str, tuple[Callable[[Study, str], list[Dataset]], frozenset[str], str]] = {
    "cad_sr": (_cad, DSRDUMP_ALLOWED_CAD, "TID_4000"),
    "tid1500": (_tid1500, DSRDUMP_ALLOWED_TID1500, "TID_1500"),
}


def _broken_reference(sr: Dataset) -> Dataset:
    """A CAD SR whose first SCOORD is SELECTED FROM the Image Library container."""
    for _, item in _walk(sr):
        if item.get("ValueType") == "SCOORD":
            item.ContentSequence[0].ReferencedContentItemIdentifier = [1, 2]
            return sr
    raise AssertionError("no SCOORD")


def _swapped_summaries(sr: Dataset) -> Dataset:
    """A CAD SR with Summary of Analyses before Summary of Detections (TID 4000 order)."""
    items = list(sr.ContentSequence)
    items[3], items[4] = items[4], items[3]
    sr.ContentSequence = items
    return sr


def _walk(ds: Dataset) -> Iterator[tuple[None, Dataset]]:
    for item in ds.get("ContentSequence", []):
        yield None, item
        yield from _walk(item)


def _validate_every_sr(folder: Path) -> None:
    """Build every SR scenario (and two broken CAD SRs) in ``folder``, validate each.

    PixelMed runs once over all files: its start-up dominates (10-25 s per JVM). The
    findings are pickled into ``folder / "findings.pickle"``.
    """
    files: dict[str, Path] = {}
    for kind, (builder, _, _) in SR_BUILDERS.items():
        for scenario in SR_SCENARIOS:
            for i, sr in enumerate(builder(_study(scenario), scenario)):
                files[f"{kind}/{scenario}/{i}"] = _write(sr, folder / f"{kind}-{scenario}-{i}.dcm")
    files["broken/reference"] = _write(
        _broken_reference(_cad(_study("spacing_100um"), "")[0]), folder / "broken-reference.dcm"
    )
    files["broken/order"] = _write(
        _swapped_summaries(_cad(_study("spacing_100um"), "")[0]), folder / "broken-order.dcm"
    )
    pixelmed = v.run_pixelmed_sr_many(list(files.values()))
    findings = {
        key: {
            "dciodvfy": v.run_dciodvfy(path),
            "dsrdump": v.run_dsrdump(path),
            "pixelmed": pixelmed[path],
        }
        for key, path in files.items()
    }
    (folder / "findings.pickle").write_bytes(pickle.dumps(findings))


@pytest.fixture(scope="session")
def sr_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, v.Findings]]:
    """What the three validators say of every SR scenario, computed once per test run.

    Once per run, not per worker: pytest-xdist has been seen to hand this module's tests to
    both workers despite its group, and each would otherwise run PixelMed again.
    """
    if not (v.have_dciodvfy() and v.have_dsrdump() and v.have_pixelmed()):
        pytest.skip("dciodvfy, dsrdump or java/pixelmed.jar missing")
    folder = built_once(tmp_path_factory, "sr_validation", _validate_every_sr)
    findings: dict[str, dict[str, v.Findings]] = pickle.loads(
        (folder / "findings.pickle").read_bytes()
    )
    return findings


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(SR_BUILDERS))
@pytest.mark.parametrize("scenario", SR_SCENARIOS)
def test_sr_passes_all_three_validators(
    kind: str, scenario: str, sr_results: dict[str, dict[str, v.Findings]]
) -> None:
    _, dsrdump_allowed, root_template = SR_BUILDERS[kind]
    reports = [found for key, found in sr_results.items() if key.startswith(f"{kind}/{scenario}/")]
    # One CAD SR per study; one TID 1500 SR per image with findings (none without).
    expected = 1 if kind == "cad_sr" else sum(1 for _, d in _study(scenario) if d.detections)
    assert len(reports) == expected
    for found in reports:
        _check(found["dciodvfy"], DCIODVFY_ALLOWED)
        _check(found["dsrdump"], dsrdump_allowed)
        pixelmed = found["pixelmed"]
        if kind == "tid1500":
            comments = [e for e in pixelmed.errors if PIXELMED_TID1500_COMMENT.fullmatch(e)]
            assert comments, pixelmed  # every finding has its label
            pixelmed = v.Findings(
                pixelmed.tool,
                errors=[e for e in pixelmed.errors if e not in comments],
                warnings=pixelmed.warnings,
                output=pixelmed.output,
            )
        _check(pixelmed, PIXELMED_ALLOWED)
        # PixelMed must have recognised the root template, or it checked nothing.
        assert f"Found Root Template {root_template}" in found["pixelmed"].output, found["pixelmed"]


@pytest.mark.slow
def test_validators_catch_a_selected_from_that_points_at_a_container(
    sr_results: dict[str, dict[str, v.Findings]],
) -> None:
    found = sr_results["broken/reference"]
    assert any("illegal relationship" in e for e in found["pixelmed"].errors), found["pixelmed"]


@pytest.mark.slow
def test_pixelmed_checks_the_order_of_tid_4000(
    sr_results: dict[str, dict[str, v.Findings]],
) -> None:
    found = sr_results["broken/order"]
    assert found["pixelmed"].errors, found["pixelmed"]


@needs_dciodvfy
@pytest.mark.parametrize("scenario", IMAGE_SCENARIOS)
def test_seg_passes_dciodvfy(scenario: str, tmp_path: Path) -> None:
    built = 0
    for i, (mg, dets) in enumerate(_study(scenario)):
        seg = build_seg(
            source=mg, detections=dets, provenance=PROVENANCE, series_instance_uid=generate_uid()
        )
        if seg is None:
            assert not dets.detections
            continue
        built += 1
        _check(v.run_dciodvfy(_write(seg, tmp_path / f"seg{i}.dcm")), DCIODVFY_ALLOWED)
    assert built == (0 if scenario == "without_findings" else len(_study(scenario)))


@needs_dciodvfy
@pytest.mark.parametrize("scenario", IMAGE_SCENARIOS)
def test_gsps_passes_dciodvfy(scenario: str, tmp_path: Path) -> None:
    for i, (mg, dets) in enumerate(_study(scenario)):
        gsps = build_gsps(
            source=mg, detections=dets, provenance=PROVENANCE, series_instance_uid=generate_uid()
        )
        _check(v.run_dciodvfy(_write(gsps, tmp_path / f"pr{i}.dcm")), DCIODVFY_ALLOWED)
