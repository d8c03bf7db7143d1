"""Systems under test of the end-to-end benchmarks: each takes C-STORE on a port chosen
at run time and forwards every instance to one DICOM destination (the sink).

    Router   ``dicom-router serve`` on a fresh data directory (durable: an instance is
             acknowledged once fsync'd and committed), the rule ``all`` to ``sink``
    Orthanc  Debian's ``Orthanc`` with a configuration written here, in its own work
             directory: storage and SQLite index there, DICOM port chosen at run time,
             HTTP server off, the sink as the modality ``sink``, and a Lua
             ``OnStoredInstance`` that forwards each stored instance and then deletes it
             (forward-and-delete auto-routing; Orthanc fsyncs each file and commits its
             index before it acknowledges, by default)
    Naive    naive_forwarder.py (pynetdicom SCP -> one held-open SCU association,
             synchronous, nothing on disk)

Each runs in its own process group (session), is ready once DCMTK's echoscu gets a
C-ECHO answer, reports the user+sys CPU and the resident memory of every process in its
group from /proc, and is stopped by signalling that group. Every DCMTK-based process
(Orthanc included) gets ``TCP_NODELAY=1``; naive_forwarder.py sets it on its sockets.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from peers import AET, CLK_TCK, LOOPBACK, NODELAY_ENV, Receiver, _spawn, free_port, wait_ready

HERE = Path(__file__).resolve().parent
ROUTER = str(Path(sys.executable).parent / "dicom-router")
ORTHANC = "Orthanc"
ORTHANC_INSTALL = "apt-get install -y orthanc"  # Debian bookworm: Orthanc 1.10
PAGE_KB = 4  # /proc/PID/statm counts pages; 4 KiB on x86-64 Linux


# ------------------------------------------------------------------ /proc


def _proc_stat(pid: int | str) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # [0] state, [2] pgrp, [11..14] u/s/cu/cs time


def group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _proc_stat(entry.name)
            if fields is not None and int(fields[2]) == pgid and fields[0] != "Z":
                pids.append(int(entry.name))
    return sorted(pids)


def proc_name(pid: int) -> str:
    """A short name for a process no role names: its command, e.g. ``python -c``."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "other"
    words = [Path(a.decode(errors="replace")).name for a in argv[:2] if a]
    return " ".join(words) or "other"


def group_cpu(pgid: int) -> dict[int, float]:
    """user+sys CPU seconds of every live process in group ``pgid`` (all threads); the
    leader's count includes its reaped children (a restarted child)."""
    out: dict[int, float] = {}
    for pid in group_pids(pgid):
        fields = _proc_stat(pid)
        if fields is None:
            continue
        ticks = int(fields[11]) + int(fields[12])
        if pid == pgid:
            ticks += int(fields[13]) + int(fields[14])
        out[pid] = ticks / CLK_TCK
    return out


def group_rss_kb(pgid: int) -> dict[int, int]:
    """Resident set size (KiB) of every live process in group ``pgid``."""
    out: dict[int, int] = {}
    for pid in group_pids(pgid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            out[pid] = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KB
    return out


# ------------------------------------------------------------------ systems


class Node:
    """A spawned system under test: ``port``, called AE title ``aet``, its process group."""

    name = "node"
    aet = ""
    port = 0
    popen: subprocess.Popen[bytes]

    def _start(self, argv: list[str], env: dict[str, str], log: Path, timeout: float) -> None:
        self.log = log
        self.popen = _spawn(argv, env, log)
        self._stopper = Receiver(self.name, self.port, log.parent, log, self.popen)
        try:
            wait_ready(self.port, self.popen, log, timeout=timeout, aet=self.aet)
        except BaseException:
            self.stop()
            raise

    def alive(self) -> bool:
        return self._stopper.alive()

    def cpu(self) -> dict[int, float]:
        return group_cpu(self.popen.pid)

    def rss_kb(self) -> dict[int, int]:
        return group_rss_kb(self.popen.pid)

    def roles(self) -> dict[int, str]:
        """pid -> a name for the per-process CPU split."""
        return {self.popen.pid: self.name}

    def stop(self) -> None:
        self._stopper.stop(grace=30.0)


def _cli(data: Path, *args: str) -> None:
    done = subprocess.run(
        [ROUTER, "--data-dir", str(data), *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"dicom-router {' '.join(args)}: {done.stderr.strip()}")


class Router(Node):
    """``dicom-router serve`` on a fresh data directory."""

    name = "router"
    aet = "ROUTER"

    def __init__(
        self,
        data: Path,
        log: Path,
        sink_port: int,
        *,
        workers: int | None = None,
        listeners: int | None = None,
        max_associations: int = 1,
        dead: bool = False,
    ) -> None:
        self.data = data
        self.hole: socket.socket | None = None
        _cli(data, "init")
        per_destination = ["--max-associations", str(max_associations)]
        _cli(data, "destinations", "add", "sink", "--aet", AET, "--host", LOOPBACK,
             "--port", str(sink_port), *per_destination)  # fmt: skip
        targets = ["sink"]
        if dead:
            # Nothing listens on a port that was free a moment ago: connection refused.
            _cli(data, "destinations", "add", "dead", "--aet", "DEAD", "--host", LOOPBACK,
                 "--port", str(free_port()), *per_destination)  # fmt: skip
            # A black hole: connections complete in the kernel's backlog, nothing answers.
            self.hole = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.hole.bind((LOOPBACK, 0))
            self.hole.listen(1024)
            _cli(data, "destinations", "add", "hole", "--aet", "HOLE", "--host", LOOPBACK,
                 "--port", str(self.hole.getsockname()[1]), *per_destination)  # fmt: skip
            targets += ["dead", "hole"]
        _cli(data, "rules", "add", "all", "--to", ",".join(targets))
        self.port = free_port()
        argv = [ROUTER, "--data-dir", str(data), "serve", "--port", str(self.port),
                "--bind", LOOPBACK]  # fmt: skip
        if workers is not None:
            argv += ["--workers", str(workers)]
        if listeners is not None:
            argv += ["--listeners", str(listeners)]
        self._start(argv, NODELAY_ENV, log, timeout=120.0)  # a loaded 2-core VM is slow

    def roles(self) -> dict[int, str]:
        """pid -> listener/dispatcher/worker/janitor/... from the supervisor's status file
        (numbered children keep their number: worker-1, worker-2, ...)."""
        roles = {self.popen.pid: "supervisor"}
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
            state = json.loads((self.data / "run" / "node.json").read_text())
            for name, child in state["children"].items():
                if child.get("pid"):
                    roles[int(child["pid"])] = name
        return roles

    def stop(self) -> None:
        super().stop()
        if self.hole is not None:
            self.hole.close()
            self.hole = None


class NaiveForwarder(Node):
    """naive_forwarder.py under the interpreter running the benchmark."""

    name = "naive"
    aet = "NAIVE"

    def __init__(self, log: Path, sink_port: int) -> None:
        self.port = free_port()
        argv = [sys.executable, str(HERE / "naive_forwarder.py"), "--bind", LOOPBACK,
                "--aet", self.aet, "--dest-host", LOOPBACK, "--dest-port", str(sink_port),
                "--dest-aet", AET, str(self.port)]  # fmt: skip
        self._start(argv, {}, log, timeout=60.0)


# Forward, then delete: Orthanc's Lua API (book: "Server-side scripting with Lua")
# calls OnStoredInstance once an instance is stored and indexed; SendToModality sends
# the resource to a modality of the configuration and returns its id; Delete removes it.
# An error (destination down) stops the chain, so the instance stays in Orthanc.
FORWARD_AND_DELETE_LUA = """\
function OnStoredInstance(instanceId, tags, metadata, origin)
   local forwarded = SendToModality(instanceId, 'sink')
   Delete(forwarded)
end
"""


def orthanc_config(work: Path, dicom_port: int, sink_port: int, lua: Path) -> dict[str, object]:
    """Orthanc's configuration for one run; everything not named keeps Orthanc's default
    (SyncStorageArea true, ConcurrentJobs 2, DicomThreadsCount 4, SaveJobs true,
    MaximumPduLength 16384, DicomAssociationCloseDelay 5 s)."""
    return {
        "Name": "dicom-router-bench",
        "StorageDirectory": str(work / "storage"),
        "IndexDirectory": str(work / "index"),
        "StorageCompression": False,
        "Plugins": [],
        "LuaScripts": [str(lua)],
        "HttpServerEnabled": False,  # no REST: Lua needs none, and nothing listens for it
        "RemoteAccessAllowed": False,
        "DicomServerEnabled": True,
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "DicomModalities": {"sink": [AET, LOOPBACK, sink_port]},
    }


def orthanc_missing() -> str | None:
    """One line saying how to install Orthanc, or None if it is there."""
    if shutil.which(ORTHANC) is None:
        return (
            f"{ORTHANC} not found: {ORTHANC_INSTALL} (its service need not run: the benchmark "
            "starts its own), or leave it out with --cases"
        )
    return None


class Orthanc(Node):
    """``Orthanc CONFIG.json`` with forward-and-delete Lua routing, in ``work``."""

    name = "orthanc"
    aet = "ORTHANC"

    def __init__(self, work: Path, log: Path, sink_port: int) -> None:
        work.mkdir(parents=True, exist_ok=True)
        lua = work / "forward-and-delete.lua"
        lua.write_text(FORWARD_AND_DELETE_LUA)
        self.port = free_port()
        config = work / "orthanc.json"
        config.write_text(json.dumps(orthanc_config(work, self.port, sink_port, lua), indent=2))
        # Orthanc's outbound associations are DCMTK's too: TCP_NODELAY=1 reaches them.
        self._start([ORTHANC, str(config)], NODELAY_ENV, log, timeout=90.0)
