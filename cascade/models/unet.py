"""The ASN U-Net of Zhang et al. (CVPR 2019), and the cross-entropy U-Net baseline.

The paper's Anomaly Separation Network is a U-Net with **3 down-sampling and 3
up-sampling stages**, skip connections, **3 convolutions (3×3, norm, ReLU) per
stage** and He initialisation. With ``depth=3`` the network has four resolution
levels: three encoder stages (each followed by a 2×2 max-pool), a bottom stage at
1/8 resolution, and three decoder stages (each preceded by a ×2 up-sampling and a
concatenation with the encoder's skip). Channels are ``width · 2**level``.

Two heads:

``"sigmoid"``
    The ASN reconstruction ``f(I)`` in [0, 1] (the input is an 8-bit image scaled
    to [0, 1]), so the residual ``|f(I) − I|`` also lies in [0, 1].
``"logits"``
    Raw class scores, ``out_channels`` of them (2 for the paper's cross-entropy
    "U-Net" segmentation baseline: channel 1 is the µC class).

Input contract: tensors ``(B, in_channels, H, W)`` (row = H axis, column = W
axis). Three 2×2 poolings need ``H`` and ``W`` to be multiples of ``2**depth``
(8 for the paper's network). With ``pad_input=True`` (the default) any other size
is reflect-padded at the bottom and right edges up to the next multiple and the
output is cropped back, so the output always has the input's ``H × W`` and pixel
``(row, col)`` of the output corresponds to pixel ``(row, col)`` of the input. With
``pad_input=False`` such an input raises a :class:`ValueError` naming the shape.

Parameter counts (1 input channel, BN, transposed-conv up-sampling): width 8 →
183 k, width 16 → 727 k (the feasibility run in ``paper-notes.md``), width 32 →
2.90 M, width 64 → 11.6 M.
"""

from __future__ import annotations

import logging
from typing import Final

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HEADS", "NORMS", "UPSAMPLING", "ASNUNet", "asn_unet"]

logger = logging.getLogger(__name__)

HEADS: Final = ("sigmoid", "logits", "residual")
#: Initial logit offset of the "residual" head (≈ +0.01–0.025 in [0, 1] intensity).
RESIDUAL_HEAD_LIFT: Final = 0.1
NORMS: Final = ("batch", "instance", "none")
UPSAMPLING: Final = ("transposed", "bilinear")


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.Identity()


class ConvStage(nn.Sequential):
    """``n`` × (3×3 conv, norm, ReLU); the first conv maps ``in_ch`` → ``out_ch``."""

    def __init__(self, in_ch: int, out_ch: int, n: int, norm: str) -> None:
        layers: list[nn.Module] = []
        for i in range(n):
            # A conv followed by a normalisation needs no bias: the norm's shift is one.
            layers.append(
                nn.Conv2d(in_ch if i == 0 else out_ch, out_ch, 3, padding=1, bias=norm == "none")
            )
            layers.append(_norm(norm, out_ch))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class Up(nn.Module):
    """×2 up-sampling that also halves the channels: transposed conv or bilinear + 3×3 conv."""

    def __init__(self, in_ch: int, out_ch: int, mode: str) -> None:
        super().__init__()
        self.up: nn.Module
        if mode == "transposed":
            self.up = nn.ConvTranspose2d(in_ch, out_ch, kernel_size=2, stride=2)
        else:
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(in_ch, out_ch, 3, padding=1),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(x)


class ASNUNet(nn.Module):
    """U-Net with ``depth`` poolings and ``convs_per_stage`` convolutions per stage.

    Build it with :func:`asn_unet` (keyword-only, validated) or through
    :func:`cascade.models.get_model`; see the module docstring for the input
    contract. ``forward`` maps ``(B, in_channels, H, W)`` to
    ``(B, out_channels, H, W)``: the reconstruction in [0, 1] (``head="sigmoid"``)
    or logits (``head="logits"``).
    """

    def __init__(
        self,
        *,
        width: int,
        depth: int,
        convs_per_stage: int,
        in_channels: int,
        out_channels: int,
        head: str,
        norm: str,
        upsampling: str,
        pad_input: bool,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.head = head
        self.pad_input = pad_input
        self.in_channels = in_channels
        self.out_channels = out_channels
        chans = [width * 2**level for level in range(depth + 1)]

        self.encoders = nn.ModuleList()
        prev = in_channels
        for level in range(depth):
            self.encoders.append(ConvStage(prev, chans[level], convs_per_stage, norm))
            prev = chans[level]
        self.pool = nn.MaxPool2d(2)
        self.bottom = ConvStage(chans[depth - 1], chans[depth], convs_per_stage, norm)

        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in reversed(range(depth)):
            self.ups.append(Up(chans[level + 1], chans[level], upsampling))
            # After concatenation with the skip: 2 · chans[level] channels in.
            self.decoders.append(ConvStage(2 * chans[level], chans[level], convs_per_stage, norm))
        self.out = nn.Conv2d(chans[0], out_channels, kernel_size=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He (kaiming-normal, fan-in, ReLU gain) weights, zero biases, unit norm scales.

        Every conv weight then has standard deviation ``sqrt(2 / fan_in)`` with
        ``fan_in = in_channels · k · k`` (for the transposed convs PyTorch's fan-in
        is ``out_channels · k · k``, the fan-in of the equivalent forward conv).
        """
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.head == "residual":
            # Start next to the identity: a zero correction would make r = |f(I) − I|
            # exactly 0, where |·| has no gradient; a small constant lift (f slightly
            # above I, the direction in which µCs get "painted") gives every pixel a
            # signed gradient from the first step.
            nn.init.zeros_(self.out.weight)
            if self.out.bias is not None:
                nn.init.constant_(self.out.bias, RESIDUAL_HEAD_LIFT)

    @property
    def multiple(self) -> int:
        """``H`` and ``W`` must be multiples of this (``2**depth``) for an unpadded pass."""
        return 2**self.depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"input must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        h, w = int(x.shape[2]), int(x.shape[3])
        m = self.multiple
        pad_h, pad_w = (-h) % m, (-w) % m
        if pad_h or pad_w:
            if not self.pad_input:
                raise ValueError(
                    f"input H and W must be multiples of {m} (2**depth), got shape "
                    f"{tuple(x.shape)}; pad it or build the model with pad_input=True"
                )
            # Reflect keeps image statistics at the border (zeros would look like an
            # edge); it needs the pad to be smaller than the side, else replicate.
            mode = "reflect" if pad_h < h and pad_w < w else "replicate"
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)

        inp = x
        skips: list[torch.Tensor] = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottom(x)
        for up, dec, skip in zip(self.ups, self.decoders, reversed(skips), strict=True):
            x = dec(torch.cat([up(x), skip], dim=1))
        x = self.out(x)
        if self.head == "sigmoid":
            x = torch.sigmoid(x)
        elif self.head == "residual":
            # f(I) = sigmoid(logit(I) + g(I)): still in [0, 1], but the network learns a
            # correction of its input instead of rebuilding every pixel.
            x = torch.sigmoid(torch.logit(inp.clamp(1e-3, 1.0 - 1e-3)) + x)
        if pad_h or pad_w:
            x = x[:, :, :h, :w]
        return x


def asn_unet(
    *,
    width: int = 16,
    depth: int = 3,
    convs_per_stage: int = 3,
    in_channels: int = 1,
    out_channels: int = 1,
    head: str = "sigmoid",
    norm: str = "batch",
    upsampling: str = "transposed",
    pad_input: bool = True,
) -> ASNUNet:
    """Build the paper's ASN U-Net (or the cross-entropy U-Net baseline).

    Parameters
    ----------
    width : int
        Channels of the first stage; each level doubles them (``width · 2**level``).
    depth : int
        Number of 2×2 down-sampling (and ×2 up-sampling) stages; the paper uses 3,
        which keeps µCs of ≤ 14 px visible at the bottom (1/8) level.
    convs_per_stage : int
        3×3 convolutions (each followed by the norm and a ReLU) per stage; paper: 3.
    in_channels : int
        Input channels (1: a grey-level mammogram patch scaled to [0, 1]).
    out_channels : int
        Output channels: 1 for the ASN reconstruction; 2 for the CE baseline.
    head : {"sigmoid", "logits", "residual"}
        ``"sigmoid"``: reconstruction in [0, 1] (the paper); ``"logits"``: raw class
        scores; ``"residual"``: ``sigmoid(logit(I) + g(I))`` with ``g`` zero at
        initialisation, i.e. the network starts as the identity (r = 0) and learns a
        correction — the t-test loss then separates µCs instead of first having to
        learn to reconstruct (measured: the plain sigmoid head sits on the loss's
        flat "global offset" direction for hundreds of iterations on phantoms).
    norm : {"batch", "instance", "none"}
        Normalisation after each conv (the paper: batch norm).
    upsampling : {"transposed", "bilinear"}
        2×2 stride-2 transposed conv, or bilinear ×2 followed by a 3×3 conv.
    pad_input : bool
        Pad inputs whose H or W is not a multiple of ``2**depth`` (reflect, bottom
        and right) and crop the output back; ``False`` raises ``ValueError`` instead.

    Returns
    -------
    ASNUNet
        ``(B, in_channels, H, W)`` → ``(B, out_channels, H, W)``, He-initialised.

    Raises
    ------
    TypeError
        An integer argument is not an int, or ``pad_input`` is not a bool.
    ValueError
        An argument is out of range or not one of its choices.
    """
    _check_int("width", width, 1)
    _check_int("depth", depth, 1)
    _check_int("convs_per_stage", convs_per_stage, 1)
    _check_int("in_channels", in_channels, 1)
    _check_int("out_channels", out_channels, 1)
    _check_choice("head", head, HEADS)
    if head == "residual" and in_channels != out_channels:
        raise ValueError("head='residual' needs in_channels == out_channels")
    _check_choice("norm", norm, NORMS)
    _check_choice("upsampling", upsampling, UPSAMPLING)
    if not isinstance(pad_input, bool):
        raise TypeError(f"pad_input must be a bool, got {type(pad_input).__name__}")
    if width * 2**depth > 8192:
        # A typo guard (width=640 instead of 64): such a net would not fit in memory.
        raise ValueError(f"width · 2**depth = {width * 2**depth} channels is unreasonably large")
    return ASNUNet(
        width=width,
        depth=depth,
        convs_per_stage=convs_per_stage,
        in_channels=in_channels,
        out_channels=out_channels,
        head=head,
        norm=norm,
        upsampling=upsampling,
        pad_input=pad_input,
    )
