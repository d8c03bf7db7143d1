"""The msgpack messages between processes (router/messages.py)."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, cast

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.messages import (
    MAX_CHUNK,
    MINOR,
    VERDICTS,
    VERSION,
    Bye,
    Chunk,
    Credit,
    Fetch,
    Heartbeat,
    Hello,
    JobMessage,
    LeaseMessage,
    Message,
    MessageError,
    ResultMessage,
    Who,
    decode,
)


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


# -- the dispatcher <-> worker protocol (revision 1.1) ------------------------------------
uints = st.integers(0, 2**63 - 1)
texts = st.text(max_size=40)
times = st.floats(0, 4e9, allow_nan=False, allow_infinity=False)

every_message: st.SearchStrategy[Message] = st.one_of(
    st.builds(JobMessage, uints, uints, texts, st.integers(-(2**63), 2**63 - 1)),
    st.builds(
        Hello,
        texts,
        st.none() | st.lists(texts, max_size=4).map(tuple),
        uints,
        uints,
    ),
    st.builds(Credit, uints),
    st.builds(
        LeaseMessage,
        job=uints,
        instance=uints,
        destination=texts,
        ae_title=texts,
        host=texts,
        port=st.integers(0, 65535),
        max_associations=uints,
        max_retries=uints,
        spool_name=texts,
        transfer_syntax=texts,
        sop_class=texts,
        token=texts,
        attempts=uints,
        deliveries=uints,
        sop_instance=texts,
        expires=times,
        study=texts,
        tls=st.booleans(),
    ),
    st.builds(
        ResultMessage,
        job=uints,
        token=texts,
        verdict=st.sampled_from(sorted(VERDICTS)),
        status=st.none() | st.integers(0, 0xFFFF),
        error=texts,
        started=times,
        duration_ms=uints,
    ),
    st.just(Heartbeat()),
    st.builds(Fetch, texts, texts, uints, st.integers(1, MAX_CHUNK)),
    st.builds(Chunk, texts, uints, st.binary(max_size=256), st.booleans(), texts),
    st.just(Bye()),
)


@given(every_message)
def test_every_message_round_trips(message: Message) -> None:
    assert decode(message.encode()) == message


@given(every_message)
def test_every_message_is_a_versioned_map_named_by_its_type(message: Message) -> None:
    payload = msgpack.unpackb(message.encode())
    assert payload["v"] == VERSION and payload["t"] == type(message).TYPE


def test_every_documented_type_has_a_class() -> None:
    import router.messages as module

    assert module.__doc__ is not None
    for kind in ("job", "hello", "credit", "lease", "result", "heartbeat", "fetch", "chunk"):
        assert f"\n    {kind} " in module.__doc__
    assert "\n    bye " in module.__doc__


SAMPLES: list[Message] = [
    JobMessage(1, 2, "pacs", 1),
    Hello("w1", ("pacs", "archive"), 8),
    Credit(2),
    LeaseMessage(
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
        sop_instance="1.2.3.4",
        expires=1_790_000_000.5,
        study="1.2.3",
        tls=True,
    ),
    ResultMessage(7, "w:1234", "retry", 0xA700, "out of resources", 1_790_000_000.0, 12),
    ResultMessage(7, "w:1234", "retry", None, "connection refused", 1_790_000_000.0, 3),
    Heartbeat(),
    Fetch("ab/x.dcm", "w:1234", 0, 65536),
    Chunk("ab/x.dcm", 0, b"DICM", True),
    Chunk("ab/x.dcm", 0, b"", True, "not found"),
    Bye(),
    Who(),
    Credit(2, ("pacs", "ai")),
    Credit(1, ("pacs",), down=("pacs",), up=("ai",)),
    Credit(0, closed=("pacs",)),
    Hello("w", ("pacs",), 3, open=("pacs", "pacs"), pid=4242, pid_ns="pid:[4026531836]"),
]
# Fields added in revision 1.1 (or optional from the start) and what their absence means.
ABSENT: dict[tuple[str, str], object] = {
    ("job", "priority"): 0,
    ("hello", "minor"): 0,
    ("lease", "sop_instance"): "",
    ("lease", "expires"): 0.0,
    ("lease", "study"): "",
    ("lease", "tls"): False,
    ("chunk", "error"): "",
    ("chunk", "token"): "",
    ("credit", "done"): None,
    ("credit", "down"): None,
    ("credit", "up"): None,
    ("credit", "closed"): None,
    ("hello", "open"): None,
    ("hello", "pid"): 0,
    ("hello", "pid_ns"): "",
}


def _wire(message: Message) -> dict[str, object]:
    payload: dict[str, object] = msgpack.unpackb(message.encode())
    return payload


def _fields(message: Message) -> list[tuple[Message, str]]:
    return [(m, key) for m in [message] for key in _wire(m) if key not in ("v", "t")]


FIELDS = [pair for message in SAMPLES for pair in _fields(message)]
FIELD_IDS = [f"{m.TYPE}.{key}" for m, key in FIELDS]


@pytest.mark.parametrize(("message", "key"), FIELDS, ids=FIELD_IDS)
def test_a_missing_field_is_refused_unless_optional(message: Message, key: str) -> None:
    payload = _wire(message)
    del payload[key]
    if (message.TYPE, key) in ABSENT:
        expected = dataclasses.replace(cast(Any, message), **{key: ABSENT[message.TYPE, key]})
        assert decode(msgpack.packb(payload)) == expected
    else:
        with pytest.raises(MessageError, match=key):
            decode(msgpack.packb(payload))


@pytest.mark.parametrize(("message", "key"), FIELDS, ids=FIELD_IDS)
@pytest.mark.parametrize("wrong", [{"k": 1}, [b"x"], 1.5, True, b"bin", "text", -1, None])
def test_a_field_of_the_wrong_type_is_refused(message: Message, key: str, wrong: object) -> None:
    payload = _wire(message)
    right = payload[key]
    acceptable = (
        (isinstance(right, str) and isinstance(wrong, str))
        or (key in ("expires", "started") and isinstance(wrong, float))
        or (key in ("eof", "data", "tls") and type(wrong) is type(right))
        or (key in ("priority", "job", "instance") and message.TYPE == "job" and wrong == -1)
        or (
            key in ("destinations", "status", "done", "down", "up", "closed", "open")
            and wrong is None
        )
    )
    if acceptable:
        return  # a valid value for this field
    payload[key] = wrong
    with pytest.raises(MessageError, match=key):
        decode(msgpack.packb(payload, use_bin_type=True))


@pytest.mark.parametrize(("message", "key"), FIELDS, ids=FIELD_IDS)
def test_unknown_keys_are_ignored_by_every_type(message: Message, key: str) -> None:
    payload = _wire(message)
    payload["added_in_1_9"] = {"any": [1, 2]}
    assert decode(msgpack.packb(payload, use_bin_type=True)) == message


@pytest.mark.parametrize(
    "payload",
    [
        {"v": True, "t": "bye"},  # True == 1 in Python, but it is not the int 1
        {"v": "1", "t": "bye"},
        {"v": 2, "t": "heartbeat"},
        {"v": 0, "t": "bye"},
        {"t": "bye"},
        {"v": 1},
        {"v": 1, "t": ["bye"]},
        {"v": 1, "t": b"bye"},
        {"v": 1, "t": "hello", "worker": "w", "destinations": ["a", 1], "credit": 1},
        {"v": 1, "t": "hello", "worker": "w", "destinations": "ALL", "credit": 1},
        {"v": 1, "t": "credit", "credit": -1},
        {
            "v": 1,
            "t": "result",
            "job": 1,
            "token": "t",
            "verdict": "maybe",
            "status": 0,
            "error": "",
            "started": 0.0,
            "duration_ms": 0,
        },
        {
            "v": 1,
            "t": "result",
            "job": 1,
            "token": "t",
            "verdict": "done",
            "status": 0x10000,
            "error": "",
            "started": 0.0,
            "duration_ms": 0,
        },
        {
            "v": 1,
            "t": "result",
            "job": 1,
            "token": "t",
            "verdict": "done",
            "status": -1,
            "error": "",
            "started": 0.0,
            "duration_ms": 0,
        },
        {
            "v": 1,
            "t": "result",
            "job": 1,
            "token": "t",
            "verdict": "done",
            "status": 0,
            "error": "",
            "started": float("nan"),
            "duration_ms": 0,
        },
        {
            "v": 1,
            "t": "result",
            "job": 1,
            "token": "t",
            "verdict": "done",
            "status": 0,
            "error": "",
            "started": float("inf"),
            "duration_ms": 0,
        },
        {"v": 1, "t": "fetch", "spool_name": "a", "token": "t", "offset": 0, "length": 0},
        {
            "v": 1,
            "t": "fetch",
            "spool_name": "a",
            "token": "t",
            "offset": 0,
            "length": MAX_CHUNK + 1,
        },
        {"v": 1, "t": "fetch", "spool_name": "a", "token": "t", "offset": -1, "length": 1},
        {
            "v": 1,
            "t": "chunk",
            "spool_name": "a",
            "offset": 0,
            "data": b"x" * (MAX_CHUNK + 1),
            "eof": True,
        },
        {"v": 1, "t": "chunk", "spool_name": "a", "offset": 0, "data": b"x", "eof": 1},
    ],
)
def test_malformed_worker_messages_are_refused(payload: object) -> None:
    with pytest.raises(MessageError):
        decode(msgpack.packb(payload, use_bin_type=True))


def test_text_where_bytes_belong_is_refused() -> None:
    # use_bin_type=False writes bytes as msgpack str: chunk data must be bin
    data = msgpack.packb(
        {"v": 1, "t": "chunk", "spool_name": "a", "offset": 0, "data": b"x", "eof": True},
        use_bin_type=False,
    )
    with pytest.raises(MessageError, match="data"):
        decode(data)


def test_revision_1_0_messages_still_read() -> None:
    hello = {"v": 1, "t": "hello", "worker": "w", "destinations": None, "credit": 4}
    assert decode(msgpack.packb(hello)) == Hello("w", None, 4, minor=0)
    lease = _wire(SAMPLES[3])
    del lease["sop_instance"], lease["expires"], lease["study"], lease["tls"]
    read = decode(msgpack.packb(lease))
    assert isinstance(read, LeaseMessage) and read.sop_instance == "" and read.expires == 0.0


def test_hello_says_all_on_the_wire() -> None:
    assert _wire(Hello("w", None, 1))["destinations"] == "all"
    assert _wire(Hello("w", None, 1))["minor"] == MINOR


def test_whole_seconds_read_as_float() -> None:
    payload = _wire(SAMPLES[4])
    payload["started"] = 1_790_000_000
    read = decode(msgpack.packb(payload))
    assert isinstance(read, ResultMessage) and read.started == 1_790_000_000.0


@pytest.mark.parametrize(
    "data",
    [
        b"",
        msgpack.packb({"v": 1, "t": "bye"}) + b"\x00",  # trailing bytes
        msgpack.packb({1: 1, "v": 1, "t": "bye"}),  # non-str key
        b"\x91" * 5000 + b"\xc0",  # deep nesting
        b"\xd9\xff" + b"x" * 3,  # str shorter than announced
        b"\x81\xa1v\xd9\x02\xc3\x28",  # invalid UTF-8 in a str
    ],
)
def test_broken_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(MessageError):
        decode(data)


@given(every_message, st.data())
def test_mutated_messages_raise_only_message_error(message: Message, data: st.DataObject) -> None:
    encoded = bytearray(message.encode())
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(encoded) - 1))
        encoded[index] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(encoded)))
    with contextlib.suppress(MessageError):
        decode(bytes(encoded[:cut]))


def test_every_schema_reads_exactly_its_dataclass_fields() -> None:
    from router.messages import _SCHEMAS

    for kind, (cls, readers) in _SCHEMAS.items():
        assert kind == cls.TYPE
        assert set(readers) == {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]


def test_result_verdicts_are_the_classifier_verdicts() -> None:
    from workers.retry import Verdict

    assert {verdict.value for verdict in Verdict} == VERDICTS
