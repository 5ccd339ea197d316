"""The escrow trades' timers: close unpaid trades, auto-confirm shipped ones, finish
successful ones when their refund window closes.

Each deadline is a column of the trade row, due only in its own state (partial indexes in
the migration). A job selects the due trades' ids without locking them, then runs one
step per trade without an idempotency key: the step locks the row and re-checks state and
deadline, so a trade the buyer confirmed (or refunded) a moment before is simply not
fired, a restart loses nothing (the row is still due) and nothing fires twice (the
state has moved on).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Final

from engine.products.step import run_step
from engine.products.timers import TimerJob
from engine.products.trades import (
    CloseReason,
    ConfirmedBy,
    StepFn,
    TradeView,
    close,
    confirm,
    finish,
)

if TYPE_CHECKING:
    from engine.engine import Engine

_log = logging.getLogger("txengine.trades")


def _due(state: str, deadline: str) -> str:
    return f"""SELECT id, scope FROM trades WHERE state = '{state}' AND {deadline} <= $1
               ORDER BY {deadline} LIMIT $2"""


_UNPAID: Final = _due("WAIT_BUYER_PAY", "pay_expires_at")
_SHIPPED: Final = _due("WAIT_BUYER_CONFIRM_GOODS", "confirm_expires_at")
_SUCCEEDED: Final = _due("TRADE_SUCCESS", "finish_at")


async def _fire(
    engine: Engine, sql: str, transition: Callable[[int], StepFn], *, now: datetime, limit: int
) -> int:
    async with engine.pool.acquire() as conn:
        due = await conn.fetch(sql, now, limit)
    fired = 0
    for row in due:
        outcome = await run_step(
            engine,
            transition(row["id"]),
            answer_type=TradeView,
            scope=row["scope"],
            idempotency=None,
        )
        fired += outcome.value is not None
        refusal = outcome.refusal
        if refusal is not None and refusal.code != "trade_state_conflict":
            # Not a trade that moved on: something refused the transition itself (it
            # should not happen). The trade stays due and is tried again next pass.
            _log.warning(
                "trade timer refused",
                extra={"trade_id": row["id"], "code": refusal.code, "detail": refusal.detail},
            )
    return fired


async def close_unpaid_once(engine: Engine, *, now: datetime, limit: int) -> int:
    """Close up to `limit` trades whose time to pay has passed."""
    return await _fire(
        engine, _UNPAID, lambda i: close(i, reason=CloseReason.PAY_TIMEOUT), now=now, limit=limit
    )


async def auto_confirm_once(engine: Engine, *, now: datetime, limit: int) -> int:
    """Confirm (and settle) up to `limit` shipped trades whose buyer did not in time."""
    return await _fire(
        engine, _SHIPPED, lambda i: confirm(i, by=ConfirmedBy.TIMER), now=now, limit=limit
    )


async def finish_once(engine: Engine, *, now: datetime, limit: int) -> int:
    """Finish up to `limit` successful trades whose refund window has closed."""
    return await _fire(engine, _SUCCEEDED, finish, now=now, limit=limit)


CLOSE_UNPAID: Final = TimerJob(name="trades.close_unpaid", run_once=close_unpaid_once)
AUTO_CONFIRM: Final = TimerJob(name="trades.auto_confirm", run_once=auto_confirm_once)
FINISH: Final = TimerJob(name="trades.finish", run_once=finish_once)
JOBS: Final = (CLOSE_UNPAID, AUTO_CONFIRM, FINISH)
