"""The node's durable state, opened from its settings: the job database and the file store."""

from __future__ import annotations

from node.settings import Settings
from storage.database import Database, open_database
from storage.errors import DatabaseUnavailableError
from storage.filestore import FileStore
from storage.policy import QueuePolicy

__all__ = ["open_storage", "queue_policy"]


def queue_policy(settings: Settings) -> QueuePolicy:
    """The queue's retry policy from ``worker`` and ``send`` settings."""
    # QueuePolicy wants strictly positive delays; a configured 0 means "at once".
    tiny = 0.001
    job_base = max(settings.worker.retry_backoff_seconds, tiny)
    send_base = max(settings.send.retry_initial_seconds, tiny)
    return QueuePolicy(
        max_attempts=settings.worker.max_attempts,
        retry_base_seconds=job_base,
        retry_cap_seconds=max(job_base, 3600.0),
        send_retry_base_seconds=send_base,
        send_retry_cap_seconds=max(settings.send.retry_max_seconds, send_base),
        send_max_attempts=settings.send.max_attempts,
    )


def open_storage(settings: Settings) -> tuple[Database, FileStore]:
    """Open (creating or migrating) the database and the file store of ``storage``.

    Raises
    ------
    storage.errors.DatabaseUnavailableError
        The database cannot be reached; the message starts with ``storage.database_url``.
    """
    store = FileStore(settings.storage.root, min_free_mb=settings.storage.min_free_mb)
    try:
        database = open_database(settings.storage.database_url, policy=queue_policy(settings))
    except DatabaseUnavailableError as exc:
        raise DatabaseUnavailableError(f"storage.database_url: {exc}") from exc
    return database, store
