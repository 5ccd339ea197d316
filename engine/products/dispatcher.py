"""The webhook dispatcher: sends due deliveries to partners, never blocking a payment.

Each gateway process runs one (not only the sweeper's leader): sends wait on partners'
servers, up to `timeout_s` each, and must neither hold up the sweeper's hold expiry
nor be limited to one process. Processes share the work safely:

1. claim: one short statement picks due deliveries (`FOR UPDATE SKIP LOCKED`, at most
   `batch_size_max`), moves their `next_attempt_at` past the time this run may take (a
   lease) and stamps them with this run's `claim_id`, and commits. No other process
   picks them until the lease ends.
2. send, outside any transaction: POST the event, signed, at most `sends_concurrent_max`
   at a time, each bounded by `timeout_s` and a cap on the answer read.
3. record each attempt, only if the row still carries our `claim_id` (a fencing token:
   a send that outlived its lease, or a redelivery meanwhile, does not overwrite).

A crash between 2 and 3 sends the event again after the lease: delivery is at least
once, and the event id (header `Txengine-Event-Id` and the body's `id`) is the same on
every attempt, so receivers drop duplicates by it.

Success is a 2xx answer whose body, stripped of white space, is `success` (Alipay's
rule): a misconfigured URL that answers a generic 200 page is not taken for a receipt.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Final, Protocol

import aiohttp
import asyncpg
import msgspec

from engine.errors import EngineError, translate_database_error
from engine.products import signatures, webhooks
from engine.products.webhooks import DeliveryStatus

if TYPE_CHECKING:
    from engine.engine import Engine

_log = logging.getLogger("txengine.webhooks")

SUCCESS_BODY: Final = b"success"
USER_AGENT: Final = "txengine-webhooks/1"
EVENT_ID_HEADER: Final = "Txengine-Event-Id"
_LEASE_MARGIN_S: Final = 30.0
_ENCODER: Final = msgspec.json.Encoder()

_CLAIM: Final = """
WITH due AS (
    SELECT id FROM webhook_deliveries
    WHERE status = 'pending' AND next_attempt_at <= $1
    ORDER BY next_attempt_at LIMIT $3
    FOR UPDATE SKIP LOCKED
)
UPDATE webhook_deliveries d SET next_attempt_at = $2, claim_id = $4
FROM due, outbox_events e
WHERE d.id = due.id AND e.id = d.event_id
RETURNING d.id, d.scope, d.url, d.attempts, e.id AS event_id, e.type, e.subject_id,
          e.created_at AS event_created_at, e.payload::text AS payload
"""
_RECORD: Final = """
UPDATE webhook_deliveries
SET attempts = attempts + 1, last_attempt_at = $3, last_status_code = $4, last_error = $5,
    status = $6, next_attempt_at = $7, delivered_at = $8, claim_id = NULL
WHERE id = $1 AND claim_id = $2
"""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DispatcherConfig:
    batch_size_max: int = 100  # deliveries claimed by one run
    sends_concurrent_max: int = 16  # HTTP requests in flight at once, per process
    timeout_s: float = 10.0  # one send: connect, write, answer
    body_size_max_bytes: int = 64 * 1024  # a larger event is dead at once, never sent
    response_read_max_bytes: int = 1024  # of the partner's answer; "success" needs 7
    interval_s: float = 1.0  # pause after a run that found less than a full batch
    error_backoff_s: float = 5.0  # pause after a run that failed (database away)

    def __post_init__(self) -> None:
        assert 1 <= self.batch_size_max <= 1_000, self.batch_size_max
        assert 1 <= self.sends_concurrent_max <= 256, self.sends_concurrent_max
        assert 0 < self.timeout_s <= 60, self.timeout_s
        assert 1 <= self.body_size_max_bytes <= 1 << 20, self.body_size_max_bytes
        assert 16 <= self.response_read_max_bytes <= 1 << 16, self.response_read_max_bytes

    @property
    def lease_s(self) -> float:
        """Longer than a whole run can take: every wave of sends timing out."""
        waves = -(-self.batch_size_max // self.sends_concurrent_max)
        return waves * self.timeout_s + _LEASE_MARGIN_S


class DeliveryObserver(Protocol):
    """Told of every attempt (gateway.metrics counts them). `outcome` is "delivered",
    "retrying", "dead", or "superseded" (the lease was lost; nothing was recorded)."""

    def attempted(self, *, outcome: str, duration_s: float) -> None: ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Claimed:
    id: int
    scope: str
    url: str
    attempts: int  # before this one
    event_id: int
    event_type: str
    body: bytes


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Attempt:
    ok: bool
    status_code: int | None
    error: str | None
    final: bool = False  # no retry can help (the event is too large to send)


def event_body(row: asyncpg.Record) -> bytes:
    """The bytes sent on every attempt of the event: the same each time."""
    return _ENCODER.encode(
        {
            "id": str(row["event_id"]),
            "object": "event",
            "type": row["type"],
            "subject_id": str(row["subject_id"]),
            "created_at": row["event_created_at"],
            "data": msgspec.Raw(row["payload"].encode()),
        }
    )


async def run_once(
    engine: Engine,
    session: aiohttp.ClientSession,
    *,
    config: DispatcherConfig,
    observer: DeliveryObserver | None = None,
) -> int:
    """Claim up to a batch of due deliveries, send them, record each; return how many."""
    now = engine.clock()
    claim_id = engine.next_id()
    lease_end = now + timedelta(seconds=config.lease_s)
    async with engine.pool.acquire() as conn:
        rows = await conn.fetch(_CLAIM, now, lease_end, config.batch_size_max, claim_id)
        secrets = {
            scope: await webhooks.signing_secrets(conn, scope=scope, now=now)
            for scope in sorted({row["scope"] for row in rows})
        }
    claimed = [
        _Claimed(
            id=row["id"],
            scope=row["scope"],
            url=row["url"],
            attempts=row["attempts"],
            event_id=row["event_id"],
            event_type=row["type"],
            body=event_body(row),
        )
        for row in rows
    ]
    gate = asyncio.Semaphore(config.sends_concurrent_max)

    async def deliver(delivery: _Claimed) -> None:
        async with gate:
            started = time.perf_counter()
            attempt = await _attempt(session, delivery, secrets[delivery.scope], engine, config)
            outcome = await _record(engine, delivery, claim_id, attempt)
        if observer is not None:
            observer.attempted(outcome=outcome, duration_s=time.perf_counter() - started)

    await asyncio.gather(*(deliver(d) for d in claimed))
    return len(claimed)


async def _attempt(
    session: aiohttp.ClientSession,
    delivery: _Claimed,
    secrets: list[str],
    engine: Engine,
    config: DispatcherConfig,
) -> _Attempt:
    if len(delivery.body) > config.body_size_max_bytes:
        error = f"the event is {len(delivery.body)} bytes, over {config.body_size_max_bytes}"
        return _Attempt(ok=False, status_code=None, error=error, final=True)
    if not secrets:
        error = f"no webhook secret for scope {delivery.scope!r}: an operator must create one"
        return _Attempt(ok=False, status_code=None, error=error)
    timestamp = int(engine.clock().timestamp())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        signatures.HEADER: signatures.signature_header(secrets, timestamp, delivery.body),
        EVENT_ID_HEADER: str(delivery.event_id),
        "Txengine-Event-Type": delivery.event_type,
        "Txengine-Delivery-Id": str(delivery.id),
        "Txengine-Delivery-Attempt": str(delivery.attempts + 1),
    }
    try:
        async with asyncio.timeout(config.timeout_s):
            return await _post(session, delivery, headers, config)
    except TimeoutError:
        return _Attempt(ok=False, status_code=None, error=f"no answer in {config.timeout_s} s")
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        return _Attempt(ok=False, status_code=None, error=f"{type(exc).__name__}: {exc}")


async def _post(
    session: aiohttp.ClientSession,
    delivery: _Claimed,
    headers: dict[str, str],
    config: DispatcherConfig,
) -> _Attempt:
    # Redirects are not followed: a delivery goes to the URL the partner gave, nowhere else.
    async with session.post(
        delivery.url, data=delivery.body, headers=headers, allow_redirects=False
    ) as response:
        answer = await _read_capped(response.content, config.response_read_max_bytes)
        status = response.status
    if 200 <= status < 300 and answer.strip() == SUCCESS_BODY:
        return _Attempt(ok=True, status_code=status, error=None)
    shown = answer[:64].decode("utf-8", "replace")
    return _Attempt(ok=False, status_code=status, error=f"answered {status} {shown!r}")


async def _read_capped(stream: aiohttp.StreamReader, cap: int) -> bytes:
    """At most `cap` bytes of the answer; the rest is never read."""
    chunks: list[bytes] = []
    size = 0
    while size < cap:
        chunk = await stream.read(cap - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


async def _record(engine: Engine, delivery: _Claimed, claim_id: int, attempt: _Attempt) -> str:
    now = engine.clock()
    attempts = delivery.attempts + 1
    delay = None if attempt.final else webhooks.retry_delay_s(attempts)
    if attempt.ok:
        status, next_at, outcome = DeliveryStatus.DELIVERED, None, "delivered"
    elif delay is None:
        status, next_at, outcome = DeliveryStatus.DEAD, None, "dead"
    else:
        status, next_at = DeliveryStatus.PENDING, now + timedelta(seconds=delay)
        outcome = "retrying"
    error = None if attempt.error is None else webhooks.bounded_error(attempt.error)
    delivered_at: datetime | None = now if attempt.ok else None
    async with engine.pool.acquire() as conn:
        updated = await conn.execute(
            _RECORD,
            delivery.id,
            claim_id,
            now,
            attempt.status_code,
            error,
            status.value,
            next_at,
            delivered_at,
        )
    if updated.endswith(" 0"):
        return "superseded"
    if not attempt.ok:
        _log.info(
            "webhook attempt failed",
            extra={"delivery_id": delivery.id, "attempt": attempts, "outcome": outcome},
        )
    return outcome


class Dispatcher:
    """Runs `run_once` in a loop in this process; start() and stop() around serving."""

    def __init__(
        self,
        engine: Engine,
        *,
        config: DispatcherConfig | None = None,
        observer: DeliveryObserver | None = None,
    ) -> None:
        self._engine = engine
        self._config = config or DispatcherConfig()
        self._observer = observer
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        assert self._task is None
        self._task = asyncio.create_task(self._run(), name="txengine-webhooks")

    async def stop(self) -> None:
        """Stop at once; a send cut short is sent again after its lease."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        config = self._config
        async with open_session(config) as session:
            while True:
                try:
                    count = await run_once(
                        self._engine, session, config=config, observer=self._observer
                    )
                except (EngineError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    _log.warning("webhook dispatcher paused: %s", translate_database_error(exc))
                    await asyncio.sleep(config.error_backoff_s)
                    continue
                if count < config.batch_size_max:
                    await asyncio.sleep(config.interval_s)


def open_session(config: DispatcherConfig) -> aiohttp.ClientSession:
    """The HTTP client of the dispatcher: no cookies, bounded connections and time."""
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=config.timeout_s),
        connector=aiohttp.TCPConnector(limit=config.sends_concurrent_max),
        cookie_jar=aiohttp.DummyCookieJar(),
    )
