"""The audit trail end to end (DESIGN §3, §6): a real serve with its listener and worker
processes, DCMTK storescu sending (and once calling the wrong AE title) and a DCMTK
storescp destination; `dicom-router audit show --json` then lists the association
accepted and the one refused with its reason, every instance received and forwarded, and
the configuration changes, with no patient data in the file."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path
from typing import Any

from ingest_support import HOST, make_dataset, require_dcmtk, write_part10
from test_forwarding import (  # the node fixture too
    ON_BOTH_DATABASES,
    Destination,
    _cli,
    _configure,
    _jobs,
    _serve,
    _wait_for,
    node,
)

__all__ = ["node"]


def _audit(node: dict[str, object], *args: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        _cli("audit", "show", "--limit", "10000", "--json", *args),
        env=node["env"],  # type: ignore[arg-type]
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    records: list[dict[str, Any]] = json.loads(result.stdout)
    return records


def _instances(record: dict[str, Any]) -> set[str]:
    return {
        instance["UID"]
        for item in record.get("ParticipantObjectIdentification", [])
        for sop_class in item.get("SOPClass", [])
        for instance in sop_class["Instance"]
    }


def _by(records: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [r for r in records if r["event"] == event]


@ON_BOTH_DATABASES
def test_associations_instances_and_changes_are_audited(
    node: dict[str, object], tmp_path: Path
) -> None:
    pacs = Destination(tmp_path, "pacs")
    pacs.start()
    try:
        _configure(
            node,
            "destinations",
            "add",
            "pacs",
            "--aet",
            "PACS",
            "--host",
            HOST,
            "--port",
            str(pacs.port),
            "--max-associations",
            "1",
        )
        _configure(node, "rules", "add", "all", "--to", "pacs")
        _serve(node, tmp_path / "serve.log")
        study = tmp_path / "study"
        study.mkdir()
        sent = {}
        for i in range(3):
            ds = make_dataset("CT")
            write_part10(ds, study / f"{i}.dcm")
            sent[str(ds.SOPInstanceUID)] = str(ds.StudyInstanceUID)
        storescu = require_dcmtk("storescu")
        port = str(node["port"])
        ok = subprocess.run(
            [storescu, "-aet", "MODALITY", "-aec", "ROUTER", "+sd", HOST, port, str(study)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ok.returncode == 0, ok.stderr
        wrong = subprocess.run(
            [storescu, "-aet", "MODALITY", "-aec", "WRONG", HOST, port, str(study / "0.dcm")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert wrong.returncode != 0
        assert _wait_for(lambda: len(pacs.received()) == 3, 60), (
            tmp_path / "serve.log"
        ).read_text()[-3000:]
        assert _wait_for(lambda: {state for _, state in _jobs(node)} == {"done"}, 30)
        assert _wait_for(lambda: len(_by(_audit(node), "instance-forwarded")) == 3, 30)
    finally:
        pacs.stop()

    records = _audit(node)
    accepted = [
        r
        for r in _by(records, "association-accepted")
        if r["ActiveParticipant"][0]["UserID"] == "MODALITY"
    ]
    assert len(accepted) == 1  # (serve's readiness C-ECHOs are associations too)
    peer, router = accepted[0]["ActiveParticipant"]
    assert peer["UserIsRequestor"] and peer["NetworkAccessPointID"] == HOST
    assert router["AlternativeUserID"] == "AETITLES=ROUTER"

    (refused,) = _by(records, "association-refused")
    event = refused["EventIdentification"]
    assert event["EventOutcomeIndicator"] == 4
    assert "called-AE-title-not-recognized" in event["EventOutcomeDescription"]
    assert refused["ActiveParticipant"][0]["UserID"] == "MODALITY"
    detail = refused["ParticipantObjectIdentification"][0]["ParticipantObjectDetail"][0]
    assert "'WRONG'" in detail["value"]
    assert not _by(records, "authentication-failure")  # the calling AE was not the problem

    received = _by(records, "instance-received")
    assert set().union(*map(_instances, received)) == set(sent)
    for record in received:
        assert record["EventIdentification"]["EventID"]["csd-code"] == "110104"
        assert record["EventIdentification"]["EventActionCode"] == "C"
        (study_object,) = record["ParticipantObjectIdentification"]
        (uid,) = _instances(record)
        assert study_object["ParticipantObjectID"] == sent[uid]

    forwarded = _by(records, "instance-forwarded")
    assert set().union(*map(_instances, forwarded)) == set(sent)
    for record in forwarded:
        assert record["EventIdentification"]["EventOutcomeIndicator"] == 0
        sender, receiver = record["ActiveParticipant"]
        assert sender["UserIsRequestor"] and receiver["UserID"] == "PACS"
        assert receiver["NetworkAccessPointID"] == HOST
        (uid,) = _instances(record)
        assert record["ParticipantObjectIdentification"][0]["ParticipantObjectID"] == sent[uid]

    changes = {
        r["ParticipantObjectIdentification"][0]["ParticipantObjectID"]
        for r in _by(records, "configuration-changed")
    }
    assert changes == {"dicom-router:destination/pacs", "dicom-router:rule/all"}
    assert _by(records, "application-start")

    only = _audit(node, "--event", "association-refused")
    assert [r["event"] for r in only] == ["association-refused"]
    path = Path(str(node["data"])) / "audit" / "audit.jsonl"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert "E2E" not in text and "ACC-E2E" not in text  # no patient name, ID or accession
