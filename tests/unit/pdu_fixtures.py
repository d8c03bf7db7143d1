"""Hand-built PDUs from the standard (PS3.8 9.3) and catalogue B.0, field by field.

Imported by the PDU, item, framing and property tests; offsets are from byte 0 of the PDU.
"""

from __future__ import annotations

import struct


def item(item_type: int, body: bytes, reserved: int = 0) -> bytes:
    """An item or sub-item: type, reserved, 16-bit length, body (PS3.8 9.3.2.1)."""
    return struct.pack(">BBH", item_type, reserved, len(body)) + body


def pdu(pdu_type: int, body: bytes, reserved: int = 0) -> bytes:
    """A PDU: type, reserved, 32-bit length, body (PS3.8 9.3.1)."""
    return struct.pack(">BBI", pdu_type, reserved, len(body)) + body


def associate_fixed(
    called: bytes = b"ROUTER", calling: bytes = b"MODALITY", version: int = 1
) -> bytes:
    """The 68 fixed bytes of an A-ASSOCIATE-RQ/AC body (PS3.8 Table 9-11)."""
    return (
        struct.pack(">HH", version, 0)  # protocol version (bit 0), reserved
        + called.ljust(16, b" ")  # called AE title, space padded
        + calling.ljust(16, b" ")  # calling AE title
        + bytes(32)  # reserved
    )


def associate_rq(*items: bytes, fixed: bytes | None = None) -> bytes:
    """A whole A-ASSOCIATE-RQ from already-encoded items."""
    return pdu(1, (associate_fixed() if fixed is None else fixed) + b"".join(items))


# -- catalogue B.0: the 191-byte A-ASSOCIATE-RQ (Verification, Implicit VR LE) ------------

VERIFICATION = b"1.2.840.10008.1.1"
IMPLICIT_VR_LE = b"1.2.840.10008.1.2"
APP_CONTEXT_NAME = b"1.2.840.10008.3.1.1.1"
IMPL_CLASS_UID = b"1.2.826.0.1.3680043.9.9999"

# 0x4a: application context item, 10 00 00 15 + 21-byte UID
APP_CONTEXT_ITEM = bytes.fromhex("10000015") + APP_CONTEXT_NAME
# 0x63: presentation context item 20 00 00 2e; context ID 1, 3 reserved bytes
ABSTRACT_SYNTAX_ITEM = bytes.fromhex("30000011") + VERIFICATION  # abstract syntax
TRANSFER_SYNTAX_ITEM = bytes.fromhex("40000011") + IMPLICIT_VR_LE  # transfer syntax
PC_BODY = bytes.fromhex("01000000") + ABSTRACT_SYNTAX_ITEM + TRANSFER_SYNTAX_ITEM
PC_ITEM = bytes.fromhex("2000002e") + PC_BODY
# 0x95: user information item 50 00 00 26
MAX_LENGTH_ITEM = bytes.fromhex("51000004 00004000")  # maximum length 16384
IMPL_CLASS_ITEM = bytes.fromhex("5200001a") + IMPL_CLASS_UID  # implementation class UID
USER_INFO_BODY = MAX_LENGTH_ITEM + IMPL_CLASS_ITEM
USER_INFO_ITEM = bytes.fromhex("50000026") + USER_INFO_BODY

ASSOCIATE_RQ = (
    bytes.fromhex("010000 0000b9")  # 00: PDU type 1, reserved, PDU length 185
    + bytes.fromhex("0001 0000")  # 06: protocol version 1, reserved
    + b"ROUTER          "  # 0a: called AE title
    + b"MODALITY        "  # 1a: calling AE title
    + bytes(32)  # 2a: reserved
    + APP_CONTEXT_ITEM  # 4a
    + PC_ITEM  # 63
    + USER_INFO_ITEM  # 95
)
ASSOCIATE_RQ_BODY = ASSOCIATE_RQ[6:]
OFFSET_PC_ITEM = 0x63
OFFSET_USER_INFO_ITEM = 0x95

# -- catalogue B.0: the 80-byte P-DATA-TF carrying a C-ECHO-RQ ----------------------------

ECHO_COMMAND = (
    bytes.fromhex("00000000 04000000 38000000")  # (0000,0000) UL group length 0x38
    + bytes.fromhex("00000200 12000000")  # (0000,0002) UI affected SOP class, 18 bytes
    + VERIFICATION
    + b"\x00"  # UID padded to even length
    + bytes.fromhex("00000001 02000000 3000")  # (0000,0100) command field C-ECHO-RQ
    + bytes.fromhex("00001001 02000000 0100")  # (0000,0110) message ID 1
    + bytes.fromhex("00000008 02000000 0101")  # (0000,0800) no data set
)
ECHO_PDATA = (
    bytes.fromhex("040000 00004a")  # PDU type 4, reserved, PDU length 74
    + bytes.fromhex("00000046")  # PDV item length 70
    + bytes.fromhex("01")  # presentation context ID 1
    + bytes.fromhex("03")  # message control header: command, last fragment
    + ECHO_COMMAND
)

# -- fixed-length PDUs (PS3.8 9.3.4, 9.3.6-9.3.8) ------------------------------------------

RELEASE_RQ = bytes.fromhex("05000000000400000000")
RELEASE_RP = bytes.fromhex("06000000000400000000")


def abort(source: int, reason: int) -> bytes:
    return bytes((7, 0, 0, 0, 0, 4, 0, 0, source, reason))


def reject(result: int, source: int, reason: int) -> bytes:
    return bytes((3, 0, 0, 0, 0, 4, 0, result, source, reason))
