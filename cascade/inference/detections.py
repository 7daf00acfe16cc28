"""What the cascade finds: :class:`Detection` and :class:`ImageDetections`, plain data.

Every coordinate a :class:`Detection` holds is in the **received** image's pixel
grid: ``x`` = column, ``y`` = row, 0-based, the centre of the first pixel at
``(0, 0)`` — whatever spacing the cascade worked at.

Torch-free: the node's main process (SCP, scheduler, reports) reads and writes
detections without loading the networks (:mod:`cascade.inference.detector` does).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Detection", "ImageDetections"]


@dataclass(frozen=True)
class Detection:
    """One detected microcalcification, in the received image's pixel grid.

    Parameters
    ----------
    x, y : float
        Centre; x = column, y = row, 0-based, first pixel's centre at (0, 0).
    score : float
        Final score: ``asn_score * fpr_score`` (the paper's fusion).
    asn_score : float
        Summed residual of the ASN component (≥ 0).
    fpr_score : float
        FPR probability that the candidate is a µC, in [0, 1].
    radius_px : float
        Radius of the finding in received-grid pixels (column spacing).
    mask : numpy.ndarray or None
        Boolean footprint, shape ``(bbox rows, bbox cols)``, for SEG.
    mask_origin : (int, int)
        ``(row, col)`` of ``mask[0, 0]`` in the received grid.
    """

    x: float
    y: float
    score: float
    asn_score: float
    fpr_score: float
    radius_px: float
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)
    mask_origin: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        for name in ("x", "y", "score", "asn_score", "fpr_score", "radius_px"):
            value = getattr(self, name)
            if not isinstance(value, (int, float, np.floating)) or not math.isfinite(value):
                raise ValueError(f"Detection.{name} must be a finite number, got {value!r}")
        if self.asn_score < 0:
            raise ValueError(f"Detection.asn_score must be ≥ 0, got {self.asn_score}")
        if not 0.0 <= self.fpr_score <= 1.0:
            raise ValueError(f"Detection.fpr_score must lie in [0, 1], got {self.fpr_score}")
        if self.radius_px <= 0:
            raise ValueError(f"Detection.radius_px must be positive, got {self.radius_px}")
        if self.mask is not None and (self.mask.ndim != 2 or self.mask.dtype != bool):
            raise ValueError("Detection.mask must be a 2-D boolean array")

    def to_json(self) -> dict[str, float]:
        """The detection as in ``detections.json`` (no mask)."""
        return {
            "x": float(self.x),
            "y": float(self.y),
            "score": float(self.score),
            "asn_score": float(self.asn_score),
            "fpr_score": float(self.fpr_score),
            "radius_px": float(self.radius_px),
        }


@dataclass(frozen=True)
class ImageDetections:
    """All detections of one image, with the grid they are expressed in."""

    sop_instance_uid: str
    path: str
    rows: int
    columns: int
    pixel_spacing_mm: tuple[float, float]
    detections: tuple[Detection, ...]

    def full_mask(self) -> np.ndarray:
        """Union of the detections' masks (disks where a mask is missing), ``(rows, columns)``."""
        out = np.zeros((self.rows, self.columns), dtype=bool)
        for det in self.detections:
            if det.mask is not None:
                r0, c0 = det.mask_origin
                r1, c1 = r0 + det.mask.shape[0], c0 + det.mask.shape[1]
                rr0, cc0 = max(r0, 0), max(c0, 0)
                rr1, cc1 = min(r1, self.rows), min(c1, self.columns)
                if rr1 > rr0 and cc1 > cc0:
                    out[rr0:rr1, cc0:cc1] |= det.mask[rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0]
            else:
                rad = max(det.radius_px, 1.0)
                r0, r1 = math.floor(det.y - rad), math.ceil(det.y + rad) + 1
                c0, c1 = math.floor(det.x - rad), math.ceil(det.x + rad) + 1
                r0, c0 = max(r0, 0), max(c0, 0)
                r1, c1 = min(r1, self.rows), min(c1, self.columns)
                if r1 > r0 and c1 > c0:
                    yy, xx = np.mgrid[r0:r1, c0:c1]
                    out[r0:r1, c0:c1] |= (xx - det.x) ** 2 + (yy - det.y) ** 2 <= rad**2
        return out

    def to_json(self) -> dict[str, object]:
        """The image entry of ``detections.json``."""
        return {
            "sop_instance_uid": self.sop_instance_uid,
            "path": self.path,
            "rows": int(self.rows),
            "columns": int(self.columns),
            "pixel_spacing_mm": [float(s) for s in self.pixel_spacing_mm],
            "detections": [d.to_json() for d in self.detections],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ImageDetections:
        """Inverse of :meth:`to_json` (the masks, which it does not hold, are None).

        Raises
        ------
        ValueError
            A missing or invalid field; the message names it.
        """
        try:
            dets = tuple(
                Detection(
                    x=float(d["x"]),
                    y=float(d["y"]),
                    score=float(d["score"]),
                    asn_score=float(d["asn_score"]),
                    fpr_score=float(d["fpr_score"]),
                    radius_px=float(d["radius_px"]),
                )
                for d in data["detections"]
            )
            spacing = tuple(float(s) for s in data["pixel_spacing_mm"])
            return cls(
                sop_instance_uid=str(data["sop_instance_uid"]),
                path=str(data.get("path", "")),
                rows=int(data["rows"]),
                columns=int(data["columns"]),
                pixel_spacing_mm=(spacing[0], spacing[1]),
                detections=dets,
            )
        except KeyError as exc:
            raise ValueError(f"detections JSON lacks {exc.args[0]!r}") from None
        except (TypeError, IndexError) as exc:
            raise ValueError(f"detections JSON is malformed: {exc}") from None
