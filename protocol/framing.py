"""Split a byte stream into PDUs (PS3.8 9.3.1): 6-byte header, then the body.

Every check that the header alone allows is done before a byte of the body is buffered
(catalogue MP-01..MP-07): an unknown type, an A-ASSOCIATE over its cap, a P-DATA-TF over
the maximum length we announced, a fixed-length PDU whose length is not 4. A 32-bit
length such as ``GET `` read as a header is refused, never allocated.

Copies: a PDU that arrives whole inside one ``feed`` is returned as a memoryview into
that (immutable) chunk, with no copy; a PDU split across feeds is assembled into a
bytearray of exactly its length, allocated once and never resized, so each body byte is
copied once and the returned view stays valid whatever is fed later (bodies over 4 MiB,
possible only with no P-DATA limit, grow as their bytes arrive instead). Feeding one byte
at a time therefore costs O(1) per byte, and many PDUs in one feed cost O(1) each.
"""

from __future__ import annotations

from collections import deque

from protocol.errors import AbortReason, PDUDecodeError
from protocol.limits import Limits

_ASSOCIATE_FIXED_LENGTH = 68  # PS3.8 9.3.2/9.3.3: an RQ/AC body is never shorter
_PDV_MIN_PDU_LENGTH = 6  # PS3.8 9.3.5: one PDV item (4-byte length + 2) at least
_FIXED_LENGTH_TYPES = frozenset((3, 5, 6, 7))  # RJ, RELEASE-RQ/RP, ABORT: length 4
_NAMES = {
    1: "A-ASSOCIATE-RQ",
    2: "A-ASSOCIATE-AC",
    3: "A-ASSOCIATE-RJ",
    4: "P-DATA-TF",
    5: "A-RELEASE-RQ",
    6: "A-RELEASE-RP",
    7: "A-ABORT",
}
_EMPTY = memoryview(b"")
_PREALLOCATE_MAX = 4 << 20  # larger bodies are not allocated ahead of their bytes


class PDUReader:
    """Incremental PDU framer: ``feed(bytes)``, then ``next_pdu()`` until it returns None.

    ``max_pdata_length`` is the largest P-DATA-TF PDU length accepted (the Maximum
    Length we announced, PS3.8 D.1); None means ``limits.max_pdu_length`` and 0 means
    no limit (as in the sub-item). After a ``PDUDecodeError`` the stream cannot be
    resynchronised: the reader keeps raising the same error.
    """

    __slots__ = (
        "_body",
        "_body_length",
        "_body_type",
        "_chunks",
        "_error",
        "_filled",
        "_header",
        "_limits",
        "_max_pdata",
        "_pos",
    )

    def __init__(self, limits: Limits, max_pdata_length: int | None = None) -> None:
        self._limits = limits
        self._max_pdata = limits.max_pdu_length if max_pdata_length is None else max_pdata_length
        self._chunks: deque[bytes] = deque()
        self._pos = 0  # read offset into self._chunks[0]
        self._header = bytearray()  # a header split across feeds (< 6 bytes)
        self._body: bytearray | None = None  # a body split across feeds, being filled
        self._body_length = 0
        self._body_type = 0
        self._filled = 0
        self._error: PDUDecodeError | None = None

    def set_max_pdata_length(self, max_pdata_length: int) -> None:
        """Set the P-DATA-TF cap after negotiation (0 = no limit); applies to later headers."""
        self._max_pdata = max_pdata_length

    @property
    def max_pdata_length(self) -> int:
        return self._max_pdata

    @property
    def in_progress(self) -> bool:
        """True while bytes of an unfinished PDU are held (for the per-PDU read deadline).

        Meaningful after ``next_pdu()`` returned None: fed bytes not parsed yet count too.
        """
        if self._header or self._body is not None:
            return True
        chunks = self._chunks
        return len(chunks) > 1 or (bool(chunks) and self._pos < len(chunks[0]))

    def feed(self, data: bytes) -> None:
        """Queue received bytes; nothing is parsed until ``next_pdu()``."""
        if self._error is not None or not data:
            return
        # Keep an immutable chunk: zero-copy views into it must never change under us.
        self._chunks.append(data if type(data) is bytes else bytes(data))

    def next_pdu(self) -> tuple[int, memoryview] | None:
        """The next complete (PDU type, body), or None until more bytes are fed."""
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except PDUDecodeError as exc:
            self._error = exc
            self._chunks.clear()
            self._body = None
            raise

    def _next(self) -> tuple[int, memoryview] | None:
        chunks = self._chunks
        while chunks:
            chunk = chunks[0]
            pos = self._pos
            avail = len(chunk) - pos
            if avail == 0:
                chunks.popleft()
                self._pos = 0
                continue
            body = self._body
            if body is not None:
                # Continue a body split across feeds: copy what this chunk holds of it.
                filled = self._filled
                take = min(avail, self._body_length - filled)
                piece = memoryview(chunk)[pos : pos + take]
                if len(body) == self._body_length:
                    body[filled : filled + take] = piece
                else:
                    body += piece
                self._filled = filled + take
                self._pos = pos + take
                if self._filled == self._body_length:
                    self._body = None
                    return self._body_type, memoryview(body)
                continue
            if not self._header and avail >= 6:
                # Fast path: the header, and often the whole PDU, lies in this chunk.
                pdu_type = chunk[pos]
                length = int.from_bytes(chunk[pos + 2 : pos + 6], "big")
                self._check(pdu_type, length)
                start = pos + 6
                if avail - 6 >= length:
                    self._pos = start + length
                    return pdu_type, memoryview(chunk)[start : start + length]
                self._pos = start
                self._start_body(pdu_type, length)
                continue
            # A header split across feeds: gather its 6 bytes first.
            take = min(6 - len(self._header), avail)
            self._header += chunk[pos : pos + take]
            self._pos = pos + take
            if len(self._header) == 6:
                pdu_type = self._header[0]
                length = int.from_bytes(self._header[2:6], "big")
                self._header.clear()
                self._check(pdu_type, length)
                if length == 0:
                    return pdu_type, _EMPTY
                self._start_body(pdu_type, length)
        return None

    def _start_body(self, pdu_type: int, length: int) -> None:
        # _check() has bounded ``length`` by a configured limit; still, past
        # _PREALLOCATE_MAX (reachable only with "no limit") the buffer grows as bytes
        # arrive instead of trusting the announced length (catalogue MP-01).
        self._body = bytearray(length) if length <= _PREALLOCATE_MAX else bytearray()
        self._body_length = length
        self._body_type = pdu_type
        self._filled = 0

    def _check(self, pdu_type: int, length: int) -> None:
        """Refuse from the header alone (PS3.8 9.3.1; reasons per 9.3.8)."""
        name = _NAMES.get(pdu_type)
        if name is None:
            raise PDUDecodeError(
                f"unrecognized PDU type 0x{pdu_type:02x} (announced length {length})",
                AbortReason.UNRECOGNIZED_PDU,
            )
        if pdu_type in _FIXED_LENGTH_TYPES:
            if length != 4:
                raise PDUDecodeError(f"{name} with PDU length {length}, not 4")
        elif pdu_type == 4:
            if self._max_pdata and length > self._max_pdata:
                raise PDUDecodeError(
                    f"P-DATA-TF of {length} bytes exceeds the maximum length "
                    f"{self._max_pdata} we announced"
                )
            if length < _PDV_MIN_PDU_LENGTH:
                raise PDUDecodeError(f"P-DATA-TF with PDU length {length}, too short for a PDV")
        else:
            cap = self._limits.max_associate_pdu_length
            if length > cap:
                raise PDUDecodeError(f"{name} of {length} bytes exceeds the {cap}-byte cap")
            if length < _ASSOCIATE_FIXED_LENGTH:
                raise PDUDecodeError(f"{name} with PDU length {length}, shorter than 68")
