"""ASN training: the proposal network (and its ablations) on patches.

Readable top to bottom: data (train / validation images, a patch sampler) → model,
optimizer and loss → resume → for each epoch: sample, forward, loss, step, log; then
validate (proposal recall R@10, `evaluate_proposals`) and checkpoint ``last.pt``
(with optimizer and sampler state, for ``resume``) and ``best.pt``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from cascade import __version__
from cascade.data.datasets import Augmentation, PatchSampler, TrainingImage, load_training_images
from cascade.device import resolve_device
from cascade.errors import TrainingError
from cascade.evaluation.froc import ImageEval, froc
from cascade.inference.proposals import ProposalConfig, candidates_xy, propose, residual_map
from cascade.inference.weights import INTENDED_USE
from cascade.models import get_model
from cascade.models.checkpoint import load_checkpoint, save_checkpoint
from cascade.training.common import seed_everything, train_val_records
from cascade.training.config import ASN_PRESETS, AsnTrainConfig
from cascade.training.losses import get_loss, residual

logger = logging.getLogger(__name__)

__all__ = ["evaluate_proposals", "train_asn"]


def _checkpoint_kind(config: AsnTrainConfig) -> str:
    """The checkpoint kind of an ASN run: ``unet_ce`` for the CE ablation, else ``asn``."""
    return "unet_ce" if config.loss == "ce" else "asn"


def evaluate_proposals(
    model: torch.nn.Module,
    images: Sequence[TrainingImage],
    *,
    kind: Literal["residual", "segmentation"] = "residual",
    residual_kind: str = "l1",
    config: ProposalConfig | None = None,
    device: torch.device | str = "cpu",
    ks: Sequence[float] = (5, 10, 15, 20, 30),
) -> dict[str, Any]:
    """Proposal recall of a model on images (1-mm rule, received grid): R@k and timing.

    Parameters
    ----------
    model : torch.nn.Module
        The ASN (or ablation) under evaluation.
    images : sequence of TrainingImage
        Validation images with their ground truth.
    kind : {"residual", "segmentation"}
        The map the model produces.
    residual_kind : str
        Residual of a ``residual`` map (see `cascade.inference.proposals.residual_map`).
    config : ProposalConfig or None
        Proposal settings; ``None`` for the defaults.
    device : torch.device or str
        Where the model runs.
    ks : sequence of float
        False positives per image at which recall is reported.

    Returns
    -------
    dict
        ``recall_at`` (``"10"`` → R@10, …), ``n_truth``, ``n_images`` and
        ``seconds_per_image``.
    """
    evals = []
    t0 = time.perf_counter()
    for im in images:
        rmap = residual_map(
            model, im.image, kind=kind, residual=residual_kind, mask=im.breast_mask, device=device
        )
        cands = propose(rmap, im.transform, config=config)
        rec = im.record
        evals.append(
            ImageEval(
                np.array([[c.x, c.y] for c in rec.calcifications], dtype=np.float64).reshape(-1, 2),
                candidates_xy(cands, grid="source"),
                np.array([c.asn_score for c in cands], dtype=np.float64),
                spacing_mm=rec.pixel_spacing_mm,
                breast_area_cm2=float(im.breast_mask.sum()) * 0.07 * 0.07 / 100.0,
            )
        )
    seconds = (time.perf_counter() - t0) / max(len(images), 1)
    result = froc(evals, ks=tuple(ks))
    return {
        "recall_at": {f"{k:g}": float(v) for k, v in result.recall_at.items()},
        "n_truth": int(result.n_truth),
        "n_images": int(result.n_images),
        "seconds_per_image": seconds,
    }


def train_asn(
    *,
    manifest: str | Path,
    out: str | Path,
    config: AsnTrainConfig | None = None,
    val_manifest: str | Path | None = None,
    resume: str | Path | None = None,
    device: str = "auto",
    progress: bool = True,
) -> Path:
    """Train an ASN (or an ablation) and return the path of the best checkpoint.

    Writes ``out/last.pt`` after every epoch (with optimizer state, for
    ``resume``), ``out/best.pt`` (best proposal R@10 on the validation images) and
    ``out/history.json``.

    Parameters
    ----------
    manifest : str or Path
        Training manifest.
    out : str or Path
        Output folder (created).
    config : AsnTrainConfig or None
        The run; ``None`` for ``ASN_PRESETS["cpu"]``.
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
        Non-finite loss, no training data, or an unusable resume checkpoint.
    """
    config = config or ASN_PRESETS["cpu"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    train_recs, val_recs = train_val_records(
        manifest, val_manifest, seed=config.seed, val_images=config.val_images
    )
    logger.info(
        "ASN training: %d train images, %d validation images, device %s",
        len(train_recs),
        len(val_recs),
        dev,
    )
    seed_everything(config.seed)
    train_images = load_training_images(
        train_recs, progress=progress, positive_radius_mm=config.positive_radius_mm
    )
    val_images = load_training_images(val_recs, progress=progress) if val_recs else []

    model_cfg = dict(config.model_config)
    if config.loss == "ce":
        model_cfg.update(out_channels=2, head="logits")
    model = get_model(config.model, **model_cfg).to(dev)
    opt = torch.optim.Adam(
        model.parameters(), lr=config.lr, betas=(0.9, 0.999), weight_decay=config.weight_decay
    )
    loss_cfg: dict[str, Any] = {}
    if config.loss in ("ttest", "ttest_novar"):
        loss_cfg = {"beta": config.beta}
        if config.loss == "ttest":
            loss_cfg.update(lambda_p=config.lambda_p, lambda_n=config.lambda_n)
    loss_fn = get_loss(config.loss, **loss_cfg)
    sampler = PatchSampler(
        train_images,
        patch_size=config.patch_size,
        positive_fraction=config.positive_fraction,
        augmentation=Augmentation() if config.augment else None,
        seed=config.seed,
    )
    prop_cfg = ProposalConfig(**dict(config.proposal))

    start_epoch, history, best = 0, [], -1.0
    if resume is not None:
        ck = load_checkpoint(resume, kind=_checkpoint_kind(config))
        model.load_state_dict(ck.model.state_dict())
        if ck.optimizer_state is None:
            raise TrainingError(f"{resume}: has no optimizer state; cannot resume")
        opt.load_state_dict(ck.optimizer_state)
        prog = ck.progress or {}
        start_epoch = int(prog.get("epoch", -1)) + 1
        history = list(prog.get("history", []))
        best = float(prog.get("best", -1.0))
        if "sampler_state" in prog:
            sampler.rng.bit_generator.state = json.loads(prog["sampler_state"])
        torch.manual_seed(config.seed + start_epoch)
        logger.info("resumed from %s at epoch %d", resume, start_epoch)

    data_desc = {
        "manifest": str(manifest),
        "train_images": len(train_recs),
        "val_images": len(val_recs),
        "train_calcifications": int(sum(len(r.calcifications) for r in train_recs)),
        "source": "synthetic phantoms (calcnode phantom) unless the manifest says otherwise",
        "intended_use": INTENDED_USE,
    }
    preprocessing = {
        "pixel_spacing_mm": 0.07,
        "intensity": "linear to [0, 1] (8-bit quantised), background 0",
        "quantize_8bit": True,
        "patch_size": config.patch_size,
        "map_kind": config.map_kind,
        "residual": config.residual,
    }
    best_path = out / "best.pt"
    for epoch in range(start_epoch, config.epochs):
        model.train()
        iterator: Any = range(config.iterations_per_epoch)
        if progress:
            from tqdm import tqdm

            iterator = tqdm(iterator, desc=f"epoch {epoch + 1}/{config.epochs}", unit="it")
        t0, losses = time.perf_counter(), []
        for it in iterator:
            batch = sampler.sample(config.batch_size)
            x = torch.from_numpy(batch.images).to(dev)
            pos = torch.from_numpy(batch.positive).to(dev)
            neg = torch.from_numpy(batch.negative).to(dev)
            y = model(x)
            if config.loss == "ce":
                loss = loss_fn(y, pos, neg)
            elif config.loss == "mse":
                loss = loss_fn(y, x)
            else:
                loss = loss_fn(residual(y, x, kind=config.residual), pos, neg)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"non-finite loss ({loss.item()}) at epoch {epoch + 1}, iteration {it + 1}: "
                    "lower the learning rate or check the data"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.item()))
            if progress:
                iterator.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        train_seconds = time.perf_counter() - t0
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": float(np.mean(losses)),
            "train_seconds": train_seconds,
        }
        if val_images:
            val = evaluate_proposals(
                model,
                val_images,
                kind=config.map_kind,
                residual_kind=config.residual,
                config=prop_cfg,
                device=dev,
            )
            metrics["val"] = val
        history.append(metrics)
        score = metrics.get("val", {}).get("recall_at", {}).get("10", -metrics["loss"])
        logger.info("epoch %d: %s", epoch + 1, json.dumps(metrics))
        is_best = score > best
        best = max(best, score)
        common = dict(
            model_name=config.model,
            model_config=model_cfg,
            preprocessing=preprocessing,
            training={**config.to_json(), "device": str(dev), "calcnode_version": __version__},
            data=data_desc,
            metrics=metrics,
            kind=_checkpoint_kind(config),
        )
        save_checkpoint(
            out / "last.pt",
            state_dict=model.state_dict(),
            optimizer_state=opt.state_dict(),
            progress={
                "epoch": epoch,
                "history": history,
                "best": best,
                "sampler_state": json.dumps(sampler.rng.bit_generator.state),
            },
            **common,  # type: ignore[arg-type]
        )
        if is_best or not best_path.exists():
            save_checkpoint(best_path, state_dict=model.state_dict(), **common)  # type: ignore[arg-type]
    (out / "history.json").write_text(json.dumps(history, indent=2))
    return best_path
