"""One embedded PostgreSQL per test run; each test that asks gets a clean database.

A migrated template database is made once; `CREATE DATABASE ... TEMPLATE` copies it
for each test in a few milliseconds, so tests never see each other's rows.
Set TXENGINE_TEST_DATABASE_URL to run against another server (it must allow CREATE DATABASE).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from engine import Engine, EngineConfig, LaneConfig
from engine.database import EmbeddedPostgres, migrate

_TEMPLATE = "txengine_template"
_names = (f"test_{os.getpid()}_{n}" for n in itertools.count())


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


@pytest.fixture(scope="session")
def server_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("TXENGINE_TEST_DATABASE_URL")
    if external:
        yield external
        return
    server = EmbeddedPostgres(data_dir=tmp_path_factory.mktemp("pg") / "data")
    dsn = server.start()
    yield dsn
    server.stop(mode="immediate")


@pytest.fixture(scope="session")
async def template_dsn(server_dsn: str) -> str:
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {_TEMPLATE}")
        await admin.execute(f"CREATE DATABASE {_TEMPLATE}")
    finally:
        await admin.close()
    dsn = with_database(server_dsn, _TEMPLATE)
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return dsn


@pytest.fixture
async def dsn(server_dsn: str, template_dsn: str) -> str:
    """A fresh, migrated database for this test."""
    name = next(_names)
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE {_TEMPLATE}")
    finally:
        await admin.close()
    return with_database(server_dsn, name)


TEST_ENGINE_CONFIG = EngineConfig(
    lanes=2, lane=LaneConfig(batch_size_max=100, lock_timeout_ms=5_000), read_pool_size_max=4
)


@pytest.fixture
async def engine(dsn: str) -> AsyncIterator[Engine]:
    opened = await Engine.open(dsn, config=TEST_ENGINE_CONFIG)
    try:
        yield opened
    finally:
        await opened.close()
