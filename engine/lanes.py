"""Shard lanes: routing, batching and the futures that carry each answer back.

A lane owns one database connection and applies the requests routed to it in batches:
while one batch is being committed the next one gathers in the queue, so under load a
lane commits many requests per transaction and at rest it answers a lone request at once.
Correctness never depends on which lane a request took: the row locks taken in a global
order keep lanes, and processes, apart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Final, Protocol

import asyncpg

from engine import store
from engine.errors import (
    Conflict,
    EngineError,
    InternalError,
    Overloaded,
    Unavailable,
    translate_database_error,
)
from engine.model import Result
from engine.rules import IdSource

_log = logging.getLogger("txengine.lanes")

_RETRY_BACKOFF_MS_BASE: Final = 5.0
_RETRY_BACKOFF_MS_MAX: Final = 500.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class LaneConfig:
    batch_size_max: int = 500  # requests applied in one transaction, at most
    batch_wait_ms: float = 2.0  # under load, time to gather a batch once a request waits
    queue_depth_max: int = 10_000  # requests waiting per lane before callers get Overloaded
    batch_retry_max: int = 5  # re-runs of a batch after a lock conflict or lost connection
    lock_timeout_ms: int = 2_000
    statement_timeout_ms: int = 5_000
    connect_timeout_ms: int = 5_000

    def __post_init__(self) -> None:
        assert 1 <= self.batch_size_max <= 10_000, self.batch_size_max
        assert 0 <= self.batch_wait_ms <= 1_000, self.batch_wait_ms
        assert 1 <= self.queue_depth_max <= 1_000_000, self.queue_depth_max
        assert 0 <= self.batch_retry_max <= 100, self.batch_retry_max


class Observer(Protocol):
    """What a lane reports, for metrics. The engine knows nothing of how it is shown."""

    def batch_committed(self, *, size: int, commit_s: float, results: Sequence[Result]) -> None: ...

    def batch_failed(self, *, size: int, error: EngineError) -> None: ...


@dataclasses.dataclass(slots=True)
class Submission:
    item: store.Item
    future: asyncio.Future[Result]


# The write path joins a batch (an unnest of arrays, which the planner guesses at 100
# rows) to large tables by primary key. For such a join the only good plan is a nested
# loop over the index, but a cached generic plan made while a table was small, or with
# stale statistics, picks hash joins over sequential scans and then reads whole tables on
# every batch (seen: the idempotency keys table scanned in full 7,000 times in a minute).
# Lane connections run nothing else, so they forbid those plans outright.
WRITE_PATH_PLANNER_SETTINGS: Final = {
    "enable_seqscan": "off",
    "enable_hashjoin": "off",
    "enable_mergejoin": "off",
}


def connection_settings(config: LaneConfig) -> dict[str, str]:
    """Session settings of every engine connection."""
    return {
        # Durable before acknowledged: never let a server default weaken COMMIT.
        "synchronous_commit": "on",
        "lock_timeout": str(config.lock_timeout_ms),
        "statement_timeout": str(config.statement_timeout_ms),
        "idle_in_transaction_session_timeout": str(config.statement_timeout_ms * 2),
        "application_name": "txengine",
    }


class Lane:
    def __init__(
        self,
        *,
        index: int,
        dsn: str,
        config: LaneConfig,
        clock: Callable[[], datetime],
        next_id: IdSource,
        observer: Observer | None,
        on_done: Callable[[store.Item], None],
    ) -> None:
        self.index = index
        self._dsn = dsn
        self._config = config
        self._clock = clock
        self._next_id = next_id
        self._observer = observer
        self._on_done = on_done
        self._queue: asyncio.Queue[Submission | None] = asyncio.Queue(config.queue_depth_max)
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_batch_size = 0

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        assert self._task is None
        self._task = asyncio.create_task(self._run(), name=f"txengine-lane-{self.index}")

    def offer(self, submission: Submission) -> None:
        try:
            self._queue.put_nowait(submission)
        except asyncio.QueueFull:
            raise Overloaded(f"lane {self.index} has {self.depth} requests waiting") from None

    async def stop(self) -> None:
        """Finish every request already queued, then close the connection."""
        if self._task is not None:
            await self._queue.put(None)
            await self._task
            self._task = None
        if self._conn is not None:
            await self._conn.close(timeout=5)
            self._conn = None

    async def _run(self) -> None:
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                break
            batch = [first]
            stopping = await self._gather(batch)
            await self._commit(batch)

    async def _gather(self, batch: list[Submission]) -> bool:
        """Fill `batch` from the queue; return True if the stop sentinel was reached.

        Under load (the last batch had company) it first waits batch_wait_ms for more,
        unless the batch is full already: fewer, larger batches cost fewer round trips
        per request. A lone request at rest does not wait.
        """
        config = self._config
        already_full = self.depth + len(batch) >= config.batch_size_max
        if config.batch_wait_ms > 0 and self._last_batch_size > 1 and not already_full:
            await asyncio.sleep(config.batch_wait_ms / 1000)
        while len(batch) < config.batch_size_max and not self._queue.empty():
            submission = self._queue.get_nowait()
            if submission is None:
                return True
            batch.append(submission)
        self._last_batch_size = len(batch)
        return False

    async def _commit(self, batch: list[Submission]) -> None:
        items = [s.item for s in batch]
        started = time.perf_counter()
        try:
            results = await self._apply_with_retries(items)
        except EngineError as error:
            if self._observer is not None:
                self._observer.batch_failed(size=len(batch), error=error)
            self._settle(batch, error=error)
            return
        if self._observer is not None:
            commit_s = time.perf_counter() - started
            self._observer.batch_committed(size=len(batch), commit_s=commit_s, results=results)
        self._settle(batch, results=results)

    def _settle(
        self,
        batch: list[Submission],
        *,
        results: list[Result] | None = None,
        error: EngineError | None = None,
    ) -> None:
        for i, submission in enumerate(batch):
            self._on_done(submission.item)
            if submission.future.done():
                continue
            if results is not None:
                submission.future.set_result(results[i])
            else:
                assert error is not None
                submission.future.set_exception(error)

    async def _apply_with_retries(self, items: list[store.Item]) -> list[Result]:
        attempt = 0
        while True:
            try:
                conn = await self._connection()
                return await store.apply_items(
                    conn, items, now=self._clock(), next_id=self._next_id
                )
            except Exception as exc:
                error = translate_database_error(exc)
                if not isinstance(error, Conflict):
                    await self._drop_connection()
                # A lock conflict clears up by itself: retry it a few times. A lost
                # connection is retried once on a new one (the server may just have
                # restarted); past that, callers get a prompt 503 rather than a long hang.
                retry_max = self._config.batch_retry_max if isinstance(error, Conflict) else 1
                retryable = isinstance(error, Conflict | Unavailable)
                if not retryable or attempt >= retry_max:
                    if isinstance(error, InternalError):
                        _log.exception("batch failed on lane %d", self.index)
                    raise error from exc
            attempt += 1
            backoff_ms = min(_RETRY_BACKOFF_MS_BASE * 2**attempt, _RETRY_BACKOFF_MS_MAX)
            await asyncio.sleep(backoff_ms / 1000)

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(
                self._dsn,
                timeout=self._config.connect_timeout_ms / 1000,
                command_timeout=self._config.statement_timeout_ms / 1000 + 1,
                server_settings={
                    **connection_settings(self._config),
                    **WRITE_PATH_PLANNER_SETTINGS,
                },
            )
        return self._conn

    async def _drop_connection(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None
