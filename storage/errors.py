"""Errors raised by ``storage``.

``storage`` may not import ``cascade``, so it keeps its own root,
:class:`StorageError`; the node maps both hierarchies (for example
:class:`DiskFullError` to the C-STORE status 0xA700 "out of resources").
"""

from __future__ import annotations

__all__ = [
    "DatabaseUnavailableError",
    "DiskFullError",
    "JobNotFoundError",
    "LeaseLostError",
    "SchemaVersionError",
    "SendNotFoundError",
    "StorageError",
    "StudyNotFoundError",
]


class StorageError(Exception):
    """Base class of all errors ``storage`` raises deliberately."""


class DiskFullError(StorageError):
    """Writing would take free space below the configured floor, or the disk ran out.

    Parameters
    ----------
    message : str
        What happened, with the numbers.
    free_bytes : int or None
        Free space on the store's file system when the error was raised, when known.
    required_bytes : int or None
        Free space the operation needed (expected size plus the floor), when known.
    """

    def __init__(
        self,
        message: str,
        *,
        free_bytes: int | None = None,
        required_bytes: int | None = None,
    ) -> None:
        super().__init__(message)
        self.free_bytes = free_bytes
        self.required_bytes = required_bytes


class SchemaVersionError(StorageError):
    """The database has a newer schema than this code, or is not a calcnode database."""


class DatabaseUnavailableError(StorageError):
    """The database cannot be reached or opened at all (server down, a path that cannot
    be opened, no driver for its URL): nothing is wrong with its content."""


class JobNotFoundError(StorageError, LookupError):
    """No job has the given id."""


class SendNotFoundError(StorageError, LookupError):
    """No outbound send has the given id."""


class StudyNotFoundError(StorageError, LookupError):
    """No study has the given Study Instance UID."""


class LeaseLostError(StorageError):
    """The worker no longer holds the job's lease (it expired and was recovered or taken
    over, or the job was re-queued by a changed re-send): its result must be discarded."""
