"""The model the node runs: which weights, at which operating point, loaded how.

The one place the node asks for its model. ``[model] path`` names an ASN checkpoint
(its FPR is ``fpr.pt`` beside it); empty means the bundled weights. What is reported is
``[model] operating_point`` (``calibrated``: the point stored with the weights;
``all``: every candidate) capped by ``[model] max_findings``. Finding, hashing and the
stored operating point are :mod:`cascade.inference.weights`' business.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from cascade.errors import CheckpointError
from cascade.evaluation.operating_point import OperatingPoint
from cascade.inference.detections import ImageDetections
from cascade.inference.weights import ModelIdentity, ModelWeights
from node.errors import ConfigError
from node.settings import Settings

__all__ = [
    "DetectorFactory",
    "DetectorLike",
    "load_detector",
    "model_weights",
    "operating_point",
]

logger = logging.getLogger(__name__)


class DetectorLike(Protocol):
    """What the worker needs of a detector (:class:`cascade.inference.detector.Detector`)."""

    @property
    def identity(self) -> ModelIdentity: ...

    def detect(self, source: Any, *, path: str = "") -> ImageDetections: ...


#: Builds the detector in the worker process: ``factory(settings, device)``. Tests pass
#: one (a slow or failing detector); the default is :func:`load_detector`.
DetectorFactory = Callable[[Settings, str | None], DetectorLike]


def model_weights(settings: Settings) -> ModelWeights:
    """The weights the node runs (``model.path``, else the bundled weights), hashed once.

    Raises
    ------
    ConfigError
        No checkpoint where one is expected; the message names ``model.path``.
    """
    if settings.model.path is not None:
        asn = Path(settings.model.path)
        if not asn.is_file():
            raise ConfigError(f"model.path: no such checkpoint file {asn}")
        return ModelWeights.at(asn, fpr_beside=True)
    try:
        return ModelWeights.bundled_weights()
    except CheckpointError as exc:
        raise ConfigError(
            f"model.path: empty (use the bundled weights), but this installation has none "
            f"({exc}); train a model (calcnode train asn/fpr) and set model.path to its ASN "
            f"checkpoint"
        ) from None


def operating_point(settings: Settings, weights: ModelWeights) -> OperatingPoint:
    """What the node reports: ``model.operating_point`` and ``model.max_findings``.

    Returns
    -------
    OperatingPoint
        ``calibrated``: the point stored with ``weights`` when it was calibrated on these
        checkpoints, else the FPR's decision alone (probability ≥ 0.5), with a warning
        (:meth:`ModelWeights.operating_point`); ``all``: every candidate.
        ``max_findings`` then caps it (the smaller of the two limits when the stored
        point has one too).

    Raises
    ------
    CheckpointError
        ``weights.json`` holds an unusable operating point.
    """
    if settings.model.operating_point == "all":
        op = OperatingPoint(fpr_threshold=0.0, min_score=0.0)
    else:
        op = weights.operating_point()
    limit = settings.model.max_findings
    if limit:
        op = dataclasses.replace(
            op, max_detections=min(limit, op.max_detections) if op.max_detections else limit
        )
    logger.info(
        "operating point (%s): FPR probability ≥ %g, final score ≥ %.4g, at most %s findings "
        "per image",
        settings.model.operating_point,
        op.fpr_threshold,
        op.min_score,
        op.max_detections or "any number of",
    )
    return op


def load_detector(settings: Settings, device: str | None = None) -> DetectorLike:
    """Load the configured detector once (the default :data:`DetectorFactory`).

    Parameters
    ----------
    settings : Settings
        ``model.path``, ``model.device``, ``model.torch_threads``; what it reports:
        ``model.operating_point`` and ``model.max_findings`` (:func:`operating_point`).
    device : str or None
        Overrides ``model.device`` (``calcnode worker --device cuda:0``).

    Raises
    ------
    ConfigError
        No checkpoint (see :func:`model_weights`).
    CheckpointError
        The checkpoint cannot be loaded.
    """
    import torch

    from cascade.inference.detector import Detector

    weights = model_weights(settings)
    if settings.model.torch_threads > 0:
        torch.set_num_threads(settings.model.torch_threads)
    return Detector.from_weights(
        weights,
        device=device or settings.model.device,
        operating_point=operating_point(settings, weights),
    )
