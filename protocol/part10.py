"""DICOM Part 10 files: read and write the File Meta Information (PS3.10 7.1).

``read_part10`` finds the SOP class and instance, the transfer syntax and where the data
set starts, reading only the header: the data set is never decoded, so storescu can
send a file's bytes as they are. ``build_file_meta`` writes the header storescp puts in
front of a received data set. No pydicom here: the header is a few fixed elements.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

from protocol.uids import is_valid_uid

PREAMBLE_LENGTH = 128
MAGIC = b"DICM"
#: A File Meta Information group larger than this is not a header we will read.
MAX_META_LENGTH = 1 << 20
_READ_SIZE = 8192

# PS3.5 7.1.2: these VRs have 2 reserved bytes and a 32-bit length in Explicit VR.
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_TAG = struct.Struct("<HH")
_SHORT = struct.Struct("<HH2sH")  # tag, VR, 16-bit length
_LONG = struct.Struct("<HH2s2xI")  # tag, VR, reserved, 32-bit length
_IMPLICIT = struct.Struct("<HHI")  # tag, 32-bit length (non-conformant implicit VR meta)

_SOP_CLASS, _SOP_INSTANCE, _TRANSFER_SYNTAX = 0x0002, 0x0003, 0x0010


class NotPart10Error(ValueError):
    """The file is not a DICOM Part 10 file, or its File Meta Information is unusable."""


@dataclass(frozen=True, slots=True)
class Part10Info:
    sop_class_uid: str  # (0002,0002) Media Storage SOP Class UID
    sop_instance_uid: str  # (0002,0003) Media Storage SOP Instance UID
    transfer_syntax: str  # (0002,0010) Transfer Syntax UID (of the data set)
    dataset_offset: int  # file offset of the first data set byte
    file_size: int


class _Reader:
    """Bytes of the file's head, read on demand and never past MAX_META_LENGTH."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.buf = b""

    def ensure(self, end: int) -> bool:
        """True if the first ``end`` bytes are available."""
        while len(self.buf) < end:
            if end > MAX_META_LENGTH + PREAMBLE_LENGTH + 4:
                raise NotPart10Error(f"File Meta Information longer than {MAX_META_LENGTH} bytes")
            more = self._f.read(max(_READ_SIZE, end - len(self.buf)))
            if not more:
                return False
            self.buf += more
        return True


def read_part10(source: str | os.PathLike[str] | BinaryIO) -> Part10Info:
    """The File Meta Information of a Part 10 file (a path, or a binary file at offset 0).

    Tolerated beyond PS3.10: a file without the 128-byte preamble that starts with
    ``DICM`` or directly with group 0002, and a meta group in Implicit VR. Anything
    else raises ``NotPart10Error``.
    """
    if isinstance(source, str | os.PathLike):
        with open(source, "rb") as f:
            return _read(f)
    return _read(source)


def _read(f: BinaryIO) -> Part10Info:
    reader = _Reader(f)
    reader.ensure(PREAMBLE_LENGTH + 4)
    head = reader.buf
    if head[PREAMBLE_LENGTH : PREAMBLE_LENGTH + 4] == MAGIC:
        offset = PREAMBLE_LENGTH + 4
    elif head[:4] == MAGIC:
        offset = 4
    elif len(head) >= 4 and _TAG.unpack_from(head)[0] == 0x0002:
        offset = 0
    else:
        raise NotPart10Error("no 'DICM' prefix after a 128-byte preamble (PS3.10 7.1)")
    values, dataset_offset = _read_meta(reader, offset)
    missing = [
        f"(0002,{e:04X})" for e in (_SOP_CLASS, _SOP_INSTANCE, _TRANSFER_SYNTAX) if e not in values
    ]
    if missing:
        raise NotPart10Error(f"File Meta Information lacks {', '.join(missing)}")
    file_size = f.seek(0, os.SEEK_END)
    return Part10Info(
        sop_class_uid=_text(values[_SOP_CLASS]),
        sop_instance_uid=_text(values[_SOP_INSTANCE]),
        transfer_syntax=_text(values[_TRANSFER_SYNTAX]),
        dataset_offset=dataset_offset,
        file_size=file_size,
    )


def _read_meta(reader: _Reader, offset: int) -> tuple[dict[int, bytes], int]:
    """Group 0002 elements (element -> value) and the offset just after the group."""
    values: dict[int, bytes] = {}
    while reader.ensure(offset + 4):
        group, element = _TAG.unpack_from(reader.buf, offset)
        if group != 0x0002:
            break  # the data set starts here (as pydicom, the group length is not trusted)
        if not reader.ensure(offset + 8):
            raise NotPart10Error(f"file ends inside the meta element at offset {offset}")
        vr = reader.buf[offset + 4 : offset + 6]
        if vr in _LONG_VRS:
            if not reader.ensure(offset + 12):
                raise NotPart10Error(f"file ends inside the meta element at offset {offset}")
            length = _LONG.unpack_from(reader.buf, offset)[3]
            offset += 12
        elif vr.isalpha() and vr.isupper():
            length = _SHORT.unpack_from(reader.buf, offset)[3]
            offset += 8
        else:  # Implicit VR meta: not conformant, but written by old software
            length = _IMPLICIT.unpack_from(reader.buf, offset)[2]
            offset += 8
        if length == 0xFFFFFFFF:
            raise NotPart10Error(f"(0002,{element:04X}) has undefined length")
        if not reader.ensure(offset + length):
            raise NotPart10Error(f"(0002,{element:04X}) runs past the end of the file")
        values[element] = reader.buf[offset : offset + length]
        offset += length
    if not values:
        raise NotPart10Error("no File Meta Information elements (group 0002)")
    return values, offset


def _text(raw: bytes) -> str:
    return raw.decode("latin-1").rstrip("\0 ").lstrip(" ")


# -- writing ----------------------------------------------------------------------------
def _element(element: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    if len(value) & 1:  # PS3.5 7.1.1: even value lengths
        value += pad
    if vr in _LONG_VRS:
        return _LONG.pack(0x0002, element, vr, len(value)) + value
    if len(value) > 0xFFFF:
        raise ValueError(f"(0002,{element:04X}) value of {len(value)} bytes does not fit")
    return _SHORT.pack(0x0002, element, vr, len(value)) + value


def _clean_ae(title: str | None) -> bytes | None:
    """An AE title we can write: 1-16 printable ASCII characters, no backslash (PS3.5 6.2)."""
    if title is None:
        return None
    title = title.strip()
    if not 0 < len(title) <= 16 or not all(" " <= c <= "~" and c != "\\" for c in title):
        return None  # peer text we cannot write faithfully is left out (optional element)
    return title.encode("ascii")


def build_file_meta(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: str,
    implementation_class_uid: str,
    implementation_version_name: str | None,
    source_ae: str | None = None,
) -> bytes:
    """Preamble, 'DICM' and group 0002 with its group length (PS3.10 7.1, Table 7.1-1).

    Source Application Entity Title (0002,0016) is written only when it is a clean AE
    title; peer text that is not stays in logs and databases, not in files.
    """
    elements = [
        _element(0x0001, b"OB", b"\x00\x01", b"\0"),  # File Meta Information Version
        _element(_SOP_CLASS, b"UI", sop_class_uid.encode("latin-1"), b"\0"),
        _element(_SOP_INSTANCE, b"UI", sop_instance_uid.encode("latin-1"), b"\0"),
        _element(_TRANSFER_SYNTAX, b"UI", transfer_syntax.encode("latin-1"), b"\0"),
        _element(0x0012, b"UI", implementation_class_uid.encode("latin-1"), b"\0"),
    ]
    if implementation_version_name:
        name = implementation_version_name[:16].encode("latin-1")
        elements.append(_element(0x0013, b"SH", name, b" "))
    ae = _clean_ae(source_ae)
    if ae is not None:
        elements.append(_element(0x0016, b"AE", ae, b" "))
    body = b"".join(elements)
    group_length = _SHORT.pack(0x0002, 0x0000, b"UL", 4) + struct.pack("<I", len(body))
    return bytes(PREAMBLE_LENGTH) + MAGIC + group_length + body


def safe_uid_filename(uid: str) -> str | None:
    """``uid`` if it is a valid UID (digits and dots, PS3.5 9.1), else None.

    A valid UID cannot be ``.``/``..``, hold a separator, a NUL or a look-alike
    character, or exceed 64 characters (catalogue PT-01..PT-06).
    """
    return uid if is_valid_uid(uid) else None
