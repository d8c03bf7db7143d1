"""The forwarding outcome classifier, backoff and retry policy (workers/retry.py),
table-tested against the catalogue's destination cases (B.8 DST-xx)."""

from __future__ import annotations

import datetime as dt
import random
import ssl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import (
    AssociationAborted,
    AssociationRejected,
    ConnectionClosed,
    DIMSEError,
    DIMSETimeout,
    NoAcceptableContext,
    PDUDecodeError,
    RemoteProtocolError,
)
from workers.retry import (
    Failure,
    Outcome,
    Reject,
    RetryPolicy,
    Verdict,
    backoff,
    backoff_ceiling,
    classify,
    from_exception,
)

NOW = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.UTC)
DONE, WARN, RETRY, DEAD = (
    Verdict.DONE,
    Verdict.DONE_WITH_WARNING,
    Verdict.RETRY,
    Verdict.DEAD,
)

STATUS_TABLE = [
    ("success", 0x0000, DONE),
    ("DST-13 coercion", 0xB000, WARN),
    ("DST-13 elements discarded", 0xB006, WARN),
    ("DST-13 does not match", 0xB007, WARN),
    ("warning 0xBFFF", 0xBFFF, WARN),
    ("general warning 0x0001", 0x0001, WARN),
    ("attribute list error", 0x0107, WARN),
    ("attribute value out of range", 0x0116, WARN),
    ("DST-09 out of resources", 0xA700, RETRY),
    ("DST-09 out of resources 0xA7FF", 0xA7FF, RETRY),
    ("DST-09 resource limitation", 0x0213, RETRY),
    ("processing failure", 0x0110, RETRY),
    ("duplicate invocation", 0x0210, RETRY),
    ("DST-10 data set does not match", 0xA900, DEAD),
    ("DST-10 0xA9FF", 0xA9FF, DEAD),
    ("DST-11 cannot understand", 0xC000, DEAD),
    ("DST-11 0xCFFF", 0xCFFF, DEAD),
    ("DST-12 SOP class not supported", 0x0122, DEAD),
    ("DST-12 not authorised", 0x0124, DEAD),
    ("DST-12 invalid object instance", 0x0117, DEAD),
    ("DST-12 unrecognised operation", 0x0211, DEAD),
    ("DST-12 mistyped argument", 0x0212, DEAD),
    ("duplicate SOP instance", 0x0111, DEAD),
    ("no such SOP instance", 0x0112, DEAD),
    ("no such SOP class", 0x0118, DEAD),
    ("class-instance conflict", 0x0119, DEAD),
    ("missing attribute", 0x0120, DEAD),
    ("missing attribute value", 0x0121, DEAD),
    ("DST-14 pending", 0xFF00, RETRY),
    ("DST-14 pending warning", 0xFF01, RETRY),
    ("DST-14 cancel", 0xFE00, RETRY),
    ("DST-14 undefined", 0x1234, RETRY),
    ("undefined A-range 0xA800", 0xA800, RETRY),
    ("boundary below A7xx", 0xA6FF, RETRY),
    ("boundary above C-range", 0xD000, RETRY),
]


@pytest.mark.parametrize(
    ("case", "status", "verdict"), STATUS_TABLE, ids=[c[0] for c in STATUS_TABLE]
)
def test_status_table(case: str, status: int, verdict: Verdict) -> None:
    assert classify(Outcome(status=status)).verdict is verdict


FAILURE_TABLE = [
    ("DST-01 refused", Outcome(failure=Failure.CONNECTION_REFUSED), RETRY),
    ("DST-01 unreachable", Outcome(failure=Failure.CONNECTION_LOST), RETRY),
    ("DST-08 reset mid-transfer", Outcome(failure=Failure.CONNECTION_RESET), RETRY),
    ("DST-03 timeout", Outcome(failure=Failure.TIMEOUT), RETRY),
    ("DST-04 transient, no fields", Outcome(failure=Failure.REJECTED_TRANSIENT), RETRY),
    (
        "DST-04 local limit exceeded (2, 3, 2)",
        Outcome(failure=Failure.REJECTED_TRANSIENT, reject=Reject(2, 3, 2)),
        RETRY,
    ),
    (
        "DST-04 congestion (2, 3, 1)",
        Outcome(failure=Failure.REJECTED_TRANSIENT, reject=Reject(2, 3, 1)),
        RETRY,
    ),
    (
        "transient with a configuration reason (2, 1, 7): the result decides",
        Outcome(failure=Failure.REJECTED_TRANSIENT, reject=Reject(2, 1, 7)),
        RETRY,
    ),
    ("DST-05 permanent, no fields", Outcome(failure=Failure.REJECTED_PERMANENT), DEAD),
    (
        "DST-05 called AE not recognised (1, 1, 7)",
        Outcome(failure=Failure.REJECTED_PERMANENT, reject=Reject(1, 1, 7)),
        DEAD,
    ),
    (
        "DST-05 calling AE not recognised (1, 1, 3)",
        Outcome(failure=Failure.REJECTED_PERMANENT, reject=Reject(1, 1, 3)),
        DEAD,
    ),
    (
        "DST-05 protocol version (1, 2, 2)",
        Outcome(failure=Failure.REJECTED_PERMANENT, reject=Reject(1, 2, 2)),
        DEAD,
    ),
    (
        "permanent but congestion (1, 3, 1): the reason says later",
        Outcome(failure=Failure.REJECTED_PERMANENT, reject=Reject(1, 3, 1)),
        RETRY,
    ),
    (
        "permanent but local limit (1, 3, 2)",
        Outcome(failure=Failure.REJECTED_PERMANENT, reject=Reject(1, 3, 2)),
        RETRY,
    ),
    (
        "DST-18 undefined reject result (3, 1, 1)",
        Outcome(failure=Failure.REJECTED_TRANSIENT, reject=Reject(3, 1, 1)),
        RETRY,
    ),
    ("DST-06 abstract syntax refused", Outcome(failure=Failure.NO_ACCEPTABLE_CONTEXT), DEAD),
    ("DST-07 transfer syntax refused", Outcome(failure=Failure.NO_ACCEPTABLE_CONTEXT), DEAD),
    ("DST-08 abort", Outcome(failure=Failure.ABORTED), RETRY),
    ("DST-15 / DST-18 malformed reply", Outcome(failure=Failure.PROTOCOL_ERROR), RETRY),
    ("SEC-15 certificate not verified", Outcome(failure=Failure.TLS_NOT_VERIFIED), DEAD),
    ("spool file gone", Outcome(failure=Failure.SPOOL_FILE_MISSING), DEAD),
    ("FI-08 worker crashed", Outcome(failure=Failure.WORKER_CRASHED), RETRY),
    ("bug in the sender", Outcome(failure=Failure.INTERNAL_ERROR), RETRY),
]


@pytest.mark.parametrize(
    ("case", "outcome", "verdict"), FAILURE_TABLE, ids=[c[0] for c in FAILURE_TABLE]
)
def test_failure_table(case: str, outcome: Outcome, verdict: Verdict) -> None:
    assert classify(outcome).verdict is verdict


def test_every_failure_kind_is_in_the_table() -> None:
    assert {outcome.failure for _, outcome, _ in FAILURE_TABLE} == set(Failure)


def test_warnings_are_retried_only_when_asked() -> None:  # DST-13's dcmRetryOnWarning
    assert classify(Outcome(status=0xB000), retry_on_warning=True).verdict is RETRY
    assert classify(Outcome(status=0x0000), retry_on_warning=True).verdict is DONE


@pytest.mark.parametrize(
    ("outcome", "reason"),
    [
        (Outcome(status=0x0000), "success"),
        (Outcome(status=0x1234), "unexpected status 0x1234"),
        (Outcome(status=0xFF00), "unexpected status 0xFF00 Pending"),
        (Outcome(status=0xB006), "warning 0xB006 Elements discarded"),
        (
            Outcome(status=0xA701, detail="disk full"),
            "status 0xA701 Refused: out of resources: disk full",
        ),
        (Outcome(failure=Failure.TIMEOUT), "timeout"),
        (
            Outcome(failure=Failure.REJECTED_PERMANENT, detail="called AE"),
            "destination misconfigured: association rejected (permanent): called AE",
        ),
    ],
)
def test_reasons_carry_the_raw_status_and_the_detail(outcome: Outcome, reason: str) -> None:
    assert classify(outcome).reason == reason


def test_peer_text_is_bounded_in_the_reason() -> None:
    reason = classify(Outcome(status=0xC000, detail="x" * 10_000)).reason
    assert len(reason) < 300 and reason.endswith("...")


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"status": 0, "failure": Failure.TIMEOUT}, {"status": -1}, {"status": 0x10000}],
)
def test_an_outcome_is_exactly_one_valid_thing(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Outcome(**kwargs)  # type: ignore[arg-type]


EXCEPTION_TABLE: list[tuple[Exception, Failure, Verdict]] = [
    (AssociationRejected(1, 1, 7), Failure.REJECTED_PERMANENT, DEAD),  # DST-05
    (AssociationRejected(1, 1, 3), Failure.REJECTED_PERMANENT, DEAD),  # DST-05
    (AssociationRejected(1, 2, 2), Failure.REJECTED_PERMANENT, DEAD),  # DST-05
    (AssociationRejected(1, 3, 1), Failure.REJECTED_PERMANENT, RETRY),
    (AssociationRejected(2, 3, 2), Failure.REJECTED_TRANSIENT, RETRY),  # DST-04
    (AssociationRejected(2, 3, 1), Failure.REJECTED_TRANSIENT, RETRY),  # DST-04
    (NoAcceptableContext("no context"), Failure.NO_ACCEPTABLE_CONTEXT, DEAD),  # DST-06/07
    (AssociationAborted(0, 0), Failure.ABORTED, RETRY),  # DST-08, user abort
    (AssociationAborted(2, 6), Failure.ABORTED, RETRY),  # DST-08, provider abort
    (DIMSETimeout("late"), Failure.TIMEOUT, RETRY),  # DST-03
    (TimeoutError(), Failure.TIMEOUT, RETRY),  # DST-03 (asyncio.TimeoutError too)
    (ConnectionRefusedError(111, "refused"), Failure.CONNECTION_REFUSED, RETRY),  # DST-01
    (OSError(113, "no route to host"), Failure.CONNECTION_LOST, RETRY),  # DST-01
    (ConnectionResetError(104, "reset"), Failure.CONNECTION_RESET, RETRY),
    (BrokenPipeError(32, "pipe"), Failure.CONNECTION_RESET, RETRY),
    (ConnectionClosed("closed"), Failure.CONNECTION_LOST, RETRY),
    (DIMSEError("wrong MessageIDBeingRespondedTo"), Failure.PROTOCOL_ERROR, RETRY),  # DST-15
    (PDUDecodeError("bad AC"), Failure.PROTOCOL_ERROR, RETRY),  # DST-18
    (RemoteProtocolError("unexpected PDU"), Failure.PROTOCOL_ERROR, RETRY),  # DST-18
    (ssl.SSLCertVerificationError("hostname mismatch"), Failure.TLS_NOT_VERIFIED, DEAD),
    (FileNotFoundError(2, "gone"), Failure.SPOOL_FILE_MISSING, DEAD),
    (ValueError("bug"), Failure.INTERNAL_ERROR, RETRY),
]


@pytest.mark.parametrize(
    ("exc", "failure", "verdict"), EXCEPTION_TABLE, ids=[repr(e[0]) for e in EXCEPTION_TABLE]
)
def test_exceptions_map_to_failures(exc: Exception, failure: Failure, verdict: Verdict) -> None:
    outcome = from_exception(exc)
    assert outcome.failure is failure and outcome.status is None
    assert classify(outcome).verdict is verdict


def test_a_reject_keeps_its_fields_and_reads_once() -> None:
    outcome = from_exception(AssociationRejected(1, 1, 7))
    assert outcome.reject == Reject(1, 1, 7)
    reason = classify(outcome).reason
    assert reason.count("association rejected") == 1 and "called-AE-title-not-recognized" in reason


def test_an_internal_error_names_its_type() -> None:
    assert classify(from_exception(KeyError("k"))).reason == "internal error: KeyError: 'k'"
    assert from_exception(TimeoutError()).detail == "TimeoutError"


# -- backoff -------------------------------------------------------------------------------
bases = st.floats(0.01, 60)
caps = st.floats(0.01, 3600)


@given(st.integers(1, 10_000), bases, caps, st.integers(0, 2**32))
def test_backoff_stays_between_its_floor_and_its_ceiling(
    attempt: int, base: float, cap: float, seed: int
) -> None:
    ceiling = backoff_ceiling(attempt, base, cap)
    delay = backoff(attempt, base, cap, random.Random(seed))
    assert min(base, cap) / 2 <= delay <= ceiling <= cap
    assert ceiling <= base * 2 ** min(attempt - 1, 100)


@given(st.integers(1, 2000), st.integers(1, 2000), bases, caps)
def test_the_ceiling_grows_with_the_attempt_until_the_cap(
    a: int, b: int, base: float, cap: float
) -> None:
    low, high = sorted((a, b))
    assert backoff_ceiling(low, base, cap) <= backoff_ceiling(high, base, cap)
    step = backoff_ceiling(low + 1, base, cap)
    assert step == pytest.approx(min(cap, 2 * backoff_ceiling(low, base, cap)))


def test_attempt_one_waits_about_base_and_draws_are_spread() -> None:
    rng = random.Random(3)
    draws = [backoff(1, 10.0, 600.0, rng) for _ in range(200)]
    assert all(5.0 <= d <= 10.0 for d in draws)
    assert len(set(draws)) == len(draws)  # no clumping on the floor: no retry storm (DST-17)
    late = [backoff(30, 10.0, 600.0, rng) for _ in range(200)]
    assert max(late) <= 600.0 and min(late) >= 5.0  # bounded by the cap (DST-17)


def test_backoff_is_deterministic_for_a_seed() -> None:
    first = [backoff(n, 1.0, 100.0, random.Random(9)) for n in range(1, 12)]
    assert first == [backoff(n, 1.0, 100.0, random.Random(9)) for n in range(1, 12)]


@pytest.mark.parametrize(
    ("attempt", "base", "cap"),
    [
        (0, 1.0, 10.0),
        (1, 0.0, 10.0),
        (1, 1.0, 0.0),
        (1, float("nan"), 10.0),
        (1, 1.0, float("inf")),
    ],
)
def test_backoff_refuses_nonsense(attempt: int, base: float, cap: float) -> None:
    with pytest.raises(ValueError):
        backoff(attempt, base, cap, random.Random(0))


# -- policy --------------------------------------------------------------------------------
POLICY = RetryPolicy(max_attempts=3, max_deliveries=5, base=10, cap=100)


def test_finished_verdicts_end_the_job() -> None:
    rng = random.Random(7)
    assert POLICY.next_step(1, 1, DONE, NOW, rng) == ("done", None)
    assert POLICY.next_step(1, 1, WARN, NOW, rng) == ("done", None)
    assert POLICY.next_step(1, 1, DEAD, NOW, rng) == ("dead", None)
    # a success on the last allowed delivery still counts
    assert POLICY.next_step(3, 5, DONE, NOW, rng) == ("done", None)


def test_a_retry_waits_within_the_backoff_bounds() -> None:
    rng = random.Random(7)
    state, when = POLICY.next_step(1, 1, RETRY, NOW, rng)
    assert state == "retry_wait" and when is not None
    assert NOW + dt.timedelta(seconds=5) <= when <= NOW + dt.timedelta(seconds=10)
    state, when = POLICY.next_step(2, 2, RETRY, NOW, rng)
    assert state == "retry_wait" and when is not None
    assert when <= NOW + dt.timedelta(seconds=20)


def test_max_attempts_reached_is_dead() -> None:  # DST-01: retried, then dead-lettered
    assert POLICY.next_step(3, 3, RETRY, NOW, random.Random(0)) == ("dead", None)
    assert POLICY.exhausted(3, 3) == "gave up after 3 attempts"
    assert POLICY.exhausted(2, 2) is None


def test_deliveries_over_max_is_dead_worker_crashed() -> None:  # FI-08 poison instance
    crashed = classify(Outcome(failure=Failure.WORKER_CRASHED)).verdict
    assert POLICY.next_step(1, 4, crashed, NOW, random.Random(0))[0] == "retry_wait"
    assert POLICY.next_step(1, 5, crashed, NOW, random.Random(0)) == ("dead", None)
    assert POLICY.exhausted(1, 5) == "worker crashed 4 times (5 deliveries)"
    # a crash before any attempt finished still waits the first backoff step
    state, when = POLICY.next_step(0, 1, crashed, NOW, random.Random(0))
    assert state == "retry_wait" and when is not None and when <= NOW + dt.timedelta(seconds=10)


@given(
    st.integers(0, 20),
    st.integers(0, 20),
    st.sampled_from(list(Verdict)),
    st.integers(0, 2**32),
)
def test_policy_properties(attempts: int, deliveries: int, verdict: Verdict, seed: int) -> None:
    state, when = POLICY.next_step(attempts, deliveries, verdict, NOW, random.Random(seed))
    if verdict in (DONE, WARN):
        assert state == "done"
    elif verdict is DEAD or attempts >= 3 or deliveries >= 5:
        assert state == "dead"
    else:
        assert state == "retry_wait"
    assert (when is not None) == (state == "retry_wait")
    if when is not None:
        assert NOW < when <= NOW + dt.timedelta(seconds=100)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"max_deliveries": 0},
        {"base": 0.0},
        {"cap": -1.0},
        {"base": float("nan")},
    ],
)
def test_policy_validates_on_construction(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_policy_refuses_negative_counters() -> None:
    with pytest.raises(ValueError):
        POLICY.next_step(-1, 0, RETRY, NOW, random.Random(0))
