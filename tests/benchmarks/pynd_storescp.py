"""pynetdicom C-STORE SCP for the benchmarks, in its fastest configuration.

    .venv/bin/python tests/benchmarks/pynd_storescp.py [--bind ADDR] [-aet AET] -od DIR PORT

``_config.STORE_RECV_CHUNKED_DATASET = True``: pynetdicom spools each received data set
(with a File Meta it builds) to a temporary file as it arrives; the handler renames that
file as it is into DIR as ``<SOP Instance UID>.dcm``, without decoding it. The spool is
``DIR/.incoming`` (same file system, so the rename is atomic; hidden, so file counts skip
it). No fsync, like DCMTK's storescp. TCP_NODELAY is set on every accepted socket
(pynetdicom never sets it). Answers C-ECHO. Runs until SIGTERM/SIGINT.

pynetdicom is a peer for tests and benchmarks only; the package never imports it.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import sys
import tempfile
import uuid
from pathlib import Path
from types import FrameType

from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def set_nodelay(event: evt.Event) -> None:
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--bind", default="127.0.0.1", metavar="ADDR")
    parser.add_argument("-aet", "--ae-title", dest="aet", default="STORESCP")
    parser.add_argument("-od", "--output-directory", dest="out", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    out: Path = args.out
    spool = out / ".incoming"
    spool.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(spool)
    _config.STORE_RECV_CHUNKED_DATASET = True

    def handle_store(event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID or "")
        name = uid if len(uid) <= 64 and _UID.fullmatch(uid) else uuid.uuid4().hex
        # pynetdicom unlinks its temporary file after the handler; gone already is fine.
        os.replace(event.dataset_path, out / f"{name}.dcm")
        return 0x0000

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
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
