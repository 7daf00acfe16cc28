"""Behaviour of cascade.training end to end on a few small phantoms, and of the trained Detector.

Session fixtures (tests/conftest.py) render 4 small phantoms and train the "tiny" ASN
preset once on the 2 that have µCs (≈ 30 s on 2 CPU cores); the tiny FPR (at most 20
candidates per image, else it takes minutes) and detection run on top of it. Detections are
in the received grid: x = column, y = row, 0-based, first pixel's centre at (0, 0).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cascade import __version__
from cascade.data.datasets import TrainingImage
from cascade.data.manifest import ImageRecord, OtherFinding, read_manifest
from cascade.data.preprocess import GridTransform
from cascade.errors import CheckpointError, TrainingError
from cascade.evaluation.operating_point import OperatingPoint
from cascade.inference.detections import ImageDetections
from cascade.inference.detector import Detector
from cascade.models import get_model
from cascade.models.checkpoint import checkpoint_sha256, load_checkpoint
from cascade.training import (
    ASN_PRESETS,
    FPR_PRESETS,
    AsnTrainConfig,
    FprTrainConfig,
    other_negative_points,
    preset,
    split_records,
    train_asn,
    train_fpr,
)

# ----------------------------------------------------------------------------- ASN


@pytest.mark.slow
def test_train_asn_writes_best_last_and_history(asn_run: Path) -> None:
    assert (asn_run / "best.pt").is_file()
    assert (asn_run / "last.pt").is_file()
    history = json.loads((asn_run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]  # the tiny preset: 2 epochs
    for h in history:
        assert np.isfinite(h["loss"])
        assert h["train_seconds"] > 0
        # Validation on 2 images: proposal recall at k false positives per image.
        assert h["val"]["n_images"] == 2
        # Keyed as train_asn looks them up to pick best.pt ("10" for R@10).
        assert set(h["val"]["recall_at"]) == {"5", "10", "15", "20", "30"}
        assert all(0.0 <= v <= 1.0 for v in h["val"]["recall_at"].values())
    # best.pt is the epoch with the best R@10 (the first one on ties).
    r10 = [h["val"]["recall_at"].get("10", -1.0) for h in history]
    best = load_checkpoint(asn_run / "best.pt", kind="asn")
    assert best.meta["metrics"]["epoch"] == history[int(np.argmax(r10))]["epoch"]


@pytest.mark.slow
def test_asn_checkpoint_describes_itself(asn_run: Path) -> None:
    ck = load_checkpoint(asn_run / "last.pt", kind="asn")
    meta = ck.meta
    assert meta["kind"] == "asn"
    assert meta["model_name"] == "asn_unet"
    assert meta["model_config"]["width"] == 4
    assert meta["architecture"]["builder"] == "asn_unet"
    assert meta["architecture"]["config"]["width"] == 4
    assert meta["preprocessing"]["pixel_spacing_mm"] == pytest.approx(0.07)
    assert meta["preprocessing"]["patch_size"] == 64
    assert meta["preprocessing"]["map_kind"] == "residual"
    assert meta["preprocessing"]["residual"] == "l1"
    training = meta["training"]
    assert training["loss"] == "ttest"
    assert (training["epochs"], training["batch_size"], training["patch_size"]) == (2, 4, 64)
    assert training["beta"] == pytest.approx(0.8)
    assert training["calcnode_version"] == __version__
    assert meta["calcnode_version"] == __version__
    assert meta["data"]["train_images"] == 2
    assert meta["metrics"]["epoch"] == 2
    # last.pt can resume: optimizer state and progress (0-based epoch index).
    assert ck.optimizer_state is not None
    assert ck.progress is not None and ck.progress["epoch"] == 1
    # The rebuilt model runs: (B, 1, H, W) → (B, 1, H, W) in [0, 1].
    y = ck.model(torch.rand(1, 1, 64, 64))
    assert tuple(y.shape) == (1, 1, 64, 64)
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0


@pytest.mark.slow
def test_best_asn_checkpoint_is_weights_only(asn_run: Path) -> None:
    ck = load_checkpoint(asn_run / "best.pt", kind="asn")
    assert ck.optimizer_state is None
    assert ck.meta["metrics"]["epoch"] in (1, 2)


@pytest.mark.slow
def test_train_asn_resumes_at_the_next_epoch(
    small_manifest: Path, asn_run: Path, tmp_path: Path
) -> None:
    before = json.loads((asn_run / "history.json").read_text())
    config = replace(ASN_PRESETS["tiny"], epochs=3)
    train_asn(
        manifest=small_manifest,
        out=tmp_path,
        config=config,
        val_manifest=small_manifest,
        resume=asn_run / "last.pt",
        device="cpu",
        progress=False,
    )
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]  # only epoch 3 was trained
    assert history[:2] == before
    ck = load_checkpoint(tmp_path / "last.pt")
    assert ck.progress is not None and ck.progress["epoch"] == 2
    # Resuming moved the weights on from the checkpoint it started from.
    start = load_checkpoint(asn_run / "last.pt").model.state_dict()
    end = ck.model.state_dict()
    assert any(not torch.equal(start[k], end[k]) for k in start if start[k].is_floating_point())


@pytest.mark.slow
def test_train_asn_refuses_to_resume_from_a_weights_only_checkpoint(
    small_manifest: Path, asn_run: Path, tmp_path: Path
) -> None:
    with pytest.raises(TrainingError, match="optimizer state"):
        train_asn(
            manifest=small_manifest,
            out=tmp_path,
            config=replace(ASN_PRESETS["tiny"], epochs=3),
            resume=asn_run / "best.pt",
            device="cpu",
            progress=False,
        )


@pytest.mark.slow
def test_train_asn_stops_on_a_non_finite_loss(
    small_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cascade.training.asn as train_mod

    def nan_loss(*args: object, **kwargs: object) -> torch.Tensor:
        return torch.tensor(float("nan"), requires_grad=True)

    monkeypatch.setattr(train_mod, "get_loss", lambda name, **cfg: nan_loss)
    with pytest.raises(TrainingError, match="non-finite loss"):
        train_asn(
            manifest=small_manifest,
            out=tmp_path,
            config=ASN_PRESETS["tiny"],
            device="cpu",
            progress=False,
        )
    assert not (tmp_path / "last.pt").exists()


@pytest.mark.slow
def test_train_asn_with_an_absurd_learning_rate_raises_training_error(
    small_manifest: Path, tmp_path: Path
) -> None:
    config = replace(ASN_PRESETS["tiny"], lr=1e30, epochs=3, iterations_per_epoch=5)
    with pytest.raises(TrainingError, match="non-finite"):
        train_asn(
            manifest=small_manifest, out=tmp_path, config=config, device="cpu", progress=False
        )


# ----------------------------------------------------------------------------- FPR


@pytest.mark.slow
def test_train_fpr_on_top_of_the_asn_writes_a_self_describing_checkpoint(
    fpr_run: Path, asn_run: Path
) -> None:
    assert (fpr_run / "last.pt").is_file()
    history = json.loads((fpr_run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1]
    assert np.isfinite(history[0]["loss"])
    ck = load_checkpoint(fpr_run / "best.pt", kind="fpr")
    meta = ck.meta
    assert meta["model_name"] == "fpr_resnet50"
    assert meta["model_config"] == {"width": 4, "input_size": 56, "input_norm": "crop"}
    assert ck.model.input_norm == "crop"  # the normalisation travels with the checkpoint
    assert meta["training"]["optimizer"] == "adam"
    opt_state = load_checkpoint(fpr_run / "last.pt", kind="fpr").optimizer_state
    assert opt_state is not None
    assert all("exp_avg" in v for v in opt_state["state"].values())  # Adam's moments resume
    assert meta["preprocessing"]["crop_size"] == 56
    assert meta["preprocessing"]["input_size"] == 56
    assert meta["data"]["crops"] > meta["data"]["positive_crops"] > 0
    assert meta["data"]["asn_checkpoint"] == str(asn_run / "best.pt")
    # The FPR records which ASN produced its candidates.
    assert meta["data"]["asn_sha256"] == checkpoint_sha256(asn_run / "best.pt")
    p = torch.sigmoid(ck.model(torch.rand(3, 1, 56, 56)))
    assert tuple(p.shape) == (3, 1)


@pytest.mark.slow
def test_train_fpr_rejects_an_fpr_checkpoint_as_its_asn(
    small_manifest: Path, fpr_run: Path, tmp_path: Path
) -> None:
    with pytest.raises((TrainingError, CheckpointError)):
        train_fpr(
            manifest=small_manifest,
            asn_checkpoint=fpr_run / "best.pt",
            out=tmp_path,
            config=FPR_PRESETS["tiny"],
            device="cpu",
            progress=False,
        )


# ----------------------------------------------------------------------------- Detector


#: The tests of the tiny detector's module fixture run on one xdist worker (loaded once).
tiny_detector_test = pytest.mark.xdist_group("tiny_detector")


@pytest.fixture(scope="module")
def tiny_detector(asn_run: Path, fpr_run: Path) -> Detector:
    """The tiny ASN + FPR as a :class:`Detector` (every candidate, scored), loaded once:
    loading exports both networks to ONNX Runtime."""
    return Detector(asn_run / "best.pt", fpr_run / "best.pt", device="cpu")


@pytest.fixture(scope="module")
def first_detections(small_manifest: Path, tiny_detector: Detector) -> ImageDetections:
    """What :func:`tiny_detector` finds on the first image of ``small_manifest``."""
    return tiny_detector.detect(read_manifest(small_manifest)[0].path)


@pytest.mark.slow
@tiny_detector_test
def test_detector_detects_inside_the_received_image(
    small_manifest: Path, tiny_detector: Detector, first_detections: ImageDetections
) -> None:
    rec = read_manifest(small_manifest)[0]
    det, result = tiny_detector, first_detections
    assert result.sop_instance_uid == rec.sop_instance_uid
    assert (result.rows, result.columns) == (rec.rows, rec.columns)
    assert result.pixel_spacing_mm == pytest.approx(rec.pixel_spacing_mm)
    assert result.path == str(rec.path)
    assert len(result.detections) <= det.proposal.max_candidates
    scores = [d.score for d in result.detections]
    assert scores == sorted(scores, reverse=True)
    for d in result.detections:
        assert 0.0 <= d.x <= rec.columns - 1 and 0.0 <= d.y <= rec.rows - 1
        assert d.score == pytest.approx(d.asn_score * d.fpr_score)
        assert 0.0 <= d.fpr_score <= 1.0
        assert d.mask is not None and d.mask.any()
        r0, c0 = d.mask_origin
        assert r0 >= 0 and c0 >= 0
        assert r0 + d.mask.shape[0] <= rec.rows and c0 + d.mask.shape[1] <= rec.columns
    full = result.full_mask()
    assert full.shape == (rec.rows, rec.columns)
    assert json.loads(json.dumps(result.to_json())) == result.to_json()


@pytest.mark.slow
def test_detector_without_fpr_gives_asn_proposals_with_fpr_score_one(
    small_manifest: Path, asn_run: Path
) -> None:
    rec = read_manifest(small_manifest)[0]
    result = Detector(asn_run / "best.pt", device="cpu").detect(rec.path)
    assert all(d.fpr_score == 1.0 for d in result.detections)
    assert all(d.score == pytest.approx(d.asn_score) for d in result.detections)


@pytest.mark.slow
@tiny_detector_test
def test_detector_operating_point_keeps_the_top_scores_the_fpr_accepts(
    small_manifest: Path, asn_run: Path, fpr_run: Path, first_detections: ImageDetections
) -> None:
    rec = read_manifest(small_manifest)[0]
    every = first_detections  # the same checkpoints without an operating point
    assert len(every.detections) >= 3, "the tiny cascade should propose a few candidates"
    scores = sorted(d.score for d in every.detections)
    probs = sorted(d.fpr_score for d in every.detections)
    op = OperatingPoint(
        fpr_threshold=probs[0], min_score=scores[len(scores) // 2], max_detections=2
    )
    kept = Detector(
        asn_run / "best.pt", fpr_run / "best.pt", device="cpu", operating_point=op
    ).detect(rec.path)
    expected = [
        d for d in every.detections if d.score >= op.min_score and d.fpr_score >= op.fpr_threshold
    ][:2]
    assert [(d.x, d.y, d.score) for d in kept.detections] == [(d.x, d.y, d.score) for d in expected]
    assert 1 <= len(kept.detections) <= 2


@pytest.mark.slow
@tiny_detector_test
def test_detector_model_version_names_both_checkpoints(
    asn_run: Path, fpr_run: Path, tiny_detector: Detector
) -> None:
    det = tiny_detector
    asn_sha = checkpoint_sha256(asn_run / "best.pt")
    fpr_sha = checkpoint_sha256(fpr_run / "best.pt")
    assert re.fullmatch(r"[0-9a-f]{12}-[0-9a-f]{12}", det.model_version)
    assert det.model_version == f"{asn_sha[:12]}-{fpr_sha[:12]}"


@pytest.mark.slow
def test_detector_rejects_an_fpr_checkpoint_as_the_asn(fpr_run: Path) -> None:
    with pytest.raises(CheckpointError):
        Detector(fpr_run / "best.pt", device="cpu")


@pytest.mark.slow
def test_detector_rejects_an_asn_checkpoint_as_the_fpr(asn_run: Path) -> None:
    with pytest.raises(CheckpointError):
        Detector(asn_run / "best.pt", asn_run / "best.pt", device="cpu")


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"loss": "l1"}, "loss"),
        ({"epochs": 0}, "epochs"),
        ({"iterations_per_epoch": 0}, "iterations_per_epoch"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("inf")}, "lr"),
    ],
)
def test_asn_train_config_rejects_invalid_values(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        AsnTrainConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": -1.0}, "lr"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"other_negative_spacing_mm": 0.0}, "other_negative_spacing_mm"),
    ],
)
def test_fpr_train_config_rejects_invalid_values(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        FprTrainConfig(**kwargs)  # type: ignore[arg-type]


def test_presets_tiny_cpu_and_paper_exist_and_preset_overrides() -> None:
    assert set(ASN_PRESETS) >= {"tiny", "cpu", "paper"}
    assert set(FPR_PRESETS) >= {"tiny", "cpu", "paper"}
    assert FPR_PRESETS["paper"].model_config["input_size"] == 224
    cfg = preset("cpu", beta=0.3)
    assert cfg.beta == 0.3 and cfg.model_config == ASN_PRESETS["cpu"].model_config
    with pytest.raises(ValueError, match="preset"):
        preset("huge")


def test_cpu_presets_use_the_residual_head_and_adam_while_paper_presets_stay_faithful() -> None:
    assert ASN_PRESETS["cpu"].model_config["head"] == "residual"
    assert "head" not in ASN_PRESETS["paper"].model_config  # the builder's sigmoid head
    assert get_model("asn_unet", **ASN_PRESETS["paper"].model_config).model_config["head"] == (
        "sigmoid"
    )
    assert (FPR_PRESETS["cpu"].optimizer, FPR_PRESETS["paper"].optimizer) == ("adam", "sgd")
    assert FPR_PRESETS["paper"].lr == 1e-3 and FPR_PRESETS["paper"].momentum == 0.9
    for name in ("cpu", "paper"):
        assert FPR_PRESETS[name].model_config["input_norm"] == "crop"


@pytest.mark.slow
def test_split_records_splits_by_study_deterministically(phantoms: Path) -> None:
    recs = read_manifest(phantoms)
    train, val = split_records(recs, seed=0)
    assert len(train) + len(val) == len(recs)
    train_studies = {r.study_instance_uid for r in train}
    assert not train_studies & {r.study_instance_uid for r in val}
    assert split_records(recs, seed=0) == (train, val)


# ----------------------------------------------------------------------------- FPR negatives
def _image_with_others(others: tuple[OtherFinding, ...], centres: np.ndarray) -> TrainingImage:
    """A 200 × 300 working-grid image received at 0.14 mm (the work grid is 0.07 mm)."""
    tr = GridTransform((100, 150), (0.14, 0.14), (200, 300), (0.07, 0.07))
    record = ImageRecord(
        path=Path("x.dcm"),
        sop_instance_uid="1.2.3",
        rows=100,
        columns=150,
        pixel_spacing_mm=(0.14, 0.14),
        others=others,
    )
    return TrainingImage(
        image=np.zeros((200, 300), np.float32),
        breast_mask=np.ones((200, 300), bool),
        positive=np.zeros((200, 300), bool),
        ignore=np.zeros((200, 300), bool),
        centres=centres.reshape(-1, 2),
        transform=tr,
        record=record,
    )


def test_vascular_negatives_are_spaced_along_the_vessel_in_the_work_grid() -> None:
    # A straight vessel from x = 10 to x = 80 (received grid, 0.14 mm) on row 50: 9.8 mm.
    vessel = OtherFinding(kind="vascular", points=((10.0, 50.0), (45.0, 50.0), (80.0, 50.0)))
    macro = OtherFinding(kind="macro", points=((120.0, 20.0),))
    im = _image_with_others((vessel, macro), np.zeros((0, 2)))
    pts = other_negative_points(im, ("vascular",), spacing_mm=1.0)
    assert len(pts) == 10  # 0, 1, …, 9 mm along 9.8 mm
    gaps = np.diff(pts[:, 0]) * 0.07
    np.testing.assert_allclose(gaps, 1.0, atol=1e-6)
    np.testing.assert_allclose(pts[:, 1], pts[0, 1])  # one row: the vessel's
    assert pts[0, 0] == pytest.approx(im.transform.to_work(np.array([[10.0, 50.0]]))[0, 0])
    assert len(other_negative_points(im, ("macro",))) == 1
    assert len(other_negative_points(im, ())) == 0


def test_vascular_negatives_keep_off_the_micro_calcifications() -> None:
    vessel = OtherFinding(kind="vascular", points=((10.0, 50.0), (80.0, 50.0)))
    start = np.array([[10.0, 50.0]])
    centre_work = GridTransform((100, 150), (0.14, 0.14), (200, 300), (0.07, 0.07)).to_work(start)
    im = _image_with_others((vessel,), centre_work)
    pts = other_negative_points(im, ("vascular",), spacing_mm=1.0, keep_off_mm=1.0)
    dist_mm = np.hypot(*(pts - centre_work).T) * 0.07
    assert dist_mm.min() > 1.0
    assert len(pts) == 8  # the points at 0 and 1 mm from the µC are dropped


def test_fpr_train_config_wants_a_tuple_of_kinds_not_a_string() -> None:
    with pytest.raises(TypeError, match="other_negatives"):
        FprTrainConfig(other_negatives="vascular")  # type: ignore[arg-type]
