"""Payment products as state machines over the ledger's holds and transfers.

Every product operation is a *step* (engine.products.step): one transaction that claims
its idempotency key, locks its own rows, moves money through the same rules and writes
as a lane batch, records the new state and an outbox event, and stores its answer.
Timed transitions (trades closing unpaid, auto-confirming, orders expiring) are bounded
`run_once` jobs that the sweeper runs (TIMER_JOBS), so a restart resumes them.
"""

from engine.products.step import Outcome, Refusal, RefusalView, Step, run_step
from engine.products.timers import TimerJob

# Product modules are imported after step and timers, which they build on.
from engine.products import orders, payment_codes  # isort: skip

# Every product's timer jobs, run by the sweeper.
TIMER_JOBS: tuple[TimerJob, ...] = (orders.EXPIRE_JOB, payment_codes.REAP_JOB)

__all__ = [
    "TIMER_JOBS",
    "Outcome",
    "Refusal",
    "RefusalView",
    "Step",
    "TimerJob",
    "run_step",
]
