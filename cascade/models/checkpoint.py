"""Self-describing checkpoints: everything that rebuilds and feeds a model, no pickled code.

A checkpoint is a ``torch.save`` file holding only plain types and tensors, so it
loads with ``torch.load(weights_only=True)`` (no code runs on load)::

    {
      "format": "calcnode-checkpoint",
      "format_version": 1,
      "meta": {                      # plain types only (str keys; str/int/float/bool/None)
        "kind": "asn" | "fpr" | "unet_ce",
        "model_name": ..., "model_config": {...},        # as given to save_checkpoint
        "architecture": {"builder": ..., "config": {...}},  # resolved: every argument
        "preprocessing": {...},    # e.g. pixel_spacing_mm, intensity, patch_size
        "training": {...}, "data": {...}, "metrics": {...}, "extra": {...},
        "n_parameters": int,
        "calcnode_version": str, "torch_version": str, "created": ISO-8601 UTC,
      },
      "state_dict": {name: tensor},
      "optimizer_state": {...} | None,   # torch optimizer state_dict (resume)
      "progress": {...} | None,          # epoch / iteration / RNG states (resume)
    }

The model is rebuilt with :func:`cascade.models.get_model` from ``architecture``
(the builder and all its arguments, so a later change of a preset's defaults
cannot change what an old checkpoint rebuilds). Files are written atomically (a
temporary file in the same directory, fsync, rename). Anything wrong on load —
missing file, not a checkpoint, wrong kind, unknown architecture, mismatched
weights, a newer format — raises :class:`~cascade.errors.CheckpointError`.

:func:`export_checkpoint` drops the optimizer state and progress (and can store
float16 weights) for the small files bundled with the package.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from torch import nn

from cascade import __version__
from cascade.errors import CheckpointError
from cascade.models import count_parameters, get_model, resolve_model_config

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "KINDS",
    "Checkpoint",
    "checkpoint_sha256",
    "describe_checkpoint",
    "export_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

FORMAT_NAME: Final = "calcnode-checkpoint"
#: Bumped when the layout changes incompatibly; a reader refuses newer versions.
FORMAT_VERSION: Final = 1
#: What a checkpoint holds: the ASN, the FPR network, or the CE U-Net baseline.
KINDS: Final = ("asn", "fpr", "unet_ce")

_META_SECTIONS: Final = ("preprocessing", "training", "data", "metrics")


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint.

    Attributes
    ----------
    path : pathlib.Path
        The file it came from.
    model : torch.nn.Module
        The rebuilt network with its weights, in eval mode, on ``map_location``.
    meta : dict
        Plain-type description (see the module docstring): kind, architecture,
        preprocessing, training, data, metrics, versions, creation time.
    optimizer_state : dict or None
        The optimizer's ``state_dict()`` when saved (for resuming).
    progress : dict or None
        Epoch / iteration / RNG states when saved (for resuming).
    """

    path: Path
    model: nn.Module
    meta: dict[str, Any]
    optimizer_state: dict[str, Any] | None
    progress: dict[str, Any] | None

    @property
    def kind(self) -> str:
        """``"asn"``, ``"fpr"`` or ``"unet_ce"``."""
        return str(self.meta["kind"])

    @property
    def preprocessing(self) -> dict[str, Any]:
        """What the model expects as input (pixel spacing, intensity scale, patch size...)."""
        return dict(self.meta["preprocessing"])


def _plain(value: Any, where: str, *, tensors: bool) -> Any:
    """A copy of ``value`` made only of types ``torch.load(weights_only=True)`` accepts.

    NumPy scalars become Python scalars (metrics computed with NumPy are common);
    tensors are allowed only where ``tensors`` is true (optimizer state, progress);
    anything else raises ``TypeError`` naming where it was found.
    """
    if value is None or type(value) in (str, bool, int, float):
        return value
    if isinstance(value, np.generic) and not isinstance(value, np.void):
        # np.float64 subclasses float but pickles as a NumPy object: convert it.
        return value.item()
    # Subclasses (StrEnum, IntEnum, torch's TorchVersion) pickle as their class, which
    # weights_only refuses: keep their plain value.
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, torch.Tensor):
        if not tensors:
            raise TypeError(f"{where} is a tensor; metadata must be plain types (use .tolist())")
        return value.detach()
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if type(key) is not str and not (tensors and type(key) is int):
                raise TypeError(f"{where} has a key {key!r} that is not a str")
            out[key] = _plain(item, f"{where}[{key!r}]", tensors=tensors)
        return out
    if isinstance(value, list):
        return [_plain(v, f"{where}[{i}]", tensors=tensors) for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return tuple(_plain(v, f"{where}[{i}]", tensors=tensors) for i, v in enumerate(value))
    raise TypeError(
        f"{where} is a {type(value).__name__}; a checkpoint holds only str, int, float, bool, "
        "None, lists, tuples and dicts" + (" and tensors" if tensors else "")
    )


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable; not possible on every platform
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    model_name: str,
    model_config: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    preprocessing: Mapping[str, Any],
    training: Mapping[str, Any],
    data: Mapping[str, Any],
    metrics: Mapping[str, Any],
    kind: str,
    optimizer_state: Mapping[str, Any] | None = None,
    progress: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a self-describing checkpoint atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Destination; its directory is created if needed; an existing file is
        replaced only once the new one is complete.
    model_name : str
        A name :func:`cascade.models.get_model` knows (builder or preset).
    model_config : mapping
        Builder arguments given with ``model_name`` (plain types).
    state_dict : mapping of str to torch.Tensor
        The model's ``state_dict()``; must match the architecture exactly.
    preprocessing : mapping
        What the input must look like, e.g. ``{"pixel_spacing_mm": 0.07,
        "intensity": "linear [0,1]", "quantize_8bit": True, "patch_size": 112}``.
    training, data, metrics : mapping
        Training recipe, data description and measured metrics (plain types).
    kind : {"asn", "fpr", "unet_ce"}
        What the network is for.
    optimizer_state : mapping or None
        The optimizer's ``state_dict()`` (tensors allowed), for resuming.
    progress : mapping or None
        Epoch, iteration, RNG states... (tensors allowed), for resuming.
    extra : mapping or None
        Anything else worth keeping (plain types).

    Returns
    -------
    pathlib.Path
        The written file.

    Raises
    ------
    ValueError
        Unknown ``kind`` or ``model_name``, or ``state_dict`` does not match the
        architecture (missing, unexpected or mis-shaped entries).
    TypeError
        A metadata value is not a plain type (the message says where), an unknown
        ``model_config`` key, or ``state_dict`` holds a non-tensor.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    if not isinstance(model_name, str):
        raise TypeError(f"model_name must be a str, got {type(model_name).__name__}")
    sections = {
        "model_config": model_config,
        "preprocessing": preprocessing,
        "training": training,
        "data": data,
        "metrics": metrics,
        "extra": {} if extra is None else extra,
    }
    meta_sections: dict[str, Any] = {}
    for name, section in sections.items():
        if not isinstance(section, Mapping):
            raise TypeError(f"{name} must be a mapping, got {type(section).__name__}")
        meta_sections[name] = _plain(section, name, tensors=False)
    builder, full_config = resolve_model_config(model_name, **meta_sections["model_config"])
    full_config = _plain(full_config, "model_config", tensors=False)

    weights: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict[{key!r}] is a {type(value).__name__}, not a tensor")
        weights[key] = value.detach().cpu()
    reference = get_model(builder, **full_config)
    _check_state_dict(reference, weights, where="state_dict")
    if "pixel_spacing_mm" not in meta_sections["preprocessing"]:
        logger.warning("checkpoint %s: preprocessing does not say pixel_spacing_mm", path)

    meta = {
        "kind": kind,
        "model_name": model_name,
        **{k: meta_sections[k] for k in ("model_config", *_META_SECTIONS)},
        "architecture": {"builder": builder, "config": full_config},
        "extra": meta_sections["extra"],
        "n_parameters": count_parameters(reference),
        "format_version": FORMAT_VERSION,
        "calcnode_version": __version__,
        "torch_version": str(torch.__version__),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    obj = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "meta": _plain(meta, "meta", tensors=False),
        "state_dict": weights,
        "optimizer_state": None
        if optimizer_state is None
        else _plain(optimizer_state, "optimizer_state", tensors=True),
        "progress": None if progress is None else _plain(progress, "progress", tensors=True),
    }
    out = Path(path)
    _atomic_torch_save(obj, out)
    logger.info("saved %s checkpoint %s (%s, %s)", kind, out, builder, full_config)
    return out


def _check_state_dict(model: nn.Module, weights: Mapping[str, torch.Tensor], *, where: str) -> None:
    expected = model.state_dict()
    not_tensors = sorted(k for k, v in weights.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ValueError(f"{where} holds non-tensor entries: {not_tensors[:5]}")
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shapes = sorted(
        f"{k}: {tuple(weights[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in weights and weights[k].shape != v.shape
    )
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:5]}{' ...' if len(shapes) > 5 else ''}")
        raise ValueError(f"{where} does not match the architecture: {'; '.join(parts)}")


def _read_raw(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint's dict after checking the file exists and is one of ours."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file: report them all
        raise CheckpointError(
            f"{path} is not a readable calcnode checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not a calcnode checkpoint (no {FORMAT_NAME!r} marker)")
    version = obj.get("format_version")
    if type(version) is not int:
        raise CheckpointError(f"{path}: format_version is missing or not an int: {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version}, newer than this calcnode "
            f"({__version__}) reads (≤ {FORMAT_VERSION}); upgrade calcnode"
        )
    for key, typ in (("meta", dict), ("state_dict", dict)):
        if not isinstance(obj.get(key), typ):
            raise CheckpointError(f"{path} is a damaged checkpoint: {key!r} is missing")
    meta = obj["meta"]
    for key in ("kind", "model_name", "architecture", *_META_SECTIONS):
        if key not in meta:
            raise CheckpointError(f"{path} is a damaged checkpoint: meta has no {key!r}")
    return obj


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    map_location: str | torch.device = "cpu",
    kind: str | None = None,
) -> Checkpoint:
    """Load a checkpoint and rebuild its model.

    Parameters
    ----------
    path : str or os.PathLike
        The checkpoint file.
    map_location : str or torch.device
        Where the tensors and the model go (``"cpu"``, ``"cuda:0"``...).
    kind : {"asn", "fpr", "unet_ce"} or None
        When given, the checkpoint must be of this kind.

    Returns
    -------
    Checkpoint
        Model in eval mode with its weights, the plain-type ``meta``, and the
        optimizer state and progress when saved.

    Raises
    ------
    ValueError
        ``kind`` is not one of :data:`KINDS`.
    CheckpointError
        The file is missing, not a (readable) calcnode checkpoint, of another kind,
        of a newer format, names an architecture this calcnode cannot build, or
        holds weights that do not fit it.
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)} or None, got {kind!r}")
    p = Path(path)
    obj = _read_raw(p, map_location)
    meta = obj["meta"]
    if kind is not None and meta["kind"] != kind:
        raise CheckpointError(f"{p} holds a {meta['kind']!r} model, expected {kind!r}")
    arch = meta["architecture"]
    try:
        model = get_model(arch["builder"], **arch["config"])
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(
            f"{p}: cannot rebuild architecture {arch.get('builder')!r} "
            f"({meta['model_name']!r}): {exc}"
        ) from exc
    try:
        _check_state_dict(model, obj["state_dict"], where="its state_dict")
        model.load_state_dict(obj["state_dict"], strict=True)
    except (ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{p}: {exc}") from exc
    model.to(map_location)
    model.eval()
    logger.info(
        "loaded %s checkpoint %s (%s, created %s)",
        meta["kind"],
        p,
        arch["builder"],
        meta.get("created"),
    )
    return Checkpoint(
        path=p,
        model=model,
        meta=meta,
        optimizer_state=obj.get("optimizer_state"),
        progress=obj.get("progress"),
    )


def checkpoint_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of the checkpoint file, lowercase hex.

    Raises
    ------
    CheckpointError
        The file does not exist.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    with p.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def describe_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint's metadata without the weights, for ``calcnode`` to print.

    Returns
    -------
    dict
        ``meta`` (plain types, JSON-serialisable except non-finite floats) plus
        ``"file"``: ``{"path", "size_bytes", "sha256"}``, and ``"has_optimizer_state"``,
        ``"has_progress"``.

    Raises
    ------
    CheckpointError
        As :func:`load_checkpoint` for a missing or unreadable file.
    """
    p = Path(path)
    obj = _read_raw(p)
    out = copy.deepcopy(obj["meta"])
    out["file"] = {
        "path": str(p),
        "size_bytes": p.stat().st_size,
        "sha256": checkpoint_sha256(p),
    }
    out["has_optimizer_state"] = obj.get("optimizer_state") is not None
    out["has_progress"] = obj.get("progress") is not None
    return out


def export_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    half: bool = False,
    metrics: Mapping[str, Any] | None = None,
    intended_use: str | None = None,
) -> Path:
    """Write a small inference-only copy of a checkpoint (for bundled weights).

    Drops the optimizer state and the progress; with ``half`` stores floating
    weights as float16 (halving the file; :func:`load_checkpoint` loads them into
    the float32 model). ``meta["exported"]`` records the source's SHA-256 and the
    weights' dtype.

    Parameters
    ----------
    src, dst : str or os.PathLike
        Source checkpoint and destination file (written atomically).
    half : bool
        Store floating-point tensors as float16.
    metrics : mapping or None
        Replaces the metrics (e.g. the final test-set numbers), when given.
    intended_use : str or None
        Written into ``meta["data"]["intended_use"]`` when given (the bundled
        weights' "synthetic phantoms only — not for clinical use" notice).

    Returns
    -------
    pathlib.Path
        The written file.

    Raises
    ------
    CheckpointError
        ``src`` cannot be read (as :func:`load_checkpoint`).
    """
    if not isinstance(half, bool):
        raise TypeError(f"half must be a bool, got {type(half).__name__}")
    src_p = Path(src)
    obj = _read_raw(src_p)
    meta = copy.deepcopy(obj["meta"])
    if metrics is not None:
        meta["metrics"] = _plain(metrics, "metrics", tensors=False)
    if intended_use is not None:
        meta.setdefault("data", {})["intended_use"] = str(intended_use)
    weights = {
        k: (v.half() if half and v.is_floating_point() else v) for k, v in obj["state_dict"].items()
    }
    for k, v in weights.items():
        if half and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(
                f"{src_p}: {k} does not fit float16 (overflow); export without half"
            )
    meta["exported"] = {
        "from_sha256": checkpoint_sha256(src_p),
        "weights_dtype": "float16" if half else "as saved",
        "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "calcnode_version": __version__,
    }
    out = Path(dst)
    _atomic_torch_save(
        {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "meta": meta,
            "state_dict": weights,
            "optimizer_state": None,
            "progress": None,
        },
        out,
    )
    logger.info("exported %s → %s (half=%s)", src_p, out, half)
    return out
