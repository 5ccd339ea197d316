"""Refunds of escrow trades, full or partial, each keyed by the seller's `out_request_no`.

Before settlement (the buyer has paid, not yet confirmed) the money is still the buyer's,
held for the seller: a refund releases part or all of the hold. The ledger posts or voids
a hold only once, so a partial release voids the hold and holds the rest anew, in the
same step transaction; the trade row then names the new hold, and `held_minor` is always
the open hold's amount.

After settlement the seller has the money: a refund moves it back from the seller to the
buyer, if the seller's available balance allows (else `insufficient_funds`, and nothing
changes). The fee is given back in proportion to what is refunded of the settled amount,
counted on the running total and rounded half up (the rule of engine.products.fees), so
partial refunds that add up to the whole give back exactly the whole fee. The house's fee
transfer back comes first in the linked group, so the seller needs only the net.

A refund's `out_request_no` is unique per trade: the same number with the same amount
answers the refund made before (Alipay's rule); with another amount it is refused. The
sum of refunds never exceeds what was paid; when it reaches it, the trade closes.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

import asyncpg
import msgspec

from engine.model import CreateTransfers, ResultCode, TransferSpec, VoidPending
from engine.products.fees import FEES_HOUSE_ACCOUNT
from engine.products.step import Refusal, Step
from engine.products.terms import OUT_NO_PATTERN
from engine.products.trades import (
    REFUNDABLE,
    CloseReason,
    TradeState,
    TradeView,
    announce,
    hold_spec,
    lock_trade,
    move_all,
    require_state,
    save,
    trade_json,
)

if TYPE_CHECKING:
    from engine.engine import Engine

REFUNDS_PER_TRADE_MAX: Final = 50  # like Alipay's limit on refunds of one trade
REASON_LENGTH_MAX: Final = 256


class RefundRequest(msgspec.Struct, frozen=True, kw_only=True):
    out_request_no: str
    amount_minor: int
    reason: str = ""


def refund_request_error(request: RefundRequest) -> tuple[str, str] | None:
    if not re.fullmatch(OUT_NO_PATTERN, request.out_request_no):
        return "out_request_no", "1 to 64 letters, digits or underscores"
    if request.amount_minor <= 0:
        return "amount_minor", "a refund moves at least one minor unit"
    if len(request.reason) > REASON_LENGTH_MAX or "\x00" in request.reason:
        return "reason", f"at most {REASON_LENGTH_MAX} characters, no NUL"
    return None


class RefundView(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    trade_id: int
    out_request_no: str
    amount_minor: int
    fee_refunded_minor: int
    after_settlement: bool
    transfer_id: int
    reason: str
    created_at: datetime


class RefundAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """A refund step's answer: the refund and the trade after it."""

    refund: RefundView
    trade: TradeView


_FIELDS: Final = tuple(RefundView.__struct_fields__)
_COLUMNS: Final = ", ".join(_FIELDS)
_INSERT: Final = (
    f"INSERT INTO trade_refunds ({_COLUMNS}) "
    f"VALUES ({', '.join(f'${i + 1}' for i in range(len(_FIELDS)))})"
)
_BY_REQUEST: Final = (
    f"SELECT {_COLUMNS} FROM trade_refunds WHERE trade_id = $1 AND out_request_no = $2"
)
_COUNT: Final = "SELECT count(*) FROM trade_refunds WHERE trade_id = $1"
_LIST: Final = f"""
SELECT {_COLUMNS} FROM trade_refunds r
WHERE r.trade_id = $1 AND EXISTS (SELECT FROM trades t WHERE t.id = $1 AND t.scope = $2)
ORDER BY r.id LIMIT {REFUNDS_PER_TRADE_MAX}
"""


def _view(row: asyncpg.Record) -> RefundView:
    return RefundView(**dict(row))


def refund_json(refund: RefundView, *, trade: TradeView | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"object": "trade_refund"}
    for name in _FIELDS:
        value = getattr(refund, name)
        body[name] = str(value) if name in ("id", "trade_id", "transfer_id") else value
    if trade is not None:
        body["trade"] = trade_json(trade)
    return body


async def list_refunds(engine: Engine, trade_id: int, *, scope: str) -> list[RefundView]:
    """The trade's refunds, oldest first (at most REFUNDS_PER_TRADE_MAX exist)."""
    async with engine.pool.acquire() as conn:
        rows = await conn.fetch(_LIST, trade_id, scope)
    return [_view(row) for row in rows]


def refund(trade_id: int, request: RefundRequest) -> Callable[[Step], Awaitable[RefundAnswer]]:
    assert refund_request_error(request) is None, refund_request_error(request)

    async def step(s: Step) -> RefundAnswer:
        trade = await lock_trade(s, trade_id)
        found = await s.conn.fetchrow(_BY_REQUEST, trade.id, request.out_request_no)
        if found is not None:
            return _same_request(_view(found), request, trade)
        await _check_refundable(s, trade, request.amount_minor)
        after_settlement = trade.state is TradeState.TRADE_SUCCESS
        if after_settlement:
            transfer_id, fee_back, trade = await _pay_back(s, trade, request.amount_minor)
        else:
            transfer_id, trade = await _release(s, trade, request.amount_minor)
            fee_back = 0
        made = RefundView(
            id=s.next_id(),
            trade_id=trade.id,
            out_request_no=request.out_request_no,
            amount_minor=request.amount_minor,
            fee_refunded_minor=fee_back,
            after_settlement=after_settlement,
            transfer_id=transfer_id,
            reason=request.reason,
            created_at=s.now,
        )
        await s.conn.execute(_INSERT, *(getattr(made, n) for n in _FIELDS))
        trade = msgspec.structs.replace(
            trade,
            refunded_minor=trade.refunded_minor + request.amount_minor,
            fee_refunded_minor=trade.fee_refunded_minor + fee_back,
        )
        closed = trade.refunded_minor == trade.amount_minor
        if closed:
            trade = msgspec.structs.replace(
                trade,
                state=TradeState.TRADE_CLOSED,
                close_reason=CloseReason.FULLY_REFUNDED,
                closed_at=s.now,
            )
        await save(s, trade, "refunded", payload=refund_json(made, trade=trade))
        if closed:
            await announce(s, trade, "closed")
        return RefundAnswer(refund=made, trade=trade)

    return step


def _same_request(found: RefundView, request: RefundRequest, trade: TradeView) -> RefundAnswer:
    if found.amount_minor != request.amount_minor:
        raise Refusal(
            "out_request_no_reused",
            f"refund {request.out_request_no!r} of this trade was for {found.amount_minor}",
            refund_id=str(found.id),
        )
    return RefundAnswer(refund=found, trade=trade)


async def _check_refundable(s: Step, trade: TradeView, amount_minor: int) -> None:
    require_state(trade, *sorted(REFUNDABLE), action="refund")
    if trade.state is TradeState.TRADE_SUCCESS:
        assert trade.finish_at is not None
        if s.now >= trade.finish_at:
            raise Refusal(
                "trade_refund_window_closed",
                f"the refund window closed at {trade.finish_at.isoformat()}",
                state=trade.state.value,
                trade_id=str(trade.id),
            )
    if amount_minor > trade.refundable_minor:
        raise Refusal(
            "refund_exceeds_paid",
            f"{amount_minor} is more than the {trade.refundable_minor} left to refund",
            refundable_minor=trade.refundable_minor,
            trade_id=str(trade.id),
        )
    if await s.conn.fetchval(_COUNT, trade.id) >= REFUNDS_PER_TRADE_MAX:
        raise Refusal(
            "refund_limit_reached", f"a trade takes at most {REFUNDS_PER_TRADE_MAX} refunds"
        )


async def _release(s: Step, trade: TradeView, amount_minor: int) -> tuple[int, TradeView]:
    """Before settlement: give `amount_minor` of the hold back to the buyer."""
    assert trade.hold_transfer_id is not None and trade.held_minor >= amount_minor, trade
    rest = trade.held_minor - amount_minor
    void = VoidPending(transfer_id=trade.hold_transfer_id, scope=None)
    if rest == 0:
        await move_all(s, void)
        return trade.hold_transfer_id, msgspec.structs.replace(trade, held_minor=0)
    _, (new_hold,) = await move_all(
        s, void, CreateTransfers(transfers=(hold_spec(trade, rest),), scope=None)
    )
    return trade.hold_transfer_id, msgspec.structs.replace(
        trade, hold_transfer_id=new_hold.id, held_minor=rest
    )


def fee_back_minor(trade: TradeView, amount_minor: int) -> int:
    """The fee given back for refunding `amount_minor` more of a settled trade."""
    before_settlement = trade.amount_minor - trade.settled_minor
    refunded_after = trade.refunded_minor - before_settlement
    return _fee_share(trade, refunded_after + amount_minor) - _fee_share(trade, refunded_after)


def _fee_share(trade: TradeView, refunded_minor: int) -> int:
    """fee × refunded / settled, rounded half up; the whole fee at the whole amount."""
    assert 0 <= refunded_minor <= trade.settled_minor, (trade, refunded_minor)
    numerator = 2 * trade.fee_minor * refunded_minor + trade.settled_minor
    return numerator // (2 * trade.settled_minor)


async def _pay_back(s: Step, trade: TradeView, amount_minor: int) -> tuple[int, int, TradeView]:
    """After settlement: the seller pays `amount_minor` back, the house its fee share."""
    fee_back = fee_back_minor(trade, amount_minor)
    metadata = {"trade_id": str(trade.id)}
    transfers = []
    if fee_back:
        fees = await s.house_account(FEES_HOUSE_ACCOUNT, trade.currency)
        transfers.append(
            TransferSpec(
                debit_account_id=fees,
                credit_account_id=trade.seller_account_id,
                amount_minor=fee_back,
                currency=trade.currency,
                metadata=metadata,
            )
        )
    transfers.append(
        TransferSpec(
            debit_account_id=trade.seller_account_id,
            credit_account_id=trade.buyer_account_id,
            amount_minor=amount_minor,
            currency=trade.currency,
            metadata=metadata,
        )
    )
    # The operator's scope: the fee account is the house's. The trade row (ours, locked)
    # is what entitles this step to the seller's and the buyer's accounts.
    (result,) = await s.move(CreateTransfers(transfers=tuple(transfers), linked=True, scope=None))
    if result.code is ResultCode.INSUFFICIENT_FUNDS:
        raise Refusal(
            ResultCode.INSUFFICIENT_FUNDS,
            f"the seller's account has too little money to refund {amount_minor}: {result.detail}",
            trade_id=str(trade.id),
        )
    if not result.ok:
        raise Refusal(result.code, result.detail)
    return result.transfers[-1].id, fee_back, trade
