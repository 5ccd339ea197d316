"""A product step: one idempotent operation on a product, in one transaction.

The phases, in the manner of brandur's atomic phases:

1. claim the request's idempotency key. A key claimed before by a committed request
   returns that request's answer (a refusal included) and does nothing else; a key held
   by a transaction still running makes this one wait for it.
2. run the step under a savepoint: lock its product rows (FOR UPDATE), check that the
   move is legal, move money through `store.apply_commands` (the same rules and writes as
   a lane batch), write the new state and its outbox events. A `Refusal` rolls the
   savepoint back, so an illegal step changes nothing but its key's record.
3. store the answer under the key and COMMIT; only then does the caller see it.

Locks follow the global order: the key, then product rows, then holds, then accounts
(the last two inside apply_commands). A step function must take its product rows before
it moves money, and must not keep state between calls: on a lock conflict the whole
transaction runs again, up to `STEP_RETRY_MAX` times.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

import asyncpg
import msgspec

from engine import store
from engine.errors import Conflict, EngineError, translate_database_error
from engine.model import (
    AccountKind,
    AccountView,
    Command,
    CreateAccount,
    Idempotency,
    Result,
    ResultCode,
    metadata_error,
)

if TYPE_CHECKING:
    from engine.engine import Engine

T = TypeVar("T")

STEP_RETRY_MAX: Final = 3  # re-runs of a step after a lock conflict
HOUSE_SCOPE: Final = "house"  # the scope of the house's own accounts
_ENCODER: Final = msgspec.json.Encoder()

# The event and, when it has a notify_url, its webhook delivery (engine.products.webhooks),
# in one statement of the step's transaction.
_INSERT_EVENT: Final = """
WITH event AS (
    INSERT INTO outbox_events (id, scope, type, subject_id, notify_url, payload, created_at)
    VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7)
    RETURNING id, scope, notify_url, created_at
)
INSERT INTO webhook_deliveries (id, event_id, scope, url, status, next_attempt_at, created_at)
SELECT $8, id, scope, notify_url, 'pending', created_at, created_at
FROM event WHERE notify_url IS NOT NULL
"""
_HOUSE_ACCOUNT: Final = "SELECT account_id FROM house_accounts WHERE name = $1 AND currency = $2"
_CLAIM_HOUSE_ACCOUNT: Final = """
INSERT INTO house_accounts (name, currency, account_id) VALUES ($1, $2, $3)
ON CONFLICT DO NOTHING RETURNING account_id
"""


class RefusalView(msgspec.Struct, frozen=True, kw_only=True):
    """A stored refusal: `code` names a problem type the gateway knows."""

    code: str
    detail: str
    extensions: dict[str, Any] = msgspec.field(default_factory=dict)


class Refusal(Exception):
    """A business "no" raised by a step: an illegal transition, a ledger failure, an
    unknown product. It is the request's answer, stored and replayed like a success."""

    def __init__(self, code: str, detail: str, **extensions: Any) -> None:
        super().__init__(f"{code}: {detail}")
        self.view = RefusalView(code=str(code), detail=detail, extensions=extensions)


class Outcome(msgspec.Struct, Generic[T], frozen=True, kw_only=True):
    """What a step answered: a value, or a refusal."""

    value: T | None = None
    refusal: RefusalView | None = None
    replayed: bool = False  # set on the way out when the answer came from the store


@dataclasses.dataclass(kw_only=True)
class Step:
    """What a step function may do inside its transaction."""

    conn: asyncpg.Connection
    now: datetime
    scope: str  # the partner the step acts for
    engine: Engine

    def next_id(self) -> int:
        return self.engine.next_id()

    async def move(self, *commands: Command) -> list[Result]:
        """Apply ledger commands in this transaction, one result each, in order."""
        return await store.apply_commands(
            self.conn, commands, now=self.now, next_id=self.engine.next_id
        )

    async def move_or_refuse(self, command: Command) -> Result:
        """Apply one ledger command; a failure refuses the whole step."""
        (result,) = await self.move(command)
        if not result.ok:
            # A step-up challenge the rules made is rolled back with the step: products
            # cannot be confirmed by a one-time code yet, so the refusal says so.
            extensions = {
                name: value
                for name, value in (
                    ("failed_index", result.failed_index),
                    ("retry_after_s", result.retry_after_s),
                )
                if value is not None
            }
            raise Refusal(result.code, result.detail, **extensions)
        return result

    async def account(self, account_id: int) -> AccountView | None:
        """The partner's own account, or None (someone else's is not found either)."""
        return await store.read_account(self.conn, account_id, scope=self.scope)

    async def notify(
        self, *, event_type: str, subject_id: int, payload: Any, notify_url: str | None
    ) -> int:
        """Record an event in the outbox, in this transaction; return its id. With a
        `notify_url`, a webhook delivery is queued with it (engine.products.dispatcher
        sends it after COMMIT); an event of a step that rolls back is never sent."""
        event_id = self.engine.next_id()
        await self.conn.execute(
            _INSERT_EVENT,
            event_id,
            self.scope,
            event_type,
            subject_id,
            notify_url,
            _ENCODER.encode(payload).decode(),
            self.now,
            self.engine.next_id(),  # the delivery's id, unused without a notify_url
        )
        return event_id

    async def house_account(self, name: str, currency: str) -> int:
        """The house's account for `name` in `currency`, opened on first use."""
        found = await self.conn.fetchval(_HOUSE_ACCOUNT, name, currency)
        if found is not None:
            return int(found)
        metadata = {"house": name}
        assert metadata_error(metadata) is None, name
        opened = await self.move_or_refuse(
            CreateAccount(
                currency=currency, kind=AccountKind.SYSTEM, metadata=metadata, scope=HOUSE_SCOPE
            )
        )
        assert opened.account is not None
        won = await self.conn.fetchval(_CLAIM_HOUSE_ACCOUNT, name, currency, opened.account.id)
        if won is not None:
            return int(won)
        # Another step opened it first (we waited for its commit): drop ours, unused.
        await self.conn.execute("DELETE FROM accounts WHERE id = $1", opened.account.id)
        return int(await self.conn.fetchval(_HOUSE_ACCOUNT, name, currency))


async def run_step(
    engine: Engine,
    step: Callable[[Step], Awaitable[T]],
    *,
    answer_type: type[T],
    scope: str,
    idempotency: Idempotency | None,
) -> Outcome[T]:
    """Run `step` once under `idempotency` (None for timers: their rows are their guard).

    Raises the engine's retryable errors (Unavailable, Conflict, OutcomeUnknown) like
    Engine.submit; business refusals come back in the Outcome.
    """
    for attempt in range(STEP_RETRY_MAX + 1):
        try:
            return await _run_once(engine, step, answer_type, scope, idempotency)
        except Conflict:
            if attempt == STEP_RETRY_MAX:
                raise
    raise AssertionError("unreachable")


async def _run_once(
    engine: Engine,
    step: Callable[[Step], Awaitable[T]],
    answer_type: type[T],
    scope: str,
    idempotency: Idempotency | None,
) -> Outcome[T]:
    now = engine.clock()
    async with _connection(engine) as conn, store.transaction(conn):
        if idempotency is not None and not await store.claim_key(conn, idempotency, now=now):
            return await _replay(conn, idempotency, answer_type)
        outcome = await _attempt(Step(conn=conn, now=now, scope=scope, engine=engine), step)
        if idempotency is not None:
            await store.save_answer(conn, idempotency, _ENCODER.encode(outcome))
    return outcome


async def _attempt(context: Step, step: Callable[[Step], Awaitable[T]]) -> Outcome[T]:
    try:
        async with context.conn.transaction():  # a savepoint: a refusal undoes the step
            value = await step(context)
    except Refusal as refusal:
        return Outcome(refusal=refusal.view)
    return Outcome(value=value)


async def _replay(
    conn: asyncpg.Connection, idempotency: Idempotency, answer_type: type[T]
) -> Outcome[T]:
    fingerprint, answer = await store.stored_answer(conn, idempotency)
    if fingerprint != idempotency.fingerprint:
        return Outcome(
            refusal=RefusalView(
                code=ResultCode.IDEMPOTENCY_KEY_REUSED,
                detail="this idempotency key was used with a different request",
            )
        )
    stored = msgspec.json.decode(answer, type=Outcome[answer_type])  # type: ignore[valid-type]
    return msgspec.structs.replace(stored, replayed=True)


@contextlib.asynccontextmanager
async def _connection(engine: Engine) -> AsyncIterator[asyncpg.Connection]:
    """A step connection whose database errors come out as the engine's own."""
    try:
        conn = await engine.step_pool.acquire()
    except Exception as exc:
        raise translate_database_error(exc) from exc
    try:
        yield conn
    except EngineError:
        raise
    except Exception as exc:
        raise translate_database_error(exc) from exc
    finally:
        with contextlib.suppress(Exception):
            await engine.step_pool.release(conn)
