"""Tests of node.worker: claim → detect → SEG/GSPS → sends → done, failures, leases."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import threading
import time
from pathlib import Path

import pydicom
import pytest
from factories import make_mg_dataset

from cascade.errors import InvalidImageError
from cascade.inference.detector import ImageDetections
from node.errors import ConfigError
from node.identity import derived_uid, device_uid_for, make_provenance
from node.model import model_weights
from node.settings import DestinationSettings
from node.stores import open_storage
from node.worker import Worker, run_worker
from storage.models import utcnow
from tests.helpers import (
    FakeDetector,
    fast_factory,
    make_settings,
    make_worker,
    receive,
    slow_factory,
)

PACS = DestinationSettings(name="pacs", ae_title="PACS", host="127.0.0.1", port=4242)
SEG_ONLY = DestinationSettings(
    name="segstore", ae_title="SEGS", host="127.0.0.1", port=4243, kinds=("seg",)
)
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"


# --------------------------------------------------------------------------- identity
def test_device_uid_is_2_25_and_the_first_128_bits_of_the_model_sha256() -> None:
    sha = "0123456789abcdef" * 4
    uid = device_uid_for(sha)
    assert uid == f"2.25.{int('0123456789abcdef' * 2, 16)}"
    assert device_uid_for(sha) == uid
    assert device_uid_for("f" * 64) != uid


@pytest.mark.parametrize("bad", ["", "abc", "z" * 64, "0" * 63])
def test_device_uid_rejects_what_is_not_a_sha256(bad: str) -> None:
    with pytest.raises(ValueError, match="model_sha256"):
        device_uid_for(bad)


def test_derived_uid_is_stable_valid_and_distinct_per_input() -> None:
    a = derived_uid("series", "1.2.3", "seg")
    assert a == derived_uid("series", "1.2.3", "seg")
    assert a != derived_uid("series", "1.2.3", "gsps")
    assert a.startswith("2.25.") and len(a) <= 64
    assert pydicom.uid.UID(a).is_valid


def test_model_files_without_bundled_weights_names_model_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("cascade.inference.weights.BUNDLED_WEIGHTS", tmp_path / "no-weights")
    with pytest.raises(ConfigError, match=r"model\.path"):
        model_weights(make_settings(tmp_path / "node"))


def test_model_files_pairs_asn_with_the_fpr_beside_it(tiny_model: Path, tmp_path: Path) -> None:
    files = model_weights(make_settings(tmp_path, model_path=tiny_model))
    assert files.asn == tiny_model
    assert files.fpr == tiny_model.parent / "fpr.pt"
    assert len(files.sha256) == 64 and not files.bundled


def test_detections_round_trip_through_json() -> None:
    dets = FakeDetector().detect(make_mg_dataset(), path="x.dcm")
    back = ImageDetections.from_json(dets.to_json())
    assert back.detections == dets.detections
    assert (back.rows, back.columns) == (256, 192)
    with pytest.raises(ValueError, match="rows"):
        ImageDetections.from_json({k: v for k, v in dets.to_json().items() if k != "rows"})


# --------------------------------------------------------------------------- processing
def test_worker_processes_a_queued_image_with_the_tiny_model(
    tmp_path: Path, tiny_model: Path
) -> None:
    settings = make_settings(tmp_path, model_path=tiny_model, destinations=(PACS, SEG_ONLY))
    database, store = open_storage(settings)
    ds = make_mg_dataset(seed=3)
    job_id = receive(database, store, ds)

    assert run_worker(settings, worker_id="w-real", max_jobs=1) == 0

    job = database.jobs.get_job(job_id)
    assert job.state == "done", job.last_error
    result = job.result or {}
    assert result["detections"]["sop_instance_uid"] == ds.SOPInstanceUID
    assert result["detection_count"] == len(result["detections"]["detections"]) > 0
    kinds = {o["kind"]: o for o in result["objects"]}
    assert set(kinds) == {"seg", "gsps"}
    seg = pydicom.dcmread(store.resolve(kinds["seg"]["path"]))
    gsps = pydicom.dcmread(store.resolve(kinds["gsps"]["path"]))
    assert seg.SOPClassUID == SEG_CLASS and gsps.SOPClassUID == GSPS_CLASS
    assert seg.StudyInstanceUID == gsps.StudyInstanceUID == ds.StudyInstanceUID
    assert seg.DeviceUID.startswith("2.25.")
    assert store.resolve(f"results/{ds.StudyInstanceUID}/{ds.SOPInstanceUID}.detections.json")
    sends = database.sends.due_sends()
    assert sorted((s.destination, s.kind) for s in sends) == [
        ("pacs", "gsps"),
        ("pacs", "seg"),
        ("segstore", "seg"),
    ]


def test_worker_writes_only_the_enabled_kinds_and_no_seg_without_findings(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path, destinations=(PACS,), kinds=("cad-sr", "seg"))
    worker = make_worker(settings, FakeDetector(points=()))
    job_id = receive(worker.database, worker.store, make_mg_dataset())
    assert worker.run_once() == "done"
    result = worker.database.jobs.get_job(job_id).result or {}
    assert result["objects"] == []  # no finding → no SEG; GSPS not enabled
    assert result["detection_count"] == 0
    assert worker.database.sends.due_sends() == []


def test_invalid_image_fails_without_retry_and_keeps_the_error(
    tmp_path: Path, tiny_model: Path
) -> None:
    from cascade.inference.detector import Detector

    settings = make_settings(tmp_path, model_path=tiny_model)
    worker = make_worker(settings, Detector(tiny_model, device="cpu"))
    ds = make_mg_dataset(pixel_spacing=None, imager_pixel_spacing=None)
    job_id = receive(worker.database, worker.store, ds)
    assert worker.run_once() == "failed"
    job = worker.database.jobs.get_job(job_id)
    assert job.state == "failed"
    assert job.attempts == 1 < job.max_attempts
    assert job.last_error is not None and job.last_error.startswith("InvalidImageError")


def test_file_that_is_not_dicom_fails_without_retry(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    worker = make_worker(settings, FakeDetector())
    stored = worker.store.write_atomic("instances/1.2.3/1.2.4/1.2.5.dcm", b"not dicom" * 50)
    job_id = worker.database.jobs.enqueue_image(
        sop_instance_uid="1.2.5",
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.4",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2",
        path=stored.relpath,
        digest=stored.digest,
        size=stored.size,
        calling_aet="TEST",
    ).job_id
    assert worker.run_once() == "failed"
    assert "InvalidImageError" in (worker.database.jobs.get_job(job_id).last_error or "")


def test_transient_error_is_retried_and_then_succeeds(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, destinations=(PACS,))
    detector = FakeDetector(fail_times=1)
    worker = make_worker(settings, detector)
    job_id = receive(worker.database, worker.store, make_mg_dataset())

    assert worker.run_once() == "queued"
    job = worker.database.jobs.get_job(job_id)
    assert (job.state, job.attempts) == ("queued", 1)
    assert "RuntimeError: simulated failure 1" in (job.last_error or "")
    assert worker.database.sends.due_sends() == []

    assert worker.run_once() == "done"
    job = worker.database.jobs.get_job(job_id)
    assert (job.state, job.attempts) == ("done", 2)
    assert detector.calls == 2


def test_transient_errors_fail_the_job_after_max_attempts(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, max_attempts=2)
    worker = make_worker(settings, FakeDetector(fail_times=5))
    job_id = receive(worker.database, worker.store, make_mg_dataset())
    assert worker.run_once() == "queued"
    assert worker.run_once() == "failed"
    assert worker.database.jobs.get_job(job_id).attempts == 2


def test_heartbeat_keeps_the_lease_of_an_image_longer_than_the_lease(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, lease_seconds=0.6)
    worker = make_worker(settings, FakeDetector(delay=2.0))
    job_id = receive(worker.database, worker.store, make_mg_dataset())
    outcome: list[str | None] = []
    thread = threading.Thread(target=lambda: outcome.append(worker.run_once()))
    thread.start()
    recovered: list[int] = []
    for _ in range(6):  # 1.5 s of lease checks while the detector runs
        time.sleep(0.25)
        recovered += worker.database.jobs.recover_expired_leases()
    thread.join(10)
    assert recovered == []
    assert outcome == ["done"]
    assert worker.database.jobs.get_job(job_id).attempts == 1


def test_worker_that_lost_its_lease_discards_its_result(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, destinations=(PACS,), lease_seconds=30.0)
    worker = make_worker(settings, FakeDetector(delay=1.0))
    job_id = receive(worker.database, worker.store, make_mg_dataset())
    outcome: list[str | None] = []
    thread = threading.Thread(target=lambda: outcome.append(worker.run_once()))
    thread.start()
    time.sleep(0.4)
    # As if the worker had hung past its lease: lease recovery takes the job back.
    assert worker.database.jobs.recover_expired_leases(now=utcnow() + dt.timedelta(seconds=60)) == [
        job_id
    ]
    thread.join(10)
    assert outcome == ["lost"]
    assert worker.database.jobs.get_job(job_id).state == "queued"
    assert worker.database.sends.due_sends() == []
    results = worker.store.root / "results"
    assert not results.exists() or not any(p.is_file() for p in results.rglob("*"))


@pytest.mark.slow
def test_job_of_a_killed_worker_completes_after_lease_expiry_via_another_worker(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path, destinations=(PACS,), lease_seconds=2.0)
    database, store = open_storage(settings)
    job_id = receive(database, store, make_mg_dataset())

    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(
        target=run_worker,
        args=(settings,),
        kwargs={"worker_id": "doomed", "detector_factory": slow_factory},
    )
    proc.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and database.jobs.get_job(job_id).state != "running":
            time.sleep(0.1)
        job = database.jobs.get_job(job_id)
        assert (job.state, job.lease_owner) == ("running", "doomed")
        time.sleep(2.5)  # the heartbeat keeps it: longer than one lease
        assert database.jobs.recover_expired_leases() == []
        proc.kill()  # SIGKILL mid-job: no cleanup, no release
        proc.join(10)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(10)

    assert database.jobs.get_job(job_id).state == "running"  # nobody knows yet
    time.sleep(2.2)  # the lease runs out
    assert database.jobs.recover_expired_leases() == [job_id]
    assert database.jobs.get_job(job_id).state == "queued"

    assert run_worker(settings, worker_id="rescuer", max_jobs=1, detector_factory=fast_factory) == 0
    job = database.jobs.get_job(job_id)
    assert job.state == "done"
    assert job.attempts == 2
    assert (job.result or {})["worker"] == "rescuer"
    assert [s.kind for s in database.sends.due_sends()] == ["seg", "gsps"]


def test_run_worker_rejects_non_positive_max_jobs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_jobs"):
        run_worker(make_settings(tmp_path), max_jobs=0, detector_factory=fast_factory)


def test_worker_rejects_an_empty_worker_id(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    database, store = open_storage(settings)
    with pytest.raises(ValueError, match="worker_id"):
        Worker(
            settings=settings,
            database=database,
            store=store,
            detector=FakeDetector(),
            provenance=make_provenance(model_version="x", model_sha256="0" * 64),
            worker_id="",
        )


def test_invalid_image_error_is_what_the_detector_raises_for_a_spacing_less_image() -> None:
    # Guards the contract the worker's no-retry rule relies on.
    from cascade.data.io import read_mammogram

    with pytest.raises(InvalidImageError):
        read_mammogram(make_mg_dataset(pixel_spacing=None, imager_pixel_spacing=None))


# --------------------------------------------------------------------------- issue 12
def _mg_with(**values: str) -> pydicom.Dataset:
    """An MG image with some attributes set to values that break their VR."""
    import warnings

    ds = make_mg_dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom: "Invalid value for VR DA"
        for keyword, value in values.items():
            setattr(ds, keyword, value)
    return ds


def test_values_that_break_their_vr_are_carried_valid_into_the_gsps_and_seg(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.validators import have_dciodvfy, run_dciodvfy

    settings = make_settings(tmp_path, destinations=(PACS,))
    worker = make_worker(settings, FakeDetector())
    ds = _mg_with(
        PatientBirthDate="1941-02-03",
        PatientName="CANARY^" + "N" * 10_000,
        PatientID="ID-" + "7" * 100,
        AccessionNumber="A" * 40,
        PatientSex="female",
    )
    job_id = receive(worker.database, worker.store, ds)
    caplog.set_level("WARNING", logger="node.reports.common")
    # Before: the GSPS builder failed on the birth date (highdicom: "Unable to convert
    # '1941-02-03' to 'DA' object") and the GSPS was missing; the name went in whole.
    assert worker.run_once() == "done"
    job = worker.database.jobs.get_job(job_id)
    result = job.result or {}
    assert result["build_errors"] == {}
    assert job.last_error is None
    kinds = {o["kind"]: o for o in result["objects"]}
    assert set(kinds) == {"seg", "gsps"}
    for kind in ("gsps", "seg"):
        out = pydicom.dcmread(worker.store.resolve(kinds[kind]["path"]))
        assert out.PatientBirthDate == ""  # Type 2: present, empty; never guessed
        assert str(out.PatientName) == ("CANARY^" + "N" * 10_000)[:64]
        assert out.PatientID == ("ID-" + "7" * 100)[:64]
        assert out.AccessionNumber == "A" * 16
        assert out.PatientSex == ""
        if have_dciodvfy():
            found = run_dciodvfy(worker.store.resolve(kinds[kind]["path"]))
            bad = [e for e in found.errors if "Patient" in e or "Accession" in e]
            assert not bad, found
    # Each change logged, naming the attribute and the rule, not the value.
    lines = [r.getMessage() for r in caplog.records if r.name == "node.reports.common"]
    for name in ("PatientName (0010,0010)", "PatientBirthDate (0010,0030)", "PatientSex"):
        assert any(name in line for line in lines), lines
    assert not any("1941" in line or "NNNN" in line or "777" in line for line in lines)


def test_a_per_image_object_not_made_is_listed_on_its_done_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from node.logs import REDACTED
    from node.service import format_status, status

    settings = make_settings(tmp_path)
    worker = make_worker(settings, FakeDetector())
    job_id = receive(worker.database, worker.store, make_mg_dataset(patient_id="SECRET-ID-42"))

    def broken(**kw: object) -> None:
        raise ValueError(f"cannot copy PatientID {kw['source'].PatientID}")  # type: ignore[attr-defined]

    monkeypatch.setattr("node.reports.gsps.build_gsps", broken)
    assert worker.run_once() == "done"
    job = worker.database.jobs.get_job(job_id)
    # Before: the job was done with no trace of the GSPS outside its result JSON.
    assert job.last_error == f"gsps not made: ValueError: cannot copy PatientID {REDACTED}"
    text = format_status(status(settings))
    assert "gsps not made" in text
    assert "SECRET-ID-42" not in text


def test_below_the_disk_floor_the_worker_claims_nothing_and_resumes_when_space_returns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(tmp_path)
    detector = FakeDetector()
    worker = make_worker(settings, detector)
    job_id = receive(worker.database, worker.store, make_mg_dataset())
    free_mb = worker.store.free_bytes() // (1024 * 1024)
    worker.store.min_free_mb = free_mb + 1024  # the floor is above what is free
    caplog.set_level("INFO", logger="node.worker")
    # Before: the job was claimed, run, and failed its result write (an attempt counted).
    for _ in range(3):
        assert worker.run_once() is None
    job = worker.database.jobs.get_job(job_id)
    assert (job.state, job.attempts) == ("queued", 0)
    assert detector.calls == 0
    pausing = [r for r in caplog.records if "pausing" in r.getMessage()]
    assert len(pausing) == 1 and pausing[0].levelname == "WARNING"
    worker.store.min_free_mb = 0
    assert worker.run_once() == "done"
    assert any("claiming jobs again" in r.getMessage() for r in caplog.records)


def test_results_that_no_longer_fit_return_the_job_without_counting_the_attempt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from storage.errors import DiskFullError

    settings = make_settings(tmp_path)
    worker = make_worker(settings, FakeDetector())
    job_id = receive(worker.database, worker.store, make_mg_dataset())

    def full(*_a: object, **_k: object) -> None:
        raise DiskFullError("disk full while writing results/x: No space left on device")

    monkeypatch.setattr(worker.store, "write_atomic", full)
    assert worker.run_once() == "queued"
    job = worker.database.jobs.get_job(job_id)
    assert (job.state, job.attempts) == ("queued", 0)


def test_a_failing_database_logs_one_traceback_then_counted_summaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import node.worker
    from storage.errors import StorageError

    settings = make_settings(tmp_path, poll_seconds=0.001)
    worker = make_worker(settings, FakeDetector())
    stop = threading.Event()
    calls = {"n": 0}
    real_claim = worker.database.jobs.claim

    def claim(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] <= 30:
            raise StorageError("database operation failed: database or disk is full")
        stop.set()
        return real_claim(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(worker.database.jobs, "claim", claim)
    monkeypatch.setattr(node.worker, "DATABASE_ERROR_LOG_SECONDS", 3600.0)
    caplog.set_level("INFO", logger="node.worker")
    worker.run(stop_event=stop)
    lines = [r for r in caplog.records if "database error" in r.getMessage()]
    # Before: 30 ERROR lines, each with a full traceback.
    assert [r.exc_info is not None for r in lines] == [True, False]
    assert "over after 30 failure(s)" in lines[-1].getMessage()


def test_database_error_summaries_count_the_failures_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import node.worker
    from storage.errors import StorageError

    settings = make_settings(tmp_path, poll_seconds=0.001)
    worker = make_worker(settings, FakeDetector())
    stop = threading.Event()
    calls = {"n": 0}

    def claim(*_args: object, **_kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] >= 5:
            stop.set()
        raise StorageError("database operation failed: disk I/O error")

    monkeypatch.setattr(worker.database.jobs, "claim", claim)
    monkeypatch.setattr(node.worker, "DATABASE_ERROR_LOG_SECONDS", 0.0)  # a line every time
    caplog.set_level("ERROR", logger="node.worker")
    worker.run(stop_event=stop)
    messages = [r.getMessage() for r in caplog.records if "database error" in r.getMessage()]
    assert len(messages) == 5
    assert "1 more failure(s) since the last line, 5 in a row" in messages[-1]
    assert "disk I/O error" in messages[-1]
