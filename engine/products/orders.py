"""QR-code merchant payments (扫码支付), in the manner of alipay.trade.precreate / pay /
query / close / refund.

A merchant precreates an order and shows its QR code; the payer's app scans it and pays
the order from a wallet account: the payer → merchant transfer and the merchant → fees
transfer go in one linked group, so the merchant is never paid without the fee being
taken. An unpaid order closes when the merchant closes it or when its timeout passes
(the timer job `orders.expire`). A paid order may be refunded, in full or in parts, each
keyed by the merchant's `out_request_no`, while the merchant's balance allows; the fee is
not returned. A fully refunded order is closed.

The QR code carries `QR_PAYLOAD_PREFIX` + a random 128-bit code, never the order id, so
an order cannot be found (and paid or probed) by guessing.
"""

from __future__ import annotations

import enum
import re
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, TypeAlias, TypeVar

import asyncpg
import msgspec

from engine.model import CreateTransfers, ResultCode, TransferSpec
from engine.products.fees import fee_spec
from engine.products.step import Refusal, Step, run_step
from engine.products.terms import express_s
from engine.products.timers import TimerJob

if TYPE_CHECKING:
    from engine.engine import Engine

T = TypeVar("T")
StepFn: TypeAlias = Callable[[Step], Awaitable[T]]

OUT_TRADE_NO_RE: Final = re.compile(r"[A-Za-z0-9_]{1,64}")  # use with fullmatch
QR_PAYLOAD_PREFIX: Final = "txengine://pay/"
CODE_BYTES: Final = 16  # 128 random bits
# What a scanned payload may be: the whole payload or the bare code, base64url of 16 bytes.
QR_CODE_PATTERN: Final = r"^(txengine://pay/)?[A-Za-z0-9_-]{22}$"
_QR_CODE_RE: Final = re.compile(QR_CODE_PATTERN)
TIMEOUT_MIN: Final = timedelta(minutes=1)
TIMEOUT_MAX: Final = timedelta(days=15)
TIMEOUT_DEFAULT: Final = "2h"


class OrderState(enum.StrEnum):
    # Created, shown as a QR code, waiting for a payer; closes at `expires_at`.
    WAIT_BUYER_PAY = "WAIT_BUYER_PAY"
    # Paid: the merchant has the money less the fee; refunds are possible.
    TRADE_SUCCESS = "TRADE_SUCCESS"
    # Over without (or with all of) the money: closed by the merchant or its timeout
    # while unpaid, or refunded in full. `close_reason` says which. Final.
    TRADE_CLOSED = "TRADE_CLOSED"


class CloseReason(enum.StrEnum):
    CLOSED = "closed"  # the merchant closed it unpaid
    EXPIRED = "expired"  # its timeout passed unpaid
    REFUNDED = "refunded"  # paid, then refunded in full


class OrderSource(enum.StrEnum):
    QR_CODE = "qr_code"  # precreated, paid by scanning its code
    PAYMENT_CODE = "payment_code"  # charged at a till from the payer's payment code


class OrderView(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    merchant_account_id: int
    out_trade_no: str
    subject: str
    amount_minor: int
    currency: str
    source: OrderSource
    qr_code: str | None  # the payload to show as a QR code; None for payment-code orders
    state: OrderState
    close_reason: CloseReason | None
    payer_account_id: int | None
    transfer_id: int | None
    fee_minor: int
    refunded_minor: int
    notify_url: str | None
    expires_at: datetime
    created_at: datetime
    paid_at: datetime | None
    closed_at: datetime | None


class RefundView(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    order_id: int
    out_request_no: str
    amount_minor: int
    transfer_id: int
    created_at: datetime
    order: OrderView  # the order after this refund


class NewOrder(msgspec.Struct, frozen=True, kw_only=True):
    merchant_account_id: int
    out_trade_no: str
    subject: str
    amount_minor: int
    currency: str
    timeout: timedelta
    notify_url: str | None = None


_COLUMNS: Final = """id, merchant_account_id, out_trade_no, subject, amount_minor, currency,
    source, code, state, close_reason, payer_account_id, transfer_id, fee_minor,
    refunded_minor, notify_url, expires_at, created_at, paid_at, closed_at"""
_INSERT: Final = """
INSERT INTO orders (id, scope, merchant_account_id, out_trade_no, subject, amount_minor,
    currency, source, code, state, notify_url, expires_at, created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
ON CONFLICT (scope, merchant_account_id, out_trade_no) DO NOTHING
RETURNING id
"""
_PAID: Final = """
UPDATE orders SET state = 'TRADE_SUCCESS', payer_account_id = $2, transfer_id = $3,
    fee_minor = $4, paid_at = $5
WHERE id = $1
"""
_DUE: Final = """
SELECT id, scope FROM orders WHERE state = 'WAIT_BUYER_PAY' AND expires_at <= $1
ORDER BY expires_at LIMIT $2
"""
_CLOSED: Final = """
UPDATE orders SET state = 'TRADE_CLOSED', close_reason = $2, closed_at = $3 WHERE id = $1
"""


def parse_timeout(text: str) -> timedelta | None:
    """Alipay's `timeout_express` ("90m", "2h", "15d") as a duration, or None if it is not
    one from 1 minute to 15 days."""
    seconds = express_s(text)
    if seconds is None:
        return None
    timeout = timedelta(seconds=seconds)
    return timeout if TIMEOUT_MIN <= timeout <= TIMEOUT_MAX else None


def code_of(qr_code: str) -> str:
    """The order code in a scanned payload (the whole payload, or the bare code)."""
    return qr_code.removeprefix(QR_PAYLOAD_PREFIX)


def order_view(row: asyncpg.Record) -> OrderView:
    code = row["code"]
    return OrderView(
        id=row["id"],
        merchant_account_id=row["merchant_account_id"],
        out_trade_no=row["out_trade_no"],
        subject=row["subject"],
        amount_minor=row["amount_minor"],
        currency=row["currency"].strip(),
        source=OrderSource(row["source"]),
        qr_code=None if code is None else QR_PAYLOAD_PREFIX + code,
        state=OrderState(row["state"]),
        close_reason=None if row["close_reason"] is None else CloseReason(row["close_reason"]),
        payer_account_id=row["payer_account_id"],
        transfer_id=row["transfer_id"],
        fee_minor=row["fee_minor"],
        refunded_minor=row["refunded_minor"],
        notify_url=row["notify_url"],
        expires_at=row["expires_at"],
        created_at=row["created_at"],
        paid_at=row["paid_at"],
        closed_at=row["closed_at"],
    )


def _id(value: int | None) -> str | None:
    return None if value is None else str(value)


def order_json(order: OrderView) -> dict[str, Any]:
    return {
        "object": "order",
        "id": str(order.id),
        "merchant_account_id": str(order.merchant_account_id),
        "out_trade_no": order.out_trade_no,
        "subject": order.subject,
        "amount_minor": order.amount_minor,
        "currency": order.currency,
        "source": order.source.value,
        "qr_code": order.qr_code,
        "state": order.state.value,
        "close_reason": None if order.close_reason is None else order.close_reason.value,
        "payer_account_id": _id(order.payer_account_id),
        "transfer_id": _id(order.transfer_id),
        "fee_minor": order.fee_minor,
        "refunded_minor": order.refunded_minor,
        "notify_url": order.notify_url,
        "expires_at": order.expires_at,
        "created_at": order.created_at,
        "paid_at": order.paid_at,
        "closed_at": order.closed_at,
    }


def refund_json(refund: RefundView) -> dict[str, Any]:
    return {
        "object": "order_refund",
        "id": str(refund.id),
        "order_id": str(refund.order_id),
        "out_request_no": refund.out_request_no,
        "amount_minor": refund.amount_minor,
        "transfer_id": str(refund.transfer_id),
        "created_at": refund.created_at,
        "order": order_json(refund.order),
    }


# -- reads and locks ------------------------------------------------------------------------


async def _fetch(step: Step, where: str, *args: object, lock: bool) -> OrderView:
    suffix = " FOR UPDATE" if lock else ""
    row = await step.conn.fetchrow(
        f"SELECT {_COLUMNS} FROM orders WHERE scope = $1 AND {where}{suffix}", step.scope, *args
    )
    if row is None:
        raise Refusal("order_not_found", "no such order")
    return order_view(row)


async def get_order(step: Step, order_id: int, *, lock: bool = False) -> OrderView:
    return await _fetch(step, "id = $2", order_id, lock=lock)


async def get_order_by_out_trade_no(
    step: Step, *, merchant_account_id: int, out_trade_no: str
) -> OrderView:
    return await _fetch(
        step,
        "merchant_account_id = $2 AND out_trade_no = $3",
        merchant_account_id,
        out_trade_no,
        lock=False,
    )


def _require_state(order: OrderView, *states: OrderState) -> None:
    if order.state not in states:
        raise Refusal(
            "order_state_conflict",
            f"the order is {order.state}, this needs {' or '.join(states)}",
            state=order.state.value,
        )


# -- steps ----------------------------------------------------------------------------------


async def insert_order(
    step: Step, new: NewOrder, *, source: OrderSource, code: str | None
) -> OrderView:
    """Insert an order waiting for its payer; refuse a merchant account that is not the
    partner's, or an out_trade_no the merchant used before."""
    merchant = await step.account(new.merchant_account_id)
    if merchant is None:
        raise Refusal(ResultCode.ACCOUNT_NOT_FOUND, f"no account {new.merchant_account_id}")
    if merchant.currency != new.currency:
        raise Refusal(
            ResultCode.CURRENCY_MISMATCH,
            f"the merchant account holds {merchant.currency}, the order is in {new.currency}",
        )
    order_id = step.next_id()
    inserted = await step.conn.fetchval(
        _INSERT,
        order_id,
        step.scope,
        new.merchant_account_id,
        new.out_trade_no,
        new.subject,
        new.amount_minor,
        new.currency,
        source.value,
        code,
        OrderState.WAIT_BUYER_PAY.value,
        new.notify_url,
        step.now + new.timeout,
        step.now,
    )
    if inserted is None:
        raise Refusal(
            "out_trade_no_taken",
            f"the merchant already has an order {new.out_trade_no!r}",
            out_trade_no=new.out_trade_no,
        )
    return await get_order(step, order_id, lock=True)


def precreate(new: NewOrder) -> StepFn[OrderView]:
    """The step that creates an order to be paid by its QR code."""

    async def run(step: Step) -> OrderView:
        return await insert_order(
            step, new, source=OrderSource.QR_CODE, code=secrets.token_urlsafe(CODE_BYTES)
        )

    return run


async def settle(step: Step, order: OrderView, *, payer_account_id: int) -> OrderView:
    """Pay a locked, unpaid order from the payer's account: one linked group of the payment
    and the fee. A ledger failure (insufficient funds ...) refuses the step."""
    _require_state(order, OrderState.WAIT_BUYER_PAY)
    if step.now >= order.expires_at:  # due, and the timer has not closed it yet
        raise Refusal(
            "order_expired",
            "the order's time to pay has passed",
            state=order.state.value,
            expires_at=order.expires_at.isoformat(),
        )
    payer = await step.account(payer_account_id)
    if payer is None:
        raise Refusal(ResultCode.ACCOUNT_NOT_FOUND, f"no account {payer_account_id}")
    if payer.currency != order.currency:
        raise Refusal(
            ResultCode.CURRENCY_MISMATCH,
            f"the payer's account holds {payer.currency}, the order is in {order.currency}",
        )
    if payer_account_id == order.merchant_account_id:
        raise Refusal(ResultCode.ACCOUNTS_MUST_DIFFER, "a merchant cannot pay its own order")
    payment = TransferSpec(
        debit_account_id=payer_account_id,
        credit_account_id=order.merchant_account_id,
        amount_minor=order.amount_minor,
        currency=order.currency,
        metadata={"order_id": str(order.id)},
    )
    fee = await fee_spec(
        step,
        merchant_account_id=order.merchant_account_id,
        amount_minor=order.amount_minor,
        currency=order.currency,
    )
    specs = (payment,) if fee is None else (payment, fee)
    # Both accounts were checked as the partner's above; the fee goes to a house account,
    # so the command itself carries no scope.
    result = await step.move_or_refuse(CreateTransfers(transfers=specs, linked=True))
    fee_minor = 0 if fee is None else fee.amount_minor
    await step.conn.execute(
        _PAID, order.id, payer_account_id, result.transfers[0].id, fee_minor, step.now
    )
    paid = await get_order(step, order.id)
    await step.notify(
        event_type="order.paid",
        subject_id=order.id,
        payload=order_json(paid),
        notify_url=paid.notify_url,
    )
    return paid


def pay(*, qr_code: str, payer_account_id: int) -> StepFn[OrderView]:
    """The step of the payer's app paying the order its scanned QR code names."""

    async def run(step: Step) -> OrderView:
        if not _QR_CODE_RE.fullmatch(qr_code):  # no code this engine issued looks like that
            raise Refusal("order_not_found", "no order has this code")
        order = await _fetch(step, "code = $2", code_of(qr_code), lock=True)
        return await settle(step, order, payer_account_id=payer_account_id)

    return run


async def _close(step: Step, order: OrderView, reason: CloseReason) -> OrderView:
    await step.conn.execute(_CLOSED, order.id, reason.value, step.now)
    closed = await get_order(step, order.id)
    await step.notify(
        event_type="order.closed",
        subject_id=order.id,
        payload=order_json(closed),
        notify_url=closed.notify_url,
    )
    return closed


def close(order_id: int) -> StepFn[OrderView]:
    """The step of the merchant closing an unpaid order."""

    async def run(step: Step) -> OrderView:
        order = await get_order(step, order_id, lock=True)
        _require_state(order, OrderState.WAIT_BUYER_PAY)
        return await _close(step, order, CloseReason.CLOSED)

    return run


def expire(order_id: int) -> StepFn[bool]:
    """The timer's step: close the order if it is still unpaid and due (re-checked under
    its lock, so a payment a moment earlier wins and the timer fires nothing)."""

    async def run(step: Step) -> bool:
        order = await get_order(step, order_id, lock=True)
        if order.state != OrderState.WAIT_BUYER_PAY or order.expires_at > step.now:
            return False
        await _close(step, order, CloseReason.EXPIRED)
        return True

    return run


async def expire_due(engine: Engine, *, now: datetime, limit: int) -> int:
    """The timer job: close up to `limit` unpaid orders whose timeout has passed, each in
    its own step; return how many closed."""
    async with engine.step_pool.acquire() as conn:
        ids = await conn.fetch(_DUE, now, limit)
    fired = 0
    for row in ids:
        outcome = await run_step(
            engine, expire(row["id"]), answer_type=bool, scope=row["scope"], idempotency=None
        )
        fired += outcome.value is True
    return fired


EXPIRE_JOB: Final = TimerJob(name="orders.expire", run_once=expire_due)


def read(order_id: int) -> StepFn[OrderView]:
    async def run(step: Step) -> OrderView:
        return await get_order(step, order_id)

    return run


def read_by_out_trade_no(*, merchant_account_id: int, out_trade_no: str) -> StepFn[OrderView]:
    async def run(step: Step) -> OrderView:
        return await get_order_by_out_trade_no(
            step, merchant_account_id=merchant_account_id, out_trade_no=out_trade_no
        )

    return run
