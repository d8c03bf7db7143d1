"""storescp: receive C-STORE requests and write each dataset as a Part 10 file.

    python -m protocol storescp [options] PORT

File names never come from peer text unchecked (CVE-2022-2119/2120): a file is named
after its SOP Instance UID only when that is a valid UID (digits and dots, PS3.5 9.1),
otherwise after a generated id. Files are written without fsync, as DCMTK's storescp
does; the router's listener is the durable receiver.
"""

from __future__ import annotations

import argparse
import logging
import os
import uuid
from pathlib import Path

from protocol.acse import AcceptorPolicy
from protocol.apps.common import (
    AppError,
    add_logging_options,
    add_network_options,
    add_tls_options,
    add_transfer_syntax_options,
    port_number,
    run,
    server_tls_context,
    setup_logging,
    timeouts_from,
    uncompressed_preference,
)
from protocol.dimse import CStoreRQ
from protocol.limits import Limits
from protocol.net import AssociationInfo, StoreOutcome, start_server
from protocol.net.server import StoreSink
from protocol.part10 import build_file_meta, safe_uid_filename
from protocol.status import SUCCESS
from protocol.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

log = logging.getLogger("protocol.apps.storescp")


class _FileSink:
    """Writes one dataset to a temporary file in the output directory, then renames it."""

    def __init__(self, directory: Path, final_name: str, meta: bytes) -> None:
        self._directory = directory
        self._final = directory / final_name
        self._temp = directory / f".{uuid.uuid4().hex}.part"
        # O_EXCL | O_NOFOLLOW: never write through a planted symlink (catalogue PT-09).
        fd = os.open(self._temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
        self._file = os.fdopen(fd, "wb", buffering=1 << 20)
        self._file.write(meta)

    def write(self, data: bytes | memoryview) -> None:
        self._file.write(data)

    def finish(self) -> StoreOutcome:
        self._file.close()
        os.replace(self._temp, self._final)
        return StoreOutcome(SUCCESS)

    def discard(self) -> None:
        self._file.close()
        self._temp.unlink(missing_ok=True)


class _DiscardSink:
    def write(self, data: bytes | memoryview) -> None:
        pass

    def finish(self) -> StoreOutcome:
        return StoreOutcome(SUCCESS)

    def discard(self) -> None:
        pass


class StoreHandler:
    def __init__(self, output_dir: Path | None, ae_title: str) -> None:
        self.output_dir = output_dir
        self.ae_title = ae_title

    def on_echo(self, info: AssociationInfo) -> int:
        return SUCCESS

    def on_store(
        self, info: AssociationInfo, request: CStoreRQ, transfer_syntax: str
    ) -> StoreSink | StoreOutcome:
        if self.output_dir is None:
            return _DiscardSink()
        name = safe_uid_filename(request.affected_sop_instance_uid)
        if name is None:
            log.warning(
                "%s: SOP Instance UID is not a valid UID; using a generated file name", info.peer
            )
            name = uuid.uuid4().hex
        meta = build_file_meta(
            request.affected_sop_class_uid,
            request.affected_sop_instance_uid,
            transfer_syntax,
            IMPLEMENTATION_CLASS_UID,
            IMPLEMENTATION_VERSION_NAME,
            source_ae=info.calling_ae,
        )
        log.info("%s: storing %s", info.peer, name)
        return _FileSink(self.output_dir, name + ".dcm", meta)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="storescp", description="Receive C-STORE requests.")
    parser.add_argument("port", type=port_number, help="port to listen on")
    parser.add_argument("--bind", default="", metavar="ADDR", help="address to bind (default: all)")
    add_network_options(parser, scu=False)
    parser.add_argument(
        "-od",
        "--output-directory",
        default=".",
        metavar="DIR",
        help="write received files here (default: current directory)",
    )
    parser.add_argument("--ignore", action="store_true", help="receive data but do not store it")
    parser.add_argument("--max-associations", type=int, default=64, metavar="N")
    parser.add_argument(
        "--require-called-aet",
        action="store_true",
        help="reject associations not addressed to our AE title",
    )
    add_transfer_syntax_options(parser, scu=False)
    add_tls_options(parser, server=True)
    add_logging_options(parser)
    return parser


async def _serve(args: argparse.Namespace) -> int:
    output_dir: Path | None = None
    if not args.ignore:
        output_dir = Path(args.output_directory)
        if not output_dir.is_dir():
            raise AppError(f"output directory {output_dir} does not exist")
    if args.max_associations < 1:
        raise AppError("--max-associations must be at least 1")
    ae_title = args.aet or "STORESCP"
    policy = AcceptorPolicy(
        ae_title=ae_title,
        require_called_ae=args.require_called_aet,
        accept_any_abstract_syntax=True,
        # Without -x options the requestor's order decides: an SCU sending files as they
        # are (compressed ones included) proposes the file's own transfer syntax first.
        transfer_syntaxes=uncompressed_preference(args.ts) if args.ts else (),
        accept_any_transfer_syntax=args.ts is None,
        max_pdu_length=args.max_pdu,
    )
    limits = Limits(
        max_pdu_length=args.max_pdu,
        max_associations=args.max_associations,
        max_associations_per_calling_ae=args.max_associations,
    )
    server = await start_server(
        StoreHandler(output_dir, ae_title),
        policy,
        args.bind or None,
        args.port,
        limits=limits,
        timeouts=timeouts_from(args, scu=False),
        ssl=server_tls_context(args),
    )
    log.info("listening on port %d as %s", server.port, ae_title)
    await server.serve_forever()
    return 0


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    return run(_serve(args))
