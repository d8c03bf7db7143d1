"""`dicom-router` commands (DESIGN §7): every command, its --json form, and the refusal of
bad arguments before anything is written (one line on stderr, non-zero exit status)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import generate_uid

from router.cli import main

Run = Callable[..., Result]


@pytest.fixture
def run(tmp_path: Path) -> Run:
    runner = CliRunner()

    def invoke(*args: str, ok: bool = True) -> Result:
        result = runner.invoke(main, ["--data-dir", str(tmp_path / "data"), *args])
        if ok:
            assert result.exit_code == 0, (result.output, result.stderr)
        else:
            assert result.exit_code != 0, result.output
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
            assert "Traceback" not in result.output + result.stderr
        return result

    return invoke


@pytest.fixture
def initialised(run: Run) -> Run:
    run("init")
    return run


def _json(result: Result) -> object:
    return json.loads(result.stdout)


def test_init_creates_the_data_directory_and_is_repeatable(run: Run, tmp_path: Path) -> None:
    run("init")
    run("init")
    data = tmp_path / "data"
    assert (data / "router.sqlite").exists()
    assert (data / "config.toml").exists()
    assert (data / "spool" / "store" / "ff").is_dir()
    run("db", "upgrade")


def test_commands_before_init_say_to_run_init(run: Run) -> None:
    result = run("rules", "list", ok=False)
    assert "dicom-router init" in result.stderr


def test_destinations_add_list_remove(initialised: Run) -> None:
    run = initialised
    added = _json(
        run(
            "destinations",
            "add",
            "pacs",
            "--aet",
            "PACS",
            "--host",
            "10.0.0.5",
            "--port",
            "104",
            "--json",
        )
    )
    assert added == {
        "name": "pacs",
        "ae_title": "PACS",
        "host": "10.0.0.5",
        "port": 104,
        "max_associations": 2,
        "max_retries": 10,
        "tls": False,
        "tls_ca": None,
        "tls_cert": None,
        "tls_key": None,
    }
    assert [d["name"] for d in _json(run("destinations", "list", "--json"))] == ["pacs"]  # type: ignore[index, union-attr]
    assert "pacs" in run("destinations", "list").stdout
    run("destinations", "remove", "pacs", "--json")
    assert _json(run("destinations", "list", "--json")) == []


@pytest.mark.parametrize(
    "args",
    [
        ("pacs", "--aet", "A_TITLE_THAT_IS_TOO_LONG", "--host", "h", "--port", "104"),
        ("pacs", "--aet", "BAD\\AE", "--host", "h", "--port", "104"),
        ("pacs", "--aet", "PACS", "--host", "h", "--port", "70000"),
        ("../x", "--aet", "PACS", "--host", "h", "--port", "104"),
    ],
)
def test_destinations_add_refuses_bad_arguments(initialised: Run, args: tuple[str, ...]) -> None:
    initialised("destinations", "add", *args, ok=False)
    assert _json(initialised("destinations", "list", "--json")) == []


def test_destination_duplicates_unknowns_and_in_use_are_refused(initialised: Run) -> None:
    run = initialised
    run("destinations", "add", "pacs", "--aet", "PACS", "--host", "h", "--port", "104")
    run("destinations", "add", "pacs", "--aet", "PACS", "--host", "h", "--port", "104", ok=False)
    run("destinations", "remove", "nosuch", ok=False)
    run("rules", "add", "all", "--to", "pacs")
    assert "rule" in run("destinations", "remove", "pacs", ok=False).stderr


def test_rules_add_list_show_enable_disable_remove(initialised: Run) -> None:
    run = initialised
    run("destinations", "add", "pacs", "--aet", "PACS", "--host", "h", "--port", "104")
    rule = _json(
        run(
            "rules",
            "add",
            "ct",
            "--when",
            "Modality == CT",
            "--when",
            "calling_aet in CT1,CT2",
            "--to",
            "pacs",
            "--priority",
            "5",
            "--stop",
            "--json",
        )
    )
    assert rule == {
        "name": "ct",
        "priority": 5,
        "enabled": True,
        "stop": True,
        "when": ["Modality == CT", "calling_aet in CT1,CT2"],
        "to": ["pacs"],
    }
    assert _json(run("rules", "show", "ct", "--json")) == rule
    assert "Modality == CT" in run("rules", "show", "ct").stdout
    run("rules", "disable", "ct")
    assert _json(run("rules", "list", "--json"))[0]["enabled"] is False  # type: ignore[index]
    run("rules", "enable", "ct", "--json")
    assert _json(run("rules", "list", "--json"))[0]["enabled"] is True  # type: ignore[index]
    run("rules", "remove", "ct")
    assert _json(run("rules", "list", "--json")) == []
    run("rules", "show", "ct", ok=False)


@pytest.mark.parametrize(
    ("when", "reason"),
    [
        ("Modalty == CT", "Modalty"),
        ("StudyDescription matches ([", "regular expression"),
        ("StudyDate < yesterday", "date"),
        ("peer_address in 10.0.0.0/33", "10.0.0.0/33"),
        ("Modality", ""),
    ],
)
def test_rules_add_refuses_bad_conditions_before_writing(
    initialised: Run, when: str, reason: str
) -> None:
    run = initialised
    run("destinations", "add", "pacs", "--aet", "PACS", "--host", "h", "--port", "104")
    result = run("rules", "add", "r", "--when", when, "--to", "pacs", ok=False)
    assert reason in result.stderr
    assert _json(run("rules", "list", "--json")) == []


def test_rules_add_refuses_an_unknown_destination(initialised: Run) -> None:
    assert "nosuch" in initialised("rules", "add", "r", "--to", "nosuch", ok=False).stderr


def _dicom(path: Path, modality: str) -> Path:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = modality
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


def test_rules_test_is_a_dry_run_that_explains(initialised: Run, tmp_path: Path) -> None:
    run = initialised
    run("destinations", "add", "pacs", "--aet", "PACS", "--host", "h", "--port", "104")
    run("rules", "add", "ct", "--when", "Modality == CT", "--to", "pacs")
    files = tmp_path / "files"
    files.mkdir()
    _dicom(files / "ct.dcm", "CT")
    _dicom(files / "mr.dcm", "MR")
    (files / "notes.txt").write_text("not DICOM")
    text = run("rules", "test", str(files)).stdout
    assert "+ ct: matched" in text and "=> pacs" in text
    assert "failed at Modality == CT" in text
    assert "cannot read" in text
    report = {Path(e["file"]).name: e for e in _json(run("rules", "test", str(files), "--json"))}  # type: ignore[union-attr]
    assert report["ct.dcm"]["destinations"] == ["pacs"]
    assert report["mr.dcm"]["destinations"] == []
    assert report["mr.dcm"]["rules"][0]["failed"] == "Modality == CT"
    assert "error" in report["notes.txt"]
    status = _json(run("queue", "status", "--json"))
    [pacs] = status["destinations"]  # every destination is listed, also without jobs
    assert pacs["destination"] == "pacs" and pacs["pending"] == 0
    assert status["instances"] == {}
    assert status["oldest_pending_seconds"] is None and status["attempts"] == 0


def test_sources_add_list_remove_and_bad_cidr(initialised: Run) -> None:
    run = initialised
    run("sources", "add", "CT1", "--address", "10.1.2.0/24", "--address", "10.9.9.9")
    assert _json(run("sources", "list", "--json")) == [
        {"ae_title": "CT1", "addresses": ["10.1.2.0/24", "10.9.9.9"], "allow": ["echo", "store"]}
    ]
    run("sources", "add", "CT2", "--address", "10.0.0.0/33", ok=False)
    run("sources", "remove", "CT1", "--json")
    assert _json(run("sources", "list", "--json")) == []


def test_sources_allow_echo_or_store(initialised: Run) -> None:
    """Catalogue SEC-05: `--allow` on add, `sources allow` later; shown by `list`."""
    run = initialised
    added = _json(run("sources", "add", "ECHO1", "--allow", "echo", "--json"))
    assert added == {"ae_title": "ECHO1", "addresses": [], "allow": ["echo"]}
    run("sources", "add", "CT1", "--allow", "store, echo")
    for bad in ("find", "", "echo,find"):
        run("sources", "add", "CT2", "--allow", bad, ok=False)
    assert _json(run("sources", "allow", "CT1", "store", "--json")) == {
        "ae_title": "CT1",
        "allow": ["store"],
    }
    run("sources", "allow", "GHOST", "echo", ok=False)
    run("sources", "allow", "CT1", "nothing", ok=False)
    assert {s["ae_title"]: s["allow"] for s in _json(run("sources", "list", "--json"))} == {
        "CT1": ["store"],
        "ECHO1": ["echo"],
    }
    table = run("sources", "list").stdout
    assert "allow" in table and "echo, store" not in table


def test_bad_config_file_is_one_line(run: Run, tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[listener\nport = 1\n")
    result = CliRunner().invoke(main, ["--config", str(config), "rules", "list"])
    assert result.exit_code != 0
    assert result.stderr.strip().startswith("error: config file")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.fixture
def echo_scp(tmp_path: Path) -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "protocol", "echoscp", str(port), "-aet", "PACS"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield port
    finally:
        proc.kill()
        proc.wait(10)


def test_destinations_echo_reports_status_and_round_trip(initialised: Run, echo_scp: int) -> None:
    run = initialised
    run(
        "destinations",
        "add",
        "pacs",
        "--aet",
        "PACS",
        "--host",
        "127.0.0.1",
        "--port",
        str(echo_scp),
    )
    report = _json(run("destinations", "echo", "pacs", "--json"))
    assert report["status"] == "0x0000"  # type: ignore[index]
    assert report["round_trip_ms"] > 0  # type: ignore[index]
    assert "status 0x0000" in run("destinations", "echo", "pacs").stdout


def test_destinations_echo_to_nothing_fails_in_one_line(initialised: Run) -> None:
    run = initialised
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run("destinations", "add", "gone", "--aet", "GONE", "--host", "127.0.0.1", "--port", str(port))
    assert (
        "C-ECHO to gone" in run("destinations", "echo", "gone", "--timeout", "2", ok=False).stderr
    )


def test_queue_list_show_retry_purge(initialised: Run, tmp_path: Path) -> None:
    import datetime as dt

    from router.db.engine import make_engine
    from router.db.jobs import JobQueue
    from router.db.models import JobState
    from router.db.repository import NewInstance, Repository

    run = initialised
    run("destinations", "add", "pacs", "--aet", "PACS", "--host", "h", "--port", "104")
    engine = make_engine(f"sqlite:///{tmp_path / 'data' / 'router.sqlite'}")
    repo = Repository(engine)
    repo.record_instances(
        [
            NewInstance(
                sop_instance_uid="1.2.3.4",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax="1.2.840.10008.1.2.1",
                study_instance_uid=None,
                calling_aet="CT1",
                called_aet="ROUTER",
                peer_address="10.0.0.9",
                spool_name="ab/" + "c" * 32 + ".dcm",
                size=10,
                digest="d" * 64,
                destinations=("pacs",),
                unrouted=False,
            )
        ]
    )
    queue = JobQueue(engine)
    (lease,) = queue.lease("test", None, 1, 30)
    queue.finish(
        lease,
        JobState.DEAD,
        outcome="dead",
        started_at=dt.datetime.now(dt.UTC),
        duration_ms=3,
        dimse_status=0xC000,
        error="status 0xC000",
    )
    engine.dispose()

    jobs = _json(run("queue", "list", "--state", "dead", "--json"))
    assert [(j["id"], j["last_status"]) for j in jobs] == [(lease.job_id, "0xC000")]  # type: ignore[index, union-attr]
    shown = _json(run("queue", "show", str(lease.job_id), "--json"))
    assert shown["sop_instance_uid"] == "1.2.3.4"  # type: ignore[index]
    assert shown["attempts_history"][0]["status"] == "0xC000"  # type: ignore[index]
    assert "status 0xC000" in run("queue", "show", str(lease.job_id)).stdout
    run("queue", "show", "999", ok=False)
    run("queue", "retry", ok=False)
    assert _json(run("queue", "retry", "--destination", "pacs", "--json")) == {"retried": 1}
    assert _json(run("queue", "list", "--state", "pending", "--json"))[0]["attempts"] == 0  # type: ignore[index]
    assert _json(run("queue", "purge", "--state", "dead", "--yes", "--json")) == {"purged": 0}
