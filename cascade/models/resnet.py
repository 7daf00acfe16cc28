"""ResNet-50 for false-positive reduction (FPR), written in plain torch (no torchvision).

The paper's FPR network is an ImageNet-pretrained ResNet-50 that sees each ASN
candidate as a 56 × 56 crop around its centre, resized to 224 × 224. Here it is
trained from scratch on phantoms, with one input channel and one output logit
(``sigmoid(logit)`` is the FPR score, the probability that the candidate is a µC).

Body: bottleneck blocks (1×1 → 3×3 → 1×1, expansion 4) in four stages of
``[3, 4, 6, 3]`` blocks with ``width``, ``2·width``, ``4·width``, ``8·width`` inner
channels (``width=64`` is the standard ResNet-50, 2048 features), down-sampling by
a stride of 2 in the 3×3 conv of the first block of stages 2–4 (the "ResNet v1.5"
placement), global average pooling, one linear layer.

Two stems, chosen by ``input_size``:

``input_size=224`` ("imagenet" stem, the paper)
    7×7 conv stride 2, BN, ReLU, 3×3 max-pool stride 2: 224 → 56 before stage 1.
``input_size=56`` ("native" stem, CPU preset)
    3×3 conv stride 1, BN, ReLU, no max-pool: the 56-px crop enters stage 1 at
    full resolution, so every pixel of the crop (a µC is a few pixels wide at
    70 µm) reaches the bottlenecks. Stages then run at 56, 28, 14 and 7 px —
    exactly the grids of the 224 network after its stem — so at equal ``width``
    the two regimes cost about the same; the CPU preset is cheaper because it is
    narrower (compute scales with ``width²``), and because nothing is up-sampled.

Input normalisation (``input_norm``): ``"none"`` feeds the crop's [0, 1] grey levels
as they are; ``"crop"`` first standardises every crop by itself, ``(x − median) /
max(1.4826 · MAD, 0.01)``, so the network sees a µC's contrast relative to the
tissue around it, whatever the vendor's brightness and contrast. The statistics are
computed inside ``forward``: the checkpoint's ``model_config`` is the whole contract.

Input contract: ``(B, in_channels, input_size, input_size)``; any other spatial
size raises :class:`ValueError` naming the shape (a crop of the wrong size means
the FPR preprocessing and the checkpoint disagree). Output: ``(B, num_classes)``
logits.

Parameter counts (1 input channel, 1 logit): width 64 / input 224 → 23.50 M;
width 32 / input 56 → 5.89 M; width 16 / input 56 → 1.48 M.
"""

from __future__ import annotations

import logging
from typing import Final

import torch
from torch import nn

__all__ = [
    "INPUT_NORMS",
    "INPUT_SIZES",
    "STAGE_BLOCKS",
    "Bottleneck",
    "FPRResNet",
    "fpr_resnet50",
    "standardize_crops",
]

logger = logging.getLogger(__name__)

#: Blocks per stage of ResNet-50.
STAGE_BLOCKS: Final = (3, 4, 6, 3)
#: Supported input sizes and the stem each one selects.
INPUT_SIZES: Final = {224: "imagenet", 56: "native"}
#: Input normalisations: none, or each crop standardised by its median and MAD.
INPUT_NORMS: Final = ("none", "crop")
#: Floor of the per-crop scale (grey levels in [0, 1]): a flat crop is not blown up.
CROP_SCALE_FLOOR: Final = 0.01


def standardize_crops(x: torch.Tensor) -> torch.Tensor:
    """Standardise each sample of ``(B, C, H, W)`` by its own median and MAD.

    ``(x − median) / max(1.4826 · MAD, CROP_SCALE_FLOOR)`` over each sample's pixels
    (all channels together): robust to the µC itself and to zero padding at edges.
    """
    flat = x.flatten(1)
    med = flat.median(dim=1, keepdim=True).values
    mad = (flat - med).abs().median(dim=1, keepdim=True).values
    scale = (1.4826 * mad).clamp_min(CROP_SCALE_FLOOR)
    return ((flat - med) / scale).view_as(x)


class Bottleneck(nn.Module):
    """1×1 reduce → 3×3 (stride here) → 1×1 expand (×4), plus the identity or a projection."""

    expansion: Final = 4

    def __init__(self, in_ch: int, planes: int, stride: int) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class FPRResNet(nn.Module):
    """ResNet-50 body with an ``imagenet`` or ``native`` stem; build it with :func:`fpr_resnet50`.

    ``forward`` maps ``(B, in_channels, input_size, input_size)`` to
    ``(B, num_classes)`` logits.
    """

    def __init__(
        self,
        *,
        width: int,
        input_size: int,
        in_channels: int,
        num_classes: int,
        zero_init_residual: bool,
        input_norm: str = "none",
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.input_norm = input_norm
        self.in_channels = in_channels
        self.stem_kind = INPUT_SIZES[input_size]
        if self.stem_kind == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            )
        stages: list[nn.Module] = []
        in_ch = width
        for i, n_blocks in enumerate(STAGE_BLOCKS):
            planes = width * 2**i
            blocks: list[nn.Module] = []
            for b in range(n_blocks):
                stride = 2 if (b == 0 and i > 0) else 1
                blocks.append(Bottleneck(in_ch, planes, stride))
                in_ch = planes * Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        self.num_features = in_ch
        self._init(zero_init_residual)

    def _init(self, zero_init_residual: bool) -> None:
        # He init for the convs as in torchvision's ResNet (fan-out); BN scale 1, shift 0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Each residual branch starts as zero, so every block starts as the identity:
            # helps training from scratch (Goyal et al. 2017).
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled ``(B, num_features)`` features before the linear layer."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"input must have shape (B, {self.in_channels}, {self.input_size}, "
                f"{self.input_size}), got {tuple(x.shape)}"
            )
        if x.shape[2] != self.input_size or x.shape[3] != self.input_size:
            raise ValueError(
                f"input must be {self.input_size} × {self.input_size} px (the model's "
                f"input_size), got shape {tuple(x.shape)}"
            )
        if self.input_norm == "crop":
            x = standardize_crops(x)
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.pool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def fpr_resnet50(
    *,
    width: int = 64,
    input_size: int = 224,
    in_channels: int = 1,
    num_classes: int = 1,
    zero_init_residual: bool = True,
    input_norm: str = "none",
) -> FPRResNet:
    """Build the FPR ResNet-50.

    Parameters
    ----------
    width : int
        Inner channels of the first bottleneck stage (64: the standard ResNet-50);
        stages use ``width · 2**i`` inner and ``4 · width · 2**i`` output channels.
    input_size : {224, 56}
        Side of the square input crop, which selects the stem: 224 → 7×7/2 conv +
        max-pool (the paper: a 56-px crop resized to 224); 56 → 3×3/1 conv, no
        max-pool (the native crop, for CPU).
    in_channels : int
        Input channels (1: the grey-level crop scaled to [0, 1]).
    num_classes : int
        Output logits (1: µC vs not).
    zero_init_residual : bool
        Zero the last BN scale of every residual branch so each block starts as the
        identity (the standard trick for training from scratch).
    input_norm : {"none", "crop"}
        ``"none"``: the crop's grey levels as they are (the paper). ``"crop"``: each
        crop standardised by its own median and MAD inside ``forward`` (robust to
        vendor brightness and contrast; the CPU and paper training presets use it).

    Returns
    -------
    FPRResNet
        ``(B, in_channels, input_size, input_size)`` → ``(B, num_classes)`` logits.

    Raises
    ------
    TypeError
        An argument has the wrong type.
    ValueError
        An argument is out of range, or ``input_size`` is not 224 or 56.
    """
    for name, value in (
        ("width", width),
        ("in_channels", in_channels),
        ("num_classes", num_classes),
    ):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if width > 1024:
        raise ValueError(f"width must be <= 1024, got {width}")
    if isinstance(input_size, bool) or not isinstance(input_size, int):
        raise TypeError(f"input_size must be an int, got {type(input_size).__name__}")
    if input_size not in INPUT_SIZES:
        raise ValueError(f"input_size must be one of {sorted(INPUT_SIZES)}, got {input_size}")
    if not isinstance(zero_init_residual, bool):
        raise TypeError(
            f"zero_init_residual must be a bool, got {type(zero_init_residual).__name__}"
        )
    if input_norm not in INPUT_NORMS:
        raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {input_norm!r}")
    return FPRResNet(
        input_norm=input_norm,
        width=width,
        input_size=input_size,
        in_channels=in_channels,
        num_classes=num_classes,
        zero_init_residual=zero_init_residual,
    )
