"""Byte-level helpers shared by items.py, user_info.py and pdu.py (PS3.8 9.3.1).

Every multi-byte field is big endian (PS3.8 9.3.1). Decoding works on memoryviews and
checks every length against the enclosing length *before* slicing: Python slicing
silently truncates, so an unchecked slice would hide a malformed length.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from protocol.errors import AbortReason, LocalProtocolError, PDUDecodeError

Buffer = bytes | bytearray | memoryview

ITEM_HEADER = struct.Struct(">BBH")  # item type, reserved, item length
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")

INVALID = AbortReason.INVALID_PDU_PARAMETER_VALUE
DUPLICATE = AbortReason.UNEXPECTED_PDU_PARAMETER


def view(data: Buffer) -> memoryview:
    """A flat unsigned-byte memoryview of ``data`` (no copy)."""
    mv = data if isinstance(data, memoryview) else memoryview(data)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


def invalid(message: str) -> PDUDecodeError:
    """Structural corruption: A-ABORT reason 6 (PS3.8 9.3.8)."""
    return PDUDecodeError(message, INVALID)


def duplicate(what: str) -> PDUDecodeError:
    """A second copy of a single-occurrence item: A-ABORT reason 5 (PS3.8 9.3.8)."""
    return PDUDecodeError(f"duplicate {what}", DUPLICATE)


def iter_items(buf: memoryview, where: str) -> Iterator[tuple[int, memoryview]]:
    """Yield (item type, item body) for consecutive items filling ``buf`` exactly.

    Items share the 4-byte header of PS3.8 9.3.2.1 (type, reserved, 16-bit length);
    the reserved byte is not tested on receipt. A truncated header or an item running
    past its parent is an error, for unknown item types too (catalogue MP-13).
    """
    off = 0
    end = len(buf)
    while off < end:
        if end - off < 4:
            raise invalid(f"{where}: {end - off} trailing byte(s), too short for an item header")
        item_type = buf[off]
        start = off + 4
        stop = start + ((buf[off + 2] << 8) | buf[off + 3])
        if stop > end:
            raise invalid(
                f"{where}: item 0x{item_type:02x} length {stop - start} runs past its parent "
                f"({end - start} byte(s) left)"
            )
        yield item_type, buf[start:stop]
        off = stop


def read_u16(buf: memoryview, off: int, where: str) -> int:
    """The 16-bit big-endian integer at ``off``, bounds-checked."""
    if off + 2 > len(buf):
        raise invalid(f"{where}: truncated 16-bit field at offset {off}")
    return (buf[off] << 8) | buf[off + 1]


def read_field(buf: memoryview, off: int, where: str) -> tuple[memoryview, int]:
    """A field prefixed by its 16-bit length (PS3.7 D.3.3.x); returns (field, next offset)."""
    length = read_u16(buf, off, where)
    start = off + 2
    stop = start + length
    if stop > len(buf):
        raise invalid(f"{where}: field length {length} runs past the sub-item")
    return buf[start:stop], stop


def decode_uid(buf: memoryview) -> str:
    """A UID from the wire: latin-1 (never fails), trailing NUL padding removed (PS3.5 9.1)."""
    return str(buf, "latin-1").rstrip("\x00")


def decode_ae(buf: memoryview) -> str:
    """An AE title: leading/trailing spaces are not significant (PS3.8 9.3.2); NULs too."""
    return str(buf, "latin-1").strip(" \x00")


def encode_text(value: str, what: str) -> bytes:
    """latin-1 bytes of a text field we send; a character outside it is our caller's error."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError as exc:
        raise LocalProtocolError(f"{what} {value!r} is not encodable: {exc}") from None


def encode_ae(value: str, what: str) -> bytes:
    """A 16-byte AE title field, space padded (PS3.8 9.3.2)."""
    raw = encode_text(value, what)
    if len(raw) > 16:
        raise LocalProtocolError(f"{what} {value!r} is longer than 16 characters")
    return raw.ljust(16, b" ")


def check_range(value: int, bits: int, what: str) -> int:
    """An unsigned field we send must fit its width; struct would raise an untyped error."""
    if not 0 <= value < (1 << bits):
        raise LocalProtocolError(f"{what} {value} does not fit in {bits} bits")
    return value


def field16(data: bytes, what: str) -> bytes:
    """``data`` prefixed by its 16-bit length (PS3.7 D.3.3.x length-prefixed fields)."""
    if len(data) > 0xFFFF:
        raise LocalProtocolError(f"{what} is {len(data)} bytes, over the 65535-byte field")
    return U16.pack(len(data)) + data


def item(item_type: int, payload: bytes) -> bytes:
    """One item with its 4-byte header (PS3.8 9.3.2.1); the reserved byte is sent as 00H."""
    if len(payload) > 0xFFFF:
        raise LocalProtocolError(
            f"item 0x{item_type:02x} is {len(payload)} bytes, over the 65535-byte item length"
        )
    return ITEM_HEADER.pack(item_type, 0, len(payload)) + payload
