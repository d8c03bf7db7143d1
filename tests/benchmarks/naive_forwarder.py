"""A hand-written pynetdicom forwarder: the baseline the performance issue compares against.

    .venv/bin/python tests/benchmarks/naive_forwarder.py --dest-port Q [--dest-host H]
        [--dest-aet STORESCP] [--bind 127.0.0.1] [--aet NAIVE] PORT

What a pynetdicom user would write in an afternoon: a C-STORE SCP whose handler takes
the received data set and sends it on at once (synchronously, in the handler's thread)
over ONE outbound association that stays open between instances, then answers the
sender with the destination's status. Nothing is written to disk, nothing is retried:
an instance is acknowledged only once the destination has acknowledged it, and it is
lost if the destination fails in between (no durability of its own).

TCP_NODELAY is set on both sockets (pynetdicom leaves Nagle's algorithm on, and its
several writes per message then wait for the peer's delayed ACK). The outbound
association proposes pynetdicom's standard storage contexts; one that was dropped is
opened again for the next instance; an instance whose response never came (a pynetdicom
race under load, see Onward.forward) is sent once more on a new one. Answers C-ECHO.
Runs until SIGTERM/SIGINT.

pynetdicom is a peer for tests and benchmarks only; the package never imports it.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import threading
from types import FrameType

from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, StoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

# PS3.4 Annex B.2.3: Refused, Out of Resources (used when the destination is unreachable
# or gave no response, so the sender sees a failure rather than a false success).
OUT_OF_RESOURCES = 0xA700
# A store over loopback answers in well under a second, even a 32 MB one under load.
DIMSE_TIMEOUT_S = 10.0
LOGGER = logging.getLogger("naive_forwarder")


def set_nodelay(event: evt.Event) -> None:
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Onward:
    """The held-open association to the destination, one instance at a time."""

    def __init__(self, host: str, port: int, aet: str, our_aet: str) -> None:
        self.address, self.aet = (host, port), aet
        self.ae = AE(ae_title=our_aet)
        self.ae.requested_contexts = StoragePresentationContexts
        self.ae.dimse_timeout = DIMSE_TIMEOUT_S
        self.assoc: Association | None = None
        self.lock = threading.Lock()  # several inbound associations share one outbound

    def forward(self, dataset: Dataset) -> int:
        with self.lock:
            status = self._send(dataset)
            if status is None:
                # No response within the DIMSE timeout: pynetdicom aborted the association.
                # Seen under load: the requestor's reactor thread can take the C-STORE-RSP
                # off the queue before send_c_store waits for it ("Received unexpected
                # C-STORE service message"). Send once more on a new association.
                LOGGER.warning("no response from the destination: resending on a new association")
                status = self._send(dataset)
            return OUT_OF_RESOURCES if status is None else status

    def _send(self, dataset: Dataset) -> int | None:
        if self.assoc is None or not self.assoc.is_established:
            self.assoc = self.ae.associate(
                *self.address,
                ae_title=self.aet,
                evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)],
            )
            if not self.assoc.is_established:
                self.assoc = None
                return None
        rsp = self.assoc.send_c_store(dataset)
        status = getattr(rsp, "Status", None)
        return None if status is None else int(status)

    def close(self) -> None:
        with self.lock:
            if self.assoc is not None and self.assoc.is_established:
                self.assoc.release()
            self.assoc = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--bind", default="127.0.0.1", metavar="ADDR")
    parser.add_argument("--aet", default="NAIVE")
    parser.add_argument("--dest-host", default="127.0.0.1")
    parser.add_argument("--dest-port", type=int, required=True)
    parser.add_argument("--dest-aet", default="STORESCP")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    onward = Onward(args.dest_host, args.dest_port, args.dest_aet, args.aet)

    def handle_store(event: evt.Event) -> int:
        dataset = event.dataset  # decoded from the received bytes
        dataset.file_meta = event.file_meta  # carries the transfer syntax it came in
        return onward.forward(dataset)

    ae = AE(ae_title=args.aet)
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(Verification)
    server = ae.start_server(
        (args.bind, args.port),
        block=False,
        evt_handlers=[
            (evt.EVT_CONN_OPEN, set_nodelay),
            (evt.EVT_C_STORE, handle_store),
            (evt.EVT_C_ECHO, lambda event: 0x0000),
        ],
    )

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        signal.pause()
    finally:
        if server is not None:
            server.shutdown()
        onward.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
