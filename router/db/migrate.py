"""The schema through Alembic's API: upgrade, revisions, and the start-up check.

The migrations live in the top-level ``migrations`` package, found with
``importlib.resources`` so that an installed wheel can upgrade its database with no
``alembic.ini`` in the working directory (DESIGN §5). The only way to a schema is
``upgrade`` from empty: there is no ``create_all``.
"""

from __future__ import annotations

import datetime as dt
import importlib.resources
import logging
import sqlite3
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text
from sqlalchemy.pool import NullPool

from router.db.engine import BUSY_TIMEOUT_MS, make_engine, redacted, sqlite_path

log = logging.getLogger(__name__)

VERSION_TABLE = "alembic_version"


class SchemaError(RuntimeError):
    """The database cannot be used by this version as it is."""


class SchemaMissing(SchemaError):
    """The database has no schema (a new or foreign database)."""


class SchemaOutOfDate(SchemaError):
    """The database is at another revision than this version's head."""

    def __init__(self, current: str, head: str) -> None:
        self.current = current
        self.head = head
        super().__init__(
            f"database at revision {current}, this version needs {head}: "
            "run `dicom-router db upgrade`"
        )


def migrations_dir() -> Path:
    """The directory of the ``migrations`` package (env.py, script.py.mako, versions/)."""
    return Path(str(importlib.resources.files("migrations")))


def alembic_config(url: str | None = None) -> Config:
    """An Alembic ``Config`` built in code; ``env.py`` reads the URL from its attributes."""
    config = Config()
    # ConfigParser interpolation: a "%" in the path must be doubled.
    config.set_main_option("script_location", str(migrations_dir()).replace("%", "%%"))
    config.set_main_option("path_separator", "os")
    if url is not None:
        config.attributes["url"] = url
    return config


def head_revision() -> str:
    """The revision this version of the code needs."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package always ships its migrations
        raise SchemaError("no migrations found in the installed package")
    return head


def current_revision(engine: Engine) -> str | None:
    """The database's revision, or None if it has never been migrated."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def check_schema(engine: Engine) -> None:
    """Raise unless the database is at this version's head revision (start-up gate)."""
    current = current_revision(engine)
    if current is None:
        raise SchemaMissing(
            f"database {redacted(engine.url)} has no dicom-router schema: run `dicom-router init`"
        )
    head = head_revision()
    if current != head:
        raise SchemaOutOfDate(current, head)


def upgrade(url: str, *, backup: bool = True, revision: str = "head") -> Path | None:
    """Upgrade the database at ``url`` to ``revision``; return the backup file, if any.

    A SQLite file that exists, holds tables and is behind is copied first (``backup=True``) to
    ``<file>.bak-<UTC timestamp>``; the copy is made with SQLite's online backup API
    after a WAL checkpoint, so it holds every committed transaction.
    """
    engine = make_engine(url, poolclass=NullPool)
    try:
        current = current_revision(engine)
        backup_file = None
        path = sqlite_path(url)
        wanted = head_revision() if revision == "head" else revision
        if current == wanted:
            log.info("database %s already at revision %s", redacted(url), current)
            return None
        if backup and path is not None and path.exists() and _has_tables(engine):
            backup_file = backup_sqlite(path)
        log.info("upgrading database %s from %s to %s", redacted(url), current, wanted)
        command.upgrade(alembic_config(url), revision)
        if engine.dialect.name == "sqlite":
            _foreign_key_check(engine)
        return backup_file
    finally:
        engine.dispose()


def backup_sqlite(path: Path, now: dt.datetime | None = None) -> Path:
    """Copy the SQLite database ``path`` to ``<path>.bak-<UTC timestamp>``."""
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.bak-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.bak-{stamp}-{n}")
        n += 1
    source = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        source.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        copy = sqlite3.connect(target)
        try:
            source.backup(copy)
        finally:
            copy.close()
    finally:
        source.close()
    log.info("backed up %s to %s", path, target)
    return target


def _foreign_key_check(engine: Engine) -> None:
    # Migrations run with foreign keys off (batch mode); make sure they left none broken.
    with engine.connect() as connection:
        broken = connection.execute(text("PRAGMA foreign_key_check")).fetchall()
    if broken:
        raise SchemaError(f"the migration left broken foreign keys: {broken[:5]}")


def _has_tables(engine: Engine) -> bool:
    return bool(inspect(engine).get_table_names())
