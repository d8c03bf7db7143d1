"""echoscu: verify a peer with C-ECHO (PS3.7 9.1.5).

python -m protocol echoscu [options] ADDR PORT
"""

from __future__ import annotations

import argparse
import logging

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
from protocol.limits import Limits
from protocol.net import ContextRequest, associate
from protocol.uids import IMPLICIT_VR_LE, VERIFICATION

log = logging.getLogger("protocol.apps.echoscu")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="echoscu", description="Send C-ECHO requests to a peer.")
    parser.add_argument("addr", help="peer host name or address")
    parser.add_argument("port", type=port_number, help="peer port")
    add_network_options(parser, scu=True)
    parser.add_argument("--repeat", type=int, default=1, metavar="N", help="send N C-ECHO requests")
    parser.add_argument("--abort", action="store_true", help="abort instead of releasing")
    add_tls_options(parser, server=False)
    add_logging_options(parser)
    return parser


async def _echo(args: argparse.Namespace) -> int:
    if args.repeat < 1:
        raise AppError("--repeat must be at least 1")
    assoc = await associate(
        args.addr,
        args.port,
        [ContextRequest(VERIFICATION, (IMPLICIT_VR_LE,))],
        called_ae=args.aec,
        calling_ae=args.aet or "ECHOSCU",
        limits=Limits(max_pdu_length=args.max_pdu),
        timeouts=timeouts_from(args, scu=True),
        ssl=client_tls_context(args),
        server_hostname=args.addr,
    )
    failed = 0
    for _ in range(args.repeat):
        status = await assoc.send_c_echo()
        log.info("C-ECHO response: status 0x%04X", status)
        failed += status != 0
    if args.abort:
        assoc.abort()
        await assoc.wait_closed()
    else:
        await assoc.release()
    if failed:
        raise AppError(f"{failed} of {args.repeat} C-ECHO requests did not succeed")
    return 0


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    return run(_echo(args))
