"""Catalogue B.9, user identity (SEC-06, SEC-07, SEC-08): User Identity Negotiation
(PS3.7 D.3.3.7) required by a real node ([security] user_identity = "password"):
`users add` with a scrypt-hashed passcode, our raw RQ, pynetdicom and DCMTK storescu as
peers; a refusal is the reject (1, 2, 1) that PS3.7 D.3.3.7 prescribes (pynetdicom's
transient (2, 2, 1) is the known deviation), one WARNING line with the peer's address
and never the passcode, and an audit record (110114 User Authentication, failure).

The module's node requires identity, so the shared ``invariant`` fixture's good peers
(which offer none) cannot run here; each refusal case checks its own part of the
invariant: the reject, one warning, the audit record, and a good peer right after."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from ingest_support import HOST, make_dataset, require_dcmtk, write_part10
from security_support import SecureNode, wait_for

from protocol.acse import build_associate_rq
from protocol.errors import AssociationRejected
from protocol.items import UserIdentityRQ
from protocol.pdu import AAbort, AAssociateAC, AAssociateRJ, decode_pdu
from protocol.uids import IMPLICIT_VR_LE, VERIFICATION

PASSCODE = "s3cret-Passcode"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureNode]:
    node = SecureNode(
        tmp_path_factory.mktemp("identity"), env={"DICOM_ROUTER_SECURITY_USER_IDENTITY": "password"}
    )
    node.cli("users", "add", "alice", "--password-stdin", stdin=PASSCODE + "\n")
    node.cli("users", "add", "bob")  # name only: cannot log in with mode "password"
    node.serve(workers=0)
    yield node
    node.kill()


def _rq(kind: int, name: bytes, passcode: bytes = b"", positive: bool = True) -> UserIdentityRQ:
    return UserIdentityRQ(kind, positive, name, passcode)


def _associate(port: int, identity: UserIdentityRQ | None) -> bytes | None:
    """A raw A-ASSOCIATE-RQ (our encoder) over a socket: the AC's User Identity server
    response (None: no 0x59 sub-item), or ``AssociationRejected`` with the RJ's fields."""
    rq = build_associate_rq(
        "ROUTER", "MODALITY", [(VERIFICATION, (IMPLICIT_VR_LE,))], user_identity=identity
    )
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(rq.encode())
        header = _read(sock, 6)
        body = _read(sock, int.from_bytes(header[2:6], "big"))
        sock.sendall(AAbort(0, 0).encode())
    pdu = decode_pdu(header[0], body)
    if isinstance(pdu, AAssociateRJ):
        raise AssociationRejected(pdu.result, pdu.source, pdu.reason)
    assert isinstance(pdu, AAssociateAC), pdu
    ac = pdu.user_information.user_identity_ac
    return None if ac is None else ac.server_response


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "connection closed"
        data += chunk
    return data


def _audit(node: SecureNode) -> list[dict[str, object]]:
    """The node's authentication-failure records (its audit file, read directly: the
    `audit show` CLI is tested elsewhere and costs a process start)."""
    path = node.data / "audit" / "audit.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("event") == "authentication-failure"]


def test_users_list_shows_no_secret(node: SecureNode) -> None:
    rows = json.loads(node.cli("users", "list", "--json").stdout)
    assert [(r["name"], r["passcode"]) for r in rows] == [("alice", True), ("bob", False)]
    assert PASSCODE not in json.dumps(rows)
    (salt, digest), *_ = node.query("select salt, digest from users where name = 'alice'")
    assert len(salt) == 16 and len(digest) == 32  # type: ignore[arg-type]
    assert PASSCODE.encode() not in salt + digest  # type: ignore[operator]


def test_sec_07_a_valid_passcode_is_accepted_with_a_response_only_when_asked(
    node: SecureNode,
) -> None:
    assert _associate(node.port, _rq(2, b"alice", PASSCODE.encode())) == b""
    assert _associate(node.port, _rq(2, b"alice", PASSCODE.encode(), positive=False)) is None


@pytest.mark.parametrize(
    "identity",
    [
        None,
        _rq(2, b"alice", b"guess-9f2"),
        _rq(1, b"alice"),
        _rq(2, b"mallory", PASSCODE.encode()),
        _rq(2, b"bob", b"x"),
    ],
    ids=["absent", "wrong-passcode", "username-only", "unknown-user", "no-passcode"],
)
def test_sec_06_refusals_are_the_standard_reject_with_one_warning_and_an_audit_record(
    node: SecureNode, identity: UserIdentityRQ | None
) -> None:
    _refused(node, identity)


@pytest.mark.parametrize(
    "identity",
    [
        _rq(3, b"kerberos-ticket"),
        _rq(4, b"<saml:Assertion/>"),
        _rq(5, b"eyJhbGciOi." * 5000),  # ~55 KB: bounded by the A-ASSOCIATE size cap
    ],
    ids=["kerberos", "saml", "jwt-oversized"],
)
def test_sec_08_unsupported_identity_types_are_refused_when_identity_is_required(
    node: SecureNode, identity: UserIdentityRQ
) -> None:
    _refused(node, identity)


def _refused(node: SecureNode, identity: UserIdentityRQ | None) -> None:
    before_log, before_audit = len(node.log()), len(_audit(node))
    with pytest.raises(AssociationRejected) as refused:
        _associate(node.port, identity)
    assert (refused.value.result, refused.value.source, refused.value.reason) == (1, 2, 1)
    assert wait_for(lambda: len(_audit(node)) == before_audit + 1, 10)
    new = node.log()[before_log:]
    lines = [line for line in new.splitlines() if "user identity refused" in line]
    assert len(lines) == 1 and "127.0.0.1" in lines[0], new
    warnings = [line for line in new.splitlines() if " WARNING " in line]
    assert len(warnings) == 1 and "127.0.0.1" in warnings[0], new
    assert "result 1, source 2, reason 1" in warnings[0]
    assert "guess-9f2" not in new and PASSCODE not in new
    record = _audit(node)[-1]
    event = record["EventIdentification"]
    assert event["EventID"]["csd-code"] == "110114"  # type: ignore[index]
    assert event["EventOutcomeIndicator"] != 0  # type: ignore[index]
    assert "user identity" in json.dumps(record) and "guess-9f2" not in json.dumps(record)
    assert _associate(node.port, _rq(2, b"alice", PASSCODE.encode())) == b""  # a good peer


def test_sec_06_pynetdicom_user_identity(node: SecureNode) -> None:
    from pynetdicom import AE
    from pynetdicom.pdu_primitives import UserIdentityNegotiation

    def identity(passcode: bytes) -> UserIdentityNegotiation:
        item = UserIdentityNegotiation()
        item.user_identity_type = 2
        item.primary_field = b"alice"
        item.secondary_field = passcode
        item.positive_response_requested = True
        return item

    ae = AE("PYNETDICOM")
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate(HOST, node.port, ae_title="ROUTER", ext_neg=[identity(PASSCODE.encode())])
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    response = assoc.acceptor.user_identity
    assert response is not None and response.server_response == b""
    assoc.release()
    assoc = ae.associate(HOST, node.port, ae_title="ROUTER", ext_neg=[identity(b"nope")])
    assert assoc.is_rejected
    primitive = assoc.acceptor.primitive
    assert primitive is not None
    assert (primitive.result, primitive.result_source, primitive.diagnostic) == (1, 2, 1)


def test_sec_06_dcmtk_storescu_user_and_password(node: SecureNode, tmp_path: Path) -> None:
    ds = make_dataset("CT")
    path = write_part10(ds, tmp_path / "ct.dcm")
    base = [require_dcmtk("storescu"), "-aec", "ROUTER", "--user", "alice"]
    ok = subprocess.run(
        [*base, "--password", PASSCODE, HOST, str(node.port), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    uid = str(ds.SOPInstanceUID)
    assert node.query("select count(*) from instances where sop_instance_uid = ?", uid) == [(1,)]
    bad = subprocess.run(
        [*base, "--password", "guess", HOST, str(node.port), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0
    assert "Rejected" in bad.stderr + bad.stdout or "rejected" in (bad.stderr + bad.stdout)
