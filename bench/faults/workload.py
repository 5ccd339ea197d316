"""What the clients do: transfers, holds, escrow trades and reads, each through `Client`.

An operation is an async function `(workload, rng, key) -> None` that records every
state-changing request in the history *before* sending it (`send` does that) and retries
it with the same key until the answer is definite or the run ends.

Extension point: a new kind of work (escrow trades were the first) is one more operation
in OPERATIONS with a weight. Give each of its requests an Op of its own kind through `send`,
make every ledger row it creates findable (the key in its metadata, `{"op": key}`, or,
when a product makes the rows, the product's id, as trades carry `trade_id`), and add a
check for that kind (`checker.py`, or a module of its own as `trade_checks.py`): the
snapshot sums and the ledger-wide checks already cover the money it moves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import asyncpg

from bench.faults.client import RETRY_CODES, Answer, Client
from bench.faults.history import History, Op, Outcome, Read, Snapshot

CURRENCY: Final = "CNY"
AMOUNT_MINOR_MIN: Final = 1
AMOUNT_MINOR_MAX: Final = 5
READ_ACCOUNTS_MAX: Final = 16  # accounts one HTTP read looks at (all of them, up to this)
DROP_AFTER_S_MAX: Final = 0.03  # a dropping client gives up within this after sending
RETRY_BACKOFF_S_MAX: Final = 0.5
SNAPSHOT_INTERVAL_S: Final = 0.25
SNAPSHOT_TIMEOUT_S: Final = 5.0
SERVER_ERROR_SAMPLE_CHARS_MAX: Final = 300

# Every user and merchant balance, summed in one statement: one snapshot, so it must
# show the total the run started with, whatever moves between the accounts meanwhile.
# Merchants are in it because trades settle to them; money held for a trade is still
# the buyer's posted balance until the trade is confirmed.
SNAPSHOT_SQL: Final = """
SELECT coalesce(sum(credits_posted - debits_posted), 0)::bigint AS total,
       count(*) FILTER (WHERE credits_posted - debits_posted < 0
                           OR credits_posted - debits_posted - debits_pending < 0) AS negative
FROM accounts WHERE kind IN ('user', 'merchant')"""

# What becomes of a trade once created, as (weight, fate); see `trade`.
TRADE_FATES: Final = (
    (15, "close"),  # the seller closes it unpaid: nothing moves
    (10, "paid"),  # paid, then left: the buyer's money stays held
    (15, "refund_paid"),  # paid, refunded in part or in full before shipping
    (10, "shipped"),  # paid and shipped, then left: still held
    (35, "confirmed"),  # paid, shipped, confirmed: settled to the seller
    (15, "refund_settled"),  # confirmed, then refunded in part or in full by the seller
)


@dataclasses.dataclass(kw_only=True)
class Workload:
    client: Client
    history: History
    users: list[str]
    merchants: list[str]  # the sellers of trades
    deadline: float  # monotonic: past it, a client stops retrying (the op is unknown)
    stop: asyncio.Event
    hold_timeout_s: tuple[int, int]
    drop_probability: float = 0.0  # set by the nemesis while clients drop connections
    resolvers: set[asyncio.Task[None]] = dataclasses.field(default_factory=set)

    def drop_after_s(self, rng: random.Random) -> float | None:
        if self.drop_probability and rng.random() < self.drop_probability:
            return rng.uniform(0, DROP_AFTER_S_MAX)
        return None


async def send(workload: Workload, op: Op, rng: random.Random) -> Op:
    """Record `op`, then send it with its key until the answer is definite."""
    workload.history.begin(op)
    backoff_s = 0.01
    while True:
        op.attempts += 1
        answer = await workload.client.request(
            op.method, op.path, body=op.body, key=op.key, drop_after_s=workload.drop_after_s(rng)
        )
        note_server_error(workload.history, answer, op.key)
        if answer.definite:
            op.status, op.code = answer.status, answer.code
            if answer.status < 300:
                op.outcome, op.result = Outcome.OK, answer.json()
            else:
                op.outcome = Outcome.FAILED
            return op
        if time.monotonic() >= workload.deadline:
            op.outcome = Outcome.UNKNOWN
            return op
        await asyncio.sleep(backoff_s)
        backoff_s = min(backoff_s * 2, RETRY_BACKOFF_S_MAX)


def note_server_error(history: History, answer: Answer, what: str) -> None:
    """A 5xx that is not a documented 'retry' problem is a bug of the server."""
    if answer.status >= 500 and answer.code not in RETRY_CODES:
        sample = answer.body[:SERVER_ERROR_SAMPLE_CHARS_MAX].decode(errors="replace")
        history.server_errors.append(f"{what}: {answer.status} {sample}")


def transfer_body(debit: str, credit: str, amount_minor: int, key: str) -> dict[str, Any]:
    return {
        "debit_account_id": debit,
        "credit_account_id": credit,
        "amount_minor": amount_minor,
        "currency": CURRENCY,
        "metadata": {"op": key},  # lets the checker find the row this key made
    }


async def transfer(workload: Workload, rng: random.Random, key: str) -> None:
    debit, credit = rng.sample(workload.users, 2)
    amount_minor = rng.randint(AMOUNT_MINOR_MIN, AMOUNT_MINOR_MAX)
    body = transfer_body(debit, credit, amount_minor, key)
    await send(workload, Op(key, "transfer", "POST", "/v1/transfers", body), rng)


async def payout(workload: Workload, rng: random.Random, key: str) -> None:
    """A merchant pays a user (a transfer like any other). Settled trades move money to
    the merchants for good; without this the users' money would drain to them within
    minutes and most transfers would be refused for want of money."""
    debit, credit = rng.choice(workload.merchants), rng.choice(workload.users)
    amount_minor = rng.randint(AMOUNT_MINOR_MIN, AMOUNT_MINOR_MAX)
    body = transfer_body(debit, credit, amount_minor, key)
    await send(workload, Op(key, "transfer", "POST", "/v1/transfers", body), rng)


async def hold(workload: Workload, rng: random.Random, key: str) -> None:
    """A hold, then later posted (in full or in part), voided, or left to expire."""
    debit, credit = rng.sample(workload.users, 2)
    amount_minor = rng.randint(AMOUNT_MINOR_MIN, AMOUNT_MINOR_MAX)
    timeout_s = rng.randint(*workload.hold_timeout_s)
    body = {**transfer_body(debit, credit, amount_minor, key), "pending": True}
    body["timeout_s"] = timeout_s
    op = await send(workload, Op(key, "hold", "POST", "/v1/transfers", body), rng)
    if op.outcome is not Outcome.OK:
        return
    fate = rng.choice(("post", "post_part", "void", "expire"))
    if fate == "expire" or workload.stop.is_set():
        return  # after the run's end nothing new starts
    # Resolved by a task of its own, so the client goes on; sometimes after the timeout,
    # where the hold belongs to the sweeper and the request must be refused.
    delay_s = rng.uniform(0, timeout_s * 1.2)
    resolving = resolve(workload, random.Random(rng.random()), op, fate, delay_s)
    resolver = asyncio.create_task(resolving)
    workload.resolvers.add(resolver)
    resolver.add_done_callback(workload.resolvers.discard)


async def resolve(
    workload: Workload, rng: random.Random, hold_op: Op, fate: str, delay_s: float
) -> None:
    await asyncio.sleep(delay_s)
    hold_id = hold_op.result["id"]
    kind = "void" if fate == "void" else "post"
    body: dict[str, Any] = {}
    if fate == "post_part":
        body["amount_minor"] = rng.randint(1, hold_op.body["amount_minor"])
    op = Op(f"{hold_op.key}-{kind}", kind, "POST", f"/v1/transfers/{hold_id}/{kind}", body)
    op.hold_key = hold_op.key
    await send(workload, op, rng)


async def read(workload: Workload, rng: random.Random, key: str) -> None:
    """Read balances over HTTP: all accounts, or a sample of READ_ACCOUNTS_MAX of them.

    Separate GETs are not one snapshot, so their sum proves nothing; the sum is checked
    on snapshots (`snapshots`). Each balance read here must still be a possible one.
    """
    users = workload.users
    ids = users if len(users) <= READ_ACCOUNTS_MAX else rng.sample(users, READ_ACCOUNTS_MAX)
    answers = await asyncio.gather(
        *(workload.client.request("GET", f"/v1/accounts/{i}") for i in ids)
    )
    for answer in answers:
        note_server_error(workload.history, answer, f"read {key}")
    if any(answer.status != 200 for answer in answers):
        workload.history.read_failures += 1
        return
    balances = [answer.json()["balance"] for answer in answers]
    workload.history.reads.append(
        Read(
            posted_minor={i: b["posted_minor"] for i, b in zip(ids, balances, strict=True)},
            available_minor={i: b["available_minor"] for i, b in zip(ids, balances, strict=True)},
        )
    )


def out_no(key: str) -> str:
    """A key as a seller's number (letters, digits, underscores)."""
    return key.replace("-", "_")


async def trade(workload: Workload, rng: random.Random, key: str) -> None:
    """An escrow trade from a merchant to a user, driven by this client through its life
    (README "Escrow trades"): every step is an Op of its own kind with its own key, sent
    until definite like any other. One client drives a trade, one step at a time, so
    every step is legal when sent and a refusal can only be for want of money."""
    (fate,) = rng.choices([f for _, f in TRADE_FATES], [w for w, _ in TRADE_FATES])
    body = {
        "out_trade_no": out_no(key),
        "seller_account_id": rng.choice(workload.merchants),
        "buyer_account_id": rng.choice(workload.users),
        "amount_minor": rng.randint(AMOUNT_MINOR_MIN, AMOUNT_MINOR_MAX),
        "currency": CURRENCY,
        "subject": f"fault suite {key}",
    }
    created = await send(workload, Op(key, "trade", "POST", "/v1/trades", body), rng)
    if created.outcome is not Outcome.OK:
        return
    trade_id = created.result["id"]
    steps = {
        "close": ("close",),
        "paid": ("pay",),
        "refund_paid": ("pay", "refund"),
        "shipped": ("pay", "ship"),
        "confirmed": ("pay", "ship", "confirm"),
        "refund_settled": ("pay", "ship", "confirm", "refund"),
    }[fate]
    state = created.result
    for action in steps:
        if workload.stop.is_set():
            return  # after the run's end nothing new starts
        op = trade_step(key, trade_id, action, state, rng)
        await send(workload, op, rng)
        if op.outcome is not Outcome.OK:
            return  # refused (the buyer had too little to pay) or never answered
        state = op.result["trade"] if action == "refund" else op.result


def trade_step(
    key: str, trade_id: str, action: str, state: dict[str, Any], rng: random.Random
) -> Op:
    path = f"/v1/trades/{trade_id}/{action}"
    body: dict[str, Any] = {}
    if action == "refund":
        refundable = state["refundable_minor"]
        full = refundable == 1 or rng.random() < 0.5
        amount_minor = refundable if full else rng.randint(1, refundable - 1)
        body = {"out_request_no": out_no(f"{key}-r"), "amount_minor": amount_minor}
        path = f"/v1/trades/{trade_id}/refunds"
    op = Op(f"{key}-{action}", f"trade_{action}", "POST", path, body)
    op.trade_key = key
    return op


Operation = Callable[[Workload, random.Random, str], Awaitable[None]]

# (weight, operation): what a client picks for its next step.
OPERATIONS: Final[tuple[tuple[int, Operation], ...]] = (
    (60, transfer),
    (20, hold),
    (10, trade),
    (10, payout),
    (20, read),
)


async def run_client(workload: Workload, index: int, rng: random.Random, run_id: str) -> None:
    operations = [operation for _, operation in OPERATIONS]
    weights = [weight for weight, _ in OPERATIONS]
    n = 0
    while not workload.stop.is_set():
        (operation,) = rng.choices(operations, weights)
        await operation(workload, rng, f"{run_id}-c{index}-{n}")
        n += 1


async def take_snapshots(dsn: str, history: History, stop: asyncio.Event) -> None:
    """Read every user balance in one statement, directly from PostgreSQL, until stop."""
    conn: asyncpg.Connection | None = None
    while not stop.is_set():
        try:
            if conn is None or conn.is_closed():
                conn = await asyncpg.connect(dsn, timeout=SNAPSHOT_TIMEOUT_S)
            row = await conn.fetchrow(SNAPSHOT_SQL, timeout=SNAPSHOT_TIMEOUT_S)
            assert row is not None
            history.snapshots.append(Snapshot(total_minor=row["total"], negative=row["negative"]))
        # InternalClientError: a statement timed out mid-protocol (PostgreSQL stalled or
        # killed) and the connection is unusable; a new one is opened on the next round.
        except (
            OSError,
            TimeoutError,
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
            asyncpg.InternalClientError,
        ):
            history.snapshot_failures += 1  # the database is down: nothing to read
            if conn is not None:
                conn.terminate()
                conn = None
        await asyncio.sleep(SNAPSHOT_INTERVAL_S)
    if conn is not None:
        await conn.close()
