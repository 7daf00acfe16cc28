"""The node's listening side: a C-ECHO and C-STORE SCP with an association policy.

:class:`StorageSCP` runs a pynetdicom server (one thread per association) that

* listens with :class:`node.server.GuardedAssociationServer`, which checks the source
  address and the connections per address before any work, runs the TLS handshake in
  the connection's own thread within a timeout, and bounds what a peer may send;
* accepts or rejects each association (calling and called AE title, number of
  concurrent associations) and logs every rejection with its reason — the peer's AE
  title and address, never patient data;
* answers C-ECHO (Verification);
* answers C-STORE for the two Digital Mammography X-Ray Image Storage SOP classes, in
  uncompressed and compressed transfer syntaxes (:data:`ACCEPTED_TRANSFER_SYNTAXES`),
  and refuses, per instance, every other storage SOP class a routed study may contain.

The C-STORE handler persists before it answers. pynetdicom sends the response when the
handler returns, so the order in the handler is the durability contract:

0. the data set as received within ``node.max_instance_mb`` → else 0xA720; the request's
   SOP Instance and SOP Class UIDs valid by the DICOM grammar → else 0xC210 (the
   attribute named, never the value, which could forge a log line or be a path);
1. free space above ``storage.min_free_mb`` → else 0xA700 (Refused: Out of Resources);
2. a mammogram SOP class → else 0x0122 (Refused: SOP Class Not Supported);
3. the header: parsed up to the pixel data only (no decoding), checked by
   :func:`cascade.data.io.check_mammogram_header`, plus the pixel data element itself
   (present, not truncated, native or encapsulated as the transfer syntax says), the
   identifying UIDs valid by the grammar → else 0xC210 (Cannot Understand) or 0xA900
   (Data Set Does Not Match SOP Class), with an Error Comment. A Deflated data set is
   inflated as it is parsed, never whole, up to ``node.max_inflated_mb`` → else 0xA721;
4. the file, written as received (no re-encoding) through
   :meth:`storage.filestore.FileStore.write_atomic` (temporary file, fsync, rename,
   directory fsync) → a full disk during the write is 0xA700;
5. the job: steps 4 and 5 are one call, :meth:`storage.jobs.Jobs.receive`, which
   decides new / duplicate / replacement from the digest before writing;
6. only then 0x0000. A failure after step 4 removes the file just written (no orphan
   file, no job pointing at a missing file) and answers 0xA710 when the database failed
   (transient: the sender retries), 0xA700 for a full disk, 0xC211 for anything else.
   No inference happens here: the worker does that from the queue.

Re-sends: the same SOP Instance UID with the same bytes is a duplicate (success, stored
and processed once); with different bytes it replaces the earlier instance and is
processed again (see ``docs/conformance.md``, "Network services").

Nothing here logs patient data: log lines carry SOP Instance UIDs, AE titles and peer
addresses. pynetdicom itself logs identifiers at INFO/DEBUG, so the ``pynetdicom``
logger is set to ``logging.pynetdicom_level`` (WARNING by default).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import ssl
import threading
import zlib
from dataclasses import dataclass
from io import BytesIO
from typing import Any, BinaryIO

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32
from pynetdicom import AE, evt
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from cascade.data.io import (
    MG_FOR_PRESENTATION,
    MG_FOR_PROCESSING,
    MG_SOP_CLASSES,
    check_mammogram_header,
)
from cascade.errors import InvalidImageError
from node import monitoring
from node.logs import remember_patient
from node.server import GuardedAssociationServer, OversizedDataSet, ServerLimits
from node.settings import Settings
from storage.database import Database
from storage.errors import DiskFullError, StorageError
from storage.filestore import FileStore
from storage.intake import EnqueueResult

__all__ = [
    "ACCEPTED_TRANSFER_SYNTAXES",
    "MAX_PDU_SIZE",
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_DATABASE_UNAVAILABLE",
    "STATUS_DATASET_MISMATCH",
    "STATUS_INFLATED_TOO_LARGE",
    "STATUS_INSTANCE_TOO_LARGE",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_PROCESSING_FAILURE",
    "STATUS_SOP_CLASS_NOT_SUPPORTED",
    "STATUS_SUCCESS",
    "StorageSCP",
]

logger = logging.getLogger(__name__)

# C-STORE statuses (PS3.4 B.2.3; 0x0122 is a general status, PS3.7 C.5).
STATUS_SUCCESS = 0x0000
#: Refused: Out of Resources — free space below the floor, or the disk filled up.
STATUS_OUT_OF_RESOURCES = 0xA700
#: Error: Data Set Does Not Match SOP Class — the data set's SOP Class UID differs
#: from the request's Affected SOP Class UID.
STATUS_DATASET_MISMATCH = 0xA900
#: Error: Cannot Understand — not a usable mammogram (header check failed).
STATUS_CANNOT_UNDERSTAND = 0xC210
#: Error: Cannot Understand, our side — storing or queueing failed unexpectedly.
STATUS_PROCESSING_FAILURE = 0xC211
#: Refused: SOP Class Not Supported — a storage SOP class other than MG.
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
#: Refused: Out of Resources (0xA7xx), the node's database failed (locked past its busy
#: timeout, full, unreachable): transient, the sender should retry later.
STATUS_DATABASE_UNAVAILABLE = 0xA710
#: Refused: Out of Resources (0xA7xx), the data set as received is larger than
#: ``node.max_instance_mb``.
STATUS_INSTANCE_TOO_LARGE = 0xA720
#: Refused: Out of Resources (0xA7xx), a Deflated data set inflates to more than
#: ``node.max_inflated_mb``.
STATUS_INFLATED_TOO_LARGE = 0xA721

#: Transfer syntaxes accepted for every storage SOP class, in this order of preference
#: (pynetdicom takes the first of the *requestor's* list that is here). Lossy ones are
#: accepted too: a PACS may hold nothing else; the detector then sees lossy pixels.
ACCEPTED_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLosslessSV1,
    JPEGLossless,
    RLELossless,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000,
    JPEGLSNearLossless,
    HTJ2K,
    JPEGExtended12Bit,
    JPEGBaseline8Bit,
)

#: Largest PDU we accept (announced in the A-ASSOCIATE-AC). pynetdicom's default is
#: 16 KiB; 128 KiB (DCMTK's own upper limit) lets senders use fewer, larger PDUs for
#: images of tens of MB and stays within what common peers handle.
MAX_PDU_SIZE = 128 * 1024

_NATIVE_SYNTAXES = frozenset(
    {ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}
)
_PIXEL_TAGS = {
    0x7FE00010: "PixelData",
    0x7FE00008: "FloatPixelData",
    0x7FE00009: "DoubleFloatPixelData",
}
_UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM_TAG = 0xFFFEE000
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_ERROR_COMMENT_MAX = 64  # Error Comment (0000,0902) is LO: at most 64 characters
_PREAMBLE = b"\x00" * 128 + b"DICM"

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4.
_RJ_NO_REASON = (0x01, 0x01, 0x01)  # permanent, service user, no reason given
_RJ_CALLING_AET = (0x01, 0x01, 0x03)  # permanent, service user, calling AE not recognised
_RJ_CALLED_AET = (0x01, 0x01, 0x07)  # permanent, service user, called AE not recognised
_RJ_LIMIT = (0x02, 0x03, 0x02)  # transient, presentation provider, local limit exceeded


class _RefusedError(Exception):
    """A C-STORE answered with a failure status (an expected outcome, not a bug)."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


@dataclass(frozen=True)
class _PixelElement:
    """Where the top-level pixel data element starts in the data set stream."""

    tag: int
    length: int
    offset: int  # of the element's tag
    header_bytes: int  # tag + VR + length fields


#: The UIDs checked against the DICOM grammar (PS3.5 9.1) before anything is stored:
#: those the node files the instance under and copies into its results.
_CHECKED_UIDS: tuple[tuple[str, str, bool], ...] = (
    # (keyword, tag, required)
    ("SOPClassUID", "(0008,0016)", True),
    ("SOPInstanceUID", "(0008,0018)", True),
    ("StudyInstanceUID", "(0020,000D)", True),
    ("SeriesInstanceUID", "(0020,000E)", True),
    ("FrameOfReferenceUID", "(0020,0052)", False),
)

#: Data set values longer than this are skipped, not read, while parsing the header.
_DEFER_BYTES = 1024 * 1024


def is_valid_uid(value: object) -> bool:
    """Whether ``value`` is a UID by the DICOM grammar: 1..64 characters, dot-separated
    components of digits, no leading zero in a component (PS3.5 9.1)."""
    return isinstance(value, str) and UID(value).is_valid


class _InflateLimitError(Exception):
    """The inflated data set is longer than the limit."""


class _InflatingReader:
    """A Deflated data set inflated as it is read: bounded memory, bounded size.

    Supports what pydicom's parser needs: ``read``, ``tell`` and ``seek`` forward
    (skipped bytes are inflated and dropped) or a little backward (a window of recent
    bytes is kept). Raises :class:`_InflateLimitError` past ``limit`` inflated bytes and
    ``zlib.error`` on a corrupt stream.
    """

    _CHUNK = 256 * 1024
    _KEEP = 4096  # bytes kept behind the read position (pydicom rewinds a tag or two)

    def __init__(self, deflated: memoryview, limit: int) -> None:
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._pending: bytes | memoryview = deflated
        self._limit = limit
        self._window = bytearray()
        self._window_start = 0  # offset of _window[0] in the inflated stream
        self._produced = 0  # inflated bytes so far
        self._position = 0
        self._eof = False

    def _inflate_some(self, *, keep: bool = True) -> None:
        if self._eof:
            return
        if self._pending:
            out = self._inflater.decompress(self._pending, self._CHUNK)
            self._pending = self._inflater.unconsumed_tail
        else:
            out = self._inflater.flush()
            self._eof = True
        if self._inflater.eof:
            self._eof = True
        if not out and not self._pending:
            self._eof = True
        self._produced += len(out)
        if self._produced > self._limit:
            raise _InflateLimitError
        if not keep:  # counted, not kept
            self._window_start += len(self._window) + len(out)
            self._window.clear()
            self._position = max(self._position, self._window_start)
            return
        keep_from = self._position - self._KEEP
        self._window += out
        if keep_from > self._window_start:
            drop = min(keep_from - self._window_start, len(self._window))
            del self._window[:drop]
            self._window_start += drop

    def _ensure(self, end: int) -> None:
        while self._produced < end and not self._eof:
            self._inflate_some()

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            raise OSError("read() of an inflated stream needs a size")
        else:
            end = self._position + size
            self._ensure(end)
        start = self._position
        if start < self._window_start:  # pragma: no cover - guarded by seek()
            raise OSError("cannot read before the inflated window")
        data = bytes(self._window[start - self._window_start : end - self._window_start])
        self._position = start + len(data)
        return data

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = 0) -> int:
        target = offset if whence == 0 else self._position + offset
        if whence not in (0, 1):
            raise OSError("only SEEK_SET and SEEK_CUR are supported")
        if target < self._window_start:
            raise OSError("cannot seek that far back in an inflated stream")
        self._position = target
        return target

    def drain(self) -> int:
        """Inflate to the end, keeping nothing (the position moves to the end); return
        the inflated length."""
        while not self._eof:
            self._inflate_some(keep=False)
        return self._produced


def _status(status: int, comment: str | None = None) -> Dataset:
    rsp = Dataset()
    rsp.Status = status
    if comment:
        text = " ".join(comment.split())
        if len(text) > _ERROR_COMMENT_MAX:
            text = text[: _ERROR_COMMENT_MAX - 3] + "..."
        # LO is ISO 646 by default: keep the comment ASCII (so "...", not "…").
        rsp.ErrorComment = text.encode("ascii", "replace").decode("ascii")
    return rsp


def _uid_name(uid: str) -> str:
    name = UID(uid).name
    return name if name and name != uid else uid


def _read_header(stream: Any, transfer_syntax: str) -> tuple[Dataset, _PixelElement | None]:
    """Parse a data set up to (not including) its top-level pixel data element.

    Returns the data set (raw elements, converted on access) and where the pixel data
    element starts, or ``None`` when there is none. ``stream`` holds the data set as
    received (no file meta); a deflated one must be inflated already.
    """
    found: list[_PixelElement] = []
    implicit = transfer_syntax == ImplicitVRLittleEndian

    def at_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
        if int(tag) not in _PIXEL_TAGS:
            return False
        # The generator stands just after the element header: tag 4 + length 4 bytes
        # (implicit or short explicit), + VR 2 + reserved 2 for explicit OB/OW/OF/OD/UN.
        header = 8 if implicit or vr not in EXPLICIT_VR_LENGTH_32 else 12
        offset = stream.tell() - header
        found.append(_PixelElement(int(tag), length, offset, header))
        return True

    try:
        ds = read_dataset(stream, implicit, True, stop_when=at_pixels, defer_size=_DEFER_BYTES)
    except _InflateLimitError:
        raise
    except zlib.error as exc:
        raise InvalidImageError(f"bad deflate stream: {exc}") from None
    except Exception as exc:  # pydicom raises many types on a corrupt stream
        raise InvalidImageError(f"unreadable data set: {type(exc).__name__}: {exc}") from None
    return ds, (found[0] if found else None)


def _check_pixel_element(
    ds: Dataset, pixel: _PixelElement | None, stream: Any, total: int, transfer_syntax: str
) -> None:
    """The pixel data is there, whole, and encoded as the transfer syntax says."""
    if pixel is None:
        raise InvalidImageError("missing pixel data: no PixelData (or the data set is truncated)")
    if pixel.tag != 0x7FE00010:
        raise InvalidImageError(f"only {_PIXEL_TAGS[pixel.tag]}, which is not supported")
    value_start = pixel.offset + pixel.header_bytes
    available = total - value_start
    if transfer_syntax in _NATIVE_SYNTAXES:
        if pixel.length == _UNDEFINED_LENGTH:
            raise InvalidImageError("encapsulated pixel data in an uncompressed transfer syntax")
        bits = int(ds.BitsAllocated)
        expected = (int(ds.Rows) * int(ds.Columns) * int(ds.SamplesPerPixel) * bits + 7) // 8
        if pixel.length < expected or available < expected:
            raise InvalidImageError(
                f"truncated pixel data: {min(pixel.length, available)} of {expected} bytes"
            )
        return
    if pixel.length != _UNDEFINED_LENGTH:
        raise InvalidImageError(
            f"native pixel data in a compressed transfer syntax ({_uid_name(transfer_syntax)})"
        )
    # Walk the items (Basic Offset Table, then fragments) without reading them.
    position = value_start
    items = fragments = 0
    stream.seek(position)
    while True:
        head = stream.read(8)
        if len(head) < 8:
            raise InvalidImageError("truncated encapsulated pixel data (no sequence delimiter)")
        group = int.from_bytes(head[0:2], "little")
        element = int.from_bytes(head[2:4], "little")
        length = int.from_bytes(head[4:8], "little")
        tag = (group << 16) | element
        if tag == _SEQUENCE_DELIMITER:
            break
        if tag != _ITEM_TAG or length == _UNDEFINED_LENGTH:
            raise InvalidImageError("corrupt encapsulated pixel data (bad item tag)")
        position += 8 + length
        if position > total:
            raise InvalidImageError("truncated encapsulated pixel data")
        items += 1
        if items > 1 and length:  # the first item is the Basic Offset Table
            fragments += 1
        stream.seek(position)
    if fragments == 0:
        raise InvalidImageError("encapsulated pixel data without any fragment")


class StorageSCP:
    """The node's DICOM listener: C-ECHO and C-STORE with an association policy.

    Parameters
    ----------
    settings : Settings
        ``node`` (AE title, address, port, access control, limits, timeouts, TLS),
        ``logging.pynetdicom_level``; ``storage.min_free_mb`` is enforced by ``store``.
    store : FileStore
        Where received instances are written.
    database : Database
        Where their jobs are queued.
    port : int or None
        Listen on this port instead of ``settings.node.port``; 0 lets the system pick a
        free one (tests, benchmarks); read it back from :attr:`port` after :meth:`start`.
    limits : ServerLimits or None
        Handshake timeout, connections per address, largest data set kept;
        ``None``: the defaults of :class:`~node.server.ServerLimits`.
    max_inflated_bytes : int
        Largest inflated size of a Deflated data set.

    Raises
    ------
    TypeError
        An argument of the wrong type.
    ValueError
        ``port`` outside 0..65535.

    Notes
    -----
    Accepted: Verification; Digital Mammography X-Ray Image Storage For Presentation and
    For Processing; every other storage SOP class pynetdicom knows is *accepted at the
    association* and refused per instance with 0x0122, so a PACS that routes a whole
    study sees a clear status for each non-mammogram instead of a failed association.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        store: FileStore,
        database: Database,
        port: int | None = None,
        limits: ServerLimits | None = None,
        max_inflated_bytes: int = 128 * 1024 * 1024,
    ) -> None:
        if not isinstance(settings, Settings):
            raise TypeError(f"settings must be a Settings, got {type(settings).__name__}")
        if not isinstance(store, FileStore):
            raise TypeError(f"store must be a FileStore, got {type(store).__name__}")
        if not isinstance(database, Database):
            raise TypeError(f"database must be a Database, got {type(database).__name__}")
        if port is not None:
            if isinstance(port, bool) or not isinstance(port, int):
                raise TypeError(f"port must be an int or None, got {type(port).__name__}")
            if not 0 <= port <= 65535:
                raise ValueError(f"port must be in 0..65535, got {port}")
        self._settings = settings
        self._store = store
        self._database = database
        self._requested_port = settings.node.port if port is None else port
        self._networks = settings.node.allowed_networks
        self._calling = frozenset(settings.node.allowed_calling_aets)
        self._limits = limits if limits is not None else ServerLimits()
        self._max_inflated = max_inflated_bytes
        self._ae: AE | None = None
        self._server: GuardedAssociationServer | None = None
        logging.getLogger("pynetdicom").setLevel(settings.logging.pynetdicom_level)

    # ------------------------------------------------------------------ lifecycle

    def _make_ae(self) -> AE:
        node = self._settings.node
        ae = AE(ae_title=node.ae_title)
        ae.acse_timeout = node.acse_timeout_seconds
        ae.dimse_timeout = node.dimse_timeout_seconds
        ae.network_timeout = node.network_timeout_seconds
        ae.maximum_associations = node.max_associations
        ae.maximum_pdu_size = MAX_PDU_SIZE
        # Defence in depth: _on_requested enforces these first (and logs why); these
        # pynetdicom checks only matter if that handler failed.
        ae.require_called_aet = node.require_called_aet
        ae.require_calling_aet = list(node.allowed_calling_aets)
        ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        storage = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
        for sop_class in (MG_FOR_PRESENTATION, MG_FOR_PROCESSING):
            if sop_class not in storage:  # pragma: no cover - pynetdicom lists both
                storage.append(sop_class)
        for abstract_syntax in storage:
            ae.add_supported_context(abstract_syntax, list(ACCEPTED_TRANSFER_SYNTAXES))
        return ae

    def _ssl_context(self) -> ssl.SSLContext:
        tls = self._settings.node.tls
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(certfile=str(tls.cert_file), keyfile=str(tls.key_file))
        if tls.ca_file is not None:
            context.load_verify_locations(cafile=str(tls.ca_file))
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE
        return context

    def start(self) -> None:
        """Start listening in background threads (returns at once).

        Raises
        ------
        RuntimeError
            Already started.
        OSError
            The address cannot be bound (port in use, no permission for port < 1024).
        ssl.SSLError
            The TLS certificate or key cannot be loaded.
        """
        if self._server is not None:
            raise RuntimeError("the SCP is already started")
        node = self._settings.node
        context = self._ssl_context() if node.tls.enabled else None
        ae = self._make_ae()
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        # Our server class: accepts without the TLS handshake (that runs in the
        # connection's thread, with a timeout), checks the address first, bounds input.
        server = ae.make_server(
            (node.host, self._requested_port),
            ssl_context=context,
            evt_handlers=handlers,  # type: ignore[arg-type]
            server_class=GuardedAssociationServer,
            limits=self._limits,
            allowed_networks=self._networks,
        )
        assert isinstance(server, GuardedAssociationServer)
        thread = threading.Thread(
            target=server.serve_forever, name="calcnode-scp-accept", daemon=True
        )
        thread.start()
        ae._servers.append(server)  # so that ae.shutdown() stops it (as start_server does)
        self._server = server
        self._ae = ae
        limits = self._limits
        logger.info(
            "DICOM SCP %s listening on %s:%d (TLS %s, calling AEs %s, hosts %s, "
            "max %d associations, %d per address, handshake %g s, instances up to %d MB, "
            "inflated up to %d MB)",
            node.ae_title,
            node.host,
            self.port,
            "on" if context is not None else "off",
            ", ".join(sorted(self._calling)) or "any",
            ", ".join(str(n) for n in self._networks) or "any",
            node.max_associations,
            limits.associations_per_host,
            limits.handshake_timeout_seconds,
            limits.max_dataset_bytes // (1024 * 1024),
            self._max_inflated // (1024 * 1024),
        )

    @property
    def port(self) -> int:
        """The bound TCP port (the system's pick when started with port 0).

        Raises
        ------
        RuntimeError
            Not started.
        """
        if self._server is None:
            raise RuntimeError("the SCP is not started")
        return int(self._server.server_address[1])

    @property
    def running(self) -> bool:
        """Whether the server is listening."""
        return self._server is not None

    def stop(self) -> None:
        """Abort active associations and stop listening; a no-op when not started."""
        if self._server is None:
            return
        ae = self._ae
        self._server = None
        self._ae = None
        if ae is not None:
            ae.shutdown()
        logger.info("DICOM SCP stopped")

    def __enter__(self) -> StorageSCP:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ associations

    def _refusal(self, assoc: Any, calling: str, called: str) -> tuple[tuple[int, ...], str] | None:
        node = self._settings.node
        address = str(assoc.requestor.address)
        if self._networks:
            try:
                ip = ipaddress.ip_address(address.split("%", 1)[0])
            except ValueError:
                return _RJ_NO_REASON, f"source address {address!r} is not an IP address"
            if ip.version == 6 and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            if not any(ip in net for net in self._networks):
                return _RJ_NO_REASON, "source address not in node.allowed_hosts"
        if self._calling and calling not in self._calling:
            return _RJ_CALLING_AET, "calling AE title not in node.allowed_calling_aets"
        if node.require_called_aet and called != node.ae_title:
            return _RJ_CALLED_AET, f"called AE title is not {node.ae_title!r}"
        active = [a for a in assoc.ae.active_associations if a.is_acceptor]
        if len(active) > node.max_associations:
            return _RJ_LIMIT, f"already {len(active) - 1} associations (max_associations)"
        return None

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        try:
            primitive: Any = assoc.requestor.primitive
            calling = str(primitive.calling_ae_title or "").strip()
            called = str(primitive.called_ae_title or "").strip()
            refusal = self._refusal(assoc, calling, called)
        except Exception:
            # Fail closed: an association we could not check is not accepted.
            logger.exception("association request from %s could not be checked", _addr(assoc))
            assoc.abort()
            return
        if refusal is None:
            logger.debug("association from %s@%s accepted", calling, _addr(assoc))
            return
        rsd, reason = refusal
        monitoring.association_refused(reason)
        logger.warning(
            "association rejected: %s (calling AE %r, called AE %r, from %s)",
            reason,
            calling,
            called,
            _addr(assoc),
        )
        assoc.acse.send_reject(*rsd)
        assoc.kill()

    def _on_rejected(self, event: evt.Event) -> None:
        # Only reached when pynetdicom's own checks reject (our handler did not).
        monitoring.association_refused("pynetdicom")
        assoc = event.assoc
        rj = assoc.acceptor.primitive
        logger.warning(
            "association rejected by pynetdicom (result %s, source %s, diagnostic %s; "
            "calling AE %r, from %s)",
            getattr(rj, "result", "?"),
            getattr(rj, "result_source", "?"),
            getattr(rj, "diagnostic", "?"),
            str(getattr(assoc.requestor, "ae_title", "")).strip(),
            _addr(assoc),
        )

    def _on_echo(self, event: evt.Event) -> int:
        logger.debug("C-ECHO from %s", _addr(event.assoc))
        return STATUS_SUCCESS

    # ------------------------------------------------------------------ C-STORE

    def _on_store(self, event: evt.Event) -> Dataset:
        request = event.request
        raw_uid = str(getattr(request, "AffectedSOPInstanceUID", "") or "").strip()
        # An invalid UID is never logged nor echoed: it may carry anything (a newline
        # and a forged log line, a path).
        label = raw_uid if is_valid_uid(raw_uid) else "(invalid UID)"
        try:
            result = self._receive(event, raw_uid)
        except _RefusedError as refusal:
            monitoring.store_refused(refusal.status)
            log = logger.warning if refusal.status >> 8 == 0xA7 else logger.info
            log(
                "C-STORE of SOP Instance %s from %s refused with 0x%04X: %s",
                label,
                _who(event.assoc),
                refusal.status,
                refusal.comment,
            )
            return _status(refusal.status, refusal.comment)
        except Exception:
            logger.exception("C-STORE of SOP Instance %s failed unexpectedly", label)
            monitoring.store_refused(STATUS_PROCESSING_FAILURE)
            return _status(STATUS_PROCESSING_FAILURE, "internal error; see the node's log")
        monitoring.instance_received(result.outcome)
        logger.info(
            "stored SOP Instance %s from %s: job %d (%s)",
            label,
            _who(event.assoc),
            result.job_id,
            result.outcome,
        )
        return _status(STATUS_SUCCESS)

    def _receive(self, event: evt.Event, sop_uid: str) -> EnqueueResult:
        request: Any = event.request  # a C_STORE primitive
        sop_class = str(request.AffectedSOPClassUID or "").strip()
        transfer_syntax = str(event.context.transfer_syntax)
        stream: BytesIO = request.DataSet

        # 0. Within the size limit (node.server kept at most max_dataset_bytes of it).
        limit = self._limits.max_dataset_bytes
        received = (
            stream.received if isinstance(stream, OversizedDataSet) else stream.getbuffer().nbytes
        )
        if received > limit:
            raise _RefusedError(
                STATUS_INSTANCE_TOO_LARGE,
                f"data set of {_mb(received)} exceeds node.max_instance_mb ({_mb(limit)})",
            )
        # The request's UIDs, by the grammar, before they go anywhere.
        for value, name in (
            (sop_uid, "Affected SOP Instance UID"),
            (sop_class, "Affected SOP Class UID"),
        ):
            if not is_valid_uid(value):
                raise _RefusedError(STATUS_CANNOT_UNDERSTAND, f"{name} is not a valid UID")

        total = received
        meta_bytes = encode_file_meta(event.file_meta)
        size = len(_PREAMBLE) + len(meta_bytes) + total

        # 1. Durability first: refuse while there is still room to refuse in.
        try:
            self._store.ensure_free_space(size)
        except DiskFullError as exc:
            raise _RefusedError(STATUS_OUT_OF_RESOURCES, "out of disk space") from exc

        # 2. Only mammograms are processed.
        if sop_class not in MG_SOP_CLASSES:
            raise _RefusedError(
                STATUS_SOP_CLASS_NOT_SUPPORTED,
                f"only MG images are accepted, not {_uid_name(sop_class)}",
            )

        # 3. The header (no pixel decoding).
        ds = self._checked_header(event, stream, total, transfer_syntax, sop_class, sop_uid)
        study_uid = str(ds.StudyInstanceUID).strip()
        series_uid = str(ds.SeriesInstanceUID).strip()
        calling = str(event.assoc.requestor.ae_title).strip()

        # 4. + 5. File, then job: storage decides new / duplicate / replacement.
        def write(fh: BinaryIO) -> None:
            fh.write(_PREAMBLE)
            fh.write(meta_bytes)
            fh.write(stream.getbuffer())

        digest = hashlib.sha256()
        digest.update(_PREAMBLE)
        digest.update(meta_bytes)
        digest.update(stream.getbuffer())
        content_digest = digest.hexdigest()

        try:
            return self._database.jobs.receive(
                self._store,
                sop_instance_uid=sop_uid,
                study_instance_uid=study_uid,
                series_instance_uid=series_uid,
                sop_class_uid=sop_class,
                data=write,
                digest=content_digest,
                size=size,
                calling_aet=calling[:16],
            )
        except DiskFullError as exc:
            raise _RefusedError(STATUS_OUT_OF_RESOURCES, "out of disk space") from exc
        except StorageError as exc:
            # The database failed (locked, full, unreachable): nothing was kept (storage
            # removes the file it wrote); a transient refusal the sender retries.
            logger.error("the job database failed while queueing: %s", exc)
            raise _RefusedError(
                STATUS_DATABASE_UNAVAILABLE, "node database unavailable; retry later"
            ) from exc

    def _checked_header(
        self,
        event: evt.Event,
        stream: BytesIO,
        total: int,
        transfer_syntax: str,
        sop_class: str,
        sop_uid: str,
    ) -> Dataset:
        source: Any
        if transfer_syntax == DeflatedExplicitVRLittleEndian:
            # Inflated as parsed, never whole: memory stays small, the size is bounded.
            source = _InflatingReader(stream.getbuffer(), self._max_inflated)
        else:
            source = stream
        try:
            source.seek(0)
            ds, pixel = _read_header(source, transfer_syntax)
            remember_patient(ds)  # before anything may log, warn or raise about it
            ds.file_meta = event.file_meta
            _check_uids(ds)
            data_class = str(ds.get("SOPClassUID", "") or "").strip()
            if data_class != sop_class:
                raise _RefusedError(
                    STATUS_DATASET_MISMATCH,
                    f"SOP Class UID {data_class} differs from the request's",
                )
            data_uid = str(ds.get("SOPInstanceUID", "") or "").strip()
            if data_uid != sop_uid:
                raise _RefusedError(
                    STATUS_CANNOT_UNDERSTAND, "SOP Instance UID differs from the request's"
                )
            check_mammogram_header(ds, require_pixel_data=False)
            source_total = source.drain() if isinstance(source, _InflatingReader) else total
            _check_pixel_element(ds, pixel, source, source_total, transfer_syntax)
        except _InflateLimitError:
            raise _RefusedError(
                STATUS_INFLATED_TOO_LARGE,
                f"inflated data set exceeds node.max_inflated_mb ({_mb(self._max_inflated)})",
            ) from None
        except zlib.error as exc:
            raise _RefusedError(STATUS_CANNOT_UNDERSTAND, f"bad deflate stream: {exc}") from None
        except InvalidImageError as exc:
            raise _RefusedError(STATUS_CANNOT_UNDERSTAND, str(exc)) from None
        finally:
            stream.seek(0)
        return ds


def _check_uids(ds: Dataset) -> None:
    """The identifying UIDs are UIDs by the grammar; the refusal names the attribute only.

    Checked on the raw bytes, before pydicom converts (and warns about, and logs) them.
    """
    for keyword, tag, required in _CHECKED_UIDS:
        value = _raw_text(ds, keyword)
        if value is None or value == "":
            if required:
                raise _RefusedError(STATUS_CANNOT_UNDERSTAND, f"{keyword} {tag} is missing")
            continue
        if not is_valid_uid(value):
            raise _RefusedError(STATUS_CANNOT_UNDERSTAND, f"{keyword} {tag} is not a valid UID")


def _raw_text(ds: Dataset, keyword: str) -> str | None:
    """An element's value as text without pydicom's conversion (None when absent);
    trailing NUL / space padding removed, anything undecodable kept as a non-UID."""
    if keyword not in ds:
        return None
    elem = ds.get_item(keyword)
    value = getattr(elem, "value", None)
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        text = bytes(value).decode("ascii", "replace")
    elif isinstance(value, str):
        text = value
    else:  # several values, a number: not one UID
        return "\x00"
    return text.rstrip("\x00 ")


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.0f} MB" if n >= 1024 * 1024 else f"{n} bytes"


def _addr(assoc: Any) -> str:
    try:
        return f"{assoc.requestor.address}:{assoc.requestor.port}"
    except Exception:  # pragma: no cover - diagnostics only
        return "?"


def _who(assoc: Any) -> str:
    return f"{str(assoc.requestor.ae_title).strip()}@{_addr(assoc)}"
