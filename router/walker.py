"""Streaming dataset walker: every element header checked, only wanted values decoded.

The listener feeds each received dataset fragment through ``DatasetWalker.feed`` while it
writes the same bytes to the spool (DESIGN §3.1). The walker follows PS3.5 section 7:
explicit or implicit VR, little or big endian, defined and undefined lengths, items and
delimiters at any depth, encapsulated pixel data (PS3.5 A.4); and it inflates Deflated
Explicit VR Little Endian incrementally under a cap (catalogue RX-18). It is a state
machine, not a recursive parser: chunks may be cut anywhere (even one byte), and the
stack of open sequences and items is a list bounded by ``max_depth`` (DS-06).

Cost is per element, not per byte: a value nobody wants is counted down with arithmetic,
never buffered or scanned, so a gigabyte of pixel data costs no memory and no Python loop
(DS-13). Only the unfinished part of an element header (at most 11 bytes) and the value
of a wanted element are ever kept.

Choices (the contract in docs/router-internals.md leaves them open):

* Group 0002 elements inside the data set are ordinary elements, counted at the top
  level in ``file_meta_elements`` (DS-08 is the listener's policy, not the walker's).
* A wanted value longer than ``max_value_length`` is truncated to its first
  ``max_value_length`` bytes, decoded, and its key added to ``DatasetWalker.truncated``;
  the rest is skipped. A long text is legal, so it is not an error.
* Text values: split on ``\\`` (not LT, ST, UT, UR), surrounding spaces and NULs stripped
  (LT, ST, UT, UR: trailing only, leading spaces are significant, PS3.5 table 6.2-1);
  a PN loses its insignificant trailing ``^`` and ``=`` (``DOE^JOHN^^`` is ``DOE^JOHN``);
  decoded with the top-level Specific Character Set (0008,0005) seen before them
  (undecodable bytes are replaced, an unknown term falls back to Latin-1: DS-11).
  A Specific Character Set inside an item is not applied to that item.
* Numbers (US, SS, UL, SL, FL, FD, SV, UV) are decimal text; FL is the shortest text that
  reads back as the same 32-bit float. AT is ``GGGG,EEEE`` (upper-case hex).
* OB, OD, OF, OL, OV, OW, SQ, and UN without a dictionary VR: present, with no text
  values (an empty tuple). A UN value with a dictionary VR is decoded with it, little
  endian (PS3.5 6.2.2 note 2); a UN whose dictionary VR is SQ is walked as a sequence of
  Implicit VR Little Endian items (6.2.2), whatever its length.
* Undefined length is accepted on SQ and UN (a sequence; for UN its content is Implicit
  VR Little Endian, PS3.5 6.2.2), on Pixel Data OB/OW and, leniently, on any OB
  (encapsulated fragments, PS3.5 A.4); implicit VR undefined length is a sequence
  (PS3.5 7.5), except Pixel Data, which is read as encapsulated.
* Odd value lengths are tolerated (DS-14); a delimiter's own length field is ignored.
* Unknown transfer syntax UIDs are Explicit VR Little Endian, as every standard
  syntax other than the three special ones is.
"""

from __future__ import annotations

import codecs
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VR, keyword_dict

from protocol.part10 import read_part10
from protocol.uids import DEFLATED_EXPLICIT_VR_LE, EXPLICIT_VR_BE, IMPLICIT_VR_LE

__all__ = ["DatasetError", "DatasetWalker", "Key", "walk_file"]

Key = int | tuple[int, int]

ITEM: Final = 0xFFFEE000
ITEM_DELIMITER: Final = 0xFFFEE00D
SEQUENCE_DELIMITER: Final = 0xFFFEE0DD
PIXEL_DATA: Final = 0x7FE00010
SPECIFIC_CHARACTER_SET: Final = 0x00080005
UNDEFINED: Final = 0xFFFFFFFF
_NO_END: Final = 1 << 62  # "no defined end": larger than any offset we can reach
_INFLATE_STEP: Final = 1 << 20  # inflate at most this much per step: memory stays flat

# Frame kinds: a data set (the top level or an item) holds elements; a sequence holds
# items; encapsulated pixel data holds fragments (items whose bytes are skipped).
_DATASET, _SEQUENCE, _FRAGMENTS = 0, 1, 2

# PS3.5 7.1.2: these VRs have 2 reserved bytes and a 32-bit length in explicit VR.
_LONG_VRS: Final = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
# PS3.5 table 6.2-1: every VR; anything else in the VR field is not explicit VR (DS-02).
_SHORT_VRS: Final = frozenset(
    {
        b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO",
        b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
    }
)  # fmt: skip
_UNSPLIT_VRS: Final = frozenset({"LT", "ST", "UT", "UR"})
# PS3.5 6.1.2.3: the VRs whose values the Specific Character Set applies to.
_CHARSET_VRS: Final = frozenset({"SH", "LO", "UC", "ST", "LT", "UT", "PN"})
# Binary VRs: struct code and size (standard sizes, PS3.5 table 6.2-1).
_BINARY_VRS: Final = {
    "US": ("H", 2),
    "SS": ("h", 2),
    "UL": ("L", 4),
    "SL": ("l", 4),
    "FL": ("f", 4),
    "FD": ("d", 8),
    "SV": ("q", 8),
    "UV": ("Q", 8),
}
# PS3.3 C.12.1.1.2 (tables C.12-3, C.12-4): the escape sequences (after ESC) of the
# ISO 2022 character sets and the codec of what follows. The ISO 2022 codecs of Python
# read their own escapes (kept); G1 sets are 8-bit codecs over the bytes after them.
_ESCAPES: Final = {
    b"(B": ("ascii", False),  # ISO-IR 6
    b"(J": ("iso2022_jp", True),  # ISO-IR 14, JIS X 0201 Romaji
    b")I": ("shift_jis", False),  # ISO-IR 13, JIS X 0201 Katakana
    b"$B": ("iso2022_jp", True),  # ISO-IR 87, JIS X 0208
    b"$(D": ("iso2022_jp_2", True),  # ISO-IR 159, JIS X 0212
    b"$)C": ("euc_kr", False),  # ISO-IR 149, KS X 1001
    b"$)A": ("gb2312", False),  # ISO-IR 58, GB 2312
    b"-A": ("latin_1", False),  # ISO-IR 100
    b"-B": ("iso8859_2", False),  # ISO-IR 101
    b"-C": ("iso8859_3", False),  # ISO-IR 109
    b"-D": ("iso8859_4", False),  # ISO-IR 110
    b"-L": ("iso8859_5", False),  # ISO-IR 144
    b"-G": ("iso8859_6", False),  # ISO-IR 127
    b"-F": ("iso8859_7", False),  # ISO-IR 126
    b"-H": ("iso8859_8", False),  # ISO-IR 138
    b"-M": ("iso8859_9", False),  # ISO-IR 148
    b"-T": ("tis_620", False),  # ISO-IR 166
    b"-b": ("iso8859_15", False),  # ISO-IR 203
}

# Implicit VR: a defined-length value is a sequence when the dictionary says SQ.
_SQ_TAGS: Final = frozenset(tag for tag in keyword_dict.values() if dictionary_VR(tag) == "SQ")
_VR_CACHE: dict[int, str] = {}

_TAG_LENGTH = {"<": struct.Struct("<HHL"), ">": struct.Struct(">HHL")}
_EXPLICIT = {"<": struct.Struct("<HH2sH"), ">": struct.Struct(">HH2sH")}
_LENGTH32 = {"<": struct.Struct("<L"), ">": struct.Struct(">L")}
_FLOAT32 = struct.Struct("<f")


class DatasetError(ValueError):
    """The bytes are not a well-formed dataset (PS3.5 section 7)."""


class _Frame:
    """An open data set (top level or item), sequence, or encapsulated pixel data."""

    __slots__ = ("depth", "end", "endian", "implicit", "kind", "limit", "tag", "want")

    def __init__(
        self,
        kind: int,
        end: int,
        limit: int,
        tag: int,
        implicit: bool,
        endian: str,
        depth: int,
        want: dict[int, Key] | None,
    ) -> None:
        self.kind = kind
        self.end = end  # absolute end offset, _NO_END for undefined length
        self.limit = limit  # the nearest defined end of this frame or any enclosing one
        self.tag = tag  # for sequences and items: the sequence's tag
        self.implicit = implicit
        self.endian = endian
        self.depth = depth  # sequences open around (and including) this frame
        # Data sets: tag -> result key of the wanted elements; sequences: the same for
        # their items' elements (None: nothing wanted in there).
        self.want = want


class DatasetWalker:
    """Incremental walker over the data set bytes of one C-STORE (no File Meta group).

    ``feed`` the bytes in any chunking, then ``finish`` for the wanted values. Every
    problem is a ``DatasetError``; after one, the walker keeps raising it.
    """

    def __init__(
        self,
        transfer_syntax: str,
        wanted: frozenset[int],
        wanted_in_sequences: frozenset[tuple[int, int]] = frozenset(),
        max_depth: int = 64,
        max_value_length: int = 1 << 16,
        max_inflated_bytes: int = 1 << 30,
    ) -> None:
        endian = ">" if transfer_syntax == EXPLICIT_VR_BE else "<"
        self._wanted = wanted
        self._max_depth = max_depth
        self._max_value = max_value_length
        self._max_inflated = max_inflated_bytes
        self._inflater = (
            zlib.decompressobj(-15) if transfer_syntax == DEFLATED_EXPLICIT_VR_LE else None
        )
        self._inflated = 0
        # The Specific Character Set is always read, so later text can be decoded.
        top_want: dict[int, Key] = {tag: tag for tag in wanted}
        top_want[SPECIFIC_CHARACTER_SET] = SPECIFIC_CHARACTER_SET
        self._item_wants: dict[int, dict[int, Key]] = {}
        for seq_tag, item_tag in wanted_in_sequences:
            self._item_wants.setdefault(seq_tag, {})[item_tag] = (seq_tag, item_tag)
        top = _Frame(
            _DATASET, _NO_END, _NO_END, 0, transfer_syntax == IMPLICIT_VR_LE, endian, 0, top_want
        )
        self._stack: list[_Frame] = [top]
        self._pos = 0  # absolute offset (in the walked, inflated bytes) of the next byte
        self._head = b""  # the start of an element header that is not complete yet
        self._skip = 0  # bytes of an unwanted value still to come
        self._collect: bytearray | None = None  # a wanted value being gathered ...
        self._need = 0  # ... the bytes it still needs ...
        self._after = 0  # ... and the bytes to skip after it (truncated values)
        self._value_key: Key = 0
        self._value_tag = 0
        self._value_vr = ""
        self._value_endian = endian
        self._encodings: list[str] = ["latin_1"]
        self._values: dict[Key, list[str]] = {}
        self._error: DatasetError | None = None
        #: Keys whose value was longer than ``max_value_length`` and was cut.
        self.truncated: set[Key] = set()
        #: Bytes given to ``feed`` (before inflation, for a deflated syntax).
        self.bytes_seen = 0
        #: Top-level group 0002 (File Meta) elements seen: they belong in a file's meta
        #: header, never in a data set on the network (PS3.10 7.1; catalogue DS-08).
        self.file_meta_elements = 0

    # -- input -----------------------------------------------------------------------------
    def feed(self, data: bytes | memoryview) -> None:
        """Walk the next chunk; raises ``DatasetError`` at the first bad byte."""
        if self._error is not None:
            raise self._error
        self.bytes_seen += len(data)
        try:
            if self._inflater is None:
                self._consume(data)
            else:
                self._inflate(data)
        except DatasetError as exc:
            self._error = exc
            raise

    def finish(self) -> dict[Key, tuple[str, ...]]:
        """The wanted values; ``DatasetError`` if the data set is empty or incomplete."""
        if self._error is not None:
            raise self._error
        try:
            self._finish()
        except DatasetError as exc:
            self._error = exc
            raise
        return {key: tuple(values) for key, values in self._values.items()}

    def _finish(self) -> None:
        if self.bytes_seen == 0:
            raise DatasetError("empty data set")  # DS-12
        if self._inflater is not None:
            self._inflate(b"")
            if not self._inflater.eof:
                raise DatasetError("deflated data set ends before its last deflate block")
        if self._pos == 0 and not self._head:
            raise DatasetError("empty data set")  # DS-12
        if self._head:
            raise DatasetError(f"data set ends inside an element header at offset {self._pos}")
        if self._skip or self._collect is not None:
            raise DatasetError(f"data set ends inside an element value at offset {self._pos}")
        stack = self._stack
        while len(stack) > 1 and stack[-1].end == self._pos:
            stack.pop()
        if len(stack) > 1:
            frame = stack[-1]
            what = ("item", "sequence", "pixel data")[frame.kind]
            how = "its delimiter" if frame.end == _NO_END else "its declared length"
            raise DatasetError(
                f"data set ends inside a {what} of {_tag_text(frame.tag)} before {how}"
            )

    def _inflate(self, data: bytes | memoryview) -> None:
        # RX-18: inflate in capped steps (memory stays flat) and stop past the total cap.
        inflater = self._inflater
        assert inflater is not None
        pending: bytes | memoryview = data
        while not inflater.eof:  # bytes after the stream (a pad byte) are not data set
            try:
                out = inflater.decompress(pending, _INFLATE_STEP)
            except zlib.error as exc:
                raise DatasetError(f"deflated data set is corrupt: {exc}") from None
            self._inflated += len(out)
            if self._inflated > self._max_inflated:
                raise DatasetError(
                    f"deflated data set inflates past the limit of {self._max_inflated} bytes"
                )
            self._consume(out)
            pending = inflater.unconsumed_tail
            if not pending and len(out) < _INFLATE_STEP:
                return

    # -- the state machine -------------------------------------------------------------------
    def _consume(self, data: bytes | memoryview) -> None:
        size = len(data)
        off = 0
        while off < size:
            if self._skip:
                step = min(self._skip, size - off)
                self._skip -= step
                self._pos += step
                off += step
            elif self._collect is not None:
                step = min(self._need, size - off)
                self._collect += data[off : off + step]
                self._need -= step
                self._pos += step
                off += step
                if not self._need:
                    self._value_done()
            elif self._head:
                # Complete the header from a small joined buffer (a header is at most 12
                # bytes), then carry on in ``data`` where that header's element went on.
                have = len(self._head)
                joined = self._head + bytes(data[off : off + 12 - have])
                used = self._elements(joined, 0, len(joined))
                if used == 0:
                    self._head = joined  # still incomplete: ``data`` is used up
                    return
                self._head = b""
                off += used - have
            else:
                off = self._elements(data, off, size)
                if off < size and not self._skip and self._collect is None:
                    self._head = bytes(data[off:size])
                    return

    def _value_done(self) -> None:
        assert self._collect is not None
        raw = bytes(self._collect)
        self._collect = None
        self._skip = self._after
        self._after = 0
        self._record(self._value_key, self._value_tag, self._value_vr, raw, self._value_endian)

    def _elements(self, buf: bytes | memoryview, off: int, size: int) -> int:
        """Walk whole elements of ``buf[off:size]``; return where the walk stopped.

        It stops at an incomplete header (the caller keeps those bytes) or at the end of
        ``buf`` inside a value (``_skip`` or ``_collect`` then holds the rest).
        """
        base = self._pos - off  # absolute offset of buf[0]
        stack = self._stack
        frame = stack[-1]
        kind, end, limit = frame.kind, frame.end, frame.limit
        tag_length = _TAG_LENGTH[frame.endian]
        explicit = _EXPLICIT[frame.endian]
        while True:
            pos = base + off
            # PS3.5 7.5: a defined-length item or sequence ends after its last byte.
            while pos >= end:
                stack.pop()
                frame = stack[-1]
                kind, end, limit = frame.kind, frame.end, frame.limit
                tag_length = _TAG_LENGTH[frame.endian]
                explicit = _EXPLICIT[frame.endian]
            avail = size - off
            if avail < 8:
                self._pos = pos
                return off
            if kind != _DATASET:
                group, element, length = tag_length.unpack_from(buf, off)
                tag = group << 16 | element
                off += 8
                if pos + 8 > limit:
                    raise self._past_end(tag, pos)
                if tag == SEQUENCE_DELIMITER:
                    if end != _NO_END:
                        raise DatasetError(
                            f"sequence delimiter in the defined-length {_tag_text(frame.tag)}"
                        )
                    stack.pop()
                elif tag != ITEM:
                    raise DatasetError(
                        f"{_tag_text(tag)} at offset {pos} inside {_tag_text(frame.tag)}"
                        " where an item or a sequence delimiter belongs"
                    )
                elif kind == _FRAGMENTS:
                    # PS3.5 A.4: fragments have defined lengths; their bytes are skipped
                    # (bytes that look like delimiters inside them are data: DS-07).
                    if length == UNDEFINED:
                        raise DatasetError(f"undefined-length fragment at offset {pos}")
                    if pos + 8 + length > limit:
                        raise self._past_end(tag, pos)
                    if length > size - off:
                        self._skip = length - (size - off)
                        self._pos = base + size
                        return size
                    off += length
                    continue
                elif length == UNDEFINED:  # PS3.5 7.5.2: ends at an item delimiter
                    stack.append(
                        _Frame(
                            _DATASET, _NO_END, limit, frame.tag, frame.implicit,
                            frame.endian, frame.depth, frame.want,
                        )
                    )  # fmt: skip
                else:
                    item_end = pos + 8 + length
                    if item_end > limit:
                        raise self._past_end(tag, pos)
                    stack.append(
                        _Frame(
                            _DATASET, item_end, item_end, frame.tag, frame.implicit,
                            frame.endian, frame.depth, frame.want,
                        )
                    )  # fmt: skip
                frame = stack[-1]
                kind, end, limit = frame.kind, frame.end, frame.limit
                tag_length = _TAG_LENGTH[frame.endian]
                explicit = _EXPLICIT[frame.endian]
                continue

            # A data set: elements (PS3.5 7.1), or the item delimiter of its item.
            if frame.implicit:
                group, element, length = tag_length.unpack_from(buf, off)
                header = 8
                vr_bytes = b""
            else:
                group, element, vr_bytes, length = explicit.unpack_from(buf, off)
                header = 8
                if group == 0xFFFE:
                    length = tag_length.unpack_from(buf, off)[2]  # no VR field on these
                elif vr_bytes in _LONG_VRS:
                    if avail < 12:
                        self._pos = pos
                        return off
                    length = _LENGTH32[frame.endian].unpack_from(buf, off + 8)[0]
                    header = 12
                elif vr_bytes not in _SHORT_VRS:
                    raise DatasetError(
                        f"({group:04X},{element:04X}) at offset {pos} has no valid VR"
                        f" ({bytes(vr_bytes)!r}): not Explicit VR data"
                    )
            tag = group << 16 | element
            if group == 0x0002 and not frame.depth:
                self.file_meta_elements += 1  # reported; the listener's policy (DS-08)
            if group == 0xFFFE:
                if tag == ITEM_DELIMITER and frame.depth and end == _NO_END:
                    if pos + 8 > limit:
                        raise self._past_end(tag, pos)
                    stack.pop()
                    off += 8
                    frame = stack[-1]
                    kind, end, limit = frame.kind, frame.end, frame.limit
                    tag_length = _TAG_LENGTH[frame.endian]
                    explicit = _EXPLICIT[frame.endian]
                    continue
                where = "at the top level" if not frame.depth else "inside an item"
                raise DatasetError(
                    f"{_tag_text(tag)} at offset {pos} {where}, where an element belongs"
                )
            start = pos + header
            off += header
            if length == UNDEFINED:
                self._open_undefined(tag, vr_bytes, start, frame)
                frame = stack[-1]
                kind, end, limit = frame.kind, frame.end, frame.limit
                tag_length = _TAG_LENGTH[frame.endian]
                explicit = _EXPLICIT[frame.endian]
                continue
            if start + length > limit:
                raise self._past_end(tag, pos, length)
            want = frame.want
            if vr_bytes == b"SQ" or (vr_bytes in (b"", b"UN") and _implicit_sq(tag)):
                if want is not None and tag in want:
                    self._values.setdefault(want[tag], [])  # present; items hold its data
                # PS3.5 6.2.2: a sequence sent as UN holds Implicit VR Little Endian items.
                self._open_sequence(tag, start + length, frame, vr_bytes == b"UN")
                frame = stack[-1]
                kind, end, limit = frame.kind, frame.end, frame.limit
                tag_length = _TAG_LENGTH[frame.endian]
                explicit = _EXPLICIT[frame.endian]
                continue
            if want is None or tag not in want:
                if length > size - off:
                    self._skip = length - (size - off)
                    self._pos = base + size
                    return size
                off += length
                continue
            # A wanted value: decode it now, or gather it across chunks.
            vr = vr_bytes.decode("ascii") if vr_bytes else _dictionary_vr(tag)
            key = want[tag]
            keep = length
            if length > self._max_value:
                keep = self._max_value
                self.truncated.add(key)
            if keep <= size - off:
                raw = bytes(buf[off : off + keep])
                off += keep
                self._record(key, tag, vr, raw, frame.endian)
                if keep < length:
                    self._skip = length - keep
                    if self._skip > size - off:
                        self._skip -= size - off
                        self._pos = base + size
                        return size
                    off += self._skip
                    self._skip = 0
                continue
            self._collect = bytearray(buf[off:size])
            self._need = keep - (size - off)
            self._after = length - keep
            self._value_key, self._value_tag = key, tag
            self._value_vr, self._value_endian = vr, frame.endian
            self._pos = base + size
            return size

    def _past_end(self, tag: int, pos: int, length: int | None = None) -> DatasetError:
        what = f" with length {length}" if length is not None else ""
        return DatasetError(
            f"{_tag_text(tag)}{what} at offset {pos} runs past the end of"
            f" {'the enclosing item or sequence' if length is None else 'its item or sequence'}"
        )

    def _open_sequence(self, tag: int, end: int, frame: _Frame, implicit_le: bool = False) -> None:
        depth = frame.depth + 1
        if depth > self._max_depth:  # DS-06
            raise DatasetError(
                f"sequences nested deeper than {self._max_depth} at {_tag_text(tag)}"
            )
        # Values are collected from items directly inside a top-level sequence only.
        want = self._item_wants.get(tag) if frame.depth == 0 else None
        self._stack.append(
            _Frame(
                _SEQUENCE,
                end,
                min(end, frame.limit),
                tag,
                implicit_le or frame.implicit,
                "<" if implicit_le else frame.endian,
                depth,
                want,
            )
        )

    def _open_undefined(self, tag: int, vr_bytes: bytes, start: int, frame: _Frame) -> None:
        if start > frame.limit:
            raise self._past_end(tag, start)
        want = frame.want
        if want is not None and tag in want:
            self._values.setdefault(want[tag], [])  # present, no text values
        if vr_bytes == b"SQ" or (not vr_bytes and tag != PIXEL_DATA):
            self._open_sequence(tag, _NO_END, frame)  # PS3.5 7.5.2 (implicit VR: 7.5)
        elif vr_bytes == b"UN":
            # PS3.5 6.2.2: an undefined-length UN is a sequence in Implicit VR LE.
            self._open_sequence(tag, _NO_END, frame, implicit_le=True)
        elif vr_bytes == b"OB" or (tag == PIXEL_DATA and vr_bytes in (b"OW", b"")):
            # PS3.5 A.4: encapsulated pixel data (leniently: any OB).
            self._stack.append(
                _Frame(
                    _FRAGMENTS, _NO_END, frame.limit, tag, frame.implicit,
                    frame.endian, frame.depth, None,
                )
            )  # fmt: skip
        else:
            vr = vr_bytes.decode("ascii")
            raise DatasetError(f"undefined length on {_tag_text(tag)} with VR {vr}")  # DS-04

    # -- values ----------------------------------------------------------------------------
    def _record(self, key: Key, tag: int, vr: str, raw: bytes, endian: str) -> None:
        if vr == "UN":
            vr, endian = _dictionary_vr(tag), "<"  # PS3.5 6.2.2 note 2
        if key == SPECIFIC_CHARACTER_SET:
            self._encodings = _python_encodings(raw)
            if SPECIFIC_CHARACTER_SET not in self._wanted:
                return
        values = self._values.setdefault(key, [])
        values.extend(_decode(vr, raw, endian, self._encodings))


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _implicit_sq(tag: int) -> bool:
    return tag in _SQ_TAGS or tag & 0xFF00FFFF == 0x50002600  # (50xx,2600) repeats


def _dictionary_vr(tag: int) -> str:
    """The VR of ``tag`` in implicit VR: the data dictionary's, UN when it has none."""
    vr = _VR_CACHE.get(tag)
    if vr is not None:
        return vr
    if tag & 0xFFFF == 0:
        vr = "UL"  # PS3.5 7.2: group length
    elif tag >> 16 & 1 and 0x0010 <= tag & 0xFFFF <= 0x00FF:
        vr = "LO"  # PS3.5 7.8.1: private creator
    else:
        try:
            vr = str(dictionary_VR(tag)).split(" or ")[0]
        except KeyError:
            vr = "UN"
    if len(_VR_CACHE) < 4096:  # peers choose tags: keep the cache bounded
        _VR_CACHE[tag] = vr
    return vr


def _python_encodings(raw: bytes) -> list[str]:
    """Python codecs for a Specific Character Set value (PS3.3 C.12.1.1.2); never raises."""
    terms = [term.strip(" \0") for term in raw.decode("latin_1").split("\\")]
    encodings = []
    for term in terms or [""]:
        name = python_encoding.get(term, "latin_1")
        try:
            codecs.lookup(name)
        except LookupError:
            name = "latin_1"
        encodings.append(name)
    return encodings


def _decode(vr: str, raw: bytes, endian: str, encodings: list[str]) -> list[str]:
    binary = _BINARY_VRS.get(vr)
    if binary is not None:
        code, size = binary
        count = len(raw) // size
        numbers = struct.unpack(f"{endian}{count}{code}", raw[: count * size])
        if vr == "FL":
            return [_float32_text(float(n)) for n in numbers]
        return [repr(n) for n in numbers]
    if vr == "AT":
        count = len(raw) // 4
        halves = struct.unpack(f"{endian}{count * 2}H", raw[: count * 4])
        return [f"{halves[i]:04X},{halves[i + 1]:04X}" for i in range(0, len(halves), 2)]
    if vr[0] == "O" or vr in ("UN", "SQ", "NONE"):
        return []
    # Other text VRs use the default repertoire (PS3.5 6.1.2.1); Latin-1 never fails.
    text = _decode_text(raw, encodings) if vr in _CHARSET_VRS else raw.decode("latin_1")
    if vr in _UNSPLIT_VRS:
        text = text.rstrip(" \0")
        return [text] if text else []
    parts = [part.strip(" \0") for part in text.split("\\")]
    if vr == "PN":
        parts = [_person_name(part) for part in parts]
    return [] if parts == [""] else parts


def _person_name(name: str) -> str:
    """PS3.5 6.2.1.2: trailing ``^`` of each group and trailing ``=`` are insignificant."""
    groups = [group.rstrip("^ ") for group in name.split("=")]
    while len(groups) > 1 and not groups[-1]:
        groups.pop()
    return "=".join(groups)


def _decode_text(raw: bytes, encodings: list[str]) -> str:
    if len(encodings) == 1 or b"\x1b" not in raw:
        return raw.decode(encodings[0], errors="replace")
    # ISO 2022 code extensions (PS3.5 6.1.2.5): each escape sequence switches the codec
    # until the next one. Encoders must switch back before delimiters (6.1.2.5.3), so
    # the text is cut at escapes only.
    segments = raw.split(b"\x1b")
    parts = [segments[0].decode(encodings[0], errors="replace")]
    for segment in segments[1:]:
        for escape, (codec, keep_escape) in _ESCAPES.items():
            if segment.startswith(escape):
                body = b"\x1b" + segment if keep_escape else segment[len(escape) :]
                parts.append(body.decode(codec, errors="replace"))
                break
        else:
            parts.append(segment.decode(encodings[0], errors="replace"))
    return "".join(parts)


def _float32_text(value: float) -> str:
    """The shortest decimal text that reads back as this 32-bit float."""
    if value != value or value in (float("inf"), float("-inf")):
        return repr(value)
    packed = _FLOAT32.pack(value)
    for digits in range(1, 10):
        text = f"{value:.{digits}g}"
        if _FLOAT32.pack(float(text)) == packed:
            return repr(float(text))
    return repr(value)


def walk_file(
    path: str | Path,
    wanted: Iterable[int],
    wanted_in_sequences: Iterable[tuple[int, int]] = (),
    *,
    transfer_syntax: str | None = None,
    chunk_size: int = 1 << 20,
    max_depth: int = 64,
    max_value_length: int = 1 << 16,
    max_inflated_bytes: int = 1 << 30,
) -> dict[Key, tuple[str, ...]]:
    """Walk a Part 10 file's data set (for ``rules test``) as the listener would.

    The transfer syntax is the file's (0002,0010) unless ``transfer_syntax`` is given.
    Raises ``protocol.part10.NotPart10Error``, ``DatasetError`` or ``OSError``.
    """
    meta = read_part10(path)
    walker = DatasetWalker(
        transfer_syntax or meta.transfer_syntax,
        frozenset(wanted),
        frozenset(wanted_in_sequences),
        max_depth=max_depth,
        max_value_length=max_value_length,
        max_inflated_bytes=max_inflated_bytes,
    )
    with open(path, "rb") as f:
        f.seek(meta.dataset_offset)
        while chunk := f.read(chunk_size):
            walker.feed(chunk)
    return walker.finish()
