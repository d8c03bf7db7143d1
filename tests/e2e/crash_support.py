"""Machinery of the crash tests: a forwarding node under ``serve``, DCMTK storescp
destinations that count copies, a killer thread that SIGKILLs the node's processes on a
seeded random schedule, and a sender that re-sends whatever got no success status.

Used by tests/e2e/test_forwarding_crash.py (20 kills during 1,000 instances, in the test
command), tests/e2e/catalogue/test_b7_faults.py (failpoints with forwarding) and
tests/soak/crash_suite.py (on demand: 200 kills of each process type during 10,000).

The node runs one listener, the dispatcher and one worker, with a short lease, so that a
killed worker's leases come due again soon. Two DCMTK storescp destinations (one
association at a time: ``--max-associations 1``, unique file names so that duplicates
can be counted) receive everything through one rule. The sender is our own SCU over a
few associations, paced so that the sending spans the kills; an instance counts as
acknowledged only when its C-STORE got a success status, and anything else is sent again
in the next round once the listener is back. The killer reads the children's pids from
``run/node.json`` (``router/status.py``); the supervisor restarts a killed child. After
a SIGKILL of the supervisor the killer notes which of its children outlived it (none
should for long: PR_SET_PDEATHSIG), kills what is left of serve's process group, and
starts ``serve`` again.

A child that dies within 10 s of its start is restarted after a doubling pause
(router/node.py: 0.5, 1, 2, 4 s ...); the killer kills one child "quickly" at most
``quick_in_a_row`` times in a row, so that the pauses stay short.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import pydicom
from ingest_support import (
    CT_IMAGE,
    EXPLICIT_LE,
    HOST,
    SUCCESS,
    encode_dataset,
    free_port,
    make_dataset,
    open_association,
    require_dcmtk,
)

from protocol.errors import AssociationRejected, ProtocolError
from protocol.net import Association
from router.status import NodeStatus, read_node_status

QUICK = 10.0  # router/node.py: a child dead within this many seconds is restarted later
DESTINATIONS = ("pacs", "archive")
START_TIMEOUT = 45.0
TARGETS = ("worker-0", "dispatcher", "listener-0", "supervisor")


def default_mix(kills: int) -> dict[str, int]:
    """Kills per target: at least one of the supervisor, each type at its share (of 20:
    7 worker, 5 dispatcher, 6 listener, 2 supervisor)."""
    supervisor = max(1, kills // 10)
    dispatcher = kills // 4
    worker = (kills - supervisor - dispatcher + 1) // 2
    listener = kills - supervisor - dispatcher - worker
    return {
        "worker-0": worker,
        "dispatcher": dispatcher,
        "listener-0": listener,
        "supervisor": supervisor,
    }


def make_plan(rng: random.Random, counts: dict[str, int]) -> list[str]:
    """The targets, ``counts[name]`` times each, in a random order."""
    plan = [name for name, count in counts.items() for _ in range(count)]
    rng.shuffle(plan)
    return plan


def make_corpus(instances: int) -> dict[str, bytes]:
    """SOP Instance UID -> a small CT dataset (Explicit VR Little Endian)."""
    corpus = {}
    for _ in range(instances):
        ds = make_dataset("CT", rows=8, columns=8)
        corpus[str(ds.SOPInstanceUID)] = encode_dataset(ds, EXPLICIT_LE)
    return corpus


# --------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------
def cli_argv(*args: str) -> list[str]:
    script = Path(sys.executable).parent / "dicom-router"
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-c", "from router.cli import main; main()", *args]


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (state, ppid, pgrp, ...), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return text[text.rfind(")") + 2 :].split()


def alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
                members.append(int(entry.name))
    return members


def kill_group(pgid: int, timeout: float = 15.0) -> None:
    """SIGKILL every process of the group, and wait until none is left."""
    deadline = time.monotonic() + timeout
    while _group_members(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise AssertionError(f"process group {pgid} survives SIGKILL: {_group_members(pgid)}")
        time.sleep(0.05)


ESTABLISHED = "01"  # include/net/tcp_states.h, as /proc/net/tcp shows it


def _socket_inodes(pids: list[int]) -> set[int]:
    """The inodes of the sockets the processes ``pids`` have open."""
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(int(target[8:-1]))
    return inodes


def _tcp_peer(server_port: int, client_port: int) -> tuple[str, int]:
    """(state, inode) of the accepted end of our connection from ``client_port`` to
    ``server_port`` on this host (/proc/net/tcp, tcp6), or ("", 0). Read after the
    inodes of our processes: an accepted socket is in its process before the
    A-ASSOCIATE-AC is sent, and one that is still ESTABLISHED is still open somewhere."""
    want_local, want_remote = f":{server_port:04X}", f":{client_port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[1].endswith(want_local) and fields[2].endswith(want_remote):
                    return fields[3], int(fields[9])
    return "", 0


def _who_holds(inode: int) -> str:
    """The pid and command line of the process holding socket ``inode`` (a foreign
    acceptor, for the record), if it is visible in our /proc."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and inode in _socket_inodes([int(entry.name)]):
            with contextlib.suppress(OSError):
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                return f"pid {entry.name}: {cmd.strip()[:300]}"
    return "not visible here (another pid namespace?)"


def _log_time(line: str) -> float | None:
    """The wall-clock time of a serve.log line ("2026-12-02 05:10:11,123 INFO ...",
    logging's asctime in local time), or None."""
    try:
        stamp = time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")
        return time.mktime(stamp) + int(line[20:23]) / 1000
    except (ValueError, IndexError):
        return None


class StoreSCP:
    """A DCMTK storescp destination writing every received instance to its own file."""

    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.out = root / f"received-{name}"
        self.out.mkdir(parents=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self._uids: dict[str, str] = {}  # file name -> SOP Instance UID

    def start(self, *extra: str) -> None:
        """Start storescp (``extra``: more of its options, e.g. ``--refuse``)."""
        self.proc = subprocess.Popen(
            [
                require_dcmtk("storescp"),
                *extra,
                "+uf",  # unique file names: a second copy is a second file
                "-aet",
                self.name.upper(),
                "-od",
                str(self.out),
                str(self.port),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "TCP_NODELAY": "1"},
        )

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def received(self) -> collections.Counter[str]:
        """SOP Instance UID -> number of files received with it."""
        for entry in os.scandir(self.out):
            if entry.name in self._uids or not entry.is_file():
                continue
            try:
                ds = pydicom.dcmread(
                    entry.path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]
                )
                self._uids[entry.name] = str(ds.SOPInstanceUID)
            except Exception:  # still being written: read it at the next look
                continue
        return collections.Counter(self._uids.values())


class Node:
    """A node's data directory and its ``serve``, restarted after supervisor kills."""

    def __init__(
        self,
        root: Path,
        seed: int = 0,
        lease_seconds: float = 4,
        env: dict[str, str] | None = None,
        aet: str | None = None,
    ) -> None:
        self.root = root
        self.seed = seed
        # Our AE title (``serve --aet``): a run's own title means that a node of another
        # run that took this port while ours restarted refuses our associations (it
        # checks the called AE) instead of acknowledging instances ours never had.
        self.aet = aet or "ROUTER"
        self.data_dir = root / "data"
        self.log_path = root / "serve.log"
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_ROUTER_")}
        self.env.update(
            {
                "DICOM_ROUTER_DATA_DIR": str(self.data_dir),
                "DICOM_ROUTER_WORKERS_LEASE_SECONDS": str(lease_seconds),
                "DICOM_ROUTER_WORKERS_RETRY_BASE": "0.3",
                "DICOM_ROUTER_WORKERS_RETRY_CAP": "1",
                **(env or {}),
            }
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.started: list[subprocess.Popen[bytes]] = []
        self.lock = threading.Lock()

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            cli_argv(*args),
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, f"dicom-router {' '.join(args)}: {result.stderr}"
        return result.stdout

    def configure(self, destinations: list[StoreSCP]) -> None:
        """init, the destinations, and one rule sending everything to all of them."""
        self.cli("init")
        for scp in destinations:
            self.cli(
                "destinations",
                "add",
                scp.name,
                "--aet",
                scp.name.upper(),
                "--host",
                HOST,
                "--port",
                str(scp.port),
                "--max-associations",
                "1",
            )
        self.cli("rules", "add", "all", "--to", ",".join(scp.name for scp in destinations))

    def start(self, *args: str, timeout: float = START_TIMEOUT) -> None:
        aet = ("--aet", self.aet) if self.aet != "ROUTER" else ()
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen(
                cli_argv("-v", "serve", "--port", str(self.port), "--bind", HOST, *aet, *args),
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        with self.lock:
            self.proc = proc
            self.started.append(proc)
        if not self.wait_healthy(timeout):
            raise AssertionError(f"serve did not come up (seed {self.seed}):\n{self.log_tail()}")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM to serve (graceful); its exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_group(self.proc.pid)
            raise AssertionError(f"serve ignored SIGTERM:\n{self.log_tail()}") from None

    def status(self) -> NodeStatus | None:
        """The status of the current serve, once it has written its own status file."""
        status = read_node_status(self.data_dir)
        proc = self.proc
        if proc is None or not status.processes or status.processes[0].pid != proc.pid:
            return None
        return status

    def wait_healthy(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()
            if status is not None and status.healthy and asyncio.run(self.echo()):
                return True
            if self.proc is not None and self.proc.poll() is not None:
                return False
            time.sleep(0.1)
        return False

    async def echo(self) -> bool:
        try:
            async with open_association(self.port, dimse_timeout=5, called_ae=self.aet) as assoc:
                return self.accepted_by(assoc)[0] != "foreign" and (
                    await assoc.send_c_echo() == SUCCESS
                )
        except (ProtocolError, OSError, TimeoutError):
            return False

    def accepted_by(self, assoc: Association) -> tuple[str, int, int]:
        """Whose socket is the other end of ``assoc``: "ours" (a process of the current
        serve's process group holds it), "gone" (closed already: a killed listener's), or
        "foreign" (an open connection some other process accepted: another process
        shares or took our port); our local port, to find it in serve.log; the inode."""
        transport = assoc._protocol.transport  # a test may peek
        local = transport.get_extra_info("sockname") if transport is not None else None
        proc = self.proc
        if local is None or proc is None:
            return "gone", 0, 0
        ours = _socket_inodes(_group_members(proc.pid))  # before the table: see _tcp_peer
        state, inode = _tcp_peer(self.port, int(local[1]))
        if state != ESTABLISHED or inode == 0:
            return "gone", int(local[1]), inode
        return ("ours" if inode in ours else "foreign"), int(local[1]), inode

    def kill_all(self) -> None:
        for proc in self.started:
            kill_group(proc.pid)
            proc.wait(10)

    def log_tail(self, size: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-size:] if self.log_path.exists() else ""

    def query(self, sql: str, *params: object) -> list[tuple[object, ...]]:
        with contextlib.closing(sqlite3.connect(self.data_dir / "router.sqlite", timeout=30)) as db:
            return db.execute(sql, params).fetchall()

    def job_states(self) -> dict[str, int]:
        rows = self.query("select state, count(*) from jobs group by state")
        return {str(state): int(count) for state, count in rows}  # type: ignore[call-overload]

    def unrecorded_uids(self) -> list[tuple[str, str]]:
        """(spool name, SOP Instance UID) of every store file without an instance row
        whose UID has no row at all (a file of an earlier, unacknowledged attempt of an
        instance recorded since is left out): what the next start's recovery removes as
        never acknowledged."""
        out = []
        recorded = {str(uid) for (uid,) in self.query("select sop_instance_uid from instances")}
        for path in self.spool_leftovers()[1]:
            try:
                meta = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[])
                uid = str(meta.file_meta.MediaStorageSOPInstanceUID)
            except Exception as exc:  # a file cut short: say so
                uid = f"unreadable: {exc}"
            if uid not in recorded:
                out.append((f"{path.parent.name}/{path.name}", uid))
        return out

    def trace(self, uid: str, acked: tuple[float, int] | None) -> dict[str, object]:
        """What the node knows of ``uid``: its instance and job rows, whether their spool
        files exist, its audit records, and serve.log lines of the association that
        acknowledged it (by our local port) within 5 s of the acknowledgement."""
        store = self.data_dir / "spool" / "store"
        instances = self.query(
            "select id, spool_name, state, received_at, spool_removed_at, peer_address"
            " from instances where sop_instance_uid = ?",
            uid,
        )
        jobs = self.query(
            "select j.id, j.instance_id, d.name, j.state, j.attempts, j.deliveries,"
            " j.last_error from jobs j join destinations d on d.id = j.destination_id"
            " join instances i on i.id = j.instance_id where i.sop_instance_uid = ?",
            uid,
        )
        audit_path = self.data_dir / "audit" / "audit.jsonl"
        audit = []
        if audit_path.exists():
            with open(audit_path, errors="replace") as f:
                audit = [line.strip()[:400] for line in f if uid in line]
        lines: list[str] = []
        if acked is not None and self.log_path.exists():
            at, port = acked
            peer = f"127.0.0.1:{port}:"
            with open(self.log_path, errors="replace") as f:
                for line in f:
                    stamp = _log_time(line)
                    near = stamp is not None and abs(stamp - at) <= 5.0
                    if near and (peer in line or "recovery" in line or "ERROR" in line):
                        lines.append(line.rstrip()[:300])
        return {
            "uid": uid,
            "acknowledged_at": acked[0] if acked else None,
            "local_port": acked[1] if acked else None,
            "instance_rows": [list(map(str, row)) for row in instances],
            "spool_files_exist": [(store / str(row[1])).exists() for row in instances],
            "job_rows": [list(map(str, row)) for row in jobs],
            "audit_records": audit,
            "audit_instance_received": any("instance received" in a.lower() for a in audit),
            "log_lines": lines[:60],
        }

    def spool_leftovers(self) -> tuple[list[Path], list[Path]]:
        """Files in spool/tmp, and store files without an instance row."""
        rows = {str(name) for (name,) in self.query("select spool_name from instances")}
        store = self.data_dir / "spool" / "store"
        unrecorded = [p for p in store.rglob("*.dcm") if f"{p.parent.name}/{p.name}" not in rows]
        return list((self.data_dir / "spool" / "tmp").iterdir()), unrecorded


# --------------------------------------------------------------------------------------
# the killer
# --------------------------------------------------------------------------------------
@dataclass
class Kill:
    target: str
    pid: int
    at: float  # seconds since the run began
    uptime: float
    leases: int | None = None  # a worker's leases held when it was killed
    detail: str = ""


@dataclass
class Killer:
    node: Node
    rng: random.Random
    plan: list[str]
    began: float
    gap: tuple[float, float] = (0.2, 1.5)  # seconds between kills
    uptime: tuple[float, float] = (0.3, 4.0)  # a child's least uptime before its kill
    quick_in_a_row: int = 1  # kills of one child within QUICK s of its start, in a row
    orphan_wait: float = 1.0  # seconds children of a killed supervisor may take to exit
    on_kill: Callable[[Kill], None] | None = None  # told of every kill (progress)
    # Kill only when every process is up (the test command), or whenever the chosen
    # target is up, even while others restart (the soak: more kills in its time).
    wait_for_all: bool = True
    stop_kills: threading.Event = field(default_factory=threading.Event)  # no more kills
    start_timeout: float = START_TIMEOUT  # for serve after a supervisor kill
    kills: list[Kill] = field(default_factory=list)
    orphans: list[list[str]] = field(default_factory=list)  # per supervisor kill
    # (wall-clock time, spool name, SOP Instance UID) of the store files without a row
    # that each restart of serve found (its recovery removes them: never acknowledged).
    unrecorded: list[tuple[float, str, str]] = field(default_factory=list)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    cancel: threading.Event = field(default_factory=threading.Event)
    _quick: collections.Counter[str] = field(default_factory=collections.Counter)

    def run(self) -> None:
        try:
            remaining = collections.Counter(self.plan)
            while remaining and not self.stop_kills.is_set():
                if self.cancel.wait(self.rng.uniform(*self.gap)):
                    return
                target, status = self._choose(remaining)
                remaining[target] -= 1
                if not remaining[target]:
                    del remaining[target]
                if target == "supervisor":
                    self._kill_supervisor(status)
                else:
                    self._kill_child(target, status)
                if self.on_kill is not None:
                    self.on_kill(self.kills[-1])
        except BaseException as exc:  # reported by the test thread
            self.error = exc
        finally:
            self.done.set()

    def _choose(self, remaining: collections.Counter[str]) -> tuple[str, NodeStatus]:
        """A random target among those left (weighted by how many kills each has left)
        that may die now: a child up for a random while, or for more than QUICK s if its
        last ``quick_in_a_row`` deaths were quick (so that its restart pause stays short)."""
        least = {
            name: QUICK + 0.5
            if self._quick[name] >= self.quick_in_a_row
            else self.rng.uniform(*self.uptime)
            for name in remaining
        }
        while True:
            status = self._healthy()
            uptime = {p.name: p.uptime if p.up else None for p in status.processes}
            ready = sorted(
                name
                for name in remaining
                if name == "supervisor" or (uptime.get(name) or 0.0) >= least[name]
            )
            if ready:
                weights = [remaining[name] for name in ready]
                return self.rng.choices(ready, weights)[0], status
            time.sleep(0.05)

    def _healthy(self, timeout: float = 60.0) -> NodeStatus:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.cancel.is_set():
            status = self.node.status()
            usable = status is not None and status.running and status.processes[0].up
            if usable and (status.healthy or not self.wait_for_all):  # type: ignore[union-attr]
                return status  # type: ignore[return-value]
            time.sleep(0.05)
        raise AssertionError(
            f"the node did not recover (seed {self.node.seed}):\n{self.node.log_tail()}"
        )

    def _kill_child(self, target: str, status: NodeStatus) -> None:
        child = next(p for p in status.processes if p.name == target)
        assert child.pid is not None
        looked = time.monotonic()
        leases = self._wait_for_leases(child.pid) if target.startswith("worker") else None
        os.kill(child.pid, signal.SIGKILL)
        uptime = float(child.uptime or 0.0) + time.monotonic() - looked
        self._quick[target] = self._quick[target] + 1 if uptime < QUICK else 0
        detail = "" if leases is None else f"holding {leases} leases"
        self.kills.append(
            Kill(target, child.pid, time.monotonic() - self.began, uptime, leases, detail)
        )

    def _wait_for_leases(self, pid: int, timeout: float = 2.0) -> int:
        """Up to ``timeout`` s for the worker to hold leases (it is sending), polled."""
        deadline = time.monotonic() + timeout
        owner = f"worker-{pid}-%"
        with contextlib.closing(
            sqlite3.connect(self.node.data_dir / "router.sqlite", timeout=30)
        ) as db:
            while True:
                (held,) = db.execute(
                    "select count(*) from jobs where state = 'leased' and lease_owner like ?",
                    (owner,),
                ).fetchone()
                if held or time.monotonic() > deadline:
                    return int(held)
                time.sleep(0.01)

    def _kill_supervisor(self, status: NodeStatus) -> None:
        supervisor = status.processes[0]
        assert supervisor.pid is not None and self.node.proc is not None
        os.kill(supervisor.pid, signal.SIGKILL)
        self.node.proc.wait(10)
        self.kills.append(
            Kill(
                "supervisor",
                supervisor.pid,
                time.monotonic() - self.began,
                float(supervisor.uptime or 0.0),
            )
        )
        children = [(p.name, p.pid) for p in status.processes[1:] if p.pid is not None]
        deadline = time.monotonic() + self.orphan_wait  # what outlives it?
        while True:
            survivors = [name for name, pid in children if alive(pid)]
            if not survivors or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        self.orphans.append(survivors)
        self.kills[-1].detail = f"children alive {self.orphan_wait} s later: {survivors or 'none'}"
        kill_group(self.node.proc.pid)  # serve's session: the leftovers
        at = time.time()
        self.unrecorded += [(at, name, uid) for name, uid in self.node.unrecorded_uids()]
        self._quick.clear()  # a new supervisor: no restart pauses yet
        self.node.start(timeout=self.start_timeout)


# --------------------------------------------------------------------------------------
# the sender
# --------------------------------------------------------------------------------------
class ForeignAcceptor(OSError):
    """Our association was accepted by a process not of our node (the port is shared or
    taken): nothing sent on it counts; the round is failed and sent again."""


@dataclass
class Sending:
    corpus: dict[str, bytes]
    allowance: Callable[[], float]  # how many instances may be acknowledged by now
    seed: int = 0
    senders: int = 2
    called_ae: str = "ROUTER"
    # Who accepted an association (Node.accepted_by): checked before anything is sent.
    verify: Callable[[Association], tuple[str, int, int]] | None = None
    # One JSON line per association and per acknowledgement (wall-clock time, our local
    # port as serve.log names the peer), so that a lost instance can be traced.
    journal: Path | None = None
    queue: collections.deque[str] = field(default_factory=collections.deque)
    acknowledged: set[str] = field(default_factory=set)
    acked_at: dict[str, tuple[float, int]] = field(default_factory=dict)  # uid -> time, port
    foreign: list[str] = field(default_factory=list)  # associations others accepted
    refusals: list[tuple[str, int]] = field(default_factory=list)
    failed_rounds: int = 0
    # A-ASSOCIATE-RJ answers: our node accepts its own title, so these came from a
    # process of another run on our port (or from the node's association limit).
    rejections: list[str] = field(default_factory=list)
    _journal: TextIO | None = None

    def _note(self, **record: object) -> None:
        if self._journal is not None:
            print(json.dumps({"t": round(time.time(), 3), **record}), file=self._journal)

    async def _sender(self, port: int) -> None:
        async with open_association(port, dimse_timeout=15, called_ae=self.called_ae) as assoc:
            verdict, local_port, inode = self.verify(assoc) if self.verify else ("ours", 0, 0)
            self._note(event="association", port=local_port, verdict=verdict)
            if verdict == "foreign":
                holder = _who_holds(inode)
                self.foreign.append(f"{time.time():.3f} local port {local_port}: {holder}")
                self._note(event="foreign", port=local_port, holder=holder)
                raise ForeignAcceptor(f"association from port {local_port} accepted by {holder}")
            while self.queue:
                while len(self.acknowledged) >= self.allowance():
                    await asyncio.sleep(0.02)
                if not self.queue:
                    break
                uid = self.queue.popleft()
                try:
                    rsp = await assoc.send_c_store(self.corpus[uid], CT_IMAGE, uid, EXPLICIT_LE)
                except BaseException:
                    self.queue.appendleft(uid)  # no success status: send it again
                    raise
                if rsp.status == SUCCESS:
                    self.acknowledged.add(uid)
                    self.acked_at[uid] = (time.time(), local_port)
                    self._note(event="ack", uid=uid, port=local_port)
                else:
                    self.refusals.append((uid, rsp.status))
                    self.queue.append(uid)

    async def run(self, port: int, deadline: float) -> None:
        with contextlib.ExitStack() as stack:
            if self.journal is not None:
                self._journal = stack.enter_context(open(self.journal, "a", buffering=1))
            try:
                await self._run(port, deadline)
            finally:
                self._journal = None

    async def _run(self, port: int, deadline: float) -> None:
        self.queue.extend(self.corpus)
        while self.queue:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{len(self.queue)} instances never acknowledged (seed {self.seed})"
                )
            results = await asyncio.gather(
                *(self._sender(port) for _ in range(self.senders)), return_exceptions=True
            )
            for result in results:
                if isinstance(result, AssociationRejected):
                    self.rejections.append(f"{time.time():.3f} {result}")
                    self._note(event="rejected", reason=str(result))
                if isinstance(result, ProtocolError | OSError | TimeoutError):
                    self.failed_rounds += 1  # the node is down or restarting: again
                elif isinstance(result, BaseException):
                    raise result
            if self.queue:
                await asyncio.sleep(0.2)


# --------------------------------------------------------------------------------------
# a whole run: send, kill, drain, count
# --------------------------------------------------------------------------------------
@dataclass
class CrashRun:
    """What a run did and found; ``check()`` asserts the crash-safety promises."""

    seed: int
    instances: int
    planned: int  # kills planned (more than made if they were stopped early)
    kills: list[Kill]
    orphans: list[list[str]]
    sent_at: float
    drained_at: float
    acknowledged: set[str]
    corpus: set[str]
    refusals: int
    failed_rounds: int
    lost: dict[str, list[str]]  # destination -> acknowledged UIDs it never received
    duplicates: dict[str, int]  # destination -> copies beyond the first
    duplicated_instances: dict[str, int]  # destination -> instances received twice or more
    states: dict[str, int]
    stuck: list[tuple[object, ...]]
    dead: list[tuple[object, ...]]
    redelivered: int
    leftovers: tuple[int, int]  # temporary files, store files without a row
    log_tail: str
    aet: str = "ROUTER"  # the node's AE title
    foreign: list[str] = field(default_factory=list)  # associations others accepted
    rejections: list[str] = field(default_factory=list)  # A-ASSOCIATE-RJ answers
    # (wall-clock time, spool name, UID) found without a row before restarts of serve
    unrecorded: list[tuple[float, str, str]] = field(default_factory=list)
    traces: list[dict[str, object]] = field(default_factory=list)  # per lost UID
    acked_at: dict[str, tuple[float, int]] = field(default_factory=dict)  # uid -> time, port

    @property
    def unrecorded_acknowledged(self) -> list[tuple[float, str, str]]:
        """Unrecorded files (of UIDs with no row) of instances acknowledged before the
        file was found: recovery removes a file although its store got a success."""
        return [
            u for u in self.unrecorded if u[2] in self.acked_at and self.acked_at[u[2]][0] < u[0]
        ]

    @property
    def by_type(self) -> collections.Counter[str]:
        return collections.Counter(k.target for k in self.kills)

    def report(self, *, each_kill: bool = True) -> str:
        by_type = self.by_type
        during = sum(k.at <= self.sent_at for k in self.kills)
        mid_send = sum(1 for k in self.kills if k.leases)
        outlived = sum(bool(survivors) for survivors in self.orphans)
        lines = [
            f"seed {self.seed}: {self.instances} instances, {len(self.kills)} kills"
            f" (of {self.planned} planned)",
            f"kills by type: {dict(by_type)}; {during} while sending"
            f" (done at {self.sent_at:.1f} s)",
            f"worker kills holding leases (mid-send): {mid_send} of {by_type['worker-0']}",
            f"supervisor kills its children outlived: {outlived} of {len(self.orphans)}",
        ]
        if each_kill:
            lines += [
                f"  {k.at:7.1f} s  {k.target:<11} pid {k.pid:<7} up {k.uptime:5.1f} s  {k.detail}"
                for k in self.kills
            ]
        lines.append(
            f"acknowledged {len(self.acknowledged)} of {self.instances}; refusals"
            f" {self.refusals}; failed rounds {self.failed_rounds};"
            f" lost {[len(v) for v in self.lost.values()]}; duplicate copies"
            f" {self.duplicates}; instances delivered more than once"
            f" {self.duplicated_instances}; jobs {self.states}; redelivered jobs"
            f" {self.redelivered}; settled at {self.drained_at:.1f} s; left in the spool:"
            f" {self.leftovers[0]} temporary and {self.leftovers[1]} unrecorded files"
        )
        lines.append(
            f"associations accepted by another process: {len(self.foreign)}; associations"
            f" rejected: {len(self.rejections)}; store files"
            f" without a row before restarts of serve: {len(self.unrecorded)}"
            f" ({len(self.unrecorded_acknowledged)} of them acknowledged before)"
        )
        return "\n".join(lines)

    def check(self, targets: set[str]) -> None:
        tail = f"(seed {self.seed})\n{self.log_tail}"
        assert self.acknowledged == self.corpus, f"not all acknowledged {tail}"
        assert all(not v for v in self.lost.values()), (
            f"acknowledged instances missing at a destination: "
            f"{ {n: (len(v), v[:3]) for n, v in self.lost.items()} } {tail}"
        )
        assert not self.stuck, f"jobs still leased: {self.stuck[:5]} {tail}"
        assert not self.dead, f"dead jobs: {self.dead[:5]} {tail}"
        assert set(self.states) == {"done"}, f"jobs {self.states} {tail}"
        assert set(self.by_type) == targets, self.by_type
        during = sum(k.at <= self.sent_at for k in self.kills)
        assert during == len(self.kills), f"kills after the last instance was sent {tail}"


def run_crashes(
    root: Path,
    destinations: list[StoreSCP],
    *,
    instances: int,
    counts: dict[str, int],
    seed: int,
    pace_per_kill: float = 2.0,
    send_timeout: float = 200.0,
    drain_timeout: float = 90.0,
    senders: int = 2,
    killer_options: dict[str, object] | None = None,
    node: Node | None = None,
    progress_every: int = 0,
    stop_kills: threading.Event | None = None,
    hold_to_kills: bool = True,
) -> CrashRun:
    """Configure a node under ``root``, send ``instances`` while the killer works
    through ``counts`` (kills per target), then let it drain with no more kills."""
    rng = random.Random(seed)
    corpus = make_corpus(instances)
    # A title of this run's own (at most 16 characters, PS3.5 6.2 AE).
    node = node or Node(root, seed, aet=f"CRASH-{random.SystemRandom().getrandbits(40):010X}")
    kills = sum(counts.values())
    try:
        node.configure(destinations)
        node.start(timeout=float(str((killer_options or {}).get("start_timeout", START_TIMEOUT))))
        began = time.monotonic()
        killer = Killer(node, rng, make_plan(rng, counts), began, **(killer_options or {}))  # type: ignore[arg-type]

        def allowance() -> float:
            # Paced in time, and held back to the kills: the last share after the last one.
            if killer.done.is_set():
                return float("inf")
            by_time = instances * (time.monotonic() - began) / (pace_per_kill * kills)
            if not hold_to_kills:  # paced in time only: kills may lag behind
                return by_time
            by_kills = instances * (len(killer.kills) + 1) / (kills + 1)
            return min(by_time, by_kills)

        sending = Sending(
            corpus,
            allowance,
            seed,
            senders,
            called_ae=node.aet,
            verify=node.accepted_by,
            journal=root / "acknowledged.jsonl",
        )

        def progress(kill: Kill) -> None:
            if len(killer.kills) % progress_every == 0:
                by_type = dict(collections.Counter(k.target for k in killer.kills))
                print(
                    f"{kill.at:7.1f} s: {len(killer.kills)} kills {by_type},"
                    f" {len(sending.acknowledged)} acknowledged",
                    flush=True,
                )

        if progress_every:
            killer.on_kill = progress
        if stop_kills is not None:
            killer.stop_kills = stop_kills  # set: the kills end early, the rest is sent
        thread = threading.Thread(target=killer.run, name="killer", daemon=True)
        thread.start()
        try:
            asyncio.run(sending.run(node.port, began + send_timeout))
            sent_at = time.monotonic() - began
            assert killer.done.wait(send_timeout), f"the kills did not finish (seed {seed})"
        finally:
            killer.cancel.set()
            thread.join(60)
        if killer.error is not None:
            raise killer.error
        if not killer.stop_kills.is_set():
            assert len(killer.kills) == kills, killer.kills

        # A final serve, no more kills: everything acknowledged arrives everywhere.
        assert node.wait_healthy(START_TIMEOUT), node.log_tail()
        acknowledged = sending.acknowledged
        live = ("pending", "leased", "retry_wait")

        def settled() -> bool:
            arrived = all(acknowledged <= set(scp.received()) for scp in destinations)
            return arrived and not any(node.job_states().get(s) for s in live)

        deadline = time.monotonic() + drain_timeout
        while not settled() and time.monotonic() < deadline:
            time.sleep(0.5)
        drained_at = time.monotonic() - began

        received = {scp.name: scp.received() for scp in destinations}
        lost_anywhere = sorted(set().union(*(acknowledged - set(got) for got in received.values())))
        traces = [node.trace(uid, sending.acked_at.get(uid)) for uid in lost_anywhere]
        if traces:
            (root / "lost-trace.json").write_text(json.dumps(traces, indent=1) + "\n")
        # Not asserted: files of stores a killed listener never acknowledged stay in the
        # spool until the next start of serve (its recovery), not of a listener.
        partial, unrecorded = node.spool_leftovers()
        return CrashRun(
            seed=seed,
            instances=instances,
            planned=kills,
            kills=killer.kills,
            orphans=killer.orphans,
            sent_at=sent_at,
            drained_at=drained_at,
            acknowledged=acknowledged,
            corpus=set(corpus),
            refusals=len(sending.refusals),
            failed_rounds=sending.failed_rounds,
            lost={name: sorted(acknowledged - set(got)) for name, got in received.items()},
            duplicates={name: sum(n - 1 for n in got.values()) for name, got in received.items()},
            duplicated_instances={
                name: sum(n > 1 for n in got.values()) for name, got in received.items()
            },
            states=node.job_states(),
            stuck=node.query(
                "select j.id, d.name, j.lease_owner, j.lease_expires_at, j.deliveries,"
                " j.attempts from jobs j join destinations d on d.id = j.destination_id"
                " where j.state = 'leased'"
            ),
            dead=node.query("select id, last_error from jobs where state = 'dead'"),
            redelivered=int(
                node.query("select count(*) from jobs where deliveries > attempts")[0][0]  # type: ignore[call-overload]
            ),
            leftovers=(len(partial), len(unrecorded)),
            log_tail=node.log_tail(),
            aet=node.aet,
            foreign=sending.foreign,
            rejections=sending.rejections,
            unrecorded=killer.unrecorded,
            acked_at=sending.acked_at,
            traces=traces,
        )
    finally:
        node.kill_all()
