"""Where the two networks run at inference: torch, or ONNX Runtime on the CPU.

A *map net* turns one working-grid tile into the proposal map (the µC probability
of the cross-entropy U-Net, or the ASN residual ``|f(I) − I|``); a *crop scorer*
turns FPR crops into probabilities. Both come in two backends built from the same
torch module, so the checkpoint stays the only source of weights. A map net runs the
U-Net rewritten by :mod:`cascade.inference.fused` (norms folded, skips split, the CE
head as one sigmoid: same function, fewer passes over the feature maps):

``torch``
    That module under ``torch.inference_mode``, channels-last on the CPU.
``onnx``
    That module (the FPR: the module itself) exported to ONNX in memory at load time
    (``torch.onnx``, opset 17) and run by ONNX Runtime's CPU provider with a fixed
    number of intra-op threads.
    On the 2-core AMD EPYC this project is measured on it needs about half the CPU
    time of torch for the U-Net and a fifth for the FPR (``bench/speed.py``,
    ``bench/README.md``). Optional: ``pip install calcnode[onnx]``.

:func:`select_backend` resolves ``"auto"``: ONNX Runtime on a CPU device where it is
installed, torch otherwise (always torch on CUDA). Parity against torch is tested in
``tests/test_speed_parity.py``.

Shapes: a map net takes a float32 ``(H, W)`` tile (H, W multiples of 8) and returns
float32 ``(H, W)``; a crop scorer takes float32 ``(N, S, S)`` crops and returns
float64 ``(N,)``. Row = H axis, column = W axis.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import logging
import warnings
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from cascade.errors import CascadeError
from cascade.inference.fused import fused_map_module, map_from_output

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "CropScorer",
    "MapNet",
    "OnnxCropScorer",
    "OnnxMapNet",
    "TorchCropScorer",
    "TorchMapNet",
    "map_from_output",
    "onnx_available",
    "select_backend",
]

Backend = Literal["auto", "torch", "onnx"]
#: Backend names :func:`select_backend` accepts.
BACKENDS: tuple[str, ...] = ("auto", "torch", "onnx")
#: ONNX opset of the in-memory export.
ONNX_OPSET = 17


class MapNet(Protocol):
    """A proposal network as a function of one tile: ``(H, W)`` → ``(H, W)`` map."""

    backend: str

    def __call__(self, tile: np.ndarray) -> np.ndarray: ...


class CropScorer(Protocol):
    """An FPR network as a function of crops: ``(N, S, S)`` → ``(N,)`` probabilities."""

    backend: str

    def __call__(self, crops: np.ndarray) -> np.ndarray: ...


def onnx_available() -> bool:
    """Whether ONNX Runtime and the ``onnx`` package (needed by the exporter) import."""
    return (
        importlib.util.find_spec("onnxruntime") is not None
        and importlib.util.find_spec("onnx") is not None
    )


def select_backend(backend: str, device: torch.device) -> str:
    """``"torch"`` or ``"onnx"`` for a requested backend on a device.

    Raises
    ------
    ValueError
        ``backend`` is not one of :data:`BACKENDS`, or ``"onnx"`` on a CUDA device.
    CascadeError
        ``"onnx"`` was asked for and ONNX Runtime is not installed.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "onnx" if device.type == "cpu" and onnx_available() else "torch"
    if backend == "onnx":
        if device.type != "cpu":
            raise ValueError(f"backend 'onnx' runs on the CPU only, not on {device}")
        if not onnx_available():
            raise CascadeError(
                "backend 'onnx' needs onnxruntime and onnx (pip install calcnode[onnx])"
            )
    return backend


class _FprBody(torch.nn.Module):
    """An FPR network after its input normalisation (``median`` has no ONNX export)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m: Any = self.model
        x = m.stem(x)
        x = m.layer4(m.layer3(m.layer2(m.layer1(x))))
        return m.fc(torch.flatten(m.pool(x), 1))


class TorchMapNet:
    """The proposal map computed by torch (inference mode), fused at construction.

    Parameters
    ----------
    model : torch.nn.Module
        The U-Net; its weights are copied into :func:`cascade.inference.fused.fused_map_module`
        (batch norm with its running statistics, as in eval mode), so later changes to
        ``model`` are not seen: build a new map net after training steps.
    kind, residual : str
        See :func:`map_from_output`.
    device : torch.device or str
        Where the module lives.
    channels_last : bool or None
        Feed channels-last tensors; None = on the CPU only (oneDNN's faster layout).
    fused : torch.nn.Module or None
        ``model`` already fused on ``device`` (the resident path's copy), used as it is.
    """

    backend = "torch"

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        kind: str,
        residual: str,
        device: torch.device | str = "cpu",
        channels_last: bool | None = None,
        fused: torch.nn.Module | None = None,
    ) -> None:
        self.model, self.kind, self.residual = model, kind, residual
        self.device = torch.device(device)
        self.channels_last = self.device.type == "cpu" if channels_last is None else channels_last
        if fused is None:
            fused = fused_map_module(model, kind=kind, residual=residual).to(self.device)
        self.net = fused

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(tile, np.float32))[None, None]
            x = x.to(self.device)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return self.net(x)[0, 0].float().cpu().numpy()


#: Exported ONNX graphs of this process by :func:`_graph_key` (a few MB each): a second
#: detector on the same weights (a worker's restart in a test, the CLI's evaluate after
#: detect) skips the export (about 1 s per network on the 2-core CPU).
_EXPORTED: dict[str, bytes] = {}
_EXPORTED_MAX = 8


def _graph_key(model: torch.nn.Module, example: torch.Tensor, *parts: object) -> str:
    """What determines an export: the module's class, structure and tensors, the inputs."""
    digest = hashlib.sha256(f"{type(model).__qualname__}|{model!r}|{parts}".encode())
    digest.update(repr((tuple(example.shape), ONNX_OPSET)).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _session(
    model: torch.nn.Module,
    example: torch.Tensor,
    dynamic: dict[int, str],
    threads: int,
    *,
    graph: tuple[object, ...] = (),
) -> Any:
    """An ONNX Runtime session of ``model`` exported in memory (CPU provider).

    ``graph``: whatever else decides the exported graph beyond the module's class,
    structure and weights (e.g. the map kind), for the in-process export cache.
    """
    import onnxruntime as ort

    key = _graph_key(model, example, dynamic, graph)
    onnx_bytes = _EXPORTED.get(key)
    if onnx_bytes is None:
        buf = io.BytesIO()
        with warnings.catch_warnings():
            # The TorchScript exporter warns about the shape checks it traces as constants
            # (they hold for every input we feed: H, W multiples of 8) and about itself.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                buf,  # type: ignore[arg-type]  # a file-like object is accepted
                dynamo=False,
                input_names=["x"],
                output_names=["y"],
                dynamic_axes={"x": dynamic, "y": dynamic},
                opset_version=ONNX_OPSET,
            )
        onnx_bytes = buf.getvalue()
        while len(_EXPORTED) >= _EXPORTED_MAX:
            _EXPORTED.pop(next(iter(_EXPORTED)))
        _EXPORTED[key] = onnx_bytes
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])


def _run_options() -> Any:
    """Run options that hand the CPU arena's memory back at the end of each run.

    ONNX Runtime's CPU arena grows to the largest window's activations (it extends by
    powers of two) and keeps that memory for the life of the session: on a 14-Mpx
    full-field image the worker stayed ≈ 0.9 GB above its size before the U-Net.
    Shrinking after each run keeps the arena within a run (same speed) and bounds the
    process by one window's activations (``bench/memory.py``, bench/README.md "Memory").
    """
    import onnxruntime as ort

    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def _threads(threads: int | None) -> int:
    return torch.get_num_threads() if threads is None or threads < 1 else int(threads)


class OnnxMapNet:
    """The proposal map computed by ONNX Runtime from the exported torch module.

    Parameters
    ----------
    model : torch.nn.Module
        The U-Net (CPU, eval mode); exported once, here.
    kind, residual : str
        See :func:`map_from_output` (the map is part of the exported graph).
    threads : int or None
        Intra-op threads; None = ``torch.get_num_threads()`` (the worker's setting).
    """

    backend = "onnx"

    def __init__(
        self, model: torch.nn.Module, *, kind: str, residual: str, threads: int | None = None
    ) -> None:
        head = fused_map_module(model, kind=kind, residual=residual)
        self.threads = _threads(threads)
        self.session = _session(
            head,
            torch.rand(1, 1, 64, 64),
            {0: "batch", 2: "rows", 3: "cols"},
            self.threads,
            graph=(kind, residual, getattr(model, "head", None)),
        )
        self.run_options = _run_options()

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(tile, np.float32)[None, None]
        out: Any = self.session.run(None, {"x": x}, self.run_options)[0]
        return np.asarray(out[0, 0], dtype=np.float32)


def _prepare(crops: np.ndarray, input_size: int) -> torch.Tensor:
    """``(N, S, S)`` crops → ``(N, 1, input_size, input_size)`` CPU tensor."""
    x = torch.from_numpy(np.ascontiguousarray(crops, dtype=np.float32))[:, None]
    if x.shape[-1] != input_size:
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False)
    return x


class TorchCropScorer:
    """FPR probabilities from the torch module, in batches (inference mode).

    Parameters
    ----------
    model : torch.nn.Module
        The FPR network (eval mode).
    input_size : int
        The network's input side (crops are resized to it when they differ).
    batch_size : int
        Crops per forward pass.
    device : torch.device or str
        Where the module lives.
    """

    backend = "torch"

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        input_size: int,
        batch_size: int = 256,
        device: torch.device | str = "cpu",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.model, self.input_size, self.batch_size = model, input_size, batch_size
        self.device = torch.device(device)

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        probs = []
        with torch.inference_mode():
            for start in range(0, len(crops), self.batch_size):
                x = _prepare(crops[start : start + self.batch_size], self.input_size)
                x = x.to(self.device)
                if self.device.type == "cpu":
                    x = x.contiguous(memory_format=torch.channels_last)
                probs.append(torch.sigmoid(self.model(x).reshape(-1)).double().cpu().numpy())
        return np.concatenate(probs) if probs else np.zeros((0,), np.float64)


class OnnxCropScorer:
    """FPR probabilities from ONNX Runtime; the per-crop normalisation stays in torch.

    Parameters
    ----------
    model : torch.nn.Module
        The FPR network (:class:`cascade.models.resnet.FPRResNet`, CPU, eval mode).
    input_size : int
        The network's input side.
    batch_size : int
        Crops per run.
    threads : int or None
        Intra-op threads; None = ``torch.get_num_threads()``.
    """

    backend = "onnx"

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        input_size: int,
        batch_size: int = 256,
        threads: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        for name in ("stem", "layer1", "layer2", "layer3", "layer4", "pool", "fc"):
            if not hasattr(model, name):
                raise TypeError(f"OnnxCropScorer needs an FPRResNet (no {name!r} in {model!r})")
        self.input_norm = str(getattr(model, "input_norm", "none"))
        self.input_size, self.batch_size = input_size, batch_size
        self.threads = _threads(threads)
        self.session = _session(
            _FprBody(model).eval(),
            torch.rand(2, 1, input_size, input_size),
            {0: "batch"},
            self.threads,
        )
        self.run_options = _run_options()

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        from cascade.models.resnet import standardize_crops

        probs = []
        for start in range(0, len(crops), self.batch_size):
            x = _prepare(crops[start : start + self.batch_size], self.input_size)
            if self.input_norm == "crop":
                x = standardize_crops(x)
            logits = self.session.run(None, {"x": x.numpy()}, self.run_options)[0]
            z = np.asarray(logits, dtype=np.float64).reshape(-1)
            probs.append(1.0 / (1.0 + np.exp(-z)))
        return np.concatenate(probs) if probs else np.zeros((0,), np.float64)
