"""Training loops: ASN (and its ablations) on patches, then FPR on ASN's candidates.

Readable top to bottom: build data → build model → loop (sample, forward, loss,
step, log) → validate every epoch → checkpoint. Seeded; CUDA when present, CPU
otherwise; resumable from the last checkpoint (optimizer state included: a
restarted Adam costs recall); a non-finite loss stops training with an error.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from cascade._version import __version__
from cascade.checkpoint import load_checkpoint, save_checkpoint
from cascade.datasets import Augmentation, PatchSampler, TrainingImage, load_training_images
from cascade.errors import TrainingError
from cascade.evaluate import ImageEval, froc
from cascade.losses import get_loss, residual
from cascade.manifest import ImageRecord, read_manifest
from cascade.models import get_model
from cascade.proposals import ProposalConfig, candidates_xy, propose, residual_map

logger = logging.getLogger(__name__)

__all__ = ["ASN_PRESETS", "AsnTrainConfig", "resolve_device", "split_records", "train_asn"]

LossName = Literal["ttest", "ttest_novar", "mse", "ce"]


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` → the first CUDA device when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device {device!r} was asked for but CUDA is not available")
    return dev


@dataclass(frozen=True)
class AsnTrainConfig:
    """Everything that defines an ASN training run (stored in its checkpoints).

    The defaults are the paper's: 112-px patches, 1 : 1 positives, Adam lr 1e-3,
    weight decay 1e-4, t-test loss β = 0.8, λp = 1, λn = 0.1.
    """

    model: str = "asn_unet"
    model_config: Mapping[str, Any] = field(default_factory=lambda: {"width": 16})
    loss: LossName = "ttest"
    beta: float = 0.8
    lambda_p: float = 1.0
    lambda_n: float = 0.1
    residual: str = "l1"
    patch_size: int = 112
    batch_size: int = 16
    positive_fraction: float = 0.5
    positive_radius_mm: float = 0.49
    epochs: int = 8
    iterations_per_epoch: int = 100
    lr: float = 1e-3
    weight_decay: float = 1e-4
    augment: bool = True
    seed: int = 0
    val_images: int = 8
    proposal: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.loss not in ("ttest", "ttest_novar", "mse", "ce"):
            raise ValueError(f"loss must be ttest, ttest_novar, mse or ce, got {self.loss!r}")
        for name in ("epochs", "iterations_per_epoch", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive, got {self.lr}")

    @property
    def map_kind(self) -> Literal["residual", "segmentation"]:
        return "segmentation" if self.loss == "ce" else "residual"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["model_config"] = dict(self.model_config)
        d["proposal"] = dict(self.proposal)
        return d


#: Named presets: ``tiny`` for smoke tests, ``cpu`` for this kind of 2-core machine
#: (well under an hour), ``paper`` for a GPU.
ASN_PRESETS: dict[str, AsnTrainConfig] = {
    "tiny": AsnTrainConfig(
        model_config={"width": 4}, epochs=2, iterations_per_epoch=3, batch_size=4,
        patch_size=64, val_images=2,
    ),
    "cpu": AsnTrainConfig(model_config={"width": 16}, epochs=8, iterations_per_epoch=100),
    "paper": AsnTrainConfig(
        model_config={"width": 32}, epochs=40, iterations_per_epoch=500, val_images=20
    ),
}


def split_records(
    records: Sequence[ImageRecord], *, val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Split records into train / validation by study, deterministically for a seed."""
    studies = sorted({r.study_instance_uid or r.sop_instance_uid for r in records})
    rng = np.random.default_rng(seed)
    rng.shuffle(studies)
    n_val = max(1, int(round(len(studies) * val_fraction))) if len(studies) > 1 else 0
    val_studies = set(studies[:n_val])
    train = [r for r in records if (r.study_instance_uid or r.sop_instance_uid) not in val_studies]
    val = [r for r in records if (r.study_instance_uid or r.sop_instance_uid) in val_studies]
    return train, val


def _seed_everything(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)


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
    """Proposal recall of a model on images (1-mm rule, received grid): R@k and timing."""
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
        "recall_at": {str(k): float(v) for k, v in result.recall_at.items()},
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

    Raises
    ------
    TrainingError
        Non-finite loss, no training data, or an unusable resume checkpoint.
    """
    config = config or ASN_PRESETS["cpu"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    records = read_manifest(manifest)
    if val_manifest is not None:
        train_recs, val_recs = records, read_manifest(val_manifest)
    else:
        train_recs, val_recs = split_records(records, seed=config.seed)
    if not train_recs:
        raise TrainingError(f"{manifest}: no training images")
    val_recs = val_recs[: config.val_images]
    logger.info("ASN training: %d train images, %d validation images, device %s",
                len(train_recs), len(val_recs), dev)
    _seed_everything(config.seed)
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
        ck = load_checkpoint(resume, kind=_kind(config))
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
                loss = loss_fn(y, x, pos | neg)
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
        metrics: dict[str, Any] = {"epoch": epoch + 1, "loss": float(np.mean(losses)),
                                   "train_seconds": train_seconds}
        if val_images:
            val = evaluate_proposals(
                model, val_images, kind=config.map_kind, residual_kind=config.residual,
                config=prop_cfg, device=dev,
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
            kind=_kind(config),
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


def _kind(config: AsnTrainConfig) -> str:
    return "unet_ce" if config.loss == "ce" else "asn"


def preset(name: str, **overrides: Any) -> AsnTrainConfig:
    """An ASN preset with overrides, e.g. ``preset("cpu", beta=0.3)``."""
    if name not in ASN_PRESETS:
        raise ValueError(f"unknown ASN preset {name!r}; known: {sorted(ASN_PRESETS)}")
    return replace(ASN_PRESETS[name], **overrides)
