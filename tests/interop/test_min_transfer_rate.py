"""Catalogue RX-03's other half, over a real socket to ``protocol.net.start_server``: a
data set sent as many tiny complete PDUs, each well inside the idle timeout and the
per-PDU deadline, is aborted (ABORT-U) once it has arrived for longer than
``Limits.min_rate_grace`` at less than ``Limits.min_dataset_rate`` on average; the sink
is discarded, never finished. A data set at a rate above the minimum is stored.

Scaled down: grace 1 s and 2,000 bytes/s here; the node's defaults are 60 s and 1 KiB/s
(``listener.min_transfer_grace`` / ``listener.min_transfer_rate``)."""

from __future__ import annotations

import asyncio
import logging

from test_scp_read_batches import (
    ABORT_1,
    _Handler,
    _read_pdu,
    associate_rq,
    c_store_rq,
    p_data,
)

from protocol.acse import AcceptorPolicy
from protocol.limits import Limits
from protocol.net import Timeouts, start_server

LIMITS = Limits(min_dataset_rate=2_000, min_rate_grace=1.0)
ELEMENT = b"\x08\x00\x60\x00\x43\x53\x02\x00CT"  # (0008,0060) CS "CT", explicit VR LE


async def _store(pieces: int, pause: float, handler: _Handler) -> list[bytes]:
    """One C-STORE whose data set goes as ``pieces`` PDUs ``pause`` seconds apart; what
    the server sent until it closed or answered."""
    policy = AcceptorPolicy(accept_any_abstract_syntax=True)
    timeouts = Timeouts(artim=0.5, idle=30.0, pdu=30.0)
    server = await start_server(handler, policy, limits=LIMITS, timeouts=timeouts)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(associate_rq())
        assert (await _read_pdu(reader))[0] == 0x02
        received: list[bytes] = []

        async def read() -> None:  # at once, before a later write of ours meets a reset
            while True:
                try:
                    received.append(await _read_pdu(reader))
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                if received[-1][0] == 0x04:  # the C-STORE-RSP: done
                    return

        reading = asyncio.ensure_future(read())
        writer.write(p_data(3, 3, c_store_rq(1, "1.2.3.1")))
        for i in range(pieces):
            if reading.done():
                break  # it answered or aborted
            try:
                writer.write(p_data(3, 2 if i == pieces - 1 else 0, ELEMENT))
                await writer.drain()
            except ConnectionError:
                break
            await asyncio.sleep(pause)
        await asyncio.wait_for(reading, 10)
        writer.close()
        return received
    finally:
        await server.close(grace=1)


def test_rx_03_a_data_set_trickled_in_tiny_pdus_is_aborted_below_the_minimum_rate(caplog):
    caplog.set_level(logging.WARNING)
    handler = _Handler()
    received = asyncio.run(_store(pieces=40, pause=0.1, handler=handler))  # ~100 B/s
    assert received == [ABORT_1]
    assert handler.finished == [] and handler.discarded == ["1.2.3.1"]
    lines = [r.getMessage() for r in caplog.records if "below the minimum" in r.getMessage()]
    assert len(lines) == 1 and "2000 bytes/s" in lines[0], caplog.text


def test_a_data_set_above_the_minimum_rate_is_stored() -> None:
    handler = _Handler()
    received = asyncio.run(_store(pieces=3, pause=0.0, handler=handler))
    assert [pdu[0] for pdu in received] == [0x04]  # the C-STORE-RSP
    assert handler.finished == ["1.2.3.1"]
