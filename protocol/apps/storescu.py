"""storescu: send Part 10 files to a peer with C-STORE (PS3.4 B.2).

    python -m protocol storescu [options] ADDR PORT PATH [PATH ...]

Files are sent as they are, without decoding or transcoding: for every distinct
(SOP class, transfer syntax) among the files one presentation context is proposed, and
every file goes over the one association (several, if more than 128 contexts are needed).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from pathlib import Path

from protocol.apps.common import (
    AppError,
    add_logging_options,
    add_network_options,
    add_tls_options,
    client_tls_context,
    port_number,
    run,
    setup_logging,
    timeouts_from,
)
from protocol.errors import ProtocolError
from protocol.limits import Limits
from protocol.net import ContextRequest, associate
from protocol.part10 import NotPart10Error, Part10Info, read_part10
from protocol.status import StatusCategory, category

log = logging.getLogger("protocol.apps.storescu")

_MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: odd context ids 1..255


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="storescu", description="Send DICOM files with C-STORE.")
    parser.add_argument("addr", help="peer host name or address")
    parser.add_argument("port", type=port_number, help="peer port")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="files or directories to send")
    parser.add_argument("-r", "--recurse", action="store_true", help="recurse into directories")
    add_network_options(parser, scu=True)
    parser.add_argument(
        "--priority",
        type=int,
        choices=(0, 1, 2),
        default=0,
        help="C-STORE priority: 0 medium, 1 high, 2 low (PS3.7 9.1.1)",
    )
    add_tls_options(parser, server=False)
    add_logging_options(parser)
    return parser


def _iter_files(paths: list[str], recurse: bool) -> Iterator[Path]:
    for name in paths:
        path = Path(name)
        if path.is_dir():
            walker = sorted(path.rglob("*") if recurse else path.iterdir())
            yield from (p for p in walker if p.is_file())
        elif path.is_file():
            yield path
        else:
            raise AppError(f"{name}: no such file or directory")


def _scan(paths: list[str], recurse: bool) -> list[tuple[Path, Part10Info]]:
    found = []
    for path in _iter_files(paths, recurse):
        try:
            found.append((path, read_part10(path)))
        except NotPart10Error as exc:
            log.warning("%s: skipped, not a DICOM Part 10 file (%s)", path, exc)
    return found


def _batches(files: list[tuple[Path, Part10Info]]) -> Iterator[list[tuple[Path, Part10Info]]]:
    """Groups of files whose (SOP class, transfer syntax) pairs fit in one association."""
    by_pair: dict[tuple[str, str], list[tuple[Path, Part10Info]]] = {}
    for path, info in files:
        by_pair.setdefault((info.sop_class_uid, info.transfer_syntax), []).append((path, info))
    pairs = list(by_pair)
    for start in range(0, len(pairs), _MAX_CONTEXTS):
        batch: list[tuple[Path, Part10Info]] = []
        for pair in pairs[start : start + _MAX_CONTEXTS]:
            batch.extend(by_pair[pair])
        batch.sort(key=lambda item: str(item[0]))
        yield batch


async def _send_batch(args: argparse.Namespace, batch: list[tuple[Path, Part10Info]]) -> int:
    pairs = sorted({(info.sop_class_uid, info.transfer_syntax) for _, info in batch})
    assoc = await associate(
        args.addr,
        args.port,
        [ContextRequest(sop_class, (ts,)) for sop_class, ts in pairs],
        called_ae=args.aec,
        calling_ae=args.aet or "STORESCU",
        limits=Limits(max_pdu_length=args.max_pdu),
        timeouts=timeouts_from(args, scu=True),
        ssl=client_tls_context(args),
        server_hostname=args.addr,
    )
    failed = 0
    try:
        for path, _ in batch:
            try:
                response = await assoc.send_c_store_file(path, priority=args.priority)
            except ProtocolError as exc:
                if not assoc.is_alive:
                    raise
                log.error("%s: not sent: %s", path, exc)
                failed += 1
                continue
            status_category = category(response.status)
            if status_category in (StatusCategory.SUCCESS, StatusCategory.WARNING):
                log.info("%s: stored (status 0x%04X)", path, response.status)
            else:
                failed += 1
                comment = f": {response.error_comment}" if response.error_comment else ""
                log.error("%s: C-STORE failed with status 0x%04X%s", path, response.status, comment)
    except BaseException:
        assoc.abort()
        raise
    await assoc.release()
    return failed


async def _send(args: argparse.Namespace) -> int:
    files = _scan(args.paths, args.recurse)
    if not files:
        raise AppError("no DICOM files to send")
    failed = 0
    for batch in _batches(files):
        failed += await _send_batch(args, batch)
    if failed:
        raise AppError(f"{failed} of {len(files)} instances were not stored")
    log.info("sent %d instances", len(files))
    return 0


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    return run(_send(args))
