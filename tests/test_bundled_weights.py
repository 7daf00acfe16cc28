"""The weights shipped in the package: present, small, honest about their data, usable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cascade.evaluation.operating_point import OperatingPoint
from cascade.inference.detector import Detector
from cascade.inference.weights import BUNDLED_WEIGHTS, ModelWeights
from cascade.models.checkpoint import checkpoint_sha256, describe_checkpoint
from cascade.synthesis import generate_dataset


def test_bundled_weights_are_in_the_package() -> None:
    # They are committed: a checkout without them is broken, not a reason to skip.
    assert {p.name for p in BUNDLED_WEIGHTS.iterdir()} >= {"asn.pt", "fpr.pt", "weights.json"}


def test_bundled_weights_are_small_enough_to_ship() -> None:
    total = sum(p.stat().st_size for p in BUNDLED_WEIGHTS.glob("*.pt"))
    assert total <= 25 * 1024 * 1024


def test_bundled_weights_say_they_are_not_for_clinical_use() -> None:
    record = json.loads((BUNDLED_WEIGHTS / "weights.json").read_text())
    assert "not for clinical use" in record["intended_use"].lower()
    assert "synthetic phantom" in record["intended_use"].lower()
    for name, model in record["models"].items():
        path = BUNDLED_WEIGHTS / model["file"]
        assert checkpoint_sha256(path) == model["sha256"], name
        meta = describe_checkpoint(path)
        assert "not for clinical use" in meta["data"]["intended_use"].lower()
        assert meta["has_optimizer_state"] is False


def test_bundled_weights_carry_an_operating_point_calibrated_on_themselves() -> None:
    # A re-export without `calcnode train calibrate` would leave a stale point behind.
    op = ModelWeights.bundled_weights().stored_operating_point()
    assert op is not None
    assert op.fpr_threshold == 0.5
    assert op.calibration["target_fp_per_image"] == 1.0
    assert op.calibration["fp_per_image"] <= 1.0
    assert 0.0 < op.calibration["recall"] <= 1.0
    assert Detector.bundled(device="cpu").operating_point == op


@pytest.mark.slow
def test_bundled_detector_finds_points_inside_a_fresh_phantom(tmp_path: Path) -> None:
    manifest = generate_dataset(tmp_path, count=2, seed=424242, progress=False)
    detector = Detector.bundled(device="cpu")
    image = next(p for p in sorted(tmp_path.rglob("*.dcm")))
    result = detector.detect(image)
    assert manifest.is_file()
    assert result.detections, "the bundled cascade proposes candidates on a phantom"
    for det in result.detections:
        assert 0 <= det.x < result.columns and 0 <= det.y < result.rows
        assert 0.0 <= det.fpr_score <= 1.0
        assert det.score == pytest.approx(det.asn_score * det.fpr_score)


def test_a_detector_with_an_operating_point_reports_what_scoring_every_candidate_reports(
    phantoms: Path,
) -> None:
    # With a point, the FPR is skipped where ASN score < min_score (final = ASN × FPR ≤
    # ASN): that must change nothing in what is reported. The point here sits at the
    # median ASN score of the candidates, so about half of them are skipped.
    every = Detector.bundled(device="cpu", calibrated=False)
    reported = skipped = 0
    for image in sorted(phantoms.parent.rglob("*.dcm"))[:2]:
        all_found = every.detect(image).detections
        asn = np.array([d.asn_score for d in all_found])
        op = OperatingPoint(fpr_threshold=0.5, min_score=float(np.median(asn)))
        expect = op.select(
            np.array([d.score for d in all_found]), np.array([d.fpr_score for d in all_found])
        )
        got = Detector.bundled(device="cpu", operating_point=op).detect(image).detections
        assert [(d.x, d.y, d.score, d.fpr_score) for d in got] == [
            (all_found[i].x, all_found[i].y, all_found[i].score, all_found[i].fpr_score)
            for i in expect
        ]
        reported += len(got)
        skipped += int((asn < op.min_score).sum())
    assert reported and skipped, "no evidence: nothing reported or nothing skipped"
