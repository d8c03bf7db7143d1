"""The msgpack messages between processes (router/messages.py)."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.messages import JobMessage, MessageError, decode


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
