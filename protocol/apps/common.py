"""Options shared by the apps (pynetdicom's names where they apply) and their plumbing."""

from __future__ import annotations

import argparse
import asyncio
import logging
import logging.config
import ssl
import sys
from collections.abc import Coroutine
from typing import Any

from protocol.errors import ProtocolError
from protocol.limits import Limits
from protocol.net.association import Timeouts
from protocol.uids import EXPLICIT_VR_BE, EXPLICIT_VR_LE, IMPLICIT_VR_LE

log = logging.getLogger("protocol.apps")


class AppError(Exception):
    """A failure the app reports as one line and a non-zero exit status."""


def ae_title(value: str) -> str:
    """PS3.5 6.2: at most 16 characters of the default repertoire, no backslash or controls."""
    text = value.strip()
    if not text or len(text) > 16 or any(c == "\\" or not (" " <= c <= "~") for c in text):
        raise argparse.ArgumentTypeError(f"invalid AE title {value!r} (1-16 printable characters)")
    return text


def port_number(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} out of range 0-65535")
    return port


def positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {value!r}") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be greater than 0")
    return number


def pdu_length(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid PDU length {value!r}") from None
    # PS3.8 D.1: 0 means unlimited; anything else must carry a PDV header and data.
    if number != 0 and not 4096 <= number <= 0x7FFFFFFF:
        raise argparse.ArgumentTypeError("PDU length must be 0 (unlimited) or 4096..2147483647")
    return number


def add_logging_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("logging")
    verbosity = group.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="only errors")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="informational messages")
    verbosity.add_argument(
        "-d", "--debug", action="store_true", help="debug messages, PDU summaries"
    )
    verbosity.add_argument(
        "-ll",
        "--log-level",
        choices=["critical", "error", "warn", "warning", "info", "debug"],
        help="use this level",
    )
    group.add_argument(
        "-lc", "--log-config", metavar="FILE", help="logging config file (fileConfig)"
    )


def add_network_options(parser: argparse.ArgumentParser, *, scu: bool) -> None:
    group = parser.add_argument_group("network")
    group.add_argument(
        "-aet", "--calling-aet" if scu else "--ae-title", dest="aet", type=ae_title, metavar="AET"
    )
    if scu:
        group.add_argument(
            "-aec", "--called-aet", dest="aec", type=ae_title, default="ANY-SCP", metavar="AET"
        )
        group.add_argument(
            "-to", "--connection-timeout", type=positive_float, default=30.0, metavar="SEC"
        )
    group.add_argument("-ta", "--acse-timeout", type=positive_float, default=30.0, metavar="SEC")
    group.add_argument("-td", "--dimse-timeout", type=positive_float, default=60.0, metavar="SEC")
    group.add_argument(
        "-pdu",
        "--max-pdu",
        type=pdu_length,
        default=Limits().max_pdu_length,
        metavar="N",
        help="maximum P-DATA PDU length we receive (0 = unlimited)",
    )


def add_tls_options(parser: argparse.ArgumentParser, *, server: bool) -> None:
    group = parser.add_argument_group("TLS (PS3.15 B.1)")
    if not server:
        group.add_argument("--tls", action="store_true", help="connect with TLS")
    group.add_argument("--tls-cert", metavar="FILE", help="our certificate (PEM)")
    group.add_argument("--tls-key", metavar="FILE", help="our private key (PEM)")
    group.add_argument("--tls-ca", metavar="FILE", help="CA certificates to verify the peer")
    if server:
        group.add_argument(
            "--tls-require-client-cert",
            action="store_true",
            help="refuse clients without a valid certificate",
        )
    else:
        group.add_argument(
            "--tls-no-verify", action="store_true", help="do not verify the server certificate"
        )


def server_tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not args.tls_cert:
        if args.tls_key or args.tls_require_client_cert:
            raise AppError("--tls-key and --tls-require-client-cert need --tls-cert")
        return None
    if not args.tls_key:
        raise AppError("--tls-cert needs --tls-key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.tls_cert, args.tls_key)
    if args.tls_ca:
        context.load_verify_locations(args.tls_ca)
    if args.tls_require_client_cert:
        if not args.tls_ca:
            raise AppError("--tls-require-client-cert needs --tls-ca")
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not (args.tls or args.tls_cert or args.tls_ca):
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=args.tls_ca)
    if args.tls_no_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if args.tls_cert:
        if not args.tls_key:
            raise AppError("--tls-cert needs --tls-key")
        context.load_cert_chain(args.tls_cert, args.tls_key)
    return context


def add_transfer_syntax_options(parser: argparse.ArgumentParser, *, scu: bool) -> None:
    group = parser.add_argument_group("transfer syntaxes").add_mutually_exclusive_group()
    verb = "propose" if scu else "prefer"
    group.add_argument(
        "-x=",
        "--prefer-uncompr",
        dest="ts",
        action="store_const",
        const="uncompr",
        help=f"{verb} explicit VR local byte order, then the others (default)",
    )
    group.add_argument(
        "-xe",
        "--prefer-little",
        dest="ts",
        action="store_const",
        const="little",
        help=f"{verb} explicit VR little endian first",
    )
    group.add_argument(
        "-xb",
        "--prefer-big",
        dest="ts",
        action="store_const",
        const="big",
        help=f"{verb} explicit VR big endian first",
    )
    group.add_argument(
        "-xi",
        "--implicit",
        dest="ts",
        action="store_const",
        const="implicit",
        help=f"{verb} implicit VR little endian only",
    )


def uncompressed_preference(choice: str | None) -> tuple[str, ...]:
    if choice == "big":
        return (EXPLICIT_VR_BE, EXPLICIT_VR_LE, IMPLICIT_VR_LE)
    if choice == "implicit":
        return (IMPLICIT_VR_LE,)
    return (EXPLICIT_VR_LE, IMPLICIT_VR_LE, EXPLICIT_VR_BE)


def timeouts_from(args: argparse.Namespace, *, scu: bool) -> Timeouts:
    return Timeouts(
        connect=args.connection_timeout if scu else None,
        acse=args.acse_timeout,
        dimse=args.dimse_timeout,
        artim=args.acse_timeout,
    )


_LEVELS = {
    "critical": logging.CRITICAL,
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
}


def setup_logging(args: argparse.Namespace, default: int = logging.WARNING) -> None:
    if args.log_config:
        logging.config.fileConfig(args.log_config, disable_existing_loggers=False)
        return
    level = default
    if args.quiet:
        level = logging.ERROR
    elif args.verbose:
        level = logging.INFO
    elif args.debug:
        level = logging.DEBUG
    elif args.log_level:
        level = _LEVELS[args.log_level]
    logging.basicConfig(level=level, format="%(levelname).1s: %(message)s", stream=sys.stderr)


def run(coro: Coroutine[Any, Any, int]) -> int:
    """Run an app's main coroutine; a failure is one line on stderr and exit status 1."""
    try:
        return asyncio.run(coro)
    except KeyboardInterrupt:
        return 130
    except (AppError, ProtocolError, OSError, TimeoutError, ssl.SSLError) as exc:
        print(f"error: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
