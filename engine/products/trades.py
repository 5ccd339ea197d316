"""Escrow trades (担保交易): the buyer's money waits with the house until the goods arrive.

A seller opens a trade for a buyer. The buyer pays: the money is held (a pending
transfer buyer → seller, without a timeout: the trade's own timers decide its fate).
The seller ships. The buyer confirms receipt, or the auto-confirm clock runs out: the
hold is posted to the seller and the fee (engine.products.fees) taken, in the same step
transaction. The refund window then stays open for a while, after which the trade is
finished. Refunds are in engine.products.trade_refunds, timers in trade_timers.

Every transition is a step (engine.products.step): it locks the trade row, checks that
the move is legal in the trade's state (else the refusal `trade_state_conflict`, which
changes nothing), moves money, saves the row and records an outbox event.

The trade's terms use Alipay's `timeout_express` format: a whole number of minutes,
hours or days, "90m", "2h", "15d". Alipay's "1c" (close at midnight) is not accepted.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

import asyncpg
import msgspec

from engine.model import (
    INT64_MAX,
    PRODUCT_METADATA_KEY,
    Command,
    CreateTransfers,
    PostPending,
    TransferSpec,
    is_known_currency,
)
from engine.products.fees import fee_spec
from engine.products.step import Refusal, Step
from engine.products.terms import (
    OUT_NO_PATTERN,
    SUBJECT_LENGTH_MAX,
    express_error,
    must_s,
)

if TYPE_CHECKING:
    from engine.engine import Engine


class TradeState(enum.StrEnum):
    """Alipay's trade states, plus Taobao's two for shipping (their names, upper case)."""

    WAIT_BUYER_PAY = "WAIT_BUYER_PAY"  # created; closes at pay_expires_at if unpaid
    WAIT_SELLER_SEND_GOODS = "WAIT_SELLER_SEND_GOODS"  # paid: the buyer's money is held
    WAIT_BUYER_CONFIRM_GOODS = "WAIT_BUYER_CONFIRM_GOODS"  # shipped; auto-confirms later
    TRADE_SUCCESS = "TRADE_SUCCESS"  # settled to the seller less the fee; refundable still
    TRADE_FINISHED = "TRADE_FINISHED"  # the refund window closed: final
    TRADE_CLOSED = "TRADE_CLOSED"  # unpaid in time, closed by the seller, or fully refunded


REFUNDABLE: Final = frozenset(
    {
        TradeState.WAIT_SELLER_SEND_GOODS,
        TradeState.WAIT_BUYER_CONFIRM_GOODS,
        TradeState.TRADE_SUCCESS,
    }
)


class CloseReason(enum.StrEnum):
    PAY_TIMEOUT = "pay_timeout"  # the buyer did not pay in time (timer)
    SELLER_CLOSED = "seller_closed"  # the seller closed it before payment
    FULLY_REFUNDED = "fully_refunded"  # every paid minor unit went back to the buyer


class ConfirmedBy(enum.StrEnum):
    BUYER = "buyer"  # the buyer confirmed receipt
    TIMER = "timer"  # the auto-confirm clock ran out


PRODUCT: Final = "trade"  # the value of PRODUCT_METADATA_KEY on a trade's holds

# The terms a seller may choose, as (default, least, most) in Alipay's format. The
# time to pay is Alipay's range; auto-confirm defaults to Taobao's 10 days and never
# comes sooner than a day, so a seller cannot take the buyer's protection away.
TIMEOUT_EXPRESS: Final = ("15d", "1m", "15d")
CONFIRM_TIMEOUT_EXPRESS: Final = ("10d", "1d", "30d")
REFUND_WINDOW_EXPRESS: Final = ("90d", "1d", "365d")


class NewTrade(msgspec.Struct, frozen=True, kw_only=True):
    out_trade_no: str
    seller_account_id: int
    buyer_account_id: int
    amount_minor: int
    currency: str
    subject: str
    timeout_express: str = TIMEOUT_EXPRESS[0]
    confirm_timeout_express: str = CONFIRM_TIMEOUT_EXPRESS[0]
    refund_window_express: str = REFUND_WINDOW_EXPRESS[0]
    notify_url: str | None = None


def new_trade_error(new: NewTrade) -> tuple[str, str] | None:
    """(field, why) if `new` cannot be a trade, else None. The gateway answers it as a
    validation error; the engine asserts it, as command_error does for commands."""
    if not re.fullmatch(OUT_NO_PATTERN, new.out_trade_no):
        return "out_trade_no", "1 to 64 letters, digits or underscores"
    if new.seller_account_id == new.buyer_account_id:
        return "buyer_account_id", "the buyer and the seller must differ"
    if not 0 < new.amount_minor <= INT64_MAX:
        return "amount_minor", "amount out of range"
    if not is_known_currency(new.currency):
        return "currency", f"unknown currency {new.currency!r}"
    if not 1 <= len(new.subject) <= SUBJECT_LENGTH_MAX or "\x00" in new.subject:
        return "subject", f"1 to {SUBJECT_LENGTH_MAX} characters, no NUL"
    for field, terms in (
        ("timeout_express", TIMEOUT_EXPRESS),
        ("confirm_timeout_express", CONFIRM_TIMEOUT_EXPRESS),
        ("refund_window_express", REFUND_WINDOW_EXPRESS),
    ):
        error = express_error(getattr(new, field), terms)
        if error is not None:
            return field, error
    url = new.notify_url
    if url is not None and not re.fullmatch(r"https?://[^\s\x00]{1,1016}", url):
        return "notify_url", "an http or https URL of at most 1024 characters"
    return None


class TradeView(msgspec.Struct, frozen=True, kw_only=True):
    """A trade row; also the answer of every trade step (stored with its key)."""

    id: int
    out_trade_no: str
    seller_account_id: int
    buyer_account_id: int
    currency: str
    amount_minor: int
    subject: str
    state: TradeState
    timeout_express: str
    confirm_timeout_express: str
    refund_window_express: str
    notify_url: str | None
    hold_transfer_id: int | None
    held_minor: int
    settled_minor: int
    refunded_minor: int
    fee_minor: int
    fee_refunded_minor: int
    confirmed_by: ConfirmedBy | None
    close_reason: CloseReason | None
    created_at: datetime
    pay_expires_at: datetime
    paid_at: datetime | None
    shipped_at: datetime | None
    confirm_expires_at: datetime | None
    succeeded_at: datetime | None
    finish_at: datetime | None
    finished_at: datetime | None
    closed_at: datetime | None

    @property
    def refundable_minor(self) -> int:
        """What may still go back to the buyer: what was paid and not yet refunded, in a
        state that takes refunds."""
        return self.amount_minor - self.refunded_minor if self.state in REFUNDABLE else 0


_FIELDS: Final = tuple(TradeView.__struct_fields__)
_COLUMNS: Final = ", ".join(_FIELDS)
_INSERT: Final = f"""
INSERT INTO trades (scope, {_COLUMNS})
VALUES ($1, {", ".join(f"${i + 2}" for i in range(len(_FIELDS)))})
ON CONFLICT (scope, seller_account_id, out_trade_no) DO NOTHING
RETURNING id
"""
_TAKEN: Final = """
SELECT id FROM trades WHERE scope = $1 AND seller_account_id = $2 AND out_trade_no = $3
"""
_LOCK: Final = f"SELECT {_COLUMNS} FROM trades WHERE id = $1 AND scope = $2 FOR UPDATE"
_READ: Final = f"SELECT {_COLUMNS} FROM trades WHERE id = $1 AND scope = $2"
_FIND: Final = f"""
SELECT {_COLUMNS} FROM trades
WHERE scope = $1 AND seller_account_id = $2 AND out_trade_no = $3
"""
# Everything a transition may change; the terms and the parties never change.
_MUTABLE: Final = (
    "state", "hold_transfer_id", "held_minor", "settled_minor", "refunded_minor",
    "fee_minor", "fee_refunded_minor", "confirmed_by", "close_reason", "paid_at",
    "shipped_at", "confirm_expires_at", "succeeded_at", "finish_at", "finished_at",
    "closed_at",
)  # fmt: skip
_SAVE: Final = (
    "UPDATE trades SET "
    + ", ".join(f"{name} = ${i + 2}" for i, name in enumerate(_MUTABLE))
    + " WHERE id = $1"
)


def _view(row: asyncpg.Record) -> TradeView:
    values: dict[str, Any] = dict(row)
    values["state"] = TradeState(values["state"])
    if values["confirmed_by"] is not None:
        values["confirmed_by"] = ConfirmedBy(values["confirmed_by"])
    if values["close_reason"] is not None:
        values["close_reason"] = CloseReason(values["close_reason"])
    return TradeView(**values)


def trade_json(trade: TradeView) -> dict[str, Any]:
    """The trade as the API shows it and as its events carry it: ids as strings."""
    body: dict[str, Any] = {"object": "trade"}
    for name in _FIELDS:
        value = getattr(trade, name)
        if name == "id" or (name.endswith("_id") and value is not None):
            value = str(value)
        body[name] = value
    body["refundable_minor"] = trade.refundable_minor
    return body


# -- reads ---------------------------------------------------------------------------------


async def read_trade(engine: Engine, trade_id: int, *, scope: str) -> TradeView | None:
    async with engine.pool.acquire() as conn:
        row = await conn.fetchrow(_READ, trade_id, scope)
    return None if row is None else _view(row)


async def find_trade(
    engine: Engine, *, scope: str, seller_account_id: int, out_trade_no: str
) -> TradeView | None:
    """The seller's trade by its own number, like alipay.trade.query."""
    async with engine.pool.acquire() as conn:
        row = await conn.fetchrow(_FIND, scope, seller_account_id, out_trade_no)
    return None if row is None else _view(row)


# -- what every step does -------------------------------------------------------------------


async def lock_trade(step: Step, trade_id: int) -> TradeView:
    """The caller's trade, locked for this transaction; someone else's is not found."""
    row = await step.conn.fetchrow(_LOCK, trade_id, step.scope)
    if row is None:
        raise Refusal("trade_not_found", f"no trade {trade_id}")
    return _view(row)


def require_state(trade: TradeView, *states: TradeState, action: str) -> None:
    if trade.state not in states:
        raise Refusal(
            "trade_state_conflict",
            f"cannot {action} a trade in state {trade.state.value}",
            state=trade.state.value,
            trade_id=str(trade.id),
        )


async def save(step: Step, trade: TradeView, event: str | None, payload: Any = None) -> None:
    """Write the trade's new state and, if `event`, its outbox event."""
    await step.conn.execute(_SAVE, trade.id, *(getattr(trade, n) for n in _MUTABLE))
    if event is not None:
        await announce(step, trade, event, payload)


async def announce(step: Step, trade: TradeView, event: str, payload: Any = None) -> None:
    """Record the event `trade.<event>` in the outbox; its payload is the trade's JSON."""
    await step.notify(
        event_type=f"trade.{event}",
        subject_id=trade.id,
        payload=trade_json(trade) if payload is None else payload,
        notify_url=trade.notify_url,
    )


async def move_all(step: Step, *commands: Command) -> list[Any]:
    """Apply `commands` in this step; any failure refuses the whole step (the savepoint
    undoes the ones that succeeded)."""
    results = await step.move(*commands)
    for result in results:
        if not result.ok:
            raise Refusal(result.code, result.detail)
    return [result.transfers for result in results]


def hold_spec(trade: TradeView, amount_minor: int) -> TransferSpec:
    """The hold that keeps the buyer's money for the seller. No timeout: the trade's
    timers resolve it, and only the trade may (PRODUCT_METADATA_KEY)."""
    return TransferSpec(
        debit_account_id=trade.buyer_account_id,
        credit_account_id=trade.seller_account_id,
        amount_minor=amount_minor,
        currency=trade.currency,
        pending=True,
        metadata={PRODUCT_METADATA_KEY: PRODUCT, "trade_id": str(trade.id)},
    )


def _after(now: datetime, express: str) -> datetime:
    return now + timedelta(seconds=must_s(express))


# -- the transitions -------------------------------------------------------------------------

StepFn = Callable[[Step], Awaitable[TradeView]]


def create(new: NewTrade) -> StepFn:
    assert new_trade_error(new) is None, new_trade_error(new)

    async def step(s: Step) -> TradeView:
        for field, account_id in (
            ("seller_account_id", new.seller_account_id),
            ("buyer_account_id", new.buyer_account_id),
        ):
            account = await s.account(account_id)
            if account is None:
                raise Refusal("account_not_found", f"no account {account_id}", field=field)
            if account.currency != new.currency:
                raise Refusal(
                    "currency_mismatch",
                    f"account {account_id} holds {account.currency}, the trade is in "
                    f"{new.currency}",
                    field=field,
                )
        trade = TradeView(
            id=s.next_id(),
            **{f: getattr(new, f) for f in NewTrade.__struct_fields__},
            state=TradeState.WAIT_BUYER_PAY,
            hold_transfer_id=None,
            held_minor=0,
            settled_minor=0,
            refunded_minor=0,
            fee_minor=0,
            fee_refunded_minor=0,
            confirmed_by=None,
            close_reason=None,
            created_at=s.now,
            pay_expires_at=_after(s.now, new.timeout_express),
            paid_at=None,
            shipped_at=None,
            confirm_expires_at=None,
            succeeded_at=None,
            finish_at=None,
            finished_at=None,
            closed_at=None,
        )
        inserted = await s.conn.fetchval(_INSERT, s.scope, *(getattr(trade, n) for n in _FIELDS))
        if inserted is None:
            taken = await s.conn.fetchval(_TAKEN, s.scope, new.seller_account_id, new.out_trade_no)
            raise Refusal(
                "out_trade_no_taken",
                f"the seller already has a trade {new.out_trade_no!r}",
                trade_id=str(taken),
            )
        return trade

    return step


def pay(trade_id: int) -> StepFn:
    """The buyer pays: their money is held for the seller."""

    async def step(s: Step) -> TradeView:
        trade = await lock_trade(s, trade_id)
        require_state(trade, TradeState.WAIT_BUYER_PAY, action="pay")
        if s.now >= trade.pay_expires_at:
            raise Refusal(
                "trade_pay_expired",
                f"the time to pay ended at {trade.pay_expires_at.isoformat()}",
                state=trade.state.value,
                trade_id=str(trade.id),
            )
        result = await s.move_or_refuse(
            CreateTransfers(transfers=(hold_spec(trade, trade.amount_minor),), scope=s.scope)
        )
        (held,) = result.transfers
        trade = msgspec.structs.replace(
            trade,
            state=TradeState.WAIT_SELLER_SEND_GOODS,
            hold_transfer_id=held.id,
            held_minor=trade.amount_minor,
            paid_at=s.now,
        )
        await save(s, trade, "paid")
        return trade

    return step


def ship(trade_id: int) -> StepFn:
    """The seller ships: the buyer's auto-confirm clock starts."""

    async def step(s: Step) -> TradeView:
        trade = await lock_trade(s, trade_id)
        require_state(trade, TradeState.WAIT_SELLER_SEND_GOODS, action="ship")
        trade = msgspec.structs.replace(
            trade,
            state=TradeState.WAIT_BUYER_CONFIRM_GOODS,
            shipped_at=s.now,
            confirm_expires_at=_after(s.now, trade.confirm_timeout_express),
        )
        await save(s, trade, "shipped")
        return trade

    return step


def confirm(trade_id: int, *, by: ConfirmedBy = ConfirmedBy.BUYER) -> StepFn:
    """The buyer confirms receipt (or the clock does): settle to the seller."""

    async def step(s: Step) -> TradeView:
        trade = await lock_trade(s, trade_id)
        require_state(trade, TradeState.WAIT_BUYER_CONFIRM_GOODS, action="confirm")
        if by is ConfirmedBy.TIMER:
            assert trade.confirm_expires_at is not None
            if s.now < trade.confirm_expires_at:
                raise Refusal("trade_state_conflict", "not due yet", state=trade.state.value)
        trade = await _settle(s, trade, by=by)
        await save(s, trade, "succeeded")
        return trade

    return step


async def _settle(s: Step, trade: TradeView, *, by: ConfirmedBy) -> TradeView:
    """Post the hold to the seller and take the fee on it, in this one transaction.
    Both commands act as the operator: the hold is the trade's, the fee account the
    house's; the trade row (ours, locked) is what entitles the step to them."""
    assert trade.hold_transfer_id is not None and trade.held_minor > 0, trade
    settled = trade.held_minor
    fee = await fee_spec(
        s,
        merchant_account_id=trade.seller_account_id,
        amount_minor=settled,
        currency=trade.currency,
    )
    commands: list[Command] = [PostPending(transfer_id=trade.hold_transfer_id, scope=None)]
    if fee is not None:
        fee = msgspec.structs.replace(fee, metadata={**fee.metadata, "trade_id": str(trade.id)})
        commands.append(CreateTransfers(transfers=(fee,), scope=None))
    await move_all(s, *commands)
    return msgspec.structs.replace(
        trade,
        state=TradeState.TRADE_SUCCESS,
        held_minor=0,
        settled_minor=settled,
        fee_minor=0 if fee is None else fee.amount_minor,
        confirmed_by=by,
        succeeded_at=s.now,
        finish_at=_after(s.now, trade.refund_window_express),
    )


def close(trade_id: int, *, reason: CloseReason = CloseReason.SELLER_CLOSED) -> StepFn:
    """Close an unpaid trade: by the seller, or by the timer once the time to pay ended."""

    async def step(s: Step) -> TradeView:
        trade = await lock_trade(s, trade_id)
        require_state(trade, TradeState.WAIT_BUYER_PAY, action="close")
        if reason is CloseReason.PAY_TIMEOUT and s.now < trade.pay_expires_at:
            raise Refusal("trade_state_conflict", "not due yet", state=trade.state.value)
        trade = msgspec.structs.replace(
            trade, state=TradeState.TRADE_CLOSED, close_reason=reason, closed_at=s.now
        )
        await save(s, trade, "closed")
        return trade

    return step


def finish(trade_id: int) -> StepFn:
    """The refund window closed (timer): the trade is final."""

    async def step(s: Step) -> TradeView:
        trade = await lock_trade(s, trade_id)
        require_state(trade, TradeState.TRADE_SUCCESS, action="finish")
        assert trade.finish_at is not None
        if s.now < trade.finish_at:
            raise Refusal("trade_state_conflict", "not due yet", state=trade.state.value)
        trade = msgspec.structs.replace(trade, state=TradeState.TRADE_FINISHED, finished_at=s.now)
        await save(s, trade, "finished")
        return trade

    return step
