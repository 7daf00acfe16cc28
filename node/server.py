"""The SCP's TCP side: who may connect, for how long, and how much they may send.

:class:`GuardedAssociationServer` is the pynetdicom association server the node listens
with (``AE.make_server(..., server_class=GuardedAssociationServer)``). It differs from
pynetdicom's ``ThreadedAssociationServer`` where a hostile or broken peer could cost
the node something:

* **Nothing blocks the accept loop.** ``get_request`` only accepts; the TLS handshake
  (or, without TLS, the first bytes of the A-ASSOCIATE-RQ) happens in the connection's
  own thread, within ``handshake_timeout_seconds``. A silent socket costs one thread for
  that long and holds up nobody else.
* **Address checks before any work.** ``verify_request`` applies ``allowed_hosts`` and
  ``associations_per_host`` (connections from one address at once, counted from the
  accept to the close) before a thread, a TLS handshake or an association exists. A
  refused connection is closed at once and logged with the peer address and the
  reason (throttled: one line per address and reason per minute, with a count).
* **Bounded input.** A PDU longer than :data:`MAX_PDU_RECEIVED` aborts the association
  (we announce :data:`node.scp.MAX_PDU_SIZE`; a peer must not send more); a DIMSE
  command set longer than :data:`MAX_COMMAND_BYTES` aborts it; a data set longer than
  ``max_dataset_bytes`` stops being kept — the rest is counted and discarded, and the
  C-STORE handler receives an :class:`OversizedDataSet` to refuse.
* **No forged log lines.** pynetdicom logs some peer-supplied values (a non-conformant
  UID) as they are; :class:`EscapeControlCharacters` on its loggers escapes control
  characters, so a newline in a UID cannot start a line of the peer's choosing.
* **No socket waits forever.** After the handshake the socket's timeout is the AE's
  ``network_timeout``, so a peer that stops in the middle of a PDU is dropped.

Nothing here logs patient data: peer addresses, ports, sizes and reasons only.
"""

from __future__ import annotations

import ipaddress
import logging
import select
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from node import monitoring

__all__ = [
    "MAX_COMMAND_BYTES",
    "MAX_PDU_RECEIVED",
    "EscapeControlCharacters",
    "GuardedAssociationServer",
    "OversizedDataSet",
    "ServerLimits",
    "escape_pynetdicom_logs",
    "peer_host",
]

logger = logging.getLogger(__name__)

#: Longest PDU read from a peer (bytes). The A-ASSOCIATE-AC announces 128 KiB for
#: P-DATA; an A-ASSOCIATE-RQ with many presentation contexts is a few tens of KiB.
MAX_PDU_RECEIVED = 1024 * 1024
#: Longest DIMSE command set (a C-STORE-RQ's is about 200 bytes).
MAX_COMMAND_BYTES = 64 * 1024
#: A refusal is logged once per (address, reason) in this many seconds.
_LOG_EVERY_SECONDS = 60.0

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerLimits:
    """What one peer may cost the node.

    Parameters
    ----------
    handshake_timeout_seconds : float
        Time a new connection has to finish its TLS handshake — or, without TLS, to
        start its A-ASSOCIATE-RQ — before it is closed.
    associations_per_host : int
        Connections from one IP address at once (from accept to close, handshakes
        included); more are closed at once.
    max_dataset_bytes : int
        Largest data set kept in memory for one C-STORE (as received, before any
        inflation); a longer one is counted, discarded and refused by the handler.
    """

    handshake_timeout_seconds: float = 10.0
    associations_per_host: int = 4
    max_dataset_bytes: int = 128 * 1024 * 1024

    def __post_init__(self) -> None:
        if not self.handshake_timeout_seconds > 0:
            raise ValueError(
                f"handshake_timeout_seconds must be > 0, got {self.handshake_timeout_seconds}"
            )
        if self.associations_per_host < 1:
            raise ValueError(
                f"associations_per_host must be >= 1, got {self.associations_per_host}"
            )
        if self.max_dataset_bytes < 1:
            raise ValueError(f"max_dataset_bytes must be >= 1, got {self.max_dataset_bytes}")


class OversizedDataSet(BytesIO):
    """What a C-STORE handler receives instead of a data set over the size limit.

    Empty; :attr:`received` counts the bytes the peer sent (kept and discarded).
    """

    def __init__(self, received: int) -> None:
        super().__init__()
        self.received = received

    def write(self, data: Any) -> int:
        n = len(memoryview(data).cast("B"))
        self.received += n
        return n


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}


class EscapeControlCharacters(logging.Filter):
    """Escapes control characters (a newline, an ESC) in a record's message.

    pynetdicom logs values a peer sent (a non-conformant UID, an AE title) as they are;
    a newline in one would forge a log line of the peer's choosing. Installed on the
    ``pynetdicom`` loggers by :func:`escape_pynetdicom_logs`.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        escaped = message.translate(_CONTROL)
        if escaped != message:
            record.msg, record.args = escaped, None
        return True


_ESCAPE = EscapeControlCharacters()


def escape_pynetdicom_logs() -> None:
    """Put :class:`EscapeControlCharacters` on every ``pynetdicom`` logger (a logger's
    filters do not apply to its children's records, so each gets one)."""
    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] == "pynetdicom"]
    for name in ("pynetdicom", *names):
        log = logging.getLogger(name)
        if _ESCAPE not in log.filters:
            log.addFilter(_ESCAPE)


def peer_host(address: Any) -> str:
    """The peer's IP address as text (an IPv4-mapped IPv6 address as IPv4)."""
    host = str(address[0] if isinstance(address, tuple) else address)
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def _peer(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{peer_host(address)}:{address[1]}"
    return peer_host(address)


def _assoc_peer(assoc: Any) -> str:
    try:
        return f"{peer_host(assoc.requestor.address)}:{assoc.requestor.port}"
    except Exception:  # pragma: no cover - diagnostics only
        return "?"


class _BoundedDIMSE(DIMSEServiceProvider):
    """Keeps at most ``max_dataset_bytes`` of a data set and a bounded command set."""

    def __init__(self, assoc: Any, max_dataset_bytes: int) -> None:
        super().__init__(assoc)
        self._max_dataset_bytes = max_dataset_bytes

    def receive_primitive(self, primitive: Any) -> None:
        super().receive_primitive(primitive)
        message = self.message
        if message is None:  # complete (handed to the service) or nothing yet
            return
        if message.encoded_command_set.tell() > MAX_COMMAND_BYTES:
            logger.warning(
                "association from %s aborted: DIMSE command set over %d bytes",
                _assoc_peer(self.assoc),
                MAX_COMMAND_BYTES,
            )
            message.encoded_command_set = OversizedDataSet(0)
            self.dul.event_queue.put("Evt19")  # invalid PDU: A-ABORT, close
            return
        data = message.data_set
        if isinstance(data, OversizedDataSet) or not isinstance(data, BytesIO):
            return
        if data.tell() > self._max_dataset_bytes:
            message.data_set = OversizedDataSet(data.tell())


class _BoundedSocket(AssociationSocket):
    """An AssociationSocket that will not read a PDU longer than MAX_PDU_RECEIVED."""

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes > MAX_PDU_RECEIVED:
            logger.warning(
                "association from %s aborted: a PDU of %d bytes (at most %d accepted)",
                _assoc_peer(self.assoc),
                nr_bytes,
                MAX_PDU_RECEIVED,
            )
            return bytearray()  # the DUL sees a short PDU: transport closed
        return super().recv(nr_bytes)


class _GuardedRequestHandler(RequestHandler):
    """Runs one association in the connection's thread, with bounded input."""

    server: GuardedAssociationServer

    def handle(self) -> None:
        assoc = self._create_association()
        assoc.dimse = _BoundedDIMSE(assoc, self.server.limits.max_dataset_bytes)
        sock = assoc.dul.socket
        if type(sock) is AssociationSocket:  # same layout: only recv() differs
            sock.__class__ = _BoundedSocket
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        # The connection's slot (associations_per_host) is held until the association
        # ends: wait for it here, in the connection's thread.
        assoc.join()


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the checks and limits of this module.

    Made by ``AE.make_server(address, ..., server_class=GuardedAssociationServer,
    limits=..., allowed_networks=...)``; run ``serve_forever`` in a thread.

    Parameters
    ----------
    ae, address, ae_title, contexts, ssl_context, evt_handlers
        As for pynetdicom's ``AssociationServer``.
    limits : ServerLimits
        Handshake timeout, connections per address, data set size.
    allowed_networks : iterable of IPv4Network / IPv6Network
        Peer addresses that may connect; empty = any.
    """

    daemon_threads = True
    # shutdown() must not wait for connections still in their handshake: they end on
    # their own within handshake_timeout_seconds and start nothing once closing.
    block_on_close = False

    def __init__(
        self,
        ae: Any,
        address: Any,
        ae_title: str,
        contexts: Any,
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: Any = None,
        *,
        limits: ServerLimits | None = None,
        allowed_networks: Iterable[Network] = (),
    ) -> None:
        escape_pynetdicom_logs()
        self.limits = limits if limits is not None else ServerLimits()
        self._networks = tuple(allowed_networks)
        self._lock = threading.Lock()
        self._per_host: Counter[str] = Counter()
        self._logged: dict[tuple[str, str], tuple[float, int]] = {}
        self._closing = False
        super().__init__(
            ae,
            address,
            ae_title,
            contexts,
            ssl_context,
            evt_handlers=evt_handlers,
            request_handler=_GuardedRequestHandler,
        )

    # ------------------------------------------------------------------ accept thread

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept only: no TLS handshake here (it runs in the connection's thread)."""
        assert self.socket is not None
        sock, address = self.socket.accept()
        return sock, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Allow-list and connections-per-address, before any work; logs refusals."""
        host = peer_host(client_address)
        reason = self._refusal(host)
        if reason is None:
            with self._lock:
                if self._per_host[host] >= self.limits.associations_per_host:
                    reason = (
                        f"already {self._per_host[host]} connections from this address "
                        "(node.associations_per_host)"
                    )
                else:
                    self._per_host[host] += 1
        if reason is not None:
            monitoring.association_refused(reason)
            self._log_refusal(client_address, reason)
            return False
        return True

    def _refusal(self, host: str) -> str | None:
        if not self._networks:
            return None
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return "source address is not an IP address"
        if not any(ip in net for net in self._networks):
            return "source address not in node.allowed_hosts"
        return None

    def _log_refusal(self, client_address: Any, reason: str) -> None:
        host = peer_host(client_address)
        key = (host, reason)
        now = time.monotonic()
        with self._lock:
            last, suppressed = self._logged.get(key, (-_LOG_EVERY_SECONDS, 0))
            if now - last < _LOG_EVERY_SECONDS:
                self._logged[key] = (last, suppressed + 1)
                return
            self._logged[key] = (now, 0)
            if len(self._logged) > 1024:  # forget old entries; keep the memory bounded
                for old in [k for k, (t, _) in self._logged.items() if now - t > 600]:
                    del self._logged[old]
        more = f" ({suppressed} more since the last such line)" if suppressed else ""
        logger.warning("connection from %s refused: %s%s", _peer(client_address), reason, more)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Run the connection in its own (daemon) thread."""
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name=f"calcnode-connection-{_peer(client_address)}",
            daemon=True,
        )
        try:
            thread.start()
        except BaseException:
            self._release(client_address)
            raise

    # ------------------------------------------------------------------ connection thread

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Handshake within the timeout, then the association; frees the slot at the end."""
        sock: socket.socket | None = request
        try:
            sock = self._handshake(request, client_address)
            if sock is None:
                return
            if self._closing:
                self.shutdown_request(sock)
                return
            self.finish_request(sock, client_address)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(sock if sock is not None else request)
        finally:
            self._release(client_address)

    def _handshake(self, request: socket.socket, client_address: Any) -> socket.socket | None:
        timeout = self.limits.handshake_timeout_seconds
        request.settimeout(timeout)
        sock: socket.socket = request
        if self.ssl_context is not None:
            try:
                sock = self.ssl_context.wrap_socket(request, server_side=True)
            except TimeoutError:
                self._log_closed(client_address, f"no TLS handshake within {timeout:g} s")
                self.shutdown_request(request)
                return None
            except (OSError, ValueError) as exc:
                self._log_closed(client_address, f"TLS handshake failed ({_ssl_reason(exc)})")
                self.shutdown_request(request)
                return None
        else:
            try:
                readable, _, _ = select.select([sock], [], [], timeout)
            except (OSError, ValueError):
                readable = []
            if not readable:
                monitoring.association_refused("A-ASSOCIATE-RQ within")
                self._log_closed(client_address, f"no A-ASSOCIATE-RQ within {timeout:g} s")
                self.shutdown_request(sock)
                return None
        # From here on, a peer that stops mid-PDU is dropped after the network timeout
        # (pynetdicom would otherwise block in recv() for ever).
        sock.settimeout(self.ae.network_timeout)
        return sock

    def _log_closed(self, client_address: Any, reason: str) -> None:
        logger.warning("connection from %s closed: %s", _peer(client_address), reason)

    def _release(self, client_address: Any) -> None:
        host = peer_host(client_address)
        with self._lock:
            self._per_host[host] -= 1
            if self._per_host[host] <= 0:
                del self._per_host[host]

    def connections_from(self, host: str) -> int:
        """Connections open now from ``host`` (handshakes included)."""
        with self._lock:
            return self._per_host.get(peer_host(host), 0)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log (socketserver prints to stderr); the peer's address, no data."""
        logger.exception("connection from %s failed unexpectedly", _peer(client_address))

    def server_close(self) -> None:
        self._closing = True
        super().server_close()


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    return type(exc).__name__ if not str(exc) else f"{type(exc).__name__}: {exc}"
