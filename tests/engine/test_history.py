"""History partitions: created ahead, archived past the retention, exported; reconcile
keeps checking every balance against archived totals plus the entries online."""

from __future__ import annotations

import csv
import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from bench.history import load_history
from engine import AccountKind, Engine, PostPending
from engine.history import (
    HistoryConfig,
    archive_before,
    create_ahead,
    export_archived,
    id_at,
    partition_name,
    partition_past,
    run_once,
    time_of,
)
from engine.reconcile import reconcile
from tests.engine.test_engine import SCOPE, key, move, new_account

NOW = datetime.now(UTC)


async def _partitions(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return await conn.fetch("SELECT * FROM history_partitions ORDER BY lower_id")


async def _attached(conn: asyncpg.Connection, parent: str) -> set[str]:
    rows = await conn.fetch(
        """SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
           WHERE i.inhparent = $1::regclass""",
        parent,
    )
    return {row["relname"] for row in rows}


async def _assert_reconciles(conn: asyncpg.Connection) -> None:
    failed = [o for o in await reconcile(conn) if o.violations]
    assert not failed, failed


def test_ids_and_times_round_trip() -> None:
    moment = datetime(2026, 3, 4, 5, 6, 7, 891000, tzinfo=UTC)
    assert time_of(id_at(moment)) == moment
    assert id_at(moment + timedelta(milliseconds=1)) - id_at(moment) == 1 << 22
    assert partition_name(id_at(moment)) == "p20260304"


async def test_migration_partitions_now_and_ahead(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        parts = await _partitions(conn)
        assert parts[0]["lower_id"] == -(2**63)
        assert [p["state"] for p in parts] == ["attached"] * len(parts)
        # Contiguous, covering now and at least four more weeks.
        for before, after in itertools.pairwise(parts):
            assert before["upper_id"] == after["lower_id"]
        assert parts[-1]["upper_id"] >= id_at(NOW + timedelta(days=28))
        names = {f"transfers_{p['name']}" for p in parts}
        assert await _attached(conn, "transfers") == names
        assert await _attached(conn, "entries") == {
            n.replace("transfers", "entries") for n in names
        }
    finally:
        await conn.close()


async def test_create_ahead_extends_and_is_idempotent(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        config = HistoryConfig(partition_span_days=1, partitions_ahead=3)
        later = NOW + timedelta(days=60)
        created = await create_ahead(conn, config=config, now=later)
        assert created  # the migration's partitions reach ~5 weeks, not 63 days
        parts = await _partitions(conn)
        assert parts[-1]["upper_id"] >= id_at(later + timedelta(days=3))
        assert parts[-1]["upper_id"] - parts[-1]["lower_id"] == id_at(
            NOW + timedelta(days=1)
        ) - id_at(NOW)
        assert await create_ahead(conn, config=config, now=later) == []
        # A row dated in a new partition lands in it.
        table = f"transfers_{parts[-1]['name']}"
        assert table in await _attached(conn, "transfers")
    finally:
        await conn.close()


async def test_archive_moves_old_history_and_reconcile_still_holds(
    dsn: str, engine: Engine, tmp_path: Path
) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        # 60 days ago, in partitions of their own: 2,000 transfers among 20 users.
        await partition_past(conn, since=NOW - timedelta(days=80), span_days=7)
        old = await load_history(
            conn,
            users=20,
            transfers=2_000,
            start=NOW - timedelta(days=70),
            end=NOW - timedelta(days=50),
            scope=SCOPE,
        )
        await _assert_reconciles(conn)
        balances_before = await conn.fetch("SELECT * FROM accounts ORDER BY id")
        # A hold made now, posted now: its entries are online, as are new transfers.
        bank = await new_account(engine, AccountKind.SYSTEM)
        alice = await new_account(engine)
        assert (await move(engine, bank, alice, 500, idempotency=key())).ok
        online_before = await conn.fetchval("SELECT count(*) FROM transfers")

        config = HistoryConfig(retention_days=30, partitions_per_run_max=100)
        horizon = id_at(NOW - timedelta(days=30))
        archived, blocked = await archive_before(conn, horizon, limit=100, lock_timeout_ms=1000)
        assert blocked is None
        assert archived, "the loaded history lies in partitions past the retention"
        parts = {p["name"]: p for p in await _partitions(conn)}
        moved = sum(parts[n]["transfers"] for n in archived)
        assert moved == 2_000
        assert sum(parts[n]["entries"] for n in archived) == 4_000
        assert await conn.fetchval("SELECT count(*) FROM transfers") == online_before - 2_000
        for name in archived:
            assert f"transfers_{name}" not in await _attached(conn, "transfers")
            assert (
                await conn.fetchval(f"SELECT count(*) FROM archive.transfers_{name}")
                == parts[name]["transfers"]
            )
        # Balances did not move; reconcile checks them against archived totals.
        assert (
            await conn.fetch(
                "SELECT * FROM accounts WHERE id <> ALL($1::bigint[]) ORDER BY id", [bank, alice]
            )
            == balances_before
        )
        totals = await conn.fetchrow(
            """SELECT sum(entries) AS n, sum(posted_delta_minor) AS posted
               FROM archived_account_totals"""
        )
        assert totals["n"] == 4_000 and totals["posted"] == 0
        await _assert_reconciles(conn)

        # The same users keep transacting on top of their archived history.
        user = old.user_ids[0]
        result = await move(engine, user, old.user_ids[1], 7, idempotency=key())
        assert result.ok, result
        await _assert_reconciles(conn)

        # Export: CSV files with every row, the archive tables dropped, reconcile intact.
        exported = await export_archived(conn, tmp_path / "archive", limit=100)
        assert exported == archived
        rows = 0
        for name in exported:
            with (tmp_path / "archive" / f"transfers_{name}.csv").open() as f:
                rows += sum(1 for _ in csv.DictReader(f))
            assert (
                await conn.fetchval("SELECT to_regclass($1)", f"archive.transfers_{name}") is None
            )
        assert rows == 2_000
        states = {p["name"]: p["state"] for p in await _partitions(conn)}
        assert {states[n] for n in exported} == {"exported"}
        assert not list((tmp_path / "archive").glob("*.partial"))
        await _assert_reconciles(conn)
        assert config.retention_days == 30
    finally:
        await conn.close()


async def test_a_partition_with_an_open_hold_is_not_archived(dsn: str, engine: Engine) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        bank = await new_account(engine, AccountKind.SYSTEM)
        alice = await new_account(engine)
        hold = await move(engine, bank, alice, 100, pending=True, idempotency=key())
        assert hold.ok
        before = await _partitions(conn)
        # Everything up to a week from now counts as past the retention here.
        future = NOW + timedelta(days=8)
        archived, blocked = await archive_before(
            conn, id_at(future), limit=100, lock_timeout_ms=1000
        )
        # The first partition (history before the migration) is empty and goes; the one
        # holding the open hold stays, and so does every later one.
        assert blocked is not None and "open hold" in blocked
        hold_id = hold.transfers[0].id
        holder = next(p["name"] for p in before if p["lower_id"] <= hold_id < p["upper_id"])
        assert holder not in archived
        assert f"transfers_{holder}" in await _attached(conn, "transfers")
        await _assert_reconciles(conn)
        # Once posted, the partition may go; the post's entries stay checkable.
        posted = await engine.submit(
            PostPending(transfer_id=hold_id, scope=SCOPE), idempotency=key()
        )
        assert posted.ok, posted
        archived, blocked = await archive_before(conn, id_at(future), limit=1, lock_timeout_ms=1000)
        assert archived == [holder] and blocked is None
        await _assert_reconciles(conn)
    finally:
        await conn.close()


async def test_run_once_is_bounded_and_resumes(dsn: str, tmp_path: Path) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        made = await partition_past(conn, since=NOW - timedelta(days=200), span_days=7)
        assert len(made) >= 200 // 7
        await load_history(
            conn,
            users=5,
            transfers=50,
            start=NOW - timedelta(days=200),
            end=NOW - timedelta(days=150),
        )
        config = HistoryConfig(retention_days=90, archive_dir=tmp_path, partitions_per_run_max=1)
        first = await run_once(conn, config=config, now=NOW)
        assert len(first.archived) == 1 and first.exported == first.archived and first.full
        done = list(first.archived)
        for _ in range(40):
            report = await run_once(conn, config=config, now=NOW)
            done += report.archived
            if not report.full:
                break
        states = [
            p["state"]
            for p in await _partitions(conn)
            if p["upper_id"] <= id_at(NOW - timedelta(days=90))
        ]
        assert set(states) == {"exported"}
        await _assert_reconciles(conn)
    finally:
        await conn.close()
