"""Well-known UIDs used by the network library (PS3.6 Annex A, PS3.7 A.2)."""

from __future__ import annotations

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"  # DICOM Application Context Name, PS3.7 A.2.1
VERIFICATION = "1.2.840.10008.1.1"

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"

UNCOMPRESSED_TRANSFER_SYNTAXES = (EXPLICIT_VR_LE, IMPLICIT_VR_LE, EXPLICIT_VR_BE)

#: Our implementation's identity in the user-information item (PS3.7 D.3.3.2).
IMPLEMENTATION_CLASS_UID = "2.25.49822190292275954317295855062961126802"
IMPLEMENTATION_VERSION_NAME = "DICOMROUTER_01"

_UID_CHARS = frozenset("0123456789.")


def is_valid_uid(uid: str) -> bool:
    """PS3.5 9.1: digits and dots, at most 64 characters, no empty or leading-zero component."""
    if not uid or len(uid) > 64 or not set(uid) <= _UID_CHARS:
        return False
    for component in uid.split("."):
        if not component or (len(component) > 1 and component[0] == "0"):
            return False
    return True
