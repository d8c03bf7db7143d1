"""Every message the node's processes exchange, as versioned msgpack maps.

ZeroMQ is the fast path, the database the record (DESIGN §3.2): a message only says
"look at row N"; losing one costs latency (the sweeper finds the job again), never data.

Envelope and rules. A message is a msgpack map with ``"v"`` (the major version, an int,
now 1), ``"t"`` (its type, a str) and its fields. ``decode`` refuses with
``MessageError``: bytes that are not one msgpack map, another major version, an unknown
type, a missing required field, or a field of the wrong type (a bool is not an int, text
is a msgpack str, bytes a msgpack bin). Unknown keys are ignored, so a sender of a later
minor revision may add fields; a field added in a minor revision is optional and read
with its default (in brackets below). Revision 1.0: job, hello, credit, lease, bye.
Revision 1.1: hello ``minor`` and ``"all"``, lease ``sop_instance`` and ``expires``,
result, heartbeat, fetch, chunk. Revision 1.2: credit ``done``, ``down`` and ``up``,
chunk ``token``, who. Revision 1.3: lease ``study``. Revision 1.4: hello ``open``,
hello ``pid`` and ``pid_ns``, credit ``closed``. Revision 1.5: lease ``tls``
(``MINOR`` = 5).
Times are seconds since the Unix epoch (UTC), a float (an int is read as one), finite
and not negative.

Listener -> dispatcher (PUSH/PULL), after the instance and its jobs are committed::

    job        {"job": int, "instance": int, "destination": str, "priority": int [0]}
               priority: 0 medium, 1 high, 2 low

Worker (DEALER) <-> dispatcher (ROUTER), over ipc:// on the node's host and tcp:// from
others. A worker says hello with its credit; the dispatcher sends at most that many
leases, one credit each; the worker gives credit back as it finishes. A result counts only
while its token still holds the job's lease (router/db/jobs.py)::

    hello      w -> d  {"worker": str, "destinations": [str, ...] | "all",
                        "credit": uint (leases it can hold), "minor": uint [0],
                        "open": [str, ...] [nil], "pid": uint [0], "pid_ns": str [""]}
                       (nil destinations, as 1.0 wrote them, also mean "all")
                       open (1.4): one destination name per association the worker
                       holds open (a restarted dispatcher learns its count from it);
                       pid, pid_ns (1.4): the worker's process id and PID namespace
                       (/proc/self/ns/pid), so that a dispatcher in the same namespace
                       sees at once that a killed worker is gone
    credit     w -> d  {"credit": uint, "done": [str, ...] [nil], "down": [str, ...] [nil],
                        "up": [str, ...] [nil], "closed": [str, ...] [nil]}: that many
                       more leases; 0 is a keep-alive.
                       done: the destination of each lease given back (the dispatcher
                       caps the leases a worker holds per destination); down / up: the
                       destinations whose last attempt here could not reach them / did
                       (the dispatcher's destination backoff, router/backoff.py);
                       closed (1.4): destinations this worker has leased for and now
                       holds no association to (nor a delivery in progress)
    lease's max_associations: to a 1.4 worker, the associations it may open to the
                       destination (its share of the destination's node-wide limit);
                       to an older one, the destination's limit
    who        d -> w  {}: the dispatcher does not know this worker (it restarted): the
                       worker says hello again, with the credit it has free
    lease      d -> w  {"job": uint, "instance": uint, "destination": str, "ae_title": str,
                        "host": str, "port": uint, "max_associations": uint,
                        "max_retries": uint, "spool_name": str, "transfer_syntax": str,
                        "sop_class": str, "sop_instance": str [""], "token": str,
                        "expires": float [0.0, unknown], "attempts": uint,
                        "deliveries": uint, "study": str [""], "tls": bool [false]}
                       attempts: finished before this lease; deliveries: leases handed out,
                       this one included; expires: when the token stops counting; study:
                       the instance's Study Instance UID ("" unknown), for the worker's
                       audit records (1.3: the worker needs no database read for them);
                       tls (1.5): the destination is set to TLS when the lease was made.
                       The worker still reads the TLS files from the database; a lease
                       saying tls makes it read them at once when what it has cached says
                       clear text (a destination removed and re-added with --tls)
    result     w -> d  {"job": uint, "token": str, "verdict": "done" | "done_with_warning"
                        | "retry" | "dead", "status": uint16 | nil, "error": str,
                        "started": float, "duration_ms": uint}
                       status nil: the attempt ended without one (error says why)
    heartbeat  both    {}: the sender is alive (a worker not heard from loses its leases)
    bye        w -> d  {}: it stops; its leases come back

A worker without the node's filesystem reads a spool file in chunks over the same
socket. The node answers only for a file under a live lease with that token (the names
alone must not open the spool to anyone who can reach the port)::

    fetch      w -> d  {"spool_name": str, "token": str, "offset": uint,
                        "length": 1..MAX_CHUNK}
    chunk      d -> w  {"spool_name": str, "offset": uint, "data": bin (<= MAX_CHUNK bytes),
                        "eof": bool, "error": str [""], "token": str [""]}: error non-empty
                        means no data ("not found", "not leased"); token: the fetch's
                        (1.2), so that two fetches of one file tell their replies apart
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import msgpack

VERSION = 1  # the major version: a message with another "v" is refused
MINOR = 5  # this module's revision within VERSION, announced in hello
MAX_CHUNK = 1 << 20  # bytes per fetch; well under ZeroMQ's message limits
VERDICTS = frozenset({"done", "done_with_warning", "retry", "dead"})  # workers.retry.Verdict


class MessageError(ValueError):
    """Bytes that are not a message this version understands."""


class _Message:
    """Shared encoding: the envelope, then every dataclass field under its own name."""

    __slots__ = ()
    TYPE: ClassVar[str]

    def _fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def encode(self) -> bytes:
        data: bytes = msgpack.packb(
            {"v": VERSION, "t": self.TYPE, **self._fields()}, use_bin_type=True
        )
        return data


@dataclass(frozen=True, slots=True)
class JobMessage(_Message):
    TYPE: ClassVar[str] = "job"
    job: int
    instance: int
    destination: str
    priority: int = 0


@dataclass(frozen=True, slots=True)
class Hello(_Message):
    TYPE: ClassVar[str] = "hello"
    worker: str
    destinations: tuple[str, ...] | None  # None: every destination
    credit: int
    minor: int = MINOR
    open: tuple[str, ...] | None = None  # 1.4
    pid: int = 0  # 1.4 (0: not said)
    pid_ns: str = ""  # 1.4

    def _fields(self) -> dict[str, Any]:
        fields = _Message._fields(self)
        fields["destinations"] = "all" if self.destinations is None else list(self.destinations)
        if self.open is None:
            del fields["open"]
        else:
            fields["open"] = list(self.open)
        return fields


@dataclass(frozen=True, slots=True)
class Credit(_Message):
    TYPE: ClassVar[str] = "credit"
    credit: int
    done: tuple[str, ...] | None = None  # 1.2
    down: tuple[str, ...] | None = None  # 1.2
    up: tuple[str, ...] | None = None  # 1.2
    closed: tuple[str, ...] | None = None  # 1.4

    def _fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"credit": self.credit}
        for name in ("done", "down", "up", "closed"):
            value = getattr(self, name)
            if value is not None:
                fields[name] = list(value)
        return fields


@dataclass(frozen=True, slots=True)
class Who(_Message):
    TYPE: ClassVar[str] = "who"


@dataclass(frozen=True, slots=True)
class LeaseMessage(_Message):
    TYPE: ClassVar[str] = "lease"
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
    sop_instance: str = ""  # 1.1
    expires: float = 0.0  # 1.1; 0.0: not given
    study: str = ""  # 1.3; "": not given
    tls: bool = False  # 1.5; False also when not given


@dataclass(frozen=True, slots=True)
class ResultMessage(_Message):
    TYPE: ClassVar[str] = "result"
    job: int
    token: str
    verdict: str  # one of VERDICTS
    status: int | None  # the DIMSE status, None when the attempt ended without one
    error: str  # reason or error text; "" on plain success
    started: float
    duration_ms: int


@dataclass(frozen=True, slots=True)
class Heartbeat(_Message):
    TYPE: ClassVar[str] = "heartbeat"


@dataclass(frozen=True, slots=True)
class Fetch(_Message):
    TYPE: ClassVar[str] = "fetch"
    spool_name: str
    token: str
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Chunk(_Message):
    TYPE: ClassVar[str] = "chunk"
    spool_name: str
    offset: int
    data: bytes
    eof: bool
    error: str = ""
    token: str = ""  # 1.2


@dataclass(frozen=True, slots=True)
class Bye(_Message):
    TYPE: ClassVar[str] = "bye"


Message = (
    JobMessage
    | Hello
    | Credit
    | Who
    | LeaseMessage
    | ResultMessage
    | Heartbeat
    | Fetch
    | Chunk
    | Bye
)


# -- decoding -----------------------------------------------------------------------------
class _Bad(Exception):
    """A field value that fails its check; decode() names the message and the field."""


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Bad("must be an int")
    return value


def _uint(value: Any) -> int:
    if _int(value) < 0:
        raise _Bad("must not be negative")
    return int(value)


def _status(value: Any) -> int | None:
    if value is not None and not 0 <= _int(value) <= 0xFFFF:
        raise _Bad("must be a 16-bit status or nil")
    return value if value is None else int(value)


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise _Bad("must be a str")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Bad("must be a bool")
    return value


def _time(value: Any) -> float:
    # An int is accepted: a sender in another language may write whole seconds so.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Bad("must be a number")
    if not (math.isfinite(value) and value >= 0):
        raise _Bad("must be finite and not negative")
    return float(value)


def _length(value: Any) -> int:
    if not 1 <= _int(value) <= MAX_CHUNK:
        raise _Bad(f"must be 1..{MAX_CHUNK}")
    return int(value)


def _data(value: Any) -> bytes:
    if not isinstance(value, bytes):
        raise _Bad("must be bin")
    if len(value) > MAX_CHUNK:
        raise _Bad(f"must be at most {MAX_CHUNK} bytes")
    return value


def _verdict(value: Any) -> str:
    if _str(value) not in VERDICTS:
        raise _Bad(f"must be one of {sorted(VERDICTS)}")
    return str(value)


def _names(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, list) and all(isinstance(d, str) for d in value):
        return tuple(value)
    raise _Bad("must be a list of names or nil")


def _destinations(value: Any) -> tuple[str, ...] | None:
    if value is None or value == "all":
        return None
    if isinstance(value, list) and all(isinstance(d, str) for d in value):
        return tuple(value)
    raise _Bad('must be a list of names or "all"')


_Reader = Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class _Optional:
    """A field added in a minor revision: ``default`` when absent (an older sender)."""

    read: _Reader
    default: Any


# Per type: its class and a reader per field (keys are the dataclass field names). Being
# optional on the wire is declared here, not by the dataclass default: hello's ``minor``
# defaults to this revision when built, to 0 (revision 1.0) when absent.
_SCHEMAS: dict[str, tuple[type[_Message], dict[str, _Reader | _Optional]]] = {
    "job": (
        JobMessage,
        {"job": _int, "instance": _int, "destination": _str, "priority": _Optional(_int, 0)},
    ),
    "hello": (
        Hello,
        {
            "worker": _str,
            "destinations": _destinations,
            "credit": _uint,
            "minor": _Optional(_uint, 0),
            "open": _Optional(_names, None),
            "pid": _Optional(_uint, 0),
            "pid_ns": _Optional(_str, ""),
        },
    ),
    "credit": (
        Credit,
        {
            "credit": _uint,
            "done": _Optional(_names, None),
            "down": _Optional(_names, None),
            "up": _Optional(_names, None),
            "closed": _Optional(_names, None),
        },
    ),
    "who": (Who, {}),
    "lease": (
        LeaseMessage,
        {
            "job": _uint,
            "instance": _uint,
            "destination": _str,
            "ae_title": _str,
            "host": _str,
            "port": _uint,
            "max_associations": _uint,
            "max_retries": _uint,
            "spool_name": _str,
            "transfer_syntax": _str,
            "sop_class": _str,
            "token": _str,
            "attempts": _uint,
            "deliveries": _uint,
            "sop_instance": _Optional(_str, ""),
            "expires": _Optional(_time, 0.0),
            "study": _Optional(_str, ""),
            "tls": _Optional(_bool, False),
        },
    ),
    "result": (
        ResultMessage,
        {
            "job": _uint,
            "token": _str,
            "verdict": _verdict,
            "status": _status,
            "error": _str,
            "started": _time,
            "duration_ms": _uint,
        },
    ),
    "heartbeat": (Heartbeat, {}),
    "fetch": (Fetch, {"spool_name": _str, "token": _str, "offset": _uint, "length": _length}),
    "chunk": (
        Chunk,
        {
            "spool_name": _str,
            "offset": _uint,
            "data": _data,
            "eof": _bool,
            "error": _Optional(_str, ""),
            "token": _Optional(_str, ""),
        },
    ),
    "bye": (Bye, {}),
}


def decode(data: bytes) -> Message:
    """The message in ``data``; ``MessageError`` for anything else (see the module doc)."""
    try:
        payload: Any = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise MessageError(f"not a msgpack message: {exc}") from None
    if not isinstance(payload, dict):
        raise MessageError("a message must be a msgpack map")
    version = payload.get("v")
    if not isinstance(version, int) or isinstance(version, bool) or version != VERSION:
        raise MessageError(f"unsupported message version {version!r}")
    kind = payload.get("t")
    schema = _SCHEMAS.get(kind) if isinstance(kind, str) else None
    if schema is None:
        raise MessageError(f"unknown message type {kind!r}")
    cls, readers = schema
    values: dict[str, Any] = {}
    for name, reader in readers.items():
        read = reader.read if isinstance(reader, _Optional) else reader
        if name in payload:
            try:
                values[name] = read(payload[name])
            except _Bad as exc:
                raise MessageError(f"{kind} message field {name!r} {exc}") from None
        elif isinstance(reader, _Optional):
            values[name] = reader.default
        else:
            raise MessageError(f"{kind} message without {name!r}")
    return cast(Message, cls(**values))
