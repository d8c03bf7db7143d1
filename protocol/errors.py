"""Typed errors of the DICOM network library, each carrying its standard meaning.

The hierarchy follows h11: ``ProtocolError`` is never raised itself.
``RemoteProtocolError`` means the peer broke PS3.8/PS3.7; ``LocalProtocolError``
means our own caller asked for something the protocol forbids.
"""

from __future__ import annotations

import enum


class AbortSource(enum.IntEnum):
    """A-ABORT source field, PS3.8 9.3.8 Table 9-26."""

    SERVICE_USER = 0
    RESERVED = 1
    SERVICE_PROVIDER = 2


class AbortReason(enum.IntEnum):
    """A-ABORT reason/diag for a service-provider abort, PS3.8 9.3.8 Table 9-26."""

    NOT_SPECIFIED = 0
    UNRECOGNIZED_PDU = 1
    UNEXPECTED_PDU = 2
    UNRECOGNIZED_PDU_PARAMETER = 4
    UNEXPECTED_PDU_PARAMETER = 5
    INVALID_PDU_PARAMETER_VALUE = 6


class RejectResult(enum.IntEnum):
    """A-ASSOCIATE-RJ result, PS3.8 9.3.4 Table 9-21."""

    PERMANENT = 1
    TRANSIENT = 2


class RejectSource(enum.IntEnum):
    """A-ASSOCIATE-RJ source, PS3.8 9.3.4 Table 9-21."""

    SERVICE_USER = 1
    SERVICE_PROVIDER_ACSE = 2
    SERVICE_PROVIDER_PRESENTATION = 3


class RejectReason:
    """A-ASSOCIATE-RJ reason/diag; the meaning depends on the source (Table 9-21).

    Plain constants, not an enum: the same number means different things per source.
    """

    # source 1 (service-user)
    NO_REASON = 1
    APPLICATION_CONTEXT_NAME_NOT_SUPPORTED = 2
    CALLING_AE_NOT_RECOGNIZED = 3
    CALLED_AE_NOT_RECOGNIZED = 7
    # source 2 (ACSE): 1 no-reason-given, 2 protocol-version-not-supported
    PROTOCOL_VERSION_NOT_SUPPORTED = 2
    # source 3 (presentation): 1 temporary-congestion, 2 local-limit-exceeded
    TEMPORARY_CONGESTION = 1
    LOCAL_LIMIT_EXCEEDED = 2


class ProtocolError(Exception):
    """Base of every error this library raises about the protocol."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class PDUDecodeError(ProtocolError):
    """Bytes that are not a valid PDU, item or sub-item (PS3.8 9.3).

    ``reason`` is the A-ABORT reason that PS3.8 9.3.8 gives to this violation when it
    is found after the association request (ABORT-8(reason)).
    """

    def __init__(
        self, message: str, reason: AbortReason = AbortReason.INVALID_PDU_PARAMETER_VALUE
    ) -> None:
        super().__init__(message)
        self.reason = reason


class RemoteProtocolError(ProtocolError):
    """The peer sent something PS3.8 forbids in the current state."""

    def __init__(self, message: str, reason: AbortReason = AbortReason.UNEXPECTED_PDU) -> None:
        super().__init__(message)
        self.reason = reason


class LocalProtocolError(ProtocolError):
    """Our caller asked for something PS3.8 forbids in the current state."""


class DIMSEError(ProtocolError):
    """A PS3.7 message-level violation inside well-formed P-DATA (answered by ABORT-U)."""


class AssociationRejected(ProtocolError):
    """The peer (or we) refused the association with A-ASSOCIATE-RJ."""

    def __init__(self, result: int, source: int, reason: int) -> None:
        super().__init__(
            f"association rejected: result {result} ({_name(RejectResult, result)}), "
            f"source {source} ({_name(RejectSource, source)}), reason {reason}"
            f" ({describe_reject_reason(source, reason)})"
        )
        self.result = result
        self.source = source
        self.reason = reason


class AssociationAborted(ProtocolError):
    """The association ended by A-ABORT (received, or A-P-ABORT by the provider)."""

    def __init__(self, source: int, reason: int, detail: str = "") -> None:
        text = f"association aborted: source {source} ({_name(AbortSource, source)}), "
        text += f"reason {reason} ({_name(AbortReason, reason)})"
        if detail:
            text += f": {detail}"
        super().__init__(text)
        self.source = source
        self.reason = reason


class NoAcceptableContext(ProtocolError):
    """No accepted presentation context fits the SOP class and transfer syntax asked for."""


class DIMSETimeout(ProtocolError):
    """A DIMSE response did not arrive within its deadline."""


class ConnectionClosed(ProtocolError):
    """The transport closed before the exchange completed."""


_REJECT_REASONS: dict[tuple[int, int], str] = {
    (1, 1): "no-reason-given",
    (1, 2): "application-context-name-not-supported",
    (1, 3): "calling-AE-title-not-recognized",
    (1, 7): "called-AE-title-not-recognized",
    (2, 1): "no-reason-given",
    (2, 2): "protocol-version-not-supported",
    (3, 1): "temporary-congestion",
    (3, 2): "local-limit-exceeded",
}


def describe_reject_reason(source: int, reason: int) -> str:
    """Text of an A-ASSOCIATE-RJ reason for logs (never fails on unknown values)."""
    return _REJECT_REASONS.get((source, reason), "unknown")


def _name(kind: type[enum.IntEnum], value: int) -> str:
    try:
        return kind(value).name.lower().replace("_", "-")
    except ValueError:
        return "unknown"
