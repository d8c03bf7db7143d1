"""Variable items of the A-ASSOCIATE PDUs (PS3.8 9.3.2-9.3.3) and, re-exported from
``user_info``, the user-information sub-items (PS3.8 Annex D, PS3.7 Annex D.3.3).

``encode()`` returns the whole item with its 4-byte header; ``Item.decode(body)`` takes
the item *body* (the bytes after the header) and raises only ``PDUDecodeError``.
Reserved fields are sent as 00H and never tested on receipt (PS3.8 9.3.1).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

from protocol._wire import (
    Buffer,
    check_range,
    decode_uid,
    duplicate,
    encode_text,
    invalid,
    item,
    iter_items,
    view,
)
from protocol.user_info import (
    AsyncOpsWindow,
    ImplementationClassUID,
    ImplementationVersionName,
    MaximumLength,
    RoleSelection,
    SOPClassCommonExtendedNegotiation,
    SOPClassExtendedNegotiation,
    UserIdentityAC,
    UserIdentityRQ,
    UserInformation,
)

__all__ = [
    "AbstractSyntax",
    "ApplicationContext",
    "AsyncOpsWindow",
    "ImplementationClassUID",
    "ImplementationVersionName",
    "ItemType",
    "MaximumLength",
    "PresentationContextAC",
    "PresentationContextRQ",
    "RoleSelection",
    "SOPClassCommonExtendedNegotiation",
    "SOPClassExtendedNegotiation",
    "TransferSyntax",
    "UserIdentityAC",
    "UserIdentityRQ",
    "UserInformation",
]


class ItemType(enum.IntEnum):
    """Item and sub-item types (PS3.8 9.3.2-9.3.3, Annex D)."""

    APPLICATION_CONTEXT = 0x10
    PRESENTATION_CONTEXT_RQ = 0x20
    PRESENTATION_CONTEXT_AC = 0x21
    ABSTRACT_SYNTAX = 0x30
    TRANSFER_SYNTAX = 0x40
    USER_INFORMATION = 0x50
    MAXIMUM_LENGTH = 0x51
    IMPLEMENTATION_CLASS_UID = 0x52
    ASYNC_OPS_WINDOW = 0x53
    ROLE_SELECTION = 0x54
    IMPLEMENTATION_VERSION_NAME = 0x55
    SOP_CLASS_EXTENDED_NEGOTIATION = 0x56
    SOP_CLASS_COMMON_EXTENDED_NEGOTIATION = 0x57
    USER_IDENTITY_RQ = 0x58
    USER_IDENTITY_AC = 0x59


def _uid_item(item_type: int, uid: str, what: str) -> bytes:
    # UIDs in items are sent unpadded (PS3.8 9.3.2.2, Annex F).
    return item(item_type, encode_text(uid, what))


@dataclass(frozen=True, slots=True)
class ApplicationContext:
    """Application Context item [0x10] (PS3.8 9.3.2.1); the name is a UID (PS3.7 A.2)."""

    item_type: ClassVar[int] = 0x10
    name: str

    def encode(self) -> bytes:
        return _uid_item(0x10, self.name, "application context name")

    @classmethod
    def decode(cls, body: Buffer) -> ApplicationContext:
        return cls(decode_uid(view(body)))


@dataclass(frozen=True, slots=True)
class AbstractSyntax:
    """Abstract Syntax sub-item [0x30] (PS3.8 9.3.2.2.1)."""

    item_type: ClassVar[int] = 0x30
    name: str

    def encode(self) -> bytes:
        return _uid_item(0x30, self.name, "abstract syntax")

    @classmethod
    def decode(cls, body: Buffer) -> AbstractSyntax:
        return cls(decode_uid(view(body)))


@dataclass(frozen=True, slots=True)
class TransferSyntax:
    """Transfer Syntax sub-item [0x40] (PS3.8 9.3.2.2.2, 9.3.3.2.1)."""

    item_type: ClassVar[int] = 0x40
    name: str

    def encode(self) -> bytes:
        return _uid_item(0x40, self.name, "transfer syntax")

    @classmethod
    def decode(cls, body: Buffer) -> TransferSyntax:
        return cls(decode_uid(view(body)))


@dataclass(frozen=True, slots=True)
class PresentationContextRQ:
    """Presentation Context item of an A-ASSOCIATE-RQ [0x20] (PS3.8 9.3.2.2).

    Body: context ID (1), reserved (3), one abstract syntax sub-item, one or more
    transfer syntax sub-items. Decoding keeps zero or several abstract syntaxes and zero
    transfer syntaxes: negotiation rejects that context, not the association (MP-22).
    Encoding writes exactly what it holds, so tests can build such contexts too.
    """

    item_type: ClassVar[int] = 0x20
    context_id: int
    abstract_syntaxes: tuple[str, ...]
    transfer_syntaxes: tuple[str, ...]

    @property
    def abstract_syntax(self) -> str | None:
        """The abstract syntax, or None unless exactly one was proposed."""
        return self.abstract_syntaxes[0] if len(self.abstract_syntaxes) == 1 else None

    def encode(self) -> bytes:
        parts = [bytes((check_range(self.context_id, 8, "presentation context ID"), 0, 0, 0))]
        parts += [_uid_item(0x30, uid, "abstract syntax") for uid in self.abstract_syntaxes]
        parts += [_uid_item(0x40, uid, "transfer syntax") for uid in self.transfer_syntaxes]
        return item(0x20, b"".join(parts))

    @classmethod
    def decode(cls, body: Buffer) -> PresentationContextRQ:
        buf = view(body)
        if len(buf) < 4:
            raise invalid(f"presentation context item of {len(buf)} bytes, shorter than 4")
        abstract: list[str] = []
        transfer: list[str] = []
        for sub_type, sub_body in iter_items(buf[4:], "presentation context item"):
            if sub_type == 0x30:
                abstract.append(decode_uid(sub_body))
            elif sub_type == 0x40:
                transfer.append(decode_uid(sub_body))
            # any other well-formed sub-item is skipped (catalogue MP-12)
        return cls(buf[0], tuple(abstract), tuple(transfer))


@dataclass(frozen=True, slots=True)
class PresentationContextAC:
    """Presentation Context item of an A-ASSOCIATE-AC [0x21] (PS3.8 9.3.3.2).

    Body: context ID (1), reserved (1), result/reason (1), reserved (1), one transfer
    syntax sub-item. The transfer syntax is not significant and not tested unless the
    result is 0 (acceptance), so it decodes as "" then; we send an empty sub-item.
    """

    item_type: ClassVar[int] = 0x21
    ACCEPTANCE: ClassVar[int] = 0
    USER_REJECTION: ClassVar[int] = 1
    NO_REASON: ClassVar[int] = 2
    ABSTRACT_SYNTAX_NOT_SUPPORTED: ClassVar[int] = 3
    TRANSFER_SYNTAXES_NOT_SUPPORTED: ClassVar[int] = 4

    context_id: int
    result: int
    transfer_syntax: str = ""

    @property
    def accepted(self) -> bool:
        return self.result == 0

    def encode(self) -> bytes:
        head = bytes(
            (
                check_range(self.context_id, 8, "presentation context ID"),
                0,
                check_range(self.result, 8, "presentation context result"),
                0,
            )
        )
        syntax = self.transfer_syntax if self.result == 0 else ""
        return item(0x21, head + _uid_item(0x40, syntax, "transfer syntax"))

    @classmethod
    def decode(cls, body: Buffer) -> PresentationContextAC:
        buf = view(body)
        if len(buf) < 4:
            raise invalid(f"presentation context item of {len(buf)} bytes, shorter than 4")
        context_id, result = buf[0], buf[2]
        syntaxes = [
            decode_uid(sub_body)
            for sub_type, sub_body in iter_items(buf[4:], "presentation context item")
            if sub_type == 0x40
        ]
        if result != 0:
            return cls(context_id, result, "")
        if not syntaxes:
            raise invalid(f"accepted presentation context {context_id} has no transfer syntax")
        if len(syntaxes) > 1:
            raise duplicate(f"transfer syntax in accepted presentation context {context_id}")
        return cls(context_id, result, syntaxes[0])
