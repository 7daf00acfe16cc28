"""Seconds per stage of the cascade, new path against the previous one in the same run.

For each phantom size (small 10 × 7 cm; full-field Siemens 85 µm; full-field Hologic at
the 70-µm working spacing, i.e. the full detector in the cascade's own grid) the bundled
detector runs ``--repeats`` times in each implementation, **interleaved** (new, reference,
reference, new, …), so that a noisy machine slows both alike; the table gives medians
and the ratio reference / new of the paired end-to-end times. Stages (wall and CPU
seconds of this process, :data:`cascade.inference.detector.STAGES`): decode,
preprocess, proposal network, candidate extraction, FPR, detections (the cascade's
result: masks back to the received grid), plus the node's result objects (SEG + GSPS,
``node.reports``). Also: peak RSS of the process during each image (sampled every
10 ms), peak GPU memory on CUDA, and images per second for a batch of images through
one detector (``--batch``, new path only).

Usage::

    .venv/bin/python bench/speed.py [--device cpu|cuda|auto] [--backend auto|torch|onnx|resident]
        [--repeats 3] [--batch 4]
        [--sizes small,full,full70] [--data DIR] [--out bench/results/speed.json]
        [--no-reference] [--no-readme]

``--backend resident`` times the device-resident path (:mod:`cascade.inference.resident`:
preprocessing, U-Net, candidates and FPR in torch on the device; ``auto`` picks it on
CUDA). Its candidates approximate the host path's (watershed split, coarse breast-mask
components), so its detections are compared with the reference within 10 % of the score
(``same_detections`` = "close") instead of 0.1 %. GPU figures for it are still to be
measured.

Phantoms are rendered once into ``--data`` (default ``data/speed``) by
:func:`cascade.synthesis.generate_dataset`. Writes the JSON and the "Speed" section of
``bench/README.md``.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
from _common import RESULTS, machine_info, markdown_table, now_iso, setup_logging, write_json
from _common import update_readme_section as update_section

from cascade.data.manifest import read_manifest
from cascade.inference.detector import STAGES, Detector
from cascade.synthesis import generate_dataset

logger = logging.getLogger("bench.speed")

#: Phantom sets: name → (size, vendor, seed).
SIZES: dict[str, tuple[str, str, int]] = {
    "small": ("small", "siemens", 3100),
    "full": ("full", "siemens", 3101),
    "full70": ("full", "hologic", 3102),
}
LABELS = {
    "small": "small (10 × 7 cm)",
    "full": "full field, 85 µm",
    "full70": "full field, 70 µm",
}
ALL_STAGES = (*STAGES, "objects")

INTRO = """\
`bench/speed.py` times the bundled detector stage by stage on phantoms, the current
path and the previous one (`Detector(backend="reference")`: torch, square 768-px tiles
over the breast's bounding box, whole-image candidate filters) **interleaved in the same
run**, so that the ratio holds on a shared machine; wall and CPU seconds (of the
process, all threads) per stage, medians. "objects" is the node's SEG + GSPS
(`node.reports`), the same code in both. Run: `.venv/bin/python bench/speed.py`
(JSON: `bench/results/speed.json`)."""


class RssSampler:
    """Peak resident set size of this process while it runs (``/proc/self/statm``)."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:
            return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self.peak = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def phantom_paths(data: Path, names: Sequence[str]) -> dict[str, Path]:
    """One phantom image per size, rendered once into ``data/<name>``."""
    out = {}
    for name in names:
        size, vendor, seed = SIZES[name]
        folder = data / name
        manifest = folder / "manifest.jsonl"
        if not manifest.is_file():
            logger.info("rendering the %s phantom into %s", name, folder)
            generate_dataset(
                folder,
                count=1,
                seed=seed,
                size=size,  # type: ignore[arg-type]
                vendors=(vendor,),
                progress=False,
            )
        out[name] = read_manifest(manifest)[0].path
    return out


def result_objects(det: Detector, path: Path, found: Any) -> None:
    """The node's per-image objects for ``found`` (SEG + GSPS), as a worker builds them."""
    from pydicom.uid import generate_uid

    from node.identity import provenance_for
    from node.reports.gsps import build_gsps
    from node.reports.seg import build_seg

    source = pydicom.dcmread(path)
    common: dict[str, Any] = {
        "source": source,
        "detections": found,
        "provenance": provenance_for(det.identity),
        "series_instance_uid": generate_uid(),
        "sop_instance_uid": generate_uid(),
        "instance_number": 1,
    }
    build_seg(**common)
    build_gsps(**common)


def run_once(det: Detector, path: Path, *, objects: bool) -> dict[str, Any]:
    """One image end to end: stage (wall, CPU) seconds, peak RSS and GPU memory."""
    cuda = det.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(det.device)
    timings: dict[str, tuple[float, float]] = {}
    wall0, cpu0 = time.perf_counter(), time.process_time()
    with RssSampler() as rss:
        found = det.detect(path, timings=timings)
        if objects:
            w, c = time.perf_counter(), time.process_time()
            result_objects(det, path, found)
            timings["objects"] = (time.perf_counter() - w, time.process_time() - c)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {
        "wall": {k: v[0] for k, v in timings.items()} | {"total": wall},
        "cpu": {k: v[1] for k, v in timings.items()} | {"total": cpu},
        "peak_rss_mb": rss.peak / 2**20,
        "peak_gpu_mb": torch.cuda.max_memory_allocated(det.device) / 2**20 if cuda else None,
        "detections": len(found.detections),
        "top": [[d.x, d.y, d.score] for d in found.detections[:5]],
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median per stage (wall and CPU), max peak RSS / GPU memory."""
    out: dict[str, Any] = {"runs": len(runs)}
    for clock in ("wall", "cpu"):
        keys = [k for k in (*ALL_STAGES, "total") if k in runs[0][clock]]
        out[clock] = {k: statistics.median(r[clock][k] for r in runs) for k in keys}
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    gpu = [r["peak_gpu_mb"] for r in runs if r["peak_gpu_mb"] is not None]
    out["peak_gpu_mb"] = max(gpu) if gpu else None
    out["detections"] = runs[-1]["detections"]
    return out


def batch_throughput(det: Detector, paths: Sequence[Path]) -> dict[str, Any]:
    """Images per second (wall and CPU) for ``paths`` through one detector.

    :meth:`Detector.detect_many`: one image after the other, the next ones decoded on a
    thread meanwhile (bounded prefetch).
    """
    wall0, cpu0 = time.perf_counter(), time.process_time()
    with RssSampler() as rss:
        det.detect_many(list(paths))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {
        "images": len(paths),
        "wall_s": wall,
        "cpu_s": cpu,
        "images_per_s": len(paths) / wall,
        "peak_rss_mb": rss.peak / 2**20,
    }


def measure(
    detectors: dict[str, Detector], paths: dict[str, Path], *, repeats: int, objects: bool
) -> dict[str, Any]:
    """Every size × implementation, interleaved per repetition (ABBA order)."""
    out: dict[str, Any] = {}
    names = list(detectors)
    first = next(iter(paths.values()))
    logger.info("warm-up on %s", first)
    for det in detectors.values():
        det.detect(first)  # first-call costs (ONNX Runtime's allocations) out of the figures
    for size, path in paths.items():
        runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        for rep in range(repeats):
            order = names if rep % 2 == 0 else names[::-1]
            for name in order:
                r = run_once(detectors[name], path, objects=objects)
                runs[name].append(r)
                logger.info(
                    "%s %s rep %d: %.2f s wall, %.2f s CPU, %d detections",
                    size,
                    name,
                    rep + 1,
                    r["wall"]["total"],
                    r["cpu"]["total"],
                    r["detections"],
                )
        entry: dict[str, Any] = {"path": str(path), **{n: summarise(runs[n]) for n in names}}
        if "reference" in runs and "new" in runs:
            pair = zip(runs["reference"], runs["new"], strict=True)
            ratios = [
                (a["wall"]["total"] / b["wall"]["total"], a["cpu"]["total"] / b["cpu"]["total"])
                for a, b in pair
            ]
            entry["ratio_wall"] = statistics.median(r[0] for r in ratios)
            entry["ratio_cpu"] = statistics.median(r[1] for r in ratios)
            ref_top = np.array(runs["reference"][-1]["top"]).reshape(-1, 3)
            new_top = np.array(runs["new"][-1]["top"]).reshape(-1, 3)
            # The resident path approximates the candidate split: compared within 10 %.
            rtol = 0.1 if detectors["new"].label == "resident" else 1e-3
            entry["same_detections"] = runs["reference"][-1]["detections"] == runs["new"][-1][
                "detections"
            ] and bool(ref_top.shape == new_top.shape and np.allclose(ref_top, new_top, rtol=rtol))
            entry["same_detections_rtol"] = rtol
        out[size] = entry
    return out


def markdown(data: dict[str, Any]) -> str:
    """The README block: the machine, then one row per size × implementation."""
    mach = data["machine"]
    gpu = mach.get("cuda_device") or "no GPU"
    lines = [
        f"Run {data['created']} on {mach['cpu']} ({mach['cores']} cores, torch {mach['torch']} "
        f"with {mach['torch_threads']} threads; {gpu}; load average at start "
        f"{mach['load_average_start'][0]:.1f}, at end {mach['load_average_end'][0]:.1f}). "
        f"Device: {data['device']}; new path: backend `{data['backend']}`. Medians of "
        f"{data['repeats']} interleaved runs; seconds per image, wall / CPU (CPU = "
        "process time, all threads).",
        "",
    ]
    header = ["Image", "Path", *ALL_STAGES, "end to end", "peak RSS MB"]
    if data["device"].startswith("cuda"):
        header.append("peak GPU MB")
    rows = []
    for size, entry in data["sizes"].items():
        for name in ("new", "reference"):
            if name not in entry:
                continue
            s = entry[name]
            cells = [LABELS.get(size, size), name]
            for stage in (*ALL_STAGES, "total"):
                w, c = s["wall"].get(stage), s["cpu"].get(stage)
                cells.append("–" if w is None else f"{w:.2f} / {c:.2f}")
            cells.append(f"{s['peak_rss_mb']:.0f}")
            if data["device"].startswith("cuda"):
                cells.append("–" if s["peak_gpu_mb"] is None else f"{s['peak_gpu_mb']:.0f}")
            rows.append(cells)
    lines.append(markdown_table(header, rows, right=2))
    lines.append("")
    ratio_rows = []
    for size, entry in data["sizes"].items():
        if "ratio_wall" in entry:
            ratio_rows.append(
                [
                    LABELS.get(size, size),
                    f"{entry['ratio_wall']:.2f}",
                    f"{entry['ratio_cpu']:.2f}",
                    ("yes" if entry.get("same_detections_rtol", 1e-3) <= 1e-3 else "close")
                    if entry["same_detections"]
                    else "NO",
                ]
            )
    if ratio_rows:
        lines.append("Reference / new, median of the paired end-to-end runs:")
        lines.append("")
        lines.append(
            markdown_table(
                ["Image", "wall ratio", "CPU ratio", "same detections (count, top 5)"],
                ratio_rows,
                right=1,
            )
        )
        lines.append("")
    b = data.get("batch")
    if b:
        lines.append(
            f"Batch: {b['images']} images ({b['size']}) through one detector (new path): "
            f"{b['images_per_s']:.3f} images/s wall ({b['wall_s'] / b['images']:.2f} s per image, "
            f"{b['cpu_s'] / b['images']:.2f} s CPU), peak RSS {b['peak_rss_mb']:.0f} MB."
        )
        lines.append("")
    lines.append(f"Command: `{data['command']}`.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    ap.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "torch", "onnx", "resident"),
        help="new path: auto (default: resident on CUDA, ONNX Runtime on the CPU), torch, "
        "onnx, resident (the device-resident torch path)",
    )
    ap.add_argument("--repeats", type=int, default=3, help="runs per image and path (3)")
    ap.add_argument("--batch", type=int, default=4, help="images in the throughput batch (4)")
    ap.add_argument("--batch-size", default="full", choices=sorted(SIZES), help="their size (full)")
    ap.add_argument("--sizes", default="small,full,full70", help="comma-separated sizes")
    ap.add_argument("--data", type=Path, default=Path("data/speed"), help="phantom folder")
    ap.add_argument("--out", type=Path, default=RESULTS / "speed.json", help="JSON result")
    ap.add_argument("--no-reference", action="store_true", help="time the new path only")
    ap.add_argument("--no-objects", action="store_true", help="skip the SEG + GSPS stage")
    ap.add_argument("--no-readme", action="store_true", help="do not update bench/README.md")
    ap.add_argument("--readme-section", default="speed", help="README marker name (speed)")
    args = ap.parse_args(argv)
    setup_logging()
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        ap.error(f"unknown sizes {unknown}; choose from {sorted(SIZES)}")

    machine = machine_info()
    paths = phantom_paths(args.data, sorted({*sizes, args.batch_size}))
    detectors = {"new": Detector.bundled(device=args.device, backend=args.backend)}
    if not args.no_reference:
        detectors["reference"] = Detector.bundled(device=args.device, backend="reference")
    new = detectors["new"]
    logger.info("new path: %s on %s", new.label, new.device)
    results = measure(
        detectors, {s: paths[s] for s in sizes}, repeats=args.repeats, objects=not args.no_objects
    )
    batch = None
    if args.batch > 0:
        bpath = paths[args.batch_size]
        new.detect(bpath)
        batch = batch_throughput(new, [bpath] * args.batch) | {"size": args.batch_size}
    machine["load_average_end"] = list(os.getloadavg())
    data: dict[str, Any] = {
        "bench": "speed",
        "schema": 1,
        "created": now_iso(),
        "command": " ".join(["bench/speed.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine,
        "device": str(new.device),
        "backend": new.label,
        "repeats": args.repeats,
        "stages": list(ALL_STAGES),
        "sizes": results,
        "batch": batch,
    }
    write_json(args.out, data)
    text = markdown(data)
    print(text)
    if not args.no_readme:
        update_section(args.readme_section, text, heading="Speed", intro=INTRO)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
