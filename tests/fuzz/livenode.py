"""A live ``dicom-router serve`` node for the on-demand fuzz and soak runs, and the
well-behaved probe peer they measure it with.

Not a pytest module (tests/fuzz and tests/soak are outside the test command). Used as

    node = LiveNode.start(root, listeners=1, env={...})   # init + serve, waits for C-ECHO
    node.pids()          # {"supervisor": pid, "listener-0": pid, ...} from run/node.json
    node.restarts()      # {"listener-0": 0, ...}: the supervisor's restart counts
    sample(pid)          # ProcSample(rss_kib, fds, threads) from /proc
    node.stop()          # SIGTERM to the process group, SIGKILL after a grace period

Frames are built with the protocol package's encoders: they are the VALID seeds the
fuzzer mutates and the probe's well-behaved traffic, not what is under test.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from protocol.dimse import CEchoRQ, encode_command
from protocol.items import PresentationContextRQ, UserInformation
from protocol.pdu import AAssociateRQ, AReleaseRQ, encode_pdata
from protocol.uids import EXPLICIT_VR_LE, IMPLICIT_VR_LE, VERIFICATION

HOST = "127.0.0.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def router_argv(*args: str, source: Path | None = None) -> list[str]:
    """``dicom-router ARGS``: the installed script, or the CLI of a source tree ``source``
    (put first on PYTHONPATH by ``LiveNode.start``)."""
    script = Path(sys.executable).parent / "dicom-router"
    if script.exists() and source is None:
        return [str(script), *args]
    return [sys.executable, "-c", "from router.cli import main; main()", *args]


def snapshot(ref: str, into: Path) -> Path:
    """``git archive`` of ``ref`` of this repository into ``into``: the run tests that
    commit, not whatever is being edited in the work tree meanwhile."""
    repo = Path(__file__).resolve().parents[2]
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", ref], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    rev = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--short", ref],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (into / "REVISION").write_text(rev + "\n")
    return into


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


# --- frames (valid seeds) -----------------------------------------------------------------
def associate_rq(calling: str = "PROBE", max_length: int = 16384) -> bytes:
    contexts = (
        PresentationContextRQ(1, (VERIFICATION,), (IMPLICIT_VR_LE,)),
        PresentationContextRQ(3, (CT_IMAGE,), (EXPLICIT_VR_LE, IMPLICIT_VR_LE)),
        PresentationContextRQ(5, (SECONDARY_CAPTURE,), (IMPLICIT_VR_LE,)),
    )
    info = UserInformation(
        max_length=max_length, implementation_class_uid="1.2.826.0.1.3680043.9.9999.1"
    )
    return AAssociateRQ("ROUTER", calling, contexts, info).encode()


def pdata(context_id: int, control: int, data: bytes) -> bytes:
    return b"".join(bytes(b) for b in encode_pdata(context_id, control, data))


def echo_pdata(message_id: int) -> bytes:
    return pdata(1, 0x03, encode_command(CEchoRQ(message_id)))


RELEASE_RQ = AReleaseRQ().encode()


# --- /proc --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ProcSample:
    rss_kib: int
    fds: int
    threads: int
    cpu_s: float


def sample(pid: int) -> ProcSample | None:
    """RSS, open fds, threads and CPU seconds of ``pid`` (None if it is gone)."""
    try:
        rss = threads = 0
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("Threads:"):
                    threads = int(line.split()[1])
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return ProcSample(rss, fds, threads, cpu)


# --- the node -----------------------------------------------------------------------------
class LiveNode:
    def __init__(self, root: Path, port: int, proc: subprocess.Popen[bytes]) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.log_path = root / "serve.log"
        self.port = port
        self.proc = proc

    @classmethod
    def start(
        cls,
        root: Path,
        *,
        listeners: int = 1,
        env: dict[str, str] | None = None,
        timeout: float = 60.0,
        source: Path | None = None,
    ) -> LiveNode:
        root.mkdir(parents=True, exist_ok=True)
        data = root / "data"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_ROUTER_")}
        full_env.update(env or {})
        if source is not None:
            full_env["PYTHONPATH"] = str(source)
        subprocess.run(
            router_argv("--data-dir", str(data), "init", source=source),
            check=True,
            capture_output=True,
            env=full_env,
        )
        port = free_port()
        log = open(root / "serve.log", "ab")  # noqa: SIM115 - the child keeps it
        argv = router_argv(
            "--data-dir",
            str(data),
            "serve",
            "--port",
            str(port),
            "--bind",
            HOST,
            "--listeners",
            str(listeners),
            "--workers",
            "0",
            source=source,
        )
        proc = subprocess.Popen(
            argv,
            cwd=root,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        node = cls(root, port, proc)
        node._wait_ready(listeners, timeout)
        return node

    def _wait_ready(self, listeners: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        marker = f"listening on {HOST}:{self.port}"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited {self.proc.returncode}:\n{self.log_text()}")
            if self.log_text().count(marker) >= listeners:
                with contextlib.suppress(OSError, ProbeError):
                    echo_once(self.port, timeout=5)
                    return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"serve not ready within {timeout} s:\n{self.log_text()}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def status(self) -> dict[str, dict[str, int]]:
        try:
            state = json.loads((self.data_dir / "run" / "node.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        children: dict[str, dict[str, int]] = state.get("children", {})
        return children

    def pids(self) -> dict[str, int]:
        out = {"supervisor": self.proc.pid}
        for name, child in self.status().items():
            if child.get("pid"):
                out[name] = int(child["pid"])
        return out

    def listener_pids(self) -> dict[str, int]:
        return {k: v for k, v in self.pids().items() if k.startswith("listener")}

    def restarts(self) -> dict[str, int]:
        return {name: int(c.get("restarts", 0)) for name, c in self.status().items()}

    def stop(self, grace: float = 30.0) -> int | None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            return None

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


# --- the well-behaved probe peer (blocking sockets) ---------------------------------------
class ProbeError(Exception):
    """The probe did not get the answer a well-behaved exchange gets."""


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ProbeError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_pdu(sock: socket.socket) -> tuple[int, bytes]:
    header = _recv_exact(sock, 6)
    (length,) = struct.unpack(">I", header[2:])
    return header[0], _recv_exact(sock, length)


_PROBE_RQ = associate_rq("PROBE")


def echo_once(port: int, timeout: float = 10.0, message_id: int = 1) -> tuple[float, float]:
    """Associate, C-ECHO, release. Returns (echo round trip, whole exchange) in seconds."""
    start = time.monotonic()
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(_PROBE_RQ)
        kind, body = recv_pdu(sock)
        if kind != 2:
            raise ProbeError(f"A-ASSOCIATE answered with PDU type {kind}: {body.hex()}")
        sent = time.monotonic()
        sock.sendall(echo_pdata(message_id))
        kind, body = recv_pdu(sock)
        echo = time.monotonic() - sent
        # body: PDV length (4), context, control, command; status (0000,0900) = 0
        if kind != 4 or struct.pack("<HHIH", 0, 0x0900, 2, 0) not in body:
            raise ProbeError(f"C-ECHO answered with PDU type {kind}: {body.hex()}")
        sock.sendall(RELEASE_RQ)
        kind, body = recv_pdu(sock)
        if kind != 6:
            raise ProbeError(f"A-RELEASE answered with PDU type {kind}")
    return echo, time.monotonic() - start


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
