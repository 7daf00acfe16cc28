"""``sd_notify`` without a dependency: tell systemd we are ready, stopping, or alive.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``: a Unix datagram socket path,
or an abstract-namespace name written with a leading ``@``. Outside systemd the
variable is absent and every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["notify"]

logger = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send one state string (``READY=1``, ``STATUS=…``, ``STOPPING=1``, ``WATCHDOG=1``).

    Parameters
    ----------
    state : str
        Newline-separated ``KEY=VALUE`` assignments, as in sd_notify(3).

    Returns
    -------
    bool
        ``True`` when the message was sent; ``False`` when ``$NOTIFY_SOCKET`` is unset
        or unusable (logged, never raised: a lost notification must not stop the node).
    """
    if not isinstance(state, str) or not state:
        raise ValueError(f"state: must be a non-empty string such as 'READY=1', got {state!r}")
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace (Linux)
    elif not address.startswith("/"):
        logger.warning("NOTIFY_SOCKET %r is not a Unix socket path; not notifying", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError as exc:
        logger.warning("sd_notify(%s) failed: %s", state.split("\n")[0], exc)
        return False
    return True
