"""The ASN U-Net, the FPR ResNet-50 and the model registry: shapes, init, contracts, errors."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cascade.models as models
from cascade.models import (
    PRESETS,
    ASNUNet,
    FPRResNet,
    asn_unet,
    count_parameters,
    fpr_resnet50,
    get_model,
    list_models,
    register_model,
    resolve_model_config,
)
from cascade.models.resnet import Bottleneck, standardize_crops


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


# --------------------------------------------------------------------------- U-Net


@pytest.mark.parametrize(("h", "w"), [(112, 112), (64, 48), (100, 75), (7, 9)])
def test_unet_output_has_the_input_height_and_width(h: int, w: int) -> None:
    model = asn_unet(width=4)
    out = model(torch.rand(2, 1, h, w))
    assert out.shape == (2, 1, h, w)


def test_unet_sigmoid_head_output_lies_in_unit_interval() -> None:
    model = asn_unet(width=4)
    with torch.no_grad():
        out = model(torch.rand(3, 1, 48, 48) * 10 - 5)  # far outside [0, 1] on purpose
    assert float(out.min()) >= 0.0
    assert float(out.max()) <= 1.0
    assert float(out.std()) > 0.0


def test_unet_logits_head_is_the_sigmoid_heads_pre_activation() -> None:
    torch.manual_seed(1)
    sig = asn_unet(width=4, head="sigmoid").eval()
    torch.manual_seed(1)
    logit = asn_unet(width=4, head="logits").eval()
    x = torch.rand(1, 1, 32, 32)
    torch.testing.assert_close(sig(x), torch.sigmoid(logit(x)))


def test_unet_ce_baseline_gives_two_channel_logits() -> None:
    model = asn_unet(width=4, head="logits", out_channels=2)
    with torch.no_grad():
        out = model(torch.rand(2, 1, 40, 24))
    assert out.shape == (2, 2, 40, 24)
    assert float(out.min()) < 0.0 or float(out.max()) > 1.0  # not squashed


def test_unet_padding_equals_running_on_a_reflect_padded_input() -> None:
    model = asn_unet(width=4).eval()
    x = torch.rand(1, 1, 45, 37)
    padded = F.pad(x, (0, 3, 0, 3), mode="reflect")  # up to 48 × 40, multiples of 8
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(padded)[:, :, :45, :37])


def test_unet_without_padding_rejects_a_non_multiple_of_8_and_names_the_shape() -> None:
    model = asn_unet(width=4, pad_input=False)
    assert model(torch.rand(1, 1, 16, 24)).shape == (1, 1, 16, 24)
    with pytest.raises(ValueError, match=r"multiples of 8.*\(1, 1, 100, 75\)"):
        model(torch.rand(1, 1, 100, 75))


def test_unet_rejects_wrong_channel_count() -> None:
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        asn_unet(width=4)(torch.rand(1, 3, 16, 16))


def test_unet_depth_sets_the_required_multiple() -> None:
    model = asn_unet(width=4, depth=2, pad_input=False)
    assert model.multiple == 4
    assert model(torch.rand(1, 1, 12, 20)).shape == (1, 1, 12, 20)


def test_unet_has_three_convs_per_stage_and_seven_stages() -> None:
    model = asn_unet(width=4)
    convs3 = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    # 3 encoder stages + bottom + 3 decoder stages, 3 convs each.
    assert len(convs3) == 7 * 3
    ups = [m for m in model.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(ups) == 3
    assert [c.out_channels for c in convs3[::3]] == [4, 8, 16, 32, 16, 8, 4]


def test_unet_conv_weights_have_he_std() -> None:
    model = asn_unet(width=8)
    checked = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.weight.numel() >= 2000:
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            expected = math.sqrt(2.0 / fan_in)
            assert float(m.weight.detach().std()) == pytest.approx(expected, rel=0.1), m
            checked += 1
    assert checked == 14  # the 3×3 convs with ≥ 2000 weights at width 8


def test_unet_bilinear_upsampling_has_no_transposed_convs() -> None:
    model = asn_unet(width=4, upsampling="bilinear")
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in model.modules())
    assert model(torch.rand(1, 1, 24, 24)).shape == (1, 1, 24, 24)


@pytest.mark.parametrize("norm", ["instance", "none"])
def test_unet_other_norms_build_and_run(norm: str) -> None:
    model = asn_unet(width=4, norm=norm)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model(torch.rand(2, 1, 16, 16)).shape == (2, 1, 16, 16)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"width": 0}, ValueError, "width"),
        ({"width": 2.5}, TypeError, "width"),
        ({"width": True}, TypeError, "width"),
        ({"depth": 0}, ValueError, "depth"),
        ({"convs_per_stage": 0}, ValueError, "convs_per_stage"),
        ({"in_channels": 0}, ValueError, "in_channels"),
        ({"out_channels": 0}, ValueError, "out_channels"),
        ({"head": "softmax"}, ValueError, "head"),
        ({"norm": "group"}, ValueError, "norm"),
        ({"upsampling": "nearest"}, ValueError, "upsampling"),
        ({"pad_input": 1}, TypeError, "pad_input"),
        ({"width": 2048}, ValueError, "width"),
    ],
)
def test_unet_builder_rejects_invalid_arguments(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        asn_unet(**kwargs)  # type: ignore[arg-type]


def test_unet_builder_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        asn_unet(16)  # type: ignore[misc]


def test_unet_same_seed_gives_same_weights() -> None:
    torch.manual_seed(7)
    a = asn_unet(width=4)
    torch.manual_seed(7)
    b = asn_unet(width=4)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb
        assert torch.equal(va, vb)


# --------------------------------------------------------------------------- ResNet


@pytest.mark.parametrize("size", [224, 56])
def test_resnet_gives_one_logit_per_crop(size: int) -> None:
    model = fpr_resnet50(width=4, input_size=size)
    out = model(torch.rand(2, 1, size, size))
    assert out.shape == (2, 1)


@pytest.mark.parametrize(("size", "stage_sides"), [(224, [56, 28, 14, 7]), (56, [56, 28, 14, 7])])
def test_resnet_stages_run_on_the_same_grids_for_both_stems(
    size: int, stage_sides: list[int]
) -> None:
    model = fpr_resnet50(width=4, input_size=size).eval()
    sides: list[int] = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        layer.register_forward_hook(lambda _m, _i, out: sides.append(int(out.shape[-1])))
    with torch.no_grad():
        model(torch.rand(1, 1, size, size))
    assert sides == stage_sides


def test_resnet_native_stem_keeps_full_resolution() -> None:
    model = fpr_resnet50(width=4, input_size=56)
    assert model.stem_kind == "native"
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.stem.modules())
    assert model.stem[0].stride == (1, 1)
    assert model.stem[0].kernel_size == (3, 3)
    imagenet = fpr_resnet50(width=4, input_size=224)
    assert imagenet.stem[0].kernel_size == (7, 7)
    assert imagenet.stem[0].stride == (2, 2)
    assert isinstance(imagenet.stem[3], nn.MaxPool2d)


def test_resnet50_has_bottleneck_layout_3_4_6_3_and_2048_features_at_width_64() -> None:
    model = fpr_resnet50()
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3, model.layer4)] == [
        3,
        4,
        6,
        3,
    ]
    assert sum(isinstance(m, Bottleneck) for m in model.modules()) == 16
    assert model.num_features == 2048
    # torchvision's resnet50 has 25,557,032; minus 2 input channels of conv1
    # (2·64·7·7 = 6272) and 999 of the 1000 classes (999·2049 = 2,046,951).
    assert count_parameters(model) == 25_557_032 - 6272 - 2_046_951


def test_resnet_rejects_a_crop_of_the_wrong_size_and_names_the_shape() -> None:
    model = fpr_resnet50(width=4, input_size=56)
    with pytest.raises(ValueError, match=r"56 × 56.*\(2, 1, 224, 224\)"):
        model(torch.rand(2, 1, 224, 224))
    with pytest.raises(ValueError, match=r"\(B, 1, 56, 56\)"):
        model(torch.rand(2, 3, 56, 56))


def test_resnet_zero_init_residual_zeroes_the_last_bn_of_each_branch() -> None:
    zeroed = fpr_resnet50(width=4, input_size=56)
    plain = fpr_resnet50(width=4, input_size=56, zero_init_residual=False)
    blocks = [m for m in zeroed.modules() if isinstance(m, Bottleneck)]
    assert all(b.bn3.weight.abs().sum().item() == 0.0 for b in blocks)
    assert all(
        b.bn3.weight.abs().sum().item() > 0.0 for b in plain.modules() if isinstance(b, Bottleneck)
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"input_size": 112}, ValueError, "input_size"),
        ({"input_size": 56.0}, TypeError, "input_size"),
        ({"width": 0}, ValueError, "width"),
        ({"width": "64"}, TypeError, "width"),
        ({"num_classes": 0}, ValueError, "num_classes"),
        ({"in_channels": -1}, ValueError, "in_channels"),
        ({"zero_init_residual": "yes"}, TypeError, "zero_init_residual"),
        ({"input_norm": "imagenet"}, ValueError, "input_norm"),
    ],
)
def test_resnet_builder_rejects_invalid_arguments(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        fpr_resnet50(**kwargs)  # type: ignore[arg-type]


def test_crop_norm_makes_the_score_invariant_to_brightness_and_contrast() -> None:
    torch.manual_seed(0)
    model = fpr_resnet50(width=4, input_size=56, input_norm="crop", zero_init_residual=False)
    model.eval()
    crops = torch.rand(3, 1, 56, 56) * 0.2 + 0.3
    with torch.no_grad():
        base = model(crops)
        shifted = model(0.5 * (crops - 0.3) + 0.1)  # another vendor: darker, half the contrast
    torch.testing.assert_close(shifted, base, atol=1e-4, rtol=1e-4)


def test_crop_norm_standardises_each_crop_by_its_median_and_mad() -> None:
    x = torch.tensor([[[[0.2, 0.2, 0.4], [0.4, 0.6, 0.6], [0.3, 0.5, 1.0]]]])
    out = standardize_crops(x).flatten()
    # median 0.4; |x - 0.4| = .2 .2 0 0 .2 .2 .1 .1 .6 → MAD 0.2 → scale 0.29652
    expected = (x.flatten() - 0.4) / (1.4826 * 0.2)
    torch.testing.assert_close(out, expected)
    flat = standardize_crops(torch.full((1, 1, 4, 4), 0.7))
    assert float(flat.abs().max()) == 0.0  # a flat crop stays flat (scale floor, no NaN)


def test_resnet_without_input_norm_sees_brightness() -> None:
    torch.manual_seed(0)
    model = fpr_resnet50(width=4, input_size=56, input_norm="none", zero_init_residual=False)
    model.eval()
    crops = torch.rand(2, 1, 56, 56) * 0.2 + 0.3
    with torch.no_grad():
        assert not torch.allclose(model(crops), model(crops + 0.3), atol=1e-3)


def test_resnet_backward_reaches_the_stem() -> None:
    model = fpr_resnet50(width=4, input_size=56, zero_init_residual=False)
    model(torch.rand(4, 1, 56, 56)).sum().backward()
    grad = model.stem[0].weight.grad
    assert grad is not None
    assert float(grad.abs().sum()) > 0.0


# --------------------------------------------------------------------------- registry


def test_list_models_names_builders_and_presets() -> None:
    assert list_models() == sorted(
        [
            "asn_unet",
            "asn_unet_cpu",
            "asn_unet_paper",
            "fpr_resnet50",
            "fpr_resnet50_cpu",
            "fpr_resnet50_paper",
            "unet_ce_cpu",
        ]
    )


@pytest.mark.parametrize(
    ("name", "cls", "n_params"),
    [
        ("asn_unet_cpu", ASNUNet, 727_377),  # the feasibility run's "727 k"
        ("asn_unet_paper", ASNUNet, 2_904_737),
        ("unet_ce_cpu", ASNUNet, 727_394),
        ("fpr_resnet50_cpu", FPRResNet, 1_479_281),
        ("fpr_resnet50_paper", FPRResNet, 23_503_809),
    ],
)
def test_presets_build_with_their_documented_parameter_counts(
    name: str, cls: type[nn.Module], n_params: int
) -> None:
    model = get_model(name)
    assert isinstance(model, cls)
    assert count_parameters(model) == n_params
    for key, value in PRESETS[name]["defaults"].items():
        assert model.model_config[key] == value


def test_get_model_overrides_preset_defaults_and_records_its_config() -> None:
    model = get_model("asn_unet_cpu", width=4, norm="instance")
    assert model.model_name == "asn_unet"
    assert model.model_config["width"] == 4
    assert model.model_config["norm"] == "instance"
    assert model.model_config["depth"] == 3  # builder default filled in
    again = get_model(model.model_name, **model.model_config)
    assert count_parameters(again) == count_parameters(model)


def test_fpr_cpu_preset_takes_56_px_crops() -> None:
    model = get_model("fpr_resnet50_cpu", width=4)
    assert model.input_size == 56
    assert get_model("fpr_resnet50_paper", width=4).input_size == 224


def test_get_model_unknown_name_lists_the_known_names() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'resnet18'.*asn_unet_cpu.*fpr_resnet50"):
        get_model("resnet18")


def test_get_model_unknown_argument_names_it() -> None:
    with pytest.raises(TypeError, match="'widht'"):
        get_model("asn_unet", widht=8)
    with pytest.raises(TypeError, match="'depth'"):
        get_model("fpr_resnet50_cpu", depth=3)


def test_get_model_passes_builder_validation_errors_through() -> None:
    with pytest.raises(ValueError, match="input_size"):
        get_model("fpr_resnet50_cpu", input_size=100)


def test_resolve_model_config_fills_every_builder_argument() -> None:
    builder, cfg = resolve_model_config("fpr_resnet50_cpu")
    assert builder == "fpr_resnet50"
    assert cfg == {
        "width": 16,
        "input_size": 56,
        "in_channels": 1,
        "num_classes": 1,
        "zero_init_residual": True,
        "input_norm": "crop",
    }


def test_get_model_does_not_let_callers_mutate_presets() -> None:
    get_model("asn_unet_cpu").model_config["width"] = 999
    assert PRESETS["asn_unet_cpu"]["defaults"]["width"] == 16
    assert get_model("asn_unet_cpu").model_config["width"] == 16


def test_register_model_adds_a_builder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_BUILDERS", dict(models._BUILDERS))

    @register_model("tiny_test_net")
    def tiny(*, channels: int = 2) -> nn.Module:
        return nn.Conv2d(1, channels, 1)

    assert "tiny_test_net" in list_models()
    model = get_model("tiny_test_net", channels=3)
    assert model.out_channels == 3
    assert model.model_config == {"channels": 3}


def test_register_model_rejects_duplicates_and_positional_builders(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(models, "_BUILDERS", dict(models._BUILDERS))
    with pytest.raises(ValueError, match="already registered"):
        register_model("asn_unet")(asn_unet)
    with pytest.raises(ValueError, match="already registered"):
        register_model("asn_unet_cpu")(asn_unet)
    with pytest.raises(ValueError, match="keyword-only"):
        register_model("positional_net")(lambda width=4: nn.Identity())
    with pytest.raises(ValueError, match="name"):
        register_model("")


def test_residual_head_starts_next_to_the_identity_and_stays_in_unit_range() -> None:
    torch.manual_seed(0)
    model = get_model("asn_unet", width=4, head="residual").eval()
    x = torch.rand(2, 1, 40, 48) * 0.98 + 0.01
    with torch.no_grad():
        y = model(x)
    assert y.shape == x.shape
    lift = y - x  # a small positive lift so |f(I) − I| has a gradient from step one
    assert float(lift.min()) > 0.0 and float(lift.max()) < 0.03
    model.out.weight.data.normal_(0, 5.0)  # a large correction still gives [0, 1]
    with torch.no_grad():
        y = model(x)
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0


def test_residual_head_needs_matching_channels() -> None:
    with pytest.raises(ValueError, match="in_channels == out_channels"):
        get_model("asn_unet", width=4, head="residual", out_channels=2)
