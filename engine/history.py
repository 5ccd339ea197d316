"""Keeping history bounded: partitions of transfers and entries created ahead of time,
and, past a retention, archived.

Transfers and entries are partitioned by id range (migration 0002), and ids are
time-ordered, so each partition holds a span of days. `run_once` is one bounded pass:

1. create partitions so that `partitions_ahead` spans beyond now exist (writes never find
   their partition missing while the sweeper runs);
2. archive at most `partitions_per_run_max` partitions whose span ended more than
   `retention_days` ago: write what the partition holds per account into
   archived_account_totals (rows that count only once it is detached), then, in one
   short transaction under a short lock_timeout, DETACH both partitions, move them to the
   `archive` schema and mark them archived. Later runs fold those rows into one per
   account. Balances live on accounts and every entry carries the balance after it, so
   nothing online needs the old rows; reconcile checks balances against archived totals
   plus the entries still online;
3. when `archive_dir` is set, export archived partitions to CSV files there (written to a
   temporary name, fsynced, renamed), then drop them from the database.

A partition that still holds an open hold is never archived (the hold may yet be posted
or voided, changing the row); archiving stops there until it is resolved, and says so.
Every step is recorded in history_partitions, so a crash anywhere is resumed next run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import asyncpg

from engine.ids import EPOCH_MS, NODE_BITS, SEQUENCE_BITS

_log = logging.getLogger("txengine.history")

ID_TIME_SHIFT: Final = NODE_BITS + SEQUENCE_BITS
DAY_MS: Final = 86_400_000
ARCHIVE_SCHEMA: Final = "archive"
_EPOCH: Final = datetime.fromtimestamp(EPOCH_MS / 1000, UTC)


@dataclasses.dataclass(frozen=True, kw_only=True)
class HistoryConfig:
    partition_span_days: int = 7  # days of ids per new partition
    partitions_ahead: int = 4  # spans beyond now that must exist
    retention_days: int | None = 90  # archive partitions that ended this long ago; None: never
    archive_dir: Path | None = None  # export archived partitions here, then drop them
    partitions_per_run_max: int = 1  # archived (and exported) per run, at most
    creates_per_run_max: int = 64  # partitions created per run, at most
    lock_timeout_ms: int = 1_000  # DETACH waits this long for the write path, then retries

    def __post_init__(self) -> None:
        assert 1 <= self.partition_span_days <= 366, self.partition_span_days
        assert 1 <= self.partitions_ahead <= 100, self.partitions_ahead
        assert self.retention_days is None or self.retention_days >= 1, self.retention_days
        assert 1 <= self.partitions_per_run_max <= 100, self.partitions_per_run_max
        assert 1 <= self.creates_per_run_max <= 1_000, self.creates_per_run_max


@dataclasses.dataclass(frozen=True, kw_only=True)
class HistoryReport:
    created: list[str]  # partitions created
    archived: list[str]  # detached into the archive schema
    exported: list[str]  # written to archive_dir and dropped
    blocked: str | None  # why archiving stopped early (an open hold), if it did

    @property
    def full(self) -> bool:
        """True if a bound was reached, so another run right away would do more."""
        return bool(self.archived or self.exported)


def id_at(moment: datetime) -> int:
    """The smallest id minted at `moment` (ids start with ms since the epoch)."""
    ms = (moment - _EPOCH) // timedelta(milliseconds=1)
    return max(ms, 0) << ID_TIME_SHIFT


def time_of(id_: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=id_ >> ID_TIME_SHIFT)


def partition_name(lower_id: int) -> str:
    return time_of(max(lower_id, 0)).strftime("p%Y%m%d")


async def run_once(
    conn: asyncpg.Connection, *, config: HistoryConfig, now: datetime
) -> HistoryReport:
    """One bounded pass: create ahead, archive past the retention, export archived."""
    created = await create_ahead(conn, config=config, now=now)
    archived: list[str] = []
    blocked = None
    if config.retention_days is not None:
        horizon = id_at(now - timedelta(days=config.retention_days))
        archived, blocked = await archive_before(
            conn,
            horizon,
            limit=config.partitions_per_run_max,
            lock_timeout_ms=config.lock_timeout_ms,
        )
    await fold_totals(conn, limit=config.partitions_per_run_max)
    exported: list[str] = []
    if config.archive_dir is not None:
        exported = await export_archived(
            conn, config.archive_dir, limit=config.partitions_per_run_max
        )
    if created or archived or exported or blocked:
        _log.info(
            "history maintained",
            extra={
                "created": created,
                "archived": archived,
                "exported": exported,
                "blocked": blocked,
            },
        )
    return HistoryReport(created=created, archived=archived, exported=exported, blocked=blocked)


async def create_ahead(
    conn: asyncpg.Connection, *, config: HistoryConfig, now: datetime
) -> list[str]:
    """Create partitions after the last one until `partitions_ahead` spans past now exist."""
    span = config.partition_span_days * DAY_MS << ID_TIME_SHIFT
    target = id_at(now) + config.partitions_ahead * span
    upper = await conn.fetchval("SELECT max(upper_id) FROM history_partitions")
    assert upper is not None, "migration 0002 creates the first partitions"
    created: list[str] = []
    while upper < target and len(created) < config.creates_per_run_max:
        name = partition_name(upper)
        await conn.execute("SELECT create_history_partition($1, $2, $3)", name, upper, upper + span)
        created.append(name)
        upper += span
    return created


async def partition_past(conn: asyncpg.Connection, *, since: datetime, span_days: int) -> list[str]:
    """Split the first partition, which holds everything before the migration, into spans
    reaching back to `since`, for loading history of that time (a backfill, a benchmark).

    Only while that partition is empty: its rows cannot move. Returns the names made.
    """
    first = await conn.fetchrow(
        "SELECT name, upper_id FROM history_partitions ORDER BY lower_id LIMIT 1"
    )
    assert first is not None, "migration 0002 creates the first partitions"
    # The first partition keeps the epoch's date as its name: no span may start there.
    assert since >= _EPOCH + timedelta(days=span_days), since
    span = span_days * DAY_MS << ID_TIME_SHIFT
    bounds = []
    lower = first["upper_id"]
    while lower > id_at(since):
        bounds.append((lower - span, lower))
        lower -= span
    if not bounds:
        return []
    name = first["name"]
    async with conn.transaction():
        empty = await conn.fetchval(
            f"""SELECT NOT EXISTS (SELECT FROM {_ident("transfers_" + name)})
                   AND NOT EXISTS (SELECT FROM {_ident("entries_" + name)})"""
        )
        if not empty:
            raise ValueError(f"partition {name} holds rows; it cannot be split")
        await conn.execute(f"DROP TABLE {_ident('transfers_' + name)}, {_ident('entries_' + name)}")
        await conn.execute("DELETE FROM history_partitions WHERE name = $1", name)
        made = [partition_name(-(2**63))]  # the epoch's date, as the migration names it
        await conn.execute("SELECT create_history_partition($1, $2, $3)", made[0], -(2**63), lower)
        for low, high in reversed(bounds):
            made.append(partition_name(low))
            await conn.execute("SELECT create_history_partition($1, $2, $3)", made[-1], low, high)
    return made


async def archive_before(
    conn: asyncpg.Connection, horizon_id: int, *, limit: int, lock_timeout_ms: int
) -> tuple[list[str], str | None]:
    """Archive up to `limit` attached partitions wholly below `horizon_id`, oldest first.

    Returns the names archived and, if it stopped at an open hold or a lock, why.
    """
    rows = await conn.fetch(
        """SELECT name FROM history_partitions
           WHERE state = 'attached' AND upper_id <= $1 ORDER BY lower_id LIMIT $2""",
        horizon_id,
        limit,
    )
    archived: list[str] = []
    for row in rows:
        name = row["name"]
        # Rows of a partition without open holds never change again (new ids are minted
        # after the horizon), so everything is summed and counted before any lock.
        if await _open_hold(conn, name) is not None:
            return archived, f"partition {name} holds an open hold"
        transfers, entries = await _stage_totals(conn, name)
        refused = await _detach(conn, name, transfers, entries, lock_timeout_ms=lock_timeout_ms)
        if refused is not None:
            return archived, f"partition {name}: {refused}; retrying next run"
        archived.append(name)
    return archived, None


async def _open_hold(conn: asyncpg.Connection, name: str) -> int | None:
    hold: int | None = await conn.fetchval(
        f"SELECT id FROM {_ident('transfers_' + name)} WHERE status = 'pending' LIMIT 1"
    )
    return hold


# Per account of one partition: its entries (count, deltas) and the amounts its transfers
# posted as debit and as credit. $1 is the partition's name.
_STAGE_TOTALS: Final = """
INSERT INTO archived_account_totals (partition_name, account_id, entries, posted_delta_minor,
    pending_delta_minor, transfers_debited_minor, transfers_credited_minor)
SELECT $1, account_id, sum(n), sum(posted), sum(pending), sum(debited), sum(credited)
FROM (
    SELECT account_id, count(*) AS n, sum(posted_delta_minor) AS posted,
           sum(pending_delta_minor) AS pending, 0 AS debited, 0 AS credited
    FROM {entries} GROUP BY account_id
    UNION ALL
    SELECT debit_account_id, 0, 0, 0, sum(posted_amount_minor), 0 FROM {transfers} GROUP BY 1
    UNION ALL
    SELECT credit_account_id, 0, 0, 0, 0, sum(posted_amount_minor) FROM {transfers} GROUP BY 1
) u
GROUP BY account_id
"""


async def _stage_totals(conn: asyncpg.Connection, name: str) -> tuple[int, int]:
    """Write the partition's per-account totals (ignored while it is attached); return
    how many transfers and entries it holds. Redone from scratch if run again."""
    transfers, entries = _ident("transfers_" + name), _ident("entries_" + name)
    async with conn.transaction():
        await conn.execute("DELETE FROM archived_account_totals WHERE partition_name = $1", name)
        await conn.execute(_STAGE_TOTALS.format(entries=entries, transfers=transfers), name)
        counts = await conn.fetchrow(
            f"""SELECT (SELECT count(*) FROM {transfers}) AS transfers,
                       (SELECT coalesce(sum(entries), 0) FROM archived_account_totals
                        WHERE partition_name = $1)::bigint AS entries""",
            name,
        )
    assert counts is not None
    return counts["transfers"], counts["entries"]


async def _detach(
    conn: asyncpg.Connection, name: str, transfers: int, entries: int, *, lock_timeout_ms: int
) -> str | None:
    """Detach the partition pair into the archive schema, making its staged totals count,
    in one short transaction; else say why not.

    Transfers have no foreign keys to accounts (migration 0010), so DETACH locks only
    the history tables; should it still meet a batch in a lock cycle, PostgreSQL aborts
    one of the two, the lane retries its batch, and this gives up until the next run, as
    on a lock timeout.
    """
    transfers_table, entries_table = _ident("transfers_" + name), _ident("entries_" + name)
    try:
        async with conn.transaction():
            # DETACH needs the parents exclusively: a short wait, then give up and retry,
            # rather than queue the whole write path behind us. Nothing slow runs while
            # the lock is held: the sums and counts were made before.
            await conn.execute(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}")
            await conn.execute("LOCK TABLE transfers, entries IN ACCESS EXCLUSIVE MODE")
            # Nothing can write now; an open hold found here means one was created since.
            if await _open_hold(conn, name) is not None:
                raise _HoldAppeared(name)
            await conn.execute(f"ALTER TABLE transfers DETACH PARTITION {transfers_table}")
            await conn.execute(f"ALTER TABLE entries DETACH PARTITION {entries_table}")
            await conn.execute(f"ALTER TABLE {transfers_table} SET SCHEMA {ARCHIVE_SCHEMA}")
            await conn.execute(f"ALTER TABLE {entries_table} SET SCHEMA {ARCHIVE_SCHEMA}")
            await conn.execute(
                """UPDATE history_partitions SET state = 'archived', transfers = $2,
                          entries = $3, archived_at = now() WHERE name = $1""",
                name,
                transfers,
                entries,
            )
    except (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError) as exc:
        return f"the write path kept its locks ({type(exc).__name__})"
    except _HoldAppeared:
        return "an open hold appeared"
    return None


_FOLD: Final = """
WITH moved AS (
    DELETE FROM archived_account_totals WHERE partition_name = $1
    RETURNING account_id, entries, posted_delta_minor, pending_delta_minor,
              transfers_debited_minor, transfers_credited_minor
)
INSERT INTO archived_account_totals AS a (partition_name, account_id, entries,
    posted_delta_minor, pending_delta_minor, transfers_debited_minor, transfers_credited_minor)
SELECT '*', account_id, entries, posted_delta_minor, pending_delta_minor,
       transfers_debited_minor, transfers_credited_minor
FROM moved
ON CONFLICT (partition_name, account_id) DO UPDATE SET
    entries = a.entries + excluded.entries,
    posted_delta_minor = a.posted_delta_minor + excluded.posted_delta_minor,
    pending_delta_minor = a.pending_delta_minor + excluded.pending_delta_minor,
    transfers_debited_minor = a.transfers_debited_minor + excluded.transfers_debited_minor,
    transfers_credited_minor = a.transfers_credited_minor + excluded.transfers_credited_minor
"""


async def fold_totals(conn: asyncpg.Connection, *, limit: int) -> list[str]:
    """Add the totals of up to `limit` archived partitions into one row per account, so
    the totals table grows with the accounts, not with the partitions archived."""
    names = await conn.fetch(
        """SELECT name FROM history_partitions
           WHERE state <> 'attached' AND NOT totals_folded ORDER BY lower_id LIMIT $1""",
        limit,
    )
    folded = []
    for row in names:
        async with conn.transaction():
            await conn.execute(_FOLD, row["name"])
            await conn.execute(
                "UPDATE history_partitions SET totals_folded = true WHERE name = $1", row["name"]
            )
        folded.append(row["name"])
    return folded


class _HoldAppeared(Exception):
    """An open hold turned up in a partition past the retention (a clock far behind)."""


async def export_archived(conn: asyncpg.Connection, folder: Path, *, limit: int) -> list[str]:
    """Write archived partitions to CSV files in `folder`, then drop them; oldest first."""
    names = await conn.fetch(
        "SELECT name FROM history_partitions WHERE state = 'archived' ORDER BY lower_id LIMIT $1",
        limit,
    )
    await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
    exported = []
    for row in names:
        name = row["name"]
        for table in ("transfers_" + name, "entries_" + name):
            await _export_table(conn, table, folder / f"{table}.csv")
        async with conn.transaction():
            await conn.execute(f"DROP TABLE {ARCHIVE_SCHEMA}.{_ident('transfers_' + name)}")
            await conn.execute(f"DROP TABLE {ARCHIVE_SCHEMA}.{_ident('entries_' + name)}")
            await conn.execute(
                """UPDATE history_partitions SET state = 'exported', export_path = $2
                   WHERE name = $1""",
                name,
                str(folder),
            )
        exported.append(name)
    return exported


async def _export_table(conn: asyncpg.Connection, table: str, path: Path) -> None:
    """COPY a table to `path`, durably: a temporary name, fsync, rename, fsync the folder."""
    partial = path.with_suffix(".csv.partial")
    await conn.copy_from_table(
        table, schema_name=ARCHIVE_SCHEMA, output=str(partial), format="csv", header=True
    )
    await asyncio.to_thread(_make_durable, partial, path)


def _make_durable(partial: Path, path: Path) -> None:
    fd = os.open(partial, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _ident(name: str) -> str:
    # Names come from history_partitions, whose CHECK allows only p + 8 digits; quoting
    # still keeps any surprise from becoming SQL.
    return '"' + name.replace('"', '""') + '"'
