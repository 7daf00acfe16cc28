"""The ``calcnode`` command: argument parsing only, then calls into the packages.

Every sub-command imports what it needs lazily, so ``calcnode --help`` stays fast
and a node without torch-heavy work does not pay for it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from node import __version__
from node.errors import USER_ERRORS, CalcnodeError

logger = logging.getLogger("calcnode")

Handler = Callable[[argparse.Namespace], int]


def _configure_logging(verbosity: int) -> None:
    from node.logs import install_patient_data_guard

    level = logging.WARNING - 10 * verbosity if verbosity else logging.INFO
    logging.basicConfig(
        level=max(level, logging.DEBUG),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    # No patient data and no control characters in any record, whatever logs it.
    install_patient_data_guard()
    # Codec plugins log every tile at INFO; keep them quiet unless debugging.
    if verbosity < 2:
        for name in ("openjpeg", "libjpeg", "pylibjpeg", "rle"):
            logging.getLogger(name).setLevel(logging.WARNING)


# --------------------------------------------------------------------------- phantom
#: Vendor profiles of ``cascade.synthesis.VENDORS`` (spelled out: the CLI imports lazily).
PHANTOM_VENDORS = ("fuji", "ge", "hologic", "siemens")


def _cmd_phantom(args: argparse.Namespace) -> int:
    from cascade.synthesis import generate_dataset

    manifest = generate_dataset(
        args.out,
        count=args.count,
        seed=args.seed,
        size=args.size,
        vendors=args.vendor,
        preview=args.preview,
        progress=not args.quiet,
        profile=args.profile,
    )
    print(f"wrote {args.count} images ({args.profile} profile) and the manifest {manifest}")
    return 0


def _add_phantom(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "phantom",
        help="render synthetic mammograms (DICOM) with ground truth",
        description="Render physics-based phantom mammograms as MG DICOM studies, with a "
        "ground-truth manifest (JSON Lines) and optional preview PNGs.",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--count", type=int, default=8, help="number of images (default 8)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--size",
        choices=("small", "full"),
        default="small",
        help="small ≈ 10 × 7 cm (fast) or full-field 24 × 18 cm",
    )
    p.add_argument(
        "--vendor",
        action="append",
        choices=PHANTOM_VENDORS,
        help="draw studies only from this vendor profile (repeatable; default: all)",
    )
    p.add_argument(
        "--profile",
        choices=("standard", "wide", "subtle", "faint"),
        default="standard",
        help="sampling distributions: standard (the default, unchanged renders), wide "
        "(harder, wider training data), subtle (lower-contrast, mostly small µCs in dense "
        "tissue, for validation / test) or faint (near the noise floor, a stress set); "
        "see docs/phantom.md",
    )
    p.add_argument("--preview", action="store_true", help="also write PNGs, truth circled")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_phantom)


# --------------------------------------------------------------------------- dataset
def _cmd_dataset_inbreast(args: argparse.Namespace) -> int:
    from cascade.data.inbreast import convert_inbreast

    out = convert_inbreast(xml_dir=args.xml, dicom_dir=args.dicom, out=args.out)
    print(f"wrote {out}")
    return 0


def _add_dataset(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dataset", help="import annotated data sets into a manifest")
    dsub = p.add_subparsers(dest="dataset_command", required=True, metavar="SOURCE")
    ib = dsub.add_parser("inbreast", help="convert INbreast OsiriX XML annotations")
    ib.add_argument("--xml", type=Path, required=True, help="folder of INbreast XML files")
    ib.add_argument("--dicom", type=Path, required=True, help="folder of INbreast DICOM files")
    ib.add_argument("--out", type=Path, required=True, help="manifest to write (.jsonl)")
    ib.set_defaults(func=_cmd_dataset_inbreast)


# --------------------------------------------------------------------------- train
def _cmd_train_asn(args: argparse.Namespace) -> int:
    from cascade.training import preset, train_asn

    overrides: dict[str, object] = {"seed": args.seed}
    if args.loss:
        overrides["loss"] = args.loss
    if args.beta is not None:
        overrides["beta"] = args.beta
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.val_images is not None:
        overrides["val_images"] = args.val_images
    if args.iterations is not None:
        overrides["iterations_per_epoch"] = args.iterations
    try:
        config = preset(args.preset, **overrides)
    except ValueError as exc:  # an unknown preset: a usage error, not a bug
        raise SystemExit(f"calcnode: error: {exc}") from exc
    model_config = {**config.model_config}
    if args.width is not None:
        model_config["width"] = args.width
    if args.head is not None:
        model_config["head"] = args.head
    config = dataclasses.replace(config, model_config=model_config)
    best = train_asn(
        manifest=args.manifest,
        val_manifest=args.val_manifest,
        out=args.out,
        config=config,
        resume=args.resume,
        device=args.device,
        progress=not args.quiet,
    )
    print(f"best checkpoint: {best}")
    return 0


def _cmd_train_fpr(args: argparse.Namespace) -> int:
    from cascade.training import fpr_preset, train_fpr

    overrides: dict[str, object] = {"seed": args.seed}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.val_images is not None:
        overrides["val_images"] = args.val_images
    if args.lr is not None:
        overrides["lr"] = args.lr
    if args.optimizer is not None:
        overrides["optimizer"] = args.optimizer
    if args.other_negatives:
        overrides["other_negatives"] = tuple(args.other_negatives)
    try:
        config = fpr_preset(args.preset, **overrides)
    except ValueError as exc:  # an unknown preset: a usage error, not a bug
        raise SystemExit(f"calcnode: error: {exc}") from exc
    best = train_fpr(
        manifest=args.manifest,
        val_manifest=args.val_manifest,
        asn_checkpoint=args.asn,
        out=args.out,
        config=config,
        resume=args.resume,
        device=args.device,
        progress=not args.quiet,
    )
    print(f"best checkpoint: {best}")
    return 0


def _cmd_train_export(args: argparse.Namespace) -> int:
    from cascade.inference.weights import export_weights

    out = export_weights(asn=args.asn, fpr=args.fpr, out=args.out)
    print(f"wrote {out}/asn.pt, fpr.pt and weights.json")
    return 0


def _cmd_train_calibrate(args: argparse.Namespace) -> int:
    from cascade.inference.weights import calibrate_weights

    op = calibrate_weights(
        args.weights,
        args.manifest,
        target_fp_per_image=args.target_fp,
        fpr_threshold=args.fpr_threshold,
        max_detections=args.max_detections,
        device=args.device,
        progress=not args.quiet,
        target_cluster_fp=args.target_cluster_fp,
        cluster_fp_per=args.cluster_fp_per,
    )
    cal = op.calibration
    if args.target_cluster_fp is not None:
        fn = cal["false_cluster_marks_per_normal_image"]
        print(
            f"cluster-level target {args.target_cluster_fp:g} false cluster marks per "
            f"{args.cluster_fp_per.replace('-', ' ')}: cluster sensitivity "
            f"{100 * cal['cluster_sensitivity']:.1f} % ({cal['truth_clusters_found']}/"
            f"{cal['n_truth_clusters']}), {cal['false_cluster_marks_per_image']:.3f} false "
            f"cluster marks per image, {'–' if fn is None else f'{fn:.3f}'} per normal image"
        )
    print(
        f"operating point stored in {args.weights}/weights.json: FPR probability ≥ "
        f"{op.fpr_threshold:g}, final score ≥ {op.min_score:.4g} → {cal['fp_per_image']:.2f} "
        f"false positives per image, recall {100 * cal['recall']:.1f} % of "
        f"{cal['calcifications']} µCs in {cal['images']} images"
    )
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the ASN or the FPR network")
    tsub = p.add_subparsers(dest="train_command", required=True, metavar="STAGE")

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--manifest", type=Path, required=True, help="training manifest (.jsonl)")
        q.add_argument(
            "--val-manifest",
            type=Path,
            help="validation manifest (default: a held-out 20 %% of the training studies)",
        )
        q.add_argument("--out", type=Path, required=True, help="run folder for checkpoints")
        q.add_argument("--preset", default="cpu", help="tiny | cpu | paper (default cpu)")
        q.add_argument("--epochs", type=int, help="override the preset's number of epochs")
        q.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
        q.add_argument("--resume", type=Path, help="continue from this last.pt")
        q.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
        q.add_argument("--quiet", action="store_true", help="no progress bars")
        q.add_argument(
            "--val-images",
            type=int,
            help="validation images scored after each epoch (default: the preset's)",
        )

    asn = tsub.add_parser("asn", help="train the anomaly separation network (U-Net)")
    common(asn)
    asn.add_argument(
        "--loss",
        choices=("ttest", "ttest_novar", "mse", "ce"),
        help="ttest (the paper), ttest_novar, mse or ce (the U-Net baseline)",
    )
    asn.add_argument("--beta", type=float, help="t-test margin β (the paper: 0.8)")
    asn.add_argument("--iterations", type=int, help="iterations per epoch")
    asn.add_argument("--width", type=int, help="U-Net width (channels of the first stage)")
    asn.add_argument(
        "--head",
        choices=("sigmoid", "residual"),
        help="output head: sigmoid (the paper; paper preset) or residual (starts as the "
        "identity; cpu preset)",
    )
    asn.set_defaults(func=_cmd_train_asn)

    fpr = tsub.add_parser("fpr", help="train the false-positive reduction ResNet-50")
    common(fpr)
    fpr.add_argument("--asn", type=Path, required=True, help="ASN checkpoint giving candidates")
    fpr.add_argument("--lr", type=float, help="learning rate (the paper: SGD at 1e-3)")
    fpr.add_argument(
        "--optimizer",
        choices=("sgd", "adam"),
        help="sgd (the paper, with momentum; paper preset) or adam (cpu preset)",
    )
    fpr.add_argument(
        "--other-negatives",
        action="append",
        metavar="KIND",
        help="also train on negatives every 1 mm along the manifest's 'other' findings of "
        "this kind, e.g. vascular (repeatable)",
    )
    fpr.set_defaults(func=_cmd_train_fpr)

    exp = tsub.add_parser(
        "export", help="write inference-only weights (asn.pt, fpr.pt, weights.json) to a folder"
    )
    exp.add_argument("--asn", type=Path, required=True, help="trained ASN checkpoint")
    exp.add_argument("--fpr", type=Path, help="trained FPR checkpoint")
    exp.add_argument(
        "--out",
        type=Path,
        required=True,
        help="weights folder (cascade/weights for the bundled ones)",
    )
    exp.set_defaults(func=_cmd_train_export)

    cal = tsub.add_parser(
        "calibrate",
        help="choose a weights folder's operating point on validation images",
        description="Run the folder's cascade on a validation manifest, drop what the FPR "
        "calls false positives and store in weights.json the final-score threshold that "
        "leaves at most --target-fp false positives per image (1-mm rule). The node and "
        "calcnode detect report at this operating point.",
    )
    cal.add_argument("--weights", type=Path, required=True, help="weights folder (train export)")
    cal.add_argument("--manifest", type=Path, required=True, help="validation manifest (.jsonl)")
    cal.add_argument(
        "--target-fp", type=float, default=1.0, help="false positives per image (default 1)"
    )
    cal.add_argument(
        "--target-cluster-fp",
        type=float,
        help="calibrate for a cluster-level target instead: at most this many false cluster "
        "marks (CAD SR grouping) per image, or per normal image with --cluster-fp-per; the "
        "most sensitive such threshold (truth clusters found) is stored",
    )
    cal.add_argument(
        "--cluster-fp-per",
        choices=("image", "normal-image"),
        default="image",
        help="denominator of --target-cluster-fp (default image)",
    )
    cal.add_argument(
        "--fpr-threshold",
        type=float,
        default=0.5,
        help="drop candidates whose FPR probability is below this (default 0.5)",
    )
    cal.add_argument(
        "--max-detections", type=int, default=0, help="at most this many per image (0: no limit)"
    )
    cal.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    cal.add_argument("--quiet", action="store_true", help="no progress bar")
    cal.set_defaults(func=_cmd_train_calibrate)


# --------------------------------------------------------------------------- detect
#: Written beside detections.json when an operating point filtered the detections.
OPERATING_POINT_FILE = "operating_point.json"


def _detector(args: argparse.Namespace, *, calibrated: bool) -> Any:
    """The bundled detector or ``--asn``/``--fpr``.

    With ``calibrated`` it reports at the operating point calibrated on these checkpoints
    (``weights.json`` beside ``--asn``), else at the FPR's decision alone
    (:meth:`cascade.inference.weights.ModelWeights.operating_point`); without, every
    candidate.
    """
    from cascade.inference.detector import Detector
    from cascade.inference.weights import ModelWeights

    if args.asn is None:
        if args.fpr is not None:
            raise CalcnodeError("--fpr needs --asn (without both: the bundled weights)")
        weights = ModelWeights.bundled_weights()
    else:
        weights = ModelWeights.at(args.asn, args.fpr)
    op = weights.operating_point() if calibrated else None
    return Detector.from_weights(weights, device=args.device, operating_point=op)


def _cmd_detect(args: argparse.Namespace) -> int:
    import json

    from cascade.inference.preview import write_detection_preview

    files: list[Path] = []
    for item in args.inputs:
        if item.is_dir():
            files.extend(sorted(p for p in item.rglob("*.dcm") if p.is_file()))
        else:
            files.append(item)
    if not files:
        raise CalcnodeError("no input files (give DICOM files or folders holding *.dcm)")
    detector = _detector(args, calibrated=not args.all_candidates)
    op = detector.operating_point
    if op is None:
        logger.info("reporting every scored candidate (--all-candidates)")
    else:
        logger.info(
            "operating point: FPR probability ≥ %g, final score ≥ %.4g, at most %s per image",
            op.fpr_threshold,
            op.min_score,
            op.max_detections or "any number",
        )
    args.out.mkdir(parents=True, exist_ok=True)
    images = []
    for path in files:
        result = detector.detect(path)
        images.append(result.to_json())
        logger.info("%s: %d detections", result.sop_instance_uid, len(result.detections))
        if args.preview:
            write_detection_preview(
                path,
                result,
                args.out / "previews" / f"{result.sop_instance_uid}.png",
                min_score=args.preview_min_score,
            )
    out = args.out / "detections.json"
    out.write_text(json.dumps({"images": images}, indent=1))
    # detections.json keeps its documented shape; what filtered it is recorded beside it.
    op_file = args.out / OPERATING_POINT_FILE
    if op is None:
        op_file.unlink(missing_ok=True)
    else:
        op_file.write_text(json.dumps(op.to_json(), indent=1))
    print(
        f"wrote {out} ({sum(len(i['detections']) for i in images)} detections, "
        f"{len(images)} images)"
    )
    return 0


def _add_detect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("detect", help="run the cascade on DICOM files, write detections.json")
    p.add_argument("inputs", nargs="+", type=Path, metavar="FILE|DIR")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--preview", action="store_true", help="also write PNGs with circles")
    p.add_argument(
        "--all-candidates",
        action="store_true",
        help="report every scored candidate (for FROC) instead of the weights' operating point",
    )
    p.add_argument(
        "--preview-min-score",
        type=float,
        default=0.0,
        help="circle only detections scoring at least this",
    )
    p.add_argument("--asn", type=Path, help="ASN checkpoint (default: bundled weights)")
    p.add_argument("--fpr", type=Path, help="FPR checkpoint (default: bundled weights)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.set_defaults(func=_cmd_detect)


# --------------------------------------------------------------------------- evaluate
def _evaluate_operating_point(args: argparse.Namespace) -> Any:
    """The point ``calcnode evaluate`` reports at, besides the whole curve.

    ``--operating-point FILE``; else, for ``--detections``, the ``operating_point.json``
    beside it (``calcnode detect`` writes one when a point filtered the detections);
    else the weights' point (bundled or ``--asn``/``--fpr``: the stored calibrated one, or
    the FPR's decision alone).
    """
    import json

    from cascade.evaluation.operating_point import OperatingPoint
    from cascade.inference.weights import ModelWeights

    path = args.operating_point
    if path is None and args.detections is not None:
        beside = args.detections.parent / OPERATING_POINT_FILE
        path = beside if beside.is_file() else None
    if path is not None:
        try:
            return OperatingPoint.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise CalcnodeError(f"{path}: not an operating point: {exc}") from None
    if args.asn is None:
        if args.fpr is not None:
            raise CalcnodeError("--fpr needs --asn (without both: the bundled weights)")
        weights = ModelWeights.bundled_weights()
    else:
        weights = ModelWeights.at(args.asn, args.fpr)
    return weights.operating_point()


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    import numpy as np

    from cascade.data.io import read_mammogram
    from cascade.data.manifest import read_manifest
    from cascade.data.preprocess import preprocess_mammogram
    from cascade.evaluation.bins import measure_contrast
    from cascade.evaluation.froc import froc_table, plot_froc
    from cascade.evaluation.summary import evaluate_detections

    records = read_manifest(args.manifest)
    if args.detections is not None:
        detections = json.loads(args.detections.read_text())
        if (args.detections.parent / OPERATING_POINT_FILE).is_file():
            logger.warning(
                "%s holds only what an operating point kept (%s beside it): its FROC curve "
                "stops there; `calcnode detect --all-candidates` writes the whole curve",
                args.detections,
                OPERATING_POINT_FILE,
            )
    else:
        detector = _detector(args, calibrated=False)
        detections = {"images": [detector.detect(r.path).to_json() for r in records]}
    op = _evaluate_operating_point(args)
    areas = {}
    contrasts = {}
    for rec in records:
        pre = preprocess_mammogram(read_mammogram(rec.path))
        sr, sc = pre.transform.work_spacing_mm
        areas[rec.sop_instance_uid] = float(pre.breast_mask.sum()) * sr * sc / 100.0
        xy = np.array([[c.x, c.y] for c in rec.calcifications], float).reshape(-1, 2)
        contrasts[rec.sop_instance_uid] = measure_contrast(
            pre.image,
            pre.breast_mask,
            pre.transform.to_work(xy),
            [c.diameter_mm for c in rec.calcifications],
            spacing_mm=sr,
        )
    evaluation = evaluate_detections(
        records,
        detections,
        operating_point=op,
        breast_areas_cm2=areas,
        contrasts=contrasts,
        use_ignore=args.ignore_others,
        truth=args.truth_clusters,
    )
    result = evaluation.froc
    args.out.mkdir(parents=True, exist_ok=True)
    # froc.json: the FrocResult's keys (FrocResult.from_json reads it) plus the clusters,
    # the recall per bin and the operating point.
    (args.out / "froc.json").write_text(
        json.dumps({**result.to_json(), **evaluation.to_json()}, indent=1)
    )
    plot_froc({args.label: result}, args.out / "froc.png", title=str(args.manifest))
    table = froc_table({args.label: result}, ks=(0.5, 1, 2, 5, 10, 15, 20))
    text = table + "\n" + evaluation.text()
    (args.out / "froc.md").write_text(text + "\n")
    print(text)
    print(
        f"{result.n_truth} µCs in {result.n_images} images; wrote {args.out}/froc.json, "
        "froc.png, froc.md"
    )
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="FROC of detections against a manifest (1-mm rule), cluster sensitivity, "
        "recall per size and contrast bin",
        description="FROC with the paper's rule: a µC is recalled when a detection lies within "
        "1 mm; other detections are false positives. Beside it, cluster-level figures with the "
        "CAD SR's grouping (a truth cluster is found when a reported cluster holds >= 2 of its "
        "µCs; false cluster marks per image and per normal image) and µC recall per size and "
        "contrast bin, at the FROC points R@1 and R@5 and at the operating point. Evaluates a "
        "detections.json, or runs the detector (bundled weights or --asn/--fpr) on the "
        "manifest's images.",
    )
    p.add_argument("--manifest", type=Path, required=True, help="ground truth (.jsonl)")
    p.add_argument("--detections", type=Path, help="detections.json from calcnode detect")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--label", default="calcnode", help="curve label in plot and table")
    p.add_argument(
        "--ignore-others",
        action="store_true",
        help="detections on non-µC calcifications count neither way",
    )
    p.add_argument(
        "--operating-point",
        type=Path,
        help="operating_point.json to report at (default: the one beside --detections, "
        "else the weights' stored point)",
    )
    p.add_argument(
        "--truth-clusters",
        choices=("auto", "outlines", "rule"),
        default="auto",
        help="truth clusters from the manifest's cluster outlines, or the report's own "
        "grouping (5 mm, ≥ 3) of the truth µCs (auto: outlines when the manifest has any)",
    )
    p.add_argument("--asn", type=Path, help="ASN checkpoint (default: bundled weights)")
    p.add_argument("--fpr", type=Path, help="FPR checkpoint (default: bundled weights)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.set_defaults(func=_cmd_evaluate)


# --------------------------------------------------------------------------- node
def _settings(args: argparse.Namespace, **overrides: object):
    from node.settings import load_settings

    return load_settings(
        args.config, overrides={k: v for k, v in overrides.items() if v is not None}
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    from node.service import serve

    settings = _settings(args, **{"worker.count": args.workers, "model.device": args.device})
    return serve(settings, workers=args.workers)


def _cmd_worker(args: argparse.Namespace) -> int:
    from node.logs import configure_logging
    from node.worker import run_worker

    settings = _settings(args, **{"model.device": args.device})
    configure_logging(settings)  # levels as under serve (pynetdicom held quiet)
    return run_worker(settings, device=args.device)


def _cmd_status(args: argparse.Namespace) -> int:
    import json

    from node.service import format_status, status

    if not args.verbose:  # stdout is the report (JSON with --json): no INFO lines in it
        logging.getLogger().setLevel(logging.WARNING)
    info = status(_settings(args))
    print(json.dumps(info, indent=1, default=str) if args.json else format_status(info))
    return 0


def _cmd_jobs_retry(args: argparse.Namespace) -> int:
    from node.service import retry_job

    info = retry_job(_settings(args), args.job_id)
    print(f"job {args.job_id} queued again: {info}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from node.demo import run_demo

    return run_demo(args.out)


def _add_node(sub: argparse._SubParsersAction) -> None:
    def config(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--config",
            type=Path,
            help="TOML configuration (default: built-in "
            "defaults; $CALCNODE_CONFIG); conf.d/*.toml beside it are read too",
        )

    p = sub.add_parser("serve", help="run the node: SCP, scheduler and worker processes")
    config(p)
    p.add_argument(
        "--workers",
        type=int,
        help="worker processes (default worker.count; 0 when workers run as their own units)",
    )
    p.add_argument("--device", help="model device for the workers: auto | cpu | cuda:N")
    p.set_defaults(func=_cmd_serve)

    w = sub.add_parser("worker", help="run one worker process (claims jobs, runs the cascade)")
    config(w)
    w.add_argument("--device", help="auto | cpu | cuda | cuda:N (default model.device)")
    w.set_defaults(func=_cmd_worker)

    st = sub.add_parser("status", help="queue, studies, sends and recent errors")
    config(st)
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=_cmd_status)

    j = sub.add_parser("jobs", help="administer jobs")
    jsub = j.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    jr = jsub.add_parser("retry", help="queue a failed job again (attempts reset)")
    config(jr)
    jr.add_argument("job_id", type=int, metavar="ID")
    jr.set_defaults(func=_cmd_jobs_retry)

    d = sub.add_parser("demo", help="end-to-end showcase on phantom studies (make demo)")
    d.add_argument("--out", type=Path, default=Path("demo-out"), help="work folder")
    d.set_defaults(func=_cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``calcnode`` with all sub-commands."""
    parser = argparse.ArgumentParser(
        prog="calcnode",
        description="Microcalcification detection for mammograms, as a DICOM node. "
        "Research software trained on synthetic phantoms: not for clinical use.",
    )
    parser.add_argument("--version", action="version", version=f"calcnode {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_phantom,
        _add_dataset,
        _add_train,
        _add_detect,
        _add_evaluate,
        _add_node,
    ):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``calcnode`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return int(args.func(args))
    except USER_ERRORS as exc:
        print(f"calcnode: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
