"""Running the node's listener: wiring settings, database, spool, rules and the SCP.

``recover()`` runs once per start, before any listener accepts: nothing in the spool's
tmp/ was acknowledged, and a committed file without an instance row never was either.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import ssl
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

from protocol.acse import AcceptorPolicy
from protocol.errors import RejectReason, RejectResult, RejectSource
from protocol.limits import Limits
from protocol.net import AssociationInfo, Timeouts
from protocol.net.server import SCPAssociation, SCPServer
from protocol.pdu import AAssociateRJ, AAssociateRQ
from protocol.uids import VERIFICATION
from router.admission import NodeWideSCPServer, SharedAdmission, admission_path
from router.audit import (
    AuditLog,
    application_activity,
    association_observer,
    authentication_failure,
    operation_refused,
    tls_refused,
)
from router.db.engine import checkpoint_wal, make_engine
from router.db.migrate import check_schema
from router.db.repository import Repository
from router.listener import GroupCommitter, ListenerNode, RuleCache
from router.liveness import view_path
from router.lockout import PeerLockout
from router.messages import JobMessage
from router.metrics import mark_process_dead, prepare_multiprocess_dir
from router.settings import ListenerSettings, Settings
from router.spool import Spool
from router.status import NodeStatusFile
from router.tls_accept import start_tls_server
from router.users import IdentityCheck

log = logging.getLogger(__name__)


def _job_notifier(settings: Settings) -> Callable[[JobMessage], None] | None:
    """Tell the dispatcher of new jobs (the fast path; the database is the record). A
    send that would block is dropped: the C-STORE response never waits for the queue
    (catalogue RX-15), and the dispatcher's sweep finds the job anyway."""
    if settings.workers.count == 0 and not settings.workers.bind:
        return None
    import zmq

    socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUSH)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDHWM, 10_000)
    socket.connect(settings.dispatcher_notify_endpoint)

    def notify(message: JobMessage) -> None:
        with contextlib.suppress(zmq.Again):
            socket.send(message.encode(), zmq.NOBLOCK)

    return notify


def recover(settings: Settings, repository: Repository) -> None:
    spool = Spool(settings.spool_dir, settings.spool)
    spool.create_layout()
    removed = spool.remove_temporary_files()
    orphans = spool.remove_orphans(repository.spool_names())
    if removed or orphans:
        log.warning(
            "recovery: removed %d unfinished and %d unrecorded spool files (never acknowledged)",
            removed,
            len(orphans),
        )


def acceptor_policy(
    settings: ListenerSettings,
    user_identity: bool = False,
    permitted: Callable[[str, str], bool] | None = None,
) -> AcceptorPolicy:
    # The node stores what it is sent as it is: any storage SOP class, and the
    # transfer syntax the requestor proposed first (compressed data stays compressed).
    # With user identity required, ``identity_gate`` has verified it before negotiation;
    # the hook only answers a requested positive response (empty for types 1 and 2,
    # PS3.7 D.3.3.7.2). ``permitted``: SourceOperations.permitted (accept = "known").
    return AcceptorPolicy(
        ae_title=settings.ae_title,
        require_called_ae=settings.check_called_ae,
        accept_any_abstract_syntax=True,
        abstract_syntax_permitted=permitted,
        transfer_syntaxes=(),
        accept_any_transfer_syntax=True,
        max_pdu_length=settings.max_pdu_length,
        user_identity=(lambda identity: b"") if user_identity else None,
    )


# PS3.7 D.3.3.7: an authorisation failure is rejected-permanent with source "DICOM UL
# service-provider (ACSE related function)", reason no-reason-given: (1, 2, 1).
IDENTITY_REJECT = AAssociateRJ(
    RejectResult.PERMANENT, RejectSource.SERVICE_PROVIDER_ACSE, RejectReason.NO_REASON
)


def identity_gate(
    check: IdentityCheck,
    audit: AuditLog | None,
    local_ae: str,
    lockout: PeerLockout | None = None,
) -> Callable[[AssociationInfo, AAssociateRQ], AAssociateRJ | None]:
    """The User Identity sub-item must satisfy ``check``; a refusal is IDENTITY_REJECT,
    one warning with the peer's address and why (never the passcode), and an audit
    record (User Authentication, failure). ``lockout`` (catalogue SEC-09): an address
    with too many failures is refused the same way, unchecked, until its time is up;
    the failure that locks it out is one more WARNING."""

    def admit(info: AssociationInfo, rq: AAssociateRQ) -> AAssociateRJ | None:
        identity = rq.user_information.user_identity_rq
        locked = lockout.locked_for(info.peer_host) if lockout is not None else 0.0
        if locked:
            info.username = None
            why = f"address locked out for {locked:.0f} s more (too many failures)"
            _identity_refused(info, rq, None, why)
            return IDENTITY_REJECT
        if identity is None:
            verdict = check.decide(None, b"", b"")
        else:
            verdict = check.decide(
                identity.identity_type, identity.primary_field, identity.secondary_field
            )
        info.username = verdict.username
        if verdict.accepted:
            if lockout is not None:
                lockout.succeeded(info.peer_host)
            return None
        why = verdict.why
        if lockout is not None and lockout.failed(info.peer_host):
            log.warning(
                "%s: %d failed user identities within %g s: address %s locked out for %g s",
                info.peer,
                lockout.max_failures,
                lockout.window,
                info.peer_host,
                lockout.lockout,
            )
            why += f"; address locked out for {lockout.lockout:g} s"
        _identity_refused(info, rq, verdict.username, why)
        return IDENTITY_REJECT

    def _identity_refused(
        info: AssociationInfo, rq: AAssociateRQ, username: str | None, why: str
    ) -> None:
        log.info(  # the reject's own WARNING line follows (one per refusal, DESIGN §6)
            "%s: user identity refused for calling AE %r, user %r: %s",
            info.peer,
            rq.calling_ae,
            username,
            why,
        )
        if audit is not None:
            audit.write(
                authentication_failure(
                    local_ae=local_ae,
                    calling_ae=rq.calling_ae,
                    peer_host=info.peer_host,
                    why=f"user identity: {why}",
                    username=username,
                )
            )

    return admit


def known_sources_gate(
    sources: Callable[[], dict[str, tuple[str, ...]]],
) -> Callable[[AssociationInfo, AAssociateRQ], AAssociateRJ | None]:
    """accept = "known": the calling AE must be a source, from one of its addresses."""

    def admit(info: AssociationInfo, rq: AAssociateRQ) -> AAssociateRJ | None:
        addresses = sources().get(rq.calling_ae)
        if addresses is not None and (not addresses or _address_in(info.peer_host, addresses)):
            return None
        # INFO: the server's one WARNING line for the reject names the peer and codes
        # (DESIGN §6: one log line per refusal); this says why, with -v.
        log.info(
            "%s: calling AE %r is not a known source from this address", info.peer, rq.calling_ae
        )
        return AAssociateRJ(
            RejectResult.PERMANENT,
            RejectSource.SERVICE_USER,
            RejectReason.CALLING_AE_NOT_RECOGNIZED,
        )

    return admit


def operation_of(abstract_syntax: str) -> str:
    """The source operation a presentation context serves: the listener accepts any
    abstract syntax, so everything but Verification (C-ECHO, PS3.4 A) is storage."""
    return "echo" if abstract_syntax == VERIFICATION else "store"


class SourceOperations:
    """accept = "known": what each source may do (catalogue SEC-05, ``sources add
    --allow``). ``permitted`` is the negotiation's predicate: a context for an operation
    the calling AE may not use is answered with result 1, user-rejection (PS3.8 9.3.3.2),
    and the association goes on with the rest (Verification for an echo-only source), so
    no C-STORE can arrive on an accepted context. ``admit`` notes what an RQ will have
    refused; ``observe`` reports it once the association is accepted: one WARNING with the
    peer's address and one audit record (none when the association is rejected anyway)."""

    def __init__(
        self,
        operations: Callable[[], dict[str, frozenset[str]]],
        audit: AuditLog | None,
        local_ae: str,
    ) -> None:
        self._operations = operations
        self._audit = audit
        self._local_ae = local_ae
        self._pending: dict[int, tuple[str, int]] = {}  # association id -> refused

    def permitted(self, calling_ae: str, abstract_syntax: str) -> bool:
        allowed = self._operations().get(calling_ae)
        # Not a source: the known-sources gate refused it before negotiation.
        return allowed is None or operation_of(abstract_syntax) in allowed

    def admit(self, info: AssociationInfo, rq: AAssociateRQ) -> None:
        refused: dict[str, int] = {}
        for pc in rq.presentation_contexts:
            if len(pc.abstract_syntaxes) != 1:
                continue  # rejected with result 2 whoever proposes it (MP-22)
            abstract = pc.abstract_syntaxes[0].rstrip("\0")
            if not self.permitted(rq.calling_ae, abstract):
                operation = operation_of(abstract)
                refused[operation] = refused.get(operation, 0) + 1
        if refused:
            operations = ", ".join(sorted(refused))
            self._pending[info.association_id] = (operations, sum(refused.values()))

    def observe(self, event: str, info: AssociationInfo, rejection: AAssociateRJ | None) -> None:
        pending = self._pending.pop(info.association_id, None)
        if pending is None or event != "accepted":
            return
        operation, contexts = pending
        log.warning(
            "%s: calling AE %r may not %s: %d presentation context(s) rejected "
            "(result 1, user-rejection)",
            info.peer,
            info.calling_ae,
            operation,
            contexts,
        )
        if self._audit is not None:
            self._audit.write(
                operation_refused(
                    local_ae=self._local_ae,
                    calling_ae=info.calling_ae,
                    peer_host=info.peer_host,
                    operation=operation,
                    contexts=contexts,
                )
            )


def _address_in(host: str, allowed: tuple[str, ...]) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    for entry in allowed:
        try:
            if address in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


def listener_tls(settings: ListenerSettings) -> ssl.SSLContext | None:
    """The listener's TLS context (router/tls.py: the BCP 195 RFC 8996 profile)."""
    if not settings.tls_cert:
        return None
    from router.tls import server_context

    return server_context(
        settings.tls_cert, settings.tls_key, settings.tls_ca, settings.tls_require_client_cert
    )


async def run_listener(
    settings: Settings,
    *,
    reuse_port: bool = False,
    on_ready: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
    shared: tuple[int, int] | None = None,
) -> None:
    """Serve until ``stop`` is set or SIGTERM/SIGINT arrives. ``shared`` (this listener's
    index, the number of listeners): the association limits are counted node-wide in
    the file the supervisor made (router/admission.py)."""
    loop = asyncio.get_running_loop()
    engine = make_engine(settings.database_url, checkpoints=False)  # the janitor's job
    check_schema(engine)
    repository = Repository(engine)
    spool = Spool(settings.spool_dir, settings.spool)
    rules = RuleCache(repository)
    await loop.run_in_executor(None, rules.load)
    audit = AuditLog.for_settings(settings)
    committer = GroupCommitter(repository, spool, notify=_job_notifier(settings), audit=audit)
    committer.start()
    listener = settings.listener
    node = ListenerNode(listener, repository, spool, rules, committer)
    limits = Limits(
        max_pdu_length=listener.max_pdu_length,
        max_associations=listener.max_associations,
        max_associations_per_calling_ae=listener.max_associations_per_calling_ae,
        min_dataset_rate=listener.min_transfer_rate,
        min_rate_grace=listener.min_transfer_grace,
    )
    timeouts = Timeouts(
        acse=listener.acse_timeout,
        dimse=listener.dimse_timeout,
        artim=listener.acse_timeout,
        idle=listener.idle_timeout,
        pdu=listener.pdu_timeout,
        write=listener.write_timeout,
    )
    gate = known_sources_gate(lambda: rules.sources) if listener.accept == "known" else None
    operations = (
        SourceOperations(lambda: rules.operations, audit, listener.ae_title)
        if listener.accept == "known"
        else None
    )
    mode = settings.security.user_identity
    security = settings.security
    lockout = PeerLockout(
        security.max_auth_failures, security.auth_failure_window, security.auth_lockout
    )
    identity = (
        identity_gate(
            IdentityCheck(mode, repository.user_secrets), audit, listener.ae_title, lockout
        )
        if mode != "none"
        else None
    )

    def admit(info: AssociationInfo, rq: AAssociateRQ) -> AAssociateRJ | None:
        # A rule or source changed a moment ago applies to the next association, not
        # only after the next periodic reload (one small read per association).
        try:
            rules.load()
        except Exception as exc:  # keep the rules we have; the periodic reload retries
            log.warning("could not reload rules: %s", exc)
        refusal = gate(info, rq) if gate is not None else None
        if refusal is None and identity is not None:
            refusal = identity(info, rq)
        if refusal is None and operations is not None:
            operations.admit(info, rq)
        return refusal

    if listener.accept == "any":
        log.warning('listener.accept = "any": every calling AE title may store to this node')
    policy = acceptor_policy(
        listener,
        user_identity=mode != "none",
        permitted=operations.permitted if operations is not None else None,
    )
    admission = None
    if shared is None:
        server = SCPServer(node, policy, limits, timeouts, admit)
    else:
        index, rows = shared
        admission = SharedAdmission(
            admission_path(settings.data_dir),
            rows=rows,
            index=index,
            max_total=listener.max_associations,
            max_per_ae=listener.max_associations_per_calling_ae,
        )
        server = NodeWideSCPServer(node, policy, limits, timeouts, admit, shared=admission)
    tls = listener_tls(listener)
    if tls is None:
        await server.start(listener.bind or None, listener.port, reuse_port=reuse_port)
    else:
        # The handshake in our hands, so that a failed one is logged and audited
        # (router/tls_accept.py); the server object counts and closes as before.
        server._server = await start_tls_server(
            lambda: SCPAssociation(server),
            listener.bind or None,
            listener.port,
            tls,
            listener.acse_timeout,
            reuse_port=reuse_port,
            on_failure=_tls_failure_audit(audit, listener.ae_title),
        )
    stop = stop or asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    refresher = asyncio.ensure_future(rules.keep_fresh())
    node.metrics.watch(server)
    server.on_association_outcome = _outcome_observer(audit, listener.ae_title, operations)
    log.info("listening on %s:%d as %s", listener.bind, server.port, listener.ae_title)
    if on_ready is not None:
        on_ready(server.port)
    try:
        await stop.wait()
    finally:
        log.info("stopping: no new associations; finishing the ones in progress")
        await server.close(grace=listener.dimse_timeout)
        refresher.cancel()
        await committer.stop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        engine.dispose()
        if audit is not None:
            audit.close()
        if admission is not None:
            admission.close()


def _outcome_observer(
    audit: AuditLog | None, local_ae: str, operations: SourceOperations | None
) -> Callable[[str, AssociationInfo, AAssociateRJ | None], None] | None:
    """The association's audit record, then (accepted) what its source may not do."""
    recorders = [association_observer(audit, local_ae)] if audit is not None else []
    if operations is not None:
        recorders.append(operations.observe)
    if not recorders:
        return None

    def observe(event: str, info: AssociationInfo, rejection: AAssociateRJ | None) -> None:
        for record in recorders:
            record(event, info, rejection)

    return observe


def _tls_failure_audit(audit: AuditLog | None, local_ae: str) -> Callable[[str, int, str], None]:
    def record(host: str, port: int, reason: str) -> None:
        if audit is not None:
            audit.write(tls_refused(local_ae=local_ae, peer_host=host, reason=reason))

    return record


def serve(settings: Settings, config_file: Path | None = None) -> None:
    """Recover the spool, then supervise the node's processes until SIGTERM/SIGINT:
    N listeners (sharing the port with SO_REUSEPORT; the association limits hold across
    them, router/admission.py), the dispatcher and M forwarding workers. A child that dies is
    restarted, with a growing pause if it keeps dying at once (DESIGN §3.6).
    ``config_file``: the one the settings came from (its mode is checked, SEC-20)."""
    wait_for_leftovers(settings)
    engine = make_engine(settings.database_url)
    check_schema(engine)
    repository = Repository(engine)
    warn_open_secrets(settings, config_file, repository.list_destinations())
    recover(settings, repository)
    engine.dispose()
    Supervisor(settings).run()


def warn_open_secrets(
    settings: Settings, config_file: Path | None, destinations: Iterable[Any] = ()
) -> None:
    """Catalogue SEC-20: one WARNING for each private key, or config file holding a
    database password, that the group or other users may read (the node starts anyway:
    refusing would take a hospital's router down over a chmod)."""
    from router.check import open_secrets, secret_files

    for line in open_secrets(secret_files(settings, config_file, destinations)):
        log.warning("%s; `dicom-router check` lists it", line)


def warn_open_worker_key(key: Path) -> None:
    """SEC-20 for ``dicom-router worker`` on another host: one WARNING when the group or
    other users may read its CURVE secret key (it starts anyway, as ``serve`` does)."""
    from router.check import open_secrets

    for line in open_secrets([(key, "this worker's CURVE secret key")]):
        log.warning("%s", line)


class NodeBusy(RuntimeError):
    """Processes of another run on the same data directory are still alive."""


def wait_for_leftovers(settings: Settings, grace: float | None = None) -> None:
    """Give the processes of an earlier run (orphans of a killed supervisor stop once
    their in-flight associations end) up to ``grace`` seconds, then refuse to start:
    recovering the spool under a listener that still commits would delete files it is
    about to acknowledge."""
    import time

    from router.status import leftover_processes

    grace = settings.listener.dimse_timeout + 10 if grace is None else grace
    deadline = time.monotonic() + grace
    left = leftover_processes(settings.data_dir)
    if left:
        log.warning("waiting for the processes of an earlier run to stop: %s", left)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = leftover_processes(settings.data_dir)
    if left:
        names = ", ".join(f"{name} (pid {pid})" for name, pid in left)
        raise NodeBusy(f"another run on {settings.data_dir} is still alive: {names}")


class Supervisor:
    def __init__(self, settings: Settings) -> None:

        count = settings.listener.processes
        # More than one listener: the limits are counted node-wide in a file of the data
        # directory that the supervisor makes and resets (router/admission.py).
        self._listeners = count
        self._max_associations = settings.listener.max_associations
        self._admission = admission_path(settings.data_dir) if count > 1 else None
        self._specs: list[tuple[str, Callable[..., None], tuple[object, ...]]] = [
            (f"listener-{i}", _listener_process, (settings, count > 1, (i, count)))
            for i in range(count)
        ]
        self._specs.append(("janitor", _janitor_process, (settings,)))
        if settings.metrics.enabled:
            self._specs.append(("metrics", _metrics_process, (settings,)))
        if settings.workers.count > 0 or settings.workers.bind:
            self._specs.append(("dispatcher", _dispatcher_process, (settings,)))
            self._specs += [
                (f"worker-{i}", _worker_process, (settings,)) for i in range(settings.workers.count)
            ]
        self._stopping = False
        self._status = NodeStatusFile(settings.data_dir)
        self._settings = settings
        self._data_dir = settings.data_dir
        self._audit = AuditLog.for_settings(settings)
        self._ae_title = settings.listener.ae_title

    def run(self) -> None:
        import multiprocessing
        import time

        spawn = multiprocessing.get_context("spawn")
        children: dict[str, Any] = {}
        started: dict[str, float] = {}
        pause: dict[str, float] = {}

        def start(name: str, target: Callable[..., None], args: tuple[object, ...]) -> None:
            child = spawn.Process(target=target, args=args, name=name, daemon=False)
            child.start()
            children[name], started[name] = child, time.monotonic()
            self._status.child_started(name, child.pid)

        def stop(signum: int, _frame: object) -> None:
            self._stopping = True
            for child in children.values():
                if child.pid is not None and child.is_alive():
                    os.kill(child.pid, signal.SIGTERM)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        prepare_multiprocess_dir(self._data_dir)  # before any child: they inherit it
        if self._admission is not None:
            SharedAdmission.create(
                self._admission, rows=self._listeners, max_total=self._max_associations
            )
        listener = self._settings.listener
        self._status.node_started(
            {"bind": listener.bind, "port": listener.port, "ae_title": listener.ae_title}
        )
        if self._audit is not None:
            self._audit.write(application_activity(started=True, ae_title=self._ae_title))
        for name, target, args in self._specs:
            start(name, target, args)
        due: dict[str, float] = {}  # restart times of children that died
        while not self._stopping:
            time.sleep(0.2)
            now = time.monotonic()
            for name, target, args in self._specs:
                child = children[name]
                if child.is_alive() or self._stopping:
                    continue
                if name not in due:
                    # A child that keeps dying at once waits longer each time; the others
                    # are still watched and restarted meanwhile.
                    quick = now - started[name] < 10
                    pause[name] = min(30.0, pause.get(name, 0.25) * 2) if quick else 0.5
                    due[name] = now + pause[name]
                    mark_process_dead(child.pid)
                    self._forget_associations(name)
                    log.warning(
                        "%s exited (status %s); restarting in %.1f s",
                        name,
                        child.exitcode,
                        pause[name],
                    )
                elif now >= due[name]:
                    del due[name]
                    start(name, target, args)
        for child in children.values():
            child.join(timeout=60)
            if child.is_alive():
                child.kill()
                child.join()
        self._status.node_stopped()
        if self._audit is not None:
            self._audit.write(application_activity(started=False, ae_title=self._ae_title))
            self._audit.close()

    def _forget_associations(self, name: str) -> None:
        """A listener died, and its connections with it: its node-wide counts go."""
        if self._admission is None or not name.startswith("listener-"):
            return
        SharedAdmission.clear_row(
            self._admission,
            rows=self._listeners,
            max_total=self._max_associations,
            index=int(name.removeprefix("listener-")),
        )


def _child_setup() -> None:
    _die_with_the_supervisor()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _die_with_the_supervisor() -> None:
    """SIGTERM this child when the supervisor dies, even by SIGKILL (Linux
    PR_SET_PDEATHSIG), so that no orphan keeps serving the port or the spool; it stops
    as it would on the supervisor's own SIGTERM."""
    import ctypes
    import multiprocessing

    pr_set_pdeathsig = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return  # not Linux: the leftover check at the next start still holds
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        os.kill(os.getpid(), signal.SIGTERM)  # it died before prctl took effect


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


def _listener_process(
    settings: Settings, reuse_port: bool, shared: tuple[int, int] | None = None
) -> None:
    _child_setup()
    asyncio.run(
        run_listener(settings, reuse_port=reuse_port, shared=shared if reuse_port else None)
    )


def _metrics_process(settings: Settings) -> None:
    from router.db.jobs import JobQueue
    from router.metrics import serve_metrics

    _child_setup()

    async def main() -> None:
        engine = make_engine(settings.database_url)
        metrics = settings.metrics
        server, thread = serve_metrics(
            JobQueue(engine), metrics.bind, metrics.port, liveness=view_path(settings.data_dir)
        )
        log.info("metrics on http://%s:%d/metrics", metrics.bind, metrics.port)
        await _stop_event().wait()
        server.shutdown()
        thread.join(5)
        engine.dispose()

    asyncio.run(main())


def _janitor_process(settings: Settings) -> None:
    import datetime as dt

    from router.db.jobs import JobQueue
    from router.janitor import SpoolJanitor

    _child_setup()

    async def main() -> None:
        engine = make_engine(settings.database_url)
        janitor = SpoolJanitor(
            JobQueue(engine),
            Spool(settings.spool_dir, settings.spool),
            retention=dt.timedelta(seconds=settings.spool.retention_seconds),
            checkpoint=partial(checkpoint_wal, engine),
        )
        await janitor.run(_stop_event())
        engine.dispose()

    asyncio.run(main())


def dispatcher_endpoints(settings: Settings) -> list[Any]:
    """The node's ipc:// endpoint, and the tcp:// one for workers on other hosts (with
    CURVE when keys are configured)."""
    from router.curve import load_pair
    from router.dispatcher import Endpoint

    endpoints = [Endpoint(settings.dispatcher_endpoint)]
    workers = settings.workers
    if workers.bind:
        curve = load_pair(workers.key) if workers.key else None
        endpoints.append(Endpoint(workers.bind, curve, workers.allowed_keys or None))
    return endpoints


def worker_bind_problem(settings: Settings) -> str | None:
    """Why ``serve`` must not start with these worker settings (DESIGN §7), or None."""
    from router.curve import CurveKeyError, is_loopback_endpoint, load_pair

    workers = settings.workers
    if not workers.bind:
        return None
    if workers.key:
        try:
            load_pair(workers.key)
        except CurveKeyError as exc:
            return str(exc)
        if not Path(workers.allowed_keys).is_dir():
            return f"--allowed-workers {workers.allowed_keys}: not a directory"
        return None
    if is_loopback_endpoint(workers.bind) or workers.insecure:
        return None
    return (
        f"--worker-bind {workers.bind} is reachable from other hosts: give --worker-key "
        "NODE.key and --allowed-workers DIR (ZeroMQ CURVE), or --insecure-workers"
    )


def _dispatcher_process(settings: Settings) -> None:
    from router.backoff import DestinationHealth
    from router.db.jobs import JobQueue
    from router.dispatcher import Dispatcher

    _child_setup()

    async def main() -> None:
        # Leases need no fsync of their own (router/db/engine.py make_engine).
        engine = make_engine(settings.database_url, durable=False)
        queue = JobQueue(engine, max_deliveries=settings.workers.max_deliveries)
        dispatcher = Dispatcher(
            queue,
            dispatcher_endpoints(settings),
            spool=Spool(settings.spool_dir, settings.spool),
            lease_seconds=settings.workers.lease_seconds,
            notify_endpoint=settings.dispatcher_notify_endpoint,
            pipeline=settings.workers.pipeline,
            health=DestinationHealth(settings.workers.retry_base, settings.workers.retry_cap),
            liveness=view_path(settings.data_dir),
            worker_timeout=settings.workers.timeout,
        )
        await dispatcher.run(_stop_event())
        engine.dispose()

    asyncio.run(main())


def _worker_process(settings: Settings) -> None:
    _child_setup()
    asyncio.run(run_worker(settings, settings.dispatcher_endpoint))


def destination_tls(repository: Repository) -> Callable[[str], Any]:
    """A destination's TLS options by name, from the database. The worker reads them
    there (local and remote workers alike have the database) rather than from the lease:
    certificate paths stay out of messages, and a lease from a dispatcher of an older
    revision cannot make a worker send in clear to a destination set to TLS."""

    def tls_for(name: str) -> Any:
        return repository.get_destination(name).tls

    return tls_for


async def run_worker(
    settings: Settings,
    endpoint: str,
    *,
    local_spool: bool = True,
    destinations: tuple[str, ...] | None = None,
    curve: tuple[bytes, Any] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """One forwarding worker until SIGTERM/SIGINT: the node's own (``serve``), or one on
    another host (``dicom-router worker``: no spool of its own, files are fetched)."""
    from router.db.jobs import JobQueue
    from workers.retry import RetryPolicy
    from workers.worker import Worker

    workers = settings.workers
    # Results need no fsync of their own: the janitor syncs before it removes a file
    # (router/db/engine.py make_engine, router/janitor.py).
    engine = make_engine(settings.database_url, durable=False)
    check_schema(engine)
    audit = AuditLog.for_settings(settings)
    worker = Worker(
        JobQueue(engine, max_deliveries=settings.workers.max_deliveries),
        Spool(settings.spool_dir, settings.spool) if local_spool else None,
        endpoint,
        curve=curve,
        calling_ae=settings.listener.ae_title,
        destinations=destinations,
        credit=settings.workers.credit,
        timeouts=Timeouts(
            connect=workers.connect_timeout,
            acse=workers.acse_timeout,
            dimse=workers.dimse_timeout,
            write=workers.write_timeout,
        ),
        policy=RetryPolicy(
            max_deliveries=settings.workers.max_deliveries,
            base=settings.workers.retry_base,
            cap=settings.workers.retry_cap,
        ),
        audit=audit,
        study_uids=Repository(engine).study_uids if audit is not None else None,
        tls_for=destination_tls(Repository(engine)),
    )
    await worker.run(stop or _stop_event())
    engine.dispose()
    if audit is not None:
        audit.close()
