"""Per-partner rate limits that hold across every gateway process, cheaply.

The bucket itself lives in PostgreSQL (engine.partners.lease_tokens); a process leases a
chunk of tokens at once and spends them locally, so a request costs a decrement, and a
lease (one UPDATE) is needed only every `chunk` requests. Requests that find the local
chunk spent while a lease is in flight wait for that one lease rather than each issuing
their own. When the bucket is empty, the refusal is remembered until the next token is
due, so a partner hammering past its limit costs no database work per request.

What it trades: tokens leased by one process cannot be spent by another, so near the
limit a partner may be refused up to (processes - 1) * chunk requests early; chunks are
a tenth of the partner's rate (at most LEASE_CHUNK_MAX), and unspent tokens are dropped
after LEASE_TTL_S so a process cannot save them up beyond the bucket's burst. The limit
is never exceeded: every token spent was taken from the shared bucket.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import Final

from engine.partners import Lease

LEASE_CHUNK_MAX: Final = 1_000
LEASE_TTL_S: Final = 1.0
# A request waits for at most this many leases: each either brings tokens (which other
# waiters may take first) or finds the bucket empty, which ends every wait.
LEASE_ATTEMPTS_MAX: Final = 8

Leaser = Callable[[int], Awaitable[Lease]]


def chunk_for(rate_per_s: int) -> int:
    return max(1, min(rate_per_s // 10, LEASE_CHUNK_MAX))


class RateBudget:
    """One partner's tokens in this process."""

    def __init__(self, lease: Leaser, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._lease = lease
        self._clock = clock
        self._tokens = 0
        self._leased_at = -math.inf
        self._denied_until = -math.inf
        self._leasing: asyncio.Future[None] | None = None
        self._waiting = 0

    async def take(self, *, rate_per_s: int) -> float | None:
        """None if the request may go ahead; else the seconds until a token is due."""
        for _ in range(LEASE_ATTEMPTS_MAX):
            now = self._clock()
            if self._tokens > 0 and now - self._leased_at < LEASE_TTL_S:
                self._tokens -= 1
                return None
            if now < self._denied_until:
                return self._denied_until - now
            if self._leasing is None:
                # Enough for every request already waiting, so a burst needs one lease.
                want = min(max(chunk_for(rate_per_s), self._waiting + 1), LEASE_CHUNK_MAX)
                self._leasing = asyncio.ensure_future(self._refill(want))
            self._waiting += 1
            try:
                await asyncio.shield(self._leasing)
            finally:
                self._waiting -= 1
        return max(1.0 / rate_per_s, self._denied_until - self._clock())

    async def _refill(self, chunk: int) -> None:
        try:
            lease = await self._lease(chunk)
            now = self._clock()
            self._tokens = lease.granted
            self._leased_at = now
            if lease.granted == 0:
                self._denied_until = now + max(lease.retry_after_s, 0.001)
        finally:
            self._leasing = None
