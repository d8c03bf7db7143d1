"""A real router node for end-to-end tests: the `dicom-router` CLI in subprocesses.

Every node gets its own data directory and a port chosen at run time; `serve` runs in
its own process group and is killed with it at teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import generate_uid

from protocol.net import ContextRequest, Timeouts, associate
from protocol.uids import EXPLICIT_VR_LE, VERIFICATION

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cli_argv(*args: str) -> list[str]:
    """The installed console script beside this interpreter (what a user runs)."""
    script = Path(sys.executable).parent / "dicom-router"
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-c", "from router.cli import main; main()", *args]


class RouterNode:
    def __init__(self, root: Path, env: dict[str, str] | None = None) -> None:
        self.data_dir = root / "data"
        self.port = free_port()
        self.env = {**os.environ, "DICOM_ROUTER_DATA_DIR": str(self.data_dir), **(env or {})}
        self.log_path = root / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    # -- CLI -------------------------------------------------------------------------
    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            cli_argv(*args),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.data_dir.parent,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"dicom-router {' '.join(args)} failed: {result.stderr}")
        return result

    def setup(self, *rules: Sequence[str]) -> None:
        """init, a destination `sink` (nothing listens there: nothing forwards yet) and rules."""
        self.cli("init")
        self.cli(
            "destinations",
            "add",
            "sink",
            "--aet",
            "SINK",
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
        )
        for rule in rules:
            self.cli("rules", "add", *rule)

    # -- serve -------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child writes to it
        self.proc = subprocess.Popen(
            cli_argv("-v", "serve", "--port", str(self.port), "--bind", "127.0.0.1"),
            env=self.env,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=self.data_dir.parent,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited: {self.log()}")
            if asyncio.run(self._echo_ok()):
                return
            time.sleep(0.1)
        raise AssertionError(f"serve did not answer C-ECHO within {timeout} s: {self.log()}")

    async def _echo_ok(self) -> bool:
        try:
            assoc = await associate(
                "127.0.0.1",
                self.port,
                [ContextRequest(VERIFICATION, (EXPLICIT_VR_LE,))],
                called_ae="ROUTER",
                timeouts=Timeouts(connect=1, acse=2, dimse=2),
            )
        except (OSError, TimeoutError, Exception):
            return False
        status = await assoc.send_c_echo()
        await assoc.release()
        return status == 0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- state -----------------------------------------------------------------------------
    def query(self, sql: str, *params: object) -> list[tuple[object, ...]]:
        with contextlib.closing(sqlite3.connect(self.data_dir / "router.sqlite")) as db:
            return db.execute(sql, params).fetchall()

    def spool_files(self) -> set[str]:
        store = self.data_dir / "spool" / "store"
        return {f"{p.parent.name}/{p.name}" for p in store.glob("*/*") if p.is_file()}

    def temp_files(self) -> list[Path]:
        return list((self.data_dir / "spool" / "tmp").iterdir())


def make_instance(modality: str = "CT", rows: int = 8, **attrs: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE_STORAGE if modality == "CT" else MR_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientName = "TEST^PATIENT"
    ds.PatientID = "E2E"
    ds.Rows = ds.Columns = rows
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(rows * rows * 2)
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = EXPLICIT_VR_LE
    return ds


def write_file(ds: Dataset, path: Path) -> Path:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = EXPLICIT_VR_LE
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


def dataset_bytes(ds: Dataset) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=True, enforce_file_format=False)
    return buffer.getvalue()
