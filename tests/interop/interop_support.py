"""Helpers for the interop suite (imported by conftest.py and the tests).

Kept out of conftest.py because pytest runs with ``--import-mode=importlib``, under which
a conftest cannot be imported by test modules; conftest.py puts this directory on
``sys.path`` so ``from interop_support import ...`` works.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import BaseTag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    generate_uid,
)

HOST = "127.0.0.1"
JPEG_LOSSLESS_SV1 = JPEGLosslessSV1
IS_CI = os.environ.get("CI", "").lower() == "true"

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

#: Transfer syntaxes the generated instances are written in (name -> UID).
TRANSFER_SYNTAXES = {
    "implicit_le": ImplicitVRLittleEndian,
    "explicit_le": ExplicitVRLittleEndian,
    "explicit_be": ExplicitVRBigEndian,
    "deflated": DeflatedExplicitVRLittleEndian,
}


# --------------------------------------------------------------------------------------
# ports and sockets
# --------------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port that was free a moment ago (the caller retries if it is taken meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _listening_ports() -> set[int]:
    ports: set[int] = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A":  # TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def is_listening(port: int) -> bool:
    """Whether something listens on ``port``: read from /proc, so no connection is made
    (a probe connection would show up in the server's log and in its counters)."""
    return port in _listening_ports()


def recv_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Read until EOF or ``timeout``; returns (data, closed)."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return data, False
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data, False
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk


def recv_exactly(sock: socket.socket, n: int, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    data = b""
    while len(data) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(n - len(data))
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        data += chunk
    return data


def recv_pdu(sock: socket.socket, timeout: float = 10.0) -> tuple[int, bytes]:
    """One PDU: (type, body). Raises AssertionError when it does not arrive whole."""
    header = recv_exactly(sock, 6, timeout)
    assert len(header) == 6, f"expected a PDU header, got {header!r}"
    length = int.from_bytes(header[2:6], "big")
    body = recv_exactly(sock, length, timeout)
    assert len(body) == length, f"PDU body truncated: {len(body)} of {length}"
    return header[0], body


# --------------------------------------------------------------------------------------
# subprocesses (our apps and DCMTK)
# --------------------------------------------------------------------------------------
@dataclass
class Server:
    """A long-running peer process (its own process group) listening on ``port``."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    stdout_path: Path
    stderr_path: Path
    output_dir: Path | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def wait_for_stderr(self, predicate: Callable[[str], bool], timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        text = self.stderr()
        while not predicate(text) and time.monotonic() < deadline:
            time.sleep(0.05)
            text = self.stderr()
        return text

    def stop(self) -> None:
        _kill_group(self.proc)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


class ProcessManager:
    """Starts servers in their own process groups and kills every group at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.servers: list[Server] = []
        self._count = 0

    def start(
        self,
        name: str,
        argv_for_port: Callable[[int], Sequence[str]],
        *,
        port: int | None = None,
        env: dict[str, str] | None = None,
        ready_timeout: float = 20.0,
        output_dir: Path | None = None,
    ) -> Server:
        attempts = 1 if port is not None else 3
        last_error = ""
        for _ in range(attempts):
            chosen = port if port is not None else free_port()
            self._count += 1
            stdout_path = self.tmp_path / f"{name}.{self._count}.stdout"
            stderr_path = self.tmp_path / f"{name}.{self._count}.stderr"
            with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
                proc = subprocess.Popen(
                    list(argv_for_port(chosen)),
                    cwd=self.tmp_path,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    env={**os.environ, **(env or {})},
                    start_new_session=True,
                )
            server = Server(name, proc, chosen, stdout_path, stderr_path, output_dir)
            self.servers.append(server)
            deadline = time.monotonic() + ready_timeout
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    break
                if is_listening(chosen):
                    return server
                time.sleep(0.05)
            server.stop()
            last_error = (
                f"{name} did not listen on port {chosen} within {ready_timeout} s "
                f"(exit status {proc.returncode}); stderr:\n{server.stderr()}"
            )
        raise AssertionError(last_error)

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()


def protocol_argv(app: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "protocol", app, *args]


def run_bounded(
    argv: Sequence[str],
    *,
    cwd: Path | None = None,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """subprocess.run in its own process group; the whole group dies on timeout."""
    proc = subprocess.Popen(
        list(argv),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=10)
        raise AssertionError(
            f"{argv[0]} {' '.join(argv[1:4])} ... did not finish within {timeout} s\n"
            f"stdout:\n{stdout}\nstderr:\n{stderr}"
        ) from None
    return subprocess.CompletedProcess(list(argv), proc.returncode, stdout, stderr)


def echo_status(assoc: object) -> int | None:
    """pynetdicom's C-ECHO status, or None when it got no response (an empty Dataset)."""
    response = assoc.send_c_echo()  # type: ignore[attr-defined]
    return getattr(response, "Status", None)


def pynetdicom_state(assoc: object) -> str:
    flags = ("is_established", "is_released", "is_aborted", "is_rejected")
    return ", ".join(f"{flag}={getattr(assoc, flag)}" for flag in flags)


def describe(result: subprocess.CompletedProcess[str]) -> str:
    return (
        f"{' '.join(map(str, result.args))}\nexit status {result.returncode}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )


# --------------------------------------------------------------------------------------
# DCMTK
# --------------------------------------------------------------------------------------
def _is_native_executable(path: Path) -> bool:
    # pynetdicom installs Python scripts called storescu/storescp/echoscu into the venv;
    # those are not DCMTK.
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def dcmtk_tool(name: str) -> str | None:
    """The path of DCMTK's ``name`` (never pynetdicom's script of the same name)."""
    dirs = [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin", "/usr/local/bin"]
    for directory in dirs:
        candidate = Path(directory or ".") / name
        if (
            candidate.is_file()
            and os.access(candidate, os.X_OK)
            and _is_native_executable(candidate)
        ):
            return str(candidate)
    return None


def require_dcmtk(*names: str) -> dict[str, str]:
    """Paths of the DCMTK tools; missing ones fail the test with CI=true, skip it otherwise."""
    found: dict[str, str] = {}
    missing = []
    for name in names:
        path = dcmtk_tool(name)
        if path is None:
            missing.append(name)
        else:
            found[name] = path
    if missing:
        message = f"DCMTK tool(s) not installed: {', '.join(missing)} (apt-get install dcmtk)"
        if IS_CI:
            pytest.fail(message)
        pytest.skip(message)
    return found


# --------------------------------------------------------------------------------------
# pynetdicom peers
# --------------------------------------------------------------------------------------
@dataclass
class PynetdicomSCP:
    port: int
    ae_title: str
    output_dir: Path
    received: list[Path] = field(default_factory=list)
    echoes: int = 0
    released: int = 0
    aborted: int = 0
    server: object = None

    def wait_for(self, predicate: Callable[[PynetdicomSCP], bool], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True


# --------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------
def make_dataset(
    sop_class_uid: str, modality: str, *, rows: int = 16, columns: int = 16
) -> Dataset:
    """A small but realistic image instance (patient/study/series/image modules)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Interop^Test^Ünïcode"
    ds.PatientID = "INTEROP-1"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20240102"
    ds.StudyTime = "112233.456"
    ds.AccessionNumber = "ACC123"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = modality
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = "1.25"
    ds.ImagePositionPatient = [-10.0, 20.5, 30.25]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.Rows = rows
    ds.Columns = columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    if modality == "CT":
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.KVP = "120"
    # A sequence, so nested items cross each transfer syntax too.
    item = Dataset()
    item.CodeValue = "T-D0050"
    item.CodingSchemeDesignator = "SRT"
    item.CodeMeaning = "Tissue"
    ds.AnatomicRegionSequence = [item]
    # 12-bit values (BitsStored 12), so DCMTK's JPEG lossless encoder takes them as is.
    ds.PixelData = b"".join(((i * 37) % 4096).to_bytes(2, "little") for i in range(rows * columns))
    ds["PixelData"].VR = "OW"
    return ds


def write_part10(ds: Dataset, path: Path, transfer_syntax: str) -> Path:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


KINDS = {
    "ct": (CT_IMAGE, "CT"),
    "mr": (MR_IMAGE, "MR"),
    "sc": (SECONDARY_CAPTURE, "OT"),
}


BUNDLED = {
    # name -> (pydicom test file, expected transfer syntax)
    "jpeg_baseline": ("SC_rgb_jpeg_dcmtk.dcm", JPEGBaseline8Bit),
    "ct_small": ("CT_small.dcm", ExplicitVRLittleEndian),
    "mr_bigendian": ("MR_small_bigendian.dcm", ExplicitVRBigEndian),
    "deflated_bundled": ("image_dfl.dcm", DeflatedExplicitVRLittleEndian),
    "rtplan_implicit": ("rtplan.dcm", ImplicitVRLittleEndian),
}


def dcmcjpeg_file(directory: Path) -> Path:
    """A CT instance compressed by DCMTK's dcmcjpeg (JPEG lossless SV1, 1.2.840.10008.1.2.4.70)."""
    tool = require_dcmtk("dcmcjpeg")["dcmcjpeg"]
    directory.mkdir(parents=True, exist_ok=True)
    source = write_part10(
        make_dataset(CT_IMAGE, "CT"), directory / "ct_for_jpeg.tmp", ExplicitVRLittleEndian
    )
    target = directory / "ct_jpeg_lossless_dcmcjpeg.dcm"
    result = run_bounded([tool, "+e1", str(source), str(target)], timeout=60)
    assert result.returncode == 0, describe(result)
    source.unlink()
    ds = pydicom.dcmread(target, stop_before_pixels=True)
    assert ds.file_meta.TransferSyntaxUID == JPEG_LOSSLESS_SV1
    return target


#: Every instance the store tests send: generated ones in each uncompressed/deflated
#: syntax, files bundled with pydicom, and one compressed by DCMTK.
STORE_CASES = [
    "ct_implicit_le",
    "mr_explicit_le",
    "sc_explicit_be",
    "ct_deflated",
    "mr_explicit_be",
    "jpeg_baseline",
    "ct_small",
    "mr_bigendian",
    "deflated_bundled",
    "rtplan_implicit",
    "ct_jpeg_lossless",
]


def make_case(case: str, directory: Path) -> Path:
    """The Part 10 file for one of STORE_CASES, written under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    if case in BUNDLED:
        return bundled_file(case, directory)
    if case == "ct_jpeg_lossless":
        return dcmcjpeg_file(directory)
    kind, ts_name = case.split("_", 1)
    sop_class, modality = KINDS[kind]
    ds = make_dataset(sop_class, modality)
    return write_part10(ds, directory / f"{case}.dcm", TRANSFER_SYNTAXES[ts_name])


def transfer_syntax_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def sop_class_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID)


def bundled_file(name: str, directory: Path, *, as_is: bool = False) -> Path:
    """A copy of a file bundled in the pydicom wheel (never downloaded).

    rtplan.dcm's meta header names another SOP Instance UID than its dataset; unless
    ``as_is``, such a header is rewritten to match (the dataset bytes stay as they are).
    """
    filename, expected_ts = BUNDLED[name]
    original = get_testdata_file(filename, download=False)
    assert original is not None, f"{filename} is not bundled with this pydicom"
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{name}.dcm"
    shutil.copyfile(original, target)
    ds = pydicom.dcmread(target)
    assert ds.file_meta.TransferSyntaxUID == expected_ts
    meta = ds.file_meta
    if not as_is and (
        meta.MediaStorageSOPInstanceUID != ds.SOPInstanceUID
        or meta.MediaStorageSOPClassUID != ds.SOPClassUID
    ):
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.save_as(target, enforce_file_format=True)
    return target


# --------------------------------------------------------------------------------------
# comparing what was stored with what was sent
# --------------------------------------------------------------------------------------
def _compared(tag: BaseTag) -> bool:
    # A sender may drop (gggg,0000) group lengths and (FFFC,FFFC) trailing padding
    # (DCMTK's storescu does); neither carries information.
    return tag.element != 0 and tag != 0xFFFCFFFC


def assert_same_instance(
    original: Path, received: Path, *, same_transfer_syntax: bool = True
) -> None:
    """Element-by-element equality of the datasets; of group 2 only the transfer syntax
    and the SOP class/instance UIDs are compared (the transfer syntax only when the peer
    was not free to convert: ``same_transfer_syntax``)."""
    sent = pydicom.dcmread(original)
    got = pydicom.dcmread(received)
    sent_meta, got_meta = sent.file_meta, got.file_meta
    if same_transfer_syntax:
        assert got_meta.TransferSyntaxUID == sent_meta.TransferSyntaxUID, received
    assert got_meta.MediaStorageSOPClassUID == sent.SOPClassUID
    assert got_meta.MediaStorageSOPInstanceUID == sent.SOPInstanceUID
    sent_tags = [elem.tag for elem in sent if _compared(elem.tag)]
    got_tags = [elem.tag for elem in got if _compared(elem.tag)]
    assert got_tags == sent_tags, f"{received}: element tags differ"
    for tag in sent_tags:
        elem, other = sent[tag], got[tag]
        assert other.VR == elem.VR or {other.VR, elem.VR} <= {"OB", "OW", "OB or OW"}, elem.tag
        assert other.value == elem.value, f"{received}: {elem.tag} {elem.name} differs"


def received_files(directory: Path) -> list[Path]:
    """Finished files in an output directory (temporary/hidden files excluded)."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith("."))


def find_received(directory: Path, sop_instance_uid: str, timeout: float = 10.0) -> Path:
    """The received file holding ``sop_instance_uid`` (waits for it to appear)."""
    deadline = time.monotonic() + timeout
    while True:
        for path in received_files(directory):
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:
                continue
            if ds.get("SOPInstanceUID") == sop_instance_uid:
                return path
        if time.monotonic() > deadline:
            names = [p.name for p in received_files(directory)]
            raise AssertionError(f"{sop_instance_uid} not received in {directory}: {names}")
        time.sleep(0.1)


def sop_instance_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# --------------------------------------------------------------------------------------
# our server in-process (for hooks the apps do not expose on their command line)
# --------------------------------------------------------------------------------------
class InProcessServer:
    """``protocol.net.start_server`` on its own event loop in a background thread, so a
    blocking peer (pynetdicom) can run in the test's thread."""

    def __init__(self, handler: object, policy: object, **kwargs: object) -> None:

        self._asyncio = asyncio
        self._handler = handler
        self._policy = policy
        self._kwargs = kwargs
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.server: object = None
        self.port = 0

    def __enter__(self) -> InProcessServer:
        from protocol.net import start_server

        self._thread.start()
        future = self._asyncio.run_coroutine_threadsafe(
            start_server(self._handler, self._policy, HOST, 0, **self._kwargs),  # type: ignore[arg-type]
            self._loop,
        )
        self.server = future.result(timeout=10)
        self.port = self.server.port  # type: ignore[attr-defined]
        return self

    def __exit__(self, *exc: object) -> None:
        async def close() -> None:
            await self.server.close(grace=1.0)  # type: ignore[attr-defined]

        try:
            self._asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()
