"""Summarise a ``bench/gpu_presets.sh`` session: JSON plus a ``bench/README.md`` section.

Reads the training logs (one JSON object per epoch, as ``calcnode train`` logs
them) and the GPU timing of ``bench/accuracy.py --device cuda``; trains and
measures nothing itself.

Usage::

    .venv/bin/python bench/gpu_report.py --device "NVIDIA H200" \
        --timing bench/results/gpu/h200_detect_timing.json \
        --asn "val on seed 3000=bench/results/gpu/h200_run2_asn_paper.log" \
        --fpr "SGD lr 1e-3 (paper)=bench/results/gpu/h200_run1_fpr_paper_sgd.log" \
        --fpr "Adam lr 1e-3=bench/results/gpu/h200_run2_fpr_paper_adam.log" \
        [--out bench/results/gpu_presets.json] [--no-readme]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from _common import RESULTS, markdown_table, now_iso, update_readme_section, write_json

EPOCH = re.compile(r"(FPR )?epoch (\d+): (\{.*\})\s*$")
CROPS = re.compile(r"FPR training crops: (\d+) \((\d+) positive")
STAGES = ("read", "preprocess", "asn", "fpr", "total")
ASN_ITERATIONS = 250  # bench/gpu_presets.sh: --iterations 250, batch 16 (the preset's)


def parse_log(path: Path) -> dict[str, Any]:
    """Per-epoch metrics (and the FPR's crop count) from one training log."""
    epochs, crops = [], None
    for line in path.read_text(encoding="utf-8").splitlines():
        if m := EPOCH.search(line):
            epochs.append(json.loads(m.group(3)))
        elif m := CROPS.search(line):
            crops = {"crops": int(m.group(1)), "positive": int(m.group(2))}
    if not epochs:
        raise SystemExit(f"{path}: no epoch lines")
    return {"log": str(path), "epochs": epochs, "crops": crops}


def _named(spec: str) -> tuple[str, Path]:
    name, _, path = spec.partition("=")
    if not path:
        raise argparse.ArgumentTypeError(f"expected NAME=LOG, got {spec!r}")
    return name, Path(path)


def _val_recall(epoch: dict[str, Any], k: str) -> float:
    return float((epoch.get("val") or {}).get("recall_at", {}).get(k, -1.0))


def _recall(epoch: dict[str, Any], k: str) -> str:
    val = epoch.get("val") or {}
    if not val.get("n_truth"):
        return "–"
    return f"{100 * val['recall_at'][k]:.1f}"


def section(data: dict[str, Any]) -> str:
    """The README section."""
    dev = data["device"]
    out = [f"Device: **{dev}**. Phantoms only; logs in `bench/results/gpu/`. {data['note']}", ""]
    timing = data.get("detect_timing")
    if timing:
        rows = []
        for group, stages in sorted(timing.items(), key=lambda kv: kv[0] != "small"):
            rows.append(
                [group, str(stages["images"])]
                + [
                    f"{stages[s]['mean']:.2f}"
                    for s in ("read", "preprocess", "asn", "fpr", "total")
                ]
            )
        out += [
            "Bundled cascade, seconds per image by stage (mean; ASN includes the proposals, "
            "which run on the CPU):",
            "",
            markdown_table(
                ["Size", "Images", "read", "preprocess", "ASN", "FPR", "total"], rows, right=1
            ),
            "",
        ]
    for name, run in data["asn"].items():
        rows = [
            [
                str(e["epoch"]),
                f"{e['loss']:.3f}",
                f"{ASN_ITERATIONS / e['train_seconds']:.0f}",
                _recall(e, "5"),
                _recall(e, "10"),
                _recall(e, "30"),
            ]
            for e in run["epochs"]
        ]
        out += [
            f"ASN, paper preset ({name}): t-test loss β 0.8, sigmoid head, width 32, "
            f"{ASN_ITERATIONS} iterations of 16 patches per epoch. Proposal recall in %:",
            "",
            markdown_table(["Epoch", "Loss", "it/s", "R@5", "R@10", "R@30"], rows, right=0),
            "",
        ]
    rows = []
    for name, run in data["fpr"].items():
        first, last = run["epochs"][0], run["epochs"][-1]
        best = max(
            run["epochs"], key=lambda e: (e.get("val") or {}).get("recall_at", {}).get("1", -1)
        )
        crops = run["crops"]["crops"] if run["crops"] else 0
        rows.append(
            [
                name,
                str(len(run["epochs"])),
                f"{first['loss']:.3f} → {last['loss']:.3f}",
                f"{crops / last['train_seconds']:.0f}",
                _recall(best, "1") + f" (epoch {best['epoch']})",
                _recall(last, "1"),
                _recall(last, "5"),
            ]
        )
    out += [
        "FPR on the bundled U-Net's candidates (paper preset: ResNet-50 width 64, crops "
        "resized to 224 px; cpu preset: width 16, native 56 px). Cascade recall in %, on "
        "each run's validation images:",
        "",
        markdown_table(
            ["Run", "Epochs", "BCE", "crops/s", "best R@1", "last R@1", "last R@5"],
            rows,
            right=1,
        ),
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", required=True, help="the card, in words (e.g. 'NVIDIA H200')")
    ap.add_argument("--timing", type=Path, help="bench/accuracy.py JSON from --device cuda")
    ap.add_argument("--asn", type=_named, action="append", default=[], help="NAME=LOG")
    ap.add_argument("--fpr", type=_named, action="append", default=[], help="NAME=LOG")
    ap.add_argument("--note", default="", help="a sentence for the README section")
    ap.add_argument("--out", type=Path, default=RESULTS / "gpu_presets.json")
    ap.add_argument("--no-readme", action="store_true")
    args = ap.parse_args(argv)
    data: dict[str, Any] = {
        "bench": "gpu_presets",
        "created": now_iso(),
        "device": args.device,
        "note": args.note,
        "asn": {name: parse_log(p) for name, p in args.asn},
        "fpr": {name: parse_log(p) for name, p in args.fpr},
    }
    if args.timing:
        timing = json.loads(args.timing.read_text())
        first = next(iter(timing["cascades"]))  # the detector under test (bundled by default)
        data["detect_timing"] = timing["timing"][first]["cuda"]
        data["machine"] = timing["machine"]
    write_json(args.out, data)
    print(section(data))
    if not args.no_readme:
        update_readme_section(
            "gpu-presets",
            section(data),
            heading="GPU: paper presets and speed",
            intro="`bench/gpu_presets.sh` on a lent GPU machine, summarised by "
            "`bench/gpu_report.py`.",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
