"""The write deadline of ``protocol.net`` below the transport's high-water mark.

A peer that sends C-ECHO-RQs and never reads the responses (catalogue RX-16, the
listener's side). The kernel's socket buffer takes the first responses; what it cannot
take waits in the transport's buffer. Until this regression test the deadline started
only at ``pause_writing`` (the buffer past its high-water mark), so responses stuck
below the mark, or an A-ABORT queued behind them before ``close()`` (which flushes
first), held the association, and its slot, forever. Here the mark is set out of reach
and the kernel's send buffer small, so every response that does not fit stays below
the mark; the association must still end at the write deadline.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from protocol.acse import AcceptorPolicy
from protocol.net import Timeouts, start_server
from tests.interop.test_scp_read_batches import _Handler, associate_rq, c_echo_rq, p_data

ECHOES = 20_000  # ~1.8 MB of responses: far more than both kernels' buffers take


async def _recv_exactly(sock: socket.socket, count: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < count:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, count - len(data)), 10)
        assert chunk, "the server closed before its A-ASSOCIATE-AC"
        data += chunk
    return data


async def _stalled_peer(write: float, idle: float | None) -> int:
    """Associate, send ECHOES C-ECHO-RQs, read nothing more, and wait for the server to
    drop the association; returns the bytes of responses its transport held back.

    The peer is a bare socket that reads only its A-ASSOCIATE-AC: an asyncio stream
    would go on reading into its own buffer, and reads let the kernel grow the receive
    window (autotuning) until every response fits and nothing is left to stall."""
    policy = AcceptorPolicy(accept_any_abstract_syntax=True)
    server = await start_server(_Handler(), policy, timeouts=Timeouts(write=write, idle=idle))
    loop = asyncio.get_running_loop()
    peer = socket.socket()
    peer.setblocking(False)
    try:
        await loop.sock_connect(peer, ("127.0.0.1", server.port))
        await loop.sock_sendall(peer, associate_rq())
        header = await _recv_exactly(peer, 6)
        await _recv_exactly(peer, int.from_bytes(header[2:], "big"))
        assert header[0] == 0x02
        (association,) = server.associations
        transport = association.transport
        assert transport is not None
        transport.set_write_buffer_limits(high=1 << 30)  # pause_writing never comes
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        await asyncio.wait_for(loop.sock_sendall(peer, p_data(1, 3, c_echo_rq(1)) * ECHOES), 30)
        started = loop.time()
        while transport.get_write_buffer_size() == 0 and loop.time() < started + 10:
            await asyncio.sleep(0.01)  # the server is still reading our requests
        buffered = transport.get_write_buffer_size()
        await asyncio.wait_for(asyncio.shield(association.closed), 10 * write + 10)
        assert not server.associations
        return buffered
    finally:
        peer.close()
        await server.close(grace=1)


@pytest.mark.parametrize(
    ("write", "idle"),
    [
        pytest.param(1.0, None, id="peer-keeps-the-association"),
        # The idle timeout aborts first: A-ABORT queued behind the stuck responses, close().
        pytest.param(2.0, 1.0, id="closed-with-unsent-bytes"),
    ],
)
def test_responses_stuck_below_the_high_water_mark_end_the_association_at_the_deadline(
    write: float, idle: float | None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    buffered = asyncio.run(_stalled_peer(write, idle))
    assert buffered > 0  # the case: bytes waited in the transport, below its mark
    line = f"peer stopped reading for {write:.0f} s"
    stalls = [r for r in caplog.records if line in r.getMessage()]
    assert len(stalls) == 1, caplog.text
    if idle is not None:
        assert any("no data for" in r.getMessage() for r in caplog.records), caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
