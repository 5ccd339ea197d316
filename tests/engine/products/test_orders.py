"""QR orders: one test per state transition and per illegal step (which changes nothing),
expiry on a hand-moved clock, a restart in the middle, refunds."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from engine.products import TIMER_JOBS, orders
from engine.products import order_refunds as refunds
from engine.products.fees import fee_minor
from engine.products.orders import CloseReason, NewOrder, OrderState, OrderView, RefundView
from tests.engine.products.merchant_support import (
    FEE_RATE_BP,
    PAYER_FUNDS_MINOR,
    Shop,
    reopen,
    shop,
)

__all__ = ["shop"]
AMOUNT = 12_345
FEE = fee_minor(AMOUNT, FEE_RATE_BP)  # 74


def _new(shop: Shop, **changes: object) -> NewOrder:
    fields: dict[str, object] = {
        "merchant_account_id": shop.merchant,
        "out_trade_no": "T_0001",
        "subject": "coffee",
        "amount_minor": AMOUNT,
        "currency": "CNY",
        "timeout": timedelta(hours=2),
        "notify_url": "https://merchant.example/notify",
    }
    fields.update(changes)
    return NewOrder(**fields)  # type: ignore[arg-type]


async def _precreate(shop: Shop, **changes: object) -> OrderView:
    return await shop.ok(orders.precreate(_new(shop, **changes)), OrderView)


def _pay(order: OrderView, payer: int):  # type: ignore[no-untyped-def]
    assert order.qr_code is not None
    return orders.pay(qr_code=order.qr_code, payer_account_id=payer)


async def _paid(shop: Shop) -> OrderView:
    order = await _precreate(shop)
    return await shop.ok(_pay(order, shop.payer), OrderView)


@pytest.mark.parametrize(
    ("text", "minutes"),
    [("1m", 1), ("90m", 90), ("2h", 120), ("15d", 15 * 24 * 60), ("0m", None), ("16d", None),
     ("1", None), ("m", None), ("1.5h", None), ("1s", None), ("²m", None), ("-1m", None)],
)  # fmt: skip
def test_timeout_express_is_one_minute_to_fifteen_days(text: str, minutes: int | None) -> None:
    parsed = orders.parse_timeout(text)
    assert parsed == (None if minutes is None else timedelta(minutes=minutes))


async def test_precreate_waits_for_the_buyer_behind_an_unguessable_code(shop: Shop) -> None:
    order = await _precreate(shop)
    other = await _precreate(shop, out_trade_no="T_0002")
    assert order.state == OrderState.WAIT_BUYER_PAY
    assert order.expires_at == shop.clock.now + timedelta(hours=2)
    assert order.qr_code is not None and other.qr_code is not None
    code = order.qr_code.removeprefix(orders.QR_PAYLOAD_PREFIX)
    assert len(code) == 22 and str(order.id) not in code  # 128 bits, base64url
    assert order.qr_code != other.qr_code
    assert await shop.balance(shop.merchant) == 0
    assert await shop.events() == []


async def test_an_out_trade_no_is_used_once_per_merchant(shop: Shop) -> None:
    await _precreate(shop)
    extensions = await shop.refused(orders.precreate(_new(shop)), OrderView, "out_trade_no_taken")
    assert extensions == {"out_trade_no": "T_0001"}


async def test_precreate_for_an_unknown_or_foreign_currency_account_is_refused(
    shop: Shop,
) -> None:
    await shop.refused(
        orders.precreate(_new(shop, merchant_account_id=12345)), OrderView, "account_not_found"
    )
    await shop.refused(orders.precreate(_new(shop, currency="USD")), OrderView, "currency_mismatch")


async def test_paying_moves_the_money_and_the_fee_in_one_group(shop: Shop) -> None:
    order = await _precreate(shop)
    paid = await shop.ok(_pay(order, shop.payer), OrderView)
    assert paid.state == OrderState.TRADE_SUCCESS
    assert (paid.payer_account_id, paid.fee_minor, paid.paid_at) == (
        shop.payer,
        FEE,
        shop.clock.now,
    )
    assert await shop.balance(shop.payer) == PAYER_FUNDS_MINOR - AMOUNT
    assert await shop.balance(shop.merchant) == AMOUNT - FEE
    assert await shop.fees() == FEE
    assert paid.transfer_id is not None
    transfer = await shop.engine.transfer(paid.transfer_id, scope=None)
    assert transfer is not None and transfer.group_id is not None
    (event,) = await shop.events("order.paid")
    assert event["subject_id"] == order.id
    assert '"state": "TRADE_SUCCESS"' in event["payload"]


async def test_paying_a_bare_code_works_too(shop: Shop) -> None:
    order = await _precreate(shop)
    assert order.qr_code is not None
    bare = order.qr_code.removeprefix(orders.QR_PAYLOAD_PREFIX)
    paid = await shop.ok(orders.pay(qr_code=bare, payer_account_id=shop.payer), OrderView)
    assert paid.state == OrderState.TRADE_SUCCESS


async def test_paying_twice_is_refused(shop: Shop) -> None:
    paid = await _paid(shop)
    extensions = await shop.refused(_pay(paid, shop.payer), OrderView, "order_state_conflict")
    assert extensions == {"state": "TRADE_SUCCESS"}


async def test_paying_an_unknown_code_is_refused(shop: Shop) -> None:
    step = orders.pay(qr_code="txengine://pay/nosuchcode", payer_account_id=shop.payer)
    await shop.refused(step, OrderView, "order_not_found")


async def test_paying_in_another_currency_is_refused(shop: Shop) -> None:
    order = await _precreate(shop)
    await shop.refused(_pay(order, shop.dollars), OrderView, "currency_mismatch")


async def test_paying_without_the_money_is_refused(shop: Shop) -> None:
    order = await _precreate(shop, amount_minor=PAYER_FUNDS_MINOR + 1)
    await shop.refused(_pay(order, shop.payer), OrderView, "insufficient_funds")


async def test_a_merchant_cannot_pay_its_own_order(shop: Shop) -> None:
    order = await _precreate(shop)
    await shop.refused(_pay(order, shop.merchant), OrderView, "accounts_must_differ")


async def test_closing_an_unpaid_order(shop: Shop) -> None:
    order = await _precreate(shop)
    closed = await shop.ok(orders.close(order.id), OrderView)
    assert (closed.state, closed.close_reason) == (OrderState.TRADE_CLOSED, CloseReason.CLOSED)
    (event,) = await shop.events("order.closed")
    assert event["subject_id"] == order.id


async def test_closing_twice_or_after_paying_is_refused(shop: Shop) -> None:
    order = await _precreate(shop)
    await shop.ok(orders.close(order.id), OrderView)
    await shop.refused(orders.close(order.id), OrderView, "order_state_conflict")
    other = await _precreate(shop, out_trade_no="T_0002")
    await shop.ok(_pay(other, shop.payer), OrderView)
    await shop.refused(orders.close(other.id), OrderView, "order_state_conflict")


async def test_paying_a_closed_order_is_refused(shop: Shop) -> None:
    order = await _precreate(shop)
    await shop.ok(orders.close(order.id), OrderView)
    extensions = await shop.refused(_pay(order, shop.payer), OrderView, "order_state_conflict")
    assert extensions == {"state": "TRADE_CLOSED"}


async def test_the_timer_closes_an_unpaid_order_at_its_timeout(shop: Shop) -> None:
    (job,) = [j for j in TIMER_JOBS if j.name == "orders.expire"]
    order = await _precreate(shop, timeout=timedelta(minutes=1))
    paid_in_time = await _precreate(shop, out_trade_no="T_0002", timeout=timedelta(minutes=1))
    await shop.ok(_pay(paid_in_time, shop.payer), OrderView)
    shop.clock.advance(seconds=59)
    assert await job.run_once(shop.engine, now=shop.clock.now, limit=10) == 0
    shop.clock.advance(seconds=1)
    # Due but not yet swept: the order cannot be paid any more.
    extensions = await shop.refused(_pay(order, shop.payer), OrderView, "order_expired")
    assert extensions == {"state": "WAIT_BUYER_PAY", "expires_at": shop.clock.now.isoformat()}
    assert await job.run_once(shop.engine, now=shop.clock.now, limit=10) == 1
    assert await job.run_once(shop.engine, now=shop.clock.now, limit=10) == 0
    expired = await shop.ok(orders.read(order.id), OrderView)
    assert (expired.state, expired.close_reason) == (OrderState.TRADE_CLOSED, CloseReason.EXPIRED)
    assert expired.closed_at == shop.clock.now
    assert (await shop.ok(orders.read(paid_in_time.id), OrderView)).state == "TRADE_SUCCESS"
    assert [e["subject_id"] for e in await shop.events("order.closed")] == [order.id]
    await shop.refused(_pay(order, shop.payer), OrderView, "order_state_conflict")


async def test_the_timer_fires_a_bounded_batch(shop: Shop) -> None:
    job = orders.EXPIRE_JOB
    for n in range(5):
        await _precreate(shop, out_trade_no=f"T_{n}", timeout=timedelta(minutes=1))
    shop.clock.advance(minutes=2)
    assert await job.run_once(shop.engine, now=shop.clock.now, limit=3) == 3
    assert await job.run_once(shop.engine, now=shop.clock.now, limit=3) == 2


async def test_a_restart_loses_no_order_and_fires_the_timer_once(shop: Shop) -> None:
    job = orders.EXPIRE_JOB
    to_pay = await _precreate(shop)
    to_expire = await _precreate(shop, out_trade_no="T_0002", timeout=timedelta(minutes=5))
    await reopen(shop)
    paid = await shop.ok(_pay(to_pay, shop.payer), OrderView)
    assert paid.state == OrderState.TRADE_SUCCESS
    shop.clock.advance(minutes=5)
    assert await job.run_once(shop.engine, now=shop.clock.now, limit=10) == 1
    await reopen(shop)
    assert await job.run_once(shop.engine, now=shop.clock.now, limit=10) == 0
    assert (await shop.ok(orders.read(to_expire.id), OrderView)).state == "TRADE_CLOSED"
    assert len(await shop.events("order.closed")) == 1


async def test_query_by_out_trade_no_and_someone_elses_order_is_not_found(shop: Shop) -> None:
    order = await _precreate(shop)
    found = await shop.ok(
        orders.read_by_out_trade_no(merchant_account_id=shop.merchant, out_trade_no="T_0001"),
        OrderView,
    )
    assert found == order
    await shop.refused(
        orders.read_by_out_trade_no(merchant_account_id=shop.merchant, out_trade_no="T_9"),
        OrderView,
        "order_not_found",
    )


# -- refunds ----------------------------------------------------------------------------------


def _refund(order: OrderView, no: str, amount: int):  # type: ignore[no-untyped-def]
    return refunds.refund(order_id=order.id, out_request_no=no, amount_minor=amount)


async def test_partial_then_full_refund_closes_the_order(shop: Shop) -> None:
    paid = await _paid(shop)
    await shop.fund(shop.merchant, FEE)  # the merchant's own money pays back the fee part
    first = await shop.ok(_refund(paid, "R1", 2_345), RefundView)
    assert first.order.state == OrderState.TRADE_SUCCESS
    assert first.order.refunded_minor == 2_345
    assert await shop.balance(shop.payer) == PAYER_FUNDS_MINOR - AMOUNT + 2_345
    rest = await shop.ok(_refund(paid, "R2", AMOUNT - 2_345), RefundView)
    assert (rest.order.state, rest.order.close_reason) == ("TRADE_CLOSED", CloseReason.REFUNDED)
    assert await shop.balance(shop.payer) == PAYER_FUNDS_MINOR
    assert await shop.balance(shop.merchant) == 0  # the house keeps its fee
    assert await shop.fees() == FEE
    assert len(await shop.events("order.refunded")) == 2


async def test_a_refund_request_number_answers_its_first_refund(shop: Shop) -> None:
    paid = await _paid(shop)
    first = await shop.ok(_refund(paid, "R1", 100), RefundView)
    again = await shop.ok(_refund(paid, "R1", 100), RefundView)
    assert (again.id, again.transfer_id) == (first.id, first.transfer_id)
    assert await shop.balance(shop.payer) == PAYER_FUNDS_MINOR - AMOUNT + 100
    await shop.refused(_refund(paid, "R1", 101), RefundView, "out_request_no_reused")


async def test_refunding_more_than_was_paid_is_refused(shop: Shop) -> None:
    paid = await _paid(shop)
    await shop.fund(shop.merchant, FEE)
    await shop.ok(_refund(paid, "R1", AMOUNT - 10), RefundView)
    extensions = await shop.refused(_refund(paid, "R2", 11), RefundView, "refund_exceeds_paid")
    assert extensions == {"refundable_minor": 10}


async def test_refunding_an_unpaid_order_is_refused(shop: Shop) -> None:
    order = await _precreate(shop)
    await shop.refused(_refund(order, "R1", 1), RefundView, "order_state_conflict")


async def test_a_refund_needs_the_merchants_balance(shop: Shop) -> None:
    paid = await _paid(shop)
    # The merchant has AMOUNT - FEE: a full refund would overdraw it.
    await shop.refused(_refund(paid, "R1", AMOUNT), RefundView, "insufficient_funds")


async def test_concurrent_payers_pay_an_order_once(shop: Shop) -> None:
    order = await _precreate(shop)
    outcomes = await asyncio.gather(
        *(shop.step(_pay(order, shop.payer), OrderView) for _ in range(5))
    )
    assert [o.refusal is None for o in outcomes].count(True) == 1
    assert {o.refusal.code for o in outcomes if o.refusal} == {"order_state_conflict"}
    assert await shop.balance(shop.payer) == PAYER_FUNDS_MINOR - AMOUNT


async def test_the_timer_and_a_payment_racing_at_the_deadline_do_not_both_win(shop: Shop) -> None:
    job = orders.EXPIRE_JOB
    order = await _precreate(shop, timeout=timedelta(minutes=1))
    shop.clock.advance(minutes=1)
    paid, fired = await asyncio.gather(
        shop.step(_pay(order, shop.payer), OrderView),
        job.run_once(shop.engine, now=shop.clock.now, limit=10),
    )
    assert paid.refusal is not None and fired == 1  # at the deadline the order is over
    assert await shop.balance(shop.payer) == PAYER_FUNDS_MINOR
