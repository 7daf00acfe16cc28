"""The typed configuration of the node: defaults, TOML files, environment, command line.

One source of truth: the frozen dataclasses below. Their defaults *are* the defaults;
``config/calcnode.toml`` documents every key with the same values (a test keeps the
two in agreement). :func:`load_settings` layers, lowest precedence first:

1. the dataclass defaults,
2. the configuration file (argument ``config_file``, else ``$CALCNODE_CONFIG``; none →
   defaults only) and then the drop-ins ``<dir of the file>/conf.d/*.toml`` in sorted
   order (a later drop-in wins),
3. the environment: ``CALCNODE_<SECTION>__<KEY>`` (``CALCNODE_NODE__PORT=11113``,
   ``CALCNODE_NODE__TLS__ENABLED=true``) and ``CALCNODE_DESTINATIONS`` (a JSON array),
4. ``overrides`` from the command line (dotted keys ``"node.port"`` or nested dicts).

Every value is checked by the dataclass constructors (types, ranges, AE titles, host
names, output kinds, device); a failure becomes :class:`cascade.errors.ConfigError`
whose message names the key *and* where the value came from (file and section, the
environment variable, or the command-line override).

Scalars merge key by key across layers; ``destinations`` is one value: the last layer
that sets it replaces the whole list.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import logging
import math
import os
import re
import tomllib
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.errors import ConfigError

__all__ = [
    "AE_TITLE_MAX_LENGTH",
    "DEFAULT_CONFIG_PATH",
    "DEVICE_PATTERN",
    "ENV_CONFIG",
    "ENV_DESTINATIONS",
    "ENV_PREFIX",
    "OUTPUT_KINDS",
    "DestinationSettings",
    "LoggingSettings",
    "ModelSettings",
    "NodeSettings",
    "OutputSettings",
    "SchedulerSettings",
    "SendSettings",
    "Settings",
    "StorageSettings",
    "StudySettings",
    "TLSSettings",
    "WorkerSettings",
    "default_config_text",
    "dump_toml",
    "load_settings",
    "log_effective_settings",
]

logger = logging.getLogger(__name__)

#: The four result objects the node can emit (see docs/dicom-outputs.md).
OUTPUT_KINDS: tuple[str, ...] = ("cad-sr", "tid1500-sr", "seg", "gsps")
#: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
AE_TITLE_MAX_LENGTH = 16
LOG_LEVELS: tuple[str, ...] = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

ENV_PREFIX = "CALCNODE_"
#: Names the configuration file when ``load_settings`` gets none.
ENV_CONFIG = "CALCNODE_CONFIG"
#: The destinations as a JSON array of objects (``[{"name": …, "ae_title": …}]``).
ENV_DESTINATIONS = "CALCNODE_DESTINATIONS"

_PACKAGED_DEFAULT = Path(__file__).resolve().parent / "defaults" / "calcnode.toml"
_SOURCE_TREE_DEFAULT = Path(__file__).resolve().parent.parent / "config" / "calcnode.toml"
#: The documented default file: the copy packaged in ``node/defaults/`` if the build
#: put one there, else ``config/calcnode.toml`` of a source checkout, else ``None``
#: (then :func:`default_config_text` renders the defaults instead).
DEFAULT_CONFIG_PATH: Path | None = next(
    (p for p in (_PACKAGED_DEFAULT, _SOURCE_TREE_DEFAULT) if p.is_file()), None
)

_HOSTNAME = re.compile(
    r"(?=.{1,253}\.?$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?"
)
_DESTINATION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_URL_PASSWORD = re.compile(r"(://[^:/@]*:)[^@/]*@")


# --------------------------------------------------------------------------- validation
class _FieldError(ValueError):
    """A ``ValueError`` that remembers which field it is about, for the loader's message."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.field = name
        self.problem = message


class _FieldTypeError(_FieldError, TypeError):
    """A wrong type; still a ``ValueError`` subclass so callers can catch one class."""


# Kinds of field a TOML file can hold; derived from the type hints below.
_STR, _INT, _FLOAT, _BOOL, _PATH, _OPT_PATH, _STRS = (
    "string",
    "integer",
    "number",
    "boolean",
    "path",
    "path or empty",
    "list of strings",
)
_HINT_KINDS: dict[Any, str] = {
    str: _STR,
    int: _INT,
    float: _FLOAT,
    bool: _BOOL,
    Path: _PATH,
    Path | None: _OPT_PATH,
    tuple[str, ...]: _STRS,
}


_KINDS_CACHE: dict[type, dict[str, Any]] = {}


def _field_kinds(cls: type) -> dict[str, Any]:
    """Field name → kind string, or the nested dataclass for a sub-table."""
    if cls in _KINDS_CACHE:
        return _KINDS_CACHE[cls]
    hints = typing.get_type_hints(cls)
    kinds: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            kinds[f.name] = hint
        elif hint in _HINT_KINDS:
            kinds[f.name] = _HINT_KINDS[hint]
    _KINDS_CACHE[cls] = kinds
    return kinds


def _type_name(value: object) -> str:
    return type(value).__name__


def _coerce(kind: str, value: Any, name: str) -> Any:
    """Check (and normalise) one value already of a Python/TOML type."""
    if kind == _STR:
        if not isinstance(value, str):
            raise _FieldTypeError(name, f"must be a string, got {_type_name(value)} {value!r}")
        return value
    if kind == _BOOL:
        if not isinstance(value, bool):
            raise _FieldTypeError(name, f"must be true or false, got {_type_name(value)} {value!r}")
        return value
    if kind == _INT:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _FieldTypeError(name, f"must be an integer, got {_type_name(value)} {value!r}")
        return value
    if kind == _FLOAT:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _FieldTypeError(name, f"must be a number, got {_type_name(value)} {value!r}")
        if not math.isfinite(value):
            raise _FieldError(name, f"must be a finite number, got {value!r}")
        return float(value)
    if kind in (_PATH, _OPT_PATH):
        if value is None or value == "":
            if kind == _OPT_PATH:
                return None
            raise _FieldError(name, "must not be empty")
        if not isinstance(value, str | os.PathLike):
            raise _FieldTypeError(name, f"must be a path string, got {_type_name(value)} {value!r}")
        return Path(value).expanduser()
    if kind == _STRS:
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise _FieldTypeError(
                name, f"must be a list of strings, got {_type_name(value)} {value!r}"
            )
        bad = [v for v in value if not isinstance(v, str)]
        if bad:
            raise _FieldTypeError(name, f"must be a list of strings, contains {bad[0]!r}")
        return tuple(value)
    raise AssertionError(f"unknown field kind {kind!r}")  # a bug in this module, not input


def _parse_text(kind: str, text: str, name: str) -> Any:
    """Parse a string from the environment or the command line into a field's type."""
    stripped = text.strip()
    if kind in (_STR, _PATH, _OPT_PATH):
        return text
    if kind == _BOOL:
        lowered = stripped.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise _FieldTypeError(name, f"must be true/false/1/0/yes/no/on/off, got {text!r}")
    if kind == _INT:
        try:
            return int(stripped)
        except ValueError:
            raise _FieldTypeError(name, f"must be an integer, got {text!r}") from None
    if kind == _FLOAT:
        try:
            return float(stripped)
        except ValueError:
            raise _FieldTypeError(name, f"must be a number, got {text!r}") from None
    if kind == _STRS:
        if stripped.startswith("["):
            try:
                parsed = json.loads(stripped)
            except json.JSONDecodeError as exc:
                raise _FieldTypeError(name, f"is not a valid JSON array: {exc}") from None
            return _coerce(_STRS, parsed, name)
        return [part.strip() for part in stripped.split(",") if part.strip()]
    raise AssertionError(f"unknown field kind {kind!r}")


def _coerce_fields(obj: object) -> None:
    """Type-check and normalise every field of a frozen dataclass instance in place."""
    for name, kind in _field_kinds(type(obj)).items():
        value = getattr(obj, name)
        if isinstance(kind, type):
            if not isinstance(value, kind):
                raise _FieldTypeError(
                    name, f"must be a {kind.__name__}, got {_type_name(value)} {value!r}"
                )
            continue
        object.__setattr__(obj, name, _coerce(kind, value, name))


def _check_ae_title(value: str, name: str) -> None:
    if not value.strip():
        raise _FieldError(name, "an AE title must not be empty")
    if len(value) > AE_TITLE_MAX_LENGTH:
        raise _FieldError(
            name, f"an AE title has at most {AE_TITLE_MAX_LENGTH} characters, got {value!r}"
        )
    if any(not (0x20 <= ord(c) <= 0x7E) for c in value):
        raise _FieldError(name, f"an AE title must be printable ASCII, got {value!r}")
    if "\\" in value:
        raise _FieldError(name, f"an AE title must not contain a backslash, got {value!r}")
    if value != value.strip():
        raise _FieldError(
            name, f"an AE title must not start or end with spaces (they are padding), got {value!r}"
        )


def _check_host(value: str, name: str) -> None:
    try:
        ipaddress.ip_address(value)
        return
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(value):
        raise _FieldError(name, f"must be an IP address or a host name, got {value!r}")


def _check_port(value: int, name: str) -> None:
    if not 1 <= value <= 65535:
        raise _FieldError(name, f"must be a TCP port between 1 and 65535, got {value}")


def _check_min(value: float, name: str, minimum: float, *, strict: bool = False) -> None:
    if value < minimum or (strict and value == minimum):
        relation = "greater than" if strict else "at least"
        raise _FieldError(name, f"must be {relation} {minimum:g}, got {value:g}")


def _check_kinds(kinds: tuple[str, ...], name: str, allowed: Iterable[str] = OUTPUT_KINDS) -> None:
    allowed = tuple(allowed)
    unknown = [k for k in kinds if k not in allowed]
    if unknown:
        raise _FieldError(
            name, f"unknown output kind {unknown[0]!r}; choose from {', '.join(allowed)}"
        )
    duplicates = sorted({k for k in kinds if kinds.count(k) > 1})
    if duplicates:
        raise _FieldError(name, f"lists {duplicates[0]!r} more than once")


# --------------------------------------------------------------------------- dataclasses
@dataclass(frozen=True, slots=True, kw_only=True)
class TLSSettings:
    """TLS on the listening port (DICOM over TLS, PS3.15 B.1); off by default.

    Parameters
    ----------
    enabled : bool
        Accept only TLS associations on ``node.port``.
    cert_file, key_file : Path or None
        PEM certificate chain and private key of the node; required when enabled.
    ca_file : Path or None
        PEM bundle of the CAs whose client certificates are trusted.
    require_client_cert : bool
        Mutual TLS: refuse peers without a certificate signed by ``ca_file``.
    """

    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    require_client_cert: bool = False

    def __post_init__(self) -> None:
        _coerce_fields(self)
        if self.enabled:
            for name in ("cert_file", "key_file"):
                if getattr(self, name) is None:
                    raise _FieldError(name, "is required when TLS is enabled")
        if self.require_client_cert:
            if not self.enabled:
                raise _FieldError("require_client_cert", "needs enabled = true")
            if self.ca_file is None:
                raise _FieldError("ca_file", "is required when require_client_cert is true")


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeSettings:
    """The listening DICOM application entity (the C-STORE / C-ECHO SCP).

    Parameters
    ----------
    ae_title : str
        Our AE title (≤ 16 printable ASCII characters, no backslash).
    host : str
        Address to listen on (``0.0.0.0`` all IPv4, ``::`` all IPv6).
    port : int
        TCP port (104 needs CAP_NET_BIND_SERVICE).
    allowed_calling_aets : tuple of str
        Calling AE titles that may associate; empty = any.
    allowed_hosts : tuple of str
        Peer IP addresses or networks (CIDR) that may associate; empty = any.
    max_associations : int
        Concurrent associations; more are rejected (transient).
    require_called_aet : bool
        Reject associations whose called AE title is not ``ae_title``.
    acse_timeout_seconds, dimse_timeout_seconds, network_timeout_seconds : float
        Association negotiation, DIMSE message and idle-connection timeouts.
    tls : TLSSettings
        Optional TLS.
    """

    ae_title: str = "CALCNODE"
    host: str = "0.0.0.0"
    port: int = 11112
    allowed_calling_aets: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    max_associations: int = 10
    require_called_aet: bool = True
    acse_timeout_seconds: float = 30.0
    dimse_timeout_seconds: float = 60.0
    network_timeout_seconds: float = 60.0
    tls: TLSSettings = field(default_factory=TLSSettings)

    def __post_init__(self) -> None:
        _coerce_fields(self)
        _check_ae_title(self.ae_title, "ae_title")
        _check_host(self.host, "host")
        _check_port(self.port, "port")
        for aet in self.allowed_calling_aets:
            _check_ae_title(aet, "allowed_calling_aets")
        for entry in self.allowed_hosts:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise _FieldError(
                    "allowed_hosts",
                    f"entries are IP addresses or networks such as 10.0.0.0/8, got {entry!r}",
                ) from None
        _check_min(self.max_associations, "max_associations", 1)
        for name in ("acse_timeout_seconds", "dimse_timeout_seconds", "network_timeout_seconds"):
            _check_min(getattr(self, name), name, 0, strict=True)

    @property
    def allowed_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """``allowed_hosts`` parsed (a single address is a /32 or /128 network)."""
        return tuple(ipaddress.ip_network(h, strict=False) for h in self.allowed_hosts)


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageSettings:
    """Where received images, results and the job database live.

    Parameters
    ----------
    root : Path
        Folder of the file store; the default SQLite database lives here too.
    database_url : str
        SQLAlchemy URL; empty means ``sqlite:///<root>/calcnode.db`` (filled in by the
        constructor, so the field always holds the effective URL).
    min_free_mb : int
        Refuse incoming images (status 0xA700) when less disk space is free (MiB).
    retention_days : int
        Delete studies (images, results, rows) this many days after completion;
        0 keeps everything.
    """

    root: Path = Path("/var/lib/calcnode")
    database_url: str = ""
    min_free_mb: int = 512
    retention_days: int = 30

    def __post_init__(self) -> None:
        _coerce_fields(self)
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite:///{self.root}/calcnode.db")
        elif not _URL_SCHEME.match(self.database_url):
            raise _FieldError(
                "database_url",
                "must be an SQLAlchemy URL such as sqlite:////var/lib/calcnode/calcnode.db, "
                f"got {_redact_url(self.database_url)!r}",
            )
        _check_min(self.min_free_mb, "min_free_mb", 0)
        _check_min(self.retention_days, "retention_days", 0)


@dataclass(frozen=True, slots=True, kw_only=True)
class StudySettings:
    """When a study counts as complete (there is no end-of-study signal in DICOM).

    Parameters
    ----------
    quiet_seconds : float
        A study is complete this many seconds after its last received image
        (a sliding window: each new image restarts it).
    """

    quiet_seconds: float = 30.0

    def __post_init__(self) -> None:
        _coerce_fields(self)
        _check_min(self.quiet_seconds, "quiet_seconds", 0)


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputSettings:
    """Which result objects to create per study.

    Parameters
    ----------
    kinds : tuple of str
        Non-empty subset of ``cad-sr`` (Mammography CAD SR, TID 4000), ``tid1500-sr``
        (measurement report for OHIF), ``seg`` (binary segmentation), ``gsps``
        (presentation state with circles).
    legacy_srt_codes : bool
        Use the retired SRT codes (F-01775/F-01776) instead of SNOMED CT for
        calcification concepts, for old workstations.
    """

    kinds: tuple[str, ...] = OUTPUT_KINDS
    legacy_srt_codes: bool = False

    def __post_init__(self) -> None:
        _coerce_fields(self)
        if not self.kinds:
            raise _FieldError("kinds", "needs at least one output kind")
        _check_kinds(self.kinds, "kinds")


@dataclass(frozen=True, slots=True, kw_only=True)
class DestinationSettings:
    """A peer that receives our results by C-STORE.

    Parameters
    ----------
    name : str
        Unique short name (letters, digits, ``_ . -``), used in logs and the database.
    ae_title : str
        The peer's (called) AE title.
    host : str
        The peer's IP address or host name.
    port : int
        The peer's port.
    kinds : tuple of str
        Output kinds to send there; empty = every kind in ``outputs.kinds``.
    """

    name: str
    ae_title: str
    host: str
    port: int = 104
    kinds: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _coerce_fields(self)
        if not _DESTINATION_NAME.fullmatch(self.name):
            raise _FieldError(
                "name",
                "must be 1–64 letters, digits, '_', '.' or '-' starting with a letter or "
                f"digit, got {self.name!r}",
            )
        _check_ae_title(self.ae_title, "ae_title")
        _check_host(self.host, "host")
        _check_port(self.port, "port")
        _check_kinds(self.kinds, "kinds")


#: Values of ``model.operating_point``.
OPERATING_POINTS = ("calibrated", "all")


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSettings:
    """The detector's weights and where it runs.

    Parameters
    ----------
    path : Path or None
        A checkpoint file; ``None`` (empty in TOML) = the weights bundled with calcnode.
    device : str
        ``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
    torch_threads : int
        CPU threads per worker process for torch; 0 = torch's default.
    operating_point : str
        ``calibrated``: report what the weights' ``weights.json`` operating point keeps
        (FPR decision plus a score threshold chosen on validation images; without one,
        the FPR decision alone); ``all``: every scored candidate.
    max_findings : int
        At most this many findings per image, highest scores first; 0 = no limit.
    """

    path: Path | None = None
    device: str = "auto"
    torch_threads: int = 0
    operating_point: str = "calibrated"
    max_findings: int = 0

    def __post_init__(self) -> None:
        _coerce_fields(self)
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise _FieldError("device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        _check_min(self.torch_threads, "torch_threads", 0)
        if self.operating_point not in OPERATING_POINTS:
            raise _FieldError(
                "operating_point",
                f"must be {' or '.join(OPERATING_POINTS)}, got {self.operating_point!r}",
            )
        _check_min(self.max_findings, "max_findings", 0)


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSettings:
    """The processes that run the detector on queued images.

    Parameters
    ----------
    count : int
        Worker processes that ``calcnode serve`` starts itself; 0 when workers run
        as separate ``calcnode-worker@N`` units (or ``calcnode worker`` processes).
    lease_seconds : float
        A claimed job belongs to its worker this long (renewed while it runs); an
        expired lease (crashed worker) returns the job to the queue.
    max_attempts : int
        Attempts per image before the job is marked failed.
    retry_backoff_seconds : float
        Delay before the second attempt; doubles with each further attempt.
    poll_seconds : float
        How often an idle worker looks for work.
    """

    count: int = 1
    lease_seconds: float = 600.0
    max_attempts: int = 3
    retry_backoff_seconds: float = 60.0
    poll_seconds: float = 2.0

    def __post_init__(self) -> None:
        _coerce_fields(self)
        _check_min(self.count, "count", 0)
        _check_min(self.lease_seconds, "lease_seconds", 0, strict=True)
        _check_min(self.max_attempts, "max_attempts", 1)
        _check_min(self.retry_backoff_seconds, "retry_backoff_seconds", 0)
        _check_min(self.poll_seconds, "poll_seconds", 0, strict=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class SendSettings:
    """C-STORE of results to the destinations, with bounded retries.

    Parameters
    ----------
    retry_initial_seconds : float
        Delay after the first failed send; doubles per failure …
    retry_max_seconds : float
        … up to this delay.
    max_attempts : int
        Attempts per object and destination before the send is marked failed
        (no endless loops on a peer that refuses an object).
    timeout_seconds : float
        Association, DIMSE and network timeout of an outgoing association.
    """

    retry_initial_seconds: float = 30.0
    retry_max_seconds: float = 3600.0
    max_attempts: int = 10
    timeout_seconds: float = 60.0

    def __post_init__(self) -> None:
        _coerce_fields(self)
        _check_min(self.retry_initial_seconds, "retry_initial_seconds", 0)
        if self.retry_max_seconds < self.retry_initial_seconds:
            raise _FieldError(
                "retry_max_seconds",
                f"must be at least retry_initial_seconds ({self.retry_initial_seconds:g}), "
                f"got {self.retry_max_seconds:g}",
            )
        _check_min(self.max_attempts, "max_attempts", 1)
        _check_min(self.timeout_seconds, "timeout_seconds", 0, strict=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerSettings:
    """Intervals of the periodic jobs in ``calcnode serve`` (APScheduler).

    Parameters
    ----------
    study_check_seconds : float
        Look for studies that have gone quiet (so completion lags by at most this).
    send_check_seconds : float
        Look for sends that are due (new or retry).
    lease_check_seconds : float
        Return jobs with expired leases to the queue.
    retention_check_seconds : float
        Purge studies older than ``storage.retention_days``.
    """

    study_check_seconds: float = 5.0
    send_check_seconds: float = 10.0
    lease_check_seconds: float = 60.0
    retention_check_seconds: float = 3600.0

    def __post_init__(self) -> None:
        _coerce_fields(self)
        for f in dataclasses.fields(self):
            _check_min(getattr(self, f.name), f.name, 0, strict=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class LoggingSettings:
    """Log levels (logs go to stdout, i.e. the journal under systemd).

    Parameters
    ----------
    level : str
        Level of calcnode's own loggers: DEBUG, INFO, WARNING, ERROR, CRITICAL.
    pynetdicom_level : str
        Level of the ``pynetdicom`` logger; keep WARNING or above in production,
        pynetdicom logs patient identifiers at INFO/DEBUG.
    """

    level: str = "INFO"
    pynetdicom_level: str = "WARNING"

    def __post_init__(self) -> None:
        _coerce_fields(self)
        for name in ("level", "pynetdicom_level"):
            value = getattr(self, name).upper()
            if value not in LOG_LEVELS:
                raise _FieldError(
                    name, f"must be one of {', '.join(LOG_LEVELS)}, got {getattr(self, name)!r}"
                )
            object.__setattr__(self, name, value)


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """The whole, validated configuration of a node (immutable).

    ``Settings()`` is the default configuration. ``sources`` lists the files,
    environment variables and overrides that contributed, for the start-up log; it
    takes no part in equality.
    """

    node: NodeSettings = field(default_factory=NodeSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    study: StudySettings = field(default_factory=StudySettings)
    outputs: OutputSettings = field(default_factory=OutputSettings)
    destinations: tuple[DestinationSettings, ...] = ()
    model: ModelSettings = field(default_factory=ModelSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    send: SendSettings = field(default_factory=SendSettings)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    sources: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        _coerce_fields(self)
        if not isinstance(self.destinations, list | tuple):
            raise _FieldTypeError("destinations", "must be a list of DestinationSettings")
        destinations = tuple(self.destinations)
        object.__setattr__(self, "destinations", destinations)
        seen: set[str] = set()
        for index, dest in enumerate(destinations):
            if not isinstance(dest, DestinationSettings):
                raise _FieldTypeError(
                    f"destinations[{index}]",
                    f"must be a DestinationSettings, got {_type_name(dest)}",
                )
            if dest.name in seen:
                raise _FieldError(
                    f"destinations[{index}].name", f"duplicate destination name {dest.name!r}"
                )
            seen.add(dest.name)
            if dest.kinds:
                try:
                    _check_kinds(dest.kinds, "kinds", self.outputs.kinds)
                except _FieldError as exc:
                    raise _FieldError(
                        f"destinations[{index}].kinds",
                        f"{exc.problem} (outputs.kinds enables only these)",
                    ) from None
        object.__setattr__(self, "sources", tuple(str(s) for s in self.sources))

    def destination_kinds(self, destination: DestinationSettings) -> tuple[str, ...]:
        """The output kinds sent to ``destination`` (its own list, else all enabled)."""
        return destination.kinds or self.outputs.kinds

    def as_dict(self) -> dict[str, Any]:
        """The configuration as plain JSON-compatible data (paths as strings, lists).

        ``sources`` is left out; ``None`` paths stay ``None``.
        """
        return {
            f.name: _plain(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name != "sources"
        }

    def redacted(self) -> dict[str, Any]:
        """:meth:`as_dict` safe to log: a password in ``storage.database_url`` is masked.

        There are no other secrets in the configuration (TLS key *paths* are fine).
        """
        data = self.as_dict()
        data["storage"]["database_url"] = _redact_url(data["storage"]["database_url"])
        return data


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _redact_url(url: str) -> str:
    return _URL_PASSWORD.sub(r"\1***@", url)


# Top-level tables of the file and the class of each; ``destinations`` is special.
_SECTIONS: dict[str, type] = {
    "node": NodeSettings,
    "storage": StorageSettings,
    "study": StudySettings,
    "outputs": OutputSettings,
    "model": ModelSettings,
    "worker": WorkerSettings,
    "send": SendSettings,
    "scheduler": SchedulerSettings,
    "logging": LoggingSettings,
}
_DESTINATIONS = "destinations"


# --------------------------------------------------------------------------- loading
class _Layers:
    """Raw values per dotted key (``node.tls.enabled``) and where each came from."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.origins: dict[str, str] = {}
        self.sources: list[str] = []
        self.changed: list[str] = []  # keys set since the caller last cleared it

    def set(self, key: str, value: Any, origin: str) -> None:
        self.values[key] = value
        self.origins[key] = origin
        self.changed.append(key)

    def origin(self, key: str) -> str:
        """Where ``key`` was set; for an unset key, where its table was last touched."""
        if key in self.origins:
            return self.origins[key]
        table = key.rsplit(".", 1)[0] + "."
        near = [o for k, o in self.origins.items() if k.startswith(table)]
        return near[-1] if near else "the built-in default"


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _walk_table(
    cls: type | None,
    table: Mapping[str, Any],
    prefix: str,
    layers: _Layers,
    source: str,
    origin_of: typing.Callable[[str], str],
) -> None:
    """Record the keys of a (nested) table of a file or of the overrides.

    ``cls`` is the dataclass the table maps to (``None`` = the top level); ``source``
    names the file (or the overrides) in messages, ``origin_of(table)`` is recorded as
    the origin of each key of that table.
    """
    for key, value in table.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if cls is None:
            if key == _DESTINATIONS:
                layers.set(_DESTINATIONS, value, origin_of(""))
                continue
            sub = _SECTIONS.get(key)
            if sub is None:
                raise ConfigError(
                    f"unknown section [{key}] in {source}"
                    f"{_suggest(key, [*_SECTIONS, _DESTINATIONS])}"
                )
        else:
            kinds = _field_kinds(cls)
            if key not in kinds:
                raise ConfigError(
                    f"unknown key {key!r} in section [{prefix}] of {source}"
                    f"{_suggest(key, kinds)}; known keys: {', '.join(kinds)}"
                )
            sub = kinds[key] if isinstance(kinds[key], type) else None
            if sub is None:
                if isinstance(value, Mapping):
                    raise ConfigError(
                        f"{dotted}: is a setting ({kinds[key]}), not a table ({origin_of(prefix)})"
                    )
                layers.set(dotted, value, origin_of(prefix))
                continue
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"{dotted}: must be a table [{dotted}], got {_type_name(value)} {value!r} "
                f"({origin_of(prefix)})"
            )
        _walk_table(sub, value, dotted, layers, source, origin_of)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration file: {exc.strerror}") from None


def _resolve_path(value: Any, base: Path | None) -> Any:
    """Expand ``~``; make a relative path absolute (against the file's folder or cwd)."""
    if not isinstance(value, str) or value == "":
        return value
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = (base if base is not None else Path.cwd()) / path
    return str(path)


def _resolve_paths(layers: _Layers, keys: Iterable[str], base: Path | None) -> None:
    for key in keys:
        kind = _kind_of(key)
        if kind in (_PATH, _OPT_PATH):
            layers.values[key] = _resolve_path(layers.values[key], base)


def _kind_of(dotted: str) -> Any:
    """The field kind of a dotted key, or ``None`` if there is no such key."""
    parts = dotted.split(".")
    cls: Any = _SECTIONS.get(parts[0])
    for part in parts[1:]:
        if not isinstance(cls, type):
            return None
        cls = _field_kinds(cls).get(part)
    return cls if parts[1:] else None


def _apply_file(path: Path, layers: _Layers) -> None:
    data = _read_toml(path)
    layers.changed = []
    _walk_table(
        None,
        data,
        "",
        layers,
        str(path),
        lambda prefix: f"{path}, section [{prefix}]" if prefix else str(path),
    )
    _resolve_paths(layers, layers.changed, path.parent)
    if _DESTINATIONS in layers.changed:
        layers.values[_DESTINATIONS] = _resolve_destination_file(
            layers.values[_DESTINATIONS], str(path)
        )
    layers.sources.append(str(path))


def _resolve_destination_file(value: Any, origin: str) -> Any:
    if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
        raise ConfigError(
            f"destinations: must be an array of tables ([[destinations]]), got "
            f"{_type_name(value)} ({origin})"
        )
    return value


def _apply_environment(environ: Mapping[str, str], layers: _Layers) -> None:
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG:
            continue
        text = environ[name]
        origin = f"environment variable {name}"
        if name == ENV_DESTINATIONS:
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{origin}: not a valid JSON array of objects: {exc}") from None
            if not isinstance(parsed, list) or not all(isinstance(v, dict) for v in parsed):
                raise ConfigError(
                    f'{origin}: must be a JSON array of objects such as [{{"name": "pacs", '
                    f'"ae_title": "PACS", "host": "10.0.0.5", "port": 104}}]'
                )
            layers.set(_DESTINATIONS, parsed, origin)
            layers.sources.append(name)
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        dotted = ".".join(parts)
        kind = _kind_of(dotted)
        if kind is None or isinstance(kind, type) or not all(parts):
            raise ConfigError(_unknown_env_message(name, parts))
        try:
            value = _parse_text(kind, text, parts[-1])
        except _FieldError as exc:
            raise ConfigError(f"{dotted}: {exc.problem} ({origin})") from None
        layers.set(
            dotted, _resolve_path(value, None) if kind in (_PATH, _OPT_PATH) else value, origin
        )
        layers.sources.append(name)


def _all_env_names() -> list[str]:
    names = [ENV_CONFIG, ENV_DESTINATIONS]

    def walk(cls: type, prefix: list[str]) -> None:
        for key, kind in _field_kinds(cls).items():
            if isinstance(kind, type):
                walk(kind, [*prefix, key])
            else:
                names.append(ENV_PREFIX + "__".join([*prefix, key]).upper())

    for section, cls in _SECTIONS.items():
        walk(cls, [section])
    return names


def _unknown_env_message(name: str, parts: list[str]) -> str:
    hint = _suggest(name, _all_env_names())
    if parts and parts[0] not in _SECTIONS:
        what = f"there is no section [{parts[0]}]"
    elif isinstance(_kind_of(".".join(parts)), type) or len(parts) == 1:
        what = f"[{'.'.join(parts)}] is a table; name one of its keys"
    else:
        what = f"no such setting {'.'.join(parts)}"
    return (
        f"unknown environment variable {name}: {what}{hint}. Settings are "
        f"{ENV_PREFIX}<SECTION>__<KEY>, e.g. {ENV_PREFIX}NODE__PORT"
    )


def _apply_overrides(overrides: Mapping[str, Any], layers: _Layers) -> None:
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:  # an option the user did not give
            continue
        for part in reversed(str(key).split(".")):
            value = {part: value}
        _deep_merge(nested, _drop_none(value), str(key))
    layers.changed = []
    _walk_table(
        None,
        nested,
        "",
        layers,
        "the command-line overrides",
        lambda prefix: f"command-line override{' ' + prefix if prefix else ''}",
    )
    for key in layers.changed:
        layers.origins[key] = f"command-line override {key}"
        kind = _kind_of(key)
        value = layers.values[key]
        if isinstance(value, str) and kind not in (None, _STR, _PATH, _OPT_PATH):
            try:
                value = _parse_text(kind, value, key.rsplit(".", 1)[-1])
            except _FieldError as exc:
                raise ConfigError(f"{key}: {exc.problem} (command-line override {key})") from None
        if kind in (_PATH, _OPT_PATH):
            value = _resolve_path(str(value) if isinstance(value, os.PathLike) else value, None)
        layers.values[key] = value
        layers.sources.append(f"--{key}")


def _deep_merge(target: dict[str, Any], update: Mapping[str, Any], key: str) -> None:
    for name, value in update.items():
        current = target.get(name)
        if isinstance(current, dict) and isinstance(value, Mapping):
            _deep_merge(current, value, key)
        elif name in target and (isinstance(current, dict) or isinstance(value, Mapping)):
            raise ConfigError(f"command-line override {key}: conflicts with another override")
        else:
            target[name] = value


def _drop_none(table: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: (_drop_none(v) if isinstance(v, Mapping) else v)
        for k, v in table.items()
        if v is not None
    }


def _build(cls: type, prefix: str, layers: _Layers) -> Any:
    """Construct ``cls`` from the layered values under ``prefix``; map errors to origins."""
    kwargs: dict[str, Any] = {}
    for key, kind in _field_kinds(cls).items():
        dotted = f"{prefix}.{key}"
        if isinstance(kind, type):
            kwargs[key] = _build(kind, dotted, layers)
        elif dotted in layers.values:
            kwargs[key] = layers.values[dotted]
    try:
        return cls(**kwargs)
    except _FieldError as exc:
        dotted = f"{prefix}.{exc.field}"
        raise ConfigError(f"{dotted}: {exc.problem} (from {layers.origin(dotted)})") from None


def _build_destinations(layers: _Layers) -> tuple[DestinationSettings, ...]:
    raw = layers.values.get(_DESTINATIONS, [])
    origin = layers.origin(_DESTINATIONS)
    if not isinstance(raw, list | tuple):
        raise ConfigError(
            f"destinations: must be a list of tables, got {_type_name(raw)} (from {origin})"
        )
    kinds = _field_kinds(DestinationSettings)
    required = [
        f.name for f in dataclasses.fields(DestinationSettings) if f.default is dataclasses.MISSING
    ]
    result = []
    for index, entry in enumerate(raw):
        label = f"destinations[{index}]"
        if isinstance(entry, DestinationSettings):
            result.append(entry)
            continue
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{label}: must be a table, got {_type_name(entry)} (from {origin})")
        for key in entry:
            if key not in kinds:
                raise ConfigError(
                    f"unknown key {key!r} in {label} (from {origin}){_suggest(key, kinds)}; "
                    f"known keys: {', '.join(kinds)}"
                )
        missing = [k for k in required if k not in entry]
        if missing:
            raise ConfigError(f"{label}: missing required key {missing[0]!r} (from {origin})")
        values = dict(entry)
        from_text = origin.startswith("environment") or origin.startswith("command-line")
        for key, value in values.items():
            kind = kinds[key]
            if from_text and isinstance(value, str) and kind != _STR:
                try:
                    values[key] = _parse_text(kind, value, key)
                except _FieldError as exc:
                    raise ConfigError(f"{label}.{key}: {exc.problem} (from {origin})") from None
        try:
            result.append(DestinationSettings(**values))
        except _FieldError as exc:
            raise ConfigError(f"{label}.{exc.field}: {exc.problem} (from {origin})") from None
    return tuple(result)


def _check_files(settings: Settings, layers: _Layers) -> None:
    """Files the node will open must exist: fail at start-up, not on first use."""
    tls = settings.node.tls
    candidates: list[tuple[str, Path | None]] = [("model.path", settings.model.path)]
    if tls.enabled:
        candidates += [
            ("node.tls.cert_file", tls.cert_file),
            ("node.tls.key_file", tls.key_file),
            ("node.tls.ca_file", tls.ca_file),
        ]
    for key, path in candidates:
        if path is not None and not path.is_file():
            raise ConfigError(f"{key}: no such file {path} (from {layers.origin(key)})")


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Load, merge and validate the configuration.

    Parameters
    ----------
    config_file : str or path-like, optional
        The TOML file; when omitted, ``$CALCNODE_CONFIG`` if set, else none (defaults
        only). Drop-ins ``conf.d/*.toml`` next to the file are applied after it, in
        sorted order. A relative path *inside* a file is relative to that file's folder.
    environ : mapping, optional
        The environment to read ``CALCNODE_*`` variables from; default ``os.environ``.
        Pass ``{}`` to ignore the environment (tests).
    overrides : mapping, optional
        Command-line values: dotted keys (``{"node.port": 11113}``) or nested tables
        (``{"node": {"port": 11113}}``); strings are parsed like environment values;
        ``None`` values are skipped (an option that was not given).

    Returns
    -------
    Settings
        The validated configuration; ``sources`` lists what contributed.

    Raises
    ------
    ConfigError
        A missing explicit file, invalid TOML, an unknown section/key/variable, a wrong
        type or an invalid value; the message names the key and its source.
    """
    env = os.environ if environ is None else environ
    layers = _Layers()
    if config_file is None and env.get(ENV_CONFIG):
        config_file = env[ENV_CONFIG]
    if config_file is not None:
        path = Path(config_file).expanduser()
        if not path.is_file():
            reason = "is a directory" if path.is_dir() else "does not exist"
            raise ConfigError(f"configuration file {path} {reason}")
        _apply_file(path, layers)
        dropins = path.parent / "conf.d"
        if dropins.is_dir():
            for dropin in sorted(dropins.glob("*.toml")):
                if dropin.is_file():
                    _apply_file(dropin, layers)
    _apply_environment(env, layers)
    if overrides:
        _apply_overrides(overrides, layers)

    sections = {name: _build(cls, name, layers) for name, cls in _SECTIONS.items()}
    destinations = _build_destinations(layers)
    try:
        settings = Settings(**sections, destinations=destinations, sources=tuple(layers.sources))
    except _FieldError as exc:
        key = exc.field.split(".")[0].split("[")[0]
        raise ConfigError(f"{exc.field}: {exc.problem} (from {layers.origin(key)})") from None
    _check_files(settings, layers)
    return settings


def log_effective_settings(settings: Settings, *, log: logging.Logger | None = None) -> None:
    """Log where the configuration came from and its effective values (redacted), at INFO."""
    log = log or logger
    log.info("configuration sources: %s", ", ".join(settings.sources) or "built-in defaults only")
    for section, values in settings.redacted().items():
        log.info("configuration [%s] %s", section, json.dumps(values, sort_keys=True))


# --------------------------------------------------------------------------- TOML output
def _toml_value(value: Any) -> str:
    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"value: cannot write {_type_name(value)} as TOML")


def _toml_table(name: str, table: Mapping[str, Any], lines: list[str]) -> None:
    lines.append(f"[{name}]")
    subtables = []
    for key, value in table.items():
        if isinstance(value, Mapping):
            subtables.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    lines.append("")
    for key, value in subtables:
        _toml_table(f"{name}.{key}", value, lines)


def dump_toml(settings: Settings) -> str:
    """The configuration as TOML that :func:`load_settings` reads back to equal settings.

    ``None`` paths are written as ``""``, and so is a ``database_url`` that is the one
    derived from ``storage.root`` (so that editing ``root`` moves the database too).
    """
    data = settings.as_dict()
    storage = data["storage"]
    if storage["database_url"] == StorageSettings(root=settings.storage.root).database_url:
        storage["database_url"] = ""  # derived from root: keep it following root
    lines: list[str] = []
    for section, values in data.items():
        if section == _DESTINATIONS:
            continue
        _toml_table(section, values, lines)
    for dest in data[_DESTINATIONS]:
        lines.append(f"[[{_DESTINATIONS}]]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in dest.items())
        lines.append("")
    return "\n".join(lines)


def default_config_text() -> str:
    """The documented default configuration file, for ``/etc/calcnode/calcnode.toml``.

    The commented ``calcnode.toml`` when it is available (``DEFAULT_CONFIG_PATH``),
    else the defaults rendered by :func:`dump_toml`: both load to ``Settings()``.
    """
    if DEFAULT_CONFIG_PATH is not None:
        return DEFAULT_CONFIG_PATH.read_text(encoding="utf-8")
    return (
        "# calcnode configuration: the built-in defaults "
        "(see docs/configuration.md for every key).\n\n" + dump_toml(Settings())
    )
