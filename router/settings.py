"""The node's settings: defaults <- TOML file <- environment <- command-line flags.

One ``Settings`` object is built at the edge (the CLI) and passed down; nothing reads the
environment or a file anywhere else (DESIGN §9). Every key can be set from the
environment as ``DICOM_ROUTER_<SECTION>_<KEY>`` (DESIGN §7), e.g.
``DICOM_ROUTER_LISTENER_PORT=11113``; ``DICOM_ROUTER_DATA_DIR`` and ``DICOM_ROUTER_DB``
are the two top-level ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_type_hints


class SettingsError(ValueError):
    """A setting that cannot be used, with the place it came from."""


@dataclass(frozen=True)
class ListenerSettings:
    ae_title: str = "ROUTER"
    bind: str = "0.0.0.0"
    port: int = 11112
    processes: int = 1
    # "any": every calling AE title (with a start-up warning); "known": the sources table.
    accept: str = "any"
    check_called_ae: bool = True
    max_associations: int = 64
    max_associations_per_calling_ae: int = 16
    max_pdu_length: int = 262_144
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    idle_timeout: float = 300.0
    # The rest of a PDU once its first bytes arrived, as one absolute deadline (a peer
    # trickling bytes is cut off, catalogue RX-02/RX-03): with 120 s and the 262,144-byte
    # PDU we announce, links down to about 2.2 KB/s are served. And a peer that stops
    # reading our responses (zero window) for write_timeout seconds is aborted.
    pdu_timeout: float = 120.0
    write_timeout: float = 60.0
    # A data set arriving for longer than min_transfer_grace seconds must average at
    # least min_transfer_rate bytes/s since its C-STORE-RQ (0: no minimum), or the
    # association is aborted: a peer sending tiny complete PDUs just inside the idle
    # timeout would otherwise hold its slot for ever (catalogue RX-03).
    min_transfer_rate: int = 1024
    min_transfer_grace: float = 60.0
    # A Deflated Explicit VR LE data set inflating past this many bytes is refused
    # (0xC000; catalogue RX-18).
    max_inflated_bytes: int = 1 << 30
    # "unrouted": keep an instance no rule matched and log a warning; "reject": refuse it.
    unrouted_policy: str = "unrouted"
    # The longest a finished instance waits for the next group commit (seconds).
    group_commit_window: float = 0.002
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    tls_require_client_cert: bool = False


@dataclass(frozen=True)
class SpoolSettings:
    # Refuse new instances (0xA700) when free space on the spool would fall below this.
    min_free_bytes: int = 1 << 30
    # Refuse new instances when the spool holds more than this (0 = no limit).
    max_bytes: int = 0
    fsync: bool = True
    # Keep a forwarded instance's file this long after its last job is done (0: remove
    # it at the janitor's next sweep, within seconds).
    retention_seconds: float = 0.0


#: A worker's heartbeat is every 2 s (workers/worker.py): the dispatcher must wait longer.
WORKER_TIMEOUT_MIN = 4.0


@dataclass(frozen=True)
class WorkerSettings:
    count: int = 1  # forwarding worker processes started by `serve`
    credit: int = 64  # leases one worker holds at most
    # Leases a worker holds per destination and association: a destination that never
    # answers holds at most max_associations * pipeline of a worker's credit.
    pipeline: int = 4
    # Seconds for the TCP connection to a destination, its A-ASSOCIATE-AC, and each
    # C-STORE response; and a destination that reads none of our data for
    # write_timeout seconds (zero window, catalogue RX-16) is cut off and retried.
    connect_timeout: float = 10.0
    acse_timeout: float = 30.0
    dimse_timeout: float = 120.0
    write_timeout: float = 60.0
    lease_seconds: float = 120.0  # a lease not finished by then is due again
    retry_base: float = 5.0  # seconds before the first retry (exponential, jitter)
    retry_cap: float = 600.0
    max_deliveries: int = 15  # leases of one job (crashed workers count) before dead letter
    # Seconds the dispatcher waits to hear from a worker (they send a heartbeat every
    # 2 s) before it forgets it: no new leases for it, and it drops out of `queue status`
    # and the metrics; its leases stay until they expire (lease_seconds).
    timeout: float = 15.0
    # Workers on other hosts: the dispatcher also listens on this tcp:// endpoint ("":
    # only the node's own ipc://). Off loopback it needs CURVE (the node's secret key and
    # a directory of the allowed workers' public keys) or, explicitly, insecure = true.
    bind: str = ""
    key: str = ""
    allowed_keys: str = ""
    insecure: bool = False


@dataclass(frozen=True)
class MetricsSettings:
    # A Prometheus endpoint served by the node (off unless enabled; loopback by default:
    # destination names and AE titles are in the labels).
    enabled: bool = False
    bind: str = "127.0.0.1"
    port: int = 9108


@dataclass(frozen=True)
class AuditSettings:
    # Security-relevant events as DICOM audit records (PS3.15 A.5), one JSON object a
    # line in <data_dir>/audit/audit.jsonl (`dicom-router audit show`).
    enabled: bool = True
    # Also send each record to syslog: "udp://HOST:PORT", "tcp://HOST:PORT" or a local
    # socket such as "/dev/log" ("": no syslog).
    syslog: str = ""


@dataclass(frozen=True)
class SecuritySettings:
    # User Identity Negotiation (PS3.7 D.3.3.7) the listener requires: "none" (not
    # checked), "username" (a known user name) or "password" (name and passcode, checked
    # against the scrypt digests of `dicom-router users add`).
    user_identity: str = "none"
    # After this many failed user identities from one address within auth_failure_window
    # seconds, that address is refused without a check for auth_lockout seconds (per
    # listener process; 0: never locked out). Catalogue SEC-09, router/lockout.py.
    max_auth_failures: int = 10
    auth_failure_window: float = 60.0
    auth_lockout: float = 300.0


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("dicom-router-data")
    db: str = ""  # empty: SQLite in the data directory
    listener: ListenerSettings = field(default_factory=ListenerSettings)
    spool: SpoolSettings = field(default_factory=SpoolSettings)
    workers: WorkerSettings = field(default_factory=WorkerSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)

    @property
    def database_url(self) -> str:
        if self.db:
            return self.db
        return f"sqlite:///{(self.data_dir / 'router.sqlite').resolve()}"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def dispatcher_endpoint(self) -> str:
        """ipc:// endpoint of the node's dispatcher; short (the socket path limit is
        107 bytes) and unique per data directory."""
        digest = hashlib.sha1(str(self.data_dir.resolve()).encode()).hexdigest()[:16]
        return f"ipc://{tempfile.gettempdir()}/dicom-router-{digest}.ipc"

    @property
    def dispatcher_notify_endpoint(self) -> str:
        """ipc:// endpoint where listeners PUSH notices of new jobs to the dispatcher."""
        return self.dispatcher_endpoint.replace(".ipc", "-jobs.ipc")

    @property
    def config_path(self) -> Path:
        return self.data_dir / "config.toml"


_SECTIONS = {
    "listener": ListenerSettings,
    "spool": SpoolSettings,
    "workers": WorkerSettings,
    "metrics": MetricsSettings,
    "audit": AuditSettings,
    "security": SecuritySettings,
}
_CHOICES = {
    ("listener", "accept"): ("any", "known"),
    ("listener", "unrouted_policy"): ("unrouted", "reject"),
    ("security", "user_identity"): ("none", "username", "password"),
}


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings. ``overrides`` maps "section.key" (or "data_dir"/"db") to values
    from command-line flags; ``None`` values are ignored."""
    env = os.environ if environ is None else environ
    config_file = config_file or env.get("DICOM_ROUTER_CONFIG") or None
    settings = Settings()
    data: dict[str, Any] = {}
    if config_file:
        data = _read_toml(Path(config_file))
    elif (
        default := Path(env.get("DICOM_ROUTER_DATA_DIR", settings.data_dir)) / "config.toml"
    ).is_file():
        data = _read_toml(default)
    settings = _apply(settings, data, f"config file {config_file or 'config.toml'}")
    settings = _apply(settings, _from_environment(env), "the environment")
    settings = _apply(settings, _nest(overrides or {}), "the command line")
    _validate(settings)
    return settings


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise SettingsError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None


def _from_environment(env: Mapping[str, str]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if "DICOM_ROUTER_DATA_DIR" in env:
        data["data_dir"] = env["DICOM_ROUTER_DATA_DIR"]
    if "DICOM_ROUTER_DB" in env:
        data["db"] = env["DICOM_ROUTER_DB"]
    for section, kind in _SECTIONS.items():
        for f in fields(kind):
            name = f"DICOM_ROUTER_{section.upper()}_{f.name.upper()}"
            if name in env:
                data.setdefault(section, {})[f.name] = env[name]
    return data


def _nest(overrides: Mapping[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        section, _, name = key.partition(".")
        if name:
            data.setdefault(section, {})[name] = value
        else:
            data[section] = value
    return data


def _apply(settings: Settings, data: Mapping[str, Any], origin: str) -> Settings:
    changes: dict[str, Any] = {}
    for key, value in data.items():
        if key in _SECTIONS:
            if not isinstance(value, Mapping):
                raise SettingsError(f"[{key}] in {origin} must be a table")
            changes[key] = _apply_section(getattr(settings, key), key, value, origin)
        elif key == "data_dir":
            changes[key] = Path(str(value))
        elif key == "db":
            changes[key] = str(value)
        else:
            raise SettingsError(f"unknown setting {key!r} in {origin}")
    return replace(settings, **changes)


def _apply_section(current: Any, section: str, values: Mapping[str, Any], origin: str) -> Any:
    hints = get_type_hints(type(current))
    known = {f.name for f in dataclasses.fields(current)}
    changes = {}
    for key, value in values.items():
        if key not in known:
            raise SettingsError(f"unknown setting {section}.{key} in {origin}")
        changes[key] = _coerce(value, hints[key], f"{section}.{key}", origin)
    return replace(current, **changes)


def _coerce(value: Any, kind: Any, name: str, origin: str) -> Any:
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind is int:
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if kind is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise SettingsError(
            f"{name} from {origin}: {value!r} is not a valid {kind.__name__}"
        ) from None


def _validate(settings: Settings) -> None:
    listener = settings.listener
    for (section, key), choices in _CHOICES.items():
        value = getattr(getattr(settings, section), key)
        if value not in choices:
            raise SettingsError(
                f"{section}.{key} must be one of {', '.join(choices)}, not {value!r}"
            )
    if not 0 <= listener.port <= 65535:
        raise SettingsError(f"listener.port {listener.port} is out of range 0-65535")
    if not listener.ae_title.strip() or len(listener.ae_title) > 16:
        raise SettingsError(f"listener.ae_title {listener.ae_title!r} must be 1-16 characters")
    for name in ("processes", "max_associations", "max_associations_per_calling_ae"):
        if getattr(listener, name) < 1:
            raise SettingsError(f"listener.{name} must be at least 1")
    if settings.workers.count < 0 or settings.workers.credit < 1:
        raise SettingsError("workers.count must be at least 0 and workers.credit at least 1")
    if settings.workers.pipeline < 1:
        raise SettingsError("workers.pipeline must be at least 1")
    if not settings.workers.timeout >= WORKER_TIMEOUT_MIN:
        raise SettingsError(
            f"workers.timeout must be at least {WORKER_TIMEOUT_MIN:g} s (two heartbeats)"
        )
    for name in ("connect_timeout", "acse_timeout", "dimse_timeout", "write_timeout"):
        if not getattr(settings.workers, name) > 0:
            raise SettingsError(f"workers.{name} must be positive")
    for name in ("pdu_timeout", "write_timeout", "min_transfer_grace"):
        if not getattr(listener, name) > 0:
            raise SettingsError(f"listener.{name} must be positive")
    if listener.max_inflated_bytes < 1:
        raise SettingsError("listener.max_inflated_bytes must be positive")
    if listener.min_transfer_rate < 0:
        raise SettingsError("listener.min_transfer_rate must be 0 (no minimum) or positive")
    if listener.max_pdu_length != 0 and listener.max_pdu_length < 4096:
        raise SettingsError("listener.max_pdu_length must be 0 (unlimited) or at least 4096")
    if not 0 <= settings.metrics.port <= 65535:
        raise SettingsError(f"metrics.port {settings.metrics.port} is out of range 0-65535")
    security = settings.security
    if security.max_auth_failures < 0:
        raise SettingsError("security.max_auth_failures must not be negative")
    for name in ("auth_failure_window", "auth_lockout"):
        if not getattr(security, name) > 0:
            raise SettingsError(f"security.{name} must be positive")
    if settings.spool.retention_seconds < 0:
        raise SettingsError("spool.retention_seconds must not be negative")
    workers = settings.workers
    if workers.bind:
        from router.curve import check_tcp_endpoint

        try:
            check_tcp_endpoint(workers.bind, bind=True)
        except ValueError as exc:
            raise SettingsError(f"workers.bind: {exc}") from None
    if bool(workers.key) != bool(workers.allowed_keys):
        raise SettingsError("workers.key and workers.allowed_keys go together (CURVE)")
    if bool(listener.tls_cert) != bool(listener.tls_key):
        raise SettingsError("listener.tls_cert and listener.tls_key go together")
    if settings.audit.syslog:
        from router.audit import syslog_address

        try:
            syslog_address(settings.audit.syslog)
        except ValueError as exc:
            raise SettingsError(f"audit.syslog: {exc}") from None


def render_default_config() -> str:
    """The commented config.toml that ``dicom-router init`` writes."""
    lines = [
        "# dicom-router settings; every key can also come from DICOM_ROUTER_<SECTION>_<KEY>.",
        "",
    ]
    for section, kind in _SECTIONS.items():
        lines.append(f"[{section}]")
        for f in fields(kind):
            default = f.default
            lines.append(f"# {f.name} = {_toml_value(default)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)
