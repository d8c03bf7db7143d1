"""A store whose durable completion takes longer than the idle timeout is answered, not
aborted: while the SCP makes the response the peer is silent by the protocol (PS3.7: no
asynchronous operations window, it waits for the C-STORE-RSP), so the idle timer counts
only from the response on. Over a real socket to ``protocol.net.start_server``; found
with a 64 MiB deflated element bomb whose walk outlived the catalogue node's 3 s."""

from __future__ import annotations

import asyncio

from test_scp_read_batches import _read_pdu, associate_rq, c_store_rq, p_data

from protocol.acse import AcceptorPolicy
from protocol.net import AssociationInfo, StoreOutcome, Timeouts, start_server

IDLE = 0.5
ELEMENT = b"\x08\x00\x60\x00\x43\x53\x02\x00CT"  # (0008,0060) CS "CT", explicit VR LE


class _SlowSink:
    def write(self, data: bytes | memoryview) -> None:
        pass

    async def finish(self) -> StoreOutcome:
        await asyncio.sleep(3 * IDLE)  # a walk or a commit that takes a while
        return StoreOutcome(0)

    def discard(self) -> None:
        pass


class _Handler:
    def on_echo(self, info: AssociationInfo) -> int:
        return 0

    def on_store(self, info: AssociationInfo, request: object, transfer_syntax: str) -> _SlowSink:
        return _SlowSink()


async def _store_then_idle() -> tuple[bytes, bytes]:
    """The answer to one C-STORE, then what comes once we stay silent after it."""
    policy = AcceptorPolicy(accept_any_abstract_syntax=True)
    server = await start_server(_Handler(), policy, timeouts=Timeouts(artim=0.5, idle=IDLE))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(associate_rq())
        assert (await _read_pdu(reader))[0] == 0x02
        writer.write(p_data(3, 3, c_store_rq(1, "1.2.3.1")) + p_data(3, 2, ELEMENT))
        answer = await _read_pdu(reader)
        after = await _read_pdu(reader)  # our silence now is the peer's: idle applies
        writer.close()
        return answer, after
    finally:
        await server.close(grace=1)


def test_a_completion_longer_than_the_idle_timeout_is_answered_then_idle_counts() -> None:
    answer, after = asyncio.run(_store_then_idle())
    assert answer[0] == 0x04  # P-DATA-TF: the C-STORE-RSP, not an A-ABORT
    assert after[0] == 0x07  # then the idle timeout, counted from the response, aborts
