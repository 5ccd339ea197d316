"""The engine's public surface: open it, submit commands, read, close.

It knows nothing of HTTP. A command goes to the lane its accounts route to; the call
returns when the lane's batch has committed (or failed), with that command's own result.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final

import asyncpg

from engine import database, store
from engine.errors import (
    EngineError,
    IdempotencyKeyInFlight,
    InvalidCommand,
    InvalidCursor,
    Unavailable,
    translate_database_error,
)
from engine.ids import NODE_COUNT_MAX, IdGenerator
from engine.lanes import (
    WRITE_PATH_PLANNER_SETTINGS,
    Lane,
    LaneConfig,
    Observer,
    Submission,
    connection_settings,
)
from engine.model import (
    AccountView,
    Command,
    ConfirmStepUp,
    CreateAccount,
    CreateTransfers,
    Idempotency,
    Page,
    PostPending,
    Result,
    TransferView,
    VoidPending,
    command_error,
)

LANES_MAX: Final = 64
_HASH_MULTIPLIER: Final = 0x9E3779B97F4A7C15  # Fibonacci hashing spreads sequential ids


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineConfig:
    lanes: int = 2  # shard lanes in this process, each with its own connection
    lane: LaneConfig = dataclasses.field(default_factory=LaneConfig)
    read_pool_size_max: int = 8  # connections for reads, readiness and background work
    step_pool_size_max: int = 4  # connections for product steps (engine.products)
    idempotency_retention_s: int = 24 * 3600  # keys are kept at least this long

    def __post_init__(self) -> None:
        assert 1 <= self.lanes <= LANES_MAX, self.lanes
        assert 1 <= self.read_pool_size_max <= 100, self.read_pool_size_max
        assert 1 <= self.step_pool_size_max <= 100, self.step_pool_size_max


def utc_now() -> datetime:
    return datetime.now(UTC)


class Engine:
    """Open with `await Engine.open(dsn)`; close with `await engine.close()`."""

    def __init__(
        self,
        *,
        dsn: str,
        config: EngineConfig,
        pool: asyncpg.Pool,
        step_pool: asyncpg.Pool,
        node: int,
        clock: Callable[[], datetime],
        observer: Observer | None,
    ) -> None:
        self.config = config
        self.dsn = dsn  # for helpers that need connections of their own (the nonce book)
        self.clock = clock
        self._pool = pool
        self._step_pool = step_pool
        self._in_flight: set[tuple[str, str]] = set()
        self._closing = False
        next_id = IdGenerator(node=node)
        self.next_id = next_id
        self._lanes = [
            Lane(
                index=i,
                dsn=dsn,
                config=config.lane,
                clock=clock,
                next_id=next_id,
                observer=observer,
                on_done=self._forget_key,
            )
            for i in range(config.lanes)
        ]

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        config: EngineConfig | None = None,
        clock: Callable[[], datetime] = utc_now,
        observer: Observer | None = None,
    ) -> Engine:
        """Connect, check the schema is current, and start the lanes."""
        config = config or EngineConfig()
        pool = await _create_pool(dsn, config, size_max=config.read_pool_size_max)
        try:
            step_pool = await _create_pool(
                dsn, config, size_max=config.step_pool_size_max, write_path=True
            )
        except BaseException:
            await pool.close()
            raise
        try:
            async with pool.acquire() as conn:
                await database.check_schema(conn)
                node = await conn.fetchval("SELECT nextval('id_node_seq')") % NODE_COUNT_MAX
        except BaseException:
            await asyncio.gather(pool.close(), step_pool.close())
            raise
        engine = cls(
            dsn=dsn,
            config=config,
            pool=pool,
            step_pool=step_pool,
            node=node,
            clock=clock,
            observer=observer,
        )
        for lane in engine._lanes:
            lane.start()
        return engine

    async def close(self) -> None:
        """Stop taking commands, answer every one already taken, then disconnect."""
        self._closing = True
        await asyncio.gather(*(lane.stop() for lane in self._lanes))
        await asyncio.gather(self._pool.close(), self._step_pool.close())

    @property
    def pool(self) -> asyncpg.Pool:
        """Connections for readers and background work (the sweeper, reconcile)."""
        return self._pool

    @property
    def step_pool(self) -> asyncpg.Pool:
        """Connections for product steps: write transactions outside the lanes, with the
        lanes' planner settings (see engine.products.step)."""
        return self._step_pool

    def lane_depths(self) -> list[int]:
        return [lane.depth for lane in self._lanes]

    async def submit(self, command: Command, *, idempotency: Idempotency | None = None) -> Result:
        """Apply `command` exactly once and return its result once it is durable.

        A second command with the same idempotency key returns the first one's result
        (with `replayed` set), or IDEMPOTENCY_KEY_REUSED if its fingerprint differs.
        Raises IdempotencyKeyInFlight while the first is still being applied, Overloaded
        when the lane's queue is full, Unavailable or OutcomeUnknown when the database
        could not be reached or the connection broke during COMMIT, and InvalidCommand,
        before anything is queued, for a command no caller should send.
        """
        if self._closing:
            raise Unavailable("the engine is shutting down")
        error = command_error(command)
        if error is not None:
            raise InvalidCommand(error)
        key = None if idempotency is None else (idempotency.scope, idempotency.key)
        if key is not None and key in self._in_flight:
            raise IdempotencyKeyInFlight(f"a request with key {key[1]!r} is in flight")
        lane = self._lanes[self._route(command)]
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        lane.offer(Submission(store.Item(command, idempotency), future))
        if key is not None:
            self._in_flight.add(key)
        # A caller that goes away cancels only its wait: the command stays in its batch,
        # the lane skips settling a cancelled future, and the key stays in flight until
        # the batch is done (the lane forgets it), so a retry can never overtake it.
        return await future

    def _forget_key(self, item: store.Item) -> None:
        if item.idempotency is not None:
            self._in_flight.discard((item.idempotency.scope, item.idempotency.key))

    def _route(self, command: Command) -> int:
        if isinstance(command, CreateTransfers):
            routing_id = command.transfers[0].debit_account_id
        elif isinstance(command, PostPending | VoidPending):
            routing_id = command.transfer_id
        elif isinstance(command, ConfirmStepUp):
            routing_id = command.challenge_id
        else:
            assert isinstance(command, CreateAccount)
            routing_id = self.next_id()
        hashed = (routing_id * _HASH_MULTIPLIER) & 0xFFFF_FFFF_FFFF_FFFF
        return (hashed >> 32) % len(self._lanes)

    # -- reads ----------------------------------------------------------------------------

    async def account(self, account_id: int, *, scope: str | None) -> AccountView | None:
        async with self.reader() as conn:
            return await store.read_account(conn, account_id, scope=scope)

    async def transfer(self, transfer_id: int, *, scope: str | None) -> TransferView | None:
        async with self.reader() as conn:
            return await store.read_transfer(conn, transfer_id, scope=scope)

    async def entries(
        self, account_id: int, *, scope: str | None, limit: int, starting_after: int | None
    ) -> Page | None:
        """A page of the account's entries, newest first; None if the account is unknown."""
        async with self.reader() as conn:
            if await store.read_account(conn, account_id, scope=scope) is None:
                return None
            if starting_after is not None and not await store.entry_exists(
                conn, account_id, starting_after
            ):
                raise InvalidCursor(f"no entry {starting_after} in account {account_id}")
            return await store.read_entries(
                conn, account_id, limit=limit, starting_after=starting_after
            )

    async def ping(self) -> None:
        """Raise Unavailable unless the database answers now."""
        async with self.reader() as conn:
            await conn.fetchval("SELECT 1")

    def reader(self) -> _Reader:
        """`async with engine.reader() as conn`: a pooled connection whose database errors
        come out as the engine's own."""
        return _Reader(self._pool)


async def _create_pool(
    dsn: str, config: EngineConfig, *, size_max: int, write_path: bool = False
) -> asyncpg.Pool:
    settings = connection_settings(config.lane)
    if write_path:
        settings.update(WRITE_PATH_PLANNER_SETTINGS)
    try:
        pool: asyncpg.Pool = await asyncpg.create_pool(
            dsn,
            min_size=1,
            max_size=size_max,
            timeout=config.lane.connect_timeout_ms / 1000,
            command_timeout=config.lane.statement_timeout_ms / 1000 + 1,
            server_settings=settings,
        )
    except Exception as exc:
        raise translate_database_error(exc) from exc
    return pool


class _Reader:
    """A pooled connection whose database errors come out as the engine's own."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._conn: asyncpg.Connection | None = None

    async def __aenter__(self) -> asyncpg.Connection:
        try:
            self._conn = await self._pool.acquire()
        except Exception as exc:
            raise translate_database_error(exc) from exc
        return self._conn

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        assert self._conn is not None
        with contextlib.suppress(Exception):
            await self._pool.release(self._conn)
        if isinstance(exc, Exception) and not isinstance(exc, EngineError):
            raise translate_database_error(exc) from exc
