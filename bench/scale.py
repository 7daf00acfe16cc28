"""Does the queue keep up? Jobs/s with 1, 2, 4 and 8 worker processes, SQLite vs PostgreSQL.

Each worker is a process (forked, with its own database connections, as ``calcnode
serve``'s workers and ``calcnode worker`` units are) looping ``db.jobs.claim`` → the fake
detector → ``db.jobs.complete`` until the queue is empty. The fake detector has a fixed
cost per job, so what varies between runs is the queue. Two kinds of cost, both run by
default:

``wait``
    the detector *waits* its cost (``time.sleep``): what a worker's CPU does while its GPU
    computes. The cores are not the limit: N workers should reach N / cost jobs/s until
    the queue (or the database server) is the bottleneck.
``busy``
    the detector *spins* the CPU for its cost, counted in the process's own CPU time
    (``time.process_time``: a worker that waits for a core does not get credit for the
    wait): what a CPU worker does. Past the machine's cores more workers cannot help: at
    most ``min(workers, cores) / cost`` jobs/s.

Also measured, with no detector: claims/s of the bare queue (claim only) and claim +
complete pairs/s, by 1, 2 and 4 processes, from a backlog of ``--bare-jobs`` jobs.

The queue is filled in one statement per thousand jobs (not one receipt each), with
distinct arrival times as ``calcnode serve`` gives them (one receipt, one time); on
PostgreSQL the table is then analysed, as autovacuum does to a live table. Each
measurement is repeated (``--repeats``) and the median run is kept; every run's figure is
in the JSON. The machine's load average at the start and the end, and the CPU the whole
machine was busy with during each run (``/proc/stat``: the database server's and anyone
else's too), say how idle the machine was.

PostgreSQL: a throwaway server (``tests/pg.py``: Debian's ``initdb``/``pg_ctl`` in
``/tmp``, a Unix socket, ``fsync=off`` — durability off, so the figures are the queue's
logic and round trips, not the disk), or ``--postgres-url`` for a real one (its calcnode
tables are emptied between runs: use a scratch database). SQLite: a file in a temporary
folder, as configured by default (WAL, ``synchronous=FULL``).

Run: ``.venv/bin/python bench/scale.py`` (about five minutes on 2 cores); results in
``bench/results/scale.json`` and as Markdown on stdout (the tables of bench/README.md's
"Scale-out (queue throughput)" section).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy import insert, text  # noqa: E402

from storage.database import open_database  # noqa: E402
from storage.models import Job, Study, utcnow  # noqa: E402

RESULTS = REPO / "bench" / "results"
MG = "1.2.840.10008.5.1.4.1.1.1.2"
WORKER_COUNTS = (1, 2, 4, 8)
BARE_PROCESSES = (1, 2, 4)
COST_KINDS = ("wait", "busy")

#: What a worker stores for a job: a result of about the size a real one has.
RESULT = {
    "detections": {"points": [[float(i), float(2 * i), 0.9] for i in range(40)]},
    "detection_count": 40,
    "seconds": 0.05,
    "provenance": {"model_version": "bench", "device_uid": "2.25.1"},
    "objects": [],
    "paths": ["results/1.2.3/a.json"],
}


def fill(url: str, count: int) -> None:
    """``count`` queued jobs of one study, due now, arrived one microsecond apart."""
    database = open_database(url)
    first = utcnow() - dt.timedelta(seconds=1)
    with database.transaction() as s:
        s.execute(text("DELETE FROM sends"))
        s.execute(text("DELETE FROM jobs"))
        s.execute(text("DELETE FROM studies"))
        s.execute(
            insert(Study).values(
                study_instance_uid="1.2.3",
                first_received_at=first,
                last_received_at=first,
                image_count=count,
                state="open",
                content_generation=1,
                report_version=0,
            )
        )
        rows = []
        for i in range(count):
            arrived = first + dt.timedelta(microseconds=i)
            rows.append(
                {
                    "sop_instance_uid": f"1.2.3.{i}",
                    "study_instance_uid": "1.2.3",
                    "series_instance_uid": "1.2.3.0",
                    "sop_class_uid": MG,
                    "path": f"instances/1.2.3/1.2.3.0/1.2.3.{i}.dcm",
                    "digest": "a" * 64,
                    "size_bytes": 28_000_000,
                    "calling_aet": "PACS",
                    "state": "queued",
                    "attempts": 0,
                    "max_attempts": 3,
                    "received_at": arrived,
                    "next_attempt_at": arrived,
                    "created_at": arrived,
                    "updated_at": arrived,
                }
            )
        for start in range(0, count, 1000):
            s.execute(insert(Job), rows[start : start + 1000])
    if database.backend == "postgresql":
        with database.engine.connect() as con:
            con.exec_driver_sql("ANALYZE jobs")
            con.commit()
    database.close()


def _work(cost: float, kind: str) -> None:
    if cost <= 0:
        return
    if kind == "wait":
        time.sleep(cost)
        return
    end = time.process_time() + cost
    while time.process_time() < end:
        pass


def _worker(url: str, name: str, mode: str, cost: float, kind: str, start: Any, out: Any) -> None:
    database = open_database(url)
    start.wait()
    done = 0
    while (job := database.jobs.claim(name, lease_seconds=300)) is not None:
        if mode != "claim":
            _work(cost, kind)
            database.jobs.complete(job.job_id, name, result=RESULT)
        done += 1
    database.close()
    out.put((name, done, time.monotonic()))


def _busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has been busy (all cores, ``/proc/stat``), or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    ticks = [int(f) for f in fields[:8]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def run_once(
    url: str, *, workers: int, jobs: int, mode: str, cost: float, kind: str
) -> dict[str, float]:
    """One measurement: ``workers`` processes empty a queue of ``jobs``."""
    fill(url, jobs)
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(url, f"w{n}", mode, cost, kind, start, out))
        for n in range(workers)
    ]
    for proc in procs:
        proc.start()
    time.sleep(0.5)  # every worker connected and waiting
    cpu_before, busy_before = os.times(), _busy_cpu_seconds()
    began = time.monotonic()
    start.set()
    reports = [out.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join(30)
    ended = max(r[2] for r in reports)
    cpu_after, busy_after = os.times(), _busy_cpu_seconds()
    handled = sum(r[1] for r in reports)
    if handled != jobs:
        raise RuntimeError(f"{handled} jobs handled of {jobs}: a job claimed twice or lost")
    seconds = ended - began
    children_cpu = (cpu_after.children_user - cpu_before.children_user) + (
        cpu_after.children_system - cpu_before.children_system
    )
    busy = (
        (busy_after - busy_before) / (time.monotonic() - began)
        if busy_before is not None and busy_after is not None
        else float("nan")
    )
    return {
        "seconds": seconds,
        "worker_cpu_seconds": children_cpu,
        "machine_busy_cores": busy,
    }


def run(
    url_for: Callable[[], str],
    *,
    repeats: int,
    workers: int,
    jobs: int,
    mode: str,
    cost: float,
    kind: str,
) -> dict[str, Any]:
    """The median of ``repeats`` measurements (each on a fresh database)."""
    runs = [
        run_once(url_for(), workers=workers, jobs=jobs, mode=mode, cost=cost, kind=kind)
        for _ in range(repeats)
    ]
    median = sorted(runs, key=lambda r: r["seconds"])[(len(runs) - 1) // 2]
    cores = os.cpu_count() or 1
    ideal = None
    if cost > 0:
        ideal = (workers if kind == "wait" else min(workers, cores)) / cost
    return {
        "workers": workers,
        "jobs": jobs,
        "mode": mode,
        "cost_seconds": cost,
        "cost_kind": kind,
        "seconds": round(median["seconds"], 3),
        "per_second": round(jobs / median["seconds"], 1),
        "ideal_per_second": round(ideal, 1) if ideal is not None else None,
        "worker_cpu_seconds": round(median["worker_cpu_seconds"], 2),
        "machine_busy_cores": round(median["machine_busy_cores"], 2),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "runs_per_second": [round(jobs / r["seconds"], 1) for r in runs],
    }


def _backends(args: argparse.Namespace) -> tuple[dict[str, Callable[[], str]], Callable[[], None]]:
    """name → callable returning a fresh database URL; and a cleanup."""
    folder = Path(tempfile.mkdtemp(prefix="calcnode-scale-"))
    counter = iter(range(10**6))
    made: dict[str, Callable[[], str]] = {
        "sqlite": lambda: f"sqlite:///{folder}/node-{next(counter)}.db"
    }
    server = None
    if args.postgres_url:
        made["postgresql"] = lambda: str(args.postgres_url)
    elif not args.no_postgres:
        from tests.pg import start_server, unavailable_reason

        reason = unavailable_reason()
        if reason is None:
            server = start_server()
            made["postgresql"] = lambda: server.url(server.create_database())
        else:
            print(f"PostgreSQL skipped: {reason}", file=sys.stderr)

    def cleanup() -> None:
        if server is not None:
            server.stop()
        for path in folder.glob("*"):
            path.unlink()
        folder.rmdir()

    return made, cleanup


def _postgres_version(url: str) -> str | None:
    database = open_database(url)
    try:
        with database.engine.connect() as con:
            return str(con.exec_driver_sql("SHOW server_version").scalar())
    finally:
        database.close()


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--cost", type=float, default=0.05, help="seconds per job (0.05)")
    parser.add_argument("--cost-kinds", nargs="+", choices=COST_KINDS, default=list(COST_KINDS))
    parser.add_argument("--jobs-per-worker", type=int, default=40, help="(40)")
    parser.add_argument("--bare-jobs", type=int, default=2000, help="jobs of the bare runs")
    parser.add_argument("--workers", type=int, nargs="+", default=list(WORKER_COUNTS))
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure, median (3)")
    parser.add_argument("--postgres-url", help="a scratch PostgreSQL database instead")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument(
        "--backends", nargs="+", choices=("sqlite", "postgresql"), default=["sqlite", "postgresql"]
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.jobs_per_worker < 1 or args.bare_jobs < 1 or args.cost <= 0:
        parser.error("--repeats, --jobs-per-worker, --bare-jobs and --cost must be positive")

    load_start = list(os.getloadavg())
    backends, cleanup = _backends(args)
    results: list[dict[str, Any]] = []
    versions: dict[str, str | None] = {}
    try:
        for name, fresh in backends.items():
            if name not in args.backends:
                continue
            if name == "postgresql":
                versions[name] = _postgres_version(fresh())
            for kind in args.cost_kinds:
                for workers in args.workers:
                    row = run(
                        fresh,
                        repeats=args.repeats,
                        workers=workers,
                        jobs=args.jobs_per_worker * workers,
                        mode="work",
                        cost=args.cost,
                        kind=kind,
                    )
                    results.append({"backend": name, **row})
                    print(json.dumps(results[-1]), file=sys.stderr)
            for mode in ("claim", "pair"):
                for workers in BARE_PROCESSES:
                    row = run(
                        fresh,
                        repeats=args.repeats,
                        workers=workers,
                        jobs=args.bare_jobs,
                        mode=mode,
                        cost=0,
                        kind="wait",
                    )
                    results.append({"backend": name, **row})
                    print(json.dumps(results[-1]), file=sys.stderr)
    finally:
        cleanup()

    data = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "bench/scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_start": [round(x, 2) for x in load_start],
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
            "postgresql": versions.get("postgresql"),
        },
        "settings": {
            "cost_seconds": args.cost,
            "jobs_per_worker": args.jobs_per_worker,
            "bare_jobs": args.bare_jobs,
            "repeats": args.repeats,
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    print(markdown(data))
    return 0


def markdown(data: dict[str, Any]) -> str:
    """The tables of bench/README.md's "Scale-out (queue throughput)" section."""
    rows = data["results"]
    lines = [
        "| Backend | Cost | Workers | Jobs | Seconds | Jobs/s | Ideal | Of ideal | vs 1 worker "
        "| Machine busy (cores) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row["mode"] != "work":
            continue
        one = next(
            r["per_second"]
            for r in rows
            if r["mode"] == "work"
            and r["backend"] == row["backend"]
            and r["cost_kind"] == row["cost_kind"]
            and r["workers"] == 1
        )
        lines.append(
            f"| {row['backend']} | {row['cost_kind']} {row['cost_seconds'] * 1000:.0f} ms "
            f"| {row['workers']} | {row['jobs']} | {row['seconds']:.2f} | {row['per_second']:.1f} "
            f"| {row['ideal_per_second']:.0f} | {row['per_second'] / row['ideal_per_second']:.0%} "
            f"| {row['per_second'] / one:.2f}× | {row['machine_busy_cores']:.2f} |"
        )
    lines += [
        "",
        "| Backend | Bare queue | Processes | Operations | Seconds | Per second "
        "| Machine busy (cores) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row["mode"] == "work":
            continue
        what = "claims" if row["mode"] == "claim" else "claim + complete"
        lines.append(
            f"| {row['backend']} | {what} | {row['workers']} | {row['jobs']} "
            f"| {row['seconds']:.2f} | {row['per_second']:.0f} | {row['machine_busy_cores']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
