"""echoscp: answer C-ECHO requests (PS3.7 9.1.5).

python -m protocol echoscp [options] PORT
"""

from __future__ import annotations

import argparse

from protocol.acse import AcceptorPolicy
from protocol.apps.common import (
    add_logging_options,
    add_network_options,
    add_tls_options,
    port_number,
    run,
    server_tls_context,
    setup_logging,
    timeouts_from,
)
from protocol.dimse import CStoreRQ
from protocol.limits import Limits
from protocol.net import AssociationInfo, StoreOutcome, start_server
from protocol.net.server import StoreSink
from protocol.status import SOP_CLASS_NOT_SUPPORTED
from protocol.uids import EXPLICIT_VR_BE, EXPLICIT_VR_LE, IMPLICIT_VR_LE, VERIFICATION


class EchoHandler:
    def on_echo(self, info: AssociationInfo) -> int:
        return 0

    def on_store(
        self, info: AssociationInfo, request: CStoreRQ, transfer_syntax: str
    ) -> StoreSink | StoreOutcome:
        return StoreOutcome(SOP_CLASS_NOT_SUPPORTED, "this SCP only answers C-ECHO")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="echoscp", description="Answer C-ECHO requests.")
    parser.add_argument("port", type=port_number, help="port to listen on")
    parser.add_argument("--bind", default="", metavar="ADDR", help="address to bind (default: all)")
    add_network_options(parser, scu=False)
    parser.add_argument("--max-associations", type=int, default=10, metavar="N")
    add_tls_options(parser, server=True)
    add_logging_options(parser)
    return parser


async def _serve(args: argparse.Namespace) -> int:
    policy = AcceptorPolicy(
        ae_title=args.aet or "ECHOSCP",
        require_called_ae=args.aet is not None,
        supported={VERIFICATION: (EXPLICIT_VR_LE, IMPLICIT_VR_LE, EXPLICIT_VR_BE)},
        max_pdu_length=args.max_pdu,
    )
    limits = Limits(max_pdu_length=args.max_pdu, max_associations=args.max_associations)
    server = await start_server(
        EchoHandler(),
        policy,
        args.bind or None,
        args.port,
        limits=limits,
        timeouts=timeouts_from(args, scu=False),
        ssl=server_tls_context(args),
    )
    await server.serve_forever()
    return 0


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    return run(_serve(args))
