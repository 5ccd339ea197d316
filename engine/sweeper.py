"""Background work over the same store: expire holds past their timeout, reap old
idempotency keys, delete step-up codes that can no longer be used, fire the
products' timers (engine.products.timers), keep history partitioned and archived
(engine.history).

Each job is a `run_once()` over a bounded batch; the loop sleeps only when a batch came
back short, so a backlog drains at full speed and an idle system costs one query per
interval. All state is in the database, so a restart resumes where the last run stopped.
Only one process sweeps at a time: the one holding a session advisory lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Final

import asyncpg

from engine import history, nonces, store
from engine.engine import Engine
from engine.errors import EngineError, translate_database_error
from engine.model import VoidPending
from engine.products import TIMER_JOBS, timers

_log = logging.getLogger("txengine.sweeper")

_LEADER_LOCK_KEY: Final = 0x7478_5357  # "txSW": one sweeper across all processes


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweeperConfig:
    holds_batch_size_max: int = 500  # expired holds voided per run
    keys_batch_size_max: int = 5_000  # idempotency keys deleted per run
    messages_batch_size_max: int = 1_000  # spent step-up messages deleted per run
    nonces_batch_size_max: int = 5_000  # request nonces past their window deleted per run
    interval_s: float = 1.0  # pause after a run that found less than a full batch
    error_backoff_s: float = 5.0  # pause after a run that failed (database away)
    history: history.HistoryConfig | None = dataclasses.field(
        default_factory=history.HistoryConfig
    )  # None: no partition maintenance (partitions must then be made some other way)
    history_interval_s: float = 60.0  # partition maintenance at most this often
    # Summing a partition for archiving reads all of it: far longer than a request may take.
    history_statement_timeout_ms: int = 30 * 60 * 1000

    def __post_init__(self) -> None:
        assert 1 <= self.holds_batch_size_max <= 10_000
        assert 1 <= self.keys_batch_size_max <= 100_000
        assert 0 < self.interval_s <= 3600
        assert 0 < self.history_interval_s <= 24 * 3600


async def expire_holds_once(engine: Engine, *, limit: int) -> int:
    """Void up to `limit` holds whose timeout has passed; return how many expired."""
    async with engine.pool.acquire() as conn:
        ids = await store.expired_hold_ids(conn, now=engine.clock(), limit=limit)
    results = await asyncio.gather(
        *(engine.submit(VoidPending(transfer_id=i, expired=True)) for i in ids)
    )
    # A hold posted or voided a moment before its expiry was swept is simply not expired.
    return sum(1 for r in results if r.ok)


async def reap_keys_once(engine: Engine, *, limit: int) -> int:
    """Delete up to `limit` idempotency keys older than the retention; return how many."""
    cutoff = engine.clock() - timedelta(seconds=engine.config.idempotency_retention_s)
    async with engine.pool.acquire() as conn:
        return await store.reap_idempotency_keys(conn, created_before=cutoff, limit=limit)


async def reap_step_up_messages_once(engine: Engine, *, limit: int) -> int:
    """Delete up to `limit` step-up messages whose code is spent or expired."""
    async with engine.pool.acquire() as conn:
        return await store.reap_step_up_messages(conn, now=engine.clock(), limit=limit)


async def reap_nonces_once(engine: Engine, *, limit: int) -> int:
    """Delete up to `limit` request nonces past their replay window; return how many."""
    cutoff = engine.clock() - timedelta(seconds=nonces.RETENTION_S)
    async with engine.pool.acquire() as conn:
        return await nonces.reap(conn, seen_before=cutoff, limit=limit)


async def maintain_history_once(
    engine: Engine, *, config: history.HistoryConfig, statement_timeout_ms: int
) -> history.HistoryReport:
    """Create partitions ahead, archive (and export) one past the retention."""
    async with engine.pool.acquire() as conn:
        # The pool resets session settings when the connection goes back.
        await conn.execute(f"SET statement_timeout = {int(statement_timeout_ms)}")
        return await history.run_once(conn, config=config, now=engine.clock())


class Sweeper:
    def __init__(
        self,
        engine: Engine,
        *,
        config: SweeperConfig | None = None,
        timer_jobs: Sequence[timers.TimerJob] | None = None,
    ) -> None:
        self._engine = engine
        self._config = config or SweeperConfig()
        self._timer_jobs = tuple(TIMER_JOBS if timer_jobs is None else timer_jobs)
        self._task: asyncio.Task[None] | None = None
        self._history_due = 0.0  # monotonic time of the next history maintenance

    def start(self) -> None:
        assert self._task is None
        self._task = asyncio.create_task(self._run(), name="txengine-sweeper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def run_once(self) -> bool:
        """One bounded pass of every job; True if any job filled its batch."""
        config = self._config
        expired = await expire_holds_once(self._engine, limit=config.holds_batch_size_max)
        reaped = await reap_keys_once(self._engine, limit=config.keys_batch_size_max)
        messages = await reap_step_up_messages_once(
            self._engine, limit=config.messages_batch_size_max
        )
        nonces_reaped = await reap_nonces_once(self._engine, limit=config.nonces_batch_size_max)
        full = (
            expired >= config.holds_batch_size_max
            or reaped >= config.keys_batch_size_max
            or messages >= config.messages_batch_size_max
            or nonces_reaped >= config.nonces_batch_size_max
        )
        fired: dict[str, int] = {}
        for job in self._timer_jobs:
            count = await timers.fire(job, self._engine, now=self._engine.clock())
            full = full or count >= job.batch_size_max
            if count:
                fired[job.name] = count
        if expired or reaped or messages or nonces_reaped or fired:
            _log.info(
                "swept",
                extra={
                    "holds_expired": expired,
                    "keys_reaped": reaped,
                    "messages": messages,
                    "nonces_reaped": nonces_reaped,
                    "timers": fired,
                },
            )
        return await self._maintain_history() or full

    async def _maintain_history(self) -> bool:
        """Partition maintenance, at most once per interval; True if more is waiting."""
        config = self._config
        if config.history is None or time.monotonic() < self._history_due:
            return False
        report = await maintain_history_once(
            self._engine,
            config=config.history,
            statement_timeout_ms=config.history_statement_timeout_ms,
        )
        if not report.full:
            self._history_due = time.monotonic() + config.history_interval_s
        return report.full

    async def _run(self) -> None:
        while True:
            try:
                await self._lead()
            except (EngineError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                _log.warning("sweeper paused: %s", translate_database_error(exc))
            await asyncio.sleep(self._config.error_backoff_s)

    async def _lead(self) -> None:
        """Hold the leader lock on a connection of our own and sweep while we hold it."""
        async with self._engine.pool.acquire() as leader:
            got = await leader.fetchval("SELECT pg_try_advisory_lock($1)", _LEADER_LOCK_KEY)
            if not got:
                return
            try:
                while True:
                    full = await self.run_once()
                    if not full:
                        await asyncio.sleep(self._config.interval_s)
            finally:
                with contextlib.suppress(Exception):
                    await leader.execute("SELECT pg_advisory_unlock($1)", _LEADER_LOCK_KEY)
