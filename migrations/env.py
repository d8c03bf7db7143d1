"""Alembic environment of dicom-router, run by ``router.db.migrate`` through Alembic's API.

The URL comes from ``config.attributes["url"]`` (or an open connection from
``config.attributes["connection"]``), set in code by ``migrate.alembic_config``; there is
no ``alembic.ini``. The metadata is the models', so autogenerate and the drift test
compare against them. SQLite gets batch mode (it has almost no ALTER) and, because the
engine emits its own BEGIN, transactional DDL: each migration and its version stamp
commit together or not at all.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection
from sqlalchemy.pool import NullPool

from router.db.engine import WRITE_OPTION, make_engine
from router.db.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: build the Config with migrate.alembic_config(url)")
    return str(url)


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        literal_binds=True,
        target_metadata=target_metadata,
        render_as_batch=True,
        transaction_per_migration=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    transactional_ddl = True if connection.dialect.name == "sqlite" else None
    context.configure(
        connection=connection,
        transactional_ddl=transactional_ddl,
        target_metadata=target_metadata,
        render_as_batch=True,
        transaction_per_migration=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    # Foreign keys off: batch mode recreates tables (SQLite), which enforcement would
    # turn into cascades; migrate.upgrade runs PRAGMA foreign_key_check afterwards.
    engine = make_engine(_url(), foreign_keys=False, poolclass=NullPool)
    try:
        with engine.execution_options(**{WRITE_OPTION: True}).connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
