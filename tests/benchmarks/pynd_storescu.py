"""pynetdicom C-STORE SCU for the benchmarks, in its fastest configuration.

    .venv/bin/python tests/benchmarks/pynd_storescu.py [-aet AET] [-aec AET] [-r] ADDR PORT PATH...

Every file under PATH (files, or directories; ``-r`` recurses) goes in ONE association.
One presentation context is proposed per SOP class, with the transfer syntaxes the
files use (read from their File Meta). Files are sent with
``_config.STORE_SEND_CHUNKED_DATASET = True``: streamed from disk, never decoded.
TCP_NODELAY is set on the association socket as soon as it is connected (pynetdicom
never sets it; without it Nagle + delayed ACK cost ~40 ms per instance).

Prints one JSON line (sent, failed, in-association seconds) and exits 1 if anything
failed. pynetdicom is a peer for tests and benchmarks only; the package never imports it.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path

from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config, evt

MAX_CONTEXTS = 128


def set_nodelay(event: evt.Event) -> None:
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def collect(paths: list[str], recurse: bool) -> list[Path]:
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = path.rglob("*") if recurse else path.iterdir()
            files.extend(sorted(p for p in found if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise SystemExit(f"pynd_storescu: no such file or directory: {name}")
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("addr")
    parser.add_argument("port", type=int)
    parser.add_argument("paths", nargs="+", metavar="PATH")
    parser.add_argument("-aet", "--calling-aet", dest="aet", default="PYNDSTORESCU")
    parser.add_argument("-aec", "--called-aet", dest="aec", default="ANY-SCP")
    parser.add_argument("-r", "--recurse", action="store_true")
    args = parser.parse_args(argv)

    files = collect(args.paths, args.recurse)
    contexts: dict[str, set[str]] = {}
    for path in files:
        meta = read_file_meta_info(path)
        contexts.setdefault(str(meta.MediaStorageSOPClassUID), set()).add(
            str(meta.TransferSyntaxUID)
        )
    if len(contexts) > MAX_CONTEXTS:
        raise SystemExit(f"pynd_storescu: {len(contexts)} SOP classes, at most {MAX_CONTEXTS}")

    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title=args.aet)
    for sop_class, syntaxes in sorted(contexts.items()):
        ae.add_requested_context(sop_class, sorted(syntaxes))

    t0 = time.perf_counter()
    assoc = ae.associate(
        args.addr, args.port, ae_title=args.aec, evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)]
    )
    if not assoc.is_established:
        print(json.dumps({"sent": 0, "failed": len(files), "error": "association not established"}))
        return 1
    failed = 0
    for n, path in enumerate(files, start=1):
        status = assoc.send_c_store(path, msg_id=n % 65536)
        if not status or status.Status != 0x0000:
            failed += 1
            print(f"pynd_storescu: {path}: {status or 'no response'}", file=sys.stderr)
    assoc.release()
    elapsed = time.perf_counter() - t0
    print(json.dumps({"sent": len(files) - failed, "failed": failed, "assoc_s": round(elapsed, 4)}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
