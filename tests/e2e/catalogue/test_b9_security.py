"""Catalogue B.9 (SEC) against a live node with ``accept = "known"``: AE title checks
and address pinning (SEC-01..04), operations per peer (SEC-05), a TLS client on the plain
port (SEC-11), the audit trail (SEC-16), PHI canaries (SEC-17), log forging (SEC-18)
and metacharacters stored and matched literally (SEC-19).

User identity (SEC-06..08) is in test_b9_security_identity.py, TLS on the listener and
towards destinations (SEC-10, 12..15) in test_b9_security_tls.py: their nodes refuse
the invariant's plain, identity-less good peers, and the lock-out after wrong passcodes
(SEC-09, P2) in test_b9_security_lockout.py. SEC-20 (P2: secrets readable by others)
starts a node of its own.

The module's node knows the sources GOODSCU, GOODECHO and E2E-SCU (the good peers,
any address), PINNED (only from 10.9.9.9), ECHOONLY and STOREONLY (allowed one
operation each) and a source whose AE title holds shell metacharacters; a rule "meta"
matches a PatientName full of SQL metacharacters.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import (
    ABORT_1,
    CT_IMAGE,
    EXPLICIT_LE,
    HOST,
    IMPLICIT_LE,
    VERIFICATION,
    RawPeer,
    abort_8,
    catalogue_dataset,
    dataset_bytes,
    parse_ac,
    store_pdata,
)
from pydicom.uid import generate_uid

from tests.e2e.catalogue.conftest import CatalogueNode
from tests.e2e.ingest_support import require_dcmtk, write_part10

ARTIM = 2.0
WITHIN = 15.0  # seconds for an answer on a loaded machine (not what is tested)
SHELL_AET = "A;$(touch X)`"  # 13 characters, legal in an AE title (PS3.5 AE: no \\ or controls)
SQL_NAME = "x'); DROP TABLE jobs;--"
CANARY_NAME, CANARY_ID = "CANARY^PHI", "PHI-CANARY-123"


@pytest.fixture(scope="module")
def catalogue_node(
    tmp_path_factory: pytest.TempPathFactory, configured_data_dir: Path
) -> Iterator[CatalogueNode]:
    env = {
        "DICOM_ROUTER_LISTENER_ACSE_TIMEOUT": str(ARTIM),
        "DICOM_ROUTER_LISTENER_ACCEPT": "known",
        "DICOM_ROUTER_EVENT_LOOP": "asyncio",
    }
    node = CatalogueNode(tmp_path_factory.mktemp("catalogue-sec"), env)
    shutil.copytree(configured_data_dir, node.data_dir, symlinks=True)
    _configure(node)
    try:
        node.start()
        node.good_store(2)
        node.good_echo()
        yield node
    finally:
        node.kill()


def _configure(node: CatalogueNode) -> None:
    """Sources, a destination and a rule, through the repository (what the CLI calls;
    the CLI's own tests cover the commands, and each process start costs seconds here)."""
    from router.db import Repository, make_engine
    from router.rules import RuleSpec, parse_condition

    engine = make_engine(f"sqlite:///{node.db_path}")
    try:
        repository = Repository(engine)
        for source in ("GOODSCU", "GOODECHO", "E2E-SCU", "MODALITY", SHELL_AET):
            repository.add_source(source)
        repository.add_source("PINNED", ["10.9.9.9"])
        repository.add_source("ECHOONLY", operations=["echo"])
        repository.add_source("STOREONLY", operations=["store"])
        repository.add_destination("meta", "META", HOST, 9)
        condition = parse_condition(f"PatientName == {SQL_NAME}")
        repository.add_rule(RuleSpec("meta", 100, True, False, (condition,), ("meta",)))
    finally:
        engine.dispose()


def _audit(node: CatalogueNode) -> list[dict[str, object]]:
    path = node.data_dir / "audit" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _store(node: CatalogueNode, tmp: Path, calling: str, **attributes: str) -> str:
    ds = catalogue_dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    path = write_part10(ds, tmp / f"{ds.SOPInstanceUID}.dcm")
    argv = [require_dcmtk("storescu"), "-aet", calling, "-aec", "ROUTER", HOST, str(node.port)]
    result = subprocess.run([*argv, str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return str(ds.SOPInstanceUID)


# -- SEC-01..04: AE titles and addresses ---------------------------------------------------
def test_sec_01_unknown_calling_ae_is_rejected_1_1_3_and_audited(catalogue_node, invariant):
    before = len(_audit(catalogue_node))
    invariant.expect_warning(r"rejected \(result 1, source 1, reason 3\)")
    with invariant.during(), RawPeer(HOST, catalogue_node.port) as peer:
        peer.send(_rq(calling="STRANGER"))
        peer.expect_reject(1, 1, 3, WITHIN)
    new = _audit(catalogue_node)[before:]
    refused = [r for r in new if r["event"] == "association-refused"]
    assert len(refused) == 1 and "STRANGER" in json.dumps(refused[0])
    event = refused[0]["EventIdentification"]
    assert event["EventID"]["csd-code"] == "110113"  # type: ignore[index]
    assert any(r["event"] == "authentication-failure" for r in new)


def test_sec_02_wrong_called_ae_is_rejected_1_1_7(catalogue_node, invariant):
    invariant.expect_warning(r"rejected \(result 1, source 1, reason 7\)")
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.send(_rq(called="NOTROUTER", calling="GOODSCU"))
        peer.expect_reject(1, 1, 7, WITHIN)


def test_sec_03_known_calling_ae_from_another_address_is_rejected_1_1_3(catalogue_node, invariant):
    invariant.expect_warning(r"rejected \(result 1, source 1, reason 3\)")
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.send(_rq(calling="PINNED"))
        peer.expect_reject(1, 1, 3, WITHIN)


@pytest.mark.parametrize(
    ("called", "calling", "expected"),
    [
        (b"ROUTER          ", b"GOODSCU         ", None),
        (b"  ROUTER        ", b"GOODSCU         ", None),  # leading spaces: not significant
        (b"ROUTER          ", b"   GOODSCU      ", None),
        (b"router          ", b"GOODSCU         ", (1, 1, 7)),  # case-sensitive
        (b"ROUTER          ", b"goodscu         ", (1, 1, 3)),
        (b" " * 16, b"GOODSCU         ", (1, 1, 7)),  # an all-space title never matches
        (b"ROUTER          ", b" " * 16, (1, 1, 3)),
    ],
    ids=["exact", "leading-called", "leading-calling", "lower-called", "lower-calling",
         "blank-called", "blank-calling"],
)  # fmt: skip
def test_sec_04_ae_comparison(catalogue_node, invariant, called, calling, expected):
    """Spaces around an AE title are not significant (PS3.5 AE); otherwise the match is
    exact and case-sensitive (README, Security); an all-space title never matches."""
    if expected is None:
        invariant.expect_no_warning()
    else:
        invariant.expect_warning(rf"rejected \(result 1, source 1, reason {expected[2]}\)")
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.send(_rq(called_raw=called, calling_raw=calling))
        if expected is None:
            pdu_type, _ = peer.recv_pdu(WITHIN)
            assert pdu_type == 0x02
            peer.release()
        else:
            peer.expect_reject(*expected, WITHIN)


# -- SEC-05: operations per source --------------------------------------------------------
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
STORAGE_CONTEXTS = ((3, CT_IMAGE, (EXPLICIT_LE, IMPLICIT_LE)), (5, MR_IMAGE, (IMPLICIT_LE,)))
MIXED_CONTEXTS = ((1, VERIFICATION, (IMPLICIT_LE,)), *STORAGE_CONTEXTS)


def _refused_records(node: CatalogueNode, before: int, calling: str) -> list[dict[str, object]]:
    new = _audit(node)[before:]
    return [r for r in new if r["event"] == "operation-refused" and calling in json.dumps(r)]


def _dcmtk(node: CatalogueNode, tool: str, calling: str, *files: str) -> int:
    argv = [require_dcmtk(tool), "-aet", calling, "-aec", "ROUTER", HOST, str(node.port), *files]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60).returncode


def test_sec_05_a_peer_allowed_to_echo_but_not_to_store(catalogue_node, invariant, tmp_path):
    """ECHOONLY (`sources add ECHOONLY --allow echo`) associates; Verification is
    accepted and answered, its storage contexts are rejected with result 1
    (user-rejection, PS3.8 9.3.3.2), so no C-STORE can be sent on an accepted context;
    one WARNING with the peer's address and one audit record (Security Alert, 110132 Use
    of Restricted Function). DCMTK: echoscu succeeds; storescu finds no accepted context
    and nothing is stored."""
    listed = json.loads(catalogue_node.cli("sources", "list", "--json").stdout)
    assert {"ae_title": "ECHOONLY", "addresses": [], "allow": ["echo"]} in listed
    invariant.expect_warning(
        r"calling AE 'ECHOONLY' may not store: 2 presentation context\(s\) rejected "
        r"\(result 1, user-rejection\)"
    )
    before = len(_audit(catalogue_node))
    with RawPeer(HOST, catalogue_node.port) as peer:
        ac = parse_ac(peer.associate(calling="ECHOONLY", contexts=MIXED_CONTEXTS))
        assert [(cid, result) for cid, result, _ in ac.contexts] == [(1, 0), (3, 1), (5, 1)]
        assert peer.echo(context_id=1) == 0x0000
        peer.release()
    [record] = _refused_records(catalogue_node, before, "ECHOONLY")
    event = record["EventIdentification"]
    assert event["EventID"]["csd-code"] == "110113"  # type: ignore[index]
    assert event["EventTypeCode"][0]["csd-code"] == "110132"  # type: ignore[index]
    assert event["EventOutcomeIndicator"] == 4 and HOST in json.dumps(record)  # type: ignore[index]

    rows = catalogue_node.uids()
    assert _dcmtk(catalogue_node, "echoscu", "ECHOONLY") == 0
    ds = catalogue_dataset()
    path = write_part10(ds, tmp_path / "refused.dcm")
    assert _dcmtk(catalogue_node, "storescu", "ECHOONLY", str(path)) != 0
    assert catalogue_node.uids() == rows and str(ds.SOPInstanceUID) not in rows


def test_sec_05_a_c_store_on_a_rejected_context_is_aborted(catalogue_node, invariant):
    """A peer that sends its C-STORE anyway, on the context answered with result 1,
    gets ABORT-8(6) as for any context not accepted (MP-32); nothing is stored."""
    invariant.expect_warning(r"may not store|context 3, which is not accepted", count=2)
    uid = generate_uid()
    with RawPeer(HOST, catalogue_node.port) as peer:
        ac = parse_ac(peer.associate(calling="ECHOONLY", contexts=MIXED_CONTEXTS))
        assert ac.result(3) == 1
        peer.send(store_pdata(3, 1, CT_IMAGE, uid, dataset_bytes(uid))[0])  # the command
        peer.expect(abort_8(6), WITHIN)
    assert uid not in catalogue_node.uids()


def test_sec_05_a_peer_allowed_to_store_but_not_to_echo(catalogue_node, invariant, tmp_path):
    """STOREONLY (`--allow store`): the storage contexts are accepted and it stores; its
    Verification context is rejected with result 1, so DCMTK's echoscu fails."""
    invariant.expect_warning(r"calling AE 'STOREONLY' may not echo: 1 presentation context")
    before = len(_audit(catalogue_node))
    with RawPeer(HOST, catalogue_node.port) as peer:
        ac = parse_ac(peer.associate(calling="STOREONLY", contexts=MIXED_CONTEXTS))
        assert [(cid, result) for cid, result, _ in ac.contexts] == [(1, 1), (3, 0), (5, 0)]
        peer.release()
    assert len(_refused_records(catalogue_node, before, "STOREONLY")) == 1
    assert _dcmtk(catalogue_node, "echoscu", "STOREONLY") != 0
    uid = _store(catalogue_node, tmp_path, "STOREONLY")
    invariant.acknowledged(uid)


# -- SEC-11: TLS on the plain port ----------------------------------------------------------
def _client_hello() -> bytes:
    """A real TLS ClientHello, as Python's ssl module would send it."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_sec_11_tls_client_on_the_plain_port_gets_abort_1(catalogue_node, invariant):
    """= MP-07 with a genuine ClientHello: PDU type 0x16 in Sta2 is AA-1."""
    hello = _client_hello()
    assert hello[0] == 0x16
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.send(hello)
        peer.expect_abort_and_close(ABORT_1, WITHIN)


# -- SEC-16: the audit trail ---------------------------------------------------------------
def test_sec_16_audit_trail_of_the_node(catalogue_node, invariant, tmp_path):
    """Accepted and refused associations, instances received and the application start
    are DICOM audit records (PS3.15 A.5) with the peer's address. Instances forwarded and
    the syslog transport are covered by tests/e2e/test_audit.py and tests/unit/test_audit.py
    (this node has no workers)."""
    invariant.expect_warning(r"rejected \(result 1, source 1, reason 3\)")
    before = len(_audit(catalogue_node))
    uid = _store(catalogue_node, tmp_path, "GOODSCU")
    invariant.acknowledged(uid)
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.send(_rq(calling="NOBODY"))
        peer.expect_reject(1, 1, 3, WITHIN)
    records = _audit(catalogue_node)
    events = {str(r["event"]) for r in records[before:]}
    assert {"association-accepted", "association-refused", "instance-received"} <= events
    assert "application-start" in {str(r["event"]) for r in records} or any(
        r["EventIdentification"]["EventID"]["csd-code"] == "110100"  # type: ignore[index]
        for r in records
    )
    received = [r for r in records[before:] if r["event"] == "instance-received"]
    assert uid in json.dumps(received) and HOST in json.dumps(received)


# -- SEC-17: PHI canary --------------------------------------------------------------------
def test_sec_17_phi_canary_never_in_logs_or_cli_output(catalogue_node, invariant, tmp_path):
    """The node logs at -v (INFO); the canary's name and ID appear nowhere in its log, in
    the CLI's default output or in the audit trail (UIDs only)."""
    uid = _store(catalogue_node, tmp_path, "GOODSCU", PatientName=CANARY_NAME, PatientID=CANARY_ID)
    invariant.acknowledged(uid)
    probe = write_part10(_canary(), tmp_path / "probe.dcm")  # the canary for `rules test`
    outputs = [
        catalogue_node.cli("queue", "list", "--json").stdout,
        catalogue_node.cli("audit", "show").stdout,
        catalogue_node.cli("rules", "test", str(probe)).stdout,
    ]
    text = catalogue_node.log_since(0) + "".join(outputs)
    text += (catalogue_node.data_dir / "audit" / "audit.jsonl").read_text()
    for canary in (CANARY_NAME, CANARY_ID, "CANARY PHI"):
        assert canary not in text


def _canary():  # type: ignore[no-untyped-def]
    ds = catalogue_dataset()
    ds.PatientName, ds.PatientID = CANARY_NAME, CANARY_ID
    return ds


# -- SEC-18: log forging -------------------------------------------------------------------
@pytest.mark.parametrize(
    "calling", [b"EVIL\nINFO fake  ", b"\x1b[31mRED\x1b[0m  \r"], ids=["newline", "ansi"]
)
def test_sec_18_peer_text_is_escaped_in_the_log(catalogue_node, invariant, calling):
    """An AE title with a newline or terminal escapes: refused (not a source), and its
    one log record shows it repr-escaped on one line; no forged line appears."""
    invariant.expect_warning(r"rejected \(result 1, source 1, reason 3\)")
    offset = catalogue_node.log_size()
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.send(_rq(calling_raw=calling.ljust(16)[:16]))
        peer.expect_reject(1, 1, 3, WITHIN)
    text = catalogue_node.log_since(offset)
    assert "\x1b" not in text and "\r" not in text
    assert not any(line.startswith("INFO fake") for line in text.splitlines())


# -- SEC-19: metacharacters ----------------------------------------------------------------
def test_sec_19_sql_and_shell_metacharacters_are_literal(catalogue_node, invariant, tmp_path):
    """A PatientName full of SQL metacharacters matches the rule that names it, as text;
    a calling AE title with shell metacharacters is a known source, stored as given, and
    no shell ever runs it."""
    matched = _store(catalogue_node, tmp_path, SHELL_AET, PatientName=SQL_NAME)
    other = _store(catalogue_node, tmp_path, "GOODSCU", PatientName="x")
    invariant.acknowledged(matched)
    invariant.acknowledged(other)
    rows = catalogue_node.query(
        "select i.sop_instance_uid, i.calling_aet, d.name from instances i"
        " left join jobs j on j.instance_id = i.id"
        " left join destinations d on d.id = j.destination_id"
        " where i.sop_instance_uid in (?, ?)",
        matched,
        other,
    )
    by_uid: dict[str, set[object]] = {}
    for uid, _, name in rows:
        by_uid.setdefault(str(uid), set()).add(name)
    assert "meta" in by_uid[matched] and "meta" not in by_uid[other]
    assert {str(aet) for u, aet, _ in rows if u == matched} == {SHELL_AET}
    assert catalogue_node.query("select count(*) from jobs")[0][0] > 0  # the table is there
    assert not (catalogue_node.cwd / "X").exists() and not Path("X").exists()


# -- SEC-20 (P2): secrets readable by others ---------------------------------------------
def test_sec_20_a_readable_tls_key_is_warned_of_at_start_and_named_by_check(tmp_path):
    """serve with a listener TLS key of mode 0644 starts (a warning, not a refusal: a
    chmod must not take a hospital's router down) and logs one WARNING naming the key,
    what it is and its mode; `dicom-router check` lists it as open. The config file with
    a database password and the other keys: tests/unit/test_check.py."""
    from tests.e2e.security_support import SecureNode

    key, cert = tmp_path / "server.key", tmp_path / "server.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-days", "1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    key.chmod(0o644)
    env = {"DICOM_ROUTER_LISTENER_TLS_CERT": str(cert), "DICOM_ROUTER_LISTENER_TLS_KEY": str(key)}
    node = SecureNode(tmp_path / "node", env=env)
    try:
        node.serve(workers=0)
        warnings = [line for line in node.log().splitlines() if " WARNING " in line]
        named = [line for line in warnings if str(key) in line]
        assert len(named) == 1, warnings
        assert "the listener's TLS key" in named[0] and "open to every user" in named[0]
        assert "0o644" in named[0]
    finally:
        node.stop()
    found = {r["setting"]: r["level"] for r in json.loads(node.cli("check", "--json").stdout)}
    assert found[str(key)] == "open"


def _rq(**fields: object) -> bytes:
    from harness import associate_rq

    return associate_rq(**fields)  # type: ignore[arg-type]
