"""The cascade as one device-resident torch path: decoded pixels → candidates + FPR.

:class:`Detector` (``backend="resident"``; ``"auto"`` on CUDA) runs it instead of the
numpy/scipy preprocessing and candidate extraction, so on a GPU the image stays on
the device from the decoded pixels to the FPR probabilities and only the small result
(candidate statistics, footprint pixels, probabilities) comes back, in one transfer
per image (:meth:`ResidentCascade.run`). The same code runs with ``device="cpu"``,
where it is tested for parity with the reference path (``tests/test_resident.py``).

Stages, and how each relates to the numpy path:

preprocessing (:func:`unit_image`, :func:`resample`, :func:`breast_mask_torch`)
    The min–max map and 8-bit quantisation in float64 (the numpy path's arithmetic).
    The resampling is :func:`skimage.transform.resize`'s (``order=1``, ``mode="edge"``,
    anti-aliased when shrinking): a separable Gaussian of σ = (scale − 1) / 2 per
    shrinking axis (truncated at 4 σ, edges replicated), then bilinear interpolation
    with pixel-centre alignment (``F.interpolate(align_corners=False)`` maps working
    pixel ``i`` to ``(i + 0.5)·s − 0.5`` and replicates edges, as ``ndimage.zoom`` with
    ``grid_mode=True`` does): the same function up to float32 rounding. The Otsu
    thresholds (256 bins, the second split of the dark class when it is bimodal) are
    computed on the device in float64. **Approximation:** the hysteresis, largest
    component and hole filling run on a grid :data:`MASK_BLOCK` times coarser (a block
    is "above" when any of its pixels is); the mask is the fine threshold inside the
    kept coarse component's blocks, and every block inside it that does not touch its
    border is filled. It differs from the numpy mask only along the breast edge and
    in sub-block gaps there.
U-Net (:meth:`ResidentCascade.proposal_map`)
    The fused module (:mod:`cascade.inference.fused`) over the windows of
    :func:`cascade.inference.proposals.plan_tiles` (the same tiles, so the same map up
    to rounding), windows of one padded shape batched together, channels-last, under
    autocast bf16 on CUDA only (float32 on the CPU). ``plan_tiles`` reads the breast
    mask on the host: that bool image is the one mid-path transfer (a few MB).
candidates (:func:`components`, :func:`local_peaks`, :func:`split_regions`, :func:`extract`)
    Threshold, 8-connected components by iterated 3 × 3 max-pool label propagation,
    local maxima of the σ = 1 Gaussian-smoothed map by a max-pool of side
    ``2·min_peak_distance_px + 1`` (ties inside one window keep one peak), a flat
    component's marker at its highest pixel. **Approximation of the watershed:** each
    pixel climbs to its highest 3 × 3 neighbour inside its component (pointer jumping)
    and takes the label of the maximum it reaches; a basin whose maximum is no kept
    peak joins, whole, the labelled neighbour it meets at the highest pass (where a
    flood from the markers would reach it first). The plateau merge of
    :func:`cascade.inference.proposals.propose` is not done (plateaus of equal height
    within one peak window are already one peak). Per region: area, summed map (ASN
    score), map-weighted centroid, bounding box, by ``scatter_add``/``scatter_reduce``.
FPR (:meth:`ResidentCascade.fpr_probabilities`)
    Crops gathered from the device image by index (zero outside the image, as
    :func:`cascade.inference.fpr.extract_crops`), bilinear resize when the network's
    input differs, the FPR module on the device; only candidates an operating point
    could report are scored.

Parity, measured on the CPU on the four seed-0 small phantoms (70 µm, so no
resampling): preprocessed image identical inside both masks; breast mask identical on
three, 9 of 1.4 M pixels different (image top edge) on the fourth; U-Net map within
7e-6 of the host map where the masks agree (0.05 next to those 9 pixels); the same
number of candidates and of detections on all four (12, 12, 54, 9). Candidates of one
map, device split vs ``propose``: on three phantoms every centre within 0.24 px and
every ASN score within 9.4 %; on the dense one (54 candidates) 85 % of the centres
within 0.5 px and 83 % of the scores within 5 % (median 0.2 %), the worst a
low-scoring candidate 1.9 px off with a score 90 % off (where a basin joins the other
neighbour); FPR probabilities within 0.15 (median 0). ``tests/test_resident.py``
asserts the 12-candidate phantom with µCs (0.6 px, 10 %). The resampling equals
skimage's within 1e-5 on random images (0.1 → 0.07 mm and 0.05/0.06 → 0.07 mm).

Not done, or approximate: the degenerate-map fallback of ``propose`` (over
:data:`cascade.inference.proposals.MAX_RAW_PEAKS` maxima: the device path keeps
splitting, ``max_candidates`` still bounds the output); several images in one U-Net
batch (a worker runs one image at a time, the next decoded meanwhile,
:func:`prefetch`); torch.compile / CUDA graphs. Besides the one result transfer the
path synchronises on a few scalars (min/max, Otsu thresholds, the convergence checks
of the label propagation) and copies the breast mask to the host for ``plan_tiles``.
GPU throughput is still to be measured (``bench/speed.py --backend resident``);
bf16 autocast has not been run (CUDA only).

Coordinates: x = column, y = row, 0-based, first pixel's centre at (0, 0); tensors
``[row, col]``.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cascade.data.io import Mammogram
from cascade.data.preprocess import GridTransform
from cascade.errors import InvalidImageError
from cascade.inference.fpr import CROP_SIZE
from cascade.inference.fused import fused_map_module
from cascade.inference.proposals import (
    DEFAULT_OVERLAP,
    DEFAULT_TILE,
    Candidate,
    ProposalConfig,
    plan_tiles,
)

__all__ = [
    "MASK_BLOCK",
    "ResidentCascade",
    "ResidentResult",
    "breast_mask_torch",
    "components",
    "extract",
    "gather_crops",
    "local_peaks",
    "prefetch",
    "resample",
    "split_regions",
    "unit_image",
]

#: Side (working pixels) of the coarse blocks the breast mask's components use.
MASK_BLOCK = 4
# The second Otsu split of the dark class (as cascade.data.preprocess).
_SECOND_SPLIT_SEPARABILITY = 0.8


# --------------------------------------------------------------------------- preprocessing


def unit_image(pixels: torch.Tensor, *, quantize_8bit: bool = True) -> torch.Tensor:
    """``(x − min) / (max − min)`` (rounded to 256 levels when asked), float32.

    Computed in float64 as :func:`cascade.data.preprocess.preprocess` does.

    Raises
    ------
    ValueError
        Not 2-D, or not finite.
    InvalidImageError
        The image is constant.
    """
    if pixels.ndim != 2:
        raise ValueError(f"pixels must be 2-D (rows, columns), got shape {tuple(pixels.shape)}")
    x = pixels.to(torch.float64)
    lo, hi = torch.aminmax(x)
    lo_f, hi_f = float(lo), float(hi)
    if not (math.isfinite(lo_f) and math.isfinite(hi_f)):
        raise ValueError("pixels must be finite (no NaN or inf)")
    if hi_f <= lo_f:
        raise InvalidImageError(f"the image is constant (value {lo_f:g}): nothing to segment")
    u = (x - lo_f) / (hi_f - lo_f)
    if quantize_8bit:
        u = torch.round(u * 255.0) / 255.0
    return u.to(torch.float32)


def _gaussian_kernel(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """:func:`scipy.ndimage.gaussian_filter`'s 1-D kernel (radius ``int(4σ + 0.5)``)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _blur_axis(img: torch.Tensor, sigma: float, axis: int, mode: str) -> torch.Tensor:
    """1-D Gaussian along ``axis`` (0 rows, 1 columns) of a ``(H, W)`` float image.

    ``mode``: "replicate" (ndimage "nearest") or "symmetric" (ndimage "reflect").
    """
    if sigma <= 0:
        return img
    k = _gaussian_kernel(sigma).to(img.device, img.dtype)
    r = (len(k) - 1) // 2
    x = img[None, None]
    n = img.shape[axis]
    idx = torch.arange(-r, n + r, device=img.device)
    if mode == "replicate":
        idx = idx.clamp(0, n - 1)
    else:  # half-sample symmetric: d c b a | a b c d | d c b a
        period = 2 * n
        idx = idx % period
        idx = torch.where(idx >= n, period - 1 - idx, idx)
    if axis == 0:
        x = x[:, :, idx, :]
        return F.conv2d(x, k.view(1, 1, -1, 1))[0, 0]
    x = x[:, :, :, idx]
    return F.conv2d(x, k.view(1, 1, 1, -1))[0, 0]


def resample(unit: torch.Tensor, transform: GridTransform) -> torch.Tensor:
    """:meth:`GridTransform.image_to_work` in torch: ``(H, W)`` float32 on its device.

    The identity on the same grid; otherwise Gaussian anti-aliasing along the axes that
    shrink (σ = (scale − 1)/2, edges replicated) and bilinear interpolation with
    pixel-centre alignment, clipped to the input's range (as ``skimage`` resize).
    """
    if tuple(unit.shape) != transform.source_shape:
        raise ValueError(f"image must have shape {transform.source_shape}, got {unit.shape}")
    if transform.work_shape == transform.source_shape:
        return unit
    factors = transform.scale
    down = any(w < s for w, s in zip(transform.work_shape, transform.source_shape, strict=True))
    x = unit
    if down:
        for axis, f in enumerate(factors):
            x = _blur_axis(x, max(0.0, (f - 1.0) / 2.0), axis, "replicate")
    out = F.interpolate(
        x[None, None], size=transform.work_shape, mode="bilinear", align_corners=False
    )[0, 0]
    lo, hi = torch.aminmax(unit)
    return out.clamp(lo, hi)


def _histogram(values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """256-bin counts of ``values`` over ``[lo, hi]`` as :func:`numpy.histogram` bins them."""
    v = values.reshape(-1).to(torch.float64)
    lo64, hi64 = lo.to(torch.float64), hi.to(torch.float64)
    edges = torch.linspace(0.0, 1.0, 257, dtype=torch.float64, device=v.device) * (hi64 - lo64)
    edges = edges + lo64
    norm = 256.0 / (hi64 - lo64)
    idx = ((v - lo64) * norm).to(torch.int64).clamp(0, 255)
    idx = idx - (v < edges[idx]).to(torch.int64)
    idx = idx + ((v >= edges[idx + 1]) & (idx != 255)).to(torch.int64)
    keep = (v >= lo64) & (v <= hi64)
    return torch.bincount(idx[keep].clamp(0, 255), minlength=256).to(torch.float64)


def otsu_threshold(values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """:func:`skimage.filters.threshold_otsu` of 256 bins over ``[lo, hi]`` (float64 scalar)."""
    counts = _histogram(values, lo, hi)
    lo64, hi64 = lo.to(torch.float64), hi.to(torch.float64)
    edges = torch.linspace(0.0, 1.0, 257, dtype=torch.float64, device=counts.device)
    edges = edges * (hi64 - lo64) + lo64
    centers = (edges[:-1] + edges[1:]) / 2.0
    w1 = torch.cumsum(counts, 0)
    w2 = torch.cumsum(counts.flip(0), 0).flip(0)
    m1 = torch.cumsum(counts * centers, 0) / w1
    m2 = (torch.cumsum((counts * centers).flip(0), 0) / w2.flip(0)).flip(0)
    var12 = w1[:-1] * w2[1:] * (m1[:-1] - m2[1:]) ** 2
    return centers[torch.argmax(torch.nan_to_num(var12, nan=-1.0))]


def _separability(values: torch.Tensor, threshold: torch.Tensor) -> float:
    v = values.to(torch.float64)
    total = float(v.var(unbiased=False))
    if total <= 0:
        return 0.0
    above = v > threshold
    n, n1 = v.numel(), int(above.sum())
    if n1 in (0, n):
        return 0.0
    w1 = n1 / n
    m1 = float(v[above].mean())
    m0 = float(v[~above].mean())
    return w1 * (1.0 - w1) * (m1 - m0) ** 2 / total


def _propagate(labels: torch.Tensor, allowed: torch.Tensor, *, cross: bool) -> torch.Tensor:
    """Max label over each connected region of ``allowed``.

    ``labels`` float ``(H, W)``: 1 + a flat pixel index on every ``allowed`` pixel (0
    elsewhere), and a label's pixel lies in the same region with a label at least as
    high (true of ``1 + its own index``). 8-connected (3 × 3 max-pool) or 4-connected
    (``cross``: the larger of a 1 × 3 and a 3 × 1 max-pool). Each step pools, then
    jumps: a pixel takes the label of the pixel its label names (pointer jumping), so
    labels travel far in few steps; it stops when a step changes nothing.
    """
    keep = allowed[None, None].to(labels.dtype)
    x = (labels * allowed)[None, None]
    while True:
        prev = x
        if cross:
            y = torch.maximum(
                F.max_pool2d(x, (1, 3), 1, (0, 1)), F.max_pool2d(x, (3, 1), 1, (1, 0))
            )
        else:
            y = _max2d(x[0, 0], 3)[None, None]
        y = (y * keep).reshape(-1)
        idx = (y.to(torch.int64) - 1).clamp_min(0)
        y = torch.where(y > 0, y[idx], y)
        x = y.view_as(prev)
        if torch.equal(x, prev):
            return x[0, 0]


def _max2d(x: torch.Tensor, size: int) -> torch.Tensor:
    """``size × size`` maximum filter of a ``(H, W)`` map (−inf outside), separably."""
    r = size // 2
    y = F.max_pool2d(x[None, None], (1, size), 1, (0, r))
    return F.max_pool2d(y, (size, 1), 1, (r, 0))[0, 0]


def _label_dtype(n: int) -> torch.dtype:
    # Flat indices must be exact in the label dtype (float32: up to 2**24).
    return torch.float32 if n < (1 << 24) else torch.float64


def breast_mask_torch(image: torch.Tensor, *, block: int = MASK_BLOCK) -> torch.Tensor:
    """Otsu breast mask of a ``(H, W)`` float image in [0, 1], on its device (bool).

    Thresholds as :func:`cascade.data.preprocess.breast_mask`; components and holes on
    a grid ``block`` times coarser (module docstring).
    """
    h, w = image.shape
    lo, hi = torch.aminmax(image)
    if float(hi) <= float(lo):
        return torch.zeros_like(image, dtype=torch.bool)
    high = otsu_threshold(image, lo, hi)
    low = high
    dark = image[image.to(torch.float64) <= high]
    if dark.numel() >= 16:
        dlo, dhi = torch.aminmax(dark)
        if float(dhi) > float(dlo):
            second = otsu_threshold(dark, dlo, dhi)
            if _separability(dark, second) >= _SECOND_SPLIT_SEPARABILITY:
                low = second
    img64 = image.to(torch.float64)
    fine = img64 > (low if bool(low < high) else high)
    fine_high = img64 > high
    # Coarse grid: a block is set when any of its pixels is.
    ph, pw = -h % block, -w % block
    pad = (0, pw, 0, ph)
    cf = F.pad(fine[None, None].float(), pad)
    coarse = F.max_pool2d(cf, block)[0, 0] > 0
    counts = F.avg_pool2d(cf, block)[0, 0] * block * block
    coarse_high = F.max_pool2d(F.pad(fine_high[None, None].float(), pad), block)[0, 0] > 0
    ch, cw = coarse.shape
    dt = _label_dtype(ch * cw)
    ids = torch.arange(1, ch * cw + 1, device=image.device, dtype=dt).view(ch, cw)
    lab = _propagate(ids, coarse, cross=True).to(torch.int64).reshape(-1)
    n = ch * cw + 1
    sizes = torch.zeros(n, dtype=torch.float64, device=image.device)
    sizes.scatter_add_(0, lab, counts.reshape(-1).to(torch.float64))
    reach = torch.zeros(n, dtype=torch.bool, device=image.device)
    reach[lab[coarse_high.reshape(-1)]] = True
    sizes[0] = 0
    sizes[~reach] = 0
    if not bool(sizes.any()):
        return torch.zeros_like(image, dtype=torch.bool)
    largest = (lab == torch.argmax(sizes)).view(ch, cw)
    # Holes: background components (4-connected) that do not reach the border.
    bg = ~largest
    bg_lab = _propagate(ids, bg, cross=True).to(torch.int64)
    border = torch.cat([bg_lab[0], bg_lab[-1], bg_lab[:, 0], bg_lab[:, -1]])
    reaches = torch.zeros(n, dtype=torch.bool, device=image.device)
    reaches[border] = True
    reaches[0] = False
    outside = reaches[bg_lab]
    filled = ~outside
    # Blocks of the filled region whose 3 x 3 neighbourhood is all filled: wholly inside.
    interior = -F.max_pool2d(-filled[None, None].float(), 3, 1, 1)[0, 0] > 0
    up = torch.repeat_interleave(torch.repeat_interleave(filled, block, 0), block, 1)[:h, :w]
    inner = torch.repeat_interleave(torch.repeat_interleave(interior, block, 0), block, 1)
    return inner[:h, :w] | (fine & up)


# --------------------------------------------------------------------------- candidates


def components(binary: torch.Tensor) -> torch.Tensor:
    """8-connected component labels of a bool ``(H, W)`` map, int64, 0 = background.

    A component's label is 1 + the largest flat index of its pixels (not consecutive).
    """
    h, w = binary.shape
    dt = _label_dtype(h * w + 1)
    ids = torch.arange(1, h * w + 1, device=binary.device, dtype=dt).view(h, w)
    return _propagate(ids, binary, cross=False).to(torch.int64)


def _smooth(rmap: torch.Tensor) -> torch.Tensor:
    """:func:`scipy.ndimage.gaussian_filter` ``σ = 1`` (mode "reflect")."""
    x = _blur_axis(rmap, 1.0, 0, "symmetric")
    return _blur_axis(x, 1.0, 1, "symmetric")


def local_peaks(
    sm: torch.Tensor, labels: torch.Tensor, *, min_distance: int, threshold: float
) -> torch.Tensor:
    """Local maxima of ``sm`` per component, as ``peak_local_max(labels=...)`` finds them.

    A pixel is a peak when it is the maximum of the ``2·min_distance + 1`` window of its
    own component's values (other pixels count as 0) and above ``threshold``; of tied
    peaks inside one window the one with the largest flat index is kept.

    Returns
    -------
    torch.Tensor
        bool ``(H, W)``.
    """
    size = 2 * min_distance + 1
    inside = labels > 0
    own = sm * inside
    mx = _max2d(own, size)
    # Windows that hold one component compare with the plain window maximum; where
    # several meet, only the pixel's own component counts (the others read as 0).
    lab_f = labels.to(torch.float64)
    lab_hi = _max2d(lab_f, size)
    lab_lo = -_max2d(torch.where(inside, -lab_f, -torch.inf), size)
    single = lab_hi == lab_lo
    peaks = inside & (own > threshold) & ((own >= mx) | ~single)
    mixed = ~single & peaks
    if bool(mixed.any()):
        r, c = torch.nonzero(mixed, as_tuple=True)
        h, w = sm.shape
        off = torch.arange(-min_distance, min_distance + 1, device=sm.device)
        rr = (r[:, None, None] + off[None, :, None]).clamp(0, h - 1)
        cc = (c[:, None, None] + off[None, None, :]).clamp(0, w - 1)
        same = labels[rr, cc] == labels[r, c][:, None, None]
        local_max = torch.where(same, own[rr, cc], 0.0).flatten(1).amax(1)
        peaks[r, c] = own[r, c] >= local_max
    # Equal maxima within one window (a plateau): keep the last in raster order.
    return peaks & _no_equal_later_peak(peaks, own, labels, min_distance)


def _no_equal_later_peak(
    peaks: torch.Tensor, own: torch.Tensor, labels: torch.Tensor, d: int
) -> torch.Tensor:
    """True where no other peak of the same component and height lies later in the window."""
    if not bool(peaks.any()):
        return peaks
    r, c = torch.nonzero(peaks, as_tuple=True)
    h, w = own.shape
    off = torch.arange(-d, d + 1, device=own.device)
    rr = (r[:, None, None] + off[None, :, None]).clamp(0, h - 1)
    cc = (c[:, None, None] + off[None, None, :]).clamp(0, w - 1)
    later = (rr * w + cc) > (r * w + c)[:, None, None]
    clash = (
        peaks[rr, cc]
        & later
        & (own[rr, cc] == own[r, c][:, None, None])
        & (labels[rr, cc] == labels[r, c][:, None, None])
    )
    ok = torch.ones_like(peaks)
    ok[r, c] = ~clash.flatten(1).any(1)
    return ok


def split_regions(sm: torch.Tensor, labels: torch.Tensor, markers: torch.Tensor) -> torch.Tensor:
    """Regions of each component around its markers (approximate watershed of ``−sm``).

    Each component pixel climbs to its highest 3 × 3 neighbour in its component until
    it reaches a maximum (pointer jumping over ``max_pool2d``'s indices); pixels whose
    maximum is a marker take that marker's label; a basin of another maximum joins the
    labelled region it touches at the highest pass (max over touching pixel pairs of
    the lower of their two values), repeated for basins behind basins.

    Parameters
    ----------
    sm : torch.Tensor
        float ``(H, W)`` smoothed map.
    labels : torch.Tensor
        int64 component labels (0 = background).
    markers : torch.Tensor
        bool ``(H, W)``: at least one in every component that should be kept.

    Returns
    -------
    torch.Tensor
        int64 ``(H, W)``: 1 + the flat index of each pixel's marker, 0 = none.
    """
    h, w = sm.shape
    inside = labels > 0
    val = torch.where(inside, sm, -1.0)
    _, ptr = F.max_pool2d(val[None, None], 3, 1, 1, return_indices=True)
    ptr = ptr.reshape(-1)
    n = h * w
    for _ in range(max(1, math.ceil(math.log2(max(n, 2))))):
        nxt = ptr[ptr]
        if torch.equal(nxt, ptr):
            break
        ptr = nxt
    flat_markers = markers.reshape(-1)
    root_marked = flat_markers[ptr]
    region = torch.where(root_marked & inside.reshape(-1), ptr + 1, 0).view(h, w)
    # A basin whose maximum is no marker joins, whole, the labelled neighbour it meets
    # at the highest pass (the larger of min(sm) over the pixel pairs that touch): the
    # marker whose flood would reach it first. Repeated for basins behind basins.
    root = torch.where(inside.reshape(-1), ptr, -1).view(h, w)
    region = region.clone()
    for _ in range(64):
        pending = inside & (region == 0)
        if not bool(pending.any()):
            break
        best = torch.full((n,), -1.0, dtype=sm.dtype, device=sm.device)
        pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for dr, dc in _NEIGHBOURS:
            p_sl, q_sl = _shifted(h, w, dr, dc)
            ok = pending[p_sl] & (region[q_sl] > 0)
            if not bool(ok.any()):
                continue
            pass_h = torch.minimum(sm[p_sl], sm[q_sl])[ok]
            rt = root[p_sl][ok]
            lab = region[q_sl][ok]
            best.scatter_reduce_(0, rt, pass_h, reduce="amax")
            pairs.append((rt, pass_h, lab))
        if not pairs:
            break
        pick = torch.zeros(n, dtype=torch.int64, device=sm.device)
        for rt, pass_h, lab in pairs:
            top = pass_h == best[rt]
            pick.scatter_reduce_(0, rt[top], lab[top], reduce="amax")
        join = pending & (pick[root.clamp_min(0)] > 0)
        region = torch.where(join, pick[root.clamp_min(0)], region)
    return region


#: Radius of the σ = 1 Gaussian (truncated at 4 σ) of the maxima rule.
_SMOOTH_RADIUS = 4
_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _shifted(h: int, w: int, dr: int, dc: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Slices of pixels ``p`` and of their neighbours ``q = p + (dr, dc)`` in an ``(h, w)`` grid."""

    def axis(n: int, d: int) -> tuple[slice, slice]:
        return (slice(0, n - d), slice(d, n)) if d >= 0 else (slice(-d, n), slice(0, n + d))

    (pr, qr), (pc, qc) = axis(h, dr), axis(w, dc)
    return (pr, pc), (qr, qc)


@dataclass(frozen=True)
class _Regions:
    """Per-region statistics on the device (working grid), highest score first."""

    score: torch.Tensor  # float64 (R,)
    area: torch.Tensor  # int64 (R,)
    cy: torch.Tensor  # float64 (R,)
    cx: torch.Tensor
    bbox: torch.Tensor  # int64 (R, 4): r0, c0, r1, c1 (ends exclusive)
    pix_region: torch.Tensor  # int64 (P,): index into the regions above
    pix_r: torch.Tensor  # int64 (P,)
    pix_c: torch.Tensor


def extract(rmap: torch.Tensor, config: ProposalConfig) -> _Regions:
    """Candidate regions of a ``(H, W)`` map on its device, highest ASN score first.

    Components of ``rmap > threshold`` smaller than ``min_area_px`` are dropped; with
    ``split="maxima"`` the rest are split at their peaks (:func:`local_peaks`,
    :func:`split_regions`; a component without a peak keeps one marker at its
    highest smoothed pixel); regions smaller than ``min_area_px`` are dropped and at
    most ``max_candidates`` kept. Works in the box around the pixels above threshold
    (with the filters' margin, so their values there are the whole image's).
    """
    binary = rmap > config.threshold
    rows = torch.nonzero(binary.any(1), as_tuple=True)[0]
    cols = torch.nonzero(binary.any(0), as_tuple=True)[0]
    h, w = rmap.shape
    if len(rows) == 0:
        z = torch.zeros(0, dtype=torch.int64, device=rmap.device)
        zf = z.to(torch.float64)
        return _Regions(zf, z, zf, zf, z.view(0, 4), z, z, z)
    margin = _SMOOTH_RADIUS + config.min_peak_distance_px if config.split == "maxima" else 1
    r0, r1 = max(int(rows[0]) - margin, 0), min(int(rows[-1]) + 1 + margin, h)
    c0, c1 = max(int(cols[0]) - margin, 0), min(int(cols[-1]) + 1 + margin, w)
    regs = _extract_window(rmap[r0:r1, c0:c1], config)
    off = torch.tensor([r0, c0, r0, c0], device=rmap.device)
    return _Regions(
        score=regs.score,
        area=regs.area,
        cy=regs.cy + r0,
        cx=regs.cx + c0,
        bbox=regs.bbox + off,
        pix_region=regs.pix_region,
        pix_r=regs.pix_r + r0,
        pix_c=regs.pix_c + c0,
    )


def _extract_window(rmap: torch.Tensor, config: ProposalConfig) -> _Regions:
    """:func:`extract` within one window (coordinates relative to it)."""
    dev = rmap.device
    h, w = rmap.shape
    binary = rmap > config.threshold
    labels = components(binary)
    flat_lab = labels.reshape(-1)
    area_of = torch.bincount(flat_lab, minlength=h * w + 1)
    area_of[0] = 0
    labels = torch.where(area_of[labels] >= config.min_area_px, labels, 0)
    if config.split == "maxima":
        sm = _smooth(rmap.to(torch.float64)).to(rmap.dtype)
        peaks = local_peaks(
            sm, labels, min_distance=config.min_peak_distance_px, threshold=config.threshold
        )
        # Components without a peak: one marker at their highest pixel (last index).
        flat_lab = labels.reshape(-1)
        has = torch.zeros(h * w + 1, dtype=torch.bool, device=dev)
        has[flat_lab[peaks.reshape(-1)]] = True
        has[0] = True
        flat_sm = sm.reshape(-1).to(torch.float64)
        top = torch.full((h * w + 1,), -1.0, dtype=torch.float64, device=dev)
        top.scatter_reduce_(0, flat_lab, flat_sm, reduce="amax")
        at_top = (flat_sm == top[flat_lab]) & ~has[flat_lab]
        idx = torch.arange(h * w, device=dev)
        best = torch.full((h * w + 1,), -1, dtype=torch.int64, device=dev)
        best.scatter_reduce_(0, flat_lab, torch.where(at_top, idx, -1), reduce="amax")
        extra = torch.zeros(h * w, dtype=torch.bool, device=dev)
        sel = best[~has]
        extra[sel[sel >= 0]] = True
        markers = peaks | extra.view(h, w)
        region = split_regions(sm, labels, markers)
    else:
        region = labels
    r, c = torch.nonzero(region > 0, as_tuple=True)
    key = region[r, c]
    uniq, inv = torch.unique(key, return_inverse=True)
    nreg = len(uniq)
    vals = rmap[r, c].to(torch.float64)

    def add(x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(nreg, dtype=x.dtype, device=dev)
        return out.scatter_add_(0, inv, x)

    area = add(torch.ones_like(r))
    score = add(vals)
    cy = add(vals * r.to(torch.float64)) / score
    cx = add(vals * c.to(torch.float64)) / score

    def red(x: torch.Tensor, how: str, init: int) -> torch.Tensor:
        out = torch.full((nreg,), init, dtype=torch.int64, device=dev)
        return out.scatter_reduce_(0, inv, x, reduce=how)

    big = h + w + 1
    bbox = torch.stack(
        [red(r, "amin", big), red(c, "amin", big), red(r, "amax", -1) + 1, red(c, "amax", -1) + 1],
        1,
    )
    keep = area >= config.min_area_px
    order = torch.nonzero(keep, as_tuple=True)[0]
    # Highest score first; ties in marker (raster) order, as a stable sort of keys.
    srt = torch.sort(-score[order], stable=True).indices
    order = order[srt][: config.max_candidates]
    remap = torch.full((nreg,), -1, dtype=torch.int64, device=dev)
    remap[order] = torch.arange(len(order), device=dev)
    pr = remap[inv]
    sel = pr >= 0
    return _Regions(
        score=score[order],
        area=area[order],
        cy=cy[order],
        cx=cx[order],
        bbox=bbox[order],
        pix_region=pr[sel],
        pix_r=r[sel],
        pix_c=c[sel],
    )


def gather_crops(
    image: torch.Tensor, centres_rc: torch.Tensor, size: int = CROP_SIZE
) -> torch.Tensor:
    """``(N, size, size)`` crops of a device image around ``(N, 2)`` (row, col) centres.

    As :func:`cascade.inference.fpr.extract_crops`: the crop's pixel
    ``(size // 2, size // 2)`` is the pixel nearest to the centre; zero outside.
    """
    h, w = image.shape
    half = size // 2
    rc = torch.round(centres_rc).to(torch.int64)
    off = torch.arange(size, device=image.device) - half
    rows = rc[:, 0, None] + off[None]
    cols = rc[:, 1, None] + off[None]
    ok = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    vals = image[rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]]
    return torch.where(ok, vals, torch.zeros((), dtype=image.dtype, device=image.device))


# --------------------------------------------------------------------------- the cascade


@dataclass(frozen=True)
class ResidentResult:
    """What :meth:`ResidentCascade.run` hands back (host side).

    Attributes
    ----------
    candidates : list of Candidate
        Highest ASN score first, as :func:`cascade.inference.proposals.propose`.
    probabilities : numpy.ndarray
        float64 FPR probability per candidate (1 without an FPR; 0 where an operating
        point's ``min_score`` made scoring pointless).
    transform : GridTransform
        Received grid ↔ working grid.
    """

    candidates: list[Candidate]
    probabilities: np.ndarray
    transform: GridTransform


class ResidentCascade:
    """Preprocessing, U-Net, candidates and FPR on one torch device.

    Parameters
    ----------
    asn : torch.nn.Module
        The proposal U-Net (fused at construction, :mod:`cascade.inference.fused`).
    fpr : torch.nn.Module or None
        The FPR network (eval mode), or None.
    kind, residual : str
        The map (:func:`cascade.inference.fused.map_from_output`).
    device : torch.device
        Where everything runs.
    proposal : ProposalConfig
        Threshold and split rule.
    spacing_mm : float
        Working spacing.
    fpr_input_size : int
        The FPR network's input side.
    fpr_batch_size : int
        Crops per FPR pass.
    tile, overlap : see :func:`cascade.inference.proposals.plan_tiles`.
    tiles_per_batch : int
        U-Net windows of one shape per forward pass.
    autocast : bool or None
        bf16 autocast of the U-Net and FPR; None = on CUDA only.
    """

    def __init__(
        self,
        asn: nn.Module,
        fpr: nn.Module | None,
        *,
        kind: str,
        residual: str,
        device: torch.device,
        proposal: ProposalConfig,
        spacing_mm: float,
        fpr_input_size: int = 56,
        fpr_batch_size: int = 256,
        tile: int | tuple[int, int] = DEFAULT_TILE,
        overlap: int = DEFAULT_OVERLAP,
        tiles_per_batch: int = 4,
        autocast: bool | None = None,
    ) -> None:
        if tiles_per_batch < 1 or fpr_batch_size < 1:
            raise ValueError("tiles_per_batch and fpr_batch_size must be ≥ 1")
        self.device = torch.device(device)
        self.net = fused_map_module(asn, kind=kind, residual=residual).to(self.device).eval()
        self.net = self.net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.fpr = fpr
        self.proposal, self.spacing_mm = proposal, float(spacing_mm)
        self.fpr_input_size, self.fpr_batch_size = int(fpr_input_size), int(fpr_batch_size)
        self.tile, self.overlap, self.tiles_per_batch = tile, overlap, tiles_per_batch
        self.autocast = self.device.type == "cuda" if autocast is None else bool(autocast)

    def _amp(self) -> torch.autocast:
        return torch.autocast(
            device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast
        )

    @torch.inference_mode()
    def preprocess(self, mammo: Mammogram) -> tuple[torch.Tensor, torch.Tensor, GridTransform]:
        """Working-grid image (background 0) and breast mask on the device, and the grid."""
        pixels = torch.from_numpy(np.ascontiguousarray(mammo.pixels)).to(
            self.device, non_blocking=True
        )
        transform = GridTransform.for_spacing(
            (int(pixels.shape[0]), int(pixels.shape[1])),
            mammo.metadata.pixel_spacing_mm,
            self.spacing_mm,
        )
        unit = unit_image(pixels)
        work = resample(unit, transform).clamp(0.0, 1.0)
        mask = breast_mask_torch(work)
        return torch.where(mask, work, 0.0), mask, transform

    @torch.inference_mode()
    def proposal_map(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The U-Net's map over the breast's windows (zero outside the mask), float32."""
        h, w = image.shape
        out = torch.zeros((h, w), dtype=torch.float32, device=self.device)
        tiles = plan_tiles((h, w), mask.cpu().numpy(), tile=self.tile, overlap=self.overlap)
        groups: dict[tuple[int, int], list] = {}
        for t in tiles:
            r0, c0, r1, c1 = t.window
            key = (-(-(r1 - r0) // 8) * 8, -(-(c1 - c0) // 8) * 8)
            groups.setdefault(key, []).append(t)
        for (ph, pw), ts in groups.items():
            for start in range(0, len(ts), self.tiles_per_batch):
                batch = ts[start : start + self.tiles_per_batch]
                x = torch.zeros((len(batch), 1, ph, pw), dtype=torch.float32, device=self.device)
                for i, t in enumerate(batch):
                    r0, c0, r1, c1 = t.window
                    x[i, 0, : r1 - r0, : c1 - c0] = image[r0:r1, c0:c1]
                x = x.contiguous(memory_format=torch.channels_last)
                with self._amp():
                    m = self.net(x)
                m = m.float()
                for i, t in enumerate(batch):
                    r0, c0 = t.window[:2]
                    kr0, kc0, kr1, kc1 = t.core
                    out[kr0:kr1, kc0:kc1] = m[i, 0, kr0 - r0 : kr1 - r0, kc0 - c0 : kc1 - c0]
        out = torch.where(mask, out, 0.0)
        return out.clamp(0.0, 1.0)

    @torch.inference_mode()
    def fpr_probabilities(
        self, image: torch.Tensor, regs: _Regions, min_score: float | None
    ) -> torch.Tensor:
        """FPR probabilities on the device (float64), 0 where ``score < min_score``."""
        n = len(regs.score)
        probs = torch.ones(n, dtype=torch.float64, device=self.device)
        if self.fpr is None or n == 0:
            return probs
        probs.zero_()
        need = (
            torch.arange(n, device=self.device)
            if min_score is None
            else torch.nonzero(regs.score >= min_score, as_tuple=True)[0]
        )
        if len(need) == 0:
            return probs
        centres = torch.stack([regs.cy[need], regs.cx[need]], 1)
        crops = gather_crops(image, centres)[:, None]
        out = []
        for start in range(0, len(crops), self.fpr_batch_size):
            x = crops[start : start + self.fpr_batch_size]
            if x.shape[-1] != self.fpr_input_size:
                x = F.interpolate(
                    x, size=(self.fpr_input_size,) * 2, mode="bilinear", align_corners=False
                )
            x = x.contiguous(memory_format=torch.channels_last)
            with self._amp():
                logit = self.fpr(x).reshape(-1)
            out.append(torch.sigmoid(logit.float()).to(torch.float64))
        probs[need] = torch.cat(out)
        return probs

    @torch.inference_mode()
    def run(
        self,
        mammo: Mammogram,
        *,
        min_score: float | None = None,
        clock: Callable[[str], None] | None = None,
    ) -> ResidentResult:
        """The cascade up to FPR probabilities for one decoded mammogram.

        ``clock`` (the detector's stage timer) is called after "preprocess",
        "proposal_net", "candidates" and "fpr".
        """
        tick = clock or (lambda _stage: None)
        image, mask, transform = self.preprocess(mammo)
        tick("preprocess")
        rmap = self.proposal_map(image, mask)
        tick("proposal_net")
        regs = extract(rmap, self.proposal)
        tick("candidates")
        probs = self.fpr_probabilities(image, regs, min_score)
        # The one transfer of the result to the host.
        packed = torch.cat(
            [
                regs.score[:, None],
                regs.area[:, None].to(torch.float64),
                regs.cy[:, None],
                regs.cx[:, None],
                regs.bbox.to(torch.float64),
                probs[:, None],
            ],
            1,
        )
        pix = torch.stack([regs.pix_region, regs.pix_r, regs.pix_c], 1)
        packed_h, pix_h = packed.cpu().numpy(), pix.cpu().numpy()
        tick("fpr")
        return ResidentResult(
            candidates=_candidates(packed_h, pix_h, transform),
            probabilities=packed_h[:, 8].copy(),
            transform=transform,
        )


def _candidates(packed: np.ndarray, pix: np.ndarray, transform: GridTransform) -> list[Candidate]:
    """Host-side :class:`Candidate` objects of the transferred region table."""
    n = len(packed)
    if n == 0:
        return []
    centres_work = packed[:, [3, 2]].astype(np.float64)
    centres_src = transform.to_source(centres_work)
    radii_src = transform.lengths_to_source(np.sqrt(packed[:, 1] / math.pi))
    order = np.argsort(pix[:, 0], kind="stable")
    pix = pix[order]
    bounds = np.searchsorted(pix[:, 0], np.arange(n + 1))
    out = []
    for i in range(n):
        r0, c0, r1, c1 = (int(v) for v in packed[i, 4:8])
        m = np.zeros((r1 - r0, c1 - c0), dtype=bool)
        p = pix[bounds[i] : bounds[i + 1]]
        m[p[:, 1] - r0, p[:, 2] - c0] = True
        out.append(
            Candidate(
                x_work=float(centres_work[i, 0]),
                y_work=float(centres_work[i, 1]),
                x=float(centres_src[i, 0]),
                y=float(centres_src[i, 1]),
                asn_score=float(packed[i, 0]),
                area_px=int(packed[i, 1]),
                bbox=(r0, c0, r1, c1),
                radius_px=float(max(radii_src[i], 0.5)),
                mask=m,
            )
        )
    return out


# --------------------------------------------------------------------------- prefetch

T = TypeVar("T")
S = TypeVar("S")


def prefetch(items: Iterable[S], load: Callable[[S], T], *, depth: int = 2) -> Iterator[T]:
    """``load(item)`` for each item, computed ahead on one thread, at most ``depth`` ahead.

    The next images are decoded while the caller computes on the current one; results
    come in input order and an exception raised by ``load`` is raised by the iterator
    at that item. Leaving the loop early stops the thread after its current item.
    """
    if depth < 1:
        raise ValueError(f"depth must be ≥ 1, got {depth}")
    q: queue.Queue[tuple[bool, object]] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def work() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                try:
                    q.put((True, load(item)))
                except BaseException as exc:  # handed to the consumer
                    q.put((False, exc))
        finally:
            q.put((True, done))

    thread = threading.Thread(target=work, name="calcnode-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, value = q.get()
            if value is done:
                return
            if not ok:
                assert isinstance(value, BaseException)
                raise value
            yield value  # type: ignore[misc]
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)
