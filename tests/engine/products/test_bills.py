"""Bill payments: reference formats (Luhn included) checked before any money moves,
receipts with masked references, the biller's fee."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine import AccountKind, CreateAccount
from engine.products import bills
from engine.products.bills import BillerType, BillerView, BillPayment, NewBiller, ReceiptView
from engine.products.fees import fee_minor
from tests.engine.products.merchant_support import (
    FEE_RATE_BP,
    PAYER_FUNDS_MINOR,
    SCOPE,
    Shop,
    shop,
)

__all__ = ["shop"]
VISA_TEST_CARD = "4111111111111111"


@pytest.mark.parametrize(
    ("number", "valid"),
    [(VISA_TEST_CARD, True), ("4111111111111112", False), ("79927398713", True),
     ("79927398710", False), ("0", True), ("18", True), ("", False), ("4111 1111", False),
     ("４１１１", False)],
)  # fmt: skip
def test_luhn(number: str, valid: bool) -> None:
    assert bills.luhn_valid(number) is valid


@given(st.text(alphabet="0123456789", min_size=1, max_size=19))
def test_one_check_digit_of_ten_is_luhn_valid(payload: str) -> None:
    valid = [d for d in "0123456789" if bills.luhn_valid(payload + d)]
    assert len(valid) == 1


def _biller(biller_type: BillerType, pattern: str | None = None) -> BillerView:
    default_pattern, luhn = bills.DEFAULT_FORMATS[biller_type]
    return BillerView(
        id=1, account_id=2, name="b", biller_type=biller_type,
        reference_pattern=pattern or default_pattern, luhn=luhn, created_at=None,  # type: ignore[arg-type]
    )  # fmt: skip


@pytest.mark.parametrize(
    ("biller_type", "reference", "valid"),
    [
        (BillerType.MOBILE_TOPUP, "13812345678", True),
        (BillerType.MOBILE_TOPUP, "1381234567", False),  # 10 digits
        (BillerType.MOBILE_TOPUP, "23812345678", False),  # not starting with 1
        (BillerType.MOBILE_TOPUP, "12812345678", False),  # no such network
        (BillerType.MOBILE_TOPUP, "13812345678\n", False),
        (BillerType.CREDIT_CARD, VISA_TEST_CARD, True),
        (BillerType.CREDIT_CARD, "4111111111111112", False),  # check digit
        (BillerType.CREDIT_CARD, "41111111111", False),  # too short
        (BillerType.UTILITY, "ACC123456", True),
        (BillerType.UTILITY, "AC-123", False),
        (BillerType.UTILITY, "x" * 65, False),
    ],
)
def test_reference_formats(biller_type: BillerType, reference: str, valid: bool) -> None:
    assert (bills.reference_error(_biller(biller_type), reference) is None) is valid


def test_a_custom_pattern_must_match_the_whole_reference() -> None:
    biller = _biller(BillerType.UTILITY, r"SH[0-9]{8}")
    assert bills.reference_error(biller, "SH12345678") is None
    assert bills.reference_error(biller, "SH123456789") is not None
    assert bills.reference_error(biller, "xSH12345678") is not None


def test_pattern_errors() -> None:
    assert bills.pattern_error("[0-9]{4}") is None
    assert bills.pattern_error("[0-9") is not None
    assert bills.pattern_error("") is not None


def test_masks() -> None:
    assert bills.mask("13812345678", BillerType.MOBILE_TOPUP) == "138****5678"
    assert bills.mask(VISA_TEST_CARD, BillerType.CREDIT_CARD) == "************1111"
    assert bills.mask("ABC", BillerType.UTILITY) == "**C"


async def _register(shop: Shop, biller_type: BillerType, **changes: object) -> BillerView:
    fields: dict[str, object] = {
        "account_id": shop.merchant, "name": "City Power", "biller_type": biller_type,
    }  # fmt: skip
    fields.update(changes)
    return await shop.ok(bills.register(NewBiller(**fields)), BillerView)  # type: ignore[arg-type]


def _pay(shop: Shop, biller: BillerView, reference: str, **changes: object):  # type: ignore[no-untyped-def]
    fields: dict[str, object] = {
        "biller_id": biller.id, "reference": reference, "payer_account_id": shop.payer,
        "amount_minor": 10_000, "currency": "CNY",
    }  # fmt: skip
    fields.update(changes)
    return bills.pay(BillPayment(**fields))  # type: ignore[arg-type]


async def test_paying_a_bill_answers_a_receipt(shop: Shop) -> None:
    biller = await _register(shop, BillerType.CREDIT_CARD)
    assert (biller.reference_pattern, biller.luhn) == bills.DEFAULT_FORMATS[BillerType.CREDIT_CARD]
    receipt = await shop.ok(_pay(shop, biller, VISA_TEST_CARD), ReceiptView)
    fee = fee_minor(10_000, FEE_RATE_BP)
    assert receipt.reference_masked == "************1111"
    assert (receipt.amount_minor, receipt.fee_minor, receipt.paid_at) == (
        10_000,
        fee,
        shop.clock.now,
    )
    assert receipt.receipt_no.startswith("B") and str(receipt.id) in receipt.receipt_no
    assert await shop.balance(shop.payer) == PAYER_FUNDS_MINOR - 10_000
    assert await shop.balance(shop.merchant) == 10_000 - fee
    assert await shop.fees() == fee
    (event,) = await shop.events("bill.paid")
    assert event["subject_id"] == receipt.id and VISA_TEST_CARD not in event["payload"]


async def test_a_bad_reference_moves_no_money(shop: Shop) -> None:
    biller = await _register(shop, BillerType.MOBILE_TOPUP)
    extensions = await shop.refused(
        _pay(shop, biller, "1381234567"), ReceiptView, "bill_reference_invalid"
    )
    assert extensions == {"biller_type": "mobile_topup"}
    card = await _register(shop, BillerType.CREDIT_CARD, account_id=await _merchant(shop))
    await shop.refused(_pay(shop, card, "4111111111111112"), ReceiptView, "bill_reference_invalid")


async def test_illegal_bill_payments_are_refused(shop: Shop) -> None:
    biller = await _register(shop, BillerType.UTILITY)
    ref = "ACC123456"
    await shop.refused(_pay(shop, biller, ref, biller_id=12345), ReceiptView, "biller_not_found")
    await shop.refused(
        _pay(shop, biller, ref, payer_account_id=12345), ReceiptView, "account_not_found"
    )
    await shop.refused(
        _pay(shop, biller, ref, amount_minor=PAYER_FUNDS_MINOR + 1), ReceiptView,
        "insufficient_funds",
    )  # fmt: skip
    await shop.refused(
        _pay(shop, biller, ref, payer_account_id=shop.dollars, currency="USD"), ReceiptView,
        "currency_mismatch",
    )  # fmt: skip
    await shop.refused(
        _pay(shop, biller, ref, payer_account_id=shop.merchant), ReceiptView,
        "accounts_must_differ",
    )  # fmt: skip


async def _merchant(shop: Shop) -> int:
    opened = await shop.engine.submit(
        CreateAccount(currency="CNY", kind=AccountKind.MERCHANT, scope=SCOPE)
    )
    assert opened.account is not None
    return opened.account.id


async def test_registering_billers(shop: Shop) -> None:
    await _register(shop, BillerType.UTILITY, reference_pattern=r"SH[0-9]{8}", luhn=False)

    def register(account_id: int):  # type: ignore[no-untyped-def]
        new = NewBiller(account_id=account_id, name="x", biller_type=BillerType.UTILITY)
        return bills.register(new)

    await shop.refused(register(shop.merchant), BillerView, "biller_exists")
    await shop.refused(register(shop.payer), BillerView, "biller_account_invalid")
    await shop.refused(register(12345), BillerView, "account_not_found")
