"""The weights a detector runs: where they are, what they are, and what they report.

One owner for everything about a pair of checkpoints (ASN + optional FPR):

- **finding** them: :meth:`ModelWeights.bundled` (shipped in ``cascade/weights/``) or
  :meth:`ModelWeights.at` (an ASN checkpoint, its FPR beside it as ``fpr.pt``);
- **hashing** them, once, when a :class:`ModelWeights` is made;
- their **identity**: :attr:`ModelWeights.version` (sha256 prefixes) and
  :meth:`ModelWeights.identity`, which folds in the operating point (the same
  checkpoints reporting other findings are another model to a PACS);
- **exporting** trained checkpoints as a weights folder (:func:`export_weights`) and
  **calibrating** its operating point on validation images (:func:`calibrate_weights`),
  stored in ``weights.json`` with the sha256 of the checkpoints it was chosen on, and
  read back only for those checkpoints (:meth:`ModelWeights.stored_operating_point`).

A weights folder::

    asn.pt        the proposal network (ASN or cross-entropy U-Net)
    fpr.pt        the FPR ResNet (optional)
    weights.json  intended use, per-model metadata and sha256, the operating point
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cascade import __version__
from cascade.errors import CalibrationError, CheckpointError
from cascade.evaluation.operating_point import OperatingPoint, calibrate_operating_point

logger = logging.getLogger(__name__)

__all__ = [
    "BUNDLED_WEIGHTS",
    "INTENDED_USE",
    "ModelIdentity",
    "ModelWeights",
    "calibrate_weights",
    "export_weights",
    "read_operating_point",
]

#: Folder of the weights shipped in the package (trained on synthetic phantoms only).
BUNDLED_WEIGHTS = Path(__file__).resolve().parent.parent / "weights"

#: Written into every checkpoint and the bundled weights' metadata.
INTENDED_USE = (
    "Research software. Trained on synthetic phantom mammograms only (calcnode phantom); "
    "never validated on patient images. Not for clinical use."
)

WEIGHTS_JSON = "weights.json"


@dataclass(frozen=True, kw_only=True)
class ModelIdentity:
    """What a model that reports findings is called, for provenance.

    Attributes
    ----------
    version : str
        Human-readable: sha256 prefixes of the checkpoints, plus ``" op <8 hex>"`` when
        an operating point decides what is reported.
    sha256 : str
        64 hex digits; changes with every checkpoint and every operating point (the
        node derives its Device UID from it).
    """

    version: str
    sha256: str

    def __post_init__(self) -> None:
        if not isinstance(self.version, str) or not self.version:
            raise ValueError(f"ModelIdentity.version must be a non-empty str, got {self.version!r}")
        if not (
            isinstance(self.sha256, str)
            and len(self.sha256) == 64
            and all(c in "0123456789abcdef" for c in self.sha256)
        ):
            raise ValueError(f"ModelIdentity.sha256 must be 64 hex digits, got {self.sha256!r}")

    def with_operating_point(self, op: OperatingPoint | None) -> ModelIdentity:
        """This identity including what ``op`` reports (thresholds and cap, not its
        descriptive ``calibration``); unchanged when ``op`` is None."""
        if op is None:
            return self
        tag = hashlib.sha256(json.dumps(op.thresholds_json(), sort_keys=True).encode()).hexdigest()
        combined = hashlib.sha256(f"{self.sha256}:{tag}".encode()).hexdigest()
        return ModelIdentity(version=f"{self.version} op {tag[:8]}", sha256=combined)


@dataclass(frozen=True, kw_only=True)
class ModelWeights:
    """A pair of checkpoint files and their digests (computed once, at construction).

    Use :meth:`bundled` or :meth:`at`; the constructor checks that the files exist and
    hashes them when the digests are not given.

    Attributes
    ----------
    asn : Path
        Proposal-network checkpoint.
    fpr : Path or None
        FPR checkpoint (None: ASN proposals alone).
    asn_sha256, fpr_sha256 : str
        SHA-256 of the files (``fpr_sha256`` is ``""`` without an FPR).
    bundled : bool
        Whether these are the weights shipped with calcnode.
    """

    asn: Path
    fpr: Path | None = None
    bundled: bool = False
    asn_sha256: str = ""
    fpr_sha256: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "asn", Path(self.asn))
        if self.fpr is not None:
            object.__setattr__(self, "fpr", Path(self.fpr))
        if not self.asn_sha256:
            object.__setattr__(self, "asn_sha256", _file_sha256(self.asn))
        if self.fpr is not None and not self.fpr_sha256:
            object.__setattr__(self, "fpr_sha256", _file_sha256(self.fpr))
        if self.fpr is None and self.fpr_sha256:
            raise ValueError("ModelWeights.fpr_sha256 given without an fpr checkpoint")

    @classmethod
    def bundled_weights(cls) -> ModelWeights:
        """The weights shipped with calcnode (synthetic phantoms only: not for clinical use).

        Raises
        ------
        CheckpointError
            This installation has no bundled ``asn.pt``.
        """
        asn = BUNDLED_WEIGHTS / "asn.pt"
        if not asn.is_file():
            raise CheckpointError(f"no bundled ASN weights at {asn}")
        fpr = BUNDLED_WEIGHTS / "fpr.pt"
        return cls(asn=asn, fpr=fpr if fpr.is_file() else None, bundled=True)

    @classmethod
    def at(
        cls,
        asn: str | os.PathLike[str],
        fpr: str | os.PathLike[str] | None = None,
        *,
        fpr_beside: bool = False,
    ) -> ModelWeights:
        """The checkpoints at these paths.

        Parameters
        ----------
        asn : path
            Proposal-network checkpoint.
        fpr : path or None
            FPR checkpoint.
        fpr_beside : bool
            With ``fpr`` None: take ``fpr.pt`` in the ASN's folder when there is one
            (how the node finds its FPR from ``model.path``).

        Raises
        ------
        CheckpointError
            A named file does not exist.
        """
        asn = Path(asn)
        if fpr is None and fpr_beside:
            beside = asn.parent / "fpr.pt"
            fpr = beside if beside.is_file() and beside.resolve() != asn.resolve() else None
        bundled = asn.resolve() == (BUNDLED_WEIGHTS / "asn.pt").resolve()
        return cls(asn=asn, fpr=None if fpr is None else Path(fpr), bundled=bundled)

    @property
    def folder(self) -> Path:
        """The folder of the ASN checkpoint (where ``weights.json`` is looked for)."""
        return self.asn.parent

    @property
    def version(self) -> str:
        """A short identifier: sha256 prefixes of both checkpoints (``"<12 hex>-<12 hex>"``)."""
        return "-".join(h[:12] for h in (self.asn_sha256, self.fpr_sha256) if h)

    @property
    def sha256(self) -> str:
        """The pair's identity: the ASN's sha256, or sha256 of ``"<asn>:<fpr>"`` with an FPR."""
        if not self.fpr_sha256:
            return self.asn_sha256
        return hashlib.sha256(f"{self.asn_sha256}:{self.fpr_sha256}".encode()).hexdigest()

    def identity(self, op: OperatingPoint | None = None) -> ModelIdentity:
        """The model's identity, including what ``op`` reports."""
        return ModelIdentity(version=self.version, sha256=self.sha256).with_operating_point(op)

    def stored_operating_point(self) -> OperatingPoint | None:
        """The point stored in ``weights.json`` beside the ASN if calibrated on these files.

        A point is calibrated on one pair of checkpoints' scores; its ``calibration``
        records their sha256 (``calcnode train calibrate`` writes them). Returns None,
        with a warning, when the stored point was calibrated on other files (or does not
        say on which), and None when there is none.

        Raises
        ------
        CheckpointError
            ``weights.json`` exists but holds an unusable operating point.
        """
        stored = read_operating_point(self.folder)
        if stored is None:
            return None
        have = (
            str(stored.calibration.get("asn_sha256", "")),
            str(stored.calibration.get("fpr_sha256", "")),
        )
        if have != (self.asn_sha256, self.fpr_sha256):
            logger.warning(
                "the operating point in %s/%s was calibrated on other checkpoints than %s and "
                "%s; not used (calcnode train calibrate)",
                self.folder,
                WEIGHTS_JSON,
                self.asn.name,
                self.fpr.name if self.fpr is not None else "no FPR",
            )
            return None
        return stored

    def operating_point(self) -> OperatingPoint:
        """The calibrated point of these checkpoints, else the FPR's decision alone.

        :meth:`stored_operating_point` when it finds one; otherwise ``OperatingPoint()``
        (FPR probability ≥ 0.5, no score threshold), with a warning. ``calcnode detect``,
        :meth:`cascade.inference.detector.Detector.bundled` and the node all resolve it
        this way.
        """
        op = self.stored_operating_point()
        if op is None:
            op = OperatingPoint()
            logger.warning(
                "no calibrated operating point for %s: reporting what the FPR keeps "
                "(probability ≥ %.2f) with no score threshold",
                self.folder,
                op.fpr_threshold,
            )
        return op


def read_operating_point(folder: str | os.PathLike[str]) -> OperatingPoint | None:
    """The operating point stored in ``folder/weights.json``, or None if there is none.

    Does not check which checkpoints it was calibrated on
    (:meth:`ModelWeights.stored_operating_point` does).

    Raises
    ------
    CheckpointError
        ``weights.json`` exists but cannot be read or holds a bad operating point.
    """
    path = Path(folder) / WEIGHTS_JSON
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        op = data.get("operating_point")
        return None if op is None else OperatingPoint.from_json(op)
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: unusable operating point: {exc}") from exc


def export_weights(
    *,
    asn: str | Path,
    fpr: str | Path | None,
    out: str | Path,
    notes: Mapping[str, Any] | None = None,
) -> Path:
    """Write inference-only copies of trained checkpoints as a weights folder.

    The folder holds ``asn.pt``, ``fpr.pt`` (when given) and ``weights.json``: what the
    weights are, their sha256, how they were trained and the intended-use notice
    (synthetic phantoms only — not for clinical use). This is how the bundled weights
    in ``cascade/weights/`` are made.
    """
    from cascade.models.checkpoint import describe_checkpoint, export_checkpoint

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"asn": export_checkpoint(asn, out / "asn.pt", intended_use=INTENDED_USE)}
    if fpr is not None:
        files["fpr"] = export_checkpoint(fpr, out / "fpr.pt", intended_use=INTENDED_USE)
    record: dict[str, Any] = {
        "intended_use": INTENDED_USE,
        "calcnode_version": __version__,
        "notes": dict(notes or {}),
        "models": {},
    }
    for name, path in files.items():
        d = describe_checkpoint(path)
        record["models"][name] = {
            "file": path.name,
            "sha256": d["file"]["sha256"],
            "size_bytes": d["file"]["size_bytes"],
            "kind": d.get("kind"),
            "model_name": d.get("model_name"),
            "model_config": d.get("model_config"),
            "preprocessing": d.get("preprocessing"),
            "training": d.get("training"),
            "data": d.get("data"),
            "metrics": d.get("metrics"),
        }
    _write_json(out / WEIGHTS_JSON, record)
    return out


def calibrate_weights(
    folder: str | Path,
    manifest: str | Path,
    *,
    target_fp_per_image: float = 1.0,
    fpr_threshold: float = 0.5,
    max_detections: int = 0,
    device: str = "auto",
    progress: bool = True,
    target_cluster_fp: float | None = None,
    cluster_fp_per: str = "image",
) -> OperatingPoint:
    """Choose a weights folder's operating point on validation images; store it.

    With ``target_cluster_fp`` the threshold is chosen for a cluster-level target
    instead (false cluster marks per image or per normal image, ``cluster_fp_per``;
    :func:`cascade.evaluation.operating_point.calibrate_operating_point`).

    Runs the folder's cascade (``asn.pt``, ``fpr.pt``) on every image of ``manifest``,
    drops candidates the FPR calls false positives (probability < ``fpr_threshold``)
    and picks the final-score threshold that leaves at most ``target_fp_per_image``
    false positives per image (1-mm rule). The result goes into ``weights.json`` as
    ``operating_point`` (the checkpoints are not touched) and is returned. Use images
    no model was trained on.

    Raises
    ------
    CheckpointError
        No ``weights.json`` or ``asn.pt`` in the folder.
    CalibrationError
        A bad target or threshold, or an empty manifest.
    """
    from cascade.data.manifest import read_manifest
    from cascade.inference.detector import Detector

    if not (
        isinstance(target_fp_per_image, (int, float))
        and target_fp_per_image > 0
        and math.isfinite(target_fp_per_image)
    ):
        raise CalibrationError(f"target_fp_per_image must be positive, got {target_fp_per_image!r}")
    try:  # the other options, checked before the cascade runs on every image
        OperatingPoint(fpr_threshold=fpr_threshold, max_detections=max_detections)
    except (TypeError, ValueError) as exc:
        raise CalibrationError(str(exc)) from None
    folder = Path(folder)
    meta_path, asn, fpr = folder / WEIGHTS_JSON, folder / "asn.pt", folder / "fpr.pt"
    if not meta_path.is_file() or not asn.is_file():
        raise CheckpointError(f"{folder}: not a weights folder (needs weights.json and asn.pt)")
    records = read_manifest(manifest)
    if not records:
        raise CalibrationError(f"{manifest}: no images to calibrate on")
    weights = ModelWeights.at(asn, fpr if fpr.is_file() else None)
    # every candidate, scored (no operating point): the curve the threshold is chosen on
    detector = Detector(weights.asn, weights.fpr, device=device)
    iterator: Any = records
    if progress:
        from tqdm import tqdm

        iterator = tqdm(records, desc="calibrating", unit="image")
    results = [
        (
            detector.detect(rec.path),
            np.array([[c.x, c.y] for c in rec.calcifications], dtype=np.float64).reshape(-1, 2),
        )
        for rec in iterator
    ]
    op = calibrate_operating_point(
        results,
        target_fp_per_image=target_fp_per_image,
        fpr_threshold=fpr_threshold,
        max_detections=max_detections,
        target_cluster_fp=target_cluster_fp,
        cluster_fp_per=cluster_fp_per,
        description={
            "asn_sha256": weights.asn_sha256,
            "fpr_sha256": weights.fpr_sha256,
            "manifest": str(manifest),
            "source": "synthetic phantoms (calcnode phantom) unless the manifest says otherwise",
        },
    )
    record = json.loads(meta_path.read_text(encoding="utf-8"))
    record["operating_point"] = op.to_json()
    _write_json(meta_path, record)
    logger.info(
        "operating point of %s: FPR ≥ %.2f, score ≥ %.4g → %.2f FP/image, recall %.3f on %d images",
        folder,
        op.fpr_threshold,
        op.min_score,
        op.calibration["fp_per_image"],
        op.calibration["recall"],
        op.calibration["images"],
    )
    return op


def _file_sha256(path: Path) -> str:
    """SHA-256 of a checkpoint file, lowercase hex, read with hashlib alone.

    The same digest as :func:`cascade.models.checkpoint.checkpoint_sha256`, without
    importing torch: the node's main process hashes the weights at start-up and never
    loads them.

    Raises
    ------
    CheckpointError
        The file does not exist.
    """
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_json(path: Path, record: Mapping[str, Any]) -> None:
    """Write ``record`` to ``path`` atomically (temporary file, then rename)."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)
