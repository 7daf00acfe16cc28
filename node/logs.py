"""Logging for the node's processes: stdout (the journal under systemd), no patient data.

Configured once per process at its entry point (``calcnode serve``, a spawned worker).
pynetdicom logs patient identifiers at INFO/DEBUG, so it is held at its own level.
"""

from __future__ import annotations

import logging
import sys

from node.settings import Settings

__all__ = ["configure_logging"]

_LOG_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


def configure_logging(settings: Settings) -> None:
    """Log to stdout (the journal under systemd) at ``logging.level``.

    A handler is added only when the root logger has none (the CLI may have configured
    one); pynetdicom is held at ``logging.pynetdicom_level`` because it logs patient
    identifiers at INFO/DEBUG.
    """
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(_LOG_FORMAT))
        root.addHandler(handler)
    root.setLevel(settings.logging.level)
    for name in ("node", "storage", "cascade"):
        logging.getLogger(name).setLevel(settings.logging.level)
    logging.getLogger("pynetdicom").setLevel(settings.logging.pynetdicom_level)
    # highdicom narrates every attribute it copies at INFO: noise in the journal.
    logging.getLogger("highdicom").setLevel(max(logging.WARNING, root.level))
