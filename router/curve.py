"""ZeroMQ CURVE keys for workers on other hosts (DESIGN §7, ``dicom-router keys``).

A key pair is two files in ZeroMQ's certificate format (what ``zmq.auth`` reads):
``NAME.key`` holds the public and the secret key (mode 0600, never leaves its host) and
``NAME.pub`` the public key alone (handed to the other side). The node's dispatcher
authenticates workers against a directory of their ``.pub`` files, read again at every
connection so that a key removed from it is refused from then on without a restart.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import zmq
import zmq.auth
import zmq.utils.z85

log = logging.getLogger(__name__)

_HEADER = "#   ZeroMQ CURVE {kind} certificate, written by dicom-router {when}\n"


class CurveKeyError(ValueError):
    """A key file that is missing, unreadable or of the wrong kind."""


@dataclass(frozen=True, slots=True)
class KeyPair:
    public: bytes  # Z85, 40 bytes
    secret: bytes


def generate(name: str, directory: Path) -> tuple[Path, Path]:
    """Write ``directory/NAME.key`` (secret, 0600) and ``NAME.pub``; never overwrite."""
    if not name or "/" in name or name.startswith(".") or name != name.strip():
        raise CurveKeyError(f"{name!r} is not a usable key name")
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.curve_keypair()
    when = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    secret_path, public_path = directory / f"{name}.key", directory / f"{name}.pub"
    for path in (secret_path, public_path):
        if path.exists():
            raise CurveKeyError(f"{path} exists; remove it first to make a new key")
    body = f'\nmetadata\ncurve\n    public-key = "{public.decode()}"\n'
    _write_new(
        secret_path,
        _HEADER.format(kind="secret", when=when)
        + "#   Keep this file on its host, readable by the router's user only.\n"
        + body
        + f'    secret-key = "{secret.decode()}"\n',
        0o600,
    )
    _write_new(public_path, _HEADER.format(kind="public", when=when) + body, 0o644)
    return secret_path, public_path


def _write_new(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def load_pair(path: str | os.PathLike[str]) -> KeyPair:
    public, secret = _load(path)
    if secret is None:
        raise CurveKeyError(f"{path} holds no secret key (give the NAME.key file, not NAME.pub)")
    return KeyPair(public, secret)


def load_public(path: str | os.PathLike[str]) -> bytes:
    return _load(path)[0]


def _load(path: str | os.PathLike[str]) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise CurveKeyError(f"cannot read the CURVE key {path}: {exc}") from None
    if len(public) != 40 or (secret is not None and len(secret) != 40):
        raise CurveKeyError(f"{path} is not a CURVE key file (keys are 40 Z85 characters)")
    return public, secret


def allowed_keys(directory: str | os.PathLike[str]) -> set[bytes]:
    """The public keys of the ``*.pub`` files in ``directory`` (unreadable ones skipped)."""
    keys = set()
    for path in sorted(Path(directory).glob("*.pub")):
        try:
            keys.add(load_public(path))
        except CurveKeyError as exc:
            log.warning("allowed workers: %s", exc)
    return keys


class ZapHandler(threading.Thread):
    """The ZAP handler (ZeroMQ RFC 27) of one context: a CURVE client gets in while its
    public key is a ``.pub`` file in ``directory``; every other mechanism is refused.

    A blocking loop in a thread of its own: each request is read and answered in turn,
    so requests arriving together all get an answer (pyzmq's event-loop authenticators
    missed some here and then stopped answering)."""

    ENDPOINT = "inproc://zeromq.zap.01"

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], directory: str) -> None:
        super().__init__(name="zap", daemon=True)
        self._directory = directory
        self._socket = context.socket(zmq.REP)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(self.ENDPOINT)  # in the caller's thread: in place before binds
        self._stopping = threading.Event()

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                if self._socket.poll(200):
                    self._socket.send_multipart(self.answer(self._socket.recv_multipart()))
        finally:
            self._socket.close()

    def stop(self) -> None:
        self._stopping.set()
        self.join(5)

    def answer(self, request: list[bytes]) -> list[bytes]:
        # version, request id, domain, address, identity, mechanism, credentials...
        if len(request) < 6 or request[0] != b"1.0":
            return [b"1.0", request[1] if len(request) > 1 else b"", b"500", b"bad", b"", b""]
        request_id, address, mechanism = request[1], request[3], request[5]
        allowed = False
        if mechanism == b"CURVE" and len(request) >= 7 and len(request[6]) == 32:
            allowed = zmq.utils.z85.encode(request[6]) in allowed_keys(self._directory)
        if allowed:
            return [b"1.0", request_id, b"200", b"OK", b"", b""]
        log.warning(
            "refused a worker from %s: %s",
            address.decode(errors="replace"),
            "its CURVE key is not allowed" if mechanism == b"CURVE" else "no CURVE",
        )
        return [b"1.0", request_id, b"400", b"not allowed", b"", b""]


def check_tcp_endpoint(endpoint: str, *, bind: bool = False) -> None:
    """``tcp://HOST:PORT`` (``*`` as HOST and port 0 only to bind), or ValueError saying
    what is wrong: ZeroMQ's own error names neither the option nor the form."""
    parts = urlsplit(endpoint)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "tcp" or not parts.hostname or port is None or parts.path:
        raise ValueError(f"{endpoint!r} is not tcp://HOST:PORT")
    if not (0 if bind else 1) <= port <= 65535:
        raise ValueError(f"{endpoint!r}: port {port} is out of range")


def is_loopback_endpoint(endpoint: str) -> bool:
    """``tcp://127.0.0.1:7000`` and ``ipc://…`` stay on this host; anything else may not."""
    parts = urlsplit(endpoint)
    if parts.scheme in ("ipc", "inproc"):
        return True
    host = (parts.hostname or "").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name or "*": every interface, or another host
