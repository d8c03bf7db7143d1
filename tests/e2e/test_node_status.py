"""`dicom-router status` against a real serve (supervisor, listener, dispatcher, worker,
janitor processes), and the janitor's marking of removed spool files (on SQLite and
PostgreSQL)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import test_forwarding
from ingest_support import HOST, make_dataset, require_dcmtk, write_part10
from test_forwarding import (
    ON_BOTH_DATABASES,
    Destination,
    _cli,
    _configure,
    _serve,
    _wait_for,
    query,
)

node = test_forwarding.node  # the forwarding suite's node fixture


def _status(node: dict[str, object]) -> tuple[int, dict[str, object]]:
    """``status`` with the configuration alone: the node was started with ``serve
    --port``, which status learns from the node's status file."""
    result = subprocess.run(
        _cli("status", "--json", "--timeout", "5"),
        env=node["env"],  # type: ignore[arg-type]
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.returncode, json.loads(result.stdout)


def _pids(report: dict[str, object]) -> dict[str, int]:
    return {p["process"]: p["pid"] for p in report["processes"]}  # type: ignore[attr-defined,index]


def test_status_reports_every_process_and_a_restart(
    node: dict[str, object], tmp_path: Path
) -> None:
    _serve(node, tmp_path / "serve.log")
    code, report = _status(node)
    assert code == 0 and report["up"] is True, report
    assert set(_pids(report)) == {"supervisor", "listener-0", "janitor", "dispatcher", "worker-0"}
    assert "0x0000" in str(report["listener"])
    worker = _pids(report)["worker-0"]
    os.kill(worker, signal.SIGKILL)

    def restarted() -> bool:
        code, report = _status(node)
        entry = next(p for p in report["processes"] if p["process"] == "worker-0")  # type: ignore[attr-defined]
        return code == 0 and entry["restarts"] == 1 and entry["pid"] != worker

    assert _wait_for(restarted, 30), (tmp_path / "serve.log").read_text()[-2000:]
    proc = node["proc"]
    assert isinstance(proc, subprocess.Popen)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    code, report = _status(node)
    assert code == 1 and report["up"] is False and "not running" in str(report["reason"])


def test_status_of_a_node_never_started_fails_with_a_reason(node: dict[str, object]) -> None:
    result = subprocess.run(
        _cli("status"),
        env=node["env"],
        capture_output=True,
        text=True,
        timeout=60,  # type: ignore[arg-type]
    )
    assert result.returncode == 1
    assert result.stderr.strip() == "error: the node is not running (no status file)"


@ON_BOTH_DATABASES
def test_forwarded_files_are_removed_and_marked(node: dict[str, object], tmp_path: Path) -> None:
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
        for i in range(10):
            write_part10(make_dataset("CT"), study / f"{i}.dcm")
        result = subprocess.run(
            [
                require_dcmtk("storescu"),
                "-aec",
                "ROUTER",
                "+sd",
                HOST,
                str(node["port"]),
                str(study),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr

        def all_marked() -> bool:
            rows = query(node, "select spool_removed_at from instances")
            return len(rows) == 10 and all(removed for (removed,) in rows)

        assert _wait_for(all_marked, 60), (tmp_path / "serve.log").read_text()[-2000:]
        store = Path(str(node["data"])) / "spool" / "store"
        assert not any(p.is_file() for p in store.rglob("*"))
    finally:
        pacs.stop()
