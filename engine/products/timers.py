"""Timed transitions of the products: a trade left unpaid closes, a shipped trade
auto-confirms, an order expires.

The timers are durable because they are rows: each product keeps its deadlines in its
own table, and a `TimerJob` finds the rows that are due (`FOR UPDATE SKIP LOCKED`, a
bounded batch) and runs the transition as a step without an idempotency key, which
re-checks the row's state under its lock. A restart loses nothing (the deadline is still
in the row) and fires nothing twice (the state has moved on). The sweeper runs every job
(engine.sweeper), one process at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.engine import Engine


@dataclasses.dataclass(frozen=True, kw_only=True)
class TimerJob:
    name: str  # for logs: "trades.close_unpaid"
    # run_once(engine, now=..., limit=...) fires up to `limit` due timers and returns how
    # many it fired; the sweeper calls it again at once when it returned `limit`.
    run_once: Callable[..., Awaitable[int]]
    batch_size_max: int = 200

    def __post_init__(self) -> None:
        assert 1 <= self.batch_size_max <= 10_000, self.batch_size_max


async def fire(job: TimerJob, engine: Engine, *, now: datetime) -> int:
    return int(await job.run_once(engine, now=now, limit=job.batch_size_max))
