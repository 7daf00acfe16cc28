"""Tests of the storage database: jobs (intake, claim, leases), studies, sends, schema.

Every test that takes ``db`` or ``database_url`` runs on both backends: SQLite and a
fresh database on the run's throwaway PostgreSQL server (``[postgresql]``, marked
``postgres``; skipped with the reason where no server can be started). The SQLite file's
own properties (WAL, a file that is not a database) are tested on SQLite alone.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import multiprocessing
import threading
from pathlib import Path
from typing import BinaryIO

import pytest
from sqlalchemy import Engine, create_engine, inspect, text
from sqlalchemy.engine import make_url

import storage.database
from storage.database import Database, engine_url, open_database, prepare_schema
from storage.errors import (
    DatabaseUnavailableError,
    DiskFullError,
    JobNotFoundError,
    LeaseLostError,
    SchemaVersionError,
    SendNotFoundError,
    StorageError,
    StudyNotFoundError,
)
from storage.filestore import FileStore
from storage.intake import EnqueueOutcome
from storage.jobs import Jobs
from storage.models import SCHEMA_VERSION, Base
from storage.policy import QueuePolicy
from storage.sends import Sends
from storage.studies import Studies
from tests.pg import PostgresServer

T0 = dt.datetime(2026, 1, 5, 12, 0, 0, tzinfo=dt.UTC)
STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = "1.2.826.0.1.3680043.8.498.2"
MG = "1.2.840.10008.5.1.4.1.1.1.2"
SR = "1.2.840.10008.5.1.4.1.1.88.50"
DIGEST_A = "a" * 64
DIGEST_B = "b" * 64


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def policy(**overrides: object) -> QueuePolicy:
    values: dict[str, object] = {
        "max_attempts": 3,
        "retry_base_seconds": 10.0,
        "retry_cap_seconds": 25.0,
        "send_retry_base_seconds": 5.0,
        "send_retry_cap_seconds": 40.0,
    }
    values.update(overrides)
    return QueuePolicy(**values)  # type: ignore[arg-type]


def db_url(tmp_path: Path) -> str:
    """The SQLite database of the SQLite-only tests."""
    return f"sqlite:///{tmp_path / 'node.db'}"


def raw_engine(url: str) -> Engine:
    """An engine on ``url`` outside calcnode's handle (to damage a database on purpose)."""
    return create_engine(engine_url(url))


def execute(url: str, *statements: str) -> None:
    engine = raw_engine(url)
    with engine.begin() as con:
        for statement in statements:
            con.execute(text(statement))
    engine.dispose()


@pytest.fixture
def db(database_url: str) -> Database:
    database = open_database(database_url, policy=policy())
    yield database
    database.close()


def enqueue(
    db: Database,
    sop: str,
    *,
    study: str = STUDY,
    digest: str = DIGEST_A,
    now: dt.datetime = T0,
    path: str | None = None,
):
    return db.jobs.enqueue_image(
        sop_instance_uid=sop,
        study_instance_uid=study,
        series_instance_uid=SERIES,
        sop_class_uid=MG,
        path=path if path is not None else f"instances/{study}/{SERIES}/{sop}.dcm",
        digest=digest,
        size=1234,
        calling_aet="PACS",
        now=now,
    )


def finish(db: Database, *, now: dt.datetime, worker: str = "w") -> None:
    """Claim and complete every job due at ``now``."""
    while (job := db.jobs.claim(worker, lease_seconds=60, now=now)) is not None:
        db.jobs.complete(job.job_id, worker, result={"findings": 0}, now=now)


# --------------------------------------------------------------------------- enqueue


def test_enqueue_new_instance_creates_queued_job_and_open_study(db: Database) -> None:
    result = enqueue(db, "1.1")
    assert result.outcome == "new"
    assert result.obsolete_path is None
    job = db.jobs.get_job(result.job_id)
    assert (job.state, job.attempts, job.max_attempts) == ("queued", 0, 3)
    assert job.digest == DIGEST_A and job.size == 1234 and job.calling_aet == "PACS"
    assert job.received_at == T0 and job.next_attempt_at == T0
    study = db.studies.get_study(STUDY)
    assert (study.state, study.image_count, study.content_generation) == ("open", 1, 1)
    assert study.first_received_at == T0 == study.last_received_at


def test_enqueue_same_uid_same_digest_is_duplicate_without_new_job(db: Database) -> None:
    first = enqueue(db, "1.1")
    job = db.jobs.claim("w", lease_seconds=60, now=at(1))
    assert job is not None
    db.jobs.complete(job.job_id, "w", result={"findings": 2}, now=at(2))

    again = enqueue(db, "1.1", now=at(5))

    assert (again.job_id, again.outcome) == (first.job_id, "duplicate")
    info = db.jobs.get_job(first.job_id)
    assert (info.state, info.attempts, info.result) == ("done", 1, {"findings": 2})
    assert db.jobs.claim("w", lease_seconds=60, now=at(6)) is None
    study = db.studies.get_study(STUDY)
    assert study.image_count == 1
    assert study.content_generation == 1  # content unchanged
    assert study.last_received_at == at(5)  # but the study is still arriving


def test_enqueue_changed_resend_replaces_record_and_requeues_job(db: Database) -> None:
    first = enqueue(db, "1.1")
    finish(db, now=at(1))
    [due] = db.studies.due_studies(quiet_seconds=10, now=at(20))
    assert db.studies.mark_study_reported(STUDY, due.version, generation=due.generation, now=at(21))

    again = enqueue(db, "1.1", digest=DIGEST_B, now=at(30))

    assert (again.job_id, again.outcome) == (first.job_id, "replaced")
    info = db.jobs.get_job(first.job_id)
    assert (info.state, info.attempts, info.digest) == ("queued", 0, DIGEST_B)
    assert info.result is None and info.received_at == at(30)
    study = db.studies.get_study(STUDY)
    assert (study.state, study.image_count, study.report_version) == ("open", 1, 1)
    finish(db, now=at(31))
    [due] = db.studies.due_studies(quiet_seconds=10, now=at(41))
    assert due.version == 2


def test_changed_resend_voids_the_running_workers_lease(db: Database) -> None:
    enqueue(db, "1.1")
    job = db.jobs.claim("old-worker", lease_seconds=600, now=at(1))
    assert job is not None

    enqueue(db, "1.1", digest=DIGEST_B, now=at(2))

    with pytest.raises(LeaseLostError, match="old-worker"):
        db.jobs.complete(job.job_id, "old-worker", result={"findings": 1}, now=at(3))
    again = db.jobs.claim("new-worker", lease_seconds=600, now=at(4))
    assert again is not None
    assert (again.job_id, again.digest, again.attempt) == (job.job_id, DIGEST_B, 1)


def test_resend_into_another_study_reopens_both_and_names_the_obsolete_file(
    db: Database,
) -> None:
    other = "1.2.826.0.1.3680043.8.498.99"
    enqueue(db, "1.1", path="instances/old/1.1.dcm")
    enqueue(db, "1.2")
    finish(db, now=at(1))
    [due] = db.studies.due_studies(quiet_seconds=0, now=at(2))
    db.studies.mark_study_reported(STUDY, due.version, now=at(2))

    moved = enqueue(db, "1.1", study=other, digest=DIGEST_B, now=at(3), path="instances/new.dcm")

    assert moved.outcome == "replaced"
    assert moved.obsolete_path == "instances/old/1.1.dcm"
    old, new = db.studies.get_study(STUDY), db.studies.get_study(other)
    assert (old.state, old.image_count) == ("open", 1)
    assert (new.state, new.image_count) == ("open", 1)
    assert [j.sop_instance_uid for j in db.jobs.study_jobs(other)] == ["1.1"]


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("digest", "A" * 64, ValueError),
        ("digest", "a" * 63, ValueError),
        ("size", -1, ValueError),
        ("size", True, TypeError),
        ("sop_instance_uid", "", ValueError),
        ("sop_instance_uid", "1." * 40, ValueError),
        ("study_instance_uid", "1.2 3", ValueError),
        ("series_instance_uid", 123, TypeError),
        ("path", "/abs/file.dcm", ValueError),
        ("path", "instances/../../etc/passwd", ValueError),
        ("calling_aet", "X" * 17, ValueError),
        ("now", dt.datetime(2026, 1, 1, 12, 0), ValueError),
        ("now", "2026-01-01", TypeError),
    ],
)
def test_enqueue_rejects_invalid_arguments_naming_them(
    db: Database, field: str, value: object, error: type[Exception]
) -> None:
    args: dict[str, object] = {
        "sop_instance_uid": "1.1",
        "study_instance_uid": STUDY,
        "series_instance_uid": SERIES,
        "sop_class_uid": MG,
        "path": "instances/a.dcm",
        "digest": DIGEST_A,
        "size": 10,
        "calling_aet": "PACS",
        "now": T0,
    }
    args[field] = value
    with pytest.raises(error, match=field):
        db.jobs.enqueue_image(**args)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- receive


def instance_files(store: FileStore) -> list[str]:
    root = store.root / "instances"
    return sorted(p.relative_to(store.root).as_posix() for p in root.rglob("*") if p.is_file())


def receive(db: Database, store: FileStore, content: bytes, *, sop: str = "1.1", **kw: object):
    args: dict[str, object] = {
        "sop_instance_uid": sop,
        "study_instance_uid": STUDY,
        "series_instance_uid": SERIES,
        "sop_class_uid": MG,
        "data": content,
        "digest": hashlib.sha256(content).hexdigest(),
        "size": len(content),
        "calling_aet": "PACS",
        "now": T0,
    }
    args.update(kw)
    return db.jobs.receive(store, **args)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "store", min_free_mb=0)


def test_receive_new_instance_writes_the_file_by_uid_and_queues_its_job(
    db: Database, store: FileStore
) -> None:
    result = receive(db, store, b"first")
    assert result.outcome is EnqueueOutcome.NEW and result.outcome == "new"
    assert result.path == f"instances/{STUDY}/{SERIES}/1.1.dcm" and result.obsolete_path is None
    assert instance_files(store) == [result.path]
    assert store.resolve(result.path).read_bytes() == b"first"
    job = db.jobs.get_job(result.job_id)
    assert (job.path, job.digest, job.size, job.state) == (
        result.path,
        hashlib.sha256(b"first").hexdigest(),
        5,
        "queued",
    )


def test_receive_duplicate_writes_nothing_and_queues_nothing(
    db: Database, store: FileStore
) -> None:
    first = receive(db, store, b"same")
    finish(db, now=at(1))
    written: list[int] = []

    def writer(fh: BinaryIO) -> None:
        written.append(1)
        fh.write(b"same")

    digest = hashlib.sha256(b"same").hexdigest()
    again = receive(db, store, b"same", data=writer, digest=digest, now=at(5))

    assert (again.job_id, again.outcome, again.path) == (first.job_id, "duplicate", first.path)
    assert written == []  # decided before writing
    assert instance_files(store) == [first.path]
    assert db.jobs.get_job(first.job_id).state == "done"
    assert db.studies.get_study(STUDY).last_received_at == at(5)


def test_receive_duplicate_writes_a_missing_recorded_file_back(
    db: Database, store: FileStore
) -> None:
    first = receive(db, store, b"same")
    store.remove(first.path)
    again = receive(db, store, b"same", now=at(5))
    assert (again.outcome, again.path) == ("duplicate", first.path)
    assert store.resolve(first.path).read_bytes() == b"same"


def test_receive_replacement_writes_beside_the_current_file_then_removes_it(
    db: Database, store: FileStore
) -> None:
    first = receive(db, store, b"version 1")
    second = receive(db, store, b"version 2", now=at(5))

    digest2 = hashlib.sha256(b"version 2").hexdigest()
    assert (second.job_id, second.outcome) == (first.job_id, EnqueueOutcome.REPLACED)
    assert second.path == f"instances/{STUDY}/{SERIES}/1.1.{digest2[:16]}"
    assert second.obsolete_path is None
    assert instance_files(store) == [second.path]  # the superseded file is gone
    job = db.jobs.get_job(first.job_id)
    assert (job.path, job.digest, job.state) == (second.path, digest2, "queued")
    assert db.studies.get_study(STUDY).content_generation == 2

    third = receive(db, store, b"version 3", now=at(9))  # back at the usual path
    assert (third.outcome, third.path) == ("replaced", first.path)
    assert instance_files(store) == [first.path]
    assert store.resolve(first.path).read_bytes() == b"version 3"


def test_receive_replacement_into_another_study_moves_the_file(
    db: Database, store: FileStore
) -> None:
    other = "1.2.826.0.1.3680043.8.498.99"
    receive(db, store, b"version 1")
    moved = receive(db, store, b"version 2", study_instance_uid=other, now=at(5))
    assert (moved.outcome, moved.path) == ("replaced", f"instances/{other}/{SERIES}/1.1.dcm")
    assert instance_files(store) == [moved.path]
    assert db.studies.get_study(STUDY).image_count == 0
    assert db.studies.get_study(other).image_count == 1


def test_receive_removes_the_written_file_when_recording_fails(
    db: Database, store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(**_: object) -> None:
        raise StorageError("database operation failed: disk I/O error")

    monkeypatch.setattr(db.jobs, "enqueue_image", broken)
    with pytest.raises(StorageError, match="disk I/O"):
        receive(db, store, b"content")
    monkeypatch.undo()
    assert instance_files(store) == []
    assert db.status_summary()["jobs"]["queued"] == 0


def test_receive_on_a_full_disk_raises_disk_full_and_leaves_nothing(
    db: Database, tmp_path: Path
) -> None:
    full = FileStore(tmp_path / "full", min_free_mb=10**9)
    with pytest.raises(DiskFullError):
        receive(db, full, b"content")
    assert not (full.root / "instances").exists()
    assert db.status_summary()["jobs"]["queued"] == 0


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("calling_aet", "X" * 17, ValueError),
        ("sop_class_uid", "", ValueError),
        ("digest", "A" * 64, ValueError),
        ("size", -1, ValueError),
    ],
)
def test_receive_checks_its_arguments_before_writing(
    db: Database, store: FileStore, field: str, value: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match=field):
        receive(db, store, b"content", **{field: value})
    assert not (store.root / "instances").exists()


# --------------------------------------------------------------------------- claim


def _claim_all(url: str, worker: str, start: object, out: object) -> None:
    database = open_database(url)
    start.wait()  # type: ignore[attr-defined]
    got: list[int] = []
    while (job := database.jobs.claim(worker, lease_seconds=300)) is not None:
        got.append(job.job_id)
        database.jobs.complete(job.job_id, worker, result={"worker": worker})
    database.close()
    out.put((worker, got))  # type: ignore[attr-defined]


def test_claim_is_atomic_across_processes(database_url: str) -> None:
    url = database_url
    database = open_database(url, policy=policy())
    ids = {enqueue(database, f"1.{i}", now=at(-1)).job_id for i in range(120)}
    database.close()

    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(url, f"p{n}", start, out)) for n in range(4)]
    for proc in procs:
        proc.start()
    start.set()
    results = dict(out.get(timeout=60) for _ in procs)
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0

    claimed = [job_id for got in results.values() for job_id in got]
    assert len(claimed) == 120
    assert set(claimed) == ids  # every job claimed, none twice
    database = open_database(url)
    for job_id in ids:
        job = database.jobs.get_job(job_id)
        assert (job.state, job.attempts) == ("done", 1)
        assert job.result is not None and job_id in results[job.result["worker"]]
    database.close()


def _claim_with_inherited(database: Database, out: object) -> None:
    job = database.jobs.claim("child", lease_seconds=60, now=at(1))
    out.put(None if job is None else job.job_id)  # type: ignore[attr-defined]


def test_a_database_inherited_through_fork_opens_its_own_connections(db: Database) -> None:
    first = enqueue(db, "1.1").job_id
    enqueue(db, "1.2")
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_claim_with_inherited, args=(db, out))
    child.start()
    assert out.get(timeout=30) == first
    child.join(timeout=30)
    assert child.exitcode == 0
    second = db.jobs.claim("parent", lease_seconds=60, now=at(1))  # the parent's pool still works
    assert second is not None and second.job_id != first
    assert db.jobs.get_job(first).lease_owner == "child"


def test_claim_is_atomic_across_threads_sharing_one_database(db: Database) -> None:
    ids = {enqueue(db, f"1.{i}").job_id for i in range(60)}
    claimed: list[int] = []
    lock = threading.Lock()

    def work(name: str) -> None:
        while (job := db.jobs.claim(name, lease_seconds=60, now=at(1))) is not None:
            with lock:
                claimed.append(job.job_id)

    threads = [threading.Thread(target=work, args=(f"t{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(claimed) == sorted(ids)


def test_claim_takes_jobs_in_arrival_order_and_none_when_empty(db: Database) -> None:
    second = enqueue(db, "1.2", now=at(2)).job_id
    first = enqueue(db, "1.1", now=at(1)).job_id
    a = db.jobs.claim("w", lease_seconds=60, now=at(3))
    b = db.jobs.claim("w", lease_seconds=60, now=at(3))
    assert a is not None and b is not None
    assert (a.job_id, b.job_id) == (first, second)
    assert a.lease_expires_at == at(63)
    assert a.path == f"instances/{STUDY}/{SERIES}/1.1.dcm"
    assert db.jobs.claim("w", lease_seconds=60, now=at(3)) is None


def test_claim_does_not_take_a_job_before_it_arrived(db: Database) -> None:
    enqueue(db, "1.1", now=at(10))
    assert db.jobs.claim("w", lease_seconds=60, now=at(9)) is None
    assert db.jobs.claim("w", lease_seconds=60, now=at(10)) is not None


@pytest.mark.parametrize(
    ("worker", "lease", "error"),
    [
        ("", 60, ValueError),
        ("w", 0, ValueError),
        ("w", float("nan"), ValueError),
        (7, 60, TypeError),
    ],
)
def test_claim_rejects_invalid_arguments(
    db: Database, worker: object, lease: float, error: type[Exception]
) -> None:
    with pytest.raises(error, match=r"worker_id|lease_seconds"):
        db.jobs.claim(worker, lease_seconds=lease)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- leases


def test_expired_lease_returns_the_job_to_the_queue_and_counts_the_attempt(
    db: Database,
) -> None:
    job_id = enqueue(db, "1.1").job_id
    job = db.jobs.claim("dead", lease_seconds=60, now=at(0))
    assert job is not None

    assert db.jobs.recover_expired_leases(now=at(59)) == []
    assert db.jobs.recover_expired_leases(now=at(61)) == [job_id]

    info = db.jobs.get_job(job_id)
    assert (info.state, info.attempts, info.lease_owner) == ("queued", 1, None)
    assert info.next_attempt_at == at(71)  # back-off after the first attempt: 10 s
    assert info.last_error is not None and "expired" in info.last_error
    assert db.jobs.claim("w2", lease_seconds=60, now=at(70)) is None
    again = db.jobs.claim("w2", lease_seconds=60, now=at(71))
    assert again is not None and again.attempt == 2


def test_expired_lease_on_the_last_attempt_fails_the_job_keeping_the_reason(
    database_url: str,
) -> None:
    database = open_database(database_url, policy=policy(max_attempts=1))
    job_id = enqueue(database, "1.1").job_id
    assert database.jobs.claim("dead", lease_seconds=5, now=at(0)) is not None
    assert database.jobs.recover_expired_leases(now=at(6)) == [job_id]
    info = database.jobs.get_job(job_id)
    assert (info.state, info.attempts) == ("failed", 1)
    assert "dead" in (info.last_error or "")
    database.close()


def test_stale_worker_gets_lease_lost_error_after_its_job_was_taken_over(db: Database) -> None:
    job_id = enqueue(db, "1.1").job_id
    assert db.jobs.claim("stale", lease_seconds=10, now=at(0)) is not None
    db.jobs.recover_expired_leases(now=at(11))
    assert db.jobs.claim("fresh", lease_seconds=60, now=at(30)) is not None

    with pytest.raises(LeaseLostError, match="fresh"):
        db.jobs.complete(job_id, "stale", result={}, now=at(31))
    with pytest.raises(LeaseLostError):
        db.jobs.fail(job_id, "stale", error="boom", now=at(31))
    with pytest.raises(LeaseLostError):
        db.jobs.extend_lease(job_id, "stale", lease_seconds=60, now=at(31))
    db.jobs.complete(job_id, "fresh", result={"findings": 1}, now=at(32))
    assert db.jobs.get_job(job_id).state == "done"


def test_extend_lease_keeps_a_live_worker_from_being_recovered(db: Database) -> None:
    job_id = enqueue(db, "1.1").job_id
    assert db.jobs.claim("w", lease_seconds=10, now=at(0)) is not None
    assert db.jobs.extend_lease(job_id, "w", lease_seconds=30, now=at(8)) == at(38)
    assert db.jobs.recover_expired_leases(now=at(20)) == []
    assert db.jobs.get_job(job_id).state == "running"


def test_lease_operations_on_unknown_job_raise_job_not_found(db: Database) -> None:
    with pytest.raises(JobNotFoundError, match="42"):
        db.jobs.complete(42, "w", result={})
    with pytest.raises(JobNotFoundError):
        db.jobs.retry_job(42)


def test_release_returns_the_job_without_counting_the_attempt(db: Database) -> None:
    job_id = enqueue(db, "1.1").job_id
    assert db.jobs.claim("w", lease_seconds=60, now=at(0)) is not None
    db.jobs.release(job_id, "w", now=at(1))
    info = db.jobs.get_job(job_id)
    assert (info.state, info.attempts, info.next_attempt_at) == ("queued", 0, at(1))


def test_complete_rejects_a_result_that_is_not_json(db: Database) -> None:
    job_id = enqueue(db, "1.1").job_id
    assert db.jobs.claim("w", lease_seconds=60, now=at(0)) is not None
    with pytest.raises(TypeError, match="result"):
        db.jobs.complete(job_id, "w", result={"x": object()})
    with pytest.raises(TypeError, match="result"):
        db.jobs.complete(job_id, "w", result={"x": float("nan")})
    assert db.jobs.get_job(job_id).state == "running"


# --------------------------------------------------------------------------- retries


def test_fail_retries_with_exponential_backoff_then_fails_after_max_attempts(
    database_url: str,
) -> None:
    database = open_database(database_url, policy=policy(max_attempts=4))
    job_id = enqueue(database, "1.1").job_id
    now = at(0)
    expected_delays = [10, 20, 25]  # base 10 s, doubling, capped at 25 s
    for attempt, delay in enumerate(expected_delays, start=1):
        job = database.jobs.claim("w", lease_seconds=60, now=now)
        assert job is not None and job.attempt == attempt
        state = database.jobs.fail(job_id, "w", error=f"decoder error {attempt}", now=now)
        assert state == "queued"
        assert database.jobs.get_job(job_id).next_attempt_at == now + dt.timedelta(seconds=delay)
        assert (
            database.jobs.claim("w", lease_seconds=60, now=now + dt.timedelta(seconds=delay - 1))
            is None
        )
        now += dt.timedelta(seconds=delay)

    job = database.jobs.claim("w", lease_seconds=60, now=now)
    assert job is not None and job.attempt == 4
    assert database.jobs.fail(job_id, "w", error="decoder error 4", now=now) == "failed"
    info = database.jobs.get_job(job_id)
    assert (info.state, info.attempts, info.last_error) == ("failed", 4, "decoder error 4")
    assert database.jobs.claim("w", lease_seconds=60, now=now + dt.timedelta(days=1)) is None
    database.close()


def test_fail_without_retry_fails_at_once_and_keeps_the_error(db: Database) -> None:
    job_id = enqueue(db, "1.1").job_id
    assert db.jobs.claim("w", lease_seconds=60, now=at(0)) is not None
    assert db.jobs.fail(job_id, "w", error="not a mammogram", retry=False, now=at(1)) == "failed"
    info = db.jobs.get_job(job_id)
    assert (info.state, info.attempts, info.last_error) == ("failed", 1, "not a mammogram")


def test_fail_cuts_very_long_error_texts(db: Database) -> None:
    job_id = enqueue(db, "1.1").job_id
    assert db.jobs.claim("w", lease_seconds=60, now=at(0)) is not None
    db.jobs.fail(job_id, "w", error="x" * 10_000, retry=False, now=at(1))
    stored = db.jobs.get_job(job_id).last_error or ""
    assert len(stored) == 4000 and stored.endswith("[truncated]")


def test_admin_retry_requeues_a_failed_job_with_attempts_reset_and_reopens_its_study(
    db: Database,
) -> None:
    job_id = enqueue(db, "1.1").job_id
    assert db.jobs.claim("w", lease_seconds=60, now=at(0)) is not None
    db.jobs.fail(job_id, "w", error="model missing", retry=False, now=at(1))
    [due] = db.studies.due_studies(quiet_seconds=5, now=at(10))
    assert (due.failed_count, due.done_count) == (1, 0)
    db.studies.mark_study_reported(STUDY, due.version, generation=due.generation, now=at(10))

    db.jobs.retry_job(job_id, now=at(20))

    info = db.jobs.get_job(job_id)
    assert (info.state, info.attempts, info.next_attempt_at) == ("queued", 0, at(20))
    assert info.last_error == "model missing"  # kept until the job succeeds
    assert db.studies.get_study(STUDY).state == "open"
    finish(db, now=at(21))
    assert db.jobs.get_job(job_id).last_error is None
    [due] = db.studies.due_studies(quiet_seconds=5, now=at(30))
    assert (due.version, due.done_count, due.failed_count) == (2, 1, 0)


def test_admin_retry_refuses_a_running_job(db: Database) -> None:
    job_id = enqueue(db, "1.1").job_id
    assert db.jobs.claim("w", lease_seconds=60, now=at(0)) is not None
    with pytest.raises(ValueError, match="running"):
        db.jobs.retry_job(job_id, now=at(1))


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"retry_base_seconds": -1.0}, "retry_base_seconds"),
        ({"retry_base_seconds": 100.0, "retry_cap_seconds": 10.0}, "retry_cap_seconds"),
        ({"send_max_attempts": 0}, "send_max_attempts"),
        ({"send_retry_cap_seconds": float("inf")}, "send_retry_cap_seconds"),
    ],
)
def test_queue_policy_rejects_invalid_values(overrides: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        policy(**overrides)


# --------------------------------------------------------------------------- studies


def test_study_is_not_due_while_a_job_is_queued_or_running(db: Database) -> None:
    enqueue(db, "1.1", now=at(0))
    enqueue(db, "1.2", now=at(1))
    assert db.studies.due_studies(quiet_seconds=10, now=at(100)) == []  # both queued
    first = db.jobs.claim("w", lease_seconds=600, now=at(2))
    assert first is not None
    db.jobs.complete(first.job_id, "w", result={}, now=at(3))
    running = db.jobs.claim("w", lease_seconds=600, now=at(4))
    assert running is not None
    assert db.studies.due_studies(quiet_seconds=10, now=at(100)) == []  # one running
    db.jobs.complete(running.job_id, "w", result={}, now=at(5))
    [due] = db.studies.due_studies(quiet_seconds=10, now=at(100))
    assert (due.study_instance_uid, due.version, due.image_count) == (STUDY, 1, 2)
    assert (due.done_count, due.failed_count) == (2, 0)


def test_study_is_due_only_after_the_quiet_period(db: Database) -> None:
    enqueue(db, "1.1", now=at(0))
    enqueue(db, "1.2", now=at(30))
    finish(db, now=at(31))
    assert db.studies.due_studies(quiet_seconds=60, now=at(89)) == []  # 59 s since the last image
    [due] = db.studies.due_studies(quiet_seconds=60, now=at(90))
    assert due.last_received_at == at(30) and due.first_received_at == at(0)


def test_study_is_due_again_with_the_next_version_after_a_new_image(db: Database) -> None:
    enqueue(db, "1.1", now=at(0))
    finish(db, now=at(1))
    [due] = db.studies.due_studies(quiet_seconds=10, now=at(20))
    assert db.studies.mark_study_reported(STUDY, due.version, generation=due.generation, now=at(21))
    assert db.studies.due_studies(quiet_seconds=10, now=at(100)) == []
    info = db.studies.get_study(STUDY)
    assert (info.state, info.report_version, info.reported_at) == ("reported", 1, at(21))

    enqueue(db, "1.2", now=at(200))
    finish(db, now=at(201))
    assert db.studies.due_studies(quiet_seconds=10, now=at(205)) == []
    [due] = db.studies.due_studies(quiet_seconds=10, now=at(210))
    assert (due.version, due.image_count) == (2, 2)
    db.studies.mark_study_reported(STUDY, due.version, generation=due.generation, now=at(211))
    info = db.studies.get_study(STUDY)
    assert (info.report_version, info.reported_at, info.last_report_at) == (2, at(21), at(211))


def test_duplicate_after_the_report_does_not_reopen_the_study(db: Database) -> None:
    enqueue(db, "1.1", now=at(0))
    finish(db, now=at(1))
    [due] = db.studies.due_studies(quiet_seconds=10, now=at(20))
    db.studies.mark_study_reported(STUDY, due.version, now=at(21))
    assert enqueue(db, "1.1", now=at(50)).outcome == "duplicate"
    assert db.studies.due_studies(quiet_seconds=10, now=at(100)) == []
    assert db.studies.get_study(STUDY).state == "reported"


def test_study_stays_open_when_an_image_arrived_while_its_report_was_built(
    db: Database,
) -> None:
    enqueue(db, "1.1", now=at(0))
    finish(db, now=at(1))
    [due] = db.studies.due_studies(quiet_seconds=10, now=at(20))
    enqueue(db, "1.2", now=at(21))  # arrives while the report is being made
    assert not db.studies.mark_study_reported(
        STUDY, due.version, generation=due.generation, now=at(22)
    )
    finish(db, now=at(23))
    [again] = db.studies.due_studies(quiet_seconds=10, now=at(40))
    assert again.version == 2


def test_mark_study_reported_refuses_an_old_version_and_unknown_study(db: Database) -> None:
    enqueue(db, "1.1", now=at(0))
    finish(db, now=at(1))
    db.studies.mark_study_reported(STUDY, 1, now=at(20))
    with pytest.raises(ValueError, match="version 1"):
        db.studies.mark_study_reported(STUDY, 1, now=at(21))
    with pytest.raises(StudyNotFoundError, match=r"1\.9\.9"):
        db.studies.mark_study_reported("1.9.9", 1)
    with pytest.raises(ValueError, match="version"):
        db.studies.mark_study_reported(STUDY, 0)


def test_study_jobs_lists_the_jobs_of_one_study_only(db: Database) -> None:
    enqueue(db, "1.1")
    enqueue(db, "1.2")
    enqueue(db, "2.1", study="1.2.3.4")
    assert [j.sop_instance_uid for j in db.jobs.study_jobs(STUDY)] == ["1.1", "1.2"]
    assert db.jobs.study_jobs("9.9") == []


# --------------------------------------------------------------------------- sends


def add_send(db: Database, sop: str = "1.5.1", *, destination: str = "pacs", now=T0) -> int:
    return db.sends.add_send(
        destination=destination,
        object_path=f"results/{STUDY}/{sop}.dcm",
        sop_class_uid=SR,
        sop_instance_uid=sop,
        study_instance_uid=STUDY,
        kind="cad-sr",
        now=now,
    )


def test_send_backoff_doubles_up_to_the_cap_and_never_gives_up_by_default(
    db: Database,
) -> None:
    send_id = add_send(db)
    now = at(0)
    for delay in [5, 10, 20, 40, 40, 40, 40, 40, 40, 40]:
        assert [s.send_id for s in db.sends.due_sends(now=now)] == [send_id]
        state = db.sends.mark_send_failed(send_id, error="association rejected", now=now)
        assert state == "pending"
        assert db.sends.due_sends(now=now + dt.timedelta(seconds=delay - 1)) == []
        now += dt.timedelta(seconds=delay)
    info = db.sends.get_send(send_id)
    assert (info.state, info.attempts, info.last_error) == ("pending", 10, "association rejected")
    db.sends.mark_sent(send_id, now=now)
    info = db.sends.get_send(send_id)
    assert (info.state, info.sent_at, info.last_status) == ("sent", now, 0)
    assert db.sends.due_sends(now=now + dt.timedelta(days=1)) == []
    with pytest.raises(ValueError, match="already sent"):
        db.sends.mark_send_failed(send_id, error="late", now=now)


def test_send_fails_after_the_configured_maximum_of_tries(database_url: str) -> None:
    database = open_database(database_url, policy=policy(send_max_attempts=2))
    send_id = add_send(database)
    assert (
        database.sends.mark_send_failed(send_id, error="0xA700", status=0xA700, now=at(0))
        == "pending"
    )
    assert (
        database.sends.mark_send_failed(send_id, error="0xA700", status=0xA700, now=at(5))
        == "failed"
    )
    assert database.sends.get_send(send_id).last_status == 0xA700
    assert database.sends.due_sends(now=at(1000)) == []
    database.sends.retry_send(send_id, now=at(1000))
    assert [s.attempts for s in database.sends.due_sends(now=at(1000))] == [0]
    database.close()


def test_due_sends_lists_pending_due_sends_oldest_first(db: Database) -> None:
    late = add_send(db, "1.5.2", now=at(10))
    early = add_send(db, "1.5.1", now=at(5))
    other = add_send(db, "1.5.3", destination="archive", now=at(7))
    assert [s.send_id for s in db.sends.due_sends(now=at(6))] == [early]
    assert [s.send_id for s in db.sends.due_sends(now=at(10))] == [early, other, late]
    assert [s.send_id for s in db.sends.due_sends(now=at(10), destination="archive")] == [other]
    assert [s.send_id for s in db.sends.due_sends(now=at(10), limit=1)] == [early]


def test_add_send_is_idempotent_per_destination_and_instance(db: Database) -> None:
    first = add_send(db, "1.5.1")
    assert add_send(db, "1.5.1") == first
    assert add_send(db, "1.5.1", destination="archive") != first
    assert len(db.sends.due_sends(now=at(1))) == 2


def test_add_send_rejects_unknown_kind_and_unknown_send_ids(db: Database) -> None:
    with pytest.raises(ValueError, match="kind"):
        db.sends.add_send(
            destination="pacs",
            object_path="results/x.dcm",
            sop_class_uid=SR,
            sop_instance_uid="1.5",
            study_instance_uid=STUDY,
            kind="pdf",
        )
    with pytest.raises(SendNotFoundError, match="77"):
        db.sends.mark_sent(77)


# --------------------------------------------------------------------------- admin


def test_status_summary_counts_states_and_lists_recent_errors(db: Database) -> None:
    for i in range(3):
        enqueue(db, f"1.{i}", now=at(i))
    job = db.jobs.claim("w", lease_seconds=60, now=at(5))
    assert job is not None
    db.jobs.fail(job.job_id, "w", error="cannot decode", retry=False, now=at(6))
    assert db.jobs.claim("w", lease_seconds=60, now=at(7)) is not None
    send_id = add_send(db)
    db.sends.mark_send_failed(send_id, error="connection refused", now=at(8))

    summary = db.status_summary()

    assert summary["jobs"] == {"queued": 1, "running": 1, "done": 0, "failed": 1}
    assert summary["sends"] == {"pending": 1, "sent": 0, "failed": 0}
    assert summary["studies"] == {"open": 1, "reported": 0, "failed": 0}
    errors = summary["recent_errors"]
    assert [(e["kind"], e["error"]) for e in errors] == [
        ("send", "connection refused"),
        ("job", "cannot decode"),
    ]
    assert set(errors[0]) == {"kind", "id", "uid", "state", "attempts", "at", "error"}


def test_a_study_ended_with_a_report_error_is_failed_not_due_and_listed(db: Database) -> None:
    enqueue(db, "1.1", now=at(0))
    finish(db, now=at(1))
    [due] = db.studies.due_studies(quiet_seconds=0, now=at(2))
    reason = "ValueError: study[1] has another PatientID"
    assert db.studies.mark_study_failed(STUDY, error=reason, generation=due.generation, now=at(3))
    study = db.studies.get_study(STUDY)
    assert (study.state, study.report_version) == ("failed", 0)
    assert study.report_error == reason
    assert db.studies.due_studies(quiet_seconds=0, now=at(100)) == []
    summary = db.status_summary()
    assert summary["studies"] == {"open": 0, "reported": 0, "failed": 1}
    [error] = summary["recent_errors"]
    assert (error["kind"], error["uid"], error["state"]) == ("study", STUDY, "failed")
    assert "another PatientID" in error["error"]
    # New content re-opens it (the reason is about the old content), and it is due again.
    enqueue(db, "1.2", now=at(10))
    finish(db, now=at(11))
    assert db.studies.get_study(STUDY).state == "open"
    [due] = db.studies.due_studies(quiet_seconds=0, now=at(12))
    assert db.studies.mark_study_reported(STUDY, due.version, generation=due.generation, now=at(13))
    assert db.studies.get_study(STUDY).report_error is None


def test_a_report_error_of_older_content_leaves_the_study_open(db: Database) -> None:
    enqueue(db, "1.1", now=at(0))
    finish(db, now=at(1))
    [due] = db.studies.due_studies(quiet_seconds=0, now=at(2))
    enqueue(db, "1.2", now=at(3))  # arrives while the report is attempted
    assert not db.studies.mark_study_failed(
        STUDY, error="ValueError: x", generation=due.generation, now=at(4)
    )
    assert db.studies.get_study(STUDY).state == "open"


def test_a_done_job_keeps_a_warning_as_its_last_error(db: Database) -> None:
    job_id = enqueue(db, "1.1").job_id
    job = db.jobs.claim("w", lease_seconds=60, now=at(1))
    assert job is not None
    db.jobs.complete(job.job_id, "w", result={}, warning="gsps not made: ValueError", now=at(2))
    info = db.jobs.get_job(job_id)
    assert (info.state, info.last_error) == ("done", "gsps not made: ValueError")
    assert db.status_summary()["recent_errors"][0]["error"] == "gsps not made: ValueError"


def test_purge_done_before_removes_reported_rows_and_returns_their_files(db: Database) -> None:
    enqueue(db, "1.1", now=at(0))
    enqueue(db, "2.1", study="1.2.3.4", now=at(0))  # its study stays open
    job = db.jobs.claim("w", lease_seconds=60, now=at(1))
    assert job is not None
    db.jobs.complete(job.job_id, "w", result={"paths": ["results/s/1.1-seg.dcm"]}, now=at(2))
    finish(db, now=at(3))
    db.studies.mark_study_reported(STUDY, 1, now=at(10))
    shared = add_send(db, "1.5.1")
    db.sends.mark_sent(shared, now=at(11))
    db.sends.add_send(
        destination="archive",
        object_path=f"results/{STUDY}/1.5.1.dcm",
        sop_class_uid=SR,
        sop_instance_uid="1.5.1",
        study_instance_uid=STUDY,
        kind="cad-sr",
        now=at(11),
    )
    done_send = add_send(db, "1.5.9")
    db.sends.mark_sent(done_send, now=at(12))

    assert db.purge_done_before(at(0)) == []
    paths = db.purge_done_before(at(100))

    assert paths == sorted(
        [
            f"instances/{STUDY}/{SERIES}/1.1.dcm",
            "results/s/1.1-seg.dcm",
            f"results/{STUDY}/1.5.9.dcm",  # 1.5.1 is still pending to "archive"
        ]
    )
    assert db.jobs.study_jobs(STUDY) == []
    assert len(db.jobs.study_jobs("1.2.3.4")) == 1
    assert db.studies.get_study(STUDY).report_version == 1  # the study row stays
    with pytest.raises(SendNotFoundError):
        db.sends.get_send(done_send)


def test_methods_refuse_naive_datetimes(db: Database) -> None:
    naive = dt.datetime(2026, 1, 1)
    with pytest.raises(ValueError, match="now"):
        db.jobs.claim("w", lease_seconds=1, now=naive)
    with pytest.raises(ValueError, match="cutoff"):
        db.purge_done_before(naive)


# --------------------------------------------------------------------------- connections


@pytest.mark.postgres
def test_pooled_connections_the_server_ended_are_replaced_before_use(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    database = open_database(postgres_url, policy=policy())
    try:
        # Two pooled connections, idle now: two threads in a transaction at once.
        both_in = threading.Barrier(2)

        def hold() -> None:
            with database.transaction() as s:
                s.execute(text("SELECT 1"))
                both_in.wait(10)

        threads = [threading.Thread(target=hold) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert database.engine.pool.checkedin() == 2
        # A server restart or an idle timeout, as the pool sees it: both sessions ended
        # by the server while no transaction ran (pg_terminate_backend waits for each).
        name = str(make_url(postgres_url).database)
        ended = postgres_server.execute(
            "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity "
            f"WHERE datname = '{name}' AND pid <> pg_backend_pid()"
        )
        assert ended == [(True,), (True,)]
        # No transaction fails for it (no outage, no back-off): each gets a fresh one.
        assert enqueue(database, "1.1").outcome == "new"
        assert database.jobs.claim("w", lease_seconds=60, now=at(1)) is not None
    finally:
        database.close()


# --------------------------------------------------------------------------- schema


def _set_version(url: str, version: int) -> None:
    execute(url, f"UPDATE schema_version SET version = {version}")


def test_fresh_database_uses_wal_foreign_keys_and_records_the_schema_version(
    tmp_path: Path,
) -> None:
    database = open_database(db_url(tmp_path))
    with database.engine.connect() as con:
        assert con.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert con.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert con.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        row = con.execute(text("SELECT application, version FROM schema_version")).one()
        tables = set(inspect(con).get_table_names())
    database.close()
    assert tuple(row) == ("calcnode", SCHEMA_VERSION)
    assert tables == {"jobs", "studies", "sends", "schema_version"}
    assert tables == set(Base.metadata.tables)


def test_open_refuses_a_database_with_a_newer_schema_version(database_url: str) -> None:
    open_database(database_url).close()
    _set_version(database_url, SCHEMA_VERSION + 98)
    newer = SCHEMA_VERSION + 98
    with pytest.raises(
        SchemaVersionError, match=rf"schema version {newer}, newer than version {SCHEMA_VERSION}"
    ):
        open_database(database_url)


def test_open_refuses_a_database_with_an_older_schema_version(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    open_database(database_url).close()
    monkeypatch.setattr(storage.database, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(
        SchemaVersionError,
        match=rf"schema version {SCHEMA_VERSION}, older than version {SCHEMA_VERSION + 1}",
    ):
        open_database(database_url)


#: What version 2 had instead of version 3's claim index.
_VERSION_2_INDEX = (
    "DROP INDEX ix_jobs_state_next_attempt_id",
    "CREATE INDEX ix_jobs_state_next_attempt ON jobs (state, next_attempt_at)",
)


def _jobs_indexes(database: Database) -> dict[str, list[str]]:
    with database.engine.connect() as con:
        return {i["name"]: list(i["column_names"]) for i in inspect(con).get_indexes("jobs")}


def _stamped_version(database: Database) -> int:
    with database.engine.connect() as con:
        return int(con.execute(text("SELECT version FROM schema_version")).scalar_one())


def test_open_upgrades_a_version_1_database_keeping_its_rows(database_url: str) -> None:
    database = open_database(database_url, policy=policy())
    enqueue(database, "1.1")
    database.close()
    # A database as version 1 wrote it: without studies.report_error, with the old index.
    execute(
        database_url,
        "ALTER TABLE studies DROP COLUMN report_error",
        *_VERSION_2_INDEX,
        "UPDATE schema_version SET version = 1",
    )
    database = open_database(database_url, policy=policy())
    try:
        assert database.studies.get_study(STUDY).report_error is None
        assert database.jobs.get_job(1).sop_instance_uid == "1.1"
        assert _stamped_version(database) == SCHEMA_VERSION == 3
        assert "ix_jobs_state_next_attempt_id" in _jobs_indexes(database)
    finally:
        database.close()


def test_open_upgrades_a_version_2_database_to_the_claim_index(database_url: str) -> None:
    database = open_database(database_url, policy=policy())
    enqueue(database, "1.1")
    enqueue(database, "1.2")
    assert database.jobs.claim("w", lease_seconds=60, now=at(1)) is not None
    database.close()
    execute(database_url, *_VERSION_2_INDEX, "UPDATE schema_version SET version = 2")

    database = open_database(database_url, policy=policy())
    try:
        indexes = _jobs_indexes(database)
        assert indexes["ix_jobs_state_next_attempt_id"] == ["state", "next_attempt_at", "id"]
        assert "ix_jobs_state_next_attempt" not in indexes  # its prefix: redundant
        assert _stamped_version(database) == 3
        # The rows and their states came through; the queue goes on where it was.
        assert [database.jobs.get_job(n).state for n in (1, 2)] == ["running", "queued"]
        job = database.jobs.claim("w", lease_seconds=60, now=at(2))
        assert job is not None and job.sop_instance_uid == "1.2"
    finally:
        database.close()
    # Opening it again finds version 3 and changes nothing.
    database = open_database(database_url, policy=policy())
    try:
        assert _stamped_version(database) == 3
        assert _jobs_indexes(database) == indexes
    finally:
        database.close()


def test_a_fresh_database_has_the_claim_index_and_not_the_old_one(database_url: str) -> None:
    database = open_database(database_url)
    try:
        indexes = _jobs_indexes(database)
    finally:
        database.close()
    assert indexes["ix_jobs_state_next_attempt_id"] == ["state", "next_attempt_at", "id"]
    assert "ix_jobs_state_next_attempt" not in indexes


def test_a_database_that_cannot_be_opened_is_unavailable_not_foreign(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("a file where a folder should be")
    with pytest.raises(DatabaseUnavailableError, match=r"cannot open sqlite:///") as info:
        open_database(f"sqlite:///{tmp_path / 'file' / 'node.db'}")
    assert "not a calcnode database" not in str(info.value)
    # Neither is a server URL whose driver is missing, nor, with a driver (psycopg 3 for
    # postgresql://), one that does not answer: the driver's OperationalError becomes the
    # same error, the password hidden.
    with pytest.raises(DatabaseUnavailableError, match=r"driver is not installed"):
        open_database("postgresql+pg8000://calcnode:secret@127.0.0.1:1/calcnode")
    with pytest.raises(
        DatabaseUnavailableError,
        match=r"cannot open postgresql://calcnode:\*\*\*@127.0.0.1:1/calcnode: .*refused",
    ) as refused:
        open_database("postgresql://calcnode:secret@127.0.0.1:1/calcnode")
    assert "secret" not in str(refused.value)


def test_open_refuses_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    (tmp_path / "node.db").write_bytes(b"this is a text file, not SQLite\n" * 100)
    with pytest.raises(SchemaVersionError, match="not a calcnode database"):
        open_database(db_url(tmp_path))


def test_open_refuses_a_foreign_database(database_url: str) -> None:
    execute(database_url, "CREATE TABLE patients (name TEXT)")
    with pytest.raises(SchemaVersionError, match=r"not a calcnode database.*patients"):
        open_database(database_url)


def test_open_without_create_refuses_a_missing_database(tmp_path: Path) -> None:
    with pytest.raises(SchemaVersionError, match="does not exist"):
        open_database(db_url(tmp_path), create=False)
    assert not (tmp_path / "node.db").exists()


def test_prepare_schema_refuses_an_empty_database_without_create(database_url: str) -> None:
    engine = raw_engine(database_url)
    with pytest.raises(SchemaVersionError, match="empty"):
        prepare_schema(engine, create=False)
    assert prepare_schema(engine) == 0
    assert prepare_schema(engine, create=False) == SCHEMA_VERSION
    engine.dispose()


def test_in_memory_database_works_for_quick_use() -> None:
    database = open_database("sqlite://", policy=policy())
    assert enqueue(database, "1.1").outcome == "new"
    assert database.jobs.claim("w", lease_seconds=5, now=at(1)) is not None
    database.close()


def test_the_database_handle_exposes_the_aggregates_not_their_methods(db: Database) -> None:
    assert (type(db.jobs), type(db.studies), type(db.sends)) == (Jobs, Studies, Sends)
    for name in ("enqueue_image", "claim", "due_studies", "add_send", "get_job"):
        assert not hasattr(db, name)


def test_snapshots_are_frozen(db: Database) -> None:
    job_id = enqueue(db, "1.1").job_id
    claimed = db.jobs.claim("w", lease_seconds=5, now=at(1))
    send_id = add_send(db)
    for snapshot in (
        claimed,
        db.jobs.get_job(job_id),
        db.studies.get_study(STUDY),
        db.sends.get_send(send_id),
    ):
        with pytest.raises(dataclasses.FrozenInstanceError):
            snapshot.state = "x"  # type: ignore[misc, union-attr]


def test_pending_by_destination_counts_pending_sends(db: Database) -> None:
    add_send(db, "1.5.1")
    add_send(db, "1.5.2")
    sent = add_send(db, "1.5.1", destination="archive")
    db.sends.mark_sent(sent, now=at(1))
    add_send(db, "1.5.3", destination="archive")
    assert db.sends.pending_by_destination() == {"pacs": 2, "archive": 1}
