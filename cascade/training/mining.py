"""The FPR's training material, mined from a trained ASN.

`collect_candidates` runs the ASN on images and cuts a crop around every candidate
(labelled positive within ``match_radius_mm`` of a µC, else a hard negative) and every
ground-truth µC (positives); `other_negative_points` adds negatives along the image's
"other" findings (vessels above all); `augment_crops` perturbs a batch of crops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from cascade.data.datasets import TrainingImage
from cascade.inference.fpr import extract_crops
from cascade.inference.proposals import ProposalConfig, candidates_xy, propose, residual_map

__all__ = [
    "CandidateImage",
    "augment_crops",
    "collect_candidates",
    "label_candidates",
    "other_negative_points",
]


@dataclass(frozen=True)
class CandidateImage:
    """ASN candidates of one image with their crops, labels and ground truth.

    Attributes
    ----------
    crops : numpy.ndarray
        ``(N, S, S)`` crops around the candidates.
    asn_scores : numpy.ndarray
        ``(N,)`` ASN scores of the candidates.
    xy_source : numpy.ndarray
        ``(N, 2)`` candidates on the received grid.
    labels : numpy.ndarray
        ``(N,)`` 1 for a candidate on a µC, else 0.
    truth_xy : numpy.ndarray
        ``(M, 2)`` µC centres on the received grid.
    truth_crops : numpy.ndarray
        ``(M, S, S)`` crops around the µCs.
    spacing_mm : tuple of float
        Pixel spacing ``(row, column)`` of the received image.
    breast_area_cm2 : float
        Breast area, for FPs per cm².
    """

    crops: np.ndarray
    asn_scores: np.ndarray
    xy_source: np.ndarray
    labels: np.ndarray
    truth_xy: np.ndarray
    truth_crops: np.ndarray
    spacing_mm: tuple[float, float]
    breast_area_cm2: float


def label_candidates(
    xy: np.ndarray, truth: np.ndarray, spacing_mm: tuple[float, float], radius_mm: float
) -> np.ndarray:
    """1 where a candidate (received grid) lies within ``radius_mm`` of a µC.

    Parameters
    ----------
    xy : numpy.ndarray
        ``(N, 2)`` candidates, x = column, y = row, received grid.
    truth : numpy.ndarray
        ``(M, 2)`` µC centres, same grid.
    spacing_mm : tuple of float
        Pixel spacing ``(row, column)`` in mm.
    radius_mm : float
        Match radius.

    Returns
    -------
    numpy.ndarray
        ``(N,)`` float32 labels, 1 or 0.
    """
    if len(xy) == 0 or len(truth) == 0:
        return np.zeros(len(xy), np.float32)
    dy = (xy[:, None, 1] - truth[None, :, 1]) * spacing_mm[0]
    dx = (xy[:, None, 0] - truth[None, :, 0]) * spacing_mm[1]
    return (np.sqrt(dx**2 + dy**2).min(axis=1) <= radius_mm).astype(np.float32)


def other_negative_points(
    im: TrainingImage,
    kinds: Sequence[str],
    *,
    spacing_mm: float = 1.0,
    keep_off_mm: float = 1.0,
    work_spacing_mm: float = 0.07,
) -> np.ndarray:
    """Points every ``spacing_mm`` along an image's "other" findings of the given kinds.

    Extra FPR negatives on what the FPR exists to reject (vascular calcifications above
    all), wherever the proposal network fired on them or not. Points closer than
    ``keep_off_mm`` to a µC are dropped (a µC beside a vessel stays a positive).

    Parameters
    ----------
    im : TrainingImage
        The image, its record's ``others`` and its µC centres.
    kinds : sequence of str
        Kinds of "other" findings to sample (e.g. ``("vascular",)``).
    spacing_mm : float
        Distance between points along a finding's polyline.
    keep_off_mm : float
        Points closer than this to a µC are dropped.
    work_spacing_mm : float
        Pixel spacing of the working grid.

    Returns
    -------
    numpy.ndarray
        ``(N, 2)`` points in the working grid, x = column, y = row.
    """
    step = spacing_mm / work_spacing_mm
    pts_all = []
    for other in im.record.others:
        if other.kind not in kinds:
            continue
        pts = im.transform.to_work(np.asarray(other.points, dtype=np.float64).reshape(-1, 2))
        if other.closed and len(pts) >= 3:
            pts = np.vstack([pts, pts[:1]])
        # Sample by arc length: every `step` pixels along the whole polyline.
        arc = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(pts, axis=0).T))])
        at = np.arange(0.0, arc[-1] + 1e-9, step)
        pts_all.append(
            np.column_stack([np.interp(at, arc, pts[:, 0]), np.interp(at, arc, pts[:, 1])])
        )
    if not pts_all:
        return np.zeros((0, 2), np.float64)
    out = np.vstack(pts_all)
    if len(im.centres):
        d = np.hypot(
            out[:, None, 0] - im.centres[None, :, 0], out[:, None, 1] - im.centres[None, :, 1]
        )
        out = out[d.min(axis=1) * work_spacing_mm > keep_off_mm]
    h, w = im.image.shape
    inside = (out[:, 0] >= 0) & (out[:, 0] <= w - 1) & (out[:, 1] >= 0) & (out[:, 1] <= h - 1)
    return out[inside]


def collect_candidates(
    asn: torch.nn.Module,
    images: Sequence[TrainingImage],
    *,
    map_kind: Literal["residual", "segmentation"] = "residual",
    residual_kind: str = "l1",
    proposal: ProposalConfig | None = None,
    match_radius_mm: float = 1.0,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> list[CandidateImage]:
    """Run ASN on images and cut labelled crops around every candidate and every µC.

    Parameters
    ----------
    asn : torch.nn.Module
        The trained ASN (in eval mode).
    images : sequence of TrainingImage
        Images with their ground truth.
    map_kind : {"residual", "segmentation"}
        The map the ASN produces.
    residual_kind : str
        Residual of a ``residual`` map.
    proposal : ProposalConfig or None
        Proposal settings; ``None`` for the defaults.
    match_radius_mm : float
        A candidate this close to a µC is a positive.
    device : torch.device or str
        Where the ASN runs.
    progress : bool
        Show a progress bar.

    Returns
    -------
    list of CandidateImage
        One per image, in order.
    """
    out = []
    iterator: Any = images
    if progress:
        from tqdm import tqdm

        iterator = tqdm(images, desc="ASN candidates", unit="img")
    for im in iterator:
        rmap = residual_map(
            asn,
            im.image,
            kind=map_kind,
            residual=residual_kind,
            mask=im.breast_mask,
            device=device,
        )
        cands = propose(rmap, im.transform, config=proposal)
        xy_src = candidates_xy(cands, grid="source")
        truth = np.array([[c.x, c.y] for c in im.record.calcifications], dtype=np.float64).reshape(
            -1, 2
        )
        out.append(
            CandidateImage(
                crops=extract_crops(im.image, candidates_xy(cands, grid="work")),
                asn_scores=np.array([c.asn_score for c in cands], dtype=np.float64),
                xy_source=xy_src,
                labels=label_candidates(xy_src, truth, im.record.pixel_spacing_mm, match_radius_mm),
                truth_xy=truth,
                truth_crops=extract_crops(im.image, im.centres),
                spacing_mm=im.record.pixel_spacing_mm,
                breast_area_cm2=float(im.breast_mask.sum()) * 0.07 * 0.07 / 100.0,
            )
        )
    return out


def augment_crops(rng: np.random.Generator, crops: np.ndarray) -> np.ndarray:
    """Flips, quarter turns and mild contrast / noise for a batch of ``(N, S, S)`` crops.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of the random choices (advanced in place).
    crops : numpy.ndarray
        ``(N, S, S)`` crops in [0, 1]; not modified.

    Returns
    -------
    numpy.ndarray
        The augmented copy, clipped to [0, 1].
    """
    out = crops.copy()
    for i in range(len(out)):
        c = out[i]
        if rng.random() < 0.5:
            c = c[:, ::-1]
        if rng.random() < 0.5:
            c = c[::-1, :]
        c = np.rot90(c, int(rng.integers(0, 4)))
        if rng.random() < 0.5:
            mean = float(c.mean())
            c = mean + rng.uniform(0.8, 1.25) * (c - mean)
        if rng.random() < 0.5:
            c = c + rng.normal(0.0, rng.uniform(0.0, 0.015), c.shape)
        out[i] = np.clip(c, 0.0, 1.0)
    return out
