"""What to do after one delivery attempt: a pure classifier, backoff and retry policy.

``classify(outcome)`` turns what one attempt produced into a ``Verdict``; ``RetryPolicy``
turns the verdict and the job's counters into its next state; ``backoff`` picks the wait.
No clock and no randomness inside: both are passed in, so everything here is
table-tested (tests/unit/test_retry.py, catalogue B.8 DST-xx).

DIMSE statuses (C-STORE-RSP, PS3.4 B.2.3 and PS3.7 C)::

    0x0000                               DONE
    0x0001, 0x0107, 0x0116, 0xB000-BFFF  DONE_WITH_WARNING  stored; warning recorded (DST-13)
    0xA700-A7FF, 0x0213                  RETRY  out of resources (DST-09)
    0x0110 processing failure            RETRY  the peer's own trouble (disk, database)
    0x0210 duplicate invocation          RETRY  about the message ID, not the data
    0xA900-A9FF, 0xC000-CFFF             DEAD   the data set is wrong for the peer (DST-10, 11)
    0x0117, 0x0122, 0x0124, 0x0211,      DEAD   instance, SOP class or permission refused:
    0x0212 (DST-12), 0x0111, 0x0112,            the same bytes fail the same way next time
    0x0118, 0x0119, 0x0120, 0x0121
    anything else (0xFF00, 0xFE00, ...)  RETRY  not a C-STORE status (DST-14): a failure,
                                                retried up to max_attempts, raw value logged

Failures without a status::

    connection refused / reset / lost    RETRY  (DST-01, DST-08)
    timeout (TCP, ACSE or DIMSE)         RETRY  (DST-03)
    A-ASSOCIATE-RJ result 2 (transient)  RETRY  (DST-04)
    A-ASSOCIATE-RJ result 1 (permanent)  DEAD   "destination misconfigured" (DST-05); except
                                                source 3 reasons 1/2 (congestion, local
                                                limit), which say "later" whatever the result
    A-ABORT, malformed reply             RETRY  (DST-08, DST-15, DST-18)
    no acceptable presentation context   DEAD   (DST-06, DST-07 without transcoding)
    TLS certificate not verified         DEAD   configuration, never a plain fallback (SEC-15)
    spool file missing                   DEAD   nothing left to send
    worker crashed (lease expired)       RETRY  the deliveries cap dead-letters a poison
                                                instance (FI-08)
    unexpected exception in our code     RETRY  capped like any other retry

Ambiguous cases lean to RETRY: a needless retry costs one attempt out of a bounded
number, a wrong dead letter needs an operator.
"""

from __future__ import annotations

import datetime as dt
import enum
import math
import random
import ssl
from dataclasses import dataclass
from typing import NamedTuple

from protocol.errors import (
    AssociationAborted,
    AssociationRejected,
    ConnectionClosed,
    DIMSETimeout,
    NoAcceptableContext,
    ProtocolError,
    RejectResult,
    RejectSource,
)
from protocol.status import StatusCategory, category, describe


class Verdict(enum.Enum):
    DONE = "done"
    DONE_WITH_WARNING = "done_with_warning"
    RETRY = "retry"
    DEAD = "dead"


class Failure(enum.Enum):
    """Ways an attempt can end without a DIMSE status."""

    CONNECTION_REFUSED = "connection refused"
    CONNECTION_RESET = "connection reset"
    CONNECTION_LOST = "connection lost"
    TIMEOUT = "timeout"
    REJECTED_TRANSIENT = "association rejected (transient)"
    REJECTED_PERMANENT = "association rejected (permanent)"
    ABORTED = "association aborted"
    NO_ACCEPTABLE_CONTEXT = "presentation context not accepted"
    TLS_NOT_VERIFIED = "TLS certificate not verified"
    PROTOCOL_ERROR = "protocol error"
    SPOOL_FILE_MISSING = "spool file missing"
    WORKER_CRASHED = "worker crashed (lease expired)"
    INTERNAL_ERROR = "internal error"


class Reject(NamedTuple):
    """An A-ASSOCIATE-RJ's three fields (PS3.8 9.3.4 Table 9-21)."""

    result: int
    source: int
    reason: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """One attempt's result: a DIMSE status, or a failure with its text.

    ``detail`` is the peer's Error Comment or the exception text; ``reject`` the
    A-ASSOCIATE-RJ fields when the failure is a reject (the decider when present).
    """

    status: int | None = None
    failure: Failure | None = None
    detail: str = ""
    reject: Reject | None = None

    def __post_init__(self) -> None:
        if (self.status is None) == (self.failure is None):
            raise ValueError("an outcome is a status or a failure, exactly one")
        if self.status is not None and not 0 <= self.status <= 0xFFFF:
            raise ValueError(f"DIMSE status out of range: {self.status}")


class Classification(NamedTuple):
    verdict: Verdict
    reason: str  # for the attempt row and the job's last_error


_RETRY_STATUSES = frozenset({0x0110, 0x0210, 0x0213})
_DEAD_STATUSES = frozenset(
    {0x0111, 0x0112, 0x0117, 0x0118, 0x0119, 0x0120, 0x0121, 0x0122, 0x0124, 0x0211, 0x0212}
)
_DEAD_FAILURES = frozenset(
    {
        Failure.REJECTED_PERMANENT,
        Failure.NO_ACCEPTABLE_CONTEXT,
        Failure.TLS_NOT_VERIFIED,
        Failure.SPOOL_FILE_MISSING,
    }
)
# Presentation-layer reject reasons that mean "not now" (temporary congestion, local
# limit exceeded): a peer that pairs them with "permanent" contradicts itself.
_TRANSIENT_REJECT_REASONS = frozenset({1, 2})
_DETAIL_LIMIT = 200  # peer text (Error Comment) is bounded before it reaches the database


def classify(outcome: Outcome, *, retry_on_warning: bool = False) -> Classification:
    """The verdict for one attempt, with a reason fit for the attempts table."""
    if outcome.failure is not None:
        return _classify_failure(outcome, outcome.failure)
    assert outcome.status is not None  # __post_init__: one of the two is set
    return _classify_status(outcome.status, _clip(outcome.detail), retry_on_warning)


def _classify_status(status: int, detail: str, retry_on_warning: bool) -> Classification:
    text = f"0x{status:04X}"
    name = describe(status)
    if not name.endswith(text):  # describe() falls back to "<category> 0xNNNN"
        text += f" {name}"
    text += f": {detail}" if detail else ""
    kind = category(status)
    if kind is StatusCategory.SUCCESS:
        return Classification(Verdict.DONE, "success")
    if kind is StatusCategory.WARNING:
        # retry_on_warning is dcm4chee's dcmRetryOnWarning (DST-13), off by default
        verdict = Verdict.RETRY if retry_on_warning else Verdict.DONE_WITH_WARNING
        return Classification(verdict, f"warning {text}")
    if 0xA700 <= status <= 0xA7FF or status in _RETRY_STATUSES:
        return Classification(Verdict.RETRY, f"status {text}")
    if 0xA900 <= status <= 0xA9FF or 0xC000 <= status <= 0xCFFF or status in _DEAD_STATUSES:
        return Classification(Verdict.DEAD, f"status {text}")
    return Classification(Verdict.RETRY, f"unexpected status {text}")


def _classify_failure(outcome: Outcome, failure: Failure) -> Classification:
    text = f"{failure.value}: {_clip(outcome.detail)}" if outcome.detail else failure.value
    reject = outcome.reject
    if reject is not None:
        if reject.result == RejectResult.TRANSIENT or (
            reject.source == RejectSource.SERVICE_PROVIDER_PRESENTATION
            and reject.reason in _TRANSIENT_REJECT_REASONS
        ):
            return Classification(Verdict.RETRY, text)
        if reject.result == RejectResult.PERMANENT:
            return Classification(Verdict.DEAD, f"destination misconfigured: {text}")
        return Classification(Verdict.RETRY, text)  # an undefined result: malformed RJ
    if failure in _DEAD_FAILURES:
        prefix = "destination misconfigured: " if failure is Failure.REJECTED_PERMANENT else ""
        return Classification(Verdict.DEAD, prefix + text)
    return Classification(Verdict.RETRY, text)


def _clip(text: str) -> str:
    return text if len(text) <= _DETAIL_LIMIT else text[: _DETAIL_LIMIT - 3] + "..."


def from_exception(exc: Exception) -> Outcome:
    """Map what sending raised to an ``Outcome`` (the worker never dies of it).

    Order matters: ``TimeoutError``, ``FileNotFoundError`` and the ``ssl`` errors are
    ``OSError`` subclasses. ``BaseException`` outside ``Exception`` (cancellation,
    KeyboardInterrupt) is not an outcome and must propagate, hence the signature.
    """
    # The reason reads "<failure>: <detail>"; these errors' texts already open with it.
    detail = str(exc).removeprefix("association rejected: ").removeprefix("association aborted: ")
    if isinstance(exc, AssociationRejected):
        reject = Reject(exc.result, exc.source, exc.reason)
        permanent = exc.result == RejectResult.PERMANENT
        failure = Failure.REJECTED_PERMANENT if permanent else Failure.REJECTED_TRANSIENT
        return Outcome(failure=failure, detail=detail, reject=reject)
    kind = _failure_of(exc)
    if kind is Failure.INTERNAL_ERROR or not detail:
        detail = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    return Outcome(failure=kind, detail=detail)


def _failure_of(exc: Exception) -> Failure:
    if isinstance(exc, NoAcceptableContext):
        return Failure.NO_ACCEPTABLE_CONTEXT
    if isinstance(exc, AssociationAborted):
        return Failure.ABORTED
    if isinstance(exc, (DIMSETimeout, TimeoutError)):
        return Failure.TIMEOUT
    if isinstance(exc, ConnectionClosed):
        return Failure.CONNECTION_LOST
    if isinstance(exc, ProtocolError):
        return Failure.PROTOCOL_ERROR  # a malformed or unexpected reply (DST-15, DST-18)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return Failure.TLS_NOT_VERIFIED
    if isinstance(exc, ConnectionRefusedError):
        return Failure.CONNECTION_REFUSED
    if isinstance(exc, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
        return Failure.CONNECTION_RESET
    if isinstance(exc, FileNotFoundError):
        return Failure.SPOOL_FILE_MISSING
    if isinstance(exc, OSError):
        return Failure.CONNECTION_LOST  # unreachable host, DNS failure, other socket errors
    return Failure.INTERNAL_ERROR


def backoff_ceiling(attempt: int, base: float, cap: float) -> float:
    """The most ``backoff`` waits after attempt ``attempt``: base * 2**(attempt-1), capped."""
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    if not (base > 0 and cap > 0 and math.isfinite(base) and math.isfinite(cap)):
        raise ValueError("base and cap must be positive and finite")
    return min(cap, base * 2.0 ** min(attempt - 1, 1000))  # min(): no float overflow


def backoff(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait before attempt ``attempt + 1``.

    "Full jitter" (uniform up to the exponential ceiling) rather than decorrelated
    jitter, because it needs no memory of the previous wait: the job row keeps only
    counters. The draw starts at half the base, not 0, so that attempt 1 waits about
    ``base`` and a flapping destination is not hammered (DST-17); spreading from that
    floor (rather than clamping to it) keeps retries of a burst apart.
    """
    ceiling = backoff_ceiling(attempt, base, cap)
    floor = min(base, cap) / 2
    return rng.uniform(floor, ceiling)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Per-destination limits; validated on construction (cf. rq's ``Retry``)."""

    max_attempts: int = 10  # finished attempts (destinations.max_retries)
    max_deliveries: int = 15  # leases handed out, including those a crash cut short
    base: float = 5.0  # seconds
    cap: float = 600.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.max_deliveries < 1:
            raise ValueError("max_attempts and max_deliveries must be at least 1")
        backoff_ceiling(1, self.base, self.cap)  # validates base and cap

    def exhausted(self, attempts: int, deliveries: int) -> str | None:
        """Why a job that should be retried goes to dead letter instead, or None."""
        if deliveries >= self.max_deliveries:
            crashes = deliveries - attempts
            if crashes > 0:
                return f"worker crashed {crashes} times ({deliveries} deliveries)"
            return f"gave up after {deliveries} deliveries"
        if attempts >= self.max_attempts:
            return f"gave up after {attempts} attempts"
        return None

    def next_step(
        self,
        attempts: int,
        deliveries: int,
        verdict: Verdict,
        now: dt.datetime,
        rng: random.Random,
    ) -> tuple[str, dt.datetime | None]:
        """The job's next state after an attempt: ("done", None), ("retry_wait", when)
        or ("dead", None).

        ``attempts`` counts finished attempts including this one; ``deliveries`` counts
        leases handed out including this one, so ``deliveries - attempts`` is how many
        deliveries a crash cut short. For a lease that expired (``Failure.WORKER_CRASHED``)
        pass ``attempts`` unchanged.
        """
        if attempts < 0 or deliveries < 0:
            raise ValueError("counters cannot be negative")
        if verdict in (Verdict.DONE, Verdict.DONE_WITH_WARNING):
            return "done", None
        if verdict is Verdict.DEAD or self.exhausted(attempts, deliveries) is not None:
            return "dead", None
        delay = backoff(max(attempts, 1), self.base, self.cap, rng)
        return "retry_wait", now + dt.timedelta(seconds=delay)
