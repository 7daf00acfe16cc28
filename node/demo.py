"""``calcnode demo --out DIR``: the whole node on one machine, from a clean clone.

What it does, all on loopback and under ``DIR``:

1. picks the model: the bundled weights when this installation has them; otherwise it
   says so and writes an *untrained*, random-weight model (its detections are
   meaningless — the demo then shows the plumbing, not the detector);
2. renders a few phantom studies (:func:`cascade.synthesis.generate_dataset`, small field);
3. starts a local receiver (a pynetdicom storage SCP standing in for the PACS) that
   writes what it gets to ``DIR/received/``;
4. starts the node (:func:`node.service.serve`: SCP, scheduler, one CPU worker process)
   with its SQLite database and file store under ``DIR/node/`` and the receiver as its
   destination, with a 2-second quiet period;
5. sends every phantom with a real C-STORE SCU (pynetdicom), as a modality would;
6. waits (bounded) until every study is reported and no send is pending;
7. prints a summary per study — images, findings, objects received — and writes
   preview PNGs (detections yellow, phantom truth green) to ``DIR/previews/``;
8. stops the node and the receiver, and says how to look at the results
   (:func:`how_to_look`: where they are, the ``storescu`` command that stores them in a
   PACS, which viewer shows which object; docs/viewing.md).

Coordinates in the previews: detections in the received image's pixel grid, x = column,
y = row, first pixel's CENTRE at (0, 0).
"""

from __future__ import annotations

import logging
import shutil
import socket
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from pydicom.uid import (
    ComprehensiveSRStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    MammographyCADSRStorage,
    SegmentationStorage,
)

from node.errors import CalcnodeError

__all__ = ["how_to_look", "run_demo", "write_untrained_model"]

logger = logging.getLogger(__name__)

#: Upper bound on the wait for results, per image (CPU, untrained model, busy machine).
SECONDS_PER_IMAGE = 120.0
_PREPROCESSING = {"pixel_spacing_mm": 0.07, "map_kind": "residual", "residual": "l1"}


def write_untrained_model(folder: Path, *, seed: int = 0) -> Path:
    """Write a random-weight ASN (width 4) + FPR (width 4, 56 px) pair; returns ``asn.pt``.

    For plumbing only: the detections of random weights mean nothing.
    """
    import torch

    from cascade.models import get_model
    from cascade.models.checkpoint import save_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    for kind, name, cfg in (
        ("asn", "asn_unet", {"width": 4}),
        ("fpr", "fpr_resnet50", {"width": 4, "input_size": 56}),
    ):
        model = get_model(name, **cfg)
        save_checkpoint(
            folder / f"{kind}.pt",
            model_name=name,
            model_config=cfg,
            state_dict=model.state_dict(),
            preprocessing=_PREPROCESSING,
            training={"note": "UNTRAINED: random weights for the demo"},
            data={},
            metrics={},
            kind=kind,
        )
    return folder / "asn.pt"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Receiver:
    """A storage SCP that writes every received object to ``folder/<study>/``."""

    def __init__(self, folder: Path, ae_title: str = "DEMOPACS") -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.received: dict[str, Counter[str]] = defaultdict(Counter)
        self._lock = threading.Lock()
        self._server: Any = None
        self.port = 0

    def start(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        ae = AE(ae_title=self.ae_title)
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax)
        ae.add_supported_context(Verification)

        def on_store(event: Any) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            study = str(ds.StudyInstanceUID)
            target = self.folder / study / f"{ds.Modality}-{ds.SOPInstanceUID}.dcm"
            target.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(target, enforce_file_format=True)
            with self._lock:
                self.received[study][_object_name(ds)] += 1
            return 0x0000

        self._server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
        )
        self.port = int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def counts(self, study: str) -> Counter[str]:
        with self._lock:
            return Counter(self.received.get(study, Counter()))


def _object_name(ds: Any) -> str:
    names: dict[str, str] = {
        MammographyCADSRStorage: "CAD SR",
        ComprehensiveSRStorage: "TID 1500 SR",
        SegmentationStorage: "SEG",
        GrayscaleSoftcopyPresentationStateStorage: "GSPS",
    }
    return names.get(str(ds.SOPClassUID), str(ds.Modality))


def _send_files(files: list[Path], *, port: int, called: str) -> int:
    """C-STORE the files as a modality would; returns how many got status 0x0000."""
    import pydicom
    from pynetdicom import AE

    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title="DEMOMODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    for ts in {str(ds.file_meta.TransferSyntaxUID) for ds in datasets}:
        for sop_class in {str(ds.SOPClassUID) for ds in datasets}:
            ae.add_requested_context(sop_class, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        raise RuntimeError(f"the node refused the association on port {port}")
    ok = 0
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            if status and int(status.Status) == 0x0000:
                ok += 1
            else:
                print(f"  C-STORE of {ds.SOPInstanceUID} answered {status}")
    finally:
        assoc.release()
    return ok


#: Sub-folders of the demo's working folder, all of them its own.
DEMO_FOLDERS = ("phantoms", "node", "received", "previews", "untrained-model")
#: File that marks a folder as the demo's own (only such a folder is ever cleared).
DEMO_MARKER = ".calcnode-demo"


def how_to_look(out: Path) -> str:
    """The demo's closing words: where its results are and how to look at them."""
    phantoms, received = out / "phantoms", out / "received"
    return f"""
How to look at the results (docs/viewing.md tells what each viewer shows):
  the images the node got are in   {phantoms}/
  what it sent back is in          {received}/<study>/ (SR-*: CAD SR and one
                                   measurements SR per view with findings; SEG-*; PR-*: GSPS)
  previews (detections yellow, phantom truth green) are in {out / "previews"}/
  To read them in a viewer, store images and results in a PACS, e.g. an Orthanc with
  the orthanc-dicomweb plugin listening on port 4242 (AE ORTHANC):
    storescu -aec ORTHANC -R +sd +r +sp '*.dcm' localhost 4242 {phantoms} {received}
  then open the study in OHIF (the measurements SR of each view, the SEGs), on a
  mammography workstation (the CAD SR), or in any viewer that applies presentation
  states (the GSPS). Research software, not for clinical use."""


def run_demo(
    out: Path, *, count: int = 4, seed: int = 0, size: str = "small", timeout: float | None = None
) -> int:
    """Run the demo (see the module docstring); returns 0 when every study got its SRs.

    Parameters
    ----------
    out : Path
        Working folder: new or empty, or one an earlier demo used (marked by
        ``.calcnode-demo``), whose sub-folders are removed first: the same phantoms
        sent again would be duplicates the node has already reported.

    Raises
    ------
    CalcnodeError
        ``out`` is a non-empty folder that no earlier demo used.
    count : int
        Phantom images to render (grouped into studies of 2–4 views).
    seed : int
        Phantom seed.
    size : {"small", "full"}
        Phantom field size.
    timeout : float or None
        Bound on the wait for results; ``SECONDS_PER_IMAGE × count`` when None.
    """
    from cascade.data.manifest import read_manifest
    from cascade.inference.detections import ImageDetections
    from cascade.inference.preview import write_detection_preview
    from cascade.synthesis import generate_dataset
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

    out = Path(out)
    marker = out / DEMO_MARKER
    entries = {e.name for e in out.iterdir()} if out.is_dir() else set()
    ours = marker.is_file() or entries <= set(DEMO_FOLDERS)  # (older demos left no marker)
    if not ours:
        raise CalcnodeError(
            f"{out} is not empty and holds no earlier demo run ({DEMO_MARKER}); the demo "
            "clears its working folder between runs, so give it an empty or new folder"
        )
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive int, got {count!r}")
    out.mkdir(parents=True, exist_ok=True)
    leftovers = [out / name for name in DEMO_FOLDERS if (out / name).exists()]
    for folder in leftovers:
        shutil.rmtree(folder)
    if leftovers:
        print(f"cleared the previous demo run in {out}")
    marker.write_text("calcnode demo working folder: cleared by the next `calcnode demo`\n")

    # 1. the model
    model_path: Path | None = None
    try:
        weights = model_weights(Settings())
        print(f"model: bundled weights {weights.folder} (trained on synthetic phantoms only)")
    except Exception as exc:  # ConfigError: no bundled weights in this installation
        model_path = write_untrained_model(out / "untrained-model")
        print(
            "model: this installation has no bundled weights "
            f"({exc.__class__.__name__}); the demo uses an UNTRAINED random-weight model "
            f"written to {model_path.parent}.\n"
            "       Its detections are meaningless: the demo shows the DICOM plumbing only. "
            "Train one with `calcnode train asn/fpr` and set model.path."
        )

    # 2. phantoms
    print(f"rendering {count} phantom image(s) ({size}) …")
    manifest = generate_dataset(out / "phantoms", count=count, seed=seed, size=size, progress=False)  # type: ignore[arg-type]
    records = read_manifest(manifest)
    studies: dict[str, list[Any]] = defaultdict(list)
    for rec in records:
        studies[str(rec.study_instance_uid)].append(rec)

    # 3. receiver; 4. node
    receiver = _Receiver(out / "received")
    receiver.start()
    port = _free_port()
    settings = Settings(
        node=NodeSettings(ae_title="CALCNODE", host="127.0.0.1", port=port),
        storage=StorageSettings(root=out / "node", min_free_mb=64, retention_days=0),
        study=StudySettings(quiet_seconds=2.0),
        destinations=(
            DestinationSettings(
                name="demo-pacs", ae_title=receiver.ae_title, host="127.0.0.1", port=receiver.port
            ),
        ),
        # An untrained model's FPR is undecided (≈ 0.5): report all its candidates.
        model=ModelSettings(
            path=model_path,
            device="cpu",
            operating_point="calibrated" if model_path is None else "all",
        ),
        worker=WorkerSettings(count=1, poll_seconds=0.5, lease_seconds=600.0),
        send=SendSettings(retry_initial_seconds=2.0, retry_max_seconds=10.0),
        scheduler=SchedulerSettings(study_check_seconds=1.0, send_check_seconds=1.0),
        logging=LoggingSettings(level="WARNING"),
    )
    stop, ready = threading.Event(), threading.Event()
    node = threading.Thread(
        target=serve,
        args=(settings,),
        kwargs={"stop_event": stop, "ready": ready},
        name="calcnode-demo",
    )
    code = 1
    node.start()
    try:
        if not ready.wait(120):
            print("the node did not start listening in 120 s")
            return 1
        print(f"node listening on 127.0.0.1:{port} (AE CALCNODE); receiver on {receiver.port}")

        # 5. send
        started = time.monotonic()
        for study_uid, recs in studies.items():
            sent = _send_files([r.path for r in recs], port=port, called="CALCNODE")
            print(f"sent study {study_uid}: {sent}/{len(recs)} image(s) accepted")

        # 6. wait
        limit = timeout if timeout is not None else SECONDS_PER_IMAGE * len(records)
        database = open_database(settings.storage.database_url, create=False)
        try:
            summary: dict[str, Any] = {}
            while time.monotonic() - started < limit:
                summary = database.status_summary()
                if (
                    summary["studies"]["reported"] >= len(studies)
                    and summary["sends"]["pending"] == 0
                    and summary["jobs"]["queued"] + summary["jobs"]["running"] == 0
                ):
                    break
                time.sleep(1.0)
            elapsed = time.monotonic() - started
            jobs = {
                uid: database.jobs.study_jobs(uid)
                for uid in studies
                if database.jobs.study_jobs(uid)
            }
        finally:
            database.close()

        # 7. summary and previews
        all_ok = True
        print(f"\nresults after {elapsed:.0f} s:")
        for study_uid, recs in studies.items():
            study_jobs = jobs.get(study_uid, [])
            findings = sum(int((j.result or {}).get("detection_count", 0)) for j in study_jobs)
            failed = sum(1 for j in study_jobs if j.state == "failed")
            got = receiver.counts(study_uid)
            ok = got["CAD SR"] >= 1 and got["TID 1500 SR"] >= 1
            all_ok &= ok
            objects = ", ".join(f"{n} {k}" for k, n in sorted(got.items())) or "nothing"
            print(
                f"  study {study_uid}: {len(recs)} image(s), {findings} finding(s)"
                f"{f', {failed} image(s) failed' if failed else ''}; received {objects}"
            )
            truth = {r.sop_instance_uid: r for r in recs}
            for job in study_jobs:
                result = job.result or {}
                if "detections" not in result:
                    continue
                dets = ImageDetections.from_json(result["detections"])
                found = truth.get(job.sop_instance_uid)
                if found is None:
                    continue
                source = found.path
                xy = None
                if found.calcifications:
                    import numpy as np

                    xy = np.array([(c.x, c.y) for c in found.calcifications], dtype=float)
                png = write_detection_preview(
                    source,
                    dets,
                    out / "previews" / Path(source).parent.name / f"{Path(source).stem}.png",
                    truth_xy=xy,
                )
                print(f"    preview {png}")
        if summary.get("sends", {}).get("failed"):
            print(f"  {summary['sends']['failed']} send(s) failed for good")
        code = 0 if all_ok else 1
        if not all_ok:
            print("not every study got its CAD SR and TID 1500 SR in time")
    finally:
        # 8. stop
        stop.set()
        node.join(120)
        receiver.stop()
    print(how_to_look(out))
    return code
