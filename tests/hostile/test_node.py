"""The node itself against hostile and broken inputs (issue 12, the node-facing items),
against a real ``calcnode serve`` on localhost where the item is about the running node:
no patient data in any log line (a PHI canary through every bad input), values that
break their VR, a study whose report is refused, a corrupt JPEG 2000, Error Comments,
a kill after SIGTERM while a slow PACS receives, the disk floor, crash leftovers, an
unreachable database. The network-facing items are in ``test_network.py``.

Each test failed on the node before the fix it names.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_fragments
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless, generate_uid
from pynetdicom import AE, _config

from node.logs import (
    CONTINUATION,
    REDACTED,
    forget_patients,
    install_patient_data_guard,
    remember_patient,
    remove_patient_data_guard,
)
from node.settings import DestinationSettings
from storage.database import open_database
from tests.factories import compress, make_ct_dataset, make_mg_dataset
from tests.helpers import REPO, SERVE, Receiver, clean_env, free_port, make_settings, write_config

AET = "CALCNODE"
TIMEOUT = 10.0

# ----------------------------------------------------------------------------- the canary

#: Patient data no log line may show: a name, IDs, a valid and an invalid birth date.
CANARY_FAMILY, CANARY_GIVEN = "CANARYSURNAME", "PHIGIVENNAME"
CANARY_NAME = f"{CANARY_FAMILY}^{CANARY_GIVEN}"
CANARY_ID = "CANARY-ID-4711"
CANARY_OTHER_ID = "OTHERCANARY-0815"
CANARY_BIRTH = "19410203"
CANARY_BIRTH_INVALID = "1941-02-03"
#: What is grepped for, case-insensitively, in every log line.
CANARY_TEXTS = (
    CANARY_FAMILY,
    CANARY_GIVEN,
    "CANARY-ID",
    CANARY_OTHER_ID,
    CANARY_BIRTH,
    CANARY_BIRTH_INVALID,
)


def canary(ds: Dataset, *, birth: str = CANARY_BIRTH, patient_id: str = CANARY_ID) -> Dataset:
    """``ds`` with the canary's patient data (an invalid birth date is set as is)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom: "Invalid value for VR DA"
        ds.PatientName = CANARY_NAME
        ds.PatientID = patient_id
        ds.PatientBirthDate = birth
        ds.OtherPatientIDs = CANARY_OTHER_ID
    return ds


def canary_lines(text: str) -> list[str]:
    """The log lines that show any canary text."""
    return [
        line for line in text.splitlines() if any(c.lower() in line.lower() for c in CANARY_TEXTS)
    ]


# ----------------------------------------------------------------------------- the guard


@pytest.fixture
def guarded(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """The patient-data guard installed for this test, with the canary remembered."""
    install_patient_data_guard()
    remember_patient(canary(make_mg_dataset(), birth=CANARY_BIRTH_INVALID))
    remember_patient(canary(make_mg_dataset()))
    caplog.set_level(logging.DEBUG)
    try:
        yield caplog
    finally:
        remove_patient_data_guard()
        forget_patients()


def test_patient_values_reach_no_log_record_whatever_logs_them(
    guarded: pytest.LogCaptureFixture,
) -> None:
    import highdicom  # noqa: F401 - its logger, as the builders use it

    log = logging.getLogger("node.test")
    log.info("name %s, id %s", "canarysurname^phigivenname", CANARY_ID)
    log.debug("given name alone: %s; born %s", CANARY_GIVEN, "1941-02-03")
    # highdicom logs a name it finds invalid, quoted, at WARNING.
    logging.getLogger("highdicom.base").warning(
        'value of argument "patient_name" is potentially invalid: "%s"', CANARY_NAME
    )
    # pydicom warns about an invalid value (logger and warnings), value included.
    ds = Dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        ds.PatientBirthDate = CANARY_BIRTH_INVALID
    warnings.warn(f"Invalid value for VR DA: '{CANARY_BIRTH_INVALID}'", stacklevel=1)
    try:
        raise ValueError(f"Unable to convert '{CANARY_BIRTH_INVALID}' to 'DA' object")
    except ValueError:
        log.exception("building the gsps failed")
    thread = threading.Thread(target=_raise_with_the_canary)
    thread.start()
    thread.join()
    text = guarded.text
    assert "building the gsps failed" in text and "uncaught exception in thread" in text
    assert REDACTED in text
    # Before: every one of them showed the canary (the name, the date in the traceback).
    assert canary_lines(text) == [], text


def _raise_with_the_canary() -> None:
    raise RuntimeError(f"patient {CANARY_ID} broke a thread")


def test_a_newline_in_a_message_or_exception_cannot_start_a_log_line_of_its_own(
    guarded: pytest.LogCaptureFixture,
) -> None:
    forged = "ERROR MainProcess node.scp: FORGED"
    log = logging.getLogger("node.test")
    log.warning("uid %s", f"1.2.3\n{forged}")
    try:
        raise ValueError(f"bad value\n{forged}\x1b[2J")
    except ValueError:
        log.exception("failed")
    handler = logging.StreamHandler(stream := io.StringIO())
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for record in guarded.records:
        handler.handle(record)
    lines = stream.getvalue().splitlines()
    assert not any(line.startswith(forged) for line in lines), lines
    assert "uid 1.2.3\\x0aERROR MainProcess node.scp: FORGED" in lines[0]
    # A traceback keeps its lines, each marked as a continuation; ESC escaped.
    tail = lines[lines.index("ERROR node.test: failed") + 1 :]
    assert tail and all(line.startswith(CONTINUATION) for line in tail)
    assert any("\\x1b[2J" in line for line in tail)


# ----------------------------------------------------------------------------- serve


@dataclass
class ServedNode:
    """A ``calcnode serve`` process (its own process group) and where to look at it."""

    process: subprocess.Popen  # type: ignore[type-arg]
    port: int
    root: Path
    config: Path
    log: Path
    env: dict[str, str]

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float = 60.0) -> bool:
        return wait_until(lambda: re.search(pattern, self.text()) is not None, timeout)

    def database(self) -> Any:
        return open_database(f"sqlite:///{self.root / 'calcnode.db'}", create=False)

    def status(self) -> str:
        """``calcnode status`` as an administrator runs it."""
        proc = subprocess.run(
            [sys.executable, "-m", "node.cli", "status", "--config", str(self.config)],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def stop(self, timeout: float = 90.0) -> int:
        """SIGTERM; the exit status (the process group is killed after ``timeout``)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return int(self.process.returncode)

    def kill(self) -> None:
        """SIGKILL the serve process and its workers."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def start_node(
    folder: Path,
    *,
    workers: int = 0,
    env: dict[str, str] | None = None,
    log_name: str = "serve.log",
    **settings: Any,
) -> ServedNode:
    """``calcnode serve`` on a free port with ``make_settings(**settings)``; ``env`` adds
    ``CALCNODE_*`` overrides. Returns once it serves."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = write_config(
        folder / "calcnode.toml", make_settings(folder / "node", port=port, **settings)
    )
    environment = clean_env(**(env or {}))
    log = folder / log_name
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE, str(config), str(workers)],
        cwd=REPO,
        env=environment,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: a kill takes the workers too
    )
    node = ServedNode(process, port, folder / "node", config, log, environment)
    ready = r"calcnode serving" if not workers else r"worker \S+: model .* loaded"
    if (
        not wait_until(
            lambda: process.poll() is not None or re.search(ready, node.text()) is not None, 120
        )
        or process.poll() is not None
    ):
        node.kill()
        raise AssertionError(node.text()[-3000:])
    assert node.wait_for_log("calcnode serving"), node.text()[-3000:]
    return node


@pytest.fixture
def nodes() -> Iterator[list[ServedNode]]:
    """Nodes a test starts; any still running at the end are killed."""
    started: list[ServedNode] = []
    yield started
    for node in started:
        if node.process.poll() is None:
            node.kill()


def store(port: int, ds: Dataset | Path) -> Dataset | None:
    """C-STORE; the response, or None without one."""
    if isinstance(ds, Path):
        from pydicom.filereader import read_file_meta_info

        meta = read_file_meta_info(ds)
        sop_class, syntax = meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID
    else:
        sop_class, syntax = ds.SOPClassUID, ds.file_meta.TransferSyntaxUID
    ae = AE(ae_title="HOSTILE")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = TIMEOUT
    ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title=AET)
    if not assoc.is_established:
        return None
    try:
        rsp = assoc.send_c_store(ds)
        return rsp if "Status" in rsp else None
    finally:
        assoc.release()


# ----------------------------------------------------------------------------- bad inputs

BREAST_TOMOSYNTHESIS = "1.2.840.10008.5.1.4.1.1.13.1.3"


def corrupt_jpeg2000(ds: Dataset) -> Dataset:
    """``ds`` as JPEG 2000 whose codestream is garbage after its first 200 bytes: the
    encapsulation is intact (the SCP accepts it), no decoder can read it."""
    out = compress(ds, JPEG2000Lossless)
    stream = bytearray(b"".join(generate_fragments(out.PixelData)))
    for i in range(200, len(stream) - 2):
        stream[i] = (stream[i] * 7 + 13) & 0xFF
    out.PixelData = encapsulate([bytes(stream)])
    return out


def deflate_bomb(path: Path, ds: Dataset, *, inflated_bytes: int = 1 << 30) -> Path:
    """``ds`` as a Deflated file of about 1 MB that inflates past ``inflated_bytes``: a
    private OB element of zeros before the pixels (as in test_network.py)."""
    from pydicom.filewriter import write_file_meta_info
    from pynetdicom.dsutils import encode

    ds.add_new(0x00090010, "LO", "BOMB")
    before, after = Dataset(), Dataset()
    for elem in ds:
        (before if elem.tag < 0x00091000 else after).add(elem)
    head, tail = encode(before, False, True), encode(after, False, True)
    assert head is not None and tail is not None
    chunk = 1 << 20
    count = inflated_bytes // chunk
    element = b"\x09\x00\x00\x10OB\x00\x00" + (count * chunk).to_bytes(4, "little")
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [deflater.compress(head + element), deflater.flush(zlib.Z_FULL_FLUSH)]
    block = deflater.compress(bytes(chunk)) + deflater.flush(zlib.Z_FULL_FLUSH)
    parts += [block * count, deflater.compress(tail), deflater.flush()]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta.ImplementationClassUID = ds.file_meta.ImplementationClassUID
    with path.open("wb") as fh:
        fh.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(fh, meta)
        for part in parts:
            fh.write(part)
    return path


def _with(ds: Dataset, **values: Any) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for keyword, value in values.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        if "SOPInstanceUID" in values:
            ds.file_meta.MediaStorageSOPInstanceUID = values["SOPInstanceUID"]
        if "SOPClassUID" in values:
            ds.file_meta.MediaStorageSOPClassUID = values["SOPClassUID"]
    return ds


@dataclass
class CanaryRun:
    """The shared node after every bad input was sent with the canary."""

    node: ServedNode
    receiver: Receiver
    responses: dict[str, Dataset | None]
    studies: dict[str, str]
    status: str
    log: str = ""


@pytest.fixture(scope="module")
def canary_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CanaryRun]:
    """One node (one worker, a receiving PACS) through every bad input of tests/hostile,
    each carrying the PHI canary; stopped, its whole log kept."""
    folder = tmp_path_factory.mktemp("canary")
    receiver = Receiver().start()
    dest = DestinationSettings(
        name="pacs", ae_title=receiver.ae_title, host="127.0.0.1", port=receiver.port
    )
    node = start_node(
        folder,
        workers=1,
        model_path=tiny_model,
        destinations=(dest,),
        quiet_seconds=1.0,
        max_attempts=1,
        node_options={"max_instance_mb": 2},
    )
    try:
        cases: dict[str, Dataset | Path] = {}
        studies: dict[str, str] = {}
        invalid_birth = canary(make_mg_dataset(seed=11), birth=CANARY_BIRTH_INVALID)
        long_name = canary(make_mg_dataset(seed=12))
        long_name.PatientName = f"{CANARY_FAMILY}^" + "Q" * 10_000
        first = canary(make_mg_dataset(seed=13))
        second = canary(
            make_mg_dataset(seed=14, study_uid=first.StudyInstanceUID), patient_id="CANARY-ID-4712"
        )
        j2k = corrupt_jpeg2000(canary(make_mg_dataset(seed=15)))
        cases.update(
            {
                "invalid birth date": invalid_birth,
                "10,000-character name": long_name,
                "patient A of a study": first,
                "patient B of the same study": second,
                "corrupt JPEG 2000": j2k,
                "newline in a UID": _with(
                    canary(make_mg_dataset(seed=16)),
                    SOPInstanceUID="1.2.3\nERROR MainProcess node.scp: FORGED",
                ),
                "path for a UID": _with(
                    canary(make_mg_dataset(seed=17)), StudyInstanceUID="../../../../tmp/x"
                ),
                "leading zero in a UID": _with(
                    canary(make_mg_dataset(seed=18)), SeriesInstanceUID="1.2.03.4"
                ),
                "CT": canary(make_ct_dataset()),
                "tomosynthesis": _with(
                    canary(make_ct_dataset(seed=1)), SOPClassUID=BREAST_TOMOSYNTHESIS
                ),
                "wrong modality": _with(canary(make_mg_dataset(seed=19)), Modality="CT"),
                "no pixel spacing": canary(
                    make_mg_dataset(seed=20, pixel_spacing=None, imager_pixel_spacing=None)
                ),
                "truncated pixel data": _truncated(canary(make_mg_dataset(seed=21))),
                "over max_instance_mb": canary(make_mg_dataset(rows=1500, columns=1400)),
                "deflate bomb": deflate_bomb(
                    folder / "bomb.dcm", canary(make_mg_dataset(rows=64, columns=64, seed=22))
                ),
                "re-sent, same bytes": invalid_birth,
            }
        )
        studies = {
            "invalid birth date": str(invalid_birth.StudyInstanceUID),
            "10,000-character name": str(long_name.StudyInstanceUID),
            "two patients": str(first.StudyInstanceUID),
            "corrupt JPEG 2000": str(j2k.StudyInstanceUID),
        }
        responses: dict[str, Dataset | None] = {}
        for name, ds in cases.items():
            with pytest.MonkeyPatch.context() as mp:
                if isinstance(ds, Path):
                    mp.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
                responses[name] = store(node.port, ds)
        # The results of the two good studies reach the PACS; the others end.
        expected_srs = 2

        def settled() -> bool:
            srs = {
                str(d.StudyInstanceUID)
                for d in receiver.by_modality("SR")
                if str(d.SOPClassUID) == "1.2.840.10008.5.1.4.1.1.88.50"
            }
            return len(srs & set(studies.values())) >= expected_srs and bool(
                re.search(r"no report can be made|was not made", node.text())
            )

        # (Each test checks its own part: on a node without the fixes this never settles.)
        wait_until(settled, 120)
        node.wait_for_log(r"job \d+ failed after 1 attempt\(s\): InvalidImageError", 30)
        time.sleep(3.0)  # several more study checks (every 0.5 s): a retry would show
        status = node.status()
        assert node.stop() == 0, node.text()[-3000:]
        run = CanaryRun(node, receiver, responses, studies, status, log=node.text())
        run.sop = {
            name: str(ds.SOPInstanceUID) for name, ds in cases.items() if isinstance(ds, Dataset)
        }
        yield run
    finally:
        if node.process.poll() is None:
            node.kill()
        receiver.stop()


def _truncated(ds: Dataset) -> Dataset:
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    return ds


def test_no_log_line_of_the_node_shows_the_canary_after_every_bad_input(
    canary_run: CanaryRun,
) -> None:
    statuses = {
        name: (int(rsp.Status) if rsp is not None else None)
        for name, rsp in canary_run.responses.items()
    }
    # Every case was what it should be (so each went the way it goes in production).
    assert statuses == {
        "invalid birth date": 0x0000,
        "10,000-character name": 0x0000,
        "patient A of a study": 0x0000,
        "patient B of the same study": 0x0000,
        "corrupt JPEG 2000": 0x0000,
        "newline in a UID": 0xC210,
        "path for a UID": 0xC210,
        "leading zero in a UID": 0xC210,
        "CT": 0x0122,
        "tomosynthesis": 0x0122,
        "wrong modality": 0xC210,
        "no pixel spacing": 0xC210,
        "truncated pixel data": 0xC210,
        "over max_instance_mb": 0xA720,
        "deflate bomb": 0xA721,
        "re-sent, same bytes": 0x0000,
    }
    log = canary_run.log
    assert "Traceback" in log or "building" in log or "report" in log  # it did log
    # Before: the invalid birth date in an ERROR traceback from highdicom (and in
    # pydicom's warnings), the name in highdicom's warning.
    assert canary_lines(log) == []
    assert not any(
        line.startswith("ERROR MainProcess node.scp: FORGED") for line in log.splitlines()
    )


def test_values_that_break_their_vr_get_valid_results_at_the_pacs(
    canary_run: CanaryRun, tmp_path: Path
) -> None:
    from tests.validators import have_dciodvfy, run_dciodvfy

    for case in ("invalid birth date", "10,000-character name"):
        study = canary_run.studies[case]
        results = [d for d in canary_run.receiver.datasets if str(d.StudyInstanceUID) == study]
        modalities = Counter(str(d.Modality) for d in results)
        # Before: no GSPS for the invalid birth date ("a missing GSPS is silent").
        assert modalities["PR"] == 1 and modalities["SR"] >= 2, modalities
        for ds in results:
            assert all(len(g) <= 64 for g in str(ds.PatientName).split("="))
            assert str(ds.PatientBirthDate) in ("", CANARY_BIRTH)
            if have_dciodvfy():
                path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
                ds.save_as(path, enforce_file_format=True)
                found = run_dciodvfy(path)
                bad = [e for e in found.errors if "Patient" in e or "Length invalid" in e]
                assert not bad, found
    assert "PatientBirthDate (0010,0030): not a valid DA value" in canary_run.log
    assert "PatientName (0010,0010): longer than PN allows" in canary_run.log


def test_a_study_of_two_patients_ends_failed_in_status_logged_once(canary_run: CanaryRun) -> None:
    study = canary_run.studies["two patients"]
    ended = [
        line
        for line in canary_run.log.splitlines()
        if study in line and " ERROR " in line and "node.scheduler" in line
    ]
    # Before: retried with back-off without end, a traceback at ERROR each time, and
    # `calcnode status` said only "open".
    assert len(ended) >= 1 and all("another PatientID" in line for line in ended), ended
    assert len([line for line in ended if "no report can be made" in line]) <= 1
    assert "Traceback" not in "\n".join(ended)
    assert re.search(r"studies\s.*failed 1", canary_run.status), canary_run.status
    assert "another PatientID" in canary_run.status
    with canary_run.node.database() as database:
        row = database.studies.get_study(study)
    assert row.state == "failed" and "another PatientID" in (row.report_error or "")


def test_a_corrupt_jpeg2000_is_a_failed_job_with_its_reason_in_status(
    canary_run: CanaryRun,
) -> None:
    status = canary_run.status
    line = next((line for line in status.splitlines() if "[failed, 1 attempt(s)]" in line), None)
    # Before: the reason was on the lines `calcnode status` did not show.
    assert line is not None, status
    assert "cannot decode pixel data" in line and "JPEG 2000" in line
    assert "No matching JPEG 2000 format found" in line or "plugins" in line


def test_an_error_comment_too_long_for_lo_ends_in_three_dots(canary_run: CanaryRun) -> None:
    rsp = canary_run.responses["tomosynthesis"]
    assert rsp is not None
    comment = str(rsp.ErrorComment)
    # Before: "…" turned to "?" on the way to ASCII.
    assert comment.endswith("...") and len(comment) <= 64 and comment.isascii()
    assert comment.startswith("only MG images are accepted, not Breast Tomosynthesis")


# ----------------------------------------------------------------------------- 6. kill


@dataclass
class SlowPacs(Receiver):
    """A receiver that takes ``delay`` seconds to answer each C-STORE, counting them."""

    delay: float = 1.0
    counts: Counter[str] = field(default_factory=Counter)

    def start(self) -> SlowPacs:
        from pynetdicom import AllStoragePresentationContexts, evt

        ae = AE(ae_title=self.ae_title)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax)

        def on_store(event: Any) -> int:
            time.sleep(self.delay)
            with self._lock:
                self.counts[str(event.request.AffectedSOPInstanceUID)] += 1
            return 0x0000

        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
        )
        self.port = int(self._server.server_address[1])
        return self

    def received(self) -> Counter[str]:
        with self._lock:
            return Counter(self.counts)


def test_a_kill_after_sigterm_leaves_every_delivered_object_sent_and_none_sent_twice(
    tiny_model: Path, tmp_path: Path, nodes: list[ServedNode]
) -> None:
    pacs = SlowPacs(delay=1.0).start()
    try:
        dest = DestinationSettings(
            name="pacs", ae_title="RECEIVER", host="127.0.0.1", port=pacs.port
        )
        options: dict[str, Any] = {
            "model_path": tiny_model,
            "destinations": (dest,),
            "quiet_seconds": 0.5,
            # The sends of a whole study due at once: one association, one batch.
            "send_check_seconds": 3600.0,
        }
        node = start_node(tmp_path / "a", workers=1, **options)
        nodes.append(node)
        study = generate_uid()
        for seed in range(3):
            rsp = store(node.port, make_mg_dataset(seed=30 + seed, study_uid=study))
            assert rsp is not None and int(rsp.Status) == 0
        with node.database() as database:
            assert wait_until(lambda: database.studies.get_study(study).state == "reported", 180)
            due = len(database.sends.due_sends())
        assert due >= 6, node.text()[-3000:]
        # Sending (woken by the report) is under way; stop the node in the middle.
        assert wait_until(lambda: sum(pacs.received().values()) >= 2, 60)
        node.process.send_signal(signal.SIGTERM)
        time.sleep(1.5)  # then the kill, as a supervisor that loses patience would
        if node.process.poll() is None:
            node.kill()
        delivered = pacs.received()
        with node.database() as database:
            sends = {s.sop_instance_uid: s for s in _all_sends(database)}
        sent = {uid for uid, s in sends.items() if s.state == "sent"}
        in_flight = set(delivered) - sent
        # Before: outcomes were written when the batch ended: every delivered object was
        # still pending at the kill (and SIGTERM waited for the whole batch).
        assert len(in_flight) <= 1, (delivered, sent)
        assert sent <= set(delivered)
        assert len(delivered) < len(sends)  # the stop came before the end of the batch

        # Restarted, the node sends what is left; nothing is delivered twice but at most
        # the one that was in flight at the kill.
        pacs.delay = 0.0
        options["send_check_seconds"] = 0.5
        again = start_node(tmp_path / "a", log_name="restart.log", **options)
        nodes.append(again)
        with again.database() as database:
            assert wait_until(lambda: all(s.state == "sent" for s in _all_sends(database)), 120), (
                again.text()[-3000:]
            )
        assert again.stop() == 0
        counts = pacs.received()
        assert set(counts) == set(sends)
        twice = {uid for uid, n in counts.items() if n > 1}
        # Before: most of the batch was delivered again (10 copies for 8 objects).
        assert len(twice) <= 1 and twice <= in_flight, counts
    finally:
        pacs.stop()


def _all_sends(database: Any) -> list[Any]:
    from sqlalchemy import select

    from storage.models import Send

    with database.transaction() as s:
        ids = list(s.scalars(select(Send.id)))
    return [database.sends.get_send(i) for i in ids]


# ----------------------------------------------------------------------------- 7. disk floor


def test_below_the_disk_floor_workers_claim_nothing_and_the_job_keeps_its_attempts(
    tiny_model: Path, tmp_path: Path, nodes: list[ServedNode]
) -> None:
    import shutil

    node = start_node(tmp_path)  # the image comes in above the floor
    nodes.append(node)
    ds = make_mg_dataset(seed=40)
    rsp = store(node.port, ds)
    assert rsp is not None and int(rsp.Status) == 0
    assert node.stop() == 0
    free_mb = shutil.disk_usage(tmp_path).free // (1024 * 1024)
    floor = {"CALCNODE_STORAGE__MIN_FREE_MB": str(free_mb + 1024)}
    paused = start_node(
        tmp_path, workers=1, model_path=tiny_model, env=floor, log_name="paused.log"
    )
    nodes.append(paused)
    # Before: the worker claimed the job, ran the model, failed writing the results and
    # counted the attempt (the job ended failed after worker.max_attempts).
    assert paused.wait_for_log(r"pausing, no job claimed until space returns", 30), paused.text()[
        -3000:
    ]
    time.sleep(1.0)  # ten polls of the worker
    with paused.database() as database:
        [job] = database.jobs.study_jobs(str(ds.StudyInstanceUID))
    assert (job.state, job.attempts) == ("queued", 0)
    assert paused.stop() == 0
    assert paused.text().count("pausing, no job claimed") == 1
    assert "detection(s) on SOP Instance" not in paused.text()
    # Space back (here: the floor lowered again), the job is done at its first attempt.
    resumed = start_node(tmp_path, workers=1, model_path=tiny_model, log_name="resumed.log")
    nodes.append(resumed)
    with resumed.database() as database:
        assert wait_until(lambda: database.jobs.get_job(job.job_id).state == "done", 120)
        assert database.jobs.get_job(job.job_id).attempts == 1
    assert resumed.stop() == 0


# ----------------------------------------------------------------------------- 11. leftovers


def test_temporary_files_of_a_killed_writer_are_gone_after_a_restart_even_with_retention_0(
    tmp_path: Path, nodes: list[ServedNode]
) -> None:
    keep_all = {"CALCNODE_STORAGE__RETENTION_DAYS": "0"}
    node = start_node(tmp_path, env=keep_all)
    nodes.append(node)
    ds = make_mg_dataset(seed=41)
    rsp = store(node.port, ds)
    assert rsp is not None and int(rsp.Status) == 0
    node.kill()
    # What a writer killed mid-write leaves: fresh files (a kill a moment ago), one of
    # a process that is gone, one of an older calcnode (no pid in the name); and one of
    # a writer still running (a worker unit of this host), which must stay.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    series = next((node.root / "instances").rglob("*.dcm")).parent
    results = node.root / "results" / str(ds.StudyInstanceUID)
    results.mkdir(parents=True, exist_ok=True)
    leftovers = [series / f".tmp-{dead.pid}-k1ll3d.part", results / ".tmp-0ld5tyle.part"]
    alive = series / f".tmp-{os.getpid()}-wr1t1ng.part"
    for path in (*leftovers, alive):
        path.write_bytes(b"\0" * 4096)
    restarted = start_node(tmp_path, env=keep_all, log_name="restart.log")
    nodes.append(restarted)
    # Before: kept for ever (purged only by retention, only after an hour, never with
    # retention_days = 0).
    assert [p for p in leftovers if p.exists()] == []
    assert alive.exists()
    assert restarted.stop() == 0


# ----------------------------------------------------------------------------- 14. database


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///{folder}",  # a folder where the database file should be
        "postgresql://calcnode:s3cret@127.0.0.1:{port}/calcnode",  # nothing listens there
    ],
    ids=["sqlite-unopenable", "postgresql-closed-port"],
)
def test_serve_with_an_unreachable_database_exits_with_one_clear_line(
    tmp_path: Path, url: str
) -> None:
    config = write_config(tmp_path / "calcnode.toml", make_settings(tmp_path / "node"))
    database_url = url.format(folder=tmp_path, port=free_port())
    proc = subprocess.run(
        [sys.executable, "-m", "node.cli", "serve", "--config", str(config), "--workers", "0"],
        cwd=REPO,
        env=clean_env(CALCNODE_STORAGE__DATABASE_URL=database_url),
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = proc.stdout + proc.stderr
    # Before: "… is not a calcnode database: unable to open database file", or a
    # traceback (no driver, a folder that cannot be made).
    assert proc.returncode == 2, output
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("calcnode: error: storage.database_url: cannot open ")
    assert "Traceback" not in output
    assert "not a calcnode database" not in output
    assert "s3cret" not in output
