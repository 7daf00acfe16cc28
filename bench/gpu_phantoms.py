"""Render the phantom sets of ``bench/gpu_presets.sh`` in parallel, one manifest each.

Usage: ``python bench/gpu_phantoms.py ROOT PARTS PER_PART [VAL]`` writes ``ROOT/train``
(PARTS × PER_PART small images, seeds 1000 + part), ``ROOT/val`` (VAL, default 6, seed
2000: 16 are the ``make weights`` validation set),
``ROOT/test`` (8, seed 3000) and ``ROOT/full`` (one full-field image, seed 5000),
each with a ``manifest.jsonl`` whose paths are relative to it.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from cascade.data.manifest import read_manifest, write_manifest
from cascade.synthesis import generate_dataset

Job = tuple[Path, int, int, str]


def render(job: Job) -> tuple[Path, float]:
    """Render one part; return its folder and seconds."""
    out, count, seed, size = job
    t0 = time.perf_counter()
    generate_dataset(out, count=count, seed=seed, size=size, progress=False)
    return out, time.perf_counter() - t0


def merge(folder: Path) -> int:
    """Write ``folder/manifest.jsonl`` from its parts' manifests; return the image count."""
    parts = sorted(folder.glob("p*"))
    records = [r for part in parts for r in read_manifest(part / "manifest.jsonl")]
    write_manifest(folder / "manifest.jsonl", records)
    return len(records)


def main(argv: list[str]) -> None:
    root, parts, per_part = Path(argv[0]), int(argv[1]), int(argv[2])
    n_val = int(argv[3]) if len(argv) > 3 else 6
    jobs: list[Job] = [
        (root / f"train/p{i:02d}", per_part, 1000 + i, "small") for i in range(parts)
    ]
    jobs += [
        (root / "val/p00", n_val, 2000, "small"),
        (root / "test/p00", 8, 3000, "small"),
        (root / "full/p00", 1, 5000, "full"),
    ]
    t0 = time.perf_counter()
    with ProcessPoolExecutor() as pool:
        for out, seconds in pool.map(render, jobs):
            print(f"{out.relative_to(root)}: {seconds:.1f} s", flush=True)
    for name in ("train", "val", "test", "full"):
        print(f"{name}: {merge(root / name)} images")
    print(f"rendered in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
