"""The user secret store and the listener's User Identity check (PS3.7 D.3.3.7).

A passcode is kept only as a ``hashlib.scrypt`` digest with a random 16-byte salt of
its own and the cost it was made with (DESIGN §1); verification recomputes it and
compares in constant time (``hmac.compare_digest``). Passcodes never reach a log.

``IdentityCheck`` is what the listener asks for each A-ASSOCIATE-RQ. Modes
(``[security] user_identity``): "none" (the sub-item is ignored), "username" (a type 1
or 2 sub-item naming a known user), "password" (type 2, the passcode must match).
Kerberos, SAML and JWT (types 3-5) are not supported: refused when identity is
required (catalogue SEC-08). scrypt costs ~50 ms of CPU, and the check runs on the
listener's event loop, so recent verdicts are remembered by an HMAC of the passcode
under a key of this process (never the passcode itself): a modality that associates
for every instance pays once.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

MODES = ("none", "username", "password")
# scrypt cost: n = 2**14, r = 8, p = 1 (16 MiB, tens of ms: RFC 7914's interactive figure).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1
DIGEST_LENGTH = 32
SALT_LENGTH = 16
MAX_PASSCODE = 1024  # bytes: longer is refused before any hashing (bounded work, SEC-08)
MAX_USERNAME = 64


@dataclass(frozen=True, slots=True)
class Secret:
    """What the database keeps of a user's passcode."""

    salt: bytes
    digest: bytes
    params: str  # "n:r:p"


@dataclass(frozen=True, slots=True)
class StoredUser:
    name: str
    secret: Secret | None  # None: no passcode (identifies by name alone)


def hash_passcode(passcode: bytes, salt: bytes | None = None) -> Secret:
    salt = secrets.token_bytes(SALT_LENGTH) if salt is None else salt
    digest = _scrypt(passcode, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return Secret(salt, digest, f"{SCRYPT_N}:{SCRYPT_R}:{SCRYPT_P}")


def verify_passcode(passcode: bytes, secret: Secret) -> bool:
    try:
        n, r, p = (int(part) for part in secret.params.split(":"))
    except ValueError:
        log.warning("a stored passcode digest has unreadable parameters %r", secret.params)
        return False
    return hmac.compare_digest(_scrypt(passcode, secret.salt, n, r, p), secret.digest)


def _scrypt(passcode: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        passcode, salt=salt, n=n, r=r, p=p, maxmem=256 * r * n + (1 << 20), dklen=DIGEST_LENGTH
    )


def check_username(name: str) -> None:
    if not name or len(name.encode()) > MAX_USERNAME or not name.isprintable():
        raise ValueError(f"user name must be 1-{MAX_USERNAME} printable bytes")


@dataclass(frozen=True, slots=True)
class Verdict:
    accepted: bool
    username: str | None  # as claimed (printable form), for the audit record
    why: str  # for the log and the audit record; never contains the passcode


class IdentityCheck:
    """Decides an A-ASSOCIATE-RQ's User Identity sub-item against the users table.

    ``users`` returns the current users by name (the listener reloads it with its rules);
    it is called at most every ``refresh`` seconds."""

    def __init__(
        self,
        mode: str,
        users: Callable[[], Mapping[str, StoredUser]],
        refresh: float = 2.0,
        remember: int = 256,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"user identity mode must be one of {', '.join(MODES)}")
        self.mode = mode
        self._load = users
        self._refresh = refresh
        self._users: Mapping[str, StoredUser] = {}
        self._loaded_at = -float("inf")
        self._key = secrets.token_bytes(32)
        self._remember = remember
        self._verdicts: OrderedDict[tuple[str, bytes, bytes], bool] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def required(self) -> bool:
        return self.mode != "none"

    def users(self) -> Mapping[str, StoredUser]:
        now = time.monotonic()
        if now - self._loaded_at >= self._refresh:
            try:
                self._users = self._load()
                self._loaded_at = now
            except Exception as exc:  # keep the users we have; the next call retries
                log.warning("could not read the users: %s", exc)
        return self._users

    def decide(self, identity_type: int | None, primary: bytes, secondary: bytes) -> Verdict:
        """``identity_type`` None: the RQ had no User Identity sub-item."""
        if identity_type is None:
            return Verdict(False, None, "no user identity offered (required)")
        claimed = primary.decode("utf-8", "replace")
        shown = claimed if len(claimed) <= MAX_USERNAME else claimed[:MAX_USERNAME] + "..."
        if identity_type not in (1, 2):
            return Verdict(False, None, f"user identity type {identity_type} is not supported")
        if self.mode == "password" and identity_type != 2:
            return Verdict(False, shown, "a passcode is required (identity type 2)")
        user = self.users().get(claimed)
        if user is None:
            return Verdict(False, shown, "unknown user")
        if self.mode == "username":
            return Verdict(True, shown, "known user")
        if user.secret is None:
            return Verdict(False, shown, "the user has no passcode")
        if len(secondary) > MAX_PASSCODE:
            return Verdict(False, shown, "passcode too long")
        if self._verified(user, secondary):
            return Verdict(True, shown, "passcode verified")
        return Verdict(False, shown, "wrong passcode")

    def _verified(self, user: StoredUser, passcode: bytes) -> bool:
        assert user.secret is not None
        tag = hmac.new(self._key, passcode, hashlib.sha256).digest()
        key = (user.name, user.secret.digest, tag)
        with self._lock:
            if key in self._verdicts:
                self._verdicts.move_to_end(key)
                return self._verdicts[key]
        verdict = verify_passcode(passcode, user.secret)
        with self._lock:
            self._verdicts[key] = verdict
            while len(self._verdicts) > self._remember:
                self._verdicts.popitem(last=False)
        return verdict


def read_passcode_stdin(stream: object) -> bytes:
    """One line from ``stream`` (its end of line removed), as UTF-8."""
    line = stream.readline()  # type: ignore[attr-defined]
    text = line.rstrip("\r\n") if isinstance(line, str) else line.decode().rstrip("\r\n")
    return str(text).encode()


__all__ = [
    "MODES",
    "IdentityCheck",
    "Secret",
    "StoredUser",
    "Verdict",
    "check_username",
    "hash_passcode",
    "verify_passcode",
]
