"""DIMSE status codes and their categories (PS3.7 Annex C, PS3.4 B.2.3).

A status is the US value of (0000,0900) in a response. Its *category* decides what a
sender does next (DESIGN §3.4): success and warning complete a job, out-of-resources is
retried, the other failures are final.
"""

from __future__ import annotations

import enum


class StatusCategory(enum.Enum):
    """The status types of PS3.7 C.1 (Table C-1)."""

    SUCCESS = "success"
    WARNING = "warning"
    FAILURE = "failure"
    CANCEL = "cancel"
    PENDING = "pending"


# -- success and the general statuses of PS3.7 C.4 / C.5 ------------------------------------
SUCCESS = 0x0000
#: PS3.7 C.1: 0001H is a warning (e.g. "requested optional attributes are not supported").
WARNING_0001 = 0x0001
ATTRIBUTE_LIST_ERROR = 0x0107  # warning (PS3.7 C.4.2)
ATTRIBUTE_VALUE_OUT_OF_RANGE = 0x0116  # warning (PS3.7 C.4.3)
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111
NO_SUCH_SOP_INSTANCE = 0x0112
INVALID_OBJECT_INSTANCE = 0x0117
NO_SUCH_SOP_CLASS = 0x0118
CLASS_INSTANCE_CONFLICT = 0x0119
MISSING_ATTRIBUTE = 0x0120
MISSING_ATTRIBUTE_VALUE = 0x0121
SOP_CLASS_NOT_SUPPORTED = 0x0122
NOT_AUTHORIZED = 0x0124
DUPLICATE_INVOCATION = 0x0210
UNRECOGNIZED_OPERATION = 0x0211
MISTYPED_ARGUMENT = 0x0212
RESOURCE_LIMITATION = 0x0213
CANCEL = 0xFE00
PENDING = 0xFF00
PENDING_WARNING = 0xFF01  # pending, optional keys not supported (C-FIND)

# -- C-STORE specific (PS3.4 B.2.3, Table B.2-1) --------------------------------------------
COERCION_OF_DATA_ELEMENTS = 0xB000
ELEMENTS_DISCARDED = 0xB006
DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007
OUT_OF_RESOURCES = 0xA700  # A7xx: "Refused: Out of Resources"
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # A9xx: "Error: Data Set does not match SOP Class"
CANNOT_UNDERSTAND = 0xC000  # Cxxx: "Error: Cannot understand"

# General statuses whose category is not implied by the high nibble (PS3.7 C.4).
_GENERAL_WARNINGS = frozenset({WARNING_0001, ATTRIBUTE_LIST_ERROR, ATTRIBUTE_VALUE_OUT_OF_RANGE})

_NAMES: dict[int, str] = {
    SUCCESS: "Success",
    WARNING_0001: "Warning",
    ATTRIBUTE_LIST_ERROR: "Attribute list error",
    ATTRIBUTE_VALUE_OUT_OF_RANGE: "Attribute value out of range",
    PROCESSING_FAILURE: "Processing failure",
    DUPLICATE_SOP_INSTANCE: "Duplicate SOP Instance",
    NO_SUCH_SOP_INSTANCE: "No such SOP Instance",
    INVALID_OBJECT_INSTANCE: "Invalid object instance",
    NO_SUCH_SOP_CLASS: "No such SOP Class",
    CLASS_INSTANCE_CONFLICT: "Class-instance conflict",
    MISSING_ATTRIBUTE: "Missing attribute",
    MISSING_ATTRIBUTE_VALUE: "Missing attribute value",
    SOP_CLASS_NOT_SUPPORTED: "SOP Class not supported",
    NOT_AUTHORIZED: "Not authorized",
    DUPLICATE_INVOCATION: "Duplicate invocation",
    UNRECOGNIZED_OPERATION: "Unrecognized operation",
    MISTYPED_ARGUMENT: "Mistyped argument",
    RESOURCE_LIMITATION: "Resource limitation",
    CANCEL: "Cancel",
    PENDING: "Pending",
    PENDING_WARNING: "Pending (optional keys not supported)",
    COERCION_OF_DATA_ELEMENTS: "Coercion of data elements",
    ELEMENTS_DISCARDED: "Elements discarded",
    DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING: "Data set does not match SOP Class (warning)",
}


def category(status: int) -> StatusCategory:
    """The status type of a DIMSE status (PS3.7 C.1). Unknown codes count as failure.

    Warning: 0001H, Bxxx, 0107H, 0116H. Failure: Axxx, Cxxx and the other 01xx/02xx
    general statuses. Cancel: FE00H. Pending: FF00H, FF01H.
    """
    if status == SUCCESS:
        return StatusCategory.SUCCESS
    if status in _GENERAL_WARNINGS or 0xB000 <= status <= 0xBFFF:
        return StatusCategory.WARNING
    if status == CANCEL:
        return StatusCategory.CANCEL
    if status in (PENDING, PENDING_WARNING):
        return StatusCategory.PENDING
    # Anything else, including codes no standard defines, is not a success: treating an
    # unknown status as a failure never loses an instance a peer did not store.
    return StatusCategory.FAILURE


def is_out_of_resources(status: int) -> bool:
    """A7xx (C-STORE "Refused: Out of Resources") and 0213H: transient, worth a retry."""
    return 0xA700 <= status <= 0xA7FF or status == RESOURCE_LIMITATION


def describe(status: int) -> str:
    """A short text for logs (never fails)."""
    name = _NAMES.get(status)
    if name is not None:
        return name
    if 0xA700 <= status <= 0xA7FF:
        return "Refused: out of resources"
    if 0xA900 <= status <= 0xA9FF:
        return "Error: data set does not match SOP Class"
    if 0xC000 <= status <= 0xCFFF:
        return "Error: cannot understand"
    if 0xB000 <= status <= 0xBFFF:
        return "Warning"
    return f"{category(status).value} 0x{status:04X}"
