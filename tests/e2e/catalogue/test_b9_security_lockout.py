"""Catalogue B.9 SEC-09 (P2): 1 000 wrong passcodes from one address against a node that
requires user identity ([security] user_identity = "password", max_auth_failures = 5):
every one is refused with the reject of a wrong passcode (1, 2, 1) and audited; after the
fifth the address is locked out (one WARNING says so) and refused unchecked, even with the
right passcode; another address (127.0.0.2) logs in meanwhile. router/lockout.py; the
gate's unit test is tests/unit/test_lockout.py.

A node of its own: the lock-out would refuse the other identity cases' good peer, which
connects from the same address."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest
from ingest_support import HOST
from security_support import SecureNode, wait_for

from protocol.acse import build_associate_rq
from protocol.items import UserIdentityRQ
from protocol.pdu import AAbort, AAssociateAC, AAssociateRJ, decode_pdu
from protocol.uids import IMPLICIT_VR_LE, VERIFICATION

PASSCODE = "s3cret-Passcode"
ATTEMPTS = 1000
MAX_FAILURES = 5
OTHER = "127.0.0.2"  # another peer: Linux routes all of 127/8 to the loopback interface


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureNode]:
    env = {
        "DICOM_ROUTER_SECURITY_USER_IDENTITY": "password",
        "DICOM_ROUTER_SECURITY_MAX_AUTH_FAILURES": str(MAX_FAILURES),
        "DICOM_ROUTER_SECURITY_AUTH_FAILURE_WINDOW": "600",
        "DICOM_ROUTER_SECURITY_AUTH_LOCKOUT": "600",
    }
    node = SecureNode(tmp_path_factory.mktemp("lockout"), env=env)
    node.cli("users", "add", "alice", "--password-stdin", stdin=PASSCODE + "\n")
    node.serve(workers=0)
    yield node
    node.kill()


def _associate(port: int, passcode: str, source: str = HOST) -> AAssociateAC | AAssociateRJ:
    identity = UserIdentityRQ(2, False, b"alice", passcode.encode())
    rq = build_associate_rq(
        "ROUTER", "MODALITY", [(VERIFICATION, (IMPLICIT_VR_LE,))], user_identity=identity
    )
    with socket.create_connection((HOST, port), timeout=15, source_address=(source, 0)) as sock:
        sock.sendall(rq.encode())
        header = _read(sock, 6)
        body = _read(sock, int.from_bytes(header[2:6], "big"))
        if header[0] == 0x02:
            sock.sendall(AAbort(0, 0).encode())
    pdu = decode_pdu(header[0], body)
    assert isinstance(pdu, AAssociateAC | AAssociateRJ), pdu
    return pdu


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "connection closed"
        data += chunk
    return data


def _failures(node: SecureNode) -> list[dict[str, object]]:
    path = node.data / "audit" / "audit.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("event") == "authentication-failure"]


def test_sec_09_wrong_passcodes_from_one_address_lock_it_out(node: SecureNode) -> None:
    assert isinstance(_associate(node.port, PASSCODE), AAssociateAC)  # before: fine
    before_log = len(node.log())
    replies = [_associate(node.port, f"guess-{n}") for n in range(ATTEMPTS)]
    assert all(isinstance(r, AAssociateRJ) for r in replies)
    assert {(r.result, r.source, r.reason) for r in replies} == {(1, 2, 1)}  # type: ignore[union-attr]
    # Locked out: even the right passcode is refused, the same way.
    right = _associate(node.port, PASSCODE)
    assert isinstance(right, AAssociateRJ) and (right.result, right.source, right.reason) == (
        1,
        2,
        1,
    )
    # Another peer is not affected, during the lock-out.
    assert isinstance(_associate(node.port, PASSCODE, source=OTHER), AAssociateAC)

    assert wait_for(lambda: len(_failures(node)) >= ATTEMPTS + 1, 30)
    failures = _failures(node)
    assert len(failures) == ATTEMPTS + 1  # every failure audited, none for the good logins
    descriptions = [str(r["EventIdentification"]["EventOutcomeDescription"]) for r in failures]  # type: ignore[index]
    assert sum("wrong passcode" in d for d in descriptions) == MAX_FAILURES
    assert (
        sum("locked out for" in d and "more" in d for d in descriptions)
        == ATTEMPTS + 1 - MAX_FAILURES
    )
    log = node.log()[before_log:]
    locked = [line for line in log.splitlines() if " WARNING " in line and "locked out" in line]
    assert len(locked) == 1 and "address 127.0.0.1 locked out for 600 s" in locked[0]
    assert "guess-" not in log and PASSCODE not in log
