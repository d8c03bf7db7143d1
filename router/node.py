"""Running the node's listener: wiring settings, database, spool, rules and the SCP.

``recover()`` runs once per start, before any listener accepts: nothing in the spool's
tmp/ was acknowledged, and a committed file without an instance row never was either.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import ssl
from collections.abc import Callable

from protocol.acse import AcceptorPolicy
from protocol.errors import RejectReason, RejectResult, RejectSource
from protocol.limits import Limits
from protocol.net import AssociationInfo, Timeouts, start_server
from protocol.pdu import AAssociateRJ, AAssociateRQ
from router.db.engine import make_engine
from router.db.migrate import check_schema
from router.db.repository import Repository
from router.listener import GroupCommitter, ListenerNode, RuleCache
from router.settings import ListenerSettings, Settings
from router.spool import Spool

log = logging.getLogger(__name__)


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


def acceptor_policy(settings: ListenerSettings) -> AcceptorPolicy:
    # The node stores what it is sent as it is: any storage SOP class, and the
    # transfer syntax the requestor proposed first (compressed data stays compressed).
    return AcceptorPolicy(
        ae_title=settings.ae_title,
        require_called_ae=settings.check_called_ae,
        accept_any_abstract_syntax=True,
        transfer_syntaxes=(),
        accept_any_transfer_syntax=True,
        max_pdu_length=settings.max_pdu_length,
    )


def known_sources_gate(
    sources: Callable[[], dict[str, tuple[str, ...]]],
) -> Callable[[AssociationInfo, AAssociateRQ], AAssociateRJ | None]:
    """accept = "known": the calling AE must be a source, from one of its addresses."""

    def admit(info: AssociationInfo, rq: AAssociateRQ) -> AAssociateRJ | None:
        addresses = sources().get(rq.calling_ae)
        if addresses is not None and (not addresses or _address_in(info.peer_host, addresses)):
            return None
        log.warning(
            "%s: calling AE %r is not a known source from this address", info.peer, rq.calling_ae
        )
        return AAssociateRJ(
            RejectResult.PERMANENT,
            RejectSource.SERVICE_USER,
            RejectReason.CALLING_AE_NOT_RECOGNIZED,
        )

    return admit


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
    if not settings.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.tls_ca:
        context.load_verify_locations(settings.tls_ca)
    if settings.tls_require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


async def run_listener(
    settings: Settings,
    *,
    reuse_port: bool = False,
    on_ready: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until ``stop`` is set or SIGTERM/SIGINT arrives."""
    loop = asyncio.get_running_loop()
    engine = make_engine(settings.database_url)
    check_schema(engine)
    repository = Repository(engine)
    spool = Spool(settings.spool_dir, settings.spool)
    rules = RuleCache(repository)
    await loop.run_in_executor(None, rules.load)
    committer = GroupCommitter(repository, spool)
    committer.start()
    listener = settings.listener
    node = ListenerNode(listener, repository, spool, rules, committer)
    limits = Limits(
        max_pdu_length=listener.max_pdu_length,
        max_associations=listener.max_associations,
        max_associations_per_calling_ae=listener.max_associations_per_calling_ae,
    )
    timeouts = Timeouts(
        acse=listener.acse_timeout,
        dimse=listener.dimse_timeout,
        artim=listener.acse_timeout,
        idle=listener.idle_timeout,
    )
    admit = known_sources_gate(lambda: rules.sources) if listener.accept == "known" else None
    if listener.accept == "any":
        log.warning('listener.accept = "any": every calling AE title may store to this node')
    server = await start_server(
        node,
        acceptor_policy(listener),
        listener.bind or None,
        listener.port,
        limits=limits,
        timeouts=timeouts,
        ssl=listener_tls(listener),
        reuse_port=reuse_port,
        admit=admit,
    )
    stop = stop or asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    refresher = asyncio.ensure_future(rules.keep_fresh())
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


def serve(settings: Settings) -> None:
    """Recover the spool, then run the listener(s) until SIGTERM/SIGINT.

    Several listener processes share the port with SO_REUSEPORT; each then admits its
    share of ``max_associations`` (the node-wide count is their sum).
    """
    engine = make_engine(settings.database_url)
    check_schema(engine)
    recover(settings, Repository(engine))
    engine.dispose()
    count = settings.listener.processes
    if count == 1:
        asyncio.run(run_listener(settings))
        return
    import dataclasses
    import multiprocessing

    share = dataclasses.replace(
        settings.listener,
        max_associations=max(1, settings.listener.max_associations // count),
    )
    per_process = dataclasses.replace(settings, listener=share)
    spawn = multiprocessing.get_context("spawn")
    children = [spawn.Process(target=_listener_process, args=(per_process,)) for _ in range(count)]
    for child in children:
        child.start()
    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.pid is not None and child.is_alive():
                os.kill(child.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        child.join()


def _listener_process(settings: Settings) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(run_listener(settings, reuse_port=True))
