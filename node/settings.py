"""The node's typed configuration: defaults, TOML files, environment, command line.

The frozen pydantic models below are the one source of truth (``config/calcnode.toml``
lists every key with the same defaults). :func:`load_settings` merges the layers as tables
and validates once; our own code says which file or variable set a bad value, and "did
you mean" for an unknown name. See docs/configuration.md: every key, layer and message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import ipaddress
import itertools
import json
import logging
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, get_origin

import tomli_w
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from node.errors import ConfigError

__all__ = ["AE_TITLE_MAX_LENGTH", "DEFAULT_CONFIG_PATH", "DEVICE_PATTERN", "ENV_CONFIG"]
__all__ += ["ENV_DESTINATIONS", "ENV_PREFIX", "OUTPUT_KINDS", "DestinationSettings"]
__all__ += ["LoggingSettings", "ModelSettings", "MonitoringSettings", "NodeSettings"]
__all__ += ["OutputSettings", "SchedulerSettings", "SendSettings", "Settings", "StorageSettings"]
__all__ += ["StudySettings", "TLSSettings", "WorkerSettings", "default_config_text", "dump_toml"]
__all__ += ["load_settings", "log_effective_settings"]

logger = logging.getLogger(__name__)

#: The four result objects the node can emit (see docs/dicom-outputs.md).
OUTPUT_KINDS: tuple[str, ...] = ("cad-sr", "tid1500-sr", "seg", "gsps")
#: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
AE_TITLE_MAX_LENGTH = 16
LOG_LEVELS: tuple[str, ...] = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
OPERATING_POINTS = ("calibrated", "all")  #: values of ``model.operating_point``
ENV_PREFIX = "CALCNODE_"
ENV_CONFIG = "CALCNODE_CONFIG"  #: names the file when ``load_settings`` gets none
ENV_DESTINATIONS = "CALCNODE_DESTINATIONS"  #: ``[{"name": …, "ae_title": …}, …]``
_SOURCE_TREE_CONFIG = Path(__file__).resolve().parent.parent / "config" / "calcnode.toml"
#: ``config/calcnode.toml`` when running from a source tree, else ``None``.
DEFAULT_CONFIG_PATH: Path | None = _SOURCE_TREE_CONFIG if _SOURCE_TREE_CONFIG.is_file() else None
#: ``postgresql://user:secret@host/db`` → ``postgresql://user:***@host/db``.
_redact_url = functools.partial(re.compile(r"(://[^:/@]*:)[^@/]*@").sub, r"\1***@")
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?")
_EXAMPLE = '[{"name": "pacs", "ae_title": "PACS", "host": "10.0.0.5", "port": 104}]'


# --------------------------------------------------------------------------- value types
def _check(ok: Callable[[Any], object], problem: str, mode: type = AfterValidator) -> Any:
    """A validator raising ``ValueError(problem)`` (``{v!r}``: the value) unless ``ok``
    (a ``ValueError`` from ``ok`` is a no)."""

    def check(value: Any) -> Any:
        with contextlib.suppress(ValueError):
            if ok(value):
                return value
        raise ValueError(problem.format(v=value))

    return mode(check)


def _ae_title(value: str) -> str:
    for bad, problem in (
        (not value.strip(), "must not be empty"),
        (len(value) > AE_TITLE_MAX_LENGTH, f"has at most {AE_TITLE_MAX_LENGTH} characters"),
        (any(not 0x20 <= ord(c) <= 0x7E for c in value), "must be printable ASCII"),
        ("\\" in value, "must not contain a backslash"),
        (value != value.strip(), "must not start or end with spaces (they are padding)"),
    ):
        if bad:
            raise ValueError(f"an AE title {problem}, got {value!r}")
    return value


def _kinds(kinds: tuple[str, ...], allowed: tuple[str, ...] = OUTPUT_KINDS) -> tuple[str, ...]:
    if unknown := [k for k in kinds if k not in allowed]:
        raise ValueError(f"unknown output kind {unknown[0]!r}; choose from {', '.join(allowed)}")
    if duplicates := sorted({k for k in kinds if kinds.count(k) > 1}):
        raise ValueError(f"lists {duplicates[0]!r} more than once")
    return kinds


def _invalid(field: str | tuple[str | int, ...], problem: str) -> PydanticCustomError:
    """A cross-field error about ``field`` (pydantic would name only the model)."""
    return PydanticCustomError("invalid", "{problem}", {"problem": problem, "field": field})


_NETWORK = "entries are IP addresses or networks such as 10.0.0.0/8, got {v!r}"
_NAME = "must be 1–64 letters, digits, '_', '.', '-', starting with a letter or digit, got {v!r}"
_PORT = "a TCP port between 1 and 65535, got {v}"
_LEVEL = f"must be one of {', '.join(LOG_LEVELS)}, got {{v!r}}"
_DEVICE = "must be auto, cpu, cuda or cuda:N, got {v!r}"
_OPERATING_POINT = "must be calibrated or all, got {v!r}"
AETitle = Annotated[str, AfterValidator(_ae_title)]
_HOST = "must be an IP address or a host name, got {v!r}"
Host = Annotated[
    str, _check(lambda v: _HOSTNAME.fullmatch(v[:254]) or ipaddress.ip_address(v), _HOST)
]
Port = Annotated[int, _check(range(1, 65536).__contains__, "must be " + _PORT)]
_PortOrOff = Annotated[int, _check(range(65536).__contains__, "must be 0 (off) or " + _PORT)]
_Network = Annotated[str, _check(ipaddress.ip_network, _NETWORK)]
_Name = Annotated[str, _check(re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}").fullmatch, _NAME)]
_Device = Annotated[str, _check(DEVICE_PATTERN.fullmatch, _DEVICE)]
_OperatingPoint = Annotated[str, _check(OPERATING_POINTS.__contains__, _OPERATING_POINT)]
# Lists: a TOML array or a Python list or tuple; as text, JSON or comma-separated.
_AETitles = Annotated[tuple[AETitle, ...], Field(strict=False)]
_Networks = Annotated[tuple[_Network, ...], Field(strict=False)]
_Kinds = Annotated[tuple[str, ...], Field(strict=False), AfterValidator(_kinds)]
# Paths: text, "~" expanded; "" is None for an optional path, an error otherwise.
_NotEmpty = _check(lambda v: v != "", "must not be empty", BeforeValidator)
_Path = Annotated[Path, Field(strict=False), _NotEmpty, AfterValidator(Path.expanduser)]
_NoneIfEmpty = BeforeValidator(lambda v: None if v == "" else v)
_Expand = AfterValidator(lambda p: p and p.expanduser())
_OptionalPath = Annotated[Path | None, Field(strict=False), _NoneIfEmpty, _Expand]
_AtLeast0 = Annotated[int, Field(ge=0)]
_AtLeast1 = Annotated[int, Field(ge=1)]
_NotNegative = Annotated[float, Field(ge=0)]
_Positive = Annotated[float, Field(gt=0)]
_Level = Annotated[
    str, _check(lambda v: v.upper() in LOG_LEVELS, _LEVEL), AfterValidator(str.upper)
]


# --------------------------------------------------------------------------- error messages
class _FieldTypeError(ValueError, TypeError):
    """A constructor's argument of the wrong type: a ``ValueError`` too (one class for all)."""


_TYPES = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string"}
_TYPES |= {"tuple": "a list of strings", "path": "a path string", "model": "a table"}
Loc = tuple[str | int, ...]
Key = tuple[str, ...]


def _loc(error: Mapping[str, Any]) -> Loc:
    """Where pydantic found the error, plus the field a cross-field check names."""
    field = error.get("ctx", {}).get("field", ())
    return (*error["loc"], *(field if isinstance(field, tuple) else (field,)))


def _dotted(loc: Iterable[str | int]) -> str:
    """``node.tls.cert_file``, ``destinations[1].name`` (indices into strings dropped)."""
    text = re.sub(r"^destinations\.(\d+)", r"destinations[\1]", ".".join(map(str, loc)))
    return re.sub(r"\.\d+", "", text)


def _problem(error: Mapping[str, Any]) -> str:
    """Pydantic's error in the words of this configuration."""
    kind, got, ctx = error["type"], error.get("input"), error.get("ctx", {})
    base = kind.removesuffix("_type").removesuffix("_parsing")
    if kind in ("value_error", "invalid"):  # our own checks: the message is the problem
        return str(ctx["error"] if kind == "value_error" else error["msg"])
    if isinstance(got, Mapping) and base != "model":
        return "is a setting, not a table"
    if base == "string" and isinstance(error["loc"][-1], int):
        return f"must be a list of strings, contains {got!r}"
    if base in _TYPES and kind != base:
        return f"must be {_TYPES[base]}, got {got!r}"
    if kind in ("greater_than_equal", "greater_than"):
        relation, bound = ("at least", ctx["ge"]) if "ge" in ctx else ("greater than", ctx["gt"])
        return f"must be {relation} {bound:g}, got {got:g}"
    if kind == "finite_number":
        return f"must be a finite number, got {got!r}"
    return str(error["msg"])


# --------------------------------------------------------------------------- sections
class _Text(str):
    """A string :func:`load_settings` read: ``base`` is the folder of its file, ``None``
    for text from the environment or command line (parsed by the setting's type)."""

    base: Path | None = None


class _Section(BaseModel):
    """A frozen, strict table of the configuration; a constructor error names the field."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid", allow_inf_nan=False)

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            error = exc.errors()[0]
            kind = _FieldTypeError if error["type"].endswith("_type") else ValueError
            raise kind(f"{_dotted(_loc(error))}: {_problem(error)}") from None

    # As pydantic's own: not called for a nested table, so its errors keep their location.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    @field_validator("*", mode="before")
    @classmethod
    def _read(cls, value: Any, info: ValidationInfo) -> Any:
        """A path read made absolute; text parsed: scalars laxly, lists as JSON or a,b."""
        if not isinstance(value, _Text):
            return value
        hint: Any = cls.model_fields[str(info.field_name)].annotation
        if hint in (Path, Path | None):
            return str(value) and str((value.base or Path.cwd()) / Path(value).expanduser())
        if value.base is not None or hint is str:
            return str(value)
        if get_origin(hint) is not tuple:
            return TypeAdapter(hint).validate_python(value.strip())  # "yes" → True
        if not value.strip().startswith("["):
            return [part.strip() for part in value.split(",") if part.strip()]
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a valid JSON array: {exc}") from None


class TLSSettings(_Section):
    """``[node.tls]``: DICOM over TLS (PS3.15 B.1) on ``node.port``; off by default."""

    enabled: bool = False
    cert_file: _OptionalPath = None
    key_file: _OptionalPath = None
    ca_file: _OptionalPath = None
    require_client_cert: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> TLSSettings:
        for name in ("cert_file", "key_file"):
            if self.enabled and getattr(self, name) is None:
                raise _invalid(name, "is required when TLS is enabled")
        if self.require_client_cert and not self.enabled:
            raise _invalid("require_client_cert", "needs enabled = true")
        if self.require_client_cert and self.ca_file is None:
            raise _invalid("ca_file", "is required when require_client_cert is true")
        return self


class NodeSettings(_Section):
    """``[node]``: the DICOM SCP and what a peer may cost (see docs/conformance.md)."""

    ae_title: AETitle = "CALCNODE"
    host: Host = "0.0.0.0"
    port: Port = 11112
    allowed_calling_aets: _AETitles = ()
    allowed_hosts: _Networks = ()
    max_associations: _AtLeast1 = 10
    associations_per_host: _AtLeast1 = 4
    require_called_aet: bool = True
    acse_timeout_seconds: _Positive = 30.0
    dimse_timeout_seconds: _Positive = 60.0
    network_timeout_seconds: _Positive = 60.0
    handshake_timeout_seconds: _Positive = 10.0
    max_instance_mb: _AtLeast1 = 128
    max_inflated_mb: _AtLeast1 = 128
    tls: TLSSettings = Field(default_factory=TLSSettings)

    @property
    def allowed_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """``allowed_hosts`` parsed (a single address is a /32 or /128 network)."""
        return tuple(ipaddress.ip_network(h, strict=False) for h in self.allowed_hosts)


class StorageSettings(_Section):
    """``[storage]``; an empty ``database_url`` becomes ``sqlite:///<root>/calcnode.db``."""

    root: _Path = Path("/var/lib/calcnode")
    database_url: str = Field(default="", validate_default=True)
    min_free_mb: _AtLeast0 = 512
    retention_days: _AtLeast0 = 30

    @field_validator("database_url")
    @classmethod
    def _effective_url(cls, url: str, info: ValidationInfo) -> str:
        if url and not re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", url):
            example, got = "sqlite:////var/lib/calcnode/calcnode.db", _redact_url(url)
            raise ValueError(f"must be an SQLAlchemy URL such as {example}, got {got!r}")
        return url or f"sqlite:///{info.data.get('root')}/calcnode.db"


class StudySettings(_Section):
    """``[study]``: a study is complete ``quiet_seconds`` after its last image."""

    quiet_seconds: _NotNegative = 30.0


class OutputSettings(_Section):
    """``[outputs]``: which of :data:`OUTPUT_KINDS` to create; legacy SRT codes or not."""

    kinds: Annotated[_Kinds, _check(bool, "needs at least one output kind")] = OUTPUT_KINDS
    legacy_srt_codes: bool = False


class DestinationSettings(_Section):
    """``[[destinations]]``: a peer for our results; ``kinds`` empty = ``outputs.kinds``."""

    name: _Name
    ae_title: AETitle
    host: Host
    port: Port = 104
    kinds: _Kinds = ()


class ModelSettings(_Section):
    """``[model]``: the detector's weights (``None``: the bundled ones) and where it runs."""

    path: _OptionalPath = None
    device: _Device = "auto"
    torch_threads: _AtLeast0 = 0
    operating_point: _OperatingPoint = "calibrated"
    max_findings: _AtLeast0 = 0


class WorkerSettings(_Section):
    """``[worker]``: the processes that run the detector on queued images."""

    count: _AtLeast0 = 1
    lease_seconds: _Positive = 600.0
    max_attempts: _AtLeast1 = 3
    retry_backoff_seconds: _NotNegative = 60.0
    poll_seconds: _Positive = 2.0


class SendSettings(_Section):
    """``[send]``: C-STORE of results to the destinations, with bounded retries."""

    retry_initial_seconds: _NotNegative = 30.0
    retry_max_seconds: float = 3600.0
    max_attempts: _AtLeast1 = 10
    timeout_seconds: _Positive = 60.0

    @model_validator(mode="after")
    def _ordered(self) -> SendSettings:
        if self.retry_max_seconds < self.retry_initial_seconds:
            at_least = f"must be at least retry_initial_seconds ({self.retry_initial_seconds:g})"
            raise _invalid("retry_max_seconds", f"{at_least}, got {self.retry_max_seconds:g}")
        return self


class SchedulerSettings(_Section):
    """``[scheduler]``: intervals of the periodic tasks of ``calcnode serve``."""

    study_check_seconds: _Positive = 5.0
    send_check_seconds: _Positive = 10.0
    lease_check_seconds: _Positive = 60.0
    retention_check_seconds: _Positive = 3600.0


class LoggingSettings(_Section):
    """``[logging]``: calcnode's level; pynetdicom's (it logs patient data below WARNING)."""

    level: _Level = "INFO"
    pynetdicom_level: _Level = "WARNING"


class MonitoringSettings(_Section):
    """``[monitoring]``: ``/metrics``, ``/healthz`` on ``node.host``:``http_port``; 0 = off."""

    http_port: _PortOrOff = 0


_SECTIONS = _Section.__subclasses__()


# --------------------------------------------------------------------------- Settings
class Settings(BaseModel):
    """The whole, validated, immutable configuration of a node; ``Settings()`` is the default.

    The constructor takes section objects (``Settings(node=NodeSettings(port=104))``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    node: NodeSettings = Field(default_factory=NodeSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    study: StudySettings = Field(default_factory=StudySettings)
    outputs: OutputSettings = Field(default_factory=OutputSettings)
    destinations: tuple[DestinationSettings, ...] = ()
    model: ModelSettings = Field(default_factory=ModelSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    send: SendSettings = Field(default_factory=SendSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    monitoring: MonitoringSettings = Field(default_factory=MonitoringSettings)
    _sources: tuple[str, ...] = PrivateAttr(default=())

    @field_validator("*", mode="before")
    @classmethod
    def _objects(cls, value: Any, info: ValidationInfo) -> Any:
        section = cls.model_fields[str(info.field_name)].annotation
        if info.context is None and section in _SECTIONS and not isinstance(value, section):
            got = type(value).__name__
            raise TypeError(f"{info.field_name}: must be a {section.__name__}, got {got}")
        return value

    @model_validator(mode="after")
    def _destinations_agree(self) -> Settings:
        names = [d.name for d in self.destinations]
        for index, dest in enumerate(self.destinations):
            if dest.name in names[:index]:
                problem = f"duplicate destination name {dest.name!r}"
                raise _invalid(("destinations", index, "name"), problem)
            try:
                _kinds(dest.kinds, self.outputs.kinds)
            except ValueError as exc:
                problem = f"{exc} (outputs.kinds enables only these)"
                raise _invalid(("destinations", index, "kinds"), problem) from None
        return self

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.__dict__ == other.__dict__

    @property
    def sources(self) -> tuple[str, ...]:
        """The files, environment variables and ``--overrides`` read (not part of ``==``)."""
        return self._sources

    def destination_kinds(self, destination: DestinationSettings) -> tuple[str, ...]:
        """The output kinds sent to ``destination`` (its own list, else all enabled)."""
        return destination.kinds or self.outputs.kinds

    def as_dict(self) -> dict[str, Any]:
        """The configuration as JSON-compatible data (paths as strings, lists, ``None``)."""
        return self.model_dump(mode="json")

    def redacted(self) -> dict[str, Any]:
        """:meth:`as_dict` with a password in ``storage.database_url`` masked (no other secret)."""
        data = self.as_dict()
        data["storage"]["database_url"] = _redact_url(data["storage"]["database_url"])
        return data


# --------------------------------------------------------------------------- loading
def _flatten(table: Mapping[str, Any], prefix: Key = ()) -> Iterator[tuple[Key, Any]]:
    """``(key, value)`` of every setting in a nested table (key: ``("node", "port")``)."""
    for key, value in table.items():
        if isinstance(value, Mapping) and value:
            yield from _flatten(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def _nested(key: Key, value: Any) -> dict[str, Any]:
    """``{"node": {"port": value}}`` for the key ``("node", "port")``."""
    return functools.reduce(lambda inner, part: {part: inner}, reversed(key), value)


def _merge(low: dict[str, Any], high: Mapping[str, Any]) -> dict[str, Any]:
    """``high`` over ``low`` table by table; a list (``destinations`` too) is replaced."""
    for name, value in high.items():
        below = low.get(name)
        both = isinstance(value, Mapping) and isinstance(below, Mapping)
        low[name] = _merge(dict(below), value) if both else value  # type: ignore[arg-type]
    return low


def _mark(data: Any, base: Path | None) -> Any:
    """``data`` with each string in a table a :class:`_Text` from ``base``."""
    if isinstance(data, Mapping):
        return {key: _mark(value, base) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [_mark(item, base) if isinstance(item, Mapping) else item for item in data]
    if isinstance(data, str | os.PathLike):
        data = _Text(os.fspath(data))
        data.base = base
    return data


def _env_name(key: Key) -> str:
    return ENV_DESTINATIONS if key == ("destinations",) else ENV_PREFIX + "__".join(key).upper()


def _hint(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _file_origin(path: Path, key: Key) -> str:
    return f"from {path}" + (f", section [{'.'.join(key[:-1])}]" if key[1:] else "")


def _origin(trail: list[tuple[Key, str]], loc: Loc) -> str:
    """Where the value at ``loc`` came from: its key or one inside it, else one beside it."""
    key = tuple(itertools.takewhile(lambda part: isinstance(part, str), loc))
    for near in (lambda k: k[: len(key)] == key, lambda k: k[:-1] == key[:-1]):
        for found, origin in reversed(trail):
            if near(found):
                return origin
    return "the built-in default"


def _read(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return _mark(tomllib.load(file), path.parent)
    except (ValueError, OSError) as exc:
        what = "not valid TOML" if isinstance(exc, ValueError) else "cannot read the file"
        raise ConfigError(f"{path}: {what}: {exc}") from None


def _environment(variables: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """The ``CALCNODE_*`` variables as a table; each must name a setting."""
    valid = {_env_name(key): key for key, _ in _flatten(Settings().model_dump())}
    table: dict[str, Any] = {}
    for name, text in variables:
        if (key := valid.get(name)) is None:
            parts = name[len(ENV_PREFIX) :].lower().split("__")
            what = f"no such setting {'.'.join(parts)}"
            if parts[0] not in Settings.model_fields:
                what = f"there is no section [{parts[0]}]"
            elif any(n.startswith(f"{name}__") for n in valid):
                what = f"[{'.'.join(parts)}] is a table; name one of its keys"
            raise ConfigError(
                f"unknown environment variable {name}: {what}{_hint(name, valid)}. Settings "
                f"are {ENV_PREFIX}<SECTION>__<KEY>, e.g. {ENV_PREFIX}NODE__PORT"
            )
        if key == ("destinations",):
            try:
                text = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{name}: not a valid JSON array of objects: {exc}") from None
            if not (isinstance(text, list) and all(isinstance(t, dict) for t in text)):
                raise ConfigError(f"{name}: must be a JSON array of objects such as {_EXAMPLE}")
        _merge(table, _nested(key, text))
    return _mark(table, None)


def _overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted and nested overrides as one table; ``None`` is an option not given."""
    table: dict[str, Any] = {}
    given: list[Key] = []
    for dotted, value in ((k, v) for k, v in _flatten(overrides) if v is not None):
        key = tuple(part for name in dotted for part in name.split("."))
        if any(other[: len(key)] == key[: len(other)] for other in given):
            raise ConfigError(f"command-line override {'.'.join(key)}: conflicts with another")
        given.append(key)
        _merge(table, _nested(key, value))
    return _mark(table, None)


def _explain(error: Mapping[str, Any], trail: list[tuple[Key, str]]) -> str:
    """A pydantic error as the message of a ConfigError: key, problem, origin."""
    loc, kind = _loc(error), error["type"]
    origin = _origin(trail, loc)
    if kind == "extra_forbidden":
        *table, name = loc
        if not table:
            return f"unknown section [{name}] ({origin}){_hint(str(name), Settings.model_fields)}"
        known: Any = DestinationSettings.model_fields  # a table in destinations, else defaults:
        if table[0] != "destinations":
            known = functools.reduce(lambda t, k: t[k], map(str, table), Settings().model_dump())
        where = f" in {_dotted(table)}" if any(isinstance(p, int) for p in table) else ""
        hint, known = _hint(str(name), known), ", ".join(known)
        return f"unknown key {name!r}{where} ({origin}){hint}; known keys: {known}"
    if kind == "missing":
        return f"{_dotted(loc[:-1])}: missing required key {loc[-1]!r} ({origin})"
    if loc[:1] == ("destinations",) and kind in ("model_type", "tuple_type"):
        got = f"got {error['input']!r} ({origin})"
        return f"destinations: must be an array of tables ([[destinations]]), {got}"
    return f"{_dotted(loc)}: {_problem(error)} ({origin})"


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """The configuration from, lowest first: the defaults; ``config_file`` (else
    ``$CALCNODE_CONFIG``) and its drop-ins ``conf.d/*.toml`` (relative paths: from their
    folder); ``environ`` (default ``os.environ``): ``CALCNODE_<SECTION>__<KEY>`` and
    ``CALCNODE_DESTINATIONS`` (JSON); ``overrides`` by dotted key (``{"node.port": "104"}``)
    or nested table, ``None`` for an option not given. Text from the last two is parsed by
    type. A :class:`ConfigError` names the key and the file or variable that set it.
    """
    env = os.environ if environ is None else environ
    config_file = (env.get(ENV_CONFIG) or None) if config_file is None else config_file
    files: list[Path] = []
    if config_file is not None:
        path = Path(config_file).expanduser()
        if not path.is_file():
            reason = "is a directory" if path.is_dir() else "does not exist"
            raise ConfigError(f"configuration file {path} {reason}")
        files = [path, *(p for p in sorted((path.parent / "conf.d").glob("*.toml")) if p.is_file())]
    variables = sorted(
        (k, v) for k, v in env.items() if k.startswith(ENV_PREFIX) and k != ENV_CONFIG
    )
    layers: list[tuple[dict[str, Any], Callable[[Key], str]]] = [
        *((_read(file), functools.partial(_file_origin, file)) for file in files),
        (_environment(variables), lambda key: f"environment variable {_env_name(key)}"),
        (_overrides(overrides or {}), lambda key: f"command-line override {'.'.join(key)}"),
    ]
    data: dict[str, Any] = {}
    trail: list[tuple[Key, str]] = []
    for table, describe in layers:
        _merge(data, table)
        trail += [(key, describe(key)) for key, _ in _flatten(table)]
    flags = [f"--{'.'.join(key)}" for key, _ in _flatten(layers[-1][0])]
    try:
        settings = Settings.model_validate(data, context={"loading": True})
    except ValidationError as exc:
        raise ConfigError(_explain(exc.errors()[0], trail)) from None
    settings._sources = (*map(str, files), *(name for name, _ in variables), *flags)
    names = ("cert_file", "key_file", "ca_file") if settings.node.tls.enabled else ()
    for key in [("model", "path"), *(("node", "tls", n) for n in names)]:  # opened later:
        file: Any = functools.reduce(getattr, key, settings)  # fail now, not on first use
        if file is not None and not file.is_file():
            raise ConfigError(f"{'.'.join(key)}: no such file {file} ({_origin(trail, key)})")
    return settings


def log_effective_settings(settings: Settings, *, log: logging.Logger | None = None) -> None:
    """Log where the configuration came from and its effective values (redacted), at INFO."""
    log = log or logger
    log.info("configuration sources: %s", ", ".join(settings.sources) or "built-in defaults only")
    for section, values in settings.redacted().items():
        log.info("configuration [%s] %s", section, json.dumps(values, sort_keys=True))


# --------------------------------------------------------------------------- TOML output
def dump_toml(settings: Settings) -> str:
    """TOML that :func:`load_settings` reads back to equal settings (``None`` as ``""``,
    and a ``database_url`` derived from ``storage.root``, so it follows ``root``)."""
    empty = lambda table: {k: "" if v is None else v for k, v in table.items()}  # noqa: E731
    data = json.loads(json.dumps(settings.as_dict()), object_hook=empty)
    if settings.storage.database_url == StorageSettings(root=settings.storage.root).database_url:
        data["storage"]["database_url"] = ""
    return tomli_w.dumps(data)


def default_config_text() -> str:
    """``/etc/calcnode/calcnode.toml``: :data:`DEFAULT_CONFIG_PATH` (with its comments),
    else (an installed package) the defaults by :func:`dump_toml`."""
    if DEFAULT_CONFIG_PATH is not None:
        return DEFAULT_CONFIG_PATH.read_text(encoding="utf-8")
    header = "# calcnode configuration: the built-in defaults (docs/configuration.md: every key)."
    return f"{header}\n\n{dump_toml(Settings())}"
