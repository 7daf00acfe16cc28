"""The t-test loss of the ASN (Zhang et al., CVPR 2019) and the losses it is compared with.

Every loss here says what it consumes in its ``expects`` class attribute, so a
training loop can dispatch without knowing the class:

``"residual"`` — :class:`TTestLoss`
    ``loss(r, positive_mask, negative_mask)`` with ``r = residual(f(I), I)``.
``"reconstruction"`` — :class:`ReconstructionMSELoss`
    ``loss(f(I), I, positive_mask, negative_mask)``.
``"logits"`` — :class:`SegmentationCELoss`
    ``loss(logits, positive_mask, negative_mask)`` with 2-class logits.

Tensors are ``(B, C, H, W)`` (row = H axis, column = W axis). The masks are
``(B, 1, H, W)``, boolean or 0/1: ``positive_mask`` marks µC pixels (the 7-px disk
around each µC centre), ``negative_mask`` the pixels known to be background. A
pixel in neither mask (the "other" calcifications larger than 1 mm, padding,
outside the breast) is ignored by every loss; a pixel in both is an error.

Statistics are pooled over **all** pixels of the batch (not per image then
averaged): a patch with one µC pixel and a patch with a hundred weigh by their
pixel counts, which is what a two-sample t statistic over the batch does.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable
from typing import Any, ClassVar, Final, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LOSSES",
    "RESIDUAL_KINDS",
    "ReconstructionMSELoss",
    "SegmentationCELoss",
    "TTestLoss",
    "TTestTerms",
    "get_loss",
    "residual",
]

logger = logging.getLogger(__name__)

RESIDUAL_KINDS: Final = ("l1", "l2", "smooth_l1")


def residual(
    recon: torch.Tensor,
    image: torch.Tensor,
    *,
    kind: str = "l1",
    smooth_l1_beta: float = 1.0,
) -> torch.Tensor:
    """The element-wise reconstruction residual ``r`` of the ASN.

    Parameters
    ----------
    recon : torch.Tensor
        The reconstruction ``f(I)``, shape ``(B, 1, H, W)``, in [0, 1] for the ASN.
    image : torch.Tensor
        The input ``I``, same shape.
    kind : {"l1", "l2", "smooth_l1"}
        ``"l1"``: ``|f(I) − I|`` (the paper); ``"l2"``: ``(f(I) − I)²``;
        ``"smooth_l1"``: Huber-like, ``0.5·d²/β`` for ``|d| < β`` else ``|d| − 0.5·β``
        (PyTorch's SmoothL1). For images in [0, 1] the default ``β = 1`` makes it
        ``0.5·d²`` everywhere, i.e. half the L2 residual.
    smooth_l1_beta : float
        The SmoothL1 transition point β (> 0); used only with ``kind="smooth_l1"``.

    Returns
    -------
    torch.Tensor
        ``(B, 1, H, W)``, non-negative; with ``"l1"`` and inputs in [0, 1] it lies in
        [0, 1].

    Raises
    ------
    ValueError
        Shapes differ or are not ``(B, 1, H, W)``; unknown ``kind``; ``β ≤ 0``.
    """
    if recon.ndim != 4 or recon.shape[1] != 1:
        raise ValueError(f"recon must have shape (B, 1, H, W), got {tuple(recon.shape)}")
    if image.shape != recon.shape:
        raise ValueError(
            f"image shape {tuple(image.shape)} differs from recon shape {tuple(recon.shape)}"
        )
    if kind not in RESIDUAL_KINDS:
        raise ValueError(f"kind must be one of {list(RESIDUAL_KINDS)}, got {kind!r}")
    d = recon - image
    if kind == "l1":
        return d.abs()
    if kind == "l2":
        return d * d
    if not (isinstance(smooth_l1_beta, (int, float)) and smooth_l1_beta > 0):
        raise ValueError(f"smooth_l1_beta must be a positive number, got {smooth_l1_beta!r}")
    return F.smooth_l1_loss(recon, image, reduction="none", beta=float(smooth_l1_beta))


def _check_weight(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return float(value)


def _as_mask(name: str, mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``mask`` as a boolean tensor, after checking its shape and its values."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != like.shape:
        raise ValueError(
            f"{name} shape {tuple(mask.shape)} differs from the input shape {tuple(like.shape)}"
        )
    if mask.dtype == torch.bool:
        return mask
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must be boolean or hold only 0 and 1")
    return mask != 0


def _check_masks(
    x: torch.Tensor, positive_mask: torch.Tensor, negative_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    pos = _as_mask("positive_mask", positive_mask, x)
    neg = _as_mask("negative_mask", negative_mask, x)
    if bool((pos & neg).any()):
        raise ValueError("positive_mask and negative_mask overlap: a pixel cannot be both")
    return pos, neg


def _masked_mean_var(r: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean and population variance of ``r`` over ``mask``; ``(0, 0, 0)`` for an empty mask.

    The zeros for an empty mask are ``r.sum() · 0`` so they stay in the graph (a
    backward pass through a loss made only of them gives zero gradients, not an
    error) and are never NaN.
    """
    n = int(mask.sum())
    if n == 0:
        zero = r.sum() * 0.0
        return zero, zero, 0
    w = mask.to(r.dtype)
    mean = (r * w).sum() / n
    var = (((r - mean) ** 2) * w).sum() / n
    return mean, var, n


class TTestTerms(NamedTuple):
    """The t-test loss and its parts, as tensors (in the graph) or, in ``last_stats``, floats.

    ``hinge = max(β − mean_p, 0)`` (0 without positive pixels);
    ``loss = hinge + mean_n + λp·var_p + λn·var_n``.
    """

    loss: Any
    hinge: Any
    mean_p: Any
    mean_n: Any
    var_p: Any
    var_n: Any
    n_pos: int
    n_neg: int


class TTestLoss(nn.Module):
    """The paper's t-test loss on ASN residuals.

    ``L = max(β − mean(r_p), 0) + mean(r_n) + λp·Var(r_p) + λn·Var(r_n)``

    where ``r_p`` are the residuals of all positive pixels of the batch and ``r_n``
    those of all negative pixels. The paper: β = 0.8, λp = 1, λn = 0.1 (note that
    a public re-implementation swaps λp and λn; this follows the paper).

    Conventions:

    * ``Var`` is the **population** variance (divide by ``n``): defined (0) for a
      single pixel, where the unbiased estimate would be NaN; with thousands of
      pixels per batch the two differ by a factor ``n/(n−1) ≈ 1``.
    * A batch **without positive pixels** has no positive terms: the hinge and
      ``λp·Var(r_p)`` are 0 (not β: there is nothing to separate), so the loss is
      ``mean(r_n) + λn·Var(r_n)``. Likewise, without negative pixels the negative
      terms are 0. With neither, the loss is a 0 that is still in the graph.
    * Pixels in neither mask do not enter any term.

    After each forward pass, ``last_stats`` holds the :class:`TTestTerms` as
    floats (detached) for logging; :meth:`terms` returns them as tensors.

    Parameters
    ----------
    beta : float
        Target mean positive residual of the hinge (finite, ≥ 0).
    lambda_p, lambda_n : float
        Weights of the positive and negative variances (finite, ≥ 0).

    Raises
    ------
    TypeError
        A parameter is not a number.
    ValueError
        A parameter is not finite or is negative.
    """

    expects: ClassVar[str] = "residual"

    def __init__(self, beta: float = 0.8, lambda_p: float = 1.0, lambda_n: float = 0.1) -> None:
        super().__init__()
        self.beta = _check_weight("beta", beta)
        self.lambda_p = _check_weight("lambda_p", lambda_p)
        self.lambda_n = _check_weight("lambda_n", lambda_n)
        self.last_stats: TTestTerms | None = None

    @classmethod
    def without_variance(cls, beta: float = 0.8) -> TTestLoss:
        """The ablation without variance terms (``λp = λn = 0``); registry ``"ttest_novar"``."""
        return cls(beta=beta, lambda_p=0.0, lambda_n=0.0)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, lambda_p={self.lambda_p}, lambda_n={self.lambda_n}"

    def terms(
        self, residual: torch.Tensor, positive_mask: torch.Tensor, negative_mask: torch.Tensor
    ) -> TTestTerms:
        """The loss and its parts as tensors (in the autograd graph).

        Parameters
        ----------
        residual : torch.Tensor
            ``(B, 1, H, W)`` residuals, e.g. :func:`residual` of the ASN output.
        positive_mask, negative_mask : torch.Tensor
            Same shape, boolean or 0/1; they must not overlap.

        Returns
        -------
        TTestTerms
            ``loss``, ``hinge``, ``mean_p``, ``mean_n``, ``var_p``, ``var_n`` (0-d
            tensors) and the pixel counts ``n_pos``, ``n_neg``.

        Raises
        ------
        ValueError
            Shapes differ, a mask holds values other than 0/1, or the masks overlap.
        """
        if residual.ndim != 4:
            raise ValueError(f"residual must have shape (B, 1, H, W), got {tuple(residual.shape)}")
        pos, neg = _check_masks(residual, positive_mask, negative_mask)
        mean_p, var_p, n_pos = _masked_mean_var(residual, pos)
        mean_n, var_n, n_neg = _masked_mean_var(residual, neg)
        hinge = torch.clamp(self.beta - mean_p, min=0.0) if n_pos else mean_p
        loss = hinge + mean_n + self.lambda_p * var_p + self.lambda_n * var_n
        return TTestTerms(loss, hinge, mean_p, mean_n, var_p, var_n, n_pos, n_neg)

    def forward(
        self, residual: torch.Tensor, positive_mask: torch.Tensor, negative_mask: torch.Tensor
    ) -> torch.Tensor:
        """The scalar loss (see :meth:`terms`); also sets ``last_stats``."""
        t = self.terms(residual, positive_mask, negative_mask)
        hinge, mean_p, mean_n, var_p, var_n = (
            float(v.detach()) for v in (t.hinge, t.mean_p, t.mean_n, t.var_p, t.var_n)
        )
        self.last_stats = TTestTerms(
            float(t.loss.detach()), hinge, mean_p, mean_n, var_p, var_n, t.n_pos, t.n_neg
        )
        return t.loss


class ReconstructionMSELoss(nn.Module):
    """Plain mean-squared reconstruction error, ``mean((f(I) − I)²)`` (the paper's ablation).

    Parameters
    ----------
    labelled_only : bool
        ``False`` (default): average over every pixel. ``True``: average only over
        pixels in the positive or the negative mask (ignoring "other" findings and
        padding); the masks are then required.

    Notes
    -----
    ``forward(recon, image, positive_mask=None, negative_mask=None)``; with
    ``labelled_only`` and no labelled pixel in the batch the loss is a 0 in the
    graph. ``last_stats`` holds ``{"mse": float, "n": int}`` after each call.
    """

    expects: ClassVar[str] = "reconstruction"

    def __init__(self, labelled_only: bool = False) -> None:
        super().__init__()
        if not isinstance(labelled_only, bool):
            raise TypeError(f"labelled_only must be a bool, got {type(labelled_only).__name__}")
        self.labelled_only = labelled_only
        self.last_stats: dict[str, float] | None = None

    def extra_repr(self) -> str:
        return f"labelled_only={self.labelled_only}"

    def forward(
        self,
        recon: torch.Tensor,
        image: torch.Tensor,
        positive_mask: torch.Tensor | None = None,
        negative_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        sq = residual(recon, image, kind="l2")
        if self.labelled_only:
            if positive_mask is None or negative_mask is None:
                raise ValueError("labelled_only=True needs positive_mask and negative_mask")
            pos, neg = _check_masks(sq, positive_mask, negative_mask)
            loss, _, n = _masked_mean_var(sq, pos | neg)
        else:
            loss, n = sq.mean(), sq.numel()
        self.last_stats = {"mse": float(loss.detach()), "n": n}
        return loss


class SegmentationCELoss(nn.Module):
    """2-class cross-entropy on logits (the paper's "U-Net" segmentation baseline).

    Target: class 1 on ``positive_mask``, class 0 on ``negative_mask``; pixels in
    neither are ignored. The mean is over the labelled pixels of the batch; with
    none, the loss is a 0 in the graph (``F.cross_entropy`` would give NaN).

    Parameters
    ----------
    class_weights : (float, float) or None
        Optional weights of (background, µC) against the strong pixel imbalance;
        ``None``: unweighted, as the paper (which does not mention weights).

    Notes
    -----
    ``forward(logits, positive_mask, negative_mask)``: logits ``(B, 2, H, W)``,
    masks ``(B, 1, H, W)``. ``last_stats`` holds ``{"ce": float, "n": int}``.
    """

    expects: ClassVar[str] = "logits"

    def __init__(self, class_weights: tuple[float, float] | None = None) -> None:
        super().__init__()
        self.class_weights: tuple[float, float] | None = None
        if class_weights is not None:
            if not isinstance(class_weights, (tuple, list)) or len(class_weights) != 2:
                raise ValueError(f"class_weights must be a pair, got {class_weights!r}")
            w0 = _check_weight("class_weights[0]", class_weights[0])
            w1 = _check_weight("class_weights[1]", class_weights[1])
            if w0 + w1 == 0:
                raise ValueError("class_weights must not both be 0")
            self.class_weights = (w0, w1)
        self.last_stats: dict[str, float] | None = None

    def extra_repr(self) -> str:
        return f"class_weights={self.class_weights}"

    def forward(
        self, logits: torch.Tensor, positive_mask: torch.Tensor, negative_mask: torch.Tensor
    ) -> torch.Tensor:
        if logits.ndim != 4 or logits.shape[1] != 2:
            raise ValueError(f"logits must have shape (B, 2, H, W), got {tuple(logits.shape)}")
        like = logits[:, :1]
        pos, neg = _check_masks(like, positive_mask, negative_mask)
        labelled = pos | neg
        n = int(labelled.sum())
        if n == 0:
            loss = logits.sum() * 0.0
        else:
            target = pos[:, 0].long()
            target[~labelled[:, 0]] = -100
            weight = (
                None
                if self.class_weights is None
                else torch.tensor(self.class_weights, dtype=logits.dtype, device=logits.device)
            )
            loss = F.cross_entropy(logits, target, weight=weight, ignore_index=-100)
        self.last_stats = {"ce": float(loss.detach()), "n": n}
        return loss


#: Registry name → loss constructor. ``"ttest_novar"`` is ``TTestLoss`` with
#: ``λp = λn = 0`` (it accepts only ``beta``).
LOSSES: dict[str, Callable[..., nn.Module]] = {
    "ttest": TTestLoss,
    "ttest_novar": TTestLoss.without_variance,
    "mse": ReconstructionMSELoss,
    "ce": SegmentationCELoss,
}


def get_loss(name: str, **cfg: Any) -> nn.Module:
    """Build a loss by registry name.

    Parameters
    ----------
    name : {"ttest", "ttest_novar", "mse", "ce"}
        See :data:`LOSSES`.
    **cfg
        Constructor arguments (e.g. ``beta=0.8`` for the t-test losses).

    Returns
    -------
    torch.nn.Module
        The loss; its ``expects`` attribute says what ``forward`` takes.

    Raises
    ------
    ValueError
        Unknown ``name`` (the message lists the known ones) or an invalid value.
    TypeError
        An argument the constructor does not take (the message names it).
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}")
    params = inspect.signature(LOSSES[name]).parameters
    unknown = sorted(set(cfg) - set(params))
    if unknown:
        raise TypeError(
            f"unknown argument(s) {', '.join(map(repr, unknown))} for loss {name!r}; "
            f"accepted: {', '.join(params) or 'none'}"
        )
    return LOSSES[name](**cfg)
