"""PostgreSQL as the shared database of several processes and hosts (tests/pg.py's server).

What only a server shared by many processes shows: claims once across worker processes,
a worker killed mid-job, schedulers running at once (a study reported once, an object
sent once — on SQLite too, whose task locks are files), the task locks freed by a killed
holder, the server going away while the node runs (the SCP answers 0xA710, nothing is
lost, the node carries on when it is back), processes creating one schema at once, and
two ``calcnode serve`` on one database and one storage root. The queue's and the
scheduler's own tests run on PostgreSQL too (tests/test_queue.py, tests/test_scheduler.py).

The tests that take ``database_url`` run on both backends; the others are PostgreSQL's
alone (marked ``postgres``). Timing is never what a test relies on: the concurrent ones
check an invariant whatever the interleaving (at most one holder inside a locked task,
one report per study), and the lease test waits for a real lease to run out.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from factories import make_mg_dataset
from pynetdicom import AE
from sqlalchemy import insert
from sqlalchemy.engine import make_url

from node.scheduler import complete_studies, recover_leases, send_results
from node.scp import STATUS_DATABASE_UNAVAILABLE, StorageSCP
from node.service import retry_job, status
from node.settings import DestinationSettings, Settings
from node.stores import open_storage
from storage.database import Database, open_database
from storage.errors import DatabaseUnavailableError, StorageError
from storage.models import SCHEMA_VERSION, Job, Study, utcnow
from storage.policy import QueuePolicy
from tests.helpers import (
    REPO,
    FakeDetector,
    Receiver,
    clean_env,
    free_port,
    make_settings,
    make_worker,
    receive,
    write_config,
)
from tests.pg import PostgresServer

CAD_SR = "1.2.840.10008.5.1.4.1.1.88.50"
MG = "1.2.840.10008.5.1.4.1.1.1.2"
postgres = pytest.mark.postgres


def settings_on(root: Path, database_url: str, **kwargs: Any) -> Settings:
    """``make_settings(root, **kwargs)`` with its database at ``database_url``."""
    settings = make_settings(root, **kwargs)
    storage = settings.storage.model_copy(update={"database_url": database_url})
    return settings.model_copy(update={"storage": storage})


def wait_until(condition: Callable[[], object], timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return bool(condition())


# ----------------------------------------------------------------------------- workers


def _claim_until_empty(url: str, name: str, start: Any, out: Any) -> None:
    """A worker process: claim → "process" → complete until the queue is empty."""
    database = open_database(url)
    start.wait()
    done: list[int] = []
    while (job := database.jobs.claim(name, lease_seconds=300)) is not None:
        done.append(job.job_id)  # the processing: recorded once per job handled
        database.jobs.complete(job.job_id, name, result={"worker": name})
    database.close()
    out.put((name, done))


@postgres
def test_four_worker_processes_process_each_of_400_jobs_exactly_once(postgres_url: str) -> None:
    database = open_database(postgres_url, policy=QueuePolicy(max_attempts=3))
    now = utcnow() - dt.timedelta(seconds=1)
    common = {"received_at": now, "next_attempt_at": now, "created_at": now, "updated_at": now}
    with database.transaction() as s:  # 400 rows in one statement, not 400 receipts
        s.execute(
            insert(Study).values(
                study_instance_uid="1.2.3",
                first_received_at=now,
                last_received_at=now,
                image_count=400,
                state="open",
                content_generation=1,
                report_version=0,
            )
        )
        s.execute(
            insert(Job),
            [
                {
                    "sop_instance_uid": f"1.2.3.{i}",
                    "study_instance_uid": "1.2.3",
                    "series_instance_uid": "1.2.3.0",
                    "sop_class_uid": MG,
                    "path": f"instances/{i}.dcm",
                    "digest": "a" * 64,
                    "size_bytes": 1,
                    "calling_aet": "PACS",
                    "state": "queued",
                    "attempts": 0,
                    "max_attempts": 3,
                    **common,
                }
                for i in range(400)
            ],
        )
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_claim_until_empty, args=(postgres_url, f"w{n}", start, out))
        for n in range(4)
    ]
    for proc in procs:
        proc.start()
    start.set()
    handled = dict(out.get(timeout=240) for _ in procs)
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0

    every = [job_id for done in handled.values() for job_id in done]
    assert len(every) == len(set(every)) == 400  # each processed exactly once
    assert all(handled.values()), {k: len(v) for k, v in handled.items()}  # all four worked
    summary = database.status_summary()["jobs"]
    assert summary == {"queued": 0, "running": 0, "done": 400, "failed": 0}
    with database.engine.connect() as con:
        rows = con.exec_driver_sql("SELECT id, attempts, result FROM jobs").all()
    assert {attempts for _, attempts, _ in rows} == {1}  # claimed once each
    assert all(job_id in handled[result["worker"]] for job_id, _, result in rows)
    database.close()


class HangingDetector(FakeDetector):
    """Says it started (``started`` is set), then never finishes."""

    def __init__(self, started: Any) -> None:
        super().__init__()
        self.started = started

    def detect(self, source: Any, *, path: str = "") -> Any:
        self.started.set()
        time.sleep(600)
        raise AssertionError("unreachable")


def _hang_on_a_job(settings: Settings, started: Any) -> None:
    worker = make_worker(settings, HangingDetector(started), worker_id="doomed")
    worker.run_once()


@postgres
def test_a_worker_killed_mid_job_loses_its_lease_and_another_completes_the_job(
    tmp_path: Path, postgres_url: str
) -> None:
    settings = settings_on(tmp_path / "node", postgres_url, lease_seconds=1.0, kinds=("cad-sr",))
    survivor = make_worker(settings, FakeDetector(), worker_id="survivor")
    job_id = receive(survivor.database, survivor.store, make_mg_dataset())

    ctx = multiprocessing.get_context("fork")
    started = ctx.Event()
    doomed = ctx.Process(target=_hang_on_a_job, args=(settings, started))
    doomed.start()
    assert started.wait(60), "the worker never started the job"
    os.kill(doomed.pid, signal.SIGKILL)  # mid-job: its heartbeat dies with it
    doomed.join(10)
    job = survivor.database.jobs.get_job(job_id)
    assert (job.state, job.lease_owner, job.attempts) == ("running", "doomed", 1)

    assert survivor.run_once() is None  # still leased: nobody else may take it
    # The lease runs out a second after its last extension; the scheduler's lease
    # recovery then returns the job to the queue, the killed attempt counted.
    assert wait_until(lambda: recover_leases(survivor.database) == [job_id], 10)
    job = survivor.database.jobs.get_job(job_id)
    assert job.state == "queued" and "lease of worker 'doomed' expired" in (job.last_error or "")
    assert wait_until(lambda: survivor.run_once() == "done", 10)
    job = survivor.database.jobs.get_job(job_id)
    assert (job.state, job.attempts, job.lease_owner) == ("done", 2, None)
    assert job.result is not None and job.result["worker"] == "survivor"
    survivor.database.close()


@postgres
def test_lease_recovery_skips_a_job_whose_worker_is_writing_it(postgres_url: str) -> None:
    database = open_database(postgres_url)
    t0 = utcnow() - dt.timedelta(minutes=5)
    database.jobs.enqueue_image(
        sop_instance_uid="1.1",
        study_instance_uid="1.2",
        series_instance_uid="1.3",
        sop_class_uid=MG,
        path="instances/1.1.dcm",
        digest="a" * 64,
        size=1,
        calling_aet="PACS",
        now=t0,
    )
    job = database.jobs.claim("w", lease_seconds=1, now=t0)
    assert job is not None
    with database.engine.connect() as con:  # the worker's completion, mid-transaction
        con.exec_driver_sql(f"SELECT * FROM jobs WHERE id = {job.job_id} FOR UPDATE")
        # The recovery neither waits for nor overwrites the row being written.
        assert database.jobs.recover_expired_leases() == []
        con.rollback()
    assert database.jobs.recover_expired_leases() == [job.job_id]
    database.close()


# ----------------------------------------------------------------------------- schedulers


def _settled_studies(tmp_path: Path, database_url: str, count: int, receiver: Receiver) -> Any:
    """``count`` one-image studies, their jobs done: due for their CAD SR."""
    pacs = DestinationSettings(
        name="pacs", ae_title="RECEIVER", host="127.0.0.1", port=receiver.port
    )
    settings = settings_on(tmp_path / "node", database_url, kinds=("cad-sr",), destinations=(pacs,))
    worker = make_worker(settings, FakeDetector())
    uids = []
    for seed in range(count):
        ds = make_mg_dataset(seed=seed)
        receive(worker.database, worker.store, ds)
        uids.append(str(ds.StudyInstanceUID))
    while worker.run_once() == "done":
        pass
    return settings, worker, uids


def _at_once(count: int, task: Callable[[Database, Any], int], settings: Settings) -> list[int]:
    """``task(database, store)`` in ``count`` threads, each with its own database handle
    (its own connections: another scheduler as the database sees it), started together."""
    handles = [open_storage(settings) for _ in range(count)]
    barrier = threading.Barrier(count)
    results: list[int] = []
    errors: list[BaseException] = []

    def run(database: Database, store: Any) -> None:
        try:
            barrier.wait(30)
            for _ in range(3):
                results.append(task(database, store))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=handle) for handle in handles]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for database, _ in handles:
        database.close()
    assert not errors, errors
    return results


def test_schedulers_running_at_once_report_each_study_once_and_send_each_object_once(
    tmp_path: Path, database_url: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, worker, uids = _settled_studies(tmp_path, database_url, 6, receiver)
    import node.scheduler as scheduler

    inside, most = 0, 0
    guard = threading.Lock()
    report = scheduler.report_study

    def counted(*args: Any, **kwargs: Any) -> Any:
        # How many schedulers report at the same moment (a pause makes overlap likely
        # if the lock were missing; the assertions do not depend on it).
        nonlocal inside, most
        with guard:
            inside += 1
            most = max(most, inside)
        try:
            time.sleep(0.02)
            return report(*args, **kwargs)
        finally:
            with guard:
                inside -= 1

    monkeypatch.setattr(scheduler, "report_study", counted)
    later = utcnow() + dt.timedelta(seconds=5)
    reported = _at_once(
        4, lambda db, store: complete_studies(db, store, settings, now=later), settings
    )
    assert sum(reported) == 6 and most == 1
    for uid in uids:
        study = worker.database.studies.get_study(uid)
        assert (study.state, study.report_version) == ("reported", 1)
        assert len(list((worker.store.root / "results" / uid).glob("cad-sr-*.dcm"))) == 1

    sent = _at_once(4, lambda db, store: send_results(db, store, settings, now=later), settings)
    assert sum(sent) == 6
    received = [str(ds.SOPInstanceUID) for ds in receiver.datasets]
    assert len(received) == len(set(received)) == 6  # each CAD SR once
    assert sorted(str(ds.StudyInstanceUID) for ds in receiver.datasets) == sorted(uids)
    worker.database.close()


def _hold_lock(url: str, name: str, held: Any) -> None:
    database = open_database(url)
    with database.exclusive(name) as got:
        assert got
        held.set()
        time.sleep(600)


def test_a_task_lock_has_one_holder_and_is_freed_when_its_holder_is_killed(
    database_url: str,
) -> None:
    first, second = open_database(database_url), open_database(database_url)
    with first.exclusive("sends") as got:
        assert got
        with second.exclusive("sends") as other, first.exclusive("sends") as again:
            assert not other and not again  # another handle, and another thread's turn
        with second.exclusive("retention") as unrelated:
            assert unrelated
    with second.exclusive("sends") as got:
        assert got

    ctx = multiprocessing.get_context("fork")
    held = ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(database_url, "study-completion", held))
    holder.start()
    assert held.wait(60)
    with first.exclusive("study-completion") as got:
        assert not got
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(10)
    # The kernel (flock) or the server (the holder's session ended) frees it at once.
    assert wait_until(lambda: _try(first, "study-completion"), 10)
    with pytest.raises(ValueError, match="name"), first.exclusive("no spaces"):
        pass
    first.close()
    second.close()


def _try(database: Database, name: str) -> bool:
    with database.exclusive(name) as got:
        return got


@postgres
def test_processes_starting_together_on_an_empty_database_make_one_schema(
    postgres_url: str,
) -> None:
    barrier = threading.Barrier(4)
    opened: list[Database] = []
    errors: list[BaseException] = []

    def start() -> None:
        barrier.wait(30)
        try:
            opened.append(open_database(postgres_url))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and len(opened) == 4
    with opened[0].engine.connect() as con:
        rows = con.exec_driver_sql("SELECT application, version FROM schema_version").all()
    assert rows == [("calcnode", SCHEMA_VERSION)]
    for database in opened:
        database.close()


@postgres
def test_open_names_a_missing_database_and_hides_the_password(
    postgres_server: PostgresServer,
) -> None:
    url = postgres_server.url("nowhere").replace("calcnode@", "calcnode:s3cret@")
    with pytest.raises(
        DatabaseUnavailableError, match=r'database "nowhere" does not exist'
    ) as info:
        open_database(url)
    assert "s3cret" not in str(info.value) and "***" in str(info.value)


# ----------------------------------------------------------------------------- outages


@postgres
def test_an_outage_fails_fast_while_backing_off_and_loses_nothing(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    name = str(make_url(postgres_url).database)
    database = open_database(postgres_url)
    enqueue = database.jobs.enqueue_image
    fields = {
        "study_instance_uid": "1.2",
        "series_instance_uid": "1.3",
        "sop_class_uid": MG,
        "digest": "a" * 64,
        "size": 1,
        "calling_aet": "PACS",
    }
    enqueue(sop_instance_uid="1.1", path="instances/1.1.dcm", **fields)
    postgres_server.suspend(name)
    try:
        with pytest.raises(DatabaseUnavailableError, match="unreachable"):
            database.jobs.claim("w", lease_seconds=60)  # the pooled connection was killed
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailableError, match="next try in"):
            database.status_summary()  # backing off: no connection tried
        assert time.monotonic() - started < 0.2
        with pytest.raises(StorageError), database.exclusive("sends"):
            pass
    finally:
        postgres_server.resume(name)
    # Back: after the back-off the next transaction reconnects.
    assert wait_until(lambda: _answers(database), 30, step=0.2)
    job = database.jobs.claim("w", lease_seconds=60)
    assert job is not None and job.sop_instance_uid == "1.1"  # nothing lost
    database.close()


def _answers(database: Database) -> bool:
    try:
        database.status_summary()
    except StorageError:
        return False
    return True


@pytest.fixture
def scp_on_postgres(tmp_path: Path, postgres_url: str) -> Iterator[tuple[StorageSCP, Database]]:
    settings = settings_on(tmp_path / "node", postgres_url)
    database, store = open_storage(settings)
    scp = StorageSCP(settings=settings, store=store, database=database, port=0)
    scp.start()
    try:
        yield scp, database
    finally:
        scp.stop()
        database.close()


def _store(port: int, ds: pydicom.Dataset) -> int:
    ae = AE(ae_title="TESTSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = 5
    ae.add_requested_context(ds.SOPClassUID, [str(ds.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title="CALCNODE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


@postgres
def test_the_scp_answers_a710_while_postgres_is_unreachable_and_stores_once_it_is_back(
    postgres_server: PostgresServer,
    postgres_url: str,
    scp_on_postgres: tuple[StorageSCP, Database],
    tmp_path: Path,
) -> None:
    scp, database = scp_on_postgres
    name = str(make_url(postgres_url).database)
    first, refused = make_mg_dataset(seed=1), make_mg_dataset(seed=2)
    assert _store(scp.port, first) == 0x0000
    postgres_server.suspend(name)
    try:
        assert _store(scp.port, refused) == STATUS_DATABASE_UNAVAILABLE
        assert _store(scp.port, refused) == STATUS_DATABASE_UNAVAILABLE  # backing off
    finally:
        postgres_server.resume(name)
    # The sender's retry succeeds once the node is back; nothing of the refusal stays.
    assert wait_until(lambda: _store(scp.port, refused) == 0x0000, 30, step=0.5)
    uids = {job.sop_instance_uid for job in database.jobs.study_jobs(str(first.StudyInstanceUID))}
    assert uids == {str(first.SOPInstanceUID)}
    assert database.jobs.study_jobs(str(refused.StudyInstanceUID))[0].state == "queued"
    files = list((tmp_path / "node" / "instances").rglob("*.dcm"))
    assert len(files) == 2


# ----------------------------------------------------------------------------- admin


@postgres
def test_status_and_jobs_retry_work_on_postgres(tmp_path: Path, postgres_url: str) -> None:
    settings = settings_on(tmp_path / "node", postgres_url, max_attempts=1)
    worker = make_worker(settings, FakeDetector(fail_times=1))
    job_id = receive(worker.database, worker.store, make_mg_dataset())
    assert worker.run_once() == "failed"
    info = status(settings)
    assert info["jobs"]["failed"] == 1 and info["database"].startswith("postgresql://")
    assert retry_job(settings, job_id)["state"] == "queued"
    assert worker.run_once() == "done"
    assert status(settings)["jobs"]["done"] == 1
    worker.database.close()


# ----------------------------------------------------------------------------- two nodes


#: ``calcnode serve`` whose workers run the fixed-points detector (tests.helpers.FakeDetector:
#: two findings an image): what is tested is the shared database, not inference (the
#: Orthanc end-to-end test runs the real model on PostgreSQL).
SERVE_FAKE = (
    "import sys; from node.settings import load_settings; from node.service import serve; "
    "from tests.helpers import fast_factory; sys.exit(serve(load_settings(sys.argv[1]), "
    "workers=int(sys.argv[2]), detector_factory=fast_factory))"
)


def _serve(folder: Path, settings: Settings, workers: int) -> tuple[subprocess.Popen[bytes], Path]:
    folder.mkdir(parents=True, exist_ok=True)
    config = write_config(folder / "calcnode.toml", settings)
    log = folder / "serve.log"
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE_FAKE, str(config), str(workers)],
        cwd=REPO,
        env=clean_env(),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return process, log


@postgres
@pytest.mark.slow
def test_two_serve_processes_on_one_database_and_store_deliver_one_cad_sr_per_study(
    tmp_path: Path, postgres_url: str, receiver: Receiver
) -> None:
    pacs = DestinationSettings(
        name="pacs", ae_title="RECEIVER", host="127.0.0.1", port=receiver.port
    )
    root = tmp_path / "shared-store"  # both nodes' storage.root
    nodes = []
    for n in range(2):
        settings = settings_on(
            root,
            postgres_url,
            port=free_port(),
            destinations=(pacs,),
            quiet_seconds=1.0,
            kinds=("cad-sr", "gsps"),
        )
        nodes.append((settings, *_serve(tmp_path / f"node{n}", settings, workers=1)))
    try:
        for _, process, log in nodes:
            assert wait_until(
                lambda log=log, process=process: (
                    "calcnode serving" in log.read_text() or process.poll() is not None
                ),
                120,
            ), log.read_text()
            assert process.poll() is None, log.read_text()
        # Three two-view studies, each view sent to the other node (a load balancer).
        studies = []
        for seed in range(3):
            cc = make_mg_dataset(seed=10 + seed, view="CC")
            mlo = make_mg_dataset(seed=20 + seed, view="MLO", study_uid=cc.StudyInstanceUID)
            assert _store(nodes[0][0].node.port, cc) == 0x0000
            assert _store(nodes[1][0].node.port, mlo) == 0x0000
            studies.append(str(cc.StudyInstanceUID))
        database = open_database(postgres_url, create=False)
        try:

            def delivered() -> bool:
                summary = database.status_summary()
                return summary["studies"]["reported"] == 3 and summary["sends"] == {
                    "pending": 0,
                    "sent": 9,
                    "failed": 0,  # 3 CAD SRs + 6 GSPS
                }

            assert wait_until(delivered, 240, step=0.5), (
                database.status_summary(),
                nodes[0][2].read_text()[-3000:],
                nodes[1][2].read_text()[-3000:],
            )
        finally:
            database.close()
    finally:
        for _, process, _ in nodes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for _, process, log in nodes:
            try:
                assert process.wait(90) == 0, log.read_text()[-3000:]
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                raise
    # Both nodes stopped: nothing more can arrive. Each object once, one CAD SR a study.
    received = [str(ds.SOPInstanceUID) for ds in receiver.datasets]
    assert len(received) == len(set(received)) == 9
    cad = [str(ds.StudyInstanceUID) for ds in receiver.datasets if ds.SOPClassUID == CAD_SR]
    assert sorted(cad) == sorted(studies)
    for uid in studies:
        assert len(list((root / "results" / uid).glob("cad-sr-*.dcm"))) == 1
    logs = nodes[0][2].read_text() + nodes[1][2].read_text()
    assert "Traceback" not in logs
    # Both nodes took part: each received and each worked.
    assert all(re.search(r"job \d+: done", log.read_text()) for _, _, log in nodes)
