"""``dicom-router check``: every setting that leaves the node open (DESIGN §6).

Pure: settings, destinations, sources, users and file modes in, findings out. A finding is
"open" when it lets someone on the network do more than a careful operator would allow
(any calling AE may store, traffic in clear, secrets readable by others), "note" when
it is worth knowing but often deliberate (listening on every interface).
"""

from __future__ import annotations

import ipaddress
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router.settings import Settings

OPEN = "open"
NOTE = "note"


@dataclass(frozen=True, slots=True)
class Finding:
    level: str  # OPEN or NOTE
    setting: str
    value: str
    why: str


def check_settings(settings: Settings) -> Iterator[Finding]:
    listener = settings.listener
    if listener.accept == "any":
        yield Finding(
            OPEN,
            "listener.accept",
            "any",
            'every calling AE title may store; use "known" and `dicom-router sources add`',
        )
    if not listener.check_called_ae:
        yield Finding(
            OPEN,
            "listener.check_called_ae",
            "false",
            f"associations to any called AE title are accepted, not only {listener.ae_title!r}",
        )
    if not listener.tls_cert:
        yield Finding(
            OPEN,
            "listener.tls_cert",
            "(none)",
            "the listener takes associations in clear text (PS3.15 B.1 TLS is off)",
        )
    elif not listener.tls_require_client_cert:
        yield Finding(
            NOTE,
            "listener.tls_require_client_cert",
            "false",
            "TLS peers are not authenticated by certificate",
        )
    yield from _check_user_identity(settings)
    if not _is_loopback(listener.bind):
        yield Finding(
            NOTE,
            "listener.bind",
            listener.bind or "(all)",
            "the listener is reachable from other hosts",
        )
    if not settings.audit.enabled:
        yield Finding(
            NOTE,
            "audit.enabled",
            "false",
            "associations, refusals and transfers leave no audit record (PS3.15 A.5)",
        )
    if settings.metrics.enabled and not _is_loopback(settings.metrics.bind):
        yield Finding(
            NOTE,
            "metrics.bind",
            settings.metrics.bind,
            "metrics (destination names, counts) are served to other hosts without auth",
        )


def _check_user_identity(settings: Settings) -> Iterator[Finding]:
    mode = settings.security.user_identity
    if mode == "none":
        yield Finding(
            OPEN,
            "security.user_identity",
            "none",
            "peers need no user identity (PS3.7 D.3.3.7); "
            'set "password" and `dicom-router users add NAME --password-stdin`',
        )
    elif mode == "username":
        yield Finding(
            NOTE,
            "security.user_identity",
            "username",
            "a user name alone, with no passcode, is accepted as identity",
        )
    if mode == "password" and not settings.listener.tls_cert:
        yield Finding(
            NOTE,
            "security.user_identity",
            "password",
            "passcodes travel in clear without listener TLS",
        )


def check_users(users: Iterable[Any], mode: str) -> Iterator[Finding]:
    """The users table against the identity mode (``Repository.list_users``)."""
    users = list(users)
    if mode != "none" and not users:
        yield Finding(NOTE, "users", "(none)", "identity is required and no user is defined")
    if mode == "password":
        for user in users:
            if not user.has_passcode:
                yield Finding(
                    NOTE, f"users.{user.name}", "no passcode", "cannot log in (mode password)"
                )


def check_sources(sources: Iterable[Any], accept: str) -> Iterator[Finding]:
    """The sources table against the accept policy (``Repository.list_sources``): with
    accept = "any" the table is not read, so a source's limits hold nobody back."""
    if accept != "any":
        return
    for source in sources:
        if tuple(source.operations) != ("echo", "store"):
            yield Finding(
                OPEN,
                f"sources.{source.ae_title}",
                f"allow {','.join(source.operations)}",
                'not enforced: with listener.accept = "any" every calling AE may echo and store',
            )


def check_destinations(destinations: Iterable[Any]) -> Iterator[Finding]:
    for destination in destinations:
        if destination.tls is None and not _is_loopback(destination.host):
            yield Finding(
                OPEN,
                f"destinations.{destination.name}",
                f"{destination.host}:{destination.port}",
                "instances are forwarded in clear text (no --tls)",
            )


def check_files(paths: Iterable[Path]) -> Iterator[Finding]:
    """Secrets and patient data must not be readable by other users (SEC-20)."""
    for path in paths:
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            continue
        if mode & stat.S_IRWXO:
            yield Finding(
                OPEN, str(path), oct(stat.S_IMODE(mode)), "open to every user (chmod o-rwx)"
            )
        elif mode & stat.S_IRWXG:
            yield Finding(NOTE, str(path), oct(stat.S_IMODE(mode)), "open to the file's group")


def node_files(settings: Settings, config_file: Path | None = None) -> list[Path]:
    """The node's files that hold secrets or patient data (``config_file``: the one in
    use, when it is not the data directory's)."""
    audit = settings.data_dir / "audit"
    paths = [settings.data_dir, settings.data_dir / "config.toml", settings.spool_dir]
    paths += [audit, audit / "audit.jsonl"]
    database = settings.database_url
    if database.startswith("sqlite:///"):
        paths.append(Path(database[len("sqlite:///") :]))
    paths += [path for path, _ in secret_files(settings, config_file)]
    return list(dict.fromkeys(paths))


def config_file_in_use(given: str | None, settings: Settings, environ: Any = None) -> Path | None:
    """The TOML file ``load_settings`` read: ``--config``, else DICOM_ROUTER_CONFIG, else
    the data directory's config.toml when there is one."""
    import os

    env = os.environ if environ is None else environ
    name = given or env.get("DICOM_ROUTER_CONFIG")
    if name:
        return Path(name)
    return settings.config_path if settings.config_path.is_file() else None


def secret_files(
    settings: Settings, config_file: Path | None = None, destinations: Iterable[Any] = ()
) -> list[tuple[Path, str]]:
    """(path, what it is) of the files whose contents are secrets (catalogue SEC-20):
    private keys (the listener's TLS key, the node's CURVE key, destinations' TLS
    client keys) and a config file that holds a database password."""
    files: list[tuple[Path, str]] = []
    if settings.listener.tls_key:
        files.append((Path(settings.listener.tls_key), "the listener's TLS key"))
    if settings.workers.key:
        files.append((Path(settings.workers.key), "the node's CURVE secret key"))
    for destination in destinations:
        key = getattr(destination.tls, "key", None)
        if key:
            files.append((Path(key), f"the TLS key of destination {destination.name}"))
    if config_file is not None and _names_a_password(config_file):
        files.append((config_file, "the config file (it holds a database password)"))
    return files


def open_secrets(files: Iterable[tuple[Path, str]]) -> Iterator[str]:
    """One line for each secret file the group or other users may access: what
    ``serve`` warns of at start-up (SEC-20), and ``check`` lists too."""
    for path, what in files:
        for finding in check_files([path]):
            yield f"{what} {path} is {finding.why} (mode {finding.value})"


def _names_a_password(path: Path) -> bool:
    """A ``db`` URL with a password in it (``postgresql+psycopg://user:secret@host/db``)."""
    import tomllib
    from urllib.parse import urlsplit

    try:
        with path.open("rb") as f:
            url = tomllib.load(f).get("db", "")
        return isinstance(url, str) and bool(urlsplit(url).password)
    except (OSError, ValueError):  # unreadable or not TOML: settings said so already
        return False


def _is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
