"""The audit trail (router/audit.py, DESIGN §3, §6): every event kind becomes a record
with the parts and codes of a DICOM audit message (PS3.15 A.5); the writer appends one
JSON line per record from several processes at once without interleaving, never raises,
and optionally sends to syslog; `dicom-router audit show` lists and filters."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from protocol.net import AssociationInfo
from protocol.pdu import AAssociateRJ
from router import audit
from router.audit import AuditLog, AuditRecord, audit_path, read_records
from router.cli import _AUDIT_EVENTS, main

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def _code(record: dict[str, Any], *path: str) -> str:
    value: Any = record
    for key in path:
        value = value[key]
    return str(value["csd-code"])


def _received(**changes: Any) -> AuditRecord:
    arguments = {
        "calling_ae": "CT1",
        "called_ae": "ROUTER",
        "peer_host": "10.0.0.7",
        "study_uid": "1.2.3",
        "sop_class_uid": CT_IMAGE,
        "sop_instance_uid": "1.2.3.4",
        **changes,
    }
    return audit.instance_received(**arguments)


def _forwarded(**changes: Any) -> AuditRecord:
    arguments = {
        "calling_ae": "ROUTER",
        "destination": "pacs",
        "ae_title": "PACS",
        "host": "10.0.0.5",
        "study_uid": "1.2.3",
        "sop_class_uid": CT_IMAGE,
        "sop_instance_uid": "1.2.3.4",
        "delivered": True,
        **changes,
    }
    return audit.instance_forwarded(**arguments)


def _info(calling: str = "CT1", called: str = "ROUTER") -> AssociationInfo:
    info = AssociationInfo(1, "10.0.0.7", 40000, calling, called)
    info.contexts = {1: (CT_IMAGE, "1.2.840.10008.1.2.1")}
    return info


def _every_kind() -> list[AuditRecord]:
    return [
        audit.association_accepted(
            local_ae="ROUTER", calling_ae="CT1", called_ae="ROUTER", peer_host="10.0.0.7"
        ),
        *audit.association_records("rejected", _info(), AAssociateRJ(1, 1, 3), "ROUTER"),
        _received(),
        _forwarded(),
        audit.configuration_changed("destination", "add", "pacs", summary="PACS at h:104"),
        audit.application_activity(started=True, ae_title="ROUTER"),
        audit.audit_log_used(Path("audit.jsonl")),
        audit.operation_refused(
            local_ae="ROUTER",
            calling_ae="ECHO1",
            peer_host="10.0.0.7",
            operation="store",
            contexts=2,
        ),
    ]


@pytest.mark.parametrize("kind", [r.event for r in _every_kind()])
def test_every_record_has_the_parts_of_an_a5_audit_message(kind: str) -> None:
    # Built here, not at collection: the record's time is checked against now.
    (record,) = [r for r in _every_kind() if r.event == kind]
    data = json.loads(record.to_json())
    assert data["event"] in audit.EVENTS
    event = data["EventIdentification"]
    assert event["EventID"]["codeSystemName"] == "DCM"
    assert event["EventID"]["csd-code"].startswith("1101")
    assert event["EventActionCode"] in ("C", "R", "U", "D", "E")
    assert event["EventOutcomeIndicator"] in (0, 4, 8, 12)
    when = dt.datetime.fromisoformat(event["EventDateTime"])
    assert event["EventDateTime"].endswith("Z") and when.utcoffset() == dt.timedelta(0)
    assert abs(dt.datetime.now(dt.UTC) - when) < dt.timedelta(minutes=1)
    assert data["ActiveParticipant"]
    for participant in data["ActiveParticipant"]:
        assert participant["UserID"]
        assert isinstance(participant["UserIsRequestor"], bool)
        if "NetworkAccessPointID" in participant:
            assert participant["NetworkAccessPointTypeCode"] in (1, 2)
    source = data["AuditSourceIdentification"]
    assert source["AuditSourceID"] and source["AuditSourceTypeCode"]["csd-code"] == "4"
    for item in data.get("ParticipantObjectIdentification", []):
        assert item["ParticipantObjectID"]
        assert item["ParticipantObjectIDTypeCode"]["csd-code"]
    assert "\n" not in record.to_json() and record.to_json().isascii()


def test_association_accepted_and_refused_are_security_alerts_of_node_authentication() -> None:
    accepted = audit.association_records("accepted", _info(), None, "ROUTER")
    (refused,) = audit.association_records(
        "rejected", _info(called="WRONG"), AAssociateRJ(1, 1, 7), "ROUTER"
    )
    for record in (accepted[0].as_dict(), refused.as_dict()):
        assert _code(record, "EventIdentification", "EventID") == "110113"
        assert _code(record, "EventIdentification", "EventTypeCode", 0) == "110126"
        requestor, node = record["ActiveParticipant"]
        assert requestor["UserIsRequestor"] and requestor["AlternativeUserID"] == "AETITLES=CT1"
        assert requestor["NetworkAccessPointID"] == "10.0.0.7"
        assert requestor["NetworkAccessPointTypeCode"] == 2
        assert not node["UserIsRequestor"] and node["AlternativeUserID"] == "AETITLES=ROUTER"
        (peer,) = record["ParticipantObjectIdentification"]
        assert peer["ParticipantObjectID"] == "10.0.0.7"
        assert peer["ParticipantObjectIDTypeCode"]["csd-code"] == "110182"  # Node ID
    assert accepted[0].outcome == audit.SUCCESS
    assert refused.outcome == audit.MINOR_FAILURE
    assert "reason 7 (called-AE-title-not-recognized)" in refused.description
    detail = refused.as_dict()["ParticipantObjectIdentification"][0]["ParticipantObjectDetail"]
    assert detail[0]["type"] == "Alert Description" and "'WRONG'" in detail[0]["value"]


def test_an_operation_refused_is_a_security_alert_of_a_restricted_function() -> None:
    """Catalogue SEC-05: a source's contexts for an operation it may not use."""
    record = audit.operation_refused(
        local_ae="ROUTER", calling_ae="ECHO1", peer_host="10.0.0.7", operation="store", contexts=2
    ).as_dict()
    assert record["event"] == "operation-refused"
    assert _code(record, "EventIdentification", "EventID") == "110113"
    assert _code(record, "EventIdentification", "EventTypeCode", 0) == "110132"
    assert record["EventIdentification"]["EventOutcomeIndicator"] == audit.MINOR_FAILURE
    description = record["EventIdentification"]["EventOutcomeDescription"]
    assert "'ECHO1' may not store" in description and "2 presentation context(s)" in description
    requestor, node = record["ActiveParticipant"]
    assert requestor["UserID"] == "ECHO1" and requestor["NetworkAccessPointID"] == "10.0.0.7"
    assert not node["UserIsRequestor"]


def test_an_unknown_calling_ae_is_also_an_authentication_failure() -> None:
    refused, failure = audit.association_records(
        "rejected", _info(calling="INTRUDER"), AAssociateRJ(1, 1, 3), "ROUTER"
    )
    assert refused.event == "association-refused"
    data = failure.as_dict()
    assert data["event"] == "authentication-failure"
    assert _code(data, "EventIdentification", "EventID") == "110114"  # User Authentication
    assert _code(data, "EventIdentification", "EventTypeCode", 0) == "110122"  # Login
    assert data["EventIdentification"]["EventActionCode"] == "E"
    assert data["EventIdentification"]["EventOutcomeIndicator"] == audit.MINOR_FAILURE
    claimed = data["ActiveParticipant"][0]
    assert claimed["UserID"] == "INTRUDER" and claimed["UserIsRequestor"]
    assert claimed["NetworkAccessPointID"] == "10.0.0.7"
    # Limits and other refusals are not authentication failures.
    for reject in (AAssociateRJ(2, 3, 2), AAssociateRJ(1, 1, 7), AAssociateRJ(1, 1, 1)):
        records = audit.association_records("rejected", _info(), reject, "ROUTER")
        assert [r.event for r in records] == ["association-refused"]
    assert audit.association_records("closed", _info(), None, "ROUTER") == []


def test_instance_received_is_dicom_instances_transferred_with_study_and_instance() -> None:
    data = _received().as_dict()
    event = data["EventIdentification"]
    assert _code(data, "EventIdentification", "EventID") == "110104"
    assert event["EventActionCode"] == "C" and event["EventOutcomeIndicator"] == 0
    source, destination = data["ActiveParticipant"]
    assert source["RoleIDCode"]["csd-code"] == "110153" and source["UserIsRequestor"]
    assert source["UserID"] == "CT1" and source["NetworkAccessPointID"] == "10.0.0.7"
    assert destination["RoleIDCode"]["csd-code"] == "110152"
    assert destination["AlternativeUserID"] == "AETITLES=ROUTER"
    assert destination["UserID"] == str(os.getpid())  # the process, as in our own logs
    (study,) = data["ParticipantObjectIdentification"]
    assert study["ParticipantObjectID"] == "1.2.3"
    assert study["ParticipantObjectTypeCode"] == 2 and study["ParticipantObjectTypeCodeRole"] == 3
    assert study["ParticipantObjectIDTypeCode"]["csd-code"] == "110180"
    assert study["SOPClass"] == [
        {"UID": CT_IMAGE, "NumberOfInstances": 1, "Instance": [{"UID": "1.2.3.4"}]}
    ]
    # The same bytes again: the receiver already held them (Read, not Create).
    assert _received(duplicate=True).action == "R"
    # Without a Study Instance UID there is no study object (and never a patient one).
    assert "ParticipantObjectIdentification" not in _received(study_uid=None).as_dict()


def test_instance_forwarded_names_the_destination_and_its_outcome() -> None:
    data = _forwarded().as_dict()
    assert _code(data, "EventIdentification", "EventID") == "110104"
    assert data["EventIdentification"]["EventActionCode"] == "R"  # the audit source sent it
    sender, receiver = data["ActiveParticipant"]
    assert sender["UserIsRequestor"] and sender["RoleIDCode"]["csd-code"] == "110153"
    assert sender["AlternativeUserID"] == "AETITLES=ROUTER"
    assert receiver["UserID"] == "PACS" and receiver["UserName"] == "pacs"
    assert receiver["RoleIDCode"]["csd-code"] == "110152" and not receiver["UserIsRequestor"]
    assert receiver["NetworkAccessPointID"] == "10.0.0.5"
    dead = _forwarded(delivered=False, description="0xC000: cannot understand").as_dict()
    assert dead["EventIdentification"]["EventOutcomeIndicator"] == audit.SERIOUS_FAILURE
    assert dead["EventIdentification"]["EventOutcomeDescription"] == "0xC000: cannot understand"


@pytest.mark.parametrize(
    ("kind", "type_code", "role"),
    [
        ("destination", "110128", 16),  # Network Configuration, Data Destination
        ("source", "110129", 13),  # Security Configuration, Security Resource
        ("rule", "110131", 23),  # Software Configuration, Routing Criteria
        ("queue", "110131", 20),  # Software Configuration, Job
    ],
)
def test_configuration_changes_are_security_alerts_by_who_and_what(
    kind: str, type_code: str, role: int
) -> None:
    data = audit.configuration_changed(kind, "remove", "x").as_dict()
    assert _code(data, "EventIdentification", "EventID") == "110113"
    assert _code(data, "EventIdentification", "EventTypeCode", 0) == type_code
    (user,) = data["ActiveParticipant"]
    assert user["UserIsRequestor"] and "@" in user["UserID"]  # login@host
    (thing,) = data["ParticipantObjectIdentification"]
    assert thing["ParticipantObjectID"] == f"dicom-router:{kind}/x"
    assert thing["ParticipantObjectTypeCodeRole"] == role
    assert {"type": "Action", "value": "remove"} in thing["ParticipantObjectDetail"]


def test_application_activity_and_audit_log_used() -> None:
    start = audit.application_activity(started=True, ae_title="ROUTER").as_dict()
    stop = audit.application_activity(started=False, ae_title="ROUTER").as_dict()
    assert _code(start, "EventIdentification", "EventID") == "110100"
    assert _code(start, "EventIdentification", "EventTypeCode", 0) == "110120"
    assert _code(stop, "EventIdentification", "EventTypeCode", 0) == "110121"
    assert start["ActiveParticipant"][0]["RoleIDCode"]["csd-code"] == "110150"
    used = audit.audit_log_used(Path("/x/audit.jsonl")).as_dict()
    assert _code(used, "EventIdentification", "EventID") == "110101"
    (log,) = used["ParticipantObjectIdentification"]
    assert log["ParticipantObjectID"] == "file:///x/audit.jsonl"
    assert log["ParticipantObjectName"] == "Security Audit Log"


# -- the writer ----------------------------------------------------------------------------
_WRITER = """
import sys
from pathlib import Path
from router import audit
log = audit.AuditLog(Path(sys.argv[1]))
for i in range(int(sys.argv[3])):
    # Long lines (past a page and PIPE_BUF): interleaving would show.
    log.write(audit.configuration_changed("rule", "add", f"{sys.argv[2]}-{i}", summary="x" * 6000))
"""


def test_several_processes_append_whole_lines_without_interleaving(tmp_path: Path) -> None:
    path = audit_path(tmp_path / "data")
    writers = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(path), f"p{n}", "150"])
        for n in range(4)
    ]
    assert [writer.wait(60) for writer in writers] == [0, 0, 0, 0]
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    names = [
        json.loads(line)["ParticipantObjectIdentification"][0]["ParticipantObjectID"]
        for line in lines[:-1]
    ]
    assert len(names) == 600
    for n in range(4):
        mine = [name for name in names if name.startswith(f"dicom-router:rule/p{n}-")]
        assert mine == [f"dicom-router:rule/p{n}-{i}" for i in range(150)]  # in order
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_one_write_puts_a_batch_as_lines_in_order(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl")
    log.write(*(_received(sop_instance_uid=f"1.2.{i}") for i in range(5)))
    log.write()  # nothing: no empty line
    records, bad = read_records(tmp_path / "a.jsonl")
    assert bad == 0
    uids = [
        r["ParticipantObjectIdentification"][0]["SOPClass"][0]["Instance"][0]["UID"]
        for r in records
    ]
    assert uids == [f"1.2.{i}" for i in range(5)]


def test_a_failing_writer_warns_once_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    log = AuditLog(blocker / "audit" / "audit.jsonl")  # its directory cannot be made
    with caplog.at_level(logging.WARNING, logger="router.audit"):
        log.write(_received())
        log.write(_received(), _forwarded())
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "cannot be written" in caplog.records[0].message
    # A disk that fails mid-run (ENOSPC), then recovers.
    good = AuditLog(tmp_path / "ok" / "audit.jsonl")
    good.write(_received())
    real_write = os.write

    def full(fd: int, data: Any) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="router.audit"):
        good.write(_received())
        good.write(_received())
        monkeypatch.setattr(os, "write", real_write)
        good.write(_forwarded())
    messages = [r.message for r in caplog.records]
    assert len(messages) == 2 and "again" in messages[1]
    events = [r["event"] for r in read_records(tmp_path / "ok" / "audit.jsonl")[0]]
    assert events == ["instance-received", "instance-forwarded"]


def test_a_broken_record_does_not_reach_the_association(caplog: pytest.LogCaptureFixture) -> None:
    class Exploding(AuditLog):
        def write(self, *records: AuditRecord) -> None:
            raise AssertionError("not reached")

    observe = audit.association_observer(Exploding(Path("/nonexistent/a.jsonl")), "ROUTER")
    broken = AssociationInfo(1, "10.0.0.7", 1)
    broken.contexts = None  # type: ignore[assignment]  # len() of it fails
    with caplog.at_level(logging.WARNING, logger="router.audit"):
        observe("accepted", broken, None)
    assert "could not build" in caplog.text


def test_records_also_go_to_syslog_over_udp(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        server.settimeout(5)
        port = server.getsockname()[1]
        log = AuditLog(tmp_path / "a.jsonl", syslog=f"udp://127.0.0.1:{port}")
        log.write(_received())
        datagram = server.recv(65536).decode()
        log.close()
    # <PRI>: facility 10 (security/authorization), severity 6 (info) for a success
    assert datagram.startswith(f"<{10 * 8 + 6}>dicom-router: {{")
    assert json.loads(datagram.split(": ", 1)[1])["event"] == "instance-received"
    assert (tmp_path / "a.jsonl").exists()  # the file is written too


def test_an_absent_syslog_is_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="router.audit"):
        log = AuditLog(tmp_path / "a.jsonl", syslog=str(tmp_path / "no-such-socket"))
        log.write(_received())
        log.write(_received())
    assert len(read_records(tmp_path / "a.jsonl")[0]) == 2
    assert caplog.text.count("cannot be sent to syslog") == 1


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("udp://logs.example:1514", (("logs.example", 1514), socket.SOCK_DGRAM)),
        ("tcp://10.0.0.9:6514", (("10.0.0.9", 6514), socket.SOCK_STREAM)),
        ("udp://logs.example", (("logs.example", 514), socket.SOCK_DGRAM)),
        ("udp://[::1]:514", (("::1", 514), socket.SOCK_DGRAM)),
        ("/dev/log", ("/dev/log", None)),
    ],
)
def test_syslog_targets(target: str, expected: object) -> None:
    assert audit.syslog_address(target) == expected


@pytest.mark.parametrize("target", ["syslog.example:514", "udp://:514", "tcp://h:99999", "x"])
def test_bad_syslog_targets_are_refused(target: str) -> None:
    with pytest.raises(ValueError, match="syslog target"):
        audit.syslog_address(target)


def test_reading_skips_lines_that_are_not_records(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    AuditLog(path).write(_received())
    with path.open("ab") as f:
        f.write(b'{"torn": \n[1, 2]\n\n')
    AuditLog(path).write(_forwarded())
    records, bad = read_records(path)
    assert [r["event"] for r in records] == ["instance-received", "instance-forwarded"]
    assert bad == 2
    assert read_records(tmp_path / "absent.jsonl") == ([], 0)


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("15m", 900), ("2h", 7200), ("7d", 604800), ("30", 30)]
)
def test_durations(text: str, seconds: float) -> None:
    assert audit.parse_duration(text).total_seconds() == seconds


# -- the command ---------------------------------------------------------------------------
def test_the_cli_knows_every_event() -> None:
    assert tuple(_AUDIT_EVENTS) == audit.EVENTS


def test_audit_show_lists_configuration_changes_and_filters(tmp_path: Path) -> None:
    runner = CliRunner()
    data = tmp_path / "data"

    def run(*args: str, ok: bool = True) -> Any:
        result = runner.invoke(main, ["--data-dir", str(data), *args], env={"COLUMNS": "250"})
        assert (result.exit_code == 0) is ok, (result.output, result.stderr)
        return result

    run("init")
    run("destinations", "add", "pacs", "--aet", "PACS", "--host", "10.0.0.5", "--port", "104")
    run("rules", "add", "ct", "--when", "Modality == CT", "--to", "pacs")
    run("rules", "disable", "ct")
    run("sources", "add", "CT1", "--address", "10.0.0.0/24")
    run("queue", "retry", "--destination", "pacs")
    run("rules", "add", "bad", "--when", "Nope == 1", "--to", "pacs", ok=False)  # no record
    # An old record, written as a listener would have.
    old = audit.association_accepted(
        local_ae="ROUTER", calling_ae="OLD", called_ae="ROUTER", peer_host="10.0.0.8"
    )
    old = dataclasses.replace(old, when=old.when - dt.timedelta(days=2))
    AuditLog(audit_path(data)).write(old)

    records = json.loads(run("audit", "show", "--json").stdout)
    changes = [r for r in records if r["event"] == "configuration-changed"]
    objects = [c["ParticipantObjectIdentification"][0]["ParticipantObjectID"] for c in changes]
    assert objects == [
        "dicom-router:destination/pacs",
        "dicom-router:rule/ct",
        "dicom-router:rule/ct",
        "dicom-router:source/CT1",
        "dicom-router:queue/destination pacs",
    ]
    assert records[-1]["event"] == "association-accepted"  # the old one, written last
    recent = json.loads(run("audit", "show", "--since", "1h", "--json").stdout)
    assert "association-accepted" not in {r["event"] for r in recent}
    # Reading the log was audited (A.5.3.2): the first show left a record.
    assert "audit-log-used" in {r["event"] for r in recent}
    only = json.loads(run("audit", "show", "--event", "configuration-changed", "--json").stdout)
    assert {r["event"] for r in only} == {"configuration-changed"} and len(only) == 5
    last = json.loads(run("audit", "show", "--limit", "2", "--json").stdout)
    assert len(last) == 2 and last[-1]["event"] == "audit-log-used"

    table = run("audit", "show", "--event", "configuration-changed").stdout
    for text in ("time", "event", "outcome", "participants", "configuration-changed", "pacs"):
        assert text in table
    bad = run("audit", "show", "--since", "soon", ok=False)
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]
    assert "--since" in bad.stderr
    run("audit", "show", "--event", "nope", ok=False)


def test_audit_disabled_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOM_ROUTER_AUDIT_ENABLED", "false")
    runner = CliRunner()
    data = ["--data-dir", str(tmp_path / "data")]
    assert runner.invoke(main, [*data, "init"]).exit_code == 0
    add = ["destinations", "add", "pacs", "--aet", "PACS", "--host", "h", "--port", "104"]
    assert runner.invoke(main, [*data, *add]).exit_code == 0
    assert runner.invoke(main, [*data, "audit", "show"]).exit_code == 0
    assert not audit_path(tmp_path / "data").exists()
