"""Soak: N senders for M minutes against a real ``calcnode serve``, with faults injected.

What runs (all on loopback, each its own process):

- **Orthanc** (the Debian package) as the PACS the node sends its results to. A Lua
  ``OnStoredInstance`` hook appends every SOP Instance UID it stores to a file, with
  ``OverwriteInstances`` on, so that a second C-STORE of the same object is counted
  (Orthanc's index alone would keep it once). It is **stopped and restarted**
  ``--pacs-outages`` times during the run (down ``--outage-seconds`` each).
- **calcnode serve** (``.venv/bin/calcnode serve --config ...``), SQLite, the bundled
  detector by default (``--model`` for another checkpoint), ``--workers`` worker
  processes. A worker process, chosen at random, is **SIGKILLed** every
  ``--kill-every`` seconds on average (exponential intervals); serve restarts it.
- **N senders** (pynetdicom SCU processes): each sends a study of ``--views`` images
  (phantom templates with fresh Study / Series / SOP Instance UIDs and a fresh patient)
  in one association every ``--interval`` seconds, records each C-STORE's outcome to
  a JSON-lines file as it happens.

After ``--minutes`` the senders stop; the node is given up to ``--drain`` minutes to
finish (no job queued or running, every study reported, no send pending), then is
stopped and the figures are counted from what each side holds, not from the node's
own claims alone:

sent / acknowledged
    C-STOREs attempted by the senders / answered 0x0000 (the senders' files).
stored
    acknowledged instances with a job row and their file in the node's store; an
    acknowledged instance that is not is **lost**.
processed
    jobs ``done`` (also: ``failed``, still queued / running, jobs run more than once).
delivered
    result objects (SEG, GSPS, CAD SR, TID 1500 SR) in Orthanc; against the node's
    sends marked sent: **missing** (sent per the node, absent at the PACS), objects per
    source image / study beyond one (**duplicate objects**: a job's results made
    twice), and SOP Instances Orthanc received more than once (**re-sent**).
peak RSS
    per process (``VmHWM`` of ``/proc/<pid>/status``, sampled every 2 s; each worker
    process by pid, killed ones up to their last sample), and the serve process's RSS
    over time (is memory flat?).

Usage::

    nice -n 10 .venv/bin/python bench/soak.py [--senders 2] [--minutes 10] [--workers 2]
        [--views 2] [--interval 60] [--kill-every 90] [--pacs-outages 2]
        [--outage-seconds 45] [--drain 15] [--model ASN.pt] [--out bench/results/soak.json]

Writes the JSON and prints a table; exit status 1 when anything was lost, missing or
duplicated beyond the objects in flight at a kill.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import RESULTS, machine_info, markdown_table, now_iso, write_json  # noqa: E402
from _orthanc import OrthancProcess, free_port  # noqa: E402

logger = logging.getLogger("bench.soak")

NODE_AE = "CALCNODE"
KINDS = {
    "1.2.840.10008.5.1.4.1.1.66.4": "seg",
    "1.2.840.10008.5.1.4.1.1.11.1": "gsps",
    "1.2.840.10008.5.1.4.1.1.88.50": "cad-sr",
    "1.2.840.10008.5.1.4.1.1.88.33": "tid1500-sr",
}
#: Kinds made once per image (the others once per study and report version).
PER_IMAGE = ("seg", "gsps", "tid1500-sr")


def proc_status(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (KiB) of a live process; empty when it is gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line.split(":")[0]] = int(line.split()[1])
    except OSError:
        return {}
    return out


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (``/proc/<pid>/task/*/children``)."""
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# --------------------------------------------------------------------------- Orthanc
class Orthanc(OrthancProcess):
    """Orthanc with persistent storage (survives restarts) and a receipt log."""

    def __init__(self, folder: Path) -> None:
        self.receipts = folder / "received.txt"
        lua = folder / "count.lua"
        super().__init__(
            folder,
            name="soak",
            config={"OverwriteInstances": True, "LuaScripts": [str(lua)], "Plugins": []},
        )
        self.lua = lua

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.lua.write_text(
            "function OnStoredInstance(instanceId, tags, metadata, origin)\n"
            f"  local f = io.open('{self.receipts}', 'a')\n"
            "  f:write(tags['SOPInstanceUID'] .. '\\n')\n"
            "  f:close()\n"
            "end\n"
        )
        super().start()

    def inventory(self) -> list[dict[str, Any]]:
        """Every instance: SOP Class / Instance UID, study, the images it references."""
        out = []
        for iid in self.get("/instances"):
            tags = self.get(f"/instances/{iid}/tags?simplify")
            refs = [
                str(inst.get("ReferencedSOPInstanceUID"))
                for series in tags.get("ReferencedSeriesSequence", []) or []
                for key in ("ReferencedInstanceSequence", "ReferencedImageSequence")
                for inst in series.get(key, []) or []
            ]
            # An SR names its images in its evidence (SEG and GSPS above).
            refs += [
                str(inst.get("ReferencedSOPInstanceUID"))
                for study in tags.get("CurrentRequestedProcedureEvidenceSequence", []) or []
                for series in study.get("ReferencedSeriesSequence", []) or []
                for inst in series.get("ReferencedSOPSequence", []) or []
            ]
            out.append(
                {
                    "sop_class": str(tags.get("SOPClassUID")),
                    "sop_instance": str(tags.get("SOPInstanceUID")),
                    "study": str(tags.get("StudyInstanceUID")),
                    "references": refs,
                }
            )
        return out

    def received(self) -> Counter[str]:
        if not self.receipts.exists():
            return Counter()
        return Counter(line.strip() for line in self.receipts.read_text().splitlines() if line)


# --------------------------------------------------------------------------- sender
def sender_main(
    templates: list[Path], port: int, seconds: float, interval: float, out: Path, seed: int
) -> None:
    """Send a fresh study every ``interval`` seconds for ``seconds``; log each C-STORE."""
    import pydicom
    from pydicom.uid import generate_uid
    from pynetdicom import AE

    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    rng = random.Random(seed)
    images = [pydicom.dcmread(p) for p in templates]
    ae = AE(ae_title=f"SOAK{seed % 1000:03d}")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    for ds in images:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    end = time.monotonic() + seconds
    n = 0
    with out.open("a") as log:
        time.sleep(rng.uniform(0, interval))
        while time.monotonic() < end:
            n += 1
            study = generate_uid()
            patient = f"SOAK{seed}-{n}"
            batch = []
            for template in images:
                ds = copy.deepcopy(template)
                ds.StudyInstanceUID = study
                ds.SeriesInstanceUID = generate_uid()
                ds.SOPInstanceUID = generate_uid()
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                ds.PatientID = patient
                ds.PatientName = f"Soak^{seed}^{n}"
                batch.append(ds)
            started = time.monotonic()
            assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
            for ds in batch:
                rec: dict[str, Any] = {"sop": ds.SOPInstanceUID, "study": study, "t": time.time()}
                if not assoc.is_established:
                    rec["error"] = "association not established"
                else:
                    try:
                        status = assoc.send_c_store(ds)
                        rec["status"] = int(status.Status) if "Status" in status else None
                    except Exception as exc:  # recorded; the soak goes on
                        rec["error"] = f"{type(exc).__name__}: {exc}"
                log.write(json.dumps(rec) + "\n")
                log.flush()
            if assoc.is_established:
                assoc.release()
            time.sleep(max(0.0, interval - (time.monotonic() - started)))


# --------------------------------------------------------------------------- the node
def node_config(folder: Path, *, port: int, orthanc: Orthanc, args: argparse.Namespace) -> Path:
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
        dump_toml,
    )

    settings = Settings(
        node=NodeSettings(ae_title=NODE_AE, host="127.0.0.1", port=port),
        storage=StorageSettings(root=folder / "store", min_free_mb=256, retention_days=0),
        study=StudySettings(quiet_seconds=args.quiet),
        destinations=(
            DestinationSettings(
                name="orthanc", ae_title=orthanc.ae_title, host="127.0.0.1", port=orthanc.port
            ),
        ),
        model=ModelSettings(path=args.model, device="cpu", torch_threads=1),
        worker=WorkerSettings(
            count=args.workers, lease_seconds=args.lease, poll_seconds=0.5, max_attempts=5
        ),
        send=SendSettings(retry_initial_seconds=2.0, retry_max_seconds=20.0, max_attempts=50),
        scheduler=SchedulerSettings(
            study_check_seconds=2.0, send_check_seconds=2.0, lease_check_seconds=5.0
        ),
        logging=LoggingSettings(level="INFO"),
    )
    path = folder / "calcnode.toml"
    path.write_text(dump_toml(settings))
    return path


class Sampler:
    """Peak RSS of every process of interest, sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 2.0) -> None:
        self.interval = interval
        self.roles: dict[int, str] = {}
        self.peak_kb: dict[int, int] = {}
        self.serve_series: list[tuple[float, float]] = []
        self.serve_pid = 0
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def watch(self, pid: int, role: str) -> None:
        with self._lock:
            self.roles.setdefault(pid, role)

    def workers(self) -> list[int]:
        """Live worker processes of serve (spawned children, not the resource tracker)."""
        return [
            p
            for p in children(self.serve_pid)
            if "multiprocessing" in cmdline(p) and "resource_tracker" not in cmdline(p)
        ]

    def sample(self) -> None:
        if self.serve_pid:
            for p in self.workers():
                self.watch(p, "worker")
        with self._lock:
            pids = list(self.roles)
        for pid in pids:
            st = proc_status(pid)
            if st:
                self.peak_kb[pid] = max(self.peak_kb.get(pid, 0), st.get("VmHWM", 0))
                if pid == self.serve_pid:
                    self.serve_series.append(
                        (time.monotonic() - self.t0, st.get("VmRSS", 0) / 1024)
                    )

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def by_role(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for pid, role in self.roles.items():
            mb = self.peak_kb.get(pid, 0) / 1024
            entry = out.setdefault(role, {"processes": 0, "peak_mb": 0.0, "each_mb": []})
            entry["processes"] += 1
            entry["peak_mb"] = max(entry["peak_mb"], mb)
            entry["each_mb"].append(round(mb, 1))
        return out


def db_counts(db: Path) -> dict[str, Any]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        jobs = {
            r[0]: {"state": r[1], "attempts": r[2], "path": r[3], "result": r[4]}
            for r in con.execute("SELECT sop_instance_uid, state, attempts, path, result FROM jobs")
        }
        sends = [
            {"sop": r[0], "kind": r[1], "state": r[2], "attempts": r[3], "study": r[4]}
            for r in con.execute(
                "SELECT sop_instance_uid, kind, state, attempts, study_instance_uid FROM sends"
            )
        ]
        studies = {
            r[0]: {"state": r[1], "report_version": r[2]}
            for r in con.execute("SELECT study_instance_uid, state, report_version FROM studies")
        }
    finally:
        con.close()
    return {"jobs": jobs, "sends": sends, "studies": studies}


def drained(db: Path) -> bool:
    try:
        c = db_counts(db)
    except sqlite3.Error:
        return False
    busy_jobs = any(j["state"] in ("queued", "running") for j in c["jobs"].values())
    pending = any(s["state"] == "pending" for s in c["sends"])
    open_studies = any(s["state"] == "open" for s in c["studies"].values())
    return not (busy_jobs or pending or open_studies)


def templates(folder: Path, views: int) -> list[Path]:
    """``views`` small phantom images (rendered once)."""
    from cascade.data.manifest import read_manifest
    from cascade.synthesis import generate_dataset

    manifest = folder / "manifest.jsonl"
    if not manifest.is_file():
        generate_dataset(folder, count=views, seed=4200, size="small", progress=False)
    return [Path(r.path) for r in read_manifest(manifest)][:views]


# --------------------------------------------------------------------------- the run
def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="calcnode-soak-"))
    logger.info("work folder %s", work)
    files = templates(args.data, args.views)
    orthanc = Orthanc(work / "orthanc")
    orthanc.start()
    port = free_port()
    config = node_config(work, port=port, orthanc=orthanc, args=args)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALCNODE_")}
    env.pop("NOTIFY_SOCKET", None)
    env["PYTHONUNBUFFERED"] = "1"
    node_log = work / "calcnode.log"
    calcnode = Path(sys.executable).parent / "calcnode"
    serve = subprocess.Popen(
        [str(calcnode), "serve", "--config", str(config)],
        cwd=ROOT,
        env=env,
        stdout=node_log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    sampler = Sampler()
    sampler.serve_pid = serve.pid
    sampler.watch(serve.pid, "serve (SCP, scheduler)")
    events: list[dict[str, Any]] = []
    senders: list[subprocess.Popen[bytes]] = []
    try:
        deadline = time.monotonic() + 300
        while "calcnode serving" not in node_log.read_text(errors="replace"):
            if serve.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"calcnode did not start: {node_log.read_text()[-3000:]}")
            time.sleep(0.5)
        sampler.start()
        logger.info(
            "serve up (pid %d); %d senders for %g min", serve.pid, args.senders, args.minutes
        )
        seconds = args.minutes * 60
        t0 = time.monotonic()
        for i in range(args.senders):
            cmd = [
                sys.executable,
                __file__,
                "--child-sender",
                json.dumps(
                    {
                        "templates": [str(f) for f in files],
                        "port": port,
                        "seconds": seconds,
                        "interval": args.interval,
                        "out": str(work / f"sender{i}.jsonl"),
                        "seed": 100 + i,
                    }
                ),
            ]
            p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
            senders.append(p)
            sampler.watch(p.pid, "sender")
        sampler.watch(orthanc.proc.pid if orthanc.proc else 0, "orthanc")
        rng = random.Random(args.seed)
        outages = [seconds * (i + 1) / (args.pacs_outages + 1) for i in range(args.pacs_outages)]
        next_kill = rng.expovariate(1 / args.kill_every)
        pacs_down_until: float | None = None
        while time.monotonic() - t0 < seconds:
            now = time.monotonic() - t0
            if next_kill <= now:
                live = sampler.workers()
                if live:
                    victim = rng.choice(live)
                    sampler.sample()
                    os.kill(victim, signal.SIGKILL)
                    events.append({"t": round(now, 1), "event": "SIGKILL worker", "pid": victim})
                    logger.info("t=%.0f s: SIGKILL worker %d", now, victim)
                next_kill = now + rng.expovariate(1 / args.kill_every)
            if pacs_down_until is None and outages and outages[0] <= now:
                outages.pop(0)
                orthanc.stop()
                pacs_down_until = now + args.outage_seconds
                events.append({"t": round(now, 1), "event": "PACS stopped"})
                logger.info("t=%.0f s: Orthanc stopped", now)
            if pacs_down_until is not None and pacs_down_until <= now:
                orthanc.start()
                sampler.watch(orthanc.proc.pid if orthanc.proc else 0, "orthanc")
                pacs_down_until = None
                events.append({"t": round(now, 1), "event": "PACS restarted"})
                logger.info("t=%.0f s: Orthanc restarted", now)
            time.sleep(0.5)
        if pacs_down_until is not None:
            orthanc.start()
            events.append({"t": round(time.monotonic() - t0, 1), "event": "PACS restarted"})
        for p in senders:
            p.wait(600)
        send_end = time.monotonic() - t0
        logger.info("senders done at t=%.0f s; draining (up to %g min)", send_end, args.drain)
        db = work / "store" / "calcnode.db"
        drain_deadline = time.monotonic() + args.drain * 60
        while not drained(db) and time.monotonic() < drain_deadline:
            time.sleep(2.0)
        drain_s = time.monotonic() - t0 - send_end
        is_drained = drained(db)
        logger.info("drained: %s after %.0f s", is_drained, drain_s)
    finally:
        for p in senders:
            if p.poll() is None:
                p.kill()
        sampler.stop()
        if serve.poll() is None:
            serve.send_signal(signal.SIGTERM)
            try:
                serve.wait(120)
            except subprocess.TimeoutExpired:
                serve.kill()
                serve.wait(10)
    result = count(work, orthanc, files, args)
    orthanc.stop()
    result.update(
        {
            "drained": is_drained,
            "drain_seconds": round(drain_s, 1),
            "senders_seconds": round(send_end, 1),
            "events": events,
            "peak_rss": sampler.by_role(),
            "serve_rss_mb": {
                "first_minute_max": max(
                    (r for t, r in sampler.serve_series if t < 60 + sampler.serve_series[0][0]),
                    default=None,
                ),
                "last_minute_max": max(
                    (r for t, r in sampler.serve_series if t > sampler.serve_series[-1][0] - 60),
                    default=None,
                ),
                "series": [(round(t), round(r)) for t, r in sampler.serve_series[::15]],
            },
            "serve_exit": serve.returncode,
            "work": str(work),
        }
    )
    return result


def count(
    work: Path, orthanc: Orthanc, files: list[Path], args: argparse.Namespace
) -> dict[str, Any]:
    records = [
        json.loads(line)
        for f in sorted(work.glob("sender*.jsonl"))
        for line in f.read_text().splitlines()
        if line.strip()
    ]
    acked = {r["sop"]: r for r in records if r.get("status") == 0}
    refused = Counter(
        r.get("error") or f"0x{r['status']:04X}" for r in records if r.get("status") != 0
    )
    db = db_counts(work / "store" / "calcnode.db")
    jobs = db["jobs"]
    store_root = work / "store"
    stored = [s for s in acked if s in jobs and (store_root / jobs[s]["path"]).is_file()]
    lost = sorted(set(acked) - set(stored))
    states = Counter(j["state"] for s, j in jobs.items() if s in acked)
    unacked_stored = [r["sop"] for r in records if r.get("status") != 0 and r["sop"] in jobs]
    rerun = sum(1 for s, j in jobs.items() if s in acked and j["attempts"] > 1)

    orthanc.start()  # when it is down (stopped last), for the inventory
    inv = orthanc.inventory()
    received = orthanc.received()
    in_pacs = {o["sop_instance"]: o for o in inv}
    done_sends = {s["sop"]: s for s in db["sends"] if s["state"] == "sent"}
    missing = sorted(set(done_sends) - set(in_pacs))
    not_recorded = sorted(set(in_pacs) - {s["sop"] for s in db["sends"]})
    per_image: Counter[tuple[str, str]] = Counter()
    per_study: Counter[tuple[str, str]] = Counter()
    for o in inv:
        kind = KINDS.get(o["sop_class"], o["sop_class"])
        if kind in PER_IMAGE:
            for ref in set(o["references"]):
                per_image[(kind, ref)] += 1
        else:
            per_study[(kind, o["study"])] += 1
    dup_objects = sum(n - 1 for n in per_image.values() if n > 1)
    images_without = {
        kind: len(set(acked) - {ref for k, ref in per_image if k == kind}) for kind in PER_IMAGE
    }
    versions = {u: s["report_version"] for u, s in db["studies"].items()}
    dup_reports = sum(
        max(0, n - max(1, versions.get(study, 1))) for (_k, study), n in per_study.items()
    )
    resent = {u: n for u, n in received.items() if n > 1}
    delivered_kinds = Counter(KINDS.get(o["sop_class"], "other") for o in inv)
    sends_state = Counter(s["state"] for s in db["sends"])
    studies_state = Counter(s["state"] for s in db["studies"].values())
    return {
        "date": now_iso(),
        "machine": machine_info(),
        "config": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k != "child_sender"
        },
        "detector": str(args.model) if args.model else "bundled (ONNX Runtime, CPU, 1 thread)",
        "image": f"{len(files)} small phantom views per study",
        "sent": len(records),
        "acknowledged": len(acked),
        "refused": dict(refused),
        "refused_but_stored": len(unacked_stored),
        "stored": len(stored),
        "lost": lost,
        "jobs": dict(states),
        "processed": states.get("done", 0),
        "jobs_run_more_than_once": rerun,
        "studies": dict(studies_state),
        "sends": dict(sends_state),
        "send_attempts_beyond_first": sum(
            s["attempts"] - 1 for s in db["sends"] if s["attempts"] > 1
        ),
        "delivered": len(inv),
        "delivered_by_kind": dict(delivered_kinds),
        "missing_at_pacs": missing,
        "in_pacs_not_recorded": not_recorded,
        "duplicate_objects": dup_objects,
        "acknowledged_images_without": images_without,
        "duplicate_reports": dup_reports,
        "received_more_than_once": len(resent),
        "pacs_receipts": sum(received.values()),
    }


def table(d: dict[str, Any]) -> str:
    rows = [
        ["sent (C-STOREs)", str(d["sent"])],
        ["acknowledged (0x0000)", str(d["acknowledged"])],
        [
            "refused / failed C-STOREs",
            ", ".join(f"{k}: {v}" for k, v in d["refused"].items()) or "0",
        ],
        ["stored (job + file)", str(d["stored"])],
        ["**lost** (acknowledged, not stored)", f"**{len(d['lost'])}**"],
        ["processed (jobs done)", f"{d['processed']} (jobs {d['jobs']})"],
        ["jobs run more than once (worker killed)", str(d["jobs_run_more_than_once"])],
        ["studies", str(d["studies"])],
        ["sends", f"{d['sends']}; attempts beyond the first {d['send_attempts_beyond_first']}"],
        ["delivered (objects in Orthanc)", f"{d['delivered']} {d['delivered_by_kind']}"],
        ["**missing** (sent per node, absent at PACS)", f"**{len(d['missing_at_pacs'])}**"],
        [
            "**duplicate objects** (per image SEG/GSPS/TID 1500 > 1)",
            f"**{d['duplicate_objects']}**",
        ],
        [
            "acknowledged images without a SEG / GSPS / TID 1500 at the PACS",
            " / ".join(str(v) for v in d["acknowledged_images_without"].values()),
        ],
        ["**duplicate reports** (SRs beyond report versions)", f"**{d['duplicate_reports']}**"],
        ["received twice by Orthanc (same SOP Instance)", str(d["received_more_than_once"])],
        ["drained", f"{d['drained']} ({d['drain_seconds']:.0f} s after the senders)"],
        ["faults", ", ".join(f"{e['t']:.0f} s {e['event']}" for e in d["events"])],
    ]
    for role, e in d["peak_rss"].items():
        rows.append([f"peak RSS, {role} ({e['processes']})", f"{e['peak_mb']:.0f} MiB"])
    s = d["serve_rss_mb"]
    rows.append(
        [
            "serve RSS, first / last minute (max)",
            f"{s['first_minute_max']:.0f} / {s['last_minute_max']:.0f} MiB",
        ]
    )
    return markdown_table(["Measure", "Value"], rows, right=2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--senders", type=int, default=2)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--views", type=int, default=2, help="images per study")
    parser.add_argument("--interval", type=float, default=60.0, help="s between studies")
    parser.add_argument("--kill-every", type=float, default=90.0, help="mean s between kills")
    parser.add_argument("--pacs-outages", type=int, default=2)
    parser.add_argument("--outage-seconds", type=float, default=45.0)
    parser.add_argument("--quiet", type=float, default=10.0, help="study quiet_seconds")
    parser.add_argument("--lease", type=float, default=60.0, help="worker lease_seconds")
    parser.add_argument("--drain", type=float, default=15.0, help="minutes to finish")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "soak")
    parser.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    parser.add_argument("--child-sender", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_sender:
        c = json.loads(args.child_sender)
        sender_main(
            [Path(p) for p in c["templates"]],
            c["port"],
            c["seconds"],
            c["interval"],
            Path(c["out"]),
            c["seed"],
        )
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result = run(args)
    write_json(args.out, result)
    print(table(result))
    bad = result["lost"] or result["missing_at_pacs"] or result["duplicate_reports"]
    bad = bad or result["duplicate_objects"] > len(
        [e for e in result["events"] if e["event"] == "SIGKILL worker"]
    )
    return 1 if bad or not result["drained"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
