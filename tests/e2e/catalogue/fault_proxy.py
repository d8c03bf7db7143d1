"""A TCP proxy with Toxiproxy-like faults (reliability catalogue Part C.4).

Real sockets on both sides, one thread per direction of each connection, so nothing of
the network is mocked. ``FaultProxy(target=(host, port), ...)`` listens on a free
loopback port (``.port``) while used as a context manager; each accepted connection is
relayed to ``target`` with the faults applied to ``direction``: "upstream" (client to
target), "downstream" (target to client) or "both".

Faults (combinable):
  latency            seconds added before each chunk is forwarded
  bandwidth          bytes per second (sleeps after each chunk)
  slice_size         forward in slices of this many bytes, ``slice_interval`` apart
  blackhole          read and discard everything (the peer sees silence, no close)
  reset_after_bytes  after N bytes in a direction, RST both sides (SO_LINGER 0)
  drop_after_bytes   forward the first N bytes, silently discard the rest (a cut cable)
  close_after_bytes  forward the first N bytes, then close both sides with a FIN
                     (Toxiproxy's limit_data)
"""

from __future__ import annotations

import contextlib
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field

CHUNK = 65536


@dataclass
class _Link:
    client: socket.socket
    server: socket.socket
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False

    def close(self, reset: bool = False) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        for sock in (self.client, self.server):
            with contextlib.suppress(OSError):
                if reset:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                else:
                    sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


class FaultProxy:
    def __init__(
        self,
        target: tuple[str, int],
        latency: float = 0.0,
        bandwidth: int | None = None,
        slice_size: int | None = None,
        blackhole: bool = False,
        reset_after_bytes: int | None = None,
        drop_after_bytes: int | None = None,
        direction: str = "both",
        *,
        close_after_bytes: int | None = None,
        slice_interval: float = 0.001,
        host: str = "127.0.0.1",
    ) -> None:
        assert direction in ("both", "upstream", "downstream"), direction
        self.target = target
        self.latency = latency
        self.bandwidth = bandwidth
        self.slice_size = slice_size
        self.slice_interval = slice_interval
        self.blackhole = blackhole
        self.reset_after_bytes = reset_after_bytes
        self.drop_after_bytes = drop_after_bytes
        self.close_after_bytes = close_after_bytes
        self.direction = direction
        self.host = host
        self.port = 0
        #: Connections accepted so far.
        self.connections = 0
        #: "host:port" of each connection the proxy made to the target: the address the
        #: target logs for the peer behind the proxy.
        self.upstream_addresses: list[str] = []
        #: Bytes forwarded per direction (after the faults).
        self.forwarded = {"upstream": 0, "downstream": 0}
        self._listener: socket.socket | None = None
        self._links: list[_Link] = []
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    # -- lifecycle -------------------------------------------------------------------
    def __enter__(self) -> FaultProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, 0))
        listener.listen(64)
        listener.settimeout(0.2)
        self._listener = listener
        self.port = int(listener.getsockname()[1])
        self._spawn(self._accept_loop, "proxy-accept")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop accepting, close every relayed connection, join the threads."""
        self._stopping.set()
        for link in list(self._links):
            link.close()
        for thread in list(self._threads):
            thread.join(timeout=10)
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def cut(self, reset: bool = False) -> None:
        """Close every connection relayed so far now (FIN, or RST with ``reset``)."""
        for link in list(self._links):
            link.close(reset=reset)

    # -- relaying --------------------------------------------------------------------
    def _spawn(self, target: object, name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()  # the target is down: the client sees a close
                continue
            for sock in (client, server):
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.connections += 1
            host, port = server.getsockname()[:2]
            self.upstream_addresses.append(f"{host}:{port}")
            link = _Link(client, server)
            self._links.append(link)
            self._spawn(self._pump, "proxy-up", link, client, server, "upstream")
            self._spawn(self._pump, "proxy-down", link, server, client, "downstream")

    def _faulty(self, direction: str) -> bool:
        return self.direction in ("both", direction)

    def _pump(self, link: _Link, src: socket.socket, dst: socket.socket, direction: str) -> None:
        faulty = self._faulty(direction)
        seen = 0
        try:
            while not link.closed:
                data = src.recv(CHUNK)
                if not data:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)  # pass the FIN on
                    return
                if not faulty:
                    dst.sendall(data)
                    self.forwarded[direction] += len(data)
                    continue
                start, seen = seen, seen + len(data)
                if self.blackhole:
                    continue
                if self.reset_after_bytes is not None and seen >= self.reset_after_bytes:
                    self._send(dst, data[: max(0, self.reset_after_bytes - start)], direction)
                    link.close(reset=True)
                    return
                for limit, close in (
                    (self.close_after_bytes, True),
                    (self.drop_after_bytes, False),
                ):
                    if limit is not None and seen >= limit:
                        data = data[: max(0, limit - start)]
                        self._send(dst, data, direction)
                        if close:
                            link.close()
                            return
                        data = b""
                        break
                self._send(dst, data, direction)
        except OSError:
            link.close()

    def _send(self, dst: socket.socket, data: bytes, direction: str) -> None:
        if not data:
            return
        if self.latency:
            time.sleep(self.latency)
        step = self.slice_size or len(data)
        for i in range(0, len(data), step):
            piece = data[i : i + step]
            dst.sendall(piece)
            self.forwarded[direction] += len(piece)
            if self.bandwidth:
                time.sleep(len(piece) / self.bandwidth)
            if self.slice_size and i + step < len(data):
                time.sleep(self.slice_interval)


# One module under both names it may be imported by (see harness.py).
sys.modules.setdefault("fault_proxy", sys.modules[__name__])
sys.modules.setdefault("tests.e2e.catalogue.fault_proxy", sys.modules[__name__])
