"""Peak resident memory per process: a worker on one image, the SCP receiving big ones.

Each measurement runs in a **fresh child process**, so that its peak is its own:

worker
    ``run_worker(settings, max_jobs=1)`` — the node's worker as ``calcnode serve``
    starts it: it loads the bundled detector (default backend: ONNX Runtime on the
    CPU), claims the one queued job, reads the stored file, detects, writes the
    detections, the SEG and the GSPS, completes the job, exits. The image is one of
    ``bench/speed.py``'s phantoms (small 10 × 7 cm; full field Siemens 85 µm; full
    field Hologic 70 µm, 4096 × 3328 = 13.6 Mpx, the "14-Mpx" case). Peak = the
    child's ``VmHWM`` (``/proc/self/status``) when it is done, and ``ru_maxrss`` of
    ``os.wait4`` on it (the same figure, from the kernel's accounting of the exited
    process); also its RSS once the model is loaded (before the job).
serve (SCP)
    :func:`node.service.serve` with no worker processes (the SCP, the scheduler, the
    database): ``--copies`` copies of the 13.6-Mpx image (27 MB each, new SOP Instance
    UIDs) are sent by ``--associations`` concurrent pynetdicom SCUs; peak = the
    serving process's ``VmHWM`` read from ``/proc/<pid>/status`` after the last
    C-STORE response, beside its ``VmHWM`` before the first.

Usage::

    .venv/bin/python bench/memory.py [--sizes small,full,full70] [--copies 4]
        [--associations 2] [--data data/speed] [--out bench/results/memory.json]

Writes the JSON and prints a table (the "Memory" section of ``bench/README.md`` is
written by hand from it). Goal (issue 12, item 13): a worker ≤ 1.5 GB (1536 MiB) peak
on a 14-Mpx image.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import RESULTS, machine_info, markdown_table, now_iso, write_json  # noqa: E402

logger = logging.getLogger("bench.memory")

#: Goal of issue 12, item 13 (MiB).
GOAL_MB = 1536.0
SCP_AE = "CALCNODE"


def vm_hwm_mb(pid: int | str = "self") -> float:
    """``VmHWM`` (peak resident set size) of a process, in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def vm_rss_mb(pid: int | str = "self") -> float:
    """``VmRSS`` of a process, in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def _settings(root: Path, *, port: int = 11112, workers: int = 0) -> Any:
    from node.settings import (
        LoggingSettings,
        ModelSettings,
        NodeSettings,
        Settings,
        StorageSettings,
        WorkerSettings,
    )

    return Settings(
        node=NodeSettings(ae_title=SCP_AE, host="127.0.0.1", port=port),
        storage=StorageSettings(root=root, min_free_mb=64, retention_days=0),
        model=ModelSettings(device="cpu"),
        worker=WorkerSettings(count=workers, poll_seconds=0.2),
        logging=LoggingSettings(level="WARNING"),
    )


# --------------------------------------------------------------------------- children
def child_worker(image: Path, root: Path) -> dict[str, Any]:
    """One job through ``run_worker`` in this (fresh) process; its figures."""
    import pydicom

    from node.model import load_detector
    from node.results import encode_dataset
    from node.stores import open_storage
    from node.worker import run_worker

    settings = _settings(root)
    database, store = open_storage(settings)
    ds = pydicom.dcmread(image)
    rel = store.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    stored = store.write_atomic(rel, encode_dataset(ds))
    job_id = database.jobs.enqueue_image(
        sop_instance_uid=str(ds.SOPInstanceUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        path=stored.relpath,
        digest=stored.digest,
        size=stored.size,
        calling_aet="BENCH",
    ).job_id
    rows, cols = int(ds.Rows), int(ds.Columns)
    del ds, stored
    before_load = vm_rss_mb()
    loaded: dict[str, Any] = {}

    def factory(s: Any, device: str | None) -> Any:
        det = load_detector(s, device)
        loaded["rss_mb"] = vm_rss_mb()
        loaded["hwm_mb"] = vm_hwm_mb()
        loaded["backend"] = getattr(det, "label", "?")
        return det

    started = time.perf_counter()
    run_worker(settings, worker_id="bench-memory", max_jobs=1, detector_factory=factory)
    wall = time.perf_counter() - started
    job = database.jobs.get_job(job_id)
    result = job.result or {}
    return {
        "rows": rows,
        "columns": cols,
        "mpx": rows * cols / 1e6,
        "job_state": job.state,
        "last_error": job.last_error,
        "detections": result.get("detection_count"),
        "objects": sorted(o["kind"] for o in result.get("objects", [])),
        "backend": loaded.get("backend"),
        "rss_before_model_mb": before_load,
        "rss_after_model_mb": loaded.get("rss_mb"),
        "hwm_after_model_mb": loaded.get("hwm_mb"),
        "peak_rss_mb": vm_hwm_mb(),
        "seconds": wall,
        "detect_seconds": result.get("seconds"),
    }


def child_scp(root: Path, port: int) -> None:
    """``serve`` without workers until SIGTERM (the SCP process of ``calcnode serve``)."""
    from node.service import serve

    serve(_settings(root, port=port), workers=0, monitoring_port=0)


# --------------------------------------------------------------------------- parent
def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_worker_child(image: Path) -> dict[str, Any]:
    """:func:`child_worker` in a fresh interpreter; adds its ``ru_maxrss``."""
    with tempfile.TemporaryDirectory(prefix="calcnode-mem-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--child", "worker", str(image), tmp, str(out)]
        proc = subprocess.Popen(cmd)
        _pid, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"worker child exited {proc.returncode}")
        data: dict[str, Any] = json.loads(out.read_text())
    data["ru_maxrss_mb"] = usage.ru_maxrss / 1024  # KiB on Linux
    return data


def _send(files: list[Any], port: int, errors: list[str]) -> None:
    from pynetdicom import AE

    ae = AE(ae_title="BENCHSCU")
    ae.add_requested_context(files[0].SOPClassUID, files[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=SCP_AE)
    if not assoc.is_established:
        errors.append("association not established")
        return
    try:
        for ds in files:
            status = assoc.send_c_store(ds)
            if getattr(status, "Status", None) != 0:
                errors.append(f"C-STORE status {status}")
    finally:
        assoc.release()


def run_scp(image: Path, *, copies: int, associations: int) -> dict[str, Any]:
    """The serving process's peak RSS before and after receiving ``copies`` big images."""
    import pydicom
    from pydicom.uid import generate_uid

    template = pydicom.dcmread(image)
    size_mb = image.stat().st_size / 2**20
    per: list[list[Any]] = [[] for _ in range(associations)]
    for i in range(copies):
        ds = pydicom.dcmread(image)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        per[i % associations].append(ds)
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="calcnode-mem-scp-") as tmp:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--child", "scp", tmp, str(port)],
            stdout=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 120
            import socket

            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError("the SCP did not start") from None
                    time.sleep(0.2)
            time.sleep(1.0)
            idle = vm_hwm_mb(proc.pid)
            errors: list[str] = []
            started = time.perf_counter()
            threads = [
                threading.Thread(target=_send, args=(files, port, errors)) for files in per if files
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            seconds = time.perf_counter() - started
            time.sleep(1.0)
            peak = vm_hwm_mb(proc.pid)
            rss_after = vm_rss_mb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(60)
    return {
        "rows": int(template.Rows),
        "columns": int(template.Columns),
        "instance_mb": size_mb,
        "copies": copies,
        "associations": associations,
        "errors": errors,
        "seconds": seconds,
        "peak_rss_before_mb": idle,
        "peak_rss_mb": peak,
        "rss_after_mb": rss_after,
    }


def table(data: dict[str, Any]) -> str:
    rows = []
    for name, w in data["worker"].items():
        rows.append(
            [
                f"worker, {name} ({w['rows']} × {w['columns']}, {w['mpx']:.1f} Mpx)",
                f"{w['rss_after_model_mb']:.0f}",
                f"**{w['peak_rss_mb']:.0f}**",
                f"{w['ru_maxrss_mb']:.0f}",
                f"{w['detections']} detections, {'+'.join(w['objects'])}, {w['seconds']:.0f} s",
            ]
        )
    s = data.get("scp")
    if s:
        rows.append(
            [
                f"serve (SCP), {s['copies']} × {s['instance_mb']:.0f} MB over "
                f"{s['associations']} associations",
                f"{s['peak_rss_before_mb']:.0f}",
                f"**{s['peak_rss_mb']:.0f}**",
                "",
                f"{len(s['errors'])} errors, {s['seconds']:.0f} s, RSS after "
                f"{s['rss_after_mb']:.0f}",
            ]
        )
    header = ["Process, input", "MiB idle / after model load", "peak RSS (VmHWM), MiB"]
    return markdown_table([*header, "ru_maxrss, MiB", "notes"], rows, right=5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="small,full,full70")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "speed")
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--associations", type=int, default=2)
    parser.add_argument("--no-scp", action="store_true", help="skip the SCP measurement")
    parser.add_argument("--out", type=Path, default=RESULTS / "memory.json")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "worker":
            image, root, out = rest
            Path(out).write_text(json.dumps(child_worker(Path(image), Path(root))))
        else:
            child_scp(Path(rest[0]), int(rest[1]))
        return 0

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    from speed import phantom_paths

    names = [n for n in args.sizes.split(",") if n]
    paths = phantom_paths(args.data, names)
    data: dict[str, Any] = {"date": now_iso(), "machine": machine_info(), "goal_mb": GOAL_MB}
    data["worker"] = {}
    for name, path in paths.items():
        logger.info("worker on %s (%s)", name, path)
        data["worker"][name] = {"path": str(path), **run_worker_child(path)}
        logger.info("  peak %.0f MiB", data["worker"][name]["peak_rss_mb"])
    if not args.no_scp:
        big = paths.get("full70") or phantom_paths(args.data, ["full70"])["full70"]
        logger.info("serve (SCP) receiving %d × %s", args.copies, big)
        data["scp"] = run_scp(big, copies=args.copies, associations=args.associations)
    write_json(args.out, data)
    print(table(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
