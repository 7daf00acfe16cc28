"""The device-resident cascade gives what the host path gives (issue 14, item 3).

:mod:`cascade.inference.resident` runs preprocessing, the U-Net, candidate extraction
and the FPR in torch on one device. Here it runs on the CPU against the host path
(numpy/scipy/skimage preprocessing and candidates, the same networks). Exact where the
arithmetic is the same (8-bit map, resampling, Otsu thresholds, U-Net windows); within
a tolerance where the device path approximates (the watershed split, the coarse
components of the breast mask): on the first phantom with µCs (12 candidates) the same
candidates, centres within 0.6 px, ASN scores within 10 % (measured 0.24 px, 4.7 %).
On a denser phantom the split differs more for a few low-scoring candidates (figures
in the docstring of :mod:`cascade.inference.resident`). No timing is asserted
(``bench/speed.py --backend resident``).

Coordinates: x = column, y = row; arrays ``[row, col]``; working grid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.filters import threshold_otsu

from cascade.data.io import read_mammogram
from cascade.data.manifest import read_manifest
from cascade.data.preprocess import GridTransform, PreprocessedImage, preprocess_mammogram
from cascade.inference.detector import Detector
from cascade.inference.fpr import extract_crops
from cascade.inference.proposals import ProposalConfig, propose, residual_map
from cascade.inference.resident import (
    ResidentCascade,
    breast_mask_torch,
    components,
    extract,
    gather_crops,
    local_peaks,
    otsu_threshold,
    prefetch,
    resample,
)
from node.pool import worker_device

# ----------------------------------------------------------------- hand-made maps


def _bump(shape: tuple[int, int], centre: tuple[float, float], sigma: float) -> np.ndarray:
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    return np.exp(-((rr - centre[0]) ** 2 + (cc - centre[1]) ** 2) / (2 * sigma**2))


def test_components_match_eight_connected_labelling() -> None:
    rng = np.random.default_rng(0)
    binary = rng.random((60, 70)) > 0.6
    labels = components(torch.from_numpy(binary)).numpy()
    ref, n = ndimage.label(binary, structure=np.ones((3, 3)))
    assert len(np.unique(labels[binary])) == n
    # The same partition: each reference component carries exactly one label.
    for k in range(1, n + 1):
        assert len(np.unique(labels[ref == k])) == 1
    assert (labels[~binary] == 0).all()


def test_diagonal_pixels_are_one_component() -> None:
    binary = np.zeros((5, 5), bool)
    binary[[0, 1, 2, 3], [0, 1, 2, 3]] = True
    labels = components(torch.from_numpy(binary)).numpy()
    assert len(np.unique(labels[binary])) == 1


def test_local_peaks_finds_two_separated_maxima_of_one_component() -> None:
    m = 0.8 * _bump((40, 60), (20, 20), 3) + 0.6 * _bump((40, 60), (20, 32), 3)
    sm = torch.from_numpy(m)
    labels = components(sm > 0.1)
    assert len(torch.unique(labels[labels > 0])) == 1
    peaks = local_peaks(sm, labels, min_distance=4, threshold=0.1)
    assert sorted(map(tuple, torch.nonzero(peaks).tolist())) == [(20, 20), (20, 32)]


def test_local_peaks_keeps_one_of_maxima_closer_than_min_distance() -> None:
    m = np.zeros((20, 20))
    m[10, 10] = m[10, 12] = 0.9  # a plateau cut in two: 2 px apart < min_distance
    m[9:12, 9:14] = np.maximum(m[9:12, 9:14], 0.5)
    sm = torch.from_numpy(m)
    peaks = local_peaks(sm, components(sm > 0.1), min_distance=4, threshold=0.1)
    assert int(peaks.sum()) == 1


def test_extract_matches_propose_on_separate_and_touching_bumps() -> None:
    shape = (80, 90)
    m = (
        0.9 * _bump(shape, (20, 20), 2.0)
        + 0.7 * _bump(shape, (20, 29), 2.0)  # touching the first: split at the saddle
        + 0.5 * _bump(shape, (60, 60), 2.5)
    ).astype(np.float32)
    transform = GridTransform(shape, (0.07, 0.07), shape, (0.07, 0.07))
    config = ProposalConfig()
    ref = propose(m, transform, config=config)
    regs = extract(torch.from_numpy(m), config)
    assert len(ref) == len(regs.score) == 3
    for i, c in enumerate(ref):
        assert abs(float(regs.cy[i]) - c.y_work) <= 0.1
        assert abs(float(regs.cx[i]) - c.x_work) <= 0.1
        assert float(regs.score[i]) == pytest.approx(c.asn_score, rel=0.02)
        assert int(regs.area[i]) == pytest.approx(c.area_px, rel=0.05)


def test_extract_of_a_map_below_threshold_is_empty() -> None:
    regs = extract(torch.full((30, 30), 0.05), ProposalConfig())
    assert len(regs.score) == 0 and len(regs.pix_r) == 0


def test_gather_crops_equals_extract_crops_inside_and_across_the_border() -> None:
    rng = np.random.default_rng(1)
    image = rng.random((90, 100)).astype(np.float32)
    xy = np.array([[50.4, 40.6], [2.0, 3.0], [98.7, 88.2], [-5.0, 120.0]])
    ref = extract_crops(image, xy)
    got = gather_crops(torch.from_numpy(image), torch.from_numpy(xy[:, ::-1].copy()))
    assert np.array_equal(got.numpy(), ref)


# ----------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("spacing", [(0.1, 0.1), (0.05, 0.06)])
def test_resample_equals_the_skimage_resampling(spacing: tuple[float, float]) -> None:
    rng = np.random.default_rng(2)
    image = rng.random((97, 83)).astype(np.float32)
    transform = GridTransform.for_spacing(image.shape, spacing, 0.07)
    ref = transform.image_to_work(image)
    got = resample(torch.from_numpy(image), transform).numpy()
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-5


def test_otsu_threshold_equals_skimage() -> None:
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.normal(0.2, 0.05, 5000), rng.normal(0.7, 0.1, 3000)])
    values = values.astype(np.float32)
    t = torch.from_numpy(values)
    lo, hi = torch.aminmax(t)
    counts, edges = np.histogram(values, bins=256, range=(float(lo), float(hi)))
    ref = threshold_otsu(hist=(counts, (edges[:-1] + edges[1:]) / 2))
    assert float(otsu_threshold(t, lo, hi)) == pytest.approx(ref, abs=1e-12)


# ----------------------------------------------------------------- one phantom, both paths


@pytest.fixture(scope="module")
def phantom_path(phantoms: Path) -> Path:
    rec = next(r for r in read_manifest(phantoms) if r.calcifications)
    return phantoms.parent / rec.path


@pytest.fixture(scope="module")
def host_pre(phantom_path: Path) -> PreprocessedImage:
    return preprocess_mammogram(read_mammogram(phantom_path))


@pytest.fixture(scope="module")
def host_detector() -> Detector:
    return Detector.bundled(device="cpu", calibrated=False)


@pytest.fixture(scope="module")
def resident_detector() -> Detector:
    return Detector.bundled(device="cpu", calibrated=False, backend="resident")


def test_resident_preprocessing_matches_the_host_path(
    phantom_path: Path, host_pre: PreprocessedImage, resident_detector: Detector
) -> None:
    assert resident_detector.resident is not None
    image, mask, transform = resident_detector.resident.preprocess(read_mammogram(phantom_path))
    assert transform == host_pre.transform
    m = mask.numpy()
    union = (m | host_pre.breast_mask).sum()
    assert (m & host_pre.breast_mask).sum() / union > 0.999
    both = m & host_pre.breast_mask
    assert np.array_equal(image.numpy()[both], host_pre.image[both])
    # The coarse-block mask needs the same breast on its own too.
    assert np.array_equal(breast_mask_torch(torch.from_numpy(host_pre.image)).numpy(), m)


def test_resident_map_and_candidates_match_the_host_path(
    host_pre: PreprocessedImage, host_detector: Detector, resident_detector: Detector
) -> None:
    res = resident_detector.resident
    assert isinstance(res, ResidentCascade)
    image, mask = torch.from_numpy(host_pre.image), torch.from_numpy(host_pre.breast_mask)
    rmap_dev = res.proposal_map(image, mask)
    rmap = residual_map(host_detector.asn_net, host_pre.image, mask=host_pre.breast_mask)
    assert np.abs(rmap_dev.numpy() - rmap).max() < 1e-4
    ref = propose(rmap, host_pre.transform, config=resident_detector.proposal)
    regs = extract(torch.from_numpy(rmap), resident_detector.proposal)
    assert ref, "the phantom gives no candidate"
    assert len(regs.score) == len(ref)
    got = np.stack([regs.cx.numpy(), regs.cy.numpy()], 1)
    for c in ref:
        d = np.hypot(got[:, 0] - c.x_work, got[:, 1] - c.y_work)
        j = int(np.argmin(d))
        assert d[j] <= 0.6
        assert float(regs.score[j]) == pytest.approx(c.asn_score, rel=0.1)


def test_resident_detector_reports_the_host_detections(
    phantom_path: Path, host_detector: Detector, resident_detector: Detector
) -> None:
    host = host_detector.detect(phantom_path)
    got = resident_detector.detect(phantom_path)
    assert resident_detector.label == "resident"
    assert (got.rows, got.columns, got.sop_instance_uid) == (
        host.rows,
        host.columns,
        host.sop_instance_uid,
    )
    assert len(got.detections) == len(host.detections) > 0
    xy = np.array([[d.x, d.y] for d in got.detections])
    for d in host.detections:
        dist = np.hypot(xy[:, 0] - d.x, xy[:, 1] - d.y)
        j = int(np.argmin(dist))
        assert dist[j] <= 0.6
        assert got.detections[j].asn_score == pytest.approx(d.asn_score, rel=0.1)
        assert got.detections[j].fpr_score == pytest.approx(d.fpr_score, abs=0.05)


def test_auto_backend_stays_on_the_host_path_on_the_cpu(host_detector: Detector) -> None:
    assert host_detector.resident is None
    assert host_detector.label in ("onnx", "torch")


# ----------------------------------------------------------------- prefetch, pinning


def test_prefetch_yields_in_order_and_raises_at_the_failing_item() -> None:
    def load(i: int) -> int:
        if i == 3:
            raise ValueError("bad item")
        return i * i

    it = prefetch(range(6), load, depth=2)
    assert [next(it) for _ in range(3)] == [0, 1, 4]
    with pytest.raises(ValueError, match="bad item"):
        next(it)


def test_prefetch_rejects_a_depth_below_one() -> None:
    with pytest.raises(ValueError):
        list(prefetch([1], lambda x: x, depth=0))


@pytest.mark.parametrize(
    ("configured", "index", "gpus", "expected"),
    [
        ("auto", 0, 4, "cuda:0"),
        ("auto", 5, 4, "cuda:1"),
        ("cuda", 3, 2, "cuda:1"),
        ("cuda", 2, 1, "cuda"),
        ("auto", 1, 0, "auto"),
        ("cuda:2", 0, 4, "cuda:2"),
        ("cpu", 1, 4, "cpu"),
    ],
)
def test_worker_i_is_pinned_to_gpu_i_mod_k(
    configured: str, index: int, gpus: int, expected: str
) -> None:
    assert worker_device(configured, index, gpus) == expected
