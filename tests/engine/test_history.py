"""History partitions: created ahead, archived past the retention, exported; reconcile
keeps checking every balance against archived totals plus the entries online."""

from __future__ import annotations

import asyncio
import csv
import itertools
import os
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
        folded = await conn.fetch("SELECT DISTINCT partition_name FROM archived_account_totals")
        assert [r["partition_name"] for r in folded] == ["*"]
        assert not await conn.fetchval(
            """SELECT count(*) FROM history_partitions
               WHERE state <> 'attached' AND NOT totals_folded"""
        )
        states = [
            p["state"]
            for p in await _partitions(conn)
            if p["upper_id"] <= id_at(NOW - timedelta(days=90))
        ]
        assert set(states) == {"exported"}
        await _assert_reconciles(conn)
    finally:
        await conn.close()


async def test_totals_staged_for_an_attached_partition_do_not_count(dsn: str) -> None:
    """A detach that failed after its totals were written leaves them staged: reconcile
    must not add them to the rows still online (it would count them twice)."""
    from engine.history import _stage_totals

    conn = await asyncpg.connect(dsn)
    try:
        await partition_past(conn, since=NOW - timedelta(days=30), span_days=7)
        await load_history(
            conn,
            users=5,
            transfers=40,
            start=NOW - timedelta(days=20),
            end=NOW - timedelta(days=19),
        )
        holder = await conn.fetchval(
            "SELECT name FROM history_partitions WHERE lower_id <= $1 AND $1 < upper_id",
            id_at(NOW - timedelta(days=20)),
        )
        transfers, entries = await _stage_totals(conn, holder)
        assert (transfers, entries) == (40, 80)
        await _assert_reconciles(conn)
        # Were they counted, every balance would be off by its partition's sum.
        await conn.execute(
            "UPDATE history_partitions SET state = 'archived' WHERE name = $1", holder
        )
        failed = [o.name for o in await reconcile(conn) if o.violations]
        assert "every balance equals the sum of its entries" in failed
    finally:
        await conn.close()


async def test_migration_keeps_the_rows_of_an_unpartitioned_ledger(server_dsn: str) -> None:
    """A database on schema 1 with history gets it all back, partitioned, from 0002."""
    from engine.database import load_migrations
    from tests.conftest import with_database

    name = f"history_upgrade_{os.getpid()}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name}")
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    conn = await asyncpg.connect(with_database(server_dsn, name))
    try:
        first, second = load_migrations()[:2]
        await conn.execute(first.sql)
        # A small ledger written the way the engine writes: one transfer, two entries.
        t = id_at(NOW - timedelta(days=3))
        ledger = """
            INSERT INTO accounts (id, currency, kind, overdraft_allowed, scope, created_at,
                                  debits_posted, credits_posted)
            VALUES (1, 'CNY', 'system', true, 's', now(), 70, 0),
                   (2, 'CNY', 'user', false, 's', now(), 0, 70);
            INSERT INTO transfers (id, debit_account_id, credit_account_id, currency,
                amount_minor, posted_amount_minor, status, pending, scope, created_at)
            VALUES (:t, 1, 2, 'CNY', 70, 70, 'posted', false, 's', now());
            INSERT INTO entries VALUES (1, :t + 1, :t, 'transfer', -70, 0, -70, 0, now()),
                                       (2, :t + 2, :t, 'transfer', 70, 0, 70, 0, now());"""
        await conn.execute(ledger.replace(":t", str(t)))
        await conn.execute(second.sql)
        assert await conn.fetchval("SELECT count(*) FROM transfers") == 1
        assert await conn.fetchval("SELECT count(*) FROM entries") == 2
        assert (
            await conn.fetchval("SELECT relkind FROM pg_class WHERE relname = 'transfers'") == b"p"
        )
        assert await conn.fetchval("SELECT to_regclass('transfers_unpartitioned')") is None
        holder = await conn.fetchval(
            "SELECT name FROM history_partitions WHERE lower_id <= $1 AND $1 < upper_id", t
        )
        assert await conn.fetchval(f"SELECT count(*) FROM transfers_{holder}") == 1
        await conn.execute("CREATE TABLE schema_migrations (version int, name text)")
        await _assert_reconciles(conn)
    finally:
        await conn.close()


async def test_archiving_under_load_loses_nothing(dsn: str, engine: Engine) -> None:
    """Transfers keep committing while a partition is detached; whichever waits, every
    transfer is answered, and the ledger reconciles."""
    conn = await asyncpg.connect(dsn)
    try:
        await partition_past(conn, since=NOW - timedelta(days=80), span_days=7)
        old = await load_history(
            conn,
            users=10,
            transfers=500,
            start=NOW - timedelta(days=70),
            end=NOW - timedelta(days=60),
            scope=SCOPE,
        )
        bank = await new_account(engine, AccountKind.SYSTEM)
        users = [await new_account(engine) for _ in range(4)]
        for user in users:
            assert (await move(engine, bank, user, 10_000, idempotency=key())).ok

        async def pay(i: int) -> bool:
            debit, credit = users[i % 4], users[(i + 1) % 4]
            payer = old.user_ids[i % 10] if i % 3 == 0 else debit
            payee = old.user_ids[(i + 1) % 10] if i % 3 == 0 else credit
            return (await move(engine, payer, payee, 1, idempotency=key())).ok

        horizon = id_at(NOW - timedelta(days=30))
        results = await asyncio.gather(
            *(pay(i) for i in range(300)),
            archive_before(conn, horizon, limit=100, lock_timeout_ms=2000),
            *(pay(i) for i in range(300, 600)),
        )
        archived, blocked = results[300]
        assert all(results[:300]) and all(results[301:])
        # Archived, or refused for the locks it could not get in time: never half done.
        assert archived or (blocked is not None and "locks" in blocked)
        if not archived:
            archived, blocked = await archive_before(conn, horizon, limit=100, lock_timeout_ms=2000)
            assert archived, blocked
        await _assert_reconciles(conn)
    finally:
        await conn.close()


async def test_the_sweeper_maintains_history_at_its_interval(dsn: str, engine: Engine) -> None:
    from engine.sweeper import Sweeper, SweeperConfig

    conn = await asyncpg.connect(dsn)
    try:
        before = len(await _partitions(conn))
        config = SweeperConfig(
            history=HistoryConfig(partitions_ahead=8, retention_days=None),
            history_interval_s=3600,
        )
        sweeper = Sweeper(engine, config=config)
        await sweeper.run_once()
        after = await _partitions(conn)
        assert len(after) > before
        assert after[-1]["upper_id"] >= id_at(NOW + timedelta(days=8 * 7))
        # Not due again for an hour: a second pass does not put back a partition removed.
        last = after[-1]["name"]
        await conn.execute(f"DROP TABLE transfers_{last}, entries_{last}")
        await conn.execute("DELETE FROM history_partitions WHERE name = $1", last)
        await sweeper.run_once()
        assert len(await _partitions(conn)) == len(after) - 1
        # A new sweeper is due at once, and makes it again.
        await Sweeper(engine, config=config).run_once()
        assert len(await _partitions(conn)) == len(after)
    finally:
        await conn.close()
