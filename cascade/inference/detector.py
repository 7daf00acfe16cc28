"""The whole cascade for one image: preprocessing → ASN proposals → FPR → detections.

Every coordinate a :class:`Detection` holds is in the **received** image's pixel
grid: ``x`` = column, ``y`` = row, 0-based, the centre of the first pixel at
``(0, 0)`` — whatever spacing the cascade worked at.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pydicom
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "BUNDLED_WEIGHTS",
    "Detection",
    "Detector",
    "ImageDetections",
    "OperatingPoint",
    "calibrate_operating_point",
    "resolve_operating_point",
]

#: Folder of the weights shipped in the package (trained on synthetic phantoms only).
BUNDLED_WEIGHTS = Path(__file__).resolve().parent.parent / "weights"


@dataclass(frozen=True, kw_only=True)
class OperatingPoint:
    """Which of the cascade's scored candidates are reported.

    The cascade scores every candidate (final score = ASN score × FPR probability,
    the paper's fusion); a FROC curve needs them all. What a reader sees is one point
    on that curve:

    1. the FPR's own decision: a candidate whose FPR probability is below
       ``fpr_threshold`` is a false positive and removed (this is what leaves most
       vascular calcifications alone: their FPR probability is low while their
       summed ASN score, over a long vessel segment, is as high as a µC's);
    2. the survivors whose final score is at least ``min_score``, highest first;
    3. at most ``max_detections`` of them (0 = no limit).

    Parameters
    ----------
    fpr_threshold : float
        In [0, 1]; 0 keeps every candidate.
    min_score : float
        ≥ 0; final-score threshold, usually chosen on validation images by
        :func:`calibrate_operating_point` for a target false-positive rate.
    max_detections : int
        ≥ 0; 0 = no limit.
    calibration : mapping
        How ``min_score`` was chosen (data, target FP/image, the recall reached) and on
        which checkpoints (``asn_sha256``, ``fpr_sha256``: see :meth:`for_checkpoints`).
    """

    fpr_threshold: float = 0.5
    min_score: float = 0.0
    max_detections: int = 0
    calibration: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in ("fpr_threshold", "min_score"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"OperatingPoint.{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"OperatingPoint.{name} must be finite, got {value!r}")
        if not 0.0 <= self.fpr_threshold <= 1.0:
            raise ValueError(
                f"OperatingPoint.fpr_threshold must lie in [0, 1], got {self.fpr_threshold}"
            )
        if self.min_score < 0:
            raise ValueError(f"OperatingPoint.min_score must be ≥ 0, got {self.min_score}")
        if isinstance(self.max_detections, bool) or not isinstance(self.max_detections, int):
            raise TypeError(
                f"OperatingPoint.max_detections must be an integer, got {self.max_detections!r}"
            )
        if self.max_detections < 0:
            raise ValueError(
                f"OperatingPoint.max_detections must be ≥ 0, got {self.max_detections!r}"
            )
        if not isinstance(self.calibration, Mapping):
            raise TypeError(
                f"OperatingPoint.calibration must be a mapping, got {self.calibration!r}"
            )

    def keeps(self, *, score: float, fpr_score: float) -> bool:
        """Whether a candidate passes the thresholds (the count limit aside)."""
        return fpr_score >= self.fpr_threshold and score >= self.min_score

    def select(self, scores: np.ndarray, fpr_scores: np.ndarray) -> np.ndarray:
        """Indices of the reported candidates, highest final score first.

        Parameters
        ----------
        scores, fpr_scores : numpy.ndarray
            ``(N,)`` final scores and FPR probabilities of one image's candidates.

        Returns
        -------
        numpy.ndarray
            int ``(M,)``, M ≤ N (≤ ``max_detections`` when that is set); ties keep
            their input order.
        """
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        fpr_scores = np.asarray(fpr_scores, dtype=np.float64).reshape(-1)
        if scores.shape != fpr_scores.shape:
            raise ValueError(
                f"scores and fpr_scores differ in length: {scores.shape} vs {fpr_scores.shape}"
            )
        keep = np.flatnonzero((fpr_scores >= self.fpr_threshold) & (scores >= self.min_score))
        keep = keep[np.argsort(-scores[keep], kind="stable")]
        return keep[: self.max_detections] if self.max_detections else keep

    def to_json(self) -> dict[str, Any]:
        """The ``operating_point`` object of ``weights.json``."""
        return {
            "fpr_threshold": float(self.fpr_threshold),
            "min_score": float(self.min_score),
            "max_detections": int(self.max_detections),
            "calibration": dict(self.calibration),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> OperatingPoint:
        """Inverse of :meth:`to_json`; unknown keys are an error."""
        if not isinstance(data, Mapping):
            raise ValueError(f"an operating point must be a JSON object, got {data!r}")
        unknown = sorted(
            set(data) - {"fpr_threshold", "min_score", "max_detections", "calibration"}
        )
        if unknown:
            raise ValueError(f"unknown operating-point keys: {', '.join(unknown)}")
        return cls(**dict(data))

    @classmethod
    def for_weights(cls, folder: str | os.PathLike[str]) -> OperatingPoint | None:
        """The operating point stored in ``folder/weights.json``, or None if there is none.

        Raises
        ------
        CheckpointError
            ``weights.json`` exists but cannot be read or holds a bad operating point.
        """
        from cascade.errors import CheckpointError

        path = Path(folder) / "weights.json"
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            op = data.get("operating_point")
            return None if op is None else cls.from_json(op)
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{path}: unusable operating point: {exc}") from exc

    @classmethod
    def for_checkpoints(
        cls,
        asn: str | os.PathLike[str],
        fpr: str | os.PathLike[str] | None,
    ) -> OperatingPoint | None:
        """The operating point stored beside ``asn`` if it was calibrated on these files.

        A point is calibrated on one pair of checkpoints' scores; its ``calibration``
        records their sha256 (``calcnode train calibrate`` writes them). Returns None,
        with a warning, when ``weights.json`` beside ``asn`` holds a point calibrated on
        other files (or not saying on which), and None when it holds none.

        Raises
        ------
        CheckpointError
            ``weights.json`` exists but holds an unusable operating point.
        """
        from cascade.models.checkpoint import checkpoint_sha256

        folder = Path(asn).parent
        stored = cls.for_weights(folder)
        if stored is None:
            return None
        want = (
            checkpoint_sha256(asn),
            checkpoint_sha256(fpr) if fpr is not None else "",
        )
        have = (
            str(stored.calibration.get("asn_sha256", "")),
            str(stored.calibration.get("fpr_sha256", "")),
        )
        if have != want:
            logger.warning(
                "the operating point in %s/weights.json was calibrated on other checkpoints "
                "than %s and %s; not used (calcnode train calibrate)",
                folder,
                Path(asn).name,
                Path(fpr).name if fpr is not None else "no FPR",
            )
            return None
        return stored


def resolve_operating_point(
    asn: str | os.PathLike[str], fpr: str | os.PathLike[str] | None
) -> OperatingPoint:
    """The calibrated point of these checkpoints, else the FPR's decision alone.

    :meth:`OperatingPoint.for_checkpoints` when it finds one; otherwise
    ``OperatingPoint()`` (FPR probability ≥ 0.5, no score threshold), with a warning.
    ``calcnode detect``, :meth:`Detector.bundled` and the node all resolve it this way.
    """
    op = OperatingPoint.for_checkpoints(asn, fpr)
    if op is None:
        op = OperatingPoint()
        logger.warning(
            "no calibrated operating point for %s: reporting what the FPR keeps "
            "(probability ≥ %.2f) with no score threshold",
            Path(asn).parent,
            op.fpr_threshold,
        )
    return op


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


class Detector:
    """The ASN → FPR cascade, loaded once, applied to any number of images.

    Parameters
    ----------
    asn_checkpoint : path
        ASN (or cross-entropy U-Net) checkpoint.
    fpr_checkpoint : path or None
        FPR checkpoint; None gives ASN proposals alone (``fpr_score`` = 1).
    device : str
        "auto" (CUDA when present), "cpu", "cuda" or "cuda:N".
    proposal : ProposalConfig or None
        Overrides the proposal settings stored in the ASN checkpoint.
    fpr_batch_size : int
        Crops per FPR forward pass.
    operating_point : OperatingPoint or None
        Which detections :meth:`detect` returns; None = every candidate, scored
        (what FROC evaluation needs).
    """

    def __init__(
        self,
        asn_checkpoint: str | os.PathLike[str],
        fpr_checkpoint: str | os.PathLike[str] | None = None,
        *,
        device: str = "auto",
        proposal: Any = None,
        fpr_batch_size: int = 256,
        operating_point: OperatingPoint | None = None,
    ) -> None:
        from cascade.device import resolve_device
        from cascade.inference.proposals import ProposalConfig
        from cascade.models.checkpoint import checkpoint_sha256, load_checkpoint

        self.device = resolve_device(device)
        asn = load_checkpoint(asn_checkpoint, map_location=self.device)
        if asn.meta.get("kind") not in ("asn", "unet_ce"):
            from cascade.errors import CheckpointError

            raise CheckpointError(
                f"{asn_checkpoint}: not an ASN checkpoint ({asn.meta.get('kind')})"
            )
        self.asn = asn.model.to(self.device).eval()
        self.asn_meta = asn.meta
        self.asn_sha256 = checkpoint_sha256(asn_checkpoint)
        self.fpr_sha256 = ""
        pre = asn.meta.get("preprocessing", {})
        self.map_kind = pre.get("map_kind", "residual")
        self.residual = pre.get("residual", "l1")
        self.spacing_mm = float(pre.get("pixel_spacing_mm", 0.07))
        stored = dict(asn.meta.get("training", {}).get("proposal", {}) or {})
        self.proposal = proposal or ProposalConfig(**stored)
        self.fpr = None
        self.fpr_meta: dict[str, Any] = {}
        self.fpr_input_size = 56
        if fpr_checkpoint is not None:
            fpr = load_checkpoint(fpr_checkpoint, map_location=self.device, kind="fpr")
            self.fpr = fpr.model.to(self.device).eval()
            self.fpr_meta = fpr.meta
            self.fpr_sha256 = checkpoint_sha256(fpr_checkpoint)
            self.fpr_input_size = int(fpr.meta.get("model_config", {}).get("input_size", 56))
        self.fpr_batch_size = fpr_batch_size
        if operating_point is not None and not isinstance(operating_point, OperatingPoint):
            raise TypeError(
                f"operating_point must be an OperatingPoint or None, got {operating_point!r}"
            )
        self.operating_point = operating_point

    @classmethod
    def bundled(cls, *, device: str = "auto", calibrated: bool = True, **kwargs: Any) -> Detector:
        """The detector shipped with calcnode (trained on phantoms: not for clinical use).

        With ``calibrated`` (the default) it reports at the operating point stored in the
        bundled ``weights.json`` (see :func:`resolve_operating_point`); with
        ``calibrated=False`` it returns every candidate, scored.
        """
        asn, fpr = BUNDLED_WEIGHTS / "asn.pt", BUNDLED_WEIGHTS / "fpr.pt"
        if not asn.is_file():
            from cascade.errors import CheckpointError

            raise CheckpointError(f"no bundled ASN weights at {asn}")
        fpr_path = fpr if fpr.is_file() else None
        if calibrated and "operating_point" not in kwargs:
            kwargs["operating_point"] = resolve_operating_point(asn, fpr_path)
        return cls(asn, fpr_path, device=device, **kwargs)

    @property
    def model_version(self) -> str:
        """A short identifier of the loaded weights (sha256 prefixes of both checkpoints)."""
        return "-".join(h[:12] for h in (self.asn_sha256, self.fpr_sha256) if h)

    @property
    def model_sha256(self) -> str:
        """sha256 over both checkpoints' digests: changes with every trained model."""
        import hashlib

        return hashlib.sha256((self.asn_sha256 + self.fpr_sha256).encode()).hexdigest()

    @torch.no_grad()
    def detect(
        self, source: str | os.PathLike[str] | pydicom.Dataset | BinaryIO, *, path: str = ""
    ) -> ImageDetections:
        """Detect µCs in one mammogram; coordinates in the received grid."""
        from cascade.data.io import read_mammogram
        from cascade.data.preprocess import preprocess_mammogram
        from cascade.inference.fpr import extract_crops, score_crops
        from cascade.inference.proposals import candidates_xy, propose_image

        mammo = read_mammogram(source)
        meta = mammo.metadata
        pre = preprocess_mammogram(mammo, target_spacing_mm=self.spacing_mm)
        _, cands = propose_image(
            self.asn,
            pre,
            kind=self.map_kind,
            residual=self.residual,
            config=self.proposal,
            device=self.device,
        )
        if self.fpr is not None and cands:
            crops = extract_crops(pre.image, candidates_xy(cands, grid="work"))
            probs = score_crops(
                self.fpr,
                crops,
                input_size=self.fpr_input_size,
                batch_size=self.fpr_batch_size,
                device=self.device,
            )
        else:
            probs = np.ones(len(cands))
        probs = np.asarray(probs, dtype=np.float64).reshape(-1)
        scores = np.array([c.asn_score for c in cands], dtype=np.float64) * probs
        fpr_scores = np.clip(probs, 0.0, 1.0)
        op = self.operating_point
        order = np.argsort(-scores, kind="stable") if op is None else op.select(scores, fpr_scores)
        scored = [(float(scores[i]), float(fpr_scores[i]), cands[i]) for i in order]
        dets = []
        for score, p, cand in scored:
            mask, origin = _mask_to_source(cand, pre.transform)
            dets.append(
                Detection(
                    x=cand.x,
                    y=cand.y,
                    score=score,
                    asn_score=cand.asn_score,
                    fpr_score=p,
                    radius_px=cand.radius_px,
                    mask=mask,
                    mask_origin=origin,
                )
            )
        if path == "" and isinstance(source, (str, os.PathLike)):
            path = str(source)
        return ImageDetections(
            sop_instance_uid=meta.sop_instance_uid,
            path=path,
            rows=meta.rows,
            columns=meta.columns,
            pixel_spacing_mm=meta.pixel_spacing_mm,
            detections=tuple(dets),
        )

    def detect_many(self, sources: Sequence[str | os.PathLike[str]]) -> list[ImageDetections]:
        """:meth:`detect` on several files."""
        return [self.detect(s) for s in sources]


def _mask_to_source(cand: Any, transform: Any) -> tuple[np.ndarray, tuple[int, int]]:
    """A candidate's working-grid footprint as a boolean mask in the received grid.

    Nearest-neighbour: each received pixel inside the footprint's bounding box
    takes the value of the working-grid pixel its centre falls in.
    """
    r0, c0, r1, c1 = cand.bbox
    corners = transform.to_source(np.array([[c0 - 0.5, r0 - 0.5], [c1 - 0.5, r1 - 0.5]], float))
    rows_src, cols_src = transform.source_shape
    sr0 = int(np.clip(np.floor(corners[0, 1]), 0, rows_src - 1))
    sc0 = int(np.clip(np.floor(corners[0, 0]), 0, cols_src - 1))
    sr1 = int(np.clip(np.ceil(corners[1, 1]) + 1, sr0 + 1, rows_src))
    sc1 = int(np.clip(np.ceil(corners[1, 0]) + 1, sc0 + 1, cols_src))
    ys = np.arange(sr0, sr1, dtype=float)
    xs = np.arange(sc0, sc1, dtype=float)
    wy = transform.to_work(np.stack([np.zeros_like(ys), ys], axis=1))[:, 1]
    wx = transform.to_work(np.stack([xs, np.zeros_like(xs)], axis=1))[:, 0]
    iy = np.rint(wy).astype(np.int64) - r0
    ix = np.rint(wx).astype(np.int64) - c0
    ok_y = (iy >= 0) & (iy < cand.mask.shape[0])
    ok_x = (ix >= 0) & (ix < cand.mask.shape[1])
    src = np.zeros((len(ys), len(xs)), dtype=bool)
    src[np.ix_(ok_y, ok_x)] = cand.mask[np.ix_(iy[ok_y], ix[ok_x])]
    if not src.any():
        # Footprint smaller than one received pixel: mark the pixel under the centre.
        rr = int(np.clip(round(cand.y), 0, rows_src - 1))
        cc = int(np.clip(round(cand.x), 0, cols_src - 1))
        return np.ones((1, 1), dtype=bool), (rr, cc)
    return src, (sr0, sc0)


def calibrate_operating_point(
    results: Sequence[tuple[ImageDetections, np.ndarray]],
    *,
    target_fp_per_image: float,
    fpr_threshold: float = 0.5,
    max_detections: int = 0,
    description: Mapping[str, Any] | None = None,
) -> OperatingPoint:
    """Choose ``min_score`` so that about ``target_fp_per_image`` false positives remain.

    Parameters
    ----------
    results : sequence of (ImageDetections, numpy.ndarray)
        Every candidate of each validation image (a detector without operating point)
        with the image's ``(N, 2)`` µC centres (x = column, y = row, received grid).
    target_fp_per_image : float
        > 0; the chosen point is the lowest final-score threshold whose false
        positives per image (after the FPR threshold, 1-mm rule) do not exceed it.
    fpr_threshold : float
        The FPR decision applied before the score threshold.
    max_detections : int
        At most this many per image (0 = no limit), applied before the threshold is
        chosen, as the detector applies it.
    description : mapping or None
        What the images were (stored under ``calibration``).

    Returns
    -------
    OperatingPoint
        With ``calibration`` holding the target, the FP/image and recall reached.
    """
    from cascade.evaluation.froc import ImageEval, froc

    if not (target_fp_per_image > 0 and math.isfinite(target_fp_per_image)):
        raise ValueError(f"target_fp_per_image must be positive, got {target_fp_per_image!r}")
    if not results:
        raise ValueError("calibration needs at least one image")
    selector = OperatingPoint(fpr_threshold=fpr_threshold, max_detections=max_detections)
    evals = []
    for found, truth in results:
        order = selector.select(
            np.array([d.score for d in found.detections], dtype=np.float64),
            np.array([d.fpr_score for d in found.detections], dtype=np.float64),
        )
        kept = [found.detections[i] for i in order]
        evals.append(
            ImageEval(
                np.asarray(truth, dtype=np.float64).reshape(-1, 2),
                np.array([[d.x, d.y] for d in kept], dtype=np.float64).reshape(-1, 2),
                np.array([d.score for d in kept], dtype=np.float64),
                spacing_mm=found.pixel_spacing_mm,
            )
        )
    curve = froc(evals)
    ok = np.flatnonzero(curve.fp_per_image <= target_fp_per_image)
    if len(ok):
        i = int(ok[-1])
        min_score, fp, recall = float(curve.thresholds[i]), curve.fp_per_image[i], curve.recall[i]
    else:  # even the best-scored detection is a false positive on too many images
        logger.warning(
            "no score threshold leaves at most %g false positives per image on these %d "
            "images: the operating point reports nothing",
            target_fp_per_image,
            curve.n_images,
        )
        min_score = (
            math.nextafter(float(curve.thresholds[0]), math.inf) if len(curve.thresholds) else 0.0
        )
        fp, recall = 0.0, 0.0
    return OperatingPoint(
        fpr_threshold=fpr_threshold,
        min_score=min_score,
        max_detections=max_detections,
        calibration={
            **dict(description or {}),
            "images": curve.n_images,
            "calcifications": curve.n_truth,
            "target_fp_per_image": float(target_fp_per_image),
            "fp_per_image": float(fp),
            "recall": float(recall),
        },
    )
