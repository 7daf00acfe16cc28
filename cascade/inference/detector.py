"""The whole cascade for one image: preprocessing → ASN proposals → FPR → detections.

Every coordinate a :class:`Detection` holds is in the **received** image's pixel
grid: ``x`` = column, ``y`` = row, 0-based, the centre of the first pixel at
``(0, 0)`` — whatever spacing the cascade worked at. :class:`Detection` and
:class:`ImageDetections` live in the torch-free :mod:`cascade.inference.detections`
and are re-exported here.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any, BinaryIO

import numpy as np
import pydicom
import torch

from cascade.data.io import Mammogram, MammogramMetadata, read_mammogram
from cascade.data.preprocess import GridTransform, preprocess_mammogram
from cascade.device import resolve_device
from cascade.errors import CheckpointError
from cascade.evaluation.operating_point import OperatingPoint
from cascade.inference.detections import Detection, ImageDetections
from cascade.inference.fpr import extract_crops
from cascade.inference.proposals import (
    Candidate,
    ProposalConfig,
    candidates_xy,
    propose,
    residual_map,
)
from cascade.inference.resident import ResidentCascade, prefetch
from cascade.inference.runtime import (
    CropScorer,
    MapNet,
    OnnxCropScorer,
    OnnxMapNet,
    TorchCropScorer,
    TorchMapNet,
    select_backend,
)
from cascade.inference.weights import ModelIdentity, ModelWeights
from cascade.models.checkpoint import load_checkpoint

logger = logging.getLogger(__name__)

__all__ = ["DETECTOR_BACKENDS", "STAGES", "Detection", "Detector", "ImageDetections"]

#: What ``Detector(backend=...)`` accepts: the runtimes of :mod:`cascade.inference.runtime`,
#: ``"resident"`` (the whole cascade in torch on the device,
#: :mod:`cascade.inference.resident`) and ``"reference"``, the previous implementation
#: kept for parity (:mod:`cascade.inference.reference`).
DETECTOR_BACKENDS = ("auto", "torch", "onnx", "resident", "reference")
#: The stages :meth:`Detector.detect` times when asked (``timings=``), in order.
STAGES = ("decode", "preprocess", "proposal_net", "candidates", "fpr", "detections")


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
    backend : {"auto", "torch", "onnx", "resident", "reference"}
        Where the networks run (:mod:`cascade.inference.runtime`): "auto" = the
        resident path on a CUDA device, ONNX Runtime on a CPU device where it is
        installed, else torch; "resident" = preprocessing, U-Net, candidates and FPR
        all in torch on the device, one transfer of the result per image
        (:mod:`cascade.inference.resident`; on the CPU too, for parity); "reference" = the
        previous implementation end to end (torch, square tiles over the breast's
        bounding box, whole-image candidate filters), kept for parity and for
        ``bench/speed.py``'s ratio.
    threads : int or None
        ONNX Runtime intra-op threads; None = ``torch.get_num_threads()`` (the
        worker's ``torch_threads``).
    """

    def __init__(
        self,
        asn_checkpoint: str | os.PathLike[str],
        fpr_checkpoint: str | os.PathLike[str] | None = None,
        *,
        device: str = "auto",
        proposal: ProposalConfig | None = None,
        fpr_batch_size: int = 256,
        operating_point: OperatingPoint | None = None,
        backend: str = "auto",
        threads: int | None = None,
    ) -> None:
        self._load(
            ModelWeights.at(asn_checkpoint, fpr_checkpoint),
            device=device,
            proposal=proposal,
            fpr_batch_size=fpr_batch_size,
            operating_point=operating_point,
            backend=backend,
            threads=threads,
        )

    @classmethod
    def from_weights(
        cls,
        weights: ModelWeights,
        *,
        device: str = "auto",
        proposal: ProposalConfig | None = None,
        fpr_batch_size: int = 256,
        operating_point: OperatingPoint | None = None,
        backend: str = "auto",
        threads: int | None = None,
    ) -> Detector:
        """The detector of already located (and hashed) :class:`ModelWeights`."""
        self = cls.__new__(cls)
        self._load(
            weights,
            device=device,
            proposal=proposal,
            fpr_batch_size=fpr_batch_size,
            operating_point=operating_point,
            backend=backend,
            threads=threads,
        )
        return self

    def _load(
        self,
        weights: ModelWeights,
        *,
        device: str,
        proposal: ProposalConfig | None,
        fpr_batch_size: int,
        operating_point: OperatingPoint | None,
        backend: str = "auto",
        threads: int | None = None,
    ) -> None:
        if operating_point is not None and not isinstance(operating_point, OperatingPoint):
            raise TypeError(
                f"operating_point must be an OperatingPoint or None, got {operating_point!r}"
            )
        self.weights = weights
        self.device = resolve_device(device)
        asn = load_checkpoint(weights.asn, map_location=self.device)
        if asn.meta.get("kind") not in ("asn", "unet_ce"):
            raise CheckpointError(f"{weights.asn}: not an ASN checkpoint ({asn.meta.get('kind')})")
        self.asn = asn.model.to(self.device).eval()
        self.asn_meta = asn.meta
        pre = asn.meta.get("preprocessing", {})
        self.map_kind = pre.get("map_kind", "residual")
        self.residual = pre.get("residual", "l1")
        self.spacing_mm = float(pre.get("pixel_spacing_mm", 0.07))
        stored = dict(asn.meta.get("training", {}).get("proposal", {}) or {})
        self.proposal = proposal or ProposalConfig(**stored)
        self.fpr: torch.nn.Module | None = None
        self.fpr_meta: dict[str, Any] = {}
        self.fpr_input_size = 56
        if weights.fpr is not None:
            fpr = load_checkpoint(weights.fpr, map_location=self.device, kind="fpr")
            self.fpr = fpr.model.to(self.device).eval()
            self.fpr_meta = fpr.meta
            self.fpr_input_size = int(fpr.meta.get("model_config", {}).get("input_size", 56))
        self.fpr_batch_size = fpr_batch_size
        self.operating_point = operating_point
        if backend not in DETECTOR_BACKENDS:
            raise ValueError(f"backend must be one of {list(DETECTOR_BACKENDS)}, got {backend!r}")
        self.reference = backend == "reference"
        if backend == "auto" and self.device.type == "cuda":
            backend = "resident"
        self.resident: ResidentCascade | None = None
        if backend == "resident":
            self.resident = ResidentCascade(
                self.asn,
                self.fpr,
                kind=self.map_kind,
                residual=self.residual,
                device=self.device,
                proposal=self.proposal,
                spacing_mm=self.spacing_mm,
                fpr_input_size=self.fpr_input_size,
                fpr_batch_size=fpr_batch_size,
            )
        self.backend = (
            "torch"
            if self.reference or self.resident is not None
            else select_backend(backend, self.device)
        )
        self.asn_net: MapNet
        self.fpr_net: CropScorer | None = None
        if self.backend == "onnx":
            self.asn_net = OnnxMapNet(
                self.asn, kind=self.map_kind, residual=self.residual, threads=threads
            )
            if self.fpr is not None:
                self.fpr_net = OnnxCropScorer(
                    self.fpr,
                    input_size=self.fpr_input_size,
                    batch_size=fpr_batch_size,
                    threads=threads,
                )
        else:
            self.asn_net = TorchMapNet(
                self.asn,
                kind=self.map_kind,
                residual=self.residual,
                device=self.device,
                fused=None if self.resident is None else self.resident.net,
            )
            if self.fpr is not None:
                self.fpr_net = TorchCropScorer(
                    self.fpr,
                    input_size=self.fpr_input_size,
                    batch_size=fpr_batch_size,
                    device=self.device,
                )
        logger.debug("detector on %s, backend %s", self.device, self.label)

    @property
    def label(self) -> str:
        """``"onnx"``, ``"torch"``, ``"resident"`` or ``"reference"``: what :meth:`detect` runs."""
        if self.resident is not None:
            return "resident"
        return "reference" if self.reference else self.backend

    @classmethod
    def bundled(cls, *, device: str = "auto", calibrated: bool = True, **kwargs: Any) -> Detector:
        """The detector shipped with calcnode (trained on phantoms: not for clinical use).

        With ``calibrated`` (the default) it reports at the operating point stored in the
        bundled ``weights.json`` (:meth:`ModelWeights.operating_point`); with
        ``calibrated=False`` it returns every candidate, scored.

        Raises
        ------
        CheckpointError
            This installation has no bundled weights.
        """
        weights = ModelWeights.bundled_weights()
        if calibrated and "operating_point" not in kwargs:
            kwargs["operating_point"] = weights.operating_point()
        return cls.from_weights(weights, device=device, **kwargs)

    @property
    def asn_sha256(self) -> str:
        """SHA-256 of the ASN checkpoint file."""
        return self.weights.asn_sha256

    @property
    def fpr_sha256(self) -> str:
        """SHA-256 of the FPR checkpoint file (``""`` without an FPR)."""
        return self.weights.fpr_sha256

    @property
    def model_version(self) -> str:
        """A short identifier of the loaded weights (sha256 prefixes of both checkpoints)."""
        return self.weights.version

    @property
    def identity(self) -> ModelIdentity:
        """The identity of what this detector reports: its weights and operating point."""
        return self.weights.identity(self.operating_point)

    @torch.no_grad()
    def detect(
        self,
        source: str | os.PathLike[str] | pydicom.Dataset | BinaryIO,
        *,
        path: str = "",
        timings: dict[str, tuple[float, float]] | None = None,
    ) -> ImageDetections:
        """Detect µCs in one mammogram; coordinates in the received grid.

        Parameters
        ----------
        source : path, pydicom.Dataset or binary file
            The mammogram.
        path : str
            Recorded in the result (default: ``source`` when it is a path).
        timings : dict or None
            When given, filled with ``stage → (wall seconds, CPU seconds of this
            process)`` for each of :data:`STAGES`.
        """
        clock = _Clock(timings, self.device)
        mammo = read_mammogram(source)
        clock("decode")
        if path == "" and isinstance(source, (str, os.PathLike)):
            path = str(source)
        return self._detect_decoded(mammo, path=path, clock=clock)

    def _detect_decoded(self, mammo: Mammogram, *, path: str, clock: _Clock) -> ImageDetections:
        """:meth:`detect` after the decode."""
        meta = mammo.metadata
        if self.resident is not None:
            op = self.operating_point
            res = self.resident.run(
                mammo, min_score=None if op is None else op.min_score, clock=clock
            )
            cands, probs, transform = res.candidates, res.probabilities, res.transform
        else:
            cands, probs, transform = self._detect_host(mammo, clock)
        return self._detections(meta, cands, probs, transform, path=path, clock=clock)

    def _detect_host(
        self, mammo: Mammogram, clock: _Clock
    ) -> tuple[list[Candidate], np.ndarray, GridTransform]:
        """Candidates and FPR probabilities through the numpy preprocessing (host path)."""
        pre = preprocess_mammogram(mammo, target_spacing_mm=self.spacing_mm)
        clock("preprocess")
        if self.reference:
            from cascade.inference.reference import (
                propose_reference,
                residual_map_reference,
                score_crops_reference,
            )

            rmap = residual_map_reference(
                self.asn,
                pre.image,
                kind=self.map_kind,
                residual=self.residual,
                mask=pre.breast_mask,
                device=self.device,
            )
            clock("proposal_net")
            cands = propose_reference(rmap, pre.transform, config=self.proposal)
            clock("candidates")
            if self.fpr is not None and cands:
                crops = extract_crops(pre.image, candidates_xy(cands, grid="work"))
                probs = score_crops_reference(
                    self.fpr,
                    crops,
                    input_size=self.fpr_input_size,
                    batch_size=self.fpr_batch_size,
                    device=self.device,
                )
            else:
                probs = np.ones(len(cands))
        else:
            rmap = residual_map(self.asn_net, pre.image, mask=pre.breast_mask)
            clock("proposal_net")
            cands = propose(rmap, pre.transform, config=self.proposal)
            clock("candidates")
            if self.fpr_net is not None and cands:
                probs = self._fpr_probabilities(pre.image, cands)
            else:
                probs = np.ones(len(cands))
        clock("fpr")
        return cands, np.asarray(probs, dtype=np.float64), pre.transform

    def _detections(
        self,
        meta: MammogramMetadata,
        cands: list[Candidate],
        probs: np.ndarray,
        transform: GridTransform,
        *,
        path: str,
        clock: _Clock,
    ) -> ImageDetections:
        """The detections the operating point reports, in the received grid."""
        probs = np.asarray(probs, dtype=np.float64).reshape(-1)
        scores = np.array([c.asn_score for c in cands], dtype=np.float64) * probs
        fpr_scores = np.clip(probs, 0.0, 1.0)
        op = self.operating_point
        order = np.argsort(-scores, kind="stable") if op is None else op.select(scores, fpr_scores)
        scored = [(float(scores[i]), float(fpr_scores[i]), cands[i]) for i in order]
        dets = []
        for score, p, cand in scored:
            mask, origin = _mask_to_source(cand, transform)
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
        result = ImageDetections(
            sop_instance_uid=meta.sop_instance_uid,
            path=path,
            rows=meta.rows,
            columns=meta.columns,
            pixel_spacing_mm=meta.pixel_spacing_mm,
            detections=tuple(dets),
        )
        clock("detections")
        return result

    def _fpr_probabilities(self, image: np.ndarray, cands: Sequence[Candidate]) -> np.ndarray:
        """FPR probabilities of the candidates the operating point could still report.

        The final score is ASN score × FPR probability ≤ ASN score, so a candidate whose
        ASN score is below the operating point's ``min_score`` is never reported: the
        FPR is not run on it (probability 0). The detections are the same as when
        every candidate is scored; without an operating point every one is.
        """
        op = self.operating_point
        asn = np.array([c.asn_score for c in cands], dtype=np.float64)
        need = np.flatnonzero(asn >= op.min_score) if op is not None else np.arange(len(cands))
        probs = np.zeros(len(cands), dtype=np.float64)
        if len(need):
            xy = candidates_xy([cands[int(i)] for i in need], grid="work")
            assert self.fpr_net is not None
            probs[need] = self.fpr_net(extract_crops(image, xy))
        return probs

    @torch.no_grad()
    def detect_many(
        self, sources: Sequence[str | os.PathLike[str]], *, prefetch_depth: int = 2
    ) -> list[ImageDetections]:
        """:meth:`detect` on several files, the next ones decoded on a thread meanwhile.

        At most ``prefetch_depth`` decoded images wait ahead of the one being computed
        (:func:`cascade.inference.resident.prefetch`); results in input order.
        """
        out = []
        decoded = prefetch(list(sources), read_mammogram, depth=prefetch_depth)
        for source, mammo in zip(sources, decoded, strict=True):
            out.append(
                self._detect_decoded(mammo, path=str(source), clock=_Clock(None, self.device))
            )
        return out


class _Clock:
    """Wall and process CPU seconds since the previous stage, into ``timings``."""

    def __init__(
        self, timings: dict[str, tuple[float, float]] | None, device: torch.device
    ) -> None:
        self.timings, self.device = timings, device
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def __call__(self, stage: str) -> None:
        if self.timings is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall, cpu = time.perf_counter(), time.process_time()
        self.timings[stage] = (wall - self.wall, cpu - self.cpu)
        self.wall, self.cpu = wall, cpu


def _mask_to_source(
    cand: Candidate, transform: GridTransform
) -> tuple[np.ndarray, tuple[int, int]]:
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
