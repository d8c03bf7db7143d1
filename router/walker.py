"""Streaming dataset walker: every element header checked, only wanted values decoded.

The listener feeds each received dataset fragment through ``DatasetWalker.feed`` while it
writes the same bytes to the spool (DESIGN §3.1). The walker follows PS3.5 section 7:
explicit or implicit VR, little or big endian, defined and undefined lengths, items and
delimiters at any depth, encapsulated pixel data; and it inflates Deflated Explicit VR
Little Endian incrementally under a cap (catalogue RX-18). A value that is not wanted is
counted down, never buffered, so a gigabyte of pixel data costs no memory. Truncation,
a length past its parent, a stray delimiter or nesting past ``max_depth`` is a
``DatasetError`` (catalogue B.6).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydicom.datadict import dictionary_VR

from protocol.part10 import read_part10
from protocol.uids import DEFLATED_EXPLICIT_VR_LE, EXPLICIT_VR_BE, IMPLICIT_VR_LE

Key = int | tuple[int, int]

ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
SPECIFIC_CHARACTER_SET = 0x00080005
UNDEFINED = 0xFFFFFFFF

# PS3.5 7.1.2: VRs with a 2-byte reserved field and a 4-byte length in explicit VR.
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
)
_ALL_VRS = _LONG_VRS | frozenset(
    {
        b"AE",
        b"AS",
        b"AT",
        b"CS",
        b"DA",
        b"DS",
        b"DT",
        b"FL",
        b"FD",
        b"IS",
        b"LO",
        b"LT",
        b"PN",
        b"SH",
        b"SL",
        b"SS",
        b"ST",
        b"TM",
        b"UI",
        b"UL",
        b"US",
    }
)
_UNSPLIT_VRS = frozenset({"LT", "ST", "UT", "UR"})
_CHARSET_VRS = frozenset({"PN", "LO", "SH", "LT", "ST", "UT", "UC"})
_BINARY = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d", "SV": "q", "UV": "Q"}
_ENCODINGS = {
    "": "latin_1",
    "ISO_IR 6": "latin_1",
    "ISO_IR 100": "latin_1",
    "ISO_IR 101": "iso8859_2",
    "ISO_IR 109": "iso8859_3",
    "ISO_IR 110": "iso8859_4",
    "ISO_IR 144": "iso8859_5",
    "ISO_IR 127": "iso8859_6",
    "ISO_IR 126": "iso8859_7",
    "ISO_IR 138": "iso8859_8",
    "ISO_IR 148": "iso8859_9",
    "ISO_IR 13": "shift_jis",
    "ISO_IR 166": "tis_620",
    "ISO_IR 192": "utf_8",
    "GB18030": "gb18030",
    "GBK": "gbk",
}


class DatasetError(ValueError):
    """The bytes are not a well-formed dataset (PS3.5 section 7)."""


@dataclass(slots=True)
class _Container:
    """An open sequence, item or encapsulated pixel data value."""

    kind: str  # "seq", "item" or "encap"
    end: int | None  # absolute end offset; None = undefined length (ends at a delimiter)
    tag: int  # the sequence's tag (for items: their sequence's)
    # PS3.5 6.2.2: the content of an undefined-length UN is encoded Implicit VR LE.
    implicit: bool = False


class DatasetWalker:
    def __init__(
        self,
        transfer_syntax: str,
        wanted: frozenset[int],
        wanted_in_sequences: frozenset[tuple[int, int]] = frozenset(),
        max_depth: int = 64,
        max_value_length: int = 1 << 16,
        max_inflated_bytes: int = 1 << 30,
    ) -> None:
        self._implicit = transfer_syntax == IMPLICIT_VR_LE
        self._endian = ">" if transfer_syntax == EXPLICIT_VR_BE else "<"
        self._tag_len = struct.Struct(self._endian + "HHL")
        self._explicit_short = struct.Struct(self._endian + "HH2sH")
        self._long_length = struct.Struct(self._endian + "L")
        self._inflater = (
            zlib.decompressobj(-15) if transfer_syntax == DEFLATED_EXPLICIT_VR_LE else None
        )
        self._max_inflated = max_inflated_bytes
        self._inflated = 0
        self._wanted = wanted
        self._wanted_in_sequences = wanted_in_sequences
        self._sequence_tags = frozenset(seq for seq, _ in wanted_in_sequences)
        self._max_depth = max_depth
        self._max_value = max_value_length
        self._pending = b""  # an unfinished header or wanted value
        self._skip = 0  # bytes of an unwanted value still to come
        self._pos = 0  # absolute offset of the first byte of _pending
        self._stack: list[_Container] = []
        self._charset = "latin_1"
        self._raw: dict[Key, list[str]] = {}
        self.bytes_seen = 0

    # -- input -----------------------------------------------------------------------------
    def feed(self, data: bytes | memoryview) -> None:
        self.bytes_seen += len(data)
        if self._inflater is not None:
            data = self._inflate(data)
        if not data:
            return
        if self._skip:
            step = min(self._skip, len(data))
            self._skip -= step
            self._pos += step
            data = data[step:]
            if not data:
                return
        buffer = self._pending + bytes(data) if self._pending else bytes(data)
        self._pending = b""
        used = self._parse(buffer)
        self._pos += used
        self._pending = buffer[used:]

    def finish(self) -> dict[Key, tuple[str, ...]]:
        if self._inflater is not None:
            tail = self._inflater.flush()
            if tail:
                self._inflated += len(tail)
                self.feed_inflated(tail)
        if self.bytes_seen == 0:
            raise DatasetError("empty data set")
        self._close_finished_containers()
        if self._pending or self._skip:
            raise DatasetError(f"data set ends inside an element at offset {self._pos}")
        if self._stack:
            raise DatasetError("data set ends inside a sequence or item")
        return {key: tuple(values) for key, values in self._raw.items()}

    def feed_inflated(self, data: bytes) -> None:
        """Bytes after inflation (used for the deflater's tail)."""
        inflater, self._inflater = self._inflater, None
        try:
            count = self.bytes_seen
            self.feed(data)
            self.bytes_seen = count
        finally:
            self._inflater = inflater

    def _inflate(self, data: bytes | memoryview) -> bytes:
        assert self._inflater is not None
        try:
            out = self._inflater.decompress(data, self._max_inflated - self._inflated + 1)
        except zlib.error as exc:
            raise DatasetError(f"deflated data set is corrupt: {exc}") from None
        self._inflated += len(out)
        if self._inflated > self._max_inflated or self._inflater.unconsumed_tail:
            raise DatasetError("deflated data set inflates past the limit")
        return out

    # -- parsing ---------------------------------------------------------------------------
    def _close_finished_containers(self) -> None:
        while self._stack and self._stack[-1].end is not None:
            end = self._stack[-1].end
            if self._pos + 0 < end:
                return
            if self._pos > end:
                raise DatasetError("an element runs past the end of its sequence or item")
            self._stack.pop()

    def _parse(self, buf: bytes) -> int:
        """Consume whole headers and values from ``buf``; return the bytes used."""
        off = 0
        size = len(buf)
        stack = self._stack
        while True:
            # Close defined-length containers that end here (PS3.5 7.5.1).
            while stack and stack[-1].end is not None:
                end = stack[-1].end
                here = self._pos + off
                if here < end:
                    break
                if here > end:
                    raise DatasetError("an element runs past the end of its sequence or item")
                stack.pop()
            if size - off < 8:
                return off
            group, element, length = self._tag_len.unpack_from(buf, off)
            tag = group << 16 | element
            top = stack[-1] if stack else None
            if top is not None and top.kind in ("seq", "encap"):
                off = self._sequence_member(tag, length, top, off, size)
                if self._skip:
                    return off
                continue
            if tag == ITEM_DELIMITER:
                if top is None or top.kind != "item" or top.end is not None:
                    raise DatasetError("item delimiter outside an undefined-length item")
                stack.pop()
                off += 8
                continue
            if group == 0xFFFE:
                raise DatasetError(
                    f"item or delimiter tag ({group:04X},{element:04X}) where an element belongs"
                )
            header = self._element_header(buf, off, size, tag)
            if header is None:
                return off
            vr, length, header_size = header
            start = off + header_size
            if length == UNDEFINED:
                off = self._open_undefined(tag, vr, start)
                continue
            if vr == "SQ":
                seq_end = self._pos + start + length
                if top is not None and top.end is not None and seq_end > top.end:
                    raise DatasetError("a sequence runs past the end of its item")
                self._push(_Container("seq", seq_end, tag, bool(top and top.implicit)))
                off = start
                continue
            if top is not None and top.end is not None and self._pos + start + length > top.end:
                raise DatasetError("an element runs past the end of its item")
            key = self._key_for(tag)
            if key is None or length > self._max_value:
                # Not wanted (or past the cap, then treated as absent): count it down.
                off = self._advance(start, length, size)
                if self._skip:
                    return off
                continue
            if start + length > size:
                return off  # keep the header and the partial value for the next feed
            self._record(key, vr, buf[start : start + length])
            off = start + length

    def _advance(self, start: int, length: int, size: int) -> int:
        """Skip a value; if it runs past this buffer, the rest is skipped by feed()."""
        if start + length <= size:
            return start + length
        self._skip = start + length - size
        return size

    def _element_header(
        self, buf: bytes, off: int, size: int, tag: int
    ) -> tuple[str, int, int] | None:
        if self._implicit or (self._stack and self._stack[-1].implicit):
            length = self._tag_len.unpack_from(buf, off)[2]
            return self._dictionary_vr(tag, length), length, 8
        _, _, vr_bytes, short_length = self._explicit_short.unpack_from(buf, off)
        if vr_bytes not in _ALL_VRS:
            raise DatasetError(f"invalid VR {vr_bytes!r} at offset {self._pos + off}")
        if vr_bytes in _LONG_VRS:
            if size - off < 12:
                return None
            return vr_bytes.decode(), self._long_length.unpack_from(buf, off + 8)[0], 12
        return vr_bytes.decode(), short_length, 8

    def _dictionary_vr(self, tag: int, length: int) -> str:
        if length == UNDEFINED:
            return "SQ"  # PS3.5 7.5: implicit VR undefined length is a sequence
        try:
            vr = str(dictionary_VR(tag))
        except KeyError:
            return "UN"
        return vr.split(" or ")[0]

    def _open_undefined(self, tag: int, vr: str, start: int) -> int:
        if vr in ("SQ", "UN"):
            inside_implicit = bool(self._stack and self._stack[-1].implicit)
            self._push(_Container("seq", None, tag, vr == "UN" or inside_implicit))
        elif vr in ("OB", "OW") and tag == PIXEL_DATA:
            self._push(_Container("encap", None, tag))  # PS3.5 A.4 encapsulated pixel data
        else:
            raise DatasetError(f"undefined length on a {vr} element")
        return start

    def _sequence_member(self, tag: int, length: int, top: _Container, off: int, size: int) -> int:
        if tag == SEQUENCE_DELIMITER:
            if top.end is not None:
                raise DatasetError("sequence delimiter in a defined-length sequence")
            self._stack.pop()
            return off + 8
        if tag != ITEM:
            raise DatasetError("a sequence holds something other than items")
        start = off + 8
        if top.kind == "encap":
            # PS3.5 A.4: each fragment is an item of defined length; its bytes are skipped.
            if length == UNDEFINED:
                raise DatasetError("undefined-length pixel data fragment")
            if top.end is not None and self._pos + start + length > top.end:
                raise DatasetError("a fragment runs past its pixel data")
            return self._advance(start, length, size)
        item_end = None if length == UNDEFINED else self._pos + start + length
        if top.end is not None and item_end is not None and item_end > top.end:
            raise DatasetError("an item runs past the end of its sequence")
        self._stack.append(_Container("item", item_end, top.tag, top.implicit))
        return start

    def _push(self, container: _Container) -> None:
        depth = sum(1 for c in self._stack if c.kind == "seq")
        if container.kind == "seq" and depth >= self._max_depth:
            raise DatasetError(f"sequences nested deeper than {self._max_depth}")
        self._stack.append(container)

    def _key_for(self, tag: int) -> Key | None:
        stack = self._stack
        if not stack:
            if tag in self._wanted or tag == SPECIFIC_CHARACTER_SET:
                return tag
            return None
        if len(stack) == 2 and stack[0].tag in self._sequence_tags:
            pair = (stack[0].tag, tag)
            if pair in self._wanted_in_sequences:
                return pair
        return None

    def _record(self, key: Key, vr: str, raw: bytes) -> None:
        if vr == "UN":
            # A known attribute sent as UN (PS3.5 6.2.2) is read with its dictionary VR.
            vr = self._dictionary_vr(key if isinstance(key, int) else key[1], 0)
        values = _decode(vr, raw, self._endian, self._charset)
        if key == SPECIFIC_CHARACTER_SET:
            self._charset = _ENCODINGS.get(values[-1] if values else "", "latin_1")
            if SPECIFIC_CHARACTER_SET not in self._wanted:
                return
        self._raw.setdefault(key, []).extend(values)


def _decode(vr: str, raw: bytes, endian: str, charset: str) -> list[str]:
    if vr in _BINARY:
        code = _BINARY[vr]
        width = struct.calcsize(code)
        count = len(raw) // width
        return [_number(v) for v in struct.unpack(f"{endian}{count}{code}", raw[: count * width])]
    if vr == "AT":
        count = len(raw) // 4
        pairs = struct.unpack(f"{endian}{count * 2}H", raw[: count * 4])
        return [f"({pairs[i]:04X},{pairs[i + 1]:04X})" for i in range(0, len(pairs), 2)]
    if vr in ("OB", "OW", "OF", "OD", "OL", "OV", "UN", "SQ"):
        return []
    text = raw.decode(charset if vr in _CHARSET_VRS else "latin_1", errors="replace")
    parts = [text] if vr in _UNSPLIT_VRS else text.split("\\")
    cleaned = [part.rstrip(" \0") if vr in _UNSPLIT_VRS else part.strip(" \0") for part in parts]
    if cleaned == [""]:
        return []
    return cleaned


def _number(value: float | int) -> str:
    if isinstance(value, float) and value.is_integer():
        return repr(value)
    return str(value)


def walk_file(
    path: str | Path,
    wanted: Iterable[int],
    wanted_in_sequences: Iterable[tuple[int, int]] = (),
    chunk_size: int = 1 << 20,
) -> dict[Key, tuple[str, ...]]:
    """Walk a Part 10 file's dataset (for ``rules test``)."""
    with open(path, "rb") as f:
        meta = read_part10(f)
        walker = DatasetWalker(
            meta.transfer_syntax, frozenset(wanted), frozenset(wanted_in_sequences)
        )
        f.seek(meta.dataset_offset)
        while chunk := f.read(chunk_size):
            walker.feed(chunk)
    return walker.finish()
