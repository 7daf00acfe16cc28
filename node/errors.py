"""The errors the node raises on purpose, and which errors a user is shown plainly.

:class:`CalcnodeError` is the node's root (a bad command line, a bad configuration, a
demo folder that is not the demo's). The cascade and storage keep roots of their own
(:class:`cascade.errors.CascadeError`, :class:`storage.errors.StorageError`) because
they may not import the node; :data:`USER_ERRORS` names all three, so the CLI prints
their message instead of a traceback.
"""

from __future__ import annotations

from cascade.errors import CascadeError
from storage.errors import StorageError

__all__ = ["USER_ERRORS", "CalcnodeError", "ConfigError"]


class CalcnodeError(Exception):
    """Base class of the errors the node raises deliberately."""


class ConfigError(CalcnodeError):
    """The configuration is invalid; the message names the key and where it came from."""


#: Expected failures with a message meant for the user (no traceback).
USER_ERRORS: tuple[type[Exception], ...] = (CalcnodeError, CascadeError, StorageError)
