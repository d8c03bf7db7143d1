"""Hosts for multi-host tests (DESIGN §8): Linux network namespaces joined by veth pairs.

A ``Lab`` is a set of namespaces made for one test run, every name carrying the run's
random token (``drt-<token>-<host>``, links ``<token>-<peer>``): a "switch" namespace
holding a bridge, and one namespace per host with a veth pair to a port of that bridge
(or a direct link to another host). Addresses come from a private test subnet that
exists only inside these namespaces, so no packet leaves them. ``cut(host)`` sets that
host's switch port down (its cable pulled); ``close()`` kills every process in every
namespace and deletes them all.

Also here: a throw-away PostgreSQL server running in one of the hosts (as the
``postgres`` user, which ``initdb`` and ``postgres`` insist on; the test process itself
reaches it through its Unix socket, which network namespaces do not separate), and a
scripted storage SCP (pynetdicom as a peer) that delays every C-STORE response and
records, per instance, which address delivered it and when. The SCP is this file run as
a script: ``python netns_support.py scp --aet AET --port PORT --log FILE [--delay S]``.

Missing privilege (root, or CAP_NET_ADMIN and CAP_SYS_ADMIN for ``ip netns``) skips the
tests, except with ``CI=true``, where it fails them.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

# The PostgreSQL helpers shared with every other suite (tests/db_support.py); also when
# this file runs as the scripted SCP's own process.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from db_support import (
    PG_BIN,
    as_postgres,
    initdb_argv,
    postgres_owned_dir,
)
from db_support import postgres_problem as postgres_problem  # for test_multihost

IS_CI = os.environ.get("CI", "").lower() == "true"
# Statement statistics (shipped with Debian's postgresql-15): how often each query ran.
PG_STAT_STATEMENTS = PG_BIN.parent / "lib" / "pg_stat_statements.so"
PREFIX_LENGTH = 24


def unavailable(reason: str) -> None:
    """Skip the test for ``reason`` (a failure with CI=true: DESIGN §8)."""
    import pytest

    if IS_CI:
        pytest.fail(f"CI: {reason}")
    pytest.skip(reason)


def netns_problem() -> str | None:
    """Why this process cannot make network namespaces, or None."""
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"drt-probe-{secrets.token_hex(4)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"no privilege for network namespaces (ip netns add: {made.stderr.strip()})"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process ``pid`` so far (0 once it has gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


@dataclass
class Host:
    name: str
    netns: str
    address: str
    switch_port: str | None  # its port on the switch (None: not on the switch)


class Lab:
    """Namespaces and links of one test run; every one of them is removed by close()."""

    def __init__(self) -> None:
        self.token = secrets.token_hex(3)[:5]
        self.switch = f"drt-{self.token}-switch"
        self.bridge = f"{self.token}-br"
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen[bytes]] = []

    # -- building -------------------------------------------------------------------
    def _ip(self, netns: str | None, *args: str) -> None:
        argv = ["ip", *(["-n", netns] if netns else []), *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")

    def _namespace(self, name: str) -> str:
        netns = f"drt-{self.token}-{name}"
        self._ip(None, "netns", "add", netns)
        self._namespaces.append(netns)
        self._ip(netns, "link", "set", "lo", "up")
        return netns

    def _device(self, peer: str) -> str:
        name = f"{self.token}-{peer}"
        assert len(name) <= 15, f"interface name {name!r} is too long (IFNAMSIZ)"
        return name

    def start(self) -> None:
        self._namespace("switch")
        self._ip(self.switch, "link", "add", self.bridge, "type", "bridge")
        self._ip(self.switch, "link", "set", self.bridge, "up")

    def add_host(self, name: str, address: str) -> Host:
        """A host with one veth pair to a port of the switch."""
        netns = self._namespace(name)
        port, device = self._device(name), self._device("sw")
        self._ip(self.switch, "link", "add", port, "type", "veth", "peer", "name", device,
                 "netns", netns)  # fmt: skip
        self._ip(self.switch, "link", "set", port, "master", self.bridge, "up")
        self._ip(netns, "addr", "add", f"{address}/{PREFIX_LENGTH}", "dev", device)
        self._ip(netns, "link", "set", device, "up")
        self.hosts[name] = host = Host(name, netns, address, port)
        return host

    def add_behind(self, name: str, gateway: str, address: str, gateway_address: str) -> Host:
        """A host linked only to ``gateway`` (a direct veth pair, its own subnet): no
        other host has a route to it."""
        netns = self._namespace(name)
        outer = self.hosts[gateway].netns
        near, far = self._device(name), self._device(gateway)
        self._ip(outer, "link", "add", near, "type", "veth", "peer", "name", far, "netns", netns)
        self._ip(outer, "addr", "add", f"{gateway_address}/{PREFIX_LENGTH}", "dev", near)
        self._ip(netns, "addr", "add", f"{address}/{PREFIX_LENGTH}", "dev", far)
        self._ip(outer, "link", "set", near, "up")
        self._ip(netns, "link", "set", far, "up")
        self.hosts[name] = host = Host(name, netns, address, None)
        return host

    # -- the network's state ----------------------------------------------------------
    def cut(self, name: str) -> None:
        """Pull ``name``'s cable: its switch port goes down."""
        port = self.hosts[name].switch_port
        assert port is not None
        self._ip(self.switch, "link", "set", port, "down")

    def reconnect(self, name: str) -> None:
        port = self.hosts[name].switch_port
        assert port is not None
        self._ip(self.switch, "link", "set", port, "up")

    def has_route(self, name: str, address: str) -> bool:
        done = subprocess.run(
            ["ip", "-n", self.hosts[name].netns, "route", "get", address], capture_output=True
        )
        return done.returncode == 0

    # -- processes ----------------------------------------------------------------------
    def argv(self, name: str, argv: Sequence[str]) -> list[str]:
        # ip netns exec execs the command in place: the process keeps ip's pid.
        return ["ip", "netns", "exec", self.hosts[name].netns, *argv]

    def popen(
        self, name: str, argv: Sequence[str], log: Path, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """``argv`` in host ``name``, in a process group of its own, output to ``log``."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                self.argv(name, argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=dict(env) if env is not None else None,
                start_new_session=True,
            )
        self._procs.append(proc)
        return proc

    def run(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float = 60,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            self.argv(name, argv),
            capture_output=True,
            text=True,
            env=dict(env) if env is not None else None,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} on {name} exited {done.returncode}:\n{done.stderr}{done.stdout}"
            )
        return done

    @staticmethod
    def kill(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)

    def pids(self, netns: str) -> list[int]:
        done = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
        return [int(p) for p in done.stdout.split()]

    def cpu_seconds(self, name: str) -> float:
        """User and system CPU time of the processes now running in host ``name``."""
        return sum(cpu_seconds(pid) for pid in self.pids(self.hosts[name].netns))

    def kill_all_in(self, netns: str) -> None:
        for _ in range(50):
            pids = self.pids(netns)
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)

    def close(self) -> None:
        """Kill what runs in the namespaces, then delete them (and with them every link)."""
        for proc in self._procs:
            self.kill(proc)
        for netns in reversed(self._namespaces):
            self.kill_all_in(netns)
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        self._namespaces.clear()


class Postgres:
    """A PostgreSQL server in host ``name``, listening on that host's address."""

    def __init__(self, lab: Lab, name: str, port: int = 5432) -> None:
        self.lab, self.host, self.port = lab, lab.hosts[name], port
        self.base: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.statements = PG_STAT_STATEMENTS.exists()

    def start(self) -> None:
        # Not pytest's tmp_path: the postgres user must own the directory and reach it.
        self.base = postgres_owned_dir("dicom-router-pg-netns-")
        data = self.base / "data"
        subprocess.run(initdb_argv(data), check=True, capture_output=True, timeout=120)
        subnet = self.host.address.rsplit(".", 2)[0]
        with open(data / "pg_hba.conf", "a") as hba:  # the test subnet, nothing else
            hba.write(f"host all postgres {subnet}.0.0/16 trust\n")
        self.proc = self.lab.popen(
            self.host.name,
            as_postgres([
                str(PG_BIN / "postgres"), "-D", str(data), "-k", str(self.base),
                "-p", str(self.port), "-c", f"listen_addresses={self.host.address}",
                "-c", "fsync=off",  # a test server: the router's durability is not tested here
                "-c", "max_connections=200",
                *(["-c", "shared_preload_libraries=pg_stat_statements"] if self.statements
                  else []),
            ]),
            self.base / "postgres.log",
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                with self.connect("postgres") as connection:
                    connection.execute("SELECT 1")
                return
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        "postgres did not start: " + (self.base / "postgres.log").read_text()
                    ) from None
                time.sleep(0.1)

    def url(self, database: str) -> str:
        """The URL as the other hosts reach the server (TCP, on the test subnet)."""
        return f"postgresql+psycopg://postgres@{self.host.address}:{self.port}/{database}"

    def connect(self, database: str):  # type: ignore[no-untyped-def]
        """A connection of the test process itself, over the server's Unix socket."""
        import psycopg

        return psycopg.connect(
            host=str(self.base), port=self.port, user="postgres", dbname=database,
            autocommit=True, connect_timeout=5,
        )  # fmt: skip

    def create_database(self, database: str) -> None:
        with self.connect("postgres") as connection:
            connection.execute(f'CREATE DATABASE "{database}"')

    def statement_calls(self, database: str, like: str) -> int:
        """How many times statements matching ``like`` (SQL LIKE) ran in ``database``."""
        assert self.statements, "pg_stat_statements is not loaded"
        with self.connect(database) as connection:
            connection.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            row = connection.execute(
                "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE dbid ="
                " (SELECT oid FROM pg_database WHERE datname = current_database())"
                " AND query LIKE %s",
                (like,),
            ).fetchone()
        return int(row[0]) if row else 0

    def stop(self) -> None:
        if self.base is None:
            return
        pidfile = self.base / "data" / "postmaster.pid"
        if self.proc is not None and self.proc.poll() is None and pidfile.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pidfile.read_text().split()[0]), signal.SIGINT)  # fast shutdown
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        if self.proc is not None:
            self.lab.kill(self.proc)
        shutil.rmtree(self.base, ignore_errors=True)
        self.base = None


@dataclass(frozen=True)
class Reception:
    uid: str
    peer: str  # the address the association came from
    at: float  # time.time() when the response went back


class ScriptedSCP:
    """The delaying storage SCP of this module, run in host ``name``."""

    def __init__(
        self, lab: Lab, name: str, aet: str, root: Path, *, port: int = 11112, delay: float = 0.0
    ) -> None:
        self.lab, self.host, self.aet, self.port, self.delay = (
            lab,
            lab.hosts[name],
            aet,
            port,
            delay,
        )
        self.log = root / f"scp-{aet.lower()}.jsonl"
        self.out = root / f"scp-{aet.lower()}.out"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    def launch(self) -> subprocess.Popen[bytes]:
        argv = [sys.executable, str(Path(__file__).resolve()), "scp", "--aet", self.aet,
                "--bind", self.host.address, "--port", str(self.port), "--log", str(self.log),
                "--delay", str(self.delay)]  # fmt: skip
        self.proc = self.lab.popen(self.host.name, argv, self.out)
        return self.proc

    def wait_ready(self, timeout: float = 60) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while "ready" not in (self.out.read_text() if self.out.exists() else ""):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                text = self.out.read_text() if self.out.exists() else ""
                raise AssertionError(f"scripted SCP {self.aet} did not start: {text}")
            time.sleep(0.05)

    def received(self) -> list[Reception]:
        if not self.log.exists():
            return []
        rows = []
        for line in self.log.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError):  # a line still being written
                row = json.loads(line)
                rows.append(Reception(row["uid"], row["peer"], row["at"]))
        return rows

    def uids(self) -> set[str]:
        return {r.uid for r in self.received()}


def _scp_main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="netns_support.py scp")
    parser.add_argument("--aet", required=True)
    parser.add_argument("--bind", default="0.0.0.0")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args(argv)

    with open(args.log, "a", buffering=1) as out:
        _serve_scp(args, out)


def _serve_scp(args: Any, out: TextIO) -> None:
    import threading

    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    lock = threading.Lock()

    def on_store(event: evt.Event) -> int:
        if args.delay:
            time.sleep(args.delay)  # a latency-bound destination: each response waits
        request: Any = event.request  # a C-STORE-RQ (the only handler bound)
        line = json.dumps({
            "uid": str(request.AffectedSOPInstanceUID),
            "peer": event.assoc.requestor.address,
            "at": time.time(),
        })  # fmt: skip
        with lock:
            out.write(line + "\n")
        return 0x0000

    ae = AE(ae_title=args.aet)
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(Verification)
    ae.maximum_associations = 64
    server = ae.start_server(
        (args.bind, args.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    assert server is not None  # block=False returns the server
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("ready", flush=True)
    stop.wait()
    server.shutdown()


if __name__ == "__main__":
    if sys.argv[1:2] != ["scp"]:
        raise SystemExit("usage: netns_support.py scp --aet AET --port PORT --log FILE")
    _scp_main(sys.argv[2:])
