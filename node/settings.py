"""The node's typed configuration: frozen pydantic models (``config/calcnode.toml``: same defaults).

:func:`load_settings` has pydantic-settings layer, lowest first: the defaults; the TOML file
and its ``conf.d/*.toml`` (relative paths from the file's folder); ``CALCNODE_<SECTION>__<KEY>``
(``CALCNODE_DESTINATIONS``: JSON); the overrides (text parsed by type). Ours: the schema, which
file or variable set a bad value, and "did you mean".
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import ipaddress
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, get_origin

import pydantic
import pydantic_settings
import tomli_w
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, NoDecode

from node.errors import ConfigError

__all__ = ["AE_TITLE_MAX_LENGTH", "DEFAULT_CONFIG_PATH", "DEVICE_PATTERN", "ENV_CONFIG"]
__all__ += ["ENV_DESTINATIONS", "ENV_PREFIX", "OUTPUT_KINDS", "DestinationSettings"]
__all__ += ["LoggingSettings", "ModelSettings", "MonitoringSettings", "NodeSettings"]
__all__ += ["OutputSettings", "SchedulerSettings", "SendSettings", "Settings", "StorageSettings"]
__all__ += ["StudySettings", "TLSSettings", "WorkerSettings", "default_config_text", "dump_toml"]
__all__ += ["load_settings", "log_effective_settings"]

logger = logging.getLogger(__name__)

OUTPUT_KINDS: tuple[str, ...] = ("cad-sr", "tid1500-sr", "seg", "gsps")  #: docs/dicom-outputs.md
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?")  #: ``auto``: CUDA if available, else CPU
AE_TITLE_MAX_LENGTH = 16
ENV_PREFIX = "CALCNODE_"
ENV_CONFIG = "CALCNODE_CONFIG"  #: names the file when ``load_settings`` gets none
ENV_DESTINATIONS = "CALCNODE_DESTINATIONS"  #: ``[{"name": …, "ae_title": …}, …]``
_SOURCE_TREE_CONFIG = Path(__file__).resolve().parent.parent / "config" / "calcnode.toml"
#: ``config/calcnode.toml`` when running from a source tree, else ``None``.
DEFAULT_CONFIG_PATH: Path | None = _SOURCE_TREE_CONFIG if _SOURCE_TREE_CONFIG.is_file() else None
_PASSWORD = re.compile(r"(://[^:/@]*:)[^@/]*@")  # postgresql://user:secret@host/db
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?")
_USAGE = f"{ENV_PREFIX}<SECTION>__<KEY>, e.g. {ENV_PREFIX}NODE__PORT"  # an environment variable
_EXAMPLE = '[{"name": "pacs", "ae_title": "PACS", "host": "10.0.0.5", "port": 104}]'
Loc = tuple[str | int, ...]
_REQUEST: ContextVar[_Request] = ContextVar("calcnode_settings_request")  # load_settings running


def _check(ok: Callable[[Any], object], problem: str, mode: type = AfterValidator) -> Any:
    """A validator: ``ValueError("<problem>, got <value>")`` unless ``ok`` (if it raises: no)."""

    def check(value: Any) -> Any:
        with contextlib.suppress(ValueError):
            if ok(value):
                return value
        raise ValueError(f"{problem}, got {value!r}")

    return mode(check)


def _kinds(kinds: tuple[str, ...], allowed: tuple[str, ...] = OUTPUT_KINDS) -> tuple[str, ...]:
    if unknown := [k for k in kinds if k not in allowed]:
        raise ValueError(f"unknown output kind {unknown[0]!r}; choose from {', '.join(allowed)}")
    if duplicates := sorted({k for k in kinds if kinds.count(k) > 1}):
        raise ValueError(f"lists {duplicates[0]!r} more than once")
    return kinds


def _invalid(problem: str, *field: str | int) -> PydanticCustomError:  # names the field
    return PydanticCustomError("invalid", "{problem}", {"problem": problem, "field": field})


_AE, _MAX, _PORT = "an AE title ", AE_TITLE_MAX_LENGTH, "a TCP port between 1 and 65535"
AETitle = Annotated[
    str,
    _check(str.strip, _AE + "must not be empty"),
    _check(lambda v: len(v) <= _MAX, f"{_AE}has at most {_MAX} characters"),
    _check(lambda v: all(0x20 <= ord(c) <= 0x7E for c in v), _AE + "must be printable ASCII"),
    _check(lambda v: "\\" not in v, _AE + "must not contain a backslash"),
    _check(lambda v: v == v.strip(), _AE + "must not start or end with spaces (they are padding)"),
]
_IS_HOST = lambda v: _HOSTNAME.fullmatch(v[:254]) or ipaddress.ip_address(v)  # noqa: E731
Host = Annotated[str, _check(_IS_HOST, "must be an IP address or a host name")]
Port = Annotated[int, _check(range(1, 65536).__contains__, "must be " + _PORT)]
_PortOrOff = Annotated[int, _check(range(65536).__contains__, "must be 0 (off) or " + _PORT)]
_NAME = "must be 1–64 letters, digits, '_', '.', '-', starting with a letter or digit"
_Name = Annotated[str, _check(re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}").fullmatch, _NAME)]
_Device = Annotated[str, _check(DEVICE_PATTERN.fullmatch, "must be auto, cpu, cuda or cuda:N")]
_Point = Annotated[str, _check(("calibrated", "all").__contains__, "must be calibrated or all")]
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_LEVEL = _check(lambda v: v.upper() in _LEVELS, f"must be one of {', '.join(_LEVELS)}")
_Level = Annotated[str, _LEVEL, AfterValidator(str.upper)]
_AETitles = Annotated[tuple[AETitle, ...], Field(strict=False), NoDecode]
_NETWORK = _check(ipaddress.ip_network, "entries are IP addresses or networks such as 10.0.0.0/8")
_Networks = Annotated[tuple[Annotated[str, _NETWORK], ...], Field(strict=False), NoDecode]
_Kinds = Annotated[tuple[str, ...], Field(strict=False), NoDecode, AfterValidator(_kinds)]
_NotEmpty = _check(lambda v: v != "", "must not be empty", BeforeValidator)
_Expand = AfterValidator(lambda p: p and p.expanduser())
_Path = Annotated[Path, Field(strict=False), _NotEmpty, _Expand]
_NoneIfEmpty = BeforeValidator(lambda v: v or None)  # "" is no path (for _Path: an error)
_OptionalPath = Annotated[Path | None, Field(strict=False), _NoneIfEmpty, _Expand]
_TYPES = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string"}
_TYPES |= {"tuple": "a list of strings", "path": "a path string", "model": "a table"}
_TYPES |= {"finite_number": "a finite number"}  # nan, inf


def _loc(error: Mapping[str, Any]) -> Loc:  # with the field an _invalid error names
    return (*error["loc"], *error.get("ctx", {}).get("field", ()))


def _dotted(loc: Iterable[str | int]) -> str:
    """``node.tls.cert_file``, ``destinations[1].name`` (indices into strings dropped)."""
    text = re.sub(r"^destinations\.(\d+)", r"destinations[\1]", ".".join(map(str, loc)))
    return re.sub(r"\.\d+", "", text)


def _problem(error: Mapping[str, Any]) -> str:
    kind, got, ctx = error["type"], error.get("input"), error.get("ctx", {})
    base = kind.removesuffix("_type").removesuffix("_parsing")
    if kind in ("value_error", "invalid"):  # our own checks: the message is the problem
        return str(ctx["error"] if kind == "value_error" else error["msg"])
    if isinstance(got, Mapping) and base != "model":
        return "is a setting, not a table"
    if base == "string" and isinstance(error["loc"][-1], int):
        return f"must be a list of strings, contains {got!r}"
    if base in _TYPES:
        return f"must be {_TYPES[base]}, got {got!r}"
    if kind in ("greater_than_equal", "greater_than"):
        relation, bound = ("at least", ctx["ge"]) if "ge" in ctx else ("greater than", ctx["gt"])
        return f"must be {relation} {bound:g}, got {got:g}"
    return str(error["msg"])


def _hint(word: object, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _FieldTypeError(ValueError, TypeError):
    """A constructor's argument of the wrong type: a ``ValueError`` too (one class for all)."""


class _Section(BaseModel):
    """A frozen, strict table of the configuration; a constructor error names the field."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid", allow_inf_nan=False)

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            if _REQUEST.get(None) is not None:
                raise  # pydantic calls __init__ for a nested table: keep the full location
            error = exc.errors()[0]
            kind = _FieldTypeError if error["type"].endswith("_type") else ValueError
            raise kind(f"{_dotted(_loc(error))}: {_problem(error)}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")


class TLSSettings(_Section):
    """``[node.tls]``: DICOM over TLS (PS3.15 B.1) on ``node.port``; off by default."""

    enabled: bool = False
    cert_file: _OptionalPath = None
    key_file: _OptionalPath = None
    ca_file: _OptionalPath = None
    require_client_cert: bool = False

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> TLSSettings:
        for name in ("cert_file", "key_file"):
            if self.enabled and getattr(self, name) is None:
                raise _invalid("is required when TLS is enabled", name)
        if self.require_client_cert and not self.enabled:
            raise _invalid("needs enabled = true", "require_client_cert")
        if self.require_client_cert and self.ca_file is None:
            raise _invalid("is required when require_client_cert is true", "ca_file")
        return self


class NodeSettings(_Section):
    """``[node]``: the DICOM SCP and what a peer may cost (see docs/conformance.md)."""

    ae_title: AETitle = "CALCNODE"
    host: Host = "0.0.0.0"
    port: Port = 11112
    allowed_calling_aets: _AETitles = ()
    allowed_hosts: _Networks = ()
    max_associations: int = Field(default=10, ge=1)
    associations_per_host: int = Field(default=4, ge=1)
    require_called_aet: bool = True
    acse_timeout_seconds: float = Field(default=30.0, gt=0)
    dimse_timeout_seconds: float = Field(default=60.0, gt=0)
    network_timeout_seconds: float = Field(default=60.0, gt=0)
    handshake_timeout_seconds: float = Field(default=10.0, gt=0)
    max_instance_mb: int = Field(default=128, ge=1)
    max_inflated_mb: int = Field(default=128, ge=1)
    tls: TLSSettings = Field(default_factory=TLSSettings)

    @property
    def allowed_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """``allowed_hosts`` parsed (a single address is a /32 or /128 network)."""
        return tuple(ipaddress.ip_network(h, strict=False) for h in self.allowed_hosts)


class StorageSettings(_Section):
    """``[storage]``; an empty ``database_url`` becomes ``sqlite:///<root>/calcnode.db``."""

    root: _Path = Path("/var/lib/calcnode")
    database_url: str = Field(default="", validate_default=True)
    min_free_mb: int = Field(default=512, ge=0)
    retention_days: int = Field(default=30, ge=0)

    @pydantic.field_validator("database_url")
    @classmethod
    def _effective_url(cls, url: str, info: pydantic.ValidationInfo) -> str:
        if url and not re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", url):
            example, got = "sqlite:////var/lib/calcnode/calcnode.db", _PASSWORD.sub(r"\1***@", url)
            raise ValueError(f"must be an SQLAlchemy URL such as {example}, got {got!r}")
        return url or f"sqlite:///{info.data.get('root')}/calcnode.db"


class StudySettings(_Section):
    """``[study]``: a study is complete ``quiet_seconds`` after its last image."""

    quiet_seconds: float = Field(default=30.0, ge=0)


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
    torch_threads: int = Field(default=0, ge=0)
    operating_point: _Point = "calibrated"
    max_findings: int = Field(default=0, ge=0)


class WorkerSettings(_Section):
    """``[worker]``: the processes that run the detector on queued images."""

    count: int = Field(default=1, ge=0)
    lease_seconds: float = Field(default=600.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    retry_backoff_seconds: float = Field(default=60.0, ge=0)
    poll_seconds: float = Field(default=2.0, gt=0)


class SendSettings(_Section):
    """``[send]``: C-STORE of results to the destinations, with bounded retries."""

    retry_initial_seconds: float = Field(default=30.0, ge=0)
    retry_max_seconds: float = 3600.0
    max_attempts: int = Field(default=10, ge=1)
    timeout_seconds: float = Field(default=60.0, gt=0)

    @pydantic.model_validator(mode="after")
    def _ordered(self) -> SendSettings:
        if self.retry_max_seconds < self.retry_initial_seconds:
            at_least = f"must be at least retry_initial_seconds ({self.retry_initial_seconds:g})"
            raise _invalid(f"{at_least}, got {self.retry_max_seconds:g}", "retry_max_seconds")
        return self


class SchedulerSettings(_Section):
    """``[scheduler]``: intervals of the periodic tasks of ``calcnode serve``."""

    study_check_seconds: float = Field(default=5.0, gt=0)
    send_check_seconds: float = Field(default=10.0, gt=0)
    lease_check_seconds: float = Field(default=60.0, gt=0)
    retention_check_seconds: float = Field(default=3600.0, gt=0)


class LoggingSettings(_Section):
    """``[logging]``: calcnode's level; pynetdicom's (it logs patient data below WARNING)."""

    level: _Level = "INFO"
    pynetdicom_level: _Level = "WARNING"


class MonitoringSettings(_Section):
    """``[monitoring]``: ``/metrics``, ``/healthz`` on ``node.host``:``http_port``; 0 = off."""

    http_port: _PortOrOff = 0


class Settings(BaseSettings):
    """The whole, validated configuration of a node (immutable).

    ``Settings()`` is the default configuration; the constructor takes section objects
    (``Settings(node=NodeSettings(port=104))``); :attr:`sources` takes no part in equality.
    """

    model_config = pydantic_settings.SettingsConfigDict(frozen=True, extra="forbid")

    node: NodeSettings = Field(default_factory=NodeSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    study: StudySettings = Field(default_factory=StudySettings)
    outputs: OutputSettings = Field(default_factory=OutputSettings)
    destinations: Annotated[tuple[DestinationSettings, ...], NoDecode] = ()
    model: ModelSettings = Field(default_factory=ModelSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    send: SendSettings = Field(default_factory=SendSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    monitoring: MonitoringSettings = Field(default_factory=MonitoringSettings)
    _sources: tuple[str, ...] = pydantic.PrivateAttr(default=())

    @classmethod
    def settings_customise_sources(cls, *args: Any, **given: Any) -> tuple[Any, ...]:
        """The layers, highest first: arguments, environment, files (``Settings()``: arguments)."""
        init = given["init_settings"]
        if (request := _REQUEST.get(None)) is None:  # the constructor: sections as objects
            for name, value in init.init_kwargs.items():
                hint = getattr(cls.model_fields.get(name), "annotation", None)
                if isinstance(hint, type) and not isinstance(value, hint):
                    got = type(value).__name__
                    raise TypeError(f"{name}: must be a {hint.__name__}, got {got}")
            return (init,)
        files = _Files(cls, toml_file=request.files, deep_merge=True)
        env = _Environment(cls, env_prefix=ENV_PREFIX, env_nested_delimiter="__")
        return init, env, files

    @pydantic.model_validator(mode="after")
    def _destinations_agree(self) -> Settings:
        for index, dest in enumerate(self.destinations):
            if dest.name in [d.name for d in self.destinations[:index]]:
                duplicate = f"duplicate destination name {dest.name!r}"
                raise _invalid(duplicate, "destinations", index, "name")
            try:
                _kinds(dest.kinds, self.outputs.kinds)
            except ValueError as exc:
                problem = f"{exc} (outputs.kinds enables only these)"
                raise _invalid(problem, "destinations", index, "kinds") from None
        return self

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.__dict__ == other.__dict__

    @property
    def sources(self) -> tuple[str, ...]:
        """The files, environment variables and ``--overrides`` that contributed."""
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
        data["storage"]["database_url"] = _PASSWORD.sub(r"\1***@", data["storage"]["database_url"])
        return data


def _parse(table: Any, layer: Path | str, cls: type[BaseModel] = Settings, loc: Loc = ()) -> Any:
    """A layer's ``table``, its keys checked: relative paths made absolute (from a file's folder,
    else the current one); from ``"env"`` or ``"cli"``, strings parsed by the setting's type."""
    if not isinstance(table, Mapping):
        return table  # not a table where one belongs: pydantic says so
    out, fields = dict(table), cls.model_fields
    for key, value in table.items():
        if (field := fields.get(key)) is None:  # named with the first key that the layer sets
            origin = _origin(layer, _key((*loc, *next(_flatten({key: value}))[0])))
            if not loc:
                raise ConfigError(f"unknown section [{key}] ({origin}){_hint(key, fields)}")
            where = f" in {_dotted(loc)}" if any(isinstance(p, int) for p in loc) else ""
            known = f"{_hint(key, fields)}; known keys: {', '.join(fields)}"
            raise ConfigError(f"unknown key {key!r}{where} ({origin}){known}")
        hint, here, many = field.annotation, (*loc, key), get_origin(field.annotation) is tuple
        model: Any = getattr(hint, "__args__", (hint,))[0]  # of a table or of a list of tables
        model = model if isinstance(model, type) and issubclass(model, BaseModel) else None
        if hint in (Path, Path | None):
            if isinstance(value, str | os.PathLike) and str(value):
                base = layer.parent if isinstance(layer, Path) else Path.cwd()
                value = str(base / Path(value).expanduser())  # base ignored if absolute
        elif isinstance(value, str) and isinstance(layer, str) and hint is not str:
            value = _from_text(hint, value.strip(), _origin(layer, here), model is not None)
        if model is not None and not many:
            value = _parse(value, layer, model, here)
        elif model is not None and isinstance(value, list | tuple):
            value = [_parse(v, layer, model, (*here, i)) for i, v in enumerate(value)]
        out[key] = value
    return out


def _from_text(hint: Any, text: str, origin: str, tables: bool) -> Any:
    """A scalar leniently (invalid: as is, for validation to explain); a list as JSON or CSV."""
    if get_origin(hint) is not tuple:
        with contextlib.suppress(ValidationError):
            return pydantic.TypeAdapter(hint).validate_python(text, strict=False)
        return text
    if not tables and not text.startswith("["):
        return [part.strip() for part in text.split(",") if part.strip()]
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        what = f"not a valid JSON array{' of objects' * tables}"
        raise ConfigError(f"{origin}: {what}: {exc}") from None
    if tables and not (isinstance(parsed, list) and all(isinstance(t, dict) for t in parsed)):
        raise ConfigError(f"{origin}: must be a JSON array of objects such as {_EXAMPLE}")
    return parsed


def _flatten(table: Mapping[str, Any], prefix: Loc = ()) -> Iterator[tuple[Loc, Any]]:
    for key, value in table.items():
        if isinstance(value, Mapping) and value:
            yield from _flatten(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def _key(loc: Loc) -> Loc:  # what a layer sets: destinations[1].name is in destinations
    return loc[: next((i for i, p in enumerate(loc) if isinstance(p, int)), None)]


def _origin(layer: Path | str, loc: Loc) -> str:
    """Where the value at ``loc`` of a layer (a file, ``"env"``, ``"cli"``) came from."""
    if layer == "env":
        return f"environment variable {ENV_PREFIX}{'__'.join(map(str, loc)).upper()}"
    if layer == "cli":
        return f"command-line override {_dotted(loc)}"
    return f"from {layer}" + (f", section [{_dotted(loc[:-1])}]" if loc[1:] else "")


@dataclasses.dataclass
class _Request:
    """One :func:`load_settings` call: its inputs, and each layer's data (highest first)."""

    files: list[Path]
    environ: dict[str, str]
    layers: list[tuple[Mapping[str, Any], Path | str]]

    def origin(self, loc: Loc) -> str:
        """Where the value at ``loc`` came from: its key, else a key of its table (section)."""
        keys = _key(loc)
        found = [(key, layer) for data, layer in self.layers for key, _ in _flatten(data)]
        hits = (_origin(at, k) for p in (keys, keys[:-1]) for k, at in found if k[: len(p)] == p)
        return next(hits, "the built-in default")

    def explain(self, error: Mapping[str, Any]) -> str:
        loc, kind = _loc(error), error["type"]
        origin = self.origin(loc)
        if kind == "missing":
            return f"{_dotted(loc[:-1])}: missing required key {loc[-1]!r} ({origin})"
        if loc[:1] == ("destinations",) and kind == "model_type":
            got = f"got {error['input']!r} ({origin})"
            return f"destinations: must be an array of tables ([[destinations]]), {got}"
        return f"{_dotted(loc)}: {_problem(error)} ({origin})"


class _Files(pydantic_settings.TomlConfigSettingsSource):
    """The file and its drop-ins, which pydantic-settings merges in order."""

    def _read_file(self, path: Any) -> dict[str, Any]:  # a Path: _existing_files made it one
        try:
            data = _parse(super()._read_file(path), path)
        except (ValueError, OSError) as exc:  # TOMLDecodeError, UnicodeDecodeError: ValueErrors
            what = "not valid TOML" if isinstance(exc, ValueError) else "cannot read the file"
            raise ConfigError(f"{path}: {what}: {exc}") from None
        _REQUEST.get().layers.insert(1, (data, path))
        return data


class _Environment(pydantic_settings.EnvSettingsSource):
    """The ``CALCNODE_*`` variables given to :func:`load_settings`; each must name a setting."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {name.lower(): value for name, value in _REQUEST.get().environ.items()}

    def __call__(self) -> dict[str, Any]:
        request, keys = _REQUEST.get(), _flatten(Settings.model_construct().model_dump())
        valid = [ENV_CONFIG, *(ENV_PREFIX + "__".join(map(str, k)).upper() for k, _ in keys)]
        for name in sorted(set(request.environ) - set(valid)):
            parts = name[len(ENV_PREFIX) :].lower().split("__")
            what = f"no such setting {'.'.join(parts)}"
            if parts[0] not in Settings.model_fields:
                what = f"there is no section [{parts[0]}]"
            elif any(n.startswith(f"{name}__") for n in valid):
                what = f"[{'.'.join(parts)}] is a table; name one of its keys"
            what += f"{_hint(name, valid)}. Settings are {_USAGE}"
            raise ConfigError(f"unknown environment variable {name}: {what}")
        request.layers.insert(1, (data := _parse(super().__call__(), "env"), "env"))
        return data


def _nest(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted and nested overrides as one nested table; ``None`` is an option not given."""
    nested: dict[str, Any] = {}
    for key, value in _flatten(overrides):
        if value is None:
            continue
        *parents, last = dotted = ".".join(map(str, key)).split(".")
        table = nested
        for part in parents:
            table = table.setdefault(part, {}) if isinstance(table, dict) else table
        if not isinstance(table, dict) or isinstance(table.get(last), dict):
            raise ConfigError(f"command-line override {'.'.join(dotted)}: conflicts with another")
        table[last] = value
    return nested


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Load, merge and validate the configuration (the layers: the module docstring).

    Parameters
    ----------
    config_file : str or path-like, optional
        The TOML file (then its ``conf.d/*.toml``); default ``$CALCNODE_CONFIG``, else none.
    environ : mapping, optional
        Where ``CALCNODE_*`` variables are read; default ``os.environ``, ``{}`` for none.
    overrides : mapping, optional
        Values by dotted key (``{"node.port": "104"}``) or nested table; ``None``: not given.

    Returns
    -------
    Settings
        The validated configuration; ``sources`` lists what contributed.

    Raises
    ------
    ConfigError
        Naming the key and where its value came from (file and section, variable, option).
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
    variables = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX) and k != ENV_CONFIG}
    cli = _parse(_nest(overrides or {}), "cli")
    token = _REQUEST.set(request := _Request(files, variables, [(cli, "cli")]))
    try:
        settings = Settings(**cli)
    except ValidationError as exc:
        raise ConfigError(request.explain(exc.errors()[0])) from None
    finally:
        _REQUEST.reset(token)
    flags = (f"--{_dotted(key)}" for key, _ in _flatten(cli))
    settings._sources = (*map(str, files), *sorted(variables), *flags)
    tls = settings.node.tls  # the files the node will open: fail now, not on first use
    needed: dict[Loc, Path | None] = {("model", "path"): settings.model.path}
    for name in ("cert_file", "key_file", "ca_file") if tls.enabled else ():
        needed["node", "tls", name] = getattr(tls, name)
    for key, file in needed.items():
        if file is not None and not file.is_file():
            raise ConfigError(f"{_dotted(key)}: no such file {file} ({request.origin(key)})")
    return settings


def log_effective_settings(settings: Settings, *, log: logging.Logger | None = None) -> None:
    """Log where the configuration came from and its effective values (redacted), at INFO."""
    log = log or logger
    log.info("configuration sources: %s", ", ".join(settings.sources) or "built-in defaults only")
    for section, values in settings.redacted().items():
        log.info("configuration [%s] %s", section, json.dumps(values, sort_keys=True))


def dump_toml(settings: Settings) -> str:
    """TOML that :func:`load_settings` reads back to equal settings (``None`` paths as ``""``,
    and a ``database_url`` derived from ``storage.root``, so that editing ``root`` moves it)."""
    empty = lambda table: {k: "" if v is None else v for k, v in table.items()}  # noqa: E731
    data = json.loads(json.dumps(settings.as_dict()), object_hook=empty)
    if settings.storage.database_url == StorageSettings(root=settings.storage.root).database_url:
        data["storage"]["database_url"] = ""
    return tomli_w.dumps(data)


def default_config_text() -> str:
    """The default ``/etc/calcnode/calcnode.toml``: :data:`DEFAULT_CONFIG_PATH` (commented) in
    a source tree, else :func:`dump_toml` of the defaults; both load to ``Settings()``."""
    if DEFAULT_CONFIG_PATH is not None:
        return DEFAULT_CONFIG_PATH.read_text(encoding="utf-8")
    header = "# calcnode configuration: the built-in defaults (docs/configuration.md: every key)."
    return f"{header}\n\n{dump_toml(Settings())}"
