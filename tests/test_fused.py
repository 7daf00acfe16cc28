"""The fused inference U-Net computes the same map as the trained module."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cascade.inference.fused import MapModule, fused_map_module, map_from_output
from cascade.models import get_model


def _trained_looking(model: nn.Module, seed: int) -> nn.Module:
    """Give every batch norm non-trivial statistics and affine terms, as training would."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
    return model.eval()


def _maps(model: nn.Module, kind: str, residual: str, x: torch.Tensor) -> tuple[np.ndarray, ...]:
    with torch.no_grad():
        plain = map_from_output(model(x), x, kind=kind, residual=residual)
        fused = fused_map_module(model, kind=kind, residual=residual)(x)
    return plain.numpy(), fused.numpy()


@pytest.mark.parametrize(
    ("config", "kind", "residual"),
    [
        ({"out_channels": 2, "head": "logits"}, "segmentation", "l1"),
        ({"head": "residual"}, "residual", "l1"),
        ({"head": "sigmoid"}, "residual", "l2"),
        ({"head": "sigmoid"}, "residual", "smooth_l1"),
        ({"head": "sigmoid", "norm": "none"}, "residual", "l1"),
        ({"out_channels": 2, "head": "logits", "upsampling": "bilinear"}, "segmentation", "l1"),
    ],
    ids=["ce", "residual-head", "sigmoid-l2", "sigmoid-smooth-l1", "no-norm", "bilinear"],
)
def test_fused_map_equals_the_module_map(config: dict, kind: str, residual: str) -> None:
    torch.manual_seed(0)
    model = _trained_looking(get_model("asn_unet", width=4, **config), seed=1)
    x = torch.rand(2, 1, 64, 80)
    plain, fused = _maps(model, kind, residual, x)
    assert fused.shape == plain.shape == (2, 1, 64, 80)
    np.testing.assert_allclose(fused, plain, atol=2e-6)


def test_the_fused_network_has_no_norm_no_concatenation_and_one_output_channel() -> None:
    model = _trained_looking(get_model("asn_unet", width=4, out_channels=2, head="logits"), 2)
    fused = fused_map_module(model, kind="segmentation", residual="l1")
    kinds = {type(m) for m in fused.modules()}
    assert nn.BatchNorm2d not in kinds
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert convs[-1].out_channels == 1
    calls = {n.target for n in torch.fx.symbolic_trace(fused).graph.nodes}
    assert torch.cat not in calls and torch.softmax not in calls
    assert torch.sigmoid in calls


def test_a_network_it_does_not_know_is_wrapped_unchanged() -> None:
    model = get_model("asn_unet", width=4, norm="instance", head="sigmoid").eval()
    wrapped = fused_map_module(model, kind="residual", residual="l1")
    assert isinstance(wrapped, MapModule) and wrapped.model is model
    x = torch.rand(1, 1, 32, 32)
    plain, fused = _maps(model, "residual", "l1", x)
    np.testing.assert_array_equal(fused, plain)


def test_the_fused_copy_does_not_follow_later_changes_to_the_module() -> None:
    model = _trained_looking(get_model("asn_unet", width=4, head="sigmoid"), 3)
    fused = fused_map_module(model, kind="residual", residual="l1")
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        before = fused(x).clone()
        for p in model.parameters():
            p.add_(1.0)
        assert torch.equal(fused(x), before)


def test_a_second_onnx_map_net_on_the_same_weights_reuses_the_export_and_others_do_not() -> None:
    pytest.importorskip("onnxruntime")
    from cascade.inference import runtime

    model = _trained_looking(get_model("asn_unet", width=4, head="sigmoid"), 4)
    tile = np.random.default_rng(0).random((64, 64), dtype=np.float32)

    def both(residual: str) -> tuple[np.ndarray, np.ndarray]:
        net = runtime.OnnxMapNet(model, kind="residual", residual=residual, threads=1)
        return net(tile), runtime.TorchMapNet(model, kind="residual", residual=residual)(tile)

    runtime._EXPORTED.clear()
    first, _ = both("l1")
    again, _ = both("l1")
    assert len(runtime._EXPORTED) == 1
    np.testing.assert_array_equal(first, again)
    onnx_l2, torch_l2 = both("l2")  # another graph from the same weights
    assert len(runtime._EXPORTED) == 2
    np.testing.assert_allclose(onnx_l2, torch_l2, atol=1e-5)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    onnx_new, torch_new = both("l1")  # other weights: exported anew, not the cached graph
    assert len(runtime._EXPORTED) == 3
    np.testing.assert_allclose(onnx_new, torch_new, atol=1e-5)
    assert np.abs(onnx_new - first).max() > 1e-3
