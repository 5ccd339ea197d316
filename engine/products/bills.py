"""Bill payments: utilities, mobile top-up, credit-card repayment.

A biller is one of the partner's merchant accounts, registered with a type and the
format its references have: a regular expression the whole reference must match, and
optionally a Luhn check digit (card numbers). Each biller type has a default format. A
payment checks the reference before any money moves, then moves payer → biller with
the biller's merchant fee in one linked group, and answers a receipt. The payer pays
`amount_minor`; the fee on the receipt is the house's share, paid by the biller.
"""

from __future__ import annotations

import enum
import re
from datetime import datetime
from typing import Any, Final

import asyncpg
import msgspec

from engine.model import AccountKind, CreateTransfers, ResultCode, TransferSpec
from engine.products.fees import fee_spec
from engine.products.orders import StepFn
from engine.products.step import Refusal, Step

REFERENCE_LENGTH_MAX: Final = 64
PATTERN_LENGTH_MAX: Final = 256


class BillerType(enum.StrEnum):
    UTILITY = "utility"  # water, power, gas: the utility's customer account number
    MOBILE_TOPUP = "mobile_topup"  # a mainland mobile number
    CREDIT_CARD = "credit_card"  # credit-card repayment: the card number


# The format each type has unless the biller is registered with its own.
DEFAULT_FORMATS: Final = {
    BillerType.UTILITY: (r"[0-9A-Za-z]{6,32}", False),
    BillerType.MOBILE_TOPUP: (r"1[3-9][0-9]{9}", False),
    BillerType.CREDIT_CARD: (r"[0-9]{12,19}", True),
}


class BillerView(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    account_id: int
    name: str
    biller_type: BillerType
    reference_pattern: str
    luhn: bool
    created_at: datetime


class NewBiller(msgspec.Struct, frozen=True, kw_only=True):
    account_id: int
    name: str
    biller_type: BillerType
    reference_pattern: str | None = None  # None: the type's default
    luhn: bool | None = None


class BillPayment(msgspec.Struct, frozen=True, kw_only=True):
    biller_id: int
    reference: str
    payer_account_id: int
    amount_minor: int
    currency: str
    notify_url: str | None = None  # where bill.paid goes


class ReceiptView(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    receipt_no: str
    biller_id: int
    biller_name: str
    biller_type: BillerType
    reference_masked: str
    payer_account_id: int
    amount_minor: int
    fee_minor: int
    currency: str
    transfer_id: int
    paid_at: datetime


_BILLER_COLUMNS: Final = "id, account_id, name, biller_type, reference_pattern, luhn, created_at"
_INSERT_BILLER: Final = f"""
INSERT INTO billers ({_BILLER_COLUMNS}, scope) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (account_id) DO NOTHING RETURNING id
"""
_INSERT_PAYMENT: Final = """
INSERT INTO bill_payments (id, scope, receipt_no, biller_id, payer_account_id, reference,
    amount_minor, fee_minor, currency, transfer_id, created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
"""


def pattern_error(pattern: str) -> str | None:
    """Why `pattern` cannot be a reference format, or None."""
    if not 1 <= len(pattern) <= PATTERN_LENGTH_MAX:
        return f"the pattern must be 1 to {PATTERN_LENGTH_MAX} characters"
    try:
        re.compile(pattern)
    except re.error as error:
        return f"not a regular expression: {error}"
    return None


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) check of a card number, its last digit being the check digit."""
    if not (digits.isascii() and digits.isdigit()):
        return False
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def reference_error(biller: BillerView, reference: str) -> str | None:
    """Why `reference` is not one of this biller's, or None."""
    if not 1 <= len(reference) <= REFERENCE_LENGTH_MAX:
        return f"a reference is 1 to {REFERENCE_LENGTH_MAX} characters"
    if re.fullmatch(biller.reference_pattern, reference) is None:
        return f"the reference does not have the format of {biller.name}'s references"
    if biller.luhn and not luhn_valid(reference):
        return "the reference's check digit is wrong"
    return None


def mask(reference: str, biller_type: BillerType) -> str:
    """The reference as a receipt shows it: a mobile number as 138****5678, anything else
    with all but its last four characters hidden."""
    if biller_type == BillerType.MOBILE_TOPUP and len(reference) == 11:
        return reference[:3] + "****" + reference[-4:]
    shown = 4 if len(reference) > 4 else 1
    return "*" * (len(reference) - shown) + reference[-shown:]


def biller_json(biller: BillerView) -> dict[str, Any]:
    return {
        "object": "biller",
        "id": str(biller.id),
        "account_id": str(biller.account_id),
        "name": biller.name,
        "biller_type": biller.biller_type.value,
        "reference_pattern": biller.reference_pattern,
        "luhn": biller.luhn,
        "created_at": biller.created_at,
    }


def receipt_json(receipt: ReceiptView) -> dict[str, Any]:
    return {
        "object": "bill_receipt",
        "id": str(receipt.id),
        "receipt_no": receipt.receipt_no,
        "biller_id": str(receipt.biller_id),
        "biller_name": receipt.biller_name,
        "biller_type": receipt.biller_type.value,
        "reference_masked": receipt.reference_masked,
        "payer_account_id": str(receipt.payer_account_id),
        "amount_minor": receipt.amount_minor,
        "fee_minor": receipt.fee_minor,
        "currency": receipt.currency,
        "transfer_id": str(receipt.transfer_id),
        "paid_at": receipt.paid_at,
    }


def _biller(row: asyncpg.Record) -> BillerView:
    return BillerView(
        id=row["id"],
        account_id=row["account_id"],
        name=row["name"],
        biller_type=BillerType(row["biller_type"]),
        reference_pattern=row["reference_pattern"],
        luhn=row["luhn"],
        created_at=row["created_at"],
    )


async def get_biller(step: Step, biller_id: int) -> BillerView:
    row = await step.conn.fetchrow(
        f"SELECT {_BILLER_COLUMNS} FROM billers WHERE id = $1 AND scope = $2", biller_id, step.scope
    )
    if row is None:
        raise Refusal("biller_not_found", f"no biller {biller_id}")
    return _biller(row)


def register(new: NewBiller) -> StepFn[BillerView]:
    """The operator's step registering one of the partner's merchant accounts as a biller."""

    async def run(step: Step) -> BillerView:
        account = await step.account(new.account_id)
        if account is None:
            raise Refusal(ResultCode.ACCOUNT_NOT_FOUND, f"no account {new.account_id}")
        if account.kind != AccountKind.MERCHANT:
            raise Refusal("biller_account_invalid", "a biller must be a merchant account")
        default_pattern, default_luhn = DEFAULT_FORMATS[new.biller_type]
        pattern = default_pattern if new.reference_pattern is None else new.reference_pattern
        luhn = default_luhn if new.luhn is None else new.luhn
        assert pattern_error(pattern) is None, "the gateway checks the pattern"
        biller_id = step.next_id()
        inserted = await step.conn.fetchval(
            _INSERT_BILLER, biller_id, new.account_id, new.name, new.biller_type.value,
            pattern, luhn, step.now, step.scope,
        )  # fmt: skip
        if inserted is None:
            raise Refusal("biller_exists", f"account {new.account_id} is a biller already")
        return await get_biller(step, biller_id)

    return run


def read_biller(biller_id: int) -> StepFn[BillerView]:
    async def run(step: Step) -> BillerView:
        return await get_biller(step, biller_id)

    return run


async def _check_payer(step: Step, payment: BillPayment, biller: BillerView) -> None:
    payer = await step.account(payment.payer_account_id)
    if payer is None:
        raise Refusal(ResultCode.ACCOUNT_NOT_FOUND, f"no account {payment.payer_account_id}")
    biller_account = await step.account(biller.account_id)
    assert biller_account is not None, "a biller's account is in the biller's scope"
    for account in (payer, biller_account):
        if account.currency != payment.currency:
            raise Refusal(
                ResultCode.CURRENCY_MISMATCH,
                f"account {account.id} holds {account.currency}, not {payment.currency}",
            )
    if payer.id == biller.account_id:
        raise Refusal(ResultCode.ACCOUNTS_MUST_DIFFER, "a biller cannot pay itself")


def pay(payment: BillPayment) -> StepFn[ReceiptView]:
    """The step paying a bill: check the reference, move the money, write the receipt."""

    async def run(step: Step) -> ReceiptView:
        biller = await get_biller(step, payment.biller_id)
        error = reference_error(biller, payment.reference)
        if error is not None:
            raise Refusal("bill_reference_invalid", error, biller_type=biller.biller_type.value)
        await _check_payer(step, payment, biller)
        spec = TransferSpec(
            debit_account_id=payment.payer_account_id,
            credit_account_id=biller.account_id,
            amount_minor=payment.amount_minor,
            currency=payment.currency,
            metadata={"biller_id": str(biller.id)},
        )
        fee = await fee_spec(
            step, merchant_account_id=biller.account_id,
            amount_minor=payment.amount_minor, currency=payment.currency,
        )  # fmt: skip
        specs = (spec,) if fee is None else (spec, fee)
        moved = await step.move_or_refuse(CreateTransfers(transfers=specs, linked=True))
        payment_id = step.next_id()
        receipt = ReceiptView(
            id=payment_id,
            receipt_no=f"B{step.now:%Y%m%d}{payment_id}",
            biller_id=biller.id,
            biller_name=biller.name,
            biller_type=biller.biller_type,
            reference_masked=mask(payment.reference, biller.biller_type),
            payer_account_id=payment.payer_account_id,
            amount_minor=payment.amount_minor,
            fee_minor=0 if fee is None else fee.amount_minor,
            currency=payment.currency,
            transfer_id=moved.transfers[0].id,
            paid_at=step.now,
        )
        await step.conn.execute(
            _INSERT_PAYMENT, payment_id, step.scope, receipt.receipt_no, biller.id,
            payment.payer_account_id, payment.reference, payment.amount_minor,
            receipt.fee_minor, payment.currency, receipt.transfer_id, step.now,
        )  # fmt: skip
        await step.notify(
            event_type="bill.paid",
            subject_id=payment_id,
            payload=receipt_json(receipt),
            notify_url=payment.notify_url,
        )
        return receipt

    return run
