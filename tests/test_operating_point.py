"""The detector's operating point: which scored candidates are reported, and how it is chosen.

Covers :class:`cascade.inference.detector.OperatingPoint` (validation, ``keeps``, JSON, the
``weights.json`` entry), :func:`cascade.inference.detector.calibrate_operating_point` on hand-built
detections with hand-computed FROC values, the ``[model] operating_point`` /
``max_findings`` settings, :func:`node.model.operating_point`, and (slow) a tiny trained
cascade calibrated through ``calcnode train calibrate`` and used by ``calcnode detect``.

Coordinates: points are ``(x = column, y = row)``, 0-based, the first pixel's centre at
``(0, 0)``, in the received image's grid; the hand-built images have 0.1 mm pixels, so
the 1-mm hit radius is 10 px.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import tomllib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from cascade.errors import CheckpointError
from cascade.evaluation.operating_point import OperatingPoint, calibrate_operating_point
from cascade.inference.detector import Detection, Detector, ImageDetections
from cascade.inference.weights import BUNDLED_WEIGHTS, read_operating_point
from cascade.models.checkpoint import checkpoint_sha256
from node.errors import ConfigError
from node.model import load_detector, model_weights, operating_point
from node.settings import ModelSettings, Settings, load_settings
from tests.helpers import make_settings, write_tiny_model

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "config" / "calcnode.toml"


def _weights_json(
    folder: Path, operating_point: Any = None, *, stamp: bool = True, **extra: Any
) -> Path:
    """Write ``folder/weights.json`` like ``export_weights`` does, optionally with an
    ``operating_point`` entry (any JSON value, to test bad ones). With ``stamp``, a
    point (a dict) is marked as calibrated on the folder's own asn.pt / fpr.pt, as
    ``calcnode train calibrate`` marks it."""
    folder.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"intended_use": "tests", "models": {}, **extra}
    if isinstance(operating_point, dict) and stamp and (folder / "asn.pt").is_file():
        fpr = folder / "fpr.pt"
        operating_point = {
            **operating_point,
            "calibration": {
                **operating_point.get("calibration", {}),
                "asn_sha256": checkpoint_sha256(folder / "asn.pt"),
                "fpr_sha256": checkpoint_sha256(fpr) if fpr.is_file() else "",
            },
        }
    if operating_point is not None:
        record["operating_point"] = operating_point
    path = folder / "weights.json"
    path.write_text(json.dumps(record), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- OperatingPoint


def test_default_operating_point_is_the_fpr_decision_alone() -> None:
    op = OperatingPoint()
    assert (op.fpr_threshold, op.min_score, op.max_detections) == (0.5, 0.0, 0)
    assert dict(op.calibration) == {}


def test_operating_point_is_keyword_only_and_frozen() -> None:
    with pytest.raises(TypeError):
        OperatingPoint(0.5)  # type: ignore[misc]
    op = OperatingPoint(min_score=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        op.min_score = 2.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"fpr_threshold": math.nan}, "fpr_threshold"),
        ({"fpr_threshold": math.inf}, "fpr_threshold"),
        ({"fpr_threshold": 1.5}, "fpr_threshold"),
        ({"fpr_threshold": -0.01}, "fpr_threshold"),
        ({"min_score": math.nan}, "min_score"),
        ({"min_score": math.inf}, "min_score"),
        ({"min_score": -0.5}, "min_score"),
        ({"max_detections": -1}, "max_detections"),
    ],
)
def test_operating_point_rejects_bad_values_naming_the_field(
    kwargs: dict[str, object], name: str
) -> None:
    with pytest.raises(ValueError, match=rf"OperatingPoint\.{name}"):
        OperatingPoint(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"fpr_threshold": "0.5"}, "fpr_threshold"),
        ({"min_score": "0.3"}, "min_score"),
        ({"fpr_threshold": True}, "fpr_threshold"),
        ({"min_score": None}, "min_score"),
    ],
)
def test_operating_point_rejects_thresholds_that_are_not_numbers(
    kwargs: dict[str, object], name: str
) -> None:
    with pytest.raises(TypeError, match=rf"OperatingPoint\.{name} must be a number"):
        OperatingPoint(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_detections": 2.5}, "max_detections must be an integer"),
        ({"max_detections": True}, "max_detections must be an integer"),
        ({"max_detections": "3"}, "max_detections must be an integer"),
        ({"calibration": [1, 2]}, "calibration must be a mapping"),
    ],
)
def test_operating_point_rejects_a_count_or_calibration_of_the_wrong_type(
    kwargs: dict[str, object], name: str
) -> None:
    with pytest.raises(TypeError, match=rf"OperatingPoint\.{name}"):
        OperatingPoint(**kwargs)  # type: ignore[arg-type]


def test_operating_point_accepts_the_boundary_values() -> None:
    assert OperatingPoint(fpr_threshold=0.0).fpr_threshold == 0.0
    assert OperatingPoint(fpr_threshold=1.0).fpr_threshold == 1.0
    assert OperatingPoint(fpr_threshold=1).fpr_threshold == 1  # an int is a number
    assert OperatingPoint(min_score=0.0, max_detections=0).max_detections == 0


def test_keeps_applies_both_thresholds_and_keeps_equal_values() -> None:
    op = OperatingPoint(fpr_threshold=0.5, min_score=0.3)
    assert op.keeps(score=0.3, fpr_score=0.5)  # both exactly at the thresholds
    assert op.keeps(score=7.0, fpr_score=1.0)
    assert not op.keeps(score=0.3, fpr_score=math.nextafter(0.5, 0.0))
    assert not op.keeps(score=math.nextafter(0.3, 0.0), fpr_score=0.5)
    assert not op.keeps(score=100.0, fpr_score=0.2)  # high score, FPR says false positive


def test_keeps_with_zero_thresholds_keeps_every_candidate() -> None:
    op = OperatingPoint(fpr_threshold=0.0, min_score=0.0)
    assert op.keeps(score=0.0, fpr_score=0.0)


def test_operating_point_json_round_trips_through_text() -> None:
    op = OperatingPoint(
        fpr_threshold=0.6,
        min_score=2,
        max_detections=12,
        calibration={"images": 4, "recall": 0.75, "manifest": "val.jsonl"},
    )
    data = op.to_json()
    assert data == {
        "fpr_threshold": 0.6,
        "min_score": 2.0,
        "max_detections": 12,
        "calibration": {"images": 4, "recall": 0.75, "manifest": "val.jsonl"},
    }
    assert type(data["min_score"]) is float
    back = OperatingPoint.from_json(json.loads(json.dumps(data)))
    assert back == op
    assert dict(back.calibration) == dict(op.calibration)


def test_operating_point_equality_ignores_the_calibration_description() -> None:
    a = OperatingPoint(min_score=1.0, calibration={"recall": 0.5})
    b = OperatingPoint(min_score=1.0, calibration={"recall": 0.9})
    assert a == b
    assert a != OperatingPoint(min_score=1.5)


def test_from_json_fills_missing_keys_with_the_defaults() -> None:
    assert OperatingPoint.from_json({"min_score": 0.25}) == OperatingPoint(min_score=0.25)
    assert OperatingPoint.from_json({}) == OperatingPoint()


def test_from_json_rejects_unknown_keys_naming_them() -> None:
    with pytest.raises(ValueError, match="unknown operating-point keys: min_scor, top_k"):
        OperatingPoint.from_json({"min_scor": 0.2, "top_k": 3, "fpr_threshold": 0.5})


@pytest.mark.parametrize("data", [[0.5, 0.2], "0.5", 0.5, None])
def test_from_json_rejects_what_is_not_an_object(data: object) -> None:
    with pytest.raises(ValueError, match="must be a JSON object"):
        OperatingPoint.from_json(data)  # type: ignore[arg-type]


def test_from_json_validates_the_values() -> None:
    with pytest.raises(ValueError, match=r"OperatingPoint\.min_score"):
        OperatingPoint.from_json({"min_score": -1.0})


def test_for_weights_of_a_folder_without_weights_json_is_none(tmp_path: Path) -> None:
    assert read_operating_point(tmp_path) is None
    assert read_operating_point(tmp_path / "does-not-exist") is None


def test_for_weights_without_an_operating_point_entry_is_none(tmp_path: Path) -> None:
    _weights_json(tmp_path)
    assert read_operating_point(tmp_path) is None
    (tmp_path / "weights.json").write_text('{"operating_point": null}', encoding="utf-8")
    assert read_operating_point(str(tmp_path)) is None


def test_for_weights_reads_the_stored_operating_point(tmp_path: Path) -> None:
    stored = OperatingPoint(
        fpr_threshold=0.7, min_score=0.125, max_detections=5, calibration={"recall": 0.5}
    )
    _weights_json(tmp_path, stored.to_json())
    op = read_operating_point(tmp_path)
    assert op == stored
    assert op is not None and op.calibration == {"recall": 0.5}


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"fpr_threshold": 1.5}, "fpr_threshold"),
        ({"min_score": -0.1}, "min_score"),
        ({"min_score": "0.1"}, "min_score"),
        ({"max_detections": -3}, "max_detections"),
        ({"min_score": 0.1, "threshold": 0.2}, "unknown operating-point keys: threshold"),
        ([0.5, 0.1], "JSON object"),
        ("calibrated", "JSON object"),
    ],
)
def test_for_weights_with_a_bad_operating_point_raises_checkpoint_error_naming_the_file(
    tmp_path: Path, entry: object, problem: str
) -> None:
    path = _weights_json(tmp_path, entry)
    with pytest.raises(CheckpointError, match=problem) as info:
        read_operating_point(tmp_path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", ""])
def test_for_weights_with_an_unreadable_weights_json_raises_checkpoint_error(
    tmp_path: Path, text: str
) -> None:
    path = tmp_path / "weights.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(CheckpointError) as info:
        read_operating_point(tmp_path)
    assert str(path) in str(info.value)


# ----------------------------------------------------------------------------- Detector.bundled


@pytest.fixture
def bundled_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in for ``cascade/weights`` (links to the bundled checkpoints) that the
    test may give a ``weights.json`` of its own. The bundled weights are committed
    (tests/test_bundled_weights.py requires them), so their absence is a failure."""
    folder = tmp_path / "weights"
    folder.mkdir()
    for name in ("asn.pt", "fpr.pt"):
        assert (BUNDLED_WEIGHTS / name).is_file(), f"no bundled {name}"
        (folder / name).symlink_to(BUNDLED_WEIGHTS / name)
    monkeypatch.setattr("cascade.inference.weights.BUNDLED_WEIGHTS", folder)
    return folder


#: The backend of the Detector.bundled tests, which look at the operating point only: the
#: torch one loads in ≈ 0.6 CPU s, "auto" (ONNX Runtime) exports both networks (≈ 4-5 s).
OP_ONLY: dict[str, Any] = {"device": "cpu", "backend": "torch"}


def test_bundled_detector_reports_at_the_stored_operating_point(bundled_copy: Path) -> None:
    stored = OperatingPoint(fpr_threshold=0.6, min_score=0.5, max_detections=4)
    _weights_json(bundled_copy, stored.to_json())
    assert Detector.bundled(**OP_ONLY).operating_point == stored
    assert Detector.bundled(calibrated=False, **OP_ONLY).operating_point is None
    explicit = OperatingPoint(min_score=9.0)
    assert Detector.bundled(operating_point=explicit, **OP_ONLY).operating_point == explicit


def test_bundled_detector_without_a_stored_operating_point_reports_what_the_fpr_keeps(
    bundled_copy: Path,
) -> None:
    _weights_json(bundled_copy)
    assert Detector.bundled(**OP_ONLY).operating_point == OperatingPoint()


def test_bundled_detector_with_a_bad_stored_operating_point_raises(bundled_copy: Path) -> None:
    _weights_json(bundled_copy, {"min_score": -1})
    with pytest.raises(CheckpointError, match=r"weights\.json"):
        Detector.bundled(**OP_ONLY)


# ----------------------------------------------------------------------------- calibration

SPACING = (0.1, 0.1)  # mm per pixel (row, col): the 1-mm radius is 10 px


def _d(x: float, y: float, score: float, fpr: float) -> Detection:
    """A detection at (x = column, y = row) whose final score is ``asn × fpr``."""
    return Detection(x=x, y=y, score=score, asn_score=score / fpr, fpr_score=fpr, radius_px=2.0)


def _img(uid: str, dets: list[Detection]) -> ImageDetections:
    return ImageDetections(
        sop_instance_uid=uid,
        path=f"in/{uid}.dcm",
        rows=500,
        columns=500,
        pixel_spacing_mm=SPACING,
        detections=tuple(sorted(dets, key=lambda d: -d.score)),
    )


#: Image A: µCs at (100, 100) and (200, 200); image B: one µC at (50, 50).
#: After the FPR threshold 0.5 (a2 is removed: score 0.95 but FPR probability 0.2):
#:
#:   threshold  kept (TP / FP)                      FP/image  recall
#:   0.9        a1                                  0         1/3
#:   0.7        a1 b1                               0         2/3
#:   0.6        a1 b1 | a3                          0.5       2/3
#:   0.5        a1 b1 | a3 b2                       1.0       2/3
#:   0.4        a1 b1 a4 | a3 b2                    1.0       3/3
#:   0.3        a1 b1 a4 | a3 b2 b3                 1.5       3/3
A_TRUTH = np.array([[100.0, 100.0], [200.0, 200.0]])
B_TRUTH = np.array([[50.0, 50.0]])
A1 = _d(103.0, 104.0, 0.9, 0.9)  # 5 px = 0.5 mm from (100, 100): true positive
A2 = _d(300.0, 300.0, 0.95, 0.2)  # far from any µC, FPR calls it a false positive
A3 = _d(400.0, 100.0, 0.6, 0.8)  # false positive
A4 = _d(210.0, 200.0, 0.4, 0.7)  # exactly 10 px = 1 mm from (200, 200): true positive
B1 = _d(50.0, 56.0, 0.7, 0.6)  # 0.6 mm from (50, 50): true positive
B2 = _d(61.0, 50.0, 0.5, 0.9)  # 11 px = 1.1 mm from (50, 50): false positive
B3 = _d(250.0, 50.0, 0.3, 0.5)  # false positive, FPR probability exactly at 0.5: kept


def _results() -> list[tuple[ImageDetections, np.ndarray]]:
    return [
        (_img("1.2.3.1", [A1, A2, A3, A4]), A_TRUTH),
        (_img("1.2.3.2", [B1, B2, B3]), B_TRUTH),
    ]


@pytest.mark.parametrize(
    ("target", "min_score", "fp_per_image", "recall"),
    [
        (0.25, 0.7, 0.0, 2 / 3),
        (0.5, 0.6, 0.5, 2 / 3),
        (0.75, 0.6, 0.5, 2 / 3),
        (1.0, 0.4, 1.0, 1.0),
        (1.5, 0.3, 1.5, 1.0),
        (10.0, 0.3, 1.5, 1.0),
    ],
)
def test_calibration_picks_the_lowest_score_threshold_within_the_target(
    target: float, min_score: float, fp_per_image: float, recall: float
) -> None:
    op = calibrate_operating_point(_results(), target_fp_per_image=target)
    assert op.fpr_threshold == 0.5
    assert op.min_score == min_score
    assert op.max_detections == 0
    assert dict(op.calibration) == {
        "images": 2,
        "calcifications": 3,
        "target_fp_per_image": target,
        "fp_per_image": fp_per_image,
        "recall": pytest.approx(recall),
    }


def test_calibrated_operating_point_keeps_exactly_the_detections_of_its_froc_point() -> None:
    op = calibrate_operating_point(_results(), target_fp_per_image=0.5)
    kept = [d for image, _ in _results() for d in image.detections if op.keeps(**_scores(d))]
    assert kept == [A1, A3, B1]  # 1 false positive (A3) on 2 images = 0.5 per image
    op = calibrate_operating_point(_results(), target_fp_per_image=1.0)
    kept = [d for image, _ in _results() for d in image.detections if op.keeps(**_scores(d))]
    assert kept == [A1, A3, A4, B1, B2]


def _scores(d: Detection) -> dict[str, float]:
    return {"score": d.score, "fpr_score": d.fpr_score}


def test_calibration_stores_its_arguments_and_the_description() -> None:
    op = calibrate_operating_point(
        _results(),
        target_fp_per_image=1.0,
        fpr_threshold=0.65,
        max_detections=3,
        description={"manifest": "val.jsonl", "source": "phantoms"},
    )
    # FPR ≥ 0.65 keeps A1 (0.9), A3 (0.6, FP), A4 (0.4), B2 (0.5, FP): 2 FPs / 2 images
    assert (op.fpr_threshold, op.min_score, op.max_detections) == (0.65, 0.4, 3)
    assert op.calibration["manifest"] == "val.jsonl"
    assert op.calibration["source"] == "phantoms"
    assert op.calibration["fp_per_image"] == 1.0
    assert op.calibration["recall"] == pytest.approx(2 / 3)  # B1 (FPR 0.6) is gone
    assert json.loads(json.dumps(op.to_json()))["calibration"]["manifest"] == "val.jsonl"


def test_calibration_when_even_the_top_detection_is_a_false_positive() -> None:
    # Without the FPR decision A2 (score 0.95, a false positive) comes first: one FP on
    # two images is already 0.5 FP/image > 0.25, so no threshold meets the target and
    # the operating point must keep nothing.
    op = calibrate_operating_point(_results(), target_fp_per_image=0.25, fpr_threshold=0.0)
    assert op.min_score > 0.95
    assert op.min_score == pytest.approx(0.95)
    assert op.calibration["fp_per_image"] == 0.0
    assert op.calibration["recall"] == 0.0
    assert not any(op.keeps(**_scores(d)) for image, _ in _results() for d in image.detections)


def test_calibration_when_the_fpr_removes_every_detection() -> None:
    op = calibrate_operating_point(_results(), target_fp_per_image=1.0, fpr_threshold=1.0)
    assert op.min_score == 0.0
    assert op.calibration["fp_per_image"] == 0.0
    assert op.calibration["recall"] == 0.0
    assert op.calibration["calcifications"] == 3


def test_calibration_counts_images_without_calcifications_in_the_denominator() -> None:
    empty = (_img("1.2.3.3", []), np.zeros((0, 2)))
    op = calibrate_operating_point([*_results(), empty], target_fp_per_image=1.0)
    # 3 images: 1.0 FP/image allows 3 FPs, i.e. down to 0.3 (A3, B2, B3)
    assert op.min_score == 0.3
    assert op.calibration["images"] == 3
    assert op.calibration["fp_per_image"] == 1.0
    assert op.calibration["recall"] == 1.0


def test_calibration_keeps_nothing_when_a_zero_score_false_positive_comes_first() -> None:
    # A candidate whose FPR probability is exactly 0 (float32 sigmoid underflow) scores
    # 0 × ASN score = 0. With no FPR decision it is the only operating point; at 1 FP/image
    # it exceeds a target of 0.5, so the calibration must keep nothing.
    only_fp = Detection(x=300.0, y=300.0, score=0.0, asn_score=3.0, fpr_score=0.0, radius_px=2.0)
    results = [(_img("1.2.3.9", [only_fp]), np.zeros((0, 2)))]
    op = calibrate_operating_point(results, target_fp_per_image=0.5, fpr_threshold=0.0)
    assert op.calibration["fp_per_image"] == 0.0
    assert not op.keeps(score=only_fp.score, fpr_score=only_fp.fpr_score)


@pytest.mark.parametrize("target", [0.0, -1.0, math.nan, math.inf])
def test_calibration_rejects_a_bad_target(target: float) -> None:
    with pytest.raises(ValueError, match="target_fp_per_image"):
        calibrate_operating_point(_results(), target_fp_per_image=target)


def test_calibration_rejects_no_images() -> None:
    with pytest.raises(ValueError, match="at least one image"):
        calibrate_operating_point([], target_fp_per_image=1.0)


def test_calibration_rejects_a_bad_fpr_threshold_or_max_detections() -> None:
    with pytest.raises(ValueError, match="fpr_threshold"):
        calibrate_operating_point(_results(), target_fp_per_image=1.0, fpr_threshold=1.5)
    with pytest.raises(ValueError, match="max_detections"):
        calibrate_operating_point(_results(), target_fp_per_image=1.0, max_detections=-1)


# ----------------------------------------------------------------------------- train calibrate


class _StandInCascade:
    """Replaces :class:`cascade.inference.detector.Detector` in ``calibrate_weights``: returns the
    hand-built detections of :func:`_results` by file name, records how it was built."""

    built: ClassVar[list[dict[str, Any]]] = []
    detected: ClassVar[list[str]] = []

    def __init__(self, asn: Path, fpr: Path | None, **kwargs: Any) -> None:
        type(self).built.append({"asn": asn, "fpr": fpr, **kwargs})
        self.operating_point = kwargs.get("operating_point")

    def detect(self, source: Any, *, path: str = "") -> ImageDetections:
        type(self).detected.append(Path(source).name)
        by_name = {"a.dcm": _results()[0][0], "b.dcm": _results()[1][0]}
        return by_name[Path(source).name]


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> type[_StandInCascade]:
    monkeypatch.setattr(_StandInCascade, "built", [])
    monkeypatch.setattr(_StandInCascade, "detected", [])
    monkeypatch.setattr("cascade.inference.detector.Detector", _StandInCascade)
    return _StandInCascade


def _hand_manifest(folder: Path) -> Path:
    """Images A and B of :func:`_results` as manifest records (files are placeholders)."""
    from cascade.data.manifest import Calcification, ImageRecord, write_manifest

    records = []
    for name, uid, truth in (("a.dcm", "1.2.3.1", A_TRUTH), ("b.dcm", "1.2.3.2", B_TRUTH)):
        (folder / name).write_bytes(b"")
        records.append(
            ImageRecord(
                path=folder / name,
                sop_instance_uid=uid,
                rows=500,
                columns=500,
                pixel_spacing_mm=SPACING,
                calcifications=tuple(Calcification(x=x, y=y) for x, y in truth),
            )
        )
    return write_manifest(folder / "val.jsonl", records)


def _calibrate_args(folder: Path, manifest: Path, *extra: str) -> list[str]:
    return [
        "train",
        "calibrate",
        "--weights",
        str(folder),
        "--manifest",
        str(manifest),
        "--device",
        "cpu",
        "--quiet",
        *extra,
    ]


def test_train_calibrate_stores_the_hand_computed_operating_point(
    tmp_path: Path,
    model_dir: Path,
    stand_in: type[_StandInCascade],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from node.cli import main

    _weights_json(model_dir, notes={"run": "tiny"})
    manifest = _hand_manifest(tmp_path)
    assert main(_calibrate_args(model_dir, manifest, "--target-fp", "0.5")) == 0
    # calibration runs the folder's cascade on every candidate (no operating point)
    assert stand_in.built == [
        {"asn": model_dir / "asn.pt", "fpr": model_dir / "fpr.pt", "device": "cpu"}
    ]
    assert stand_in.detected == ["a.dcm", "b.dcm"]
    record = json.loads((model_dir / "weights.json").read_text(encoding="utf-8"))
    assert record["notes"] == {"run": "tiny"}  # the rest of weights.json is kept
    stored = record["operating_point"]
    assert (stored["fpr_threshold"], stored["min_score"], stored["max_detections"]) == (
        0.5,
        0.6,
        0,
    )
    cal = stored["calibration"]
    assert (cal["images"], cal["calcifications"]) == (2, 3)
    assert (cal["target_fp_per_image"], cal["fp_per_image"]) == (0.5, 0.5)
    assert cal["recall"] == pytest.approx(2 / 3)
    assert cal["manifest"] == str(manifest)
    out = capsys.readouterr().out
    assert "final score ≥ 0.6 → 0.50 false positives per image" in out
    assert "recall 66.7 % of 3 µCs in 2 images" in out
    assert not (model_dir / "weights.json.tmp").exists()


def test_train_calibrate_passes_its_options_through(
    tmp_path: Path, model_dir: Path, stand_in: type[_StandInCascade]
) -> None:
    from node.cli import main

    _weights_json(model_dir)
    manifest = _hand_manifest(tmp_path)
    extra = ("--target-fp", "1", "--fpr-threshold", "0.65", "--max-detections", "3")
    assert main(_calibrate_args(model_dir, manifest, *extra)) == 0
    op = read_operating_point(model_dir)
    assert op == OperatingPoint(fpr_threshold=0.65, min_score=0.4, max_detections=3)
    assert op is not None and op.calibration["fp_per_image"] == 1.0


def test_train_calibrate_without_fpr_runs_the_asn_alone(
    tmp_path: Path, model_dir: Path, stand_in: type[_StandInCascade]
) -> None:
    from node.cli import main

    _weights_json(model_dir)
    (model_dir / "fpr.pt").unlink()
    assert main(_calibrate_args(model_dir, _hand_manifest(tmp_path))) == 0
    assert stand_in.built[0]["fpr"] is None


def test_train_calibrate_refuses_a_folder_that_is_not_a_weights_folder(
    tmp_path: Path,
    model_dir: Path,
    stand_in: type[_StandInCascade],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from node.cli import main

    manifest = _hand_manifest(tmp_path)
    assert main(_calibrate_args(model_dir, manifest)) == 2  # asn.pt but no weights.json
    assert "not a weights folder" in capsys.readouterr().err
    assert not (model_dir / "weights.json").exists()
    assert stand_in.built == []


def test_train_calibrate_refuses_an_empty_manifest(
    tmp_path: Path,
    model_dir: Path,
    stand_in: type[_StandInCascade],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from node.cli import main

    path = _weights_json(model_dir)
    before = path.read_text(encoding="utf-8")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    assert main(_calibrate_args(model_dir, empty)) == 2
    assert "no images to calibrate on" in capsys.readouterr().err
    assert path.read_text(encoding="utf-8") == before


@pytest.mark.parametrize(
    ("extra", "name"),
    [
        (("--target-fp", "0"), "target_fp_per_image"),
        (("--fpr-threshold", "1.5"), "fpr_threshold"),
        (("--max-detections", "-1"), "max_detections"),
    ],
)
def test_train_calibrate_rejects_bad_options_before_running_the_cascade(
    tmp_path: Path,
    model_dir: Path,
    stand_in: type[_StandInCascade],
    capsys: pytest.CaptureFixture[str],
    extra: tuple[str, str],
    name: str,
) -> None:
    from node.cli import main

    _weights_json(model_dir)
    manifest = _hand_manifest(tmp_path)
    try:
        rc = main(_calibrate_args(model_dir, manifest, *extra))
        message = capsys.readouterr().err
    except ValueError as exc:  # acceptable too, as long as nothing ran before it
        rc, message = 2, str(exc)
    assert stand_in.detected == []  # minutes per image on a real validation set
    assert rc == 2
    assert name in message


# ----------------------------------------------------------------------------- settings


def test_model_operating_point_settings_default_to_calibrated_without_limit() -> None:
    s = load_settings(environ={})
    assert s.model.operating_point == "calibrated"
    assert s.model.max_findings == 0
    assert (ModelSettings().operating_point, ModelSettings().max_findings) == ("calibrated", 0)


def test_shipped_config_sets_the_operating_point_keys_to_their_defaults() -> None:
    with CONFIG.open("rb") as fh:
        model = tomllib.load(fh)["model"]
    assert model["operating_point"] == "calibrated"
    assert model["max_findings"] == 0
    s = load_settings(CONFIG, environ={})
    assert (s.model.operating_point, s.model.max_findings) == ("calibrated", 0)


def test_model_operating_point_settings_from_file_and_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "calcnode.toml"
    cfg.write_text('[model]\noperating_point = "all"\nmax_findings = 20\n', encoding="utf-8")
    s = load_settings(cfg, environ={})
    assert (s.model.operating_point, s.model.max_findings) == ("all", 20)
    s = load_settings(
        cfg,
        environ={
            "CALCNODE_MODEL__OPERATING_POINT": "calibrated",
            "CALCNODE_MODEL__MAX_FINDINGS": "5",
        },
    )
    assert (s.model.operating_point, s.model.max_findings) == ("calibrated", 5)


@pytest.mark.parametrize(
    ("overrides", "key", "problem"),
    [
        ({"model.operating_point": "sometimes"}, "model.operating_point", "'sometimes'"),
        ({"model.operating_point": "Calibrated"}, "model.operating_point", "calibrated or all"),
        ({"model.max_findings": -1}, "model.max_findings", "at least 0"),
    ],
)
def test_bad_operating_point_settings_are_rejected_naming_the_key(
    overrides: dict[str, object], key: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ={}, overrides=overrides)
    assert str(info.value).startswith(f"{key}: ")
    assert problem in str(info.value)
    assert "command-line override" in str(info.value)


@pytest.mark.parametrize(
    ("toml", "key", "problem"),
    [
        ('[model]\noperating_point = "sometimes"\n', "model.operating_point", "sometimes"),
        ("[model]\noperating_point = 1\n", "model.operating_point", "must be a"),
        ("[model]\nmax_findings = -1\n", "model.max_findings", "at least 0"),
        ("[model]\nmax_findings = 2.5\n", "model.max_findings", "must be an integer"),
        ('[model]\nmax_findings = "3"\n', "model.max_findings", "must be an integer"),
    ],
)
def test_bad_operating_point_settings_in_a_file_name_the_key_and_the_file(
    tmp_path: Path, toml: str, key: str, problem: str
) -> None:
    cfg = tmp_path / "calcnode.toml"
    cfg.write_text(toml, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    assert str(info.value).startswith(f"{key}: ")
    assert problem in str(info.value)
    assert str(cfg) in str(info.value)


def test_model_settings_reject_an_unknown_operating_point_directly() -> None:
    with pytest.raises(ValueError, match="operating_point: must be calibrated or all"):
        ModelSettings(operating_point="sometimes")
    with pytest.raises(ValueError, match="max_findings"):
        ModelSettings(max_findings=-2)


# ----------------------------------------------------------------------------- node.worker


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A folder holding a random-weight ``asn.pt`` + ``fpr.pt`` (no ``weights.json``)."""
    return write_tiny_model(tmp_path / "weights").parent


def _settings(root: Path, model_dir: Path, **model: Any) -> Settings:
    model = {"operating_point": "calibrated", **model}
    s = make_settings(root / "node", model_path=model_dir / "asn.pt")
    return s.model_copy(update={"model": s.model.model_copy(update=model)})


def test_all_candidates_setting_reports_every_candidate(tmp_path: Path, model_dir: Path) -> None:
    _weights_json(model_dir, OperatingPoint(fpr_threshold=0.9, min_score=3.0).to_json())
    settings = _settings(tmp_path, model_dir, operating_point="all")
    op = operating_point(settings, model_weights(settings))
    assert (op.fpr_threshold, op.min_score, op.max_detections) == (0.0, 0.0, 0)


def test_calibrated_setting_takes_the_operating_point_of_weights_json(
    tmp_path: Path, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stored = OperatingPoint(
        fpr_threshold=0.7, min_score=1.25, max_detections=0, calibration={"recall": 0.5}
    )
    _weights_json(model_dir, stored.to_json())
    settings = _settings(tmp_path, model_dir)
    with caplog.at_level(logging.WARNING, logger="node.worker"):
        op = operating_point(settings, model_weights(settings))
    assert op == stored
    assert op.calibration["recall"] == 0.5
    assert not caplog.records


def test_calibrated_setting_ignores_a_point_calibrated_on_other_checkpoints(
    tmp_path: Path, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    other = {"asn_sha256": "0" * 64, "fpr_sha256": "1" * 64}
    stored = OperatingPoint(fpr_threshold=0.7, min_score=1.25, calibration=other)
    _weights_json(model_dir, stored.to_json(), stamp=False)
    settings = _settings(tmp_path, model_dir)
    with caplog.at_level(logging.WARNING):
        op = operating_point(settings, model_weights(settings))
    assert op == OperatingPoint()
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("calibrated on other checkpoints" in m for m in messages)


@pytest.mark.parametrize("with_weights_json", [False, True])
def test_calibrated_setting_without_a_stored_operating_point_warns_and_uses_the_default(
    tmp_path: Path, model_dir: Path, caplog: pytest.LogCaptureFixture, with_weights_json: bool
) -> None:
    if with_weights_json:
        _weights_json(model_dir)  # export_weights output before calibration
    settings = _settings(tmp_path, model_dir)
    with caplog.at_level(logging.WARNING, logger="node.worker"):
        op = operating_point(settings, model_weights(settings))
    assert op == OperatingPoint()
    assert (op.fpr_threshold, op.min_score, op.max_detections) == (0.5, 0.0, 0)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "no calibrated operating point" in warnings[0].getMessage()
    assert str(model_dir) in warnings[0].getMessage()


def test_calibrated_setting_with_a_bad_stored_operating_point_raises(
    tmp_path: Path, model_dir: Path
) -> None:
    path = _weights_json(model_dir, {"fpr_threshold": 2.0})
    settings = _settings(tmp_path, model_dir)
    with pytest.raises(CheckpointError) as info:
        operating_point(settings, model_weights(settings))
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("stored_max", "max_findings", "expected"),
    [
        (0, 0, 0),
        (0, 4, 4),
        (5, 0, 5),
        (5, 3, 3),
        (5, 10, 5),
        (5, 5, 5),
    ],
)
def test_max_findings_caps_the_stored_max_detections(
    tmp_path: Path, model_dir: Path, stored_max: int, max_findings: int, expected: int
) -> None:
    stored = OperatingPoint(fpr_threshold=0.6, min_score=0.5, max_detections=stored_max)
    _weights_json(model_dir, stored.to_json())
    settings = _settings(tmp_path, model_dir, max_findings=max_findings)
    op = operating_point(settings, model_weights(settings))
    assert op.max_detections == expected
    assert (op.fpr_threshold, op.min_score) == (0.6, 0.5)  # the thresholds are untouched


@pytest.mark.parametrize("mode", ["all", "calibrated"])
def test_max_findings_caps_every_mode(tmp_path: Path, model_dir: Path, mode: str) -> None:
    settings = _settings(tmp_path, model_dir, operating_point=mode, max_findings=7)
    op = operating_point(settings, model_weights(settings))
    assert op.max_detections == 7


def test_load_detector_reports_at_the_operating_point_of_the_settings(
    tmp_path: Path, model_dir: Path
) -> None:
    stored = OperatingPoint(fpr_threshold=0.55, min_score=0.75, max_detections=9)
    _weights_json(model_dir, stored.to_json())
    detector: Any = load_detector(_settings(tmp_path, model_dir, max_findings=2), device="cpu")
    assert detector.operating_point == replace(stored, max_detections=2)
    detector = load_detector(_settings(tmp_path, model_dir, operating_point="all"), device="cpu")
    assert detector.operating_point == OperatingPoint(fpr_threshold=0.0, min_score=0.0)


# ----------------------------------------------------------------------------- end to end
#
# The tiny ASN + FPR of tests/conftest.py (trained once per session on 2 phantoms, shared
# with test_train.py). The FPR of so short a training is undecided (probabilities near
# 0.49 everywhere), so the FPR threshold is the median of its probabilities: the FPR
# decision then removes about half of the candidates, whatever the exact training.

TARGET_FP = 1.0
#: The tests of the tiny cascade's module fixtures run on one xdist worker (built once).


def tiny_cascade_test(test: Callable[..., None]) -> Callable[..., None]:
    """Mark a slow test of the tiny cascade's module fixtures: one xdist worker runs them."""
    return pytest.mark.slow(pytest.mark.xdist_group("tiny_cascade")(test))


@pytest.fixture(scope="module")
def phantom_manifest(phantoms: Path) -> Path:
    """The 4 phantoms the tiny cascade (tests/conftest.py) was trained on 2 of."""
    return phantoms


@pytest.fixture(scope="module")
def exported_weights(
    asn_run: Path, fpr_run: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """``calcnode train export`` output of the tiny trained cascade (no operating point)."""
    from cascade.inference.weights import export_weights

    folder = export_weights(
        asn=asn_run / "best.pt", fpr=fpr_run / "best.pt", out=tmp_path_factory.mktemp("op-w")
    )
    assert read_operating_point(folder) is None
    return folder


@pytest.fixture(scope="module")
def every_candidate(
    exported_weights: Path, phantom_manifest: Path
) -> list[tuple[Any, ImageDetections]]:
    """(manifest record, every scored candidate) per phantom, before calibration."""
    from cascade.data.manifest import read_manifest

    detector = Detector(exported_weights / "asn.pt", exported_weights / "fpr.pt", device="cpu")
    assert detector.operating_point is None
    return [(rec, detector.detect(rec.path)) for rec in read_manifest(phantom_manifest)]


@pytest.fixture(scope="module")
def calibrated(
    exported_weights: Path,
    phantom_manifest: Path,
    every_candidate: list[tuple[Any, ImageDetections]],
) -> tuple[Path, float, dict[str, Any]]:
    """Run ``calcnode train calibrate``; returns (folder, FPR threshold, weights.json before)."""
    from node.cli import main

    probs = [d.fpr_score for _, found in every_candidate for d in found.detections]
    assert len(probs) >= 8, "the tiny cascade should propose a few candidates per image"
    fpr_threshold = float(np.median(probs))
    before = json.loads((exported_weights / "weights.json").read_text(encoding="utf-8"))
    rc = main(
        [
            "train",
            "calibrate",
            "--weights",
            str(exported_weights),
            "--manifest",
            str(phantom_manifest),
            "--target-fp",
            repr(TARGET_FP),
            "--fpr-threshold",
            repr(fpr_threshold),
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    assert rc == 0
    return exported_weights, fpr_threshold, before


def _truth(rec: Any) -> np.ndarray:
    return np.array([[c.x, c.y] for c in rec.calcifications], dtype=np.float64).reshape(-1, 2)


@tiny_cascade_test
def test_train_calibrate_stores_an_operating_point_within_the_target(
    calibrated: tuple[Path, float, dict[str, Any]],
    every_candidate: list[tuple[Any, ImageDetections]],
    phantom_manifest: Path,
) -> None:
    folder, fpr_threshold, before = calibrated
    after = json.loads((folder / "weights.json").read_text(encoding="utf-8"))
    assert {k: v for k, v in after.items() if k != "operating_point"} == before
    stored = after["operating_point"]
    assert set(stored) == {"fpr_threshold", "min_score", "max_detections", "calibration"}
    op = read_operating_point(folder)
    assert op is not None
    assert op.fpr_threshold == fpr_threshold
    assert op.max_detections == 0
    cal = op.calibration
    assert cal["fp_per_image"] <= TARGET_FP
    assert cal["target_fp_per_image"] == TARGET_FP
    assert cal["images"] == 4
    assert cal["calcifications"] == sum(len(rec.calcifications) for rec, _ in every_candidate)
    assert cal["manifest"] == str(phantom_manifest)
    # The same choice as calibrate_operating_point on the uncalibrated candidates.
    again = calibrate_operating_point(
        [(found, _truth(rec)) for rec, found in every_candidate],
        target_fp_per_image=TARGET_FP,
        fpr_threshold=fpr_threshold,
    )
    assert again == op
    assert again.calibration["recall"] == cal["recall"]


@tiny_cascade_test
def test_calibrated_detector_returns_the_candidates_its_operating_point_keeps(
    calibrated: tuple[Path, float, dict[str, Any]],
    every_candidate: list[tuple[Any, ImageDetections]],
) -> None:
    from cascade.evaluation.froc import ImageEval, froc

    folder, _, _ = calibrated
    op = read_operating_point(folder)
    assert op is not None
    detector = Detector(folder / "asn.pt", folder / "fpr.pt", device="cpu", operating_point=op)
    n_all = n_kept = 0
    evals = []
    for rec, every in every_candidate:
        kept = detector.detect(rec.path)
        expected = tuple(
            d for d in every.detections if op.keeps(score=d.score, fpr_score=d.fpr_score)
        )
        assert kept.detections == expected  # same points, scores and order
        assert kept.sop_instance_uid == every.sop_instance_uid
        n_all, n_kept = n_all + len(every.detections), n_kept + len(kept.detections)
        evals.append(
            ImageEval(
                _truth(rec),
                np.array([[d.x, d.y] for d in kept.detections]).reshape(-1, 2),
                np.array([d.score for d in kept.detections]),
                spacing_mm=kept.pixel_spacing_mm,
            )
        )
    assert 0 < n_kept < n_all, "the operating point should keep some candidates, not all"
    # What the detector reports is the FROC point the calibration describes.
    curve = froc(evals)
    reported_fp = curve.fp_per_image[-1] if len(curve.thresholds) else 0.0
    reported_recall = curve.recall[-1] if len(curve.thresholds) else 0.0
    assert reported_fp == pytest.approx(op.calibration["fp_per_image"])
    assert reported_recall == pytest.approx(op.calibration["recall"])


@tiny_cascade_test
def test_calibrated_detector_limits_the_count_to_the_top_scores(
    calibrated: tuple[Path, float, dict[str, Any]],
    every_candidate: list[tuple[Any, ImageDetections]],
) -> None:
    folder, _, _ = calibrated
    rec, every = max(every_candidate, key=lambda t: len(t[1].detections))
    op = OperatingPoint(fpr_threshold=0.0, min_score=0.0, max_detections=3)
    kept = Detector(folder / "asn.pt", folder / "fpr.pt", device="cpu", operating_point=op).detect(
        rec.path
    )
    assert len(every.detections) > 3
    assert kept.detections == every.detections[:3]


@tiny_cascade_test
def test_detect_command_reports_at_the_operating_point_unless_all_candidates(
    calibrated: tuple[Path, float, dict[str, Any]],
    every_candidate: list[tuple[Any, ImageDetections]],
    tmp_path: Path,
) -> None:
    from node.cli import main

    folder, _, _ = calibrated
    op = read_operating_point(folder)
    assert op is not None
    rec, every = next((r, f) for r, f in every_candidate if f.detections)
    model = ["--asn", str(folder / "asn.pt"), "--fpr", str(folder / "fpr.pt"), "--device", "cpu"]
    assert main(["detect", str(rec.path), "--out", str(tmp_path / "op"), *model]) == 0
    assert (
        main(["detect", str(rec.path), "--out", str(tmp_path / "all"), "--all-candidates", *model])
        == 0
    )
    at_op = json.loads((tmp_path / "op" / "detections.json").read_text())["images"]
    everything = json.loads((tmp_path / "all" / "detections.json").read_text())["images"]
    assert len(at_op) == len(everything) == 1
    assert everything[0]["detections"] == [d.to_json() for d in every.detections]
    assert at_op[0]["detections"] == [
        d
        for d in everything[0]["detections"]
        if op.keeps(score=d["score"], fpr_score=d["fpr_score"])
    ]
    assert at_op[0]["sop_instance_uid"] == everything[0]["sop_instance_uid"] == rec.sop_instance_uid


def test_calibration_counts_only_the_top_max_detections_of_each_image() -> None:
    # Three false positives outscore the one µC; the detector reports at most two per
    # image, so the µC is never reported and only two false positives are.
    fps = [
        Detection(x=400.0, y=400.0 + 20 * i, score=s, asn_score=s, fpr_score=1.0, radius_px=2.0)
        for i, s in enumerate((0.9, 0.8, 0.7))
    ]
    tp = Detection(x=100.0, y=100.0, score=0.6, asn_score=0.6, fpr_score=1.0, radius_px=2.0)
    results = [(_img("1.2.3.20", [*fps, tp]), np.array([[100.0, 100.0]]))]
    op = calibrate_operating_point(results, target_fp_per_image=3.0, max_detections=2)
    assert op.max_detections == 2
    assert op.calibration["fp_per_image"] == 2.0
    assert op.calibration["recall"] == 0.0
    assert op.min_score == 0.8


# ----------------------------------------------------------------------------- provenance


def test_model_identity_changes_with_the_operating_point_not_its_description() -> None:
    from cascade.inference.weights import ModelIdentity
    from node.identity import device_uid_for

    def with_operating_point(version: str, sha: str, op: OperatingPoint | None) -> tuple[str, str]:
        ident = ModelIdentity(version=version, sha256=sha).with_operating_point(op)
        return ident.version, ident.sha256

    sha = "ab" * 32
    assert with_operating_point("m1", sha, None) == ("m1", sha)
    strict = OperatingPoint(fpr_threshold=0.5, min_score=4.0)
    loose = OperatingPoint(fpr_threshold=0.5, min_score=1.0)
    described = OperatingPoint(fpr_threshold=0.5, min_score=4.0, calibration={"recall": 0.7})
    v_strict, s_strict = with_operating_point("m1", sha, strict)
    v_loose, s_loose = with_operating_point("m1", sha, loose)
    assert v_strict.startswith("m1 op ") and len(v_strict) == len("m1 op ") + 8
    assert v_strict != v_loose
    assert device_uid_for(s_strict) != device_uid_for(s_loose) != device_uid_for(sha)
    assert with_operating_point("m1", sha, described) == (v_strict, s_strict)
