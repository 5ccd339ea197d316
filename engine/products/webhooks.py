"""Webhooks: the partner's view of deliveries, redelivery, and the signing secrets.

An outbox event with a notify_url gets one delivery row (written with it by
Step.notify); engine.products.dispatcher sends it. A delivery is `pending` until the
partner answers a 2xx whose body is `success` (Alipay's rule), retried on Alipay's
schedule after the first attempt, then `dead`. A partner can list its deliveries and
ask for a redelivery, which starts the schedule afresh.

Secrets are per partner scope: `create_secret` makes the first, `rotate_secret` a new
one while the old keep signing for an overlap. A secret is shown once, to the operator
who made it (txengine webhooks secret ...), and is never logged.
"""

from __future__ import annotations

import enum
import secrets as random_secrets
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Final

import asyncpg
import msgspec

from engine.errors import ClientError, EngineError, InvalidCursor, translate_database_error
from engine.products.step import Refusal, Step

if TYPE_CHECKING:
    from engine.engine import Engine

# After the first attempt fails, retry after these delays (Alipay's 4m, 10m, 10m, 1h,
# 2h, 6h, 15h: about 25 hours in all); when the last retry fails the delivery is dead.
RETRY_SCHEDULE_S: Final = (4 * 60, 10 * 60, 10 * 60, 3600, 2 * 3600, 6 * 3600, 15 * 3600)
ATTEMPTS_MAX: Final = 1 + len(RETRY_SCHEDULE_S)
DELIVERIES_PAGE_LIMIT_MAX: Final = 100
LAST_ERROR_LENGTH_MAX: Final = 300  # characters of the last failure kept on the row
SECRET_PREFIX: Final = "whsec_"
SIGNING_SECRETS_MAX: Final = 4  # secrets signing at once (the current + overlapping old)
SECRET_OVERLAP_S_DEFAULT: Final = 24 * 3600
SECRET_OVERLAP_S_MAX: Final = 30 * 24 * 3600
SCOPE_LENGTH_MAX: Final = 128
NOT_FOUND: Final = "webhook_delivery_not_found"


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"  # waiting for its next attempt (or being sent right now)
    DELIVERED = "delivered"  # the partner answered 2xx with the body "success"
    DEAD = "dead"  # every attempt of the schedule failed, or the event cannot be sent


class DeliveryView(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    event_id: int
    event_type: str
    subject_id: int
    url: str
    status: DeliveryStatus
    attempts: int  # attempts since the delivery was created or last redelivered
    next_attempt_at: datetime | None
    last_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None


class DeliveryPage(msgspec.Struct, frozen=True, kw_only=True):
    deliveries: tuple[DeliveryView, ...]
    has_more: bool


class SecretExists(ClientError):
    """The scope has a current secret already: rotate it instead."""


class SecretNotFound(ClientError):
    """The scope has no current secret to rotate: create one first."""


def retry_delay_s(attempts: int) -> int | None:
    """The wait before the next attempt after `attempts` failed ones; None: give up."""
    assert attempts >= 1, attempts
    return RETRY_SCHEDULE_S[attempts - 1] if attempts <= len(RETRY_SCHEDULE_S) else None


def bounded_error(text: str) -> str:
    return text if len(text) <= LAST_ERROR_LENGTH_MAX else text[: LAST_ERROR_LENGTH_MAX - 1] + "…"


# -- deliveries ------------------------------------------------------------------------------

_DELIVERY_COLUMNS: Final = """d.id, d.event_id, e.type AS event_type, e.subject_id, d.url,
    d.status, d.attempts, d.next_attempt_at, d.last_attempt_at, d.last_status_code,
    d.last_error, d.created_at, d.delivered_at"""
_LIST: Final = f"""
SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries d JOIN outbox_events e ON e.id = d.event_id
WHERE d.scope = $1 AND ($2::text IS NULL OR d.status = $2)
  AND ($3::bigint IS NULL OR d.id < $3)
ORDER BY d.id DESC LIMIT $4
"""
_EXISTS: Final = "SELECT true FROM webhook_deliveries WHERE id = $1 AND scope = $2"
_LOCK: Final = "SELECT status FROM webhook_deliveries WHERE id = $1 AND scope = $2 FOR UPDATE"
_REDELIVER: Final = """
UPDATE webhook_deliveries
SET status = 'pending', next_attempt_at = $2, claim_id = NULL,
    attempts = CASE WHEN status = 'pending' THEN attempts ELSE 0 END
WHERE id = $1
"""
_READ: Final = f"""
SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries d JOIN outbox_events e ON e.id = d.event_id
WHERE d.id = $1
"""


def _view(row: asyncpg.Record) -> DeliveryView:
    return DeliveryView(
        id=row["id"],
        event_id=row["event_id"],
        event_type=row["event_type"],
        subject_id=row["subject_id"],
        url=row["url"],
        status=DeliveryStatus(row["status"]),
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        last_attempt_at=row["last_attempt_at"],
        last_status_code=row["last_status_code"],
        last_error=row["last_error"],
        created_at=row["created_at"],
        delivered_at=row["delivered_at"],
    )


async def list_deliveries(
    engine: Engine,
    *,
    scope: str,
    status: DeliveryStatus | None,
    limit: int,
    starting_after: int | None,
) -> DeliveryPage:
    """The scope's deliveries, newest first; `starting_after` is the last id of a page."""
    assert 1 <= limit <= DELIVERIES_PAGE_LIMIT_MAX, limit
    try:
        async with engine.pool.acquire() as conn:
            if starting_after is not None and not await conn.fetchval(
                _EXISTS, starting_after, scope
            ):
                raise InvalidCursor(f"no webhook delivery {starting_after}")
            rows = await conn.fetch(
                _LIST, scope, None if status is None else status.value, starting_after, limit + 1
            )
    except EngineError:
        raise
    except Exception as exc:
        raise translate_database_error(exc) from exc
    return DeliveryPage(
        deliveries=tuple(_view(row) for row in rows[:limit]), has_more=len(rows) > limit
    )


def redeliver(delivery_id: int) -> Callable[[Step], Awaitable[DeliveryView]]:
    """A step that sends the delivery again now. A delivered or dead one becomes pending
    with the schedule started afresh; a pending one is simply due now."""

    async def step(s: Step) -> DeliveryView:
        status = await s.conn.fetchval(_LOCK, delivery_id, s.scope)
        if status is None:
            raise Refusal(NOT_FOUND, f"no webhook delivery {delivery_id}")
        await s.conn.execute(_REDELIVER, delivery_id, s.now)
        return _view(await s.conn.fetchrow(_READ, delivery_id))

    return step


# -- secrets ----------------------------------------------------------------------------------

_CURRENT: Final = """
SELECT id FROM webhook_secrets WHERE scope = $1 AND expires_at IS NULL FOR UPDATE
"""
_INSERT_SECRET: Final = """
INSERT INTO webhook_secrets (id, scope, secret, created_at) VALUES ($1, $2, $3, $4)
"""
_EXPIRE: Final = """
UPDATE webhook_secrets SET expires_at = $2
WHERE scope = $1 AND (expires_at IS NULL OR expires_at > $2)
"""
_SIGNING: Final = """
SELECT secret FROM webhook_secrets
WHERE scope = $1 AND (expires_at IS NULL OR expires_at > $2)
ORDER BY created_at DESC, id DESC LIMIT $3
"""


def _check_scope(scope: str) -> None:
    if not 1 <= len(scope) <= SCOPE_LENGTH_MAX or not scope.isprintable():
        raise ClientError(f"a scope is 1 to {SCOPE_LENGTH_MAX} printable characters")


def new_secret() -> str:
    return SECRET_PREFIX + random_secrets.token_hex(32)


async def create_secret(
    conn: asyncpg.Connection, *, scope: str, now: datetime, next_id: Callable[[], int]
) -> str:
    """The scope's first signing secret (an operator action); SecretExists if it has one."""
    _check_scope(scope)
    secret = new_secret()
    async with conn.transaction():
        if await conn.fetchval(_CURRENT, scope) is not None:
            raise SecretExists(f"scope {scope!r} has a webhook secret: rotate it")
        try:
            await conn.execute(_INSERT_SECRET, next_id(), scope, secret, now)
        except asyncpg.UniqueViolationError:  # a concurrent create won
            raise SecretExists(f"scope {scope!r} has a webhook secret: rotate it") from None
    return secret


async def rotate_secret(
    conn: asyncpg.Connection,
    *,
    scope: str,
    now: datetime,
    next_id: Callable[[], int],
    overlap_s: int = SECRET_OVERLAP_S_DEFAULT,
) -> str:
    """A new current secret; the old ones keep signing for `overlap_s` more seconds."""
    _check_scope(scope)
    if not 0 <= overlap_s <= SECRET_OVERLAP_S_MAX:
        raise ClientError(f"the overlap is 0 to {SECRET_OVERLAP_S_MAX} seconds")
    secret = new_secret()
    async with conn.transaction():
        if await conn.fetchval(_CURRENT, scope) is None:
            raise SecretNotFound(f"scope {scope!r} has no webhook secret: create one")
        await conn.execute(_EXPIRE, scope, now + timedelta(seconds=overlap_s))
        await conn.execute(_INSERT_SECRET, next_id(), scope, secret, now)
    return secret


async def signing_secrets(conn: asyncpg.Connection, *, scope: str, now: datetime) -> list[str]:
    """The secrets that sign the scope's deliveries at `now`, newest first."""
    rows = await conn.fetch(_SIGNING, scope, now, SIGNING_SECRETS_MAX)
    return [row["secret"] for row in rows]
