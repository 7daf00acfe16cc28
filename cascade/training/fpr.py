"""FPR training: the false-positive reducer on the crops a trained ASN proposes.

Readable top to bottom: load the ASN checkpoint → mine labelled crops of the training
and validation images (`cascade.training.mining`) → model, optimizer, BCE loss →
resume → for each epoch: shuffle, augment, forward, loss, step, log; then validate
(cascade R@5 of ASN × FPR, `evaluate_cascade`) and checkpoint ``last.pt`` and ``best.pt``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cascade import __version__
from cascade.data.datasets import load_training_images
from cascade.device import resolve_device
from cascade.errors import TrainingError
from cascade.evaluation.froc import ImageEval, froc
from cascade.inference.fpr import CROP_SIZE, extract_crops, prepare_batch, score_crops
from cascade.inference.proposals import ProposalConfig
from cascade.inference.weights import INTENDED_USE
from cascade.models import get_model
from cascade.models.checkpoint import checkpoint_sha256, load_checkpoint, save_checkpoint
from cascade.training.common import seed_everything, train_val_records
from cascade.training.config import FPR_PRESETS, FprTrainConfig
from cascade.training.mining import (
    CandidateImage,
    augment_crops,
    collect_candidates,
    other_negative_points,
)

logger = logging.getLogger(__name__)

__all__ = ["evaluate_cascade", "train_fpr"]


def evaluate_cascade(
    fpr: torch.nn.Module,
    cand_images: Sequence[CandidateImage],
    *,
    input_size: int,
    device: torch.device | str = "cpu",
    ks: Sequence[float] = (0.5, 1, 2, 5, 10, 15, 20),
) -> dict[str, Any]:
    """FROC of ASN × FPR on pre-computed candidates (1-mm rule, received grid).

    A candidate's cascade score is its ASN score times the FPR's probability.

    Parameters
    ----------
    fpr : torch.nn.Module
        The FPR under evaluation.
    cand_images : sequence of CandidateImage
        Candidates of the validation images (`collect_candidates`).
    input_size : int
        The FPR's input size (crops are resized to it).
    device : torch.device or str
        Where the FPR runs.
    ks : sequence of float
        False positives per image at which recall is reported.

    Returns
    -------
    dict
        ``recall_at`` (``"5"`` → R@5, …), ``n_truth`` and ``n_images``.
    """
    evals = []
    for ci in cand_images:
        probs = score_crops(fpr, ci.crops, input_size=input_size, device=device)
        evals.append(
            ImageEval(
                ci.truth_xy,
                ci.xy_source,
                ci.asn_scores * probs,
                spacing_mm=ci.spacing_mm,
                breast_area_cm2=ci.breast_area_cm2,
            )
        )
    result = froc(evals, ks=tuple(ks))
    return {
        "recall_at": {f"{k:g}": float(v) for k, v in result.recall_at.items()},
        "n_truth": int(result.n_truth),
        "n_images": int(result.n_images),
    }


def train_fpr(
    *,
    manifest: str | Path,
    asn_checkpoint: str | Path,
    out: str | Path,
    config: FprTrainConfig | None = None,
    val_manifest: str | Path | None = None,
    resume: str | Path | None = None,
    device: str = "auto",
    progress: bool = True,
) -> Path:
    """Train the FPR ResNet on ASN's candidates; return the best checkpoint's path.

    Writes ``out/last.pt`` (resumable), ``out/best.pt`` (best cascade R@5 on the
    validation images, ties broken by R@1) and ``out/history.json``.

    Parameters
    ----------
    manifest : str or Path
        Training manifest.
    asn_checkpoint : str or Path
        The trained ASN (kind ``asn`` or ``unet_ce``) whose candidates are learnt.
    out : str or Path
        Output folder (created).
    config : FprTrainConfig or None
        The run; ``None`` for ``FPR_PRESETS["cpu"]``.
    val_manifest : str or Path or None
        Validation manifest; ``None`` holds out 20 % of the training studies.
    resume : str or Path or None
        A ``last.pt`` to continue from (same config).
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, … (see `cascade.device.resolve_device`).
    progress : bool
        Show progress bars.

    Returns
    -------
    Path
        ``out/best.pt``.

    Raises
    ------
    TrainingError
        Not an ASN checkpoint, no training data, crops of one class only, a non-finite
        loss, or an unusable resume checkpoint.
    """
    config = config or FPR_PRESETS["cpu"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    seed_everything(config.seed)
    asn_ck = load_checkpoint(asn_checkpoint, map_location=dev)
    asn_kind = asn_ck.meta.get("kind")
    if asn_kind not in ("asn", "unet_ce"):
        raise TrainingError(f"{asn_checkpoint}: not an ASN checkpoint (kind {asn_kind!r})")
    asn = asn_ck.model.to(dev).eval()
    asn_pre = asn_ck.meta.get("preprocessing", {})
    map_kind = asn_pre.get("map_kind", "residual")
    residual_kind = asn_pre.get("residual", "l1")
    prop_cfg = ProposalConfig(
        **{
            **dict(asn_ck.meta.get("training", {}).get("proposal", {}) or {}),
            **dict(config.proposal),
        }
    )

    train_recs, val_recs = train_val_records(
        manifest, val_manifest, seed=config.seed, val_images=config.val_images
    )
    train_images = load_training_images(train_recs, progress=progress)
    train_c = collect_candidates(
        asn,
        train_images,
        map_kind=map_kind,
        residual_kind=residual_kind,
        proposal=prop_cfg,
        match_radius_mm=config.match_radius_mm,
        device=dev,
        progress=progress,
    )
    val_c = (
        collect_candidates(
            asn,
            load_training_images(val_recs),
            map_kind=map_kind,
            residual_kind=residual_kind,
            proposal=prop_cfg,
            match_radius_mm=config.match_radius_mm,
            device=dev,
        )
        if val_recs
        else []
    )
    other_crops = [
        extract_crops(
            im.image,
            other_negative_points(
                im, config.other_negatives, spacing_mm=config.other_negative_spacing_mm
            ),
        )
        for im in (train_images if config.other_negatives else [])
    ]
    n_other = int(sum(len(c) for c in other_crops))
    crops = np.concatenate(
        [c.crops for c in train_c] + [c.truth_crops for c in train_c] + other_crops
    ).reshape(-1, CROP_SIZE, CROP_SIZE)
    labels = np.concatenate(
        [c.labels for c in train_c]
        + [np.ones(len(c.truth_crops), np.float32) for c in train_c]
        + [np.zeros(len(c), np.float32) for c in other_crops]
    )
    if len(labels) == 0 or labels.min() == labels.max():
        raise TrainingError(
            f"FPR needs both positive and negative crops; got {int(labels.sum())} positives "
            f"of {len(labels)}"
        )
    n_pos = int(labels.sum())
    logger.info(
        "FPR training crops: %d (%d positive, %d hard negatives, %d of them on %s findings)",
        len(labels),
        n_pos,
        len(labels) - n_pos,
        n_other,
        "/".join(config.other_negatives) or "no other",
    )

    model = get_model(config.model, **dict(config.model_config)).to(dev)
    input_size = int(dict(config.model_config).get("input_size", CROP_SIZE))
    opt: torch.optim.Optimizer
    if config.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    else:
        opt = torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
    loss_fn = torch.nn.BCEWithLogitsLoss()
    rng = np.random.default_rng(config.seed)
    start_epoch, history, best = 0, [], (-1.0, -1.0)
    if resume is not None:
        ck = load_checkpoint(resume, kind="fpr")
        model.load_state_dict(ck.model.state_dict())
        if ck.optimizer_state is None:
            raise TrainingError(f"{resume}: has no optimizer state; cannot resume")
        opt.load_state_dict(ck.optimizer_state)
        prog = ck.progress or {}
        start_epoch = int(prog.get("epoch", -1)) + 1
        history = list(prog.get("history", []))
        best = tuple(prog.get("best", (-1.0, -1.0)))
        if "rng_state" in prog:
            rng.bit_generator.state = json.loads(prog["rng_state"])
    data_desc = {
        "manifest": str(manifest),
        "asn_checkpoint": str(asn_checkpoint),
        "asn_sha256": checkpoint_sha256(asn_checkpoint),
        "train_images": len(train_recs),
        "val_images": len(val_recs),
        "crops": len(labels),
        "positive_crops": n_pos,
        "other_negative_crops": n_other,
        "source": "synthetic phantoms (calcnode phantom) unless the manifest says otherwise",
        "intended_use": INTENDED_USE,
    }
    preprocessing = {
        "pixel_spacing_mm": 0.07,
        "intensity": "linear to [0, 1] (8-bit quantised), background 0",
        "crop_size": CROP_SIZE,
        "input_size": input_size,
    }
    best_path = out / "best.pt"
    for epoch in range(start_epoch, config.epochs):
        model.train()
        order = rng.permutation(len(labels))
        batches = range(0, len(order), config.batch_size)
        iterator: Any = batches
        if progress:
            from tqdm import tqdm

            iterator = tqdm(batches, desc=f"FPR epoch {epoch + 1}/{config.epochs}", unit="batch")
        t0, losses = time.perf_counter(), []
        for start in iterator:
            idx = order[start : start + config.batch_size]
            batch = crops[idx]
            if config.augment:
                batch = augment_crops(rng, batch)
            x = prepare_batch(batch, input_size=input_size, device=dev)
            y = torch.from_numpy(labels[idx]).to(dev)
            loss = loss_fn(model(x).reshape(-1), y)
            if not torch.isfinite(loss):
                raise TrainingError(f"non-finite FPR loss ({loss.item()}) at epoch {epoch + 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.item()))
            if progress:
                iterator.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": float(np.mean(losses)),
            "train_seconds": time.perf_counter() - t0,
        }
        if val_c:
            metrics["val"] = evaluate_cascade(model, val_c, input_size=input_size, device=dev)
        history.append(metrics)
        logger.info("FPR epoch %d: %s", epoch + 1, json.dumps(metrics))
        r = metrics.get("val", {}).get("recall_at", {})
        score = (float(r.get("5", -metrics["loss"])), float(r.get("1", 0.0)))
        is_best = score > best
        best = max(best, score)
        common = dict(
            model_name=config.model,
            model_config=dict(config.model_config),
            preprocessing=preprocessing,
            training={**config.to_json(), "device": str(dev), "calcnode_version": __version__},
            data=data_desc,
            metrics=metrics,
            kind="fpr",
        )
        save_checkpoint(
            out / "last.pt",
            state_dict=model.state_dict(),
            optimizer_state=opt.state_dict(),
            progress={
                "epoch": epoch,
                "history": history,
                "best": list(best),
                "rng_state": json.dumps(rng.bit_generator.state),
            },
            **common,  # type: ignore[arg-type]
        )
        if is_best or not best_path.exists():
            save_checkpoint(best_path, state_dict=model.state_dict(), **common)  # type: ignore[arg-type]
    (out / "history.json").write_text(json.dumps(history, indent=2))
    return best_path
