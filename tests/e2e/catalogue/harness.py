"""The catalogue harness: frames as data, a scripted raw peer, process watches.

Reliability catalogue Part C.1/C.2/C.7. Frames are built here by hand from PS3.8 9.3 and
PS3.7 E (never with our ``protocol`` package, which is what they test); the defaults give
the golden vectors of catalogue B.0 byte for byte. A malformation is a small edit of a
valid frame (``edit``, ``set_length``, ``truncate``), so the same bytes can be fed to the
sans-IO core (layer U) and to the live listener (layer I).

``RawPeer`` is a plain blocking socket that plays "send bytes / expect bytes or close
within T" steps. Every peer opened is remembered in ``PEERS`` (its local address), which
is how the catalogue's ``invariant`` fixture knows whose WARNING lines to look for.

Imported as ``harness`` (tests/e2e/catalogue/conftest.py puts this directory on
``sys.path``) or as ``tests.e2e.catalogue.harness``.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.interop.interop_support import recv_exactly

HOST = "127.0.0.1"

VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.9.9999"

#: What every dataset of the catalogue tests carries, so "no patient data in the log"
#: is a check that can fail (DESIGN §9: PHI only at debug level).
PATIENT_NAME = "Catalogue^Harness^Phi"
PATIENT_ID = "CATALOGUE-PHI-7"

# --------------------------------------------------------------------------------------
# A-ABORT bytes (catalogue B.0 notation)
# --------------------------------------------------------------------------------------
#: AA-1: anything invalid while the A-ASSOCIATE-RQ is awaited (Sta2): source 0, reason 0.
ABORT_1 = bytes.fromhex("07 00 00 00 00 04 00 00 00 00")
#: ABORT-U: a violation found above the Upper Layer (DIMSE): also source 0, reason 0.
ABORT_U = ABORT_1


def abort_8(reason: int) -> bytes:
    """AA-8 from Sta3 on: A-ABORT, source 2 (service provider), ``reason`` (PS3.8 9.3.8)."""
    return abort(2, reason)


# --------------------------------------------------------------------------------------
# PDUs and items (PS3.8 9.3)
# --------------------------------------------------------------------------------------
def pdu(pdu_type: int, body: bytes) -> bytes:
    """A PDU: type, reserved byte, 4-byte big-endian length, body (PS3.8 9.3.1)."""
    return bytes([pdu_type, 0]) + len(body).to_bytes(4, "big") + body


def item(item_type: int, body: bytes) -> bytes:
    """An item or sub-item: type, reserved byte, 2-byte big-endian length, body."""
    return bytes([item_type, 0]) + len(body).to_bytes(2, "big") + body


def presentation_context(
    context_id: int, abstract_syntax: str | None, transfer_syntaxes: Sequence[str]
) -> bytes:
    """A presentation context item of an A-ASSOCIATE-RQ (PS3.8 9.3.2.2); ``None`` for
    the abstract syntax leaves that sub-item out (catalogue MP-22)."""
    body = bytes([context_id, 0, 0, 0])
    if abstract_syntax is not None:
        body += item(0x30, abstract_syntax.encode())
    body += b"".join(item(0x40, ts.encode()) for ts in transfer_syntaxes)
    return item(0x20, body)


def user_information(
    max_pdu: int | None = 16384,
    implementation_uid: str | None = IMPLEMENTATION_UID,
    extra: bytes = b"",
) -> bytes:
    """The user information item (PS3.8 9.3.2.3): maximum length, implementation class
    UID, then ``extra`` sub-items as given (role selection, user identity, unknown...)."""
    body = b""
    if max_pdu is not None:
        body += item(0x51, max_pdu.to_bytes(4, "big"))
    if implementation_uid is not None:
        body += item(0x52, implementation_uid.encode())
    return item(0x50, body + extra)


Context = tuple[int, str | None, Sequence[str]]


def associate_rq(
    called: str = "ROUTER",
    calling: str = "MODALITY",
    contexts: Iterable[Context] = ((1, VERIFICATION, (IMPLICIT_LE,)),),
    max_pdu: int | None = 16384,
    user_items: bytes = b"",
    *,
    protocol_version: int = 1,
    application_context: str | None = APPLICATION_CONTEXT,
    implementation_uid: str | None = IMPLEMENTATION_UID,
    extra_items: bytes = b"",
    user_info: bytes | None = None,
    called_raw: bytes | None = None,
    calling_raw: bytes | None = None,
) -> bytes:
    """An A-ASSOCIATE-RQ (PS3.8 9.3.2); the defaults are catalogue B.0's 191 bytes.

    ``user_items`` are appended inside the user information item; ``extra_items`` go
    between the application context and the first presentation context (catalogue
    MP-12); ``user_info`` replaces the whole user information item (``b""`` drops it);
    ``called_raw``/``calling_raw`` are the 16 bytes of an AE title field as given.
    """
    called_field = called_raw if called_raw is not None else called.encode().ljust(16)
    calling_field = calling_raw if calling_raw is not None else calling.encode().ljust(16)
    app = item(0x10, application_context.encode()) if application_context is not None else b""
    pcs = b"".join(presentation_context(cid, a, ts) for cid, a, ts in contexts)
    if user_info is None:
        user_info = user_information(max_pdu, implementation_uid, user_items)
    body = (
        protocol_version.to_bytes(2, "big")
        + b"\x00\x00"
        + called_field
        + calling_field
        + bytes(32)
        + app
        + extra_items
        + pcs
        + user_info
    )
    return pdu(0x01, body)


def pdv(context_id: int, control: int, data: bytes) -> bytes:
    """A presentation data value item (PS3.8 9.3.5.1): length covers context id, the
    message control header (bit 0 command, bit 1 last fragment, PS3.8 E.2) and data."""
    return (len(data) + 2).to_bytes(4, "big") + bytes([context_id, control]) + data


def p_data_tf(*pdvs: bytes) -> bytes:
    return pdu(0x04, b"".join(pdvs))


def release_rq() -> bytes:
    return bytes.fromhex("05 00 00 00 00 04 00 00 00 00")


def release_rp() -> bytes:
    return bytes.fromhex("06 00 00 00 00 04 00 00 00 00")


def abort(source: int, reason: int) -> bytes:
    return bytes.fromhex("07 00 00 00 00 04 00 00") + bytes([source, reason])


# --------------------------------------------------------------------------------------
# DIMSE command sets (PS3.7 E, Implicit VR Little Endian with group length)
# --------------------------------------------------------------------------------------
COMMAND = 0x01  # message control header bit 0
LAST = 0x02  # bit 1
COMMAND_LAST = COMMAND | LAST
DATASET_LAST = LAST
DATASET_MORE = 0x00


def element(tag: int, value: bytes) -> bytes:
    """An Implicit VR LE element of group 0000 (``tag`` is the element number)."""
    return struct.pack("<HHI", 0x0000, tag, len(value)) + value


def _ui(uid: str) -> bytes:
    raw = uid.encode()
    return raw + b"\x00" if len(raw) % 2 else raw


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def command_set(elements: Iterable[tuple[int, bytes]]) -> bytes:
    """Elements (sorted by element number) preceded by (0000,0000) CommandGroupLength."""
    body = b"".join(element(tag, value) for tag, value in sorted(elements))
    return element(0x0000, struct.pack("<I", len(body))) + body


def c_echo_rq(message_id: int = 1, sop_class: str = VERIFICATION) -> bytes:
    return command_set(
        [
            (0x0002, _ui(sop_class)),
            (0x0100, _us(0x0030)),
            (0x0110, _us(message_id)),
            (0x0800, _us(0x0101)),
        ]
    )


def c_store_rq(
    message_id: int,
    sop_class: str,
    sop_instance: str,
    *,
    priority: int = 0,
    has_dataset: bool = True,
) -> bytes:
    return command_set(
        [
            (0x0002, _ui(sop_class)),
            (0x0100, _us(0x0001)),
            (0x0110, _us(message_id)),
            (0x0700, _us(priority)),
            (0x0800, _us(0x0000 if has_dataset else 0x0101)),
            (0x1000, _ui(sop_instance)),
        ]
    )


#: P-DATA-TF carrying a C-ECHO-RQ (message id 1) on context 1: catalogue B.0, 80 bytes.
C_ECHO_PDATA = p_data_tf(pdv(1, COMMAND_LAST, c_echo_rq(1)))


def store_pdata(
    context_id: int,
    message_id: int,
    sop_class: str,
    sop_instance: str,
    dataset: bytes,
    fragment: int = 16000,
) -> list[bytes]:
    """The P-DATA-TF PDUs of one C-STORE-RQ: the command, then the dataset in fragments
    of at most ``fragment`` bytes (one PDV per PDU)."""
    pdus = [
        p_data_tf(pdv(context_id, COMMAND_LAST, c_store_rq(message_id, sop_class, sop_instance)))
    ]
    chunks = [dataset[i : i + fragment] for i in range(0, len(dataset), fragment)] or [b""]
    for n, chunk in enumerate(chunks):
        control = DATASET_LAST if n == len(chunks) - 1 else DATASET_MORE
        pdus.append(p_data_tf(pdv(context_id, control, chunk)))
    return pdus


def command_status(command: bytes) -> int | None:
    """The (0000,0900) Status of an Implicit VR LE command set, or None."""
    offset = 0
    while offset + 8 <= len(command):
        group, elem, length = struct.unpack_from("<HHI", command, offset)
        value = command[offset + 8 : offset + 8 + length]
        if group == 0 and elem == 0x0900 and length == 2:
            return int(struct.unpack("<H", value)[0])
        offset += 8 + length
    return None


def pdvs_of(pdata: bytes) -> list[tuple[int, int, bytes]]:
    """(context id, control header, data) of each PDV of a whole P-DATA-TF PDU."""
    out, body, offset = [], pdata[6:], 0
    while offset + 6 <= len(body):
        length = int.from_bytes(body[offset : offset + 4], "big")
        out.append((body[offset + 4], body[offset + 5], body[offset + 6 : offset + 4 + length]))
        offset += 4 + length
    return out


def parse_command_status(pdata: bytes) -> int | None:
    """The Status of a P-DATA-TF PDU carrying one whole command set, or None."""
    return command_status(b"".join(data for _, control, data in pdvs_of(pdata) if control & 1))


def items_of(body: bytes) -> list[tuple[int, bytes]]:
    """(type, body) of each item in ``body`` (no checks beyond what parsing needs)."""
    out, offset = [], 0
    while offset + 4 <= len(body):
        length = int.from_bytes(body[offset + 2 : offset + 4], "big")
        out.append((body[offset], body[offset + 4 : offset + 4 + length]))
        offset += 4 + length
    return out


@dataclass(frozen=True)
class Accepted:
    """What an A-ASSOCIATE-AC says (PS3.8 9.3.3): context results and max length."""

    contexts: list[tuple[int, int, str]]  # (id, result, transfer syntax)
    max_pdu: int | None

    def result(self, context_id: int) -> int:
        found = [r for cid, r, _ in self.contexts if cid == context_id]
        assert len(found) == 1, f"context {context_id}: {self.contexts}"
        return found[0]


def parse_ac(ac: bytes) -> Accepted:
    assert ac[0] == 0x02, f"not an A-ASSOCIATE-AC: {ac[:10].hex(' ')}"
    contexts: list[tuple[int, int, str]] = []
    max_pdu = None
    for item_type, body in items_of(ac[6 + 68 :]):
        if item_type == 0x21:
            ts = b"".join(b for t, b in items_of(body[4:]) if t == 0x40)
            contexts.append((body[0], body[2], ts.rstrip(b"\x00").decode(errors="replace")))
        elif item_type == 0x50:
            for sub_type, sub in items_of(body):
                if sub_type == 0x51:
                    max_pdu = int.from_bytes(sub, "big")
    return Accepted(contexts, max_pdu)


# --------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------
def dataset_bytes(sop_instance: str, *, modality: str = "CT", explicit: bool = True) -> bytes:
    """A small CT dataset (no file meta) carrying ``PATIENT_NAME``/``PATIENT_ID``."""
    from tests.e2e.ingest_support import EXPLICIT_LE as EXPL
    from tests.e2e.ingest_support import IMPLICIT_LE as IMPL
    from tests.e2e.ingest_support import encode_dataset

    return encode_dataset(catalogue_dataset(sop_instance, modality), EXPL if explicit else IMPL)


def catalogue_dataset(sop_instance: str | None = None, modality: str = "CT"):  # type: ignore[no-untyped-def]
    """ingest_support's small image instance with the catalogue's patient data."""
    from tests.e2e.ingest_support import make_dataset

    ds = make_dataset(modality)
    if sop_instance is not None:
        ds.SOPInstanceUID = sop_instance
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    return ds


# --------------------------------------------------------------------------------------
# frame edits
# --------------------------------------------------------------------------------------
def edit(frame: bytes, offset: int, new: bytes) -> bytes:
    """``frame`` with the bytes at ``offset`` replaced by ``new`` (same total length
    unless ``new`` runs past the end)."""
    return frame[:offset] + new + frame[offset + len(new) :]


def set_length(frame: bytes, n: int) -> bytes:
    """``frame`` with its PDU length field (bytes 2..5) set to ``n``, body untouched."""
    return edit(frame, 2, n.to_bytes(4, "big"))


def truncate(frame: bytes, n: int) -> bytes:
    """The first ``n`` bytes of ``frame`` (its length field still announces the rest)."""
    return frame[:n]


def find(frame: bytes, needle: bytes, start: int = 0) -> int:
    """The offset of ``needle`` in ``frame`` (AssertionError when absent)."""
    offset = frame.find(needle, start)
    assert offset >= 0, f"{needle!r} not in frame"
    return offset


# --------------------------------------------------------------------------------------
# the raw peer
# --------------------------------------------------------------------------------------
#: Local "host:port" of every RawPeer connected so far (the invariant reads and clears it).
PEERS: list[str] = []


class PeerClosed(AssertionError):
    """The other side closed while bytes were expected."""


class RawPeer:
    """A scripted peer on a plain blocking socket (catalogue Part C.1)."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.sock: socket.socket | None = None
        self.address = ""

    def __enter__(self) -> RawPeer:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> RawPeer:
        self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        host, port = self.sock.getsockname()[:2]
        self.address = f"{host}:{port}"
        PEERS.append(self.address)
        return self

    @property
    def local_port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def _socket(self) -> socket.socket:
        assert self.sock is not None, "RawPeer is not connected"
        return self.sock

    # -- sending ---------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        self._socket().sendall(data)

    def send_all(self, frames: Iterable[bytes]) -> None:
        """Several frames in one write (catalogue MP-36)."""
        self.send(b"".join(frames))

    def send_slowly(self, data: bytes, chunk: int = 1, interval: float = 0.1) -> None:
        for i in range(0, len(data), chunk):
            self.send(data[i : i + chunk])
            if interval:
                time.sleep(interval)

    def try_send(self, data: bytes) -> bool:
        """Send, returning False instead of raising when the other side has gone."""
        try:
            self.send(data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    # -- receiving -------------------------------------------------------------------
    def recv_exactly(self, n: int, within: float = 10.0) -> bytes:
        return recv_exactly(self._socket(), n, within)

    def recv_pdu(self, within: float = 10.0) -> tuple[int, bytes]:
        """One whole PDU: (type, body); PeerClosed when it does not arrive whole."""
        header = self.recv_exactly(6, within)
        if len(header) < 6:
            raise PeerClosed(f"{self.address}: expected a PDU header, got {header.hex(' ')!r}")
        length = int.from_bytes(header[2:6], "big")
        body = self.recv_exactly(length, within)
        if len(body) < length:
            raise PeerClosed(f"{self.address}: PDU body truncated: {len(body)} of {length}")
        return header[0], body

    def recv_pdu_bytes(self, within: float = 10.0) -> bytes:
        pdu_type, body = self.recv_pdu(within)
        return pdu(pdu_type, body)

    def expect(self, data: bytes, within: float = 10.0) -> None:
        """Exactly ``data`` next (AssertionError with both in hex otherwise)."""
        got = self.recv_exactly(len(data), within)
        assert got == data, f"{self.address}: expected {data.hex(' ')}, got {got.hex(' ')!r}"

    def expect_close(self, within: float = 10.0) -> float:
        """Nothing more, then EOF (or RST) within ``within`` s; returns the seconds
        waited."""
        sock = self._socket()
        started = time.monotonic()
        deadline = started + within
        extra = b""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"{self.address}: not closed within {within} s (extra {extra.hex(' ')!r})"
                )
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                assert extra == b"", f"{self.address}: bytes before close: {extra.hex(' ')}"
                return time.monotonic() - started
            extra += chunk

    def expect_abort_and_close(self, data: bytes, within: float = 10.0) -> None:
        """The prescribed A-ABORT bytes, then the connection closed."""
        self.expect(data, within)
        self.expect_close(within)

    def expect_reject(self, result: int, source: int, reason: int, within: float = 10.0) -> None:
        """An A-ASSOCIATE-RJ with these codes (PS3.8 9.3.4), then close."""
        rj = bytes.fromhex("03 00 00 00 00 04 00") + bytes([result, source, reason])
        self.expect(rj, within)
        self.expect_close(within)

    # -- helpers ---------------------------------------------------------------------
    def associate(self, **rq_fields: object) -> bytes:
        """Send an A-ASSOCIATE-RQ (``associate_rq(**rq_fields)``) and return the whole
        A-ASSOCIATE-AC PDU (AssertionError on anything else): "get to Sta6 first"."""
        self.send(associate_rq(**rq_fields))  # type: ignore[arg-type]
        pdu_type, body = self.recv_pdu()
        assert pdu_type == 0x02, f"expected A-ASSOCIATE-AC, got {pdu(pdu_type, body).hex(' ')}"
        return pdu(0x02, body)

    def recv_command(self, within: float = 10.0) -> bytes:
        """P-DATA-TF PDUs until a command's last fragment; the command set's bytes (the
        node fragments to the Maximum Length we announced: catalogue MP-24)."""
        command = b""
        while True:
            frame = self.recv_pdu_bytes(within)
            assert frame[0] == 0x04, f"{self.address}: expected P-DATA-TF, got {frame.hex(' ')}"
            for _, control, data in pdvs_of(frame):
                if control & COMMAND:
                    command += data
                    if control & LAST:
                        return command

    def echo(self, message_id: int = 1, context_id: int = 1) -> int | None:
        """A C-ECHO on an established association; returns its status."""
        self.send(p_data_tf(pdv(context_id, COMMAND_LAST, c_echo_rq(message_id))))
        return command_status(self.recv_command())

    def release(self) -> None:
        """A-RELEASE-RQ, expect A-RELEASE-RP, close."""
        self.send(release_rq())
        self.expect(release_rp())
        self.close()

    def reset(self) -> None:
        """Close with an RST (SO_LINGER 0) instead of a FIN."""
        sock = self._socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()

    def shutdown_write(self) -> None:
        """Half-close: FIN to the other side, still reading."""
        self._socket().shutdown(socket.SHUT_WR)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


# --------------------------------------------------------------------------------------
# /proc watches (catalogue Part C.7)
# --------------------------------------------------------------------------------------
def _fd_targets(pid: int) -> dict[int, str]:
    out: dict[int, str] = {}
    base = Path(f"/proc/{pid}/fd")
    for entry in base.iterdir():
        try:
            out[int(entry.name)] = os.readlink(entry)
        except OSError:
            continue  # closed between listing and reading
    return out


def fd_kind(target: str) -> str:
    """What an fd is, for comparisons that survive a database pool growing: sockets,
    pipes, anonymous inodes and other files by path; SQLite files as one kind each."""
    if target.startswith(("socket:", "pipe:")):
        return target.split(":", 1)[0]
    if target.startswith("anon_inode:"):
        return target
    name = os.path.basename(target)
    if ".sqlite" in name:
        return "database"
    return target


def _status_field(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {name} in /proc/{pid}/status")


@dataclass
class Snapshot:
    kinds: dict[str, int]
    rss_kib: int
    hwm_kib: int
    threads: int


def snapshot(pid: int) -> Snapshot:
    kinds: dict[str, int] = {}
    for target in _fd_targets(pid).values():
        kind = fd_kind(target)
        kinds[kind] = kinds.get(kind, 0) + 1
    return Snapshot(
        kinds,
        _status_field(pid, "VmRSS"),
        _status_field(pid, "VmHWM"),
        _status_field(pid, "Threads"),
    )


class ProcessWatch:
    """A baseline of open fds (/proc/PID/fd, by kind), RSS and threads of ``pids``."""

    def __init__(self, pids: Iterable[int]) -> None:
        self.pids = list(pids)
        self.baseline = {pid: snapshot(pid) for pid in self.pids}

    def leaks(self) -> dict[int, dict[str, tuple[int, int]]]:
        """Per pid, each fd kind with more open now than at the baseline (except the
        database files, whose pool may grow): kind -> (baseline, now)."""
        out: dict[int, dict[str, tuple[int, int]]] = {}
        for pid in self.alive():
            before = self.baseline[pid].kinds
            try:
                now = snapshot(pid).kinds
            except FileNotFoundError:
                continue  # it exited after alive() looked
            grown = {
                kind: (before.get(kind, 0), count)
                for kind, count in now.items()
                if kind != "database" and count > before.get(kind, 0)
            }
            if grown:
                out[pid] = grown
        return out

    def alive(self) -> list[int]:
        """The watched pids still running (a case may restart a listener: a new process
        has no baseline to compare with, so it is not compared)."""
        return [pid for pid in self.pids if Path(f"/proc/{pid}").exists()]

    def assert_back_to_baseline(self, timeout: float = 15.0) -> None:
        """Wait up to ``timeout`` s for every fd kind to be back at (or below) its
        baseline count; AssertionError naming what stayed open otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            leaks = self.leaks()
            if not leaks:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"fds not back to baseline after {timeout} s: {leaks}")
            time.sleep(0.1)

    def rss_growth(self) -> int:
        """KiB of resident memory gained since the baseline (largest over the pids)."""
        return max(snapshot(pid).rss_kib - self.baseline[pid].rss_kib for pid in self.alive())

    def hwm_growth(self) -> int:
        """KiB the peak resident memory (VmHWM) rose since the baseline."""
        return max(snapshot(pid).hwm_kib - self.baseline[pid].hwm_kib for pid in self.alive())

    def threads(self) -> dict[int, tuple[int, int]]:
        """pid -> (threads at the baseline, threads now): reported, not asserted (the
        listener's executor starts threads on demand)."""
        return {pid: (self.baseline[pid].threads, snapshot(pid).threads) for pid in self.alive()}


# One module under both names it is imported by ("harness" from the catalogue conftest's
# sys.path entry, "tests.e2e.catalogue.harness" from elsewhere), so PEERS is one list and
# the invariant sees every RawPeer whichever way a test imported it.
sys.modules.setdefault("harness", sys.modules[__name__])
sys.modules.setdefault("tests.e2e.catalogue.harness", sys.modules[__name__])
