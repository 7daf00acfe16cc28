"""Logging for the node's processes: stdout (the journal under systemd), no patient data.

Configured once per process at its entry point (``calcnode serve``, a spawned worker,
every ``calcnode`` command). pynetdicom logs patient identifiers at INFO/DEBUG, so it
is held at its own level. Beyond that, the node cannot vouch for what third-party code
puts into its messages and exceptions — pydicom warns ``Invalid value for VR DA:
'1941-02-03'``, highdicom logs ``value of argument "patient_name" is potentially
invalid: "…"`` and raises ``Unable to convert '1941-02-03' to 'DA' object`` — so every
log record of the process goes through one guard (:func:`install_patient_data_guard`):

* **Patient data out.** Each process remembers the identifying values of the data sets
  it has read (:func:`remember_patient`, called where a data set enters: the SCP's
  header parse, the worker's read, the scheduler's report) and replaces them in every
  record — message, exception text and traceback, stack — at every level, by
  :data:`REDACTED`. The guard is a log *record factory*: it works on the record as it is
  made, before any handler (the node's, pytest's, one an administrator adds) sees it.
  Python warnings are logged (one line each, logger ``py.warnings``) and uncaught
  exceptions (main thread and other threads) are logged rather than printed, so they
  pass the same guard.
* **No forged lines.** Control characters in the message (a newline, an ESC) are
  escaped with :class:`node.server.EscapeControlCharacters`; a traceback keeps its line
  breaks, its other control characters escaped, and every line of it is indented by
  :data:`CONTINUATION`, so no text of a peer's choosing can start a line of its own.

Which values: :data:`PATIENT_KEYWORDS` (names, IDs, birth date and time, other IDs and
names, address, telephone, accession number, physicians' names), also inside
``OtherPatientIDsSequence``; a person name also by each of its components, a date also
in the usual spellings (``19410203``, ``1941-02-03``, …), a long value also by the
prefixes a VR would cut it to (64 and 16 characters). Matching ignores case. Values (or
components) shorter than :data:`MIN_REDACTED_CHARS` characters are not replaced: a
one- or two-character value cannot be told from the rest of a line (``F``, ``12``) and
identifies nobody. The most recent :data:`REMEMBERED_VALUES` values are kept.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any

from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName

from node.server import EscapeControlCharacters
from node.settings import Settings

__all__ = [
    "CONTINUATION",
    "MIN_REDACTED_CHARS",
    "PATIENT_KEYWORDS",
    "REDACTED",
    "REMEMBERED_VALUES",
    "configure_logging",
    "escape_control_characters",
    "forget_patients",
    "install_patient_data_guard",
    "redact",
    "remember_patient",
    "remove_patient_data_guard",
]

_LOG_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"

#: What a patient-identifying value is replaced with in a log record.
REDACTED = "[patient data]"
#: Prefix of every line of a traceback or stack in a log record.
CONTINUATION = "  | "
#: Values (and name components) shorter than this are not replaced (see the module notes).
MIN_REDACTED_CHARS = 3
#: How many distinct values a process keeps (the most recently seen).
REMEMBERED_VALUES = 1024

#: The attributes whose values identify a patient (or a person) and never go in a log.
PATIENT_KEYWORDS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "MedicalRecordLocator",
    "PatientComments",
    "AccessionNumber",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "OperatorsName",
)
#: Sequences whose items hold more of them (Other Patient IDs: PatientID, Issuer).
_PATIENT_SEQUENCES = ("OtherPatientIDsSequence",)
_DATE_KEYWORDS = frozenset({"PatientBirthDate"})
_PREFIXES = (64, 16)  # LO/PN component group, SH: what a VR would cut a long value to

_ESCAPE = EscapeControlCharacters()


def escape_control_characters(text: str) -> str:
    """``text`` with its control characters escaped (``\\n`` → ``\\x0a``), as
    :class:`node.server.EscapeControlCharacters` escapes a log message."""
    # A bare LogRecord, not makeLogRecord: that goes through the record factory (the
    # guard below, which calls this).
    record = logging.LogRecord("", logging.NOTSET, "", 0, text, None, None)
    _ESCAPE.filter(record)
    return str(record.msg)


# --------------------------------------------------------------------------- values


class _PatientValues:
    """The remembered values (thread-safe), and the pattern that finds them."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._values: OrderedDict[str, None] = OrderedDict()  # lower-cased
        self._lock = threading.Lock()
        self._pattern: re.Pattern[str] | None = None
        self._pattern_ignoring_case: re.Pattern[str] | None = None

    def add(self, values: Iterable[str]) -> None:
        with self._lock:
            changed = False
            for value in values:
                key = value.lower()
                if key in self._values:
                    self._values.move_to_end(key)
                    continue
                self._values[key] = None
                changed = True
                while len(self._values) > self._capacity:
                    self._values.popitem(last=False)
            if changed:
                self._pattern = self._pattern_ignoring_case = None

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
            self._pattern = self._pattern_ignoring_case = None

    def _alternatives(self) -> str:
        # Longest first: a whole name is replaced before its components.
        return "|".join(re.escape(v) for v in sorted(self._values, key=len, reverse=True))

    def pattern(self) -> re.Pattern[str] | None:
        """The values, to search for in a lower-cased text (matching without
        IGNORECASE is about ten times faster)."""
        with self._lock:
            if self._pattern is None and self._values:
                self._pattern = re.compile(self._alternatives())
            return self._pattern

    def pattern_ignoring_case(self) -> re.Pattern[str] | None:
        """The values, for a text whose lower-cased form has another length."""
        with self._lock:
            if self._pattern_ignoring_case is None and self._values:
                self._pattern_ignoring_case = re.compile(self._alternatives(), re.IGNORECASE)
            return self._pattern_ignoring_case


_VALUES = _PatientValues(REMEMBERED_VALUES)


def _text_of(value: Any) -> Iterator[str]:
    """The text(s) of an element value as it may appear in a message."""
    if value is None:
        return
    if isinstance(value, bytes | bytearray):
        raw = bytes(value)
        texts = {raw.decode("latin-1"), raw.decode("utf-8", "replace")}
    elif isinstance(value, str | int | float | PersonName):
        texts = {str(value)}  # (a PersonName iterates over its characters)
    elif isinstance(value, Iterable):
        for item in value:
            yield from _text_of(item)
        return
    else:  # PersonName, a date object: their text
        texts = {str(value)}
    for text in texts:
        for part in text.split("\\"):  # several values
            part = part.strip("\x00 ")
            if part:
                yield part


def _variants(text: str, *, date: bool) -> Iterator[str]:
    """``text`` and the other spellings it may be logged in."""
    yield text
    for n in _PREFIXES:
        if len(text) > n:
            yield text[:n]
    if "^" in text or "=" in text:  # a person name: each component alone too
        for group in text.split("="):
            for component in group.split("^"):
                component = component.strip()
                yield component
                for n in _PREFIXES:
                    if len(component) > n:
                        yield component[:n]
    if date:
        digits = re.sub(r"\D", "", text)
        if len(digits) == 8:
            y, m, d = digits[:4], digits[4:6], digits[6:]
            yield from (digits, f"{y}-{m}-{d}", f"{y}/{m}/{d}", f"{d}.{m}.{y}", f"{d}/{m}/{y}")
            yield f"{y}, {int(m)}, {int(d)}"  # datetime.date(1941, 2, 3)


def _element_value(ds: Dataset, keyword: str) -> Any:
    """The value of ``keyword`` without pydicom's conversion (which warns, with the
    value in the warning, about an invalid one); None when absent."""
    if keyword not in ds:
        return None
    elem = ds.get_item(keyword)
    return getattr(elem, "value", None)


def remember_patient(ds: Dataset) -> None:
    """Remember the identifying values of ``ds`` (see :data:`PATIENT_KEYWORDS`), so
    that no later log record of this process shows them.

    Call it as soon as a data set has been read, before anything else looks at it.
    Never raises: a data set it cannot read leaves nothing to remember.

    Parameters
    ----------
    ds : pydicom.Dataset
        A received or stored data set (raw elements are read without conversion).
    """
    found: list[str] = []
    try:
        datasets = [ds]
        for keyword in _PATIENT_SEQUENCES:
            if keyword in ds:
                datasets.extend(item for item in ds[keyword].value if isinstance(item, Dataset))
        for item in datasets:
            for keyword in PATIENT_KEYWORDS:
                date = keyword in _DATE_KEYWORDS
                for text in _text_of(_element_value(item, keyword)):
                    found.extend(
                        v for v in _variants(text, date=date) if len(v) >= MIN_REDACTED_CHARS
                    )
    except Exception:  # a damaged data set: what was found so far is still kept
        pass
    _VALUES.add(found)


def forget_patients() -> None:
    """Forget every remembered value (tests)."""
    _VALUES.clear()


def redact(text: str) -> str:
    """``text`` with every remembered patient value replaced by :data:`REDACTED`.

    For texts that leave the process by another way than a log line, e.g. an error
    stored in the job database and shown by ``calcnode status``.
    """
    pattern = _VALUES.pattern()
    if pattern is None or not text:
        return text
    lowered = text.lower()
    if len(lowered) != len(text):  # a character whose lower case is longer (rare)
        ignoring_case = _VALUES.pattern_ignoring_case()
        return ignoring_case.sub(REDACTED, text) if ignoring_case is not None else text
    parts: list[str] = []
    end = 0
    for match in pattern.finditer(lowered):
        parts += (text[end : match.start()], REDACTED)
        end = match.end()
    return "".join(parts) + text[end:] if parts else text


# --------------------------------------------------------------------------- the guard

_FORMATTER = logging.Formatter()
_GUARDED = "calcnode_guarded"


def _continuation(text: str) -> str:
    """A multi-line text (a traceback) as indented lines, control characters escaped."""
    lines = redact(text).rstrip("\n").split("\n")
    return "\n".join(CONTINUATION + escape_control_characters(line) for line in lines)


def _guard(record: logging.LogRecord) -> logging.LogRecord:
    """Redact and escape one record in place (see the module notes)."""
    if getattr(record, _GUARDED, False):
        return record
    setattr(record, _GUARDED, True)
    try:
        message = record.getMessage()
    except Exception:  # the caller's arguments do not fit its format: keep what we can
        message = f"{record.msg!s} (log arguments that do not fit the message)"
    record.msg, record.args = escape_control_characters(redact(message)), None
    if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
        record.exc_text = _FORMATTER.formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = _continuation(record.exc_text)
    if record.stack_info:
        record.stack_info = _continuation(record.stack_info)
    return record


_factory_lock = threading.Lock()
_previous: dict[str, Any] = {}


def install_patient_data_guard() -> None:
    """Guard every log record of this process (idempotent): patient values redacted,
    control characters escaped, tracebacks indented; warnings and uncaught exceptions
    logged through it. See the module notes."""
    with _factory_lock:
        if _previous:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            return _guard(previous(*args, **kwargs))

        _previous.update(
            factory=previous,
            showwarning=warnings.showwarning,
            excepthook=sys.excepthook,
            threading_excepthook=threading.excepthook,
        )
        logging.setLogRecordFactory(factory)
        warnings.showwarning = _log_warning
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_uncaught_in_thread


def remove_patient_data_guard() -> None:
    """Undo :func:`install_patient_data_guard` (tests); a no-op when not installed."""
    with _factory_lock:
        if not _previous:
            return
        logging.setLogRecordFactory(_previous["factory"])
        warnings.showwarning = _previous["showwarning"]
        sys.excepthook = _previous["excepthook"]
        threading.excepthook = _previous["threading_excepthook"]
        _previous.clear()


def _log_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` as one guarded log line (``logging.captureWarnings``
    would log the source line too, over two lines)."""
    logging.getLogger("py.warnings").warning(
        "%s: %s (%s:%d)", category.__name__, message, filename, lineno
    )


def _log_uncaught(
    kind: type[BaseException], value: BaseException, tb: TracebackType | None
) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    logging.getLogger("node").critical("uncaught exception", exc_info=(kind, value, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("node").critical(
        "uncaught exception in thread %s",
        name,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


def configure_logging(settings: Settings) -> None:
    """Log to stdout (the journal under systemd) at ``logging.level``, guarded.

    A handler is added only when the root logger has none (the CLI may have configured
    one); pynetdicom is held at ``logging.pynetdicom_level`` because it logs patient
    identifiers at INFO/DEBUG; :func:`install_patient_data_guard` keeps patient values
    and control characters out of every record.
    """
    install_patient_data_guard()
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
