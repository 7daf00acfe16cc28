"""Shared helpers of the detection benchmarks (``proposals.py``, ``accuracy.py``).

Coordinates: every point is ``(x, y)`` with x = column, y = row, 0-based, the first
pixel's centre at ``(0, 0)``, in the grid named next to it: the received image's grid
("source") for everything that is scored, the 70-µm working grid ("work") inside the
cascade. Hits follow the paper's rule: a µC counts as recalled when a detection lies
within 1 mm of it, measured with the received image's own pixel spacing.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from scipy import ndimage

from cascade.data.io import read_mammogram
from cascade.data.manifest import ImageRecord, read_manifest
from cascade.data.preprocess import PreprocessedImage, preprocess_mammogram
from cascade.evaluation.froc import FrocResult, ImageEval, dog_detect
from cascade.models.checkpoint import describe_checkpoint

logger = logging.getLogger(__name__)

BENCH = Path(__file__).resolve().parent
README = BENCH / "README.md"
RESULTS = BENCH / "results"

#: Names of the two image sets: the held-out manifest and the optional full-field one.
HELDOUT, FULL = "heldout", "full"

#: Skin-line margin of the DoG reference, as in ``phantom_realism.py``.
DOG_BORDER_MM = 2.0

#: FROC points kept in the JSON (the curve beyond this FP/image is not needed for any R@k).
CURVE_MAX_FP = 40.0

T = TypeVar("T")


# --------------------------------------------------------------------------- machine
def machine_info() -> dict[str, Any]:
    """CPU model, cores, torch threads, library versions, load average, CUDA device."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cuda = torch.cuda.is_available()
    return {
        "cpu": model or platform.processor(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "cuda_available": cuda,
        "cuda_device": torch.cuda.get_device_name() if cuda else None,
        "load_average_start": list(os.getloadavg()),
    }


def setup_logging() -> None:
    """INFO logging with timestamps; the JPEG codecs' chatter kept at WARNING."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for name in ("openjpeg", "libjpeg", "pylibjpeg", "rle"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run_line(data: Mapping[str, Any]) -> str:
    """``Run <created> on <cpu> (<cores> cores, torch … threads; GPU …; load average …).``"""
    mach = data["machine"]
    gpu = f"; GPU {mach['cuda_device']}" if mach.get("cuda_device") else "; no GPU"
    return (
        f"Run {data['created']} on {mach['cpu']} ({mach['cores']} cores, torch "
        f"{mach['torch']} with {mach['torch_threads']} threads{gpu}; load average at start "
        f"{mach['load_average_start'][0]:.1f})."
    )


def now_iso() -> str:
    """The current UTC time, ISO 8601, seconds."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def checkpoint_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Path, sha256 and the facts of a checkpoint that say which model it is."""
    meta = describe_checkpoint(path)
    training = meta.get("training", {}) or {}
    return {
        "path": str(path),
        "sha256": meta["file"]["sha256"],
        "kind": meta.get("kind"),
        "model_name": meta.get("model_name"),
        "model_config": meta.get("model_config"),
        "n_parameters": meta.get("n_parameters"),
        "loss": training.get("loss"),
        "beta": training.get("beta"),
        "map_kind": (meta.get("preprocessing", {}) or {}).get("map_kind", "residual")
        if meta.get("kind") != "fpr"
        else None,
        "created": meta.get("created"),
    }


# --------------------------------------------------------------------------- data
@dataclass(frozen=True)
class ImageSet:
    """The records of one manifest, with the role they play in the bench."""

    name: str
    manifest: Path
    records: tuple[ImageRecord, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.manifest),
            "count": len(self.records),
            "n_truth": sum(len(r.calcifications) for r in self.records),
            "vendors": sorted({str(r.tags.get("vendor", "unknown")) for r in self.records}),
        }


def load_sets(
    manifest: Path, full_manifest: Path | None, *, limit: int | None = None
) -> list[ImageSet]:
    """The held-out set and, when given, the full-field set (first ``limit`` images each)."""
    out = []
    for name, path in ((HELDOUT, manifest), (FULL, full_manifest)):
        if path is None:
            continue
        records = read_manifest(path)
        if limit is not None:
            records = records[:limit]
        if not records:
            raise SystemExit(f"{path}: the manifest holds no images")
        out.append(ImageSet(name=name, manifest=Path(path), records=tuple(records)))
    return out


def size_group(record: ImageRecord, set_name: str) -> str:
    """``"small"`` or ``"full"``: the phantom's ``size`` tag, else the set it came from."""
    size = record.tags.get("size")
    if size in ("small", "full"):
        return str(size)
    return "full" if set_name == FULL else "small"


def truth_xy(record: ImageRecord) -> np.ndarray:
    """``(N, 2)`` µC centres (x = column, y = row) in the received grid."""
    return np.array([[c.x, c.y] for c in record.calcifications], dtype=np.float64).reshape(-1, 2)


def log_image(iset: ImageSet, index: int, record: ImageRecord, group: str) -> None:
    """Progress line of one image: set, position, SOP Instance UID (never patient data)."""
    logger.info(
        "%s %d/%d: %s (%s, %d×%d)",
        iset.name,
        index + 1,
        len(iset.records),
        record.sop_instance_uid,
        group,
        record.rows,
        record.columns,
    )


def breast_area_cm2(pre: PreprocessedImage) -> float:
    """Breast area of a preprocessed image in cm² (mask pixels × working pixel area)."""
    sr, sc = pre.transform.work_spacing_mm
    return float(pre.breast_mask.sum()) * float(sr) * float(sc) / 100.0


def image_eval(
    record: ImageRecord, xy: np.ndarray, scores: np.ndarray, *, area_cm2: float
) -> ImageEval:
    """Detections (received grid, x = column, y = row) of one image against its µCs."""
    return ImageEval(
        truth_xy(record),
        np.asarray(xy, dtype=np.float64).reshape(-1, 2),
        np.asarray(scores, dtype=np.float64).reshape(-1),
        spacing_mm=record.pixel_spacing_mm,
        breast_area_cm2=area_cm2 if area_cm2 > 0 else None,
    )


class Timer:
    """Wall-clock seconds of named stages of one image (``with timer("asn"): ...``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str) -> _Stage:
        return _Stage(self, name)


class _Stage:
    def __init__(self, timer: Timer, name: str) -> None:
        self.timer, self.name, self.t0 = timer, name, 0.0

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        dt_s = time.perf_counter() - self.t0
        self.timer.seconds[self.name] = self.timer.seconds.get(self.name, 0.0) + dt_s


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """``fn()`` and its wall-clock seconds."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def load_image(record: ImageRecord, *, spacing_mm: float, timer: Timer) -> PreprocessedImage:
    """Read and preprocess one image as the detector does, timing ``read`` / ``preprocess``."""
    with timer("read"):
        mammo = read_mammogram(record.path)
    with timer("preprocess"):
        pre = preprocess_mammogram(mammo, target_spacing_mm=spacing_mm)
    return pre


def dog_eval(
    record: ImageRecord, pre: PreprocessedImage, *, border_mm: float = DOG_BORDER_MM
) -> tuple[ImageEval, float]:
    """The DoG reference on the 70-µm image inside the breast mask, in the received grid.

    Peaks closer than ``border_mm`` to the skin line are dropped (0 keeps the whole
    mask): a DoG fires on the inside of every air → tissue step.
    """
    t0 = time.perf_counter()
    sr, sc = pre.transform.work_spacing_mm
    spacing = float((sr + sc) / 2.0)
    mask = pre.breast_mask
    if border_mm > 0:
        mask = ndimage.distance_transform_edt(mask) * spacing >= border_mm
    xy_work, scores = dog_detect(pre.image, spacing_mm=spacing, mask=mask)
    xy_src = pre.transform.to_source(xy_work) if len(xy_work) else xy_work
    seconds = time.perf_counter() - t0
    return image_eval(record, xy_src, scores, area_cm2=breast_area_cm2(pre)), seconds


# --------------------------------------------------------------------------- results
def froc_json(res: FrocResult, *, max_fp: float = CURVE_MAX_FP) -> dict[str, Any]:
    """R@k, counts and the FROC curve up to ``max_fp`` FP/image, in plain JSON types."""
    keep = res.fp_per_image <= max_fp
    full = res.to_json()
    curve: dict[str, Any] = {
        "thresholds": [float(v) for v in res.thresholds[keep]],
        "recall": [float(v) for v in res.recall[keep]],
        "fp_per_image": [float(v) for v in res.fp_per_image[keep]],
    }
    if res.fp_per_cm2 is not None:
        curve["fp_per_cm2"] = [float(v) for v in res.fp_per_cm2[keep]]
    return {
        "recall_at": full["recall_at"],
        "recall_at_per_cm2": full["recall_at_per_cm2"],
        "n_images": full["n_images"],
        "n_truth": full["n_truth"],
        "n_detections": full["n_detections"],
        "detections_per_image": full["n_detections"] / max(full["n_images"], 1),
        "radius_mm": full["radius_mm"],
        "curve": curve,
        "curve_max_fp_per_image": max_fp,
    }


@dataclass
class TimingLog:
    """Per-image stage seconds, grouped by ``(name, device, size group)``."""

    rows: dict[tuple[str, str, str], list[dict[str, float]]] = field(default_factory=dict)

    def add(self, name: str, device: str, group: str, seconds: Mapping[str, float]) -> None:
        self.rows.setdefault((name, device, group), []).append(dict(seconds))

    def to_json(self) -> dict[str, Any]:
        """``{name: {device: {group: {"images": n, stage: {"mean", "median", "max"}}}}}``."""
        out: dict[str, Any] = {}
        for (name, device, group), rows in sorted(self.rows.items()):
            stages = sorted({k for r in rows for k in r})
            entry: dict[str, Any] = {"images": len(rows)}
            for stage in stages:
                vals = [r[stage] for r in rows if stage in r]
                entry[stage] = {
                    "mean": statistics.fmean(vals),
                    "median": statistics.median(vals),
                    "max": max(vals),
                }
            out.setdefault(name, {}).setdefault(device, {})[group] = entry
        return out


def mean_seconds(timing: Mapping[str, Any], name: str, device: str, group: str, stage: str) -> str:
    """``"1.23"`` (mean seconds of a stage) or ``"–"`` when not measured."""
    try:
        return f"{timing[name][device][group][stage]['mean']:.2f}"
    except KeyError:
        return "–"


def percent(value: float | None) -> str:
    """Recall as a percentage with one decimal, ``–`` for None."""
    return "–" if value is None else f"{100.0 * value:.1f}"


def recall_cell(result: Mapping[str, Any], k: float, key: str = "recall_at") -> str:
    """One R@k cell of a markdown table from :func:`froc_json` output."""
    table = result.get(key) or {}
    value = table.get(repr(float(k)))
    return percent(value)


def write_froc_plots(
    curves: Mapping[str, Mapping[str, FrocResult]],
    out: Path,
    *,
    titles: Mapping[str, str],
    max_fp: float,
) -> list[str]:
    """One FROC plot per image set next to ``out`` (``<stem>_froc[_full].png``)."""
    from cascade.evaluation.froc import plot_froc

    plots = []
    for set_name, set_curves in curves.items():
        suffix = "" if set_name == HELDOUT else f"_{FULL}"
        path = out.with_name(f"{out.stem}_froc{suffix}.png")
        plot_froc(set_curves, path, title=titles[set_name], max_fp=max_fp)
        plots.append(str(path))
    return plots


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` as indented strict JSON (parent folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]], *, right: int) -> str:
    """A markdown table; columns from index ``right`` on are right-aligned."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i < right else "---:" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def update_readme_section(
    name: str, body: str, *, heading: str, intro: str, path: Path = README
) -> None:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->``.

    When the markers are missing, a new section ``## heading`` with ``intro`` and the
    markers is appended at the end of the file.
    """
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    if start in text and end in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _m: block, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n## {heading}\n\n{intro.strip()}\n\n{block}\n"
    path.write_text(text, encoding="utf-8")
    logger.info("updated the %r section of %s", name, path)
