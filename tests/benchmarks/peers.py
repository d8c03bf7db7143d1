"""Start and stop C-STORE senders and receivers as subprocesses, for the benchmarks.

    from peers import SYSTEMS, free_port, start_receiver, run_sender

    system = SYSTEMS["dcmtk"]
    port = free_port()
    receiver = start_receiver(system, port, out_dir, log_dir)   # waits for C-ECHO
    try:
        result = run_sender(system, port, corpus_dir, log_dir)  # wall time, rc, CPU
    finally:
        receiver.stop()

Systems (the receiver writes every instance to a file in its output directory, no fsync;
the sender sends the whole directory in ONE association; the called AE title is
``STORESCP`` everywhere):

    ours        <python> -m protocol storescp --bind 127.0.0.1 -aet STORESCP -od DIR PORT
                <python> -m protocol storescu -aec STORESCP -r 127.0.0.1 PORT DIR
    dcmtk       TCP_NODELAY=1 storescp -aet STORESCP -od DIR PORT
                TCP_NODELAY=1 storescu -aec STORESCP +sd +r 127.0.0.1 PORT DIR
    pynetdicom  <python> pynd_storescp.py --bind 127.0.0.1 -aet STORESCP -od DIR PORT
                <python> pynd_storescu.py -aec STORESCP -r 127.0.0.1 PORT DIR
                (both scripts beside this file)

``<python>`` is the interpreter running the benchmark (the project's venv). Debian's
DCMTK leaves Nagle's algorithm on unless ``TCP_NODELAY=1`` is in the environment; the
pynetdicom scripts set TCP_NODELAY on their sockets themselves.

Every process is started in its own session (process group) and stopped by signalling
that group (SIGTERM, then SIGKILL after a grace period); nothing is killed by name.
Ports are chosen at run time by binding to port 0. Readiness: a TCP connect succeeds,
then a C-ECHO from DCMTK's ``echoscu`` does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"
AET = "STORESCP"
HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
NODELAY_ENV = {"TCP_NODELAY": "1"}


@dataclass(frozen=True)
class System:
    name: str
    receiver: Callable[[int, Path], list[str]]  # (port, output dir) -> argv
    sender: Callable[[int, Path], list[str]]  # (port, corpus dir) -> argv
    env: dict[str, str] = field(default_factory=dict)


SYSTEMS: dict[str, System] = {
    "ours": System(
        "ours",
        lambda port, out: [
            PYTHON, "-m", "protocol", "storescp", "--bind", LOOPBACK,
            "-aet", AET, "-od", str(out), str(port),
        ],
        lambda port, src: [
            PYTHON, "-m", "protocol", "storescu", "-aec", AET, "-r", LOOPBACK, str(port), str(src),
        ],
    ),
    "dcmtk": System(
        "dcmtk",
        lambda port, out: ["storescp", "-aet", AET, "-od", str(out), str(port)],
        lambda port, src: ["storescu", "-aec", AET, "+sd", "+r", LOOPBACK, str(port), str(src)],
        env=NODELAY_ENV,
    ),
    "pynetdicom": System(
        "pynetdicom",
        lambda port, out: [
            PYTHON, str(HERE / "pynd_storescp.py"), "--bind", LOOPBACK,
            "-aet", AET, "-od", str(out), str(port),
        ],
        lambda port, src: [
            PYTHON, str(HERE / "pynd_storescu.py"), "-aec", AET, "-r",
            LOOPBACK, str(port), str(src),
        ],
    ),
}  # fmt: skip


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    prefix = "".join(f"{k}={v} " for k, v in env.items())
    with open(log, "ab") as f:
        f.write(f"$ {prefix}{subprocess.list2cmdline(argv)}\n".encode())
        f.flush()
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            cwd=HERE.parent.parent,  # the repository, so `-m protocol` resolves
            start_new_session=True,  # own process group, stopped as a whole
        )


def _log_tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _killpg(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)  # the group id is the leader's pid (start_new_session)


def _wait_exited(pid: int, timeout: float | None) -> bool:
    """Wait until ``pid`` has exited, without reaping it (WNOWAIT), so that its
    process-group id stays ours to signal."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        flags = os.WEXITED | os.WNOWAIT | (0 if deadline is None else os.WNOHANG)
        if os.waitid(os.P_PID, pid, flags) is not None:
            return True
        if deadline is not None and time.monotonic() > deadline:
            return False
        time.sleep(0.02)


@dataclass
class Receiver:
    system: str
    port: int
    out: Path
    log: Path
    popen: subprocess.Popen[bytes]

    def cpu_seconds(self) -> float:
        """user+sys CPU seconds of the receiver process so far (all threads)."""
        try:
            stat = Path(f"/proc/{self.popen.pid}/stat").read_text()
        except OSError:
            return float("nan")
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def alive(self) -> bool:
        return self.popen.returncode is None and not _wait_exited(self.popen.pid, 0)

    def log_tail(self, lines: int = 20) -> str:
        return _log_tail(self.log, lines)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the receiver's process group, SIGKILL it after ``grace`` seconds."""
        if self.popen.returncode is not None:
            return
        _killpg(self.popen.pid, signal.SIGTERM)
        if not _wait_exited(self.popen.pid, grace):
            _killpg(self.popen.pid, signal.SIGKILL)
            _wait_exited(self.popen.pid, None)
        _killpg(self.popen.pid, signal.SIGKILL)  # stragglers in its group, if any
        self.popen.wait()  # reap only now: until then the group id cannot be reused


def wait_ready(
    port: int, popen: subprocess.Popen[bytes], log: Path, timeout: float = 30.0, aet: str = AET
) -> None:
    """Wait until 127.0.0.1:port accepts TCP, then until a C-ECHO (echoscu, called AE
    title ``aet``) succeeds."""
    deadline = time.monotonic() + timeout
    connected = False
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(
                f"receiver exited (rc={popen.returncode}) before it was ready:\n{_log_tail(log)}"
            )
        if not connected:
            try:
                with socket.create_connection((LOOPBACK, port), timeout=1.0):
                    connected = True
            except OSError:
                time.sleep(0.05)
                continue
        echo = subprocess.run(
            ["echoscu", "-to", "5", "-aec", aet, LOOPBACK, str(port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        if echo.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"receiver not answering C-ECHO on port {port}:\n{_log_tail(log)}")


def start_receiver(
    system: System, port: int, out: Path, log_dir: Path, timeout: float = 30.0
) -> Receiver:
    """Start ``system``'s receiver writing into ``out`` and wait until it answers C-ECHO."""
    out.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{system.name}-storescp.log"
    popen = _spawn(system.receiver(port, out), system.env, log)
    receiver = Receiver(system.name, port, out, log, popen)
    try:
        wait_ready(port, popen, log, timeout)
    except BaseException:
        receiver.stop()
        raise
    return receiver


@dataclass
class SendResult:
    argv: list[str]
    rc: int
    wall_s: float  # spawn to exit
    cpu_s: float  # user+sys of the sender (and its reaped children)
    timed_out: bool
    log: Path

    def log_tail(self, lines: int = 20) -> str:
        return _log_tail(self.log, lines)


def run_sender(
    system: System, port: int, source: Path, log_dir: Path, timeout: float = 600.0
) -> SendResult:
    """Run ``system``'s sender on ``source`` to completion; time it from spawn to exit."""
    argv = system.sender(port, source)
    log = log_dir / f"{system.name}-storescu.log"
    timed_out = threading.Event()
    t0 = time.perf_counter()
    popen = _spawn(argv, system.env, log)

    def on_timeout() -> None:
        timed_out.set()
        _killpg(popen.pid, signal.SIGKILL)

    timer = threading.Timer(timeout, on_timeout)
    timer.start()
    try:
        _wait_exited(popen.pid, None)  # not reaped yet: its group id stays ours
        wall = time.perf_counter() - t0
    finally:
        timer.cancel()
    _killpg(popen.pid, signal.SIGKILL)  # anything it left behind in its group
    _, status, usage = os.wait4(popen.pid, 0)  # reap; rusage of the sender
    rc = os.waitstatus_to_exitcode(status)
    popen.returncode = rc
    return SendResult(argv, rc, wall, usage.ru_utime + usage.ru_stime, timed_out.is_set(), log)


def count_instances(directory: Path) -> tuple[int, int]:
    """(files, bytes) under ``directory``, recursively; hidden files and directories
    (temporary/partial files such as ``.x.part`` or a ``.incoming`` spool) are skipped."""
    files = size = 0
    for root, dirs, names in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if name.startswith("."):
                continue
            st = os.lstat(os.path.join(root, name))
            if stat.S_ISREG(st.st_mode):
                files += 1
                size += st.st_size
    return files, size
