"""The audit trail: security-relevant events as DICOM audit records (PS3.15 A.5).

One pure function per event kind builds an ``AuditRecord``; ``AuditLog`` appends it as
one JSON object per line to ``<data dir>/audit/audit.jsonl`` (mode 0600, ``O_APPEND``,
one ``write()`` per batch of lines, so the node's processes may write at once) and, when
``[audit] syslog`` names a target, also sends it to syslog. Writing never fails the
caller: a C-STORE or a forward goes on when the disk does not take the record (one
warning until writes succeed again).

A record carries the A.5.1 message's parts under their schema names, plus ``event``
(our short name, for filtering)::

    {"event": "instance-received",
     "EventIdentification": {"EventID": CODE, "EventActionCode": "C",
         "EventDateTime": "2025-01-02T03:04:05.678Z", "EventOutcomeIndicator": 0,
         "EventOutcomeDescription": "...", "EventTypeCode": [CODE]},
     "ActiveParticipant": [{"UserID": "CT1", "AlternativeUserID": "AETITLES=CT1",
         "UserIsRequestor": true, "RoleIDCode": CODE,
         "NetworkAccessPointTypeCode": 2, "NetworkAccessPointID": "10.0.0.7"}, ...],
     "AuditSourceIdentification": {"AuditSourceID": HOST, "AuditSourceTypeCode": CODE},
     "ParticipantObjectIdentification": [{"ParticipantObjectID": STUDY_UID, ...}]}

where CODE is ``{"csd-code", "codeSystemName", "originalText"}``. The events and the
A.5.3 message each follows:

=======================  ===================================  ======  ===================
event                    EventID                              action  EventTypeCode
=======================  ===================================  ======  ===================
association-accepted     110113 Security Alert (A.5.3.11)     E       110126 Node Auth.
association-refused      110113 Security Alert                E       110126 Node Auth.
operation-refused        110113 Security Alert                E       110132 Restricted
authentication-failure   110114 User Authentication (.12)     E       110122 Login
instance-received        110104 DICOM Instances Transferred   C / R
instance-forwarded       110104 DICOM Instances Transferred   R
configuration-changed    110113 Security Alert                E       110128 / 110129 /
                                                                      110131
application-start/-stop  110100 Application Activity (.1)     E       110120 / 110121
audit-log-used           110101 Audit Log Used (.2)           R
=======================  ===================================  ======  ===================

Outcomes (EventOutcomeIndicator): 0 success, 4 minor failure (a refusal: the defence
worked), 8 serious failure (an instance given up on), 12 major failure (unused). No
patient data (DESIGN §9): objects are named by UIDs and by the node's own configuration;
A.5.3.7's Patient participant object is left out on purpose (join on the Study UID).
"""

from __future__ import annotations

import datetime as dt
import functools
import getpass
import ipaddress
import json
import logging
import logging.handlers
import os
import re
import socket
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.errors import AssociationRejected, RejectReason, RejectSource
from protocol.net import AssociationInfo
from protocol.pdu import AAssociateRJ

log = logging.getLogger(__name__)

SUCCESS = 0
MINOR_FAILURE = 4
SERIOUS_FAILURE = 8
MAJOR_FAILURE = 12
OUTCOMES = {
    SUCCESS: "success",
    MINOR_FAILURE: "minor failure",
    SERIOUS_FAILURE: "serious failure",
    MAJOR_FAILURE: "major failure",
}


@functools.cache
def hostname() -> str:
    """This host's name: the AuditSourceID and the node's NetworkAccessPointID."""
    return socket.gethostname() or "localhost"


@dataclass(frozen=True, slots=True)
class Code:
    """A coded value (A.5.1 CodedValueType)."""

    code: str
    system: str
    meaning: str

    def as_dict(self) -> dict[str, str]:
        return {"csd-code": self.code, "codeSystemName": self.system, "originalText": self.meaning}


def _dcm(code: str, meaning: str) -> Code:
    return Code(code, "DCM", meaning)


# EventID (CID 400)
APPLICATION_ACTIVITY = _dcm("110100", "Application Activity")
AUDIT_LOG_USED = _dcm("110101", "Audit Log Used")
INSTANCES_TRANSFERRED = _dcm("110104", "DICOM Instances Transferred")
SECURITY_ALERT = _dcm("110113", "Security Alert")
USER_AUTHENTICATION = _dcm("110114", "User Authentication")
# EventTypeCode (CID 401, CID 403)
APPLICATION_START = _dcm("110120", "Application Start")
APPLICATION_STOP = _dcm("110121", "Application Stop")
LOGIN = _dcm("110122", "Login")
NODE_AUTHENTICATION = _dcm("110126", "Node Authentication")
NETWORK_CONFIGURATION = _dcm("110128", "Network Configuration")
SECURITY_CONFIGURATION = _dcm("110129", "Security Configuration")
SOFTWARE_CONFIGURATION = _dcm("110131", "Software Configuration")
RESTRICTED_FUNCTION = _dcm("110132", "Use of Restricted Function")
# RoleIDCode (CID 402)
APPLICATION = _dcm("110150", "Application")
DESTINATION_ROLE = _dcm("110152", "Destination Role ID")
SOURCE_ROLE = _dcm("110153", "Source Role ID")
# ParticipantObjectIDTypeCode
STUDY_INSTANCE_UID = _dcm("110180", "Study Instance UID")
NODE_ID = _dcm("110182", "Node ID")
URI = Code("12", "RFC-3881", "URI")
#: AuditSourceTypeCode 4: an application server process (RFC 3881).
APPLICATION_SERVER = Code("4", "DCM", "Application Server Process")

# ParticipantObjectTypeCode and ParticipantObjectTypeCodeRole (RFC 3881)
SYSTEM_OBJECT = 2
ROLE_REPORT = 3  # what A.5.3.7 names for a study
ROLE_SECURITY_RESOURCE = 13
ROLE_DATA_DESTINATION = 16
ROLE_JOB = 20
ROLE_ROUTING_CRITERIA = 23

#: What each kind of configuration is, as the object of a configuration-changed record:
#: (EventTypeCode, ParticipantObjectTypeCodeRole).
CONFIGURATION_KINDS = {
    "destination": (NETWORK_CONFIGURATION, ROLE_DATA_DESTINATION),
    "source": (SECURITY_CONFIGURATION, ROLE_SECURITY_RESOURCE),
    "user": (SECURITY_CONFIGURATION, ROLE_SECURITY_RESOURCE),
    "rule": (SOFTWARE_CONFIGURATION, ROLE_ROUTING_CRITERIA),
    "queue": (SOFTWARE_CONFIGURATION, ROLE_JOB),
}

EVENTS = (
    "association-accepted",
    "association-refused",
    "operation-refused",
    "authentication-failure",
    "instance-received",
    "instance-forwarded",
    "configuration-changed",
    "application-start",
    "application-stop",
    "audit-log-used",
)


@dataclass(frozen=True, slots=True)
class Participant:
    """An ActiveParticipant: a process, an application entity or a person."""

    user_id: str
    requestor: bool
    role: Code | None = None
    ae_titles: tuple[str, ...] = ()
    user_name: str = ""
    address: str = ""  # NetworkAccessPointID: an IP address or a host name

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"UserID": self.user_id}
        if self.ae_titles:
            out["AlternativeUserID"] = "AETITLES=" + ";".join(self.ae_titles)
        if self.user_name:
            out["UserName"] = self.user_name
        out["UserIsRequestor"] = self.requestor
        if self.role is not None:
            out["RoleIDCode"] = self.role.as_dict()
        if self.address:
            out["NetworkAccessPointTypeCode"] = 2 if _is_ip(self.address) else 1
            out["NetworkAccessPointID"] = self.address
        return out


@dataclass(frozen=True, slots=True)
class ParticipantObject:
    """A ParticipantObjectIdentification: a study, a node, a piece of configuration."""

    object_id: str
    id_type: Code
    type_code: int = SYSTEM_OBJECT
    role: int | None = None
    name: str = ""  # ParticipantObjectName
    details: tuple[tuple[str, str], ...] = ()  # ParticipantObjectDetail type/value pairs
    #: SOPClass: (SOP Class UID, the SOP Instance UIDs of that class).
    sop_classes: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ParticipantObjectID": self.object_id,
            "ParticipantObjectTypeCode": self.type_code,
        }
        if self.role is not None:
            out["ParticipantObjectTypeCodeRole"] = self.role
        out["ParticipantObjectIDTypeCode"] = self.id_type.as_dict()
        if self.name:
            out["ParticipantObjectName"] = self.name
        if self.details:
            out["ParticipantObjectDetail"] = [{"type": t, "value": v} for t, v in self.details]
        if self.sop_classes:
            out["SOPClass"] = [
                {
                    "UID": uid,
                    "NumberOfInstances": len(instances),
                    "Instance": [{"UID": i} for i in instances],
                }
                for uid, instances in self.sop_classes
            ]
        return out


@dataclass(frozen=True, slots=True)
class AuditRecord:
    event: str  # one of EVENTS
    event_id: Code
    action: str  # EventActionCode: C, R, U, D, E
    outcome: int  # EventOutcomeIndicator: 0, 4, 8, 12
    participants: tuple[Participant, ...]
    objects: tuple[ParticipantObject, ...] = ()
    type_codes: tuple[Code, ...] = ()
    description: str = ""  # EventOutcomeDescription
    when: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    source_id: str = field(default_factory=lambda: hostname())

    def as_dict(self) -> dict[str, Any]:
        identification: dict[str, Any] = {
            "EventID": self.event_id.as_dict(),
            "EventActionCode": self.action,
            "EventDateTime": _utc_text(self.when),
            "EventOutcomeIndicator": self.outcome,
        }
        if self.description:
            identification["EventOutcomeDescription"] = self.description
        if self.type_codes:
            identification["EventTypeCode"] = [c.as_dict() for c in self.type_codes]
        out: dict[str, Any] = {
            "event": self.event,
            "EventIdentification": identification,
            "ActiveParticipant": [p.as_dict() for p in self.participants],
            "AuditSourceIdentification": {
                "AuditSourceID": self.source_id,
                "AuditSourceTypeCode": APPLICATION_SERVER.as_dict(),
            },
        }
        if self.objects:
            out["ParticipantObjectIdentification"] = [o.as_dict() for o in self.objects]
        return out

    def to_json(self) -> str:
        """One line: ASCII only (json escapes the rest, newlines included)."""
        return json.dumps(self.as_dict(), separators=(",", ":"))


# -- the participants ----------------------------------------------------------------------
def this_process(
    ae_title: str, *, requestor: bool = False, role: Code | None = None
) -> Participant:
    """The node's own process: its process id (A.5.2.1) and the AE title it acts as."""
    return Participant(
        str(os.getpid()), requestor, role, (ae_title,) if ae_title else (), address=hostname()
    )


def peer_ae(
    ae_title: str, address: str, *, requestor: bool, role: Code | None = None, name: str = ""
) -> Participant:
    """A remote application entity, known by its AE title and network address."""
    return Participant(
        ae_title or address, requestor, role, (ae_title,) if ae_title else (), name, address
    )


def operator() -> Participant:
    """The person running a command: login@host (A.5.2.1)."""
    try:
        login = getpass.getuser()
    except (KeyError, OSError):  # no user database entry and no LOGNAME/USER
        login = f"uid {os.getuid()}"
    return Participant(f"{login}@{hostname()}", True, address=hostname())


def _node(address: str, details: Sequence[tuple[str, str]]) -> ParticipantObject:
    return ParticipantObject(address, NODE_ID, details=tuple(details))


# -- the events ------------------------------------------------------------------------------
def association_accepted(
    *, local_ae: str, calling_ae: str, called_ae: str, peer_host: str, contexts: int = 0
) -> AuditRecord:
    alert = f"association accepted: calling AE {calling_ae!r}, called AE {called_ae!r}, "
    alert += f"{contexts} presentation context(s)"
    return AuditRecord(
        "association-accepted",
        SECURITY_ALERT,
        "E",
        SUCCESS,
        (
            peer_ae(calling_ae, peer_host, requestor=True),
            this_process(local_ae),
        ),
        (_node(peer_host, [("Alert Description", alert)]),),
        (NODE_AUTHENTICATION,),
    )


def association_refused(
    *,
    local_ae: str,
    calling_ae: str,
    called_ae: str,
    peer_host: str,
    result: int,
    source: int,
    reason: int,
) -> AuditRecord:
    """An A-ASSOCIATE-RJ sent; the description is the reject's standard meaning."""
    refusal = str(AssociationRejected(result, source, reason))
    alert = f"{refusal}; calling AE {calling_ae!r}, called AE {called_ae!r}"
    return AuditRecord(
        "association-refused",
        SECURITY_ALERT,
        "E",
        MINOR_FAILURE,
        (
            peer_ae(calling_ae, peer_host, requestor=True),
            this_process(local_ae),
        ),
        (_node(peer_host, [("Alert Description", alert)]),),
        (NODE_AUTHENTICATION,),
        description=refusal,
    )


def operation_refused(
    *, local_ae: str, calling_ae: str, peer_host: str, operation: str, contexts: int
) -> AuditRecord:
    """A known source proposed presentation contexts for an operation it is not allowed
    (catalogue SEC-05): they were answered with result 1, user-rejection (PS3.8
    9.3.3.2), while the association and the contexts it may use were accepted."""
    alert = (
        f"calling AE {calling_ae!r} may not {operation}: "
        f"{contexts} presentation context(s) rejected (user-rejection)"
    )
    return AuditRecord(
        "operation-refused",
        SECURITY_ALERT,
        "E",
        MINOR_FAILURE,
        (peer_ae(calling_ae, peer_host, requestor=True), this_process(local_ae)),
        (_node(peer_host, [("Alert Description", alert)]),),
        (RESTRICTED_FUNCTION,),
        description=alert,
    )


def tls_refused(*, local_ae: str, peer_host: str, reason: str) -> AuditRecord:
    """A TLS handshake that failed (a plain or old-TLS peer, a client certificate
    missing, untrusted or expired, no handshake in time): the association was refused
    before any A-ASSOCIATE-RQ (Security Alert, Node Authentication; SEC-10, SEC-13)."""
    alert = f"TLS handshake failed: {reason}"
    return AuditRecord(
        "association-refused",
        SECURITY_ALERT,
        "E",
        MINOR_FAILURE,
        (peer_ae("", peer_host, requestor=True), this_process(local_ae)),
        (_node(peer_host, [("Alert Description", alert)]),),
        (NODE_AUTHENTICATION,),
        description=alert,
    )


def is_authentication_failure(source: int, reason: int) -> bool:
    """A reject that says who the requestor is was not accepted (calling AE title not a
    known source, from that address): a failed authentication, beside the refusal."""
    return source == RejectSource.SERVICE_USER and reason == RejectReason.CALLING_AE_NOT_RECOGNIZED


def authentication_failure(
    *, local_ae: str, calling_ae: str, peer_host: str, why: str, username: str | None = None
) -> AuditRecord:
    claimed = peer_ae(calling_ae, peer_host, requestor=True)
    if username:
        claimed = Participant(username, True, None, claimed.ae_titles, address=peer_host)
    return AuditRecord(
        "authentication-failure",
        USER_AUTHENTICATION,
        "E",
        MINOR_FAILURE,
        (claimed, this_process(local_ae)),
        type_codes=(LOGIN,),
        description=why,
    )


def _study(
    study_uid: str | None, sop_class_uid: str, sop_instance_uid: str
) -> tuple[ParticipantObject, ...]:
    if not study_uid:
        return ()
    return (
        ParticipantObject(
            study_uid,
            STUDY_INSTANCE_UID,
            role=ROLE_REPORT,
            sop_classes=((sop_class_uid, (sop_instance_uid,)),),
        ),
    )


def instance_received(
    *,
    calling_ae: str,
    called_ae: str,
    peer_host: str,
    study_uid: str | None,
    sop_class_uid: str,
    sop_instance_uid: str,
    duplicate: bool = False,
) -> AuditRecord:
    """An instance stored and committed (its C-STORE answered success). ``duplicate``:
    the same bytes were already held, nothing new was made (action R, not C)."""
    return AuditRecord(
        "instance-received",
        INSTANCES_TRANSFERRED,
        "R" if duplicate else "C",
        SUCCESS,
        (
            peer_ae(calling_ae, peer_host, requestor=True, role=SOURCE_ROLE),
            this_process(called_ae, role=DESTINATION_ROLE),
        ),
        _study(study_uid, sop_class_uid, sop_instance_uid),
        description="already held: the same bytes again" if duplicate else "",
    )


def instance_forwarded(
    *,
    calling_ae: str,
    destination: str,
    ae_title: str,
    host: str,
    study_uid: str | None,
    sop_class_uid: str,
    sop_instance_uid: str,
    delivered: bool,
    description: str = "",
) -> AuditRecord:
    """A job's end: sent to ``destination`` (success, warnings included), or given up
    on (dead letter: serious failure)."""
    return AuditRecord(
        "instance-forwarded",
        INSTANCES_TRANSFERRED,
        "R",  # the audit source is the sender (A.5.3.7)
        SUCCESS if delivered else SERIOUS_FAILURE,
        (
            this_process(calling_ae, requestor=True, role=SOURCE_ROLE),
            peer_ae(ae_title, host, requestor=False, role=DESTINATION_ROLE, name=destination),
        ),
        _study(study_uid, sop_class_uid, sop_instance_uid),
        description=description,
    )


def configuration_changed(
    kind: str, action: str, name: str, *, summary: str = "", user: Participant | None = None
) -> AuditRecord:
    """``kind`` is a key of CONFIGURATION_KINDS (destination, source, rule, queue);
    ``action`` what was done (add, remove, enable, disable, retry, purge)."""
    type_code, role = CONFIGURATION_KINDS[kind]
    alert = f"{kind} {name}: {action}" + (f" ({summary})" if summary else "")
    return AuditRecord(
        "configuration-changed",
        SECURITY_ALERT,
        "E",
        SUCCESS,
        (user or operator(),),
        (
            ParticipantObject(
                f"dicom-router:{kind}/{name}",
                URI,
                role=role,
                details=(("Alert Description", alert), ("Action", action)),
            ),
        ),
        (type_code,),
    )


def application_activity(*, started: bool, ae_title: str) -> AuditRecord:
    return AuditRecord(
        "application-start" if started else "application-stop",
        APPLICATION_ACTIVITY,
        "E",
        SUCCESS,
        (this_process(ae_title, role=APPLICATION),),
        type_codes=(APPLICATION_START if started else APPLICATION_STOP,),
    )


def audit_log_used(path: Path, *, user: Participant | None = None) -> AuditRecord:
    return AuditRecord(
        "audit-log-used",
        AUDIT_LOG_USED,
        "R",
        SUCCESS,
        (user or operator(),),
        (
            ParticipantObject(
                path.resolve().as_uri(), URI, role=ROLE_SECURITY_RESOURCE, name="Security Audit Log"
            ),
        ),
    )


def association_records(
    event: str, info: AssociationInfo, rejection: AAssociateRJ | None, local_ae: str
) -> list[AuditRecord]:
    """What the SCP server reports (``SCPServer.on_association_outcome``) as records."""
    if event == "accepted":
        return [
            association_accepted(
                local_ae=local_ae,
                calling_ae=info.calling_ae,
                called_ae=info.called_ae,
                peer_host=info.peer_host,
                contexts=len(info.contexts),
            )
        ]
    if event != "rejected" or rejection is None:
        return []
    records = [
        association_refused(
            local_ae=local_ae,
            calling_ae=info.calling_ae,
            called_ae=info.called_ae,
            peer_host=info.peer_host,
            result=rejection.result,
            source=rejection.source,
            reason=rejection.reason,
        )
    ]
    if is_authentication_failure(rejection.source, rejection.reason):
        why = f"calling AE title {info.calling_ae!r} is not accepted from {info.peer_host}"
        records.append(
            authentication_failure(
                local_ae=local_ae,
                calling_ae=info.calling_ae,
                peer_host=info.peer_host,
                why=why,
                username=info.username,
            )
        )
    return records


def association_observer(
    audit: AuditLog, local_ae: str
) -> Callable[[str, AssociationInfo, AAssociateRJ | None], None]:
    """The hook for ``SCPServer.on_association_outcome``: never raises into the server."""

    def observe(event: str, info: AssociationInfo, rejection: AAssociateRJ | None) -> None:
        try:
            records = association_records(event, info, rejection, local_ae)
        except Exception as exc:  # a bug here must not refuse or drop an association
            log.warning("could not build the audit record of an association: %s", exc)
            return
        audit.write(*records)

    return observe


# -- the writer ------------------------------------------------------------------------------
def audit_path(data_dir: Path) -> Path:
    return data_dir / "audit" / "audit.jsonl"


class AuditLog:
    """Appends records to one file, shared by every process of the node.

    Each ``write`` is one ``write()`` system call on an ``O_APPEND`` descriptor: lines of
    concurrent writers never interleave. Failures are logged (once until a write succeeds
    again), never raised.
    """

    def __init__(self, path: Path, syslog: str = "") -> None:
        self.path = path
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._failing = False
        self._syslog = _syslog_logger(syslog) if syslog else None

    @classmethod
    def for_settings(cls, settings: Any) -> AuditLog | None:
        """The node's audit log, or None when ``[audit] enabled = false``."""
        audit = settings.audit
        if not audit.enabled:
            return None
        return cls(audit_path(settings.data_dir), audit.syslog)

    def write(self, *records: AuditRecord) -> None:
        if not records:
            return
        lines = [record.to_json() for record in records]
        self._append(("\n".join(lines) + "\n").encode())
        if self._syslog is not None:
            for record, line in zip(records, lines, strict=True):
                level = logging.INFO if record.outcome == SUCCESS else logging.WARNING
                self._syslog.log(level, line)

    def _append(self, data: bytes) -> None:
        try:
            fd = self._open()
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except OSError as exc:
            self._reset()
            if not self._failing:
                self._failing = True
                log.warning("audit records cannot be written to %s: %s", self.path, exc)
            return
        if self._failing:
            self._failing = False
            log.warning("audit records are written to %s again", self.path)

    def _open(self) -> int:
        with self._lock:
            if self._fd is None:
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                self._fd = os.open(self.path, flags, 0o600)
            return self._fd

    def _reset(self) -> None:
        with self._lock:
            if self._fd is not None:
                try:
                    os.close(self._fd)
                except OSError as exc:
                    log.debug("closing the audit file: %s", exc)
                self._fd = None

    def close(self) -> None:
        self._reset()
        if self._syslog is not None:
            for handler in self._syslog.handlers:
                handler.close()


class _SysLogHandler(logging.handlers.SysLogHandler):
    """A syslog server that is away is one warning, not a traceback per record."""

    _warned = False

    def handleError(self, record: logging.LogRecord) -> None:
        if not self._warned:
            self._warned = True
            log.warning("audit records cannot be sent to syslog %s", self.address)


def syslog_address(target: str) -> tuple[str | tuple[str, int], socket.SocketKind | None]:
    """``udp://HOST:PORT`` / ``tcp://HOST:PORT`` (port 514 by default) or a Unix socket
    path such as ``/dev/log``: (address, socket type) for SysLogHandler."""
    for scheme, kind in (("udp://", socket.SOCK_DGRAM), ("tcp://", socket.SOCK_STREAM)):
        if target.startswith(scheme):
            host, colon, port = target[len(scheme) :].rpartition(":")
            if not colon or "]" in port:  # no port given ("host" or "[::1]")
                host, port = target[len(scheme) :], "514"
            host = host.strip("[]")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"syslog target {target!r}: expected {scheme}HOST:PORT")
            return (host, int(port)), kind
    if target.startswith("/"):
        return target, None
    raise ValueError(f"syslog target {target!r}: expected udp://, tcp:// or a socket path")


def _syslog_logger(target: str) -> logging.Logger | None:
    address, kind = syslog_address(target)
    try:
        handler = _SysLogHandler(address, logging.handlers.SysLogHandler.LOG_AUTHPRIV, kind)
    except OSError as exc:  # a TCP server that is not listening at start
        log.warning("audit records will not go to syslog %s: %s", target, exc)
        return None
    handler.ident = "dicom-router: "
    handler.append_nul = False
    if kind == socket.SOCK_STREAM:
        handler.setFormatter(logging.Formatter("%(message)s\n"))  # one record a line
    logger = logging.Logger("dicom-router.audit.syslog")  # ours alone: not the tree's
    logger.propagate = False
    logger.addHandler(handler)
    return logger


# -- reading ----------------------------------------------------------------------------------
def read_records(
    path: Path,
    *,
    since: dt.datetime | None = None,
    event: str | None = None,
    limit: int | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """The last ``limit`` records (oldest first) of ``event`` at or after ``since``, and
    how many lines could not be read (a torn or foreign line is skipped, not fatal)."""
    kept: deque[dict[str, Any]] = deque(maxlen=limit)
    bad = 0
    for record in _lines(path):
        if record is None:
            bad += 1
            continue
        if event is not None and record.get("event") != event:
            continue
        if since is not None:
            when = record_time(record)
            if when is None or when < since:
                continue
        kept.append(record)
    return list(kept), bad


def _lines(path: Path) -> Iterator[dict[str, Any] | None]:
    try:
        file = path.open("rb")
    except FileNotFoundError:
        return
    with file:
        for raw in file:
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError:
                yield None
                continue
            yield record if isinstance(record, dict) else None


def record_time(record: dict[str, Any]) -> dt.datetime | None:
    text = record.get("EventIdentification", {}).get("EventDateTime")
    try:
        return dt.datetime.fromisoformat(str(text))
    except ValueError:
        return None


def summary(record: dict[str, Any]) -> dict[str, str]:
    """One table row of a record: time, event, outcome, participants, object, detail."""
    event = record.get("EventIdentification", {})
    outcome = event.get("EventOutcomeIndicator")
    people = []
    for p in record.get("ActiveParticipant", []):
        who = str(p.get("AlternativeUserID", "")).removeprefix("AETITLES=") or p.get("UserID", "")
        if p.get("NetworkAccessPointID") and p.get("NetworkAccessPointTypeCode") == 2:
            who = f"{who}@{p['NetworkAccessPointID']}"
        people.append(f"{who}{'*' if p.get('UserIsRequestor') else ''}")
    objects = [str(o.get("ParticipantObjectID", "")) for o in _objects(record)]
    detail = event.get("EventOutcomeDescription") or next(
        (d["value"] for o in _objects(record) for d in o.get("ParticipantObjectDetail", [])),
        "",
    )
    return {
        "time": re.sub(r"\.\d+Z$", "Z", str(event.get("EventDateTime", ""))),
        "event": str(record.get("event", "")),
        "outcome": f"{outcome} {OUTCOMES.get(outcome, '')}".strip(),
        "participants": ", ".join(people),
        "object": ", ".join(objects),
        "detail": str(detail),
    }


def _objects(record: dict[str, Any]) -> list[dict[str, Any]]:
    objects = record.get("ParticipantObjectIdentification", [])
    return [o for o in objects if isinstance(o, dict)] if isinstance(objects, list) else []


def parse_duration(text: str) -> dt.timedelta:
    """``90s``, ``15m``, ``2h``, ``7d`` (or plain seconds)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    text = text.strip().lower()
    unit = units.get(text[-1:])
    number = text[:-1] if unit is not None else text
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration such as 90s, 15m, 2h or 7d") from None
    if value < 0:
        raise ValueError(f"{text!r}: a duration cannot be negative")
    return dt.timedelta(seconds=value * (unit or 1))


# -- helpers ---------------------------------------------------------------------------------
def _utc_text(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
