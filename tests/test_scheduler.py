"""Tests of node.scheduler: the quiet-period rule, report versions, sends, leases, retention.

Every test runs on both backends (``_backend``): SQLite (the settings' default database)
and a fresh database on the run's throwaway PostgreSQL server (``[postgresql]``, marked
``postgres``).
"""

from __future__ import annotations

import datetime as dt
import sys
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from factories import make_mg_dataset

from node.identity import series_uid_for
from node.scheduler import (
    NodeScheduler,
    ReportFailures,
    complete_studies,
    purge_retention,
    recover_leases,
    send_results,
)
from node.settings import DestinationSettings
from storage.models import utcnow
from tests.helpers import FakeDetector, Receiver, make_settings, make_worker, receive

CAD_SR = "1.2.840.10008.5.1.4.1.1.88.50"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
PACS = DestinationSettings(name="pacs", ae_title="PACS", host="127.0.0.1", port=4242)


@pytest.fixture(autouse=True)
def _backend(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test on each backend: the settings made by ``make_settings`` point at
    ``database_url`` (SQLite: the settings' own default, as before)."""
    if database_url.startswith("sqlite"):
        return

    def on_backend(*args: Any, **kwargs: Any) -> Any:
        settings = _make_settings(*args, **kwargs)
        storage = settings.storage.model_copy(update={"database_url": database_url})
        return settings.model_copy(update={"storage": storage})

    monkeypatch.setattr(sys.modules[__name__], "make_settings", on_backend)


_make_settings = make_settings


def summary_code(sr: pydicom.Dataset) -> str:
    """Value of "CAD Processing and Findings Summary" (111017) in a CAD SR."""
    for item in sr.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue == "111017":
            return str(item.ConceptCodeSequence[0].CodeValue)
    raise AssertionError("no CAD Processing and Findings Summary")


def library_size(sr: pydicom.Dataset) -> int:
    for item in sr.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue == "111028":
            return len(item.ContentSequence)
    raise AssertionError("no Image Library")


def study_srs(store, database, study_uid: str) -> dict[str, list[pydicom.Dataset]]:  # type: ignore[no-untyped-def]
    out: dict[str, list[pydicom.Dataset]] = {}
    for path in sorted((store.root / "results" / study_uid).glob("*-sr-*.dcm")):
        ds = pydicom.dcmread(path)
        out.setdefault(str(ds.SOPClassUID), []).append(ds)
    return out


def test_study_is_reported_only_after_the_quiet_period(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, quiet_seconds=30.0, destinations=(PACS,))
    worker = make_worker(settings, FakeDetector())
    t0 = utcnow()
    ds = make_mg_dataset()
    receive(worker.database, worker.store, ds, now=t0)
    assert worker.run_once() == "done"

    at = lambda s: t0 + dt.timedelta(seconds=s)  # noqa: E731
    assert complete_studies(worker.database, worker.store, settings, now=at(29.0)) == 0
    assert worker.database.studies.get_study(ds.StudyInstanceUID).state == "open"
    assert complete_studies(worker.database, worker.store, settings, now=at(31.0)) == 1
    study = worker.database.studies.get_study(ds.StudyInstanceUID)
    assert (study.state, study.report_version) == ("reported", 1)
    # Reported once: the next check makes nothing new.
    assert complete_studies(worker.database, worker.store, settings, now=at(60.0)) == 0

    srs = study_srs(worker.store, worker.database, ds.StudyInstanceUID)
    assert len(srs[CAD_SR]) == 1 and len(srs[COMPREHENSIVE_SR]) == 1
    cad = srs[CAD_SR][0]
    assert summary_code(cad) == "111242"  # with findings
    assert cad.StudyInstanceUID == ds.StudyInstanceUID
    assert cad.SeriesInstanceUID == series_uid_for(ds.StudyInstanceUID, "cad-sr")
    kinds = sorted(s.kind for s in worker.database.sends.due_sends(now=at(61.0)))
    assert kinds == ["cad-sr", "gsps", "seg", "tid1500-sr"]


def test_a_new_image_restarts_the_quiet_period(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, quiet_seconds=30.0)
    worker = make_worker(settings, FakeDetector())
    t0 = utcnow() - dt.timedelta(minutes=5)  # both images are due for the worker now
    first = make_mg_dataset(view="CC")
    receive(worker.database, worker.store, first, now=t0)
    second = make_mg_dataset(view="MLO", study_uid=first.StudyInstanceUID)
    receive(worker.database, worker.store, second, now=t0 + dt.timedelta(seconds=20))
    assert worker.run_once() == worker.run_once() == "done"
    at = lambda s: t0 + dt.timedelta(seconds=s)  # noqa: E731
    assert complete_studies(worker.database, worker.store, settings, now=at(40.0)) == 0
    assert complete_studies(worker.database, worker.store, settings, now=at(51.0)) == 1
    cad = study_srs(worker.store, worker.database, first.StudyInstanceUID)[CAD_SR][0]
    assert library_size(cad) == 2


def test_study_waits_for_images_still_being_processed(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, quiet_seconds=0.0)
    worker = make_worker(settings, FakeDetector())
    ds = make_mg_dataset()
    receive(worker.database, worker.store, ds)
    later = utcnow() + dt.timedelta(seconds=10)
    assert complete_studies(worker.database, worker.store, settings, now=later) == 0
    worker.run_once()
    assert complete_studies(worker.database, worker.store, settings, now=later) == 1


def test_study_without_findings_still_gets_its_cad_sr(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, quiet_seconds=0.0, destinations=(PACS,))
    worker = make_worker(settings, FakeDetector(points=()))
    ds = make_mg_dataset()
    receive(worker.database, worker.store, ds)
    assert worker.run_once() == "done"
    assert complete_studies(worker.database, worker.store, settings, now=utcnow()) == 1
    srs = study_srs(worker.store, worker.database, ds.StudyInstanceUID)
    cad = srs[CAD_SR][0]
    assert summary_code(cad) == "111241"  # All algorithms succeeded; without findings
    assert library_size(cad) == 1
    # No TID 1500 SR and no SEG for an image without findings (OHIF cannot open a
    # report without geometry); the GSPS (no graphics) and the CAD SR are sent.
    assert COMPREHENSIVE_SR not in srs
    kinds = sorted(s.kind for s in worker.database.sends.due_sends())
    assert "seg" not in kinds and "tid1500-sr" not in kinds
    assert "cad-sr" in kinds


def test_new_image_after_the_report_makes_version_two_in_the_same_series(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, quiet_seconds=0.0)
    worker = make_worker(settings, FakeDetector())
    first = make_mg_dataset(view="CC")
    receive(worker.database, worker.store, first)
    worker.run_once()
    assert complete_studies(worker.database, worker.store, settings, now=utcnow()) == 1

    late = make_mg_dataset(view="MLO", study_uid=first.StudyInstanceUID)
    receive(worker.database, worker.store, late)
    assert worker.database.studies.get_study(first.StudyInstanceUID).state == "open"
    worker.run_once()
    assert complete_studies(worker.database, worker.store, settings, now=utcnow()) == 1

    study = worker.database.studies.get_study(first.StudyInstanceUID)
    assert (study.state, study.report_version) == ("reported", 2)
    versions = sorted(
        study_srs(worker.store, worker.database, first.StudyInstanceUID)[CAD_SR],
        key=lambda d: int(d.InstanceNumber),
    )
    assert [int(v.InstanceNumber) for v in versions] == [1, 2]
    assert versions[0].SeriesInstanceUID == versions[1].SeriesInstanceUID
    assert versions[0].SOPInstanceUID != versions[1].SOPInstanceUID
    # One TID 1500 SR per image, each image's versions in that image's own series.
    by_series: dict[str, list[int]] = {}
    for sr in study_srs(worker.store, worker.database, first.StudyInstanceUID)[COMPREHENSIVE_SR]:
        by_series.setdefault(str(sr.SeriesInstanceUID), []).append(int(sr.InstanceNumber))
    uid = first.StudyInstanceUID
    assert {k: sorted(v) for k, v in by_series.items()} == {
        series_uid_for(uid, "tid1500-sr", str(first.SOPInstanceUID)): [1, 2],
        series_uid_for(uid, "tid1500-sr", str(late.SOPInstanceUID)): [2],
    }
    cads = sorted(
        study_srs(worker.store, worker.database, first.StudyInstanceUID)[CAD_SR],
        key=lambda d: int(d.InstanceNumber),
    )
    assert [library_size(c) for c in cads] == [1, 2]


def test_one_broken_sr_builder_does_not_hold_back_the_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(tmp_path, quiet_seconds=0.0, destinations=(PACS,))
    worker = make_worker(settings, FakeDetector())
    ds = make_mg_dataset()
    receive(worker.database, worker.store, ds)
    worker.run_once()

    def broken(**_kw: object) -> None:
        raise RuntimeError("tid1500 exploded")

    monkeypatch.setattr("node.reports.tid1500.build_tid1500_sr", broken)
    assert complete_studies(worker.database, worker.store, settings, now=utcnow()) == 1
    srs = study_srs(worker.store, worker.database, ds.StudyInstanceUID)
    assert list(srs) == [CAD_SR]
    assert "cad-sr" in {s.kind for s in worker.database.sends.due_sends()}


def test_broken_gsps_builder_leaves_the_job_done_with_its_other_objects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(tmp_path, quiet_seconds=0.0, destinations=(PACS,))
    worker = make_worker(settings, FakeDetector())
    job_id = receive(worker.database, worker.store, make_mg_dataset())

    def broken(**_kw: object) -> None:
        raise ValueError("gsps exploded")

    monkeypatch.setattr("node.reports.gsps.build_gsps", broken)
    assert worker.run_once() == "done"
    result = worker.database.jobs.get_job(job_id).result or {}
    assert [o["kind"] for o in result["objects"]] == ["seg"]
    assert result["build_errors"] == {"gsps": "ValueError: gsps exploded"}


def test_failed_images_are_left_out_and_an_all_failed_study_is_closed(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, quiet_seconds=0.0, max_attempts=1)
    worker = make_worker(settings, FakeDetector(fail_times=1))
    ds = make_mg_dataset()
    receive(worker.database, worker.store, ds)
    assert worker.run_once() == "failed"
    assert complete_studies(worker.database, worker.store, settings, now=utcnow()) == 1
    assert worker.database.studies.get_study(ds.StudyInstanceUID).state == "reported"
    assert study_srs(worker.store, worker.database, ds.StudyInstanceUID) == {}


def test_report_failure_is_logged_and_backed_off_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(tmp_path, quiet_seconds=0.0)
    worker = make_worker(settings, FakeDetector())
    ds = make_mg_dataset()
    receive(worker.database, worker.store, ds)
    worker.run_once()

    def broken(**_kw: object) -> None:
        raise RuntimeError("builder exploded")

    monkeypatch.setattr("node.reports.cad_sr.build_cad_sr", broken)
    monkeypatch.setattr("node.reports.tid1500.build_tid1500_sr", broken)
    failures = ReportFailures(base_seconds=10.0)
    now = utcnow()
    args = (worker.database, worker.store, settings)
    assert complete_studies(*args, now=now, failures=failures) == 0
    assert "builder exploded" in caplog.text
    assert failures.blocked(ds.StudyInstanceUID, now + dt.timedelta(seconds=5))
    monkeypatch.undo()
    # Still blocked 5 s later, retried after the back-off, then reported.
    assert complete_studies(*args, now=now + dt.timedelta(seconds=5), failures=failures) == 0
    assert complete_studies(*args, now=now + dt.timedelta(seconds=11), failures=failures) == 1
    assert not failures.entries


def test_completion_queues_sends_a_dead_worker_left_out(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, quiet_seconds=0.0, destinations=(PACS,))
    worker = make_worker(settings, FakeDetector())
    receive(worker.database, worker.store, make_mg_dataset())
    job = worker.database.jobs.claim("w-dies", lease_seconds=60)
    assert job is not None
    result = worker.process(job)
    worker.database.jobs.complete(job.job_id, "w-dies", result=result.to_json())  # then "dies"
    assert worker.database.sends.due_sends() == []
    complete_studies(worker.database, worker.store, settings, now=utcnow())
    kinds = sorted(s.kind for s in worker.database.sends.due_sends())
    assert kinds == ["cad-sr", "gsps", "seg", "tid1500-sr"]


def test_recover_leases_returns_the_jobs_of_dead_workers(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    worker = make_worker(settings, FakeDetector())
    job_id = receive(worker.database, worker.store, make_mg_dataset())
    assert worker.database.jobs.claim("gone", lease_seconds=5) is not None
    assert recover_leases(worker.database, now=utcnow()) == []
    assert recover_leases(worker.database, now=utcnow() + dt.timedelta(seconds=6)) == [job_id]
    assert worker.database.jobs.get_job(job_id).state == "queued"


def test_retention_purges_reported_studies_older_than_retention_days(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, quiet_seconds=0.0)
    worker = make_worker(settings, FakeDetector())
    ds = make_mg_dataset()
    receive(worker.database, worker.store, ds)
    worker.run_once()
    complete_studies(worker.database, worker.store, settings, now=utcnow())
    image = next((worker.store.root / "instances").rglob("*.dcm"))
    seg = next((worker.store.root / "results").rglob("seg-*.dcm"))

    args = (worker.database, worker.store, settings)
    assert purge_retention(*args, now=utcnow() + dt.timedelta(days=29)) == 0
    assert image.exists()
    removed = purge_retention(*args, now=utcnow() + dt.timedelta(days=31))
    assert removed >= 3  # the image, its detections JSON, the SEG and the GSPS
    assert not image.exists() and not seg.exists()


def test_retention_zero_keeps_everything(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, quiet_seconds=0.0)
    storage = settings.storage.model_copy(update={"retention_days": 0})
    settings = settings.model_copy(update={"storage": storage})
    worker = make_worker(settings, FakeDetector())
    receive(worker.database, worker.store, make_mg_dataset())
    worker.run_once()
    later = utcnow() + dt.timedelta(days=3650)
    assert purge_retention(worker.database, worker.store, settings, now=later) == 0


def test_send_results_delivers_to_a_receiver(tmp_path: Path, receiver: Receiver) -> None:
    dest = DestinationSettings(
        name="rx", ae_title=receiver.ae_title, host="127.0.0.1", port=receiver.port
    )
    settings = make_settings(tmp_path, quiet_seconds=0.0, destinations=(dest,))
    worker = make_worker(settings, FakeDetector())
    ds = make_mg_dataset()
    receive(worker.database, worker.store, ds)
    worker.run_once()
    complete_studies(worker.database, worker.store, settings, now=utcnow())
    assert send_results(worker.database, worker.store, settings) == 4
    assert sorted(d.Modality for d in receiver.datasets) == ["PR", "SEG", "SR", "SR"]
    assert {d.StudyInstanceUID for d in receiver.datasets} == {ds.StudyInstanceUID}
    assert worker.database.sends.due_sends() == []


def test_send_results_survives_an_unreachable_destination(tmp_path: Path) -> None:
    from tests.helpers import free_port

    dest = DestinationSettings(name="down", ae_title="DOWN", host="127.0.0.1", port=free_port())
    settings = make_settings(tmp_path, quiet_seconds=0.0, destinations=(dest,))
    worker = make_worker(settings, FakeDetector())
    receive(worker.database, worker.store, make_mg_dataset())
    worker.run_once()
    assert send_results(worker.database, worker.store, settings) == 0
    sends = worker.database.sends.due_sends(now=utcnow() + dt.timedelta(hours=1))
    assert sends and all(s.attempts == 1 and s.state == "pending" for s in sends)


def test_node_scheduler_reports_and_sends_in_the_background(
    tmp_path: Path, receiver: Receiver
) -> None:
    dest = DestinationSettings(
        name="rx", ae_title=receiver.ae_title, host="127.0.0.1", port=receiver.port
    )
    settings = make_settings(tmp_path, quiet_seconds=0.5, destinations=(dest,))
    worker = make_worker(settings, FakeDetector())
    receive(worker.database, worker.store, make_mg_dataset())
    worker.run_once()
    scheduler = NodeScheduler(worker.database, worker.store, settings)
    scheduler.start()
    try:
        with pytest.raises(RuntimeError, match="already started"):
            scheduler.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(receiver.by_modality("SR")) < 2:
            time.sleep(0.1)
    finally:
        scheduler.stop()
    assert len(receiver.by_modality("SR")) == 2
    assert len(receiver.by_modality("SEG")) == 1


# --------------------------------------------------------------------------- issue 12, 9


def test_a_study_whose_reports_are_refused_is_ended_failed_once_not_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from node.service import format_status, status

    settings = make_settings(
        tmp_path, quiet_seconds=0.0, destinations=(PACS,), kinds=("cad-sr", "seg", "gsps")
    )
    worker = make_worker(settings, FakeDetector())
    first = make_mg_dataset(patient_id="PATIENT-A1")
    second = make_mg_dataset(study_uid=first.StudyInstanceUID, patient_id="PATIENT-B2", seed=1)
    receive(worker.database, worker.store, first)
    receive(worker.database, worker.store, second)
    assert worker.run_once() == worker.run_once() == "done"
    failures = ReportFailures(base_seconds=1.0)
    now = utcnow()
    args = (worker.database, worker.store, settings)
    caplog.set_level("INFO", logger="node.scheduler")
    assert complete_studies(*args, now=now, failures=failures) == 1
    # Before: retried with back-off for ever, a traceback at ERROR each time, "open".
    study = worker.database.studies.get_study(first.StudyInstanceUID)
    assert study.state == "failed"
    assert "another PatientID" in (study.report_error or "")
    for later in (10, 100, 10_000):
        assert (
            complete_studies(*args, now=now + dt.timedelta(seconds=later), failures=failures) == 0
        )
    ended = [r for r in caplog.records if r.levelname == "ERROR" and r.name == "node.scheduler"]
    assert len(ended) == 1 and ended[0].exc_info is None
    assert "no report can be made" in ended[0].getMessage()
    assert "PATIENT-A1" not in caplog.text and "PATIENT-B2" not in caplog.text
    assert not failures.entries
    # The per-image objects still go out; the study shows as failed, with its reason.
    assert {s.kind for s in worker.database.sends.due_sends()} >= {"gsps"}
    text = format_status(status(settings))
    assert "failed 1" in text and "another PatientID" in text


def test_new_content_reopens_a_failed_study(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, quiet_seconds=0.0, kinds=("cad-sr",))
    worker = make_worker(settings, FakeDetector())
    first = make_mg_dataset(patient_id="PATIENT-A1")
    second = make_mg_dataset(study_uid=first.StudyInstanceUID, patient_id="PATIENT-B2", seed=1)
    receive(worker.database, worker.store, first)
    second_job = receive(worker.database, worker.store, second)
    worker.run_once()
    worker.run_once()
    args = (worker.database, worker.store, settings)
    assert complete_studies(*args, now=utcnow()) == 1
    assert worker.database.studies.get_study(first.StudyInstanceUID).state == "failed"
    # The admin fixes the image and re-sends it: same UID, the right patient.
    second.PatientID = "PATIENT-A1"
    worker.database.jobs.retry_job(second_job)
    worker.store.write_atomic(
        worker.database.jobs.get_job(second_job).path,
        lambda fh: second.save_as(fh, enforce_file_format=True),
    )
    assert worker.run_once() == "done"
    assert complete_studies(*args, now=utcnow()) == 1
    study = worker.database.studies.get_study(first.StudyInstanceUID)
    assert (study.state, study.report_version, study.report_error) == ("reported", 1, None)


def test_a_refused_kind_is_logged_once_and_the_study_shows_failed_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(tmp_path, quiet_seconds=0.0)
    worker = make_worker(settings, FakeDetector())
    ds = make_mg_dataset()
    receive(worker.database, worker.store, ds)
    worker.run_once()

    def refuses(**_kw: object) -> None:
        raise ValueError("study[0] lacks ImageLaterality")

    monkeypatch.setattr("node.reports.cad_sr.build_cad_sr", refuses)
    caplog.set_level("ERROR", logger="node.scheduler")
    args = (worker.database, worker.store, settings)
    assert complete_studies(*args, now=utcnow()) == 1
    study = worker.database.studies.get_study(ds.StudyInstanceUID)
    # The TID 1500 SR went out; the missing CAD SR is not silent.
    assert (study.state, study.report_version) == ("failed", 1)
    assert study.report_error == "cad-sr: ValueError: study[0] lacks ImageLaterality"
    assert list(study_srs(worker.store, worker.database, ds.StudyInstanceUID)) == [COMPREHENSIVE_SR]
    [line] = [r for r in caplog.records if r.name == "node.scheduler"]
    assert line.exc_info is None and "the cad-sr was not made" in line.getMessage()
