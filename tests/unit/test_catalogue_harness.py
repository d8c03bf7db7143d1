"""The catalogue harness itself (tests/e2e/catalogue/harness.py, fault_proxy.py): its
frames are catalogue B.0's bytes, and the fault proxy does what each fault says, against
a local echo server on real sockets."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.e2e.catalogue.fault_proxy import FaultProxy
from tests.e2e.catalogue.harness import (
    ABORT_1,
    C_ECHO_PDATA,
    RawPeer,
    abort_8,
    associate_rq,
    edit,
    set_length,
    truncate,
)
from tests.interop.interop_support import recv_until_closed

#: Catalogue B.0's minimal A-ASSOCIATE-RQ, spelled out (191 bytes).
B0_ASSOCIATE_RQ = (
    bytes.fromhex("01 00 00 00 00 b9 00 01 00 00")
    + b"ROUTER".ljust(16)
    + b"MODALITY".ljust(16)
    + bytes(32)
    + bytes.fromhex("10 00 00 15")
    + b"1.2.840.10008.3.1.1.1"
    + bytes.fromhex("20 00 00 2e 01 00 00 00 30 00 00 11")
    + b"1.2.840.10008.1.1"
    + bytes.fromhex("40 00 00 11")
    + b"1.2.840.10008.1.2"
    + bytes.fromhex("50 00 00 26 51 00 00 04 00 00 40 00 52 00 00 1a")
    + b"1.2.826.0.1.3680043.9.9999"
)

#: Catalogue B.0's P-DATA-TF with a C-ECHO-RQ (80 bytes).
B0_C_ECHO_PDATA = (
    bytes.fromhex(
        "04 00 00 00 00 4a 00 00 00 46 01 03 00 00 00 00 04 00 00 00 38 00 00 00"
        "00 00 02 00 12 00 00 00"
    )
    + b"1.2.840.10008.1.1\x00"
    + bytes.fromhex(
        "00 00 00 01 02 00 00 00 30 00 00 00 10 01 02 00 00 00 01 0000 00 00 08 02 00 00 00 01 01"
    )
)


def test_frames_are_the_catalogue_b0_bytes():
    assert associate_rq() == B0_ASSOCIATE_RQ and len(B0_ASSOCIATE_RQ) == 191
    assert C_ECHO_PDATA == B0_C_ECHO_PDATA and len(C_ECHO_PDATA) == 80
    assert bytes.fromhex("07 00 00 00 00 04 00 00 00 00") == ABORT_1
    assert abort_8(6) == bytes.fromhex("07 00 00 00 00 04 00 00 02 06")


def test_edits():
    rq = associate_rq()
    assert edit(rq, 0x63, b"\x20\x00\xff\xff")[0x63:0x67] == b"\x20\x00\xff\xff"
    assert len(edit(rq, 0x63, b"\xff")) == len(rq)
    assert set_length(rq, 0xFFFFFFFF)[:6] == bytes.fromhex("01 00 ff ff ff ff")
    assert set_length(rq, 1)[6:] == rq[6:]
    assert truncate(rq, 100) == rq[:100]


# --------------------------------------------------------------------------------------
# the fault proxy, against an echo server
# --------------------------------------------------------------------------------------
class EchoServer:
    """Echoes every byte back; records what it received per connection."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.received: list[bytearray] = []
        self.closed_by_peer: list[threading.Event] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            got, closed = bytearray(), threading.Event()
            self.received.append(got)
            self.closed_by_peer.append(closed)
            thread = threading.Thread(target=self._serve, args=(conn, got, closed), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket, got: bytearray, closed: threading.Event) -> None:
        conn.settimeout(0.2)
        with conn:
            while not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not data:
                    break
                got.extend(data)
                try:
                    conn.sendall(data)
                except OSError:
                    break
        closed.set()

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def echo_server() -> Iterator[EchoServer]:
    server = EchoServer()
    try:
        yield server
    finally:
        server.close()


def _peer(proxy: FaultProxy) -> RawPeer:
    return RawPeer("127.0.0.1", proxy.port, timeout=10).connect()


def test_plain_proxy_relays_both_ways(echo_server):
    with FaultProxy(("127.0.0.1", echo_server.port)) as proxy:
        peer = _peer(proxy)
        peer.send(b"hello world")
        assert peer.recv_exactly(11, 5) == b"hello world"
        peer.close()
        assert echo_server.closed_by_peer[0].wait(5), "the FIN was not passed on"
    assert proxy.connections == 1


def test_latency_delays_each_chunk(echo_server):
    with FaultProxy(("127.0.0.1", echo_server.port), latency=0.3, direction="upstream") as p:
        peer = _peer(p)
        started = time.monotonic()
        peer.send(b"x")
        assert peer.recv_exactly(1, 5) == b"x"
        assert time.monotonic() - started >= 0.3
        peer.close()


def test_slices_arrive_whole_and_in_order(echo_server):
    data = bytes(range(256)) * 4
    with FaultProxy(("127.0.0.1", echo_server.port), slice_size=7, slice_interval=0) as p:
        peer = _peer(p)
        peer.send(data)
        assert peer.recv_exactly(len(data), 10) == data
        peer.close()


def test_blackhole_swallows_everything(echo_server):
    with FaultProxy(("127.0.0.1", echo_server.port), blackhole=True, direction="upstream") as p:
        peer = _peer(p)
        peer.send(b"lost")
        assert peer.recv_exactly(4, 0.5) == b""
        peer.close()
    assert bytes(echo_server.received[0]) == b""


def test_drop_after_bytes_keeps_the_connection_open(echo_server):
    with FaultProxy(
        ("127.0.0.1", echo_server.port), drop_after_bytes=4, direction="upstream"
    ) as proxy:
        peer = _peer(proxy)
        peer.send(b"abcdefgh")
        assert peer.recv_exactly(4, 5) == b"abcd"
        peer.send(b"more")
        assert peer.recv_exactly(1, 0.5) == b"", "bytes past the limit got through"
        assert not echo_server.closed_by_peer[0].is_set()
        peer.close()


def test_close_after_bytes_sends_a_fin(echo_server):
    with FaultProxy(
        ("127.0.0.1", echo_server.port), close_after_bytes=3, direction="upstream"
    ) as proxy:
        peer = _peer(proxy)
        peer.send(b"abcdef")
        data, closed = recv_until_closed(peer._socket(), 5)
        assert closed, "no FIN after the limit"
        assert b"abc".startswith(data), data
        deadline = time.monotonic() + 5
        while not echo_server.closed_by_peer and time.monotonic() < deadline:
            time.sleep(0.01)
        assert echo_server.closed_by_peer[0].wait(5)
        assert bytes(echo_server.received[0]) == b"abc"


def test_reset_after_bytes_resets(echo_server):
    with FaultProxy(
        ("127.0.0.1", echo_server.port), reset_after_bytes=2, direction="upstream"
    ) as proxy:
        peer = _peer(proxy)
        peer.send(b"abcd")
        with pytest.raises(ConnectionResetError):
            peer._socket().settimeout(5)
            while peer._socket().recv(10):
                pass
        peer.close()


def test_bandwidth_paces_the_bytes(echo_server):
    with FaultProxy(
        ("127.0.0.1", echo_server.port), bandwidth=2000, slice_size=100, direction="upstream"
    ) as proxy:
        peer = _peer(proxy)
        started = time.monotonic()
        peer.send(bytes(1000))
        assert len(peer.recv_exactly(1000, 10)) == 1000
        assert time.monotonic() - started >= 0.4
        peer.close()
