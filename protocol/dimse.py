"""DIMSE messages (PS3.7 9.3, Annex E): command-set codec, fragmentation, reassembly.

A command set is group 0000 encoded Implicit VR Little Endian, led by the Command Group
Length (0000,0000) (PS3.7 6.3.1). This is the per-message hot path, so it is written
with ``struct`` and never touches pydicom.

Data sets are never buffered here: ``MessageAssembler`` passes each data-set PDV through
as a ``DatasetFragment`` so the caller can stream it (DESIGN §2 "Streaming"), and
``fragment`` / ``iter_file_fragments`` slice outgoing data without copying it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from protocol.errors import DIMSEError, LocalProtocolError
from protocol.limits import SEND_PDU_CAP, Limits
from protocol.pdu import encode_pdata
from protocol.uids import VERIFICATION

# Command Field values (PS3.7 E.1, Table E.1-1).
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030

#: CommandDataSetType (0000,0800): 0101H means "no data set"; any other value means one
#: follows (PS3.7 E.1). We send 0001H for "present".
NO_DATASET = 0x0101
DATASET_PRESENT = 0x0001

# Element numbers of group 0000 used here (PS3.7 E.1).
_GROUP_LENGTH = 0x0000
_AFFECTED_SOP_CLASS_UID = 0x0002
_COMMAND_FIELD = 0x0100
_MESSAGE_ID = 0x0110
_MESSAGE_ID_BEING_RESPONDED_TO = 0x0120
_PRIORITY = 0x0700
_COMMAND_DATASET_TYPE = 0x0800
_STATUS = 0x0900
_ERROR_COMMENT = 0x0902
_AFFECTED_SOP_INSTANCE_UID = 0x1000
_MOVE_ORIGINATOR_AE = 0x1030
_MOVE_ORIGINATOR_MESSAGE_ID = 0x1031

_ELEMENT_HEADER = struct.Struct("<HHI")  # group, element, 32-bit length (Implicit VR LE)
_US_ELEMENT = struct.Struct("<HHIH")  # a whole US element: header + value
_GROUP_LENGTH_ELEMENT = struct.Struct("<HHII")
_US = struct.Struct("<H")
_PDV_OVERHEAD = 6  # PDV item length (4) + context id (1) + control header (1)
#: Smallest peer maximum that still carries one data byte per PDV (catalogue MP-24).
MIN_MAX_PDU_LENGTH = _PDV_OVERHEAD + 1


# -- messages -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class CEchoRQ:
    message_id: int
    affected_sop_class_uid: str = VERIFICATION


@dataclass(frozen=True, slots=True)
class CEchoRSP:
    message_id_being_responded_to: int
    status: int
    affected_sop_class_uid: str = VERIFICATION


@dataclass(frozen=True, slots=True)
class CStoreRQ:
    message_id: int
    affected_sop_class_uid: str
    affected_sop_instance_uid: str
    priority: int = 0  # 0 medium, 1 high, 2 low (PS3.7 E.1); other values are tolerated
    move_originator_ae: str | None = None
    move_originator_message_id: int | None = None


@dataclass(frozen=True, slots=True)
class CStoreRSP:
    message_id_being_responded_to: int
    affected_sop_class_uid: str  # "" when the peer left the optional field out
    affected_sop_instance_uid: str
    status: int
    error_comment: str | None = None


@dataclass(frozen=True, slots=True)
class UnsupportedCommand:
    """Any other Command Field: the SCP answers 0211H or aborts (catalogue DM-02)."""

    command_field: int
    message_id: int | None
    has_dataset: bool


Message = CEchoRQ | CEchoRSP | CStoreRQ | CStoreRSP | UnsupportedCommand


@dataclass(frozen=True, slots=True)
class CommandReceived:
    context_id: int
    message: Message
    has_dataset: bool


@dataclass(frozen=True, slots=True)
class DatasetFragment:
    """One data-set PDV. ``data`` may view the receive buffer: consume it before the next feed."""

    context_id: int
    data: bytes | memoryview
    last: bool


class PDVLike(Protocol):
    """What the assembler reads of ``pdu.PDV`` (PS3.8 9.3.5.1)."""

    @property
    def context_id(self) -> int: ...

    @property
    def data(self) -> bytes | memoryview: ...

    @property
    def is_command(self) -> bool: ...

    @property
    def is_last(self) -> bool: ...


# -- encoding -------------------------------------------------------------------------------
def _text(element: int, value: str, pad: bytes) -> bytes:
    try:
        raw = value.encode("ascii")
    except UnicodeEncodeError:
        raise LocalProtocolError(f"(0000,{element:04X}) value {value!r} is not ASCII") from None
    if len(raw) & 1:  # PS3.5 7.1.1: values have even length; UI pads with NUL, others space
        raw += pad
    return _ELEMENT_HEADER.pack(0, element, len(raw)) + raw


def _elements(msg: Message) -> list[bytes]:
    us = _US_ELEMENT.pack
    if isinstance(msg, CStoreRQ):
        parts = [
            _text(_AFFECTED_SOP_CLASS_UID, msg.affected_sop_class_uid, b"\0"),
            us(0, _COMMAND_FIELD, 2, C_STORE_RQ),
            us(0, _MESSAGE_ID, 2, msg.message_id),
            us(0, _PRIORITY, 2, msg.priority),
            us(0, _COMMAND_DATASET_TYPE, 2, DATASET_PRESENT),
            _text(_AFFECTED_SOP_INSTANCE_UID, msg.affected_sop_instance_uid, b"\0"),
        ]
        if msg.move_originator_ae is not None:
            parts.append(_text(_MOVE_ORIGINATOR_AE, msg.move_originator_ae, b" "))
        if msg.move_originator_message_id is not None:
            parts.append(us(0, _MOVE_ORIGINATOR_MESSAGE_ID, 2, msg.move_originator_message_id))
        return parts
    if isinstance(msg, CStoreRSP):
        parts = []
        if msg.affected_sop_class_uid:
            parts.append(_text(_AFFECTED_SOP_CLASS_UID, msg.affected_sop_class_uid, b"\0"))
        parts += [
            us(0, _COMMAND_FIELD, 2, C_STORE_RSP),
            us(0, _MESSAGE_ID_BEING_RESPONDED_TO, 2, msg.message_id_being_responded_to),
            us(0, _COMMAND_DATASET_TYPE, 2, NO_DATASET),
            us(0, _STATUS, 2, msg.status),
        ]
        if msg.error_comment is not None:
            # LO: at most 64 characters (PS3.5 6.2); longer comments are cut, not refused.
            parts.append(_text(_ERROR_COMMENT, msg.error_comment[:64], b" "))
        if msg.affected_sop_instance_uid:
            parts.append(_text(_AFFECTED_SOP_INSTANCE_UID, msg.affected_sop_instance_uid, b"\0"))
        return parts
    if isinstance(msg, CEchoRQ):
        return [
            _text(_AFFECTED_SOP_CLASS_UID, msg.affected_sop_class_uid, b"\0"),
            us(0, _COMMAND_FIELD, 2, C_ECHO_RQ),
            us(0, _MESSAGE_ID, 2, msg.message_id),
            us(0, _COMMAND_DATASET_TYPE, 2, NO_DATASET),
        ]
    if isinstance(msg, CEchoRSP):
        parts = []
        if msg.affected_sop_class_uid:
            parts.append(_text(_AFFECTED_SOP_CLASS_UID, msg.affected_sop_class_uid, b"\0"))
        parts += [
            us(0, _COMMAND_FIELD, 2, C_ECHO_RSP),
            us(0, _MESSAGE_ID_BEING_RESPONDED_TO, 2, msg.message_id_being_responded_to),
            us(0, _COMMAND_DATASET_TYPE, 2, NO_DATASET),
            us(0, _STATUS, 2, msg.status),
        ]
        return parts
    parts = [us(0, _COMMAND_FIELD, 2, msg.command_field)]
    if msg.message_id is not None:
        parts.append(us(0, _MESSAGE_ID, 2, msg.message_id))
    dataset_type = DATASET_PRESENT if msg.has_dataset else NO_DATASET
    parts.append(us(0, _COMMAND_DATASET_TYPE, 2, dataset_type))
    return parts


def encode_command(msg: Message) -> bytes:
    """The command set of ``msg``: group length first, elements in ascending tag order."""
    try:
        body = b"".join(_elements(msg))
    except struct.error as exc:  # a US field outside 0..65535
        raise LocalProtocolError(f"cannot encode {type(msg).__name__}: {exc}") from None
    return _GROUP_LENGTH_ELEMENT.pack(0, _GROUP_LENGTH, 4, len(body)) + body


# -- decoding -------------------------------------------------------------------------------
def _parse_elements(raw_data: bytes | memoryview) -> dict[int, bytes]:
    """Element number -> raw value; checks the group length and every bound (DM-03)."""
    data = bytes(raw_data)
    end = len(data)
    if end < 12:
        raise DIMSEError(f"command set of {end} bytes has no Command Group Length")
    group, element, length = _ELEMENT_HEADER.unpack_from(data, 0)
    if group != 0 or element != _GROUP_LENGTH or length != 4:
        # Also what an Explicit VR command set looks like here ('UL' read as a length).
        raise DIMSEError("command set does not start with (0000,0000) UL of length 4")
    (group_length,) = struct.unpack_from("<I", data, 8)
    if group_length != end - 12:
        raise DIMSEError(
            f"Command Group Length {group_length} but {end - 12} bytes follow it (DM-03)"
        )
    values: dict[int, bytes] = {}
    offset = 12
    while offset < end:
        if end - offset < 8:
            raise DIMSEError(f"truncated element header at offset {offset}")
        group, element, length = _ELEMENT_HEADER.unpack_from(data, offset)
        offset += 8
        if group != 0:
            raise DIMSEError(f"element ({group:04X},{element:04X}) outside group 0000")
        if length > end - offset:  # also rejects 0xFFFFFFFF (undefined length)
            raise DIMSEError(f"(0000,{element:04X}) length {length} runs past the command set")
        if element in values or element == _GROUP_LENGTH:
            raise DIMSEError(f"(0000,{element:04X}) appears twice")
        values[element] = data[offset : offset + length]
        offset += length
    return values


def _us(values: dict[int, bytes], element: int, what: str) -> int:
    raw = values.get(element)
    if raw is None:
        raise DIMSEError(f"{what}: (0000,{element:04X}) is missing")
    if len(raw) != 2:
        raise DIMSEError(f"{what}: (0000,{element:04X}) US value of length {len(raw)}")
    value: int = _US.unpack(raw)[0]
    return value


def _optional_us(values: dict[int, bytes], element: int, what: str) -> int | None:
    return _us(values, element, what) if element in values else None


def _uid(values: dict[int, bytes], element: int, what: str, required: bool = True) -> str:
    raw = values.get(element)
    if raw is None:
        if required:
            raise DIMSEError(f"{what}: (0000,{element:04X}) is missing")
        return ""
    if not raw.isascii():
        # PS3.5 9.1: a UID is digits and periods. A non-ASCII one could never be echoed
        # in the response (encode_command refuses it), so it is refused here, typed.
        raise DIMSEError(f"{what}: (0000,{element:04X}) is not a UID (non-ASCII bytes)")
    # PS3.5 9.1: NUL pads a UI value; some senders pad with a space instead.
    return raw.decode("latin-1").rstrip("\0 ")


def _optional_text(values: dict[int, bytes], element: int) -> str | None:
    raw = values.get(element)
    return None if raw is None else raw.decode("latin-1").strip("\0 ")


def decode_command_ex(data: bytes | memoryview) -> tuple[Message, bool]:
    """Decode a command set; returns the message and whether a data set follows."""
    values = _parse_elements(data)
    command_field = _us(values, _COMMAND_FIELD, "command set")  # DM-01
    name = f"command 0x{command_field:04X}"
    has_dataset = _us(values, _COMMAND_DATASET_TYPE, name) != NO_DATASET
    msg: Message
    if command_field == C_STORE_RQ:
        name = "C-STORE-RQ"
        msg = CStoreRQ(
            _us(values, _MESSAGE_ID, name),
            _uid(values, _AFFECTED_SOP_CLASS_UID, name),
            _uid(values, _AFFECTED_SOP_INSTANCE_UID, name),
            _us(values, _PRIORITY, name),
            _optional_text(values, _MOVE_ORIGINATOR_AE),
            _optional_us(values, _MOVE_ORIGINATOR_MESSAGE_ID, name),
        )
    elif command_field == C_STORE_RSP:
        name = "C-STORE-RSP"
        msg = CStoreRSP(
            _us(values, _MESSAGE_ID_BEING_RESPONDED_TO, name),
            _uid(values, _AFFECTED_SOP_CLASS_UID, name, required=False),
            _uid(values, _AFFECTED_SOP_INSTANCE_UID, name, required=False),
            _us(values, _STATUS, name),
            _optional_text(values, _ERROR_COMMENT),
        )
    elif command_field == C_ECHO_RQ:
        name = "C-ECHO-RQ"
        msg = CEchoRQ(_us(values, _MESSAGE_ID, name), _uid(values, _AFFECTED_SOP_CLASS_UID, name))
    elif command_field == C_ECHO_RSP:
        name = "C-ECHO-RSP"
        msg = CEchoRSP(
            _us(values, _MESSAGE_ID_BEING_RESPONDED_TO, name),
            _us(values, _STATUS, name),
            _uid(values, _AFFECTED_SOP_CLASS_UID, name, required=False),
        )
    else:
        msg = UnsupportedCommand(
            command_field, _optional_us(values, _MESSAGE_ID, name), has_dataset
        )
    return msg, has_dataset


def decode_command(data: bytes | memoryview) -> Message:
    """Decode a command set (raises ``DIMSEError`` for anything malformed)."""
    return decode_command_ex(data)[0]


# -- fragmentation (PS3.8 9.3.5, Annex E) ---------------------------------------------------
def _max_data(max_pdu_length: int, send_pdu_cap: int) -> int:
    """Data bytes per PDV for the peer's Maximum Length (0 = unlimited, PS3.8 D.1)."""
    if max_pdu_length == 0 or max_pdu_length > send_pdu_cap:
        max_pdu_length = send_pdu_cap
    if max_pdu_length < MIN_MAX_PDU_LENGTH:
        raise LocalProtocolError(
            f"maximum PDU length {max_pdu_length} cannot carry a PDV with data "
            f"(at least {MIN_MAX_PDU_LENGTH})"
        )
    return max_pdu_length - _PDV_OVERHEAD


def fragment(
    context_id: int,
    data: bytes | memoryview,
    is_command: bool,
    max_pdu_length: int,
    *,
    send_pdu_cap: int = SEND_PDU_CAP,
) -> list[bytes | memoryview]:
    """P-DATA-TF PDUs, one PDV each, as buffers for ``writelines`` (``data`` is not copied).

    Each PDU body (PDV item) is at most ``max_pdu_length`` bytes; the last PDV has the
    last-fragment bit (PS3.8 E.2). Empty ``data`` still makes one (empty, last) PDV.
    """
    return _fragment(context_id, data, is_command, _max_data(max_pdu_length, send_pdu_cap), True)


def _fragment(
    context_id: int, data: bytes | memoryview, is_command: bool, per_pdv: int, last: bool
) -> list[bytes | memoryview]:
    control = 0x01 if is_command else 0x00
    if not isinstance(data, bytes):
        data = memoryview(data).cast("B")  # len() counts bytes from here on
    total = len(data)
    if total <= per_pdv:
        return encode_pdata(context_id, control | (0x02 if last else 0), data)
    view = memoryview(data)
    out: list[bytes | memoryview] = []
    for start in range(0, total, per_pdv):
        end = start + per_pdv
        final = last and end >= total
        out += encode_pdata(context_id, control | (0x02 if final else 0), view[start:end])
    return out


def iter_file_fragments(
    fileobj: BinaryIO,
    offset: int,
    length: int,
    context_id: int,
    max_pdu_length: int,
    *,
    chunk_size: int = 1 << 20,
    send_pdu_cap: int = SEND_PDU_CAP,
) -> Iterator[list[bytes | memoryview]]:
    """Data-set PDUs read from ``fileobj`` about ``chunk_size`` bytes at a time.

    Each yielded list is ready for ``writelines``; the whole file is never held in memory.
    A file shorter than ``offset + length`` raises ``OSError`` (the caller must abort:
    the peer has a partial data set).
    """
    per_pdv = _max_data(max_pdu_length, send_pdu_cap)
    chunk = max(per_pdv, chunk_size - chunk_size % per_pdv)  # whole PDVs per read
    fileobj.seek(offset)
    remaining = length
    if remaining == 0:
        yield _fragment(context_id, b"", False, per_pdv, True)
        return
    while remaining > 0:
        data = fileobj.read(min(chunk, remaining))
        if not data:
            raise OSError(f"file ended {remaining} bytes before the announced data set end")
        remaining -= len(data)
        yield _fragment(context_id, data, False, per_pdv, remaining == 0)


# -- reassembly (PS3.7 6.3.1, PS3.8 E.2) ----------------------------------------------------
class MessageAssembler:
    """Turns PDVs into whole commands and streamed data-set fragments.

    A message is one command (possibly in several fragments, all on one context) and, if
    its CommandDataSetType says so, one data set on the same context (PS3.7 6.3.1).
    """

    def __init__(self, limits: Limits) -> None:
        self._max_command = limits.max_command_set_length
        self._parts: list[bytes] = []
        self._size = 0
        self._command_context: int | None = None  # a command is being received
        self._dataset_context: int | None = None  # a data set is expected on this context
        self._seen_command = False

    @property
    def idle(self) -> bool:
        """True between messages (no command fragment or data set outstanding)."""
        return self._command_context is None and self._dataset_context is None

    def feed(self, pdv: PDVLike) -> list[CommandReceived | DatasetFragment]:
        if pdv.is_command:
            received = self._feed_command(pdv)
            return [] if received is None else [received]
        return [self._feed_dataset(pdv)]

    def _feed_command(self, pdv: PDVLike) -> CommandReceived | None:
        context_id = pdv.context_id
        if self._dataset_context is not None:
            raise DIMSEError(
                f"command fragment on context {context_id} while a data set is expected (DM-06)"
            )
        if self._command_context is None:
            self._command_context = context_id
        elif context_id != self._command_context:
            raise DIMSEError(
                f"command fragment on context {context_id}, the command began on "
                f"context {self._command_context}"
            )
        self._size += len(pdv.data)
        if self._size > self._max_command:
            raise DIMSEError(
                f"command set exceeds {self._max_command} bytes without a last fragment (DM-07)"
            )
        self._parts.append(bytes(pdv.data))  # small, and the receive buffer is reused
        if not pdv.is_last:
            return None
        data = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        self._parts = []
        self._size = 0
        self._command_context = None
        self._seen_command = True
        message, has_dataset = decode_command_ex(data)
        if has_dataset:
            self._dataset_context = context_id
        return CommandReceived(context_id, message, has_dataset)

    def _feed_dataset(self, pdv: PDVLike) -> DatasetFragment:
        expected = self._dataset_context
        if expected is None:
            if self._command_context is not None:
                raise DIMSEError("data set fragment before the command's last fragment")
            if not self._seen_command:
                raise DIMSEError("data set fragment before any command (DM-04)")
            raise DIMSEError("data set fragment but the command announced none (DM-06)")
        if pdv.context_id != expected:
            raise DIMSEError(
                f"data set fragment on context {pdv.context_id}, its command was on "
                f"context {expected} (DM-05)"
            )
        if pdv.is_last:
            self._dataset_context = None
        return DatasetFragment(expected, pdv.data, pdv.is_last)
