"""What to do after one delivery attempt: a pure classifier, backoff and retry policy.

The forwarding issue's rules, with the catalogue's destination cases (B.8 DST-xx):
success and 0xBxxx warnings complete the job; out-of-resources, transport failures,
timeouts, transient association rejects and aborts are retried with exponential backoff
and jitter up to a per-destination maximum; data-set and SOP-class failures, permanent
rejects and a refused presentation context are dead-lettered at once. Deliveries (leases
handed out) are counted separately, so an instance whose sending crashes the worker is
dead-lettered after N deliveries even though no attempt ever finished. No clock and no
randomness inside: both are passed in.
"""

from __future__ import annotations

import datetime as dt
import enum
import random
from dataclasses import dataclass

from protocol.errors import (
    AssociationAborted,
    AssociationRejected,
    ConnectionClosed,
    DIMSETimeout,
    NoAcceptableContext,
    ProtocolError,
    RejectResult,
)
from protocol.status import StatusCategory, category


class Verdict(enum.Enum):
    DONE = "done"
    DONE_WITH_WARNING = "done_with_warning"
    RETRY = "retry"
    DEAD = "dead"


class Failure(enum.Enum):
    """Ways an attempt can end without a DIMSE status."""

    CONNECTION_REFUSED = "connection refused"
    CONNECTION_LOST = "connection lost"
    TIMEOUT = "timeout"
    REJECTED_TRANSIENT = "association rejected (transient)"
    REJECTED_PERMANENT = "association rejected (permanent)"
    ABORTED = "association aborted"
    NO_ACCEPTABLE_CONTEXT = "presentation context not accepted"
    PROTOCOL_ERROR = "protocol error"
    SPOOL_FILE_MISSING = "spool file missing"


@dataclass(frozen=True, slots=True)
class Outcome:
    """One attempt's result: a DIMSE status, or a failure with its text."""

    status: int | None = None
    failure: Failure | None = None
    detail: str = ""


# Failure statuses that are worth another try (PS3.4 B.2.3 / PS3.7 C): the destination
# is short of resources or failed for its own reasons; everything else in the failure
# range says the data or the configuration is wrong and will be wrong again.
_RETRYABLE_FAILURES = frozenset({0x0110, 0x0213})
_DEAD_FAILURES = frozenset({0x0117, 0x0122, 0x0124, 0x0210, 0x0211, 0x0212})


def classify(outcome: Outcome) -> tuple[Verdict, str]:
    """The verdict for one attempt, with a reason fit for the attempts table."""
    if outcome.failure is not None:
        if outcome.failure in (
            Failure.REJECTED_PERMANENT,
            Failure.NO_ACCEPTABLE_CONTEXT,
            Failure.SPOOL_FILE_MISSING,
        ):
            return Verdict.DEAD, _text(outcome)  # DST-05, DST-06/07: misconfigured
        return Verdict.RETRY, _text(outcome)  # DST-01, 03, 04, 08, 18
    status = outcome.status
    if status is None:
        return Verdict.RETRY, "no status"
    kind = category(status)
    if kind is StatusCategory.SUCCESS:
        return Verdict.DONE, "success"
    if kind is StatusCategory.WARNING:
        return Verdict.DONE_WITH_WARNING, f"warning 0x{status:04X}"  # DST-13
    if 0xA700 <= status <= 0xA7FF or status in _RETRYABLE_FAILURES:
        return Verdict.RETRY, f"status 0x{status:04X}"  # DST-09
    if 0xA900 <= status <= 0xA9FF or 0xC000 <= status <= 0xCFFF or status in _DEAD_FAILURES:
        return Verdict.DEAD, f"status 0x{status:04X}"  # DST-10, 11, 12
    # Pending, cancel or a value C-STORE does not define (DST-14): a failure, retried up
    # to the limit, and logged with the raw value.
    return Verdict.RETRY, f"unexpected status 0x{status:04X}"


def _text(outcome: Outcome) -> str:
    assert outcome.failure is not None
    return f"{outcome.failure.value}: {outcome.detail}" if outcome.detail else outcome.failure.value


def from_exception(exc: BaseException) -> Outcome:
    """Map what sending raised to an ``Outcome`` (the worker never crashes on it)."""
    detail = str(exc)
    if isinstance(exc, AssociationRejected):
        permanent = exc.result == RejectResult.PERMANENT
        failure = Failure.REJECTED_PERMANENT if permanent else Failure.REJECTED_TRANSIENT
        return Outcome(failure=failure, detail=detail)
    if isinstance(exc, NoAcceptableContext):
        return Outcome(failure=Failure.NO_ACCEPTABLE_CONTEXT, detail=detail)
    if isinstance(exc, AssociationAborted):
        return Outcome(failure=Failure.ABORTED, detail=detail)
    if isinstance(exc, (DIMSETimeout, TimeoutError)):
        return Outcome(failure=Failure.TIMEOUT, detail=detail)
    if isinstance(exc, ConnectionRefusedError):
        return Outcome(failure=Failure.CONNECTION_REFUSED, detail=detail)
    if isinstance(exc, FileNotFoundError):
        return Outcome(failure=Failure.SPOOL_FILE_MISSING, detail=detail)
    if isinstance(exc, (ConnectionClosed, ConnectionError, OSError)):
        return Outcome(failure=Failure.CONNECTION_LOST, detail=detail)
    if isinstance(exc, ProtocolError):
        return Outcome(failure=Failure.PROTOCOL_ERROR, detail=detail)
    return Outcome(failure=Failure.PROTOCOL_ERROR, detail=f"{type(exc).__name__}: {detail}")


def backoff(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait before attempt ``attempt + 1``: "full jitter" exponential backoff
    (uniform in [0, min(cap, base * 2**(attempt-1))]), with a floor of base / 2 so that a
    flapping destination is not hammered (catalogue DST-17)."""
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    ceiling = min(cap, base * 2 ** min(attempt - 1, 62))
    return max(base / 2, rng.uniform(0, ceiling))


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 10  # per destination (destinations.max_retries)
    max_deliveries: int = 15  # leases handed out, including those a crash cut short
    base: float = 5.0  # seconds
    cap: float = 600.0

    def next_step(
        self,
        attempts: int,
        deliveries: int,
        verdict: Verdict,
        now: dt.datetime,
        rng: random.Random,
    ) -> tuple[str, dt.datetime | None]:
        """The job's next state after attempt number ``attempts``: ("done", None),
        ("retry_wait", when) or ("dead", None)."""
        if verdict in (Verdict.DONE, Verdict.DONE_WITH_WARNING):
            return "done", None
        if verdict is Verdict.DEAD:
            return "dead", None
        if attempts >= self.max_attempts or deliveries >= self.max_deliveries:
            return "dead", None
        delay = backoff(attempts, self.base, self.cap, rng)
        return "retry_wait", now + dt.timedelta(seconds=delay)
