"""Tests for engine.database: a real PostgreSQL server, its crash restart, and migrations.

One server is shared by the module (initdb and start cost about a second); tests that need
an empty schema get their own database on it.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from engine.database import (
    EmbeddedPostgres,
    SchemaNotCurrent,
    check_schema,
    database_url_from_env,
    load_migrations,
    migrate,
    pending_migrations,
)

_database_names = (f"test_db_{n}" for n in itertools.count())


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(data_dir=tmp_path_factory.mktemp("pg") / "data")
    server.start()
    yield server
    server.stop()


def fresh_database(pg: EmbeddedPostgres) -> str:
    """DSN of a new, empty database on the shared server (start() reuses the server)."""
    return EmbeddedPostgres(data_dir=pg.data_dir, database=next(_database_names)).start()


def all_versions() -> list[int]:
    return [migration.version for migration in load_migrations()]


async def test_server_keeps_durable_defaults(pg: EmbeddedPostgres) -> None:
    conn = await asyncpg.connect(pg.dsn)
    try:
        assert await conn.fetchval("SHOW synchronous_commit") == "on"
        assert await conn.fetchval("SHOW fsync") == "on"
        assert await conn.fetchval("SELECT current_database()") == "txengine"
    finally:
        await conn.close()
    assert pg.is_running()
    assert pg.dsn == f"postgresql://postgres@127.0.0.1:{pg.port}/txengine"
    assert (pg.bin_dir / "pgbench").exists()


def test_start_while_running_reuses_server(pg: EmbeddedPostgres) -> None:
    pid = pg.pid
    again = EmbeddedPostgres(data_dir=pg.data_dir)
    assert again.start() == pg.dsn
    assert again.pid == pid
    assert pg.start() == pg.dsn
    assert pg.pid == pid


async def test_kill_then_start_keeps_committed_data(pg: EmbeddedPostgres) -> None:
    conn = await asyncpg.connect(pg.dsn)
    await conn.execute("CREATE TABLE crash_probe (id int PRIMARY KEY, note text)")
    await conn.execute("INSERT INTO crash_probe VALUES (1, 'survives')")
    old_pid, old_port = pg.pid, pg.port

    pg.kill()
    assert not pg.is_running()
    # Its backend exits once it notices the postmaster died; no query on it is reliable.
    conn.terminate()

    assert pg.start()
    assert pg.pid not in (None, old_pid)
    assert pg.port == old_port  # kept, so clients can reconnect to the same DSN
    conn = await asyncpg.connect(pg.dsn)
    try:
        assert await conn.fetchval("SELECT note FROM crash_probe WHERE id = 1") == "survives"
    finally:
        await conn.close()


def test_load_migrations_numbers_from_one_without_gaps() -> None:
    migrations = load_migrations()
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    assert all(m.name and m.sql.strip() for m in migrations)


async def test_migrate_twice_applies_once(pg: EmbeddedPostgres) -> None:
    conn = await asyncpg.connect(fresh_database(pg))
    try:
        assert [m.version for m in await pending_migrations(conn)] == all_versions()
        assert await migrate(conn) == all_versions()
        assert await migrate(conn) == []
        assert await pending_migrations(conn) == []
        rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
        assert [(r["version"], r["name"]) for r in rows] == [
            (m.version, m.name) for m in load_migrations()
        ]
    finally:
        await conn.close()


async def test_concurrent_migrations_take_turns(pg: EmbeddedPostgres) -> None:
    dsn = fresh_database(pg)
    first, second = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    try:
        applied = await asyncio.gather(migrate(first), migrate(second))
        assert sorted(applied[0] + applied[1]) == all_versions()
    finally:
        await first.close()
        await second.close()


async def test_check_schema_before_and_after_migrate(pg: EmbeddedPostgres) -> None:
    conn = await asyncpg.connect(fresh_database(pg))
    try:
        with pytest.raises(SchemaNotCurrent, match="txengine migrate") as raised:
            await check_schema(conn)
        assert str(all_versions()) in str(raised.value)
        await migrate(conn)
        await check_schema(conn)
    finally:
        await conn.close()


async def test_check_schema_rejects_database_newer_than_code(pg: EmbeddedPostgres) -> None:
    conn = await asyncpg.connect(fresh_database(pg))
    try:
        await migrate(conn)
        await conn.execute("INSERT INTO schema_migrations (version, name) VALUES (9999, 'x')")
        with pytest.raises(SchemaNotCurrent, match=r"\[9999\] newer"):
            await check_schema(conn)
        with pytest.raises(SchemaNotCurrent, match="newer"):
            await migrate(conn)
    finally:
        await conn.close()


async def test_context_manager_settings_and_long_data_dir(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # A data dir too long for a unix socket path must still work (socket moves to /tmp).
    parent = tmp_path_factory.mktemp("long") / ("d" * 60) / ("e" * 60)
    parent.mkdir(parents=True)
    server = EmbeddedPostgres(data_dir=parent / "data", settings={"work_mem": "8MB"})
    with server as running:
        socket_dir = Path((parent / "data" / "postmaster.pid").read_text().splitlines()[4])
        assert socket_dir != parent / "data"
        conn = await asyncpg.connect(running.dsn)
        try:
            assert await conn.fetchval("SHOW work_mem") == "8MB"
        finally:
            await conn.close()
    assert not server.is_running()
    assert server.pid is None


def test_start_needs_existing_parent(tmp_path_factory: pytest.TempPathFactory) -> None:
    missing = tmp_path_factory.mktemp("nothing") / "absent" / "data"
    with pytest.raises(FileNotFoundError):
        EmbeddedPostgres(data_dir=missing).start()


def test_stop_rejects_unknown_mode(pg: EmbeddedPostgres) -> None:
    with pytest.raises(ValueError, match="stop mode"):
        pg.stop(mode="gently")


def test_database_url_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TXENGINE_DATABASE_URL", raising=False)
    assert database_url_from_env() is None
    monkeypatch.setenv("TXENGINE_DATABASE_URL", "")
    assert database_url_from_env() is None
    monkeypatch.setenv("TXENGINE_DATABASE_URL", "postgresql://u@h:1/d")
    assert database_url_from_env() == "postgresql://u@h:1/d"


def test_a_new_handle_restarts_on_the_port_of_the_last_start(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """After a crash, whoever starts the server again (another process, a fault harness)
    gets the same DSN, so running gateways reconnect without being told anything."""
    data_dir = tmp_path_factory.mktemp("pg_port") / "data"
    first = EmbeddedPostgres(data_dir=data_dir)
    dsn = first.start()
    first.kill()
    again = EmbeddedPostgres(data_dir=data_dir)
    try:
        assert again.start() == dsn
    finally:
        again.stop()
