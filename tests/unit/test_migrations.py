"""The schema: Alembic migrations from the package (the upgrade path, downgrade and the
models' agreement on SQLite and PostgreSQL), the start-up check, SQLite settings and
backups."""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text

from router.db.engine import make_engine, sqlite_path, sqlite_url_for
from router.db.migrate import (
    SchemaMissing,
    SchemaOutOfDate,
    alembic_config,
    backup_sqlite,
    check_schema,
    current_revision,
    head_revision,
    migrations_dir,
    upgrade,
)
from router.db.models import Base

TABLES = {
    "alembic_version",
    "attempts",
    "destinations",
    "instances",
    "jobs",
    "node_state",
    "rule_destinations",
    "rules",
    "sources",
    "users",
}


@pytest.fixture
def url(empty_db_url: str) -> str:
    """A database with no schema yet: SQLite and PostgreSQL (tests/conftest.py)."""
    return empty_db_url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return sqlite_url_for(tmp_path)


@pytest.fixture
def sqlite_engine(sqlite_url: str) -> Iterator[Engine]:
    engine = make_engine(sqlite_url)
    yield engine
    engine.dispose()


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    engine = make_engine(url)
    yield engine
    engine.dispose()


def test_sqlite_url_for_is_the_settings_file(tmp_path: Path) -> None:
    url = sqlite_url_for(tmp_path)
    assert url == f"sqlite:///{(tmp_path / 'router.sqlite').resolve()}"
    assert sqlite_path(url) == (tmp_path / "router.sqlite").resolve()
    assert sqlite_path("postgresql+psycopg://u:p@h/db") is None
    assert sqlite_path("sqlite://") is None


def test_migrations_ship_in_the_package() -> None:
    directory = migrations_dir()
    assert (directory / "env.py").is_file()
    assert (directory / "script.py.mako").is_file()
    assert list((directory / "versions").glob("0001_*.py"))


def test_upgrade_head_on_an_empty_database(url: str, engine: Engine) -> None:
    assert upgrade(url) is None  # nothing to back up: the file did not exist
    assert set(inspect(engine).get_table_names()) == TABLES
    assert current_revision(engine) == head_revision()
    with engine.connect() as connection:
        assert connection.execute(text("SELECT id, rules_version FROM node_state")).all() == [
            (1, 0)
        ]


def test_upgrade_at_head_is_a_no_op(url: str, engine: Engine, tmp_path: Path) -> None:
    upgrade(url)
    assert upgrade(url) is None
    assert not list(tmp_path.glob("*.bak-*"))


def test_models_and_migrations_agree(url: str, engine: Engine) -> None:
    upgrade(url)
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "target_metadata": Base.metadata}
        )
        assert compare_metadata(context, Base.metadata) == []


def test_exactly_one_head() -> None:
    script = ScriptDirectory.from_config(alembic_config())
    assert len(script.get_heads()) == 1
    assert script.get_current_head() == head_revision()
    # Every revision is reachable from the head back to the base (no orphans).
    assert len(list(script.walk_revisions())) == len(
        list(script.revision_map.iterate_revisions("heads", "base"))
    )


def test_downgrade_to_base_and_up_again(url: str, engine: Engine) -> None:
    upgrade(url)
    command.downgrade(alembic_config(url), "base")
    assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    assert current_revision(engine) is None
    upgrade(url, backup=False)
    assert current_revision(engine) == head_revision()


def test_0004_sources_made_before_keep_echo_and_store(url: str, engine: Engine) -> None:
    """Catalogue SEC-05: a source of 0003 could echo and store; after 0004 it still may
    (and the downgrade drops the column again)."""
    command.upgrade(alembic_config(url), "0003")
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO sources (ae_title, addresses, created_at)"
                " VALUES ('CT1', '[\"10.0.0.5\"]', CURRENT_TIMESTAMP)"
            )
        )
    upgrade(url, backup=False)
    from router.db.repository import Repository

    [source] = Repository(engine).list_sources()
    assert (source.ae_title, source.addresses) == ("CT1", ("10.0.0.5",))
    assert source.operations == ("echo", "store")
    command.downgrade(alembic_config(url), "0003")
    columns = {c["name"] for c in inspect(engine).get_columns("sources")}
    assert "operations" not in columns and "addresses" in columns


def test_check_schema_on_an_empty_database(engine: Engine) -> None:
    with pytest.raises(SchemaMissing, match="run `dicom-router init`"):
        check_schema(engine)


def test_check_schema_on_an_old_database(url: str, engine: Engine) -> None:
    upgrade(url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0000'"))
    with pytest.raises(SchemaOutOfDate) as info:
        check_schema(engine)
    assert info.value.current == "0000"
    assert info.value.head == head_revision()
    assert str(info.value) == (
        f"database at revision 0000, this version needs {head_revision()}: "
        "run `dicom-router db upgrade`"
    )


def test_check_schema_on_a_current_database(url: str, engine: Engine) -> None:
    upgrade(url)
    check_schema(engine)


def test_upgrade_backs_up_an_existing_sqlite_file(sqlite_url: str, sqlite_engine: Engine) -> None:
    # A database behind the head, holding data that is still only in the -wal file: the
    # engine's pooled connection stays open, so nothing has checkpointed it yet.
    upgrade(sqlite_url)
    command.downgrade(alembic_config(sqlite_url), "base")
    with sqlite_engine.begin() as connection:
        connection.execute(text("CREATE TABLE keepsake (v TEXT)"))
        connection.execute(text("INSERT INTO keepsake VALUES ('precious')"))
    path = sqlite_path(sqlite_url)
    assert path is not None
    assert Path(f"{path}-wal").stat().st_size > 0

    backup = upgrade(sqlite_url)

    assert backup is not None
    assert backup.parent == path.parent
    assert backup.name.startswith("router.sqlite.bak-") and backup.name.endswith("Z")
    assert current_revision(sqlite_engine) == head_revision()
    copy = sqlite3.connect(backup)
    try:
        assert copy.execute("SELECT v FROM keepsake").fetchall() == [("precious",)]
        assert copy.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        tables = {row[0] for row in copy.execute("SELECT name FROM sqlite_master")}
        assert "jobs" not in tables  # the copy is from before the upgrade
    finally:
        copy.close()


def test_upgrade_without_backup(sqlite_url: str, sqlite_engine: Engine, tmp_path: Path) -> None:
    upgrade(sqlite_url)
    command.downgrade(alembic_config(sqlite_url), "base")
    assert upgrade(sqlite_url, backup=False) is None
    assert not list(tmp_path.glob("*.bak-*"))


def test_two_backups_in_the_same_second_do_not_collide(tmp_path: Path) -> None:
    path = tmp_path / "router.sqlite"
    sqlite3.connect(path).close()
    now = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    first = backup_sqlite(path, now)
    second = backup_sqlite(path, now)
    assert first.name == "router.sqlite.bak-20260102T030405Z"
    assert second.name == "router.sqlite.bak-20260102T030405Z-1"


def test_sqlite_connections_use_wal_and_synchronous_full(
    sqlite_url: str, sqlite_engine: Engine
) -> None:
    upgrade(sqlite_url)
    with sqlite_engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10_000
