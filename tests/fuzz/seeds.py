"""Valid seeds and byte mutators for the live fuzz run (fuzz_live_listener.py).

Seeds are well-formed byte strings (A-ASSOCIATE-RQ/AC/RJ, P-DATA-TF, A-RELEASE-RQ/RP,
A-ABORT, DIMSE command sets, Explicit and Implicit VR LE data sets), each with the map
of its length fields, so that a length edit hits a real length (PS3.8 9.3, PS3.7 6.3.1,
PS3.5 7.1). Mutations: bit flips, byte sets to boundary values, length edits (0, +-1,
doubled, the enclosing length +-1, the maximum), truncation, insertion, deletion,
duplication of a slice, and splicing of two seeds. Everything is seeded from one
``random.Random`` so a run can be replayed.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field
from io import BytesIO

from livenode import CT_IMAGE, SECONDARY_CAPTURE
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from protocol.dimse import (
    CEchoRQ,
    CEchoRSP,
    CStoreRQ,
    CStoreRSP,
    UnsupportedCommand,
    encode_command,
)
from protocol.items import PresentationContextAC, PresentationContextRQ
from protocol.pdu import (
    AAbort,
    AAssociateAC,
    AAssociateRJ,
    AAssociateRQ,
    AReleaseRP,
    AReleaseRQ,
)
from protocol.uids import EXPLICIT_VR_LE, IMPLICIT_VR_LE, VERIFICATION
from protocol.user_info import (
    AsyncOpsWindow,
    RoleSelection,
    SOPClassExtendedNegotiation,
    UserIdentityRQ,
    UserInformation,
)

# (offset, width, byteorder) of a length field
Field = tuple[int, int, str]


@dataclass(frozen=True)
class Seed:
    name: str
    data: bytes
    lengths: list[Field] = field(default_factory=list)
    values: list[int] = field(default_factory=list)  # offsets of value bytes (commands)


# --- length-field maps ----------------------------------------------------------------------
def pdu_lengths(stream: bytes, base: int = 0) -> list[Field]:
    """Every length field of a stream of PDUs: PDU, PDV, item and sub-item lengths."""
    out: list[Field] = []
    off = 0
    while off + 6 <= len(stream):
        kind = stream[off]
        (length,) = struct.unpack_from(">I", stream, off + 2)
        out.append((base + off + 2, 4, "big"))
        end = min(off + 6 + length, len(stream))
        if kind == 4:
            pos = off + 6
            while pos + 4 <= end:
                out.append((base + pos, 4, "big"))
                pos += 4 + struct.unpack_from(">I", stream, pos)[0]
        elif kind in (1, 2):
            out += _item_lengths(stream, off + 6 + 68, end, base)
        off = end
    return out


def _item_lengths(data: bytes, off: int, end: int, base: int) -> list[Field]:
    out: list[Field] = []
    while off + 4 <= end:
        kind = data[off]
        (length,) = struct.unpack_from(">H", data, off + 2)
        out.append((base + off + 2, 2, "big"))
        stop = min(off + 4 + length, end)
        if kind in (0x20, 0x21):
            out += _item_lengths(data, off + 8, stop, base)
        elif kind == 0x50:
            out += _item_lengths(data, off + 4, stop, base)
        elif kind in (0x54, 0x56):  # sub-items led by a 2-byte UID length
            out.append((base + off + 4, 2, "big"))
        elif kind == 0x58:  # user identity: 2-byte primary and secondary lengths
            out.append((base + off + 6, 2, "big"))
        off = stop
    return out


def command_values(command: bytes, elements: tuple[int, ...] = ()) -> list[int]:
    """Offsets of the value bytes of an Implicit VR LE command set (after its group
    length); only those of ``elements`` (element numbers of group 0000) if given."""
    out: list[int] = []
    off = 12
    while off + 8 <= len(command):
        element, length = struct.unpack_from("<HI", command, off + 2)
        if not elements or element in elements:
            out += range(off + 8, min(off + 8 + length, len(command)))
        off += 8 + length
    return out


def command_lengths(command: bytes, base: int = 0) -> list[Field]:
    """Group length value and every element length of an Implicit VR LE command set."""
    out: list[Field] = [(base + 8, 4, "little")]
    off = 0
    while off + 8 <= len(command):
        out.append((base + off + 4, 4, "little"))
        off += 8 + struct.unpack_from("<I", command, off + 4)[0]
    return out


_LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UT", b"UN", b"UC", b"UR", b"SV"}
_LONG_VRS |= {b"UV"}


def dataset_lengths(data: bytes, explicit: bool, base: int = 0) -> list[Field]:
    """Every element, sequence and item length of a little-endian data set (PS3.5 7.1)."""
    out: list[Field] = []

    def walk(off: int, end: int) -> None:
        while off + 8 <= end:
            group, elem = struct.unpack_from("<HH", data, off)
            if group == 0xFFFE:  # item / delimiters: 4-byte length, no VR
                out.append((base + off + 4, 4, "little"))
                (length,) = struct.unpack_from("<I", data, off + 4)
                if elem == 0xE000 and length != 0xFFFFFFFF:
                    walk(off + 8, min(off + 8 + length, end))
                    off += 8 + length
                else:
                    off += 8
                continue
            vr = data[off + 4 : off + 6]
            if explicit and vr in _LONG_VRS:
                out.append((base + off + 8, 4, "little"))
                (length,) = struct.unpack_from("<I", data, off + 8)
                value = off + 12
            elif explicit:
                out.append((base + off + 6, 2, "little"))
                (length,) = struct.unpack_from("<H", data, off + 6)
                value = off + 8
            else:
                out.append((base + off + 4, 4, "little"))
                (length,) = struct.unpack_from("<I", data, off + 4)
                value = off + 8
            if length == 0xFFFFFFFF:
                off = value
                continue
            if (explicit and vr == b"SQ") or (not explicit and (group, elem) in _IMPLICIT_SQ):
                walk(value, min(value + length, end))
            off = value + length

    walk(0, len(data))
    return out


_IMPLICIT_SQ = {(0x0008, 0x2218), (0x0040, 0xA730), (0x0040, 0xA043)}


# --- datasets -------------------------------------------------------------------------------
def _dataset(sop_class: str, rows: int, nested: bool) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Fuzz^Live"
    ds.PatientID = "FUZZ-1"
    ds.StudyDate = "20240102"
    ds.Modality = "CT" if sop_class == CT_IMAGE else "OT"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PixelSpacing = [0.5, 0.5]
    ds.Rows = ds.Columns = rows
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    item = Dataset()
    item.CodeValue = "T-D0050"
    item.CodingSchemeDesignator = "SRT"
    item.CodeMeaning = "Tissue"
    ds.AnatomicRegionSequence = [item]
    if nested:
        concept = Dataset()
        concept.CodeValue = "121071"
        concept.CodingSchemeDesignator = "DCM"
        content = Dataset()
        content.ValueType = "TEXT"
        content.ConceptNameCodeSequence = [concept]
        content.TextValue = "nested"
        ds.ContentSequence = [content, content]
    ds.PixelData = bytes(range(256)) * (rows * rows * 2 // 256)
    ds["PixelData"].VR = "OW"
    return ds


def _encode(ds: Dataset, implicit: bool) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, implicit_vr=implicit, little_endian=True, enforce_file_format=False)
    return buffer.getvalue()


@dataclass(frozen=True)
class StoreSeed:
    """A C-STORE: context, command set and data set, with their length maps."""

    context_id: int
    command: Seed
    dataset: Seed


def store_seeds() -> list[StoreSeed]:
    out = []
    for ctx, sop_class, implicit, rows, nested in (
        (3, CT_IMAGE, False, 16, False),
        (3, CT_IMAGE, False, 8, True),
        (5, SECONDARY_CAPTURE, True, 8, True),
    ):
        ds = _dataset(sop_class, rows, nested)
        data = _encode(ds, implicit)
        cmd = encode_command(CStoreRQ(7, sop_class, ds.SOPInstanceUID, 0, None, None))
        out.append(
            StoreSeed(
                ctx,
                Seed(f"store-cmd-{ctx}", cmd, command_lengths(cmd), command_values(cmd)),
                Seed(f"dataset-{ctx}-{rows}", data, dataset_lengths(data, not implicit)),
            )
        )
    return out


def command_seeds() -> list[Seed]:
    messages = [
        CEchoRQ(11),
        CStoreRQ(12, CT_IMAGE, "1.2.3.4.5", 1, "MOVER", 3),
        CStoreRQ(13, CT_IMAGE, "1.2.3.4.6", 2),
        UnsupportedCommand(0x0020, 14, True),  # C-FIND-RQ
        UnsupportedCommand(0x0FFF, 15, False),  # C-CANCEL-RQ
        CEchoRSP(16, 0),
        CStoreRSP(17, CT_IMAGE, "1.2.3", 0),
    ]
    out = []
    for msg in messages:
        raw = encode_command(msg)
        out.append(
            Seed(f"cmd-{type(msg).__name__}", raw, command_lengths(raw), command_values(raw))
        )
    return out


# --- PDUs -----------------------------------------------------------------------------------
def rq_seeds(calling: str) -> list[Seed]:
    plain = (
        PresentationContextRQ(1, (VERIFICATION,), (IMPLICIT_VR_LE,)),
        PresentationContextRQ(3, (CT_IMAGE,), (EXPLICIT_VR_LE, IMPLICIT_VR_LE)),
        PresentationContextRQ(5, (SECONDARY_CAPTURE,), (IMPLICIT_VR_LE,)),
    )
    rich = UserInformation(
        max_length=0,
        implementation_class_uid="1.2.826.0.1.3680043.9.9999.1",
        implementation_version_name="FUZZ_1",
        async_ops_window=AsyncOpsWindow(1, 1),
        role_selections=(RoleSelection(CT_IMAGE, True, False),),
        sop_class_extended=(SOPClassExtendedNegotiation(CT_IMAGE, b"\x01\x00"),),
        user_identity_rq=UserIdentityRQ(2, True, b"fuzzer", b"secret"),
    )
    rqs = [
        AAssociateRQ("ROUTER", calling, plain, UserInformation(16384, "1.2.3.4")),
        AAssociateRQ("ROUTER", calling, plain, rich),
    ]
    return [_pdu_seed(f"rq-{i}", rq.encode()) for i, rq in enumerate(rqs)]


def other_pdu_seeds() -> list[Seed]:
    ac = AAssociateAC(
        "ROUTER",
        "FUZZ",
        (PresentationContextAC(1, 0, IMPLICIT_VR_LE), PresentationContextAC(3, 3, "")),
        UserInformation(16384, "1.2.3.4"),
    )
    frames = {
        "ac": ac.encode(),
        "rj": AAssociateRJ(1, 1, 7).encode(),
        "release-rq": AReleaseRQ().encode(),
        "release-rp": AReleaseRP().encode(),
        "abort-user": AAbort(0, 0).encode(),
        "abort-provider": AAbort(2, 6).encode(),
    }
    return [_pdu_seed(name, data) for name, data in frames.items()]


def _pdu_seed(name: str, data: bytes) -> Seed:
    return Seed(name, data, pdu_lengths(data))


def pdv_item(context_id: int, control: int, data: bytes) -> bytes:
    return struct.pack(">IBB", len(data) + 2, context_id, control) + data


def pdata_tf(*items: bytes) -> bytes:
    body = b"".join(items)
    return struct.pack(">BBI", 4, 0, len(body)) + body


def fragments(rng: random.Random, context_id: int, data: bytes, command: bool) -> bytes:
    """``data`` as valid P-DATA-TF PDUs: one PDV, several PDUs, or several PDVs a PDU."""
    control = 1 if command else 0
    style = rng.random()
    if style < 0.5 or len(data) < 4:
        return pdata_tf(pdv_item(context_id, control | 2, data))
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 4))))
    parts = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    items = [
        pdv_item(context_id, control | (2 if i == len(parts) - 1 else 0), p)
        for i, p in enumerate(parts)
    ]
    if style < 0.8:
        return b"".join(pdata_tf(item) for item in items)
    return pdata_tf(*items)


# --- mutators -------------------------------------------------------------------------------
_BOUNDARY = (0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF)


def mutate(rng: random.Random, data: bytes, lengths: list[Field], ops: int = 0) -> bytes:
    """Apply 1-4 mutations; length edits are half of them when the map has fields."""
    buf = bytearray(data)
    for _ in range(ops or rng.choice((1, 1, 1, 2, 2, 3, 4))):
        if not buf:
            buf += rng.randbytes(rng.randint(1, 8))
            continue
        roll = rng.random()
        if roll < 0.45 and lengths:
            off, width, order = rng.choice(lengths)
            if off + width > len(buf):
                continue
            current = int.from_bytes(buf[off : off + width], order)  # type: ignore[arg-type]
            top = (1 << (8 * width)) - 1
            room = len(buf) - off - width
            value = rng.choice(
                (
                    0,
                    1,
                    2,
                    current - 1,
                    current + 1,
                    current - 2,
                    current * 2,
                    room,
                    room - 1,
                    room + 1,
                    top,
                    top >> 1,
                    rng.randint(0, top),
                )
            )
            value = min(max(value, 0), top)
            buf[off : off + width] = value.to_bytes(width, order)  # type: ignore[arg-type]
        elif roll < 0.65:
            at = rng.randrange(len(buf))
            buf[at] ^= 1 << rng.randrange(8)
        elif roll < 0.72:
            buf[rng.randrange(len(buf))] = rng.choice(_BOUNDARY)
        elif roll < 0.80:
            del buf[rng.randrange(len(buf)) :]
        elif roll < 0.87:
            at = rng.randrange(len(buf) + 1)
            buf[at:at] = rng.randbytes(rng.randint(1, 16))
        elif roll < 0.94:
            at = rng.randrange(len(buf))
            del buf[at : at + rng.randint(1, 16)]
        else:
            a = rng.randrange(len(buf))
            b = min(len(buf), a + rng.randint(1, 64))
            at = rng.randrange(len(buf) + 1)
            buf[at:at] = buf[a:b]
    return bytes(buf)


def splice(rng: random.Random, a: bytes, b: bytes) -> bytes:
    """The head of ``a`` and the tail of ``b``, cut anywhere."""
    return a[: rng.randint(0, len(a))] + b[rng.randint(0, len(b)) :]


def framing_complete(stream: bytes) -> bool:
    """Whether ``stream`` ends on a PDU boundary (so the peer waits for no more bytes)."""
    off = 0
    while off < len(stream):
        if len(stream) - off < 6:
            return False
        off += 6 + struct.unpack_from(">I", stream, off + 2)[0]
    return off == len(stream)


def mutate_values(
    rng: random.Random, data: bytes, values: list[int], ascii_only: bool = False
) -> bytes:
    """Flip or set 1-3 value bytes only: the structure stays, the content does not.
    ``ascii_only`` keeps every byte below 0x80 (what a UID may hold at all)."""
    buf = bytearray(data)
    top = 7 if ascii_only else 8
    choices = (0x00, 0x20, 0x2E, 0x30, 0x39, 0x7F) + (() if ascii_only else (0x80, 0xFF))
    for _ in range(rng.randint(1, 3)):
        at = rng.choice(values)
        if rng.random() < 0.6:
            buf[at] ^= 1 << rng.randrange(top)
        else:
            buf[at] = rng.choice(choices)
    return bytes(buf)
