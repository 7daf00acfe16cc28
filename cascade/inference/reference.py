"""The previous inference path, kept verbatim as the parity reference.

:func:`residual_map_reference` (square 768-px tiles over the breast's bounding box,
torch, no mask-following), :func:`propose_reference` (whole-image filters and
``maximum_position``) and :func:`score_crops_reference` (torch, one batch after the
other) are the implementations the detector ran before the speed work of issue 14.
The fast path (:mod:`cascade.inference.proposals`, :mod:`cascade.inference.fpr`,
:mod:`cascade.inference.runtime`) is tested against them
(``tests/test_speed_parity.py``) and ``bench/speed.py`` times both in one run.
``Detector(..., backend="reference")`` runs this path end to end.

Coordinates as everywhere in the cascade: x = column, y = row, 0-based, the first
pixel's centre at (0, 0); arrays are indexed ``[row, col]``.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from scipy import ndimage
from skimage.feature import peak_local_max
from skimage.measure import label, regionprops
from skimage.segmentation import watershed

from cascade.data.preprocess import GridTransform
from cascade.inference.fpr import prepare_batch
from cascade.inference.proposals import (
    MAX_PLATEAU_PEAKS,
    MAX_RAW_PEAKS,
    Candidate,
    MapKind,
    ProposalConfig,
    _merge_plateaus,
)

logger = logging.getLogger("cascade.inference.proposals")

__all__ = ["propose_reference", "residual_map_reference", "score_crops_reference"]


def _pad_to(x: int, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple)


@torch.no_grad()
def residual_map_reference(
    model: torch.nn.Module,
    image: np.ndarray,
    *,
    kind: MapKind = "residual",
    residual: str = "l1",
    mask: np.ndarray | None = None,
    tile: int = 768,
    overlap: int = 64,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """The previous :func:`cascade.inference.proposals.residual_map` (see there)."""
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D (H, W), got shape {image.shape}")
    if tile % 8 or tile <= 2 * overlap:
        raise ValueError(f"tile must be a multiple of 8 larger than 2·overlap, got {tile}")
    if overlap % 8 or overlap < 0:
        raise ValueError(f"overlap must be a non-negative multiple of 8, got {overlap}")
    h, w = image.shape
    out = np.zeros((h, w), np.float32)
    if mask is not None:
        if mask.shape != image.shape:
            raise ValueError("mask and image shapes differ")
        if not mask.any():
            return out
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    else:
        r0, r1, c0, c1 = 0, h, 0, w
    r0, c0 = r0 - r0 % 8, c0 - c0 % 8
    was_training = model.training
    model.eval()
    step = tile - 2 * overlap
    try:
        for tr in range(r0, r1, step):
            for tc in range(c0, c1, step):
                ir0, ic0 = max(tr - overlap, 0), max(tc - overlap, 0)
                ir1, ic1 = min(tr + step + overlap, h), min(tc + step + overlap, w)
                patch = image[ir0:ir1, ic0:ic1]
                ph, pw = patch.shape
                padded = np.zeros((_pad_to(ph, 8), _pad_to(pw, 8)), np.float32)
                padded[:ph, :pw] = patch
                x = torch.from_numpy(padded)[None, None].to(device)
                y = model(x)
                if kind == "segmentation":
                    m = torch.softmax(y, dim=1)[:, 1:2]
                else:
                    diff = y - x
                    if residual == "l2":
                        m = diff**2
                    elif residual == "smooth_l1":
                        a = diff.abs()
                        m = torch.where(a < 1.0, 0.5 * a**2, a - 0.5)
                    else:
                        m = diff.abs()
                m_np = m[0, 0, :ph, :pw].float().cpu().numpy()
                kr0, kc0 = tr, tc
                kr1, kc1 = min(tr + step, r1), min(tc + step, c1)
                out[kr0:kr1, kc0:kc1] = m_np[kr0 - ir0 : kr1 - ir0, kc0 - ic0 : kc1 - ic0]
    finally:
        model.train(was_training)
    if mask is not None:
        out[~mask] = 0.0
    return np.clip(out, 0.0, 1.0)


def components_reference(rmap: np.ndarray, config: ProposalConfig) -> np.ndarray:
    """The previous label image of candidate regions (whole-image filters)."""
    binary = rmap > config.threshold
    labels = label(binary, connectivity=2)
    if config.split == "component" or labels.max() == 0:
        return labels
    smooth = ndimage.gaussian_filter(rmap, 1.0)
    size = 2 * config.min_peak_distance_px + 1
    raw = (smooth == ndimage.maximum_filter(smooth, size=size, mode="nearest")) & binary
    n_raw = np.count_nonzero(raw)
    if n_raw > MAX_RAW_PEAKS and n_raw > 0.05 * np.count_nonzero(binary):
        patches = label(raw, connectivity=2)
        best = ndimage.maximum_position(smooth, patches, np.arange(1, patches.max() + 1))
        peaks = np.asarray(best, dtype=np.int64).reshape(-1, 2)
        logger.warning(
            "residual map with %d local maxima above threshold: peaks taken per patch",
            int(n_raw),
        )
    else:
        peaks = peak_local_max(
            smooth,
            min_distance=config.min_peak_distance_px,
            threshold_abs=config.threshold,
            labels=labels,
            exclude_border=False,
        )
    if len(peaks):
        keep: list[np.ndarray] = []
        slices = ndimage.find_objects(labels)
        peak_labels = labels[tuple(peaks.T)]
        for lab in np.unique(peak_labels):
            sl = slices[lab - 1]
            own = peaks[peak_labels == lab]
            if len(own) == 1 or len(own) > MAX_PLATEAU_PEAKS:
                keep.append(own)
                continue
            region = labels[sl] == lab
            sm = smooth[sl]
            local = own - np.array([sl[0].start, sl[1].start])
            keep.append(_merge_plateaus(local, sm, region) + np.array([sl[0].start, sl[1].start]))
        peaks = np.concatenate(keep)
    markers = np.zeros_like(labels)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    missing = np.setdiff1d(np.unique(labels[labels > 0]), np.unique(labels[markers > 0]))
    if len(missing):
        best = ndimage.maximum_position(smooth, labels=labels, index=missing)
        rows, cols = np.asarray(best, dtype=np.int64).reshape(-1, 2).T
        markers[rows, cols] = np.arange(len(peaks) + 1, len(peaks) + 1 + len(missing))
    return watershed(-smooth, markers, mask=binary)


def propose_reference(
    rmap: np.ndarray,
    transform: GridTransform,
    *,
    config: ProposalConfig | None = None,
) -> list[Candidate]:
    """The previous :func:`cascade.inference.proposals.propose` (see there)."""
    config = config or ProposalConfig()
    if rmap.shape != tuple(transform.work_shape):
        raise ValueError(
            f"residual map shape {rmap.shape} differs from the transform's work grid "
            f"{tuple(transform.work_shape)}"
        )
    labels = components_reference(rmap, config)
    regions = [r for r in regionprops(labels, intensity_image=rmap) if r.area >= config.min_area_px]
    if not regions:
        return []
    scores = np.array([float(r.image_intensity[r.image].sum()) for r in regions])
    order = np.argsort(-scores, kind="stable")[: config.max_candidates]
    centres_work = np.array([regions[i].centroid_weighted[::-1] for i in order], dtype=np.float64)
    centres_src = transform.to_source(centres_work)
    radii_work = np.array([math.sqrt(regions[i].area / math.pi) for i in order])
    radii_src = transform.lengths_to_source(radii_work)
    out = []
    for k, i in enumerate(order):
        reg = regions[i]
        out.append(
            Candidate(
                x_work=float(centres_work[k, 0]),
                y_work=float(centres_work[k, 1]),
                x=float(centres_src[k, 0]),
                y=float(centres_src[k, 1]),
                asn_score=float(scores[i]),
                area_px=int(reg.area),
                bbox=tuple(int(v) for v in reg.bbox),  # type: ignore[arg-type]
                radius_px=float(max(radii_src[k], 0.5)),
                mask=np.asarray(reg.image, dtype=bool),
            )
        )
    return out


@torch.no_grad()
def score_crops_reference(
    model: torch.nn.Module,
    crops: np.ndarray,
    *,
    input_size: int,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """The previous :func:`cascade.inference.fpr.score_crops` (torch, float64 ``(N,)``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    was_training = model.training
    model.eval()
    probs = []
    try:
        for start in range(0, len(crops), batch_size):
            x = prepare_batch(
                crops[start : start + batch_size], input_size=input_size, device=device
            )
            probs.append(torch.sigmoid(model(x).reshape(-1)).double().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(probs) if probs else np.zeros((0,), np.float64)
