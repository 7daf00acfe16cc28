"""ASN loss ablation: what each training loss makes the network do to the image.

The paper ablates its t-test loss against plain reconstruction (MSE), which it says
"collapses into a blur": a network trained only to reproduce its input learns a
low-pass copy, so its residual lights up every edge and speck of texture, not just
the µCs. This bench measures that on held-out phantoms, for any number of ASN
checkpoints (``--model NAME=CKPT``; cross-entropy U-Nets are skipped: they output
probabilities, not a reconstruction).

Per model, over the breast of every image (70-µm working grid):

* ``sharpness`` — std of the Laplacian of the reconstruction f(I) over that of I
  (1: as sharp as the input; ≪ 1: a blur);
* ``r_n`` — mean residual |f(I) − I| on normal tissue (pixels > 1 mm from any µC and
  outside the "other" findings' margins);
* ``r_p`` — mean residual on the µC cores (a disk of radius 2 px at each centre);
* ``contrast`` — ``(r_p − r_n) / std(r_n)``: how far µCs stand out of the residual of
  normal tissue, the quantity the t-test loss maximises;
* ``r_p_over_r_n`` — the ratio of the two means.

Writes ``bench/results/asn_ablation.json``, a picture of one region per model
(``asn_ablation.png``: I, f(I) and |f(I) − I| side by side) and the "ASN loss
ablation" section of ``bench/README.md``. Synthetic phantoms only.

Usage::

    .venv/bin/python bench/asn_ablation.py --model "t-test β 0.8=runs/asn/best.pt"
        --model "MSE=runs/asn-mse/best.pt" --manifest data/test/manifest.jsonl --limit 8
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import (
    RESULTS,
    checkpoint_info,
    machine_info,
    markdown_table,
    now_iso,
    setup_logging,
    update_readme_section,
    write_json,
)
from scipy import ndimage
from skimage.draw import disk

from cascade.data.datasets import load_training_image
from cascade.data.manifest import read_manifest
from cascade.models.checkpoint import load_checkpoint

logger = logging.getLogger("bench.asn_ablation")

#: Radius (px at 70 µm) of the µC core over which r_p is measured.
CORE_RADIUS_PX = 2.0


@torch.no_grad()
def reconstruct(model: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """f(I) of a whole working-grid image (padded to a multiple of 8, then cropped)."""
    h, w = image.shape
    ph, pw = (-h) % 8, (-w) % 8
    x = np.pad(image, ((0, ph), (0, pw)), mode="reflect")
    out = model(torch.from_numpy(np.ascontiguousarray(x, np.float32))[None, None])
    return out[0, 0, :h, :w].numpy()


def image_stats(model: torch.nn.Module, image: np.ndarray, masks: dict[str, np.ndarray]) -> dict:
    """Sharpness and residual statistics of one image (see the module docstring)."""
    f = reconstruct(model, image)
    r = np.abs(f - image)
    breast, normal, core = masks["breast"], masks["normal"], masks["core"]
    lap_i = ndimage.laplace(image.astype(np.float64))[breast]
    lap_f = ndimage.laplace(f.astype(np.float64))[breast]
    return {
        "sharpness": float(lap_f.std() / max(lap_i.std(), 1e-12)),
        "r_n": float(r[normal].mean()),
        "r_n_std": float(r[normal].std()),
        "r_p": float(r[core].mean()) if core.any() else None,  # an image without µCs
        "f": f,
        "r": r,
    }


def masks_for(ti: Any) -> dict[str, np.ndarray]:
    """Breast, normal-tissue and µC-core masks of a :class:`TrainingImage`."""
    core = np.zeros(ti.image.shape, bool)
    for cx, cy in ti.centres:
        rr, cc = disk((cy, cx), CORE_RADIUS_PX, shape=core.shape)
        core[rr, cc] = True
    normal = ti.breast_mask & ~ti.positive & ~ti.ignore
    return {"breast": ti.breast_mask, "normal": normal, "core": core & ti.breast_mask}


def run(
    models: Sequence[tuple[str, Path]], manifest: Path, *, limit: int, picture: Path
) -> dict[str, Any]:
    records = read_manifest(manifest)[:limit]
    if not records:
        raise SystemExit(f"{manifest}: the manifest holds no images")
    images = [load_training_image(r) for r in records]
    loaded = []
    for name, path in models:
        ck = load_checkpoint(path, map_location="cpu")
        if (ck.meta.get("preprocessing", {}) or {}).get("map_kind") == "segmentation":
            logger.warning("%s: a segmentation U-Net has no reconstruction; skipped", name)
            continue
        loaded.append((name, path, ck.model.eval()))
    results: dict[str, Any] = {}
    pictures: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, path, model in loaded:
        per_image = []
        for i, ti in enumerate(images):
            s = image_stats(model, ti.image, masks_for(ti))
            if i == 0:
                pictures[name] = (s["f"], s["r"])
            per_image.append({k: v for k, v in s.items() if k not in ("f", "r")})
        r_p = float(np.mean([p["r_p"] for p in per_image if p["r_p"] is not None]))
        r_n = float(np.mean([p["r_n"] for p in per_image]))
        r_n_std = float(np.mean([p["r_n_std"] for p in per_image]))
        results[name] = {
            "checkpoint": checkpoint_info(path),
            "sharpness": float(np.mean([p["sharpness"] for p in per_image])),
            "r_p": float(r_p),
            "r_n": r_n,
            "r_n_std": r_n_std,
            "contrast": float((r_p - r_n) / max(r_n_std, 1e-12)),
            "r_p_over_r_n": float(r_p / max(r_n, 1e-12)),
            "per_image": per_image,
        }
        logger.info("%s: %s", name, {k: v for k, v in results[name].items() if k != "per_image"})
    if pictures:
        _picture(images[0], pictures, picture)
    return {
        "created": now_iso(),
        "machine": machine_info(),
        "manifest": str(manifest),
        "images": len(images),
        "n_truth": int(sum(len(ti.centres) for ti in images)),
        "core_radius_px": CORE_RADIUS_PX,
        "picture": picture.name,
        "models": results,
        "note": "synthetic phantoms only",
    }


def _picture(ti: Any, pictures: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    """I, f(I) and |f(I) − I| on a 160-px region around the first µC, one row per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(ti.centres):
        cx, cy = (round(float(v)) for v in ti.centres[0])
    else:
        cy, cx = (s // 2 for s in ti.image.shape)
    h, w = ti.image.shape
    half = 80
    r0, c0 = max(0, min(cy - half, h - 2 * half)), max(0, min(cx - half, w - 2 * half))
    sl = (slice(r0, r0 + 2 * half), slice(c0, c0 + 2 * half))
    fig, axes = plt.subplots(len(pictures), 3, figsize=(9, 3 * len(pictures)), squeeze=False)
    lo, hi = np.percentile(ti.image[sl], [1, 99.5])
    for row, (name, (f, r)) in zip(axes, pictures.items(), strict=True):
        row[0].imshow(ti.image[sl], cmap="gray", vmin=lo, vmax=hi)
        row[1].imshow(f[sl], cmap="gray", vmin=lo, vmax=hi)
        row[2].imshow(r[sl], cmap="magma", vmin=0, vmax=max(float(r[sl].max()), 1e-6))
        row[0].set_ylabel(name)
        for ax, title in zip(row, ("I", "f(I)", "|f(I) − I|"), strict=True):
            ax.set_title(title)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("ASN loss ablation on a held-out phantom (synthetic; not for clinical use)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown(data: dict[str, Any]) -> str:
    rows = []
    for name, m in data["models"].items():
        ck = m["checkpoint"]
        rows.append(
            [
                name,
                str(ck.get("loss")),
                f"{ck['beta']:g}" if str(ck.get("loss", "")).startswith("ttest") else "–",
                f"{m['sharpness']:.2f}",
                f"{m['r_n']:.4f}",
                f"{m['r_p']:.4f}",
                f"{m['r_p_over_r_n']:.1f}",
                f"{m['contrast']:.1f}",
            ]
        )
    table = markdown_table(
        ["Model", "loss", "β", "sharpness", "r_n", "r_p", "r_p / r_n", "contrast"],
        rows,
        right=3,
    )
    return (
        f"{data['images']} held-out images ({data['manifest']}), {data['n_truth']} µCs; "
        f"{data['created']}. Picture: `results/{data['picture']}`.\n\n{table}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME=CKPT",
        help="an ASN checkpoint to measure (repeatable)",
    )
    ap.add_argument("--manifest", type=Path, required=True, help="held-out manifest (.jsonl)")
    ap.add_argument("--limit", type=int, default=8, help="first N images (default 8)")
    ap.add_argument("--out", type=Path, default=RESULTS / "asn_ablation.json")
    ap.add_argument("--no-readme", action="store_true", help="do not update bench/README.md")
    args = ap.parse_args(argv)
    setup_logging()
    models = []
    for value in args.model:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            ap.error(f"--model must be NAME=CKPT, got {value!r}")
        if not Path(path).is_file():
            ap.error(f"--model {name}: no checkpoint at {path}")
        models.append((name, Path(path)))
    data = run(models, args.manifest, limit=args.limit, picture=args.out.with_suffix(".png"))
    write_json(args.out, data)
    text = markdown(data)
    print(text)
    if not args.no_readme:
        update_readme_section(
            "asn-ablation",
            text,
            heading="ASN loss ablation",
            intro=(
                "What each training loss makes the U-Net do to a held-out image "
                "(`bench/asn_ablation.py`): sharpness = std of the Laplacian of f(I) over "
                "that of I inside the breast (≪ 1: a blur); r_n / r_p = mean residual "
                "|f(I) − I| on normal tissue / on µC cores (radius 2 px); contrast = "
                "(r_p − r_n) / std(r_n)."
            ),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
