"""The replay check: a nonce is accepted once per partner within the timestamp window.

Several gateway processes serve one port, so the set of seen nonces lives in PostgreSQL
(`partner_nonces`, primary key (partner, nonce)), and a nonce is fresh exactly when its
row is inserted. Inserting per request would cost a round trip each; like the engine's
lanes, a `NonceBook` gathers the nonces that arrive while the previous insert runs (and,
under load, `batch_wait_ms` more) and inserts them all with one statement, whose
RETURNING says which were new. The table stays bounded: rows older than the retention
(twice the timestamp window, so a nonce outlives every timestamp that could carry it)
are deleted by the sweeper, a bounded batch at a time (`reap`).

The book has a connection of its own with asynchronous commit: the insert answers
without waiting for its WAL flush, which would otherwise add a whole commit's latency to
every request. What a crash can lose is the last few hundred milliseconds of nonces (any
later synchronous commit, such as the engine's next batch, flushes them too); a request
replayed within that gap is at worst read again, or answered from its idempotency record
— it can never move money twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from datetime import datetime
from typing import Final

import asyncpg

from engine.errors import Overloaded, Unavailable, translate_database_error

_INSERT: Final = """
INSERT INTO partner_nonces (partner_id, nonce, seen_at)
SELECT p, n, clock_timestamp() FROM unnest($1::text[], $2::text[]) AS t (p, n)
ON CONFLICT DO NOTHING
RETURNING partner_id, nonce
"""

Key = tuple[str, str]  # (partner id, nonce)

# Twice the gateway's timestamp window (300 s either way): a nonce seen at server time t
# came with a timestamp of at least t - 300, which is accepted until t + 600 at most.
RETENTION_S: Final = 600


@dataclasses.dataclass(frozen=True, kw_only=True)
class NonceConfig:
    batch_size_max: int = 1_000  # nonces inserted by one statement
    connect_timeout_s: float = 5.0
    statement_timeout_ms: int = 5_000
    batch_wait_ms: float = 1.0  # under load, time to gather a batch
    pending_max: int = 20_000  # waiting nonces before claims are refused (Overloaded)

    def __post_init__(self) -> None:
        assert 1 <= self.batch_size_max <= 10_000
        assert 0 <= self.batch_wait_ms <= 100
        assert self.batch_size_max <= self.pending_max <= 1_000_000


class NonceBook:
    def __init__(self, dsn: str, *, config: NonceConfig | None = None) -> None:
        self._dsn = dsn
        self._config = config or NonceConfig()
        self._conn: asyncpg.Connection | None = None
        self._pending: dict[Key, asyncio.Future[bool]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_batch_size = 0

    def start(self) -> None:
        assert self._task is None
        self._task = asyncio.create_task(self._run(), name="txengine-nonces")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._fail(list(self._pending.values()), Unavailable("shutting down"))
        self._pending.clear()
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    def claim(self, partner_id: str, nonce: str) -> asyncio.Future[bool]:
        """A future of True if this nonce is new for the partner (and is then recorded),
        False if it was seen before; it fails with Unavailable when the database cannot
        be reached. Raises Overloaded at once when too many claims wait. A future, not a
        coroutine, so a caller can start the check and await it later for free."""
        assert self._task is not None, "start() the book first"
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        key = (partner_id, nonce)
        if key in self._pending:
            future.set_result(False)  # the same nonce twice in one batch: a replay
            return future
        if len(self._pending) >= self._config.pending_max:
            raise Overloaded("too many signed requests are waiting for their nonce check")
        self._pending[key] = future
        self._wake.set()
        return future

    async def _run(self) -> None:
        config = self._config
        while True:
            await self._wake.wait()
            if config.batch_wait_ms > 0 and self._last_batch_size > 1:
                await asyncio.sleep(config.batch_wait_ms / 1000)
            keys = list(self._pending)[: config.batch_size_max]
            futures = [self._pending.pop(k) for k in keys]
            if not self._pending:
                self._wake.clear()
            self._last_batch_size = len(keys)
            try:
                fresh = await self._insert(keys)
            except Exception as error:  # every waiter must hear of it
                self._fail(futures, translate_database_error(error))
                if self._conn is not None:
                    self._conn.terminate()  # a fresh one for the next batch
                    self._conn = None
                continue
            for key, future in zip(keys, futures, strict=True):
                if not future.done():
                    future.set_result(key in fresh)

    async def _insert(self, keys: list[Key]) -> set[Key]:
        if self._conn is None or self._conn.is_closed():
            config = self._config
            self._conn = await asyncpg.connect(
                self._dsn,
                timeout=config.connect_timeout_s,
                command_timeout=config.statement_timeout_ms / 1000 + 1,
                server_settings={
                    "synchronous_commit": "off",
                    "statement_timeout": str(config.statement_timeout_ms),
                    "application_name": "txengine-nonces",
                },
            )
        rows = await self._conn.fetch(_INSERT, [k[0] for k in keys], [k[1] for k in keys])
        return {(row["partner_id"], row["nonce"]) for row in rows}

    @staticmethod
    def _fail(futures: list[asyncio.Future[bool]], error: Exception) -> None:
        for future in futures:
            if not future.done():
                future.set_exception(error)


async def reap(conn: asyncpg.Connection, *, seen_before: datetime, limit: int) -> int:
    """Delete up to `limit` nonces seen before `seen_before`; return how many."""
    status: str = await conn.execute(
        """DELETE FROM partner_nonces WHERE ctid = ANY (ARRAY(
               SELECT ctid FROM partner_nonces WHERE seen_at < $1 LIMIT $2))""",
        seen_before,
        limit,
    )
    return int(status.split()[-1])
