"""The proposal U-Net as it runs at inference: the same function, fewer memory passes.

Training keeps :class:`cascade.models.unet.ASNUNet` as the paper describes it (conv →
batch norm → ReLU, skip concatenation, a two-logit head for the CE baseline).
At inference the checkpoint's weights are rewritten once into an equivalent network
that touches every full-resolution feature map fewer times:

- each batch norm (eval mode: a fixed per-channel affine map) is folded into the
  convolution before it;
- a decoder's first convolution over ``cat([up, skip])`` becomes the sum of two
  convolutions, one over each input, so the concatenated map is never written;
- the cross-entropy head (two logits, softmax, class 1) becomes one 1×1 convolution
  with the logit difference as its weights and a sigmoid:
  ``softmax(l)[1] = 1 / (1 + exp(l0 − l1)) = sigmoid(l1 − l0)``.

The result equals ``map_from_output(model(x), x, …)`` up to float32 rounding (about
1e-7 on [0, 1] maps, ``tests/test_speed_parity.py``); on the 2-core CPU it takes
about 15 % less time under ONNX Runtime (bench/README.md "Speed"). Networks it does
not know (instance norm, another architecture) are wrapped unchanged.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cascade.models.unet import ASNUNet

__all__ = ["MapModule", "fused_map_module"]


def map_from_output(y: torch.Tensor, x: torch.Tensor, *, kind: str, residual: str) -> torch.Tensor:
    """The proposal map of a U-Net output ``y`` ``(B, C, H, W)`` for its input ``x``.

    ``kind="segmentation"``: softmax probability of class 1 (``(B, 1, H, W)``);
    ``kind="residual"``: ``|y − x|``, ``(y − x)²`` or smooth-L1 of ``y − x``.
    """
    if kind == "segmentation":
        return torch.softmax(y, dim=1)[:, 1:2]
    diff = y - x
    if residual == "l2":
        return diff**2
    if residual == "smooth_l1":
        a = diff.abs()
        return torch.where(a < 1.0, 0.5 * a**2, a - 0.5)
    return diff.abs()


class MapModule(nn.Module):
    """Any U-Net followed by :func:`map_from_output`: ``(B, 1, H, W)`` → map."""

    def __init__(self, model: nn.Module, *, kind: str, residual: str) -> None:
        super().__init__()
        self.model, self.kind, self.residual = model, kind, residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return map_from_output(self.model(x), x, kind=self.kind, residual=self.residual)


def _folded(conv: nn.Conv2d, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias of ``norm(conv(x))`` as one convolution (eval-mode norm)."""
    w = conv.weight.detach().double()
    b = (
        conv.bias.detach().double()
        if conv.bias is not None
        else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    )
    if isinstance(norm, nn.BatchNorm2d):
        assert norm.running_var is not None and norm.running_mean is not None
        scale = torch.rsqrt(norm.running_var.double() + norm.eps)
        shift = -norm.running_mean.double() * scale
        if norm.affine:
            scale, shift = scale * norm.weight.double(), shift * norm.weight.double()
            shift = shift + norm.bias.double()
        w, b = w * scale[:, None, None, None], b * scale + shift
    return w.float(), b.float()


def _conv(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    out_ch, in_ch, k, _ = weight.shape
    conv = nn.Conv2d(in_ch, out_ch, k, padding=k // 2, bias=bias is not None)
    conv.weight.data = weight.detach().clone().contiguous()
    if bias is not None:
        conv.bias.data = bias.detach().clone().contiguous()  # type: ignore[union-attr]
    return conv


class _Stage(nn.Module):
    """A folded ``ConvStage``; with ``split`` its first conv reads ``(up, skip)`` apart."""

    def __init__(self, stage: nn.Module, *, split: int | None = None) -> None:
        super().__init__()
        layers: list[Any] = list(stage.children())
        pairs = [_folded(layers[i], layers[i + 1]) for i in range(0, len(layers), 3)]
        (w0, b0), rest = pairs[0], pairs[1:]
        if split is None:
            self.first = nn.ModuleList([_conv(w0, b0)])
        else:
            self.first = nn.ModuleList([_conv(w0[:, :split], b0), _conv(w0[:, split:], None)])
        self.rest = nn.ModuleList([_conv(w, b) for w, b in rest])

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        y = self.first[0](x)
        if skip is not None:
            y = y + self.first[1](skip)
        x = F.relu(y)
        for conv in self.rest:
            x = F.relu(conv(x))
        return x


class _FusedUNet(nn.Module):
    """:class:`ASNUNet` + its map with folded norms, split skips and a folded CE head."""

    def __init__(self, model: ASNUNet, *, kind: str, residual: str) -> None:
        super().__init__()
        self.kind, self.residual, self.head = kind, residual, model.head
        self.encoders = nn.ModuleList([_Stage(e) for e in model.encoders])
        self.bottom = _Stage(model.bottom)
        ups: list[Any] = list(model.ups)
        self.ups = nn.ModuleList([copy.deepcopy(u.up) for u in ups])
        decoders: list[Any] = list(model.decoders)
        self.decoders = nn.ModuleList([_Stage(d, split=d[0].in_channels // 2) for d in decoders])
        w = model.out.weight.detach()
        b = (
            model.out.bias.detach()
            if model.out.bias is not None
            else torch.zeros_like(w[:, 0, 0, 0])
        )
        self.ce_head = kind == "segmentation" and w.shape[0] == 2
        if self.ce_head:
            self.out = _conv((w[1] - w[0])[None], (b[1] - b[0])[None])
        else:
            self.out = _conv(w, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp = x
        skips: list[torch.Tensor] = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottom(x)
        for up, dec, skip in zip(self.ups, self.decoders, reversed(skips), strict=True):
            x = dec(up(x), skip)
        y = self.out(x)
        if self.ce_head:
            return torch.sigmoid(y)
        if self.head == "sigmoid":
            y = torch.sigmoid(y)
        elif self.head == "residual":
            y = torch.sigmoid(torch.logit(inp.clamp(1e-3, 1.0 - 1e-3)) + y)
        return map_from_output(y, inp, kind=self.kind, residual=self.residual)


def _fusable(model: nn.Module) -> bool:
    if not isinstance(model, ASNUNet):
        return False
    norms = (nn.BatchNorm2d, nn.Identity)
    stages = [*model.encoders, model.bottom, *model.decoders]
    return all(isinstance(m, norms) for s in stages for m in list(s.children())[1::3])


def fused_map_module(model: nn.Module, *, kind: str, residual: str) -> nn.Module:
    """An eval-mode module computing ``map_from_output(model(x), x, …)``, fused when known.

    Parameters
    ----------
    model : torch.nn.Module
        The proposal U-Net (its weights are copied; later changes to it are not seen).
    kind : {"segmentation", "residual"}
        See :func:`map_from_output`.
    residual : {"l1", "l2", "smooth_l1"}
        See :func:`map_from_output`.

    Returns
    -------
    torch.nn.Module
        ``(B, 1, H, W)`` → ``(B, 1, H, W)`` map, H and W multiples of ``2**depth``; for
        an :class:`ASNUNet` with batch norm or none, the fused network described in
        the module docstring, else ``model`` wrapped as it is.
    """
    if _fusable(model):
        assert isinstance(model, ASNUNet)
        device = next(model.parameters()).device
        return _FusedUNet(model, kind=kind, residual=residual).to(device).eval()
    return MapModule(model, kind=kind, residual=residual).eval()
