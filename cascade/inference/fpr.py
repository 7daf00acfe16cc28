"""False-positive reduction: crops around ASN candidates, scored by a ResNet-50.

Crops are 56 × 56 pixels of the 70-µm working image centred on each candidate
(the paper), zero-padded where they cross the image border (background is zero
after preprocessing) — never dropped. The network sees them at its
``input_size``: 224 (the paper, bilinear resize, only there to match ImageNet
pre-training) or the native 56 (the CPU preset).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cascade.inference.runtime import CropScorer, TorchCropScorer

logger = logging.getLogger(__name__)

__all__ = ["CROP_SIZE", "CropSet", "extract_crops", "prepare_batch", "score_crops"]

#: Side of the crop around each candidate, in 70-µm pixels (the paper).
CROP_SIZE = 56


def extract_crops(
    image: np.ndarray, centres_xy: np.ndarray, *, size: int = CROP_SIZE
) -> np.ndarray:
    """Cut ``size × size`` crops centred on points, zero-padded at the borders.

    Parameters
    ----------
    image : numpy.ndarray
        float32 ``(H, W)`` working-grid image.
    centres_xy : numpy.ndarray
        ``(N, 2)`` centres, x = column, y = row (working grid). The crop's pixel
        ``(size // 2, size // 2)`` is the pixel nearest to the centre.
    size : int
        Crop side in pixels.

    Returns
    -------
    numpy.ndarray
        float32 ``(N, size, size)``.
    """
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D (H, W), got shape {image.shape}")
    centres_xy = np.asarray(centres_xy, dtype=np.float64)
    if centres_xy.size == 0:
        centres_xy = centres_xy.reshape(0, 2)
    if centres_xy.ndim != 2 or centres_xy.shape[1] != 2:
        raise ValueError(f"centres_xy must have shape (N, 2) as (x, y), got {centres_xy.shape}")
    if not np.all(np.isfinite(centres_xy)):
        raise ValueError("centres_xy must be finite")
    if size < 2:
        raise ValueError(f"size must be ≥ 2, got {size}")
    n = len(centres_xy)
    out = np.zeros((n, size, size), np.float32)
    if n == 0:
        return out
    half = size // 2
    padded = np.pad(image.astype(np.float32, copy=False), size, mode="constant")
    cols = np.rint(centres_xy[:, 0]).astype(np.int64)
    rows = np.rint(centres_xy[:, 1]).astype(np.int64)
    h, w = image.shape
    # Centres far outside the image would index past the padding: clamp them to it.
    rows = np.clip(rows, half - size, h + half)
    cols = np.clip(cols, half - size, w + half)
    for i, (r, c) in enumerate(zip(rows, cols, strict=True)):
        r0, c0 = r - half + size, c - half + size
        out[i] = padded[r0 : r0 + size, c0 : c0 + size]
    return out


def prepare_batch(
    crops: np.ndarray, *, input_size: int, device: torch.device | str
) -> torch.Tensor:
    """``(N, S, S)`` crops → ``(N, 1, input_size, input_size)`` tensor on ``device``."""
    x = torch.from_numpy(np.ascontiguousarray(crops, dtype=np.float32))[:, None].to(device)
    if x.shape[-1] != input_size:
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False)
    return x


def score_crops(
    model: torch.nn.Module | CropScorer,
    crops: np.ndarray,
    *,
    input_size: int,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """FPR probabilities (sigmoid of the logit) for ``(N, S, S)`` crops, in batches.

    Parameters
    ----------
    model : torch.nn.Module or CropScorer
        The FPR network as a torch module (run in eval mode, inference mode, then put
        back in its mode), or a crop scorer of :mod:`cascade.inference.runtime` (ONNX
        Runtime or torch; ``input_size``, ``batch_size`` and ``device`` are then its own).
    crops : numpy.ndarray
        float32 ``(N, S, S)``.
    input_size : int
        The network's input side (crops are resized to it bilinearly when they differ).
    batch_size : int
        Crops per forward pass.
    device : torch.device or str
        Where a torch module runs.

    Returns
    -------
    numpy.ndarray
        float64 ``(N,)`` in [0, 1].
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    if not isinstance(model, torch.nn.Module):
        return np.asarray(model(crops), dtype=np.float64).reshape(-1)
    was_training = model.training
    model.eval()
    try:
        scorer = TorchCropScorer(model, input_size=input_size, batch_size=batch_size, device=device)
        return scorer(crops)
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class CropSet:
    """Labelled crops for FPR training.

    Attributes
    ----------
    crops : numpy.ndarray
        float32 ``(N, S, S)``.
    labels : numpy.ndarray
        float32 ``(N,)``: 1 for µCs (ground truth and candidates within 1 mm of one),
        0 for the other candidates (hard negatives).
    sources : tuple of str
        ``"truth"`` or ``"candidate"`` per crop, for reports.
    """

    crops: np.ndarray
    labels: np.ndarray
    sources: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.crops) != len(self.labels) or len(self.labels) != len(self.sources):
            raise ValueError("crops, labels and sources must have the same length")

    @staticmethod
    def concatenate(sets: Sequence[CropSet]) -> CropSet:
        if not sets:
            raise ValueError("no crop sets to concatenate")
        size = sets[0].crops.shape[-1]
        return CropSet(
            crops=np.concatenate([s.crops for s in sets]).reshape(-1, size, size),
            labels=np.concatenate([s.labels for s in sets]).astype(np.float32),
            sources=tuple(src for s in sets for src in s.sources),
        )
