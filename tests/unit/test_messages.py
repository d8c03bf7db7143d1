"""The msgpack messages between processes (router/messages.py)."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.messages import Bye, Credit, Hello, JobMessage, LeaseMessage, MessageError, decode


@given(
    st.integers(0, 2**62),
    st.integers(0, 2**62),
    st.text(max_size=64),
    st.integers(0, 2),
)
def test_job_round_trip(job: int, instance: int, destination: str, priority: int) -> None:
    message = JobMessage(job, instance, destination, priority)
    assert decode(message.encode()) == message


def test_unknown_keys_are_ignored() -> None:
    data = msgpack.packb(
        {"v": 1, "t": "job", "job": 1, "instance": 2, "destination": "a", "new": 3}
    )
    assert decode(data) == JobMessage(1, 2, "a")


@pytest.mark.parametrize(
    "payload",
    [
        {"v": 2, "t": "job", "job": 1, "instance": 2, "destination": "a"},
        {"v": 1, "t": "nope"},
        {"v": 1, "t": "job", "instance": 2, "destination": "a"},
        {"v": 1, "t": "job", "job": "1", "instance": 2, "destination": "a"},
        [1, 2, 3],
    ],
)
def test_bad_messages_are_refused(payload: object) -> None:
    with pytest.raises(MessageError):
        decode(msgpack.packb(payload))


@given(st.binary(max_size=64))
def test_arbitrary_bytes_raise_only_message_error(data: bytes) -> None:
    with contextlib.suppress(MessageError):
        decode(data)


@given(
    st.text(max_size=40),
    st.none() | st.lists(st.text(max_size=20), max_size=4).map(tuple),
    st.integers(0, 1000),
)
def test_hello_round_trip(worker: str, destinations: tuple[str, ...] | None, credit: int) -> None:
    message = Hello(worker, destinations, credit)
    assert decode(message.encode()) == message


def test_credit_bye_and_lease_round_trip() -> None:
    lease = LeaseMessage(
        job=7,
        instance=3,
        destination="pacs",
        ae_title="PACS",
        host="10.0.0.5",
        port=104,
        max_associations=2,
        max_retries=10,
        spool_name="ab/" + "a" * 32 + ".dcm",
        transfer_syntax="1.2.840.10008.1.2.1",
        sop_class="1.2.840.10008.5.1.4.1.1.2",
        token="w:1234",
        attempts=1,
        deliveries=2,
    )
    for message in (Credit(3), Bye(), lease):
        assert decode(message.encode()) == message


@pytest.mark.parametrize(
    "payload",
    [
        {"v": 1, "t": "hello", "worker": "w", "destinations": "pacs", "credit": 1},
        {"v": 1, "t": "hello", "worker": "w", "destinations": None, "credit": True},
        {"v": 1, "t": "credit"},
        {"v": 1, "t": "lease", "job": 1},
    ],
)
def test_bad_worker_messages_are_refused(payload: object) -> None:
    with pytest.raises(MessageError):
        decode(msgpack.packb(payload))
