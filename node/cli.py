"""The ``calcnode`` command: argument parsing only, then calls into the packages.

Every sub-command imports what it needs lazily, so ``calcnode --help`` stays fast
and a node without torch-heavy work does not pay for it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from cascade._version import __version__
from cascade.errors import CalcnodeError

logger = logging.getLogger("calcnode")

Handler = Callable[[argparse.Namespace], int]


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING - 10 * verbosity if verbosity else logging.INFO
    logging.basicConfig(
        level=max(level, logging.DEBUG),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )


# --------------------------------------------------------------------------- phantom
def _cmd_phantom(args: argparse.Namespace) -> int:
    from cascade.phantom import generate_dataset

    manifest = generate_dataset(
        args.out,
        count=args.count,
        seed=args.seed,
        size=args.size,
        preview=args.preview,
        progress=not args.quiet,
    )
    print(f"wrote {args.count} images and the manifest {manifest}")
    return 0


def _add_phantom(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "phantom",
        help="render synthetic mammograms (DICOM) with ground truth",
        description="Render physics-based phantom mammograms as MG DICOM studies, with a "
        "ground-truth manifest (JSON Lines) and optional preview PNGs.",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--count", type=int, default=8, help="number of images (default 8)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--size", choices=("small", "full"), default="small",
                   help="small ≈ 10 × 7 cm (fast) or full-field 24 × 18 cm")
    p.add_argument("--preview", action="store_true", help="also write PNGs, truth circled")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_phantom)


# --------------------------------------------------------------------------- dataset
def _cmd_dataset_inbreast(args: argparse.Namespace) -> int:
    from cascade.inbreast import convert_inbreast

    out = convert_inbreast(xml_dir=args.xml, dicom_dir=args.dicom, out=args.out)
    print(f"wrote {out}")
    return 0


def _add_dataset(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("dataset", help="import annotated data sets into a manifest")
    dsub = p.add_subparsers(dest="dataset_command", required=True, metavar="SOURCE")
    ib = dsub.add_parser("inbreast", help="convert INbreast OsiriX XML annotations")
    ib.add_argument("--xml", type=Path, required=True, help="folder of INbreast XML files")
    ib.add_argument("--dicom", type=Path, required=True, help="folder of INbreast DICOM files")
    ib.add_argument("--out", type=Path, required=True, help="manifest to write (.jsonl)")
    ib.set_defaults(func=_cmd_dataset_inbreast)


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
    for add in (_add_phantom, _add_dataset):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``calcnode`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return int(args.func(args))
    except CalcnodeError as exc:
        print(f"calcnode: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
