"""The sends aggregate: outbound C-STOREs of produced objects to destinations.

A send is ``pending → sent | failed``, one row per (destination, SOP Instance UID).
Sends are not leased: one scheduler at a time sends them — the one holding
``Database.exclusive("sends")``, however many share the database —
(:meth:`Sends.due_sends`, then :meth:`Sends.mark_sent` or :meth:`Sends.mark_send_failed`).

Decisions
---------
Sends
    Retried forever with capped exponential back-off unless the policy sets
    ``send_max_attempts``: a dead PACS delays results, never loses them.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, literal, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage.common import (
    MAX_NAME_CHARS,
    check_int,
    check_relpath,
    check_text,
    check_uid,
    cut_error,
    snapshot,
    snapshot_columns,
)
from storage.errors import SendNotFoundError
from storage.models import SEND_KINDS, SEND_STATES, Send

if TYPE_CHECKING:
    from storage.database import Database

__all__ = ["SendInfo", "Sends", "purge_sent", "recent_errors", "state_counts"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SendInfo:
    """One outbound C-STORE. ``object_path`` is relative to the file store root."""

    send_id: int
    destination: str
    object_path: str
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    kind: str
    state: str
    attempts: int
    next_try_at: dt.datetime
    last_status: int | None
    last_error: str | None
    created_at: dt.datetime
    sent_at: dt.datetime | None


_SEND_INFO = snapshot_columns(SendInfo, Send, send_id="id")


# --------------------------------------------------------------------------- in a session


def state_counts(s: Session) -> dict[str, int]:
    """Sends per state (every state present, 0 when none)."""
    counts = dict.fromkeys(SEND_STATES, 0)
    for state, n in s.execute(select(Send.state, func.count()).group_by(Send.state)):
        counts[state] = n
    return counts


def recent_errors(s: Session, limit: int) -> list[dict[str, Any]]:
    """The last errors of unsent sends, newest first (``status_summary``'s entries)."""
    if not limit:
        return []
    rows = s.execute(
        select(
            literal("send").label("kind"),
            Send.id.label("id"),
            Send.sop_instance_uid.label("uid"),
            Send.state,
            Send.attempts,
            Send.updated_at.label("at"),
            Send.last_error.label("error"),
        )
        .where(Send.last_error.is_not(None), Send.state != "sent")
        .order_by(Send.updated_at.desc(), Send.id.desc())
        .limit(limit)
    )
    return [{**row._asdict(), "at": row.at.isoformat(), "error": row.error[:300]} for row in rows]


def purge_sent(s: Session, cutoff: dt.datetime) -> tuple[set[str], int]:
    """Delete sends ``sent`` before ``cutoff``, in the caller's session.

    Returns the purged objects' paths that no remaining send refers to, and how many
    sends were deleted.
    """
    sends = s.scalars(
        select(Send)
        .where(Send.state == "sent", Send.sent_at < cutoff)
        .with_for_update(skip_locked=True)
    ).all()
    purged = {send.id for send in sends}
    candidates = {send.object_path for send in sends}
    for send in sends:
        s.delete(send)
    s.flush()
    if not candidates:
        return set(), len(purged)
    still_used = set(
        s.scalars(
            select(Send.object_path).where(Send.object_path.in_(candidates), Send.id.not_in(purged))
        )
    )
    return candidates - still_used, len(purged)


def _get(s: Session, send_id: int) -> Send:
    check_int("send_id", send_id, minimum=1)
    send = s.get(Send, send_id, with_for_update=True)
    if send is None:
        raise SendNotFoundError(f"no send with id {send_id}")
    return send


# --------------------------------------------------------------------------- aggregate


class Sends:
    """The sends aggregate of a :class:`~storage.database.Database` (``db.sends``)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def add_send(
        self,
        *,
        destination: str,
        object_path: str | PurePosixPath,
        sop_class_uid: str,
        sop_instance_uid: str,
        study_instance_uid: str,
        kind: str,
        now: dt.datetime | None = None,
    ) -> int:
        """Queue a produced object for C-STORE to a destination, due now.

        Idempotent per (destination, SOP Instance UID): adding it again returns the
        existing send's id and changes nothing.

        Parameters
        ----------
        destination : str
            Configured destination name (up to 128 characters).
        object_path : str
            The object's file, relative to the file store root.
        sop_class_uid, sop_instance_uid, study_instance_uid : str
            The object's UIDs.
        kind : {"cad-sr", "tid1500-sr", "seg", "gsps"}
            What the object is.

        Returns
        -------
        int
            The send id.
        """
        dest = check_text("destination", destination, max_chars=MAX_NAME_CHARS)
        relpath = check_relpath("object_path", object_path)
        sop_class = check_uid("sop_class_uid", sop_class_uid)
        sop = check_uid("sop_instance_uid", sop_instance_uid)
        study = check_uid("study_instance_uid", study_instance_uid)
        if kind not in SEND_KINDS:
            raise ValueError(f"kind must be one of {SEND_KINDS}, got {kind!r}")
        now = self._db.now(now)
        existing_id = select(Send.id).where(Send.destination == dest, Send.sop_instance_uid == sop)
        try:
            with self._db.transaction() as s:
                existing = s.scalar(existing_id)
                if existing is not None:
                    return existing
                send = Send(
                    destination=dest,
                    object_path=relpath,
                    sop_class_uid=sop_class,
                    sop_instance_uid=sop,
                    study_instance_uid=study,
                    kind=kind,
                    state="pending",
                    attempts=0,
                    next_try_at=now,
                    created_at=now,
                    updated_at=now,
                )
                s.add(send)
                s.flush()
                send_id = send.id
        except IntegrityError:
            # Another connection queued the same object for the same destination first
            # (a worker and the scheduler at once, on PostgreSQL): that send is this one.
            with self._db.transaction() as s:
                raced = s.scalar(existing_id)
            if raced is None:
                raise
            return raced
        logger.info("send %d queued: %s %s to %s", send_id, kind, sop, dest)
        return send_id

    def due_sends(
        self,
        *,
        now: dt.datetime | None = None,
        destination: str | None = None,
        limit: int = 100,
    ) -> list[SendInfo]:
        """Pending sends whose time has come, oldest due first.

        Sends are not leased: the scheduler holding ``Database.exclusive("sends")``
        sends them.
        """
        check_int("limit", limit, minimum=1)
        now = self._db.now(now)
        stmt = select(*_SEND_INFO).where(Send.state == "pending", Send.next_try_at <= now)
        if destination is not None:
            dest = check_text("destination", destination, max_chars=MAX_NAME_CHARS)
            stmt = stmt.where(Send.destination == dest)
        with self._db.transaction() as s:
            rows = s.execute(stmt.order_by(Send.next_try_at, Send.id).limit(limit)).all()
        return [snapshot(SendInfo, row) for row in rows]

    def pending_by_destination(self) -> dict[str, int]:
        """How many sends are pending per destination (due or not), for ``status``."""
        with self._db.transaction() as s:
            rows = s.execute(
                select(Send.destination, func.count())
                .where(Send.state == "pending")
                .group_by(Send.destination)
            ).all()
        return {dest: int(n) for dest, n in rows}

    def mark_sent(
        self, send_id: int, *, status: int = 0x0000, now: dt.datetime | None = None
    ) -> None:
        """Record a successful C-STORE (``status`` 0x0000 or a warning 0xB000-0xB007).

        Raises
        ------
        SendNotFoundError
            No such send.
        """
        check_int("status", status, minimum=0)
        now = self._db.now(now)
        with self._db.transaction() as s:
            send = _get(s, send_id)
            send.state = "sent"
            send.attempts += 1
            send.last_status = status
            send.sent_at = now
            send.updated_at = now
        logger.info("send %d done (status 0x%04X)", send_id, status)

    def mark_send_failed(
        self,
        send_id: int,
        *,
        error: str,
        status: int | None = None,
        retry: bool = True,
        now: dt.datetime | None = None,
    ) -> str:
        """Record a failed C-STORE try and schedule the next one.

        The next try is ``policy.send_backoff(attempts)`` later. A send is ``failed``
        only when ``retry`` is false or ``policy.send_max_attempts`` is set and reached.

        Parameters
        ----------
        error : str
            What went wrong (association refused, status text), without patient data.
        status : int or None
            The DIMSE status when the peer answered, None for a network failure.

        Returns
        -------
        str
            The send's new state, ``"pending"`` or ``"failed"``.

        Raises
        ------
        SendNotFoundError
            No such send.
        ValueError
            The send was already sent.
        """
        text = cut_error(error)
        if status is not None:
            check_int("status", status, minimum=0)
        now = self._db.now(now)
        policy = self._db.policy
        limit = policy.send_max_attempts
        with self._db.transaction() as s:
            send = _get(s, send_id)
            if send.state == "sent":
                raise ValueError(f"send_id {send_id} was already sent; it cannot fail now")
            send.attempts += 1
            send.last_error = text
            send.last_status = status
            send.updated_at = now
            if not retry or (limit is not None and send.attempts >= limit):
                send.state = "failed"
                logger.error("send %d failed for good after %d tries", send_id, send.attempts)
            else:
                send.state = "pending"
                send.next_try_at = now + policy.send_backoff(send.attempts)
                logger.warning(
                    "send %d try %d failed, next at %s",
                    send_id,
                    send.attempts,
                    send.next_try_at.isoformat(),
                )
            return send.state

    def retry_send(self, send_id: int, *, now: dt.datetime | None = None) -> None:
        """Admin: make a send pending and due now, with its try count reset.

        Raises
        ------
        SendNotFoundError
            No such send.
        """
        now = self._db.now(now)
        with self._db.transaction() as s:
            send = _get(s, send_id)
            send.state = "pending"
            send.attempts = 0
            send.next_try_at = now
            send.updated_at = now

    def get_send(self, send_id: int) -> SendInfo:
        """Return a snapshot of one send.

        Raises
        ------
        SendNotFoundError
            No such send.
        """
        check_int("send_id", send_id, minimum=1)
        with self._db.transaction() as s:
            row = s.execute(select(*_SEND_INFO).where(Send.id == send_id)).one_or_none()
        if row is None:
            raise SendNotFoundError(f"no send with id {send_id}")
        return snapshot(SendInfo, row)
