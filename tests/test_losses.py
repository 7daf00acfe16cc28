"""The t-test loss and the ablation losses, checked against values computed by hand."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from cascade.training.losses import (
    LOSSES,
    ReconstructionMSELoss,
    SegmentationCELoss,
    TTestLoss,
    get_loss,
    residual,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def _case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 1×1×2×3 residual map, 2 positive pixels, 3 negative, 1 ignored (0.9).

    r = [[0.2, 0.4, 0.9],     pos = [[1, 1, 0],    neg = [[0, 0, 0],
         [0.1, 0.3, 0.5]]            [0, 0, 0]]           [1, 1, 1]]

    r_p = {0.2, 0.4}:      mean 0.3, population var ((−0.1)² + 0.1²) / 2 = 0.01
    r_n = {0.1, 0.3, 0.5}: mean 0.3, population var (0.04 + 0 + 0.04) / 3 = 0.0266…
    """
    r = torch.tensor([[[[0.2, 0.4, 0.9], [0.1, 0.3, 0.5]]]], requires_grad=True)
    pos = torch.tensor([[[[True, True, False], [False, False, False]]]])
    neg = torch.tensor([[[[False, False, False], [True, True, True]]]])
    return r, pos, neg


VAR_N = 0.08 / 3


# --------------------------------------------------------------------------- residual


def test_residual_kinds_match_hand_values() -> None:
    recon = torch.tensor([[[[0.5, 0.5, 0.5]]]])
    image = torch.tensor([[[[0.1, 0.5, 0.95]]]])
    torch.testing.assert_close(residual(recon, image), torch.tensor([[[[0.4, 0.0, 0.45]]]]))
    torch.testing.assert_close(
        residual(recon, image, kind="l2"), torch.tensor([[[[0.16, 0.0, 0.2025]]]])
    )
    # SmoothL1, β = 0.1: |d| ≥ β → |d| − β/2; so 0.4 → 0.35, 0.45 → 0.4.
    torch.testing.assert_close(
        residual(recon, image, kind="smooth_l1", smooth_l1_beta=0.1),
        torch.tensor([[[[0.35, 0.0, 0.4]]]]),
    )
    # Default β = 1 on [0, 1] data: 0.5·d² everywhere.
    torch.testing.assert_close(
        residual(recon, image, kind="smooth_l1"), torch.tensor([[[[0.08, 0.0, 0.10125]]]])
    )


def test_residual_rejects_bad_shapes_and_kinds() -> None:
    a = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="differs"):
        residual(a, torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        residual(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="kind"):
        residual(a, a, kind="l3")
    with pytest.raises(ValueError, match="smooth_l1_beta"):
        residual(a, a, kind="smooth_l1", smooth_l1_beta=0.0)


# --------------------------------------------------------------------------- t-test


def test_ttest_loss_matches_hand_computed_value() -> None:
    r, pos, neg = _case()
    loss_fn = TTestLoss(beta=0.8, lambda_p=1.0, lambda_n=0.1)
    loss = loss_fn(r, pos, neg)
    # max(0.8 − 0.3, 0) + 0.3 + 1·0.01 + 0.1·0.02667 = 0.5 + 0.3 + 0.01 + 0.002667
    assert loss.item() == pytest.approx(0.5 + 0.3 + 0.01 + 0.1 * VAR_N, abs=1e-6)
    stats = loss_fn.last_stats
    assert stats is not None
    assert stats.mean_p == pytest.approx(0.3, abs=1e-6)
    assert stats.mean_n == pytest.approx(0.3, abs=1e-6)
    assert stats.var_p == pytest.approx(0.01, abs=1e-6)
    assert stats.var_n == pytest.approx(VAR_N, abs=1e-6)
    assert stats.hinge == pytest.approx(0.5, abs=1e-6)
    assert (stats.n_pos, stats.n_neg) == (2, 3)
    assert stats.loss == pytest.approx(loss.item())


def test_ttest_terms_are_tensors_in_the_graph() -> None:
    r, pos, neg = _case()
    terms = TTestLoss().terms(r, pos, neg)
    assert terms.loss.requires_grad
    assert terms.var_p.item() == pytest.approx(0.01, abs=1e-6)


def test_ttest_hinge_switches_off_when_mean_p_reaches_beta() -> None:
    r, pos, neg = _case()
    loss_fn = TTestLoss(beta=0.25, lambda_p=0.0, lambda_n=0.1)
    loss = loss_fn(r, pos, neg)
    # mean_p = 0.3 ≥ 0.25: hinge 0; loss = 0.3 + 0.1·0.02667
    assert loss.item() == pytest.approx(0.3 + 0.1 * VAR_N, abs=1e-6)
    assert loss_fn.last_stats is not None and loss_fn.last_stats.hinge == 0.0
    loss.backward()
    assert r.grad is not None
    # No hinge, no positive variance: the positive pixels get no gradient at all.
    assert torch.equal(r.grad[pos], torch.zeros(2))


def test_ttest_hinge_exactly_at_beta_is_zero() -> None:
    r, pos, neg = _case()
    assert TTestLoss(beta=0.3, lambda_p=0, lambda_n=0)(r, pos, neg).item() == pytest.approx(
        0.3, abs=1e-6
    )


def test_ttest_gradients_match_hand_derivatives() -> None:
    r, pos, neg = _case()
    TTestLoss(beta=0.8, lambda_p=0.0, lambda_n=0.0)(r, pos, neg).backward()
    assert r.grad is not None
    # d/dr_p of (0.8 − mean_p) = −1/2 each; d/dr_n of mean_n = 1/3 each; ignored pixel 0.
    expected = torch.tensor([[[[-0.5, -0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]]]])
    torch.testing.assert_close(r.grad, expected)


def test_ttest_variance_gradient_pulls_pixels_to_their_mean() -> None:
    r, pos, neg = _case()
    TTestLoss(beta=0.0, lambda_p=1.0, lambda_n=0.0)(r, pos, neg).backward()
    assert r.grad is not None
    # d Var / d r_i = 2 (r_i − mean) / n: positives (0.2, 0.4) → (−0.1, +0.1); plus mean_n 1/3.
    expected = torch.tensor([[[[-0.1, 0.1, 0.0], [1 / 3, 1 / 3, 1 / 3]]]])
    torch.testing.assert_close(r.grad, expected)


def test_ttest_ignored_pixels_do_not_matter() -> None:
    r, pos, neg = _case()
    base = TTestLoss()(r, pos, neg).item()
    changed = r.detach().clone()
    changed[0, 0, 0, 2] = 123.0  # the pixel in neither mask
    assert TTestLoss()(changed, pos, neg).item() == pytest.approx(base, abs=1e-7)


def test_ttest_batch_without_positives_is_finite_and_keeps_negative_terms() -> None:
    r, _, neg = _case()
    none = torch.zeros_like(neg)
    loss_fn = TTestLoss()
    loss = loss_fn(r, none, neg)
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(0.3 + 0.1 * VAR_N, abs=1e-6)  # no hinge, no var_p
    assert loss_fn.last_stats is not None and loss_fn.last_stats.n_pos == 0
    loss.backward()
    assert r.grad is not None and bool(torch.isfinite(r.grad).all())


def test_ttest_batch_without_negatives_keeps_positive_terms() -> None:
    r, pos, _ = _case()
    loss = TTestLoss()(r, pos, torch.zeros_like(pos))
    assert loss.item() == pytest.approx(0.5 + 0.01, abs=1e-6)


def test_ttest_batch_without_labelled_pixels_gives_zero_that_backpropagates() -> None:
    r, pos, _ = _case()
    empty = torch.zeros_like(pos)
    loss = TTestLoss()(r, empty, empty)
    assert loss.item() == 0.0
    loss.backward()
    assert r.grad is not None and float(r.grad.abs().sum()) == 0.0


def test_ttest_single_positive_pixel_has_zero_variance_not_nan() -> None:
    r, _, neg = _case()
    one = torch.zeros_like(neg)
    one[0, 0, 0, 1] = True  # r = 0.4
    loss_fn = TTestLoss()
    loss = loss_fn(r, one, neg)
    assert loss_fn.last_stats is not None and loss_fn.last_stats.var_p == 0.0
    assert loss.item() == pytest.approx(0.4 + 0.3 + 0.1 * VAR_N, abs=1e-6)


def test_ttest_accepts_float_and_int_masks_like_bool() -> None:
    r, pos, neg = _case()
    expected = TTestLoss()(r, pos, neg).item()
    assert TTestLoss()(r, pos.float(), neg.float()).item() == pytest.approx(expected)
    assert TTestLoss()(r, pos.long(), neg.to(torch.uint8)).item() == pytest.approx(expected)


def test_ttest_pools_pixels_over_the_batch() -> None:
    # Image 1: one positive pixel 0.0; image 2: three positive pixels 1.0.
    # Pooled mean_p = 3/4 (not the mean of per-image means, 1/2).
    r = torch.tensor([[[[0.0, 0.5]]], [[[1.0, 1.0]]]])
    pos = torch.tensor([[[[True, False]]], [[[True, True]]]])
    neg = torch.tensor([[[[False, True]]], [[[False, False]]]])
    r2 = torch.cat([r, torch.tensor([[[[1.0, 0.0]]]])])
    pos2 = torch.cat([pos, torch.tensor([[[[True, False]]]])])
    neg2 = torch.cat([neg, torch.zeros(1, 1, 1, 2, dtype=torch.bool)])
    loss_fn = TTestLoss()
    loss_fn(r2, pos2, neg2)
    assert loss_fn.last_stats is not None
    assert loss_fn.last_stats.mean_p == pytest.approx(0.75)
    assert loss_fn.last_stats.n_pos == 4


def test_ttest_separating_residuals_lowers_the_loss() -> None:
    torch.manual_seed(0)
    pos = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    pos[:, :, 4:8, 4:8] = True
    neg = ~pos
    z = torch.randn(2, 1, 16, 16, requires_grad=True)  # residuals in (0, 1) as the ASN's
    opt = torch.optim.Adam([z], lr=0.1)
    loss_fn = TTestLoss()
    first = loss_fn(torch.sigmoid(z), pos, neg).item()
    for _ in range(100):
        opt.zero_grad()
        loss_fn(torch.sigmoid(z), pos, neg).backward()
        opt.step()
    assert loss_fn(torch.sigmoid(z), pos, neg).item() < 0.5 * first
    assert loss_fn.last_stats is not None
    assert loss_fn.last_stats.mean_p > loss_fn.last_stats.mean_n + 0.3


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"beta": -0.1}, ValueError, "beta"),
        ({"beta": float("nan")}, ValueError, "beta"),
        ({"lambda_p": float("inf")}, ValueError, "lambda_p"),
        ({"lambda_n": -1}, ValueError, "lambda_n"),
        ({"beta": "0.8"}, TypeError, "beta"),
        ({"lambda_p": True}, TypeError, "lambda_p"),
    ],
)
def test_ttest_rejects_invalid_parameters(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        TTestLoss(**kwargs)  # type: ignore[arg-type]


def test_ttest_rejects_bad_masks() -> None:
    r, pos, neg = _case()
    loss_fn = TTestLoss()
    with pytest.raises(ValueError, match="positive_mask shape"):
        loss_fn(r, pos[..., :2], neg)
    with pytest.raises(ValueError, match="negative_mask must be boolean or hold only 0 and 1"):
        loss_fn(r, pos, neg.float() * 2)
    with pytest.raises(ValueError, match="overlap"):
        loss_fn(r, pos, pos | neg)
    with pytest.raises(TypeError, match="positive_mask"):
        loss_fn(r, pos.numpy(), neg)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="residual"):
        loss_fn(r[0], pos[0], neg[0])


def test_ttest_novar_has_no_variance_terms() -> None:
    r, pos, neg = _case()
    loss = get_loss("ttest_novar")
    assert isinstance(loss, TTestLoss)
    assert (loss.beta, loss.lambda_p, loss.lambda_n) == (0.8, 0.0, 0.0)
    assert loss(r, pos, neg).item() == pytest.approx(0.5 + 0.3, abs=1e-6)
    assert get_loss("ttest_novar", beta=0.5).beta == 0.5


# --------------------------------------------------------------------------- MSE, CE


def test_mse_loss_matches_hand_value_and_can_ignore_unlabelled_pixels() -> None:
    recon = torch.tensor([[[[0.5, 0.5, 0.5]]]], requires_grad=True)
    image = torch.tensor([[[[0.1, 0.3, 0.0]]]])
    pos = torch.tensor([[[[True, False, False]]]])
    neg = torch.tensor([[[[False, True, False]]]])
    # all pixels: (0.16 + 0.04 + 0.25) / 3 = 0.15; labelled only: (0.16 + 0.04) / 2 = 0.1
    assert ReconstructionMSELoss()(recon, image).item() == pytest.approx(0.15)
    labelled = ReconstructionMSELoss(labelled_only=True)
    loss = labelled(recon, image, pos, neg)
    assert loss.item() == pytest.approx(0.1)
    assert labelled.last_stats == {"mse": pytest.approx(0.1), "n": 2}
    loss.backward()
    assert recon.grad is not None and float(recon.grad[0, 0, 0, 2]) == 0.0


def test_mse_loss_labelled_only_needs_masks() -> None:
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="positive_mask and negative_mask"):
        ReconstructionMSELoss(labelled_only=True)(x, x)
    with pytest.raises(TypeError, match="labelled_only"):
        ReconstructionMSELoss(labelled_only=1)  # type: ignore[arg-type]


def _ce_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three pixels: A positive with logits (0, 0); B negative with (0, ln 3); C ignored.

    CE(A) = −log(1/2) = ln 2;  CE(B) = −log(e⁰ / (e⁰ + 3)) = ln 4.
    """
    logits = torch.tensor(
        [[[[0.0, 0.0, 50.0]], [[0.0, math.log(3.0), -50.0]]]], requires_grad=True
    )  # (1, 2, 1, 3)
    pos = torch.tensor([[[[True, False, False]]]])
    neg = torch.tensor([[[[False, True, False]]]])
    return logits, pos, neg


def test_ce_loss_matches_hand_value_and_ignores_unlabelled_pixels() -> None:
    logits, pos, neg = _ce_case()
    loss = SegmentationCELoss()(logits, pos, neg)
    assert loss.item() == pytest.approx((math.log(2) + math.log(4)) / 2, abs=1e-6)
    loss.backward()
    assert logits.grad is not None
    assert float(logits.grad[..., 2].abs().sum()) == 0.0


def test_ce_loss_class_weights_weight_the_mean() -> None:
    logits, pos, neg = _ce_case()
    loss = SegmentationCELoss(class_weights=(1.0, 3.0))(logits, pos, neg)
    # (3·ln 2 + 1·ln 4) / (3 + 1) = 1.25 ln 2
    assert loss.item() == pytest.approx(1.25 * math.log(2), abs=1e-6)


def test_ce_loss_without_labelled_pixels_is_zero_not_nan() -> None:
    logits, pos, _ = _ce_case()
    empty = torch.zeros_like(pos)
    loss = SegmentationCELoss()(logits, empty, empty)
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and bool(torch.isfinite(logits.grad).all())


def test_ce_loss_rejects_bad_inputs() -> None:
    logits, pos, neg = _ce_case()
    with pytest.raises(ValueError, match=r"\(B, 2, H, W\)"):
        SegmentationCELoss()(logits[:, :1], pos, neg)
    with pytest.raises(ValueError, match="overlap"):
        SegmentationCELoss()(logits, pos, pos)
    with pytest.raises(ValueError, match="class_weights"):
        SegmentationCELoss(class_weights=(1.0,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"class_weights\[1\]"):
        SegmentationCELoss(class_weights=(1.0, -2.0))


# --------------------------------------------------------------------------- registry


def test_get_loss_builds_each_registered_loss_with_its_input_kind() -> None:
    assert sorted(LOSSES) == ["ce", "mse", "ttest", "ttest_novar"]
    assert get_loss("ttest").expects == "residual"
    assert get_loss("ttest_novar").expects == "residual"
    assert get_loss("mse").expects == "reconstruction"
    assert get_loss("ce").expects == "logits"
    ttest = get_loss("ttest", beta=0.5, lambda_n=0.2)
    assert isinstance(ttest, TTestLoss)
    assert (ttest.beta, ttest.lambda_p, ttest.lambda_n) == (0.5, 1.0, 0.2)


def test_get_loss_unknown_name_lists_known_losses() -> None:
    with pytest.raises(ValueError, match=r"unknown loss 'dice'.*ce, mse, ttest, ttest_novar"):
        get_loss("dice")


def test_get_loss_unknown_argument_names_it() -> None:
    with pytest.raises(TypeError, match="'lambda_p'"):
        get_loss("ttest_novar", lambda_p=1.0)
    with pytest.raises(TypeError, match="'gamma'"):
        get_loss("ttest", gamma=2.0)
