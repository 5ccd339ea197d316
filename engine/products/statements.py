"""Daily statements (对账单): every posted movement of one account on one UTC day.

One line per entry that changed the posted balance (holds placed or released move no
posted money and are left out), in the account's history order, with the balance after
it; so the lines' deltas sum to the day's change of the posted balance, and the first
line's balance after, less its delta, is the balance the day opened with.

A day's lines can be many: they are read through a server-side cursor in chunks of
`chunk_rows`, inside one read-only REPEATABLE READ transaction, so the whole statement
is one consistent snapshot while no more than a chunk is held in memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Final

import asyncpg
import msgspec

from engine import store
from engine.errors import EngineError, translate_database_error
from engine.model import AccountView

if TYPE_CHECKING:
    from engine.engine import Engine

CHUNK_ROWS_DEFAULT: Final = 500
CHUNK_ROWS_MAX: Final = 10_000

_LINES: Final = """
SELECT en.created_at, en.id, en.transfer_id, en.kind,
       CASE WHEN t.debit_account_id = en.account_id
            THEN t.credit_account_id ELSE t.debit_account_id END AS counterparty_account_id,
       t.currency, en.posted_delta_minor, en.posted_after_minor,
       t.metadata ->> 'out_trade_no' AS out_trade_no, t.metadata::text AS metadata
FROM entries en JOIN transfers t ON t.id = en.transfer_id
WHERE en.account_id = $1 AND en.created_at >= $2 AND en.created_at < $3
  AND en.posted_delta_minor <> 0
ORDER BY en.id
"""


class StatementLine(msgspec.Struct, frozen=True, kw_only=True):
    created_at: datetime
    entry_id: int
    transfer_id: int
    kind: str  # the entry's kind: transfer, post
    counterparty_account_id: int
    currency: str
    posted_delta_minor: int  # credit positive: money in is positive
    posted_after_minor: int  # the account's posted balance after this line
    out_trade_no: str | None  # from the transfer's metadata, when a product set it
    metadata: str  # the transfer's metadata, as JSON text


@dataclasses.dataclass(frozen=True, kw_only=True)
class Statement:
    account: AccountView
    day: date
    opens_at: datetime  # the day's first instant, UTC
    closes_at: datetime  # the next day's first instant, UTC
    _conn: asyncpg.Connection
    _chunk_rows: int

    async def chunks(self) -> AsyncIterator[list[StatementLine]]:
        """The day's lines in history order, at most `chunk_rows` at a time."""
        try:
            cursor = await self._conn.cursor(_LINES, self.account.id, self.opens_at, self.closes_at)
            while True:
                rows = await cursor.fetch(self._chunk_rows)
                if not rows:
                    return
                yield [_line(row) for row in rows]
        except EngineError:
            raise
        except Exception as exc:
            raise translate_database_error(exc) from exc


def day_bounds(day: date) -> tuple[datetime, datetime]:
    opens_at = datetime.combine(day, time(0), tzinfo=UTC)
    return opens_at, opens_at + timedelta(days=1)


@contextlib.asynccontextmanager
async def open_statement(
    engine: Engine,
    account_id: int,
    *,
    scope: str,
    day: date,
    chunk_rows: int = CHUNK_ROWS_DEFAULT,
) -> AsyncIterator[Statement | None]:
    """The statement of the scope's account for `day`, or None if it has no such account.
    Read its lines with `chunks()` inside the `async with`."""
    assert 1 <= chunk_rows <= CHUNK_ROWS_MAX, chunk_rows
    opens_at, closes_at = day_bounds(day)
    try:
        conn = await engine.pool.acquire()
    except Exception as exc:
        raise translate_database_error(exc) from exc
    try:
        # Read-only: it is rolled back at the end, there is nothing to commit.
        snapshot = conn.transaction(isolation="repeatable_read", readonly=True)
        try:
            await snapshot.start()
            account = await store.read_account(conn, account_id, scope=scope)
        except Exception as exc:
            raise translate_database_error(exc) from exc
        try:
            yield (
                None
                if account is None
                else Statement(
                    account=account,
                    day=day,
                    opens_at=opens_at,
                    closes_at=closes_at,
                    _conn=conn,
                    _chunk_rows=chunk_rows,
                )
            )
        finally:
            with contextlib.suppress(Exception):
                await snapshot.rollback()
    finally:
        with contextlib.suppress(Exception):
            await engine.pool.release(conn)


def _line(row: asyncpg.Record) -> StatementLine:
    return StatementLine(
        created_at=row["created_at"],
        entry_id=row["id"],
        transfer_id=row["transfer_id"],
        kind=row["kind"],
        counterparty_account_id=row["counterparty_account_id"],
        currency=row["currency"],
        posted_delta_minor=row["posted_delta_minor"],
        posted_after_minor=row["posted_after_minor"],
        out_trade_no=row["out_trade_no"],
        metadata=row["metadata"],
    )
