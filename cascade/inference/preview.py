"""Preview PNGs: the display image with detections (and optionally truth) circled.

Points are in the received image's grid (x = column, y = row, first pixel's
centre at (0, 0)); the preview may be downsampled and draws them scaled.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cascade.inference.detections import ImageDetections

logger = logging.getLogger(__name__)

__all__ = ["render_preview", "write_detection_preview"]

#: Colours (RGB) of the overlay.
DETECTION_COLOUR = (255, 200, 0)
TRUTH_COLOUR = (0, 230, 90)
OTHER_COLOUR = (80, 160, 255)


def render_preview(
    display: np.ndarray,
    *,
    circles: Sequence[tuple[float, float, float, tuple[int, int, int]]] = (),
    max_side: int = 1600,
    min_radius_px: float = 6.0,
) -> Image.Image:
    """An RGB image of ``display`` ([0, 1], bright = dense) with circles drawn on it.

    Parameters
    ----------
    display : numpy.ndarray
        ``(rows, cols)`` float image in [0, 1].
    circles : sequence of (x, y, radius, colour)
        Centres and radii in ``display``'s pixel grid (x = column, y = row).
    max_side : int
        The preview is downsampled so that its longer side is at most this.
    min_radius_px : float
        Circles are drawn at least this large in the preview, so tiny findings show.
    """
    if display.ndim != 2:
        raise ValueError(f"display must be 2-D, got shape {display.shape}")
    scale = min(1.0, max_side / max(display.shape))
    img8 = (np.clip(display, 0.0, 1.0) * 255).astype(np.uint8)
    im = Image.fromarray(img8, mode="L")
    if scale < 1.0:
        size = (max(1, round(display.shape[1] * scale)), max(1, round(display.shape[0] * scale)))
        im = im.resize(size, Image.Resampling.LANCZOS)
    im = im.convert("RGB")
    draw = ImageDraw.Draw(im)
    for x, y, radius, colour in circles:
        # Pixel centres: (x + 0.5) · scale is the centre in the resized image's corner-based
        # coordinates, which is what PIL draws in.
        cx, cy = (x + 0.5) * scale, (y + 0.5) * scale
        r = max(radius * scale * 2.0, min_radius_px)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=colour, width=2)
    return im


def write_detection_preview(
    source: str | os.PathLike[str],
    result: ImageDetections,
    out: str | os.PathLike[str],
    *,
    truth_xy: np.ndarray | None = None,
    min_score: float = 0.0,
    max_side: int = 1600,
) -> Path:
    """Write a PNG of ``source`` with ``result``'s detections (yellow) and truth (green)."""
    from cascade.data.io import read_mammogram

    mammo = read_mammogram(source)
    circles = [
        (d.x, d.y, d.radius_px, DETECTION_COLOUR) for d in result.detections if d.score >= min_score
    ]
    if truth_xy is not None:
        circles += [(float(x), float(y), 4.0, TRUTH_COLOUR) for x, y in truth_xy]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    render_preview(mammo.pixels, circles=circles, max_side=max_side).save(out)
    return out
