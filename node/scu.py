"""The node's sending side: C-STORE of produced objects to the configured destinations.

:func:`send_file` stores one file on one peer; :func:`send_due` works through the
queue's due sends (:meth:`storage.sends.Sends.due_sends`), one association per
destination, and records each outcome: :meth:`~storage.sends.Sends.mark_sent` or
:meth:`~storage.sends.Sends.mark_send_failed` (which schedules the next try with
the queue's back-off, or gives up after ``send_max_attempts``).

Each outcome is recorded **as soon as the peer has answered that object** (not when the
association ends): a node killed in the middle of a long send has recorded every object
the peer acknowledged, so at most the one in flight is sent again. A ``stop`` event
ends the sending between two objects — the one in flight is finished and recorded, the
rest stay pending, untouched (no try counted) — so stopping the node never waits for a
slow peer to take every due object.

Status policy (PS3.4 B.2.3):

* 0x0000 → sent.
* Warnings 0xB000 (coercion of data elements), 0xB006 (elements discarded), 0xB007
  (data set does not match SOP class) → **sent**: the peer stored the object, possibly
  altered; the warning is logged with the send id and SOP Instance UID, and the status
  is recorded on the send. Re-sending would only store the same thing again.
* Any other status (0xA7xx out of resources, 0xA9xx, 0xCxxx, 0x01xx refusals …), an
  association that is rejected, aborted or never connects, a timeout, a presentation
  context the peer did not accept → failed try, retried with back-off.
* A send whose destination is no longer configured, or whose object file is gone,
  fails for good at once (``retry=False``): no retry can succeed.

Log lines carry send ids, SOP Instance UIDs and destination names, never patient data.
"""

from __future__ import annotations

import datetime as dt
import logging
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from node.logs import remember_patient
from node.settings import DestinationSettings, Settings
from storage.database import Database
from storage.errors import StorageError
from storage.filestore import FileStore
from storage.sends import SendInfo

__all__ = [
    "NOT_ATTEMPTED",
    "WARNING_STATUSES",
    "SendOutcome",
    "send_due",
    "send_file",
    "send_files",
]

logger = logging.getLogger(__name__)

#: C-STORE warnings that still mean "stored" (counted as sent, logged).
WARNING_STATUSES = frozenset({0xB000, 0xB006, 0xB007})
#: pynetdicom proposes at most 128 presentation contexts per association.
_MAX_CONTEXTS = 128
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


@dataclass(frozen=True)
class SendOutcome:
    """The result of one C-STORE attempt.

    Attributes
    ----------
    ok : bool
        The peer stored the object (status 0x0000 or a warning in
        :data:`WARNING_STATUSES`).
    status : int or None
        The DIMSE status the peer answered; ``None`` when there was no answer
        (association not established, aborted, timed out, or the file unreadable).
    message : str
        What happened, for logs and the send's ``last_error`` (no patient data).
    attempted : bool
        False when the object was not tried at all (sending was stopped first): no
        outcome to record, the send stays as it was.
    """

    ok: bool
    status: int | None
    message: str
    attempted: bool = True


#: The outcome of an object left out because sending was stopped.
NOT_ATTEMPTED = SendOutcome(False, None, "not attempted: sending stopped", attempted=False)


def _status_text(status: int) -> str:
    category, text = STORAGE_SERVICE_CLASS_STATUS.get(status, ("Unknown", ""))
    return f"0x{status:04X} {category}{': ' + text if text else ''}"


def _check_destination(destination: Any) -> None:
    if not isinstance(destination, DestinationSettings):
        raise TypeError(
            f"destination must be a DestinationSettings, got {type(destination).__name__}"
        )


def _check_timeout(timeout_seconds: Any) -> float:
    if isinstance(timeout_seconds, bool) or not isinstance(timeout_seconds, int | float):
        raise TypeError(f"timeout_seconds must be a number, got {type(timeout_seconds).__name__}")
    if not timeout_seconds > 0:
        raise ValueError(f"timeout_seconds must be > 0, got {timeout_seconds}")
    return float(timeout_seconds)


def _read(path: Path) -> Dataset | SendOutcome:
    try:
        ds = pydicom.dcmread(path)
        # A result carries the patient's values; a peer may echo them (an Error Comment).
        remember_patient(ds)
        ds.SOPClassUID  # noqa: B018 - fail here, not inside pynetdicom
        ds.SOPInstanceUID  # noqa: B018
        ds.file_meta.TransferSyntaxUID  # noqa: B018
    except FileNotFoundError:
        return SendOutcome(False, None, f"object file {path} does not exist")
    except Exception as exc:  # pydicom raises many types on a damaged file
        return SendOutcome(False, None, f"cannot read {path}: {type(exc).__name__}: {exc}")
    return ds


def _contexts(datasets: Sequence[Dataset]) -> dict[str, list[str]]:
    """SOP class → transfer syntaxes to propose, from the files themselves.

    An uncompressed file is offered in both Explicit and Implicit VR Little Endian
    (pynetdicom converts between them); a compressed one only in its own syntax (we
    do not transcode).
    """
    wanted: dict[str, list[str]] = {}
    for ds in datasets:
        sop_class = str(ds.SOPClassUID)
        ts = str(ds.file_meta.TransferSyntaxUID)
        syntaxes = wanted.setdefault(sop_class, [])
        for candidate in (ts, *_UNCOMPRESSED) if ts in _UNCOMPRESSED else (ts,):
            if candidate not in syntaxes:
                syntaxes.append(candidate)
    return wanted


def _association_failure(assoc: Any, destination: DestinationSettings) -> str:
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        try:
            detail = f"{rj.result_str}, {rj.source_str}: {rj.reason_str}"
        except Exception:  # pragma: no cover - pynetdicom always sets them on a reject
            detail = "no details"
        return f"association rejected by {where} ({detail})"
    if assoc.is_aborted:
        return f"association with {where} aborted or could not connect"
    return f"no association with {where} (connection refused or timed out)"


def send_files(
    paths: Sequence[Path],
    destination: DestinationSettings,
    *,
    calling_aet: str,
    timeout_seconds: float,
    tls: ssl.SSLContext | None = None,
    on_outcome: Callable[[int, SendOutcome], object] | None = None,
    stop: threading.Event | None = None,
) -> list[SendOutcome]:
    """C-STORE several files to one destination over one association.

    Parameters
    ----------
    paths : sequence of Path
        DICOM Part 10 files; at most 128 distinct (SOP class, transfer syntax) pairs.
    destination : DestinationSettings
        The peer (called AE title, host, port).
    calling_aet : str
        Our AE title.
    timeout_seconds : float
        Connection, association, DIMSE and network timeout.
    tls : ssl.SSLContext or None
        A client TLS context, or ``None`` for a plain TCP association.
    on_outcome : callable or None
        ``on_outcome(index, outcome)`` is called for each path as soon as its outcome
        is known (the peer's answer to that object), before the next one is sent.
    stop : threading.Event or None
        Checked before the association and before each object: once set, the objects
        not yet sent get :data:`NOT_ATTEMPTED` and the association is released.

    Returns
    -------
    list of SendOutcome
        One per path, in order.
    """
    _check_destination(destination)
    timeout = _check_timeout(timeout_seconds)
    if tls is not None and not isinstance(tls, ssl.SSLContext):
        raise TypeError(f"tls must be an ssl.SSLContext or None, got {type(tls).__name__}")
    outcomes: list[SendOutcome | None] = [None] * len(paths)

    def settle(index: int, outcome: SendOutcome) -> None:
        outcomes[index] = outcome
        if on_outcome is not None:
            on_outcome(index, outcome)

    datasets: dict[int, Dataset] = {}
    for index, path in enumerate(paths):
        read = _read(Path(path))
        if isinstance(read, SendOutcome):
            settle(index, read)
        else:
            datasets[index] = read
    contexts = _contexts(list(datasets.values()))
    if sum(len(v) for v in contexts.values()) > _MAX_CONTEXTS:
        raise ValueError(
            f"paths need more than {_MAX_CONTEXTS} presentation contexts; send fewer at once"
        )
    if datasets and stop is not None and stop.is_set():
        for index in datasets:
            settle(index, NOT_ATTEMPTED)
        datasets = {}
    if datasets:
        ae = AE(ae_title=calling_aet)
        ae.connection_timeout = timeout
        ae.acse_timeout = timeout
        ae.dimse_timeout = timeout
        ae.network_timeout = timeout
        for sop_class, syntaxes in contexts.items():
            ae.add_requested_context(sop_class, syntaxes)
        tls_args = None
        if tls is not None:
            tls_args = (tls, destination.host if tls.check_hostname else None)
        assoc = ae.associate(
            destination.host,
            destination.port,
            ae_title=destination.ae_title,
            tls_args=tls_args,  # type: ignore[arg-type]
        )
        if not assoc.is_established:
            message = _association_failure(assoc, destination)
            for index in datasets:
                settle(index, SendOutcome(False, None, message))
        else:
            try:
                for index, ds in datasets.items():
                    if stop is not None and stop.is_set():
                        settle(index, NOT_ATTEMPTED)
                        continue
                    settle(index, _store_one(assoc, ds, destination))
            finally:
                if assoc.is_established:
                    assoc.release()
    return [o if o is not None else NOT_ATTEMPTED for o in outcomes]


def _store_one(assoc: Any, ds: Dataset, destination: DestinationSettings) -> SendOutcome:
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    if not assoc.is_established:
        return SendOutcome(False, None, f"association with {where} ended before this object")
    try:
        rsp = assoc.send_c_store(ds)
    except ValueError as exc:
        # No accepted presentation context for this SOP class / transfer syntax.
        ts = UID(str(ds.file_meta.TransferSyntaxUID))
        return SendOutcome(
            False,
            None,
            f"{where} accepted no presentation context for "
            f"{UID(str(ds.SOPClassUID)).name} in {ts.name}: {exc}",
        )
    if rsp is None or "Status" not in rsp:
        return SendOutcome(
            False, None, f"no C-STORE response from {where} (timeout, abort or invalid reply)"
        )
    status = int(rsp.Status)
    comment = str(rsp.get("ErrorComment", "") or "").strip()
    text = _status_text(status) + (f" ({comment})" if comment else "")
    if status == 0x0000:
        return SendOutcome(True, status, f"stored by {where}")
    if status in WARNING_STATUSES:
        return SendOutcome(True, status, f"stored by {where} with warning {text}")
    return SendOutcome(False, status, f"{where} answered {text}")


def send_file(
    path: Path,
    destination: DestinationSettings,
    *,
    calling_aet: str,
    timeout_seconds: float,
    tls: ssl.SSLContext | None = None,
) -> SendOutcome:
    """C-STORE one DICOM file to one destination (its own association).

    The presentation context is proposed from the file's SOP class and transfer
    syntax (an uncompressed file also in the other uncompressed syntax).

    Parameters
    ----------
    path : Path
        A DICOM Part 10 file.
    destination : DestinationSettings
        The peer.
    calling_aet : str
        Our AE title.
    timeout_seconds : float
        Connection, association, DIMSE and network timeout (> 0).
    tls : ssl.SSLContext or None
        A client TLS context, or ``None``.

    Returns
    -------
    SendOutcome
        ``ok`` for 0x0000 and the warnings 0xB000/0xB006/0xB007; failure otherwise,
        with ``status=None`` when the peer never answered.

    Raises
    ------
    TypeError, ValueError
        Invalid arguments (never for network or peer failures: those are outcomes).
    """
    return send_files(
        [path], destination, calling_aet=calling_aet, timeout_seconds=timeout_seconds, tls=tls
    )[0]


def _record(
    database: Database, send: SendInfo, outcome: SendOutcome, now: dt.datetime | None
) -> bool:
    """Write one outcome to the queue; returns whether it counts as sent (an object not
    attempted is left as it was)."""
    if not outcome.attempted:
        return False
    try:
        if outcome.ok:
            status = outcome.status if outcome.status is not None else 0
            if status:
                logger.warning(
                    "send %d (SOP Instance %s) to %s: %s",
                    send.send_id,
                    send.sop_instance_uid,
                    send.destination,
                    outcome.message,
                )
            database.sends.mark_sent(send.send_id, status=status, now=now)
            return True
        state = database.sends.mark_send_failed(
            send.send_id, error=outcome.message, status=outcome.status, now=now
        )
        logger.warning(
            "send %d (SOP Instance %s) to %s failed (%s): %s",
            send.send_id,
            send.sop_instance_uid,
            send.destination,
            state,
            outcome.message,
        )
    except (StorageError, ValueError) as exc:
        logger.error("send %d: could not record its outcome: %s", send.send_id, exc)
    return False


def _fail_for_good(
    database: Database, send: SendInfo, message: str, now: dt.datetime | None
) -> None:
    logger.error(
        "send %d (SOP Instance %s) to %s failed for good: %s",
        send.send_id,
        send.sop_instance_uid,
        send.destination,
        message,
    )
    try:
        database.sends.mark_send_failed(send.send_id, error=message, retry=False, now=now)
    except (StorageError, ValueError) as exc:
        logger.error("send %d: could not record its failure: %s", send.send_id, exc)


def send_due(
    database: Database,
    store: FileStore,
    settings: Settings,
    *,
    now: dt.datetime | None = None,
    limit: int = 100,
    tls: ssl.SSLContext | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Send every due send (up to ``limit``): one association per destination.

    Each outcome is recorded as soon as the peer answered that object; ``stop`` ends
    the sending between two objects (see the module notes).

    Parameters
    ----------
    database : Database
        The queue.
    store : FileStore
        Where the objects' files live (``object_path`` is relative to its root).
    settings : Settings
        ``destinations`` (looked up by name), ``node.ae_title`` (our calling AE),
        ``send.timeout_seconds``, ``logging.pynetdicom_level``.
    now : datetime or None
        The time used to pick due sends and to record outcomes (tests); the
        database's clock when None.
    limit : int
        At most this many sends in this call.
    tls : ssl.SSLContext or None
        Client TLS context for the associations (none configured by default).
    stop : threading.Event or None
        Once set, no further object is sent; the ones left stay pending.

    Returns
    -------
    int
        How many were sent (0x0000 or a warning status).
    """
    if not isinstance(database, Database):
        raise TypeError(f"database must be a Database, got {type(database).__name__}")
    if not isinstance(store, FileStore):
        raise TypeError(f"store must be a FileStore, got {type(store).__name__}")
    if not isinstance(settings, Settings):
        raise TypeError(f"settings must be a Settings, got {type(settings).__name__}")
    logging.getLogger("pynetdicom").setLevel(settings.logging.pynetdicom_level)
    due = database.sends.due_sends(now=now, limit=limit)
    if not due:
        return 0
    destinations = {d.name: d for d in settings.destinations}
    groups: dict[str, list[SendInfo]] = {}
    for send in due:
        groups.setdefault(send.destination, []).append(send)

    sent = 0
    left = 0
    for name, sends in groups.items():
        if stop is not None and stop.is_set():
            left += len(sends)
            continue
        destination = destinations.get(name)
        if destination is None:
            known = ", ".join(sorted(destinations)) or "none"
            for send in sends:
                _fail_for_good(
                    database,
                    send,
                    f"destination {name!r} is not configured (configured: {known})",
                    now,
                )
            continue
        ready: list[tuple[SendInfo, Path]] = []
        for send in sends:
            try:
                path = store.resolve(send.object_path)
            except ValueError as exc:
                _fail_for_good(database, send, f"bad object path: {exc}", now)
                continue
            if not path.is_file():
                _fail_for_good(database, send, f"object file {send.object_path} is missing", now)
                continue
            ready.append((send, path))
        # Keep each association within pynetdicom's 128 proposed contexts.
        for start in range(0, len(ready), _MAX_CONTEXTS // 2):
            batch = ready[start : start + _MAX_CONTEXTS // 2]

            def record(index: int, outcome: SendOutcome, batch: Any = batch) -> None:
                nonlocal sent, left
                if not outcome.attempted:
                    left += 1
                sent += _record(database, batch[index][0], outcome, now)

            send_files(
                [path for _, path in batch],
                destination,
                calling_aet=settings.node.ae_title,
                timeout_seconds=settings.send.timeout_seconds,
                tls=tls,
                on_outcome=record,
                stop=stop,
            )
    if left:
        logger.info("sent %d of %d due send(s); stopping, %d left pending", sent, len(due), left)
    else:
        logger.info("sent %d of %d due send(s)", sent, len(due))
    return sent
