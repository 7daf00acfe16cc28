"""Candidate proposals: whole-image residual map → threshold → connected components.

The ASN reconstructs normal tissue and fails on µCs, so its residual map
``r = |f(I) − I|`` is high on them. Thresholding it and taking connected
components gives candidates; the paper puts one candidate at each component's
centre, scored by the component's summed residual. Neighbouring µCs of a
cluster fuse into one component whose centroid can lie > 1 mm from all of
them (paper-notes.md, "Measured on phantoms"), so a second rule splits each
component at its residual maxima (a watershed on the residual).

Coordinates: candidates carry both the working-grid centre (70 µm) and the
centre in the received image's grid; x = column, y = row, 0-based, the first
pixel's centre at (0, 0).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy import ndimage
from skimage.feature import peak_local_max
from skimage.measure import label, regionprops
from skimage.segmentation import watershed

from cascade.data.preprocess import GridTransform, PreprocessedImage

logger = logging.getLogger(__name__)

__all__ = [
    "Candidate",
    "ProposalConfig",
    "propose",
    "residual_map",
]

MapKind = Literal["residual", "segmentation"]
SplitRule = Literal["component", "maxima"]


@dataclass(frozen=True)
class ProposalConfig:
    """How a residual map becomes candidates.

    Parameters
    ----------
    threshold : float
        Residual threshold (paper-notes: ≈ 0.1 for residuals in [0, 1]).
    min_area_px : int
        Components smaller than this (working-grid pixels) are dropped.
    split : {"component", "maxima"}
        "component": one candidate per connected component (the paper).
        "maxima": split components at local maxima of the smoothed residual.
    min_peak_distance_px : int
        Minimum distance between two maxima of one component ("maxima" rule).
    max_candidates : int
        Keep at most this many candidates per image, highest ASN score first.
    """

    threshold: float = 0.1
    min_area_px: int = 8
    split: SplitRule = "maxima"
    min_peak_distance_px: int = 4
    max_candidates: int = 300

    def __post_init__(self) -> None:
        if not (0.0 < self.threshold < 1.0):
            raise ValueError(f"ProposalConfig.threshold must lie in (0, 1), got {self.threshold}")
        if self.min_area_px < 1:
            raise ValueError(f"ProposalConfig.min_area_px must be ≥ 1, got {self.min_area_px}")
        if self.split not in ("component", "maxima"):
            raise ValueError(
                f"ProposalConfig.split must be 'component' or 'maxima', got {self.split!r}"
            )
        if self.min_peak_distance_px < 1:
            raise ValueError("ProposalConfig.min_peak_distance_px must be ≥ 1")
        if self.max_candidates < 1:
            raise ValueError("ProposalConfig.max_candidates must be ≥ 1")


@dataclass(frozen=True)
class Candidate:
    """One ASN candidate.

    Attributes
    ----------
    x_work, y_work : float
        Centre in the 70-µm working grid (x = column, y = row).
    x, y : float
        Centre in the received image's grid (x = column, y = row).
    asn_score : float
        Summed residual over the candidate's pixels (the paper's ASN score).
    area_px : int
        Area in working-grid pixels.
    bbox : (int, int, int, int)
        ``(min_row, min_col, max_row, max_col)`` in the working grid, max exclusive.
    radius_px : float
        Equivalent radius in the received grid (column spacing).
    mask : numpy.ndarray
        bool footprint within ``bbox`` (working grid).
    """

    x_work: float
    y_work: float
    x: float
    y: float
    asn_score: float
    area_px: int
    bbox: tuple[int, int, int, int]
    radius_px: float
    mask: np.ndarray


def _pad_to(x: int, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple)


@torch.no_grad()
def residual_map(
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
    """Run a U-Net over a whole image, tile by tile, and return its anomaly map.

    Parameters
    ----------
    model : torch.nn.Module
        ASN (sigmoid reconstruction, ``kind="residual"``) or the cross-entropy
        U-Net (two logits, ``kind="segmentation"``).
    image : numpy.ndarray
        float32 ``(H, W)`` working-grid image in [0, 1].
    kind : {"residual", "segmentation"}
        "residual": ``|f(I) − I|`` (or its L2/SmoothL1 variant); "segmentation":
        the softmax probability of the µC class.
    residual : {"l1", "l2", "smooth_l1"}
        The residual used in training.
    mask : numpy.ndarray or None
        bool ``(H, W)`` breast mask: only its bounding box is computed and the
        map is zero outside it.
    tile, overlap : int
        Tiles of ``tile`` pixels (multiple of 8) overlapping by ``overlap`` on
        each side keep memory bounded on full-field images; only each tile's
        centre is kept, so the result equals a whole-image pass away from the
        receptive-field border.
    device : str or torch.device
        Where to run the model.

    Returns
    -------
    numpy.ndarray
        float32 ``(H, W)`` map in [0, 1].
    """
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
    # Keep every tile on the U-Net's pooling grid (multiples of 8 from the image origin),
    # so the map does not depend on where the breast's bounding box starts.
    r0, c0 = r0 - r0 % 8, c0 - c0 % 8
    was_training = model.training
    model.eval()
    step = tile - 2 * overlap
    try:
        for tr in range(r0, r1, step):
            for tc in range(c0, c1, step):
                # Input window: the kept core [tr, tr+step) plus `overlap` context each side.
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


#: Components with more maxima than this skip the plateau merge (cost bound).
MAX_PLATEAU_PEAKS = 32
#: Above this many raw local maxima (and 5 % of the pixels above threshold: flat
#: plateaus) a map is degenerate (see :func:`_components`).
MAX_RAW_PEAKS = 5000


def _components(rmap: np.ndarray, config: ProposalConfig) -> np.ndarray:
    """Label image of candidate regions under the configured rule."""
    binary = rmap > config.threshold
    labels = label(binary, connectivity=2)
    if config.split == "component" or labels.max() == 0:
        return labels
    smooth = ndimage.gaussian_filter(rmap, 1.0)
    size = 2 * config.min_peak_distance_px + 1
    raw = (smooth == ndimage.maximum_filter(smooth, size=size, mode="nearest")) & binary
    n_raw = np.count_nonzero(raw)
    if n_raw > MAX_RAW_PEAKS and n_raw > 0.05 * np.count_nonzero(binary):
        # A degenerate map (an untrained network: most of the breast above threshold)
        # has so many flat maxima that scikit-image's spacing pass takes minutes. Keep
        # one peak per connected patch of maxima instead: bounded, and never reached by
        # a trained model's map.
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
    # Peaks joined by pixels within 1e-3 of their height are one plateau: one marker.
    # Worked out per component, inside its bounding box (whole-image masks per peak
    # cost seconds on a noisy map).
    if len(peaks):
        keep: list[np.ndarray] = []
        slices = ndimage.find_objects(labels)
        peak_labels = labels[tuple(peaks.T)]
        for lab in np.unique(peak_labels):
            sl = slices[lab - 1]
            own = peaks[peak_labels == lab]
            if len(own) == 1 or len(own) > MAX_PLATEAU_PEAKS:
                # A component with very many maxima is not a plateau problem (and the
                # pairwise check would cost peaks × area): keep its peaks as they are.
                keep.append(own)
                continue
            region = labels[sl] == lab
            sm = smooth[sl]
            local = own - np.array([sl[0].start, sl[1].start])
            top = np.zeros_like(region)
            for r, c in local:
                top |= (sm >= sm[r, c] - 1e-3) & region
            top_lab = label(top, connectivity=2)
            ids = top_lab[tuple(local.T)]
            first = [int(np.flatnonzero(ids == i)[0]) for i in np.unique(ids)]
            keep.append(own[first])
        peaks = np.concatenate(keep)
    markers = np.zeros_like(labels)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    # Components without a peak (flat plateaus) keep one marker at their maximum.
    missing = np.setdiff1d(np.unique(labels[labels > 0]), np.unique(labels[markers > 0]))
    # One pass over the image for all of them: a noisy map (an untrained network) has
    # thousands of such components, and a whole-image mask per component took minutes.
    if len(missing):
        best = ndimage.maximum_position(smooth, labels=labels, index=missing)
        rows, cols = np.asarray(best, dtype=np.int64).reshape(-1, 2).T
        markers[rows, cols] = np.arange(len(peaks) + 1, len(peaks) + 1 + len(missing))
    return watershed(-smooth, markers, mask=binary)


def propose(
    rmap: np.ndarray,
    transform: GridTransform,
    *,
    config: ProposalConfig | None = None,
) -> list[Candidate]:
    """Turn an anomaly map into candidates, highest ASN score first.

    Parameters
    ----------
    rmap : numpy.ndarray
        float32 ``(H, W)`` residual (or probability) map in the working grid.
    transform : GridTransform
        Maps working-grid points to the received grid.
    config : ProposalConfig or None
        Threshold and component rule; defaults to ``ProposalConfig()``.
    """
    config = config or ProposalConfig()
    if rmap.shape != tuple(transform.work_shape):
        raise ValueError(
            f"residual map shape {rmap.shape} differs from the transform's work grid "
            f"{tuple(transform.work_shape)}"
        )
    labels = _components(rmap, config)
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


def propose_image(
    model: torch.nn.Module,
    pre: PreprocessedImage,
    *,
    kind: MapKind = "residual",
    residual: str = "l1",
    config: ProposalConfig | None = None,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, list[Candidate]]:
    """Residual map and candidates of one preprocessed image (breast region only)."""
    rmap = residual_map(
        model, pre.image, kind=kind, residual=residual, mask=pre.breast_mask, device=device
    )
    return rmap, propose(rmap, pre.transform, config=config)


def candidates_xy(cands: Sequence[Candidate], *, grid: Literal["work", "source"]) -> np.ndarray:
    """``(N, 2)`` array of candidate centres (x = column, y = row) in the chosen grid."""
    if grid == "work":
        return np.array([[c.x_work, c.y_work] for c in cands], dtype=np.float64).reshape(-1, 2)
    return np.array([[c.x, c.y] for c in cands], dtype=np.float64).reshape(-1, 2)
