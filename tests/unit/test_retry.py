"""The forwarding outcome classifier, backoff and retry policy (workers/retry.py),
table-tested against the catalogue's destination cases (B.8)."""

from __future__ import annotations

import datetime as dt
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import (
    AssociationAborted,
    AssociationRejected,
    ConnectionClosed,
    DIMSETimeout,
    NoAcceptableContext,
)
from workers.retry import (
    Failure,
    Outcome,
    RetryPolicy,
    Verdict,
    backoff,
    classify,
    from_exception,
)

NOW = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("case", "outcome", "verdict"),
    [
        ("success", Outcome(status=0x0000), Verdict.DONE),
        ("DST-13 coercion", Outcome(status=0xB000), Verdict.DONE_WITH_WARNING),
        ("DST-13 elements discarded", Outcome(status=0xB006), Verdict.DONE_WITH_WARNING),
        ("DST-13 does not match", Outcome(status=0xB007), Verdict.DONE_WITH_WARNING),
        ("DST-09 out of resources", Outcome(status=0xA700), Verdict.RETRY),
        ("DST-09 out of resources high", Outcome(status=0xA7FF), Verdict.RETRY),
        ("DST-09 resource limitation", Outcome(status=0x0213), Verdict.RETRY),
        ("processing failure", Outcome(status=0x0110), Verdict.RETRY),
        ("DST-10 data set does not match", Outcome(status=0xA900), Verdict.DEAD),
        ("DST-10 high", Outcome(status=0xA9FF), Verdict.DEAD),
        ("DST-11 cannot understand", Outcome(status=0xC000), Verdict.DEAD),
        ("DST-11 high", Outcome(status=0xCFFF), Verdict.DEAD),
        ("DST-12 SOP class not supported", Outcome(status=0x0122), Verdict.DEAD),
        ("DST-12 not authorised", Outcome(status=0x0124), Verdict.DEAD),
        ("DST-12 invalid object instance", Outcome(status=0x0117), Verdict.DEAD),
        ("DST-12 unrecognised operation", Outcome(status=0x0211), Verdict.DEAD),
        ("DST-12 mistyped argument", Outcome(status=0x0212), Verdict.DEAD),
        ("DST-14 pending", Outcome(status=0xFF00), Verdict.RETRY),
        ("DST-14 cancel", Outcome(status=0xFE00), Verdict.RETRY),
        ("DST-14 undefined", Outcome(status=0x1234), Verdict.RETRY),
        ("DST-01 refused", Outcome(failure=Failure.CONNECTION_REFUSED), Verdict.RETRY),
        ("DST-03 timeout", Outcome(failure=Failure.TIMEOUT), Verdict.RETRY),
        ("DST-04 transient reject", Outcome(failure=Failure.REJECTED_TRANSIENT), Verdict.RETRY),
        ("DST-05 permanent reject", Outcome(failure=Failure.REJECTED_PERMANENT), Verdict.DEAD),
        ("DST-06 context refused", Outcome(failure=Failure.NO_ACCEPTABLE_CONTEXT), Verdict.DEAD),
        ("DST-08 abort", Outcome(failure=Failure.ABORTED), Verdict.RETRY),
        ("DST-18 malformed reply", Outcome(failure=Failure.PROTOCOL_ERROR), Verdict.RETRY),
        ("connection lost", Outcome(failure=Failure.CONNECTION_LOST), Verdict.RETRY),
        ("spool file gone", Outcome(failure=Failure.SPOOL_FILE_MISSING), Verdict.DEAD),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_classification_table(case: str, outcome: Outcome, verdict: Verdict) -> None:
    assert classify(outcome)[0] is verdict


def test_reasons_carry_the_raw_status_and_the_detail() -> None:
    assert classify(Outcome(status=0x1234))[1] == "unexpected status 0x1234"
    reason = classify(Outcome(failure=Failure.REJECTED_PERMANENT, detail="called AE"))[1]
    assert reason == "association rejected (permanent): called AE"


@pytest.mark.parametrize(
    ("exc", "failure"),
    [
        (AssociationRejected(1, 1, 7), Failure.REJECTED_PERMANENT),
        (AssociationRejected(2, 3, 2), Failure.REJECTED_TRANSIENT),
        (NoAcceptableContext("no context"), Failure.NO_ACCEPTABLE_CONTEXT),
        (AssociationAborted(2, 6), Failure.ABORTED),
        (DIMSETimeout("late"), Failure.TIMEOUT),
        (TimeoutError(), Failure.TIMEOUT),
        (ConnectionRefusedError(111, "refused"), Failure.CONNECTION_REFUSED),
        (ConnectionResetError(104, "reset"), Failure.CONNECTION_LOST),
        (ConnectionClosed("closed"), Failure.CONNECTION_LOST),
        (FileNotFoundError(2, "gone"), Failure.SPOOL_FILE_MISSING),
        (ValueError("bug"), Failure.PROTOCOL_ERROR),
    ],
)
def test_exceptions_map_to_failures(exc: BaseException, failure: Failure) -> None:
    assert from_exception(exc).failure is failure


@given(st.integers(1, 200), st.floats(0.1, 60), st.floats(60, 3600), st.integers(0, 2**32))
def test_backoff_stays_between_half_base_and_the_cap(
    attempt: int, base: float, cap: float, seed: int
) -> None:
    delay = backoff(attempt, base, cap, random.Random(seed))
    assert base / 2 <= delay <= max(cap, base / 2)
    assert delay <= max(base * 2 ** (attempt - 1), base / 2)


def test_backoff_ceiling_grows_exponentially_until_the_cap() -> None:
    rng = random.Random(1)
    maxima = [max(backoff(n, 1.0, 100.0, rng) for _ in range(400)) for n in range(1, 10)]
    assert maxima[0] <= 1.0 and 1.5 < maxima[2] <= 4.0 and 50 < maxima[-1] <= 100.0


def test_policy_steps() -> None:
    policy = RetryPolicy(max_attempts=3, max_deliveries=5, base=10, cap=100)
    rng = random.Random(7)
    assert policy.next_step(1, 1, Verdict.DONE, NOW, rng) == ("done", None)
    assert policy.next_step(1, 1, Verdict.DONE_WITH_WARNING, NOW, rng) == ("done", None)
    assert policy.next_step(1, 1, Verdict.DEAD, NOW, rng) == ("dead", None)
    state, when = policy.next_step(1, 1, Verdict.RETRY, NOW, rng)
    assert state == "retry_wait" and when is not None
    assert NOW + dt.timedelta(seconds=5) <= when <= NOW + dt.timedelta(seconds=10)
    assert policy.next_step(3, 3, Verdict.RETRY, NOW, rng) == ("dead", None)  # attempts cap
    assert policy.next_step(1, 5, Verdict.RETRY, NOW, rng) == ("dead", None)  # crashes cap
