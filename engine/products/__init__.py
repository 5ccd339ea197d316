"""Payment products as state machines over the ledger's holds and transfers.

Every product operation is a *step* (engine.products.step): one transaction that claims
its idempotency key, locks its own rows, moves money through the same rules and writes
as a lane batch, records the new state and an outbox event, and stores its answer.
Timed transitions (trades closing unpaid, auto-confirming, orders expiring) are bounded
`run_once` jobs that the sweeper runs (TIMER_JOBS), so a restart resumes them.
"""

# Every product's timer jobs, run by the sweeper. Each product module imports step and
# timers itself, so the order of these imports does not matter.
from engine.products import channels, orders, payment_codes, trade_timers
from engine.products.step import Outcome, Refusal, RefusalView, Step, run_step
from engine.products.timers import TimerJob

TIMER_JOBS: tuple[TimerJob, ...] = (
    channels.TIME_OUT,
    *trade_timers.JOBS,
    orders.EXPIRE_JOB,
    payment_codes.REAP_JOB,
)

__all__ = [
    "TIMER_JOBS",
    "Outcome",
    "Refusal",
    "RefusalView",
    "Step",
    "TimerJob",
    "run_step",
]
