"""Top-ups and withdrawals through bank channels: holds that a bank resolves.

A top-up is a pending credit: a hold from the channel's clearing account (house account
`channel.<name>`) to the partner's account, opened when the partner asks. A withdrawal
holds the partner's money the other way (account → clearing), so it cannot be spent
twice while the bank pays it out. Either way the hold carries no engine timeout: the
channel's own deadline lives in the request's row (`deadline_at`), and a `TimerJob`
voids what the bank never answered, so the ledger's sweeper and the channel never race.

    PENDING ──callback "succeeded"──▶ SUCCEEDED  (hold posted: the money moved)
       │    ──callback "failed"─────▶ FAILED     (hold voided: nothing moved)
       └────deadline passed─────────▶ TIMED_OUT  (hold voided: nothing moved)

Each transition runs as one step (engine.products.step) that locks the request's row
first, so concurrent or repeated callbacks resolve the hold exactly once: the first
moves money, the rest find the row resolved and are answered as duplicates (the same
status), conflicts (the opposite status) or late (after the deadline), and recorded in
`channel_callbacks`. The bank is asked only after the request's transaction committed
(`dispatch`), never with a transaction open.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

import asyncpg
import msgspec
import orjson

from engine.model import (
    PRODUCT_METADATA_KEY,
    AccountKind,
    CreateTransfers,
    Metadata,
    PostPending,
    TransferSpec,
    VoidPending,
)
from engine.products.banks import (
    BankCallback,
    BankOrder,
    Banks,
    Channel,
    Direction,
    SendOutcome,
)
from engine.products.step import Refusal, Step, run_step
from engine.products.timers import TimerJob

if TYPE_CHECKING:
    from engine.engine import Engine

CLEARING_ACCOUNT_PREFIX: Final = "channel."
DESTINATION_SHOWN_CHARACTERS: Final = 4


class RequestState(enum.StrEnum):
    PENDING = "pending"  # the hold is open: waiting for the bank's callback or the deadline
    SUCCEEDED = "succeeded"  # the bank confirmed: the hold was posted, the money moved
    FAILED = "failed"  # the bank declined: the hold was voided, nothing moved
    TIMED_OUT = "timed_out"  # no answer by the deadline: the hold was voided, nothing moved


class CallbackOutcome(enum.StrEnum):
    APPLIED = "applied"  # this callback resolved the request
    DUPLICATE = "duplicate"  # the request was already resolved the same way: nothing to do
    LATE = "late"  # the request had timed out: refused, nothing moved
    CONFLICT = "conflict"  # the request was resolved the other way: refused, nothing moved
    MISMATCH = "mismatch"  # the amount or currency is not the request's: refused


class ChannelRequestView(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    kind: Direction
    channel: str
    account_id: int
    amount_minor: int
    currency: str
    hold_id: int
    state: RequestState
    destination: str | None
    notify_url: str | None
    metadata: Metadata
    bank_reference: str | None
    failure_reason: str | None
    deadline_at: datetime
    created_at: datetime
    resolved_at: datetime | None

    def order(self) -> BankOrder:
        return BankOrder(
            request_id=self.id,
            direction=self.kind,
            amount_minor=self.amount_minor,
            currency=self.currency,
            destination=self.destination,
            deadline_at=self.deadline_at,
        )


class CallbackAnswer(msgspec.Struct, frozen=True, kw_only=True):
    outcome: CallbackOutcome
    request: ChannelRequestView


_COLUMNS: Final = """id, kind, channel, account_id, amount_minor, currency, hold_id, state,
    destination, notify_url, metadata, bank_reference, failure_reason, deadline_at,
    created_at, resolved_at"""
_INSERT: Final = f"""
INSERT INTO channel_requests ({_COLUMNS}, scope)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb, $12, $13, $14, $15, $16, $17)
RETURNING {_COLUMNS}
"""
_LOCK: Final = f"SELECT {_COLUMNS} FROM channel_requests WHERE id = $1 AND channel = $2 FOR UPDATE"
_READ: Final = f"SELECT {_COLUMNS} FROM channel_requests WHERE id = $1 AND scope = $2 AND kind = $3"
_RESOLVE: Final = f"""
UPDATE channel_requests SET state = $2, bank_reference = $3, failure_reason = $4, resolved_at = $5
WHERE id = $1 RETURNING {_COLUMNS}
"""
_RECORD_CALLBACK: Final = """
INSERT INTO channel_callbacks (id, request_id, status, bank_reference, outcome, received_at)
VALUES ($1, $2, $3, $4, $5, $6)
"""


def _view(row: asyncpg.Record) -> ChannelRequestView:
    return ChannelRequestView(
        id=row["id"],
        kind=Direction(row["kind"]),
        channel=row["channel"],
        account_id=row["account_id"],
        amount_minor=row["amount_minor"],
        currency=row["currency"],
        hold_id=row["hold_id"],
        state=RequestState(row["state"]),
        destination=row["destination"],
        notify_url=row["notify_url"],
        metadata=orjson.loads(row["metadata"]),
        bank_reference=row["bank_reference"],
        failure_reason=row["failure_reason"],
        deadline_at=row["deadline_at"],
        created_at=row["created_at"],
        resolved_at=row["resolved_at"],
    )


def view_json(view: ChannelRequestView) -> dict[str, Any]:
    """The request as the API shows it (and as webhook events carry it)."""
    destination = view.destination
    if destination is not None:  # enough for the partner to recognise it, no more
        destination = (
            "*" * max(0, len(destination) - DESTINATION_SHOWN_CHARACTERS)
            + (destination[-DESTINATION_SHOWN_CHARACTERS:])
        )
    return {
        "object": view.kind.value,
        "id": str(view.id),
        "channel": view.channel,
        "account_id": str(view.account_id),
        "amount_minor": view.amount_minor,
        "currency": view.currency,
        "state": view.state.value,
        "hold_id": str(view.hold_id),
        "destination": destination,
        "bank_reference": view.bank_reference,
        "failure_reason": view.failure_reason,
        "metadata": view.metadata,
        "expires_at": view.deadline_at,
        "created_at": view.created_at,
        "resolved_at": view.resolved_at,
    }


# -- opening a request ---------------------------------------------------------------------


def open_request(
    *,
    kind: Direction,
    channel: Channel,
    account_id: int,
    amount_minor: int,
    currency: str,
    destination: str | None,
    notify_url: str | None,
    metadata: Metadata,
) -> Callable[[Step], Awaitable[ChannelRequestView]]:
    """The step that opens a top-up or withdrawal: its hold and its row, together."""
    assert kind in channel.directions, (kind, channel.name)

    async def step(s: Step) -> ChannelRequestView:
        account = await s.account(account_id)
        if account is None:
            raise Refusal("account_not_found", f"no account {account_id}")
        if account.currency != currency:
            raise Refusal("currency_mismatch", f"account {account_id} holds {account.currency}")
        if account.kind is AccountKind.SYSTEM:
            raise Refusal("channel_account_invalid", "only user and merchant accounts")
        clearing = await s.house_account(CLEARING_ACCOUNT_PREFIX + channel.name, currency)
        request_id = s.next_id()
        debit, credit = (
            (clearing, account_id) if kind is Direction.TOPUP else (account_id, clearing)
        )
        hold = TransferSpec(
            debit_account_id=debit,
            credit_account_id=credit,
            amount_minor=amount_minor,
            currency=currency,
            pending=True,  # no timeout_s: the channel's deadline voids it, not the sweeper
            # Only the channel may post or void it: a partner voiding a withdrawal's hold
            # while the bank pays out would release the money twice.
            metadata={
                PRODUCT_METADATA_KEY: kind.value,
                "channel": channel.name,
                f"{kind.value}_id": str(request_id),
            },
        )
        # Scope None: the clearing account is the house's; the partner's own account was
        # checked above. A withdrawal beyond the balance is refused here, nothing held.
        result = await s.move_or_refuse(CreateTransfers(transfers=(hold,)))
        deadline_at = s.now + timedelta(seconds=channel.deadline_s)
        values = (
            request_id, kind.value, channel.name, account_id, amount_minor, currency,
            result.transfers[0].id, RequestState.PENDING.value, destination, notify_url,
            orjson.dumps(metadata).decode(), None, None, deadline_at, s.now, None, s.scope,
        )  # fmt: skip
        return _view(await s.conn.fetchrow(_INSERT, *values))

    return step


async def read_request(
    engine: Engine, request_id: int, *, scope: str, kind: Direction
) -> ChannelRequestView | None:
    """The partner's own request of this kind, or None."""
    async with engine.pool.acquire() as conn:
        row = await conn.fetchrow(_READ, request_id, scope, kind.value)
    return None if row is None else _view(row)


# -- asking the bank -----------------------------------------------------------------------

_UNSENT: Final = f"""
SELECT {_COLUMNS} FROM channel_requests
WHERE id = $1 AND state = 'pending' AND sent_at IS NULL AND deadline_at > $2
"""
_MARK_SENT: Final = """
UPDATE channel_requests SET send_attempts = send_attempts + 1,
    sent_at = CASE WHEN $2 THEN coalesce(sent_at, $3) ELSE sent_at END
WHERE id = $1
"""


async def dispatch(engine: Engine, banks: Banks, request_id: int) -> SendOutcome | None:
    """Hand an open, unsent request to its bank; None when there is nothing to send.

    Called after the request's transaction committed: by the create request, and again
    by a retry of it (same Idempotency-Key), so a request whose first send failed is
    sent when the partner retries. A bank deduplicates orders by request id, so sending
    twice is harmless. What is never sent times out at its deadline: the hold is voided.
    """
    now = engine.clock()
    async with engine.pool.acquire() as conn:
        row = await conn.fetchrow(_UNSENT, request_id, now)
    if row is None:
        return None
    view = _view(row)
    channel = banks.channel(view.channel)
    if channel is None:  # the channel was configured away since: the deadline decides
        return None
    outcome = await banks.send(channel, view.order(), now=now)
    async with engine.pool.acquire() as conn:
        await conn.execute(_MARK_SENT, request_id, outcome is SendOutcome.ACCEPTED, engine.clock())
    return outcome


# -- the bank's answer ---------------------------------------------------------------------

_SCOPE_OF: Final = "SELECT scope FROM channel_requests WHERE id = $1 AND channel = $2"


async def request_scope(engine: Engine, request_id: int, *, channel: str) -> str | None:
    """Whose request a callback is about (its events go to that partner)."""
    async with engine.pool.acquire() as conn:
        scope = await conn.fetchval(_SCOPE_OF, request_id, channel)
    return None if scope is None else str(scope)


def settle(*, channel: str, callback: BankCallback) -> Callable[[Step], Awaitable[CallbackAnswer]]:
    """The step that applies a bank's authentic callback, exactly once per request."""
    request_id = int(callback.request_id)

    async def step(s: Step) -> CallbackAnswer:
        row = await s.conn.fetchrow(_LOCK, request_id, channel)  # the row first: lock order
        if row is None:
            raise Refusal("channel_request_not_found", f"no {channel} request {request_id}")
        view = _view(row)
        outcome = _outcome(view, callback)
        if outcome is CallbackOutcome.APPLIED:
            view = await _resolve(s, view, callback)
        await s.conn.execute(
            _RECORD_CALLBACK, s.next_id(), request_id, callback.status,
            callback.bank_reference, outcome.value, s.now,
        )  # fmt: skip
        return CallbackAnswer(outcome=outcome, request=view)

    return step


def _outcome(view: ChannelRequestView, callback: BankCallback) -> CallbackOutcome:
    if (callback.amount_minor, callback.currency) != (view.amount_minor, view.currency):
        return CallbackOutcome.MISMATCH
    if view.state is RequestState.PENDING:
        return CallbackOutcome.APPLIED
    if view.state is RequestState.TIMED_OUT:
        return CallbackOutcome.LATE
    if view.state.value == callback.status:
        return CallbackOutcome.DUPLICATE
    return CallbackOutcome.CONFLICT


async def _resolve(s: Step, view: ChannelRequestView, callback: BankCallback) -> ChannelRequestView:
    succeeded = callback.status == "succeeded"
    command = (
        PostPending(transfer_id=view.hold_id)
        if succeeded
        else VoidPending(transfer_id=view.hold_id)
    )
    await s.move_or_refuse(command)
    state = RequestState.SUCCEEDED if succeeded else RequestState.FAILED
    reason = None if succeeded else (callback.reason or "declined by the bank")
    row = await s.conn.fetchrow(
        _RESOLVE, view.id, state.value, callback.bank_reference, reason, s.now
    )
    resolved = _view(row)
    await _notify(s, resolved)
    return resolved


async def _notify(s: Step, view: ChannelRequestView) -> None:
    await s.notify(
        event_type=f"{view.kind.value}.{view.state.value}",
        subject_id=view.id,
        payload=view_json(view),
        notify_url=view.notify_url,
    )


# -- the deadline --------------------------------------------------------------------------

_DUE: Final = """
SELECT id, channel, scope FROM channel_requests
WHERE state = 'pending' AND deadline_at <= $1 ORDER BY deadline_at LIMIT $2
"""


def _time_out(request_id: int, channel: str, now: datetime) -> Callable[[Step], Awaitable[bool]]:
    async def step(s: Step) -> bool:
        row = await s.conn.fetchrow(_LOCK, request_id, channel)
        if row is None:
            return False
        view = _view(row)
        # Re-checked under the lock: a callback may have resolved it since it was found.
        if view.state is not RequestState.PENDING or view.deadline_at > now:
            return False
        await s.move_or_refuse(VoidPending(transfer_id=view.hold_id))
        row = await s.conn.fetchrow(
            _RESOLVE, view.id, RequestState.TIMED_OUT.value, None, "no answer from the bank", s.now
        )
        await _notify(s, _view(row))
        return True

    return step


async def time_out_once(engine: Engine, *, now: datetime, limit: int) -> int:
    """Void the holds of up to `limit` requests past their deadline; return how many."""
    async with engine.pool.acquire() as conn:
        due = await conn.fetch(_DUE, now, limit)
    fired = 0
    for row in due:
        outcome = await run_step(
            engine,
            _time_out(row["id"], row["channel"], now),
            answer_type=bool,
            scope=row["scope"],
            idempotency=None,
        )
        fired += bool(outcome.value)
    return fired


TIME_OUT: Final = TimerJob(name="channels.time_out", run_once=time_out_once)
