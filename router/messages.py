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

The dispatcher/worker messages are added here by the forwarding issue.
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


def decode(data: bytes) -> JobMessage:
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
    raise MessageError(f"unknown message type {kind!r}")


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
