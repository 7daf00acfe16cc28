"""What both training loops share: the train / validation split of a manifest and seeding."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cascade.data.manifest import ImageRecord, read_manifest
from cascade.errors import TrainingError

__all__ = ["seed_everything", "split_records", "train_val_records"]


def split_records(
    records: Sequence[ImageRecord], *, val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Split records into train / validation by study, deterministically for a seed.

    Parameters
    ----------
    records : sequence of ImageRecord
        The images of a manifest.
    val_fraction : float
        Fraction of the studies held out (at least one when there are two or more).
    seed : int
        Seed of the shuffle of the studies.

    Returns
    -------
    tuple of list of ImageRecord
        ``(train, val)``; all images of a study land on the same side.
    """
    studies = sorted({r.study_instance_uid or r.sop_instance_uid for r in records})
    rng = np.random.default_rng(seed)
    rng.shuffle(studies)
    n_val = max(1, round(len(studies) * val_fraction)) if len(studies) > 1 else 0
    val_studies = set(studies[:n_val])
    train = [r for r in records if (r.study_instance_uid or r.sop_instance_uid) not in val_studies]
    val = [r for r in records if (r.study_instance_uid or r.sop_instance_uid) in val_studies]
    return train, val


def train_val_records(
    manifest: str | Path, val_manifest: str | Path | None, *, seed: int, val_images: int
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Training and (at most ``val_images``) validation records.

    Parameters
    ----------
    manifest : str or Path
        The training manifest.
    val_manifest : str or Path or None
        The validation manifest; ``None`` holds out 20 % of the training studies
        (`split_records`).
    seed : int
        Seed of the split.
    val_images : int
        At most this many validation records are kept.

    Returns
    -------
    tuple of list of ImageRecord
        ``(train, val)``.

    Raises
    ------
    TrainingError
        No training images.
    """
    records = read_manifest(manifest)
    if val_manifest is not None:
        train_recs, val_recs = records, read_manifest(val_manifest)
    else:
        train_recs, val_recs = split_records(records, seed=seed)
    if not train_recs:
        raise TrainingError(f"{manifest}: no training images")
    return train_recs, val_recs[:val_images]


def seed_everything(seed: int) -> None:
    """Seed NumPy's global generator and torch (CPU and CUDA)."""
    np.random.seed(seed)
    torch.manual_seed(seed)
