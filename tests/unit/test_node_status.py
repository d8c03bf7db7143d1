"""The supervisor's status file and `dicom-router status`'s reading of it
(router/status.py): processes are up only when alive and children of that supervisor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from router.status import NodeStatusFile, read_node_status, status_path


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_no_file_means_not_running(tmp_path: Path) -> None:
    status = read_node_status(tmp_path)
    assert not status.running and not status.healthy
    assert "not running" in status.reason


def test_live_children_of_a_live_supervisor_are_up(
    tmp_path: Path, child: subprocess.Popen[bytes]
) -> None:
    record = NodeStatusFile(tmp_path)  # written by this process: it is the "supervisor"
    record.node_started()
    record.child_started("worker-0", child.pid)
    status = read_node_status(tmp_path)
    assert status.healthy and status.reason == ""
    assert [(p.name, p.up) for p in status.processes] == [("supervisor", True), ("worker-0", True)]
    assert oct(status_path(tmp_path).stat().st_mode & 0o777) == "0o600"


def test_a_dead_child_is_down_and_restarts_are_counted(
    tmp_path: Path, child: subprocess.Popen[bytes]
) -> None:
    record = NodeStatusFile(tmp_path)
    record.node_started()
    record.child_started("listener-0", child.pid)
    child.kill()
    child.wait()
    status = read_node_status(tmp_path)
    assert status.running and not status.healthy
    assert status.reason == "down: listener-0"
    record.child_started("listener-0", os.getpid())  # restarted (pid not our child: down)
    [_, listener] = read_node_status(tmp_path).processes
    assert listener.restarts == 1 and not listener.up


def test_a_stale_file_of_a_dead_supervisor_reads_down(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    path = status_path(tmp_path)
    path.parent.mkdir()
    path.write_text(json.dumps({"pid": proc.pid, "started": 0, "children": {}}))
    status = read_node_status(tmp_path)
    assert not status.running and "is not running" in status.reason


def test_a_clean_stop_removes_the_file(tmp_path: Path) -> None:
    record = NodeStatusFile(tmp_path)
    record.node_started()
    record.node_stopped()
    assert not status_path(tmp_path).exists()


def test_an_unreadable_file_is_reported(tmp_path: Path) -> None:
    path = status_path(tmp_path)
    path.parent.mkdir()
    path.write_text("{not json")
    assert "unreadable status file" in read_node_status(tmp_path).reason
