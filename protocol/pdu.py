"""The seven Upper Layer PDUs (PS3.8 9.3.2-9.3.8) and their codec.

``encode()`` returns the whole PDU with its 6-byte header (type, reserved, 32-bit
length, PS3.8 9.3.1); ``decode_pdu(pdu_type, body)`` takes the body that
``framing.PDUReader`` split off and raises only ``PDUDecodeError``, whatever the bytes.
Reserved fields are sent as zero and never tested on receipt (catalogue MP-16).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from protocol._wire import (
    Buffer,
    check_range,
    decode_ae,
    duplicate,
    encode_ae,
    invalid,
    iter_items,
    view,
)
from protocol.errors import AbortReason, LocalProtocolError, PDUDecodeError
from protocol.items import (
    ApplicationContext,
    PresentationContextAC,
    PresentationContextRQ,
    UserInformation,
)
from protocol.limits import Limits
from protocol.uids import APPLICATION_CONTEXT

__all__ = [
    "PDU",
    "PDU_TYPES",
    "PDV",
    "AAbort",
    "AAssociateAC",
    "AAssociateRJ",
    "AAssociateRQ",
    "AReleaseRP",
    "AReleaseRQ",
    "PDataTF",
    "decode_pdu",
    "encode_pdata",
]

_PDU_HEADER = struct.Struct(">BBI")  # PDU type, reserved, PDU length
_PDATA_HEADER = struct.Struct(">BBIIBB")  # PDU header + one PDV header
_PDV_HEADER = struct.Struct(">IBB")  # PDV item length, context ID, control header
_FIXED_BODY = struct.Struct(">BBBB")

#: Bytes of an A-ASSOCIATE-RQ/AC body before its items: protocol version (2),
#: reserved (2), called AE (16), calling AE (16), reserved (32) (PS3.8 9.3.2, 9.3.3).
ASSOCIATE_FIXED_LENGTH = 68
_ZEROS_32 = bytes(32)
_MAX_U32 = 0xFFFF_FFFF


def _header(pdu_type: int, body_length: int) -> bytes:
    if body_length > _MAX_U32:
        raise LocalProtocolError(f"PDU body of {body_length} bytes exceeds the 32-bit length")
    return _PDU_HEADER.pack(pdu_type, 0, body_length)


# --- A-ASSOCIATE-RQ / AC (PS3.8 9.3.2, 9.3.3) ------------------------------------------


def _encode_associate(
    pdu_type: int,
    protocol_version: int,
    called_ae: str,
    calling_ae: str,
    items: list[bytes],
) -> bytes:
    version = check_range(protocol_version, 16, "protocol version")
    body = b"".join(
        [
            version.to_bytes(2, "big"),
            b"\x00\x00",
            encode_ae(called_ae, "called AE title"),
            encode_ae(calling_ae, "calling AE title"),
            _ZEROS_32,
            *items,
        ]
    )
    return _header(pdu_type, len(body)) + body


@dataclass(frozen=True, slots=True)
class _AssociateFields:
    protocol_version: int
    called_ae: str
    calling_ae: str
    application_context: str
    contexts: list[memoryview]
    user_information: UserInformation


def _decode_associate(body: Buffer, context_type: int, name: str) -> _AssociateFields:
    """The fixed part and items shared by A-ASSOCIATE-RQ and -AC.

    Exactly one application context item and one user information item are required;
    a second copy is reason 5, a missing one reason 6 (catalogue MP-17). Presentation
    context items of ``context_type`` are returned raw; other well-formed items are
    skipped (MP-12).
    """
    buf = view(body)
    if len(buf) < ASSOCIATE_FIXED_LENGTH:
        raise invalid(f"{name} body of {len(buf)} bytes, shorter than the 68 fixed bytes")
    app_context: str | None = None
    user_info: UserInformation | None = None
    contexts: list[memoryview] = []
    for item_type, item_body in iter_items(buf[ASSOCIATE_FIXED_LENGTH:], name):
        if item_type == 0x10:
            if app_context is not None:
                raise duplicate(f"application context item in {name}")
            app_context = ApplicationContext.decode(item_body).name
        elif item_type == context_type:
            contexts.append(item_body)
        elif item_type == 0x50:
            if user_info is not None:
                raise duplicate(f"user information item in {name}")
            user_info = UserInformation.decode(item_body)
    if app_context is None:
        raise invalid(f"{name} has no application context item")
    if user_info is None:
        raise invalid(f"{name} has no user information item")
    return _AssociateFields(
        protocol_version=(buf[0] << 8) | buf[1],
        called_ae=decode_ae(buf[4:20]),
        calling_ae=decode_ae(buf[20:36]),
        application_context=app_context,
        contexts=contexts,
        user_information=user_info,
    )


@dataclass(frozen=True, slots=True)
class AAssociateRQ:
    """A-ASSOCIATE-RQ, PDU type 1 (PS3.8 9.3.2).

    ``protocol_version`` is kept as received: only bit 0 is meaningful and negotiation,
    not decoding, refuses a version without it (catalogue MP-14, MP-15).
    """

    pdu_type: ClassVar[int] = 1
    called_ae: str
    calling_ae: str
    presentation_contexts: tuple[PresentationContextRQ, ...]
    user_information: UserInformation
    application_context: str = APPLICATION_CONTEXT
    protocol_version: int = 1

    def encode(self) -> bytes:
        items = [ApplicationContext(self.application_context).encode()]
        items += [pc.encode() for pc in self.presentation_contexts]
        items.append(self.user_information.encode())
        return _encode_associate(1, self.protocol_version, self.called_ae, self.calling_ae, items)

    @classmethod
    def decode(cls, body: Buffer) -> AAssociateRQ:
        f = _decode_associate(body, 0x20, "A-ASSOCIATE-RQ")
        return cls(
            called_ae=f.called_ae,
            calling_ae=f.calling_ae,
            presentation_contexts=tuple(PresentationContextRQ.decode(c) for c in f.contexts),
            user_information=f.user_information,
            application_context=f.application_context,
            protocol_version=f.protocol_version,
        )


@dataclass(frozen=True, slots=True)
class AAssociateAC:
    """A-ASSOCIATE-AC, PDU type 2 (PS3.8 9.3.3). The AE title fields echo the request and
    are not tested on receipt; they are decoded anyway for logs."""

    pdu_type: ClassVar[int] = 2
    called_ae: str
    calling_ae: str
    presentation_contexts: tuple[PresentationContextAC, ...]
    user_information: UserInformation
    application_context: str = APPLICATION_CONTEXT
    protocol_version: int = 1

    def encode(self) -> bytes:
        items = [ApplicationContext(self.application_context).encode()]
        items += [pc.encode() for pc in self.presentation_contexts]
        items.append(self.user_information.encode())
        return _encode_associate(2, self.protocol_version, self.called_ae, self.calling_ae, items)

    @classmethod
    def decode(cls, body: Buffer) -> AAssociateAC:
        f = _decode_associate(body, 0x21, "A-ASSOCIATE-AC")
        return cls(
            called_ae=f.called_ae,
            calling_ae=f.calling_ae,
            presentation_contexts=tuple(PresentationContextAC.decode(c) for c in f.contexts),
            user_information=f.user_information,
            application_context=f.application_context,
            protocol_version=f.protocol_version,
        )


# --- fixed-length PDUs (PS3.8 9.3.4, 9.3.6-9.3.8): body of exactly 4 bytes -------------


def _fixed_body(body: Buffer, name: str) -> memoryview:
    buf = view(body)
    if len(buf) != 4:
        raise invalid(f"{name} body of {len(buf)} bytes, not 4")  # catalogue MP-34
    return buf


@dataclass(frozen=True, slots=True)
class AAssociateRJ:
    """A-ASSOCIATE-RJ, PDU type 3 (PS3.8 9.3.4): reserved, result, source, reason/diag.
    Values outside Table 9-21 are kept as received (errors.describe_reject_reason)."""

    pdu_type: ClassVar[int] = 3
    result: int
    source: int
    reason: int

    def encode(self) -> bytes:
        body = _FIXED_BODY.pack(
            0,
            check_range(self.result, 8, "reject result"),
            check_range(self.source, 8, "reject source"),
            check_range(self.reason, 8, "reject reason"),
        )
        return _header(3, 4) + body

    @classmethod
    def decode(cls, body: Buffer) -> AAssociateRJ:
        buf = _fixed_body(body, "A-ASSOCIATE-RJ")
        return cls(buf[1], buf[2], buf[3])


@dataclass(frozen=True, slots=True)
class AReleaseRQ:
    """A-RELEASE-RQ, PDU type 5 (PS3.8 9.3.6): 4 reserved bytes."""

    pdu_type: ClassVar[int] = 5

    def encode(self) -> bytes:
        return b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"

    @classmethod
    def decode(cls, body: Buffer) -> AReleaseRQ:
        _fixed_body(body, "A-RELEASE-RQ")
        return cls()


@dataclass(frozen=True, slots=True)
class AReleaseRP:
    """A-RELEASE-RP, PDU type 6 (PS3.8 9.3.7): 4 reserved bytes."""

    pdu_type: ClassVar[int] = 6

    def encode(self) -> bytes:
        return b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"

    @classmethod
    def decode(cls, body: Buffer) -> AReleaseRP:
        _fixed_body(body, "A-RELEASE-RP")
        return cls()


@dataclass(frozen=True, slots=True)
class AAbort:
    """A-ABORT, PDU type 7 (PS3.8 9.3.8): reserved (2), source, reason/diag. Values
    outside Table 9-26 are kept as received (catalogue MP-35)."""

    pdu_type: ClassVar[int] = 7
    source: int
    reason: int

    def encode(self) -> bytes:
        body = _FIXED_BODY.pack(
            0,
            0,
            check_range(self.source, 8, "abort source"),
            check_range(self.reason, 8, "abort reason"),
        )
        return _header(7, 4) + body

    @classmethod
    def decode(cls, body: Buffer) -> AAbort:
        buf = _fixed_body(body, "A-ABORT")
        return cls(buf[2], buf[3])


# --- P-DATA-TF (PS3.8 9.3.5, Annex E) ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class PDV:
    """One presentation data value item: context ID, message control header, fragment.

    Only bits 0 (command) and 1 (last fragment) of the control header are interpreted
    (PS3.8 E.2; catalogue MP-33). Decoded ``data`` is a memoryview into the PDU body.
    """

    context_id: int
    control_header: int
    data: bytes | memoryview

    @property
    def is_command(self) -> bool:
        return bool(self.control_header & 0x01)

    @property
    def is_last(self) -> bool:
        return bool(self.control_header & 0x02)


@dataclass(frozen=True, slots=True)
class PDataTF:
    """P-DATA-TF, PDU type 4 (PS3.8 9.3.5): one or more PDV items, each with a 4-byte item
    length of at least 2 (context ID + control header) lying within the PDU."""

    pdu_type: ClassVar[int] = 4
    pdvs: tuple[PDV, ...]

    def encode(self) -> bytes:
        parts: list[bytes | memoryview] = [b""]
        total = 0
        try:
            for pdv in self.pdvs:
                size = len(pdv.data)
                parts.append(_PDV_HEADER.pack(size + 2, pdv.context_id, pdv.control_header))
                parts.append(pdv.data)
                total += size + 6
        except struct.error as exc:
            raise LocalProtocolError(f"PDV field out of range: {exc}") from None
        parts[0] = _header(4, total)
        return b"".join(parts)

    @classmethod
    def decode(cls, body: Buffer) -> PDataTF:
        buf = view(body)
        end = len(buf)
        if end == 0:
            raise invalid("P-DATA-TF without a PDV item")  # catalogue MP-29
        pdvs: list[PDV] = []
        off = 0
        while off < end:
            if end - off < 6:
                raise invalid(f"P-DATA-TF: {end - off} trailing byte(s), too short for a PDV")
            length = int.from_bytes(buf[off : off + 4], "big")
            if length < 2:
                raise invalid(f"PDV item length {length}, shorter than 2")  # MP-30
            stop = off + 4 + length
            if stop > end:
                raise invalid(f"PDV item length {length} runs past the PDU")  # MP-31
            pdvs.append(PDV(buf[off + 4], buf[off + 5], buf[off + 6 : stop]))
            off = stop
        return cls(tuple(pdvs))


def encode_pdata(
    context_id: int, control_header: int, data: bytes | memoryview
) -> list[bytes | memoryview]:
    """A one-PDV P-DATA-TF as [12-byte header, data] for ``writelines`` (``data`` not copied)."""
    size = len(data)
    try:
        header = _PDATA_HEADER.pack(4, 0, size + 6, size + 2, context_id, control_header)
    except struct.error as exc:
        raise LocalProtocolError(f"P-DATA-TF field out of range: {exc}") from None
    return [header, data]


PDU = AAssociateRQ | AAssociateAC | AAssociateRJ | PDataTF | AReleaseRQ | AReleaseRP | AAbort

PDU_TYPES: dict[int, type[PDU]] = {
    1: AAssociateRQ,
    2: AAssociateAC,
    3: AAssociateRJ,
    4: PDataTF,
    5: AReleaseRQ,
    6: AReleaseRP,
    7: AAbort,
}


def decode_pdu(pdu_type: int, body: Buffer, limits: Limits | None = None) -> PDU:
    """Decode the body of a PDU of ``pdu_type``; raises only ``PDUDecodeError``.

    Reasons (PS3.8 9.3.8): 1 for an unknown type, 5 for a duplicate single-occurrence
    item, 6 for any structural fault. With ``limits``, an A-ASSOCIATE body over
    ``limits.max_associate_pdu_length`` is refused too (``PDUReader`` checks that on
    the header already; this covers callers that bypass it).
    """
    kind = PDU_TYPES.get(pdu_type)
    if kind is None:
        raise PDUDecodeError(
            f"unrecognized PDU type 0x{pdu_type:02x}", AbortReason.UNRECOGNIZED_PDU
        )
    if limits is not None and pdu_type <= 3 and len(body) > limits.max_associate_pdu_length:
        raise invalid(
            f"{kind.__name__} of {len(body)} bytes exceeds the A-ASSOCIATE cap "
            f"{limits.max_associate_pdu_length}"
        )
    return kind.decode(body)
