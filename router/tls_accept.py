"""The listener's TLS handshake, done where the node can see it fail (catalogue SEC-10, 13).

With ``create_server(ssl=...)`` asyncio runs the handshake before the application's
protocol exists and reports a failed one (an ``OSError``) only with the loop in debug
mode: a plain peer on the TLS port, an old TLS version, a refused client certificate or
a stalled ClientHello left no log line and no audit record. Here the server accepts
plain TCP, and each connection first runs ``loop.start_tls`` under the handshake
deadline; success hands the TLS transport to the association, failure is one WARNING
line with the peer's address and reason plus the ``on_failure`` callback (the audit
record), and the socket is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable

log = logging.getLogger(__name__)

#: Called with the peer's host, port and the reason of a failed handshake.
FailureHook = Callable[[str, int, str], None]


class TlsGate(asyncio.Protocol):
    """The protocol of a connection until its TLS handshake is done."""

    def __init__(
        self,
        make_app: Callable[[], asyncio.Protocol],
        context: ssl.SSLContext,
        timeout: float,
        on_failure: FailureHook | None = None,
    ) -> None:
        self._make_app = make_app
        self._context = context
        self._timeout = timeout
        self._on_failure = on_failure
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()  # nothing may reach this protocol: start_tls reads
        self._task = asyncio.ensure_future(self._handshake(transport))

    def data_received(self, data: bytes) -> None:  # pragma: no cover - reading is paused
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        pass  # the handshake's own wait sees the loss

    async def _handshake(self, transport: asyncio.Transport) -> None:
        peer = transport.get_extra_info("peername") or ("", 0)
        app = self._make_app()
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(
                transport,
                app,
                self._context,
                server_side=True,
                ssl_handshake_timeout=self._timeout,
            )
        except Exception as exc:  # any failure of the handshake: refuse this peer only
            reason = _reason(exc, self._timeout)
            log.warning("%s:%s: TLS handshake failed: %s", peer[0], peer[1], reason)
            transport.abort()
            if self._on_failure is not None:
                with contextlib.suppress(Exception):
                    self._on_failure(str(peer[0]), int(peer[1]), reason)
            return
        if tls is None:  # pragma: no cover - the transport closed during the handshake
            transport.abort()
            return
        app.connection_made(tls)


def _reason(exc: Exception, timeout: float) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or exc.strerror or type(exc).__name__
    if isinstance(exc, TimeoutError | ConnectionAbortedError) and "taking longer" in str(exc):
        return f"no handshake within {timeout:g} s"
    if isinstance(exc, TimeoutError):
        return f"no handshake within {timeout:g} s"
    return str(exc) or type(exc).__name__


async def start_tls_server(
    make_app: Callable[[], asyncio.Protocol],
    host: str | None,
    port: int,
    context: ssl.SSLContext,
    timeout: float,
    *,
    reuse_port: bool = False,
    on_failure: FailureHook | None = None,
) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: TlsGate(make_app, context, timeout, on_failure),
        host,
        port,
        reuse_address=True,
        reuse_port=reuse_port or None,
    )
