"""The cascade's networks, by name: a small registry of builders and presets.

``get_model(name, **cfg)`` builds a network from a registered builder name
(``"asn_unet"``, ``"fpr_resnet50"``) or from a preset name (a builder plus default
arguments, listed in :data:`PRESETS`); ``cfg`` overrides the defaults. A
checkpoint stores the name and the arguments, never a pickled module, and rebuilds
the network through this function (see :mod:`cascade.models.checkpoint`).

Every model that :func:`get_model` returns carries ``model.model_name`` (the
builder's name) and ``model.model_config`` (every builder argument, defaults
filled in), which is what a checkpoint needs to rebuild it.

Presets, with one training step (forward + backward + optimizer step) measured on
the 2-core CPU of the development machine: "2 thr" is wall-clock with
``torch.set_num_threads(2)`` on a quiet machine (load < 1); "1 thr CPU" is the
process CPU time with one thread (less sensitive to other load). Five times slower
when other processes load the cores: check ``uptime`` before timing.

=======================  =====================  =======  ==================  ======  ==========
preset                   arguments              params   batch               2 thr   1 thr CPU
=======================  =====================  =======  ==================  ======  ==========
``asn_unet_cpu``         width 16               727 k    16 × 1 × 112 × 112  0.6 s   1.1 s
``asn_unet_paper``       width 32               2.90 M   16 × 1 × 112 × 112  1.8 s   3.7 s
``unet_ce_cpu``          width 16, 2 logits     727 k    16 × 1 × 112 × 112  0.6 s   —
``fpr_resnet50_cpu``     width 16, input 56     1.48 M   64 × 1 × 56 × 56    2.4 s   3.6 s
``fpr_resnet50_paper``   width 64, input 224    23.5 M   64 × 1 × 224 × 224  ≈ 20 s  24 s
=======================  =====================  =======  ==================  ======  ==========

(``asn_unet`` at width 8: 183 k params, 0.3 s; ``fpr_resnet50`` at width 32, input
56: 5.89 M params, 10 s CPU.) The paper does not state the U-Net's width; 16 is the
width of the feasibility run in ``paper-notes.md`` (it learns within ≈ 400
iterations), 32 the "paper" choice.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from cascade.models.resnet import FPRResNet, fpr_resnet50
from cascade.models.unet import ASNUNet, asn_unet

__all__ = [
    "PRESETS",
    "ASNUNet",
    "FPRResNet",
    "asn_unet",
    "count_parameters",
    "fpr_resnet50",
    "get_model",
    "list_models",
    "register_model",
    "resolve_model_config",
]

logger = logging.getLogger(__name__)

_Builder = Callable[..., nn.Module]
_F = TypeVar("_F", bound=_Builder)

_BUILDERS: dict[str, _Builder] = {}

#: Preset name → ``{"builder": registered builder name, "defaults": builder arguments,
#: "description": one line}``. ``get_model(preset, **cfg)`` starts from ``defaults``.
PRESETS: dict[str, dict[str, Any]] = {
    "asn_unet_paper": {
        "builder": "asn_unet",
        "defaults": {"width": 32},
        "description": "ASN U-Net, 3 down/3 up stages × 3 convs, BN, sigmoid; width 32 "
        "(the paper does not state its width)",
    },
    "asn_unet_cpu": {
        "builder": "asn_unet",
        "defaults": {"width": 16},
        "description": "ASN U-Net as the paper, width 16 (727 k params): the feasibility "
        "run's network, trains in minutes on 2 CPU cores",
    },
    "unet_ce_cpu": {
        "builder": "asn_unet",
        "defaults": {"width": 16, "head": "logits", "out_channels": 2},
        "description": "the paper's cross-entropy U-Net baseline (2-class logits), width 16",
    },
    "fpr_resnet50_paper": {
        "builder": "fpr_resnet50",
        "defaults": {"width": 64, "input_size": 224, "input_norm": "crop"},
        "description": "ResNet-50 on 56-px crops resized to 224 (the paper, from scratch)",
    },
    "fpr_resnet50_cpu": {
        "builder": "fpr_resnet50",
        "defaults": {"width": 16, "input_size": 56, "input_norm": "crop"},
        "description": "ResNet-50 at a quarter width on native 56-px crops (3×3/1 stem, "
        "no max-pool)",
    },
}


def register_model(name: str) -> Callable[[_F], _F]:
    """Register a keyword-only builder under ``name`` (a decorator).

    Parameters
    ----------
    name : str
        Registry name; must not clash with a registered builder or a preset.

    Returns
    -------
    callable
        The decorator, which returns the builder unchanged.

    Raises
    ------
    ValueError
        ``name`` is empty or already taken, or the builder has positional parameters.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")

    def decorator(builder: _F) -> _F:
        if name in _BUILDERS or name in PRESETS:
            raise ValueError(f"name {name!r} is already registered")
        params = inspect.signature(builder).parameters.values()
        positional = [p.name for p in params if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        if positional:
            raise ValueError(
                f"builder {name!r} must take keyword-only arguments; positional: {positional}"
            )
        _BUILDERS[name] = builder
        return builder

    return decorator


register_model("asn_unet")(asn_unet)
register_model("fpr_resnet50")(fpr_resnet50)


def list_models() -> list[str]:
    """All names :func:`get_model` accepts, builders and presets, sorted."""
    return sorted([*_BUILDERS, *PRESETS])


def resolve_model_config(name: str, **cfg: Any) -> tuple[str, dict[str, Any]]:
    """The builder name and its complete arguments for ``get_model(name, **cfg)``.

    Parameters
    ----------
    name : str
        A builder or preset name (see :func:`list_models`).
    **cfg
        Builder arguments overriding the preset's defaults and the builder's own.

    Returns
    -------
    (str, dict)
        The registered builder's name and every one of its keyword arguments (the
        preset's defaults, then ``cfg``, the builder's own defaults for the rest).

    Raises
    ------
    ValueError
        ``name`` is unknown; the message lists the known names.
    TypeError
        A key of ``cfg`` is not an argument of the builder; the message names it.
    """
    if name in PRESETS:
        builder_name = PRESETS[name]["builder"]
        merged = {**copy.deepcopy(PRESETS[name]["defaults"]), **cfg}
    elif name in _BUILDERS:
        builder_name, merged = name, dict(cfg)
    else:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    builder = _BUILDERS[builder_name]
    params = inspect.signature(builder).parameters
    unknown = sorted(set(merged) - set(params))
    if unknown:
        raise TypeError(
            f"unknown argument(s) {', '.join(map(repr, unknown))} for model {name!r}; "
            f"accepted: {', '.join(params)}"
        )
    full = {
        key: merged.get(key, p.default)
        for key, p in params.items()
        if key in merged or p.default is not inspect.Parameter.empty
    }
    return builder_name, full


def get_model(name: str, **cfg: Any) -> nn.Module:
    """Build a registered network by builder or preset name.

    Parameters
    ----------
    name : str
        ``"asn_unet"``, ``"fpr_resnet50"``, a preset of :data:`PRESETS`, or a name
        added with :func:`register_model`.
    **cfg
        Builder arguments; they override a preset's defaults.

    Returns
    -------
    torch.nn.Module
        The freshly initialised network (train mode), with ``model_name`` (the
        builder's name) and ``model_config`` (all its arguments) attributes.

    Raises
    ------
    ValueError
        Unknown ``name`` (the message lists the known names), or an argument value
        the builder rejects.
    TypeError
        An unknown argument (the message names it) or an argument of the wrong type.
    """
    builder_name, full = resolve_model_config(name, **cfg)
    model = _BUILDERS[builder_name](**full)
    # Plain (non-tensor) attributes; object.__setattr__ keeps mypy from typing them as Module.
    object.__setattr__(model, "model_name", builder_name)
    object.__setattr__(model, "model_config", copy.deepcopy(full))
    logger.debug("built %s (%s) with %s", name, builder_name, full)
    return model


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
