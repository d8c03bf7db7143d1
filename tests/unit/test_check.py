"""`dicom-router check` (router/check.py, DESIGN §6): every setting that leaves the node
open is listed, and a node set up carefully lists nothing open."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from router.check import (
    OPEN,
    check_destinations,
    check_files,
    check_settings,
    check_sources,
    config_file_in_use,
    open_secrets,
    secret_files,
)
from router.cli import main
from router.settings import ListenerSettings, MetricsSettings, SecuritySettings, Settings


def _settings(**listener: object) -> Settings:
    return replace(Settings(), listener=replace(ListenerSettings(), **listener))


def test_the_defaults_are_named_as_open() -> None:
    found = {f.setting: f.level for f in check_settings(Settings())}
    assert found == {
        "listener.accept": OPEN,
        "listener.tls_cert": OPEN,
        "listener.bind": "note",
        "security.user_identity": OPEN,
    }


def test_a_careful_listener_has_nothing_open() -> None:
    careful = _settings(
        accept="known",
        tls_cert="cert.pem",
        tls_key="key.pem",
        tls_require_client_cert=True,
        bind="127.0.0.1",
    )
    careful = replace(careful, security=SecuritySettings(user_identity="password"))
    assert list(check_settings(careful)) == []


def test_unchecked_called_ae_tls_without_client_certs_and_public_metrics() -> None:
    settings = replace(
        _settings(check_called_ae=False, tls_cert="c", tls_key="k", accept="known"),
        metrics=MetricsSettings(enabled=True, bind="0.0.0.0"),
    )
    found = {f.setting: f.level for f in check_settings(settings)}
    assert found["listener.check_called_ae"] == OPEN
    assert found["listener.tls_require_client_cert"] == "note"
    assert found["metrics.bind"] == "note"


def test_destinations_in_clear_text_off_this_host() -> None:
    destinations = [
        SimpleNamespace(name="pacs", host="10.0.0.5", port=104, tls=None),
        SimpleNamespace(name="local", host="127.0.0.1", port=11113, tls=None),
        SimpleNamespace(name="secure", host="10.0.0.6", port=2762, tls=object()),
    ]
    assert [f.setting for f in check_destinations(destinations)] == ["destinations.pacs"]


def test_source_limits_not_enforced_with_accept_any() -> None:
    """Catalogue SEC-05: `--allow echo` holds only with accept = "known"; with "any" the
    sources are not read, and check says so for each limited source."""
    sources = [
        SimpleNamespace(ae_title="ECHO1", operations=("echo",)),
        SimpleNamespace(ae_title="CT1", operations=("echo", "store")),
    ]
    [finding] = check_sources(sources, "any")
    assert (finding.level, finding.setting, finding.value) == (OPEN, "sources.ECHO1", "allow echo")
    assert list(check_sources(sources, "known")) == []


def test_the_command_names_a_limited_source_with_accept_any(tmp_path: Path) -> None:
    runner = CliRunner()
    data = ["--data-dir", str(tmp_path / "data")]
    assert runner.invoke(main, [*data, "init"]).exit_code == 0
    add = ["sources", "add", "ECHO1", "--allow", "echo"]
    assert runner.invoke(main, [*data, *add]).exit_code == 0
    result = runner.invoke(main, [*data, "check", "--json"])
    assert "sources.ECHO1" in {row["setting"] for row in json.loads(result.stdout)}
    env = {"DICOM_ROUTER_LISTENER_ACCEPT": "known"}
    result = runner.invoke(main, [*data, "check", "--json"], env=env)
    assert "sources.ECHO1" not in {row["setting"] for row in json.loads(result.stdout)}


def test_files_open_to_others_or_the_group(tmp_path: Path) -> None:
    world, group, private = tmp_path / "w", tmp_path / "g", tmp_path / "p"
    for path, mode in ((world, 0o644), (group, 0o640), (private, 0o600)):
        path.write_text("x")
        path.chmod(mode)
    found = {Path(f.setting).name: f.level for f in check_files([world, group, private])}
    assert found == {"w": OPEN, "g": "note"}


def test_the_command_after_init_and_strict(tmp_path: Path) -> None:
    runner = CliRunner()
    data = ["--data-dir", str(tmp_path / "data")]
    assert runner.invoke(main, [*data, "init"]).exit_code == 0
    add = ["destinations", "add", "pacs", "--aet", "PACS", "--host", "10.1.1.1", "--port", "104"]
    assert runner.invoke(main, [*data, *add]).exit_code == 0
    result = runner.invoke(main, [*data, "check", "--json"])
    assert result.exit_code == 0
    settings = {row["setting"] for row in json.loads(result.stdout)}
    # init made the data directory, config and database private: none of them is listed
    assert settings == {
        "listener.accept",
        "listener.tls_cert",
        "listener.bind",
        "destinations.pacs",
        "security.user_identity",
    }
    assert runner.invoke(main, [*data, "check", "--strict"]).exit_code == 1


def test_audit_off_is_noted_and_its_file_checked(tmp_path: Path) -> None:
    from router.check import node_files
    from router.settings import AuditSettings

    settings = replace(Settings(), audit=AuditSettings(enabled=False), data_dir=tmp_path)
    found = {f.setting: f.level for f in check_settings(settings)}
    assert found["audit.enabled"] == "note"
    assert tmp_path / "audit" / "audit.jsonl" in node_files(settings)


# -- SEC-20: secrets readable by others ---------------------------------------------------
def _secrets(tmp_path: Path) -> tuple[Settings, Path]:
    for name in ("tls.key", "node.key", "pacs.key"):
        (tmp_path / name).write_text("secret")
        (tmp_path / name).chmod(0o600)
    config = tmp_path / "router.toml"
    config.write_text('db = "postgresql+psycopg://router:s3cret@db.example/router"\n')
    config.chmod(0o600)
    listener = ListenerSettings(
        tls_cert=str(tmp_path / "tls.crt"), tls_key=str(tmp_path / "tls.key")
    )
    settings = replace(Settings(), data_dir=tmp_path / "data", listener=listener)
    settings = replace(settings, workers=replace(settings.workers, key=str(tmp_path / "node.key")))
    return settings, config


def test_secret_files_are_keys_and_a_config_with_a_database_password(tmp_path: Path) -> None:
    settings, config = _secrets(tmp_path)
    pacs = SimpleNamespace(name="pacs", tls=SimpleNamespace(key=str(tmp_path / "pacs.key")))
    plain = SimpleNamespace(name="plain", tls=None)
    found = {path.name: what for path, what in secret_files(settings, config, [pacs, plain])}
    assert found == {
        "tls.key": "the listener's TLS key",
        "node.key": "the node's CURVE secret key",
        "pacs.key": "the TLS key of destination pacs",
        "router.toml": "the config file (it holds a database password)",
    }
    config.write_text('db = "postgresql+psycopg://router@db.example/router"\n')  # no password
    assert config not in {path for path, _ in secret_files(settings, config)}
    config.write_text("not [ toml")
    assert config not in {path for path, _ in secret_files(settings, config)}


def test_open_secrets_name_the_file_what_it_is_and_its_mode(tmp_path: Path) -> None:
    settings, config = _secrets(tmp_path)
    assert list(open_secrets(secret_files(settings, config))) == []
    (tmp_path / "tls.key").chmod(0o644)
    config.chmod(0o640)
    lines = list(open_secrets(secret_files(settings, config)))
    assert lines == [
        f"the listener's TLS key {tmp_path / 'tls.key'} is open to every user (chmod o-rwx)"
        " (mode 0o644)",
        f"the config file (it holds a database password) {config} is open to the file's group"
        " (mode 0o640)",
    ]


def test_serve_warns_of_open_secrets_and_starts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from router.node import warn_open_secrets

    settings, config = _secrets(tmp_path)
    (tmp_path / "node.key").chmod(0o604)
    with caplog.at_level(logging.WARNING, logger="router.node"):
        warn_open_secrets(settings, config)
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert str(tmp_path / "node.key") in record.getMessage()
    assert "dicom-router check" in record.getMessage()


def test_a_worker_warns_of_its_open_curve_key_and_of_nothing_else(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from router.node import warn_open_worker_key

    key = tmp_path / "worker.key"
    key.write_text("secret")
    key.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="router.node"):
        warn_open_worker_key(key)
    assert caplog.records == []
    key.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="router.node"):
        warn_open_worker_key(key)
    [record] = caplog.records
    assert record.getMessage() == (
        f"this worker's CURVE secret key {key} is open to every user (chmod o-rwx) (mode 0o644)"
    )


def test_config_file_in_use(tmp_path: Path) -> None:
    settings = replace(Settings(), data_dir=tmp_path)
    assert config_file_in_use(None, settings, {}) is None
    settings.config_path.write_text("")
    assert config_file_in_use(None, settings, {}) == settings.config_path
    assert config_file_in_use(None, settings, {"DICOM_ROUTER_CONFIG": "/x.toml"}) == Path("/x.toml")
    assert config_file_in_use("/y.toml", settings, {"DICOM_ROUTER_CONFIG": "/x"}) == Path("/y.toml")


def test_check_names_a_given_config_holding_a_password(tmp_path: Path) -> None:
    """`--config` outside the data directory: named when it holds a password and others
    may read it (``--db`` keeps the command on the SQLite file)."""
    runner = CliRunner()
    data = ["--data-dir", str(tmp_path / "data")]
    assert runner.invoke(main, [*data, "init"]).exit_code == 0
    sqlite = ["--db", f"sqlite:///{tmp_path / 'data' / 'router.sqlite'}"]
    config = tmp_path / "router.toml"
    config.write_text("[listener]\nport = 11112\n")
    config.chmod(0o644)

    def settings_named() -> dict[str, str]:
        args = ["--config", str(config), *data, *sqlite, "check", "--json"]
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
        return {row["setting"]: row["level"] for row in json.loads(result.stdout)}

    assert str(config) not in settings_named()  # no secret in it
    config.write_text('db = "postgresql+psycopg://router:pw@127.0.0.1:1/none"\n')
    assert settings_named()[str(config)] == OPEN
