"""Catalogue SEC-09: failed authentications per peer address and the temporary lock-out
(router/lockout.py), and the listener's identity gate using it (router/node.py)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from protocol.items import UserIdentityRQ, UserInformation
from protocol.net import AssociationInfo
from protocol.pdu import AAssociateRQ
from router.audit import AuditRecord
from router.lockout import PeerLockout
from router.node import IDENTITY_REJECT, identity_gate
from router.users import IdentityCheck, StoredUser, Verdict, hash_passcode


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_max_failures_within_the_window_lock_the_address_out_for_a_while() -> None:
    clock = Clock()
    lockout = PeerLockout(3, window=60, lockout=300, clock=clock)
    assert [lockout.failed("10.0.0.9") for _ in range(3)] == [False, False, True]
    assert lockout.locked_for("10.0.0.9") == 300
    assert lockout.locked_for("10.0.0.8") == 0  # other peers unaffected
    clock.now += 299
    assert lockout.locked_for("10.0.0.9") == pytest.approx(1)
    clock.now += 1
    assert lockout.locked_for("10.0.0.9") == 0
    assert [lockout.failed("10.0.0.9") for _ in range(3)] == [False, False, True]  # again


def test_failures_older_than_the_window_do_not_count() -> None:
    clock = Clock()
    lockout = PeerLockout(3, window=60, lockout=300, clock=clock)
    for _ in range(10):
        assert not lockout.failed("10.0.0.9") and not lockout.failed("10.0.0.9")
        clock.now += 61
    assert lockout.locked_for("10.0.0.9") == 0


def test_a_success_clears_the_failures() -> None:
    lockout = PeerLockout(3, window=60, lockout=300, clock=Clock())
    lockout.failed("10.0.0.9")
    lockout.failed("10.0.0.9")
    lockout.succeeded("10.0.0.9")
    assert not lockout.failed("10.0.0.9") and not lockout.failed("10.0.0.9")


def test_zero_never_locks_out() -> None:
    lockout = PeerLockout(0, window=60, lockout=300, clock=Clock())
    assert not any(lockout.failed("10.0.0.9") for _ in range(1000))
    assert lockout.locked_for("10.0.0.9") == 0


def test_the_addresses_remembered_are_bounded() -> None:
    lockout = PeerLockout(2, window=60, lockout=300, clock=Clock(), max_peers=100)
    lockout.failed("victim")
    for n in range(1000):
        lockout.failed(f"10.0.{n // 256}.{n % 256}")
    assert len(lockout._peers) == 100
    assert not lockout.failed("victim")  # forgotten: its first failure counts again


# -- the identity gate ----------------------------------------------------------------------
PASSCODE = b"right"
USERS = {"alice": StoredUser("alice", hash_passcode(PASSCODE, salt=b"s" * 16))}


def _rq(passcode: bytes) -> AAssociateRQ:
    identity = UserIdentityRQ(2, False, b"alice", passcode)
    info = UserInformation(max_length=16384, user_identity_rq=identity)
    return AAssociateRQ("ROUTER", "CT1", (), info)


def test_the_gate_locks_out_a_guessing_address_and_not_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """1000 wrong passcodes from one address: the first 5 are checked, the rest refused
    unchecked, all with the same reject; each failure is audited; one WARNING says the
    address is locked out; another address still logs in."""
    check = CountingCheck("password", lambda: USERS)
    checked = check.checked
    audit = Trail()
    lockout = PeerLockout(5, window=60, lockout=300, clock=Clock())
    gate = identity_gate(check, audit, "ROUTER", lockout)  # type: ignore[arg-type]
    attacker = AssociationInfo(1, "10.6.6.6", 4000)
    with caplog.at_level(logging.INFO, logger="router.node"):
        replies = [gate(attacker, _rq(b"guess-%d" % n)) for n in range(1000)]
    assert replies == [IDENTITY_REJECT] * 1000
    assert len(checked) == 5
    assert gate(attacker, _rq(PASSCODE)) is IDENTITY_REJECT  # locked: not even the right one
    assert len(audit.records) == 1001
    assert all(r.event == "authentication-failure" for r in audit.records)
    assert "locked out for 300 s" in audit.records[4].description
    assert "address locked out for 300 s more" in audit.records[5].description
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "10.6.6.6 locked out for 300 s" in warnings[0].getMessage()
    assert not any(b"guess" in r.getMessage().encode() for r in caplog.records)
    assert gate(AssociationInfo(2, "10.0.0.7", 4000), _rq(PASSCODE)) is None


class CountingCheck(IdentityCheck):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.checked: list[bytes] = []

    def decide(self, identity_type: int | None, primary: bytes, secondary: bytes) -> Verdict:
        self.checked.append(secondary)
        return super().decide(identity_type, primary, secondary)


class Trail:
    def __init__(self) -> None:
        self.records: list[AuditRecord] = []

    def write(self, *records: AuditRecord) -> None:
        self.records.extend(records)
