"""User Information item [0x50] and its sub-items (PS3.8 9.3.2.3, Annex D; PS3.7 D.3.3).

Import these from ``protocol.items``, which re-exports them. Each sub-item has the
common 4-byte item header; fixed-size sub-items must have exactly their size, and
every length-prefixed field inside a sub-item is checked against the sub-item.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from protocol._wire import (
    U16,
    U32,
    Buffer,
    check_range,
    decode_uid,
    duplicate,
    encode_text,
    field16,
    invalid,
    item,
    iter_items,
    read_field,
    view,
)


@dataclass(frozen=True, slots=True)
class MaximumLength:
    """Maximum Length sub-item [0x51] (PS3.8 D.1): the largest P-DATA-TF variable field
    the sender accepts; 0 means no limit. The item length must be 4 (catalogue MP-25)."""

    item_type: ClassVar[int] = 0x51
    value: int

    def encode(self) -> bytes:
        return item(0x51, U32.pack(check_range(self.value, 32, "maximum length")))

    @classmethod
    def decode(cls, body: Buffer) -> MaximumLength:
        buf = view(body)
        if len(buf) != 4:
            raise invalid(f"maximum length sub-item of {len(buf)} bytes, not 4")
        return cls(int.from_bytes(buf, "big"))


@dataclass(frozen=True, slots=True)
class ImplementationClassUID:
    """Implementation Class UID sub-item [0x52] (PS3.7 D.3.3.2)."""

    item_type: ClassVar[int] = 0x52
    uid: str

    def encode(self) -> bytes:
        return item(0x52, encode_text(self.uid, "implementation class UID"))

    @classmethod
    def decode(cls, body: Buffer) -> ImplementationClassUID:
        return cls(decode_uid(view(body)))


@dataclass(frozen=True, slots=True)
class ImplementationVersionName:
    """Implementation Version Name sub-item [0x55] (PS3.7 D.3.3.2.3): 1-16 characters,
    a padding space or NUL at either end is not significant."""

    item_type: ClassVar[int] = 0x55
    name: str

    def encode(self) -> bytes:
        return item(0x55, encode_text(self.name, "implementation version name"))

    @classmethod
    def decode(cls, body: Buffer) -> ImplementationVersionName:
        return cls(str(view(body), "latin-1").strip(" \x00"))


@dataclass(frozen=True, slots=True)
class AsyncOpsWindow:
    """Asynchronous Operations Window sub-item [0x53] (PS3.7 D.3.3.3): two 16-bit
    counts, 0 meaning unlimited; the item length must be 4."""

    item_type: ClassVar[int] = 0x53
    max_invoked: int
    max_performed: int

    def encode(self) -> bytes:
        invoked = check_range(self.max_invoked, 16, "max operations invoked")
        performed = check_range(self.max_performed, 16, "max operations performed")
        return item(0x53, U16.pack(invoked) + U16.pack(performed))

    @classmethod
    def decode(cls, body: Buffer) -> AsyncOpsWindow:
        buf = view(body)
        if len(buf) != 4:
            raise invalid(f"asynchronous operations window sub-item of {len(buf)} bytes, not 4")
        return cls((buf[0] << 8) | buf[1], (buf[2] << 8) | buf[3])


@dataclass(frozen=True, slots=True)
class RoleSelection:
    """SCP/SCU Role Selection sub-item [0x54] (PS3.7 D.3.3.4): UID length (2), SOP class
    UID, SCU role (1), SCP role (1); 1 = the role is proposed/accepted, 0 = not."""

    item_type: ClassVar[int] = 0x54
    sop_class_uid: str
    scu_role: bool
    scp_role: bool

    def encode(self) -> bytes:
        uid = field16(encode_text(self.sop_class_uid, "role selection SOP class UID"), "UID")
        return item(0x54, uid + bytes((int(self.scu_role), int(self.scp_role))))

    @classmethod
    def decode(cls, body: Buffer) -> RoleSelection:
        buf = view(body)
        uid, off = read_field(buf, 0, "role selection sub-item")
        if len(buf) != off + 2:
            raise invalid(
                f"role selection sub-item of {len(buf)} bytes, expected {off + 2} "
                f"for a {len(uid)}-byte UID"
            )
        return cls(decode_uid(uid), buf[off] != 0, buf[off + 1] != 0)


@dataclass(frozen=True, slots=True)
class SOPClassExtendedNegotiation:
    """SOP Class Extended Negotiation sub-item [0x56] (PS3.7 D.3.3.5): UID length (2),
    SOP class UID, then service-class application information to the end of the item."""

    item_type: ClassVar[int] = 0x56
    sop_class_uid: str
    application_info: bytes

    def encode(self) -> bytes:
        uid = encode_text(self.sop_class_uid, "extended negotiation SOP class UID")
        return item(0x56, field16(uid, "UID") + bytes(self.application_info))

    @classmethod
    def decode(cls, body: Buffer) -> SOPClassExtendedNegotiation:
        buf = view(body)
        uid, off = read_field(buf, 0, "SOP class extended negotiation sub-item")
        return cls(decode_uid(uid), bytes(buf[off:]))


@dataclass(frozen=True, slots=True)
class SOPClassCommonExtendedNegotiation:
    """SOP Class Common Extended Negotiation sub-item [0x57] (PS3.7 D.3.3.6).

    Byte 1 of the header is the sub-item version (00H), not reserved. Body: SOP class
    UID length (2) + UID, service class UID length (2) + UID, related general SOP class
    identification length (2) + that many bytes of (UID length (2) + UID) entries.
    """

    item_type: ClassVar[int] = 0x57
    sop_class_uid: str
    service_class_uid: str
    related_general_sop_classes: tuple[str, ...] = ()

    def encode(self) -> bytes:
        related = b"".join(
            field16(encode_text(uid, "related general SOP class UID"), "UID")
            for uid in self.related_general_sop_classes
        )
        body = b"".join(
            (
                field16(encode_text(self.sop_class_uid, "SOP class UID"), "UID"),
                field16(encode_text(self.service_class_uid, "service class UID"), "UID"),
                field16(related, "related general SOP class identification"),
            )
        )
        return item(0x57, body)

    @classmethod
    def decode(cls, body: Buffer) -> SOPClassCommonExtendedNegotiation:
        where = "SOP class common extended negotiation sub-item"
        buf = view(body)
        sop_class, off = read_field(buf, 0, where)
        service_class, off = read_field(buf, off, where)
        related, _ = read_field(buf, off, where)
        uids: list[str] = []
        pos = 0
        while pos < len(related):
            uid, pos = read_field(related, pos, where)
            uids.append(decode_uid(uid))
        return cls(decode_uid(sop_class), decode_uid(service_class), tuple(uids))


@dataclass(frozen=True, slots=True)
class UserIdentityRQ:
    """User Identity Negotiation sub-item, RQ [0x58] (PS3.7 D.3.3.7.1): identity type (1),
    positive response requested (1), primary field length (2) + field, secondary field
    length (2) + field (length 0 unless the type is 2, username and passcode)."""

    item_type: ClassVar[int] = 0x58
    USERNAME: ClassVar[int] = 1
    USERNAME_AND_PASSCODE: ClassVar[int] = 2
    KERBEROS: ClassVar[int] = 3
    SAML: ClassVar[int] = 4
    JWT: ClassVar[int] = 5

    identity_type: int
    positive_response_requested: bool
    primary_field: bytes
    secondary_field: bytes = b""

    def encode(self) -> bytes:
        head = bytes(
            (
                check_range(self.identity_type, 8, "user identity type"),
                int(self.positive_response_requested),
            )
        )
        primary = field16(bytes(self.primary_field), "user identity primary field")
        secondary = field16(bytes(self.secondary_field), "user identity secondary field")
        return item(0x58, head + primary + secondary)

    @classmethod
    def decode(cls, body: Buffer) -> UserIdentityRQ:
        where = "user identity sub-item"
        buf = view(body)
        if len(buf) < 2:
            raise invalid(f"{where} of {len(buf)} bytes, too short")
        primary, off = read_field(buf, 2, where)
        secondary, off = read_field(buf, off, where)
        if off != len(buf):
            raise invalid(f"{where}: {len(buf) - off} byte(s) after the secondary field")
        return cls(buf[0], buf[1] != 0, bytes(primary), bytes(secondary))


@dataclass(frozen=True, slots=True)
class UserIdentityAC:
    """User Identity Negotiation sub-item, AC [0x59] (PS3.7 D.3.3.7.2): server response
    length (2) + server response."""

    item_type: ClassVar[int] = 0x59
    server_response: bytes

    def encode(self) -> bytes:
        return item(0x59, field16(bytes(self.server_response), "user identity server response"))

    @classmethod
    def decode(cls, body: Buffer) -> UserIdentityAC:
        buf = view(body)
        response, off = read_field(buf, 0, "user identity AC sub-item")
        if off != len(buf):
            raise invalid(f"user identity AC sub-item: {len(buf) - off} trailing byte(s)")
        return cls(bytes(response))


# Sub-items that may occur at most once in one User Information item (PS3.7 D.3.3).
_SINGLE: dict[int, str] = {
    0x51: "maximum length sub-item",
    0x52: "implementation class UID sub-item",
    0x53: "asynchronous operations window sub-item",
    0x55: "implementation version name sub-item",
    0x58: "user identity RQ sub-item",
    0x59: "user identity AC sub-item",
}


@dataclass(frozen=True, slots=True)
class UserInformation:
    """User Information item [0x50] (PS3.8 9.3.2.3, 9.3.3.3; Annex D).

    A second copy of a single-occurrence sub-item is a ``PDUDecodeError`` with reason
    UNEXPECTED_PDU_PARAMETER (5); a well-formed unknown sub-item is skipped and its type
    recorded in ``unknown_sub_item_types`` (catalogue MP-12); encoding never sends those.
    """

    item_type: ClassVar[int] = 0x50
    max_length: int | None = None
    implementation_class_uid: str | None = None
    implementation_version_name: str | None = None
    async_ops_window: AsyncOpsWindow | None = None
    role_selections: tuple[RoleSelection, ...] = ()
    sop_class_extended: tuple[SOPClassExtendedNegotiation, ...] = ()
    sop_class_common_extended: tuple[SOPClassCommonExtendedNegotiation, ...] = ()
    user_identity_rq: UserIdentityRQ | None = None
    user_identity_ac: UserIdentityAC | None = None
    unknown_sub_item_types: tuple[int, ...] = ()

    def encode(self) -> bytes:
        # Sent in sub-item type order, which is also the order of PS3.7 D.3.3.
        parts: list[bytes] = []
        if self.max_length is not None:
            parts.append(MaximumLength(self.max_length).encode())
        if self.implementation_class_uid is not None:
            parts.append(ImplementationClassUID(self.implementation_class_uid).encode())
        if self.async_ops_window is not None:
            parts.append(self.async_ops_window.encode())
        parts += [role.encode() for role in self.role_selections]
        if self.implementation_version_name is not None:
            parts.append(ImplementationVersionName(self.implementation_version_name).encode())
        parts += [ext.encode() for ext in self.sop_class_extended]
        parts += [ext.encode() for ext in self.sop_class_common_extended]
        if self.user_identity_rq is not None:
            parts.append(self.user_identity_rq.encode())
        if self.user_identity_ac is not None:
            parts.append(self.user_identity_ac.encode())
        return item(0x50, b"".join(parts))

    @classmethod
    def decode(cls, body: Buffer) -> UserInformation:
        seen: set[int] = set()
        max_length: int | None = None
        class_uid: str | None = None
        version_name: str | None = None
        window: AsyncOpsWindow | None = None
        identity_rq: UserIdentityRQ | None = None
        identity_ac: UserIdentityAC | None = None
        roles: list[RoleSelection] = []
        extended: list[SOPClassExtendedNegotiation] = []
        common: list[SOPClassCommonExtendedNegotiation] = []
        unknown: list[int] = []
        for sub_type, sub in iter_items(view(body), "user information item"):
            if sub_type in _SINGLE:
                if sub_type in seen:
                    raise duplicate(_SINGLE[sub_type])
                seen.add(sub_type)
            if sub_type == 0x51:
                max_length = MaximumLength.decode(sub).value
            elif sub_type == 0x52:
                class_uid = ImplementationClassUID.decode(sub).uid
            elif sub_type == 0x53:
                window = AsyncOpsWindow.decode(sub)
            elif sub_type == 0x54:
                roles.append(RoleSelection.decode(sub))
            elif sub_type == 0x55:
                version_name = ImplementationVersionName.decode(sub).name
            elif sub_type == 0x56:
                extended.append(SOPClassExtendedNegotiation.decode(sub))
            elif sub_type == 0x57:
                common.append(SOPClassCommonExtendedNegotiation.decode(sub))
            elif sub_type == 0x58:
                identity_rq = UserIdentityRQ.decode(sub)
            elif sub_type == 0x59:
                identity_ac = UserIdentityAC.decode(sub)
            else:
                unknown.append(sub_type)
        return cls(
            max_length=max_length,
            implementation_class_uid=class_uid,
            implementation_version_name=version_name,
            async_ops_window=window,
            role_selections=tuple(roles),
            sop_class_extended=tuple(extended),
            sop_class_common_extended=tuple(common),
            user_identity_rq=identity_rq,
            user_identity_ac=identity_ac,
            unknown_sub_item_types=tuple(unknown),
        )
