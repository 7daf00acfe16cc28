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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy import ndimage
from skimage.feature import peak_local_max
from skimage.measure import label
from skimage.segmentation import watershed

from cascade.data.preprocess import GridTransform, PreprocessedImage
from cascade.inference.runtime import MapNet, TorchMapNet

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_OVERLAP",
    "DEFAULT_TILE",
    "Candidate",
    "ProposalConfig",
    "Tile",
    "plan_tiles",
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


#: Context each tile of :func:`residual_map` reads beyond the part it keeps, per side
#: (working-grid pixels). The bundled U-Net (3 poolings, 3 convs per stage) gives maps
#: within 5e-6 of a whole-image pass with 64 px, 4e-3 with 48 and flips pixels across
#: the 0.1 threshold with 32 (measured on a full-field phantom, bench/README.md).
DEFAULT_OVERLAP = 64
#: Largest input window of :func:`residual_map`, (rows, columns): row strips as wide as
#: the breast up to 2048 px, so the overlap is paid on few edges while one window's
#: activations stay bounded (1.6 Mpx: about 100 MB per 16-channel float32 feature map).
DEFAULT_TILE = (768, 2048)


@dataclass(frozen=True)
class Tile:
    """One window of :func:`residual_map`: what the network reads and what is kept.

    Attributes
    ----------
    core : (int, int, int, int)
        ``(row0, col0, row1, col1)`` of the kept part (ends exclusive), working grid.
    window : (int, int, int, int)
        ``(row0, col0, row1, col1)`` of the input: the core plus the overlap on each
        side, clipped to the image.
    """

    core: tuple[int, int, int, int]
    window: tuple[int, int, int, int]


def _tile_shape(tile: int | tuple[int, int], overlap: int) -> tuple[int, int]:
    if overlap % 8 or overlap < 0:
        raise ValueError(f"overlap must be a non-negative multiple of 8, got {overlap}")
    rows, cols = (tile, tile) if isinstance(tile, int) else (int(tile[0]), int(tile[1]))
    for side in (rows, cols):
        if side % 8 or side <= 2 * overlap:
            raise ValueError(
                f"tile must be a multiple of 8 larger than 2·overlap (overlap {overlap}), "
                f"got {tile}"
            )
    return rows, cols


def plan_tiles(
    shape: tuple[int, int],
    mask: np.ndarray | None = None,
    *,
    tile: int | tuple[int, int] = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
) -> list[Tile]:
    """Windows that cover every mask pixel (every pixel without a mask), breast only.

    Row strips of ``tile[0] − 2·overlap`` kept rows, each cut to the columns where the
    mask has pixels in those rows and split into at most ``tile[1] − 2·overlap`` wide
    pieces; strips and pieces start on multiples of 8 from the image origin (the
    U-Net's pooling grid), so a pixel's value does not depend on where the breast
    starts. Rows and columns without breast cost nothing.

    Parameters
    ----------
    shape : (int, int)
        (rows, columns) of the working-grid image.
    mask : numpy.ndarray or None
        bool ``shape``: the pixels whose map is needed.
    tile : int or (int, int)
        Largest input window (rows, columns); multiples of 8 larger than ``2·overlap``.
    overlap : int
        Context per side, a multiple of 8.

    Returns
    -------
    list of Tile
        In raster order of their cores; cores are disjoint.
    """
    tile_rows, tile_cols = _tile_shape(tile, overlap)
    h, w = shape
    mask_rows = np.ones(h, bool) if mask is None else mask.any(axis=1)
    rows = np.flatnonzero(mask_rows)
    if not len(rows):
        return []
    core_h, core_w = tile_rows - 2 * overlap, tile_cols - 2 * overlap
    r_first, r_end = int(rows[0]) - int(rows[0]) % 8, int(rows[-1]) + 1
    tiles: list[Tile] = []
    for tr in range(r_first, r_end, core_h):
        te = min(tr + core_h, r_end)
        if mask is None:
            c_first, c_end = 0, w
        else:
            cols = np.flatnonzero(mask[tr:te].any(axis=0))
            if not len(cols):
                continue
            c_first, c_end = int(cols[0]) - int(cols[0]) % 8, int(cols[-1]) + 1
        pieces = math.ceil((c_end - c_first) / core_w)
        piece_w = _pad_to(math.ceil((c_end - c_first) / pieces), 8)
        for tc in range(c_first, c_end, piece_w):
            ce = min(tc + piece_w, c_end)
            window = (max(tr - overlap, 0), max(tc - overlap, 0), min(te + overlap, h))
            tiles.append(Tile((tr, tc, te, ce), (*window, min(ce + overlap, w))))
    return tiles


def _as_map_net(
    model: torch.nn.Module | MapNet, kind: str, residual: str, device: str | torch.device
) -> MapNet:
    if isinstance(model, torch.nn.Module):
        return TorchMapNet(model, kind=kind, residual=residual, device=device)
    return model


def residual_map(
    model: torch.nn.Module | MapNet,
    image: np.ndarray,
    *,
    kind: MapKind = "residual",
    residual: str = "l1",
    mask: np.ndarray | None = None,
    tile: int | tuple[int, int] = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Run a U-Net over the breast of an image, window by window, and return its map.

    Parameters
    ----------
    model : torch.nn.Module or MapNet
        ASN (sigmoid reconstruction, ``kind="residual"``) or the cross-entropy U-Net
        (two logits, ``kind="segmentation"``) as a torch module, or a map net of
        :mod:`cascade.inference.runtime` (ONNX Runtime or torch) that already
        computes the map (``kind``, ``residual`` and ``device`` are then its own).
    image : numpy.ndarray
        float32 ``(H, W)`` working-grid image in [0, 1].
    kind : {"residual", "segmentation"}
        "residual": ``|f(I) − I|`` (or its L2/SmoothL1 variant); "segmentation":
        the softmax probability of the µC class.
    residual : {"l1", "l2", "smooth_l1"}
        The residual used in training.
    mask : numpy.ndarray or None
        bool ``(H, W)`` breast mask: only windows over it are computed (row strips
        cut to the breast, :func:`plan_tiles`) and the map is zero outside it.
    tile : int or (int, int)
        Largest input window, (rows, columns) or one side for both; multiples of 8.
    overlap : int
        Context read beyond the kept part on each side (multiple of 8); only each
        window's core is kept, so the result equals a whole-image pass away from the
        receptive-field border (:data:`DEFAULT_OVERLAP`).
    device : str or torch.device
        Where a torch module runs.

    Returns
    -------
    numpy.ndarray
        float32 ``(H, W)`` map in [0, 1].
    """
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D (H, W), got shape {image.shape}")
    _tile_shape(tile, overlap)
    h, w = image.shape
    out = np.zeros((h, w), np.float32)
    if mask is not None and mask.shape != image.shape:
        raise ValueError("mask and image shapes differ")
    tiles = plan_tiles((h, w), mask, tile=tile, overlap=overlap)
    if not tiles:
        return out
    net = _as_map_net(model, kind, residual, device)
    module = model if isinstance(model, torch.nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    image = np.asarray(image, dtype=np.float32)
    try:
        for t in tiles:
            ir0, ic0, ir1, ic1 = t.window
            ph, pw = ir1 - ir0, ic1 - ic0
            padded = np.zeros((_pad_to(ph, 8), _pad_to(pw, 8)), np.float32)
            padded[:ph, :pw] = image[ir0:ir1, ic0:ic1]
            m = net(padded)
            kr0, kc0, kr1, kc1 = t.core
            out[kr0:kr1, kc0:kc1] = m[kr0 - ir0 : kr1 - ir0, kc0 - ic0 : kc1 - ic0]
    finally:
        if module is not None:
            module.train(was_training)
    if mask is not None:
        out[~mask] = 0.0
    return np.clip(out, 0.0, 1.0, out=out)


#: Components with more maxima than this skip the plateau merge (cost bound).
MAX_PLATEAU_PEAKS = 32
#: Height tolerance within which maxima joined at their own height are one plateau.
PLATEAU_TOL = 1e-3
#: Above this many raw local maxima (and 5 % of the pixels above threshold: flat
#: plateaus) a map is degenerate (see :func:`propose`).
MAX_RAW_PEAKS = 5000
#: Margin around a component within which its maxima rule reads the map: the
#: Gaussian (σ 1, radius 4) and the maximum filter (radius ``min_peak_distance_px``).
_GAUSS_RADIUS = 4

_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass
class _Region:
    """One candidate region found in a component's window (working grid)."""

    key: tuple[int, int]
    score: float
    area: int
    bbox: tuple[int, int, int, int]
    centroid_rc: tuple[float, float]
    image: np.ndarray


def _merge_plateaus(
    own: np.ndarray, sm: np.ndarray, region: np.ndarray, *, tol: float = PLATEAU_TOL
) -> np.ndarray:
    """One peak per plateau: peaks of one component joined at their own height merge.

    Two peaks are one plateau when their heights differ by at most ``tol`` and a path of
    region pixels no lower than the higher one's height minus ``tol`` joins them (a flat
    top that ``peak_local_max`` reports as several maxima). Peaks of distinct hills stay
    apart however high the ground between them: an earlier rule joined every peak
    reachable above the *lowest* peak's height, which fused the µCs of a dense cluster
    (and the large µCs among them) into one candidate whose centre lay > 1 mm from them.

    Parameters
    ----------
    own : numpy.ndarray
        ``(P, 2)`` int (row, col) peaks inside ``region``, in ``sm``'s frame.
    sm : numpy.ndarray
        The smoothed map around the component.
    region : numpy.ndarray
        bool, the component's pixels (``sm``'s shape).
    tol : float
        Height tolerance of a plateau.

    Returns
    -------
    numpy.ndarray
        The first peak (in input order) of each plateau, in input order.
    """
    n = len(own)
    if n == 1 or n > MAX_PLATEAU_PEAKS:
        # A component with very many maxima is not a plateau problem (and the pairwise
        # check would cost peaks × area): keep its peaks as they are.
        return own
    heights = sm[tuple(own.T)]
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in np.argsort(-heights, kind="stable"):
        level = np.flatnonzero(np.abs(heights - heights[i]) <= tol)
        if len(level) < 2:
            continue
        # The higher peak's tolerance level: a lower peak of the pair lies above it too.
        top_lab = label((sm >= heights[i] - tol) & region, connectivity=2)
        lab_i = top_lab[own[i, 0], own[i, 1]]
        for j in level:
            if heights[j] <= heights[i] and top_lab[own[j, 0], own[j, 1]] == lab_i:
                ri, rj = root(int(i)), root(int(j))
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
    first = sorted({root(i) for i in range(n)})
    return own[first]


def _regions(
    ws: np.ndarray,
    intensity: np.ndarray,
    keys: Mapping[int, tuple[int, int]],
    offset: tuple[int, int],
    min_area: int,
) -> Iterator[_Region]:
    """The labelled regions of one component's window, as ``skimage.measure.regionprops``
    describes them (label order; bbox, area, float32 score of the summed map, float64
    intensity-weighted centroid) without its per-region moment tensors."""
    r_off, c_off = offset
    for label_id, sl in enumerate(ndimage.find_objects(ws), start=1):
        if sl is None:
            continue
        image = ws[sl] == label_id
        area = int(np.count_nonzero(image))
        if area < min_area:
            continue
        inten = intensity[sl]
        weights = np.where(image, inten, 0).astype(np.float64)
        total = weights.sum()
        cy = float(weights.sum(axis=1) @ np.arange(image.shape[0], dtype=np.float64) / total)
        cx = float(weights.sum(axis=0) @ np.arange(image.shape[1], dtype=np.float64) / total)
        r0, c0 = sl[0].start + r_off, sl[1].start + c_off
        yield _Region(
            key=keys[label_id],
            score=float(inten[image].sum()),
            area=area,
            bbox=(r0, c0, sl[0].stop + r_off, sl[1].stop + c_off),
            centroid_rc=(cy + r0, cx + c0),
            image=image,
        )


def propose(
    rmap: np.ndarray,
    transform: GridTransform,
    *,
    config: ProposalConfig | None = None,
) -> list[Candidate]:
    """Turn an anomaly map into candidates, highest ASN score first.

    Components of ``rmap > threshold`` (8-connected); with ``split="maxima"`` each is
    split at the local maxima of the Gaussian-smoothed map (σ = 1 px, maxima at least
    ``min_peak_distance_px`` apart, plateaus within 1e-3 merged; a component without a
    maximum keeps one marker at its highest pixel) by a watershed inside it. Every
    step reads the map only within a few pixels of a component, so each component is
    worked out in its own window: the result equals the whole-image computation
    (:func:`cascade.inference.reference.propose_reference`, tested) at a fraction of
    its cost. A degenerate map (an untrained network: more than
    :data:`MAX_RAW_PEAKS` raw maxima, over 5 % of the pixels above threshold) takes
    one peak per patch of maxima instead, through the whole-image path.

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
    binary = rmap > config.threshold
    if not binary.any():
        return []
    # ndimage's 8-connected labelling numbers components in raster order, as
    # skimage.measure.label does (the reference), at a tenth of its cost.
    labels, _n_labels = ndimage.label(binary, structure=_EIGHT)
    slices = ndimage.find_objects(labels)
    maxima = config.split == "maxima"
    margin = _GAUSS_RADIUS + config.min_peak_distance_px if maxima else 0
    size = 2 * config.min_peak_distance_px + 1
    h, w = rmap.shape
    n_raw = 0
    n_binary = 0
    work: list[tuple[int, tuple[slice, slice], np.ndarray, np.ndarray | None]] = []
    for k, sl in enumerate(slices, start=1):
        if sl is None:
            continue
        win = (
            slice(max(sl[0].start - margin, 0), min(sl[0].stop + margin, h)),
            slice(max(sl[1].start - margin, 0), min(sl[1].stop + margin, w)),
        )
        comp = labels[win] == k
        area = int(np.count_nonzero(comp))
        n_binary += area
        sm_w = None
        if maxima:
            # Within the window the filters see exactly the values the whole-image
            # filters see at the component's pixels (margin ≥ both radii; at the
            # image edge the window edge is the image edge).
            sm_w = ndimage.gaussian_filter(rmap[win], 1.0)
            mx = ndimage.maximum_filter(sm_w, size=size, mode="nearest")
            n_raw += int(np.count_nonzero((sm_w == mx) & comp))
        if area >= config.min_area_px:
            # A smaller component cannot hold a region of min_area_px: skip its split.
            work.append((k, win, comp, sm_w))
    if maxima and n_raw > MAX_RAW_PEAKS and n_raw > 0.05 * n_binary:
        from cascade.inference.reference import propose_reference

        return propose_reference(rmap, transform, config=config)

    regions: list[_Region] = []
    next_id = 1  # the reference numbers the markers of all peaks first, in label order
    for k, win, comp, sm_w in work:
        r_off, c_off = win[0].start, win[1].start
        if sm_w is None:
            ws = comp.astype(np.int32)
            keys = {1: (0, k)}
        else:
            peaks = peak_local_max(
                sm_w,
                min_distance=config.min_peak_distance_px,
                threshold_abs=config.threshold,
                labels=comp.astype(np.int32),
                exclude_border=False,
            )
            markers = np.zeros(comp.shape, np.int32)
            if len(peaks):
                bb = ndimage.find_objects(comp.astype(np.int32))[0]
                local = peaks - np.array([bb[0].start, bb[1].start])
                kept = _merge_plateaus(local, sm_w[bb], comp[bb])
                peaks = kept + np.array([bb[0].start, bb[1].start])
                markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
                keys = {j: (0, next_id + j - 1) for j in range(1, len(peaks) + 1)}
                next_id += len(peaks)
            else:
                # A flat component (no strict maximum): one marker at its highest pixel.
                r, c = ndimage.maximum_position(sm_w, comp.astype(np.int32), 1)
                markers[int(r), int(c)] = 1
                keys = {1: (1, k)}
            ws = watershed(-sm_w, markers, mask=comp)
        regions.extend(_regions(ws, rmap[win], keys, (r_off, c_off), config.min_area_px))
    if not regions:
        return []
    regions.sort(key=lambda r: r.key)
    scores = np.array([r.score for r in regions])
    order = np.argsort(-scores, kind="stable")[: config.max_candidates]
    centres_work = np.array(
        [regions[i].centroid_rc[::-1] for i in order], dtype=np.float64
    ).reshape(-1, 2)
    centres_src = transform.to_source(centres_work)
    radii_work = np.array([math.sqrt(regions[i].area / math.pi) for i in order])
    radii_src = transform.lengths_to_source(radii_work)
    out = []
    for j, i in enumerate(order):
        reg_i = regions[i]
        out.append(
            Candidate(
                x_work=float(centres_work[j, 0]),
                y_work=float(centres_work[j, 1]),
                x=float(centres_src[j, 0]),
                y=float(centres_src[j, 1]),
                asn_score=float(scores[i]),
                area_px=reg_i.area,
                bbox=reg_i.bbox,
                radius_px=float(max(radii_src[j], 0.5)),
                mask=reg_i.image,
            )
        )
    return out


def propose_image(
    model: torch.nn.Module | MapNet,
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
