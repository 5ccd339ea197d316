"""Refunds of paid QR and payment-code orders, in the manner of alipay.trade.refund.

Each refund is keyed by the merchant's `out_request_no`: asking again with the same one
and the same amount answers the refund made the first time (whatever the
Idempotency-Key), with another amount it is refused. The money goes back from the
merchant to the payer while the merchant's balance allows (else `insufficient_funds`);
the house keeps the fee. An order refunded in full is closed (TRADE_CLOSED, "refunded").
"""

from __future__ import annotations

from typing import Final

import asyncpg

from engine.model import CreateTransfers, TransferSpec
from engine.products.orders import (
    CloseReason,
    OrderState,
    OrderView,
    RefundView,
    StepFn,
    get_order,
    refund_json,
)
from engine.products.step import Refusal, Step

_FIND: Final = """
SELECT id, order_id, out_request_no, amount_minor, transfer_id, created_at
FROM order_refunds WHERE order_id = $1 AND out_request_no = $2
"""
_INSERT: Final = """
INSERT INTO order_refunds (order_id, out_request_no, id, amount_minor, transfer_id, created_at)
VALUES ($1, $2, $3, $4, $5, $6)
"""
_REFUNDED: Final = """
UPDATE orders SET refunded_minor = refunded_minor + $2,
    state = CASE WHEN refunded_minor + $2 = amount_minor THEN 'TRADE_CLOSED' ELSE state END,
    close_reason = CASE WHEN refunded_minor + $2 = amount_minor THEN $3 ELSE close_reason END,
    closed_at = CASE WHEN refunded_minor + $2 = amount_minor THEN $4 ELSE closed_at END
WHERE id = $1
"""


def _view(row: asyncpg.Record, order: OrderView) -> RefundView:
    return RefundView(
        id=row["id"],
        order_id=row["order_id"],
        out_request_no=row["out_request_no"],
        amount_minor=row["amount_minor"],
        transfer_id=row["transfer_id"],
        created_at=row["created_at"],
        order=order,
    )


def _same_or_refuse(row: asyncpg.Record, order: OrderView, amount: int) -> RefundView:
    """The refund already made under its out_request_no, if it asked for the same amount."""
    if row["amount_minor"] != amount:
        raise Refusal(
            "out_request_no_reused",
            f"refund {row['out_request_no']!r} was for {row['amount_minor']}, not {amount}",
            out_request_no=row["out_request_no"],
        )
    return _view(row, order)


def refund(*, order_id: int, out_request_no: str, amount_minor: int) -> StepFn[RefundView]:
    """The step of the merchant refunding part or all of a paid order."""

    async def run(step: Step) -> RefundView:
        order = await get_order(step, order_id, lock=True)
        earlier = await step.conn.fetchrow(_FIND, order.id, out_request_no)
        if earlier is not None:
            return _same_or_refuse(earlier, order, amount_minor)
        if order.state != OrderState.TRADE_SUCCESS:
            raise Refusal(
                "order_state_conflict",
                f"the order is {order.state}, a refund needs TRADE_SUCCESS",
                state=order.state.value,
            )
        refundable = order.amount_minor - order.refunded_minor
        if amount_minor > refundable:
            raise Refusal(
                "refund_exceeds_paid",
                f"{amount_minor} is more than the {refundable} left to refund",
                refundable_minor=refundable,
            )
        assert order.payer_account_id is not None
        back = TransferSpec(
            debit_account_id=order.merchant_account_id,
            credit_account_id=order.payer_account_id,
            amount_minor=amount_minor,
            currency=order.currency,
            metadata={"order_id": str(order.id), "out_request_no": out_request_no},
        )
        moved = await step.move_or_refuse(CreateTransfers(transfers=(back,), scope=step.scope))
        refund_id = step.next_id()
        transfer_id = moved.transfers[0].id
        await step.conn.execute(
            _INSERT, order.id, out_request_no, refund_id, amount_minor, transfer_id, step.now
        )
        await step.conn.execute(
            _REFUNDED, order.id, amount_minor, CloseReason.REFUNDED.value, step.now
        )
        after = await get_order(step, order.id)
        row = await step.conn.fetchrow(_FIND, order.id, out_request_no)
        made = _view(row, after)
        await step.notify(
            event_type="order.refunded",
            subject_id=order.id,
            payload=refund_json(made),
            notify_url=after.notify_url,
        )
        return made

    return run
