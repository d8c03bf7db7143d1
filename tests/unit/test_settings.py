"""Settings: defaults <- TOML <- environment <- flags (DESIGN §7, §9)."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.settings import SettingsError, load_settings, render_default_config


def test_defaults_need_no_file(tmp_path: Path) -> None:
    settings = load_settings(environ={"DICOM_ROUTER_DATA_DIR": str(tmp_path)})
    assert settings.listener.ae_title == "ROUTER"
    assert settings.listener.port == 11112
    assert settings.database_url.startswith("sqlite:///")
    assert settings.database_url.endswith("router.sqlite")
    assert settings.spool_dir == tmp_path / "spool"


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[listener]\nport = 2000\nae_title = "FROMFILE"\n[spool]\nfsync = false\n')
    env = {"DICOM_ROUTER_LISTENER_PORT": "3000"}
    settings = load_settings(config, environ=env, overrides={"listener.ae_title": "FLAG"})
    assert settings.listener.port == 3000  # environment beats the file
    assert settings.listener.ae_title == "FLAG"  # flags beat everything
    assert settings.spool.fsync is False


def test_config_from_environment_variable(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[listener]\nmax_associations = 7\n")
    settings = load_settings(environ={"DICOM_ROUTER_CONFIG": str(config)})
    assert settings.listener.max_associations == 7


def test_config_toml_in_data_dir_is_read(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('[listener]\naccept = "known"\n')
    settings = load_settings(environ={"DICOM_ROUTER_DATA_DIR": str(tmp_path)})
    assert settings.listener.accept == "known"


def test_rendered_default_config_loads(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(render_default_config())
    assert load_settings(config, environ={}) == load_settings(environ={})


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ("[listener]\nport = 70000\n", {}, "out of range"),
        ("[listener]\nnope = 1\n", {}, "unknown setting listener.nope"),
        ("[nosuch]\nx = 1\n", {}, "unknown setting 'nosuch'"),
        ('[listener]\naccept = "everyone"\n', {}, "listener.accept must be one of"),
        ("[listener]\nport = \n", {}, "not valid TOML"),
        ("", {"DICOM_ROUTER_LISTENER_PORT": "eleven"}, "not a valid int"),
        ("", {"DICOM_ROUTER_SPOOL_FSYNC": "maybe"}, "not a valid bool"),
        ('[listener]\nae_title = "A_TITLE_LONGER_THAN_16"\n', {}, "1-16 characters"),
        ('[listener]\ntls_cert = "x.pem"\n', {}, "go together"),
        ('[audit]\nsyslog = "logs.example:514"\n', {}, "audit.syslog"),
        ("", {"DICOM_ROUTER_AUDIT_SYSLOG": "tcp://h:0"}, "audit.syslog"),
    ],
)
def test_bad_settings_are_refused_with_the_reason(
    tmp_path: Path, toml: str, env: dict[str, str], message: str
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(toml)
    with pytest.raises(SettingsError, match=message):
        load_settings(config, environ=env)


def test_missing_config_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "absent.toml", environ={})


def test_audit_section_defaults_file_and_environment(tmp_path: Path) -> None:
    assert load_settings(environ={}).audit.enabled is True
    assert load_settings(environ={}).audit.syslog == ""
    assert "[audit]" in render_default_config()
    config = tmp_path / "c.toml"
    config.write_text('[audit]\nsyslog = "udp://127.0.0.1:514"\n')
    env = {"DICOM_ROUTER_AUDIT_ENABLED": "false"}
    settings = load_settings(config, environ=env)
    assert settings.audit.syslog == "udp://127.0.0.1:514"
    assert settings.audit.enabled is False


def test_workers_write_timeout_from_the_environment_and_refused_when_not_positive() -> None:
    """workers.write_timeout: a destination reading none of our data (catalogue RX-16)."""
    assert load_settings(environ={}).workers.write_timeout == 60.0
    env = {"DICOM_ROUTER_WORKERS_WRITE_TIMEOUT": "7.5"}
    assert load_settings(environ=env).workers.write_timeout == 7.5
    with pytest.raises(SettingsError, match=r"workers\.write_timeout must be positive"):
        load_settings(environ={"DICOM_ROUTER_WORKERS_WRITE_TIMEOUT": "0"})


def test_listener_min_transfer_rate_from_the_environment_and_refused_when_negative() -> None:
    """listener.min_transfer_rate / min_transfer_grace: catalogue RX-03's minimum progress."""
    defaults = load_settings(environ={}).listener
    assert (defaults.min_transfer_rate, defaults.min_transfer_grace) == (1024, 60.0)
    env = {"DICOM_ROUTER_LISTENER_MIN_TRANSFER_RATE": "0"}
    assert load_settings(environ=env).listener.min_transfer_rate == 0  # no minimum
    with pytest.raises(SettingsError, match=r"listener\.min_transfer_rate must be 0"):
        load_settings(environ={"DICOM_ROUTER_LISTENER_MIN_TRANSFER_RATE": "-1"})
    with pytest.raises(SettingsError, match=r"listener\.min_transfer_grace must be positive"):
        load_settings(environ={"DICOM_ROUTER_LISTENER_MIN_TRANSFER_GRACE": "0"})


def test_listener_max_inflated_bytes_from_the_environment_and_refused_when_not_positive() -> None:
    """listener.max_inflated_bytes: catalogue RX-18's inflation cap, 1 GiB by default."""
    assert load_settings(environ={}).listener.max_inflated_bytes == 1 << 30
    env = {"DICOM_ROUTER_LISTENER_MAX_INFLATED_BYTES": "1048576"}
    assert load_settings(environ=env).listener.max_inflated_bytes == 1 << 20
    with pytest.raises(SettingsError, match=r"listener\.max_inflated_bytes must be positive"):
        load_settings(environ={"DICOM_ROUTER_LISTENER_MAX_INFLATED_BYTES": "0"})
