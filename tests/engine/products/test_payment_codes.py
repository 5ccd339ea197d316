"""Payment codes (付款码): issued for one payer account, charged once at a till before they
expire; a refused charge leaves the code usable."""

from __future__ import annotations

import asyncio
import hashlib

from engine.products import payment_codes
from engine.products.fees import fee_minor
from engine.products.orders import OrderSource, OrderState, OrderView
from engine.products.payment_codes import Charge, PaymentCodeView
from tests.engine.products.merchant_support import FEE_RATE_BP, PAYER_FUNDS_MINOR, Shop, shop

__all__ = ["shop"]


async def _issue(shop: Shop, payer: int | None = None) -> PaymentCodeView:
    step = payment_codes.issue(payer_account_id=shop.payer if payer is None else payer)
    return await shop.ok(step, PaymentCodeView)


def _charge(shop: Shop, code: str, **changes: object):  # type: ignore[no-untyped-def]
    fields: dict[str, object] = {
        "code": code,
        "merchant_account_id": shop.merchant,
        "out_trade_no": "TILL_1",
        "subject": "groceries",
        "amount_minor": 5_000,
        "currency": "CNY",
    }
    fields.update(changes)
    return payment_codes.charge(Charge(**fields))  # type: ignore[arg-type]


async def test_a_code_is_eighteen_random_digits_stored_only_hashed(shop: Shop) -> None:
    issued = [await _issue(shop) for _ in range(3)]
    for code in issued:
        assert len(code.code) == 18 and code.code.isdigit() and code.code.startswith("28")
        assert code.expires_at == shop.clock.now + payment_codes.CODE_LIFETIME
    assert len({c.code for c in issued}) == 3
    stored = (await shop.snapshot())["payment_codes"]
    assert sorted(r["code_sha256"] for r in stored) == sorted(
        hashlib.sha256(c.code.encode()).digest() for c in issued
    )
    assert not any(c.code in repr(r) for r in stored for c in issued)


async def test_a_code_is_only_issued_for_a_known_account(shop: Shop) -> None:
    await shop.refused(
        payment_codes.issue(payer_account_id=12345), PaymentCodeView, "account_not_found"
    )


async def test_charging_a_code_creates_a_paid_order(shop: Shop) -> None:
    code = await _issue(shop)
    order = await shop.ok(_charge(shop, code.code), OrderView)
    assert order.state == OrderState.TRADE_SUCCESS
    assert order.source == OrderSource.PAYMENT_CODE and order.qr_code is None
    assert order.payer_account_id == shop.payer
    fee = fee_minor(5_000, FEE_RATE_BP)
    assert await shop.balance(shop.payer) == PAYER_FUNDS_MINOR - 5_000
    assert await shop.balance(shop.merchant) == 5_000 - fee
    assert [e["subject_id"] for e in await shop.events("order.paid")] == [order.id]


async def test_a_used_code_is_refused(shop: Shop) -> None:
    code = await _issue(shop)
    await shop.ok(_charge(shop, code.code), OrderView)
    await shop.refused(
        _charge(shop, code.code, out_trade_no="TILL_2"), OrderView, "payment_code_used"
    )


async def test_an_expired_code_is_refused(shop: Shop) -> None:
    code = await _issue(shop)
    shop.clock.advance(seconds=59)
    fresh = await _issue(shop)
    shop.clock.advance(seconds=1)
    await shop.refused(_charge(shop, code.code), OrderView, "payment_code_expired")
    await shop.ok(_charge(shop, fresh.code), OrderView)


async def test_an_unknown_code_is_refused(shop: Shop) -> None:
    await shop.refused(_charge(shop, "280000000000000000"), OrderView, "payment_code_invalid")


async def test_a_refused_charge_leaves_the_code_usable(shop: Shop) -> None:
    code = await _issue(shop)
    await shop.refused(
        _charge(shop, code.code, amount_minor=PAYER_FUNDS_MINOR + 1),
        OrderView,
        "insufficient_funds",
    )
    await shop.refused(_charge(shop, code.code, currency="USD"), OrderView, "currency_mismatch")
    order = await shop.ok(_charge(shop, code.code), OrderView)
    assert order.state == OrderState.TRADE_SUCCESS


async def test_a_code_pays_only_from_the_account_it_is_bound_to(shop: Shop) -> None:
    code = await _issue(shop, payer=shop.dollars)
    # The USD wallet's code cannot pay a CNY till, and never takes from the CNY wallet.
    await shop.refused(_charge(shop, code.code), OrderView, "currency_mismatch")
    assert await shop.balance(shop.payer) == PAYER_FUNDS_MINOR


async def test_concurrent_tills_charge_a_code_once(shop: Shop) -> None:
    code = await _issue(shop)
    outcomes = await asyncio.gather(
        *(
            shop.step(_charge(shop, code.code, out_trade_no=f"TILL_{n}"), OrderView)
            for n in range(4)
        )
    )
    assert [o.refusal is None for o in outcomes].count(True) == 1
    assert {o.refusal.code for o in outcomes if o.refusal} == {"payment_code_used"}
    assert await shop.balance(shop.payer) == PAYER_FUNDS_MINOR - 5_000


async def test_codes_are_reaped_a_day_after_they_expired(shop: Shop) -> None:
    used = await _issue(shop)
    await shop.ok(_charge(shop, used.code), OrderView)
    await _issue(shop)
    shop.clock.advance(seconds=61)  # both have been dead a second
    later = await _issue(shop)
    now = shop.clock.now + payment_codes.CODE_RETENTION
    assert await payment_codes.reap(shop.engine, now=now, limit=1) == 1
    assert await payment_codes.reap(shop.engine, now=now, limit=10) == 1
    assert await payment_codes.reap(shop.engine, now=now, limit=10) == 0
    rows = (await shop.snapshot())["payment_codes"]
    assert [r["code_sha256"] for r in rows] == [payment_codes.code_sha256(later.code)]
    assert (await shop.snapshot())["orders"]  # the paid order stays
