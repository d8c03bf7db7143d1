"""Shared pieces of the security e2e tests: certificates (tests/pki_support.py), a node with
workers and optional listener TLS / user identity, TLS storescp destinations."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import ssl
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from ingest_support import HOST, free_port, require_dcmtk
from pki_support import make_pki  # noqa: F401  (the e2e TLS tests take it from here)

from protocol.net import ContextRequest, Timeouts, associate
from protocol.uids import IMPLICIT_VR_LE, VERIFICATION

CLI_TIMEOUT = 120.0


def dicom_router(*args: str) -> list[str]:
    import sys

    script = Path(sys.executable).parent / "dicom-router"
    return [str(script), *args]


class SecureNode:
    """A node with forwarding workers; ``serve_args`` add listener options (TLS)."""

    def __init__(self, root: Path, env: Mapping[str, str] | None = None) -> None:
        self.root = root
        self.data = root / "data"
        self.log_path = root / "serve.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_ROUTER_")}
        self.env.update(
            {
                "DICOM_ROUTER_DATA_DIR": str(self.data),
                "DICOM_ROUTER_WORKERS_RETRY_BASE": "0.2",
                "DICOM_ROUTER_WORKERS_RETRY_CAP": "0.5",
                # The standard asyncio loop (router/eventloop.py may pick uvloop).
                "DICOM_ROUTER_EVENT_LOOP": "asyncio",
                **(env or {}),
            }
        )
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)
        self.cli("init")

    def cli(
        self, *args: str, check: bool = True, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            dicom_router(*args),
            env=self.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            stdin=None if stdin is not None else subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"dicom-router {' '.join(args)}: {result.stderr}{result.stdout}")
        return result

    def serve(self, *serve_args: str, workers: int = 1, listeners: int = 1) -> None:
        """Start serve; return once each of ``listeners`` processes says it listens."""
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                dicom_router(
                    "-v",
                    "serve",
                    "--port",
                    str(self.port),
                    "--bind",
                    HOST,
                    "--workers",
                    str(workers),
                    *serve_args,
                ),
                env=self.env,
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        marker = f"listening on {HOST}:{self.port}"
        deadline = time.monotonic() + 120  # generous: the machine may be loaded
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            if self.log().count(marker) >= listeners:
                return
            time.sleep(0.1)
        raise AssertionError(f"serve did not come up: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def query(self, sql: str, *params: object) -> list[tuple[object, ...]]:
        with contextlib.closing(sqlite3.connect(self.data / "router.sqlite", timeout=30)) as db:
            return db.execute(sql, params).fetchall()

    def jobs(self) -> list[tuple[str, str, str | None]]:
        return [
            (str(n), str(s), e if e is None else str(e))
            for n, s, e in self.query(
                "select d.name, j.state, j.last_error from jobs j"
                " join destinations d on d.id = j.destination_id"
            )
        ]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


class TlsStorescp:
    """DCMTK storescp with +tls KEY CERT, trusting ``ca``; ``peer`` is -rc/-vc/-ic."""

    def __init__(self, root: Path, key: Path, cert: Path, ca: Path, peer: str = "-vc") -> None:
        self.port = free_port()
        self.out = root / f"storescp-{self.port}"
        self.out.mkdir(parents=True)
        self.log = root / f"storescp-{self.port}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    require_dcmtk("storescp"),
                    "-aet",
                    "PACS",
                    "-od",
                    str(self.out),
                    "+tls",
                    str(key),
                    str(cert),
                    "+cf",
                    str(ca),
                    peer,
                    str(self.port),
                ],
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        wait_listening(self.port)

    def received(self) -> list[Path]:
        return [p for p in self.out.iterdir() if p.is_file()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def wait_listening(port: int, timeout: float = 20.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.5):
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {HOST}:{port}")


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def echo(port: int, tls: ssl.SSLContext | None = None, **kwargs: object) -> int:
    """A C-ECHO with our own SCU (raises what associate raises)."""

    async def run() -> int:
        assoc = await associate(
            HOST,
            port,
            [ContextRequest(VERIFICATION, (IMPLICIT_VR_LE,))],
            called_ae="ROUTER",
            calling_ae="ECHOER",
            timeouts=Timeouts(connect=10, acse=10, dimse=10),
            ssl=tls,
            server_hostname=HOST if tls else None,
            **kwargs,  # type: ignore[arg-type]
        )
        try:
            return await assoc.send_c_echo()
        finally:
            await assoc.release()

    return asyncio.run(run())
