"""Where the bundled detector's circles land: µCs, vascular calcifications, elsewhere.

The issue's test of the false-positive reduction is that ``calcnode detect`` finds µCs
and leaves vascular calcifications alone. This bench renders nothing and trains nothing:
on the phantoms of the given manifests (fresh seeds no model saw) it runs the bundled
detector once per image, keeping every scored candidate, and classifies

* what the node reports (the weights' operating point, :meth:`OperatingPoint.select`), and
* every candidate (what the paper's product alone would rank),

as **µC** (within 1 mm of a ground-truth µC, the paper's rule), **vessel** (otherwise
within 1 mm of an annotated vascular calcification's polyline), **macro** (within 1 mm
of another annotated calcification) or **other**. Coordinates: the received image's grid
(x = column, y = row, 0-based, first pixel's centre at (0, 0)); distances in mm with the
image's pixel spacing.

Usage::

    .venv/bin/python bench/vessels.py --manifest FRESH.jsonl [--manifest MORE.jsonl]
        [--out bench/results/vessels.json] [--no-readme]

Writes the JSON and the "Vascular calcifications" section of ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    RESULTS,
    machine_info,
    markdown_table,
    now_iso,
    run_line,
    setup_logging,
    truth_xy,
    update_readme_section,
    write_json,
)

from cascade.data.manifest import ImageRecord, read_manifest
from cascade.evaluation.froc import DET_NEAR_TRUTH, ImageEval, match_image
from cascade.evaluation.operating_point import OperatingPoint
from cascade.inference.detector import Detector
from cascade.inference.weights import ModelWeights

logger = logging.getLogger("bench.vessels")

RADIUS_MM = 1.0
CLASSES = ("µC", "vessel", "macro", "other")
INTRO = """\
Where the bundled detector's circles land on fresh phantoms: on µCs (within 1 mm of one),
on vascular calcifications (within 1 mm of an annotated vessel), on other annotated
calcifications, or elsewhere; at the operating point the node reports, and over every
scored candidate for comparison. `.venv/bin/python bench/vessels.py --manifest
FRESH.jsonl` (JSON: `bench/results/vessels.json`)."""


def distance_to_polyline_mm(
    xy: np.ndarray, points: np.ndarray, spacing_mm: tuple[float, float]
) -> np.ndarray:
    """Distance in mm from each point ``(N, 2)`` to a polyline ``(K, 2)`` (x, y)."""
    scale = np.array([spacing_mm[1], spacing_mm[0]])  # x is a column, y a row
    p = np.asarray(xy, dtype=np.float64).reshape(-1, 2) * scale
    q = np.asarray(points, dtype=np.float64).reshape(-1, 2) * scale
    if len(q) == 1:
        return np.hypot(*(p - q[0]).T)
    a, b = q[:-1], q[1:]
    ab = b - a
    length2 = np.maximum((ab**2).sum(axis=1), 1e-12)
    t = np.clip(((p[:, None, :] - a[None]) * ab[None]).sum(axis=2) / length2[None], 0.0, 1.0)
    closest = a[None] + t[..., None] * ab[None]
    return np.min(np.hypot(*(p[:, None, :] - closest).transpose(2, 0, 1)), axis=1)


def classify(record: ImageRecord, xy: np.ndarray) -> tuple[list[str], int]:
    """One of :data:`CLASSES` per detection centre ``(N, 2)`` (in that order of precedence)
    and the number of µCs with a detection within 1 mm
    (:func:`cascade.evaluation.froc.match_image`)."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    match = match_image(
        ImageEval(truth_xy(record), xy, np.ones(len(xy)), spacing_mm=record.pixel_spacing_mm),
        radius_mm=RADIUS_MM,
    )
    near = {k: np.zeros(len(xy), bool) for k in CLASSES[:3]}
    near["µC"] = match.det_status == DET_NEAR_TRUTH
    for other in record.others if len(xy) else ():
        key = "vessel" if other.kind == "vascular" else "macro"
        points = np.asarray(other.points, dtype=np.float64).reshape(-1, 2)
        if other.closed and len(points) > 1:
            points = np.vstack([points, points[:1]])
        near[key] |= distance_to_polyline_mm(xy, points, record.pixel_spacing_mm) <= RADIUS_MM
    classes = [next((k for k in CLASSES[:3] if near[k][i]), "other") for i in range(len(xy))]
    return classes, int(np.isfinite(match.truth_hit_score).sum())


def run(detector: Detector, op: OperatingPoint, records: Sequence[ImageRecord]) -> dict[str, Any]:
    """Per-class counts at ``op`` and over every candidate (``detector`` reports all)."""
    totals: dict[str, Counter[str]] = {"operating_point": Counter(), "all_candidates": Counter()}
    found_n = {"operating_point": 0, "all_candidates": 0}
    images = []
    for i, rec in enumerate(records):
        result = detector.detect(rec.path)
        dets = result.detections
        xy = np.array([[d.x, d.y] for d in dets], dtype=np.float64).reshape(-1, 2)
        kept = op.select(
            np.array([d.score for d in dets], dtype=np.float64),
            np.array([d.fpr_score for d in dets], dtype=np.float64),
        )
        row: dict[str, Any] = {
            "sop_instance_uid": rec.sop_instance_uid,
            "calcifications": len(rec.calcifications),
            "vascular_findings": sum(o.kind == "vascular" for o in rec.others),
        }
        for name, sel in (("operating_point", kept), ("all_candidates", np.arange(len(dets)))):
            classes, n_found = classify(rec, xy[sel])
            counts = Counter(classes)
            totals[name].update(counts)
            found_n[name] += n_found
            row[name] = {**{k: counts.get(k, 0) for k in CLASSES}, "found": n_found}
        images.append(row)
        logger.info(
            "%d/%d %s: reported %s",
            i + 1,
            len(records),
            rec.sop_instance_uid,
            dict(row["operating_point"]),
        )
    n_truth = sum(len(r.calcifications) for r in records)
    return {
        "images": images,
        "totals": {
            name: {
                **{k: totals[name].get(k, 0) for k in CLASSES},
                "found": found_n[name],
                "calcifications": n_truth,
            }
            for name in totals
        },
        "images_with_vessels": sum(1 for r in images if r["vascular_findings"]),
        "images_with_vessel_marks": {
            name: sum(1 for r in images if r[name]["vessel"]) for name in totals
        },
    }


def markdown(data: dict[str, Any]) -> str:
    """The README block."""
    op = data["operating_point"]
    lines = [
        f"{run_line(data)} Weights: `{data['model_version']}` (bundled). Phantoms: "
        + ", ".join(f"`{m}`" for m in data["manifests"])
        + f" — {data['n_images']} images, {data['images_with_vessels']} of them with vascular "
        "calcifications.",
        "",
    ]
    rows = []
    for name, label in (
        (
            "operating_point",
            f"operating point (FPR ≥ {op['fpr_threshold']:g}, score ≥ {op['min_score']:.4g})",
        ),
        ("all_candidates", "every candidate"),
    ):
        t = data["totals"][name]
        rows.append(
            [label]
            + [str(t[k]) for k in CLASSES]
            + [
                f"{data['images_with_vessel_marks'][name]} / {data['images_with_vessels']}",
                f"{t['found']} / {t['calcifications']}",
            ]
        )
    lines.append(
        markdown_table(
            [
                "Reported",
                "on µCs",
                "on vessels",
                "on other calcifications",
                "elsewhere",
                "vessel images marked",
                "µCs found",
            ],
            rows,
            right=1,
        )
    )
    lines += ["", f"Command: `{data['command']}`."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", type=Path, action="append", required=True, help="(.jsonl)")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    ap.add_argument("--out", type=Path, default=RESULTS / "vessels.json")
    ap.add_argument("--no-readme", action="store_true", help="do not update bench/README.md")
    args = ap.parse_args(argv)
    setup_logging()
    records = [r for m in args.manifest for r in read_manifest(m)]
    if not records:
        raise SystemExit("the manifests hold no images")
    machine = machine_info()
    detector = Detector.bundled(device=args.device, calibrated=False)
    op = ModelWeights.bundled_weights().operating_point()
    out = run(detector, op, records)
    machine["load_average_end"] = list(os.getloadavg())
    data: dict[str, Any] = {
        "bench": "vessels",
        "schema": 1,
        "created": now_iso(),
        "command": " ".join(["bench/vessels.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine,
        "manifests": [str(m) for m in args.manifest],
        "n_images": len(records),
        "radius_mm": RADIUS_MM,
        "model_version": detector.model_version,
        "operating_point": op.to_json(),
        **out,
    }
    write_json(args.out, data)
    print(markdown(data))
    if not args.no_readme:
        update_readme_section(
            "vessels", markdown(data), heading="Vascular calcifications", intro=INTRO
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
