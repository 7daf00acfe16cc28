"""The fast inference path gives what the previous one gave (issue 14).

The previous implementation is kept in :mod:`cascade.inference.reference`; the new one
(breast-following tiles, per-component candidate windows, ONNX Runtime) must match it:
exactly for the candidates of a given map, within float tolerance for the networks.
No timing is asserted here (``bench/speed.py`` measures).

Coordinates: x = column, y = row; arrays ``[row, col]``; working grid (70 µm).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cascade.data.io import read_mammogram
from cascade.data.manifest import read_manifest
from cascade.data.preprocess import GridTransform, PreprocessedImage, preprocess_mammogram
from cascade.errors import CascadeError
from cascade.inference.detector import STAGES, Detector, ImageDetections
from cascade.inference.fpr import score_crops
from cascade.inference.proposals import (
    Candidate,
    ProposalConfig,
    plan_tiles,
    propose,
    residual_map,
)
from cascade.inference.reference import (
    propose_reference,
    residual_map_reference,
    score_crops_reference,
)
from cascade.inference.runtime import (
    OnnxCropScorer,
    OnnxMapNet,
    TorchCropScorer,
    TorchMapNet,
    onnx_available,
    select_backend,
)
from cascade.inference.weights import ModelWeights
from cascade.models import get_model
from cascade.models.checkpoint import load_checkpoint

needs_onnx = pytest.mark.skipif(not onnx_available(), reason="onnxruntime / onnx not installed")


def _same_candidates(a: list[Candidate], b: list[Candidate]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert (x.x_work, x.y_work, x.x, x.y) == pytest.approx(
            (y.x_work, y.y_work, y.x, y.y), abs=1e-9
        ), i
        assert x.asn_score == y.asn_score, i
        assert (x.area_px, x.bbox, x.radius_px) == (y.area_px, y.bbox, y.radius_px), i
        assert np.array_equal(x.mask, y.mask), i


def _close_candidates(a: list[Candidate], b: list[Candidate], *, xy: float, rel: float) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert abs(x.x_work - y.x_work) <= xy and abs(x.y_work - y.y_work) <= xy
        assert x.asn_score == pytest.approx(y.asn_score, rel=rel)


@pytest.fixture(scope="module")
def bundled_unet() -> torch.nn.Module:
    return load_checkpoint(ModelWeights.bundled_weights().asn, kind="unet_ce").model.eval()


@pytest.fixture(scope="module")
def bundled_fpr() -> torch.nn.Module:
    fpr = ModelWeights.bundled_weights().fpr
    assert fpr is not None
    return load_checkpoint(fpr, kind="fpr").model.eval()


@pytest.fixture(scope="module")
def phantom_path(phantoms: Path) -> Path:
    """The phantom with the most µCs among the four small ones."""
    return max(read_manifest(phantoms), key=lambda r: len(r.calcifications)).path


@pytest.fixture(scope="module")
def phantom(phantom_path: Path) -> PreprocessedImage:
    return preprocess_mammogram(read_mammogram(phantom_path), target_spacing_mm=0.07)


@pytest.fixture(scope="module")
def reference_map(bundled_unet: torch.nn.Module, phantom: PreprocessedImage) -> np.ndarray:
    return residual_map_reference(
        bundled_unet, phantom.image, kind="segmentation", mask=phantom.breast_mask
    )


# ----------------------------------------------------------------------------- tiles


@pytest.mark.parametrize(("tile", "overlap"), [((768, 2048), 64), (128, 32), ((96, 200), 16)])
def test_plan_tiles_cover_every_breast_pixel_once_on_the_pooling_grid(
    phantom: PreprocessedImage, tile: int | tuple[int, int], overlap: int
) -> None:
    mask = phantom.breast_mask
    h, w = mask.shape
    rows, cols = (tile, tile) if isinstance(tile, int) else tile
    covered = np.zeros(mask.shape, np.int32)
    for t in plan_tiles(mask.shape, mask, tile=tile, overlap=overlap):
        r0, c0, r1, c1 = t.core
        wr0, wc0, wr1, wc1 = t.window
        covered[r0:r1, c0:c1] += 1
        assert r0 % 8 == 0 and c0 % 8 == 0
        assert (wr0, wc0) == (max(r0 - overlap, 0), max(c0 - overlap, 0))
        assert (wr1, wc1) == (min(r1 + overlap, h), min(c1 + overlap, w))
        assert wr1 - wr0 <= rows and wc1 - wc0 <= cols
    assert covered.max() == 1
    assert covered[mask].min() == 1


def test_plan_tiles_skip_background_that_the_bounding_box_holds(
    phantom: PreprocessedImage,
) -> None:
    mask = phantom.breast_mask
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    box = np.zeros_like(mask)
    box[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = True

    def read(m: np.ndarray) -> int:
        tiles = plan_tiles(m.shape, m, tile=256, overlap=64)
        for t in tiles:
            r0, c0, r1, c1 = t.core
            assert m[r0:r1, c0:c1].any(), "a window without breast in its core"
        return sum((t.window[2] - t.window[0]) * (t.window[3] - t.window[1]) for t in tiles)

    assert read(mask) < 0.95 * read(box)
    assert plan_tiles(mask.shape, np.zeros_like(mask)) == []


# ----------------------------------------------------------------------------- maps


def test_residual_map_matches_the_reference_on_a_phantom(
    bundled_unet: torch.nn.Module, phantom: PreprocessedImage, reference_map: np.ndarray
) -> None:
    new = residual_map(bundled_unet, phantom.image, kind="segmentation", mask=phantom.breast_mask)
    assert np.abs(new - reference_map).max() < 1e-4
    assert not new[~phantom.breast_mask].any()


@needs_onnx
def test_onnx_map_net_matches_torch_on_a_phantom(
    bundled_unet: torch.nn.Module, phantom: PreprocessedImage, reference_map: np.ndarray
) -> None:
    net = OnnxMapNet(bundled_unet, kind="segmentation", residual="l1", threads=1)
    new = residual_map(net, phantom.image, mask=phantom.breast_mask)
    assert np.abs(new - reference_map).max() < 1e-4
    _close_candidates(
        propose(new, phantom.transform),
        propose_reference(reference_map, phantom.transform),
        xy=1e-3,
        rel=1e-3,
    )


@needs_onnx
@pytest.mark.parametrize(("head", "residual"), [("residual", "l1"), ("sigmoid", "l2")])
def test_onnx_map_net_exports_the_asn_heads_and_residuals(head: str, residual: str) -> None:
    torch.manual_seed(0)
    model = get_model("asn_unet", width=4, head=head).eval()
    tile = np.random.default_rng(0).random((64, 96), dtype=np.float32)
    torch_map = TorchMapNet(model, kind="residual", residual=residual)(tile)
    onnx_map = OnnxMapNet(model, kind="residual", residual=residual, threads=1)(tile)
    np.testing.assert_allclose(onnx_map, torch_map, atol=1e-5)


def test_torch_map_net_channels_last_matches_the_plain_module(
    bundled_unet: torch.nn.Module,
) -> None:
    tile = np.random.default_rng(1).random((128, 96), dtype=np.float32)
    x = torch.from_numpy(tile)[None, None]
    with torch.no_grad():
        plain = torch.softmax(bundled_unet(x), dim=1)[0, 1].numpy()
    fast = TorchMapNet(bundled_unet, kind="segmentation", residual="l1")(tile)
    np.testing.assert_allclose(fast, plain, atol=1e-5)


# ----------------------------------------------------------------------------- candidates


@pytest.mark.parametrize(
    "config",
    [
        ProposalConfig(),
        ProposalConfig(split="component"),
        ProposalConfig(min_area_px=1, max_candidates=10_000),
        ProposalConfig(threshold=0.05, min_peak_distance_px=2),
    ],
    ids=["default", "component", "all-regions", "low-threshold"],
)
def test_propose_equals_the_reference_exactly_on_a_phantom_map(
    reference_map: np.ndarray, phantom: PreprocessedImage, config: ProposalConfig
) -> None:
    _same_candidates(
        propose(reference_map, phantom.transform, config=config),
        propose_reference(reference_map, phantom.transform, config=config),
    )


def _edge_case_map() -> np.ndarray:
    """Blobs on the image edges and corners, touching pairs, plateaus, specks."""
    rng = np.random.default_rng(7)
    h, w = 160, 140
    rr, cc = np.mgrid[0:h, 0:w].astype(np.float64)
    out = np.zeros((h, w))
    for y, x, a, s in [(0, 0, 0.9, 3), (159, 70, 0.6, 2.5), (80, 139, 0.7, 2), (40, 40, 0.5, 2)]:
        out += a * np.exp(-((cc - x) ** 2 + (rr - y) ** 2) / (2 * s**2))
    out += 0.45 * np.exp(-((cc - 46) ** 2 + (rr - 40) ** 2) / 8.0)  # touching the blob above
    out[100:110, 20:34] = 0.5  # a flat plateau
    out[120:123, 100:130] = 0.4  # a flat bar
    out[5:7, 120:122] = 0.3  # a speck below min_area_px
    out += 0.02 * rng.random((h, w))
    return np.clip(out, 0, 1).astype(np.float32)


@pytest.mark.parametrize("split", ["maxima", "component"])
@pytest.mark.parametrize("min_area", [1, 8])
def test_propose_equals_the_reference_at_edges_plateaus_and_specks(
    split: str, min_area: int
) -> None:
    rmap = _edge_case_map()
    tr = GridTransform(rmap.shape, (0.085, 0.085), rmap.shape, (0.085, 0.085))
    config = ProposalConfig(split=split, min_area_px=min_area)  # type: ignore[arg-type]
    new = propose(rmap, tr, config=config)
    assert new
    _same_candidates(new, propose_reference(rmap, tr, config=config))


def test_propose_of_a_degenerate_map_equals_the_reference() -> None:
    tr = GridTransform((400, 320), (0.07, 0.07), (400, 320), (0.07, 0.07))
    rmap = np.zeros((400, 320), np.float32)
    rmap[10:160, 10:310] = 0.5
    rmap[160:310, 10:310] = 0.7
    cfg = ProposalConfig(split="maxima", min_area_px=1)
    _same_candidates(propose(rmap, tr, config=cfg), propose_reference(rmap, tr, config=cfg))


# ----------------------------------------------------------------------------- FPR


def _crops(n: int, size: int = 56, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    crops = 0.3 + 0.05 * rng.standard_normal((n, size, size)).astype(np.float32)
    crops[:, 26:30, 26:30] += rng.random((n, 1, 1)).astype(np.float32) * 0.3
    return crops


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    return _crops(16)


@pytest.fixture(scope="module")
def reference_scores(bundled_fpr: torch.nn.Module, crops: np.ndarray) -> np.ndarray:
    """The previous path's FPR scores of :func:`crops` (batches of 16)."""
    return score_crops_reference(bundled_fpr, crops, input_size=56, batch_size=16)


def test_torch_crop_scorer_matches_the_reference(
    bundled_fpr: torch.nn.Module, crops: np.ndarray, reference_scores: np.ndarray
) -> None:
    new = TorchCropScorer(bundled_fpr, input_size=56, batch_size=6)(crops)
    np.testing.assert_allclose(new, reference_scores, atol=1e-5)
    np.testing.assert_allclose(
        score_crops(bundled_fpr, crops, input_size=56), reference_scores, atol=1e-5
    )


@needs_onnx
def test_onnx_crop_scorer_matches_the_reference(
    bundled_fpr: torch.nn.Module, crops: np.ndarray, reference_scores: np.ndarray
) -> None:
    scorer = OnnxCropScorer(bundled_fpr, input_size=56, batch_size=6, threads=1)
    np.testing.assert_allclose(scorer(crops), reference_scores, atol=1e-5)
    np.testing.assert_allclose(
        score_crops(scorer, crops, input_size=56), reference_scores, atol=1e-5
    )
    assert scorer(crops[:0]).shape == (0,)


@needs_onnx
def test_onnx_crop_scorer_of_the_paper_stem_resizes_like_torch() -> None:
    torch.manual_seed(0)
    model = get_model("fpr_resnet50", width=4, input_size=224).eval()
    crops = _crops(3)
    ref = score_crops_reference(model, crops, input_size=224)
    new = OnnxCropScorer(model, input_size=224, threads=1)(crops)
    np.testing.assert_allclose(new, ref, atol=1e-5)


# ----------------------------------------------------------------------------- detector


def test_select_backend_resolves_auto_and_rejects_what_cannot_run() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda:0")
    assert select_backend("auto", cpu) == ("onnx" if onnx_available() else "torch")
    assert select_backend("auto", cuda) == "torch"
    assert select_backend("torch", cpu) == "torch"
    with pytest.raises(ValueError, match="backend"):
        select_backend("tensorrt", cpu)
    with pytest.raises(ValueError, match="CPU"):
        select_backend("onnx", cuda)
    if not onnx_available():
        with pytest.raises(CascadeError, match="onnx"):
            select_backend("onnx", cpu)


def test_detector_rejects_an_unknown_backend() -> None:
    with pytest.raises(ValueError, match="backend"):
        Detector.bundled(device="cpu", backend="fast")


@pytest.fixture(scope="module")
def reference_detections(phantom_path: Path) -> ImageDetections:
    """What the previous path (``backend="reference"``) finds on the phantom."""
    ref_det = Detector.bundled(device="cpu", calibrated=False, backend="reference")
    assert ref_det.label == "reference"
    return ref_det.detect(phantom_path)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_detector_finds_what_the_reference_path_finds(
    phantom_path: Path, backend: str, reference_detections: ImageDetections
) -> None:
    det = Detector.bundled(device="cpu", calibrated=False, backend=backend)
    assert det.label in ("onnx", "torch")
    timings: dict[str, tuple[float, float]] = {}
    new = det.detect(phantom_path, timings=timings)
    ref = reference_detections
    assert tuple(timings) == STAGES
    assert all(w >= 0 and c >= 0 for w, c in timings.values())
    assert new.detections, "the phantom has µCs the bundled cascade proposes"
    assert len(new.detections) == len(ref.detections)
    for a, b in zip(new.detections, ref.detections, strict=True):
        assert abs(a.x - b.x) <= 1e-3 and abs(a.y - b.y) <= 1e-3
        assert a.score == pytest.approx(b.score, rel=1e-3, abs=1e-6)
        assert a.fpr_score == pytest.approx(b.fpr_score, abs=1e-4)
