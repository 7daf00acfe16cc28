"""Argument checks and row snapshots shared by the jobs, studies and sends aggregates.

Snapshots
---------
The public snapshot types (:class:`~storage.jobs.JobInfo`,
:class:`~storage.studies.StudyInfo`, :class:`~storage.sends.SendInfo`, ...) are frozen
dataclasses detached from any session. Instead of copying ORM attributes field by
field, the aggregates *select* exactly the snapshot's fields, each column labelled with
the field's name (:func:`snapshot_columns`), and build the snapshot from the row's
mapping (:func:`snapshot`): SQLAlchemy's ``Row._mapping`` is the mapper.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Row
from sqlalchemy.orm import QueryableAttribute

from storage.models import UID_LENGTH, Base

__all__ = [
    "MAX_ERROR_CHARS",
    "MAX_NAME_CHARS",
    "MAX_PATH_CHARS",
    "check_digest",
    "check_int",
    "check_relpath",
    "check_seconds",
    "check_text",
    "check_time",
    "check_uid",
    "cut_error",
    "headline",
    "snapshot",
    "snapshot_columns",
]

#: Error texts longer than this are cut (the tail is usually a repeated traceback).
MAX_ERROR_CHARS = 4000
#: Longest worker id / destination name stored.
MAX_NAME_CHARS = 128
#: Longest path stored.
MAX_PATH_CHARS = 1024

_HEX = frozenset("0123456789abcdef")
_TRUNCATED = " …[truncated]"

S = TypeVar("S")


# --------------------------------------------------------------------------- checks


def check_time(name: str, value: Any) -> dt.datetime:
    """An aware datetime converted to UTC; a naive one is a :class:`ValueError`."""
    if not isinstance(value, dt.datetime):
        raise TypeError(f"{name} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got naive {value.isoformat()}")
    return value.astimezone(dt.UTC)


def check_uid(name: str, value: Any) -> str:
    """A DICOM UID: 1..64 characters, no whitespace or control characters."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if not value or len(value) > UID_LENGTH:
        raise ValueError(f"{name} must be 1..{UID_LENGTH} characters, got {len(value)}")
    if any(c.isspace() or ord(c) < 32 for c in value):
        raise ValueError(f"{name} must not contain whitespace or control characters")
    return value


def check_text(name: str, value: Any, *, max_chars: int, allow_empty: bool = False) -> str:
    """A str of at most ``max_chars`` characters (non-empty unless ``allow_empty``)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if not value and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    if len(value) > max_chars:
        raise ValueError(f"{name} must be at most {max_chars} characters, got {len(value)}")
    return value


def check_relpath(name: str, value: Any) -> str:
    """A POSIX path relative to the file store root, without ``..``."""
    if isinstance(value, Path | PurePosixPath):
        value = value.as_posix()
    text = check_text(name, value, max_chars=MAX_PATH_CHARS)
    pure = PurePosixPath(text)
    if pure.is_absolute() or ".." in pure.parts or "\\" in text:
        raise ValueError(
            f"{name} must be a path relative to the file store root without '..', got {text!r}"
        )
    return pure.as_posix()


def check_int(name: str, value: Any, *, minimum: int) -> int:
    """An int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_seconds(name: str, value: Any, *, positive: bool = True) -> float:
    """A finite number of seconds, > 0 (or >= 0 when not ``positive``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0 or (positive and seconds == 0):
        kind = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be finite and {kind}, got {value}")
    return seconds


def check_digest(name: str, value: Any) -> str:
    """A SHA-256 digest: 64 lowercase hex digits."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if len(value) != 64 or not set(value) <= _HEX:
        raise ValueError(f"{name} must be 64 lowercase hex digits (SHA-256), got {value!r}")
    return value


def cut_error(error: Any) -> str:
    """An error text cut to :data:`MAX_ERROR_CHARS` characters."""
    if not isinstance(error, str):
        raise TypeError(f"error must be a str, got {type(error).__name__}")
    if len(error) > MAX_ERROR_CHARS:
        return error[: MAX_ERROR_CHARS - len(_TRUNCATED)] + _TRUNCATED
    return error


def headline(error: str) -> str:
    """The first line of an error, short: logs get the gist, the database the whole text."""
    lines = error.splitlines()
    return lines[0][:200] if lines else ""


# --------------------------------------------------------------------------- snapshots


def snapshot_columns(
    cls: type[Any], model: type[Base], **sources: str | ColumnElement[Any] | QueryableAttribute[Any]
) -> tuple[ColumnElement[Any], ...]:
    """The select list that yields the fields of dataclass ``cls`` from ``model``.

    Each field ``f`` is read from the model's attribute of the same name, or from
    ``sources[f]``: another attribute's name (``job_id="id"``) or a SQL expression
    (``version=Study.report_version + 1``); every column is labelled ``f``.
    """
    columns: list[ColumnElement[Any]] = []
    for field in dataclasses.fields(cls):
        source = sources.get(field.name, field.name)
        column = getattr(model, source) if isinstance(source, str) else source
        columns.append(column.label(field.name))
    return tuple(columns)


def snapshot(cls: type[S], row: Row[Any]) -> S:
    """Build ``cls`` from a row selected with :func:`snapshot_columns` (``cls``, ...)."""
    return cls(**row._mapping)
