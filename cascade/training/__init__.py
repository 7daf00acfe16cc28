"""Training of the two-stage cascade: ASN proposals, then the FPR on their candidates.

The flow, one module a step:

1. `config` — what defines a run: `AsnTrainConfig`, `FprTrainConfig` and their
   ``tiny`` / ``cpu`` / ``paper`` presets (`preset`, `fpr_preset`).
2. `asn` — `train_asn`: the abnormality-sensitive network (or an ablation, `losses`)
   on patches, validated by proposal recall (`evaluate_proposals`).
3. `mining` — the FPR's crops from the trained ASN: `collect_candidates` (hard
   negatives and positives), `other_negative_points` (negatives on vessels …).
4. `fpr` — `train_fpr`: the false-positive reducer on those crops, validated by the
   cascade's FROC (`evaluate_cascade`).

`common` holds what both loops share (`split_records`, seeding). Every loop is seeded,
runs on CUDA when present and on the CPU otherwise, is resumable from its last
checkpoint (optimizer state included: a restarted Adam costs recall) and stops with a
`cascade.errors.TrainingError` on a non-finite loss. Exporting and calibrating the
trained weights is `cascade.inference.weights`; nothing outside this package imports it.
"""

from __future__ import annotations

from cascade.training.asn import evaluate_proposals, train_asn
from cascade.training.common import split_records
from cascade.training.config import (
    ASN_PRESETS,
    FPR_PRESETS,
    AsnTrainConfig,
    FprTrainConfig,
    LossName,
    fpr_preset,
    preset,
)
from cascade.training.fpr import evaluate_cascade, train_fpr
from cascade.training.mining import CandidateImage, collect_candidates, other_negative_points

__all__ = [
    "ASN_PRESETS",
    "FPR_PRESETS",
    "AsnTrainConfig",
    "CandidateImage",
    "FprTrainConfig",
    "LossName",
    "collect_candidates",
    "evaluate_cascade",
    "evaluate_proposals",
    "fpr_preset",
    "other_negative_points",
    "preset",
    "split_records",
    "train_asn",
    "train_fpr",
]
