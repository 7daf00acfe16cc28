"""Phantom data sets on disk: MG studies, the ground-truth manifest, preview PNGs."""

from __future__ import annotations

import datetime as _dt
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from cascade.data.manifest import Calcification, ImageRecord, write_manifest
from cascade.synthesis.dicom import phantom_to_dataset
from cascade.synthesis.profiles import PROFILES
from cascade.synthesis.render import Size, _draw_density, render_image
from cascade.synthesis.results import PhantomImage, PhantomStudy
from cascade.synthesis.vendors import VENDORS

logger = logging.getLogger(__name__)


def _study_plan(rng: np.random.Generator, count: int) -> list[list[tuple[str, str]]]:
    """Split ``count`` images into studies of 2–4 (laterality, view) pairs."""
    all_views = [("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")]
    studies: list[list[tuple[str, str]]] = []
    left = count
    while left > 0:
        k = int(rng.choice([2, 3, 4], p=[0.25, 0.15, 0.60]))
        k = min(k, left)
        if left - k == 1:
            k = k + 1 if k < 4 else k - 1
        if k >= 4:
            views = list(all_views)
        elif k == 3:
            idx = sorted(rng.choice(4, size=3, replace=False).tolist())
            views = [all_views[i] for i in idx]
        elif k == 2:
            lat = str(rng.choice(["L", "R"]))
            views = (
                [(lat, "CC"), (lat, "MLO")] if rng.random() < 0.6 else [("L", "CC"), ("R", "CC")]
            )
        else:
            views = [all_views[int(rng.integers(4))]]
        studies.append(views)
        left -= k
    return studies


def _uid(seed: int, *parts: object) -> str:
    return str(generate_uid(entropy_srcs=["calcnode-phantom", str(seed), *map(str, parts)]))


def _preview(image: PhantomImage, path: Path) -> None:
    from PIL import Image, ImageDraw

    disp = image.display
    factor = max(1, math.ceil(max(disp.shape) / 1600))
    if factor > 1:
        r, c = disp.shape[0] // factor * factor, disp.shape[1] // factor * factor
        disp = disp[:r, :c].reshape(r // factor, factor, c // factor, factor).mean(axis=(1, 3))
    u8 = (np.clip(disp, 0, 1) * 255 + 0.5).astype(np.uint8)
    im = Image.fromarray(u8, mode="L").convert("RGB")
    draw = ImageDraw.Draw(im)

    def xy(x: float, y: float) -> tuple[float, float]:
        return ((x + 0.5) / factor - 0.5, (y + 0.5) / factor - 0.5)

    for o in image.others:
        pts = [xy(x, y) for x, y in o.points]
        colour = (255, 140, 0) if o.kind == "vascular" else (255, 60, 200)
        if len(pts) == 1:
            x, y = pts[0]
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), outline=colour)
        else:
            draw.line(pts + ([pts[0]] if o.closed else []), fill=colour, width=1)
    for hull in image.clusters:
        pts = [xy(x, y) for x, y in hull]
        if len(pts) >= 2:
            draw.line([*pts, pts[0]], fill=(230, 210, 0), width=1)
    for c in image.calcifications:
        x, y = xy(c.x, c.y)
        rad = max(c.diameter_mm / image.spacing_mm / factor / 2 + 4, 5)
        draw.ellipse((x - rad, y - rad, x + rad, y + rad), outline=(0, 255, 0))
    draw.text(
        (6, 6),
        f"{image.vendor.name} {image.laterality}{image.view} {image.density} "
        f"{len(image.calcifications)} uC  green=uC orange=vascular magenta=macro",
        fill=(255, 255, 0),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def generate_dataset(
    out: str | Path,
    *,
    count: int,
    seed: int,
    size: Size = "small",
    vendors: Sequence[str] | None = None,
    preview: bool = False,
    progress: bool = True,
    profile: str = "standard",
) -> Path:
    """Render ``count`` phantom images as MG studies on disk, with a manifest.

    Images are grouped in studies of 2–4 views (L/R × CC/MLO) sharing patient, study and
    vendor; files are ``out/sNNNN/<lat>-<view>.dcm``; the manifest ``out/manifest.jsonl``
    holds the truth in stored-grid coordinates (x = column, y = row, 0-based, first
    pixel's centre at (0, 0)). With ``preview=True`` PNGs go under ``out/previews/``
    (µCs circled green, vascular orange, macro magenta, cluster hulls yellow).

    Parameters
    ----------
    out : str or Path
        Output folder (created).
    count : int
        Number of images, ≥ 1.
    seed : int
        Seed, ≥ 0: the same seed gives identical pixel data and UIDs.
    size : {"small", "full"}
        Field size, see :func:`render_image`.
    vendors : sequence of str or None
        Draw each study's vendor profile from these (names of ``VENDORS``); None: all
        of them. A held-out set can so cover every vendor whatever its seed.
    preview : bool
        Also write preview PNGs.
    progress : bool
        Show a tqdm progress bar.
    profile : str
        The phantom profile (a key of ``PROFILES``): ``"standard"`` (the default, identical
        to the phantom before profiles), ``"wide"`` (harder training data),
        ``"subtle"`` (lower-contrast validation / test µCs) or ``"faint"`` (a stress set).
        Recorded in each record's ``tags["profile"]``.

    Returns
    -------
    Path
        The manifest path.
    """
    from tqdm import tqdm

    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if size not in ("small", "full"):
        raise ValueError(f"size must be 'small' or 'full', got {size!r}")
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {profile!r}")
    if vendors is None:
        vendor_names = sorted(VENDORS)
    else:
        vendor_names = sorted(set(vendors))
        unknown = [v for v in vendor_names if v not in VENDORS]
        if unknown or not vendor_names:
            raise ValueError(
                f"vendors must be a non-empty subset of {sorted(VENDORS)}, got {list(vendors)!r}"
            )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan_rng = np.random.default_rng([seed, 0])
    plan = _study_plan(plan_rng, count)
    records: list[ImageRecord] = []
    bar = tqdm(total=count, desc="phantom", unit="img", disable=not progress)
    base_date = _dt.date(2023, 1, 2)
    try:
        for si, views in enumerate(plan):
            srng = np.random.default_rng([seed, 1, si])
            vendor = vendor_names[int(srng.integers(len(vendor_names)))]
            density = _draw_density(srng, profile)
            prof = VENDORS[vendor]
            ts = (
                JPEG2000Lossless
                if srng.random() < prof.jpeg2000_probability
                else (ExplicitVRLittleEndian)
            )
            photometric = (
                "MONOCHROME1" if srng.random() < prof.monochrome1_probability else "MONOCHROME2"
            )
            date = base_date + _dt.timedelta(days=int(srng.integers(0, 730)))
            age = int(srng.integers(40, 76))
            birth = _dt.date(date.year - age, int(srng.integers(1, 13)), int(srng.integers(1, 29)))
            hh, mm, sec = (
                int(srng.integers(7, 18)),
                int(srng.integers(0, 60)),
                int(srng.integers(0, 60)),
            )
            study = PhantomStudy(
                patient_name=f"PHANTOM^{si + 1:04d}",
                patient_id=f"PH{seed}-{si + 1:04d}",
                patient_birth_date=birth.strftime("%Y%m%d"),
                patient_age=f"{age:03d}Y",
                study_instance_uid=_uid(seed, "study", si),
                study_date=date.strftime("%Y%m%d"),
                study_time=f"{hh:02d}{mm:02d}{sec:02d}",
                accession_number=f"A{seed % 10000:04d}{si + 1:05d}",
                study_id=f"{si + 1}",
            )
            folder = out / f"s{si + 1:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            for vi, (lat, view) in enumerate(views):
                irng = np.random.default_rng([seed, 2, si, vi])
                image = render_image(
                    irng,
                    vendor=vendor,
                    size=size,
                    view=view,  # type: ignore[arg-type]
                    laterality=lat,  # type: ignore[arg-type]
                    density=density,
                    photometric=photometric,
                    transfer_syntax=ts,
                    profile=profile,
                )
                sop = _uid(seed, "image", si, vi)
                ds = phantom_to_dataset(
                    image,
                    study=study,
                    series_instance_uid=_uid(seed, "series", si, vi),
                    sop_instance_uid=sop,
                    instance_number=1,
                    series_number=vi + 1,
                )
                path = folder / f"{lat}-{view}.dcm"
                ds.save_as(path, enforce_file_format=True)
                logger.debug("wrote %s (%s, %d µCs)", sop, vendor, len(image.calcifications))
                records.append(_record(image, path, sop, study.study_instance_uid))
                if preview:
                    _preview(image, out / "previews" / f"s{si + 1:04d}" / f"{lat}-{view}.png")
                bar.update(1)
    finally:
        bar.close()
    manifest = write_manifest(out / "manifest.jsonl", records)
    logger.info("wrote %d phantom images in %d studies to %s", count, len(plan), out)
    return manifest


def _record(image: PhantomImage, path: Path, sop: str, study_uid: str) -> ImageRecord:
    return ImageRecord(
        path=path,
        sop_instance_uid=sop,
        rows=image.rows,
        columns=image.columns,
        pixel_spacing_mm=image.pixel_spacing_mm,
        calcifications=tuple(
            Calcification(x=c.x, y=c.y, diameter_mm=c.diameter_mm, outline=c.outline)
            for c in image.calcifications
        ),
        others=image.others,
        clusters=image.clusters,
        study_instance_uid=study_uid,
        tags=image.tags,
    )
