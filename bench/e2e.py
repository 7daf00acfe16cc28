"""End-to-end latency: last C-STORE of a 4-view study → its CAD SR at the PACS.

The node runs in-process (:func:`node.service.serve`: SCP, scheduler, worker
processes) on loopback; the PACS is a pynetdicom storage SCP (default) or Orthanc
(``--pacs orthanc``, the Debian package, on free ports). A phantom study of four views
is sent by a pynetdicom SCU; the clock starts when the last C-STORE response arrives
and stops when the Mammography CAD SR (and, separately, the TID 1500 SR) reaches the
PACS. What that interval holds: the remaining inference, the quiet period
(``--quiet`` seconds, default 2), the study check interval (1 s), building the SRs and
the C-STOREs.

Usage::

    .venv/bin/python bench/e2e.py [--size small|full] [--runs N] [--workers N]
        [--model ASN.pt] [--device cpu|cuda] [--pacs pynetdicom|orthanc]

Writes ``bench/results/e2e.json``. Without ``--model`` and without bundled weights an
untrained random-weight model is used (it keeps ~300 candidates per image: a worst
case for report size, not a measure of detection quality) — the JSON says which.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _orthanc import OrthancProcess, free_port  # noqa: E402

CAD_SR = "1.2.840.10008.5.1.4.1.1.88.50"
TID1500 = "1.2.840.10008.5.1.4.1.1.88.33"


class PynetdicomPacs:
    """Records the arrival time of every object, by SOP Class UID."""

    ae_title = "BENCHPACS"

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, str, str]] = []  # (monotonic, sop class, study)
        self._server: Any = None
        self.port = 0

    def start(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        ae = AE(ae_title=self.ae_title)
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax)

        def on_store(event: Any) -> int:
            ds = event.dataset
            self.arrivals.append((time.monotonic(), str(ds.SOPClassUID), str(ds.StudyInstanceUID)))
            return 0

        self._server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
        )
        self.port = int(self._server.server_address[1])

    def first(self, sop_class: str, study: str) -> float | None:
        times = [t for t, c, s in self.arrivals if c == sop_class and s == study]
        return min(times) if times else None

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()


class OrthancPacs(OrthancProcess):
    """Orthanc on free loopback ports; arrival = first poll that sees the object."""

    def __init__(self) -> None:
        super().__init__(Path(tempfile.mkdtemp(prefix="bench-orthanc-")), name="bench")
        self.seen: dict[tuple[str, str], float] = {}

    def poll(self, study: str) -> None:
        found = [
            f["ID"] for f in self.post("/tools/lookup", study.encode()) if f["Type"] == "Study"
        ]
        if not found:
            return
        for inst in self.get(f"/studies/{found[0]}/instances?expand"):
            tags = self.get(f"/instances/{inst['ID']}/simplified-tags")
            key = (str(tags.get("SOPClassUID")), study)
            self.seen.setdefault(key, time.monotonic())

    def first(self, sop_class: str, study: str) -> float | None:
        self.poll(study)
        return self.seen.get((sop_class, study))


def four_view_study(folder: Path, *, seed: int, size: str) -> list[Path]:
    """Render phantoms until a study with four views exists; return its files."""
    from cascade.data.manifest import read_manifest
    from cascade.synthesis import generate_dataset

    manifest = generate_dataset(folder, count=8, seed=seed, size=size, progress=False)  # type: ignore[arg-type]
    by_study: dict[str, list[Path]] = {}
    for rec in read_manifest(manifest):
        by_study.setdefault(str(rec.study_instance_uid), []).append(Path(rec.path))
    best = max(by_study.values(), key=len)
    return sorted(best)


def send(files: list[Path], port: int) -> float:
    """C-STORE the files in one association; returns the monotonic time of the last response."""
    import pydicom
    from pynetdicom import AE

    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title="BENCHSCU")
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="CALCNODE")
    if not assoc.is_established:
        raise RuntimeError("association refused")
    last = 0.0
    for ds in datasets:
        status = assoc.send_c_store(ds)
        if int(status.Status) != 0:
            raise RuntimeError(f"C-STORE status 0x{int(status.Status):04X}")
        last = time.monotonic()
    assoc.release()
    return last


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("small", "full"), default="small")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--model", type=Path, default=None, help="ASN checkpoint (fpr.pt beside)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quiet", type=float, default=2.0, help="study.quiet_seconds")
    parser.add_argument("--pacs", choices=("pynetdicom", "orthanc"), default="pynetdicom")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "e2e.json")
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args(argv)

    import torch

    from node.demo import write_untrained_model
    from node.model import model_weights
    from node.service import serve
    from node.settings import (
        DestinationSettings,
        LoggingSettings,
        ModelSettings,
        NodeSettings,
        SchedulerSettings,
        SendSettings,
        Settings,
        StorageSettings,
        StudySettings,
        WorkerSettings,
    )
    from storage.database import open_database

    work = Path(tempfile.mkdtemp(prefix="calcnode-bench-"))
    model_kind = "given"
    model_path = args.model
    if model_path is None:
        try:
            model_weights(Settings())
            model_kind = "bundled"
        except Exception:
            model_path = write_untrained_model(work / "untrained")
            model_kind = "untrained random weights (width 4): ~300 candidates per image"
    pacs: Any = OrthancPacs() if args.pacs == "orthanc" else PynetdicomPacs()
    pacs.start()
    port = free_port()
    settings = Settings(
        node=NodeSettings(ae_title="CALCNODE", host="127.0.0.1", port=port),
        storage=StorageSettings(root=work / "node", min_free_mb=64, retention_days=0),
        study=StudySettings(quiet_seconds=args.quiet),
        destinations=(
            DestinationSettings(
                name="pacs", ae_title=pacs.ae_title, host="127.0.0.1", port=pacs.port
            ),
        ),
        model=ModelSettings(path=model_path, device=args.device),
        worker=WorkerSettings(count=args.workers, poll_seconds=0.2),
        send=SendSettings(retry_initial_seconds=1.0, retry_max_seconds=5.0),
        scheduler=SchedulerSettings(study_check_seconds=1.0, send_check_seconds=1.0),
        logging=LoggingSettings(level="WARNING"),
    )
    stop, ready = threading.Event(), threading.Event()
    node = threading.Thread(
        target=serve, args=(settings,), kwargs={"stop_event": stop, "ready": ready}
    )
    node.start()
    runs: list[dict[str, Any]] = []
    try:
        if not ready.wait(300):
            raise RuntimeError("node did not start")
        for run in range(args.runs):
            files = four_view_study(work / f"phantoms{run}", seed=100 + run, size=args.size)
            import pydicom

            study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
            first_store = time.monotonic()
            last_store = send(files, port)
            cad = tid = None
            deadline = time.monotonic() + args.timeout
            while time.monotonic() < deadline and (cad is None or tid is None):
                cad = cad or pacs.first(CAD_SR, study)
                tid = tid or pacs.first(TID1500, study)
                time.sleep(0.1)
            database = open_database(settings.storage.database_url, create=False)
            jobs = database.jobs.study_jobs(study)
            database.close()
            record = {
                "study_instance_uid": study,
                "images": len(files),
                "rows_columns": [
                    [int(d.Rows), int(d.Columns)]
                    for d in (pydicom.dcmread(f, stop_before_pixels=True) for f in files)
                ],
                "send_seconds": round(last_store - first_store, 3),
                "last_store_to_cad_sr_seconds": None if cad is None else round(cad - last_store, 3),
                "last_store_to_tid1500_seconds": None
                if tid is None
                else round(tid - last_store, 3),
                "detect_seconds_per_image": [(j.result or {}).get("seconds") for j in jobs],
                "detections_per_image": [(j.result or {}).get("detection_count") for j in jobs],
            }
            runs.append(record)
            print(json.dumps(record, indent=1))
    finally:
        stop.set()
        node.join(120)
        pacs.stop()

    result = {
        "what": "seconds from the last C-STORE response of a 4-view phantom study to the "
        "study's CAD SR (and TID 1500 SR) arriving at the PACS",
        "pacs": args.pacs,
        "phantom_size": args.size,
        "quiet_seconds": args.quiet,
        "study_check_seconds": 1.0,
        "send_check_seconds": 1.0,
        "workers": args.workers,
        "device": args.device,
        "model": model_kind,
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_average_1_5_15_min_at_end": [round(v, 2) for v in os.getloadavg()],
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
