"""Whether the node is up: the supervisor's status file and the checks of ``status``.

The supervisor keeps ``<data dir>/run/node.json`` (written atomically, mode 0600) with
its own pid and each child's pid, start time and restart count, and removes it on a
clean exit. ``dicom-router status`` reads it and checks each pid against /proc: the
process must be alive and (for children) still a child of that supervisor, so a stale
file or a reused pid reads as "down", never as "up".
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class NodeStatusFile:
    """The supervisor's side: record what it started."""

    def __init__(self, data_dir: Path) -> None:
        self.path = status_path(data_dir)
        self._state: dict[str, Any] = {}

    def node_started(self, listener: dict[str, Any] | None = None) -> None:
        """``listener``: where this run listens (bind, port, ae_title), which ``serve``
        flags may have set apart from the configuration ``status`` reads."""
        self._state = {"pid": os.getpid(), "started": time.time(), "children": {}}
        if listener is not None:
            self._state["listener"] = listener
        self._write()

    def child_started(self, name: str, pid: int | None) -> None:
        children = self._state.setdefault("children", {})
        previous = children.get(name)
        restarts = previous["restarts"] + 1 if previous else 0
        children[name] = {"pid": pid, "started": time.time(), "restarts": restarts}
        self._write()

    def node_stopped(self) -> None:
        self.path.unlink(missing_ok=True)

    def _write(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        temp = self.path.with_suffix(".tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self._state, f)
        os.replace(temp, self.path)


def status_path(data_dir: Path) -> Path:
    return data_dir / "run" / "node.json"


@dataclass(frozen=True, slots=True)
class ProcessStatus:
    name: str
    pid: int | None
    up: bool
    restarts: int
    uptime: float | None  # seconds since its (re)start, when up


@dataclass(frozen=True, slots=True)
class NodeStatus:
    running: bool  # the supervisor is alive
    processes: tuple[ProcessStatus, ...]
    reason: str  # why not all up ("" when all are)
    listener: dict[str, Any] | None = None  # bind, port, ae_title of the running node

    @property
    def healthy(self) -> bool:
        return self.running and all(p.up for p in self.processes)


def read_node_status(data_dir: Path, now: float | None = None) -> NodeStatus:
    now = time.time() if now is None else now
    try:
        state = json.loads(status_path(data_dir).read_text())
        pid = int(state["pid"])
        children = dict(state["children"])
    except FileNotFoundError:
        return NodeStatus(False, (), "the node is not running (no status file)")
    except (ValueError, KeyError, TypeError) as exc:
        return NodeStatus(False, (), f"unreadable status file: {exc}")
    supervisor_up = _alive(pid)
    processes = [
        ProcessStatus("supervisor", pid, supervisor_up, 0, _uptime(state, now, supervisor_up))
    ]
    for name, child in sorted(children.items()):
        child_pid = child.get("pid")
        up = supervisor_up and child_pid is not None and _parent(child_pid) == pid
        processes.append(
            ProcessStatus(
                name, child_pid, up, int(child.get("restarts", 0)), _uptime(child, now, up)
            )
        )
    down = [p.name for p in processes if not p.up]
    if not supervisor_up:
        reason = f"the supervisor (pid {pid}) is not running: the node is down"
    elif down:
        reason = "down: " + ", ".join(down)
    else:
        reason = ""
    listener = state.get("listener")
    return NodeStatus(
        supervisor_up, tuple(processes), reason, listener if isinstance(listener, dict) else None
    )


def _uptime(entry: dict[str, Any], now: float, up: bool) -> float | None:
    started = entry.get("started")
    return max(0.0, now - float(started)) if up and started is not None else None


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after it.
    return text[text.rfind(")") + 2 :].split()


def _alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def _parent(pid: int) -> int | None:
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return int(fields[1])


def leftover_processes(data_dir: Path) -> list[tuple[str, int]]:
    """Processes of an earlier run on this data directory that are still alive: its
    supervisor, and children, orphaned ones too (a SIGKILLed supervisor's children get
    SIGTERM from the kernel, but finish their in-flight work first). A new node must not
    recover the spool under a listener that may still commit and acknowledge."""
    try:
        state = json.loads(status_path(data_dir).read_text())
        entries = [("supervisor", int(state["pid"]))]
        entries += [
            (name, int(child["pid"]))
            for name, child in dict(state["children"]).items()
            if child.get("pid") is not None
        ]
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return []
    return [(name, pid) for name, pid in entries if pid != os.getpid() and _ours(pid)]


def _ours(pid: int) -> bool:
    """Alive and a Python process of this program (not a pid reused by another)."""
    if not _alive(pid):
        return False
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    return b"multiprocessing" in command or b"dicom-router" in command or b"router" in command
