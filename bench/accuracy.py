"""Detection accuracy of the whole cascade on held-out phantoms (trains nothing).

Methods, all on the same images and scored with the paper's 1-mm rule (a µC is
recalled when a detection lies within 1 mm of it, in the received image's grid:
x = column, y = row, 0-based, first pixel's centre at (0, 0)):

1. **ASN + FPR** — the cascade as :class:`cascade.inference.detector.Detector` runs it
   (bundled weights by default), final score = ASN score × FPR probability;
2. **U-Net (CE) + FPR** — the paper's baseline, when ``--ce`` and ``--ce-fpr`` are given;
   Each cascade also as the node reports it: candidates the FPR calls false positives
   (probability < ``--fpr-threshold``, default 0.5) removed, the rest ranked by the
   same product; and, where the weights folder stores an operating point
   (``calcnode train calibrate``), the recall, FP/image and findings/image there;
3. **ASN proposals** alone — the same candidates as (1), scored by the ASN score;
4. **DoG** — the classical difference-of-Gaussians detector on the preprocessed
   70-µm image, inside the breast mask (without its outer 2 mm).

The ASN residual map is computed once per image and serves (1) and (3); the cascade
is rebuilt from the detector's own models and settings with the public steps
(``residual_map`` → ``propose`` → ``extract_crops`` → ``score_crops``), and checked
against ``Detector.detect`` on the first image. R@k at k ∈ {0.5, 1, 2, 5, 10, 15, 20}
FP/image, recall at FP per cm² of breast, a per-vendor R@1 / R@5 of ASN + FPR, and
seconds per image of each stage (read, preprocess, ASN, FPR) per size group.

Usage::

    .venv/bin/python bench/accuracy.py [--asn ASN.pt --fpr FPR.pt] [--ce CE.pt --ce-fpr FPR.pt]
        --manifest HELDOUT.jsonl [--full-manifest FULL.jsonl]
        [--out bench/results/accuracy.json] [--no-readme]

Writes the JSON, FROC plots next to it (``<out stem>_froc.png``) and the
"Detection accuracy" section of ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
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
    percent,
    recall_cell,
    run_line,
    setup_logging,
    size_group,
    update_readme_section,
    write_froc_plots,
    write_json,
)

from cascade.data.manifest import ImageRecord
from cascade.data.preprocess import PreprocessedImage
from cascade.errors import CheckpointError
from cascade.evaluation.bins import CONTRAST_EDGES, SIZE_EDGES_MM, binned_recall, measure_contrast
from cascade.evaluation.clusters import cases_from_records, cluster_froc, cluster_point
from cascade.evaluation.froc import DEFAULT_KS, DEFAULT_KS_PER_CM2, ImageEval, froc
from cascade.evaluation.operating_point import OperatingPoint
from cascade.inference.detector import Detector
from cascade.inference.fpr import extract_crops, score_crops
from cascade.inference.proposals import candidates_xy, propose, residual_map
from cascade.inference.weights import BUNDLED_WEIGHTS, read_operating_point

logger = logging.getLogger("bench.accuracy")

KS: tuple[float, ...] = tuple(float(k) for k in DEFAULT_KS)  # 0.5, 1, 2, 5, 10, 15, 20
KS_PER_CM2: tuple[float, ...] = tuple(float(k) for k in DEFAULT_KS_PER_CM2)
TABLE_KS: tuple[float, ...] = (0.5, 1, 2, 5, 10, 15, 20)
TABLE_KS_PER_CM2: tuple[float, ...] = (0.02, 0.1)
VENDOR_KS: tuple[float, ...] = (1, 5)

ASN_FPR = "ASN + FPR"
CE_FPR = "U-Net (CE) + FPR"
ASN_ONLY = "ASN proposals alone"
DOG = "DoG"

INTRO = """\
The whole cascade on held-out phantoms, nothing trained by the bench: ASN + FPR (the
bundled detector unless other weights are given; final score = ASN score × FPR
probability), the U-Net (CE) + FPR baseline, the ASN's candidates alone (ASN score) and
a classical DoG detector. R@k = recall at k false positives per image, a µC counting as
found when a detection lies within 1 mm of it (the paper's rule); seconds per image are
end to end (read + preprocess + ASN + FPR). Rows "…, FPR ≥ 0.5" score each cascade as
the node reports it: candidates the FPR calls false positives removed, the rest ranked by
the same product (the curve then stops where the survivors run out); a cascade whose
weights folder stores an operating point (`calcnode train calibrate`) also gets its
recall, FP/image and findings/image there. **Synthetic phantoms only: these numbers
say nothing about clinical performance.** For context only, the paper's numbers on
INbreast (real mammograms; the paper's, not ours):

| INbreast, final models (the paper's numbers, not ours) | R@1 | R@5 | R@10 | R@15 | R@20 |
|---|---:|---:|---:|---:|---:|
| FPN Faster R-CNN | 39.72 | 71.47 | 72.48 | 72.48 | 72.48 |
| U-Net (CE) + FPR | 29.45 | 77.61 | 82.84 | 83.67 | 84.50 |
| ASN + FPR | 36.70 | 78.35 | 85.96 | 88.26 | 88.90 |

Run: `.venv/bin/python bench/accuracy.py --ce CE.pt --ce-fpr CE_FPR.pt --manifest
HELDOUT.jsonl --full-manifest FULL.jsonl` (bundled ASN + FPR weights by default; JSON:
`bench/results/accuracy.json`, plot: `bench/results/accuracy_froc.png`)."""


@dataclass
class Cascade:
    """A detector under test and the per-image evaluations it produced."""

    name: str
    detector: Detector
    info: dict[str, Any]
    evals: dict[str, list[ImageEval]] = field(default_factory=dict)
    operating_point: OperatingPoint | None = None


def gated_name(name: str, fpr_threshold: float) -> str:
    """The method name of a cascade whose FPR decision (probability ≥ t) is applied."""
    return f"{name}, FPR ≥ {fpr_threshold:g}"


def load_cascade(
    name: str, asn: Path | None, fpr: Path | None, *, device: str
) -> tuple[Detector, dict[str, Any]]:
    """A :class:`Detector` (bundled weights when ``asn`` is None) and its description."""
    if asn is None:
        try:
            det = Detector.bundled(device=device, calibrated=False)
        except CheckpointError as exc:
            raise SystemExit(f"{exc}: pass --asn and --fpr") from None
        asn_path = BUNDLED_WEIGHTS / "asn.pt"
        fpr_path: Path | None = asn_path.with_name("fpr.pt")
    else:
        det = Detector(asn, fpr, device=device)
        asn_path, fpr_path = asn, fpr
    if det.fpr is None or fpr_path is None:
        raise SystemExit(f"{name}: no FPR checkpoint (the bundled folder has no fpr.pt?)")
    info = {
        "asn": checkpoint_info(asn_path),
        "fpr": checkpoint_info(fpr_path),
        "bundled": asn is None,
        "model_version": det.model_version,
        "map_kind": det.map_kind,
        "residual": det.residual,
        "pixel_spacing_mm": det.spacing_mm,
        "proposal": {
            k: getattr(det.proposal, k)
            for k in ("threshold", "min_area_px", "split", "min_peak_distance_px", "max_candidates")
        },
        "fpr_input_size": det.fpr_input_size,
    }
    return det, info


def run_cascade(
    det: Detector, pre: PreprocessedImage, timer: Timer
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The detector's steps on one preprocessed image, each timed.

    Returns
    -------
    xy : numpy.ndarray
        ``(M, 2)`` candidate centres in the received grid (x = column, y = row).
    asn_scores, fpr_scores : numpy.ndarray
        ``(M,)`` each; the cascade's final score is their product.
    """
    device = det.device
    with timer("asn"):
        # The detector's own proposal network (ONNX Runtime or torch, as it runs).
        rmap = residual_map(
            det.asn_net,
            pre.image,
            kind=det.map_kind,
            residual=det.residual,
            mask=pre.breast_mask,
            device=device,
        )
        cands = propose(rmap, pre.transform, config=det.proposal)
    with timer("fpr"):
        if cands and det.fpr is not None:
            crops = extract_crops(pre.image, candidates_xy(cands, grid="work"))
            probs = score_crops(
                det.fpr_net or det.fpr,
                crops,
                input_size=det.fpr_input_size,
                batch_size=det.fpr_batch_size,
                device=device,
            )
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        else:
            probs = np.ones(len(cands))
    xy = candidates_xy(cands, grid="source")
    asn_scores = np.array([c.asn_score for c in cands], dtype=np.float64)
    return xy, asn_scores, np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)


def check_against_detector(
    det: Detector, record: ImageRecord, xy: np.ndarray, scores: np.ndarray
) -> dict[str, Any]:
    """Run ``Detector.detect`` on one image and compare with the re-built cascade."""
    t0 = time.perf_counter()
    found = det.detect(record.path)
    seconds = time.perf_counter() - t0
    ref_xy = np.array([[d.x, d.y] for d in found.detections], dtype=np.float64).reshape(-1, 2)
    ref_scores = np.array([d.score for d in found.detections], dtype=np.float64)
    ours = np.lexsort((xy[:, 1], xy[:, 0], -scores)) if len(scores) else np.zeros(0, int)
    theirs = np.lexsort((ref_xy[:, 1], ref_xy[:, 0], -ref_scores)) if len(ref_scores) else ours
    same_count = len(ref_scores) == len(scores)
    max_score_diff = (
        float(np.max(np.abs(np.sort(scores) - np.sort(ref_scores))))
        if same_count and len(scores)
        else 0.0
    )
    max_xy_diff = (
        float(np.max(np.abs(xy[ours] - ref_xy[theirs]))) if same_count and len(scores) else 0.0
    )
    ok = same_count and max_score_diff <= 1e-6 * max(1.0, float(np.max(scores, initial=0.0)))
    ok = ok and max_xy_diff <= 1e-6
    if not ok:
        logger.warning(
            "the re-built cascade differs from Detector.detect on %s: %d vs %d detections, "
            "max |Δscore| %.3g, max |Δxy| %.3g",
            record.sop_instance_uid,
            len(scores),
            len(ref_scores),
            max_score_diff,
            max_xy_diff,
        )
    return {
        "sop_instance_uid": record.sop_instance_uid,
        "matches_detector": bool(ok),
        "n_detections": len(scores),
        "n_detections_detector": len(ref_scores),
        "max_abs_score_diff": max_score_diff,
        "max_abs_xy_diff_px": max_xy_diff,
        "detect_seconds": seconds,
    }


def run(
    cascades: Sequence[Cascade],
    sets: Sequence[ImageSet],
    *,
    dog_border_mm: float,
    device_label: str,
    fpr_threshold: float,
) -> dict[str, Any]:
    """Evaluate every method on every set, timing each stage per image."""
    timing = TimingLog()
    at_point: dict[str, Any] = {}
    results: dict[str, Any] = {}
    per_vendor: dict[str, Any] = {}
    areas: dict[str, Any] = {}
    consistency: dict[str, Any] = {}
    curves: dict[str, dict[str, Any]] = {}
    cluster_out: dict[str, Any] = {}
    bins_out: dict[str, Any] = {}
    for iset in sets:
        contrasts: list[np.ndarray] = []
        evals: dict[str, list[ImageEval]] = {}
        for c in cascades:
            evals[c.name] = []
            if fpr_threshold > 0:
                evals[gated_name(c.name, fpr_threshold)] = []
        point_evals: dict[str, list[ImageEval]] = {
            c.name: [] for c in cascades if c.operating_point is not None
        }
        evals[ASN_ONLY] = []
        evals[DOG] = []
        vendors: list[str] = []
        set_areas: list[float] = []
        for i, rec in enumerate(iset.records):
            group = size_group(rec, iset.name)
            log_image(iset, i, rec, group)
            vendors.append(str(rec.tags.get("vendor", "unknown")))
            pres: dict[float, tuple[PreprocessedImage, dict[str, float]]] = {}
            for c in cascades:
                spacing = c.detector.spacing_mm
                if spacing not in pres:
                    io_timer = Timer()
                    pre_i = load_image(rec, spacing_mm=spacing, timer=io_timer)
                    pres[spacing] = (pre_i, io_timer.seconds)
                pre, io_seconds = pres[spacing]
                area = breast_area_cm2(pre)
                timer = Timer()
                xy, asn_scores, fpr_scores = run_cascade(c.detector, pre, timer)
                final = asn_scores * fpr_scores
                evals[c.name].append(image_eval(rec, xy, final, area_cm2=area))
                if fpr_threshold > 0:
                    keep = fpr_scores >= fpr_threshold
                    evals[gated_name(c.name, fpr_threshold)].append(
                        image_eval(rec, xy[keep], final[keep], area_cm2=area)
                    )
                op = c.operating_point
                if op is not None:
                    keep = op.select(final, fpr_scores)
                    point_evals[c.name].append(
                        image_eval(rec, xy[keep], final[keep], area_cm2=area)
                    )
                seconds = {**io_seconds, **timer.seconds}
                seconds["total"] = sum(seconds.values())
                timing.add(c.name, device_label, group, seconds)
                if c.name == ASN_FPR:
                    evals[ASN_ONLY].append(image_eval(rec, xy, asn_scores, area_cm2=area))
                    only = {k: seconds[k] for k in ("read", "preprocess", "asn")}
                    only["total"] = sum(only.values())
                    timing.add(ASN_ONLY, device_label, group, only)
                    set_areas.append(area)
                if c.name not in consistency:
                    consistency[c.name] = check_against_detector(c.detector, rec, xy, final)
            pre, io_seconds = next(iter(pres.values()))
            truth = np.array([[c.x, c.y] for c in rec.calcifications], float).reshape(-1, 2)
            contrasts.append(
                measure_contrast(
                    pre.image,
                    pre.breast_mask,
                    pre.transform.to_work(truth),
                    [c.diameter_mm for c in rec.calcifications],
                    spacing_mm=pre.transform.work_spacing_mm[0],
                )
            )
            dog_img, dog_s = dog_eval(rec, pre, border_mm=dog_border_mm)
            evals[DOG].append(dog_img)
            dog_seconds = {**io_seconds, "dog": dog_s}
            dog_seconds["total"] = sum(dog_seconds.values())
            timing.add(DOG, "cpu", group, dog_seconds)

        set_results: dict[str, Any] = {}
        set_curves: dict[str, Any] = {}
        for name, image_evals in evals.items():
            res = froc(image_evals, ks=KS, ks_per_cm2=KS_PER_CM2)
            set_results[name] = froc_json(res)
            set_curves[name] = res
        results[iset.name] = set_results
        curves[iset.name] = set_curves
        at_point[iset.name] = {}
        for name, image_evals in point_evals.items():
            res = froc(image_evals, ks=KS)
            last = len(res.thresholds) - 1
            at_point[iset.name][name] = {
                "recall": float(res.recall[last]) if last >= 0 else 0.0,
                "fp_per_image": float(res.fp_per_image[last]) if last >= 0 else 0.0,
                "findings_per_image": res.n_detections / max(res.n_images, 1),
                "n_images": res.n_images,
                "n_truth": res.n_truth,
            }
        cluster_out[iset.name], bins_out[iset.name] = {}, {}
        sizes = [
            np.array([np.nan if c.diameter_mm is None else c.diameter_mm for c in r.calcifications])
            for r in iset.records
        ]
        for name in (n for n in (ASN_FPR, CE_FPR) if n in evals):
            res = set_curves[name]
            curve = cluster_froc(cases_from_records(iset.records, evals[name]))
            thr = {f"R@{k:g}": res.threshold_at_fp(k) for k in VENDOR_KS}
            points = {p: curve.point(t).to_json() for p, t in thr.items()}
            columns: dict[str, Any] = {p: (evals[name], t) for p, t in thr.items()}
            if name in point_evals:
                kept = point_evals[name]
                points["operating point"] = cluster_point(
                    cases_from_records(iset.records, kept)
                ).to_json()
                columns["operating point"] = (kept, -np.inf)
            cluster_out[iset.name][name] = points
            bins_out[iset.name][name] = {
                "size": binned_recall(
                    sizes, columns, edges=SIZE_EDGES_MM, quantity="size", unit="mm"
                ).to_json(),
                "contrast": binned_recall(
                    contrasts,
                    columns,
                    edges=CONTRAST_EDGES,
                    quantity="contrast",
                    unit="measured local contrast",
                ).to_json(),
            }
        vendor_res: dict[str, Any] = {}
        for name in (n for n in (ASN_FPR, CE_FPR) if n in evals):
            vendor_res[name] = {}
            for vendor in sorted(set(vendors)):
                sub = [e for e, v in zip(evals[name], vendors, strict=True) if v == vendor]
                res = froc(sub, ks=VENDOR_KS, ks_per_cm2=KS_PER_CM2)
                vendor_res[name][vendor] = {
                    "n_images": res.n_images,
                    "n_truth": res.n_truth,
                    "recall_at": {repr(float(k)): float(v) for k, v in res.recall_at.items()},
                }
        per_vendor[iset.name] = vendor_res
        areas[iset.name] = {
            "mean": float(np.mean(set_areas)),
            "total": float(np.sum(set_areas)),
        }
    return {
        "results": results,
        "per_vendor": per_vendor,
        "breast_area_cm2": areas,
        "at_operating_point": at_point,
        "clusters": cluster_out,
        "recall_by_bin": bins_out,
        "consistency": consistency,
        "timing": timing.to_json(),
        "_curves": curves,
    }


def markdown(data: dict[str, Any]) -> str:
    """The README block: recall per set and method, per-vendor R@1 / R@5, seconds."""
    lines = [
        f"{run_line(data)} Device: {data['device']}. Weights: "
        + "; ".join(
            f"{name} `{c['model_version']}`" + (" (bundled)" if c["bundled"] else "")
            for name, c in data["cascades"].items()
        )
        + ".",
        "",
    ]
    timing = data["timing"]
    dev = data["device_label"]
    for set_name, set_res in data["results"].items():
        info = data["sets"][set_name]
        title = "Held-out set" if set_name == HELDOUT else "Full-field set"
        area = data["breast_area_cm2"][set_name]["mean"]
        lines.append(
            f"**{title}** — `{info['path']}`: {info['count']} images, {info['n_truth']} µCs, "
            f"mean breast area {area:.0f} cm². Recall in %, 1-mm rule; seconds per image end "
            "to end, mean."
        )
        lines.append("")
        header = ["Method"] + [f"R@{k:g}" for k in TABLE_KS]
        header += [f"R@{k:g}/cm²" for k in TABLE_KS_PER_CM2] + ["s/image small", "s/image full"]
        rows = []
        for name, res in set_res.items():
            cells = [name] + [recall_cell(res, k) for k in TABLE_KS]
            cells += [recall_cell(res, k, "recall_at_per_cm2") for k in TABLE_KS_PER_CM2]
            method_dev = "cpu" if name == DOG else dev
            cells += [mean_seconds(timing, name, method_dev, g, "total") for g in ("small", "full")]
            rows.append(cells)
        lines.append(markdown_table(header, rows, right=1))
        lines.append("")
        for name, pt in data.get("at_operating_point", {}).get(set_name, {}).items():
            op = data["cascades"][name]["operating_point"]
            lines.append(
                f"{name} at its stored operating point (FPR ≥ {op['fpr_threshold']:g}, score ≥ "
                f"{op['min_score']:.4g}, calibrated on "
                f"{op['calibration'].get('images', '?')} validation images for "
                f"{op['calibration'].get('target_fp_per_image', '?')} FP/image): recall "
                f"{percent(pt['recall'])} %, {pt['fp_per_image']:.2f} FP/image, "
                f"{pt['findings_per_image']:.1f} findings/image."
            )
            lines.append("")
        for name, points in data.get("clusters", {}).get(set_name, {}).items():
            lines.append(
                f"{name}, clusters (CAD SR grouping: ≥ 3 detections within 5 mm; found = a "
                "reported cluster holds ≥ 2 of the truth cluster's µCs):"
            )
            lines.append("")
            crow = []
            for pname, p in points.items():
                fn = p["false_marks_per_normal_image"]
                crow.append(
                    [
                        pname,
                        f"{percent(p['sensitivity'])} ({p['found']}/{p['n_truth_clusters']})",
                        f"{p['false_marks_per_image']:.3f}",
                        "–" if fn is None else f"{fn:.3f}",
                    ]
                )
            lines.append(
                markdown_table(
                    ["Point", "Cluster sensitivity %", "False marks / image", "… / normal image"],
                    crow,
                    right=1,
                )
            )
            lines.append("")
            for quantity, table in data["recall_by_bin"][set_name][name].items():
                names = list(table["recall"])
                brow = [
                    [label, str(n)] + [percent(table["recall"][c][i]) for c in names]
                    for i, (label, n) in enumerate(zip(table["bins"], table["counts"], strict=True))
                ]
                lines.append(f"{name}, µC recall % per {quantity} bin ({table['unit']}):")
                lines.append("")
                lines.append(markdown_table([quantity, "µCs", *names], brow, right=1))
                lines.append("")
        by_cascade = data["per_vendor"][set_name]
        names = list(by_cascade)
        lines.append(f"Per vendor ({title.lower()}), R@1 / R@5 in %:")
        lines.append("")
        vrows = []
        for vendor, first in by_cascade[names[0]].items():
            cells = [vendor, str(first["n_images"]), str(first["n_truth"])]
            for name in names:
                v = by_cascade[name][vendor]["recall_at"]
                cells.append(f"{percent(v.get('1.0'))} / {percent(v.get('5.0'))}")
            vrows.append(cells)
        lines.append(markdown_table(["Vendor", "Images", "µCs", *names], vrows, right=1))
        lines.append("")
    stage_rows = []
    for name in data["cascades"]:
        for group in ("small", "full"):
            cells = [name, group]
            for stage in ("read", "preprocess", "asn", "fpr", "total"):
                cells.append(mean_seconds(timing, name, dev, group, stage))
            if cells[2:] != ["–"] * 5:
                stage_rows.append(cells)
    lines.append(f"Seconds per image by stage (mean, {dev}):")
    lines.append("")
    lines.append(
        markdown_table(
            ["Detector", "Size", "read", "preprocess", "ASN", "FPR", "total"], stage_rows, right=2
        )
    )
    lines.append("")
    checks = ", ".join(
        f"{name}: {'same' if c['matches_detector'] else 'DIFFERENT'}"
        for name, c in data["consistency"].items()
    )
    lines.append(f"Re-built cascade vs `Detector.detect` on the first image — {checks}.")
    lines.append("")
    lines.append(f"Command: `{data['command']}`.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--asn", type=Path, help="ASN checkpoint (default: bundled weights)")
    ap.add_argument("--fpr", type=Path, help="FPR checkpoint for --asn (default: bundled)")
    ap.add_argument("--ce", type=Path, help="cross-entropy U-Net checkpoint (the baseline)")
    ap.add_argument("--ce-fpr", type=Path, help="FPR checkpoint trained on the CE U-Net")
    ap.add_argument("--manifest", type=Path, required=True, help="held-out manifest (.jsonl)")
    ap.add_argument("--full-manifest", type=Path, help="full-field images (.jsonl)")
    ap.add_argument("--limit", type=int, help="use only the first N images of each manifest")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    ap.add_argument(
        "--dog-border-mm",
        type=float,
        default=DOG_BORDER_MM,
        help=f"DoG: drop peaks this close to the skin line (default {DOG_BORDER_MM})",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=RESULTS / "accuracy.json",
        help="JSON result file (default bench/results/accuracy.json)",
    )
    ap.add_argument(
        "--fpr-threshold",
        type=float,
        default=0.5,
        help="also score each cascade without candidates the FPR rejects (default 0.5; 0: off)",
    )
    ap.add_argument("--no-readme", action="store_true", help="do not update bench/README.md")
    args = ap.parse_args(argv)
    if (args.asn is None) != (args.fpr is None):
        ap.error("--asn and --fpr go together (neither: the bundled weights)")
    if (args.ce is None) != (args.ce_fpr is None):
        ap.error("--ce and --ce-fpr go together")
    setup_logging()

    machine = machine_info()
    cascades = []
    for name, asn, fpr in ((ASN_FPR, args.asn, args.fpr), (CE_FPR, args.ce, args.ce_fpr)):
        if name == CE_FPR and asn is None:
            continue
        det, info = load_cascade(name, asn, fpr, device=args.device)
        op = read_operating_point(BUNDLED_WEIGHTS if asn is None else asn.parent)
        info["operating_point"] = None if op is None else op.to_json()
        cascades.append(Cascade(name, det, info, operating_point=op))
    device_label = cascades[0].detector.device.type
    sets = load_sets(args.manifest, args.full_manifest, limit=args.limit)

    out = run(
        cascades,
        sets,
        dog_border_mm=args.dog_border_mm,
        device_label=device_label,
        fpr_threshold=args.fpr_threshold,
    )
    curves = out.pop("_curves")
    machine["load_average_end"] = list(os.getloadavg())
    data: dict[str, Any] = {
        "bench": "accuracy",
        "schema": 1,
        "created": now_iso(),
        "command": " ".join(["bench/accuracy.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine,
        "device": str(cascades[0].detector.device),
        "device_label": device_label,
        "sets": {s.name: s.to_json() for s in sets},
        "radius_mm": 1.0,
        "ks": list(KS),
        "ks_per_cm2": list(KS_PER_CM2),
        "dog_border_mm": args.dog_border_mm,
        "fpr_threshold": args.fpr_threshold,
        "cascades": {c.name: c.info for c in cascades},
        **out,
    }
    data["plots"] = write_froc_plots(
        curves,
        args.out,
        titles={HELDOUT: "Detection accuracy, held-out", FULL: "Full-field set"},
        max_fp=20,
    )
    write_json(args.out, data)
    print(markdown(data))
    if not args.no_readme:
        update_readme_section("accuracy", markdown(data), heading="Detection accuracy", intro=INTRO)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
