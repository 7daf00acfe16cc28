"""What defines a training run: the ASN and FPR configs and their named presets.

A config is a frozen dataclass stored in every checkpoint it produces (``to_json``).
The presets are ``tiny`` (smoke tests, seconds), ``cpu`` (a 2-core machine, well under
an hour) and ``paper`` (the paper's sizes, for a GPU); ``preset`` and ``fpr_preset``
return one with overrides.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

__all__ = [
    "ASN_PRESETS",
    "FPR_PRESETS",
    "AsnTrainConfig",
    "FprTrainConfig",
    "LossName",
    "config_json",
    "fpr_preset",
    "preset",
]

LossName = Literal["ttest", "ttest_novar", "mse", "ce"]


def config_json(config: Any) -> dict[str, Any]:
    """A training config as plain JSON types (mappings copied into dicts).

    Parameters
    ----------
    config : AsnTrainConfig or FprTrainConfig
        The config to convert.

    Returns
    -------
    dict
        ``dataclasses.asdict`` of the config, ``model_config`` and ``proposal`` as dicts.
    """
    d = asdict(config)
    d["model_config"] = dict(config.model_config)
    d["proposal"] = dict(config.proposal)
    return d


# ----------------------------------------------------------------------------- ASN


@dataclass(frozen=True)
class AsnTrainConfig:
    """Everything that defines an ASN training run (stored in its checkpoints).

    The defaults are the paper's: 112-px patches, 1 : 1 positives, Adam lr 1e-3,
    weight decay 1e-4, t-test loss β = 0.8, λp = 1, λn = 0.1.
    """

    model: str = "asn_unet"
    model_config: Mapping[str, Any] = field(default_factory=lambda: {"width": 16})
    loss: LossName = "ttest"
    beta: float = 0.8
    lambda_p: float = 1.0
    lambda_n: float = 0.1
    residual: str = "l1"
    patch_size: int = 112
    batch_size: int = 16
    positive_fraction: float = 0.5
    positive_radius_mm: float = 0.49
    epochs: int = 8
    iterations_per_epoch: int = 100
    lr: float = 1e-3
    weight_decay: float = 1e-4
    augment: bool = True
    seed: int = 0
    val_images: int = 8
    proposal: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.loss not in ("ttest", "ttest_novar", "mse", "ce"):
            raise ValueError(f"loss must be ttest, ttest_novar, mse or ce, got {self.loss!r}")
        for name in ("epochs", "iterations_per_epoch", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive, got {self.lr}")

    @property
    def map_kind(self) -> Literal["residual", "segmentation"]:
        """The map the model produces: a segmentation for ``ce``, a residual otherwise."""
        return "segmentation" if self.loss == "ce" else "residual"

    def to_json(self) -> dict[str, Any]:
        """The config as plain JSON types (see `config_json`)."""
        return config_json(self)


#: Named presets: ``tiny`` for smoke tests, ``cpu`` for this kind of 2-core machine
#: (well under an hour), ``paper`` for a GPU.
ASN_PRESETS: dict[str, AsnTrainConfig] = {
    "tiny": AsnTrainConfig(
        model_config={"width": 4},
        epochs=2,
        iterations_per_epoch=3,
        batch_size=4,
        patch_size=64,
        val_images=2,
    ),
    # The paper's sigmoid head does not leave the t-test loss's flat start in a CPU budget
    # (validation recall 0 after 300 iterations, β 0.8 and 0.2); the residual head,
    # f(I) = sigmoid(logit(I) + g(I)), starts at the identity and learns (model card).
    "cpu": AsnTrainConfig(
        model_config={"width": 16, "head": "residual"}, epochs=12, iterations_per_epoch=100
    ),
    "paper": AsnTrainConfig(
        model_config={"width": 32}, epochs=40, iterations_per_epoch=500, val_images=20
    ),
}


def preset(name: str, **overrides: Any) -> AsnTrainConfig:
    """An ASN preset with overrides, e.g. ``preset("cpu", beta=0.3)``.

    Parameters
    ----------
    name : str
        A key of `ASN_PRESETS`.
    **overrides
        Fields to replace.

    Returns
    -------
    AsnTrainConfig
        The preset with the overrides applied.

    Raises
    ------
    ValueError
        Unknown preset name.
    """
    if name not in ASN_PRESETS:
        raise ValueError(f"unknown ASN preset {name!r}; known: {sorted(ASN_PRESETS)}")
    return replace(ASN_PRESETS[name], **overrides)


# ----------------------------------------------------------------------------- FPR


@dataclass(frozen=True)
class FprTrainConfig:
    """Everything that defines an FPR training run (stored in its checkpoints).

    The paper: ResNet-50, crops of 56 px around every ASN candidate of the training
    images (hard negatives) plus every ground-truth µC (positives), no re-sampling,
    SGD lr 1e-3 with momentum. Both presets standardise each crop by itself
    (``input_norm="crop"``, robust to vendor brightness and contrast). The CPU preset
    uses Adam and batches of 32: with SGD at lr 1e-3 a from-scratch ResNet barely moves
    in the few hundred steps a CPU affords (BCE 0.68 → 0.67 in 4 epochs, measured), and
    without the per-crop standardisation its validation AUC swings between steps.
    """

    model: str = "fpr_resnet50"
    model_config: Mapping[str, Any] = field(
        default_factory=lambda: {"width": 16, "input_size": 56, "input_norm": "crop"}
    )
    epochs: int = 6
    batch_size: int = 64
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    match_radius_mm: float = 1.0
    other_negatives: tuple[str, ...] = ()
    other_negative_spacing_mm: float = 1.0
    augment: bool = True
    seed: int = 0
    val_images: int = 8
    proposal: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (
            self.other_negative_spacing_mm > 0 and math.isfinite(self.other_negative_spacing_mm)
        ):
            raise ValueError(
                f"other_negative_spacing_mm must be positive, got {self.other_negative_spacing_mm}"
            )
        if isinstance(self.other_negatives, str):
            raise TypeError("other_negatives must be a tuple of kinds, not a string")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be sgd or adam, got {self.optimizer!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive, got {self.lr}")

    def to_json(self) -> dict[str, Any]:
        """The config as plain JSON types (see `config_json`)."""
        return config_json(self)


FPR_PRESETS: dict[str, FprTrainConfig] = {
    "tiny": FprTrainConfig(
        model_config={"width": 4, "input_size": 56, "input_norm": "crop"},
        epochs=1,
        batch_size=16,
        optimizer="adam",
        val_images=2,
        proposal={"max_candidates": 20},
    ),
    # The CPU preset keeps the 60 highest-scoring candidates of each training image as
    # hard negatives (the ones that decide the low-FP operating points): all of them
    # would cost ≈ 15 min per epoch on 2 cores.
    "cpu": FprTrainConfig(
        model_config={"width": 16, "input_size": 56, "input_norm": "crop"},
        epochs=6,
        batch_size=32,
        optimizer="adam",
        proposal={"max_candidates": 60},
    ),
    "paper": FprTrainConfig(
        model_config={"width": 64, "input_size": 224, "input_norm": "crop"},
        epochs=30,
        val_images=20,
    ),
}


def fpr_preset(name: str, **overrides: Any) -> FprTrainConfig:
    """An FPR preset with overrides, e.g. ``fpr_preset("cpu", epochs=8)``.

    Parameters
    ----------
    name : str
        A key of `FPR_PRESETS`.
    **overrides
        Fields to replace.

    Returns
    -------
    FprTrainConfig
        The preset with the overrides applied.

    Raises
    ------
    ValueError
        Unknown preset name.
    """
    if name not in FPR_PRESETS:
        raise ValueError(f"unknown FPR preset {name!r}; known: {sorted(FPR_PRESETS)}")
    return replace(FPR_PRESETS[name], **overrides)
