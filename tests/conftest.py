"""Shared pytest configuration: hypothesis profiles, and the test databases (DESIGN §8:
the repository, leasing and end-to-end tests run on both SQLite and PostgreSQL)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).parent))

from db_support import TEMPLATE, PostgresServer, running_postgres

# DESIGN §8: a "ci" profile with at least 500 examples per property and a deadline.
settings.register_profile(
    "ci",
    max_examples=500,
    deadline=2000,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=100, deadline=2000)
settings.register_profile("long", max_examples=20_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


# -- databases ----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session (skipped without one, failed under CI)."""
    with running_postgres() as server:
        yield server


@pytest.fixture
def pg_database(postgres_server: PostgresServer) -> Iterator[Callable[..., str]]:
    """``pg_database(migrated=True)``: the URL of a new database (a copy of the migrated
    template, or empty), dropped at teardown."""
    made: list[str] = []

    def make(migrated: bool = True) -> str:
        name = postgres_server.create_database(template=TEMPLATE if migrated else None)
        made.append(name)
        return postgres_server.url(name)

    yield make
    for name in made:
        postgres_server.drop_database(name)


#: Parameters of ``db_backend``; ``-m "not postgresql"`` leaves the PostgreSQL runs out.
DB_BACKENDS = ("sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql))


@pytest.fixture(params=DB_BACKENDS)
def db_backend(request: pytest.FixtureRequest) -> str:
    """Each test that asks for it runs once per database backend."""
    return str(request.param)


@pytest.fixture
def db_url(db_backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A migrated database of its own on each backend: SQLite in tmp_path, or a new
    PostgreSQL database."""
    if db_backend == "postgresql":
        return str(request.getfixturevalue("pg_database")())
    from router.db.engine import sqlite_url_for
    from router.db.migrate import upgrade

    url = sqlite_url_for(tmp_path)
    upgrade(url)
    return url


@pytest.fixture
def empty_db_url(db_backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A database with no schema on each backend (for the migrations)."""
    if db_backend == "postgresql":
        return str(request.getfixturevalue("pg_database")(migrated=False))
    from router.db.engine import sqlite_url_for

    return sqlite_url_for(tmp_path)
