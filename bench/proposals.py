"""ASN proposals: recall of the candidates alone, per model and per split rule.

For every model (the ASN trained with the t-test loss, the cross-entropy U-Net
baseline, any ablation given with ``--extra``) and every image of a held-out
manifest, the residual map (the µC probability for the CE U-Net) is computed once;
both candidate rules then run on it:

* ``component`` — one candidate per connected component, at its centre (the paper);
* ``maxima`` — components split at their residual maxima (a watershed).

Candidates are scored by their ASN score (summed residual); everything else comes
from the checkpoint's stored proposal settings (``training.proposal``) and the
defaults of :class:`cascade.inference.proposals.ProposalConfig`. Recall follows the paper's
rule — a µC is recalled when a candidate lies within 1 mm of it, measured in the
received image's grid (x = column, y = row, 0-based, first pixel's centre at
(0, 0)) — at 5, 10, 15, 20 and 30 FP/image (the paper's proposals table) and at
FP per cm² of breast. A difference-of-Gaussians detector on the same preprocessed
70-µm image, inside the breast mask (without its outer 2 mm, ``--dog-border-mm``), is
the reference line.

Times: ASN seconds per image (residual map + proposals, without reading and
preprocessing, which are timed apart) per size group (small / full-field) on the
evaluation device, and on the other device too when a GPU is present.

Usage::

    .venv/bin/python bench/proposals.py --asn ASN.pt [--ce CE.pt] [--extra NAME=CKPT ...]
        --manifest HELDOUT.jsonl [--full-manifest FULL.jsonl]
        [--out bench/results/proposals.json] [--no-readme]

Writes the JSON, a FROC plot next to it (``<out stem>_froc.png``) and the
"ASN proposals" section of ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import (
    DOG_BORDER_MM,
    FULL,
    HELDOUT,
    RESULTS,
    ImageSet,
    Timer,
    TimingLog,
    breast_area_cm2,
    checkpoint_info,
    dog_eval,
    froc_json,
    image_eval,
    load_image,
    load_sets,
    log_image,
    machine_info,
    markdown_table,
    mean_seconds,
    now_iso,
    recall_cell,
    run_line,
    setup_logging,
    size_group,
    update_readme_section,
    write_froc_plots,
    write_json,
)

from cascade.data.preprocess import PreprocessedImage
from cascade.evaluation.froc import ImageEval, froc
from cascade.inference.proposals import ProposalConfig, candidates_xy, propose, residual_map
from cascade.models.checkpoint import load_checkpoint

logger = logging.getLogger("bench.proposals")

#: The paper's proposals columns (FP/image).
KS: tuple[float, ...] = (5, 10, 15, 20, 30)
#: FP per cm² of breast (a small phantom holds ≈ 40–60 cm², a full-field one ≈ 150–250).
KS_PER_CM2: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1.0)
RULES: tuple[str, ...] = ("component", "maxima")
RULE_LABEL = {"component": "component (paper)", "maxima": "split at maxima"}
DOG = "DoG (reference)"

INTRO = """\
Recall of the ASN's candidates alone (no FPR), as in the paper's proposals table:
R@k = recall at k false positives per image, a µC counting as found when a candidate
lies within 1 mm of it. Each model's residual map is computed once per image and both
candidate rules run on it: one candidate per connected component (the paper) and
components split at their residual maxima (neighbouring µCs of a cluster fuse into one
component whose centre can lie > 1 mm from all of them). Candidates are scored by the
ASN score (summed residual); the other proposal settings are each checkpoint's own.
The DoG detector on the same 70-µm image (peaks ≥ 2 mm inside the skin line, as in
"Phantom realism") is the classical reference. **Synthetic phantoms only**: the paper's
INbreast numbers below are quoted for context, they are not ours and not comparable:

| INbreast, proposals (the paper's numbers, not ours) | R@5 | R@10 | R@15 | R@20 | R@30 |
|---|---:|---:|---:|---:|---:|
| U-Net (CE) | 43.39 | 58.35 | 72.20 | 82.02 | 85.32 |
| ASN | 44.13 | 65.14 | 78.72 | 84.95 | 88.35 |

Run: `.venv/bin/python bench/proposals.py --asn ASN.pt --ce CE.pt --manifest
HELDOUT.jsonl --full-manifest FULL.jsonl` (JSON: `bench/results/proposals.json`,
plot: `bench/results/proposals_froc.png`)."""


@dataclass
class BenchModel:
    """One checkpoint under test, on the evaluation device and (for timing) the other."""

    name: str
    path: Path
    info: dict[str, Any]
    model: torch.nn.Module
    map_kind: str
    residual: str
    spacing_mm: float
    proposal: ProposalConfig
    other: torch.nn.Module | None = None

    def config(self, rule: str) -> ProposalConfig:
        return dataclasses.replace(self.proposal, split=rule)


def load_model(
    name: str, path: Path, *, device: torch.device, other: torch.device | None
) -> BenchModel:
    """Load an ASN / CE U-Net checkpoint with its stored preprocessing and proposal settings."""
    ck = load_checkpoint(path, map_location="cpu")
    if ck.kind not in ("asn", "unet_ce"):
        raise SystemExit(f"{path}: not an ASN or CE U-Net checkpoint (kind {ck.kind!r})")
    pre = ck.meta.get("preprocessing", {}) or {}
    stored = dict((ck.meta.get("training", {}) or {}).get("proposal", {}) or {})
    stored.pop("split", None)
    model = ck.model.eval()
    other_model = copy.deepcopy(model).to(other).eval() if other is not None else None
    return BenchModel(
        name=name,
        path=path,
        info=checkpoint_info(path),
        model=model.to(device),
        map_kind=str(pre.get("map_kind", "residual")),
        residual=str(pre.get("residual", "l1")),
        spacing_mm=float(pre.get("pixel_spacing_mm", 0.07)),
        proposal=ProposalConfig(**stored),
        other=other_model,
    )


def _time_other(
    m: BenchModel, pre: PreprocessedImage, device: torch.device, *, warm: bool
) -> dict[str, float]:
    """Residual map + both rules of one image on the other device (timing only)."""
    if m.other is None:
        return {}

    def run() -> dict[str, float]:
        timer = Timer()
        with timer("residual_map"):
            rmap = residual_map(
                m.other,
                pre.image,
                kind=m.map_kind,
                residual=m.residual,
                mask=pre.breast_mask,
                device=device,
            )
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        for rule in RULES:
            with timer(f"propose_{rule}"):
                propose(rmap, pre.transform, config=m.config(rule))
        return _totals(timer.seconds)

    if not warm:
        run()  # CUDA context, kernels and allocator warm-up: not timed
    return run()


def _totals(seconds: dict[str, float]) -> dict[str, float]:
    out = dict(seconds)
    for rule in RULES:
        out[f"total_{rule}"] = seconds["residual_map"] + seconds[f"propose_{rule}"]
    return out


def run(
    models: Sequence[BenchModel],
    sets: Sequence[ImageSet],
    *,
    device: torch.device,
    other: torch.device | None,
    other_images: int,
    dog_border_mm: float,
) -> dict[str, Any]:
    """Evaluate every model × rule (and DoG) on every set; time each stage."""
    timing = TimingLog()
    results: dict[str, Any] = {}
    curves: dict[str, dict[str, Any]] = {}
    other_count: dict[tuple[str, str], int] = {}
    for iset in sets:
        evals: dict[str, list[ImageEval]] = {f"{m.name}|{r}": [] for m in models for r in RULES}
        dog: list[ImageEval] = []
        for i, rec in enumerate(iset.records):
            group = size_group(rec, iset.name)
            log_image(iset, i, rec, group)
            pres: dict[float, PreprocessedImage] = {}
            for m in models:
                if m.spacing_mm not in pres:
                    io_timer = Timer()
                    pres[m.spacing_mm] = load_image(rec, spacing_mm=m.spacing_mm, timer=io_timer)
                    timing.add("read+preprocess", "cpu", group, io_timer.seconds)
                pre = pres[m.spacing_mm]
                area = breast_area_cm2(pre)
                timer = Timer()
                with timer("residual_map"):
                    rmap = residual_map(
                        m.model,
                        pre.image,
                        kind=m.map_kind,
                        residual=m.residual,
                        mask=pre.breast_mask,
                        device=device,
                    )
                for rule in RULES:
                    with timer(f"propose_{rule}"):
                        cands = propose(rmap, pre.transform, config=m.config(rule))
                    evals[f"{m.name}|{rule}"].append(
                        image_eval(
                            rec,
                            candidates_xy(cands, grid="source"),
                            np.array([c.asn_score for c in cands], dtype=np.float64),
                            area_cm2=area,
                        )
                    )
                timing.add(m.name, device.type, group, _totals(timer.seconds))
                key = (m.name, group)
                if other is not None and other_count.get(key, 0) < other_images:
                    warm = other_count.get(key, 0) > 0
                    timing.add(m.name, other.type, group, _time_other(m, pre, other, warm=warm))
                    other_count[key] = other_count.get(key, 0) + 1
            first = next(iter(pres.values()))
            dog_img, dog_s = dog_eval(rec, first, border_mm=dog_border_mm)
            dog.append(dog_img)
            timing.add(DOG, "cpu", group, {"dog": dog_s})

        set_results: dict[str, Any] = {}
        set_curves: dict[str, Any] = {}
        for m in models:
            per_rule = {}
            for rule in RULES:
                res = froc(evals[f"{m.name}|{rule}"], ks=KS, ks_per_cm2=KS_PER_CM2)
                per_rule[rule] = froc_json(res)
                set_curves[f"{m.name}, {RULE_LABEL[rule]}"] = res
            set_results[m.name] = per_rule
        dog_res = froc(dog, ks=KS, ks_per_cm2=KS_PER_CM2)
        set_results[DOG] = {"local_maxima": froc_json(dog_res)}
        set_curves[DOG] = dog_res
        results[iset.name] = set_results
        curves[iset.name] = set_curves
    return {"results": results, "timing": timing.to_json(), "_curves": curves}


def markdown(data: dict[str, Any]) -> str:
    """The README block: recall tables per set, then seconds per image."""
    lines = [
        f"{run_line(data)} Evaluation device: {data['device']}.",
        "",
    ]
    for set_name, set_res in data["results"].items():
        info = data["sets"][set_name]
        title = "Held-out set" if set_name == HELDOUT else "Full-field set"
        lines.append(
            f"**{title}** — `{info['path']}`: {info['count']} images, {info['n_truth']} µCs. "
            "Recall in %, 1-mm rule."
        )
        lines.append("")
        header = ["Model", "Candidates"] + [f"R@{k:g}" for k in KS]
        header += [f"R@{k:g}/cm²" for k in (0.1, 0.5)] + ["cand./image"]
        rows = []
        for name, per_rule in set_res.items():
            for rule, res in per_rule.items():
                label = RULE_LABEL.get(rule, "DoG local maxima")
                cells = [name, label] + [recall_cell(res, k) for k in KS]
                cells += [recall_cell(res, k, "recall_at_per_cm2") for k in (0.1, 0.5)]
                cells.append(f"{res['detections_per_image']:.0f}")
                rows.append(cells)
        lines.append(markdown_table(header, rows, right=2))
        lines.append("")
    timing = data["timing"]
    devices = ["cpu"] + (["cuda"] if any("cuda" in v for v in timing.values()) else [])
    header = ["Model"]
    for dev in devices:
        dev_label = "CPU" if dev == "cpu" else "GPU"
        header += [f"{dev_label} small", f"{dev_label} full-field"]
    rows = []
    for name in data["models"]:
        cells = [name]
        for dev in devices:
            for group in ("small", "full"):
                comp = mean_seconds(timing, name, dev, group, "total_component")
                maxi = mean_seconds(timing, name, dev, group, "total_maxima")
                cells.append(comp if comp == "–" else f"{comp} / {maxi}")
        rows.append(cells)
    io_cells = ["read + preprocess"]
    for dev in devices:
        for group in ("small", "full"):
            if dev == "cpu":
                r = mean_seconds(timing, "read+preprocess", "cpu", group, "read")
                p = mean_seconds(timing, "read+preprocess", "cpu", group, "preprocess")
                io_cells.append("–" if r == "–" else f"{r} + {p}")
            else:
                io_cells.append("–")
    rows.append(io_cells)
    lines.append(
        "Seconds per image, residual map + proposals (component / maxima rule), mean; "
        "reading and preprocessing (CPU) apart:"
    )
    lines.append("")
    lines.append(markdown_table(header, rows, right=1))
    lines.append("")
    lines.append(f"Command: `{data['command']}`.")
    return "\n".join(lines)


def _parse_extra(values: Sequence[str]) -> list[tuple[str, Path]]:
    out = []
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise SystemExit(f"--extra expects NAME=CHECKPOINT, got {v!r}")
        out.append((name.strip(), Path(path.strip())))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--asn", type=Path, required=True, help="ASN checkpoint (t-test loss)")
    ap.add_argument("--ce", type=Path, help="cross-entropy U-Net checkpoint (the baseline)")
    ap.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="NAME=CKPT",
        help="another model to compare (an ablation: MSE, another β…); repeatable",
    )
    ap.add_argument("--manifest", type=Path, required=True, help="held-out manifest (.jsonl)")
    ap.add_argument("--full-manifest", type=Path, help="full-field images (.jsonl)")
    ap.add_argument("--limit", type=int, help="use only the first N images of each manifest")
    ap.add_argument(
        "--device",
        default="cpu",
        help="evaluation device: cpu (default), cuda, cuda:N or auto",
    )
    ap.add_argument(
        "--other-device-images",
        type=int,
        default=3,
        help="with a GPU present, also time the other device on this many images per size "
        "group and model (default 3)",
    )
    ap.add_argument(
        "--dog-border-mm",
        type=float,
        default=DOG_BORDER_MM,
        help=f"DoG reference: drop peaks this close to the skin line (default {DOG_BORDER_MM})",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=RESULTS / "proposals.json",
        help="JSON result file (default bench/results/proposals.json)",
    )
    ap.add_argument("--no-readme", action="store_true", help="do not update bench/README.md")
    args = ap.parse_args(argv)
    setup_logging()

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    other: torch.device | None = None
    if torch.cuda.is_available() and args.other_device_images > 0:
        other = torch.device("cpu") if device.type == "cuda" else torch.device("cuda")

    specs: list[tuple[str, Path]] = [("ASN (t-test)", args.asn)]
    if args.ce is not None:
        specs.append(("U-Net (CE)", args.ce))
    specs += _parse_extra(args.extra)
    names = [n for n, _ in specs]
    if len(set(names)) != len(names) or DOG in names:
        raise SystemExit(f"model names must be distinct and not {DOG!r}: {names}")
    machine = machine_info()
    models = [load_model(n, p, device=device, other=other) for n, p in specs]
    if models[0].info["loss"] not in (None, "ttest"):
        models[0].name = f"ASN ({models[0].info['loss']})"
    sets = load_sets(args.manifest, args.full_manifest, limit=args.limit)

    out = run(
        models,
        sets,
        device=device,
        other=other,
        other_images=args.other_device_images,
        dog_border_mm=args.dog_border_mm,
    )
    curves = out.pop("_curves")
    data: dict[str, Any] = {
        "bench": "proposals",
        "schema": 1,
        "created": now_iso(),
        "command": " ".join(["bench/proposals.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine,
        "device": str(device),
        "sets": {s.name: s.to_json() for s in sets},
        "radius_mm": 1.0,
        "ks": list(KS),
        "ks_per_cm2": list(KS_PER_CM2),
        "rules": list(RULES),
        "dog_border_mm": args.dog_border_mm,
        "models": {
            m.name: {
                "checkpoint": m.info,
                "map_kind": m.map_kind,
                "residual": m.residual,
                "pixel_spacing_mm": m.spacing_mm,
                "proposal": {
                    k: v for k, v in dataclasses.asdict(m.proposal).items() if k != "split"
                },
            }
            for m in models
        },
        **out,
    }
    data["machine"]["load_average_end"] = list(os.getloadavg())
    data["plots"] = write_froc_plots(
        curves,
        args.out,
        titles={HELDOUT: "ASN proposals, held-out", FULL: "ASN proposals, full-field"},
        max_fp=30,
    )
    write_json(args.out, data)
    print(markdown(data))
    if not args.no_readme:
        update_readme_section("proposals", markdown(data), heading="ASN proposals", intro=INTRO)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
