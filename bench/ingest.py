"""C-STORE ingest throughput: calcnode's SCP beside DCMTK's ``storescp``.

The same files (``--count`` full-field phantom-like MG images, uncompressed, 16-bit,
``--rows`` × ``--columns``; the default 3328 × 2560 is an 18 × 24 cm detector at 70 µm,
≈ 17 MB per image) are sent by the same sender, DCMTK ``storescu`` (one association,
all files), once to each receiver on a loopback port:

* **calcnode** — :class:`node.scp.StorageSCP` in this process: header check, durable
  write (temporary file, fsync, rename, directory fsync), SQLite job commit
  (``synchronous=FULL``) before each response;
* **storescp** — DCMTK's reference SCP writing files to a folder (no fsync, no
  database): the upper bound of what the wire and the disk allow.

Timing is the wall-clock time of the ``storescu`` process (association to release).
Writes ``bench/results/ingest.json`` and prints a Markdown table. Loopback only;
each transfer is bounded by ``--timeout`` seconds. Run from the repository root:
``.venv/bin/python bench/ingest.py`` (≈ 1 minute on 2 cores).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pydicom
import pynetdicom
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # tests.factories lives in the source tree, not the package
    sys.path.insert(0, str(ROOT))

from node.scp import MAX_PDU_SIZE, StorageSCP  # noqa: E402
from node.settings import (  # noqa: E402
    LoggingSettings,
    NodeSettings,
    Settings,
    StorageSettings,
)
from storage.database import open_database  # noqa: E402
from storage.filestore import FileStore  # noqa: E402
from tests.factories import make_mg_dataset  # noqa: E402

logger = logging.getLogger("bench.ingest")

RESULTS = ROOT / "bench" / "results" / "ingest.json"
AET = "CALCNODE"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_files(directory: Path, *, count: int, rows: int, columns: int) -> list[Path]:
    """``count`` MG files of one phantom, each with its own SOP Instance UID."""
    base = make_mg_dataset(rows=rows, columns=columns, seed=7)
    paths = []
    for index in range(count):
        ds = copy.deepcopy(base)
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.InstanceNumber = index + 1
        path = directory / f"mg{index:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _wait_listening(port: int, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("storescp exited before listening")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def run_storescu(port: int, called: str, files: list[Path], timeout: float) -> float:
    """Send ``files`` with one storescu association; return the wall time in seconds."""
    command = [
        *("storescu", "-aet", "BENCHSCU", "-aec", called, "-to", "30", "-ta", "30", "-td", "60"),
        *("127.0.0.1", str(port)),
        *(str(f) for f in files),
    ]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"storescu failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return elapsed


def bench_calcnode(files: list[Path], work: Path, timeout: float) -> dict[str, Any]:
    root = work / "calcnode"
    settings = Settings(
        node=NodeSettings(ae_title=AET, host="127.0.0.1"),
        storage=StorageSettings(root=root, min_free_mb=0),
        logging=LoggingSettings(pynetdicom_level="WARNING"),
    )
    store = FileStore(root, min_free_mb=0)
    database = open_database(f"sqlite:///{root / 'calcnode.db'}")
    scp = StorageSCP(settings=settings, store=store, database=database, port=0)
    scp.start()
    try:
        _wait_listening(scp.port)
        seconds = run_storescu(scp.port, AET, files, timeout)
        jobs = database.status_summary()["jobs"]["queued"]
    finally:
        scp.stop()
        database.close()
    if jobs != len(files):
        raise RuntimeError(f"calcnode queued {jobs} of {len(files)} images")
    return {"seconds": seconds, "stored": jobs}


def bench_storescp(files: list[Path], work: Path, timeout: float) -> dict[str, Any]:
    out = work / "storescp"
    out.mkdir()
    port = _free_port()
    proc = subprocess.Popen(
        ["storescp", "-aet", "STORESCP", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_listening(port, proc)
        seconds = run_storescu(port, "STORESCP", files, timeout)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    stored = sum(1 for p in out.iterdir() if p.is_file())
    if stored != len(files):
        raise RuntimeError(f"storescp stored {stored} of {len(files)} images")
    return {"seconds": seconds, "stored": stored}


def table(results: dict[str, Any]) -> str:
    lines = [
        "| Receiver | Images | Size (MB) | Seconds | MB/s | Images/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    megabytes = results["total_bytes"] / 1e6
    for name, label in (("calcnode", "calcnode StorageSCP"), ("storescp", "DCMTK storescp")):
        r = results["receivers"][name]
        lines.append(
            f"| {label} | {results['count']} | {megabytes:.0f} | {r['seconds']:.2f} | "
            f"{r['mb_per_s']:.1f} | {r['images_per_s']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20, help="images (default 20)")
    parser.add_argument("--rows", type=int, default=3328, help="image rows (default 3328)")
    parser.add_argument("--columns", type=int, default=2560, help="image columns (default 2560)")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="limit per transfer, seconds (default 300)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON file (default {RESULTS})")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            parser.error(f"DCMTK {tool} is not installed")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    with tempfile.TemporaryDirectory(prefix="calcnode-bench-ingest-") as tmp:
        work = Path(tmp)
        source = work / "source"
        source.mkdir()
        files = make_files(source, count=args.count, rows=args.rows, columns=args.columns)
        total = sum(p.stat().st_size for p in files)
        receivers = {
            "calcnode": bench_calcnode(files, work, args.timeout),
            "storescp": bench_storescp(files, work, args.timeout),
        }
    for r in receivers.values():
        r["mb_per_s"] = total / 1e6 / r["seconds"]
        r["images_per_s"] = args.count / r["seconds"]
    dcmtk = subprocess.run(["storescu", "--version"], capture_output=True, text=True, check=False)
    results: dict[str, Any] = {
        "benchmark": "C-STORE ingest, storescu → receiver, loopback, one association, one run",
        "count": args.count,
        "rows": args.rows,
        "columns": args.columns,
        "transfer_syntax": "Explicit VR Little Endian",
        "total_bytes": total,
        "receivers": receivers,
        "calcnode_max_pdu_bytes": MAX_PDU_SIZE,
        "environment": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "pydicom": pydicom.__version__,
            "pynetdicom": pynetdicom.__version__,
            "dcmtk": (dcmtk.stdout.splitlines() or ["?"])[0].strip(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(table(results))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
