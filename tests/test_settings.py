"""Typed configuration (node/settings.py), sd_notify (node/sdnotify.py), systemd units."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import socket
import subprocess
import tomllib
import uuid
from pathlib import Path

import pytest

from node import sdnotify
from node.errors import ConfigError
from node.settings import (
    OUTPUT_KINDS,
    DestinationSettings,
    MonitoringSettings,
    NodeSettings,
    OutputSettings,
    SendSettings,
    Settings,
    StorageSettings,
    TLSSettings,
    default_config_text,
    dump_toml,
    load_settings,
    log_effective_settings,
)

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "config" / "calcnode.toml"
SYSTEMD = REPO / "systemd"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- defaults
def test_defaults_without_file_or_environment() -> None:
    s = load_settings(environ={})
    assert s == Settings()
    assert s.node.ae_title == "CALCNODE"
    assert s.node.port == 11112
    assert s.node.host == "0.0.0.0"
    assert s.node.tls.enabled is False
    assert s.storage.root == Path("/var/lib/calcnode")
    assert s.storage.database_url == "sqlite:////var/lib/calcnode/calcnode.db"
    assert s.study.quiet_seconds == 30.0
    assert s.outputs.kinds == ("cad-sr", "tid1500-sr", "seg", "gsps")
    assert s.destinations == ()
    assert s.model.path is None
    assert s.model.device == "auto"
    assert s.sources == ()


def test_settings_are_immutable() -> None:
    s = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.node.port = 1  # type: ignore[misc]


# --------------------------------------------------------------------------- precedence
def test_file_overrides_defaults_and_relative_paths_follow_the_file(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "etc" / "calcnode.toml",
        '[node]\nport = 11113\nae_title = "MYNODE"\n[storage]\nroot = "data"\n'
        "[study]\nquiet_seconds = 5\n",
    )
    s = load_settings(cfg, environ={})
    assert s.node.port == 11113
    assert s.node.ae_title == "MYNODE"
    assert s.node.max_associations == 10  # untouched keys keep their defaults
    assert s.storage.root == tmp_path / "etc" / "data"
    assert s.storage.database_url == f"sqlite:///{tmp_path}/etc/data/calcnode.db"
    assert s.study.quiet_seconds == 5.0
    assert isinstance(s.study.quiet_seconds, float)
    assert s.sources == (str(cfg),)


def test_environment_overrides_file(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.toml", '[node]\nport = 11113\nae_title = "FILE"\n')
    s = load_settings(cfg, environ={"CALCNODE_NODE__PORT": "11114", "HOME": "/x"})
    assert s.node.port == 11114
    assert s.node.ae_title == "FILE"
    assert "CALCNODE_NODE__PORT" in s.sources


def test_overrides_override_environment_dotted_and_nested(tmp_path: Path) -> None:
    env = {"CALCNODE_NODE__PORT": "11114", "CALCNODE_MODEL__DEVICE": "cpu"}
    s = load_settings(environ=env, overrides={"node.port": "11115", "model": {"device": "cuda:1"}})
    assert s.node.port == 11115  # the string from argparse is parsed as an int
    assert s.model.device == "cuda:1"
    s = load_settings(environ=env, overrides={"node.port": None, "worker.count": 0})
    assert s.node.port == 11114  # None = option not given
    assert s.worker.count == 0


def test_overrides_merge_dotted_and_nested_keys_of_one_section() -> None:
    s = load_settings(environ={}, overrides={"node.port": 2000, "node": {"ae_title": "X"}})
    assert (s.node.port, s.node.ae_title) == (2000, "X")


def test_config_file_from_environment_variable(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.toml", "[node]\nport = 4242\n")
    assert load_settings(environ={"CALCNODE_CONFIG": str(cfg)}).node.port == 4242
    other = write(tmp_path / "d.toml", "[node]\nport = 4343\n")
    # an explicit argument wins over CALCNODE_CONFIG
    assert load_settings(other, environ={"CALCNODE_CONFIG": str(cfg)}).node.port == 4343


def test_dropins_apply_in_sorted_order_after_the_file(tmp_path: Path) -> None:
    cfg = write(tmp_path / "calcnode.toml", "[node]\nport = 1000\nmax_associations = 3\n")
    write(tmp_path / "conf.d" / "20-late.toml", "[node]\nport = 3000\n")
    write(tmp_path / "conf.d" / "10-early.toml", "[node]\nport = 2000\nmax_associations = 4\n")
    write(tmp_path / "conf.d" / "README", "not toml, ignored")
    s = load_settings(cfg, environ={})
    assert s.node.port == 3000
    assert s.node.max_associations == 4
    assert s.sources == (
        str(cfg),
        str(tmp_path / "conf.d" / "10-early.toml"),
        str(tmp_path / "conf.d" / "20-late.toml"),
    )


def test_dropin_destinations_replace_the_whole_list(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "calcnode.toml",
        '[[destinations]]\nname = "a"\nae_title = "A"\nhost = "10.0.0.1"\n'
        '[[destinations]]\nname = "b"\nae_title = "B"\nhost = "10.0.0.2"\n',
    )
    write(
        tmp_path / "conf.d" / "50.toml",
        '[[destinations]]\nname = "c"\nae_title = "C"\nhost = "10.0.0.3"\nport = 4104\n',
    )
    s = load_settings(cfg, environ={})
    assert [(d.name, d.port) for d in s.destinations] == [("c", 4104)]


# --------------------------------------------------------------------------- errors
def test_unknown_key_in_file_names_key_section_and_file(tmp_path: Path) -> None:
    cfg = write(tmp_path / "calcnode.toml", "[node]\nprot = 11112\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    message = str(info.value)
    assert "'prot'" in message
    assert str(cfg) in message
    assert "[node]" in message
    assert "did you mean 'port'" in message


def test_unknown_key_in_nested_table_names_it(tmp_path: Path) -> None:
    cfg = write(tmp_path / "calcnode.toml", "[node.tls]\nenable = true\n")
    with pytest.raises(ConfigError, match=r"'enable'.*\[node\.tls\]"):
        load_settings(cfg, environ={})


def test_unknown_section_names_section_and_file(tmp_path: Path) -> None:
    cfg = write(tmp_path / "calcnode.toml", "[nodes]\nport = 1\n")
    with pytest.raises(ConfigError, match=r"unknown section \[nodes\]") as info:
        load_settings(cfg, environ={})
    assert str(cfg) in str(info.value)


def test_wrong_type_in_file_names_key_and_file(tmp_path: Path) -> None:
    cfg = write(tmp_path / "calcnode.toml", '[node]\nport = "11112"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    message = str(info.value)
    assert message.startswith("node.port: must be an integer")
    assert f"{cfg}, section [node]" in message


@pytest.mark.parametrize(
    ("toml", "key", "problem"),
    [
        ("[outputs]\nlegacy_srt_codes = 1\n", "outputs.legacy_srt_codes", "true or false"),
        ('[node]\nallowed_hosts = "10.0.0.1"\n', "node.allowed_hosts", "list of strings"),
        ("[node]\nport = true\n", "node.port", "must be an integer"),
        ('[study]\nquiet_seconds = "30"\n', "study.quiet_seconds", "must be a number"),
        ("[node]\ntls = true\n", "node.tls", "must be a table"),
        ("[node.port]\nx = 1\n", "node.port", "not a table"),
    ],
)
def test_wrong_types_are_errors_naming_the_key(
    tmp_path: Path, toml: str, key: str, problem: str
) -> None:
    cfg = write(tmp_path / "calcnode.toml", toml)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    assert key in str(info.value)
    assert problem in str(info.value)
    assert str(cfg) in str(info.value)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    cfg = write(tmp_path / "calcnode.toml", "[node\nport = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_settings(cfg, environ={})
    assert str(cfg) in str(info.value)


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml does not exist"):
        load_settings(tmp_path / "nope.toml", environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(environ={"CALCNODE_CONFIG": str(tmp_path / "gone.toml")})
    with pytest.raises(ConfigError, match="is a directory"):
        load_settings(tmp_path, environ={})


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("CALCNODE_NODE__PROT", "no such setting node.prot"),
        ("CALCNODE_NODES__PORT", "there is no section [nodes]"),
        ("CALCNODE_NODE", "is a table"),
        ("CALCNODE_NODE__TLS", "is a table"),
        ("CALCNODE_NODE_PORT", "there is no section [node_port]"),
    ],
)
def test_unknown_environment_variable_is_an_error_naming_it(name: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ={name: "1"})
    assert f"unknown environment variable {name}" in str(info.value)
    assert expected in str(info.value)


def test_unknown_environment_variable_suggests_the_right_name() -> None:
    with pytest.raises(ConfigError, match="did you mean 'CALCNODE_NODE__PORT'"):
        load_settings(environ={"CALCNODE_NODE__PROT": "1"})


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"CALCNODE_NODE__PORT": "eleven"})
    assert str(info.value) == (
        "node.port: must be an integer, got 'eleven' (environment variable CALCNODE_NODE__PORT)"
    )
    with pytest.raises(ConfigError, match=r"node\.port: must be a TCP port.*CALCNODE_NODE__PORT"):
        load_settings(environ={"CALCNODE_NODE__PORT": "70000"})


@pytest.mark.parametrize("port", [0, -1, 65536, 100000])
def test_bad_port_is_rejected(port: int) -> None:
    with pytest.raises(ConfigError, match=rf"node\.port: must be a TCP port .* got {port}"):
        load_settings(environ={}, overrides={"node.port": port})
    with pytest.raises(ValueError, match="port"):
        NodeSettings(port=port)


@pytest.mark.parametrize("port", [1, 104, 65535])
def test_edge_ports_are_accepted(port: int) -> None:
    assert load_settings(environ={}, overrides={"node.port": port}).node.port == port


@pytest.mark.parametrize(
    ("title", "problem"),
    [
        ("", "must not be empty"),
        ("   ", "must not be empty"),
        ("A" * 17, "at most 16"),
        ("A\\B", "backslash"),
        ("ÄNODE", "printable ASCII"),
        ("NODE\n", "printable ASCII"),
        (" NODE", "must not start or end with spaces"),
    ],
)
def test_bad_ae_title_is_rejected(title: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=rf"node\.ae_title: .*{problem}"):
        load_settings(environ={}, overrides={"node.ae_title": title})
    with pytest.raises(ConfigError, match=rf"node\.allowed_calling_aets: .*{problem}"):
        load_settings(environ={}, overrides={"node.allowed_calling_aets": ["OK", title]})


def test_sixteen_character_ae_title_is_accepted() -> None:
    s = load_settings(environ={}, overrides={"node.ae_title": "ABCDEFGHIJKLMNOP"})
    assert s.node.ae_title == "ABCDEFGHIJKLMNOP"


@pytest.mark.parametrize(
    ("kinds", "problem"),
    [
        (["cad-sr", "pdf"], "unknown output kind 'pdf'"),
        (["seg", "seg"], "lists 'seg' more than once"),
        ([], "needs at least one output kind"),
        (["CAD-SR"], "unknown output kind 'CAD-SR'"),
    ],
)
def test_bad_output_kinds_are_rejected(kinds: list[str], problem: str) -> None:
    with pytest.raises(ConfigError, match=rf"outputs\.kinds: {problem}"):
        load_settings(environ={}, overrides={"outputs.kinds": kinds})


def test_a_subset_of_output_kinds_is_accepted() -> None:
    s = load_settings(environ={"CALCNODE_OUTPUTS__KINDS": "cad-sr, gsps"})
    assert s.outputs.kinds == ("cad-sr", "gsps")


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"study.quiet_seconds": -1}, "study.quiet_seconds"),
        ({"model.device": "gpu"}, "model.device"),
        ({"model.device": "cuda:x"}, "model.device"),
        ({"node.host": "bad host"}, "node.host"),
        ({"node.allowed_hosts": ["10.0.0.0/8", "pacs.example.org"]}, "node.allowed_hosts"),
        ({"node.max_associations": 0}, "node.max_associations"),
        ({"worker.max_attempts": 0}, "worker.max_attempts"),
        ({"worker.lease_seconds": 0}, "worker.lease_seconds"),
        (
            {"send.retry_initial_seconds": 60, "send.retry_max_seconds": 10},
            "send.retry_max_seconds",
        ),
        ({"scheduler.study_check_seconds": 0}, "scheduler.study_check_seconds"),
        ({"logging.level": "verbose"}, "logging.level"),
        ({"storage.database_url": "calcnode.db"}, "storage.database_url"),
        ({"storage.min_free_mb": -5}, "storage.min_free_mb"),
        ({"study.quiet_seconds": "nan"}, "study.quiet_seconds"),
    ],
)
def test_invalid_values_are_rejected_naming_the_key(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ={}, overrides=overrides)
    assert str(info.value).startswith(f"{key}: ")
    assert "command-line override" in str(info.value)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_pattern_accepts_valid_devices(device: str) -> None:
    assert load_settings(environ={}, overrides={"model.device": device}).model.device == device


def test_hosts_and_networks_are_accepted() -> None:
    s = load_settings(
        environ={"CALCNODE_NODE__ALLOWED_HOSTS": '["10.0.0.0/8", "192.168.1.7", "::1"]'},
        overrides={"node.host": "::"},
    )
    assert s.node.host == "::"
    assert [str(n) for n in s.node.allowed_networks] == ["10.0.0.0/8", "192.168.1.7/32", "::1/128"]


def test_paths_expand_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    s = load_settings(environ={"CALCNODE_STORAGE__ROOT": "~/store"})
    assert s.storage.root == tmp_path / "store"
    assert s.storage.database_url == f"sqlite:///{tmp_path}/store/calcnode.db"


def test_model_path_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.path: no such file .*missing\.pt"):
        load_settings(environ={}, overrides={"model.path": str(tmp_path / "missing.pt")})
    weights = write(tmp_path / "w.pt", "x")
    assert load_settings(environ={}, overrides={"model.path": weights}).model.path == weights
    assert load_settings(environ={"CALCNODE_MODEL__PATH": ""}).model.path is None


# --------------------------------------------------------------------------- monitoring
def test_monitoring_is_off_by_default() -> None:
    assert load_settings(environ={}).monitoring == MonitoringSettings(http_port=0)


def test_monitoring_port_from_file_and_environment(tmp_path: Path) -> None:
    cfg = write(tmp_path / "calcnode.toml", "[monitoring]\nhttp_port = 9110\n")
    assert load_settings(cfg, environ={}).monitoring.http_port == 9110
    env = {"CALCNODE_MONITORING__HTTP_PORT": "9111"}
    assert load_settings(cfg, environ=env).monitoring.http_port == 9111  # environment wins


@pytest.mark.parametrize("port", [-1, 65536])
def test_bad_monitoring_port_is_rejected_naming_the_key(tmp_path: Path, port: int) -> None:
    cfg = write(tmp_path / "calcnode.toml", f"[monitoring]\nhttp_port = {port}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    assert str(info.value) == (
        f"monitoring.http_port: must be 0 (off) or a TCP port between 1 and 65535, got {port}"
        f" (from {cfg}, section [monitoring])"
    )
    with pytest.raises(ConfigError, match=r"monitoring\.http_port: must be an integer.*HTTP_PORT"):
        load_settings(environ={"CALCNODE_MONITORING__HTTP_PORT": "http"})
    with pytest.raises(ValueError, match="http_port: must be 0 \\(off\\) or a TCP port"):
        MonitoringSettings(http_port=port)


# --------------------------------------------------------------------------- env parsing
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("true", True),
        ("1", True),
        ("YES", True),
        ("on", True),
        ("false", False),
        ("0", False),
        ("no", False),
        ("Off", False),
    ],
)
def test_boolean_environment_values(text: str, expected: bool) -> None:
    s = load_settings(environ={"CALCNODE_OUTPUTS__LEGACY_SRT_CODES": text})
    assert s.outputs.legacy_srt_codes is expected


def test_invalid_boolean_environment_value_is_an_error() -> None:
    with pytest.raises(ConfigError, match="CALCNODE_OUTPUTS__LEGACY_SRT_CODES"):
        load_settings(environ={"CALCNODE_OUTPUTS__LEGACY_SRT_CODES": "maybe"})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('["PACS", "MOD1"]', ("PACS", "MOD1")),
        ("PACS,MOD1", ("PACS", "MOD1")),
        (" PACS , MOD1 ,", ("PACS", "MOD1")),
        ("", ()),
        ("[]", ()),
    ],
)
def test_list_environment_values(text: str, expected: tuple[str, ...]) -> None:
    s = load_settings(environ={"CALCNODE_NODE__ALLOWED_CALLING_AETS": text})
    assert s.node.allowed_calling_aets == expected


def test_list_environment_value_that_is_bad_json_is_an_error() -> None:
    with pytest.raises(ConfigError, match="not a valid JSON array"):
        load_settings(environ={"CALCNODE_NODE__ALLOWED_CALLING_AETS": '["PACS"'})
    with pytest.raises(ConfigError, match="list of strings"):
        load_settings(environ={"CALCNODE_NODE__ALLOWED_CALLING_AETS": "[1, 2]"})


def test_nested_tls_environment_variables(tmp_path: Path) -> None:
    cert = write(tmp_path / "c.pem", "cert")
    key = write(tmp_path / "k.pem", "key")
    s = load_settings(
        environ={
            "CALCNODE_NODE__TLS__ENABLED": "true",
            "CALCNODE_NODE__TLS__CERT_FILE": str(cert),
            "CALCNODE_NODE__TLS__KEY_FILE": str(key),
        }
    )
    assert s.node.tls == TLSSettings(enabled=True, cert_file=cert, key_file=key)


def test_relative_paths_from_environment_follow_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_settings(environ={"CALCNODE_STORAGE__ROOT": "data"}, overrides={"model.path": ""})
    assert s.storage.root == tmp_path / "data"
    assert s.model.path is None


def test_conflicting_overrides_are_an_error() -> None:
    with pytest.raises(ConfigError, match=r"override node\.port: conflicts with another"):
        load_settings(environ={}, overrides={"node": 5, "node.port": 1})


def test_bad_json_list_in_environment_names_the_variable_and_the_problem() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"CALCNODE_NODE__ALLOWED_HOSTS": '["10.0.0.0/8"'})
    assert str(info.value).startswith(
        "environment variable CALCNODE_NODE__ALLOWED_HOSTS: not a valid JSON array"
    )


def test_float_environment_value() -> None:
    assert (
        load_settings(environ={"CALCNODE_STUDY__QUIET_SECONDS": "2.5"}).study.quiet_seconds == 2.5
    )


# --------------------------------------------------------------------------- TLS
def test_tls_enabled_needs_certificate_and_key(tmp_path: Path) -> None:
    cfg = write(tmp_path / "calcnode.toml", "[node.tls]\nenabled = true\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    assert str(info.value) == (
        f"node.tls.cert_file: is required when TLS is enabled (from {cfg}, section [node.tls])"
    )


def test_tls_files_must_exist(tmp_path: Path) -> None:
    cert = write(tmp_path / "c.pem", "cert")
    cfg = write(
        tmp_path / "calcnode.toml",
        '[node.tls]\nenabled = true\ncert_file = "c.pem"\nkey_file = "k.pem"\n',
    )
    with pytest.raises(ConfigError, match=r"node\.tls\.key_file: no such file .*k\.pem"):
        load_settings(cfg, environ={})
    key = write(tmp_path / "k.pem", "key")
    tls = load_settings(cfg, environ={}).node.tls
    assert (tls.cert_file, tls.key_file) == (cert, key)


def test_client_certificates_need_a_ca_file() -> None:
    with pytest.raises(ValueError, match="ca_file"):
        TLSSettings(enabled=True, cert_file="c", key_file="k", require_client_cert=True)
    with pytest.raises(ValueError, match="require_client_cert: needs enabled"):
        TLSSettings(require_client_cert=True, ca_file="ca")


# --------------------------------------------------------------------------- destinations
def test_destinations_from_file(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "calcnode.toml",
        '[outputs]\nkinds = ["cad-sr", "seg"]\n'
        '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "10.0.0.5"\n'
        '[[destinations]]\nname = "ws"\nae_title = "IBREAST"\nhost = "ws1.example.org"\n'
        'port = 11112\nkinds = ["cad-sr"]\n',
    )
    s = load_settings(cfg, environ={})
    assert s.destinations == (
        DestinationSettings(name="pacs", ae_title="PACS", host="10.0.0.5", port=104),
        DestinationSettings(
            name="ws", ae_title="IBREAST", host="ws1.example.org", port=11112, kinds=("cad-sr",)
        ),
    )
    assert s.destination_kinds(s.destinations[0]) == ("cad-sr", "seg")
    assert s.destination_kinds(s.destinations[1]) == ("cad-sr",)


def test_destinations_from_environment_json() -> None:
    env = {
        "CALCNODE_DESTINATIONS": json.dumps(
            [{"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": "4242"}]
        )
    }
    (dest,) = load_settings(environ=env).destinations
    assert (dest.name, dest.ae_title, dest.host, dest.port) == (
        "orthanc",
        "ORTHANC",
        "127.0.0.1",
        4242,
    )


def test_destinations_from_overrides() -> None:
    s = load_settings(
        environ={},
        overrides={"destinations": [{"name": "a", "ae_title": "A", "host": "localhost"}]},
    )
    assert s.destinations[0].host == "localhost"


@pytest.mark.parametrize(
    ("destinations", "problem"),
    [
        (
            [
                {"name": "a", "ae_title": "A", "host": "h"},
                {"name": "a", "ae_title": "B", "host": "h"},
            ],
            r"destinations\[1\]\.name: duplicate destination name 'a'",
        ),
        ([{"name": "a", "ae_title": "A"}], r"destinations\[0\]: missing required key 'host'"),
        (
            [{"name": "a", "ae_title": "A", "host": "h", "aet": "X"}],
            r"unknown key 'aet' in destinations\[0\]",
        ),
        (
            [{"name": "a", "ae_title": "A", "host": "h", "port": 0}],
            r"destinations\[0\]\.port: must be a TCP port",
        ),
        ([{"name": "a b", "ae_title": "A", "host": "h"}], r"destinations\[0\]\.name: must be"),
        (
            [{"name": "a", "ae_title": "A" * 17, "host": "h"}],
            r"destinations\[0\]\.ae_title: an AE title has at most 16",
        ),
        (
            [{"name": "a", "ae_title": "A", "host": "h", "kinds": ["pdf"]}],
            r"destinations\[0\]\.kinds: unknown output kind 'pdf'",
        ),
    ],
)
def test_invalid_destinations_are_rejected(destinations: list[dict], problem: str) -> None:
    env = {"CALCNODE_DESTINATIONS": json.dumps(destinations)}
    with pytest.raises(ConfigError, match=problem) as info:
        load_settings(environ=env)
    assert "CALCNODE_DESTINATIONS" in str(info.value)


def test_destination_kinds_must_be_enabled_outputs() -> None:
    env = {
        "CALCNODE_OUTPUTS__KINDS": "cad-sr",
        "CALCNODE_DESTINATIONS": '[{"name": "a", "ae_title": "A", "host": "h", "kinds": ["seg"]}]',
    }
    with pytest.raises(ConfigError, match=r"destinations\[0\]\.kinds: unknown output kind 'seg'"):
        load_settings(environ=env)


def test_destinations_environment_value_must_be_a_json_array() -> None:
    with pytest.raises(ConfigError, match="CALCNODE_DESTINATIONS: must be a JSON array"):
        load_settings(environ={"CALCNODE_DESTINATIONS": '{"name": "a"}'})
    with pytest.raises(ConfigError, match="CALCNODE_DESTINATIONS: not a valid JSON"):
        load_settings(environ={"CALCNODE_DESTINATIONS": "pacs"})


def test_destinations_in_file_must_be_an_array_of_tables(tmp_path: Path) -> None:
    cfg = write(tmp_path / "calcnode.toml", 'destinations = ["pacs"]\n')
    with pytest.raises(ConfigError, match=r"destinations: must be an array of tables") as info:
        load_settings(cfg, environ={})
    assert str(cfg) in str(info.value)


# --------------------------------------------------------------------------- constructors
def test_constructors_validate_and_normalise() -> None:
    node = NodeSettings(allowed_calling_aets=["PACS"], allowed_hosts=["10.0.0.1"])
    assert node.allowed_calling_aets == ("PACS",)
    with pytest.raises(TypeError, match="port: must be an integer"):
        NodeSettings(port="104")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="kinds: must be a list of strings"):
        OutputSettings(kinds="seg")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="retry_max_seconds: must be at least"):
        SendSettings(retry_initial_seconds=100, retry_max_seconds=50)
    with pytest.raises(TypeError, match="node: must be a NodeSettings"):
        Settings(node={"port": 1})  # type: ignore[arg-type]
    assert StorageSettings(root="/srv/x").database_url == "sqlite:////srv/x/calcnode.db"
    assert OUTPUT_KINDS == ("cad-sr", "tid1500-sr", "seg", "gsps")


# --------------------------------------------------------------------------- the default file
def _keys(table: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in table.items():
        if isinstance(value, dict):
            keys |= _keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


def test_packaged_config_file_agrees_with_the_defaults() -> None:
    assert load_settings(CONFIG, environ={}) == Settings()


def test_packaged_config_file_lists_every_key() -> None:
    with CONFIG.open("rb") as fh:
        in_file = _keys(tomllib.load(fh))
    defaults = _keys(Settings().as_dict())
    assert in_file == defaults - {"destinations"}  # destinations: commented-out examples


def test_commented_destination_example_in_config_file_is_valid(tmp_path: Path) -> None:
    text = CONFIG.read_text(encoding="utf-8")
    block = text[text.index("# [[destinations]]") : text.index("# ------", text.index("# [[dest"))]
    lines = [line.removeprefix("# ").removeprefix("#") for line in block.splitlines()]
    cfg = write(tmp_path / "calcnode.toml", "\n".join(lines))
    names = [d.name for d in load_settings(cfg, environ={}).destinations]
    assert names == ["pacs", "mammo-workstation"]


def test_dump_toml_round_trips(tmp_path: Path) -> None:
    original = load_settings(
        environ={
            "CALCNODE_NODE__ALLOWED_HOSTS": "10.0.0.0/8",
            "CALCNODE_STORAGE__ROOT": str(tmp_path / "store"),
            "CALCNODE_DESTINATIONS": '[{"name": "a", "ae_title": "A", "host": "h", "port": 5}]',
        }
    )
    cfg = write(tmp_path / "dumped.toml", dump_toml(original))
    assert load_settings(cfg, environ={}) == original
    assert 'database_url = ""' in cfg.read_text()  # derived URL follows root


def test_default_config_text_loads_to_the_defaults(tmp_path: Path) -> None:
    cfg = write(tmp_path / "calcnode.toml", default_config_text())
    assert load_settings(cfg, environ={}) == Settings()


def test_default_config_text_without_the_file_renders_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an installed package: config/calcnode.toml is not part of it
    monkeypatch.setattr("node.settings.DEFAULT_CONFIG_PATH", None)
    text = default_config_text()
    assert text.startswith("# calcnode configuration")
    cfg = write(tmp_path / "calcnode.toml", text)
    assert load_settings(cfg, environ={}) == Settings()


def test_redacted_masks_the_database_password() -> None:
    s = load_settings(
        environ={"CALCNODE_STORAGE__DATABASE_URL": "postgresql://calc:s3cret@db/calcnode"}
    )
    assert s.storage.database_url == "postgresql://calc:s3cret@db/calcnode"
    assert s.redacted()["storage"]["database_url"] == "postgresql://calc:***@db/calcnode"
    assert "s3cret" not in json.dumps(s.redacted())
    assert s.as_dict()["node"]["tls"]["cert_file"] is None


def test_log_effective_settings_logs_sources_and_no_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = load_settings(
        environ={"CALCNODE_STORAGE__DATABASE_URL": "postgresql://calc:s3cret@db/calcnode"}
    )
    with caplog.at_level(logging.INFO, logger="node.settings"):
        log_effective_settings(s)
    text = caplog.text
    assert "CALCNODE_STORAGE__DATABASE_URL" in text
    assert '"port": 11112' in text
    assert "s3cret" not in text


# --------------------------------------------------------------------------- sd_notify
def test_notify_without_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False


def test_notify_sends_to_a_socket_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    address = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(address))
        server.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(address))
        assert sdnotify.notify("READY=1\nSTATUS=listening on 11112") is True
        assert server.recv(4096) == b"READY=1\nSTATUS=listening on 11112"
        assert sdnotify.notify("STOPPING=1") is True
        assert server.recv(4096) == b"STOPPING=1"


def test_notify_sends_to_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"calcnode-test-{os.getpid()}-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        server.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("WATCHDOG=1") is True
        assert server.recv(4096) == b"WATCHDOG=1"


def test_notify_to_a_dead_socket_returns_false(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert sdnotify.notify("READY=1") is False


def test_notify_rejects_an_empty_state() -> None:
    with pytest.raises(ValueError, match="state"):
        sdnotify.notify("")


# --------------------------------------------------------------------------- systemd
def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections → key → values (systemd keys may repeat, so not configparser)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: key outside a section: {line}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


HARDENING = {
    "ProtectSystem": "strict",
    "ProtectHome": "true",
    "PrivateTmp": "true",
    "NoNewPrivileges": "true",
    "SystemCallFilter": "@system-service",
    "MemoryDenyWriteExecute": "false",
    "User": "calcnode",
    "StateDirectory": "calcnode",
    "ConfigurationDirectory": "calcnode",
    "Restart": "on-failure",
    "Type": "notify",
}


@pytest.mark.parametrize("unit", ["calcnode.service", "calcnode-worker@.service"])
def test_systemd_units_are_hardened(unit: str) -> None:
    sections = read_unit(SYSTEMD / unit)
    service = sections["Service"]
    for key, value in HARDENING.items():
        assert service.get(key) == [value], f"{unit}: {key}"
    assert "PrivateDevices" not in service  # would hide the GPU
    assert service["DeviceAllow"] == ["char-nvidia* rw"]
    assert sections["Unit"]["PartOf"] == ["calcnode.target"]
    assert sections["Install"]["WantedBy"] == ["calcnode.target"]
    (exec_start,) = service["ExecStart"]
    assert exec_start.startswith("/opt/calcnode/.venv/bin/calcnode ")
    assert "--config /etc/calcnode/calcnode.toml" in exec_start


def test_main_service_may_bind_port_104_and_nothing_more() -> None:
    service = read_unit(SYSTEMD / "calcnode.service")["Service"]
    assert service["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert service["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert service["ExecStart"][0].split()[1] == "serve"


def test_worker_template_pins_one_gpu() -> None:
    sections = read_unit(SYSTEMD / "calcnode-worker@.service")
    service = sections["Service"]
    assert "CUDA_VISIBLE_DEVICES=%i" in service["Environment"]
    exec_start = service["ExecStart"][0].split()
    assert exec_start[1] == "worker"
    assert exec_start[exec_start.index("--device") + 1] == "cuda:0"
    assert sections["Unit"]["After"] == ["calcnode.service"]
    assert service["CapabilityBoundingSet"] == [""]


def test_target_pulls_in_the_main_service() -> None:
    sections = read_unit(SYSTEMD / "calcnode.target")
    assert sections["Unit"]["Wants"] == ["calcnode.service"]
    assert sections["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    # ExecStart must name an existing executable for verify; everything else is as shipped.
    for unit in SYSTEMD.iterdir():
        text = unit.read_text(encoding="utf-8").replace(
            "/opt/calcnode/.venv/bin/calcnode", "/bin/true"
        )
        write(tmp_path / unit.name, text)
    result = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            "calcnode.target",
            "calcnode.service",
            "calcnode-worker@0.service",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if "Failed to" in result.stderr and "bus" in result.stderr.lower():
        pytest.skip(f"systemd-analyze cannot run here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""
