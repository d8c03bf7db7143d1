"""Every message the node's processes exchange, as versioned msgpack maps.

ZeroMQ is the fast path, the database the record (DESIGN §3.2): a message only says
"look at row N"; losing one costs latency (the sweeper finds the job again), never data.
Each message is a msgpack map with at least ``"v"`` (the schema version, an int) and
``"t"`` (the type, a str). Unknown keys are ignored, so a newer sender can add fields;
a message with a different major version or an unknown type is refused with
``MessageError``.

``job`` (v 1), listener -> dispatcher, after the instance and its jobs are committed::

    {"v": 1, "t": "job", "job": <int job id>, "instance": <int instance id>,
     "destination": <str destination name>, "priority": <int, 0 medium, 1 high, 2 low>}

Between a worker (ZeroMQ DEALER) and the dispatcher (ROUTER); the worker writes each
result to the database itself, under its lease (router/db/jobs.py)::

    hello   worker -> dispatcher  {"v": 1, "t": "hello", "worker": <str id>,
                                   "destinations": <list of str, or None for all>,
                                   "credit": <int: how many leases it can hold>}
    credit  worker -> dispatcher  {"v": 1, "t": "credit", "credit": <int more leases>}
    lease   dispatcher -> worker  {"v": 1, "t": "lease", "job": <int>, "instance": <int>,
                                   "destination": <str>, "ae_title": <str>, "host": <str>,
                                   "port": <int>, "max_associations": <int>,
                                   "max_retries": <int>, "spool_name": <str>,
                                   "transfer_syntax": <str>, "sop_class": <str>,
                                   "token": <str>, "attempts": <int>, "deliveries": <int>}
    bye     worker -> dispatcher  {"v": 1, "t": "bye"}: it stops; its leases come back
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

VERSION = 1


class MessageError(ValueError):
    """Bytes that are not a message this version understands."""


@dataclass(frozen=True, slots=True)
class JobMessage:
    job: int
    instance: int
    destination: str
    priority: int = 0

    def encode(self) -> bytes:
        payload = {
            "v": VERSION,
            "t": "job",
            "job": self.job,
            "instance": self.instance,
            "destination": self.destination,
            "priority": self.priority,
        }
        data: bytes = msgpack.packb(payload, use_bin_type=True)
        return data


@dataclass(frozen=True, slots=True)
class Hello:
    worker: str
    destinations: tuple[str, ...] | None
    credit: int

    def encode(self) -> bytes:
        destinations = None if self.destinations is None else list(self.destinations)
        return _pack(
            {
                "t": "hello",
                "worker": self.worker,
                "destinations": destinations,
                "credit": self.credit,
            }
        )


@dataclass(frozen=True, slots=True)
class Credit:
    credit: int

    def encode(self) -> bytes:
        return _pack({"t": "credit", "credit": self.credit})


@dataclass(frozen=True, slots=True)
class Bye:
    def encode(self) -> bytes:
        return _pack({"t": "bye"})


@dataclass(frozen=True, slots=True)
class LeaseMessage:
    job: int
    instance: int
    destination: str
    ae_title: str
    host: str
    port: int
    max_associations: int
    max_retries: int
    spool_name: str
    transfer_syntax: str
    sop_class: str
    token: str
    attempts: int
    deliveries: int

    def encode(self) -> bytes:
        payload: dict[str, Any] = {"t": "lease"}
        for name in self.__dataclass_fields__:
            payload[name] = getattr(self, name)
        return _pack(payload)


Message = JobMessage | Hello | Credit | Bye | LeaseMessage


def _pack(payload: dict[str, Any]) -> bytes:
    data: bytes = msgpack.packb({"v": VERSION, **payload}, use_bin_type=True)
    return data


def decode(data: bytes) -> Message:
    try:
        payload: Any = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        raise MessageError(f"not a msgpack message: {exc}") from None
    if not isinstance(payload, dict):
        raise MessageError("a message must be a msgpack map")
    if payload.get("v") != VERSION:
        raise MessageError(f"unsupported message version {payload.get('v')!r}")
    kind = payload.get("t")
    if kind == "job":
        return _job(payload)
    if kind == "hello":
        destinations = payload.get("destinations")
        if destinations is not None and not (
            isinstance(destinations, list) and all(isinstance(d, str) for d in destinations)
        ):
            raise MessageError("hello destinations must be a list of names or null")
        return Hello(
            _field(payload, "worker", str),
            None if destinations is None else tuple(destinations),
            _field(payload, "credit", int),
        )
    if kind == "credit":
        return Credit(_field(payload, "credit", int))
    if kind == "bye":
        return Bye()
    if kind == "lease":
        values = {}
        for name, kind_of in _LEASE_FIELDS.items():
            values[name] = _field(payload, name, kind_of)
        return LeaseMessage(**values)
    raise MessageError(f"unknown message type {kind!r}")


_LEASE_FIELDS: dict[str, type] = {
    "job": int,
    "instance": int,
    "destination": str,
    "ae_title": str,
    "host": str,
    "port": int,
    "max_associations": int,
    "max_retries": int,
    "spool_name": str,
    "transfer_syntax": str,
    "sop_class": str,
    "token": str,
    "attempts": int,
    "deliveries": int,
}


def _field(payload: dict[str, Any], name: str, kind: type) -> Any:
    if name not in payload:
        raise MessageError(f"{payload.get('t')} message without {name!r}")
    value = payload[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MessageError(f"{payload.get('t')} message field {name!r} has the wrong type")
    return value


def _job(payload: dict[str, Any]) -> JobMessage:
    try:
        job, instance = payload["job"], payload["instance"]
        destination, priority = payload["destination"], payload.get("priority", 0)
    except KeyError as exc:
        raise MessageError(f"job message without {exc.args[0]!r}") from None
    if not (isinstance(job, int) and isinstance(instance, int) and isinstance(destination, str)):
        raise MessageError("job message with fields of the wrong type")
    if not isinstance(priority, int):
        raise MessageError("job message priority must be an int")
    return JobMessage(job, instance, destination, priority)
