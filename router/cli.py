"""``dicom-router``: thin commands over settings, repository, rules and the listener.

Human-readable tables by default, ``--json`` for scripts; exit status 0, or 1 with one
line on stderr saying what was wrong (DESIGN §7). Heavy imports stay inside commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from router.settings import Settings, SettingsError, load_settings, render_default_config

F = TypeVar("F", bound=Callable[..., Any])


class Fail(click.ClickException):
    """One line on stderr and exit status 1."""

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message}", err=True)


class UsageFail(Fail):
    """A bad argument: still one line, with click's usage exit status."""

    exit_code = 2


def _fail(message: str) -> NoReturn:
    raise Fail(message)


def json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="print JSON for scripts")(func)


def _emit(
    as_json: bool, rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str
) -> None:
    if as_json:
        click.echo(json.dumps(list(rows), indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(_cell(row.get(column)) for column in columns))
    Console().print(table)


def _emit_one(as_json: bool, row: dict[str, Any], message: str) -> None:
    click.echo(json.dumps(row, indent=2, default=str) if as_json else message)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return str(value)


class Context:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._repository: Any = None

    def repository(self) -> Any:
        if self._repository is None:
            from router.db.engine import make_engine
            from router.db.migrate import SchemaError, check_schema
            from router.db.repository import Repository

            url = self.settings.database_url
            if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).exists():
                _fail(f"no database at {url[len('sqlite:///') :]}: run `dicom-router init`")
            engine = make_engine(url)
            try:
                check_schema(engine)
            except SchemaError as exc:
                _fail(str(exc))
            self._repository = Repository(engine)
        return self._repository


pass_context = click.make_pass_decorator(Context)


class _Group(click.Group):
    """Turns failures of the database or the file system into one line (DESIGN §7)."""

    def invoke(self, ctx: click.Context) -> Any:
        from sqlalchemy.exc import SQLAlchemyError

        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise UsageFail(exc.format_message()) from None
        except SQLAlchemyError as exc:
            raise Fail(f"database error: {getattr(exc, 'orig', None) or exc}") from None
        except OSError as exc:
            raise Fail(str(exc)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", type=click.Path(dir_okay=False), help="TOML settings file")
@click.option(
    "--data-dir", type=click.Path(file_okay=False), help="data directory (database, spool)"
)
@click.option("--db", "db_url", help="database URL (default: SQLite in the data directory)")
@click.option("-v", "--verbose", count=True, help="-v info, -vv debug")
@click.version_option(package_name="dicom-router")
@click.pass_context
def main(
    ctx: click.Context, config: str | None, data_dir: str | None, db_url: str | None, verbose: int
) -> None:
    """A durable DICOM routing node."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(config, overrides={"data_dir": data_dir, "db": db_url})
    except SettingsError as exc:
        _fail(str(exc))
    ctx.obj = Context(settings)


# -- init, db, serve -----------------------------------------------------------------------
@main.command()
@pass_context
def init(context: Context) -> None:
    """Create the data directory, the spool and the database at the latest schema."""
    from router.db.engine import sqlite_path
    from router.db.migrate import upgrade
    from router.spool import Spool

    settings = context.settings
    # Patient data and (later) secrets: the node's user only (`dicom-router check`).
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    Spool(settings.spool_dir, settings.spool).create_layout()
    if not settings.config_path.exists():
        settings.config_path.touch(mode=0o600)
        settings.config_path.write_text(render_default_config())
    upgrade(settings.database_url)
    database = sqlite_path(settings.database_url)
    if database is not None:
        database.chmod(0o600)  # SQLite gives its -wal and -shm files the same mode
    click.echo(f"initialised {settings.data_dir} (database {_safe_url(settings.database_url)})")


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@pass_context
def db_upgrade(context: Context) -> None:
    """Upgrade the database to the latest schema (a SQLite file is backed up first)."""
    from router.db.migrate import upgrade

    upgrade(context.settings.database_url)
    click.echo("database is at the latest schema")


@main.command()
@click.option("--aet", help="our AE title")
@click.option("--port", type=click.IntRange(0, 65535), help="DICOM port")
@click.option("--bind", help="address to listen on")
@click.option("--listeners", type=click.IntRange(1, 64), help="listener processes")
@click.option("--workers", type=click.IntRange(0, 64), help="forwarding worker processes")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False))
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False))
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False))
@click.option("--tls-require-client-cert", is_flag=True, default=None)
@click.option(
    "--worker-bind", help="tcp://ADDR:PORT where workers on other hosts connect (default: none)"
)
@click.option(
    "--worker-key",
    type=click.Path(exists=True, dir_okay=False),
    help="the node's CURVE key pair (NODE.key from `keys generate`)",
)
@click.option(
    "--allowed-workers",
    type=click.Path(exists=True, file_okay=False),
    help="directory of the public keys (NAME.pub) of the workers allowed to connect",
)
@click.option(
    "--insecure-workers",
    is_flag=True,
    default=None,
    help="allow --worker-bind off loopback without CURVE (anyone reaching it takes jobs)",
)
@click.pass_context  # type: ignore[arg-type]
def serve(ctx: click.Context, **flags: Any) -> None:
    """Run the node: recover the spool, then accept associations until SIGTERM/SIGINT."""
    from router.node import serve as serve_node

    context: Context = ctx.obj
    keys = {
        "aet": "listener.ae_title",
        "port": "listener.port",
        "bind": "listener.bind",
        "listeners": "listener.processes",
        "workers": "workers.count",
        "tls_cert": "listener.tls_cert",
        "tls_key": "listener.tls_key",
        "tls_ca": "listener.tls_ca",
        "tls_require_client_cert": "listener.tls_require_client_cert",
        "worker_bind": "workers.bind",
        "worker_key": "workers.key",
        "allowed_workers": "workers.allowed_keys",
        "insecure_workers": "workers.insecure",
    }
    overrides = {keys[name]: value for name, value in flags.items() if value is not None}
    overrides["data_dir"] = str(context.settings.data_dir)
    overrides["db"] = context.settings.db or None
    root = ctx.find_root().params
    try:
        settings = load_settings(root.get("config"), overrides=overrides)
    except SettingsError as exc:
        _fail(str(exc))
    from router.node import worker_bind_problem

    problem = worker_bind_problem(settings)
    if problem:
        _fail(problem)
    from router.node import NodeBusy

    context.repository()  # refuses an out-of-date schema with a clear message
    from router.check import config_file_in_use

    try:
        serve_node(settings, config_file_in_use(root.get("config"), settings))
    except NodeBusy as exc:
        _fail(str(exc))


@main.command("worker")
@click.option("--connect", required=True, help="the node's worker endpoint, tcp://HOST:PORT")
@click.option("--db", "db_url", help="the node's database URL (PostgreSQL across hosts)")
@click.option(
    "--server-key",
    type=click.Path(exists=True, dir_okay=False),
    help="the node's public key (NODE.pub): encrypt and authenticate with ZeroMQ CURVE",
)
@click.option(
    "--key",
    type=click.Path(exists=True, dir_okay=False),
    help="this worker's key pair (WORKER.key); its .pub must be in the node's allowed dir",
)
@click.option("--destinations", help="NAME[,NAME...] this worker can reach (default: all)")
@click.option(
    "--shared-spool",
    is_flag=True,
    help="read spool files from the data directory (a shared filesystem) instead of "
    "fetching them from the node",
)
@click.option("--credit", type=click.IntRange(1, 4096), help="leases held at most")
@pass_context
def worker(
    context: Context,
    connect: str,
    db_url: str | None,
    server_key: str | None,
    key: str | None,
    destinations: str | None,
    shared_spool: bool,
    credit: int | None,
) -> None:
    """Run one forwarding worker against a node's dispatcher (for other hosts)."""
    from router.curve import CurveKeyError, check_tcp_endpoint, load_pair, load_public
    from router.node import run_worker, warn_open_worker_key

    if not connect.startswith("ipc://"):
        try:
            check_tcp_endpoint(connect)
        except ValueError as exc:
            raise UsageFail(f"--connect {exc}") from None
    if bool(server_key) != bool(key):
        raise UsageFail("--server-key and --key go together (ZeroMQ CURVE)")
    overrides: dict[str, Any] = {"data_dir": str(context.settings.data_dir)}
    overrides["db"] = db_url or context.settings.db or None
    if credit is not None:
        overrides["workers.credit"] = credit
    try:
        settings = load_settings(ctx_config(), overrides=overrides)
    except SettingsError as exc:
        _fail(str(exc))
    curve = None
    if server_key and key:
        try:
            curve = (load_public(server_key), load_pair(key))
        except CurveKeyError as exc:
            _fail(str(exc))
        warn_open_worker_key(Path(key))
    context.settings = settings
    names = None
    if destinations is not None:
        names = tuple(n.strip() for n in destinations.split(",") if n.strip())
        known = {d.name for d in context.repository().list_destinations()}
        unknown = [n for n in names if n not in known]
        if not names or unknown:
            raise UsageFail(f"--destinations: no destination named {', '.join(unknown) or '?'}")
    else:
        context.repository()  # refuses a missing or out-of-date database in one line
    asyncio.run(
        run_worker(settings, connect, local_spool=shared_spool, destinations=names, curve=curve)
    )


def ctx_config() -> str | None:
    root = click.get_current_context().find_root().params
    return root.get("config")


# -- keys ----------------------------------------------------------------------------------
@main.group()
def keys() -> None:
    """ZeroMQ CURVE keys for workers on other hosts."""


@keys.command("generate")
@click.argument("name")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False),
    help="where to write NAME.key and NAME.pub (default: DATA_DIR/keys)",
)
@json_option
@pass_context
def keys_generate(context: Context, name: str, directory: str | None, as_json: bool) -> None:
    """Write a key pair: NAME.key (secret, mode 0600) and NAME.pub (public)."""
    from router.curve import CurveKeyError, generate

    target = Path(directory) if directory else context.settings.data_dir / "keys"
    try:
        secret, public = generate(name, target)
    except CurveKeyError as exc:
        _fail(str(exc))
    row = {"secret": str(secret), "public": str(public)}
    _emit_one(as_json, row, f"wrote {secret} (keep it here) and {public} (give it to the peer)")


# -- destinations ----------------------------------------------------------------------------
@main.group()
def destinations() -> None:
    """Where instances are forwarded."""


def _destination_row(d: Any) -> dict[str, Any]:
    return {
        "name": d.name,
        "ae_title": d.ae_title,
        "host": d.host,
        "port": d.port,
        "max_associations": d.max_associations,
        "max_retries": d.max_retries,
        "tls": d.tls is not None,
        "tls_ca": d.tls.ca if d.tls else None,
        "tls_cert": d.tls.cert if d.tls else None,
        "tls_key": d.tls.key if d.tls else None,
    }


@destinations.command("add")
@click.argument("name")
@click.option("--aet", required=True, help="the destination's AE title")
@click.option("--host", required=True)
@click.option("--port", required=True, type=click.IntRange(1, 65535))
@click.option("--max-associations", default=2, show_default=True, type=click.IntRange(1, 64))
@click.option("--max-retries", default=10, show_default=True, type=click.IntRange(0, 1000))
@click.option("--tls", is_flag=True, help="forward over TLS (PS3.15 B.1); never in clear")
@click.option("--tls-ca", help="PEM CA file the destination's certificate must chain to")
@click.option("--tls-cert", help="PEM client certificate, if the destination asks for one")
@click.option("--tls-key", help="PEM key of --tls-cert")
@json_option
@pass_context
def destinations_add(
    context: Context,
    name: str,
    aet: str,
    host: str,
    port: int,
    max_associations: int,
    max_retries: int,
    tls: bool,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    as_json: bool,
) -> None:
    """Add a destination. With --tls its certificate is verified against --tls-ca (or
    the system's CAs) and must name --host (a DNS name or IP address SAN)."""
    _check_name(name, "destination")
    _check_ae_title(aet)
    options = _tls_options(tls, tls_ca, tls_cert, tls_key)
    repo = context.repository()
    with _repository_errors():
        destination = repo.add_destination(
            name,
            aet,
            host,
            port,
            max_associations=max_associations,
            max_retries=max_retries,
            tls=options,
        )
    summary = f"{aet} at {host}:{port}" + (" over TLS" if options else "")
    _audit_change(context, "destination", "add", name, summary)
    _emit_one(as_json, _destination_row(destination), f"added destination {name}")


def _tls_options(tls: bool, ca: str | None, cert: str | None, key: str | None) -> Any:
    """Check the TLS flags (DESIGN §7 shape) and that the files can be used now."""
    from router.db.repository import TlsOptions
    from router.tls import TlsConfigError, client_context

    if not tls:
        if ca or cert or key:
            raise UsageFail("--tls-ca, --tls-cert and --tls-key need --tls")
        return None
    if bool(cert) != bool(key):
        raise UsageFail("--tls-cert and --tls-key go together")
    paths = [str(Path(p).resolve()) if p else None for p in (ca, cert, key)]
    try:
        client_context(*paths)
    except TlsConfigError as exc:
        _fail(str(exc))
    return TlsOptions(*paths)


@destinations.command("list")
@json_option
@pass_context
def destinations_list(context: Context, as_json: bool) -> None:
    """List destinations."""
    rows = [_destination_row(d) for d in context.repository().list_destinations()]
    _emit(
        as_json,
        rows,
        ["name", "ae_title", "host", "port", "max_associations", "max_retries", "tls"],
        "destinations",
    )


@destinations.command("remove")
@click.argument("name")
@json_option
@pass_context
def destinations_remove(context: Context, name: str, as_json: bool) -> None:
    """Remove a destination (refused while a rule sends to it)."""
    with _repository_errors():
        context.repository().remove_destination(name)
    _audit_change(context, "destination", "remove", name)
    _emit_one(as_json, {"removed": name}, f"removed destination {name}")


@destinations.command("echo")
@click.argument("name")
@click.option("--aet", "calling_aet", default=None, help="calling AE title (default: the node's)")
@click.option("--timeout", default=10.0, show_default=True, type=click.FloatRange(0.1, 600))
@json_option
@pass_context
def destinations_echo(
    context: Context, name: str, calling_aet: str | None, timeout: float, as_json: bool
) -> None:
    """C-ECHO a destination; prints the status and the round-trip time."""
    from protocol.errors import ProtocolError
    from protocol.net import ContextRequest, Timeouts, associate
    from protocol.uids import EXPLICIT_VR_LE, IMPLICIT_VR_LE, VERIFICATION
    from router.tls import TlsConfigError
    from workers.sender import tls_context

    with _repository_errors():
        destination = context.repository().get_destination(name)
    try:
        tls = tls_context(destination.tls)  # the worker's context: same checks
    except TlsConfigError as exc:
        _fail(f"C-ECHO to {name}: {exc}")

    async def echo() -> tuple[int, float]:
        started = time.perf_counter()
        assoc = await associate(
            destination.host,
            destination.port,
            [ContextRequest(VERIFICATION, (EXPLICIT_VR_LE, IMPLICIT_VR_LE))],
            called_ae=destination.ae_title,
            calling_ae=calling_aet or context.settings.listener.ae_title,
            timeouts=Timeouts(connect=timeout, acse=timeout, dimse=timeout),
            ssl=tls,
            server_hostname=destination.host if tls else None,
        )
        try:
            status = await assoc.send_c_echo()
        finally:
            await assoc.release()
        return status, time.perf_counter() - started

    try:
        status, elapsed = asyncio.run(echo())
    except (ProtocolError, OSError, TimeoutError) as exc:
        _fail(f"C-ECHO to {name} ({destination.host}:{destination.port}) failed: {exc}")
    row = {
        "destination": name,
        "status": f"0x{status:04X}",
        "round_trip_ms": round(elapsed * 1000, 1),
    }
    _emit_one(as_json, row, f"{name}: status 0x{status:04X} in {elapsed * 1000:.1f} ms")
    if status != 0:
        sys.exit(1)


# -- rules --------------------------------------------------------------------------------------
@main.group()
def rules() -> None:
    """Routing rules (DESIGN §4)."""


def _rule_row(rule: Any) -> dict[str, Any]:
    return {
        "name": rule.name,
        "priority": rule.priority,
        "enabled": rule.enabled,
        "stop": rule.stop,
        "when": [c.text for c in rule.conditions],
        "to": list(rule.destinations),
    }


@rules.command("add")
@click.argument("name")
@click.option("--to", "to", required=True, help="destination names, comma-separated")
@click.option("--when", "when", multiple=True, help="condition FIELD OP VALUE (all must hold)")
@click.option("--priority", default=100, show_default=True, type=int, help="lower runs first")
@click.option("--stop", is_flag=True, help="later rules are not evaluated when this one matches")
@click.option("--disabled", is_flag=True, help="add the rule disabled")
@json_option
@pass_context
def rules_add(
    context: Context,
    name: str,
    to: str,
    when: tuple[str, ...],
    priority: int,
    stop: bool,
    disabled: bool,
    as_json: bool,
) -> None:
    """Add a rule, e.g. --when 'Modality == CT' --to pacs."""
    from router.rules import RuleError, RuleSpec, parse_condition

    _check_name(name, "rule")
    targets = tuple(t.strip() for t in to.split(",") if t.strip())
    if not targets:
        _fail("--to needs at least one destination")
    try:
        conditions = tuple(parse_condition(text) for text in when)
    except RuleError as exc:
        _fail(f"invalid condition: {exc}")
    spec = RuleSpec(name, priority, not disabled, stop, conditions, targets)
    with _repository_errors():
        context.repository().add_rule(spec)
    _audit_change(context, "rule", "add", name, f"to {', '.join(targets)}")
    _emit_one(as_json, _rule_row(spec), f"added rule {name}")


@rules.command("list")
@json_option
@pass_context
def rules_list(context: Context, as_json: bool) -> None:
    """List rules in evaluation order."""
    specs = sorted(context.repository().list_rules(), key=lambda r: (r.priority, r.name))
    _emit(
        as_json,
        [_rule_row(r) for r in specs],
        ["priority", "name", "enabled", "stop", "when", "to"],
        "rules",
    )


@rules.command("show")
@click.argument("name")
@json_option
@pass_context
def rules_show(context: Context, name: str, as_json: bool) -> None:
    """Show one rule."""
    with _repository_errors():
        spec = context.repository().get_rule(name)
    row = _rule_row(spec)
    if as_json:
        _emit_one(True, row, "")
        return
    for key, value in row.items():
        click.echo(f"{key:>9}: {_cell(value)}")


@rules.command("remove")
@click.argument("name")
@json_option
@pass_context
def rules_remove(context: Context, name: str, as_json: bool) -> None:
    """Remove a rule."""
    with _repository_errors():
        context.repository().remove_rule(name)
    _audit_change(context, "rule", "remove", name)
    _emit_one(as_json, {"removed": name}, f"removed rule {name}")


@rules.command("enable")
@click.argument("name")
@json_option
@pass_context
def rules_enable(context: Context, name: str, as_json: bool) -> None:
    """Enable a rule."""
    with _repository_errors():
        context.repository().set_rule_enabled(name, True)
    _audit_change(context, "rule", "enable", name)
    _emit_one(as_json, {"enabled": name}, f"enabled rule {name}")


@rules.command("disable")
@click.argument("name")
@json_option
@pass_context
def rules_disable(context: Context, name: str, as_json: bool) -> None:
    """Disable a rule."""
    with _repository_errors():
        context.repository().set_rule_enabled(name, False)
    _audit_change(context, "rule", "disable", name)
    _emit_one(as_json, {"disabled": name}, f"disabled rule {name}")


@rules.command("test")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--calling-aet", default="", help="pretend this calling AE title sent the files")
@click.option("--called-aet", default=None, help="pretend this called AE title (default: ours)")
@click.option("--peer-address", default="127.0.0.1", help="pretend the files came from here")
@json_option
@pass_context
def rules_test(
    context: Context,
    paths: tuple[str, ...],
    calling_aet: str,
    called_aet: str | None,
    peer_address: str,
    as_json: bool,
) -> None:
    """Dry run: which rules each file matches, why the others do not, and where it would go."""
    from protocol.part10 import NotPart10Error
    from router.rules import InstanceFacts, RuleSet
    from router.walker import DatasetError, walk_file

    ruleset = RuleSet.compile(context.repository().list_rules())
    fallback_note = (
        "unrouted (kept)" if context.settings.listener.unrouted_policy == "unrouted" else "rejected"
    )
    results = []
    for path in _iter_paths(paths):
        entry: dict[str, Any] = {"file": str(path)}
        try:
            values = walk_file(path, ruleset.wanted_tags, ruleset.wanted_sequence_tags)
        except (NotPart10Error, DatasetError, OSError) as exc:
            entry["error"] = str(exc)
            results.append(entry)
            continue
        facts = InstanceFacts(
            values, calling_aet, called_aet or context.settings.listener.ae_title, peer_address
        )
        decision = ruleset.match(facts)
        entry["destinations"] = list(decision.destinations)
        entry["rules"] = [
            {
                "rule": e.rule,
                "matched": e.matched,
                "skipped": e.skipped,
                "failed": e.failed_condition,
            }
            for e in decision.explanations
        ]
        results.append(entry)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for entry in results:
        click.echo(entry["file"])
        if "error" in entry:
            click.echo(f"  cannot read: {entry['error']}")
            continue
        for e in entry["rules"]:
            if e["skipped"]:
                click.echo(f"  - {e['rule']}: not evaluated")
            elif e["matched"]:
                click.echo(f"  + {e['rule']}: matched")
            else:
                click.echo(f"  - {e['rule']}: failed at {e['failed']}")
        target = ", ".join(entry["destinations"]) or fallback_note
        click.echo(f"  => {target}")


def _iter_paths(paths: Iterable[str]) -> Iterable[Path]:
    for name in paths:
        path = Path(name)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


# -- sources ------------------------------------------------------------------------------------
#: What a source may be allowed (router.db.models.SOURCE_OPERATIONS, spelled out so that
#: `--help` needs no heavy import).
_SOURCE_OPERATIONS = ("echo", "store")


def _parse_operations(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in _SOURCE_OPERATIONS]
    if unknown or not names:
        raise click.BadParameter(
            f"{value!r}: use one or more of {','.join(_SOURCE_OPERATIONS)}, comma-separated"
        )
    return tuple(op for op in _SOURCE_OPERATIONS if op in names)


_allow_help = "what the source may do: echo (C-ECHO), store (C-STORE), or echo,store"


@main.group()
def sources() -> None:
    """Known calling AE titles (used when listener.accept = "known")."""


@sources.command("add")
@click.argument("ae_title")
@click.option("--address", "addresses", multiple=True, help="allowed IP address or CIDR block")
@click.option(
    "--allow",
    "operations",
    default=",".join(_SOURCE_OPERATIONS),
    show_default=True,
    callback=_parse_operations,
    help=_allow_help,
)
@json_option
@pass_context
def sources_add(
    context: Context,
    ae_title: str,
    addresses: tuple[str, ...],
    operations: tuple[str, ...],
    as_json: bool,
) -> None:
    """Add a known source, optionally pinned to addresses and limited in what it may do."""
    import ipaddress

    _check_ae_title(ae_title)
    for address in addresses:
        try:
            ipaddress.ip_network(address, strict=False)
        except ValueError:
            _fail(f"invalid address or CIDR block {address!r}")
    with _repository_errors():
        context.repository().add_source(ae_title, list(addresses), operations)
    where = ", ".join(addresses) or "any address"
    _audit_change(context, "source", "add", ae_title, f"{where}; allow {','.join(operations)}")
    _emit_one(
        as_json,
        {"ae_title": ae_title, "addresses": list(addresses), "allow": list(operations)},
        f"added source {ae_title}",
    )


@sources.command("allow")
@click.argument("ae_title")
@click.argument("operations", callback=_parse_operations, metavar="OPERATIONS")
@json_option
@pass_context
def sources_allow(
    context: Context, ae_title: str, operations: tuple[str, ...], as_json: bool
) -> None:
    """Set what a known source may do (echo, store, or echo,store), from its next association."""
    with _repository_errors():
        source = context.repository().set_source_operations(ae_title, operations)
    _audit_change(context, "source", "allow", ae_title, ",".join(source.operations))
    _emit_one(
        as_json,
        {"ae_title": ae_title, "allow": list(source.operations)},
        f"source {ae_title} may {' and '.join(source.operations)}",
    )


@sources.command("list")
@json_option
@pass_context
def sources_list(context: Context, as_json: bool) -> None:
    """List known sources."""
    rows = [
        {"ae_title": s.ae_title, "addresses": list(s.addresses), "allow": list(s.operations)}
        for s in context.repository().list_sources()
    ]
    _emit(as_json, rows, ["ae_title", "addresses", "allow"], "sources")


@sources.command("remove")
@click.argument("ae_title")
@json_option
@pass_context
def sources_remove(context: Context, ae_title: str, as_json: bool) -> None:
    """Remove a known source."""
    with _repository_errors():
        context.repository().remove_source(ae_title)
    _audit_change(context, "source", "remove", ae_title)
    _emit_one(as_json, {"removed": ae_title}, f"removed source {ae_title}")


# -- users --------------------------------------------------------------------------------
@main.group()
def users() -> None:
    """Users the listener accepts in User Identity Negotiation ([security] user_identity)."""


@users.command("add")
@click.argument("name")
@click.option(
    "--password-stdin",
    is_flag=True,
    help="read the passcode from the first line of stdin (stored as a scrypt digest)",
)
@json_option
@pass_context
def users_add(context: Context, name: str, password_stdin: bool, as_json: bool) -> None:
    """Add a user; without --password-stdin it identifies by name alone."""
    from router.users import MAX_PASSCODE, check_username, hash_passcode, read_passcode_stdin

    try:
        check_username(name)
    except ValueError as exc:
        raise UsageFail(str(exc)) from None
    secret = None
    if password_stdin:
        passcode = read_passcode_stdin(sys.stdin)
        if not passcode or len(passcode) > MAX_PASSCODE:
            _fail(f"the passcode on stdin must be 1-{MAX_PASSCODE} bytes")
        secret = hash_passcode(passcode)
    with _repository_errors():
        user = context.repository().add_user(name, secret)
    _audit_change(context, "user", "add", name, "with passcode" if secret else "name only")
    row = {"name": user.name, "passcode": user.has_passcode}
    _emit_one(as_json, row, f"added user {name}")


@users.command("list")
@json_option
@pass_context
def users_list(context: Context, as_json: bool) -> None:
    """List users (never their passcodes)."""
    rows = [
        {"name": u.name, "passcode": u.has_passcode, "created_at": u.created_at.isoformat()}
        for u in context.repository().list_users()
    ]
    _emit(as_json, rows, ["name", "passcode", "created_at"], "users")


@users.command("remove")
@click.argument("name")
@json_option
@pass_context
def users_remove(context: Context, name: str, as_json: bool) -> None:
    """Remove a user."""
    with _repository_errors():
        context.repository().remove_user(name)
    _audit_change(context, "user", "remove", name)
    _emit_one(as_json, {"removed": name}, f"removed user {name}")


# -- check --------------------------------------------------------------------------------
@main.command("check")
@click.option("--strict", is_flag=True, help="exit 1 when anything is open")
@json_option
@pass_context
def check(context: Context, strict: bool, as_json: bool) -> None:
    """List every setting that leaves the node open (security review)."""
    from router.check import (
        OPEN,
        check_destinations,
        check_files,
        check_settings,
        check_sources,
        check_users,
        config_file_in_use,
        node_files,
        secret_files,
    )

    settings = context.settings
    files = node_files(settings, config_file_in_use(ctx_config(), settings))
    findings = list(check_settings(settings))
    if _database_exists(settings):
        repository = context.repository()
        destinations = repository.list_destinations()
        findings += check_destinations(destinations)
        findings += check_users(repository.list_users(), settings.security.user_identity)
        findings += check_sources(repository.list_sources(), settings.listener.accept)
        keys = secret_files(settings, destinations=destinations)  # their TLS keys (SEC-20)
        files += [path for path, _ in keys if path not in files]
    findings += check_files(files)
    rows = [
        {"level": f.level, "setting": f.setting, "value": f.value, "why": f.why} for f in findings
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif rows:
        _emit(
            False, rows, ["level", "setting", "value", "why"], "settings that leave the node open"
        )
    else:
        click.echo("nothing open found")
    if strict and any(f.level == OPEN for f in findings):
        sys.exit(1)


def _database_exists(settings: Settings) -> bool:
    """Destinations are read only from a database that exists (check runs before init)."""
    url = settings.database_url
    return not url.startswith("sqlite:///") or Path(url[len("sqlite:///") :]).exists()


# -- queue ----------------------------------------------------------------------------------------
@main.group()
def queue() -> None:
    """The job queue."""


@queue.command("status")
@click.option(
    "--window",
    default=5.0,
    show_default=True,
    type=click.FloatRange(0.1, 24 * 60),
    help="minutes of attempts to count",
)
@json_option
@pass_context
def queue_status(context: Context, window: float, as_json: bool) -> None:
    """Per destination: jobs by state, the oldest job still to do, recent attempts and
    throughput."""
    from datetime import timedelta

    from router.liveness import read_view, view_path

    summary = _job_queue(context).status_summary(window=timedelta(minutes=window))
    instances = context.repository().instance_counts()
    rows = [_status_row(d) for d in summary.destinations]
    now = time.time()
    workers = [_worker_row(w, now) for w in read_view(view_path(context.settings.data_dir), now)]
    oldest = summary.oldest_pending_age
    seconds = None if oldest is None else round(oldest.total_seconds(), 1)
    if as_json:
        report = {
            "destinations": rows,
            "oldest_pending_seconds": seconds,
            "window_minutes": window,
            "attempts": summary.attempts,
            "completed_per_minute": round(summary.completed_per_minute, 1),
            "instances": instances,
            "workers": workers,
        }
        click.echo(json.dumps(report, indent=2))
        return
    columns = ["destination", *_STATES, "oldest_pending_s", "attempts", "failed", "per_minute"]
    _emit(False, rows, columns, f"jobs (attempts in the last {window:g} min)")
    click.echo(f"oldest job still to do: {'none' if seconds is None else f'{seconds} s'}")
    click.echo(f"forwarded per minute: {summary.completed_per_minute:.1f}")
    if instances.get("unrouted"):
        click.echo(f"unrouted instances (matched no rule, kept): {instances['unrouted']}")
    if workers:
        _emit(
            False,
            workers,
            ["worker", "host", "last_heard_s", "credit", "destinations"],
            "workers (as the dispatcher sees them)",
        )
    else:
        click.echo("workers: none connected (or the node is not running)")


_STATES = ("pending", "leased", "retry_wait", "done", "dead")


def _worker_row(worker: Any, now: float) -> dict[str, Any]:
    return {
        "worker": worker.name,
        "host": worker.host,
        "last_heard_s": round(worker.silent_for(now), 1),
        "credit": worker.credit,
        "destinations": "all" if worker.destinations is None else ",".join(worker.destinations),
    }


def _status_row(d: Any) -> dict[str, Any]:
    age = d.oldest_pending_age
    return {
        "destination": d.destination,
        **{state: getattr(d, state) for state in _STATES},
        "oldest_pending_s": None if age is None else round(age.total_seconds(), 1),
        "attempts": d.attempts,
        "completed": d.completed,
        "failed": d.failed,
        "per_minute": round(d.completed_per_minute, 1),
    }


@main.command("status")
@click.option(
    "--echo/--no-echo",
    default=True,
    show_default=True,
    help="also C-ECHO the node's listener",
)
@click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(0.1, 600))
@json_option
@pass_context
def node_status(context: Context, echo: bool, timeout: float, as_json: bool) -> None:
    """Whether the node and each of its processes are up; exit status 1 if not."""
    from router.status import read_node_status

    status = read_node_status(context.settings.data_dir)
    reason = status.reason
    answer = None
    if echo and status.running:
        answer, problem = _echo_listener(context.settings, timeout, status.listener)
        reason = reason or problem
    rows = [
        {
            "process": p.name,
            "pid": p.pid,
            "state": "up" if p.up else "down",
            "restarts": p.restarts,
            "uptime_s": None if p.uptime is None else round(p.uptime),
        }
        for p in status.processes
    ]
    if as_json:
        report = {"up": not reason, "reason": reason, "listener": answer, "processes": rows}
        click.echo(json.dumps(report, indent=2))
    elif rows:
        _emit(False, rows, ["process", "pid", "state", "restarts", "uptime_s"], "node")
        if answer:
            click.echo(f"listener: {answer}")
    if reason:
        if as_json:
            sys.exit(1)
        _fail(reason)


def _echo_listener(
    settings: Settings, timeout: float, running: dict[str, Any] | None = None
) -> tuple[str | None, str]:
    """C-ECHO our own listener: (what it answered, or None; why it is not healthy).
    ``running``: where the running node said it listens (``serve --port`` and the
    like), over the configuration."""
    from protocol.errors import AssociationRejected, ProtocolError
    from protocol.net import ContextRequest, Timeouts, associate
    from protocol.uids import EXPLICIT_VR_LE, IMPLICIT_VR_LE, VERIFICATION

    listener = settings.listener
    if running:
        # A status file of another version: the configuration stands.
        with contextlib.suppress(TypeError, ValueError):
            listener = dataclasses.replace(
                listener,
                bind=str(running.get("bind", listener.bind)),
                port=int(running.get("port", listener.port)),
                ae_title=str(running.get("ae_title", listener.ae_title)),
            )
    host = listener.bind if listener.bind not in ("", "0.0.0.0", "::") else "127.0.0.1"

    async def echo() -> str:
        started = time.perf_counter()
        assoc = await associate(
            host,
            listener.port,
            [ContextRequest(VERIFICATION, (EXPLICIT_VR_LE, IMPLICIT_VR_LE))],
            called_ae=listener.ae_title,
            calling_ae=listener.ae_title,
            timeouts=Timeouts(connect=timeout, acse=timeout, dimse=timeout),
        )
        try:
            status = await assoc.send_c_echo()
        finally:
            await assoc.release()
        return f"C-ECHO status 0x{status:04X} in {(time.perf_counter() - started) * 1000:.1f} ms"

    try:
        return asyncio.run(echo()), ""
    except AssociationRejected as exc:  # it answers; the accept policy said no to us
        return f"answers (rejected our C-ECHO: {exc})", ""
    except (ProtocolError, OSError, TimeoutError) as exc:
        return None, f"the listener at {host}:{listener.port} does not answer: {exc}"


def _job_queue(context: Context) -> Any:
    from router.db.jobs import JobQueue

    repository = context.repository()  # checks the schema
    return JobQueue(repository.engine)


def _job_row(job: Any) -> dict[str, Any]:
    return {
        "id": job.id,
        "instance": job.instance_id,
        "destination": job.destination,
        "state": str(job.state),
        "priority": job.priority,
        "attempts": job.attempts,
        "deliveries": job.deliveries,
        "next_attempt_at": job.next_attempt_at.isoformat(),
        "last_status": None if job.last_status is None else f"0x{job.last_status:04X}",
        "last_error": job.last_error,
    }


_JOB_STATES = click.Choice(["pending", "leased", "retry_wait", "done", "dead"])
# router.audit.EVENTS, spelled out so that `--help` needs no heavy import.
_AUDIT_EVENTS = (
    "association-accepted",
    "association-refused",
    "operation-refused",
    "authentication-failure",
    "instance-received",
    "instance-forwarded",
    "configuration-changed",
    "application-start",
    "application-stop",
    "audit-log-used",
)


@queue.command("list")
@click.option("--state", type=_JOB_STATES, help="only jobs in this state")
@click.option("--destination", help="only jobs for this destination")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 100_000))
@json_option
@pass_context
def queue_list(
    context: Context, state: str | None, destination: str | None, limit: int, as_json: bool
) -> None:
    """Jobs, oldest first."""
    rows = [_job_row(j) for j in _job_queue(context).list_jobs(state, destination, limit)]
    _emit(
        as_json,
        rows,
        ["id", "destination", "state", "attempts", "last_status", "last_error", "next_attempt_at"],
        "jobs",
    )


@queue.command("show")
@click.argument("job_id", type=int)
@json_option
@pass_context
def queue_show(context: Context, job_id: int, as_json: bool) -> None:
    """One job, its instance and every attempt."""
    job = _job_queue(context).get_job(job_id)
    if job is None:
        _fail(f"no job {job_id}")
    instance = context.repository().get_instance(job.instance_id)
    row = _job_row(job)
    row["sop_instance_uid"] = instance.sop_instance_uid
    row["calling_aet"] = instance.calling_aet
    row["attempts_history"] = [
        {
            "started_at": a.started_at.isoformat(),
            "duration_ms": a.duration_ms,
            "outcome": a.outcome,
            "status": None if a.dimse_status is None else f"0x{a.dimse_status:04X}",
            "error": a.error,
        }
        for a in job.history
    ]
    if as_json:
        click.echo(json.dumps(row, indent=2))
        return
    for key, value in row.items():
        if key != "attempts_history":
            click.echo(f"{key:>17}: {_cell(value)}")
    _emit(
        False,
        row["attempts_history"],
        ["started_at", "duration_ms", "outcome", "status", "error"],
        "attempts",
    )


@queue.command("retry")
@click.argument("job_id", type=int, required=False)
@click.option("--destination", help="every dead-lettered job of this destination")
@json_option
@pass_context
def queue_retry(
    context: Context, job_id: int | None, destination: str | None, as_json: bool
) -> None:
    """Send dead-lettered jobs again (one job, or all of a destination)."""
    if job_id is None and destination is None:
        _fail("name a JOB_ID or --destination")
    count = _job_queue(context).retry_dead(job_id, destination)
    target = f"job {job_id}" if job_id is not None else f"destination {destination}"
    _audit_change(context, "queue", "retry", target, f"{count} dead job(s) queued again")
    _emit_one(as_json, {"retried": count}, f"{count} job(s) queued again")


@queue.command("purge")
@click.option("--state", type=click.Choice(["done", "dead"]), required=True)
@click.option("--destination", help="only jobs for this destination")
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@json_option
@pass_context
def queue_purge(
    context: Context, state: str, destination: str | None, yes: bool, as_json: bool
) -> None:
    """Delete done or dead jobs (and their attempt rows)."""
    if not yes and not click.confirm(f"delete every {state} job?", err=True):
        _fail("nothing deleted")
    count = _job_queue(context).purge(state, destination)
    target = f"destination {destination}" if destination else "all destinations"
    _audit_change(context, "queue", "purge", target, f"{count} {state} job(s) deleted")
    _emit_one(as_json, {"purged": count}, f"{count} job(s) deleted")


# -- audit ---------------------------------------------------------------------------------------
@main.group()
def audit() -> None:
    """The audit trail (DICOM audit records, PS3.15 A.5)."""


@audit.command("show")
@click.option("--since", help="only records of the last DURATION (90s, 15m, 2h, 7d)")
@click.option("--event", type=click.Choice(_AUDIT_EVENTS), help="only records of this event")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1_000_000))
@json_option
@pass_context
def audit_show(
    context: Context, since: str | None, event: str | None, limit: int, as_json: bool
) -> None:
    """The latest audit records, oldest first (--json: the records as written)."""
    import datetime as dt

    from router.audit import (
        AuditLog,
        audit_log_used,
        audit_path,
        parse_duration,
        read_records,
        summary,
    )

    try:
        after = None if since is None else dt.datetime.now(dt.UTC) - parse_duration(since)
    except ValueError as exc:
        raise UsageFail(f"--since: {exc}") from None
    path = audit_path(context.settings.data_dir)
    records, bad = read_records(path, since=after, event=event, limit=limit)
    trail = AuditLog.for_settings(context.settings)
    if trail is not None and path.exists():  # reading the trail is itself audited (A.5.3.2)
        trail.write(audit_log_used(path))
        trail.close()
    if bad:
        click.echo(f"warning: {bad} line(s) of {path} are not audit records", err=True)
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    columns = ["time", "event", "outcome", "participants", "object", "detail"]
    _emit(False, [summary(r) for r in records], columns, f"audit records ({path})")


def _audit_change(context: Context, kind: str, action: str, name: str, summary: str = "") -> None:
    """A configuration change, after it was made: one audit record (never a failure)."""
    from router.audit import AuditLog, configuration_changed

    trail = AuditLog.for_settings(context.settings)
    if trail is not None:
        trail.write(configuration_changed(kind, action, name, summary=summary))
        trail.close()


# -- helpers -------------------------------------------------------------------------------------
def _check_name(name: str, what: str) -> None:
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
        _fail(f"invalid {what} name {name!r}: use 1-64 letters, digits, '-', '_' or '.'")


def _check_ae_title(aet: str) -> None:
    if not aet.strip() or len(aet) > 16 or any(c == "\\" or not (" " <= c <= "~") for c in aet):
        _fail(f"invalid AE title {aet!r}: 1-16 printable characters, no backslash")


def _safe_url(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


@contextlib.contextmanager
def _repository_errors() -> Iterator[None]:
    """Turns the repository's typed errors into one-line failures."""
    from router.db.repository import RepositoryError

    try:
        yield
    except RepositoryError as exc:
        _fail(str(exc))
