"""Create and fund the accounts a benchmark run transfers between.

This is set-up, not the measured path, so it uses aiohttp's client for convenience. Every
request carries an Idempotency-Key, which makes retrying after a 5xx or a dropped
connection safe: the server answers a repeat with the first result. Every request is
signed as the bench's partner (`create_partner`), as txengine wants of every /v1 call.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aiohttp
import asyncpg
import orjson

from engine import partners as partner_store
from engine.partners import SecretBox
from gateway.signing import Signer, aiohttp_middleware

T = TypeVar("T")
Partner = tuple[str, str]  # (partner id, HMAC secret): plain strings, so they pickle

SETUP_CONCURRENCY = 32
SETUP_ATTEMPTS_MAX = 5
SETUP_BACKOFF_S = 0.2
SETUP_TIMEOUT_S = 30.0


class SetupError(Exception):
    """The server refused or kept failing a set-up request."""


async def post_json(
    session: aiohttp.ClientSession, path: str, payload: dict[str, Any], *, key: str
) -> dict[str, Any]:
    """POST and expect 201; retries transient failures with the same Idempotency-Key."""
    headers = {"Content-Type": "application/json", "Idempotency-Key": key}
    data = orjson.dumps(payload)
    last = ""
    for attempt in range(SETUP_ATTEMPTS_MAX):
        try:
            async with session.post(path, data=data, headers=headers) as resp:
                body = await resp.read()
                if resp.status == 201:
                    doc: dict[str, Any] = orjson.loads(body)
                    return doc
                last = f"{resp.status} {body[:300]!r}"
                # 4xx other than 409/429 will not change on retry: the request is wrong.
                if resp.status < 500 and resp.status not in (409, 429):
                    break
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            last = repr(exc)
        await asyncio.sleep(SETUP_BACKOFF_S * (attempt + 1))
    raise SetupError(f"POST {path} {payload} failed: {last}")


async def _map_limited(
    fn: Callable[[int], Awaitable[T]], count: int, *, concurrency: int
) -> list[T]:
    """fn(0..count-1) with at most `concurrency` running; results in index order."""
    results: list[Any] = [None] * count
    next_index = iter(range(count))

    async def worker() -> None:
        for i in next_index:  # shared iterator: each index is taken once
            results[i] = await fn(i)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))
    return results


async def create_partner(dsn: str, *, secret_key: str, rate_per_s: int = 1_000_000) -> Partner:
    """A new partner for this run (a rate limit the bench never meets), made directly in
    the database the server uses; `secret_key` is the server's TXENGINE_SECRET_KEY."""
    partner_id = f"bench-{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(dsn)
    try:
        secret = await partner_store.create(
            conn,
            SecretBox(secret_key.encode()),
            partner_id=partner_id,
            name="benchmark",
            actor="operator:bench",
            rate_per_s=rate_per_s,
            burst=rate_per_s,
        )
    finally:
        await conn.close()
    assert secret is not None
    return partner_id, secret


def _session(base_url: str, concurrency: int, partner: Partner | None) -> aiohttp.ClientSession:
    signing = () if partner is None else (aiohttp_middleware(Signer.hmac(*partner)),)
    return aiohttp.ClientSession(
        base_url=base_url,
        connector=aiohttp.TCPConnector(limit=concurrency),
        timeout=aiohttp.ClientTimeout(total=SETUP_TIMEOUT_S),
        middlewares=signing,
    )


async def create_account(
    session: aiohttp.ClientSession, *, kind: str, currency: str, key: str
) -> int:
    doc = await post_json(session, "/v1/accounts", {"currency": currency, "kind": kind}, key=key)
    return int(doc["id"])


async def setup_accounts(
    base_url: str,
    *,
    count: int,
    currency: str = "CNY",
    initial_minor: int,
    concurrency: int = SETUP_CONCURRENCY,
    key_prefix: str | None = None,
    partner: Partner | None = None,
) -> list[int]:
    """Create `count` user accounts, each funded with initial_minor from a system account.

    The system account may go negative, so it needs no funding of its own.
    """
    prefix = key_prefix or f"setup-{uuid.uuid4().hex[:12]}"
    async with _session(base_url, concurrency, partner) as session:
        system_id = await create_account(
            session, kind="system", currency=currency, key=f"{prefix}-system"
        )

        async def create_user(i: int) -> int:
            return await create_account(
                session, kind="user", currency=currency, key=f"{prefix}-user-{i}"
            )

        users = await _map_limited(create_user, count, concurrency=concurrency)

        async def fund(i: int) -> None:
            payload = {
                # Ids travel as decimal strings (63-bit ids overflow JSON doubles).
                "debit_account_id": str(system_id),
                "credit_account_id": str(users[i]),
                "amount_minor": initial_minor,
                "currency": currency,
            }
            await post_json(session, "/v1/transfers", payload, key=f"{prefix}-fund-{i}")

        if initial_minor > 0:
            await _map_limited(fund, count, concurrency=concurrency)
    return users


async def setup_hot_account(
    base_url: str,
    *,
    currency: str = "CNY",
    key_prefix: str | None = None,
    partner: Partner | None = None,
) -> int:
    """One merchant account for the hot scenario, where every transfer credits it."""
    prefix = key_prefix or f"setup-{uuid.uuid4().hex[:12]}"
    async with _session(base_url, 1, partner) as session:
        return await create_account(
            session, kind="merchant", currency=currency, key=f"{prefix}-merchant"
        )


def parse_account_ids(text: str) -> list[int]:
    """Account ids from a file or argument: a JSON list, or ids split by commas/whitespace."""
    cleaned = text.strip().lstrip("[").rstrip("]").replace(",", " ")
    return [int(tok) for tok in cleaned.split()]


def dedupe(ids: Sequence[int]) -> list[int]:
    return list(dict.fromkeys(ids))
